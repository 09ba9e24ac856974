"""blockdev-mirror (§4.4, §4.5)."""

from e2elib import (add_qcow2, block_jobs_view, export, names, nbd_start, nodes, scenario)

PAUSE_REASON = ("an NBD client connecting drains the node, and qsd emits a standby/ready "
                "(or paused/running) pair for every job on it (reference §12)")


def src_and_target(run, size="4M", backing=False):
    if backing:
        base = run.img("base.qcow2", size)
        run.io(base, "write -P 0x21 0 1M")
        src = run.img("src.qcow2", size, backing="base.qcow2")
    else:
        src = run.img("src.qcow2", size)
    run.io(src, "write -P 0x5a 512k 1M", "write -z 3M 64k")
    tgt = run.img("tgt.qcow2", size, backing="base.qcow2" if backing else None)
    return src, tgt


@scenario
def test_mirror_full_complete(run):
    src, tgt = src_and_target(run)
    run.start()
    add_qcow2(run, "src", src)
    add_qcow2(run, "tgt", tgt)
    nbd_start(run)
    export(run, "src")
    run.ok("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"})
    ev = run.events("to ready", lambda e: e["event"] == "BLOCK_JOB_READY")
    run.check(names(ev) == ["m0:created", "m0:running", "m0:ready", "BLOCK_JOB_READY"], str(names(ev)))
    run.ok("query-block-jobs", keep=block_jobs_view)
    run.ok("query-block-exports", label="exports during job")
    run.err("job-finalize", {"id": "m0"},
            desc="Job 'm0' in state 'ready' cannot accept command verb 'finalize'")
    run.ok("block-job-complete", {"device": "m0"})
    ev = run.job_events("finish", "m0", "null")
    run.check(names(ev) == ["m0:waiting", "m0:pending", "BLOCK_JOB_COMPLETED", "m0:concluded",
                            "m0:null"], str(names(ev)))
    run.ok("query-block-exports", label="exports after pivot")
    nodes(run, "nodes after")
    # data written after the pivot lands in the target
    run.nbd_io("src", "write -P 0x77 2M 64k")
    run.stop()
    run.record_image("tgt", tgt)
    run.record_image("src", src)
    run.io(src, "write -P 0x77 2M 64k")
    run.compare_images("src vs tgt", src, tgt)


@scenario
def test_mirror_sync_top(run):
    src, tgt = src_and_target(run, backing=True)
    run.start()
    add_qcow2(run, "src", src)
    add_qcow2(run, "tgt", tgt, backing=None)
    run.ok("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "top"})
    run.events("to ready", lambda e: e["event"] == "BLOCK_JOB_READY")
    run.ok("job-complete", {"id": "m0"})
    run.job_events("finish", "m0", "null")
    nodes(run, "nodes after", "backing_file")
    run.stop()
    run.record_image("tgt", tgt)
    run.compare_images("src vs tgt (tgt backed by base)", src, tgt)
    run.rec("tgt allocation", run.img_map(tgt))


@scenario
def test_mirror_write_blocking(run):
    src, tgt = src_and_target(run)
    run.start()
    add_qcow2(run, "src", src)
    add_qcow2(run, "tgt", tgt)
    nbd_start(run)
    export(run, "src")
    run.ok("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                               "copy-mode": "write-blocking"})
    run.events("to ready", lambda e: e["event"] == "BLOCK_JOB_READY")
    run.nbd_io("src", "write -P 0x66 1M 128k", "write -P 0x67 3M 4k")
    run.events("after nbd writes", None, quiet=0.3, pause_pairs=PAUSE_REASON)
    run.ok("query-block-jobs", keep=lambda r: [dict(block_jobs_view(r)[0],
                                                    **{"actively-synced": r[0].get("actively-synced")})])
    run.ok("block-job-cancel", {"device": "m0"}, label="soft cancel in ready")
    ev = run.job_events("finish", "m0", "null", volatile=("len", "offset"))
    run.check("BLOCK_JOB_COMPLETED" in names(ev), str(names(ev)))
    run.ok("query-block-exports", label="exports after soft cancel (no pivot)")
    run.stop()
    run.record_image("tgt", tgt)
    run.compare_images("src vs tgt", src, tgt)


@scenario
def test_mirror_cancel_before_ready(run):
    src = run.img("src.qcow2", "16M")
    run.io(src, "write -P 0x12 0 16M")
    tgt = run.img("tgt.qcow2", "16M")
    run.start()
    add_qcow2(run, "src", src)
    add_qcow2(run, "tgt", tgt)
    run.ok("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                               "speed": 1 << 20})
    run.job_events("start", "m0", "running")
    run.ok("query-block-jobs", keep=block_jobs_view)
    run.err("job-complete", {"id": "m0"},
            desc="Job 'm0' in state 'running' cannot accept command verb 'complete'")
    run.ok("block-job-cancel", {"device": "m0"})
    ev = run.job_events("finish", "m0", "null", volatile=("len", "offset"))
    run.check(names(ev) == ["m0:aborting", "BLOCK_JOB_CANCELLED", "m0:concluded", "m0:null"],
              str(names(ev)))
    nodes(run, "nodes after")
    run.stop()
    run.record_image("src", src)


@scenario
def test_mirror_errors(run):
    src, tgt = src_and_target(run)
    small = run.img("small.qcow2", "1M")
    run.start()
    add_qcow2(run, "src", src)
    add_qcow2(run, "tgt", tgt)
    add_qcow2(run, "small", small)
    run.err("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "src", "sync": "full"},
            desc="Can't mirror node into itself")
    run.err("blockdev-mirror", {"job-id": "m0", "device": "nope", "target": "tgt", "sync": "full"})
    run.err("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "nope", "sync": "full"})
    run.err("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt",
                                "sync": "incremental"})
    run.err("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                                "granularity": 100},
            desc="Parameter 'granularity' expects a value in range [512B, 64MB]")
    run.err("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
                                "granularity": 3000},
            desc="Parameter 'granularity' expects a power of 2")
    run.err("blockdev-mirror", {"device": "src", "target": "tgt", "sync": "full"},
            desc="Invalid job ID ''")
    run.events("no events", None, quiet=0.2)
    # size mismatch fails inside the job (reference §12)
    r = run.qmp("blockdev-mirror", {"job-id": "m1", "device": "src", "target": "small", "sync": "full"},
                label="size mismatch")
    if "return" in r:
        run.job_events("size mismatch events", "m1", "null")
    run.stop()
