"""Shutdown under load, with a second signal while shutting down (issue 5, item 5): a job
runs, an NBD client keeps writing through an export, a persistent bitmap tracks the writes;
SIGTERM, then SIGTERM and SIGINT again during the shutdown. Both daemons must exit cleanly
and leave images that pass `qemu-img check`, without the dirty bit, with the bitmap stored
(not left "in-use")."""

import json
import signal
import subprocess
import time

from e2elib import QEMU_IMG, QEMU_IO, add_chain, export, nbd_start, scenario


def image_state(run, label, path):
    """qemu-img check status and the header state that a clean close leaves behind."""
    p = run.sh([QEMU_IMG, "check", "--output=json", path], ok=False)
    try:
        chk = json.loads(p.stdout)
        chk = {k: chk.get(k, 0) for k in ("check-errors", "corruptions", "leaks")}
    except ValueError:
        chk = {"output": p.stdout + p.stderr}
    info = json.loads(run.sh([QEMU_IMG, "info", "--output=json", path]).stdout)
    data = info.get("format-specific", {}).get("data", {})
    bitmaps = [{"name": b["name"], "flags": sorted(b["flags"])}
               for b in data.get("bitmaps", [])]
    run.rec(label, {"check rc": p.returncode, **chk, "dirty": info.get("dirty-flag", False),
                    "corrupt": data.get("corrupt", False), "bitmaps": bitmaps})


@scenario(variants=["term-term", "term-int"])
def test_shutdown_second_signal(run, second):
    base = run.img("base.qcow2", "32M")
    run.io(base, "write -P 0x33 0 32M")
    top = run.img("top.qcow2", "32M", backing="base.qcow2", opts="lazy_refcounts=on")
    run.start()
    add_chain(run, [base, top], ["base", "top"])
    run.ok("block-dirty-bitmap-add", {"node": "top", "name": "b0", "persistent": True})
    nbd_start(run)
    export(run, "top")
    run.ok("block-stream", {"job-id": "s0", "device": "top", "speed": 1 << 20})
    run.job_events("stream running", "s0", "running")
    # A client writing through the export for longer than the test lasts.
    cmds = []
    for i in range(1000):
        cmds += ["-c", f"write -P {i % 200 + 1} {(i % 32) * 1024}k 64k", "-c", "sleep 10"]
    writer = subprocess.Popen([QEMU_IO, "-f", "raw", *cmds, run.nbd_uri("top")],
                              cwd=run.dir, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    run.check(writer.poll() is None, "the NBD writer should still be writing")
    proc = run.d.proc
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM if second == "term-term" else signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGTERM if second == "term-term" else signal.SIGINT)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "hung"
    run.rec("exit status", rc)
    # The client has lost its server; it would only go on failing.
    writer.kill()
    writer.wait(timeout=30)
    run.d.disconnect()
    image_state(run, "top after shutdown", top)
    image_state(run, "base after shutdown", base)
