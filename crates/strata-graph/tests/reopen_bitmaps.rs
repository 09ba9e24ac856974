//! Dirty bitmaps across a reopen, as qemu-storage-daemon 10.0.2 keeps them: a persistent
//! bitmap added while a qcow2 node is read-only is accepted, survives a reopen read-write and
//! is stored at close; closed read-only, it is lost and the image stays untouched.

use std::process::Command;

use serde_json::{Value, json};
use strata_core::NodeRef;
use strata_graph::blockdev::{Objects, blockdev_add, reopen};
use strata_graph::{Graph, driver_of};
use strata_qcow2::Qcow2;

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed");
    assert!(out.status.success(), "qemu-img {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn bitmap_names(img: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", img])).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| b["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn open_ro(g: &mut Graph, node: &str, img: &str) -> NodeRef {
    let o = json!({"driver": "qcow2", "node-name": node, "read-only": true,
                   "file": {"driver": "file", "filename": img}});
    blockdev_add(g, &Objects::default(), o.as_object().unwrap())
        .await
        .unwrap();
    g.node(node).unwrap().node.clone()
}

/// The node's live bitmaps, newest first (as `query-named-block-nodes` lists them).
fn live_names(node: &NodeRef) -> Vec<String> {
    node.dirty_bitmaps()
        .map(|s| s.info().into_iter().map(|b| b.name).collect())
        .unwrap_or_default()
}

fn qcow2(node: &NodeRef) -> NodeRef {
    driver_of(node)
}

#[tokio::test]
async fn persistent_bitmap_on_read_only_node() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.qcow2").display().to_string(),
        dir.path().join("b.qcow2").display().to_string(),
    );
    for img in [&a, &b] {
        qemu_img(&["create", "-q", "-f", "qcow2", img, "4M"]);
    }
    let mut g = Graph::new();

    // Reopened read-write: stored at close, newest first.
    let node = open_ro(&mut g, "a", &a).await;
    let d = qcow2(&node);
    let q = d.as_any().downcast_ref::<Qcow2>().unwrap();
    q.bitmap_add("x", None, true).unwrap();
    q.bitmap_add("y", None, true).unwrap();
    reopen(&mut g, "a", false).await.unwrap();
    let names = live_names(&node);
    assert_eq!(names, ["y", "x"]);
    g.remove_node("a").await.unwrap();
    assert_eq!(bitmap_names(&a), ["y", "x"]);

    // Closed read-only: accepted, not stored.
    let node = open_ro(&mut g, "b", &b).await;
    let d = qcow2(&node);
    let q = d.as_any().downcast_ref::<Qcow2>().unwrap();
    q.bitmap_add("p", None, true).unwrap();
    g.remove_node("b").await.unwrap();
    assert!(bitmap_names(&b).is_empty());
}
