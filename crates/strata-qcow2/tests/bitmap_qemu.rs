//! Persistent dirty bitmaps against QEMU 10: bitmaps Strata adds look like `qemu-img bitmap
//! --add`'s, writes are tracked bit for bit like QEMU's, close clears `in-use`, a bitmap
//! found `in-use` stays flagged and unstored, and merge/clear/enable/disable/remove agree
//! with `qemu-img bitmap`.

mod common;

use std::sync::Arc;

use common::*;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef, ZeroFlags};
use strata_qcow2::bitmap::directory;

/// `qemu-img info --output=json` without the fields that name or measure the file (the
/// layout of clusters may differ from QEMU's).
fn info(path: &str) -> String {
    ok("qemu-img", &["info", "--output=json", path])
        .lines()
        .filter(|l| {
            !l.contains("\"filename\"")
                && !l.contains("\"actual-size\"")
                && !l.starts_with("                \"virtual-size\"")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every bitmap's (name, dirty extents), read with our parser from a read-only open.
async fn all_bits(path: &std::path::Path) -> Vec<(String, Vec<(u64, u64)>)> {
    let m = load(path);
    let q = open(&m, true, None, None).await;
    let mut out = Vec::new();
    for b in q.bitmaps() {
        let d = q.bitmap_data(&b.name).await.unwrap();
        out.push((b.name, d.extents().collect()));
    }
    out
}

/// Set the in-use flag of bitmap `name` directly on disk.
async fn set_in_use(m: &Arc<MemNode>, name: &str) {
    let n: NodeRef = m.clone();
    let h = strata_qcow2::read_header(&n).await.unwrap();
    let ext = h.bitmaps.unwrap();
    let raw = n
        .read(
            ext.bitmap_directory_offset,
            IoBuf::zeroed(ext.bitmap_directory_size as usize),
        )
        .await
        .unwrap();
    let mut es = directory::parse(&raw, ext.nb_bitmaps, h.cluster_size(), h.size).unwrap();
    for e in es.iter_mut().filter(|e| e.name == name) {
        e.flags |= directory::FLAG_IN_USE;
    }
    let bytes = directory::serialize(&es, h.cluster_size(), h.size).unwrap();
    n.write(
        ext.bitmap_directory_offset,
        IoBuf::from_slice(&bytes),
        Default::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn added_bitmaps_match_qemu_img_bitmap_add() {
    let d = Dir::new();
    for f in ["s.qcow2", "q.qcow2"] {
        ok("qemu-img", &["create", "-q", "-f", "qcow2", &d.s(f), "64M"]);
    }
    let m = load(&d.path("s.qcow2"));
    let name = "n".repeat(1023);
    // One open per bitmap, as qemu-img runs.
    for (n, g, enabled) in [
        ("b0", None, true),
        ("b1", Some(128 << 10), false),
        (name.as_str(), Some(512), true),
    ] {
        let q = open(&m, false, None, None).await;
        q.bitmap_add(n, g, enabled).unwrap();
        q.close().await.unwrap();
    }
    save(&m, &d.path("s.qcow2"));
    let img = d.s("q.qcow2");
    ok("qemu-img", &["bitmap", "--add", &img, "b0"]);
    ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "128k", "--disable", &img, "b1"],
    );
    ok("qemu-img", &["bitmap", "--add", "-g", "512", &img, &name]);
    assert_eq!(info(&d.s("s.qcow2")), info(&img));
    check_clean(&d.path("s.qcow2"));
}

/// Bitmaps added in one session are stored newest first after the ones the image had, as
/// qemu-storage-daemon 10.0.2 stores them (`qemu-img info` lists `[pd, p]` when `p` was added
/// before `pd`).
#[tokio::test]
async fn one_session_stores_new_bitmaps_newest_first() {
    let d = Dir::new();
    let img = d.s("o.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
    ok("qemu-img", &["bitmap", "--add", &img, "old"]);
    let m = load(&d.path("o.qcow2"));
    let q = open(&m, false, None, None).await;
    q.bitmap_add("p", Some(65536), true).unwrap();
    q.bitmap_add("pd", None, false).unwrap();
    q.close().await.unwrap();
    save(&m, &d.path("o.qcow2"));
    let v: serde_json::Value = serde_json::from_str(&info(&img)).unwrap();
    let names: Vec<&str> = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["old", "pd", "p"]);
    check_clean(&d.path("o.qcow2"));
}

#[tokio::test]
async fn api_errors_use_qemu_texts() {
    let d = Dir::new();
    let img = d.s("e.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
    let m = load(&d.path("e.qcow2"));
    let q = open(&m, false, None, None).await;
    let e = |r: strata_core::Result<()>| r.unwrap_err().message().to_string();
    q.bitmap_add("a", None, true).unwrap();
    assert_eq!(e(q.bitmap_add("a", None, true)), "Bitmap already exists: a");
    assert_eq!(
        e(q.bitmap_add("", None, true)),
        "Bitmap name cannot be empty"
    );
    assert_eq!(
        e(q.bitmap_add("g", Some(3000), true)),
        "Granularity must be power of 2 and at least 512"
    );
    let long = e(q.bitmap_add(&"x".repeat(1024), None, true));
    assert!(
        long.starts_with(&format!(
            "Can't make bitmap '{}' persistent in '#block",
            "x".repeat(1024)
        )) && long.ends_with("': Name length exceeds maximum (1023 characters)"),
        "{long}"
    );
    assert_eq!(e(q.bitmap_clear("nope")), "Dirty bitmap 'nope' not found");
    assert_eq!(
        e(q.bitmap_remove("nope").await),
        "Dirty bitmap 'nope' not found"
    );
    assert_eq!(
        e(q.bitmap_merge("a", None, "nope").await),
        "Dirty bitmap 'nope' not found"
    );
    q.close().await.unwrap();
    let m = Arc::new(MemNode::with_data(m.snapshot()));
    let ro = open(&m, true, None, None).await;
    assert_eq!(
        e(ro.bitmap_clear("a")),
        "Bitmap 'a' is readonly and cannot be modified"
    );
}

#[tokio::test]
async fn writes_are_tracked_like_qemu_and_close_clears_in_use() {
    let d = Dir::new();
    for f in ["s.qcow2", "q.qcow2"] {
        let p = d.s(f);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", &p, "64M"]);
        ok("qemu-img", &["bitmap", "--add", &p, "on"]);
        ok("qemu-img", &["bitmap", "--add", "--disable", &p, "off"]);
        ok("qemu-img", &["bitmap", "--add", "-g", "512", &p, "fine"]);
    }
    ok(
        "qemu-io",
        &[
            "-c",
            "write 1000 3000",
            "-c",
            "write -z 5M 100k",
            "-c",
            "discard 9M 65536",
            "-c",
            "write -c 20M 64k",
            "-c",
            "write -z -u 30M 1M",
            "-c",
            "write 67107840 1024",
            &d.s("q.qcow2"),
        ],
    );
    let m = load(&d.path("s.qcow2"));
    let q = open(&m, false, None, None).await;
    let st = q.bitmaps();
    assert!(st.iter().all(|b| !b.in_use && b.count == Some(0)));
    write(&q, 1000, &[1u8; 3000]).await;
    q.write_zeroes(5 << 20, 100 << 10, ZeroFlags::default())
        .await
        .unwrap();
    q.discard(9 << 20, 65536).await.unwrap();
    q.write_compressed(20 << 20, IoBuf::from_slice(&pattern(3, 65536)))
        .await
        .unwrap();
    q.write_zeroes(
        30 << 20,
        1 << 20,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    write(&q, 67107840, &[2u8; 1024]).await;
    let st = q.bitmaps();
    assert_eq!(st[1].count, Some(0), "disabled bitmaps do not track");
    assert!(st[0].count.unwrap() > 0);
    q.close().await.unwrap();
    save(&m, &d.path("s.qcow2"));
    check_clean(&d.path("s.qcow2"));
    assert_eq!(info(&d.s("s.qcow2")), info(&d.s("q.qcow2")));
    assert!(!info(&d.s("s.qcow2")).contains("in-use"));
    let ours = all_bits(&d.path("s.qcow2")).await;
    assert_eq!(ours, all_bits(&d.path("q.qcow2")).await);
    assert_eq!(ours[0].1[0], (0, 65536));
    assert!(ours[1].1.is_empty());
}

#[tokio::test]
async fn in_use_on_open_stays_flagged_and_unstored() {
    let d = Dir::new();
    let p = d.s("u.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &p, "64M"]);
    ok("qemu-img", &["bitmap", "--add", &p, "good"]);
    ok("qemu-img", &["bitmap", "--add", &p, "bad"]);
    ok("qemu-io", &["-c", "write 0 64k", &p]);
    let m = load(&d.path("u.qcow2"));
    set_in_use(&m, "bad").await;
    let before = open(&m, true, None, None).await.format_info().bitmaps;
    let q = open(&m, false, None, None).await;
    let st = q.bitmaps();
    assert!(st[1].in_use && st[1].count.is_none());
    let msg = "Bitmap 'bad' is inconsistent and cannot be used\n\
               Try block-dirty-bitmap-remove to delete this bitmap from disk";
    assert_eq!(q.bitmap_clear("bad").unwrap_err().message(), msg);
    assert_eq!(q.bitmap_enable("bad").unwrap_err().message(), msg);
    assert_eq!(
        q.bitmap_merge("good", None, "bad")
            .await
            .unwrap_err()
            .message(),
        msg
    );
    assert_eq!(
        q.truncate(128 << 20, Default::default())
            .await
            .unwrap_err()
            .message(),
        msg
    );
    write(&q, 1 << 20, &[5u8; 4096]).await;
    q.close().await.unwrap();
    let after = q.format_info().bitmaps;
    assert_eq!(after[1], before[1], "the in-use entry is kept as it was");
    assert_eq!(
        after[1].flags,
        vec!["in-use".to_string(), "auto".to_string()]
    );
    assert_eq!(after[0].flags, vec!["auto".to_string()]);
    save(&m, &d.path("u.qcow2"));
    check_clean(&d.path("u.qcow2"));
    let bits = all_bits_consistent(&d.path("u.qcow2"), "good").await;
    assert_eq!(bits, vec![(0, 65536), (1 << 20, 65536)]);
    // Removing it works, like QEMU.
    let q = open(&m, false, None, None).await;
    q.bitmap_remove("bad").await.unwrap();
    q.close().await.unwrap();
    save(&m, &d.path("u.qcow2"));
    check_clean(&d.path("u.qcow2"));
    assert!(!info(&p).contains("\"bad\""));
}

async fn all_bits_consistent(path: &std::path::Path, name: &str) -> Vec<(u64, u64)> {
    let m = load(path);
    let q = open(&m, true, None, None).await;
    q.bitmap_data(name).await.unwrap().extents().collect()
}

#[tokio::test]
async fn operations_match_qemu_img_bitmap() {
    let d = Dir::new();
    for f in ["s.qcow2", "q.qcow2", "src.qcow2"] {
        let p = d.s(f);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", &p, "64M"]);
        ok("qemu-img", &["bitmap", "--add", &p, "a"]);
        ok("qemu-img", &["bitmap", "--add", "-g", "512", &p, "b"]);
        ok("qemu-img", &["bitmap", "--add", &p, "c"]);
        ok("qemu-io", &["-c", "write 0 1k", "-c", "write 10M 100k", &p]);
        ok("qemu-img", &["bitmap", "--disable", &p, "a"]);
        ok("qemu-io", &["-c", "write 30M 512", &p]);
    }
    ok("qemu-io", &["-c", "write 50M 1k", &d.s("src.qcow2")]);
    // qemu-img's way.
    let q = d.s("q.qcow2");
    let src = d.s("src.qcow2");
    ok(
        "qemu-img",
        &["bitmap", "--merge", "b", "--clear", "--disable", &q, "a"],
    );
    ok("qemu-img", &["bitmap", "--merge", "b", &q, "a"]);
    ok(
        "qemu-img",
        &["bitmap", "--merge", "b", "-b", &src, "-F", "qcow2", &q, "c"],
    );
    ok("qemu-img", &["bitmap", "--enable", "--remove", &q, "b"]);
    // Ours, through the API.
    let m = load(&d.path("s.qcow2"));
    let sm = load(&d.path("src.qcow2"));
    let sq = open(&sm, true, None, None).await;
    let s = open(&m, false, None, None).await;
    s.bitmap_merge("a", None, "b").await.unwrap();
    s.bitmap_clear("a").unwrap();
    s.bitmap_disable("a").unwrap();
    s.bitmap_merge("a", None, "b").await.unwrap();
    s.bitmap_merge("c", Some(&sq), "b").await.unwrap();
    s.bitmap_enable("b").unwrap();
    s.bitmap_remove("b").await.unwrap();
    s.close().await.unwrap();
    save(&m, &d.path("s.qcow2"));
    check_clean(&d.path("s.qcow2"));
    assert_eq!(info(&d.s("s.qcow2")), info(&q));
    let ours = all_bits(&d.path("s.qcow2")).await;
    assert_eq!(ours, all_bits(&d.path("q.qcow2")).await);
    assert_eq!(
        ours[0].1,
        vec![(0, 65536), (10 << 20, 2 << 16), (30 << 20, 65536)]
    );
}

#[tokio::test]
async fn resize_follows_qemu() {
    let d = Dir::new();
    for f in ["s.qcow2", "q.qcow2"] {
        let p = d.s(f);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", &p, "10M"]);
        ok("qemu-img", &["bitmap", "--add", "-g", "4k", &p, "a"]);
        ok("qemu-io", &["-c", "write 0 4k", "-c", "write 9M 1M", &p]);
    }
    ok("qemu-img", &["resize", &d.s("q.qcow2"), "100G"]);
    ok(
        "qemu-img",
        &["resize", "--shrink", &d.s("q.qcow2"), "9437696"],
    );
    let m = load(&d.path("s.qcow2"));
    let q = open(&m, false, None, None).await;
    q.truncate(100 << 30, Default::default()).await.unwrap();
    q.close().await.unwrap();
    let q = open(&m, false, None, None).await;
    q.truncate(9437696, Default::default()).await.unwrap();
    q.close().await.unwrap();
    save(&m, &d.path("s.qcow2"));
    check_clean(&d.path("s.qcow2"));
    assert_eq!(info(&d.s("s.qcow2")), info(&d.s("q.qcow2")));
    let ours = all_bits(&d.path("s.qcow2")).await;
    assert_eq!(ours, all_bits(&d.path("q.qcow2")).await);
    assert_eq!(ours[0].1, vec![(0, 4096), (9 << 20, 9437696 - (9 << 20))]);
}

#[tokio::test]
async fn hostile_bitmaps_fail_the_open_like_qemu() {
    let d = Dir::new();
    let p = d.s("h.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &p, "64M"]);
    ok("qemu-img", &["bitmap", "--add", &p, "a"]);
    let m = load(&d.path("h.qcow2"));
    let n: NodeRef = m.clone();
    let h = strata_qcow2::read_header(&n).await.unwrap();
    let ext = h.bitmaps.unwrap();
    let raw = n
        .read(ext.bitmap_directory_offset, IoBuf::zeroed(32))
        .await
        .unwrap();
    let table = u64::from_be_bytes(raw[..8].try_into().unwrap());
    // A reserved bit in the table entry.
    n.write(
        table,
        IoBuf::from_slice(&2u64.to_be_bytes()),
        Default::default(),
    )
    .await
    .unwrap();
    save(&m, &d.path("h.qcow2"));
    let (code, out) = run("qemu-img", &["info", &p]);
    assert_eq!(code, 1);
    for ro in [true, false] {
        let e = strata_qcow2::Qcow2::open(
            m.clone(),
            &strata_qcow2::OpenOptions {
                read_only: ro,
                ..Default::default()
            },
            None,
            None,
        )
        .await
        .unwrap_err();
        assert!(out.trim_end().ends_with(e.message()), "{out} vs {e}");
    }
    // A table size far beyond the limits: refused by the directory checks, no allocation.
    let mut dir = raw.to_vec();
    dir[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    n.write(
        ext.bitmap_directory_offset,
        IoBuf::from_slice(&dir),
        Default::default(),
    )
    .await
    .unwrap();
    let e = strata_qcow2::Qcow2::open(m.clone(), &Default::default(), None, None)
        .await
        .unwrap_err();
    assert_eq!(e.message(), "Bitmap 'a' doesn't satisfy the constraints");
}

#[tokio::test]
async fn live_set_holds_non_persistent_busy_and_frozen_bitmaps() {
    let d = Dir::new();
    let img = d.s("l.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
    ok("qemu-img", &["bitmap", "--add", &img, "p"]);
    let m = load(&d.path("l.qcow2"));
    let q = open(&m, false, None, None).await;
    let set = q.dirty_bitmaps().unwrap();
    assert!(Arc::ptr_eq(&set, &q.bitmap_set()));
    let e = |r: strata_core::Result<()>| r.unwrap_err().message().to_string();
    assert_eq!(
        e(q.check_bitmap_storable("disk0", "p", 65536)),
        "Bitmap already exists: p"
    );
    q.check_bitmap_storable("disk0", "new", 65536).unwrap();
    assert_eq!(
        e(q.check_bitmap_storable("disk0", "new", 256 << 30)),
        "Can't make bitmap 'new' persistent in 'disk0': Granularity exceeds maximum \
         (2147483648 bytes)"
    );
    // A non-persistent bitmap lives in the same set, records, and is never stored.
    set.add("tmp", 4096, false, false).unwrap();
    assert_eq!(
        e(q.check_bitmap_storable("disk0", "tmp", 65536)),
        "Bitmap already exists: tmp"
    );
    // Backup freezes `p`: the successor records, `p` is busy.
    set.create_successor("p").unwrap();
    write(&q, 1 << 20, &[1u8; 4096]).await;
    assert_eq!(
        e(q.bitmap_remove("p").await),
        "Bitmap 'p' is currently in use by another operation and cannot be used"
    );
    let i = set.info();
    assert_eq!(
        (i[0].name.as_str(), i[0].count, i[0].persistent),
        ("tmp", 4096, false)
    );
    assert_eq!((i[1].name.as_str(), i[1].count), ("p", 0));
    assert!(i[1].busy && i[1].recording && i[1].persistent);
    let st = q.bitmaps();
    assert_eq!(st[0].name, "p");
    assert!(!st[1].persistent && st[1].count == Some(4096));
    set.abdicate("p").unwrap();
    assert_eq!(set.get_info("p").unwrap().count, 65536);
    q.close().await.unwrap();
    save(&m, &d.path("l.qcow2"));
    check_clean(&d.path("l.qcow2"));
    let inf = info(&img);
    assert!(inf.contains("\"p\"") && !inf.contains("tmp") && !inf.contains("in-use"));
    assert_eq!(
        all_bits(&d.path("l.qcow2")).await,
        vec![("p".to_string(), vec![(1 << 20, 65536)])]
    );

    // A frozen bitmap stored at close keeps the successor's bits too.
    let q = open(&m, false, None, None).await;
    let set = q.dirty_bitmaps().unwrap();
    set.clear("p").unwrap();
    write(&q, 0, &[1u8; 512]).await;
    set.create_successor("p").unwrap();
    write(&q, 2 << 20, &[1u8; 512]).await;
    q.close().await.unwrap();
    save(&m, &d.path("l.qcow2"));
    check_clean(&d.path("l.qcow2"));
    assert_eq!(
        all_bits(&d.path("l.qcow2")).await,
        vec![("p".to_string(), vec![(0, 65536), (2 << 20, 65536)])]
    );

    // Read-only opens load the bits, read-only.
    let ro = open(&m, true, None, None).await;
    let rs = ro.dirty_bitmaps().unwrap();
    assert_eq!(rs.get_info("p").unwrap().count, 2 * 65536);
    assert_eq!(rs.is_read_only("p"), Some(true));
    assert_eq!(
        e(ro.bitmap_remove("p").await),
        "Bitmap 'p' is readonly and cannot be modified"
    );

    // The trait's removal deletes the stored copy at once.
    let q = open(&m, false, None, None).await;
    q.remove_stored_bitmap("p").await.unwrap();
    q.remove_stored_bitmap("not-stored").await.unwrap();
    q.dirty_bitmaps().unwrap().remove("p").unwrap();
    save(&m, &d.path("l.qcow2"));
    check_clean(&d.path("l.qcow2"));
    assert!(!info(&img).contains("\"p\""));
    q.close().await.unwrap();

    // v2 images cannot store bitmaps; the message names the node.
    let v2 = d.s("v2.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &v2,
            "1M",
        ],
    );
    let m2 = load(&d.path("v2.qcow2"));
    let q2 = open(&m2, false, None, None).await;
    assert_eq!(
        e(q2.check_bitmap_storable("q2", "b", 65536)),
        "Can't make bitmap 'b' persistent in 'q2': Cannot store dirty bitmaps in qcow2 v2 files"
    );
    // ... but non-persistent bitmaps work on them.
    q2.dirty_bitmaps()
        .unwrap()
        .add("b", 65536, false, false)
        .unwrap();
    write(&q2, 0, &[1u8; 512]).await;
    assert_eq!(q2.bitmaps()[0].count, Some(65536));
    q2.close().await.unwrap();
}
