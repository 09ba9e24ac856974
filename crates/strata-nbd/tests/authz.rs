//! `tls-authz`: the server checks the TLS peer's identity (X.509 subject DN as GnuTLS and
//! QEMU 10.0.2 print it, RDNs in the certificate's order, or the PSK username) against an authoriser, and drops refused clients.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef};
use strata_nbd::{
    Authorizer, AuthzList, AuthzRule, AuthzSimple, ClientOptions, Endpoint, ListenAddr,
    MatchFormat, NbdAddr, NbdClient, NbdServer, ServerOptions, TlsCreds,
};
use strata_testkit::{make_pki, run_in};

/// A client credentials directory whose certificate has the subject `/C=GB/O=Example/CN=alice`
/// (GnuTLS prints it `C=GB,O=Example,CN=alice`), signed by the test CA.
fn alice_dir(root: &Path) -> PathBuf {
    let work = root.join("pki");
    std::fs::write(work.join("alice.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run_in(
        &work,
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "alice-key.pem",
            "-out",
            "alice.csr",
            "-subj",
            "/C=GB/O=Example/CN=alice",
        ],
    );
    run_in(
        &work,
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "alice.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "alice-cert.pem",
            "-days",
            "2",
            "-extfile",
            "alice.ext",
        ],
    );
    let d = root.join("alice");
    std::fs::create_dir_all(&d).unwrap();
    for (from, to) in [
        ("ca-cert.pem", "ca-cert.pem"),
        ("alice-cert.pem", "client-cert.pem"),
        ("alice-key.pem", "client-key.pem"),
    ] {
        std::fs::copy(work.join(from), d.join(to)).unwrap();
    }
    d
}

async fn server(sock: &Path, creds: &TlsCreds, authz: Arc<dyn Authorizer>) -> Arc<NbdServer> {
    let hook = creds.server_hook_with_authz(Some(authz)).unwrap();
    let s = NbdServer::start_with_tls(
        ListenAddr::Unix(sock.to_path_buf()),
        ServerOptions::default(),
        Some(hook),
    )
    .await
    .unwrap();
    let mem = Arc::new(MemNode::with_data(vec![0x5a; 1 << 20]));
    s.add_export(export("exp", mem as NodeRef, false)).unwrap();
    s
}

/// Connects with `creds` and reads; `Ok` if the server let the client in.
async fn try_read(sock: &Path, creds: &TlsCreds) -> Result<(), String> {
    let opts = ClientOptions {
        tls: Some(creds.client_connector(Some("localhost")).unwrap()),
        ..Default::default()
    };
    let c = NbdClient::connect_with(&NbdAddr::Unix(sock.to_path_buf()), "exp", &opts)
        .await
        .map_err(|e| e.to_string())?;
    let r = c
        .read(0, IoBuf::zeroed(4096))
        .await
        .map_err(|e| e.to_string())?;
    assert!(r.iter().all(|&x| x == 0x5a));
    c.close().await.map_err(|e| e.to_string())
}

fn simple(identity: &str) -> Arc<dyn Authorizer> {
    Arc::new(AuthzSimple {
        identity: identity.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_identity_is_the_gnutls_dn() {
    if !have("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let alice = TlsCreds::load_x509(&alice_dir(dir.path()), Endpoint::Client, true).unwrap();
    let client = TlsCreds::load_x509(&pki.client, Endpoint::Client, true).unwrap();
    let screds = TlsCreds::load_x509(&pki.server, Endpoint::Server, true).unwrap();
    let sock = dir.path().join("nbd.sock");

    // authz-simple: exactly alice's DN, in the certificate's order (what qsd matches).
    let s = server(&sock, &screds, simple("C=GB,O=Example,CN=alice")).await;
    try_read(&sock, &alice).await.unwrap();
    assert!(try_read(&sock, &client).await.is_err(), "CN=client allowed");
    s.stop().await;

    // RFC 4514's reversed order is not the identity.
    let s = server(&sock, &screds, simple("CN=alice,O=Example,C=GB")).await;
    assert!(
        try_read(&sock, &alice).await.is_err(),
        "reversed DN allowed"
    );
    s.stop().await;

    // authz-list: a deny rule before a glob allow; default deny.
    let list = Arc::new(AuthzList {
        allow_by_default: false,
        rules: vec![
            AuthzRule {
                pattern: "CN=client".into(),
                allow: false,
                format: MatchFormat::Exact,
            },
            AuthzRule {
                pattern: "C=GB,O=Example,CN=*".into(),
                allow: true,
                format: MatchFormat::Glob,
            },
        ],
    });
    let s = server(&sock, &screds, list).await;
    try_read(&sock, &alice).await.unwrap();
    assert!(
        try_read(&sock, &client).await.is_err(),
        "denied CN=client allowed"
    );
    s.stop().await;

    // The plain client certificate's DN is just its CN.
    let s = server(&sock, &screds, simple("CN=client")).await;
    try_read(&sock, &client).await.unwrap();
    s.stop().await;
}

#[cfg(feature = "tls-psk")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_identity_is_the_username() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keys.psk"),
        "qemu:0123456789abcdef0123456789abcdef\nalice:fedcba9876543210fedcba9876543210\n",
    )
    .unwrap();
    let screds = TlsCreds::load_psk(dir.path(), Endpoint::Server, None).unwrap();
    let alice = TlsCreds::load_psk(dir.path(), Endpoint::Client, Some("alice")).unwrap();
    let qemu = TlsCreds::load_psk(dir.path(), Endpoint::Client, None).unwrap();
    let sock = dir.path().join("nbd.sock");
    let s = server(&sock, &screds, simple("alice")).await;
    try_read(&sock, &alice).await.unwrap();
    assert!(try_read(&sock, &qemu).await.is_err(), "user qemu allowed");
    s.stop().await;
}
