"""I/O errors under exports and jobs (blkdebug injecting EIO).

QEMU sends BLOCK_IO_ERROR from blk_error_action(), which only guest devices call; a storage
daemon has no devices, so qsd reports an export's failed request to the NBD client alone and
a job's failed request with BLOCK_JOB_ERROR. These scenarios pin that down on both daemons:
no BLOCK_IO_ERROR, the client sees EIO, and the job's error events match.
"""

import os
import subprocess

from e2elib import QEMU_IO, export, nbd_start, scenario


def blkdebug_qcow2(run, node, path, *rules):
    """qcow2 *node* on blkdebug (injecting *rules*) on *path*."""
    return run.ok("blockdev-add", {
        "driver": "qcow2", "node-name": node,
        "file": {"driver": "blkdebug", "node-name": f"{node}-dbg",
                 "image": {"driver": "file", "filename": path},
                 "inject-error": list(rules)}}, label=f"blockdev-add {node}")


def client_io(run, export_name, cmd):
    """A qemu-io request through the export; record whether it failed with EIO."""
    p = subprocess.run([QEMU_IO, "-f", "raw", "-c", cmd, run.nbd_uri(export_name)],
                       cwd=run.dir, capture_output=True, text=True, timeout=30)
    out = p.stdout + p.stderr
    run.rec(f"client {cmd}", {"rc": p.returncode,
                              "eio": "Input/output error" in out})
    return p


@scenario
def test_io_error_through_export(run):
    """Reads failing under a writable export: the client gets EIO, the daemon sends no
    BLOCK_IO_ERROR (qsd has no guest devices), and later requests still work."""
    img = run.img("d.qcow2")
    run.io(img, "write -P 0x5a 0 1M")
    run.start()
    blkdebug_qcow2(run, "d", img, {"event": "read_aio", "errno": 5, "once": False})
    nbd_start(run)
    export(run, "d")
    client_io(run, "d", "write -P 0x11 1M 64k")
    client_io(run, "d", "read 0 64k")
    evs = run.events("events after failed read", quiet=0.5)
    run.check(not any(e["event"] == "BLOCK_IO_ERROR" for e in evs), "no BLOCK_IO_ERROR")
    run.ok("block-export-del", {"id": "exp-d"})
    run.events("export deleted", lambda e: e["event"] == "BLOCK_EXPORT_DELETED", quiet=0.2)
    run.stop()


@scenario
def test_io_error_in_backup_job(run):
    """A backup whose source reads fail with on-source-error=report: one BLOCK_JOB_ERROR,
    then the job aborts with the errno text; no BLOCK_IO_ERROR."""
    img = run.img("d.qcow2")
    run.io(img, "write -P 0x5a 0 4M")
    tgt = run.img("t.qcow2")
    run.start()
    blkdebug_qcow2(run, "d", img, {"event": "read_aio", "errno": 5, "once": False})
    run.ok("blockdev-add", {"driver": "qcow2", "node-name": "t",
                            "file": {"driver": "file", "filename": tgt}})
    run.ok("blockdev-backup", {"job-id": "j", "device": "d", "target": "t", "sync": "full",
                               "on-source-error": "report"})
    evs = run.job_events("job events", "j", "null",
                         pause_pairs="attaching the backup filter drains the source; qsd "
                                     "reports the drain as a paused/running pair "
                                     "(reference §12)")
    errors = [e for e in evs if e["event"] == "BLOCK_JOB_ERROR"]
    run.check(len(errors) == 1, f"one BLOCK_JOB_ERROR before the job aborts, got {len(errors)}")
    run.check(not any(e["event"] == "BLOCK_IO_ERROR" for e in evs), "no BLOCK_IO_ERROR")
    run.stop()
