//! `blockdev-add` into a graph: option trees, implicit backing chains, error texts as
//! qemu-storage-daemon 10.0.2 gives them, reopen, and filters moved in and out under I/O.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags};
use strata_graph::blockdev::{Objects, blockdev_add, blockdev_del, reopen};
use strata_graph::drivers::throttle::{ThrottleGroup, ThrottleLimits};
use strata_graph::{EdgePerms, Graph, Link, Use, User};
use strata_testkit::{MIB, qcow2_image, qcow2_overlay, qemu_img, qemu_io};

fn obj(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// base (0x11 at 0) <- top (0x22 at 64k)
fn chain(dir: &Path) -> (String, String) {
    let base = qcow2_image(dir, "base.qcow2", 4 * MIB, None, &["write -P 0x11 0 64k"]);
    // A relative backing name, as QEMU records it.
    let top = qcow2_overlay(dir, "top.qcow2", Path::new("base.qcow2"));
    qemu_io(&top, "write -P 0x22 64k 64k");
    (base.display().to_string(), top.display().to_string())
}

async fn read(node: &NodeRef, off: u64, len: usize) -> Vec<u8> {
    node.read(off, IoBuf::zeroed(len)).await.unwrap().to_vec()
}

#[tokio::test]
async fn opens_a_chain_from_the_header_with_implicit_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, top) = chain(dir.path());
    let mut g = Graph::new();
    let objects = Objects::default();
    let opts = obj(
        json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": top}}),
    );
    assert_eq!(blockdev_add(&mut g, &objects, &opts).await.unwrap(), "top");
    assert_eq!(
        g.node_names().len(),
        4,
        "top, its file, the backing and its file"
    );
    let base = g.chain_below("top").unwrap();
    assert!(base.starts_with("#block"));
    assert!(g.node(&base).unwrap().read_only);
    let node: NodeRef = g.node("top").unwrap().node.clone();
    assert!(read(&node, 0, 65536).await.iter().all(|b| *b == 0x11));
    assert!(read(&node, 65536, 65536).await.iter().all(|b| *b == 0x22));

    // Errors as qemu-storage-daemon words them.
    let err = blockdev_add(&mut g, &objects, &opts).await.unwrap_err();
    assert_eq!(err, "Duplicate nodes with node-name='top'");
    let nope = dir.path().join("nope").display().to_string();
    let err = blockdev_add(
        &mut g,
        &objects,
        &obj(json!({"driver": "file", "node-name": "x", "filename": nope})),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err,
        format!("Could not open '{nope}': No such file or directory")
    );
    let err = blockdev_add(
        &mut g,
        &objects,
        &obj(json!({"driver": "qcow2", "node-name": "y", "file": "nosuch"})),
    )
    .await
    .unwrap_err();
    assert_eq!(err, "Cannot find device='nosuch' nor node-name='nosuch'");
    let err = blockdev_add(
        &mut g,
        &objects,
        &obj(json!({"driver": "raw", "file": "top"})),
    )
    .await
    .unwrap_err();
    assert_eq!(err, "'node-name' must be specified for the root node");
    assert_eq!(
        blockdev_del(&mut g, "base").await.unwrap_err(),
        "Failed to find node with node-name='base'"
    );
    assert_eq!(g.node_names().len(), 4, "failed adds leave nothing behind");

    blockdev_del(&mut g, "top").await.unwrap();
    assert!(
        g.node_names().is_empty(),
        "implicit nodes go with their parent"
    );
    qemu_img(&["check", "-q", &top]);
}

#[tokio::test]
async fn reopen_read_write_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = chain(dir.path());
    let mut g = Graph::new();
    let objects = Objects::default();
    let opts = obj(
        json!({"driver": "qcow2", "node-name": "base", "read-only": true,
        "file": {"driver": "file", "filename": base, "node-name": "base-file"}}),
    );
    blockdev_add(&mut g, &objects, &opts).await.unwrap();
    let node: NodeRef = g.node("base").unwrap().node.clone();
    let mut buf = IoBuf::zeroed(4096);
    buf.fill(0x33);
    assert!(node.write(0, buf, WriteFlags::default()).await.is_err());
    reopen(&mut g, "base", false).await.unwrap();
    assert!(!g.node("base-file").unwrap().read_only);
    let mut buf = IoBuf::zeroed(4096);
    buf.fill(0x33);
    node.write(0, buf, WriteFlags::default()).await.unwrap();
    reopen(&mut g, "base", true).await.unwrap();
    assert!(read(&node, 0, 4096).await.iter().all(|b| *b == 0x33));
    blockdev_del(&mut g, "base").await.unwrap();
    qemu_img(&["check", "-q", &base]);
}

#[tokio::test]
async fn a_filter_moves_in_and_out_under_a_concurrent_writer() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2").display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "8M"]);
    let mut g = Graph::new();
    let objects = Objects::default();
    blockdev_add(
        &mut g,
        &objects,
        &obj(json!({"driver": "qcow2", "node-name": "disk",
        "file": {"driver": "file", "filename": img}})),
    )
    .await
    .unwrap();
    // An export-like user writing through a link.
    let export = Link::new(g.node("disk").unwrap().node.clone());
    g.add_edge(
        User::Backend,
        "disk",
        "root",
        EdgePerms::Fixed(Use::ExportWrite.perms()),
        Some(export.clone()),
    )
    .unwrap();
    let model = Arc::new(parking_lot::Mutex::new(vec![0u8; 8 << 20]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let export = export.clone();
        let model = model.clone();
        let (stop, writes) = (stop.clone(), writes.clone());
        tokio::spawn(async move {
            let mut seed = 12345u64;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (seed >> 33) % ((8 << 20) / 4096) * 4096;
                let mut buf = IoBuf::zeroed(4096);
                buf.fill((i % 251) as u8 + 1);
                export.write(off, buf, WriteFlags::default()).await.unwrap();
                model.lock()[off as usize..off as usize + 4096].fill((i % 251) as u8 + 1);
                if i.is_multiple_of(50) {
                    export.flush().await.unwrap();
                }
            }
        })
    };
    // Raw, throttle and copy-on-read filters go in and out while the writer runs.
    let mut objects = objects;
    objects.throttle_groups.insert(
        "tg0".into(),
        ThrottleGroup::new(
            "tg0",
            ThrottleLimits::from_json(&json!({"iops-total": 2000})).unwrap(),
        ),
    );
    let filters = [
        json!({"driver": "raw", "node-name": "flt", "file": "disk"}),
        json!({"driver": "throttle", "node-name": "flt", "throttle-group": "tg0", "file": "disk"}),
        json!({"driver": "copy-on-read", "node-name": "flt", "file": "disk"}),
    ];
    for round in 0..6 {
        blockdev_add(&mut g, &objects, &obj(filters[round % 3].clone()))
            .await
            .unwrap();
        g.insert_filter("flt", "disk").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        g.remove_filter("flt").await.unwrap();
    }
    let during = writes.load(std::sync::atomic::Ordering::Relaxed);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        during > 50,
        "the writer ran while filters moved ({during} writes)"
    );
    let node: NodeRef = export.clone();
    let got = read(&node, 0, 8 << 20).await;
    assert!(
        got == *model.lock(),
        "content matches the model after filter moves"
    );
}
