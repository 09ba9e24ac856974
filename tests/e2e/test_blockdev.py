"""blockdev-add / blockdev-del / query-named-block-nodes (reference §6)."""

import os

from e2elib import add_qcow2, export, nbd_start, nodes, scenario


@scenario
def test_blockdev_add_implicit_chain(run):
    """file + qcow2 node whose backing chain is opened implicitly from the image headers."""
    base, mid, top = run.chain()
    run.start()
    run.ok("blockdev-add", {"driver": "file", "node-name": "top-file", "filename": top})
    run.ok("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": "top-file"})
    nodes(run, "nodes", "backing_file", "image.backing-filename", "image.cluster-size")
    add_qcow2(run, "other", base, read_only=True, backing=None)
    nodes(run, "nodes after read-only add")
    run.stop()


@scenario
def test_blockdev_add_cache_inherited(run):
    """cache.direct / cache.no-flush of a qcow2 node reach its inline file child and the
    backing chain opened from the headers, unless a child sets its own."""
    base, mid, top = run.chain()
    run.start()
    run.ok("blockdev-add", {"driver": "qcow2", "node-name": "top",
                            "cache": {"direct": True, "no-flush": True},
                            "file": {"driver": "file", "filename": top,
                                     "cache": {"direct": False}}})
    nodes(run, "nodes", "cache.direct", "cache.no-flush")
    run.ok("blockdev-add", {"driver": "qcow2", "node-name": "other", "read-only": True,
                            "cache": {"no-flush": True}, "backing": None,
                            "file": {"driver": "file", "filename": base}})
    nodes(run, "nodes after a second add", "cache.direct", "cache.no-flush")
    run.stop()


@scenario
def test_blockdev_add_empty_backing_means_none(run):
    """`"backing": ""` is QEMU's deprecated spelling of `null`: no backing file, not a
    reference to a node named ''."""
    base, mid, top = run.chain()
    run.start()
    add_qcow2(run, "top", top, backing="")
    nodes(run, "nodes", "backing_file", "image.backing-filename")
    run.stop()


@scenario
def test_discard_and_detect_zeroes_policies(run):
    """`discard` (ignore by default: guest discards change nothing; inherited by the inline
    file child) and `detect-zeroes` (zero data written as zero clusters, unmapped with
    `unmap`), seen in the image maps, the host allocation and query-named-block-nodes."""
    cases = [("default", {}), ("unmap", {"discard": "unmap"}),
             ("unmap-file-ignore", {"discard": "unmap", "file-discard": "ignore"}),
             ("detect-on", {"detect-zeroes": "on"}),
             ("detect-unmap", {"discard": "unmap", "detect-zeroes": "unmap"})]
    imgs = {}
    for label, _ in cases:
        imgs[label] = run.img(f"{label}.qcow2", "16M")
        run.io(imgs[label], "write -P 5 0 8M")
    run.start()
    nbd_start(run)
    for label, o in cases:
        args = {"driver": "qcow2", "node-name": label.replace("-", "_"),
                "file": {"driver": "file", "filename": imgs[label]}}
        args.update({k: v for k, v in o.items() if k != "file-discard"})
        if "file-discard" in o:
            args["file"]["discard"] = o["file-discard"]
        run.ok("blockdev-add", args, label=f"blockdev-add {label}")
        export(run, label.replace("-", "_"), name=label)
        run.nbd_io(label, "discard 0 4M", "write -z 4M 1M", "write -P 0 5M 1M",
                   "write -P 0 9M 1M")
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "bad", "detect-zeroes": "unmap",
                             "file": {"driver": "file", "filename": imgs["default"]}},
            desc="setting detect-zeroes to unmap is not allowed without setting discard "
                 "operation to unmap", label="detect-zeroes=unmap without discard=unmap")
    nodes(run, "nodes", "detect_zeroes")
    run.stop()
    for label, _ in cases:
        run.rec(f"map {label}", run.img_map(imgs[label]))
        # Host allocation in MiB (hole punching follows the file node's discard policy).
        run.rec(f"allocated MiB {label}", os.stat(imgs[label]).st_blocks * 512 >> 20)
        run.record_image(label, imgs[label])


@scenario
def test_blockdev_add_runtime_option_errors(run):
    """qcow2 cache options, cache-clean-interval, lazy-refcounts on a v2 image and
    aio=native without O_DIRECT: refused with QEMU's texts; valid values accepted."""
    img = run.img("a.qcow2", "4M")
    v2 = run.path("v2.qcow2")
    run.sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "4M"])
    run.start()

    def q(label, path=img, ok=False, **o):
        args = {"driver": "qcow2", "node-name": "n",
                "file": {"driver": "file", "filename": path}, **o}
        if ok:
            run.ok("blockdev-add", args, label=label)
            run.ok("blockdev-del", {"node-name": "n"}, label=f"{label}: del")
        else:
            run.err("blockdev-add", args, label=label)

    q("all three cache sizes", **{"cache-size": 524288, "l2-cache-size": 262144,
                                  "refcount-cache-size": 65536})
    q("l2 above cache-size", **{"cache-size": 524288, "l2-cache-size": 1048576})
    q("refcount above cache-size", **{"cache-size": 524288, "refcount-cache-size": 1048576})
    q("l2 within cache-size", ok=True, **{"cache-size": 524288, "l2-cache-size": 262144})
    q("entry size not a power of two", **{"l2-cache-entry-size": 100})
    q("entry size above the cluster", **{"l2-cache-entry-size": 131072})
    q("entry size 4k", ok=True, **{"l2-cache-entry-size": 4096})
    q("clean interval negative", **{"cache-clean-interval": -1})
    q("clean interval too big", **{"cache-clean-interval": 1 << 32})
    q("lazy refcounts on v2", path=v2, **{"lazy-refcounts": True})
    run.err("blockdev-add", {"driver": "file", "node-name": "f", "filename": img, "aio": "native"},
            label="aio=native without cache.direct")
    run.stop()


@scenario
def test_device_names_a_block_backend(run):
    """`device` names a block backend, and a storage daemon has none: commands that take
    `device` or `node-name` find nodes by `node-name` only. query-version reports the QEMU
    release whose interface the daemon implements."""
    img = run.img("a.qcow2", "4M")
    run.start()
    add_qcow2(run, "n", img)
    run.err("block_resize", {"device": "n", "size": 8 << 20}, label="block_resize by device")
    run.ok("block_resize", {"node-name": "n", "size": 8 << 20}, label="block_resize by node-name")
    run.err("blockdev-snapshot-sync", {"device": "n", "snapshot-file": run.path("s.qcow2"),
                                       "format": "qcow2"}, label="snapshot-sync by device")
    run.ok("query-version", label="qemu version", keep=lambda r: r["qemu"])
    # Oldest node first; file nodes carry the file driver's discard counters.
    run.ok("query-blockstats", {"query-nodes": True}, label="blockstats shape",
           keep=lambda r: [(x["node-name"], "parent" in x, x.get("driver-specific", {}).get("driver"),
                            sorted(x.get("driver-specific", {}))) for x in r])
    run.stop()


@scenario
def test_blockdev_add_errors(run):
    base, mid, top = run.chain()
    run.start()
    add_qcow2(run, "top", top)
    run.err("blockdev-add", {"driver": "file", "node-name": "top", "filename": base},
            desc="Duplicate nodes with node-name='top'", label="duplicate node name")
    run.err("blockdev-add", {"driver": "file", "node-name": "missing",
                             "filename": run.path("nope.qcow2")},
            desc=f"Could not open '{run.path('nope.qcow2')}': No such file or directory",
            label="missing file")
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "no-such-node"},
            label="unknown node reference")
    extra = run.img("extra.qcow2")
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "q",
                             "file": {"driver": "file", "filename": extra},
                             "backing": "no-such-node"}, label="unknown backing reference")
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "q2",
                             "file": {"driver": "file", "filename": top}},
            label="image already in use (locking)")
    run.err("blockdev-add", {"driver": "file", "filename": base},
            desc="'node-name' must be specified for the root node", label="node-name missing")
    run.err("blockdev-add", {"driver": "file", "node-name": "1bad", "filename": base},
            label="invalid node name")
    run.sh(["truncate", "-s", "1M", run.path("raw.img")])
    run.err("blockdev-add", {"driver": "qcow2", "node-name": "raw-as-qcow2",
                             "file": {"driver": "file", "filename": run.path("raw.img")}},
            label="not a qcow2 image")
    run.err("blockdev-del", {"node-name": "nope"},
            desc="Failed to find node with node-name='nope'", label="del unknown")
    run.err("blockdev-del", {"node-name": "top-file"}, label="del child in use")
    nbd_start(run)
    export(run, "top")
    run.err("blockdev-del", {"node-name": "top"}, label="del exported node")
    run.ok("block-export-del", {"id": "exp-top"})
    run.events("export deleted", lambda e: e["event"] == "BLOCK_EXPORT_DELETED")
    nodes(run, "nodes before del")
    run.ok("blockdev-del", {"node-name": "top"})
    nodes(run, "nodes after del")
    run.stop()
