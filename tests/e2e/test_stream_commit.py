"""block-stream (§4.1) and block-commit (§4.2)."""

from e2elib import (add_chain, add_qcow2, block_jobs_view, jsc, names, nodes, scenario,
                    VOLATILE)

DONE = ["created", "running", "waiting", "pending"]


def header_backing(run, path):
    info = run.img_info(path)
    return run.rec(f"header of {path.rsplit('/', 1)[-1]}",
                   {k: info.get(k, "<absent>") for k in ("backing-filename", "backing-filename-format")})


@scenario
def test_stream_whole_chain(run):
    paths = run.chain()
    run.start()
    add_qcow2(run, "top", paths[2])
    run.ok("block-stream", {"job-id": "s0", "device": "top"})
    ev = run.job_events("events", "s0", "null")
    run.check(names(ev) == ["s0:created", "s0:running", "s0:waiting", "s0:pending",
                            "BLOCK_JOB_COMPLETED", "s0:concluded", "s0:null"], str(names(ev)))
    nodes(run, "nodes after", "backing_file")
    run.stop()
    header_backing(run, paths[2])
    run.record_image("top", paths[2])


@scenario
def test_stream_base_node(run):
    paths = run.chain()
    run.start()
    add_chain(run, paths)
    run.ok("block-stream", {"job-id": "s0", "device": "top", "base-node": "base"})
    run.job_events("events", "s0", "null")
    nodes(run, "nodes after", "backing_file")
    run.stop()
    header_backing(run, paths[2])
    run.record_image("top", paths[2])
    run.record_image("mid", paths[1])


@scenario
def test_stream_speed_cancel(run):
    base = run.img("base.qcow2", "16M")
    run.io(base, "write -P 0x33 0 16M")
    top = run.img("top.qcow2", "16M", backing="base.qcow2")
    run.start()
    add_chain(run, [base, top], ["base", "top"])
    run.ok("block-stream", {"job-id": "s0", "device": "top", "speed": 1 << 20})
    run.job_events("start", "s0", "running")
    run.ok("query-block-jobs", keep=block_jobs_view)
    run.ok("block-job-set-speed", {"device": "s0", "speed": 2 << 20})
    run.err("block-job-set-speed", {"device": "s0", "speed": -1},
            desc="Parameter 'speed' expects a non-negative value")
    run.ok("query-block-jobs", keep=block_jobs_view, label="after set-speed")
    run.ok("block-job-cancel", {"device": "s0"})
    ev = run.job_events("cancel", "s0", "null", volatile=("len", "offset"))
    run.check(names(ev) == ["s0:aborting", "BLOCK_JOB_CANCELLED", "s0:concluded", "s0:null"],
              str(names(ev)))
    nodes(run, "nodes after", "backing_file")
    run.stop()
    header_backing(run, top)
    run.record_image("top", top)


@scenario
def test_stream_bad_args(run):
    paths = run.chain()
    run.start()
    add_chain(run, paths)
    run.err("block-stream", {"job-id": "s0", "device": "top", "base": paths[0], "base-node": "base"},
            desc="'base' and 'base-node' cannot be specified at the same time")
    run.err("block-stream", {"job-id": "s0", "device": "nope"},
            desc="Cannot find device='nope' nor node-name='nope'")
    run.err("block-stream", {"device": "top"}, desc="Invalid job ID ''")
    run.err("block-stream", {"job-id": "0bad", "device": "top"}, desc="Invalid job ID '0bad'")
    run.err("block-stream", {"job-id": "s0", "device": "top", "base-node": "top"})
    run.err("block-stream", {"job-id": "s0", "device": "mid", "base-node": "nope"})
    run.err("block-stream", {"job-id": "s0", "device": "top", "base": "nope.qcow2"})
    run.err("block-stream", {"job-id": "s0", "device": "top", "backing-file": "x"},
            desc="backing file specified, but streaming the entire chain")
    run.events("no events", None, quiet=0.2)
    run.stop()


@scenario
def test_commit_intermediate(run):
    paths = run.chain()
    run.start()
    add_chain(run, paths)
    run.ok("block-commit", {"job-id": "c0", "device": "top", "top-node": "mid", "base-node": "base"})
    ev = run.job_events("events", "c0", "null")
    run.check(names(ev) == ["c0:created", "c0:running", "c0:waiting", "c0:pending",
                            "BLOCK_JOB_COMPLETED", "c0:concluded", "c0:null"], str(names(ev)))
    nodes(run, "nodes after", "backing_file")
    run.stop()
    header_backing(run, paths[2])
    run.record_image("top", paths[2])
    run.record_image("base", paths[0])


@scenario(variants=["complete", "soft-cancel", "force-cancel"])
def test_commit_active(run, how):
    """Active commit: READY, then job-complete (pivot), soft cancel (COMPLETED, no pivot)
    or forced cancel (CANCELLED)."""
    paths = run.chain()
    run.start()
    add_chain(run, paths)
    run.ok("block-commit", {"job-id": "c0", "device": "top"})
    ev = run.events("to ready", lambda e: e["event"] == "BLOCK_JOB_READY")
    run.check(names(ev) == ["c0:created", "c0:running", "c0:ready", "BLOCK_JOB_READY"], str(names(ev)))
    run.ok("query-block-jobs", keep=block_jobs_view)
    if how == "complete":
        run.ok("job-complete", {"id": "c0"})
        ev = run.job_events("finish", "c0", "null")
        run.check(names(ev) == ["c0:waiting", "c0:pending", "BLOCK_JOB_COMPLETED",
                                "c0:concluded", "c0:null"], str(names(ev)))
    elif how == "soft-cancel":
        run.ok("block-job-cancel", {"device": "c0"})
        ev = run.job_events("finish", "c0", "null")
        run.check("BLOCK_JOB_COMPLETED" in names(ev), str(names(ev)))
    else:
        run.ok("block-job-cancel", {"device": "c0", "force": True})
        ev = run.job_events("finish", "c0", "null")
        run.check("BLOCK_JOB_CANCELLED" in names(ev), str(names(ev)))
    nodes(run, "nodes after", "backing_file")
    run.stop()
    run.record_image("base", paths[0])
    run.record_image("top", paths[2])


@scenario
def test_commit_errors(run):
    paths = run.chain()
    run.start()
    add_chain(run, paths)
    run.err("block-commit", {"job-id": "c0", "device": "nope"}, cls="DeviceNotFound",
            desc="Device 'nope' not found")
    run.err("block-commit", {"job-id": "c0", "device": "top", "top-node": "nope"})
    run.err("block-commit", {"job-id": "c0", "device": "top", "base-node": "top"})
    run.err("block-commit", {"job-id": "c0", "device": "top", "top-node": "base"})
    run.err("block-commit", {"job-id": "c0", "device": "top", "top-node": "mid", "top": "mid.qcow2"},
            desc="'top-node' and 'top' are mutually exclusive")
    run.err("block-commit", {"job-id": "c0", "device": "top", "backing-file": "x"},
            desc="'backing-file' specified, but 'top' is the active layer")
    run.err("block-commit", {"device": "top"}, desc="Invalid job ID ''")
    run.events("no events", None, quiet=0.2)
    run.stop()
