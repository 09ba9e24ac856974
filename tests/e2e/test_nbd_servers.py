"""Several NBD servers in one daemon (a Strata extension, docs/EXTENSIONS.md): `x-id` on
`--nbd-server` / `nbd-server-start` / `nbd-server-stop` names a server besides the default
one, and `x-server` on an NBD export picks the server that serves it. The default server
keeps QEMU's behaviour and texts; qemu-storage-daemon refuses the extension members."""

import json
import os
import socket
import subprocess
import time

import pytest

import e2elib

MIB = 1 << 20


def _image(workdir, name, pattern):
    path = os.path.join(workdir, f"{name}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 8M", path],
                   check=True, stdout=subprocess.DEVNULL)
    return path


def _daemon(kind, workdir, extra):
    binary = e2elib.HARNESS.binaries.get(kind)
    if not binary:
        pytest.skip(f"{kind} binary not available")
    d = e2elib.Daemon(kind, binary, workdir, kind)
    d.start(extra)
    return d


def _read_pattern(uri, pattern, writable=False):
    """qemu-io reads the export and checks every byte is `pattern`."""
    out = subprocess.run(["qemu-io", "-f", "raw", *([] if writable else ["-r"]),
                          "-c", f"read -P {pattern} 0 8M", uri],
                         capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and "Pattern verification failed" not in out.stdout


def _exports(sock):
    out = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return sorted(e["export-name"] for e in json.loads(out)["exports"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _err(r):
    assert "error" in r, r
    return r["error"]["desc"]


def test_several_nbd_servers_in_one_stratad():
    workdir = e2elib.new_workdir("nbd-servers")
    e2elib.HARNESS.workdirs.append(workdir)
    a, b, c = (_image(workdir, n, p) for n, p in (("a", 1), ("b", 2), ("c", 3)))
    sa, sb = os.path.join(workdir, "a.sock"), os.path.join(workdir, "b.sock")
    d = _daemon("stratad", workdir, [
        "--blockdev", f"driver=qcow2,node-name=na,file.driver=file,file.filename={a}",
        "--blockdev", f"driver=qcow2,node-name=nb,file.driver=file,file.filename={b}",
        "--blockdev", f"driver=qcow2,node-name=nc,file.driver=file,file.filename={c}",
        "--nbd-server", f"addr.type=unix,addr.path={sa}",
        "--nbd-server", f"addr.type=unix,addr.path={sb},x-id=local",
        # One export name on two servers: each server has its own namespace.
        "--export", "type=nbd,id=ea,node-name=na,name=disk,writable=on",
        "--export", "type=nbd,id=eb,node-name=nb,name=disk,x-server=local",
    ])
    try:
        assert _exports(sa) == ["disk"] and _exports(sb) == ["disk"]
        assert _read_pattern(f"nbd+unix:///disk?socket={sa}", 1, writable=True)
        assert _read_pattern(f"nbd+unix:///disk?socket={sb}", 2)

        # A third server over TCP, started and filled over QMP.
        port = _free_port()
        r = d.execute("nbd-server-start", {"x-id": "tcp", "addr": {
            "type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
        assert r == {"return": {}}, r
        r = d.execute("block-export-add", {"type": "nbd", "id": "ec", "node-name": "nc",
                                           "name": "third", "x-server": "tcp"})
        assert r == {"return": {}}, r
        assert _read_pattern(f"nbd://127.0.0.1:{port}/third", 3)
        assert _exports(sa) == ["disk"], "an export reaches only its own server"

        # Errors: QEMU's texts for the default server, named ones for the others.
        assert _err(d.execute("nbd-server-start", {"addr": {
            "type": "unix", "data": {"path": sa + "2"}}})) == "NBD server already running"
        assert _err(d.execute("nbd-server-start", {"x-id": "local", "addr": {
            "type": "unix", "data": {"path": sb + "2"}}})) == "NBD server 'local' already running"
        assert _err(d.execute("block-export-add", {
            "type": "nbd", "id": "ex", "node-name": "nc", "x-server": "nope"})) \
            == "NBD server 'nope' not running"
        assert _err(d.execute("block-export-add", {
            "type": "nbd", "id": "ey", "node-name": "nb", "name": "disk", "x-server": "local"})) \
            == "NBD server already has export named 'disk'"
        assert _err(d.execute("nbd-server-stop", {"x-id": "nope"})) == "NBD server 'nope' not running"

        # Stopping one server closes its exports only.
        assert d.execute("nbd-server-stop", {"x-id": "local"}) == {"return": {}}
        deleted = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "eb" not in deleted:
            ev = d.pull_event(0.5)
            if ev and ev["event"] == "BLOCK_EXPORT_DELETED":
                deleted.append(ev["data"]["id"])
        assert deleted == ["eb"], deleted
        ids = sorted(e["id"] for e in d.execute("query-block-exports")["return"])
        assert ids == ["ea", "ec"], ids
        assert not os.path.exists(sb) or subprocess.run(
            ["nbdinfo", "--list", f"nbd+unix://?socket={sb}"], capture_output=True,
            timeout=30).returncode != 0
        assert _read_pattern(f"nbd+unix:///disk?socket={sa}", 1)
        assert _read_pattern(f"nbd://127.0.0.1:{port}/third", 3)

        # The default server stops as in QEMU, and the named one keeps serving.
        assert d.execute("nbd-server-stop") == {"return": {}}
        assert _err(d.execute("nbd-server-stop")) == "NBD server not running"
        assert _read_pattern(f"nbd://127.0.0.1:{port}/third", 3)
    finally:
        assert d.stop() == 0


def test_qsd_refuses_the_extension_members():
    workdir = e2elib.new_workdir("nbd-servers-qsd")
    e2elib.HARNESS.workdirs.append(workdir)
    a = _image(workdir, "a", 1)
    d = _daemon("qsd", workdir, [
        "--blockdev", f"driver=qcow2,node-name=na,file.driver=file,file.filename={a}"])
    try:
        sock = os.path.join(workdir, "a.sock")
        addr = {"type": "unix", "data": {"path": sock}}
        assert _err(d.execute("nbd-server-start", {"x-id": "x", "addr": addr})) \
            == "Parameter 'x-id' is unexpected"
        assert d.execute("nbd-server-start", {"addr": addr}) == {"return": {}}
        assert _err(d.execute("block-export-add", {
            "type": "nbd", "id": "e", "node-name": "na", "x-server": "x"})) \
            == "Parameter 'x-server' is unexpected"
        assert _err(d.execute("nbd-server-start", {"addr": addr})) == "NBD server already running"
    finally:
        d.stop()
