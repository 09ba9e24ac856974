#!/usr/bin/env python3
"""The live demo: stratad serves a 3-image qcow2 chain over NBD while a writer keeps writing
through the export, and stream, active commit, mirror and backup run over QMP one after
the other, each with a progress bar. At the end every image passes `qemu-img check`, the
disk the export ends on holds exactly what the writer wrote, and the backup holds exactly
the disk as it was when the backup started.

Standard library only; needs qemu-img and qemu-io (Debian's qemu-utils).
Usage: demo_live.py STRATAD WORKDIR
"""

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

SIZE = 64 << 20
BLOCK = 64 << 10


def sh(*args, quiet=True):
    r = subprocess.run(args, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stderr}")
    return r.stdout


class Qmp:
    """A minimal QMP client: one command at a time, events collected."""

    def __init__(self, path):
        for _ in range(100):
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        else:
            sys.exit(f"cannot connect to {path}")
        self.buf = b""
        self.events = []
        self.dec = json.JSONDecoder()
        self._next()
        self.cmd("qmp_capabilities")

    def _next(self):
        while True:
            text = self.buf.decode(errors="replace").lstrip()
            if text:
                try:
                    v, end = self.dec.raw_decode(text)
                    self.buf = text[end:].encode()
                    return v
                except json.JSONDecodeError:
                    pass
            chunk = self.sock.recv(65536)
            if not chunk:
                sys.exit("the daemon closed the monitor")
            self.buf += chunk

    def cmd(self, name, **args):
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode())
        while True:
            v = self._next()
            if "event" in v:
                self.events.append(v)
                continue
            if "error" in v:
                raise RuntimeError(f"{name}: {v['error']['desc']}")
            return v["return"]


def progress(q, job, until):
    """Draw the job's progress until `until(status)` is true or the job is gone."""
    while True:
        jobs = {j["id"]: j for j in q.cmd("query-jobs")}
        j = jobs.get(job)
        if j is None:
            print(f"\r  {job:8} [{'=' * 40}] done{' ' * 30}")
            return None
        cur, tot = j["current-progress"], max(j["total-progress"], 1)
        bar = "=" * int(40 * min(cur / tot, 1.0))
        end = "\n" if not sys.stdout.isatty() else ""
        print(f"\r  {job:8} [{bar:<40}] {100 * cur / tot:5.1f}% {j['status']:<10}", end=end, flush=True)
        if until(j["status"]):
            print()
            return j
        time.sleep(0.1 if sys.stdout.isatty() else 0.5)


class Writer(threading.Thread):
    """Writes 4 KiB blocks with known patterns through the NBD export, in batches of
    qemu-io commands, and keeps the model of what the disk must hold."""

    def __init__(self, uri, model):
        super().__init__(daemon=True)
        self.uri, self.model = uri, model
        self.rng = random.Random(7)
        self.go = threading.Event()
        self.go.set()
        self.idle = threading.Event()
        self.stop = False
        self.writes = 0

    def run(self):
        while not self.stop:
            if not self.go.is_set():
                self.idle.set()
                self.go.wait()
                continue
            self.idle.clear()
            batch = []
            for _ in range(32):
                off = self.rng.randrange(SIZE // 4096) * 4096
                pat = self.rng.randrange(1, 256)
                batch.append((off, pat))
            args = ["qemu-io", "-f", "raw", self.uri]
            for off, pat in batch:
                args += ["-c", f"write -P {pat} {off} 4k"]
            sh(*args)
            for off, pat in batch:
                self.model[off // 4096] = pat
            self.writes += len(batch)
        self.idle.set()

    def pause(self):
        self.go.clear()
        self.idle.wait()

    def resume(self):
        self.go.set()


def write_ref(path, model, base_patterns):
    """A raw image with the content the model says."""
    with open(path, "wb") as f:
        for blk in range(SIZE // 4096):
            pat = model.get(blk, base_patterns(blk * 4096))
            f.write(bytes([pat]) * 4096)


def main():
    stratad, work = sys.argv[1], sys.argv[2]
    os.chdir(work)
    step = lambda s: print(f"\n\033[1m== {s}\033[0m")

    step("A 3-image chain (base <- mid <- top, 64 MiB) with known data in each layer")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", str(SIZE))
    sh("qemu-io", "-f", "qcow2", "base.qcow2", "-c", f"write -P 17 0 {SIZE // 2}")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2")
    sh("qemu-io", "-f", "qcow2", "mid.qcow2", "-c", f"write -P 34 {SIZE // 4} {SIZE // 2}")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
    sh("qemu-io", "-f", "qcow2", "top.qcow2", "-c", f"write -P 51 {SIZE // 2} {SIZE // 8}")

    def layered(off):
        if SIZE // 2 <= off < SIZE // 2 + SIZE // 8:
            return 51
        if SIZE // 4 <= off < SIZE // 4 + SIZE // 2:
            return 34
        if off < SIZE // 2:
            return 17
        return 0

    for img in ("mirror.qcow2", "backup.qcow2"):
        sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE))

    step("stratad: the chain as named nodes, exported writable over NBD")
    cmdline = [
        stratad,
        "--chardev", f"socket,id=qmp,path={work}/qmp.sock,server=on,wait=off",
        "--monitor", "chardev=qmp",
        "--blockdev", f"driver=file,node-name=base-file,filename={work}/base.qcow2",
        "--blockdev", "driver=qcow2,node-name=base,file=base-file,read-only=on",
        "--blockdev", f"driver=file,node-name=mid-file,filename={work}/mid.qcow2",
        "--blockdev", "driver=qcow2,node-name=mid,file=mid-file,backing=base,read-only=on",
        "--blockdev", f"driver=file,node-name=top-file,filename={work}/top.qcow2",
        "--blockdev", "driver=qcow2,node-name=top,file=top-file,backing=mid",
        "--nbd-server", f"addr.type=unix,addr.path={work}/nbd.sock",
        "--export", "type=nbd,id=disk,node-name=top,name=disk,writable=on",
        "--pidfile", f"{work}/stratad.pid",
    ]
    print("$ " + " ".join(a if " " not in a else repr(a) for a in cmdline).replace(work + "/", ""))
    daemon = subprocess.Popen(cmdline)
    q = Qmp(f"{work}/qmp.sock")
    model = {}
    writer = Writer(f"nbd+unix:///disk?socket={work}/nbd.sock", model)
    writer.start()
    time.sleep(0.5)
    print(f"  writer running through the export ({writer.writes} writes so far)")

    step("stream: pull mid's data up into top (top <- base afterwards), 32 MiB/s")
    q.cmd("block-stream", **{"job-id": "stream", "device": "top", "base-node": "base", "speed": 32 << 20})
    progress(q, "stream", lambda s: False)
    # mid is out of the chain now; its nodes were added by the command line, so drop them.
    q.cmd("blockdev-del", **{"node-name": "mid"})
    q.cmd("blockdev-del", **{"node-name": "mid-file"})
    chain = [n["node-name"] for n in q.cmd("query-named-block-nodes", flat=True) if n["drv"] == "qcow2"]
    print(f"  qcow2 nodes now: {', '.join(chain)}")

    step("active commit: fold top into base, READY, then pivot the export onto base")
    q.cmd("block-commit", **{"job-id": "commit", "device": "top"})
    progress(q, "commit", lambda s: s == "ready")
    q.cmd("job-complete", id="commit")
    progress(q, "commit", lambda s: False)
    print(f"  the export now reaches '{q.cmd('query-block-exports')[0]['node-name']}'")
    q.cmd("blockdev-del", **{"node-name": "top"})
    q.cmd("blockdev-del", **{"node-name": "top-file"})

    step("mirror: copy the live disk to mirror.qcow2, READY, then pivot the export onto it")
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": "mirror"},
          file={"driver": "file", "filename": f"{work}/mirror.qcow2"})
    q.cmd("blockdev-mirror", **{"job-id": "mirror", "device": "base", "target": "mirror", "sync": "full"})
    progress(q, "mirror", lambda s: s == "ready")
    q.cmd("job-complete", id="mirror")
    progress(q, "mirror", lambda s: False)
    print(f"  the export now reaches '{q.cmd('query-block-exports')[0]['node-name']}'")

    step("backup: a point-in-time copy of the live disk into backup.qcow2")
    q.cmd("blockdev-add", driver="qcow2", **{"node-name": "backup"},
          file={"driver": "file", "filename": f"{work}/backup.qcow2"})
    writer.pause()
    at_start = dict(model)
    q.cmd("blockdev-backup", **{"job-id": "backup", "device": "mirror", "target": "backup", "sync": "full"})
    writer.resume()
    progress(q, "backup", lambda s: False)

    writer.stop = True
    writer.resume()
    writer.join()
    print(f"\n  the writer made {writer.writes} writes while the jobs ran")
    exports = q.cmd("query-block-exports")
    q.cmd("quit")
    daemon.wait(timeout=30)

    step("verify")
    write_ref("expect-now.raw", model, layered)
    write_ref("expect-backup.raw", at_start, layered)
    ok = True
    for img in ("base.qcow2", "top.qcow2", "mid.qcow2", "mirror.qcow2", "backup.qcow2"):
        r = subprocess.run(["qemu-img", "check", "-q", img])
        print(f"  qemu-img check {img}: {'clean' if r.returncode == 0 else 'FAILED'}")
        ok &= r.returncode == 0
    for img, ref in (("mirror.qcow2", "expect-now.raw"), ("backup.qcow2", "expect-backup.raw")):
        r = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", img, ref])
        print(f"  {img} equals {ref}: {'yes' if r.returncode == 0 else 'NO'}")
        ok &= r.returncode == 0
    print(f"  export ended on node '{exports[0]['node-name'] if exports else '?'}'")
    print("\nall good" if ok else "\nFAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
