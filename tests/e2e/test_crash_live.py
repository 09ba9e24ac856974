"""kill -9 sweep of live stratad operations (docs/RELIABILITY.md section 1, live half).

Each kill point: a fresh chain (base.qcow2, 4 MiB, generation 1 in every 4 KiB block;
top.qcow2 over it with generation 2 in a seeded half of its 64 KiB clusters), stratad with
both plus an empty target, top exported writable over NBD. The operation starts (jobs at
2 MiB/s, so they run through the kill), a guest writer runs qemu-io over NBD — each run
writes one seeded range with its own generation and ends with a flush, so a run that exits 0
is acknowledged and durable — and stratad is SIGKILLed after a seeded delay.

Checked after the kill:
- `qemu-img check` of every image exits 0 (3, leaks only, is counted apart);
- the guest view of top (qemu-img over the chain its header names): every 4 KiB block holds
  one generation, the last acknowledged write's — or, for the run the kill interrupted,
  its own; never an older one, never a torn or another write's block;
- stratad starts again on the images (the open-time repair) and reads the same view;
- after that restart every image passes `qemu-img check` with no leaks: an image a killed
  session was writing carries Strata's session-open autoclear bit, and a read-write open
  frees what that session allocated but never referenced.
Operations: guest writes alone, stream, commit (active, left READY; intermediate, of top
into base under an active layer the guest writes to), mirror (background and
write-blocking), backup (full; incremental from a persistent bitmap; fleecing: sync=none
into an overlay of top exported read-only), persistent bitmap add/merge/remove between the
writes.

    tests/e2e/run.sh --daemons=stratad test_crash_live.py          # CI: 20 kill points per op
    STRATA_LONG=1 tests/e2e/run.sh --daemons=stratad test_crash_live.py   # 200 per op
    STRATA_LIVE_SEED=N ...                                           # replay from seed N
"""

import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

import e2elib

MIB = 1 << 20
SIZE = 4 * MIB
BLK = 4096
NBLK = SIZE // BLK
CLUSTER = 64 * 1024
OPS = ["guest", "stream", "commit-active", "commit-intermediate", "mirror-background",
       "mirror-write-blocking", "backup-full", "backup-incremental", "backup-fleecing",
       "bitmaps"]
POINTS = int(os.environ.get("STRATA_LIVE_POINTS", "200" if os.environ.get("STRATA_LONG") else "20"))
SEED = int(os.environ.get("STRATA_LIVE_SEED", "20261122"))


def _sh(*argv, ok=True):
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if ok and p.returncode != 0:
        raise AssertionError(f"{argv}: {p.returncode} {p.stdout}{p.stderr}")
    return p


def _guest(op):
    """The node the guest writes to: an empty active layer over top for an intermediate
    commit (of top into base), top itself otherwise."""
    return "act" if op == "commit-intermediate" else "top"


def _images(op):
    """The images of a kill point: the chain, the job target, and the op's own."""
    extra = {"commit-intermediate": ["act"], "backup-fleecing": ["f"]}.get(op, [])
    return ["base", "top", "t"] + extra


def _chain(w, rng, op):
    """base (gen 1) <- top (gen 2 in half of its clusters) [<- act]; returns the expected
    view."""
    base, top, tgt = (os.path.join(w, n) for n in ("base.qcow2", "top.qcow2", "t.qcow2"))
    _sh("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    _sh("qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {SIZE}", base)
    _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    expected = [1] * NBLK
    clusters = rng.sample(range(SIZE // CLUSTER), SIZE // CLUSTER // 2)
    cmds = []
    for c in clusters:
        cmds += ["-c", f"write -P 2 {c * CLUSTER} {CLUSTER}"]
        for b in range(c * CLUSTER // BLK, (c + 1) * CLUSTER // BLK):
            expected[b] = 2
    _sh("qemu-io", "-f", "qcow2", *cmds, top)
    _sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, str(SIZE))
    if op == "commit-intermediate":
        _sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2",
            os.path.join(w, "act.qcow2"))
    if op == "backup-fleecing":
        _sh("qemu-img", "create", "-q", "-f", "qcow2", os.path.join(w, "f.qcow2"), str(SIZE))
    return expected


def _header_backing(w, img):
    """The node name of the backing file `img`'s header names (None without one)."""
    p = _sh("qemu-img", "info", "-U", "--output=json", os.path.join(w, f"{img}.qcow2"))
    name = json.loads(p.stdout).get("backing-filename")
    return name and os.path.basename(name).removesuffix(".qcow2")


def _args(w, op):
    args = ["--blockdev", f"driver=qcow2,node-name=base,file.driver=file,"
                          f"file.filename={w}/base.qcow2",
            "--blockdev", f"driver=qcow2,node-name=top,backing=base,file.driver=file,"
                          f"file.filename={w}/top.qcow2",
            "--blockdev", f"driver=qcow2,node-name=t,file.driver=file,file.filename={w}/t.qcow2"]
    if op == "commit-intermediate":
        # After a finished commit the header names base: open it as it says.
        args += ["--blockdev", f"driver=qcow2,node-name=act,backing={_header_backing(w, 'act')},"
                               f"file.driver=file,file.filename={w}/act.qcow2"]
    return args + ["--nbd-server", f"addr.type=unix,addr.path={w}/nbd.sock",
                   "--export", f"type=nbd,id=g,node-name={_guest(op)},name=guest,writable=on"]


def _start_op(d, op, rng, w):
    speed = 2 * MIB
    if op == "stream":
        d.execute("block-stream", {"job-id": "j", "device": "top", "speed": speed})
    elif op == "commit-active":
        d.execute("block-commit", {"job-id": "j", "device": "top", "speed": speed})
    elif op == "commit-intermediate":
        d.execute("block-commit", {"job-id": "j", "device": "act", "top-node": "top",
                                   "base-node": "base", "speed": speed})
    elif op.startswith("mirror"):
        d.execute("blockdev-mirror", {"job-id": "j", "device": "top", "target": "t",
                                      "sync": "full", "speed": speed,
                                      "copy-mode": op.split("-", 1)[1]})
    elif op == "backup-full":
        d.execute("blockdev-backup", {"job-id": "j", "device": "top", "target": "t",
                                      "sync": "full", "speed": speed})
    elif op == "backup-incremental":
        d.execute("block-dirty-bitmap-add", {"node": "top", "name": "b0", "persistent": True})
    elif op == "backup-fleecing":
        # Classic fleecing: an overlay of top fed by copy-before-write, exported read-only.
        d.execute("blockdev-add", {"driver": "qcow2", "node-name": "f", "backing": "top",
                                   "file": {"driver": "file", "filename": f"{w}/f.qcow2"}})
        d.execute("blockdev-backup", {"job-id": "j", "device": "top", "target": "f",
                                      "sync": "none"})
        d.execute("block-export-add", {"type": "nbd", "id": "fx", "node-name": "f",
                                       "name": "fleece"})


def _bitmap_op(d, rng, i):
    kind = rng.choice(["add", "merge", "remove"])
    if kind == "add" or i == 0:
        d.execute("block-dirty-bitmap-add", {"node": "top", "name": f"b{i}", "persistent": True})
    elif kind == "merge":
        d.execute("block-dirty-bitmap-merge", {"node": "top", "target": "b0",
                                               "bitmaps": [f"b{rng.randrange(i)}"]})
    else:
        d.execute("block-dirty-bitmap-remove", {"node": "top", "name": f"b{rng.randrange(i)}"})


def _view(w, op):
    raw = os.path.join(w, "view.raw")
    _sh("qemu-img", "convert", "-U", "-O", "raw", os.path.join(w, f"{_guest(op)}.qcow2"), raw)
    with open(raw, "rb") as f:
        return f.read()


def _check_view(data, expected, inflight, where):
    bad = []
    for b in range(NBLK):
        blk = data[b * BLK:(b + 1) * BLK]
        first = blk[0]
        allowed = {expected[b]}
        if inflight and inflight[0] <= b < inflight[1]:
            allowed.add(inflight[2])
        if blk.count(first) != BLK:
            bad.append(f"{where}: block {b} torn")
        elif first not in allowed:
            bad.append(f"{where}: block {b} holds generation {first}, allowed {sorted(allowed)}")
        if len(bad) > 3:
            break
    return bad


def one_point(binary, op, seed, w):
    """-> (leaks-only images, failures, acknowledged writes, whether a write was cut)"""
    rng = random.Random(seed)
    expected = _chain(w, rng, op)
    d = e2elib.Daemon("stratad", binary, w, "live")
    d.start(_args(w, op))
    uri = f"nbd+unix:///guest?socket={w}/nbd.sock"
    _start_op(d, op, rng, w)
    delay = rng.uniform(0.05, 0.9)
    killer = threading.Timer(delay, lambda: d.proc.send_signal(signal.SIGKILL))
    killer.start()
    inflight = None
    gen = 3
    t_end = time.monotonic() + 5
    while d.alive() and gen < 250 and time.monotonic() < t_end:
        if op == "bitmaps":
            try:
                _bitmap_op(d, rng, gen - 3)
            except Exception:
                break  # the daemon died under the command
        if op == "backup-incremental" and gen == 6:
            try:
                d.execute("blockdev-backup", {"job-id": "j", "device": "top", "target": "t",
                                              "sync": "incremental", "bitmap": "b0",
                                              "speed": MIB})
            except Exception:
                break
        start = rng.randrange(NBLK)
        n = rng.randint(1, min(16, NBLK - start))
        inflight = (start, start + n, gen)
        p = subprocess.run(["qemu-io", "-f", "raw", "-c",
                            f"write -P {gen} {start * BLK} {n * BLK}", uri],
                           capture_output=True, text=True, timeout=30)
        out = p.stdout + p.stderr
        if p.returncode != 0 or "error" in out.lower() or "failed" in out.lower():
            break  # killed mid-write: the in-flight range may hold either generation
        for b in range(start, start + n):
            expected[b] = gen
        inflight = None
        gen += 1
    killer.join()
    d.proc.wait(timeout=10)
    d.disconnect()
    fails, leaks = [], 0
    for img in _images(op):
        rc = _sh("qemu-img", "check", "-q", os.path.join(w, f"{img}.qcow2"), ok=False).returncode
        if rc == 3:
            leaks += 1
        elif rc != 0:
            fails.append(f"qemu-img check {img}: exit {rc}")
    fails += _check_view(_view(w, op), expected, inflight, f"after kill (in flight: {inflight})")
    # Restart: stratad opens the images again (repairing what the kill left) and serves the
    # same view.
    d2 = e2elib.Daemon("stratad", binary, w, "restart")
    d2.start(_args(w, op))
    try:
        p = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri,
                            os.path.join(w, "served.raw")], capture_output=True, text=True,
                           timeout=60)
        if p.returncode != 0:
            fails.append(f"restart: read over NBD failed: {p.stderr.strip()}")
        else:
            with open(os.path.join(w, "served.raw"), "rb") as f:
                served = f.read()
            if served != _view(w, op):
                fails.append("restart: the served view differs from the image's")
    finally:
        rc = d2.stop("quit")
        if rc != 0:
            fails.append(f"restart: exit {rc}: {d2.stderr()[-300:]}")
    # The restart opened every image but the fleecing overlay (scratch space) read-write:
    # the leaks the kill left are freed.
    for img in [i for i in _images(op) if i != "f"]:
        rc = _sh("qemu-img", "check", "-q", os.path.join(w, f"{img}.qcow2"), ok=False).returncode
        if rc != 0:
            fails.append(f"after restart: qemu-img check {img}: exit {rc}")
    return leaks, [f"{op} seed {seed}: {f}" for f in fails], gen - 3, inflight is not None


@pytest.mark.parametrize("op", OPS)
def test_live_kill_sweep(op):
    binary = e2elib.HARNESS.binaries.get("stratad")
    if not binary or "stratad" not in e2elib.HARNESS.daemons:
        pytest.skip("stratad not selected or not found")
    leaks, fails, acked, cut = 0, [], 0, 0
    t0 = time.monotonic()
    for i in range(POINTS):
        w = e2elib.new_workdir(f"live-{op}-{i}")
        seed = SEED * 1000 + OPS.index(op) * 10000 + i
        try:
            l, f, a, c = one_point(binary, op, seed, w)
            leaks += l
            fails += f
            acked += a
            cut += c
        finally:
            e2elib.rmtree(w)
    print(f"\nlive kill sweep {op}: {POINTS} kill points, {acked} acknowledged writes, "
          f"{cut} kill points with the last qemu-io unfinished, {leaks} images with leaks only, {len(fails)} failures, "
          f"{time.monotonic() - t0:.1f} s")
    assert fails == [], "\n".join(fails[:20])
