"""Pairs of block jobs at the same time (docs/PARALLEL_JOBS.md): job A runs (speed-limited),
job B is started next to it. For each pair the test records whether the daemon accepts B,
checks that against the table (qsd's column against qemu-storage-daemon 10.0.2, stratad's
against stratad), and for every pair stratad accepts, runs both jobs to the end and checks
the content: every image the jobs touch keeps its guest view, every target holds its
source's view.

Chain (4 MiB, every layer writing its own ranges): base <- l1 <- l2 <- l3 <- l4, all explicit
nodes; targets t1, t2 (empty qcow2, 4 MiB).
"""

import os
import subprocess
import time

import pytest

import e2elib

MIB = 1 << 20
LAYERS = ["base", "l1", "l2", "l3", "l4"]


def stream(dev, base):
    return ("block-stream", {"device": dev, "base-node": base}, [])


def commit(top, base):
    # The base takes the data and the images from top down to above the base leave the
    # chain: their views may change.
    lo, hi = LAYERS.index(base), LAYERS.index(top)
    return ("block-commit", {"device": "l4", "top-node": top, "base-node": base},
            LAYERS[lo:hi + 1])


def backup(dev, tgt):
    return ("blockdev-backup", {"device": dev, "target": tgt, "sync": "full"}, [(tgt, dev)])


def mirror(dev, tgt):
    return ("blockdev-mirror", {"device": dev, "target": tgt, "sync": "full"}, [(tgt, dev)])


# name: (job A, job B, qsd 10.0.2 accepts B, stratad accepts B), as measured. stratad refuses
# what qsd refuses: a node a job holds is busy for other jobs (QEMU's op blockers), and a job's
# hold makes a node non-root.
# A job whose `device` is l4 needs l4 to be a root: once job A has put its filter above l4,
# qsd and stratad both answer "Need a root block node" (B would have to name A's filter).
PAIRS = {
    "stream-stream-disjoint": (stream("l4", "l2"), stream("l2", "base"), True, True),
    "stream-commit-disjoint": (stream("l4", "l2"), commit("l2", "base"), False, False),
    "commit-commit-disjoint": (commit("l3", "l2"), commit("l1", "base"), False, False),
    "stream-stream-same-node": (stream("l4", "l2"), stream("l4", "base"), False, False),
    "backup-backup-same-source": (backup("l4", "t1"), backup("l4", "t2"), True, True),
    "backup-mirror-same-source": (backup("l4", "t1"), mirror("l4", "t2"), False, False),
    "mirror-mirror-same-source": (mirror("l4", "t1"), mirror("l4", "t2"), False, False),
    "mirror-stream-same-node": (mirror("l4", "t1"), stream("l4", "l2"), False, False),
    "backup-stream-same-node": (backup("l4", "t1"), stream("l4", "l2"), True, True),
    "stream-backup-lower-node": (stream("l4", "l2"), backup("l1", "t1"), True, True),
    "commit-backup-active": (commit("l3", "l2"), backup("l4", "t1"), False, False),
    "commit-backup-base": (commit("l3", "l1"), backup("l1", "t1"), False, False),
}


def _sh(*argv):
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (argv, p.stdout, p.stderr)
    return p.stdout


def _setup(workdir):
    for i, n in enumerate(LAYERS):
        path = os.path.join(workdir, f"{n}.qcow2")
        argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if i:
            argv += ["-b", f"{LAYERS[i - 1]}.qcow2", "-F", "qcow2"]
        _sh(*argv, path, "4M")
        # layer i writes 1 MiB at i * 768 KiB (overlapping its neighbours)
        _sh("qemu-io", "-f", "qcow2", "-c", f"write -P {0x10 + i} {i * 768}k 1M", path)
        _sh("qemu-img", "convert", "-O", "raw", path, os.path.join(workdir, f"{n}.view"))
    for t in ("t1", "t2"):
        _sh("qemu-img", "create", "-q", "-f", "qcow2", os.path.join(workdir, f"{t}.qcow2"), "4M")


def _open(d, workdir):
    for i, n in enumerate(LAYERS):
        node = {"driver": "qcow2", "node-name": n,
                "file": {"driver": "file", "filename": os.path.join(workdir, f"{n}.qcow2")}}
        node["backing"] = LAYERS[i - 1] if i else None
        _ok(d, "blockdev-add", node)
    for t in ("t1", "t2"):
        _ok(d, "blockdev-add", {"driver": "qcow2", "node-name": t, "file": {
            "driver": "file", "filename": os.path.join(workdir, f"{t}.qcow2")}})


def _ok(d, cmd, args=None):
    r = d.execute(cmd, args)
    assert "return" in r, (cmd, args, r)
    return r["return"]


def _finish(d, ids, timeout=60.0):
    """Run every job to its end: mirrors are cancelled once READY (the target keeps the
    copy, nothing pivots). Returns the COMPLETED events by job id."""
    done = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"jobs {ids} did not finish: {done}"
        ev = d.pull_event(0.5)
        if ev is None:
            continue
        dev = ev.get("data", {}).get("device")
        if ev["event"] == "BLOCK_JOB_READY":
            _ok(d, "block-job-cancel", {"device": dev})
        elif ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            done[dev] = ev
    return done


def run_pair(kind, binary, name, workdir, b_extra=None):
    """Start A, then B (with `b_extra` added to its arguments); returns B's error text (None
    if accepted), and when accepted the list of content mismatches after both jobs ran to
    the end."""
    a, b, _, _ = PAIRS[name]
    _setup(workdir)
    d = e2elib.Daemon(kind, binary, workdir, "par")
    d.start([])
    try:
        _open(d, workdir)
        # Slow enough that A still runs when B is asked for (A copies about 1 MiB).
        _ok(d, a[0], {**a[1], "job-id": "A", "speed": 256 << 10})
        r = d.execute(b[0], {**b[1], **(b_extra or {}), "job-id": "B"})
        if "error" in r:
            d.execute("block-job-set-speed", {"device": "A", "speed": 0})
            _finish(d, ["A"])
            return r["error"]["desc"], []
        # (A may be done already: its COMPLETED event is still queued.)
        d.execute("block-job-set-speed", {"device": "A", "speed": 0})
        evs = _finish(d, ["A", "B"])
    finally:
        d.stop("quit")
    bad = [f"{j}: {ev['data'].get('error')}" for j, ev in evs.items()
           if "error" in ev["data"]]
    # Every layer keeps its view (stream never changes what an image shows; a commit
    # changes only its base and the images it drops); every target holds its source's view.
    changed = {n for job in (a, b) for n in job[2] if isinstance(n, str)}
    checks = [(n, n) for n in LAYERS if n not in changed]
    checks += [c for job in (a, b) for c in job[2] if isinstance(c, tuple)]
    for img, view in checks:
        p = subprocess.run(["qemu-img", "compare", "-q", os.path.join(workdir, f"{view}.view"),
                            os.path.join(workdir, f"{img}.qcow2")], capture_output=True, text=True)
        if p.returncode != 0:
            bad.append(f"{img} != view of {view}")
    return None, bad


# qsd's refusal texts for the pairs it refuses (stratad must give the same).
REFUSALS = {
    "stream-stream-same-node": "Node 'l4' is busy: block device is in use by block job: stream",
    "mirror-stream-same-node": "Node 'l4' is busy: block device is in use by block job: mirror",
    "commit-backup-active": "Node 'l4' is busy: block device is in use by block job: commit",
    "commit-backup-base": "Node 'l1' is busy: block device is in use by block job: commit",
    "commit-commit-disjoint": "Need a root block node",
}


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("kind", ["qsd", "stratad"])
def test_job_pair(kind, name):
    binary = e2elib.HARNESS.binaries.get(kind)
    if not binary or kind not in e2elib.HARNESS.daemons:
        pytest.skip(f"{kind} not selected or not found")
    w = e2elib.new_workdir(f"pair-{name}")
    e2elib.HARNESS.workdirs.append(w)
    err, bad = run_pair(kind, binary, name, w)
    accepted = PAIRS[name][2 if kind == "qsd" else 3]
    assert (err is None) == accepted, f"{kind} {name}: expected accepted={accepted}, got {err}"
    if err is not None and name in REFUSALS:
        assert REFUSALS[name] in err, f"{kind} {name}: {err}"
    # Content is asserted for stratad. qsd's own result is the reference for acceptance only:
    # in one CI run qsd itself left l4's view changed in stream + backup of a lower node.
    if kind == "stratad":
        assert bad == [], bad


# Strata's `x-parallel` (docs/EXTENSIONS.md) on job B, for the pairs whose B is a commit or a
# backup: stratad accepts B when what B changes is free and the nodes it shares are held by
# A only in roles that keep them in the chain with their view (a commit's overlay may also
# be A's base). Whether stratad accepts B, as measured; each accepted pair runs to the end
# with its content checked.
X_PARALLEL = {
    "stream-commit-disjoint": False,   # the stream's filter is l4's parent: l4 is no root
    "commit-commit-disjoint": True,
    "backup-backup-same-source": True,
    "stream-backup-lower-node": True,
    "commit-backup-active": True,
    "commit-backup-base": False,       # the commit writes into l1
}
X_REFUSALS = {
    "stream-commit-disjoint": "Need a root block node",
    "commit-backup-base": "Node 'l1' is busy: block device is in use by block job: commit",
}


@pytest.mark.parametrize("name", list(X_PARALLEL))
def test_job_pair_x_parallel(name):
    binary = e2elib.HARNESS.binaries.get("stratad")
    if not binary or "stratad" not in e2elib.HARNESS.daemons:
        pytest.skip("stratad not selected or not found")
    w = e2elib.new_workdir(f"xpar-{name}")
    e2elib.HARNESS.workdirs.append(w)
    err, bad = run_pair("stratad", binary, name, w, {"x-parallel": True})
    assert (err is None) == X_PARALLEL[name], f"{name}: expected accepted={X_PARALLEL[name]}, got {err}"
    if err is not None:
        assert X_REFUSALS[name] in err, f"{name}: {err}"
    assert bad == [], bad


def test_qsd_has_no_x_parallel():
    binary = e2elib.HARNESS.binaries.get("qsd")
    if not binary or "qsd" not in e2elib.HARNESS.daemons:
        pytest.skip("qsd not selected or not found")
    w = e2elib.new_workdir("xpar-qsd")
    e2elib.HARNESS.workdirs.append(w)
    _setup(w)
    d = e2elib.Daemon("qsd", binary, w, "par")
    d.start([])
    try:
        _open(d, w)
        r = d.execute("block-commit", {"device": "l4", "top-node": "l3", "base-node": "l2",
                                       "job-id": "A", "x-parallel": True})
        assert r["error"]["desc"] == "Parameter 'x-parallel' is unexpected", r
    finally:
        d.stop("quit")
