#!/usr/bin/env python3
"""Per-write cost of enabled dirty bitmaps, stratad vs qemu-storage-daemon.

Each daemon exports the same raw image over NBD with 0, 1 or 8 enabled bitmaps on the node;
`qemu-img bench -w` (4 KiB random writes, queue depth 32) runs against the export. The
difference between 0 and 8 bitmaps is what marking costs per write. Medians of N runs.

`--persistent`: the cost of crash-safe persistent bitmaps instead. A 1 GiB qcow2 image with
one persistent bitmap (64 KiB granules) is exported; the same writes run twice on it, first
on fresh granules (each first write to a granule makes its bit durable before the data:
a bitmap write plus a flush, shared by concurrent writers) and then again on the same
granules (set on disk already: no extra I/O). stratad with write-intent logging (default),
stratad with STRATA_BITMAP_WRITE_INTENT=off (QEMU's behaviour), and qsd.

Usage: bench/bitmap_cost.py STRATAD [N] [--persistent]
       (qemu-storage-daemon and qemu-img from PATH)
"""

import os
import socket
import json
import statistics
import subprocess
import sys
import tempfile
import time

COUNT = 40000


def qmp(path, *cmds):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.02)
    f = s.makefile("rw")
    f.readline()
    for name, args in (("qmp_capabilities", {}),) + cmds:
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                break
        if "error" in r:
            sys.exit(f"{name}: {r['error']['desc']}")
    s.close()


def start(binary, blockdev, work, env=None):
    sock, nbd = os.path.join(work, "qmp.sock"), os.path.join(work, "nbd.sock")
    for p in (sock, nbd):
        if os.path.exists(p):
            os.unlink(p)
    d = subprocess.Popen([binary,
                          "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
                          "--monitor", "chardev=c",
                          "--blockdev", blockdev,
                          "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                          "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, **(env or {})})
    return d, sock, nbd


def bench(nbd):
    t = time.monotonic()
    subprocess.run(["qemu-img", "bench", "-q", "-w", "-f", "raw", "-c", str(COUNT),
                    "-s", "4k", "-d", "32", "-S", "1052672",
                    f"nbd+unix:///disk?socket={nbd}"], check=True)
    return time.monotonic() - t


def run_persistent(binary, env, work):
    """(fresh granules, same granules again) seconds, one daemon run each."""
    img = os.path.join(work, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1G"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "64k", img, "b0"], check=True)
    times = []
    for _ in range(2):
        d, sock, nbd = start(binary, "driver=qcow2,node-name=disk,file.driver=file,"
                             f"file.filename={img}", work, env)
        try:
            qmp(sock)
            times.append(bench(nbd))
            qmp(sock, ("quit", {}))
            d.wait(30)
        finally:
            if d.poll() is None:
                d.terminate()
                d.wait()
    return times


def main_persistent(stratad, n):
    sides = [("qsd", "qemu-storage-daemon", None),
             ("stratad, write-intent", stratad, None),
             ("stratad, STRATA_BITMAP_WRITE_INTENT=off", stratad,
              {"STRATA_BITMAP_WRITE_INTENT": "off"})]
    res = {name: ([], []) for name, _, _ in sides}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as work:
        for _ in range(n):
            for name, binary, env in sides:
                fresh, again = run_persistent(binary, env, work)
                res[name][0].append(fresh)
                res[name][1].append(again)
    print(f"qcow2 1 GiB, one persistent bitmap (64 KiB granules), 4 KiB writes over NBD, QD32, "
          f"{COUNT} writes (step 1 MiB + 4 KiB: ~16k fresh granules), medians of {n} runs")
    print("| daemon | fresh granules s | IOPS | same granules again s | IOPS |")
    print("|---|---|---|---|---|")
    med = {}
    for name, _, _ in sides:
        f, a = statistics.median(res[name][0]), statistics.median(res[name][1])
        med[name] = (f, a)
        print(f"| {name} | {f:.3f} | {COUNT / f:.0f} | {a:.3f} | {COUNT / a:.0f} |")
    on, off = med["stratad, write-intent"], med["stratad, STRATA_BITMAP_WRITE_INTENT=off"]
    print(f"write-intent cost per write: fresh {1e6 * (on[0] - off[0]) / COUNT:+.1f} µs, "
          f"same granules {1e6 * (on[1] - off[1]) / COUNT:+.1f} µs")


def run(binary, nbitmaps, work):
    img = os.path.join(work, "disk.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, "1G"], check=True)
    sock, nbd = os.path.join(work, "qmp.sock"), os.path.join(work, "nbd.sock")
    for p in (sock, nbd):
        if os.path.exists(p):
            os.unlink(p)
    d = subprocess.Popen([binary,
                          "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
                          "--monitor", "chardev=c",
                          "--blockdev", f"driver=file,node-name=disk,filename={img}",
                          "--nbd-server", f"addr.type=unix,addr.path={nbd}",
                          "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        qmp(sock, *[("block-dirty-bitmap-add", {"node": "disk", "name": f"b{i}",
                                                 "granularity": 65536})
                    for i in range(nbitmaps)])
        t = time.monotonic()
        subprocess.run(["qemu-img", "bench", "-q", "-w", "-f", "raw", "-c", str(COUNT),
                        "-s", "4k", "-d", "32", "-S", "1052672",
                        f"nbd+unix:///disk?socket={nbd}"], check=True)
        return time.monotonic() - t
    finally:
        d.terminate()
        d.wait()


def main():
    args = [a for a in sys.argv[1:] if a != "--persistent"]
    stratad = args[0]
    n = int(args[1]) if len(args) > 1 else 5
    if "--persistent" in sys.argv:
        return main_persistent(stratad, n)
    qsd = "qemu-storage-daemon"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for nb in (0, 1, 8):
            times = {"qsd": [], "stratad": []}
            for _ in range(n):
                times["qsd"].append(run(qsd, nb, work))
                times["stratad"].append(run(stratad, nb, work))
            rows.append((nb, statistics.median(times["qsd"]), statistics.median(times["stratad"])))
    print(f"4 KiB random writes over NBD, QD32, {COUNT} writes, medians of {n} runs")
    print("| bitmaps | qsd s | stratad s | qsd IOPS | stratad IOPS | ratio strata/qsd (time) |")
    print("|---|---|---|---|---|---|")
    for nb, q, s in rows:
        print(f"| {nb} | {q:.3f} | {s:.3f} | {COUNT / q:.0f} | {COUNT / s:.0f} | {s / q:.2f} |")
    base_q, base_s = rows[0][1], rows[0][2]
    for nb, q, s in rows[1:]:
        print(f"cost of {nb} bitmap(s) per write: qsd {1e6 * (q - base_q) / COUNT:+.2f} µs, "
              f"stratad {1e6 * (s - base_s) / COUNT:+.2f} µs")


if __name__ == "__main__":
    main()
