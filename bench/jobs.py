#!/usr/bin/env python3
"""Live block jobs, side by side: qemu-storage-daemon and stratad on the same images, in one run.

For every job case both daemons get identical images (copied from one pristine set built with
qemu-img + qemu-io), the same command line (`--chardev socket,... --monitor ... --blockdev ...`,
every node named on the command line) and the same QMP commands. Timed from just before the
job command is sent to the moment the client reads the job's BLOCK_JOB_COMPLETED (and
BLOCK_JOB_READY for mirror and active commit, which then get `block-job-complete`). Peak RSS of
the daemon during the job: /proc/PID/clear_refs is reset to the current RSS just before the job
command ("5"), VmHWM is read after the completion event. The daemons alternate run by run.

Cases (images: base = ~50% of the clusters allocated, a mix of data and zero clusters;
mid and top = ~25% each, data and zero clusters, on other clusters than chance decides):
  stream              base <- top, block-stream top (pull base into top)
  commit_intermediate base <- mid <- top, block-commit top-node=mid base-node=base
  commit_active       base <- top, block-commit top into base, READY, block-job-complete
  mirror_full         base <- top, blockdev-mirror sync=full to a pre-created qcow2, READY, complete
  backup_full         base <- top, blockdev-backup sync=full to a pre-created qcow2
  backup_incremental  base <- top, bitmap added, ~10% of the clusters written through an NBD
                      export (not timed), blockdev-backup sync=bitmap bitmap-mode=on-success
  mirror_load         base <- top exported writable over NBD; fio (nbd engine) writes 4 KiB
                      random at a fixed rate; after a few seconds blockdev-mirror sync=full
                      copy-mode=background. Time to READY (or none within --load-timeout s) and
                      the writer's achieved IOPS while the mirror ran.

Usage: bench/jobs.py [--reps 3] [--size-mib 1024] [--only stream,mirror_load] [--stratad PATH]
Standard library only (imports the QMP client of scripts/demo_live.py); needs qemu-img, qemu-io,
qemu-storage-daemon, and fio with its nbd engine for mirror_load. Scratch: $S (default
/tmp/strata-bench-jobs). Output: $S/results/jobs.csv and Markdown tables on stdout.
"""
import argparse
import csv
import glob
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "scripts"))
import demo_live  # noqa: E402  (the Qmp class only; its main() is guarded)

CLUSTER = 64 << 10
S = os.environ.get("S", "/tmp/strata-bench-jobs")
RES = os.environ.get("RES", f"{S}/results")
P = f"{S}/pristine"
W = f"{S}/run"


class DaemonGone(Exception):
    pass


class Qmp(demo_live.Qmp):
    """demo_live's client, plus: a receive timestamp on every event and waiting for events."""

    def _next(self):
        try:
            v = super()._next()
        except SystemExit as e:  # demo_live exits when the monitor closes
            raise DaemonGone(str(e))
        if "event" in v:
            v["_rx"] = time.monotonic()
        return v

    def call(self, command, args):
        """Like cmd(), with the arguments as a dict (QMP has arguments called `name`)."""
        self.sock.sendall(json.dumps({"execute": command, "arguments": args}).encode())
        while True:
            v = self._next()
            if "event" in v:
                self.events.append(v)
                continue
            if "error" in v:
                raise RuntimeError(f"{command}: {v['error']['desc']}")
            return v["return"]

    def wait_event(self, pred, since=0, timeout=600.0):
        """First event at index >= since matching pred; None on timeout."""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.events):
                if pred(self.events[i]):
                    return self.events[i]
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                v = self._next()
            except socket.timeout:
                return None
            finally:
                self.sock.settimeout(None)
            if "event" in v:
                self.events.append(v)


def job_ev(job, *names):
    def pred(ev):
        d = ev.get("data", {})
        return ev["event"] in names and d.get("id", d.get("device")) == job
    return pred


def sh(*args, input=None):
    r = subprocess.run(args, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stderr}")
    return r.stdout


# ---------------------------------------------------------------- images
def fill_cmds(size, frac, seed, zero_share=0.25):
    """qemu-io commands allocating ~frac of the clusters in runs of 1-16 clusters; a quarter of
    the allocated runs are zero clusters (write -z), the rest data with a per-run pattern."""
    rng = random.Random(seed)
    n = size // CLUSTER
    out, c = [], 0
    while c < n:
        run = min(rng.randint(1, 16), n - c)
        if rng.random() < frac:
            off, ln = c * CLUSTER, run * CLUSTER
            if rng.random() < zero_share:
                out.append(f"write -z {off} {ln}")
            else:
                out.append(f"write -P {rng.randrange(1, 256)} {off} {ln}")
        c += run
    return "\n".join(out) + "\n"


def build_pristine(size):
    stamp = f"{P}/.size"
    if os.path.exists(stamp) and open(stamp).read() == str(size):
        return
    os.makedirs(P, exist_ok=True)
    for f in glob.glob(f"{P}/*.qcow2"):
        os.unlink(f)
    mk = lambda name, backing=None: sh(
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
        *(["-b", f"{backing}.qcow2", "-F", "qcow2"] if backing else []), f"{P}/{name}.qcow2", str(size))
    io = lambda name, cmds: sh("qemu-io", "-f", "qcow2", f"{P}/{name}.qcow2", input=cmds)
    mk("base"); io("base", fill_cmds(size, 0.5, 1))
    mk("top", "base"); io("top", fill_cmds(size, 0.25, 2))     # for 2-image chains
    mk("mid", "base"); io("mid", fill_cmds(size, 0.25, 3))     # for the 3-image chain
    mk("top3", "mid"); io("top3", fill_cmds(size, 0.25, 4))
    open(stamp, "w").write(str(size))


def data_mib(name):
    m = json.loads(sh("qemu-img", "map", "--output=json", f"{P}/{name}.qcow2"))
    d = sum(e["length"] for e in m if e.get("data") and e["depth"] == 0)
    z = sum(e["length"] for e in m if e.get("zero") and not e.get("data") and e["depth"] == 0 and e.get("present", True))
    return d >> 20, z >> 20


def fresh(files, targets, size):
    os.makedirs(W, exist_ok=True)
    for f in glob.glob(f"{W}/*"):
        os.unlink(f)
    for f in files:
        sh("cp", "--sparse=always", f"{P}/{f}.qcow2", f"{W}/{f}.qcow2")
    for t in targets:
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", f"{W}/{t}.qcow2", str(size))


# ---------------------------------------------------------------- daemon
FILE_OPTS = os.environ.get("FILE_OPTS", "cache.direct=on,aio=io_uring")


def blockdevs(nodes):
    """nodes: [(node name, file stem, backing node or None)] -> --blockdev arguments."""
    out = []
    for name, stem, backing in nodes:
        out += ["--blockdev", f"driver=file,node-name={name}-file,filename={W}/{stem}.qcow2,{FILE_OPTS}"]
        out += ["--blockdev", f"driver=qcow2,node-name={name},file={name}-file"
                + (f",backing={backing}" if backing else "")]
    return out


class Daemon:
    def __init__(self, binary, tag, extra):
        self.sock = f"{W}/qmp.sock"
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.cmdline = [binary, "--chardev", f"socket,id=qmp0,path={self.sock},server=on,wait=off",
                        "--monitor", "chardev=qmp0"] + extra
        self.log = open(f"{W}/{tag}.log", "wb")
        self.proc = subprocess.Popen(self.cmdline, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(500):
            if os.path.exists(self.sock) or self.proc.poll() is not None:
                break
            time.sleep(0.01)
        if self.proc.poll() is not None:
            raise DaemonGone(f"exited at start-up: {self.logtext()}")
        self.q = Qmp(self.sock)
        # Both daemons answer QMP only once every command-line option is done (stratad once
        # served the monitor earlier); the wait stays as a guard and counts starts that need it.
        want = {a.split("node-name=")[1].split(",")[0] for a in extra if "node-name=" in a}
        t = time.monotonic()
        self.partial = False
        while True:
            have = {n["node-name"] for n in self.q.cmd("query-named-block-nodes", flat=True)}
            if want <= have:
                break
            self.partial = True
            if time.monotonic() - t > 30:
                raise DaemonGone(f"graph incomplete after 30 s: missing {sorted(want - have)}")
            time.sleep(0.005)

    def logtext(self):
        self.log.flush()
        return open(self.log.name, errors="replace").read().strip()[:300]

    def status(self, key):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return None

    def cpu_s(self):
        """utime + stime of the daemon, all threads, in seconds."""
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def reset_hwm(self):
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self):
        try:
            self.q.cmd("quit")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its Popen handle
            self.proc.wait()


def run_job(d, job, cmd, args, complete_on_ready=False, timeout=600.0):
    """-> (ready_s or None, done_s); raises RuntimeError with the first error."""
    q = d.q
    n0 = len(q.events)
    d.reset_hwm()
    d.cpu0 = d.cpu_s()
    t0 = time.monotonic()
    q.cmd(cmd, **args)
    ready = None
    if complete_on_ready:
        ev = q.wait_event(job_ev(job, "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), n0, timeout)
        if ev is None:
            raise RuntimeError(f"no READY within {timeout:.0f} s")
        if ev["event"] != "BLOCK_JOB_READY":
            raise RuntimeError(f"{ev['event']} before READY: {ev['data'].get('error', '')}")
        ready = ev["_rx"] - t0
        q.cmd("block-job-complete", device=job)
    ev = q.wait_event(job_ev(job, "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), n0, timeout)
    if ev is None:
        raise RuntimeError(f"no completion within {timeout:.0f} s")
    done = ev["_rx"] - t0
    if ev["event"] != "BLOCK_JOB_COMPLETED" or "error" in ev["data"]:
        raise RuntimeError(f"{ev['event']}: {ev['data'].get('error', '')}")
    return ready, done


CHAIN2 = [("base", "base", None), ("top", "top", "base")]
CHAIN3 = [("base", "base", None), ("mid", "mid", "base"), ("top", "top3", "mid")]
TGT = [("tgt", "tgt", None)]


def case_stream(d):
    return run_job(d, "j", "block-stream", {"job-id": "j", "device": "top"})


def case_commit_intermediate(d):
    return run_job(d, "j", "block-commit", {"job-id": "j", "device": "top", "top-node": "mid", "base-node": "base"})


def case_commit_active(d):
    return run_job(d, "j", "block-commit", {"job-id": "j", "device": "top", "base-node": "base"}, True)


def case_mirror_full(d):
    return run_job(d, "j", "blockdev-mirror", {"job-id": "j", "device": "top", "target": "tgt", "sync": "full"}, True)


def case_backup_full(d):
    return run_job(d, "j", "blockdev-backup", {"job-id": "j", "device": "top", "target": "tgt", "sync": "full"})


def case_backup_incremental(d, size):
    q = d.q
    q.call("block-dirty-bitmap-add", {"node": "top", "name": "bm0"})
    nbd = f"{W}/nbd.sock"
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
    q.call("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "name": "top", "writable": True})
    rng = random.Random(5)
    n = size // CLUSTER
    cl = rng.sample(range(n), n // 10)
    cmds = "".join(f"write -P {rng.randrange(1, 256)} {c * CLUSTER} {CLUSTER}\n" for c in sorted(cl))
    sh("qemu-io", "-f", "raw", f"nbd+unix:///top?socket={nbd}", input=cmds)
    return run_job(d, "j", "blockdev-backup", {"job-id": "j", "device": "top", "target": "tgt", "sync": "bitmap",
                                               "bitmap": "bm0", "bitmap-mode": "on-success"})


CASES = {
    # name: (files, targets, nodes, fn(daemon, size))
    "stream": (["base", "top"], [], CHAIN2, lambda d, s: case_stream(d)),
    "commit_intermediate": (["base", "mid", "top3"], [], CHAIN3, lambda d, s: case_commit_intermediate(d)),
    "commit_active": (["base", "top"], [], CHAIN2, lambda d, s: case_commit_active(d)),
    "mirror_full": (["base", "top"], ["tgt"], CHAIN2 + TGT, lambda d, s: case_mirror_full(d)),
    "backup_full": (["base", "top"], ["tgt"], CHAIN2 + TGT, lambda d, s: case_backup_full(d)),
    "backup_incremental": (["base", "top"], ["tgt"], CHAIN2 + TGT, case_backup_incremental),
}


def one_job(case, binary, tag, size):
    files, targets, nodes, fn = CASES[case]
    fresh(files, targets, size)
    r = {"ready_s": None, "done_s": None, "hwm_kib": None, "cpu_s": None, "rss_idle_kib": None, "error": ""}
    try:
        d = Daemon(binary, tag, blockdevs(nodes))
        r["partial_graph_at_greeting"] = d.partial
    except Exception as e:
        r["error"] = f"start: {e}"
        return r
    try:
        r["rss_idle_kib"] = d.status("VmRSS")
        r["ready_s"], r["done_s"] = fn(d, size)
        r["hwm_kib"] = d.status("VmHWM")
        r["cpu_s"] = d.cpu_s() - d.cpu0
    except Exception as e:
        r["error"] = str(e)[:300] or type(e).__name__
        try:
            r["hwm_kib"] = d.status("VmHWM")
        except Exception:
            pass
    finally:
        d.stop()
    if r["error"] and d.logtext():
        r["error"] += f" | log: {d.logtext()}"
    return r


# ------------------------------------------------------------ mirror under load
def read_iops_log(prefix):
    pts = []
    for f in glob.glob(prefix + "_iops.*.log"):
        for line in open(f):
            p = [x.strip() for x in line.split(",")]
            if len(p) >= 2:
                pts.append((int(p[0]) / 1000.0, int(p[1])))
    return sorted(pts)


def mean_iops(pts, a, b):
    v = [x for t, x in pts if a <= t < b]
    return sum(v) / len(v) if v else None


def one_load(binary, tag, size, rate, qd, timeout, pre=4.0, post=3.0):
    fresh(["base", "top"], ["tgt"], size)
    r = {"ready_s": None, "done_s": None, "hwm_kib": None, "cpu_s": None, "rss_idle_kib": None, "error": "",
         "iops_before": None, "iops_during": None}
    try:
        d = Daemon(binary, tag, blockdevs(CHAIN2 + TGT))
        r["partial_graph_at_greeting"] = d.partial
    except Exception as e:
        r["error"] = f"start: {e}"
        return r
    fio = None
    try:
        q = d.q
        r["rss_idle_kib"] = d.status("VmRSS")
        nbd = f"{W}/nbd.sock"
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nbd}})
        q.call("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "name": "top", "writable": True})
        fio = subprocess.Popen(
            ["fio", "--name=writer", "--ioengine=nbd", f"--uri=nbd+unix:///top?socket={nbd}",
             "--rw=randwrite", "--bs=4k", f"--iodepth={qd}", f"--rate_iops={rate}", "--time_based",
             f"--runtime={int(pre + timeout + post + 60)}", "--norandommap", "--randrepeat=0",
             f"--write_iops_log={W}/w", "--log_avg_msec=500", "--log_unix_epoch=1",
             f"--output={W}/fio.out"], stdout=subprocess.DEVNULL, stderr=open(f"{W}/fio.err", "wb"))
        time.sleep(pre)
        if fio.poll() is not None:
            raise RuntimeError(f"fio exited: {open(f'{W}/fio.err').read()[:200]}")
        w0 = time.time()
        n0 = len(q.events)
        d.reset_hwm()
        cpu0 = d.cpu_s()
        t0 = time.monotonic()
        q.cmd("blockdev-mirror", **{"job-id": "m", "device": "top", "target": "tgt", "sync": "full",
                                    "copy-mode": "background"})
        ev = q.wait_event(job_ev("m", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), n0, timeout)
        if ev is not None and ev["event"] == "BLOCK_JOB_READY":
            r["ready_s"] = ev["_rx"] - t0
            w1 = time.time()
            q.cmd("block-job-complete", device="m")
        elif ev is not None:
            raise RuntimeError(f"{ev['event']} before READY: {ev['data'].get('error', '')}")
        else:
            w1 = time.time()
            jobs = q.cmd("query-block-jobs")
            if jobs:
                r["error"] = f"never READY in {timeout:.0f} s (offset {jobs[0]['offset'] >> 20} of {jobs[0]['len'] >> 20} MiB)"
            q.cmd("block-job-cancel", device="m", force=True)
        ev = q.wait_event(job_ev("m", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), n0, 120)
        if ev is not None and r["ready_s"] is not None:
            r["done_s"] = ev["_rx"] - t0
            if "error" in ev["data"]:
                raise RuntimeError(f"{ev['event']}: {ev['data']['error']}")
        r["hwm_kib"] = d.status("VmHWM")
        r["cpu_s"] = d.cpu_s() - cpu0
        time.sleep(post)
        fio.send_signal(signal.SIGINT)  # our own child, by PID
        fio.wait(timeout=60)
        pts = read_iops_log(f"{W}/w")
        r["iops_before"] = mean_iops(pts, w0 - pre + 1.5, w0)
        r["iops_during"] = mean_iops(pts, w0, w1)
    except Exception as e:
        r["error"] = (r["error"] + "; " if r["error"] else "") + (str(e)[:300] or type(e).__name__)
    finally:
        if fio and fio.poll() is None:
            fio.kill()
            fio.wait()
        d.stop()
    return r


# ---------------------------------------------------------------- main
def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


def fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--only", default="")
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    ap.add_argument("--stratad", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", f"{REPO}/target"),
                                                      "release", "stratad"))
    ap.add_argument("--load-reps", type=int, default=2)
    ap.add_argument("--load-rate", type=int, default=2000, help="writer IOPS cap (fio rate_iops)")
    ap.add_argument("--load-qd", type=int, default=8)
    ap.add_argument("--load-timeout", type=float, default=45)
    a = ap.parse_args()
    size = a.size_mib << 20
    names = [n for n in a.only.split(",") if n] or list(CASES) + ["mirror_load"]
    os.makedirs(RES, exist_ok=True)
    build_pristine(size)
    daemons = [("qsd", a.qsd), ("stratad", a.stratad)]
    print(f"images: {a.size_mib} MiB virtual; allocated data/zero MiB: "
          + ", ".join(f"{n} {data_mib(n)[0]}/{data_mib(n)[1]}" for n in ("base", "top", "mid", "top3")), flush=True)
    rows = []
    csvf = f"{RES}/jobs.csv"
    fields = ["case", "daemon", "rep", "ready_s", "done_s", "hwm_kib", "cpu_s", "rss_idle_kib", "iops_before", "iops_during", "partial_graph_at_greeting", "error"]
    with open(csvf, "w", newline="") as f:
        csv.DictWriter(f, fields).writeheader()

    def record(case, tag, rep, r):
        row = {"case": case, "daemon": tag, "rep": rep, **r}
        rows.append(row)
        with open(csvf, "a", newline="") as f:
            csv.DictWriter(f, fields, extrasaction="ignore").writerow(row)
        print(f"{case:20} {tag:8} rep {rep}: ready={fmt(r['ready_s'])} done={fmt(r['done_s'])} "
              f"hwm={r['hwm_kib']} KiB cpu={fmt(r.get('cpu_s'), '.2f')} s" + (f" iops before/during={fmt(r.get('iops_before'), '.0f')}/"
                                           f"{fmt(r.get('iops_during'), '.0f')}" if case == "mirror_load" else "")
              + (f" ERROR: {r['error']}" if r["error"] else ""), flush=True)

    for case in [n for n in names if n in CASES]:
        for rep in range(1, a.reps + 1):
            order = daemons if rep % 2 else daemons[::-1]
            for tag, binary in order:
                record(case, tag, rep, one_job(case, binary, tag, size))
    if "mirror_load" in names:
        for rep in range(1, a.load_reps + 1):
            order = daemons if rep % 2 else daemons[::-1]
            for tag, binary in order:
                record("mirror_load", tag, rep, one_load(binary, tag, size, a.load_rate, a.load_qd, a.load_timeout))

    print()
    print("| job | qsd ready s | stratad ready s | qsd done s | stratad done s | ratio done strata/qsd "
          "| qsd CPU s | stratad CPU s | qsd peak RSS MiB | stratad peak RSS MiB | runs ok qsd/stratad |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in [n for n in names if n in CASES]:
        g = {t: [r for r in rows if r["case"] == case and r["daemon"] == t] for t, _ in daemons}
        ok = {t: [r for r in g[t] if not r["error"]] for t in g}
        m = {t: (med([r["ready_s"] for r in ok[t]]), med([r["done_s"] for r in ok[t]]),
                 med([r["hwm_kib"] / 1024 for r in ok[t] if r["hwm_kib"]]), med([r.get("cpu_s") for r in ok[t]])) for t in g}
        ratio = m["stratad"][1] / m["qsd"][1] if m["stratad"][1] and m["qsd"][1] else None
        print(f"| {case} | {fmt(m['qsd'][0])} | {fmt(m['stratad'][0])} | {fmt(m['qsd'][1])} | {fmt(m['stratad'][1])} "
              f"| {fmt(ratio, '.2f')} | {fmt(m['qsd'][3], '.2f')} | {fmt(m['stratad'][3], '.2f')} | {fmt(m['qsd'][2], '.0f')} | {fmt(m['stratad'][2], '.0f')} "
              f"| {len(ok['qsd'])}/{len(g['qsd'])} {len(ok['stratad'])}/{len(g['stratad'])} |")
    if "mirror_load" in names:
        print()
        print(f"Mirror under load (writer: fio nbd randwrite 4k QD{a.load_qd} capped at {a.load_rate} IOPS; "
              f"timeout {a.load_timeout:.0f} s):")
        print()
        print("| daemon | rep | time to READY s | writer IOPS before | writer IOPS during mirror | daemon CPU s | peak RSS MiB | note |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            if r["case"] == "mirror_load":
                print(f"| {r['daemon']} | {r['rep']} | {fmt(r['ready_s'], '.2f') if r['ready_s'] is not None else 'never'} "
                      f"| {fmt(r['iops_before'], '.0f')} | {fmt(r['iops_during'], '.0f')} | {fmt(r.get('cpu_s'), '.2f')} "
                      f"| {fmt(r['hwm_kib'] / 1024 if r['hwm_kib'] else None, '.0f')} | {r['error']} |")
    for tag, _ in daemons:
        n = [r for r in rows if r["daemon"] == tag]
        k = sum(1 for r in n if r.get("partial_graph_at_greeting"))
        print(f"\n{tag}: {k} of {len(n)} starts answered QMP before all --blockdev nodes existed "
              "(the harness waited for them before the job)")
    errs = [r for r in rows if r["error"] and not r["error"].startswith("never READY")]
    if errs:
        print("\nFirst error per (job, daemon):")
        seen = set()
        for r in errs:
            if (r["case"], r["daemon"]) not in seen:
                seen.add((r["case"], r["daemon"]))
                print(f"- {r['case']} / {r['daemon']}: {r['error']}")


if __name__ == "__main__":
    main()
