"""Safe commit (Strata extension, docs/EXTENSIONS.md): `block-commit` with `x-safe: true` and
`strata commit --safe` copy the base's old data up into the image directly above the base
before changing the base, so every image of the chain, opened on its own with its original
backing chain, keeps its guest view: after a finished commit, after a cancel, after a write
error on the base (on-error=report) and after kill -9 of stratad.

Chain (8 MiB, each layer writing distinct and overlapping ranges):
    base <- l1 <- l2 <- l3 <- l4;  commit top=l3 into base (l1 is the image above the base).
Each image's view is saved with `qemu-img convert` before the commit and compared with
`qemu-img compare` afterwards. stratad only (qsd has no x-safe); the controls show that a
plain commit does break l1's view, so the checks can fail.
"""

import json
import os
import signal
import subprocess
import time

import pytest

import e2elib

MIB = 1 << 20
LAYERS = ["base", "l1", "l2", "l3", "l4"]
# (pattern, offset, length) written into each layer with qemu-io.
WRITES = {
    "base": [(0x01, 0, 8 * MIB)],
    "l1": [(0x02, 1 * MIB, 1 * MIB), (0x12, 6 * MIB, 64 << 10)],
    "l2": [(0x03, 512 << 10, 1 * MIB), (0x13, 3 * MIB, 1 * MIB)],
    "l3": [(0x04, 2 * MIB, 512 << 10), (0x14, 5 * MIB, 2 * MIB)],
    "l4": [(0x05, 0, 256 << 10), (0x15, 7 * MIB, 512 << 10)],
}
# Images whose view must survive (the active l4 too: after a finished commit it is backed
# by the base).
CHECKED = ["l1", "l2", "l3", "l4"]


def _binary(name):
    b = e2elib.HARNESS.binaries.get(name) if name == "stratad" else None
    if name == "strata":
        tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(e2elib.REPO, "target")
        b = os.path.join(tgt, "debug", "strata")
        b = b if os.access(b, os.X_OK) else None
    if not b:
        pytest.skip(f"{name} binary not available")
    return b


def _sh(*argv):
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (argv, p.stdout, p.stderr)
    return p.stdout


def _chain(workdir):
    """Create the chain and save each image's guest view as raw."""
    for i, n in enumerate(LAYERS):
        path = os.path.join(workdir, f"{n}.qcow2")
        argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if i:
            argv += ["-b", f"{LAYERS[i - 1]}.qcow2", "-F", "qcow2"]
        _sh(*argv, path, "8M")
        cmds = []
        for pat, off, ln in WRITES[n]:
            cmds += ["-c", f"write -P {pat} {off} {ln}"]
        _sh("qemu-io", "-f", "qcow2", *cmds, path)
    for n in CHECKED:
        _sh("qemu-img", "convert", "-O", "raw", os.path.join(workdir, f"{n}.qcow2"),
            os.path.join(workdir, f"{n}.view"))


def _differing_views(workdir, names=CHECKED):
    """The images whose view differs from the saved one (each opened with its own chain)."""
    bad = []
    for n in names:
        p = subprocess.run(["qemu-img", "compare", "-U", "-q", os.path.join(workdir, f"{n}.view"),
                            os.path.join(workdir, f"{n}.qcow2")], capture_output=True, text=True)
        if p.returncode != 0:
            bad.append((n, p.returncode, p.stderr.strip()))
    return bad


def _assert_views(workdir, safe):
    """Safe: every view kept, images clean. Plain (the control): some view is broken."""
    bad = _differing_views(workdir)
    if safe:
        assert bad == [], bad
        _check_clean(workdir)
    else:
        assert bad, "a plain commit stopped midway should break a view"


def _check_clean(workdir):
    for n in LAYERS:
        p = subprocess.run(["qemu-img", "check", "-U", os.path.join(workdir, f"{n}.qcow2")],
                           capture_output=True, text=True)
        # 0: clean; 3: leaked clusters only (harmless, possible after kill -9).
        assert p.returncode in (0, 3), (n, p.stdout, p.stderr)


def _ok(d, cmd, args=None):
    r = d.execute(cmd, args)
    assert "return" in r, (cmd, args, r)
    return r["return"]


def _event(d, name, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = d.pull_event(0.5)
        if ev is not None and ev["event"] == name:
            return ev
    raise AssertionError(f"no {name} within {timeout} s")


def _wait_offset(d, at_least, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _ok(d, "query-block-jobs")
        if jobs and jobs[0]["offset"] >= at_least:
            return jobs[0]
        time.sleep(0.05)
    raise AssertionError("commit made no progress")


def _daemon(workdir, base_rules=None):
    """stratad with the chain as explicit nodes (base on blkdebug when *base_rules*), or,
    without rules, l4 with its implicit (read-only) backing chain."""
    d = e2elib.Daemon("stratad", _binary("stratad"), workdir, "safe")
    args = []
    if base_rules is None:
        args += ["--blockdev", "driver=file,node-name=l4f,filename=" + os.path.join(workdir, "l4.qcow2"),
                 "--blockdev", "driver=qcow2,node-name=l4,file=l4f"]
        d.start(args)
        return d
    d.start(args)
    _ok(d, "blockdev-add", {
        "driver": "qcow2", "node-name": "base",
        "file": {"driver": "blkdebug", "node-name": "base-dbg",
                 "image": {"driver": "file", "filename": os.path.join(workdir, "base.qcow2")},
                 "inject-error": base_rules}})
    for i, n in enumerate(LAYERS[1:], 1):
        _ok(d, "blockdev-add", {
            "driver": "qcow2", "node-name": n, "backing": LAYERS[i - 1],
            "file": {"driver": "file", "filename": os.path.join(workdir, f"{n}.qcow2")}})
    return d


def _commit_args(workdir, implicit, safe=True, **extra):
    if implicit:
        a = {"device": "l4", "top": os.path.join(workdir, "l3.qcow2"),
             "base": os.path.join(workdir, "base.qcow2")}
    else:
        a = {"device": "l4", "top-node": "l3", "base-node": "base"}
    if safe:
        a["x-safe"] = True
    a.update(extra)
    return a


def _workdir(tag):
    w = e2elib.new_workdir(tag)
    e2elib.HARNESS.workdirs.append(w)
    return w


def test_safe_commit_finished_keeps_every_view():
    w = _workdir("safe-commit-done")
    _chain(w)
    d = _daemon(w)
    try:
        _ok(d, "block-commit", _commit_args(w, implicit=True, **{"job-id": "c"}))
        ev = _event(d, "BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"], ev
        # The base now holds what l3 showed; l4 reads through to it.
        _ok(d, "query-named-block-nodes")
    finally:
        d.stop("quit")
    # l4's header names the base now; every image keeps its view.
    info = json.loads(_sh("qemu-img", "info", "--output=json", os.path.join(w, "l4.qcow2")))
    assert info["backing-filename"].endswith("base.qcow2"), info
    assert _differing_views(w) == []
    _sh("qemu-img", "compare", "-q", os.path.join(w, "l3.view"), os.path.join(w, "base.qcow2"))
    _check_clean(w)


def test_plain_commit_breaks_the_image_above_the_base():
    """Control: without x-safe, l1 and l2 (which read the base's old data) change."""
    w = _workdir("plain-commit")
    _chain(w)
    d = _daemon(w)
    try:
        _ok(d, "block-commit", _commit_args(w, implicit=True, safe=False, **{"job-id": "c"}))
        _event(d, "BLOCK_JOB_COMPLETED")
    finally:
        d.stop("quit")
    assert [b[0] for b in _differing_views(w)] == ["l1", "l2"]


@pytest.mark.parametrize("safe", [True, False], ids=["safe", "plain"])
def test_safe_commit_cancelled_midway_keeps_every_view(safe):
    w = _workdir("safe-commit-cancel")
    _chain(w)
    d = _daemon(w, base_rules=[])
    try:
        _ok(d, "block-commit", _commit_args(w, implicit=False, safe=safe, speed=2 * MIB,
                                            **{"job-id": "c"}))
        _wait_offset(d, 3 * MIB)
        _ok(d, "block-job-cancel", {"device": "c"})
        _event(d, "BLOCK_JOB_CANCELLED")
    finally:
        d.stop("quit")
    _assert_views(w, safe)


@pytest.mark.parametrize("safe", [True, False], ids=["safe", "plain"])
def test_safe_commit_write_error_on_base_keeps_every_view(safe):
    w = _workdir("safe-commit-eio")
    _chain(w)
    # Fail writes to the base's cluster of guest offset 6.5 MiB (allocated in the base, so
    # the commit rewrites it in place, late in the job).
    mapping = json.loads(_sh("qemu-img", "map", "--output=json", os.path.join(w, "base.qcow2")))
    guest = 6 * MIB + (512 << 10)
    ext = next(e for e in mapping if e["start"] <= guest < e["start"] + e["length"])
    sector = (ext["offset"] + guest - ext["start"]) // 512
    d = _daemon(w, base_rules=[{"event": "write_aio", "errno": 5, "sector": sector,
                                "once": False}])
    try:
        _ok(d, "block-commit", _commit_args(w, implicit=False, safe=safe, **{"job-id": "c",
                                                                  "on-error": "report"}))
        ev = _event(d, "BLOCK_JOB_COMPLETED")
        assert ev["data"].get("error") == "Input/output error", ev
        assert ev["data"]["offset"] > 0, ev
    finally:
        d.stop("quit")
    _assert_views(w, safe)


@pytest.mark.parametrize("safe", [True, False], ids=["safe", "plain"])
def test_safe_commit_killed_midway_keeps_every_view(safe):
    w = _workdir("safe-commit-kill")
    _chain(w)
    d = _daemon(w)
    try:
        _ok(d, "block-commit", _commit_args(w, implicit=True, safe=safe, speed=2 * MIB,
                                            **{"job-id": "c"}))
        _wait_offset(d, 4 * MIB)
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
    finally:
        d.stop("quit")
    _assert_views(w, safe)


def test_safe_active_commit_with_images_between_is_refused():
    w = _workdir("safe-commit-active")
    _chain(w)
    d = _daemon(w)
    try:
        r = d.execute("block-commit", {"device": "l4", "job-id": "c", "x-safe": True,
                                       "base": os.path.join(w, "base.qcow2")})
        assert r.get("error", {}).get("desc") == (
            "'x-safe' is not supported for an active commit with images between 'top' and "
            "'base'"), r
        # Directly above the base the active commit needs no copy-up and is accepted.
        _ok(d, "block-commit", {"device": "l4", "job-id": "c", "x-safe": True,
                                "base": os.path.join(w, "l3.qcow2")})
        _event(d, "BLOCK_JOB_READY")
        _ok(d, "block-job-complete", {"device": "c"})
        _event(d, "BLOCK_JOB_COMPLETED")
    finally:
        d.stop("quit")
    # l3 was the base of this commit; the images below it keep their views.
    assert _differing_views(w, ["l1", "l2"]) == []


@pytest.mark.parametrize("safe", [True, False], ids=["safe", "plain"])
def test_strata_commit_safe_flag(safe):
    """`strata commit [--safe] -b base l3`: with --safe every image keeps its view; without,
    l1 changes (the control)."""
    w = _workdir("strata-commit-safe")
    _chain(w)
    argv = [_binary("strata"), "commit", "-q", "-b", os.path.join(w, "base.qcow2")]
    if safe:
        argv.append("--safe")
    _sh(*argv, os.path.join(w, "l3.qcow2"))
    _sh("qemu-img", "compare", "-q", os.path.join(w, "l3.view"), os.path.join(w, "base.qcow2"))
    bad = [b[0] for b in _differing_views(w)]
    assert bad == ([] if safe else ["l1", "l2"]), bad
    _check_clean(w)


def test_safe_commit_of_the_image_directly_above_the_base():
    """top = l1, directly above the base: nothing needs copying up and l1 (read-only in the
    implicit chain, so never reopened) keeps its view, as do the images above it."""
    w = _workdir("safe-commit-l1")
    _chain(w)
    d = _daemon(w)
    try:
        _ok(d, "block-commit", {"device": "l4", "job-id": "c", "x-safe": True,
                                "top": os.path.join(w, "l1.qcow2"),
                                "base": os.path.join(w, "base.qcow2")})
        ev = _event(d, "BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"], ev
    finally:
        d.stop("quit")
    assert _differing_views(w) == []
    _check_clean(w)
