"""pytest wiring for the stratad-vs-qsd compatibility suite (see README.md)."""

import os
import shutil

import pytest

import e2elib


def pytest_addoption(parser):
    g = parser.getgroup("e2e", "stratad / qemu-storage-daemon compatibility")
    g.addoption("--daemons", default=os.environ.get("E2E_DAEMONS", "qsd,stratad"),
                help="comma-separated daemons to run: qsd, stratad (default both)")
    g.addoption("--stratad", default=None,
                help="path to the stratad binary (default $STRATAD, else "
                     "$CARGO_TARGET_DIR/debug/stratad, else target/debug/stratad)")
    g.addoption("--qsd", default=None,
                help="path to qemu-storage-daemon (default $QSD, else from PATH)")
    g.addoption("--e2e-keep", action="store_true", help="keep the per-scenario temp dirs")


KNOWN_FILE = os.path.join(os.path.dirname(__file__), "known_mismatches.txt")


def _known_mismatches():
    """Scenarios where stratad is known to differ from qsd: `name: reason` per line. Their
    stratad and compare halves are strict xfails: they are counted and listed, not hidden,
    and a scenario that starts to match fails the run until it is taken off the list."""
    known = {}
    if os.path.exists(KNOWN_FILE):
        with open(KNOWN_FILE) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    name, _, reason = line.partition(":")
                    known[name.strip()] = reason.strip()
    return known


def pytest_collection_modifyitems(config, items):
    known = _known_mismatches()
    for item in items:
        name = getattr(item, "originalname", item.name)
        if name in known and _side_of(item) in ("stratad", "compare"):
            item.add_marker(pytest.mark.xfail(strict=True, reason=known[name]))


def _stratad_path(config):
    p = config.getoption("--stratad") or os.environ.get("STRATAD")
    if p:
        return p if os.access(p, os.X_OK) else None
    tgt = os.environ.get("CARGO_TARGET_DIR") or os.path.join(e2elib.REPO, "target")
    p = os.path.join(tgt, "debug", "stratad")
    return p if os.access(p, os.X_OK) else None


def pytest_configure(config):
    daemons = [d.strip() for d in config.getoption("--daemons").split(",") if d.strip()]
    for d in daemons:
        if d not in ("qsd", "stratad"):
            raise pytest.UsageError(f"unknown daemon {d!r} in --daemons")
    qsd = config.getoption("--qsd") or os.environ.get("QSD") or shutil.which("qemu-storage-daemon")
    e2elib.HARNESS = e2elib.Harness(daemons, {"qsd": qsd, "stratad": _stratad_path(config)},
                                    config.getoption("--e2e-keep"))
    config._e2e_tally = {"passed": 0, "failed": 0, "skipped": 0, "side": {}}


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    variants = getattr(metafunc.function, "_e2e_variants", None)
    sides = e2elib.HARNESS.sides()
    cases, ids = [], []
    for v in (variants if variants else [None]):
        for s in sides:
            cases.append((v, s))
            ids.append(s if v is None else f"{v}-{s}")
    metafunc.parametrize("case", cases, ids=ids)


def _side_of(item_or_report):
    nodeid = item_or_report.nodeid
    if "[" not in nodeid:
        return None
    return nodeid.rsplit("[", 1)[1].rstrip("]").rsplit("-", 1)[-1]


def pytest_runtest_logreport(report):
    cfg = getattr(pytest_runtest_logreport, "config", None)
    tally = cfg._e2e_tally if cfg else None
    if tally is None:
        return
    side = _side_of(report)
    if side is None:
        return
    outcome = None
    if report.when == "call":
        outcome = report.outcome
    elif report.when == "setup" and report.outcome != "passed":
        outcome = report.outcome
    if outcome is None:
        return
    if getattr(report, "wasxfail", None) is not None and outcome == "skipped":
        outcome = "known"
    st = tally["side"].setdefault(side, {"passed": 0, "failed": 0, "skipped": 0, "known": 0})
    st[outcome] = st.get(outcome, 0) + 1


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    pytest_runtest_logreport.config = session.config


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tally = config._e2e_tally["side"]
    tr = terminalreporter
    tr.section("e2e compatibility summary")
    for side in ("qsd", "stratad"):
        if side in tally:
            st = tally[side]
            tr.write_line(f"{side}: {st['passed']} passed, {st['failed']} failed, "
                          f"{st['skipped']} skipped, {st.get('known', 0)} known mismatches")
    if "compare" in tally:
        st = tally["compare"]
        total = st["passed"] + st["failed"] + st["skipped"] + st.get("known", 0)
        tr.write_line(f"{st['passed']} scenarios match qsd / {total} total "
                      f"({st.get('known', 0)} known mismatches, see known_mismatches.txt)")


def pytest_sessionfinish(session, exitstatus):
    tally = session.config._e2e_tally["side"]
    if "compare" in tally:
        st = tally["compare"]
        if st["failed"] or st["skipped"]:
            # a skipped comparison (stratad missing) is not a match
            session.exitstatus = 1
    h = e2elib.HARNESS
    if h and not h.keep:
        for d in h.workdirs:
            e2elib.rmtree(d)
