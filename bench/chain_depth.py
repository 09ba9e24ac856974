"""Reads through long backing chains, side by side: qemu-storage-daemon and stratad.

For each depth (default 1, 8, 32, 128) one chain is built with qemu-img + qemu-io: a base with
~50% of its clusters written, then `depth - 1` overlays that each write a handful of random
clusters, so reads land on every layer. Each daemon opens the top image (the chain below it
opened from the headers, as `--blockdev driver=qcow2,file.driver=file,...` does; `cache.direct=on`
on the qcow2 node, so every layer inherits O_DIRECT), exports it
read-only over NBD, and fio (nbd engine) reads 4 KiB at random offsets at queue depth 1 and 16
for a fixed time. Reported: IOPS, p50/p99 latency, the daemon's RSS once the chain is open and
after the reads, the time from start to every node listed by `query-named-block-nodes` with
`flat` (the whole chain open), and the time of one full (nested) `query-named-block-nodes`,
whose answer repeats every chain below each node. The daemons alternate; medians of --reps
runs.

Usage: bench/chain_depth.py [--depths 1,8,32,128] [--reps 3] [--seconds 8] [--size-mib 1024]
Needs qemu-img, qemu-io, qemu-storage-daemon and fio with its nbd engine. Scratch: $S (default
/tmp/strata-bench-chain).
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import jobs  # noqa: E402  (Daemon, sh)

S = os.environ.get("S", "/tmp/strata-bench-chain")
jobs.W = f"{S}/run"
CLUSTER = 64 << 10


def build_chain(depth, size):
    d = f"{S}/depth{depth}"
    top = f"{d}/l{depth - 1}.qcow2"
    if os.path.exists(top):
        return top
    os.makedirs(d, exist_ok=True)
    rng = random.Random(depth)
    n = size // CLUSTER
    base = f"{d}/l0.qcow2"
    jobs.sh("qemu-img", "create", "-q", "-f", "qcow2", base, str(size))
    cmds = "".join(f"write -P {rng.randrange(1, 256)} {c * CLUSTER} {CLUSTER}\n"
                   for c in sorted(rng.sample(range(n), n // 2)))
    jobs.sh("qemu-io", base, input=cmds)
    for i in range(1, depth):
        img = f"{d}/l{i}.qcow2"
        jobs.sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"l{i - 1}.qcow2", "-F", "qcow2", img)
        cmds = "".join(f"write -P {rng.randrange(1, 256)} {c * CLUSTER} {CLUSTER}\n"
                       for c in rng.sample(range(n), 8))
        jobs.sh("qemu-io", img, input=cmds)
    return top


def fio_randread(nbd, qd, seconds):
    out = subprocess.run(
        ["fio", "--name=r", "--ioengine=nbd", f"--uri=nbd+unix:///top?socket={nbd}", "--rw=randread",
         "--bs=4k", f"--iodepth={qd}", "--time_based", f"--runtime={seconds}", "--norandommap",
         "--randrepeat=0", "--output-format=json"], capture_output=True, text=True, check=True).stdout
    r = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    pct = r["clat_ns"].get("percentile", {})
    return {"iops": r["iops"], "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000}


def one(binary, tag, top, seconds):
    os.makedirs(jobs.W, exist_ok=True)
    t0 = time.monotonic()
    # cache.direct on the qcow2 node: every layer (the backing files inherit it, in both
    # daemons) reads with O_DIRECT, so deep chains are not helped by the page cache.
    d = jobs.Daemon(binary, tag, ["--blockdev", f"driver=qcow2,node-name=top,read-only=on,cache.direct=on,"
                                  f"file.driver=file,file.filename={top},file.{jobs.FILE_OPTS.replace(',', ',file.')}"])
    open_s = time.monotonic() - t0
    rss_open = d.status("VmRSS") / 1024
    try:
        nbd = f"{jobs.W}/nbd.sock"
        d.q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
        d.q.call("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "name": "top"})
        r = {"open_s": open_s, "rss_open_mib": rss_open}
        for qd in (1, 16):
            for k, v in fio_randread(nbd, qd, seconds).items():
                r[f"qd{qd}_{k}"] = v
        r["rss_mib"] = d.status("VmRSS") / 1024
        t = time.monotonic()
        d.q.cmd("query-named-block-nodes")
        r["query_s"] = time.monotonic() - t
        return r
    finally:
        d.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="1,8,32,128")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    ap.add_argument("--stratad", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", f"{jobs.REPO}/target"), "release", "stratad"))
    a = ap.parse_args()
    rows = []
    for depth in [int(x) for x in a.depths.split(",")]:
        top = build_chain(depth, a.size_mib << 20)
        runs = {"qsd": [], "stratad": []}
        for rep in range(a.reps):
            order = [("qsd", a.qsd), ("stratad", a.stratad)]
            for tag, binary in (order if rep % 2 == 0 else order[::-1]):
                r = one(binary, tag, top, a.seconds)
                print(f"depth {depth:4} {tag:8} rep {rep + 1}: " + " ".join(f"{k}={v:.3g}" for k, v in r.items()),
                      flush=True)
                runs[tag].append(r)
        for tag in runs:
            med = {k: statistics.median(r[k] for r in runs[tag]) for k in runs[tag][0]}
            rows.append((depth, tag, med))
    print("\n| depth | daemon | open s | RSS open MiB | QD1 IOPS | QD1 p50 µs | QD1 p99 µs | QD16 IOPS "
          "| QD16 p99 µs | RSS after MiB | nested query s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for depth, tag, m in rows:
        print(f"| {depth} | {tag} | {m['open_s']:.3f} | {m['rss_open_mib']:.1f} | {m['qd1_iops']:.0f} | "
              f"{m['qd1_p50_us']:.0f} | {m['qd1_p99_us']:.0f} | {m['qd16_iops']:.0f} | "
              f"{m['qd16_p99_us']:.0f} | {m['rss_mib']:.0f} | {m['query_s']:.2f} |")


if __name__ == "__main__":
    main()
