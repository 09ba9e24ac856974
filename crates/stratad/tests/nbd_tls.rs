//! stratad with TLS: `--object tls-creds-x509` + `--nbd-server ...,tls-creds=` used by
//! qemu-img/qemu-io, and `--blockdev driver=nbd,tls-creds=` against a TLS qemu-nbd.
//! Certificates are made with openssl(1); each test skips when a tool is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn have(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn sh(dir: &Path, cmd: &str, args: &[&str]) -> Output {
    let o = Command::new(cmd)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `server/` and `client/` credential directories under one CA.
fn make_pki(root: &Path) -> (PathBuf, PathBuf) {
    let w = root.join("pki");
    std::fs::create_dir_all(&w).unwrap();
    sh(
        &w,
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for (n, eku) in [("server", "serverAuth"), ("client", "clientAuth")] {
        std::fs::write(
            w.join(format!("{n}.ext")),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={eku}\nsubjectAltName=DNS:localhost\n"
            ),
        )
        .unwrap();
        sh(
            &w,
            "openssl",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{n}-key.pem"),
                "-out",
                &format!("{n}.csr"),
                "-subj",
                &format!("/CN={n}"),
            ],
        );
        sh(
            &w,
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &format!("{n}.csr"),
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &format!("{n}-cert.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{n}.ext"),
            ],
        );
    }
    let mut dirs = Vec::new();
    for n in ["server", "client"] {
        let d = root.join(n);
        std::fs::create_dir_all(&d).unwrap();
        for f in [
            "ca-cert.pem".to_string(),
            format!("{n}-cert.pem"),
            format!("{n}-key.pem"),
        ] {
            std::fs::copy(w.join(&f), d.join(&f)).unwrap();
        }
        dirs.push(d);
    }
    (dirs[0].clone(), dirs[1].clone())
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &str, args: &[&str], sock: &Path) -> Kill {
    let child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(sock.exists(), "{cmd} did not create {}", sock.display());
    Kill(child)
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
    let (srv, cli) = make_pki(d);
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "d.qcow2", "8M"],
    );
    sh(
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
    let o = sh(
        d,
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &opts],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("virtual size: 8 MiB"));
    let o = sh(
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
    sh(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    sh(
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
    sh(
        d,
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0x66 0 1M", &u],
    );
}
