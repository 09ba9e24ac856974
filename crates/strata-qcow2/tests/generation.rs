//! The generation of an image Strata writes (`strata_qcow2::identity`): moved once per
//! read-write session before the first guest write, durable with our autoclear bit, left
//! out when the header has no room, and ignored safely by QEMU.

mod common;
use common::*;

use strata_core::BlockNode;
use strata_qcow2::header::autoclear::STRATA_GENERATION_VALID;
use strata_qcow2::identity::{BackingRecord, Generation};
use strata_qcow2::{CreateOptions, Header};

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        ..CreateOptions::default()
    }
}

fn generation(h: &Header) -> (Option<Generation>, bool) {
    Generation::of(h)
}

#[tokio::test]
async fn one_bump_per_session_before_the_first_write() {
    let m = create_mem(&opts(4 << 20), None).await;
    let created = m.snapshot();
    // Opening read-write and closing without a write changes nothing.
    let q = open(&m, false, None, None).await;
    q.close_image().await.unwrap();
    assert_eq!(generation(&q.header()), (None, false));
    assert!(
        m.snapshot() == created,
        "an open without writes leaves the image as it was"
    );

    let q = open(&m, false, None, None).await;
    write(&q, 0, &[1; 4096]).await;
    write(&q, 65536, &[2; 4096]).await;
    q.close_image().await.unwrap();
    let h = strata_qcow2::read_header(&node(&m)).await.unwrap();
    let (g1, valid) = generation(&h);
    let g1 = g1.expect("a generation after a write");
    assert!(valid && h.autoclear_features & STRATA_GENERATION_VALID != 0);
    assert_eq!(g1.counter, 1, "one bump for the whole session");
    assert_ne!(g1.image_id, 0);

    // A new session: same image id, counter + 1; zero writes and discards count too.
    let q = open(&m, false, None, None).await;
    q.discard(0, 65536).await.unwrap();
    q.close_image().await.unwrap();
    let (g2, _) = generation(&q.header());
    assert_eq!(
        g2,
        Some(Generation {
            image_id: g1.image_id,
            counter: 2
        })
    );
    // Read-only opens never move it.
    let q = open(&m, true, None, None).await;
    assert_eq!(read(&q, 65536, 4096).await, vec![2; 4096]);
    assert_eq!(generation(&q.header()).0, g2);
}

#[tokio::test]
async fn v2_images_and_full_headers_get_none() {
    let m = create_mem(
        &CreateOptions {
            compat_v3: false,
            ..opts(1 << 20)
        },
        None,
    )
    .await;
    let q = open(&m, false, None, None).await;
    write(&q, 0, &[3; 512]).await;
    q.close_image().await.unwrap();
    assert_eq!(generation(&q.header()), (None, false));

    // 512-byte clusters and a backing name filling the header: the write still works.
    let name = "b".repeat(370);
    let m = create_mem(
        &CreateOptions {
            cluster_size: 512,
            backing_file: Some(name.clone()),
            backing_format: Some("qcow2".into()),
            ..opts(1 << 20)
        },
        None,
    )
    .await;
    let q = open(&m, false, None, None).await;
    write(&q, 0, &[4; 512]).await;
    q.close_image().await.unwrap();
    let h = q.header();
    assert_eq!(generation(&h), (None, false));
    assert_eq!(h.backing_file.as_deref(), Some(name.as_str()));
    assert_eq!(read(&q, 0, 512).await, vec![4; 512]);
}

#[tokio::test]
async fn set_backing_records_only_what_it_can_see() {
    let d = Dir::new();
    // A backing name that is not there: no record (and none kept from before).
    let m = create_mem(&opts(1 << 20), None).await;
    let q = open(&m, false, None, None).await;
    q.set_backing(Some(&d.s("missing.qcow2")), Some("qcow2"))
        .await
        .unwrap();
    assert_eq!(BackingRecord::of(&q.header()), None);
    // A raw file that is there: size and mtime.
    std::fs::write(d.path("base.raw"), vec![0u8; 1 << 20]).unwrap();
    q.set_backing(Some(&d.s("base.raw")), Some("raw"))
        .await
        .unwrap();
    let rec = BackingRecord::of(&q.header()).expect("a record");
    assert_eq!(rec.virtual_size, 1 << 20);
    // Removing the backing removes the record.
    q.set_backing(None, None).await.unwrap();
    assert_eq!(BackingRecord::of(&q.header()), None);
    q.close_image().await.unwrap();
}

#[tokio::test]
async fn qemu_ignores_the_extensions_and_clears_the_bit() {
    let d = Dir::new();
    let m = create_mem(&opts(1 << 20), None).await;
    std::fs::write(d.path("base.raw"), vec![0u8; 1 << 20]).unwrap();
    let q = open(&m, false, None, None).await;
    write(&q, 0, &[5; 65536]).await;
    q.set_backing(Some(&d.s("base.raw")), Some("raw"))
        .await
        .unwrap();
    q.close_image().await.unwrap();
    let img = d.path("top.qcow2");
    save(&m, &img);
    check_clean(&img);
    qemu_read_pattern(&img, &[], 5, 0, 65536);
    // qemu-io opens it read-write: the generation is then unknown, the extensions stay.
    ok(
        "qemu-io",
        &["-c", "write -P 6 64k 64k", img.to_str().unwrap()],
    );
    let after = load(&img);
    let h = strata_qcow2::read_header(&node(&after)).await.unwrap();
    let (g, valid) = generation(&h);
    assert!(g.is_some() && !valid, "bit cleared, extension kept");
    assert!(BackingRecord::of(&h).is_some());
    check_clean(&img);
}
