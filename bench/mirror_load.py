#!/usr/bin/env python3
"""Mirror under a 4 KiB random writer, at writer speeds relative to the copy rate:
qemu-storage-daemon (copy-mode background and write-blocking) beside stratad (copy-mode auto,
and optionally others), on the same images, in one run.

The copy rate is fixed with the job's `speed` (--copy-mib MiB/s), so "the writer at k x the
copy rate" is well defined: fio (nbd engine, randwrite 4k, --qd) capped at
k * copy-rate / 4 KiB IOPS (k = 0 means uncapped: full speed). After --pre s of writer-only
load, blockdev-mirror sync=full of base <- top (bench/jobs.py's images and daemon start-up)
to a fresh qcow2; on BLOCK_JOB_READY -> block-job-complete, else block-job-cancel force after
--timeout s. Reported per run: time to READY (or "never"), the writer's IOPS before and during
the job, and its p50/p99 completion latency during the job (fio's per-I/O latency log,
entries between the mirror command and the job's end).

Usage: bench/mirror_load.py [--factors 0.5,1,2,4] [--copy-mib 16] [--size-mib 256]
        [--runs qsd:background,qsd:write-blocking,stratad:auto] [--reps 1] [--timeout 40]
Scratch: $S (default /tmp/strata-bench-jobs, shared with bench/jobs.py).
Output: $S/results/mirror_load.json and a Markdown table on stdout.
"""
import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jobs  # noqa: E402  (images, daemon start-up, QMP client, fio IOPS log reader)
from jobs import CHAIN2, TGT, Daemon, blockdevs, build_pristine, fresh, job_ev, W  # noqa: E402


def read_lat_log(prefix):
    """fio per-I/O completion latency log -> sorted [(unix s, latency µs)]."""
    pts = []
    for f in glob.glob(prefix + "_clat.*.log"):
        for line in open(f):
            p = line.split(",")
            if len(p) >= 2:
                pts.append((int(p[0]) / 1000.0, int(p[1]) / 1000.0))  # ms epoch, ns
    pts.sort()
    return pts


def pct(vals, q):
    if not vals:
        return None
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(q * len(vals)))]


def one(binary, tag, mode, iops_cap, copy_bps, size, qd, timeout, pre):
    fresh(["base", "top"], ["tgt"], size)
    for f in glob.glob(f"{W}/w_*.log"):
        os.unlink(f)
    r = {"daemon": tag, "mode": mode, "iops_cap": iops_cap, "ready_s": None, "error": ""}
    d = Daemon(binary, tag, blockdevs(CHAIN2 + TGT))
    fio = None
    try:
        q = d.q
        nbd = f"{W}/nbd.sock"
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
        q.call("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "name": "top",
                                    "writable": True})
        fio = subprocess.Popen(
            ["fio", "--name=writer", "--ioengine=nbd", f"--uri=nbd+unix:///top?socket={nbd}",
             "--rw=randwrite", "--bs=4k", f"--iodepth={qd}", "--time_based",
             f"--runtime={int(pre + timeout + 60)}", "--norandommap", "--randrepeat=0",
             f"--write_iops_log={W}/w", "--log_avg_msec=500", f"--write_lat_log={W}/w",
             "--log_unix_epoch=1", f"--output={W}/fio.out"]
            + ([f"--rate_iops={iops_cap}"] if iops_cap else []),
            stdout=subprocess.DEVNULL, stderr=open(f"{W}/fio.err", "wb"))
        time.sleep(pre)
        if fio.poll() is not None:
            raise RuntimeError(f"fio exited: {open(f'{W}/fio.err').read()[:200]}")
        w0 = time.time()
        n0 = len(q.events)
        t0 = time.monotonic()
        q.call("blockdev-mirror", {"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
                                   "copy-mode": mode, "speed": copy_bps})
        ev = q.wait_event(job_ev("m", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
                          n0, timeout)
        if ev is not None and ev["event"] == "BLOCK_JOB_READY":
            r["ready_s"] = ev["_rx"] - t0
            q.cmd("block-job-complete", device="m")
        elif ev is not None:
            raise RuntimeError(f"{ev['event']} before READY: {ev['data'].get('error', '')}")
        else:
            j = q.cmd("query-block-jobs")
            if j:
                r["error"] = f"never READY in {timeout:.0f} s ({j[0]['offset'] >> 20}/{j[0]['len'] >> 20} MiB)"
            q.cmd("block-job-cancel", device="m", force=True)
        ev = q.wait_event(job_ev("m", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), n0, 120)
        w1 = time.time()
        r["job_s"] = time.monotonic() - t0
        if ev is not None and "error" in ev["data"]:
            raise RuntimeError(f"{ev['event']}: {ev['data']['error']}")
        fio.send_signal(signal.SIGINT)  # our own child, by PID
        fio.wait(timeout=60)
        pts = jobs.read_iops_log(f"{W}/w")
        r["iops_before"] = jobs.mean_iops(pts, w0 - pre + 1.0, w0)
        r["iops_during"] = jobs.mean_iops(pts, w0, w1)
        lat = [v for t, v in read_lat_log(f"{W}/w") if w0 <= t < w1]
        r["p50_us"], r["p99_us"] = pct(lat, 0.50), pct(lat, 0.99)
    except Exception as e:
        r["error"] = (r["error"] + "; " if r["error"] else "") + (str(e)[:300] or type(e).__name__)
    finally:
        if fio and fio.poll() is None:
            fio.kill()
            fio.wait()
        d.stop()
        for f in glob.glob(f"{W}/w_*.log"):
            os.unlink(f)
    return r


def fmt(x, spec=".0f"):
    return "—" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factors", default="0.5,1,2,4", help="writer speed / copy rate; 0 = uncapped")
    ap.add_argument("--copy-mib", type=int, default=16, help="the mirror's speed, MiB/s")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", default="qsd:background,qsd:write-blocking,stratad:auto")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--pre", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=40.0)
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    ap.add_argument("--stratad", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", f"{jobs.REPO}/target"), "release", "stratad"))
    a = ap.parse_args()
    size = a.size_mib << 20
    copy_bps = a.copy_mib << 20
    os.makedirs(jobs.RES, exist_ok=True)
    build_pristine(size)
    binaries = {"qsd": a.qsd, "stratad": a.stratad}
    rows = []
    for rep in range(1, a.reps + 1):
        for k in [float(x) for x in a.factors.split(",")]:
            cap = int(k * copy_bps / 4096)
            for run in a.runs.split(","):
                tag, mode = run.split(":")
                r = one(binaries[tag], tag, mode, cap, copy_bps, size, a.qd, a.timeout, a.pre)
                r.update(factor=k, rep=rep)
                rows.append(r)
                print(f"x{k:g} {tag:8} {mode:15} ready={fmt(r['ready_s'], '.1f')} "
                      f"iops before/during={fmt(r.get('iops_before'))}/{fmt(r.get('iops_during'))} "
                      f"p50/p99={fmt(r.get('p50_us'))}/{fmt(r.get('p99_us'))} µs {r['error']}",
                      flush=True)
                with open(f"{jobs.RES}/mirror_load.json", "w") as f:
                    json.dump(rows, f, indent=1)
    print()
    print(f"Writer: fio nbd randwrite 4k QD{a.qd}; mirror sync=full, speed {a.copy_mib} MiB/s "
          f"(= the copy rate; 1x = {copy_bps // 4096} IOPS); image {a.size_mib} MiB; "
          f"timeout {a.timeout:.0f} s.")
    print()
    print("| writer | daemon | copy-mode | READY s | writer IOPS before | IOPS during job | kept | "
          "p50 µs | p99 µs | note |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        kept = (r["iops_during"] / r["iops_before"]
                if r.get("iops_during") and r.get("iops_before") else None)
        print(f"| {r['factor']:g}x | {r['daemon']} | {r['mode']} "
              f"| {fmt(r['ready_s'], '.1f') if r['ready_s'] is not None else 'never'} "
              f"| {fmt(r.get('iops_before'))} | {fmt(r.get('iops_during'))} "
              f"| {fmt(kept * 100 if kept else None)}% | {fmt(r.get('p50_us'))} "
              f"| {fmt(r.get('p99_us'))} | {r['error']} |")


if __name__ == "__main__":
    main()
