//! Interop with the installed QEMU tools (qemu-io, qemu-img, qemu-nbd) and libnbd's nbdinfo.
//! Each test skips with a message when its tool is missing.

mod common;

use std::sync::Arc;

use common::*;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags};
use strata_nbd::client::HeaderMode;
use strata_nbd::{ClientOptions, NbdAddr, NbdClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_then_read_pattern() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    let mem = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    server
        .add_export(export("exp", mem.clone() as NodeRef, true))
        .unwrap();
    server
        .add_export(export("ro", mem.clone() as NodeRef, false))
        .unwrap();
    let u = uri(&sock, "exp");
    let (ok, out, err) = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &u,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "discard 128k 64k",
            "-c",
            "flush",
        ],
    )
    .await;
    assert!(ok, "qemu-io failed: {out}{err}");
    assert!(out.contains("wrote 65536/65536 bytes at offset 0"), "{out}");
    assert!(out.contains("read 65536/65536 bytes at offset 0"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(mem.snapshot()[..65536].iter().all(|&b| b == 0xab));

    // A read-only export must be opened read-only (-r), and then it reads.
    let ro = uri(&sock, "ro");
    let (ok, out, err) = run("qemu-io", &["-f", "raw", &ro, "-c", "read 0 4k"]).await;
    let all = format!("{out}{err}");
    assert!(!ok || all.contains("Permission denied"), "{all}");
    assert!(all.contains("Permission denied"), "{all}");
    let (ok, out, err) = run(
        "qemu-io",
        &["-r", "-f", "raw", &ro, "-c", "read -P 0xab 0 4k"],
    )
    .await;
    assert!(ok && !out.contains("verification failed"), "{out}{err}");
    // Past the end: an error, not a crash.
    let (_, out, err) = run("qemu-io", &["-f", "raw", &u, "-c", "read 1M 4k"]).await;
    assert!(
        format!("{out}{err}").contains("Input/output error")
            || format!("{out}{err}").contains("Invalid argument")
            || format!("{out}{err}").contains("out of range"),
        "{out}{err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_and_convert() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    // Cluster 0 data, 1 zero, 2-3 data, 4-7 unallocated.
    let node = LayerNode::new(8 * CLUSTER, None);
    node.fill(0, 0x5a);
    node.set_zero(1);
    node.fill(2, 0x01);
    node.fill(3, 0x02);
    server
        .add_export(export("exp", node.clone() as NodeRef, false))
        .unwrap();
    let u = uri(&sock, "exp");
    let (ok, out, err) = run("qemu-img", &["map", "--output=json", "-f", "raw", &u]).await;
    assert!(ok, "{out}{err}");
    let lines: Vec<String> = out
        .lines()
        .map(|l| l.replace(' ', ""))
        .filter(|l| l.contains("\"start\""))
        .collect();
    let expect = [
        (0, 65536, false, true),
        (65536, 65536, true, false),
        (131072, 131072, false, true),
        (262144, 262144, true, false),
    ];
    assert_eq!(lines.len(), expect.len(), "{out}");
    for (l, (start, len, zero, data)) in lines.iter().zip(expect) {
        assert!(
            l.contains(&format!("\"start\":{start},\"length\":{len},")),
            "{l}"
        );
        assert!(
            l.contains(&format!("\"zero\":{zero},\"data\":{data}")),
            "{l}"
        );
    }

    let out_path = dir.path().join("out.raw");
    let (ok, out, err) = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &u,
            out_path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let copied = std::fs::read(&out_path).unwrap();
    assert_eq!(copied, node.guest_bytes().await);
    let q = dir.path().join("out.qcow2");
    let (ok, out, err) = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &u,
            q.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &u,
            q.to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok && out.contains("Images are identical"), "{out}{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_qemu_io_clients_on_a_file() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let file = strata_io::FileNode::open(&img, &Default::default()).unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    server
        .add_export(export("disk", file.clone() as NodeRef, true))
        .unwrap();
    let u = uri(&sock, "disk");
    let jobs = (0..8).map(|i| {
        let u = u.clone();
        async move {
            let w = format!("write -P {} {}k 512k", 0x10 + i, i * 1024);
            let r = format!("read -P {} {}k 512k", 0x10 + i, i * 1024);
            run("qemu-io", &["-f", "raw", &u, "-c", &w, "-c", &r]).await
        }
    });
    for (ok, out, err) in futures::future::join_all(jobs).await {
        assert!(ok && !out.contains("verification failed"), "{out}{err}");
    }
    file.flush().await.unwrap();
    let bytes = std::fs::read(&img).unwrap();
    for i in 0..8usize {
        let r = &bytes[i * 1024 * 1024..i * 1024 * 1024 + 512 * 1024];
        assert!(r.iter().all(|&b| b == 0x10 + i as u8), "region {i}");
    }
    // qemu-img map sees the file's holes through the export.
    let (ok, out, _) = run("qemu-img", &["map", "--output=json", "-f", "raw", &u]).await;
    assert!(ok);
    assert!(
        out.replace(' ', "")
            .contains("\"zero\":true,\"data\":false"),
        "{out}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_map_and_qemu_contexts() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    let base = LayerNode::new(4 * CLUSTER, None);
    base.fill(0, 1);
    base.fill(1, 1);
    let top = LayerNode::new(4 * CLUSTER, Some(base.clone() as NodeRef));
    top.fill(1, 2);
    top.fill(2, 2);
    let mut cfg = export("chain", top.clone() as NodeRef, true);
    cfg.description = Some("a backing chain".into());
    cfg.allocation_depth = true;
    cfg.bitmaps = vec![(
        "bm".into(),
        Arc::new(TestBitmap {
            granularity: CLUSTER,
            bits: parking_lot::Mutex::new(vec![true, false, false, true]),
        }),
    )];
    server.add_export(cfg).unwrap();
    server
        .add_export(export("other", base.clone() as NodeRef, false))
        .unwrap();

    let list_uri = format!("nbd+unix:///?socket={}", sock.display());
    let (ok, out, err) = run("nbdinfo", &["--list", &list_uri]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("export=\"chain\""), "{out}");
    assert!(out.contains("export=\"other\""), "{out}");
    assert!(out.contains("a backing chain"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    assert!(out.contains("qemu:allocation-depth"), "{out}");
    assert!(out.contains("qemu:dirty-bitmap:bm"), "{out}");

    let u = uri(&sock, "chain");
    let norm = |s: &str| -> Vec<Vec<String>> {
        s.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    };
    let (ok, out, err) = run("nbdinfo", &["--map", &u]).await;
    assert!(ok, "{out}{err}");
    let m = norm(&out);
    assert_eq!(m[0][..3], ["0", "196608", "0"], "{out}");
    assert_eq!(m[1][..3], ["196608", "65536", "3"], "{out}");

    let (ok, out, err) = run("nbdinfo", &["--map=qemu:allocation-depth", &u]).await;
    assert!(ok, "{out}{err}");
    let m = norm(&out);
    let got: Vec<(String, String, String)> = m
        .iter()
        .map(|l| (l[0].clone(), l[1].clone(), l[2].clone()))
        .collect();
    let want = [
        ("0", "65536", "2"),
        ("65536", "131072", "1"),
        ("196608", "65536", "0"),
    ];
    assert_eq!(
        got,
        want.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect::<Vec<_>>(),
        "{out}"
    );

    let (ok, out, err) = run("nbdinfo", &["--map=qemu:dirty-bitmap:bm", &u]).await;
    assert!(ok, "{out}{err}");
    let m = norm(&out);
    assert_eq!(m.len(), 3, "{out}");
    assert_eq!(m[0][..3], ["0", "65536", "1"], "{out}");
    assert_eq!(m[1][..3], ["65536", "131072", "0"], "{out}");

    let (ok, out, err) = run("nbdinfo", &["--json", &u]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("\"export-size\": 262144"), "{out}");
    assert!(out.contains("\"can_multi_conn\": true"), "{out}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_client_against_qemu_nbd() {
    if !have("qemu-nbd") || !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let imgs = img.to_str().unwrap();
    let (ok, _, err) = run("qemu-img", &["create", "-f", "qcow2", imgs, "4M"]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            imgs,
            "-c",
            "write -P 0xcd 64k 64k",
            "-c",
            "write -z 1M 64k",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let sock = dir.path().join("qemu.sock");
    let qnbd = strata_testkit::qemu_nbd(&sock, "qcow2", &img, &[]);
    for (ext, want) in [
        (true, HeaderMode::Extended),
        (false, HeaderMode::Structured),
    ] {
        let opts = ClientOptions {
            read_only: false,
            extended_headers: ext,
            structured_replies: true,
            ..Default::default()
        };
        let c = NbdClient::connect_with(&NbdAddr::Unix(sock.clone()), "", &opts)
            .await
            .unwrap();
        assert_eq!(c.header_mode(), want);
        assert_eq!(c.size(), 4 << 20);
        assert!(c.has_base_allocation());
        let b = c.read(0, IoBuf::zeroed(256 * 1024)).await.unwrap();
        assert!(b[..65536].iter().all(|&x| x == 0));
        assert!(b[65536..131072].iter().all(|&x| x == 0xcd));
        let e = c.block_status(0, 4 << 20).await.unwrap();
        assert_eq!(e.len, 65536);
        assert!(!e.status.data && e.status.zero);
        let e = c.block_status(65536, (4 << 20) - 65536).await.unwrap();
        assert!(e.status.data && !e.status.zero);
        assert_eq!(e.len, 65536);
        // Parallel writes and reads over one connection.
        let futs = (0..32u64).map(|i| {
            let c = &c;
            async move {
                let off = (2 << 20) + i * 4096;
                c.write(
                    off,
                    IoBuf::from_slice(&[i as u8 + 1; 4096]),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
                let b = c.read(off, IoBuf::zeroed(4096)).await.unwrap();
                assert!(b.iter().all(|&x| x == i as u8 + 1));
            }
        });
        futures::future::join_all(futs).await;
        c.write_zeroes(3 << 20, 65536, Default::default())
            .await
            .unwrap();
        c.discard(3 << 20, 65536).await.unwrap();
        c.close().await.unwrap();
    }
    drop(qnbd);
    let (ok, out, err) = run(
        "qemu-io",
        &["-r", "-f", "qcow2", imgs, "-c", "read -P 0x20 2172k 4k"],
    )
    .await;
    assert!(ok && !out.contains("verification failed"), "{out}{err}");
}

/// libnbd's nbdcopy (several connections, many requests in flight each) copies between two
/// of our exports and to and from a file, byte-exact; `qemu-nbd --list` reads our export list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_and_qemu_nbd_list() {
    if !have("nbdcopy") || !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, sock) = unix_server(dir.path()).await;
    const SIZE: usize = 8 << 20;
    // Data, a zero run and a hole-sized gap of a second pattern.
    let mut data: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    data[1 << 20..3 << 20].fill(0);
    data[5 << 20..(5 << 20) + 4096].fill(0xa5);
    let src = Arc::new(MemNode::read_only(data.clone()));
    let dst = Arc::new(MemNode::with_data(vec![0xff; SIZE]));
    let mut cfg = export("src", src.clone() as NodeRef, false);
    cfg.description = Some("nbdcopy source".into());
    server.add_export(cfg).unwrap();
    server
        .add_export(export("dst", dst.clone() as NodeRef, true))
        .unwrap();

    let (ok, out, err) = run("nbdcopy", &[&uri(&sock, "src"), &uri(&sock, "dst")]).await;
    assert!(ok, "nbdcopy nbd -> nbd: {out}{err}");
    assert!(dst.snapshot() == data, "nbd -> nbd copy differs");

    let file = dir.path().join("copy.raw");
    let file_s = file.to_str().unwrap();
    let (ok, out, err) = run("nbdcopy", &[&uri(&sock, "src"), file_s]).await;
    assert!(ok, "nbdcopy nbd -> file: {out}{err}");
    assert!(
        std::fs::read(&file).unwrap() == data,
        "nbd -> file copy differs"
    );

    dst.write(
        0,
        IoBuf::from_slice(&vec![0x11; SIZE]),
        WriteFlags::default(),
    )
    .await
    .unwrap();
    let (ok, out, err) = run("nbdcopy", &[file_s, &uri(&sock, "dst")]).await;
    assert!(ok, "nbdcopy file -> nbd: {out}{err}");
    assert!(dst.snapshot() == data, "file -> nbd copy differs");

    let (ok, out, err) = run("qemu-nbd", &["--list", "-k", sock.to_str().unwrap()]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("exports available: 2"), "{out}");
    assert!(out.contains("export: 'src'"), "{out}");
    assert!(out.contains("description: nbdcopy source"), "{out}");
    assert!(out.contains(&format!("size:  {SIZE}")), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    server.stop().await;
}
