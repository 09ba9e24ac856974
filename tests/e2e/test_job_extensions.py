"""Strata's job extension members (docs/EXTENSIONS.md): stratad adds `rate`, `remaining`,
`eta-ms`, `phase` (and for mirror `dirty-rate`, `copy-rate`, `convergence`) to query-jobs,
query-block-jobs and BLOCK_JOB_READY/COMPLETED/CANCELLED, after qsd's members, which stay
as they are (the comparison scenarios drop exactly these names: e2elib.JOB_EXTENSION_MEMBERS).
stratad only: qsd has none of this."""

import os
import subprocess
import time

import pytest

import e2elib

MIB = 1 << 20


def _stratad(workdir, extra=()):
    binary = e2elib.HARNESS.binaries.get("stratad")
    if not binary:
        pytest.skip("stratad binary not available")
    src = os.path.join(workdir, "src.qcow2")
    tgt = os.path.join(workdir, "tgt.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, "32M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 32M", src], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, "32M"], check=True)
    d = e2elib.Daemon("stratad", binary, workdir, "ext")
    d.start(["--blockdev", f"driver=file,node-name=sf,filename={src}",
             "--blockdev", "driver=qcow2,node-name=src,file=sf",
             "--blockdev", f"driver=file,node-name=tf,filename={tgt}",
             "--blockdev", "driver=qcow2,node-name=tgt,file=tf", *extra])
    return d


def _ok(d, cmd, args=None):
    r = d.execute(cmd, args)
    assert "return" in r, (cmd, r)
    return r["return"]


def _event(d, name, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = d.pull_event(0.5)
        if ev is not None and ev["event"] == name:
            return ev
    raise AssertionError(f"no {name} within {timeout} s")


QSD_BLOCK_JOB_KEYS = ["auto-finalize", "io-status", "device", "auto-dismiss", "busy", "len",
                      "offset", "status", "paused", "speed", "ready", "type"]


def test_mirror_extension_members_are_present_and_sane():
    workdir = e2elib.new_workdir("job-extensions")
    e2elib.HARNESS.workdirs.append(workdir)
    d = _stratad(workdir)
    try:
        # 32 MiB at 8 MiB/s: about 4 s of bulk copy to watch.
        _ok(d, "blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                   "sync": "full", "copy-mode": "auto", "speed": 8 * MIB})
        time.sleep(1.0)
        [bj] = _ok(d, "query-block-jobs")
        [j] = _ok(d, "query-jobs")
        # qsd's members first, in qsd's order; the extensions after them.
        qsd_part = [k for k in bj if k not in e2elib.JOB_EXTENSION_MEMBERS]
        assert set(qsd_part) == set(QSD_BLOCK_JOB_KEYS + ["actively-synced"]), list(bj)
        assert list(bj)[:len(qsd_part)] == qsd_part, list(bj)
        assert set(list(bj)[len(qsd_part):]) == set(e2elib.JOB_EXTENSION_MEMBERS), list(bj)
        for k in e2elib.JOB_EXTENSION_MEMBERS:
            assert k in bj, (k, bj)
            if k not in ("dirty-rate", "copy-rate", "convergence"):
                assert k in j, (k, j)
        assert bj["remaining"] == bj["len"] - bj["offset"], bj
        assert j["remaining"] == j["total-progress"] - j["current-progress"], j
        # Copying at the 8 MiB/s limit (generous bounds: CI machines are noisy).
        assert 2 * MIB <= bj["rate"] <= 16 * MIB, bj
        assert 2 * MIB <= bj["copy-rate"] <= 16 * MIB, bj
        assert bj["dirty-rate"] == 0, bj
        assert bj["phase"] == "bulk" and bj["convergence"] == "converging", bj
        assert 0 < bj["eta-ms"] <= 30_000, bj
        _ok(d, "block-job-set-speed", {"device": "m", "speed": 0})
        ready = _event(d, "BLOCK_JOB_READY")["data"]
        assert ready["remaining"] == 0 and ready["eta-ms"] == 0, ready
        assert ready["phase"] == "ready" and ready["rate"] >= 0, ready
        [bj] = _ok(d, "query-block-jobs")
        assert bj["phase"] == "synced" and bj["convergence"] == "converged", bj
        _ok(d, "block-job-complete", {"device": "m"})
        done = _event(d, "BLOCK_JOB_COMPLETED")["data"]
        assert done["remaining"] == 0 and "phase" in done, done
        assert [k for k in done if k not in e2elib.JOB_EXTENSION_MEMBERS] == \
            ["device", "len", "offset", "speed", "type"], done
    finally:
        d.stop()


def _free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _scrape(port, path="/metrics"):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def _samples(text):
    """Prometheus text -> {metric{labels}: value}; checks every line parses."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        name, _, value = line.rpartition(" ")
        assert name and "{" in name and name.endswith("}"), line
        out[name] = float(value)
    return out


def test_metrics_endpoint_serves_node_io_and_job_progress():
    workdir = e2elib.new_workdir("metrics")
    e2elib.HARNESS.workdirs.append(workdir)
    port = _free_port()
    nbd = os.path.join(workdir, "nbd.sock")
    d = _stratad(workdir, ["--metrics", f"127.0.0.1:{port}",
                           "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                           "--export", "type=nbd,id=e,node-name=src,name=src,writable=on"])
    try:
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 9 1M 256k",
                        f"nbd+unix:///src?socket={nbd}"], check=True, stdout=subprocess.DEVNULL)
        _ok(d, "blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                   "sync": "full", "speed": 4 * MIB})
        time.sleep(0.6)
        status, ctype, text = _scrape(port)
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, ctype)
        s = _samples(text)
        assert s['strata_node_bytes_total{node="src",op="write"}'] == 256 * 1024, text
        assert s['strata_node_requests_total{node="src",op="write"}'] >= 1, text
        assert s['strata_node_bytes_total{node="tgt",op="write"}'] > 0, text
        assert s['strata_job_progress_total{id="m",type="mirror"}'] == 32 * MIB, text
        cur = s['strata_job_progress_current{id="m",type="mirror"}']
        assert 0 < cur < 32 * MIB, text
        assert s['strata_job_remaining_bytes{id="m",type="mirror"}'] == 32 * MIB - cur, text
        assert s['strata_job_rate_bytes_per_second{id="m",type="mirror"}'] > 0, text
        assert s['strata_job_info{id="m",type="mirror",status="running",phase="bulk",'
                 'convergence="converging"}'] == 1, text
        assert _scrape(port, "/")[0] == 404
        _ok(d, "block-job-cancel", {"device": "m", "force": True})
        _event(d, "BLOCK_JOB_CANCELLED")
        assert "strata_job_info{" not in _scrape(port)[2]
    finally:
        d.stop()
