"""Image fleecing as pull-mode backup tools use it (libvirt's backup-begin, virtnbdbackup,
ovirt-imageio): a point-in-time view exported over NBD with the dirty bitmap of the changes
since the last checkpoint, while the guest keeps writing through its own export.

Two forms: the classic one (a qcow2 overlay whose backing is the disk, filled by
`blockdev-backup sync=none`'s copy-before-write) and the newer one (a `copy-before-write`
filter the guest writes through, read via `snapshot-access`)."""

import json

from e2elib import add_qcow2, event_is, export, nbd_start, scenario


def _map(run, exp, ctx):
    """nbdinfo's map of export *exp* for meta context *ctx*, as [offset, length, type]."""
    p = run.sh(["nbdinfo", "--json", f"--map={ctx}", run.nbd_uri(exp)])
    return [[e["offset"], e["length"], e["type"]] for e in json.loads(p.stdout)]


def _guest_writes_before(run):
    run.nbd_io("guest", "write -P 0x22 1M 512k")


def _guest_writes_after(run):
    run.nbd_io("guest", "write -P 0x33 1M 256k", "write -P 0x44 3M 64k", "write -z 2M 64k")


def _backup_client(run, exp):
    """What an incremental-backup client does: map the changed blocks, read them."""
    run.rec("dirty map", _map(run, exp, "qemu:dirty-bitmap:b0"))
    run.rec("allocation map", _map(run, exp, "base:allocation"))
    # The point in time: the writes made after it are invisible here.
    run.nbd_io(exp, "read -P 0x22 1M 512k", "read -P 0x11 2M 64k", "read -P 0x11 3M 64k",
               "read -P 0 3584k 512k", readonly=True)


@scenario
def test_fleecing_with_backup_sync_none(run):
    disk = run.img("disk.qcow2", "4M")
    run.io(disk, "write -P 0x11 0 3584k")
    fleece = run.img("fleece.qcow2", "4M")
    run.start()
    add_qcow2(run, "disk", disk)
    nbd_start(run)
    export(run, "disk", name="guest")
    run.ok("block-dirty-bitmap-add", {"node": "disk", "name": "b0"})
    _guest_writes_before(run)
    add_qcow2(run, "fleece", fleece, backing="disk")
    # The checkpoint: b0 stops recording, b1 takes over, the view is frozen — atomically.
    run.ok("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "b1"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
        {"type": "blockdev-backup", "data": {"job-id": "fleecing", "device": "disk",
                                             "target": "fleece", "sync": "none"}}]})
    run.events("fleecing job running", event_is("JOB_STATUS_CHANGE", id="fleecing", status="running"),
               pause_pairs="qsd drains the job's node for graph changes")
    export(run, "fleece", name="fleece", writable=False, eid="exp-fleece",
           bitmaps=[{"node": "disk", "name": "b0"}])
    _guest_writes_after(run)
    _backup_client(run, "fleece")
    run.ok("query-block", label="query-block", keep=lambda r: len(r))
    run.ok("block-export-del", {"id": "exp-fleece"})
    run.events("export deleted", event_is("BLOCK_EXPORT_DELETED", id="exp-fleece"),
               pause_pairs="qsd drains the job's node for every NBD client that connects")
    run.ok("block-job-cancel", {"device": "fleecing"})
    run.events("fleecing job ends", event_is("JOB_STATUS_CHANGE", id="fleecing", status="null"))
    run.ok("blockdev-del", {"node-name": "fleece"})
    run.ok("query-named-block-nodes", label="dirty bitmaps after", keep=lambda r: sorted(
               (b["name"], b["count"], b["recording"]) for n in r if n["node-name"] == "disk"
               for b in n.get("dirty-bitmaps", [])))
    run.nbd_io("guest", "read -P 0x33 1M 256k", "read -P 0x22 1280k 256k", "read -P 0 2M 64k",
               "read -P 0x44 3M 64k")
    run.stop()
    run.record_image("disk", disk)


@scenario
def test_fleecing_with_snapshot_access(run):
    disk = run.img("disk.qcow2", "4M")
    run.io(disk, "write -P 0x11 0 3584k")
    fleece = run.img("fleece.qcow2", "4M")
    run.start()
    add_qcow2(run, "disk", disk)
    add_qcow2(run, "fleece", fleece)
    run.ok("block-dirty-bitmap-add", {"node": "disk", "name": "b0"})
    nbd_start(run)
    export(run, "disk", name="guest", eid="exp-guest0")
    _guest_writes_before(run)
    # The checkpoint: the guest's export moves onto a copy-before-write filter, whose
    # creation is the point in time.
    run.ok("block-export-del", {"id": "exp-guest0"})
    run.events("guest export 0 deleted", event_is("BLOCK_EXPORT_DELETED", id="exp-guest0"))
    run.ok("block-dirty-bitmap-disable", {"node": "disk", "name": "b0"})
    run.ok("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk",
                            "target": "fleece"}, label="blockdev-add cbw")
    export(run, "cbw", name="guest", eid="exp-guest")
    run.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
    export(run, "acc", name="fleece", writable=False, eid="exp-fleece",
           bitmaps=[{"node": "disk", "name": "b0"}])
    _guest_writes_after(run)
    _backup_client(run, "fleece")
    run.ok("block-export-del", {"id": "exp-fleece"})
    run.events("fleece export deleted", event_is("BLOCK_EXPORT_DELETED", id="exp-fleece"))
    run.ok("blockdev-del", {"node-name": "acc"})
    run.nbd_io("guest", "read -P 0x33 1M 256k", "read -P 0x22 1280k 256k", "read -P 0 2M 64k",
               "read -P 0x44 3M 64k")
    run.stop()
    run.record_image("disk", disk)
