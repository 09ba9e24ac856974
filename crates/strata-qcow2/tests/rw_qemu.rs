//! Interop: images QEMU writes read back exactly through `Qcow2`, and images `Qcow2` writes
//! pass `qemu-img check` and read back exactly through QEMU (`qemu-img convert` to raw).

mod common;

use std::sync::Arc;

use common::*;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef, Prealloc, ZeroFlags};
use strata_qcow2::{CompressionType, CreateOptions, Qcow2};

/// The guest content of an image according to QEMU.
fn qemu_raw(d: &Dir, img: &str, name: &str) -> Vec<u8> {
    let out = d.s(name);
    ok("qemu-img", &["convert", "-O", "raw", img, &out]);
    std::fs::read(out).unwrap()
}

async fn read_all(q: &Qcow2) -> Vec<u8> {
    let size = q.size() as usize;
    let mut out = Vec::with_capacity(size);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(3 << 20);
        out.extend(read(q, pos as u64, n).await);
        pos += n;
    }
    out
}

#[tokio::test]
async fn qemu_written_images_read_back() {
    let d = Dir::new();
    struct Case {
        opts: &'static str,
        cluster: u64,
        data_file: bool,
    }
    let cases = [
        Case {
            opts: "cluster_size=65536",
            cluster: 65536,
            data_file: false,
        },
        Case {
            opts: "compat=0.10",
            cluster: 65536,
            data_file: false,
        },
        Case {
            opts: "cluster_size=512",
            cluster: 512,
            data_file: false,
        },
        Case {
            opts: "cluster_size=2M",
            cluster: 2 << 20,
            data_file: false,
        },
        Case {
            opts: "extended_l2=on",
            cluster: 65536,
            data_file: false,
        },
        Case {
            opts: "extended_l2=on,cluster_size=16k",
            cluster: 16384,
            data_file: false,
        },
        Case {
            opts: "refcount_bits=1",
            cluster: 65536,
            data_file: false,
        },
        Case {
            opts: "refcount_bits=64,cluster_size=4k",
            cluster: 4096,
            data_file: false,
        },
        Case {
            opts: "compression_type=zstd",
            cluster: 65536,
            data_file: false,
        },
        Case {
            opts: "lazy_refcounts=on",
            cluster: 65536,
            data_file: false,
        },
        Case {
            opts: "data_file=DATA",
            cluster: 65536,
            data_file: true,
        },
        Case {
            opts: "data_file=DATA,data_file_raw=on",
            cluster: 65536,
            data_file: true,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let img = d.s(&format!("img{i}.qcow2"));
        let data = d.s(&format!("img{i}.data"));
        let opts = c.opts.replace("DATA", &data);
        let size = if c.cluster > 65536 { "32M" } else { "8M" };
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opts, &img, size],
        );
        let cs = c.cluster;
        let mut cmds = vec![
            "write -P 0x11 0 100k".to_string(),
            format!("write -P 0x22 {} 3000", 3 * cs + 100),
            format!("write -z {} {}", 4 * cs, 2 * cs),
            "write -P 0x44 5M 1M".to_string(),
            format!("write -z -u {} {}", 8 * cs, cs),
            format!("write -P 0x45 {} 8k", (6 << 20) + 4096),
        ];
        if !c.data_file {
            // QEMU compresses only into unallocated clusters.
            let at: u64 = if cs > 1 << 20 { 14 << 20 } else { 7 << 20 };
            cmds.push(format!("write -c -P 0x33 {} {}", at, cs));
            cmds.push(format!("write -c -P 0x34 {} {}", at + cs, cs));
        }
        cmds.push("discard 64k 64k".to_string());
        let mut args = Vec::new();
        for c in &cmds {
            args.push("-c");
            args.push(c.as_str());
        }
        args.push(&img);
        ok("qemu-io", &args);
        if !c.data_file && !opts.contains("0.10") && !opts.contains("refcount_bits=1") {
            ok("qemu-img", &["snapshot", "-c", "snap1", &img]);
            ok("qemu-io", &["-c", "write -P 0x55 0 4k", &img]);
        }
        let want = qemu_raw(&d, &img, &format!("img{i}.raw"));
        let m = load(&d.path(&format!("img{i}.qcow2")));
        let df: Option<NodeRef> = c
            .data_file
            .then(|| load(&d.path(&format!("img{i}.data"))) as NodeRef);
        let q = open(&m, true, None, df).await;
        let got = read_all(&q).await;
        assert_eq!(got.len(), want.len());
        if let Some(p) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("case {i} ({opts}): first difference at {p:#x}");
        }
        // Block status agrees with the content: zero runs read as zero.
        let mut pos = 0;
        while pos < q.size() {
            let e = q.block_status(pos, q.size() - pos).await.unwrap();
            assert!(e.len > 0);
            if e.status.zero {
                assert!(
                    want[pos as usize..(pos + e.len) as usize]
                        .iter()
                        .all(|&b| b == 0)
                );
            }
            pos += e.len;
        }
    }
}

/// A model-checked sequence of writes through our node, verified by QEMU.
async fn exercise(q: &Qcow2, model: &mut [u8], cs: u64, seed: u64) {
    let size = model.len() as u64;
    let ops: Vec<(u64, u64)> = vec![
        (0, 4096),
        (cs - 100, 300),
        (3 * cs + 7, 2 * cs + 11),
        (size - 5000, 5000),
        (size / 2, cs),
        (100, 2),
    ];
    for (k, (off, len)) in ops.into_iter().enumerate() {
        let data = pattern(seed + k as u64, len as usize);
        write(q, off, &data).await;
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    // Overwrite in place, zero, discard.
    let data = pattern(seed + 99, 1000);
    write(q, 3 * cs + 500, &data).await;
    model[(3 * cs + 500) as usize..(3 * cs + 1500) as usize].copy_from_slice(&data);
    q.write_zeroes(
        cs,
        2 * cs,
        ZeroFlags {
            may_unmap: true,
            no_fallback: false,
        },
    )
    .await
    .unwrap();
    model[cs as usize..(3 * cs) as usize].fill(0);
    q.write_zeroes(3 * cs + 10, 20, ZeroFlags::default())
        .await
        .unwrap();
    model[(3 * cs + 10) as usize..(3 * cs + 30) as usize].fill(0);
    q.flush().await.unwrap();
    let got = {
        let mut v = vec![];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(1 << 20);
            v.extend(read(q, pos, n as usize).await);
            pos += n;
        }
        v
    };
    assert!(got == model, "read-back through Qcow2 differs");
}

#[tokio::test]
async fn our_writes_pass_qemu_check_and_read_back() {
    let d = Dir::new();
    let base = CreateOptions {
        size: 6 << 20,
        ..Default::default()
    };
    let cases = vec![
        base.clone(),
        CreateOptions {
            cluster_size: 512,
            ..base.clone()
        },
        CreateOptions {
            cluster_size: 4096,
            refcount_bits: 1,
            ..base.clone()
        },
        CreateOptions {
            cluster_size: 2 << 20,
            size: 24 << 20,
            ..base.clone()
        },
        CreateOptions {
            refcount_bits: 64,
            ..base.clone()
        },
        CreateOptions {
            extended_l2: true,
            ..base.clone()
        },
        CreateOptions {
            extended_l2: true,
            cluster_size: 16384,
            ..base.clone()
        },
        CreateOptions {
            lazy_refcounts: true,
            ..base.clone()
        },
        CreateOptions {
            compat_v3: false,
            ..base.clone()
        },
        CreateOptions {
            compression_type: CompressionType::Zstd,
            ..base.clone()
        },
        CreateOptions {
            preallocation: Prealloc::Metadata,
            ..base.clone()
        },
        CreateOptions {
            preallocation: Prealloc::Full,
            cluster_size: 4096,
            ..base.clone()
        },
    ];
    for (i, o) in cases.iter().enumerate() {
        let m = create_mem(o, None).await;
        let q = open(&m, false, None, None).await;
        let mut model = vec![0u8; o.size as usize];
        exercise(&q, &mut model, o.cluster_size, i as u64 * 1000).await;
        q.close().await.unwrap();
        let p = d.path(&format!("ours{i}.qcow2"));
        save(&m, &p);
        check_clean(&p);
        let want = qemu_raw(&d, p.to_str().unwrap(), &format!("ours{i}.raw"));
        assert!(want == model, "case {i}: QEMU reads different data");
    }
}

#[tokio::test]
async fn overlay_on_qemu_backing_file() {
    let d = Dir::new();
    for (i, extra) in ["", "extended_l2=on", "compat=0.10"].iter().enumerate() {
        let bpath = d.s(&format!("base{i}.qcow2"));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", &bpath, "4M"]);
        ok("qemu-io", &["-c", "write -P 0x77 0 3M", &bpath]);
        let bmem = load(&d.path(&format!("base{i}.qcow2")));
        let bq: NodeRef = open(&bmem, true, None, None).await;
        let o = CreateOptions {
            size: 4 << 20,
            backing_file: Some(format!("base{i}.qcow2")),
            backing_format: Some("qcow2".into()),
            extended_l2: extra.contains("extended"),
            compat_v3: !extra.contains("0.10"),
            ..Default::default()
        };
        let m = create_mem(&o, None).await;
        let q = open(&m, false, Some(bq), None).await;
        let mut model = vec![0u8; 4 << 20];
        model[..3 << 20].fill(0x77);
        exercise(&q, &mut model, 65536, 7 + i as u64).await;
        // Discard makes v3 clusters read as zeroes and v2 clusters read from the backing file.
        q.discard(2 << 20, 128 << 10).await.unwrap();
        if o.compat_v3 {
            model[2 << 20..(2 << 20) + (128 << 10)].fill(0);
        } else {
            model[2 << 20..(2 << 20) + (128 << 10)].fill(0x77);
        }
        assert!(read(&q, 0, 4 << 20).await == model);
        q.close().await.unwrap();
        let p = d.path(&format!("top{i}.qcow2"));
        save(&m, &p);
        check_clean(&p);
        let want = qemu_raw(&d, p.to_str().unwrap(), &format!("top{i}.raw"));
        assert!(want == model, "case {i}: QEMU reads different data");
    }
}

#[tokio::test]
async fn external_data_file_writes() {
    let d = Dir::new();
    for raw in [false, true] {
        let o = CreateOptions {
            size: 4 << 20,
            data_file: Some(d.s("ext.data")),
            data_file_raw: raw,
            ..Default::default()
        };
        let df = Arc::new(MemNode::new());
        let dfn: NodeRef = df.clone();
        let m = create_mem(&o, Some(&dfn)).await;
        let q = open(&m, false, None, Some(dfn.clone())).await;
        let mut model = vec![0u8; 4 << 20];
        exercise(&q, &mut model, 65536, 42).await;
        q.close().await.unwrap();
        save(&m, &d.path("ext.qcow2"));
        save(&df, &d.path("ext.data"));
        check_clean(&d.path("ext.qcow2"));
        let want = qemu_raw(&d, &d.s("ext.qcow2"), "ext.raw");
        assert!(want == model, "raw={raw}");
        if raw {
            assert!(
                df.snapshot() == model,
                "the raw data file is the guest image"
            );
        }
    }
}

#[tokio::test]
async fn compressed_writes_and_snapshot_cow() {
    let d = Dir::new();
    // An image with a snapshot: writes must copy shared clusters.
    let img = d.s("snap.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "4M"]);
    ok("qemu-io", &["-c", "write -P 0x61 0 2M", &img]);
    ok("qemu-img", &["snapshot", "-c", "s1", &img]);
    let m = load(&d.path("snap.qcow2"));
    let q = open(&m, false, None, None).await;
    assert_eq!(q.format_info().snapshots.len(), 1);
    assert_eq!(q.format_info().snapshots[0].name, "s1");
    let mut model = vec![0u8; 4 << 20];
    model[..2 << 20].fill(0x61);
    exercise(&q, &mut model, 65536, 5).await;
    for k in 0..4u64 {
        let data = pattern(k, 65536);
        q.write_compressed(k * 65536 + (1 << 20), IoBuf::from_slice(&data))
            .await
            .unwrap();
        model[(k * 65536 + (1 << 20)) as usize..((k + 1) * 65536 + (1 << 20)) as usize]
            .copy_from_slice(&data);
        let z = vec![0x5au8; 65536];
        q.write_compressed(k * 65536 + (3 << 20), IoBuf::from_slice(&z))
            .await
            .unwrap();
        model[(k * 65536 + (3 << 20)) as usize..((k + 1) * 65536 + (3 << 20)) as usize]
            .copy_from_slice(&z);
    }
    let e = q.block_status(3 << 20, 1 << 20).await.unwrap();
    assert!(e.status.compressed && e.len == 4 * 65536);
    assert!(read(&q, 0, 4 << 20).await == model);
    q.close().await.unwrap();
    save(&m, &d.path("snap.qcow2"));
    check_clean(&d.path("snap.qcow2"));
    assert!(qemu_raw(&d, &img, "snap.raw") == model);
    // The snapshot still holds the old data.
    ok("qemu-img", &["snapshot", "-a", "s1", &img]);
    let old = qemu_raw(&d, &img, "snap-old.raw");
    assert!(old[..2 << 20].iter().all(|&b| b == 0x61));
    assert!(old[2 << 20..].iter().all(|&b| b == 0));
}

/// `qemu-img map --output=json` rebuilt from our block status (depth 0, no backing file).
async fn our_map(q: &Qcow2) -> Vec<serde_json::Value> {
    #[derive(PartialEq)]
    struct E {
        start: u64,
        len: u64,
        present: bool,
        zero: bool,
        data: bool,
        compressed: bool,
        offset: Option<u64>,
    }
    let mut v: Vec<E> = Vec::new();
    let mut pos = 0;
    while pos < q.size() {
        let e = q.block_status(pos, q.size() - pos).await.unwrap();
        let s = e.status;
        let cur = E {
            start: pos,
            len: e.len,
            present: s.allocated,
            zero: s.zero || !s.allocated,
            data: s.data,
            compressed: s.compressed,
            offset: s.host_offset,
        };
        match v.last_mut() {
            Some(l)
                if l.present == cur.present
                    && l.zero == cur.zero
                    && l.data == cur.data
                    && l.compressed == cur.compressed
                    && match (l.offset, cur.offset) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a + l.len == b,
                        _ => false,
                    } =>
            {
                l.len += cur.len
            }
            _ => v.push(cur),
        }
        pos += e.len;
    }
    v.into_iter()
        .map(|e| {
            let mut j = serde_json::json!({
                "start": e.start, "length": e.len, "depth": 0, "present": e.present,
                "zero": e.zero, "data": e.data, "compressed": e.compressed,
            });
            if let Some(o) = e.offset {
                j["offset"] = o.into();
            }
            j
        })
        .collect()
}

#[tokio::test]
async fn block_status_matches_qemu_img_map() {
    let d = Dir::new();
    for (i, o) in [
        "cluster_size=65536",
        "extended_l2=on",
        "cluster_size=4096,compat=0.10",
        // 512 entries per L2 table: the runs below span tables; metadata preallocation
        // makes long runs of contiguous host clusters that the writes then break up.
        "cluster_size=4096,preallocation=metadata",
    ]
    .iter()
    .enumerate()
    {
        let img = d.s(&format!("m{i}.qcow2"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", o, &img, "8M"],
        );
        let mut cmds = vec![
            "write -P 1 0 100k",
            "write -P 2 1M 8k",
            "write -z 2M 128k",
            "write -z -u 3M 64k",
            "write -c -P 3 4M 64k",
            "write -c -P 4 4160k 64k",
            "write -P 5 5M 1M",
            "discard 5184k 64k",
        ];
        if o.contains("preallocation") {
            // Compressed writes need unallocated clusters.
            cmds.retain(|c| !c.starts_with("write -c"));
        }
        let mut args: Vec<&str> = cmds.iter().flat_map(|c| ["-c", *c]).collect();
        args.push(&img);
        ok("qemu-io", &args);
        let raw: Vec<serde_json::Value> =
            serde_json::from_str(&ok("qemu-img", &["map", "--output=json", &img])).unwrap();
        // QEMU also asks the host file for holes inside data clusters ("zero": true with
        // "data": true); that recursion is the map tool's job, not the format's: undo it.
        let mut want: Vec<serde_json::Value> = Vec::new();
        for mut e in raw {
            if e["data"] == true {
                e["zero"] = false.into();
            }
            if let Some(l) = want.last_mut() {
                let same = ["present", "zero", "data", "compressed"]
                    .iter()
                    .all(|k| l[k] == e[k]);
                let contiguous = match (l.get("offset"), e.get("offset")) {
                    (None, None) => true,
                    (Some(a), Some(b)) => {
                        a.as_u64().unwrap() + l["length"].as_u64().unwrap() == b.as_u64().unwrap()
                    }
                    _ => false,
                };
                if same && contiguous {
                    let n = l["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                    l["length"] = n.into();
                    continue;
                }
            }
            want.push(e);
        }
        let m = load(&d.path(&format!("m{i}.qcow2")));
        let q = open(&m, true, None, None).await;
        let got = our_map(&q).await;
        assert_eq!(got, want, "case {o}");
    }
}
