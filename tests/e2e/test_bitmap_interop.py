"""Persistent dirty bitmaps move between the daemons: a bitmap qemu-storage-daemon stores,
stratad loads with the same bits (same x-debug sha256), keeps tracking and stores again,
and qemu-storage-daemon then reads what stratad stored. Not a qsd-vs-stratad comparison but
a hand-over between them, so it is a plain test that needs both binaries."""

import os
import subprocess

import pytest

import e2elib


def _daemon(kind, workdir, img, name):
    binary = e2elib.HARNESS.binaries.get(kind)
    if not binary:
        pytest.skip(f"{kind} binary not available")
    nbd = os.path.join(workdir, f"{name}.nbd")
    d = e2elib.Daemon(kind, binary, workdir, name)
    d.start([
        "--blockdev", f"driver=file,node-name=f,filename={img}",
        "--blockdev", "driver=qcow2,node-name=disk,file=f",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on",
    ])
    return d, f"nbd+unix:///disk?socket={nbd}"


def _write(uri, *cmds):
    args = ["qemu-io", "-f", "raw", uri]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def _sha(d):
    r = d.execute("x-debug-block-dirty-bitmap-sha256", {"node": "disk", "name": "p"})
    assert "return" in r, r
    return r["return"]["sha256"]


def test_persistent_bitmap_hand_over_between_daemons():
    if not {"qsd", "stratad"} <= set(e2elib.HARNESS.daemons):
        pytest.skip("needs both daemons")
    workdir = e2elib.new_workdir("bitmap-interop")
    e2elib.HARNESS.workdirs.append(workdir)
    img = os.path.join(workdir, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"], check=True)

    qsd, uri = _daemon("qsd", workdir, img, "qsd1")
    r = qsd.execute("block-dirty-bitmap-add", {"node": "disk", "name": "p", "persistent": True,
                                                "granularity": 65536})
    assert "return" in r, r
    _write(uri, "write -P 1 0 64k", "write -P 2 5M 200k")
    sha_qsd = _sha(qsd)
    qsd.stop()

    strata, uri = _daemon("stratad", workdir, img, "strata1")
    assert _sha(strata) == sha_qsd, "stratad loads the bits qsd stored"
    _write(uri, "write -P 3 9M 64k")
    sha_strata = _sha(strata)
    assert sha_strata != sha_qsd
    strata.stop()

    check = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    qsd, _ = _daemon("qsd", workdir, img, "qsd2")
    assert _sha(qsd) == sha_strata, "qsd loads the bits stratad stored"
    qsd.stop()
