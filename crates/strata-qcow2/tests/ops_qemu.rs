//! The image-level operations through the library API (images in memory, checked with
//! `qemu-img`): internal snapshots, `make_empty`, `amend`.

mod common;

use common::*;
use strata_qcow2::{AmendOptions, CreateOptions};

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        ..Default::default()
    }
}

/// Save the image and require `qemu-img check` to pass.
fn saved_clean(d: &Dir, m: &strata_core::mem::MemNode, name: &str) -> std::path::PathBuf {
    let p = d.path(name);
    save(m, &p);
    check_clean(&p);
    p
}

#[tokio::test]
async fn snapshot_roundtrip_through_api() {
    let d = Dir::new();
    let m = create_mem(&opts(8 << 20), None).await;
    let q = open(&m, false, None, None).await;
    let a = pattern(1, 1 << 20);
    write(&q, 0, &a).await;
    q.snapshot_create("one").await.unwrap();
    assert_eq!(q.format_info().snapshots.len(), 1);
    let b = pattern(2, 256 << 10);
    write(&q, 0, &b).await;
    q.snapshot_create("two").await.unwrap();
    q.snapshot_apply("one").await.unwrap();
    assert_eq!(read(&q, 0, 1 << 20).await, a);
    // Writes after the apply copy shared clusters instead of changing them.
    write(&q, 4096, &pattern(3, 4096)).await;
    q.snapshot_apply("2").await.unwrap();
    let got = read(&q, 0, 1 << 20).await;
    assert_eq!(&got[..256 << 10], &b[..]);
    assert_eq!(&got[256 << 10..], &a[256 << 10..]);
    let e = q.snapshot_delete("nope").await.unwrap_err();
    assert_eq!(e.to_string(), "snapshot not found");
    q.snapshot_delete("one").await.unwrap();
    q.close_image().await.unwrap();
    let p = saved_clean(&d, &m, "s.qcow2");
    let l = ok("qemu-img", &["snapshot", "-l", p.to_str().unwrap()]);
    assert!(l.contains("two") && !l.contains("one"), "{l}");
    // The remaining snapshot, applied by QEMU, holds the data at its creation.
    ok("qemu-img", &["snapshot", "-a", "two", p.to_str().unwrap()]);
    let raw = d.path("s.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            p.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&raw).unwrap()[..1 << 20] == got[..],
        "snapshot two differs"
    );
}

#[tokio::test]
async fn make_empty_paths() {
    let d = Dir::new();
    for with_snapshot in [false, true] {
        let m = create_mem(&opts(8 << 20), None).await;
        let q = open(&m, false, None, None).await;
        write(&q, 0, &pattern(1, 2 << 20)).await;
        if with_snapshot {
            q.snapshot_create("s").await.unwrap();
        }
        write(&q, 4 << 20, &pattern(2, 1 << 20)).await;
        q.make_empty().await.unwrap();
        assert_eq!(read(&q, 0, 8 << 20).await, vec![0; 8 << 20]);
        // Still usable afterwards.
        write(&q, 1 << 20, &pattern(3, 65536)).await;
        q.close_image().await.unwrap();
        let p = saved_clean(&d, &m, "e.qcow2");
        let map = ok("qemu-img", &["map", "--output=json", p.to_str().unwrap()]);
        assert_eq!(map.matches("\"data\": true").count(), 1, "{map}");
        if with_snapshot {
            ok("qemu-img", &["snapshot", "-a", "s", p.to_str().unwrap()]);
            check_clean(&p);
        }
    }
}

#[tokio::test]
async fn amend_refcount_width_and_compat() {
    let d = Dir::new();
    let m = create_mem(&opts(8 << 20), None).await;
    let q = open(&m, false, None, None).await;
    let a = pattern(4, 3 << 20);
    write(&q, 0, &a).await;
    q.snapshot_create("s").await.unwrap();
    for bits in [4, 64, 2, 16] {
        q.amend(&AmendOptions {
            refcount_bits: Some(bits),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(q.format_info().refcount_bits, bits);
        // Allocation keeps working with the new width.
        write(&q, 4 << 20, &pattern(u64::from(bits), 65536)).await;
    }
    q.amend(&AmendOptions {
        compat_v3: Some(false),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(q.format_info().compat, "0.10");
    let e = q
        .amend(&AmendOptions {
            lazy_refcounts: Some(true),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        e.to_string().starts_with("Lazy refcounts only supported"),
        "{e}"
    );
    assert_eq!(read(&q, 0, 3 << 20).await, a);
    q.close_image().await.unwrap();
    let p = saved_clean(&d, &m, "a.qcow2");
    let info = ok("qemu-img", &["info", p.to_str().unwrap()]);
    assert!(info.contains("compat: 0.10"), "{info}");
}
