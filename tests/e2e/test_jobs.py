"""Job verbs in valid and invalid states (§2.3, §2.4, §3.1)."""

from e2elib import (add_chain, add_qcow2, block_jobs_view, jobs_view, names, scenario)


def slow_stream(run, **extra):
    base = run.img("base.qcow2", "16M")
    run.io(base, "write -P 0x33 0 16M")
    top = run.img("top.qcow2", "16M", backing="base.qcow2")
    run.start()
    add_chain(run, [base, top], ["base", "top"])
    args = {"job-id": "j", "device": "top", "speed": 512 << 10}
    args.update(extra)
    run.ok("block-stream", args)
    run.job_events("start", "j", "running")
    return top


def verb_error(run, cmd, args, state, verb):
    run.err(cmd, args, desc=f"Job 'j' in state '{state}' cannot accept command verb '{verb}'",
            label=f"{cmd} in {state}")


@scenario
def test_job_verbs_state_machine(run):
    """pause/resume/set-speed/complete/finalize/dismiss/cancel with auto-finalize=false and
    auto-dismiss=false, through running, paused, pending and concluded."""
    slow_stream(run, **{"auto-finalize": False, "auto-dismiss": False})
    verb_error(run, "job-complete", {"id": "j"}, "running", "complete")
    verb_error(run, "job-finalize", {"id": "j"}, "running", "finalize")
    verb_error(run, "job-dismiss", {"id": "j"}, "running", "dismiss")
    run.err("job-resume", {"id": "j"}, desc="Can't resume a job that was not paused")
    run.ok("job-pause", {"id": "j"})
    run.job_events("paused", "j", "paused")
    run.err("job-pause", {"id": "j"}, desc="Job is already paused")
    run.err("block-job-cancel", {"device": "j"},
            desc="The block job for device 'j' is currently paused")
    run.ok("query-block-jobs", keep=block_jobs_view, label="query-block-jobs paused")
    run.ok("query-jobs", keep=jobs_view, label="query-jobs paused")
    run.ok("block-job-set-speed", {"device": "j", "speed": 0})
    run.ok("block-job-resume", {"device": "j"})
    ev = run.events("to pending", lambda e: e["event"] == "BLOCK_JOB_PENDING")
    run.check(names(ev) == ["j:running", "j:waiting", "j:pending", "BLOCK_JOB_PENDING"], str(names(ev)))
    for cmd, verb in (("job-pause", "pause"), ("job-complete", "complete"), ("job-dismiss", "dismiss")):
        verb_error(run, cmd, {"id": "j"}, "pending", verb)
    run.err("block-job-set-speed", {"device": "j", "speed": 1},
            desc="Job 'j' in state 'pending' cannot accept command verb 'set-speed'")
    run.ok("query-jobs", keep=jobs_view, label="query-jobs pending")
    run.ok("block-job-finalize", {"id": "j"})
    ev = run.job_events("to concluded", "j", "concluded")
    run.check(names(ev) == ["BLOCK_JOB_COMPLETED", "j:concluded"], str(names(ev)))
    for cmd, verb in (("job-cancel", "cancel"), ("job-finalize", "finalize"), ("job-pause", "pause")):
        verb_error(run, cmd, {"id": "j"}, "concluded", verb)
    run.ok("query-jobs", keep=jobs_view, label="query-jobs concluded")
    run.ok("query-block-jobs", keep=block_jobs_view, label="query-block-jobs concluded")
    run.ok("block-job-dismiss", {"id": "j"})
    run.job_events("dismissed", "j", "null")
    run.ok("query-jobs", label="query-jobs empty")
    run.stop()


@scenario
def test_job_cancel_while_paused(run):
    """job-cancel is always forced and allowed while paused; failed jobs keep their error."""
    slow_stream(run, **{"auto-dismiss": False})
    run.ok("block-job-pause", {"device": "j"})
    run.job_events("paused", "j", "paused")
    run.ok("job-cancel", {"id": "j"})
    ev = run.job_events("cancelled", "j", "concluded", volatile=("len", "offset"))
    run.check(names(ev)[-2:] == ["BLOCK_JOB_CANCELLED", "j:concluded"], str(names(ev)))
    run.ok("query-jobs", keep=jobs_view)
    run.ok("job-dismiss", {"id": "j"})
    run.job_events("dismissed", "j", "null")
    run.stop()


@scenario
def test_job_unknown_and_duplicate_ids(run):
    slow_stream(run)
    for cmd in ("job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize", "job-dismiss"):
        run.err(cmd, {"id": "nope"}, desc="Job not found")
    for cmd, arg in (("block-job-pause", "device"), ("block-job-resume", "device"),
                     ("block-job-cancel", "device"), ("block-job-complete", "device"),
                     ("block-job-finalize", "id"), ("block-job-dismiss", "id")):
        run.err(cmd, {arg: "nope"}, cls="DeviceNotActive", desc="Block job 'nope' not found")
    run.err("block-job-set-speed", {"device": "nope", "speed": 1}, cls="DeviceNotActive",
            desc="Block job 'nope' not found")
    run.err("block-job-change", {"id": "j", "type": "mirror", "copy-mode": "write-blocking"},
            label="change of a stream job")
    run.err("block-job-change", {"id": "nope", "type": "mirror", "copy-mode": "write-blocking"},
            cls="DeviceNotActive", desc="Block job 'nope' not found")
    extra = run.img("extra.qcow2", "16M")
    add_qcow2(run, "extra", extra)
    run.err("block-stream", {"job-id": "j", "device": "extra"}, desc="Job ID 'j' already in use")
    run.err("block-commit", {"job-id": "j2", "device": "top"}, label="second job on busy node")
    run.ok("query-block-jobs", keep=block_jobs_view)
    run.ok("query-jobs", keep=jobs_view)
    run.ok("block-job-cancel", {"device": "j", "force": True})
    run.job_events("cancelled", "j", "null", volatile=("len", "offset"),
                   pause_pairs="blockdev-add and the failed job creations drain all nodes; qsd "
                               "reports each drain as a paused/running pair (reference §12)")
    run.stop()


@scenario
def test_job_block_job_complete_errors(run):
    """block-job-complete on a job that cannot complete; cancel of a READY job that is paused."""
    src = run.img("src.qcow2", "4M")
    run.io(src, "write -P 0x1 0 1M")
    tgt = run.img("tgt.qcow2", "4M")
    run.start()
    add_qcow2(run, "src", src)
    add_qcow2(run, "tgt", tgt)
    run.ok("blockdev-mirror", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                               "auto-dismiss": False})
    run.events("ready", lambda e: e["event"] == "BLOCK_JOB_READY")
    run.ok("job-pause", {"id": "j"})
    ev = run.job_events("standby", "j", "standby")
    run.ok("query-block-jobs", keep=block_jobs_view, label="query-block-jobs standby")
    run.ok("job-resume", {"id": "j"})
    run.job_events("ready again", "j", "ready")
    run.ok("job-cancel", {"id": "j"})
    ev = run.job_events("forced cancel", "j", "concluded")
    run.check("BLOCK_JOB_CANCELLED" in names(ev), str(names(ev)))
    run.err("job-complete", {"id": "j"},
            desc="Job 'j' in state 'concluded' cannot accept command verb 'complete'")
    run.ok("query-jobs", keep=jobs_view)
    run.ok("job-dismiss", {"id": "j"})
    run.job_events("dismissed", "j", "null")
    run.stop()
