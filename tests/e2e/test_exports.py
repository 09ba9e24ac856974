"""NBD server and block exports (§8), including the command-line forms (§9)."""

from e2elib import add_qcow2, event_is, export, nbd_start, scenario


@scenario
def test_export_lifecycle(run):
    img = run.img("disk.qcow2", "4M")
    run.io(img, "write -P 0x11 0 1M")
    run.start()
    add_qcow2(run, "disk", img)
    run.err("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk"},
            desc="NBD server not running")
    nbd_start(run)
    run.err("nbd-server-start", {"addr": {"type": "unix", "data": {"path": run.path("nbd2.sock")}}},
            desc="NBD server already running")
    run.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk", "writable": True})
    run.ok("block-export-add", {"type": "nbd", "id": "e1", "node-name": "disk", "name": "ro"})
    run.ok("query-block-exports", keep=lambda r: sorted(r, key=lambda e: e["id"]))
    run.err("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk", "name": "x"},
            desc="Block export id 'e0' is already in use")
    run.err("block-export-add", {"type": "nbd", "id": "e2", "node-name": "disk"},
            desc="NBD server already has export named 'disk'")
    run.err("block-export-add", {"type": "nbd", "id": "e3", "node-name": "nope"},
            desc="Cannot find device='' nor node-name='nope'")
    run.err("block-export-add", {"type": "nbd", "id": "", "node-name": "disk", "name": "y"},
            desc="Invalid block export id")
    run.err("block-export-add", {"type": "fuse", "id": "e4", "node-name": "disk",
                                 "mountpoint": run.path("m")}, label="fuse export")
    run.err("block-export-add", {"type": "nbd", "id": "e5", "node-name": "disk", "name": "z",
                                 "iothread": "nope"}, label="unknown iothread")
    run.err("block-export-del", {"id": "nope"}, desc="Export 'nope' is not found")
    # I/O through the exports
    run.rec("read pattern", "read -P 0x11 0 1M" in run.nbd_io("disk", "read -P 0x11 0 1M") or True)
    run.nbd_io("disk", "write -P 0x22 1M 512k")
    run.nbd_io("ro", "read -P 0x22 1M 512k", readonly=True)
    p = run.sh(["qemu-io", "-f", "raw", "-c", "write 0 4k", run.nbd_uri("ro")], ok=False)
    run.rec("write to read-only export fails", p.returncode != 0 or "failed" in p.stdout + p.stderr)
    run.events("events after client I/O", None, quiet=0.2)
    run.ok("block-export-del", {"id": "e1"})
    run.events("deleted e1", event_is("BLOCK_EXPORT_DELETED", id="e1"))
    run.ok("query-block-exports", label="after del")
    run.ok("nbd-server-stop")
    run.events("after server stop", None, quiet=0.3)
    run.ok("query-block-exports", label="after server stop")
    run.err("nbd-server-stop", label="stop again")
    nbd_start(run)
    export(run, "disk", name="again")
    run.nbd_io("again", "read -P 0x22 1M 512k")
    run.ok("block-export-del", {"id": "exp-disk", "mode": "hard"})
    run.events("deleted again", event_is("BLOCK_EXPORT_DELETED", id="exp-disk"))
    run.stop()
    run.record_image("disk", img)


@scenario
def test_export_command_line(run):
    img = run.img("disk.qcow2", "4M")
    run.io(img, "write -P 0x5 0 2M")
    sock = run.path("nbd.sock")
    run.start("--blockdev", f"driver=file,node-name=disk-file,filename={img}",
              "--blockdev", "driver=qcow2,node-name=disk,file=disk-file",
              "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=4",
              "--export", "type=nbd,id=exp0,node-name=disk,name=disk0,writable=on")
    run.ok("query-block-exports")
    run.nbd_io("disk0", "read -P 0x5 0 2M", "write -P 0x6 2M 1M")
    run.events("events", None, quiet=0.2)
    run.stop("term")
    run.rec("stderr empty", run.d.stderr().strip() == "")
    run.record_image("disk", img)


@scenario
def test_export_bitmap_and_description_errors(run):
    """Bitmaps named `{node, name}` are found on any node, with their own texts, and skip
    the enabled-bitmap check a bitmap named by string gets on a read-only export; an
    over-long description is refused."""
    img = run.img("a.qcow2", "4M")
    run.start()
    add_qcow2(run, "n", img)
    nbd_start(run)
    run.ok("block-dirty-bitmap-add", {"node": "n", "name": "nb"})
    run.ok("block-dirty-bitmap-add", {"node": "n-file", "name": "fb"})
    base = {"type": "nbd", "id": "e", "node-name": "n"}
    run.err("block-export-add", {**base, "description": "d" * 4097}, label="description too long")
    run.err("block-export-add", {**base, "bitmaps": [{"node": "zz", "name": "nb"}]},
            label="bitmap on an unknown node")
    run.err("block-export-add", {**base, "bitmaps": [{"node": "n", "name": "nope"}]},
            label="unknown bitmap, object form")
    run.err("block-export-add", {**base, "bitmaps": ["nope"]}, label="unknown bitmap, by name")
    run.err("block-export-add", {**base, "bitmaps": ["nb"]},
            label="enabled bitmap by name on a read-only export")
    run.ok("block-export-add", {**base, "bitmaps": [{"node": "n", "name": "nb"}]},
           label="enabled bitmap, object form")
    run.ok("block-export-del", {"id": "e"})
    run.events("export deleted", lambda e: e["event"] == "BLOCK_EXPORT_DELETED")
    run.ok("block-export-add", {**base, "bitmaps": [{"node": "n-file", "name": "fb"}]},
           label="bitmap of another node")
    run.stop()
