//! Image locks follow the graph's permissions, and QEMU's tools see them: a node holding an
//! image read-write keeps `qemu-img info` out unless it passes `-U`; reopening read-only
//! lets readers in; deleting the node lets everyone in; a second node on the same file in
//! this process conflicts as another process would.

use std::path::Path;
use std::process::Command;

use serde_json::{Map, Value, json};
use strata_graph::blockdev::{Objects, blockdev_add, blockdev_del, reopen};
use strata_graph::{Graph, ImageOptions, open_image};

fn qemu_img(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().expect("object").clone()
}

fn qcow2(name: &str, path: &str, extra: Value) -> Map<String, Value> {
    let mut o = obj(json!({
        "driver": "qcow2", "node-name": name,
        "file": {"driver": "file", "node-name": format!("{name}-file"), "filename": path},
    }));
    if let Value::Object(e) = extra {
        o.extend(e);
    }
    o
}

#[tokio::test]
async fn graph_locks_follow_permissions_and_qemu_sees_them() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let img = dir.join("a.qcow2");
    let path = img.to_str().unwrap();
    assert_eq!(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", path, "1M"]).0,
        0
    );
    let mut g = Graph::new();
    let objects = Objects::default();
    blockdev_add(&mut g, &objects, &qcow2("a", path, json!({})))
        .await
        .unwrap();

    let (code, err) = qemu_img(dir, &["info", path]);
    assert_eq!(code, 1);
    assert_eq!(
        err,
        format!(
            "qemu-img: Could not open '{path}': Failed to get shared \"write\" lock\n\
             Is another process using the image [{path}]?\n"
        )
    );
    assert_eq!(qemu_img(dir, &["info", "-U", path]).0, 0);

    // A second node on the same file conflicts like another process; nothing is left behind.
    let e = blockdev_add(&mut g, &objects, &qcow2("b", path, json!({})))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        format!("Failed to get \"write\" lock\nIs another process using the image [{path}]?")
    );
    assert!(g.node("b").is_none() && g.node("b-file").is_none());
    let e = blockdev_add(
        &mut g,
        &objects,
        &qcow2("b", path, json!({"read-only": true})),
    )
    .await
    .unwrap_err();
    assert!(
        e.starts_with("Failed to get shared \"write\" lock\n"),
        "{e}"
    );
    // ... unless it shares everything, or does not lock.
    let fs = json!({"read-only": true, "force-share": true});
    blockdev_add(&mut g, &objects, &qcow2("c", path, fs))
        .await
        .unwrap();
    let e = blockdev_add(
        &mut g,
        &objects,
        &qcow2("x", path, json!({"force-share": true})),
    )
    .await
    .unwrap_err();
    assert_eq!(e, "force-share=on can only be used with read-only images");
    let off = obj(json!({"driver": "qcow2", "node-name": "o",
        "file": {"driver": "file", "filename": path, "locking": "off"}}));
    blockdev_add(&mut g, &objects, &off).await.unwrap();
    blockdev_del(&mut g, "o").await.unwrap();
    blockdev_del(&mut g, "c").await.unwrap();

    // Read-only: readers may come; read-write again: they may not.
    reopen(&mut g, "a", true).await.unwrap();
    assert_eq!(qemu_img(dir, &["info", path]).0, 0);
    assert_ne!(qemu_img(dir, &["check", "-r", "all", path]).0, 0);
    reopen(&mut g, "a", false).await.unwrap();
    assert_eq!(qemu_img(dir, &["info", path]).0, 1);

    blockdev_del(&mut g, "a").await.unwrap();
    assert_eq!(qemu_img(dir, &["check", path]).0, 0);
}

#[tokio::test]
async fn the_image_tool_locks_like_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let img = dir.join("a.qcow2");
    let path = img.to_str().unwrap();
    assert_eq!(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", path, "1M"]).0,
        0
    );
    let rw = ImageOptions {
        format: Some("qcow2".into()),
        ..Default::default()
    };
    let image = open_image(path, &rw).await.unwrap();
    assert_eq!(qemu_img(dir, &["info", path]).0, 1);
    // A read-only open refuses too, unless it shares everything (-U).
    let ro = ImageOptions {
        read_only: true,
        ..rw.clone()
    };
    let e = open_image(path, &ro).await.unwrap_err();
    assert!(
        e.message()
            .starts_with("Failed to get shared \"write\" lock\n"),
        "{e}"
    );
    let shared = ImageOptions {
        force_share: true,
        ..ro
    };
    open_image(path, &shared).await.unwrap();
    image.node.close().await.unwrap();
    image.node.file().unwrap().close().await.unwrap();
    assert_eq!(qemu_img(dir, &["info", path]).0, 0);
}
