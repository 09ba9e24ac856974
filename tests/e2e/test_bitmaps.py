"""Dirty bitmaps (§5)."""

from e2elib import add_qcow2, export, nbd_start, scenario


def bitmaps(run, label, node="src"):
    def view(r):
        return [{k: b.get(k, "<absent>") for k in ("name", "count", "granularity", "recording",
                                                   "busy", "persistent", "inconsistent")}
                for n in r if n.get("node-name") == node
                for b in sorted(n.get("dirty-bitmaps", []), key=lambda b: b.get("name", ""))]
    return run.ok("query-named-block-nodes", {"flat": True}, label=label, keep=view)


def sha(run, name, label=None, node="src"):
    return run.ok("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name},
                  label=label or f"sha256 {name}")


@scenario
def test_bitmap_operations(run):
    src = run.img("src.qcow2", "8M")
    run.start()
    add_qcow2(run, "src", src)
    nbd_start(run)
    export(run, "src")
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "a"})
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "b", "granularity": 4096})
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "c", "disabled": True})
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "m", "granularity": 65536, "disabled": True})
    sha(run, "a", "sha256 empty")
    run.nbd_io("src", "write -P 1 0 4k", "write -P 2 1M 100k", "write -P 3 7M 1M")
    bitmaps(run, "after writes")
    for n in ("a", "b", "c"):
        sha(run, n)
    run.ok("block-dirty-bitmap-disable", {"node": "src", "name": "a"})
    run.ok("block-dirty-bitmap-enable", {"node": "src", "name": "c"})
    run.nbd_io("src", "write -P 4 3M 64k")
    bitmaps(run, "after enable/disable")
    run.ok("block-dirty-bitmap-merge", {"node": "src", "target": "m",
                                        "bitmaps": ["a", {"node": "src", "name": "c"}]})
    sha(run, "m", "sha256 merged")
    run.ok("block-dirty-bitmap-clear", {"node": "src", "name": "b"})
    sha(run, "b", "sha256 cleared")
    run.ok("block-dirty-bitmap-remove", {"node": "src", "name": "c"})
    bitmaps(run, "after clear/remove")
    run.ok("transaction", {"actions": [
        {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "a"}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "src", "target": "b", "bitmaps": ["m"]}},
        {"type": "block-dirty-bitmap-enable", "data": {"node": "src", "name": "a"}}]})
    bitmaps(run, "after transaction")
    run.err("transaction", {"actions": [
        {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "m"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "a"}}]},
        desc="Bitmap already exists: a", label="failed transaction")
    sha(run, "m", "sha256 m after rollback")
    run.stop()


@scenario
def test_bitmap_errors(run):
    src = run.img("src.qcow2", "4M")
    ro = run.img("ro.qcow2", "4M")
    run.start()
    add_qcow2(run, "src", src)
    add_qcow2(run, "ro", ro, read_only=True)
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "a"})
    run.err("block-dirty-bitmap-add", {"node": "src", "name": "a"}, desc="Bitmap already exists: a")
    run.err("block-dirty-bitmap-add", {"node": "src", "name": ""}, desc="Bitmap name cannot be empty")
    run.err("block-dirty-bitmap-add", {"node": "src", "name": "x" * 1024},
            desc="Bitmap name too long: " + "x" * 1024)
    run.err("block-dirty-bitmap-add", {"node": "src", "name": "g", "granularity": 1000},
            desc="Granularity must be power of 2 and at least 512")
    run.err("block-dirty-bitmap-add", {"node": "src", "name": "g", "granularity": 256},
            desc="Granularity must be power of 2 and at least 512")
    run.err("block-dirty-bitmap-add", {"node": "nope", "name": "a"},
            desc="Cannot find device='nope' nor node-name='nope'")
    # qsd 10.0.2 accepts this (recorded, not asserted)
    run.qmp("block-dirty-bitmap-add", {"node": "ro", "name": "p", "persistent": True},
            label="persistent on read-only node")
    for cmd in ("block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                "block-dirty-bitmap-disable", "x-debug-block-dirty-bitmap-sha256"):
        run.err(cmd, {"node": "src", "name": "nope"}, desc="Dirty bitmap 'nope' not found",
                label=f"{cmd} unknown bitmap")
        run.err(cmd, {"node": "nope", "name": "a"}, label=f"{cmd} unknown node")
    run.err("block-dirty-bitmap-merge", {"node": "src", "target": "a", "bitmaps": ["nope"]},
            label="merge unknown source")
    run.err("block-dirty-bitmap-merge", {"node": "src", "target": "nope", "bitmaps": ["a"]},
            label="merge unknown target")
    # busy: bitmap in use by an NBD export
    nbd_start(run)
    run.ok("block-dirty-bitmap-disable", {"node": "src", "name": "a"})
    export(run, "src", writable=False, bitmaps=["a"])
    bitmaps(run, "busy via export")
    run.err("block-dirty-bitmap-clear", {"node": "src", "name": "a"},
            desc="Bitmap 'a' is currently in use by another operation and cannot be used")
    run.err("block-dirty-bitmap-remove", {"node": "src", "name": "a"},
            desc="Bitmap 'a' is currently in use by another operation and cannot be used")
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "rec"})
    run.err("block-export-add", {"type": "nbd", "id": "e2", "node-name": "src", "name": "e2",
                                 "bitmaps": ["rec"]},
            desc="Enabled bitmap 'rec' incompatible with readonly export")
    run.err("block-export-add", {"type": "nbd", "id": "e3", "node-name": "src", "name": "e3",
                                 "bitmaps": ["nope"]}, desc="Bitmap 'nope' is not found")
    run.stop()


@scenario
def test_bitmap_persistent_restart(run):
    src = run.img("src.qcow2", "4M")
    run.start()
    add_qcow2(run, "src", src)
    nbd_start(run)
    export(run, "src")
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "p", "persistent": True,
                                      "granularity": 65536})
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "pd", "persistent": True,
                                      "disabled": True})
    run.ok("block-dirty-bitmap-add", {"node": "src", "name": "t"})
    run.nbd_io("src", "write -P 9 0 64k", "write -P 9 2M 1M")
    before = sha(run, "p", "sha256 before restart")
    bitmaps(run, "before restart")
    run.stop()
    info = run.img_info(src)
    run.rec("qemu-img info bitmaps",
            info.get("format-specific", {}).get("data", {}).get("bitmaps"))
    run.record_image("src", src)
    run.start()
    add_qcow2(run, "src", src)
    bitmaps(run, "after restart")
    after = sha(run, "p", "sha256 after restart")
    run.check(before == after, f"persistent bitmap changed across restart: {before} vs {after}")
    run.ok("block-dirty-bitmap-remove", {"node": "src", "name": "pd"})
    run.stop()
    info = run.img_info(src)
    run.rec("qemu-img info bitmaps after remove",
            info.get("format-specific", {}).get("data", {}).get("bitmaps"))
