//! stratad with TLS: `--object tls-creds-x509` + `--nbd-server ...,tls-creds=` used by
//! qemu-img/qemu-io, and `--blockdev driver=nbd,tls-creds=` against a TLS qemu-nbd.
//! Certificates are made with openssl(1); each test skips when a tool is missing.

use std::path::Path;
use std::process::{Command, Stdio};

use strata_testkit::{KillOnDrop, have, make_pki, run_in, wait_for_path};

fn spawn(cmd: &str, args: &[&str], sock: &Path) -> KillOnDrop {
    let child = KillOnDrop(
        Command::new(cmd)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_for_path(sock, 400),
        "{cmd} did not create {}",
        sock.display()
    );
    child
}

#[test]
fn tls_server_and_tls_blockdev() {
    if !["openssl", "qemu-img", "qemu-io", "qemu-nbd"]
        .iter()
        .all(|b| have(b))
    {
        eprintln!("SKIP: openssl or QEMU tools missing");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let pki = make_pki(d);
    let (srv, cli) = (pki.server, pki.client);
    run_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "d.qcow2", "8M"],
    );
    run_in(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x44 0 1M", "d.qcow2"],
    );
    let stratad = env!("CARGO_BIN_EXE_stratad");

    // Bad credentials fail at --object, with QEMU's text.
    let o = Command::new(stratad)
        .args([
            "--object",
            "tls-creds-x509,id=t,endpoint=server,dir=/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "stratad: --object tls-creds-x509,id=t,endpoint=server,dir=/nonexistent: \
         Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory\n"
    );

    // stratad serves over TLS; qemu-img and qemu-io connect with client certificates.
    let s = d.join("s.sock");
    let img = d.join("d.qcow2");
    let _daemon = spawn(
        stratad,
        &[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={}",
                srv.display()
            ),
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", img.display()),
            "--blockdev",
            "driver=qcow2,node-name=q,file=f",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={},tls-creds=tls0", s.display()),
            "--export",
            "nbd,id=e,node-name=q,name=disk,writable=on",
        ],
        &s,
    );
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        cli.display()
    );
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0,tls-hostname=localhost",
        s.display()
    );
    let o = run_in(
        d,
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &opts],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("virtual size: 8 MiB"));
    let o = run_in(
        d,
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-c",
            "read -P 0x44 0 1M",
            "-c",
            "write -P 0x55 1M 64k",
        ],
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("fail"));
    // Without TLS, qemu-img is refused.
    let plain = format!("nbd+unix:///disk?socket={}", s.display());
    let o = Command::new("qemu-img")
        .args(["info", &plain])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("TLS negotiation required"));

    // stratad as a TLS client of qemu-nbd, re-exported in plain text.
    run_in(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    run_in(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x66 0 1M", "r.raw"],
    );
    let q = d.join("q.sock");
    let _qemu = spawn(
        "qemu-nbd",
        &[
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={}",
                srv.display()
            ),
            "--tls-creds",
            "tls0",
            "-k",
            q.to_str().unwrap(),
            "-f",
            "raw",
            "--persistent",
            d.join("r.raw").to_str().unwrap(),
        ],
        &q,
    );
    let s2 = d.join("s2.sock");
    let _daemon2 = spawn(
        stratad,
        &[
            "--object",
            &format!("tls-creds-x509,id=t1,endpoint=client,dir={}", cli.display()),
            "--blockdev",
            &format!(
                "driver=nbd,node-name=n,server.type=unix,server.path={},tls-creds=t1,tls-hostname=localhost",
                q.display()
            ),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", s2.display()),
            "--export",
            "nbd,id=e,node-name=n",
        ],
        &s2,
    );
    let u = format!("nbd+unix:///n?socket={}", s2.display());
    run_in(
        d,
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0x66 0 1M", &u],
    );
}
