#!/usr/bin/env python3
"""Per-write cost of enabled dirty bitmaps, stratad vs qemu-storage-daemon.

Each daemon exports the same raw image over NBD with 0, 1 or 8 enabled bitmaps on the node;
`qemu-img bench -w` (4 KiB random writes, queue depth 32) runs against the export. The
difference between 0 and 8 bitmaps is what marking costs per write. Medians of N runs.

Usage: bench/bitmap_cost.py STRATAD [N]   (qemu-storage-daemon and qemu-img from PATH)
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
    stratad = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 5
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
