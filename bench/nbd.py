#!/usr/bin/env python3
"""NBD export performance, side by side: stratad, qemu-storage-daemon and qemu-nbd in one run.

  io    One qcow2 image (--size-mib, default 1024; every cluster written with random data, so
        reads hit data and writes overwrite) exported writable over a unix socket by each
        server, the image file opened with O_DIRECT and io_uring (qemu-nbd: --cache=none
        --aio=io_uring). fio's nbd engine (libnbd, one connection) runs 4 KiB random reads and
        writes at queue depth 1 and 32 and 1 MiB sequential reads and writes at depth 8, for
        --seconds each after a 2 s ramp. Reported: IOPS / MiB/s, p50/p99 completion latency,
        and the server's CPU seconds (utime + stime from /proc) per GiB moved. The servers
        alternate between reps; medians of --reps; ratios against qemu-nbd.
  map   A 1 TiB qcow2 with 1% of its 64 KiB clusters written, scattered at random (every L2
        table exists: the worst case for a walk), exported read-only; the time for
        `nbdinfo --map` (base:allocation over the whole export) and for the same with
        `--map=qemu:allocation-depth`. Needs ~11 GiB in $S; --no-map skips it.

Usage: bench/nbd.py [--reps 3] [--seconds 8] [--size-mib 1024] [--no-map] [--stratad PATH]
Needs fio (with its nbd engine), nbdinfo, qemu-img, qemu-nbd, qemu-storage-daemon.
Scratch: $S (default /tmp/strata-bench-nbd).
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
REPO = os.path.dirname(HERE)
S = os.environ.get("S", "/tmp/strata-bench-nbd")
SOCK = f"{S}/nbd.sock"
TCK = os.sysconf("SC_CLK_TCK")

CASES = [  # name, fio rw, block size, depth
    ("randread_4k_qd1", "randread", "4k", 1),
    ("randread_4k_qd32", "randread", "4k", 32),
    ("randwrite_4k_qd1", "randwrite", "4k", 1),
    ("randwrite_4k_qd32", "randwrite", "4k", 32),
    ("seqread_1m_qd8", "read", "1m", 8),
    ("seqwrite_1m_qd8", "write", "1m", 8),
]


def sh(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def build_full(size_mib):
    img = f"{S}/full-{size_mib}m.qcow2"
    if not os.path.exists(img):
        raw = f"{S}/full.raw"
        with open(raw, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(1 << 20))
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
        os.unlink(raw)
    return img


def build_sparse_tib():
    """1 TiB, 1% of the 64 KiB clusters written (seeded), built through a sparse raw file."""
    img = f"{S}/sparse-1t.qcow2"
    if not os.path.exists(img):
        raw = f"{S}/sparse.raw"
        clusters = (1 << 40) // (64 << 10)
        rng = random.Random(1)
        chunk = os.urandom(64 << 10)
        with open(raw, "wb") as f:
            f.truncate(1 << 40)
            for c in sorted(rng.sample(range(clusters), clusters // 100)):
                f.seek(c * (64 << 10))
                f.write(chunk)
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, img)
        os.unlink(raw)
    return img


def daemon_cmd(binary, img, writable):
    file = f"driver=file,node-name=f0,filename={img},cache.direct=on,aio=io_uring"
    return [binary, "--blockdev", file, "--blockdev", "driver=qcow2,node-name=q0,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={SOCK}",
            "--export", f"type=nbd,id=e0,node-name=q0,name=img,writable={'on' if writable else 'off'},allocation-depth=on"]


def server_cmd(tag, binary, img, writable):
    if tag == "qemu-nbd":
        return ["qemu-nbd", "-f", "qcow2", "--cache=none", "--aio=io_uring", "-x", "img", "-k", SOCK,
                "-t", "-e", "8", "-A"] + ([] if writable else ["-r"]) + [img]
    return daemon_cmd(binary, img, writable)


class Server:
    def __init__(self, cmd, tag):
        if os.path.exists(SOCK):
            os.unlink(SOCK)
        self.log = open(f"{S}/{tag}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(SOCK):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{tag} did not start: {open(f'{S}/{tag}.log').read()[:300]}")
            time.sleep(0.01)
        time.sleep(0.2)

    def cpu_s(self):
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / TCK

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def fio(case, seconds):
    name, rw, bs, qd = case
    out = subprocess.run(
        ["fio", f"--name={name}", "--ioengine=nbd", f"--uri=nbd+unix:///img?socket={SOCK}", f"--rw={rw}",
         f"--bs={bs}", f"--iodepth={qd}", "--time_based", f"--runtime={seconds}", "--ramp_time=2",
         "--refill_buffers", "--randrepeat=0", "--norandommap", "--output-format=json"],
        capture_output=True, text=True, check=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    r = j["write" if "write" in rw else "read"]
    pct = r["clat_ns"].get("percentile", {})
    return {"iops": r["iops"], "mib_s": r["bw_bytes"] / (1 << 20), "bytes": r["io_bytes"],
            "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000}


def io_rep(tag, binary, img, seconds):
    srv = Server(server_cmd(tag, binary, img, True), tag)
    try:
        out = {}
        for case in CASES:
            c0 = srv.cpu_s()
            r = fio(case, seconds)
            # CPU over the ramp too; bytes only from the measured part: an upper bound.
            r["cpu_s_per_gib"] = (srv.cpu_s() - c0) / max(r["bytes"] / (1 << 30), 1e-9)
            out[case[0]] = r
            print(f"  {tag:9} {case[0]:18} iops={r['iops']:9.0f} MiB/s={r['mib_s']:7.1f} "
                  f"p50={r['p50_us']:6.0f}us p99={r['p99_us']:6.0f}us cpu/GiB={r['cpu_s_per_gib']:.2f}s",
                  flush=True)
        return out
    finally:
        srv.stop()


def map_rep(tag, binary, img):
    srv = Server(server_cmd(tag, binary, img, False), tag)
    try:
        out = {}
        for ctx in ("base:allocation", "qemu:allocation-depth"):
            t0 = time.monotonic()
            res = subprocess.run(["nbdinfo", f"--map={ctx}", f"nbd+unix:///img?socket={SOCK}"],
                                 capture_output=True, text=True, check=True).stdout
            out[ctx] = (time.monotonic() - t0, res.count("\n"))
        return out
    finally:
        srv.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--no-map", action="store_true")
    ap.add_argument("--no-io", action="store_true")
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    ap.add_argument("--stratad", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", f"{REPO}/target"), "release", "stratad"))
    a = ap.parse_args()
    os.makedirs(S, exist_ok=True)
    servers = [("qemu-nbd", None), ("qsd", a.qsd), ("stratad", a.stratad)]
    if not a.no_io:
        img = build_full(a.size_mib)
        runs = {t: [] for t, _ in servers}
        for rep in range(a.reps):
            print(f"rep {rep + 1}", flush=True)
            order = servers if rep % 2 == 0 else servers[::-1]
            for tag, binary in order:
                runs[tag].append(io_rep(tag, binary, img, a.seconds))
        print("\n| case | server | IOPS | MiB/s | p50 µs | p99 µs | server CPU s/GiB | IOPS vs qemu-nbd |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, *_ in CASES:
            med = {t: {k: statistics.median(r[name][k] for r in runs[t]) for k in runs[t][0][name]}
                   for t, _ in servers}
            for t, _ in servers:
                m = med[t]
                print(f"| {name} | {t} | {m['iops']:.0f} | {m['mib_s']:.1f} | {m['p50_us']:.0f} | "
                      f"{m['p99_us']:.0f} | {m['cpu_s_per_gib']:.2f} | {m['iops'] / med['qemu-nbd']['iops']:.2f} |")
    if not a.no_map:
        img = build_sparse_tib()
        print("\n| server | base:allocation s | extents | qemu:allocation-depth s | extents |")
        print("|---|---:|---:|---:|---:|")
        for tag, binary in servers:
            reps = [map_rep(tag, binary, img) for _ in range(a.reps)]
            b = statistics.median(r["base:allocation"][0] for r in reps)
            d = statistics.median(r["qemu:allocation-depth"][0] for r in reps)
            print(f"| {tag} | {b:.3f} | {reps[0]['base:allocation'][1]} | {d:.3f} | "
                  f"{reps[0]['qemu:allocation-depth'][1]} |", flush=True)


if __name__ == "__main__":
    main()
