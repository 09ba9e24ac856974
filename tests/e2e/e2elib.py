"""Helpers for the stratad-vs-qemu-storage-daemon compatibility suite.

Every scenario is a function ``fn(run)`` that drives one daemon through a :class:`Run`.
Everything the scenario observes goes into ``run.transcript`` as normalised
``(label, value)`` entries; the per-daemon test ids run the scenario against one daemon,
the ``compare`` test id compares the stratad transcript with the qsd transcript recorded in
the same pytest session (qsd is the oracle; no golden files).

Literal expectations (stable QEMU error texts, event orders documented in
/work/shared/reference/qemu-behaviour.md) are asserted on both daemons as well, so the qsd
half also validates the scenario itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterable, Optional

from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU_IMG = os.environ.get("QEMU_IMG", "qemu-img")
QEMU_IO = os.environ.get("QEMU_IO", "qemu-io")

VOLATILE = "<volatile>"
EVENT_TIMEOUT = float(os.environ.get("E2E_EVENT_TIMEOUT", "10"))

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCHEMA_FILE = os.path.join(REPO, "crates", "strata-qmp", "schema", "qsd-10.0.2.json")


class ScenarioFailure(AssertionError):
    pass


# ----------------------------------------------------------------------------------------
# normalisation

def normalise(value: Any, subst: Iterable[tuple[str, str]] = ()) -> Any:
    """Deep copy of *value* with run-specific strings replaced (temp dir, #blockNNN)."""
    subst = list(subst)

    def fix(v):
        if isinstance(v, str):
            for a, b in subst:
                if a:
                    v = v.replace(a, b)
            v = re.sub(r"#block\d+", "#blockN", v)
            return v
        if isinstance(v, dict):
            return {fix(k): fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return fix(value)


# Strata's extension members of jobs (docs/EXTENSIONS.md): stratad adds them to query-jobs,
# query-block-jobs and BLOCK_JOB_READY/COMPLETED/CANCELLED; qsd has none.  Dropped before
# comparing; test_job_extensions.py checks them.
JOB_EXTENSION_MEMBERS = ("rate", "remaining", "eta-ms", "phase", "dirty-rate", "copy-rate",
                         "convergence")
JOB_EXTENSION_EVENTS = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
JOB_QUERIES = ("query-jobs", "query-block-jobs")


def drop_job_extensions(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in JOB_EXTENSION_MEMBERS}


def strip_event(ev: dict, volatile: Iterable[str] = ()) -> dict:
    """Event without timestamp; members named in *volatile* replaced by a placeholder."""
    out = {"event": ev["event"]}
    if "data" in ev:
        data = dict(ev["data"])
        if ev["event"] in JOB_EXTENSION_EVENTS:
            data = drop_job_extensions(data)
        for k in volatile:
            if k in data:
                data[k] = VOLATILE
        out["data"] = data
    return out


def drop_pause_pairs(events: list[dict], reason: str) -> list[dict]:
    """Remove JOB_STATUS_CHANGE paused->running and standby->ready pairs (per job id).

    qsd emits such pairs when a graph change or an NBD connection drains the node a job
    runs on (reference §12).  *reason* must say why the scenario may drop them; it is
    only documentation.
    """
    assert reason, "drop_pause_pairs needs a documented reason"
    out: list[dict] = []
    pending: dict[str, int] = {}
    back = {"paused": "running", "standby": "ready"}
    for ev in events:
        if ev.get("event") == "JOB_STATUS_CHANGE":
            jid = ev["data"]["id"]
            st = ev["data"]["status"]
            if st in back:
                pending[jid] = len(out)
                out.append(ev)
                continue
            if jid in pending:
                idx = pending.pop(jid)
                prev = out[idx]["data"]["status"]
                if back.get(prev) == st:
                    del out[idx]
                    continue
        out.append(ev)
    return out


def first_difference(a: Any, b: Any, path: str = "") -> Optional[str]:
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                         and not isinstance(a, bool) and not isinstance(b, bool)):
        return f"{path or '<root>'}: qsd={json.dumps(a)[:300]} stratad={json.dumps(b)[:300]}"
    if isinstance(a, dict):
        for k in list(a.keys()) + [k for k in b.keys() if k not in a]:
            if k not in b:
                return f"{path}.{k}: missing in stratad (qsd={json.dumps(a[k])[:200]})"
            if k not in a:
                return f"{path}.{k}: unexpected in stratad (stratad={json.dumps(b[k])[:200]})"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        if len(a) != len(b):
            if len(a) > len(b):
                return f"{path}[{len(b)}]: missing in stratad (qsd={json.dumps(a[len(b)])[:300]})"
            return f"{path}[{len(a)}]: extra in stratad (stratad={json.dumps(b[len(a)])[:300]})"
        return None
    if a != b:
        return f"{path or '<root>'}: qsd={json.dumps(a)[:300]} stratad={json.dumps(b)[:300]}"
    return None


def compare_transcripts(q: list, s: list) -> Optional[str]:
    """First difference between two transcripts of (label, value) entries, as text."""
    for i, (qe, se) in enumerate(zip(q, s)):
        if qe[0] != se[0]:
            return (f"entry #{i}: qsd recorded '{qe[0]}' = {json.dumps(qe[1])[:300]}, "
                    f"stratad recorded '{se[0]}' = {json.dumps(se[1])[:300]}")
        d = first_difference(qe[1], se[1])
        if d:
            return f"entry #{i} '{qe[0]}': {d}"
    if len(q) != len(s):
        if len(q) > len(s):
            return f"entry #{len(s)} '{q[len(s)][0]}': missing in stratad (qsd={json.dumps(q[len(s)][1])[:300]})"
        return f"entry #{len(q)} '{s[len(q)][0]}': extra in stratad ({json.dumps(s[len(q)][1])[:300]})"
    return None


# ----------------------------------------------------------------------------------------
# raw QMP (for protocol-level scenarios the official client cannot express)

class RawQMP:
    """Byte-level QMP client: sends arbitrary bytes, reads a stream of JSON values."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = ""
        self.dec = json.JSONDecoder()

    def recv(self) -> dict:
        while True:
            s = self.buf.lstrip()
            if s:
                try:
                    obj, end = self.dec.raw_decode(s)
                    self.buf = s[end:]
                    return obj
                except json.JSONDecodeError:
                    pass
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("monitor closed the connection")
            self.buf += chunk.decode()

    def recv_response(self) -> dict:
        """Next non-event message."""
        while True:
            m = self.recv()
            if "event" not in m:
                return m

    def send(self, data: bytes | str | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def exchange(self, data) -> dict:
        self.send(data)
        return self.recv_response()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ----------------------------------------------------------------------------------------
# daemon process

class Daemon:
    def __init__(self, kind: str, binary: str, workdir: str, name: str):
        self.kind = kind
        self.binary = binary
        self.workdir = workdir
        self.name = name
        self.sock = os.path.join(workdir, f"{name}.qmp")
        self.stderr_path = os.path.join(workdir, f"{name}.stderr")
        self.proc: Optional[subprocess.Popen] = None
        self.qmp: Optional[QEMUMonitorProtocol] = None
        self.greeting: Optional[dict] = None
        self.rc: Optional[int] = None

    def argv(self, extra: Iterable[str]) -> list[str]:
        return [self.binary,
                "--chardev", f"socket,id=mon0,path={self.sock},server=on,wait=off",
                "--monitor", "chardev=mon0",
                *extra]

    def start(self, extra: Iterable[str] = (), connect: bool = True, timeout: float = 5.0):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.argv(extra), stdin=subprocess.DEVNULL,
                                     stdout=self._stderr, stderr=self._stderr,
                                     cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise ScenarioFailure(
                    f"{self.kind} exited with {self.proc.returncode} during startup: "
                    f"{self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                raise ScenarioFailure(f"{self.kind}: monitor socket never appeared")
            time.sleep(0.01)
        if connect:
            self.connect()
        return self

    def connect(self, timeout: float = 5.0):
        # the socket file can appear before the daemon listens on it: retry briefly
        deadline = time.monotonic() + timeout
        while True:
            self.qmp = QEMUMonitorProtocol(self.sock)
            self.qmp.settimeout(EVENT_TIMEOUT)
            try:
                self.greeting = self.qmp.connect(negotiate=True)
                return
            except Exception as e:  # qemu.qmp.ConnectError
                try:
                    self.qmp.close()
                except Exception:
                    pass
                self.qmp = None
                if time.monotonic() > deadline or not self.alive():
                    raise ScenarioFailure(f"{self.kind}: cannot connect to the monitor: {e!r}; "
                                          f"stderr: {self.stderr()[-1500:]}")
                time.sleep(0.05)

    def disconnect(self):
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None

    def raw(self) -> RawQMP:
        """A raw connection (the official client is disconnected first: one client at a time)."""
        self.disconnect()
        return RawQMP(self.sock)

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def execute(self, cmd: str, args: Optional[dict] = None) -> dict:
        if self.qmp is None:
            raise ScenarioFailure("no QMP connection")
        if not self.alive():
            raise ScenarioFailure(f"{self.kind} died (rc={self.proc.poll()}): {self.stderr()[-1500:]}")
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        try:
            return self.qmp.cmd_obj(msg)
        except asyncio.TimeoutError:
            raise ScenarioFailure(f"{self.kind}: no reply to {cmd} within {EVENT_TIMEOUT}s")

    def pull_event(self, timeout: float) -> Optional[dict]:
        try:
            return self.qmp.pull_event(wait=float(timeout))
        except asyncio.TimeoutError:
            return None

    def stop(self, how: str = "quit", timeout: float = 10.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if how == "quit" and self.qmp is not None:
                try:
                    self.qmp.cmd_obj({"execute": "quit"})
                except Exception:
                    pass
            else:
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.rc = "hung"  # type: ignore[assignment]
        self.disconnect()
        try:
            self._stderr.close()
        except Exception:
            pass
        return self.rc


# ----------------------------------------------------------------------------------------
# one scenario run against one daemon

class Run:
    def __init__(self, kind: str, binary: str, workdir: str):
        self.kind = kind
        self.binary = binary
        self.dir = workdir
        self.transcript: list[tuple[str, Any]] = []
        self.daemons: list[Daemon] = []
        self.images: dict[str, str] = {}   # label -> path, compared across daemons
        self.d: Optional[Daemon] = None

    # -- recording -----------------------------------------------------------------------
    def norm(self, v):
        return normalise(v, [(self.dir, "$DIR")])

    def rec(self, label: str, value: Any) -> Any:
        self.transcript.append((label, self.norm(value)))
        return value

    def check(self, cond: bool, what: str):
        if not cond:
            raise ScenarioFailure(f"[{self.kind}] {what}")

    # -- files ---------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def sh(self, argv: list[str], ok: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(argv, cwd=self.dir, capture_output=True, text=True, timeout=30)
        if ok and p.returncode != 0:
            raise ScenarioFailure(f"{' '.join(argv)} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def img(self, name: str, size: str = "4M", backing: Optional[str] = None,
            fmt: str = "qcow2", opts: Optional[str] = None) -> str:
        p = self.path(name)
        argv = [QEMU_IMG, "create", "-q", "-f", fmt]
        if backing:
            argv += ["-b", backing, "-F", "qcow2"]
        if opts:
            argv += ["-o", opts]
        argv += [p, size]
        self.sh(argv)
        return p

    def io(self, target: str, *cmds: str, fmt: str = "qcow2", extra: Iterable[str] = ()) -> str:
        argv = [QEMU_IO]
        if fmt:
            argv += ["-f", fmt]
        argv += list(extra)
        for c in cmds:
            argv += ["-c", c]
        argv.append(target)
        p = self.sh(argv, ok=False)
        out = p.stdout + p.stderr
        if p.returncode != 0 or "error" in out.lower() or "failed" in out.lower():
            raise ScenarioFailure(f"qemu-io {cmds} on {target}: rc={p.returncode} {out}")
        return out

    def nbd_uri(self, export: str, sock: Optional[str] = None) -> str:
        return f"nbd+unix:///{export}?socket={sock or self.path('nbd.sock')}"

    def nbd_io(self, export: str, *cmds: str, readonly: bool = False, sock: Optional[str] = None):
        return self.io(self.nbd_uri(export, sock), *cmds, fmt="raw",
                       extra=["-r"] if readonly else [])

    def chain(self, depth: int = 3, size: str = "4M", patterns: bool = True) -> list[str]:
        """base.qcow2 <- mid.qcow2 <- top.qcow2 (relative backing names), with data."""
        names = ["base.qcow2", "mid.qcow2", "top.qcow2"][:depth] if depth <= 3 else \
            [f"l{i}.qcow2" for i in range(depth)]
        out = []
        for i, n in enumerate(names):
            self.img(n, size, backing=names[i - 1] if i else None)
            if patterns:
                # layer i writes 256k at offset i*512k (plus a 64k overwrite at 0)
                self.io(self.path(n), f"write -P {0x11 * (i + 1)} {i * 512}k 256k",
                        f"write -P {0x40 + i} 0 64k")
            out.append(self.path(n))
        return out

    def record_image(self, label: str, path: str, check: bool = True):
        """Record qemu-img check of *path* and keep it for the cross-daemon compare."""
        self.images[label] = path
        if check:
            p = self.sh([QEMU_IMG, "check", "--output=json", path], ok=False)
            try:
                info = json.loads(p.stdout)
                keep = {k: info.get(k) for k in ("check-errors", "corruptions", "leaks",
                                                 "image-end-offset") if k in info}
                keep.pop("image-end-offset", None)
            except ValueError:
                keep = {"output": p.stdout + p.stderr}
            self.rec(f"check {label}", {"rc": p.returncode, **keep})

    def compare_images(self, label: str, a: str, b: str, strict: bool = False):
        argv = [QEMU_IMG, "compare", "-q"] + (["-s"] if strict else []) + [a, b]
        p = self.sh(argv, ok=False)
        self.rec(f"compare {label}", p.returncode)
        return p.returncode

    def img_map(self, path: str) -> list:
        """qemu-img map without host offsets (allocation order is not deterministic)."""
        p = self.sh([QEMU_IMG, "map", "--output=json", "-U", "-f", "qcow2", path])
        return [{k: e[k] for k in ("start", "length", "depth", "zero", "data") if k in e}
                for e in json.loads(p.stdout)]

    def img_info(self, path: str) -> dict:
        p = self.sh([QEMU_IMG, "info", "--output=json", "-U", path])
        return json.loads(p.stdout)

    # -- daemons -------------------------------------------------------------------------
    def start(self, *args: str, connect: bool = True, name: str = "d") -> Daemon:
        d = Daemon(self.kind, self.binary, self.dir, f"{name}{len(self.daemons)}")
        self.daemons.append(d)
        d.start(args, connect=connect)
        self.d = d
        return d

    def stop(self, how: str = "quit", record: bool = True) -> Optional[int]:
        rc = self.d.stop(how)
        if record:
            self.rec("exit", rc)
        return rc

    def teardown(self):
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.stop("quit", timeout=5)
            d.disconnect()

    # -- QMP -----------------------------------------------------------------------------
    def qmp(self, cmd: str, args: Optional[dict] = None, *, label: Optional[str] = None,
            record: bool = True, keep: Optional[Callable[[Any], Any]] = None) -> dict:
        """Execute; record the normalised response; return the raw response."""
        r = self.d.execute(cmd, args)
        r = {k: v for k, v in r.items() if k != "id"}
        if cmd in JOB_QUERIES and isinstance(r.get("return"), list):
            r["return"] = [drop_job_extensions(j) for j in r["return"]]
        if record:
            v = r
            if keep is not None and "return" in r:
                v = {"return": keep(r["return"])}
            self.rec(label or cmd, v)
        return r

    def ok(self, cmd: str, args: Optional[dict] = None, **kw) -> Any:
        r = self.qmp(cmd, args, **kw)
        self.check("return" in r, f"{cmd} {json.dumps(args)[:300]} failed: {r}")
        return r["return"]

    def err(self, cmd: str, args: Optional[dict] = None, cls: Optional[str] = "GenericError",
            desc: Optional[str] = None, match: Optional[str] = None, **kw) -> dict:
        """Expect an error; literal class/desc checks when given (valid for qsd too)."""
        r = self.qmp(cmd, args, **kw)
        self.check("error" in r, f"{cmd} {json.dumps(args)[:300]} should fail, got {r}")
        e = r["error"]
        if cls is not None:
            self.check(e.get("class") == cls, f"{cmd}: class {e.get('class')!r} != {cls!r} ({e})")
        if desc is not None:
            self.check(e.get("desc") == desc, f"{cmd}: desc {e.get('desc')!r} != {desc!r}")
        if match is not None:
            self.check(re.search(match, e.get("desc", "")) is not None,
                       f"{cmd}: desc {e.get('desc')!r} !~ {match!r}")
        return e

    # -- events --------------------------------------------------------------------------
    def wait_events(self, until: Callable[[dict], bool], timeout: float = EVENT_TIMEOUT,
                    what: str = "") -> list[dict]:
        evs = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ScenarioFailure(
                    f"[{self.kind}] timeout waiting for {what or 'event'}; got "
                    f"{[strip_event(e) for e in evs]}")
            ev = self.d.pull_event(min(left, 1.0))
            if ev is None:
                if not self.d.alive():
                    raise ScenarioFailure(f"[{self.kind}] daemon died while waiting for {what}: "
                                          f"{self.d.stderr()[-1500:]}")
                continue
            evs.append(ev)
            if until(ev):
                return evs

    def drain(self, quiet: float = 0.3) -> list[dict]:
        evs = []
        while True:
            ev = self.d.pull_event(quiet)
            if ev is None:
                return evs
            evs.append(ev)

    def events(self, label: str, until: Optional[Callable[[dict], bool]] = None, *,
               volatile: Iterable[str] = (), pause_pairs: Optional[str] = None,
               only: Optional[Iterable[str]] = None, quiet: float = 0.0,
               timeout: float = EVENT_TIMEOUT, what: str = "") -> list[dict]:
        """Collect events (until *until* matches, then also whatever arrives within
        *quiet* seconds), normalise and record them.  *pause_pairs*: reason for dropping
        the drain-induced pause/resume pairs (None keeps them)."""
        evs = self.wait_events(until, timeout, what or label) if until else []
        if quiet:
            evs += self.drain(quiet)
        out = [strip_event(e, volatile) for e in evs]
        if only is not None:
            only = set(only)
            out = [e for e in out if e["event"] in only]
        if pause_pairs:
            out = drop_pause_pairs(out, pause_pairs)
        self.rec(label, out)
        return out

    def job_events(self, label: str, job: str, status: str, **kw) -> list[dict]:
        return self.events(label, job_status(job, status), what=f"{job} {status}", **kw)


def job_status(job: str, status: str) -> Callable[[dict], bool]:
    return lambda e: (e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job
                      and e["data"]["status"] == status)


def event_is(name: str, **data) -> Callable[[dict], bool]:
    return lambda e: e["event"] == name and all(e.get("data", {}).get(k) == v
                                                for k, v in data.items())


def jsc(job: str, *statuses: str) -> list[dict]:
    """Expected JOB_STATUS_CHANGE sequence."""
    return [{"event": "JOB_STATUS_CHANGE", "data": {"id": job, "status": s}} for s in statuses]


def names(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        if e["event"] == "JOB_STATUS_CHANGE":
            out.append(f"{e['data']['id']}:{e['data']['status']}")
        else:
            out.append(e["event"])
    return out


def pick(d: dict, *keys: str) -> dict:
    """Deterministic subset of a dict (dotted keys reach into nested objects)."""
    out = {}
    for k in keys:
        cur: Any = d
        ok = True
        for part in k.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                ok = False
                break
        out[k] = cur if ok else "<absent>"
    return out


def nodes_view(nodes: list[dict], *extra: str) -> list[dict]:
    """query-named-block-nodes reduced to the deterministic fields, sorted by node name."""
    keys = ("node-name", "drv", "ro", "file", "image.virtual-size", "image.format",
            "dirty-bitmaps") + extra
    view = []
    for n in nodes:
        v = pick(n, *keys)
        if v.get("drv") == "file":
            # a protocol node's "virtual size" is the host file length, which depends on
            # the format driver's allocation strategy: not comparable
            v["image.virtual-size"] = VOLATILE
        view.append(v)
    return sorted(view, key=lambda n: tuple(re.sub(r"#block\d+", "#blockN", str(n.get(k)))
                                            for k in ("node-name", "drv", "file", "ro")))


def schema_commands() -> list[str]:
    with open(SCHEMA_FILE) as f:
        schema = json.load(f)
    return sorted(x["name"] for x in schema if x.get("meta-type") == "command")


def new_workdir(tag: str) -> str:
    return tempfile.mkdtemp(prefix=f"e2e-{tag[:20]}-", dir=os.environ.get("E2E_TMP", "/tmp"))


def rmtree(path: str):
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# scenario registration: one test id per daemon plus one comparison

class Harness:
    """Session state: which daemons, their binaries, and the recorded transcripts."""

    def __init__(self, daemons: list[str], binaries: dict[str, Optional[str]], keep: bool):
        self.daemons = daemons
        self.binaries = binaries
        self.keep = keep
        self.results: dict[str, dict[str, dict]] = {}
        self.workdirs: list[str] = []

    def sides(self) -> list[str]:
        s = list(self.daemons)
        if "qsd" in s and "stratad" in s:
            s.append("compare")
        return s


HARNESS: Optional[Harness] = None


def scenario(fn=None, *, variants: Optional[list] = None):
    """Decorator: ``@scenario`` or ``@scenario(variants=[...])`` on ``test_x(run[, v])``."""

    def wrap(fn):
        import pytest

        def test(case, request):
            variant, side = case
            key = f"{fn.__module__}::{fn.__name__}" + (f"[{variant}]" if variant is not None else "")
            h = HARNESS
            if side == "compare":
                return _compare(h, key)
            binary = h.binaries.get(side)
            if not binary:
                pytest.skip(f"{side} binary not found (set STRATAD=/path/to/stratad or --stratad)")
            wd = new_workdir(fn.__name__ + "-" + side)
            run = Run(side, binary, wd)
            rec = h.results.setdefault(key, {})
            try:
                if variant is None:
                    fn(run)
                else:
                    fn(run, variant)
            except BaseException as e:
                run.transcript.append(("EXCEPTION", f"{type(e).__name__}: {str(e)[:400]}"))
                raise
            finally:
                run.teardown()
                rec[side] = {"transcript": run.transcript, "images": dict(run.images),
                             "dir": wd}
                h.workdirs.append(wd)
                dump = os.environ.get("E2E_DUMP")
                if dump:
                    os.makedirs(dump, exist_ok=True)
                    fname = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{key}-{side}") + ".json"
                    with open(os.path.join(dump, fname), "w") as f:
                        json.dump(run.transcript, f, indent=1)

        test.__name__ = fn.__name__
        test.__qualname__ = fn.__qualname__
        test.__doc__ = fn.__doc__
        test.__module__ = fn.__module__
        test._e2e_variants = variants
        return test

    if fn is not None:
        return wrap(fn)
    return wrap


def _later_differences(q: list, s: list) -> str:
    """Summary of the differing entries after the first one (aligned by index)."""
    bad = [i for i, (a, b) in enumerate(zip(q, s)) if a[0] != b[0] or first_difference(a[1], b[1])]
    more = bad[1:]
    if len(q) != len(s):
        more.append(min(len(q), len(s)))
    if not more:
        return ""
    labels = "index-aligned: " + ", ".join(f"#{i} '{(q[i] if i < len(q) else s[i])[0]}'" for i in more[:6])
    return f"  [later differing entries: {labels}{', ...' if len(more) > 6 else ''}]"


def _compare(h: Harness, key: str):
    import pytest
    res = h.results.get(key, {})
    q, s = res.get("qsd"), res.get("stratad")
    if q is None:
        pytest.fail("qsd baseline was not recorded")
    if s is None:
        pytest.skip("stratad was not run")
    if q["transcript"] and q["transcript"][-1][0] == "EXCEPTION":
        pytest.fail(f"qsd baseline failed, nothing to compare: {q['transcript'][-1][1]}")
    diff = compare_transcripts(q["transcript"], s["transcript"])
    img_diffs = []
    for label, qpath in q["images"].items():
        spath = s["images"].get(label)
        if spath is None:
            img_diffs.append(f"image '{label}' not recorded by stratad")
            continue
        p = subprocess.run([QEMU_IMG, "compare", "-q", "-U", qpath, spath],
                           capture_output=True, text=True)
        if p.returncode != 0:
            img_diffs.append(f"image '{label}': qemu-img compare qsd vs stratad rc="
                             f"{p.returncode} {p.stderr.strip()}")
    if diff:
        extra = f"  [images: {'; '.join(img_diffs) or 'all equal'}]" if q["images"] else ""
        pytest.fail(f"MISMATCH {diff}{_later_differences(q['transcript'], s['transcript'])}"
                    f"{extra}", pytrace=False)
    if img_diffs:
        pytest.fail("MISMATCH " + "; ".join(img_diffs), pytrace=False)


# ----------------------------------------------------------------------------------------
# common QMP building blocks

def add_qcow2(run: Run, node: str, path: str, backing: Any = "<header>", read_only: bool = False,
              record: bool = True) -> Any:
    """blockdev-add qcow2 *node* over an inline file child named *node*-file."""
    args = {"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "node-name": f"{node}-file", "filename": path}}
    if backing != "<header>":
        args["backing"] = backing
    if read_only:
        args["read-only"] = True
    return run.ok("blockdev-add", args, label=f"blockdev-add {node}", record=record)


def add_chain(run: Run, paths: list[str], names_: Iterable[str] = ("base", "mid", "top")) -> list[str]:
    """Open a chain with explicit node names for every layer (base first)."""
    nn = list(names_)[:len(paths)]
    for i, (n, p) in enumerate(zip(nn, paths)):
        add_qcow2(run, n, p, backing=nn[i - 1] if i else None)
    return nn


def nbd_start(run: Run, sock: Optional[str] = None, record: bool = True):
    return run.ok("nbd-server-start",
                  {"addr": {"type": "unix", "data": {"path": sock or run.path("nbd.sock")}}},
                  record=record)


def export(run: Run, node: str, name: Optional[str] = None, writable: bool = True,
           eid: Optional[str] = None, record: bool = True, **extra):
    args = {"type": "nbd", "id": eid or f"exp-{node}", "node-name": node,
            "name": name or node, "writable": writable, **extra}
    return run.ok("block-export-add", args, record=record)


def block_jobs_view(jobs: list[dict]) -> list[dict]:
    keys = ("type", "device", "speed", "paused", "io-status", "ready", "status",
            "auto-finalize", "auto-dismiss", "error")
    return [pick(j, *keys) for j in jobs]


def jobs_view(jobs: list[dict]) -> list[dict]:
    return [pick(j, "id", "type", "status", "error") for j in jobs]


def nodes(run: Run, label: str = "query-named-block-nodes", *extra: str):
    return run.ok("query-named-block-nodes", {"flat": True}, label=label,
                  keep=lambda r: nodes_view(r, *extra))
