"""NBD server `tls-authz` with authz-simple / authz-list: allowed and denied TLS clients
(X.509 subject DN as GnuTLS prints it), and the object-add / nbd-server-start errors."""

import os
import shutil
import subprocess

import pytest

from e2elib import QEMU_IO, add_qcow2, scenario

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl(1)")

# GnuTLS prints the DN in the certificate's order, not RFC 4514's reversed one.
ALICE = "C=GB,O=Example,CN=alice"


def _openssl(cwd, *args):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _pki(root):
    """CA; server (CN localhost); clients alice (/C=GB/O=Example/CN=alice) and bob."""
    work = os.path.join(root, "pki")
    os.makedirs(work)
    _openssl(work, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem",
             "-out", "ca-cert.pem", "-days", "2", "-subj", "/CN=Authz Test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, subj, eku in [("server", "/CN=localhost", "serverAuth"),
                            ("alice", "/C=GB/O=Example/CN=alice", "clientAuth"),
                            ("bob", "/C=GB/O=Other/CN=bob", "clientAuth")]:
        with open(os.path.join(work, f"{name}.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={eku}\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl(work, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem",
                 "-out", f"{name}.csr", "-subj", subj)
        _openssl(work, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey",
                 "ca-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
                 "-extfile", f"{name}.ext")
    dirs = {}
    for name, side in [("server", "server"), ("alice", "client"), ("bob", "client")]:
        d = os.path.join(root, name)
        os.makedirs(d)
        shutil.copy(os.path.join(work, "ca-cert.pem"), d)
        shutil.copy(os.path.join(work, f"{name}-cert.pem"), os.path.join(d, f"{side}-cert.pem"))
        shutil.copy(os.path.join(work, f"{name}-key.pem"), os.path.join(d, f"{side}-key.pem"))
        dirs[name] = d
    return dirs


def _tls_read(run, creds_dir):
    """qemu-io as a TLS client: True if it could read the export's pattern."""
    opts = (f"driver=nbd,server.type=unix,server.path={run.path('nbd.sock')},export=disk,"
            "tls-creds=tls0,tls-hostname=localhost")
    p = run.sh([QEMU_IO, "--object", f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client",
                "-r", "--image-opts", opts, "-c", "read -P 0x5a 0 64k"], ok=False)
    out = p.stdout + p.stderr
    return p.returncode == 0 and "Pattern verification failed" not in out


def _serve(run, authz):
    args = {"addr": {"type": "unix", "data": {"path": run.path("nbd.sock")}},
            "tls-creds": "tls0"}
    if authz is not None:
        args["tls-authz"] = authz
    run.ok("nbd-server-start", args)
    run.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk"})


def _unserve(run):
    run.ok("block-export-del", {"id": "e0"})
    run.ok("nbd-server-stop")


@scenario
def test_nbd_tls_authz(run):
    dirs = _pki(run.dir)
    img = run.img("disk.qcow2", "4M")
    run.io(img, "write -P 0x5a 0 1M")
    run.start("--object", f"tls-creds-x509,id=tls0,dir={dirs['server']},endpoint=server,"
              "verify-peer=on")
    add_qcow2(run, "disk", img)

    # Bad authz objects.
    run.err("object-add", {"qom-type": "authz-simple", "id": "x"},
            desc="Parameter 'identity' is missing")
    run.err("object-add", {"qom-type": "authz-list", "id": "x", "policy": "bogus"},
            desc="Parameter 'policy' does not accept value 'bogus'")
    run.err("object-add", {"qom-type": "authz-list", "id": "x",
                           "rules": [{"match": "a", "policy": "allow", "format": "bad"}]},
            desc="Parameter 'format' does not accept value 'bad'")
    run.err("object-add", {"qom-type": "authz-list", "id": "x", "rules": [{"policy": "allow"}]},
            desc="Parameter 'rules[0].match' is missing")

    # authz-simple: only alice's DN (most specific RDN first).
    run.ok("object-add", {"qom-type": "authz-simple", "id": "only-alice", "identity": ALICE})
    _serve(run, "only-alice")
    run.rec("simple: alice reads", _tls_read(run, dirs["alice"]))
    run.rec("simple: bob reads", _tls_read(run, dirs["bob"]))
    run.check(_tls_read(run, dirs["alice"]), "alice denied by authz-simple")
    run.check(not _tls_read(run, dirs["bob"]), "bob allowed by authz-simple")
    _unserve(run)

    # authz-list: deny O=Other, allow the rest by glob; default deny.
    run.ok("object-add", {"qom-type": "authz-list", "id": "list", "policy": "deny",
                          "rules": [{"match": "*,O=Other,*", "policy": "deny", "format": "glob"},
                                    {"match": "C=GB,*", "policy": "allow", "format": "glob"}]})
    _serve(run, "list")
    run.rec("list: alice reads", _tls_read(run, dirs["alice"]))
    run.rec("list: bob reads", _tls_read(run, dirs["bob"]))
    run.check(not _tls_read(run, dirs["bob"]), "bob allowed by the authz-list deny rule")
    _unserve(run)

    # An id that names no authz object is accepted at start and denies every client.
    _serve(run, "no-such-authz")
    run.rec("missing authz: alice reads", _tls_read(run, dirs["alice"]))
    _unserve(run)

    # Without tls-authz everyone with a good certificate gets in.
    _serve(run, None)
    run.rec("no authz: bob reads", _tls_read(run, dirs["bob"]))
    _unserve(run)

    # tls-authz without tls-creds is accepted (and unused) by QEMU 10.0.
    run.qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": run.path("n2.sock")}},
                                 "tls-authz": "list"})
    run.qmp("nbd-server-stop")
    run.stop()
