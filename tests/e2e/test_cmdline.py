"""Command line and process behaviour (§9)."""

import os
import re
import signal
import subprocess
import time

from e2elib import add_chain, drop_pause_pairs, scenario, strip_event


def prog_stderr(run, text):
    """stderr with the program name prefix and temp dir normalised."""
    name = os.path.basename(run.binary)
    text = text.replace(run.binary, "$PROG")
    text = re.sub(rf"^{re.escape(name)}:", "$PROG:", text.strip(), flags=re.M)
    return text


def invoke(run, *args, timeout=20):
    p = subprocess.run([run.binary, *args], capture_output=True, text=True, timeout=timeout,
                       cwd=run.dir)
    return p


@scenario
def test_cmdline_help_and_errors(run):
    p = invoke(run, "--help")
    run.rec("--help rc", p.returncode)
    run.check(p.returncode == 0 and p.stdout.strip(), f"--help: rc={p.returncode}")
    p = invoke(run, "-h")
    run.rec("-h rc", p.returncode)
    p = invoke(run, "--bogus-option")
    run.rec("unknown option", {"rc": p.returncode, "stderr": prog_stderr(run, p.stderr)})
    run.check(p.returncode == 1 and "--bogus-option" in p.stderr, p.stderr)
    bad = f"driver=file,node-name=d,filename={run.path('nope.img')}"
    p = invoke(run, "--blockdev", bad)
    run.rec("bad --blockdev", {"rc": p.returncode, "stderr": prog_stderr(run, p.stderr)})
    run.check(p.returncode == 1 and f"--blockdev {bad}" in p.stderr, p.stderr)
    p = invoke(run, "--blockdev", "driver=nosuchdriver,node-name=d")
    run.rec("bad --blockdev driver", {"rc": p.returncode, "stderr": prog_stderr(run, p.stderr)})
    p = invoke(run, "--blockdev", "driver=file,filename=/dev/null")
    run.rec("--blockdev without node-name", {"rc": p.returncode, "stderr": prog_stderr(run, p.stderr)})
    p = invoke(run, "--export", "type=nbd,id=e,node-name=nope")
    run.rec("--export without server", {"rc": p.returncode, "stderr": prog_stderr(run, p.stderr)})
    p = invoke(run, "--monitor", "chardev=nope")
    run.rec("--monitor unknown chardev", {"rc": p.returncode, "stderr": prog_stderr(run, p.stderr)})
    p = invoke(run, "positional")
    run.rec("positional argument", {"rc": p.returncode, "stderr": prog_stderr(run, p.stderr)})
    run.check(p.returncode == 1, p.stderr)


@scenario
def test_cmdline_pidfile_sigterm(run):
    pidfile = run.path("d.pid")
    d = run.start("--pidfile", pidfile)
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(pidfile) as f:
        content = f.read()
    run.rec("pidfile holds pid", content.strip() == str(d.proc.pid))
    run.rec("pidfile ends with newline", content.endswith("\n"))
    run.ok("query-jobs")
    run.stop("term")
    run.rec("pidfile removed", not os.path.exists(pidfile))


@scenario
def test_cmdline_sigterm_with_job(run):
    """SIGTERM while a job runs: jobs are cancelled, exports closed, images stay clean."""
    base = run.img("base.qcow2", "16M")
    run.io(base, "write -P 0x33 0 16M")
    top = run.img("top.qcow2", "16M", backing="base.qcow2")
    sock = run.path("nbd.sock")
    run.start("--nbd-server", f"addr.type=unix,addr.path={sock}")
    add_chain(run, [base, top], ["base", "top"])
    run.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "base", "name": "base"})
    run.ok("block-stream", {"job-id": "s0", "device": "top", "speed": 1 << 20})
    run.job_events("start", "s0", "running")
    run.d.proc.send_signal(signal.SIGTERM)
    evs = []
    deadline = time.monotonic() + 20
    while run.d.alive() and time.monotonic() < deadline:
        ev = run.d.pull_event(0.2)
        if ev is not None:
            evs.append(ev)
    while True:
        try:
            ev = run.d.pull_event(0.05)
        except Exception:
            ev = None
        if ev is None:
            break
        evs.append(ev)
    run.rec("shutdown events", drop_pause_pairs(
        [strip_event(e, ("len", "offset")) for e in evs],
        "shutdown drains every node several times; qsd reports each drain as a "
        "paused/running pair (reference §12)"))
    run.stop("term")
    run.record_image("top", top)
    run.record_image("base", base)
