#!/usr/bin/env python3
"""The daemon itself, side by side: qemu-storage-daemon and stratad, in one run.

  start-up   time from spawning the daemon (with a small graph on its command line: a 2-image
             qcow2 chain, file nodes under it, cache.direct=on aio=io_uring) to reading the QMP
             greeting; the client retries connect() every 0.5 ms. Also the time until
             query-named-block-nodes lists the whole graph (stratad may greet earlier than that).
             Median of --starts runs, the daemons alternating.
  idle RSS   VmRSS of that daemon 1 s after qmp_capabilities (median over the same starts).
  latency    QMP round trip of `query-jobs` (send to reading the reply, one call at a time)
             with 10 jobs running: 10 `blockdev-backup sync=none` jobs, each from a null-co node
             to another null-co node (both 1 GiB). --calls calls after 20 warm-up calls;
             median and p99. Also with no jobs, for reference.

Usage: bench/daemon.py [--starts 10] [--calls 200] [--stratad PATH]
Standard library only (imports the QMP client of scripts/demo_live.py through bench/jobs.py).
Scratch: $S (default /tmp/strata-bench-jobs); images come from bench/jobs.py's pristine set.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import jobs  # noqa: E402

W = f"{jobs.S}/daemon"


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def small_graph():
    jobs.W = W
    return jobs.blockdevs(jobs.CHAIN2)


def start_once(binary):
    """-> (s to greeting, s to all nodes listed by query-named-block-nodes, VmRSS KiB 1 s later)"""
    sock = f"{W}/qmp.sock"
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = [binary, "--chardev", f"socket,id=qmp0,path={sock},server=on,wait=off", "--monitor", "chardev=qmp0"] + small_graph()
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"{W}/err.log", "wb"))
    s = None
    try:
        while True:
            if p.poll() is not None:
                raise RuntimeError(f"exited: {open(f'{W}/err.log').read()[:300]}")
            if time.monotonic() - t0 > 10:
                raise RuntimeError("no greeting within 10 s")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                break
            except OSError:
                s.close()
                time.sleep(0.0005)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("monitor closed before the greeting")
            buf += chunk
        t = time.monotonic() - t0
        s.sendall(b'{"execute":"qmp_capabilities"}')
        buf = b""
        while b"return" not in buf:
            buf += s.recv(4096)
        # stratad may greet before the command line's --blockdev nodes exist: time to the whole graph
        while True:
            s.sendall(b'{"execute":"query-named-block-nodes"}')
            buf = b""
            while not buf.endswith(b"\n") or b"return" not in buf:
                buf += s.recv(65536)
            if b'"top"' in buf and b'"base"' in buf and b'"top-file"' in buf and b'"base-file"' in buf:
                break
            if time.monotonic() - t0 > 10:
                raise RuntimeError("graph incomplete after 10 s")
        tg = time.monotonic() - t0
        time.sleep(1.0)
        rss = next(int(l.split()[1]) for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS:"))
        s.sendall(b'{"execute":"quit"}')
        return t, tg, rss
    finally:
        if s:
            s.close()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()  # our own child, by its Popen handle
            p.wait()


def latency(binary, calls, njobs=10):
    """-> (latencies with no job, latencies with njobs backup sync=none jobs) in seconds."""
    extra = []
    for i in range(njobs):
        extra += ["--blockdev", f"driver=null-co,node-name=src{i},size=1073741824",
                  "--blockdev", f"driver=null-co,node-name=tgt{i},size=1073741824"]
    d = jobs.Daemon(binary, "lat", extra)
    try:
        def sample():
            out = []
            for k in range(calls + 20):
                t = time.monotonic()
                d.q.cmd("query-jobs")
                if k >= 20:
                    out.append(time.monotonic() - t)
            return out
        idle = sample()
        for i in range(njobs):
            d.q.call("blockdev-backup", {"job-id": f"b{i}", "device": f"src{i}", "target": f"tgt{i}", "sync": "none"})
        time.sleep(0.5)
        running = [j for j in d.q.cmd("query-jobs") if j["status"] == "running"]
        if len(running) != njobs:
            raise RuntimeError(f"{len(running)} of {njobs} jobs running: {d.q.cmd('query-jobs')}")
        busy = sample()
        for i in range(njobs):
            d.q.call("block-job-cancel", {"device": f"b{i}"})
        return idle, busy
    finally:
        d.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    ap.add_argument("--stratad", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", f"{jobs.REPO}/target"),
                                                      "release", "stratad"))
    a = ap.parse_args()
    os.makedirs(W, exist_ok=True)
    jobs.build_pristine(a.size_mib << 20)
    for f in ("base", "top"):
        jobs.sh("cp", "--sparse=always", f"{jobs.P}/{f}.qcow2", f"{W}/{f}.qcow2")
    daemons = [("qsd", a.qsd), ("stratad", a.stratad)]
    st = {t: [] for t, _ in daemons}
    stg = {t: [] for t, _ in daemons}
    rss = {t: [] for t, _ in daemons}
    err = {}
    for k in range(a.starts):
        for tag, binary in (daemons if k % 2 == 0 else daemons[::-1]):
            try:
                t, tg, r = start_once(binary)
                st[tag].append(t)
                stg[tag].append(tg)
                rss[tag].append(r)
            except Exception as e:
                err.setdefault(f"start/{tag}", str(e))
    lat = {}
    for tag, binary in daemons:
        jobs.W = W
        try:
            lat[tag] = latency(binary, a.calls)
        except Exception as e:
            err.setdefault(f"latency/{tag}", str(e))
    f = lambda v, m=1, spec=".2f": "—" if not v else format(v * m, spec)
    print("| measure | qsd | stratad | ratio strata/qsd |")
    print("|---|---:|---:|---:|")

    def row(name, q, s, spec=".2f"):
        ratio = f"{s / q:.2f}" if q and s else "—"
        print(f"| {name} | {f(q, 1, spec)} | {f(s, 1, spec)} | {ratio} |")
    row(f"start-up to QMP greeting, ms (median of {a.starts})",
        *(statistics.median(st[t]) * 1000 if st[t] else None for t in ("qsd", "stratad")), ".1f")
    row(f"start-up to the whole graph in query-named-block-nodes, ms (median of {a.starts})",
        *(statistics.median(stg[t]) * 1000 if stg[t] else None for t in ("qsd", "stratad")), ".1f")
    row(f"idle RSS 1 s after start, MiB (median of {a.starts})",
        *(statistics.median(rss[t]) / 1024 if rss[t] else None for t in ("qsd", "stratad")), ".1f")
    for i, label in ((0, "no jobs"), (1, "10 backup sync=none jobs running")):
        row(f"query-jobs round trip, {label}, median µs ({a.calls} calls)",
            *(statistics.median(lat[t][i]) * 1e6 if t in lat else None for t in ("qsd", "stratad")), ".0f")
        row(f"query-jobs round trip, {label}, p99 µs",
            *(pct(lat[t][i], 99) * 1e6 if t in lat else None for t in ("qsd", "stratad")), ".0f")
    print(f"\nstart-up to greeting ms, all runs: " + "; ".join(f"{t}: {', '.join(f'{x * 1000:.1f}' for x in st[t])}" for t in st))
    print(f"start-up to whole graph ms, all runs: " + "; ".join(f"{t}: {', '.join(f'{x * 1000:.1f}' for x in stg[t])}" for t in stg))
    for k, v in err.items():
        print(f"ERROR {k}: {v}")


if __name__ == "__main__":
    main()
