//! Lazy refcounts and the dirty bit, the corrupt bit, unknown features, hostile metadata,
//! concurrent allocation, resize — checked against QEMU where it has an opinion.

mod common;

use std::sync::Arc;

use common::*;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, ErrorKind, IoBuf, NodeRef, Prealloc, WriteFlags};
use strata_qcow2::header::{autoclear, incompat};
use strata_qcow2::{CreateOptions, OpenOptions, Qcow2};

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        ..Default::default()
    }
}

#[tokio::test]
async fn lazy_refcounts_dirty_bit_and_repair() {
    let d = Dir::new();
    let o = CreateOptions {
        lazy_refcounts: true,
        ..opts(8 << 20)
    };
    let m = create_mem(&o, None).await;
    let q = open(&m, false, None, None).await;
    write(&q, 0, &pattern(1, 200_000)).await;
    assert!(q.header().is_dirty(), "first write sets the dirty bit");
    q.flush().await.unwrap();
    // "Crash": take the bytes without closing.
    let crashed = Arc::new(MemNode::with_data(m.snapshot()));
    assert!(
        strata_qcow2::read_header(&(crashed.clone() as NodeRef))
            .await
            .unwrap()
            .is_dirty()
    );
    q.close().await.unwrap();
    assert!(!q.header().is_dirty(), "close clears the dirty bit");
    save(&m, &d.path("clean.qcow2"));
    check_clean(&d.path("clean.qcow2"));

    // Read-only open of a dirty image works; read-write open repairs it first.
    let ro = open(&crashed, true, None, None).await;
    assert_eq!(read(&ro, 0, 200_000).await, pattern(1, 200_000));
    let rw = open(&crashed, false, None, None).await;
    assert!(!rw.header().is_dirty());
    write(&rw, 1 << 20, &pattern(2, 70_000)).await;
    rw.close().await.unwrap();
    save(&crashed, &d.path("repaired.qcow2"));
    check_clean(&d.path("repaired.qcow2"));
    qemu_read_pattern(&d.path("repaired.qcow2"), &[], 0, 2 << 20, 1 << 20);
}

#[tokio::test]
async fn write_over_metadata_marks_the_image_corrupt() {
    let d = Dir::new();
    let m = create_mem(&opts(4 << 20), None).await;
    {
        let q = open(&m, false, None, None).await;
        write(&q, 0, &[1u8; 512]).await;
        q.close().await.unwrap();
    }
    // Point guest cluster 0's L2 entry at the L1 table (cluster 3).
    let mut bytes = m.snapshot();
    let l2 =
        u64::from_be_bytes(bytes[0x30000..0x30008].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    let e: u64 = (1 << 63) | 0x30000;
    bytes[l2 as usize..l2 as usize + 8].copy_from_slice(&e.to_be_bytes());
    let m = Arc::new(MemNode::with_data(bytes));
    let q = open(&m, false, None, None).await;
    let err = q
        .write(0, IoBuf::zeroed(512), WriteFlags::default())
        .await
        .unwrap_err();
    assert!(err.message().contains("Marking image as corrupt"), "{err}");
    assert!(q.header().is_corrupt());
    assert!(
        q.write(1 << 20, IoBuf::zeroed(512), WriteFlags::default())
            .await
            .is_err()
    );
    save(&m, &d.path("c.qcow2"));
    let info = ok("qemu-img", &["info", "--output=json", &d.s("c.qcow2")]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
    let e = Qcow2::open(m.clone(), &OpenOptions::default(), None, None)
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        "qcow2: Image is corrupt; cannot be opened read/write"
    );
    let (code, qemu) = run("qemu-io", &["-c", "read 0 512", &d.s("c.qcow2")]);
    assert_ne!(code, 0);
    assert!(qemu.contains(e.message()), "{qemu}");
    // Read-only still works.
    let ro = open(&m, true, None, None).await;
    assert_eq!(read(&ro, 1 << 20, 4).await, vec![0; 4]);
}

#[tokio::test]
async fn unknown_features() {
    let d = Dir::new();
    let m = create_mem(&opts(1 << 20), None).await;
    let mut bytes = m.snapshot();
    // Unknown incompatible bit 40 plus the known "extended L2" bit named by the table.
    let bits = (1u64 << 40) | (1 << 9);
    bytes[72..80].copy_from_slice(&bits.to_be_bytes());
    std::fs::write(d.path("f.qcow2"), &bytes).unwrap();
    let e = Qcow2::open(
        Arc::new(MemNode::with_data(bytes)),
        &OpenOptions::default(),
        None,
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let (_, qemu) = run("qemu-img", &["info", &d.s("f.qcow2")]);
    assert!(qemu.contains(e.message()), "ours: {e}\nqemu: {qemu}");

    // Unknown autoclear bits are cleared on a read-write open, kept on read-only.
    let mut bytes = m.snapshot();
    bytes[88..96].copy_from_slice(&(1u64 << 20).to_be_bytes());
    let m2 = Arc::new(MemNode::with_data(bytes));
    let ro = open(&m2, true, None, None).await;
    assert_eq!(ro.header().autoclear_features, 1 << 20);
    let rw = open(&m2, false, None, None).await;
    assert_eq!(rw.header().autoclear_features & !autoclear::MASK, 0);
    let on_disk = strata_qcow2::read_header(&(m2.clone() as NodeRef))
        .await
        .unwrap();
    assert_eq!(on_disk.autoclear_features, 0);
    assert_eq!(on_disk.incompatible_features & incompat::DIRTY, 0);
}

#[tokio::test]
async fn hostile_metadata_never_panics() {
    let m = create_mem(&opts(64 << 20), None).await;
    {
        let q = open(&m, false, None, None).await;
        write(&q, 0, &pattern(3, 300_000)).await;
        q.close().await.unwrap();
    }
    let good = m.snapshot();
    let mut x: u64 = 12345;
    for round in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..6 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Hit the metadata clusters (header .. first L2) most of the time.
            let span = if round % 3 == 0 { bytes.len() } else { 0x50000 };
            let i = (x % span as u64) as usize;
            bytes[i] ^= (x >> 40) as u8 | 1;
        }
        let m = Arc::new(MemNode::with_data(bytes));
        let Ok(q) = Qcow2::open(m, &OpenOptions::default(), None, None).await else {
            continue;
        };
        let _ = q.read(0, IoBuf::zeroed(1 << 20)).await;
        let _ = q.block_status(0, q.size()).await;
        let _ = q
            .write(4096, IoBuf::zeroed(70_000), WriteFlags::default())
            .await;
        let _ = q
            .write(40 << 20, IoBuf::zeroed(4096), WriteFlags::default())
            .await;
        let _ = q.discard(0, 1 << 20).await;
        let _ = q.flush().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_to_one_cluster_all_land() {
    let d = Dir::new();
    let m = create_mem(&opts(8 << 20), None).await;
    let q = open(&m, false, None, None).await;
    let mut tasks = Vec::new();
    // 16 writers share each unallocated cluster: only one may allocate it.
    for k in 0..64u64 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let off = (k / 16) * 65536 + (k % 16) * 4096;
            let data = vec![k as u8 + 1; 4096];
            q.write(off, IoBuf::from_slice(&data), WriteFlags::default())
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for k in 0..64u64 {
        let off = (k / 16) * 65536 + (k % 16) * 4096;
        assert_eq!(
            read(&q, off, 4096).await,
            vec![k as u8 + 1; 4096],
            "writer {k}"
        );
    }
    q.close().await.unwrap();
    save(&m, &d.path("cc.qcow2"));
    check_clean(&d.path("cc.qcow2"));
    // Each guest cluster got exactly one host cluster (the check above finds no leak, so no
    // writer allocated a second one). Which host cluster depends on who won the race.
    let map = ok("qemu-img", &["map", "--output=json", &d.s("cc.qcow2")]);
    let extents: Vec<serde_json::Value> = serde_json::from_str(&map).expect("map json");
    let mut hosts: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    hosts.sort_unstable();
    let covered: u64 = hosts.iter().map(|h| h.1).sum();
    assert_eq!((hosts[0].0, covered), (0, 4 * 65536), "{map}");
}

#[tokio::test]
async fn resize_grow_and_shrink() {
    let d = Dir::new();
    // 512-byte clusters: growing to 64 MiB needs a much larger L1 and more refcount blocks.
    let o = CreateOptions {
        cluster_size: 512,
        ..opts(1 << 20)
    };
    let m = create_mem(&o, None).await;
    let q = open(&m, false, None, None).await;
    write(&q, 0, &pattern(9, 1 << 20)).await;
    q.truncate(64 << 20, Prealloc::Off).await.unwrap();
    write(&q, 60 << 20, &pattern(10, 3 << 20)).await;
    q.truncate(62 << 20, Prealloc::Off).await.unwrap();
    q.truncate(63 << 20, Prealloc::Metadata).await.unwrap();
    assert_eq!(q.size(), 63 << 20);
    let mut model = vec![0u8; 63 << 20];
    model[..1 << 20].copy_from_slice(&pattern(9, 1 << 20));
    model[60 << 20..62 << 20].copy_from_slice(&pattern(10, 3 << 20)[..2 << 20]);
    assert!(read(&q, 0, 63 << 20).await == model);
    assert!(q.truncate(1000, Prealloc::Off).await.is_err());
    q.close().await.unwrap();
    save(&m, &d.path("r.qcow2"));
    check_clean(&d.path("r.qcow2"));
    ok(
        "qemu-img",
        &["convert", "-O", "raw", &d.s("r.qcow2"), &d.s("r.raw")],
    );
    assert!(std::fs::read(d.path("r.raw")).unwrap() == model);

    // Shrinking frees the clusters and the file gets shorter.
    let m = create_mem(&opts(16 << 20), None).await;
    let q = open(&m, false, None, None).await;
    write(&q, 0, &pattern(11, 16 << 20)).await;
    q.flush().await.unwrap();
    let before = m.snapshot().len();
    q.truncate(4 << 20, Prealloc::Off).await.unwrap();
    q.close().await.unwrap();
    assert!(m.snapshot().len() < before / 2);
    save(&m, &d.path("s.qcow2"));
    check_clean(&d.path("s.qcow2"));
    ok(
        "qemu-img",
        &["convert", "-O", "raw", &d.s("s.qcow2"), &d.s("s.raw")],
    );
    assert!(std::fs::read(d.path("s.raw")).unwrap() == pattern(11, 16 << 20)[..4 << 20]);
    let info = ok("qemu-img", &["info", "--output=json", &d.s("s.qcow2")]);
    assert!(info.contains("\"virtual-size\": 4194304"), "{info}");
}

#[tokio::test]
async fn bitmaps_are_in_use_while_open_and_stored_on_close() {
    let d = Dir::new();
    let img = d.s("b.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "4M"]);
    ok("qemu-img", &["bitmap", "--add", "-g", "128k", &img, "on"]);
    ok("qemu-img", &["bitmap", "--add", "--disable", &img, "off"]);
    let m = load(&d.path("b.qcow2"));
    let ro = open(&m, true, None, None).await;
    let b = ro.format_info().bitmaps;
    assert_eq!(b.len(), 2);
    assert_eq!((b[0].name.as_str(), b[0].granularity), ("on", 128 << 10));
    assert_eq!(b[0].flags, vec!["auto".to_string()]);
    assert!(b[1].flags.is_empty());
    let rw = open(&m, false, None, None).await;
    // On disk, while open read-write: in use (QEMU marks every loaded bitmap).
    let b = rw.format_info().bitmaps;
    assert_eq!(b[0].flags, vec!["in-use".to_string(), "auto".to_string()]);
    assert_eq!(b[1].flags, vec!["in-use".to_string()]);
    write(&rw, 0, &[7u8; 4096]).await;
    rw.close().await.unwrap();
    let b = rw.format_info().bitmaps;
    assert_eq!(b[0].flags, vec!["auto".to_string()]);
    assert!(b[1].flags.is_empty());
    save(&m, &d.path("b.qcow2"));
    let info = ok("qemu-img", &["info", "--output=json", &img]);
    assert!(!info.contains("\"in-use\""), "{info}");
    let (code, out) = run("qemu-img", &["check", &img]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn set_backing_rewrites_the_header_like_rebase_unsafe() {
    let d = Dir::new();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", &d.s("new.raw"), "1M"],
    );
    let m = create_mem(&opts(1 << 20), None).await;
    let q = open(&m, false, None, None).await;
    q.set_backing(Some("new.raw"), Some("raw")).await.unwrap();
    let h = q.header();
    assert_eq!(h.backing_file.as_deref(), Some("new.raw"));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    q.close().await.unwrap();
    save(&m, &d.path("o.qcow2"));
    // Same bytes as `qemu-img rebase -u` on an identical image.
    let m2 = create_mem(&opts(1 << 20), None).await;
    save(&m2, &d.path("q.qcow2"));
    ok(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "new.raw",
            "-F",
            "raw",
            &d.s("q.qcow2"),
        ],
    );
    assert!(std::fs::read(d.path("o.qcow2")).unwrap() == std::fs::read(d.path("q.qcow2")).unwrap());
    check_clean(&d.path("o.qcow2"));
    let q = open(&m, false, None, None).await;
    q.set_backing(None, None).await.unwrap();
    assert_eq!(q.header().backing_file, None);
    let long = "x".repeat(2000);
    assert!(q.set_backing(Some(&long), None).await.is_err());
    q.close().await.unwrap();
    save(&m, &d.path("o.qcow2"));
    let info = ok("qemu-img", &["info", &d.s("o.qcow2")]);
    assert!(!info.contains("backing file"), "{info}");
}

/// Not a benchmark: a smoke check that sequential I/O has no quadratic cost.
#[tokio::test]
#[ignore]
async fn sequential_throughput_smoke() {
    let m = create_mem(&opts(1 << 30), None).await;
    let q = open(&m, false, None, None).await;
    let t = std::time::Instant::now();
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..256u64 {
        write(&q, i << 20, &chunk).await;
    }
    q.flush().await.unwrap();
    let w = t.elapsed();
    let t = std::time::Instant::now();
    for i in 0..256u64 {
        assert_eq!(read(&q, i << 20, 1 << 20).await[7], 0x5a);
    }
    eprintln!("write 256 MiB: {w:?}, read: {:?}", t.elapsed());
}

#[tokio::test]
async fn refcount_table_grows() {
    let d = Dir::new();
    // 512-byte clusters with 64-bit refcounts: one refcount table cluster covers 2 MiB.
    let o = CreateOptions {
        cluster_size: 512,
        refcount_bits: 64,
        ..opts(16 << 20)
    };
    let m = create_mem(&o, None).await;
    let q = open(&m, false, None, None).await;
    let before = q.header().refcount_table_offset;
    let data = pattern(5, 6 << 20);
    write(&q, 0, &data).await;
    write(&q, 10 << 20, &data[..1 << 20]).await;
    let h = q.header();
    assert_ne!(h.refcount_table_offset, before, "the refcount table moved");
    assert!(h.refcount_table_clusters > 1);
    assert!(read(&q, 0, 6 << 20).await == data);
    q.close().await.unwrap();
    save(&m, &d.path("g.qcow2"));
    check_clean(&d.path("g.qcow2"));
    ok(
        "qemu-img",
        &["convert", "-O", "raw", &d.s("g.qcow2"), &d.s("g.raw")],
    );
    let raw = std::fs::read(d.path("g.raw")).unwrap();
    assert!(raw[..6 << 20] == data[..] && raw[10 << 20..11 << 20] == data[..1 << 20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mixed_io_with_tiny_caches() {
    let d = Dir::new();
    for (i, (cs, bits)) in [(512u64, 64u32), (4096, 16), (65536, 1)]
        .into_iter()
        .enumerate()
    {
        let o = CreateOptions {
            cluster_size: cs,
            refcount_bits: bits,
            ..opts(4 << 20)
        };
        let m = create_mem(&o, None).await;
        let q = Qcow2::open(
            m.clone(),
            &OpenOptions {
                read_only: false,
                l2_cache_size: Some(1),
                refcount_cache_size: Some(1),
            },
            None,
            None,
        )
        .await
        .unwrap();
        // 8 tasks own interleaved 3000-byte slots (slots share clusters).
        const SLOT: u64 = 3000;
        let slots = (4 << 20) / SLOT;
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                let mut k = t;
                let mut n = 0u64;
                while k < slots {
                    let data = pattern(k * 31 + 7, SLOT as usize);
                    q.write(k * SLOT, IoBuf::from_slice(&data), WriteFlags::default())
                        .await
                        .unwrap();
                    let back = q
                        .read(k * SLOT, IoBuf::zeroed(SLOT as usize))
                        .await
                        .unwrap();
                    assert!(back[..] == data[..]);
                    n += 1;
                    if n.is_multiple_of(50) {
                        q.flush().await.unwrap();
                    }
                    k += 8 * (1 + (k % 3));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Every slot written by any task still holds its data.
        let mut model = vec![0u8; 4 << 20];
        for t in 0..8u64 {
            let mut k = t;
            while k < slots {
                let a = (k * SLOT) as usize;
                model[a..a + SLOT as usize].copy_from_slice(&pattern(k * 31 + 7, SLOT as usize));
                k += 8 * (1 + (k % 3));
            }
        }
        assert!(read(&q, 0, 4 << 20).await == model, "case {i}");
        q.close().await.unwrap();
        let p = d.path(&format!("mix{i}.qcow2"));
        save(&m, &p);
        check_clean(&p);
    }
}

#[tokio::test]
async fn saturated_refcount_block_fails_fast() {
    let m = create_mem(&opts(64 << 20), None).await;
    let mut bytes = m.snapshot();
    // Every refcount of the first block claims "in use", far past the end of the file.
    bytes[0x20000..0x30000].fill(0xff);
    let m = Arc::new(MemNode::with_data(bytes));
    let q = open(&m, false, None, None).await;
    let t = std::time::Instant::now();
    let e = q
        .write(0, IoBuf::zeroed(4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn snapshot_info_matches_qemu_img_info() {
    let d = Dir::new();
    let img = d.s("sn.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "1M"]);
    ok("qemu-img", &["snapshot", "-c", "first", &img]);
    ok("qemu-io", &["-c", "write -P 3 0 64k", &img]);
    ok("qemu-img", &["snapshot", "-c", "second", &img]);
    let info: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", &img])).unwrap();
    let m = load(&d.path("sn.qcow2"));
    let q = open(&m, true, None, None).await;
    let fi = q.format_info();
    assert_eq!(fi.compat, "1.1");
    assert_eq!(fi.refcount_bits, 16);
    let want = info["snapshots"].as_array().unwrap();
    assert_eq!(fi.snapshots.len(), want.len());
    for (s, w) in fi.snapshots.iter().zip(want) {
        assert_eq!(s.id, w["id"].as_str().unwrap());
        assert_eq!(s.name, w["name"].as_str().unwrap());
        assert_eq!(u64::from(s.date_sec), w["date-sec"].as_u64().unwrap());
        assert_eq!(u64::from(s.date_nsec), w["date-nsec"].as_u64().unwrap());
        assert_eq!(s.vm_state_size, w["vm-state-size"].as_u64().unwrap());
        assert_eq!(s.icount.unwrap_or(0), w["icount"].as_u64().unwrap_or(0));
    }
    let spec = &info["format-specific"]["data"];
    assert_eq!(spec["compat"], "1.1");
    assert_eq!(spec["compression-type"], fi.compression_type.as_str());
    assert_eq!(spec["lazy-refcounts"], fi.lazy_refcounts);
    assert_eq!(spec["extended-l2"], fi.extended_l2);
    assert_eq!(spec["corrupt"], fi.corrupt);
}
