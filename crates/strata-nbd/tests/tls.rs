//! TLS: X.509 (rustls) and PSK (OpenSSL) between our client and server, with the QEMU tools
//! on either side, certificates made at test time with the `openssl` command; and the `nbd`
//! graph driver (TLS, error texts, reconnect).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags};
use strata_graph::Graph;
use strata_graph::blockdev::{Objects, blockdev_add};
use strata_nbd::{
    ClientOptions, Endpoint, ListenAddr, NbdAddr, NbdClient, NbdDriverFactory, NbdServer,
    ServerOptions, TlsCreds,
};
use strata_testkit::make_pki;

#[cfg(feature = "tls-psk")]
fn psk_dir(root: &Path) -> PathBuf {
    let d = root.join("psk");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("keys.psk"),
        "qemu:0123456789abcdef0123456789abcdef\nalice:fedcba9876543210fedcba9876543210\n",
    )
    .unwrap();
    d
}

async fn tls_server(sock: &Path, creds: &TlsCreds, node: NodeRef) -> Arc<NbdServer> {
    let hook = creds.server_hook().unwrap();
    let s = NbdServer::start_with_tls(
        ListenAddr::Unix(sock.to_path_buf()),
        ServerOptions::default(),
        Some(hook),
    )
    .await
    .unwrap();
    s.add_export(export("exp", node, true)).unwrap();
    s
}

fn tls_opts(creds: &TlsCreds, host: Option<&str>) -> ClientOptions {
    ClientOptions {
        tls: Some(creds.client_connector(host).unwrap()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_own_client_and_server() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let screds = TlsCreds::load_x509(&pki.server, Endpoint::Server, true).unwrap();
    let ccreds = TlsCreds::load_x509(&pki.client, Endpoint::Client, true).unwrap();
    let sock = dir.path().join("nbd.sock");
    let mem = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    let server = tls_server(&sock, &screds, mem.clone() as NodeRef).await;
    let addr = NbdAddr::Unix(sock.clone());

    let c = NbdClient::connect_with(&addr, "exp", &tls_opts(&ccreds, Some("localhost")))
        .await
        .unwrap();
    let mut b = IoBuf::zeroed(65536);
    b.fill(0x5a);
    c.write(4096, b, WriteFlags::default()).await.unwrap();
    let r = c.read(0, IoBuf::zeroed(128 * 1024)).await.unwrap();
    assert!(r[..4096].iter().all(|&x| x == 0));
    assert!(r[4096..4096 + 65536].iter().all(|&x| x == 0x5a));
    c.close().await.unwrap();

    // A plaintext client is told TLS is required.
    let e = NbdClient::connect(&addr, "exp").await.unwrap_err();
    assert!(
        e.to_string()
            .contains("TLS negotiation required before option"),
        "{e}"
    );

    // The server's certificate does not name this host.
    let e = NbdClient::connect_with(&addr, "exp", &tls_opts(&ccreds, Some("example.com")))
        .await
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // A Unix socket needs tls-hostname.
    let e = NbdClient::connect_with(&addr, "exp", &tls_opts(&ccreds, None))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("No hostname for certificate validation"),
        "{e}"
    );

    // verify-peer: a client without a certificate is refused ...
    let nocert = TlsCreds::load_x509(&pki.nocert, Endpoint::Client, true).unwrap();
    let r = NbdClient::connect_with(&addr, "exp", &tls_opts(&nocert, Some("localhost"))).await;
    assert!(r.is_err(), "client without certificate accepted");
    server.stop().await;

    // ... and accepted by a server with verify-peer=off.
    let screds = TlsCreds::load_x509(&pki.server, Endpoint::Server, false).unwrap();
    let server = tls_server(&sock, &screds, mem.clone() as NodeRef).await;
    let c = NbdClient::connect_with(&addr, "exp", &tls_opts(&nocert, Some("localhost")))
        .await
        .unwrap();
    let r = c.read(4096, IoBuf::zeroed(4096)).await.unwrap();
    assert!(r.iter().all(|&x| x == 0x5a));
    c.close().await.unwrap();
    server.stop().await;

    // TCP: the host name defaults to the address.
    let server = NbdServer::start_with_tls(
        ListenAddr::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        },
        ServerOptions::default(),
        Some(
            TlsCreds::load_x509(&pki.server, Endpoint::Server, true)
                .unwrap()
                .server_hook()
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    server
        .add_export(export("exp", mem.clone() as NodeRef, false))
        .unwrap();
    let ListenAddr::Tcp { port, .. } = server.local_addr().clone() else {
        unreachable!()
    };
    let tcp = NbdAddr::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let c = NbdClient::connect_with(&tcp, "exp", &tls_opts(&ccreds, Some("127.0.0.1")))
        .await
        .unwrap();
    assert_eq!(c.size(), 1 << 20);
    c.close().await.unwrap();
    server.stop().await;
}

#[test]
fn creds_errors_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = TlsCreds::load_x509(d, Endpoint::Server, true).unwrap_err();
    assert_eq!(
        e,
        format!(
            "Unable to access credentials {}/ca-cert.pem: No such file or directory",
            d.display()
        )
    );
    #[cfg(feature = "tls-psk")]
    {
        let props = json!({"endpoint": "server", "dir": d.to_str().unwrap()});
        let e = TlsCreds::from_object("tls-creds-psk", props.as_object().unwrap()).unwrap_err();
        assert_eq!(
            e,
            format!(
                "Unable to access credentials {}/keys.psk: No such file or directory",
                d.display()
            )
        );
    }
    let props = json!({"endpoint": "server"});
    let e = TlsCreds::from_object("tls-creds-x509", props.as_object().unwrap()).unwrap_err();
    assert_eq!(e, "Missing 'dir' property value");
    std::fs::write(d.join("ca-cert.pem"), "").unwrap();
    let e = TlsCreds::load_x509(d, Endpoint::Server, true).unwrap_err();
    assert_eq!(
        e,
        format!(
            "Unable to access credentials {}/server-cert.pem: No such file or directory",
            d.display()
        )
    );
}

#[cfg(feature = "tls-psk")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_own_client_and_server() {
    let dir = tempfile::tempdir().unwrap();
    let pd = psk_dir(dir.path());
    let screds = TlsCreds::load_psk(&pd, Endpoint::Server, None).unwrap();
    let sock = dir.path().join("nbd.sock");
    let mem = Arc::new(MemNode::with_data(vec![7; 1 << 20]));
    let server = tls_server(&sock, &screds, mem.clone() as NodeRef).await;
    let addr = NbdAddr::Unix(sock.clone());
    for user in [None, Some("alice")] {
        let ccreds = TlsCreds::load_psk(&pd, Endpoint::Client, user).unwrap();
        let c = NbdClient::connect_with(&addr, "exp", &tls_opts(&ccreds, None))
            .await
            .unwrap();
        let r = c.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(r.iter().all(|&x| x == 7));
        c.close().await.unwrap();
    }
    // A wrong key fails the handshake.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("keys.psk"),
        "qemu:00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    let ccreds = TlsCreds::load_psk(&bad, Endpoint::Client, None).unwrap();
    assert!(
        NbdClient::connect_with(&addr, "exp", &tls_opts(&ccreds, None))
            .await
            .is_err()
    );
    let bob = TlsCreds::load_psk(&pd, Endpoint::Client, Some("bob")).unwrap();
    let e = bob.client_connector(None).unwrap_err();
    assert_eq!(
        e,
        format!(
            "Username bob not found in PSK file {}/keys.psk",
            pd.display()
        )
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tools_against_our_tls_server() {
    if !have("openssl") || !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let screds = TlsCreds::load_x509(&pki.server, Endpoint::Server, true).unwrap();
    let sock = dir.path().join("nbd.sock");
    let mem = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    let server = tls_server(&sock, &screds, mem.clone() as NodeRef).await;
    let s = sock.to_str().unwrap();
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.client.display()
    );
    let img = format!(
        "driver=nbd,server.type=unix,server.path={s},export=exp,tls-creds=tls0,tls-hostname=localhost"
    );
    let (ok, out, err) = run(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &img],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("virtual size: 1 MiB"), "{out}");
    let (ok, out, err) = run(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &img,
            "-c",
            "write -P 0x33 0 64k",
            "-c",
            "read -P 0x33 0 64k",
        ],
    )
    .await;
    assert!(
        ok && !out.contains("fail") && !err.contains("fail"),
        "{out}{err}"
    );
    let r = mem.read(0, IoBuf::zeroed(65536)).await.unwrap();
    assert!(r.iter().all(|&x| x == 0x33));

    // Without a client certificate, verify-peer refuses qemu-img.
    let obj2 = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.nocert.display()
    );
    let (ok, _, _) = run(
        "qemu-img",
        &["info", "--object", &obj2, "--image-opts", &img],
    )
    .await;
    assert!(!ok, "qemu-img without a certificate got in");
    // Without TLS at all, qemu-img is told TLS is required.
    let plain = format!("driver=nbd,server.type=unix,server.path={s},export=exp");
    let (ok, _, err) = run("qemu-img", &["info", "--image-opts", &plain]).await;
    assert!(!ok);
    assert!(err.contains("TLS"), "{err}");
    server.stop().await;

    // PSK, qemu-io as the client.
    #[cfg(feature = "tls-psk")]
    {
        let pd = psk_dir(dir.path());
        let screds = TlsCreds::load_psk(&pd, Endpoint::Server, None).unwrap();
        let server = tls_server(&sock, &screds, mem.clone() as NodeRef).await;
        let obj = format!("tls-creds-psk,id=tls0,endpoint=client,dir={}", pd.display());
        let img = format!("driver=nbd,server.type=unix,server.path={s},export=exp,tls-creds=tls0");
        let (ok, out, err) = run(
            "qemu-io",
            &[
                "--object",
                &obj,
                "--image-opts",
                &img,
                "-c",
                "read -P 0x33 0 64k",
            ],
        )
        .await;
        assert!(
            ok && !out.contains("fail") && !err.contains("fail"),
            "{out}{err}"
        );
        server.stop().await;
    }
}

async fn wait_for(sock: &Path) {
    for _ in 0..200 {
        if sock.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} never appeared", sock.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_against_qemu_nbd_tls() {
    if !have("openssl") || !have("qemu-nbd") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let img = dir.path().join("disk.qcow2");
    let imgs = img.to_str().unwrap();
    let (ok, _, err) = run("qemu-img", &["create", "-f", "qcow2", imgs, "4M"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x42 1M 64k", imgs],
    )
    .await;
    assert!(ok, "{err}");
    #[allow(unused_mut)]
    let mut cases = vec![(
        format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={}",
            pki.server.display()
        ),
        TlsCreds::load_x509(&pki.client, Endpoint::Client, true).unwrap(),
    )];
    #[cfg(feature = "tls-psk")]
    {
        let pd = psk_dir(dir.path());
        cases.push((
            format!("tls-creds-psk,id=tls0,endpoint=server,dir={}", pd.display()),
            TlsCreds::load_psk(&pd, Endpoint::Client, None).unwrap(),
        ));
    }
    for (obj, creds) in cases {
        let sock = dir.path().join("qemu.sock");
        let _ = std::fs::remove_file(&sock);
        let _q = strata_testkit::qemu_nbd(
            &sock,
            "qcow2",
            Path::new(imgs),
            &["--object", &obj, "--tls-creds", "tls0"],
        );
        wait_for(&sock).await;
        let addr = NbdAddr::Unix(sock.clone());
        let c = NbdClient::connect_with(&addr, "", &tls_opts(&creds, Some("localhost")))
            .await
            .unwrap();
        assert_eq!(c.size(), 4 << 20);
        let r = c.read(1 << 20, IoBuf::zeroed(65536)).await.unwrap();
        assert!(r.iter().all(|&x| x == 0x42));
        c.close().await.unwrap();
        // qemu-nbd refuses a plaintext client.
        let e = NbdClient::connect(&addr, "").await.unwrap_err();
        assert!(e.to_string().contains("TLS negotiation required"), "{e}");
    }
}

fn objects_with(creds: Option<(&str, TlsCreds)>) -> Objects {
    let mut o = Objects::default();
    o.protocol_drivers
        .insert("nbd".into(), Arc::new(NbdDriverFactory));
    if let Some((id, c)) = creds {
        o.tls_creds.insert(id.into(), Arc::new(c));
    }
    o
}

fn opts(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_driver_tls_and_errors() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let sock = dir.path().join("nbd.sock");
    let screds = TlsCreds::load_x509(&pki.server, Endpoint::Server, true).unwrap();
    let mem = Arc::new(MemNode::with_data(vec![9; 1 << 20]));
    let server = tls_server(&sock, &screds, mem.clone() as NodeRef).await;
    let objects = objects_with(Some((
        "tls0",
        TlsCreds::load_x509(&pki.client, Endpoint::Client, true).unwrap(),
    )));
    let mut g = Graph::new();
    let s = sock.to_str().unwrap();
    let name = blockdev_add(
        &mut g,
        &objects,
        &opts(json!({"driver": "nbd", "node-name": "n0",
            "server": {"type": "unix", "path": s}, "export": "exp",
            "tls-creds": "tls0", "tls-hostname": "localhost"})),
    )
    .await
    .unwrap();
    let node = g.node(&name).unwrap().node.clone();
    assert_eq!(node.size(), 1 << 20);
    let r = node.read(0, IoBuf::zeroed(4096)).await.unwrap();
    assert!(r.iter().all(|&x| x == 9));

    let e = blockdev_add(
        &mut g,
        &objects,
        &opts(json!({"driver": "nbd", "node-name": "n1",
            "server": {"type": "unix", "path": "/nonexistent"}})),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e,
        "Failed to connect to '/nonexistent': No such file or directory"
    );
    let e = blockdev_add(
        &mut g,
        &objects,
        &opts(json!({"driver": "nbd", "node-name": "n1",
            "server": {"type": "unix", "path": s}, "tls-creds": "nope"})),
    )
    .await
    .unwrap_err();
    assert_eq!(e, "No TLS credentials with id 'nope'");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_driver_reconnects_and_open_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mem = Arc::new(MemNode::with_data(vec![3; 1 << 20]));
    let objects = objects_with(None);
    let s = sock.to_str().unwrap().to_string();

    // open-timeout: the server comes up after the first attempt.
    let mem2 = mem.clone();
    let sock2 = sock.clone();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let server = NbdServer::start(ListenAddr::Unix(sock2), ServerOptions::default())
            .await
            .unwrap();
        server
            .add_export(export("exp", mem2 as NodeRef, true))
            .unwrap();
        server
    });
    let mut g = Graph::new();
    let name = blockdev_add(
        &mut g,
        &objects,
        &opts(json!({"driver": "nbd", "node-name": "n0",
            "server": {"type": "unix", "path": s}, "export": "exp",
            "open-timeout": 5, "reconnect-delay": 5})),
    )
    .await
    .unwrap();
    let server = late.await.unwrap();
    let node = g.node(&name).unwrap().node.clone();
    let r = node.read(0, IoBuf::zeroed(4096)).await.unwrap();
    assert!(r.iter().all(|&x| x == 3));

    // The server goes away; a request made during the outage waits for it to come back.
    server.stop().await;
    drop(server);
    let mem3 = mem.clone();
    let sock3 = sock.clone();
    let back = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let server = NbdServer::start(ListenAddr::Unix(sock3), ServerOptions::default())
            .await
            .unwrap();
        server
            .add_export(export("exp", mem3 as NodeRef, true))
            .unwrap();
        server
    });
    let mut b = IoBuf::zeroed(4096);
    b.fill(0x77);
    node.write(8192, b, WriteFlags::default()).await.unwrap();
    let server = back.await.unwrap();
    let r = mem.read(8192, IoBuf::zeroed(4096)).await.unwrap();
    assert!(r.iter().all(|&x| x == 0x77));

    // With the server gone for longer than reconnect-delay, requests fail.
    server.stop().await;
    drop(server);
    let mut g2 = Graph::new();
    let name = {
        let server = NbdServer::start(ListenAddr::Unix(sock.clone()), ServerOptions::default())
            .await
            .unwrap();
        server
            .add_export(export("exp", mem.clone() as NodeRef, true))
            .unwrap();
        let n = blockdev_add(
            &mut g2,
            &objects,
            &opts(json!({"driver": "nbd", "node-name": "n1",
                "server": {"type": "unix", "path": s}, "export": "exp",
                "reconnect-delay": 1})),
        )
        .await
        .unwrap();
        server.stop().await;
        n
    };
    let node = g2.node(&name).unwrap().node.clone();
    let t = std::time::Instant::now();
    let e = node.read(0, IoBuf::zeroed(4096)).await.unwrap_err();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?} {e}"
    );
}
