//! NBD URIs as filenames: `info`, `map`, `compare`, `convert` (source and target) and
//! `check` against `qemu-nbd`, compared with qemu-img's output, and against our own server.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use strata_core::NodeRef;
use strata_nbd::{ExportConfig, ListenAddr, NbdServer, ServerOptions};
use strata_testkit::{have, qemu_nbd};

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

#[test]
fn nbd_uris_against_qemu_nbd() {
    if !have_qemu() || !have("qemu-nbd") {
        return;
    }
    let t = tmp();
    let d = t.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu_io(
        d,
        "qcow2",
        "a.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -z 1M 64k",
            "write -P 0x22 2M 4k",
        ],
    );
    std::fs::copy(d.join("a.qcow2"), d.join("b.qcow2")).unwrap();
    std::fs::copy(d.join("a.qcow2"), d.join("ref.qcow2")).unwrap();
    qemu_ok(d, &["create", "-q", "-f", "raw", "t.raw", "4M"]);

    // The guest view of a.qcow2, and b.qcow2's bytes as they are (qcow2 over NBD).
    let s1 = d.join("s1");
    let s2 = d.join("s2");
    let s3 = d.join("s3");
    let _a = qemu_nbd(&s1, "qcow2", Path::new(&p(d, "a.qcow2")), &[]);
    let _b = qemu_nbd(&s2, "raw", Path::new(&p(d, "b.qcow2")), &[]);
    let _t = qemu_nbd(&s3, "raw", Path::new(&p(d, "t.raw")), &[]);
    let (u1, u2, u3) = (uri(&s1), uri(&s2), uri(&s3));

    same(d, &["info", &u1]);
    same(d, &["info", "--output=json", &u1]);
    same(d, &["info", "-f", "qcow2", &u2]);
    same(d, &["info", "-f", "qcow2", "--output=json", &u2]);
    same(d, &["map", &u1]);
    same(d, &["map", "--output=json", &u1]);
    same(d, &["map", "-f", "qcow2", "--output=json", &u2]);
    same(d, &["check", "-f", "qcow2", &u2]);
    same(d, &["check", &u1]);
    same(
        d,
        &["compare", "-f", "raw", "-F", "qcow2", &u1, "ref.qcow2"],
    );
    same(d, &["compare", &u1, "ref.qcow2"]);
    // A missing export, as qemu-img says it.
    let missing = format!("nbd+unix:///nope?socket={}", s1.display());
    same(d, &["info", &missing]);

    // convert: from NBD to a file, and from a file onto an export (with and without -n).
    strata_ok(d, &["convert", "-O", "qcow2", &u1, "out.qcow2"]);
    assert_eq!(qemu_compare(d, "out.qcow2", "ref.qcow2"), 0);
    strata_ok(d, &["convert", "-O", "raw", "ref.qcow2", &u3]);
    strata_ok(d, &["compare", "-F", "qcow2", &u3, "ref.qcow2"]);
    strata_ok(d, &["convert", "-n", "-O", "raw", "out.qcow2", &u3]);
    assert_eq!(strata(d, &["compare", &u3, "out.qcow2"]).code, 0);
    let r = strata(d, &["convert", "-O", "qcow2", "ref.qcow2", &u3]);
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn nbd_uris_against_our_server() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu_io(d, "qcow2", "a.qcow2", &["write -P 0x5a 64k 128k"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sock = d.join("ours.sock");
    let server = rt.block_on(async {
        let img = strata_graph::open_image(
            &p(d, "a.qcow2"),
            &strata_graph::ImageOptions {
                read_only: false,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let s = NbdServer::start(ListenAddr::Unix(sock.clone()), ServerOptions::default())
            .await
            .unwrap();
        s.add_export(ExportConfig {
            name: "disk".into(),
            description: None,
            node: img.node as NodeRef,
            writable: true,
            bitmaps: Vec::new(),
            allocation_depth: false,
            multi_conn: true,
        })
        .unwrap();
        s
    });
    let u = format!("nbd+unix:///disk?socket={}", sock.display());
    let r = strata_ok(d, &["info", &u]);
    assert!(r.stdout.contains("virtual size: 4 MiB"), "{r:?}");
    let q = qemu_ok(d, &["map", "--output=json", &u]);
    let s = strata_ok(d, &["map", "--output=json", &u]);
    assert_eq!(s.stdout, q.stdout);
    strata_ok(d, &["convert", "-O", "raw", &u, "copy.raw"]);
    // The export is writable: write a copy back over it.
    qemu_io(d, "raw", "copy.raw", &["write -P 0x66 1M 64k"]);
    strata_ok(d, &["convert", "-n", "-O", "raw", "copy.raw", &u]);
    assert_eq!(strata(d, &["compare", "-F", "raw", &u, "copy.raw"]).code, 0);
    rt.block_on(server.stop());
    drop(Arc::clone(&server));
}
