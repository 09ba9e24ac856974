//! Image fleecing: a temporary qcow2 overlay (backing = the source node), a
//! copy-before-write filter (file = source, target = the overlay) that guest writes go
//! through, and a snapshot-access node showing the point-in-time view while writes go on.

mod backup_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backup_common::*;
use serde_json::json;
use strata_core::{BlockNode, IoBuf, WriteFlags};

const FILL: &[&str] = &[
    "write -P 0x11 0 3M",
    "write -P 0x22 5M 1M",
    "write -z 7M 1M",
    "write -P 0x33 9M 2M",
];

async fn setup(e: &Env, dir: &std::path::Path, cbw_extra: serde_json::Value) -> Vec<u8> {
    let size = 16 * MIB;
    let src = qcow2_image(dir, "src.qcow2", size, None, FILL);
    let tmp = qcow2_overlay(dir, "tmp.qcow2", &src);
    e.add_qcow2("src", &src).await;
    let snapshot = read_all(&*e.node("src").await).await;
    e.add(
        json!({"driver": "qcow2", "node-name": "tmp", "backing": "src",
        "file": {"driver": "file", "filename": tmp.to_str().unwrap()}}),
    )
    .await;
    let mut cbw =
        json!({"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": "tmp"});
    for (k, v) in cbw_extra.as_object().unwrap() {
        cbw[k] = v.clone();
    }
    e.add(cbw).await;
    // `discard=unmap` so a client's discard releases areas (QEMU ignores discards on a
    // node without it, as its own image-fleecing iotest shows).
    e.add(
        json!({"driver": "snapshot-access", "node-name": "acc", "file": "cbw", "discard": "unmap"}),
    )
    .await;
    snapshot
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_access_shows_the_point_in_time_while_guests_write() {
    let dir = tempfile::tempdir().unwrap();
    let e = Env::new();
    let snapshot = setup(&e, dir.path(), json!({})).await;
    let guest = e.export("cbw").await;
    let acc = e.node("acc").await;
    let stop = Arc::new(AtomicBool::new(false));
    let g2 = guest.clone();
    let stop2 = stop.clone();
    let mut model = snapshot.clone();
    let writer = tokio::spawn(async move {
        let mut w = Writer::new(42);
        let mut n = 0;
        while !stop2.load(Ordering::SeqCst) || n < 200 {
            w.write(&*g2, &mut model).await;
            n += 1;
        }
        model
    });
    // Reads of the snapshot race the guest writes, in pieces and whole.
    for round in 0..20u64 {
        let off = (round * 777 * 4096) % (15 * MIB);
        let got = acc.read(off, IoBuf::zeroed(MIB as usize)).await.unwrap();
        assert!(
            got[..] == snapshot[off as usize..(off + MIB) as usize],
            "round {round}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let model = writer.await.unwrap();
    assert_eq!(read_all(&*acc).await, snapshot, "point in time");
    assert_eq!(read_all(&*guest).await, model, "the guest sees its writes");
    assert_ne!(model, snapshot);
    // Block status of the view: allocated everywhere, zero where the source was zero.
    let st = acc.block_status(7 * MIB, MIB).await.unwrap();
    assert!(st.status.allocated);
    // Discarding releases the area: it cannot be read any more.
    acc.discard(0, 2 * MIB).await.unwrap();
    let err = acc.read(MIB, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(err.kind().errno(), libc::EACCES);
    // Writes through the snapshot are refused.
    assert!(
        acc.write(4 * MIB, IoBuf::zeroed(4096), WriteFlags::default())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbw_bitmap_limits_the_view_and_the_copies() {
    let dir = tempfile::tempdir().unwrap();
    let e = Env::new();
    let src = qcow2_image(dir.path(), "pre.qcow2", MIB, None, &[]);
    e.add_qcow2("pre", &src).await;
    // A bitmap on the source decides what the snapshot covers: [1M, 3M).
    let size = 16 * MIB;
    let s = qcow2_image(dir.path(), "src0.qcow2", size, None, FILL);
    e.add_qcow2("s0", &s).await;
    let bm = e.node("s0").await.bitmaps();
    bm.add("fl", 65536, false, false).unwrap();
    let mut b = strata_core::bitmap::DirtyBitmap::new(size, 65536);
    b.set_range(MIB, 2 * MIB);
    bm.merge("fl", &[&b]).unwrap();
    let tmp = dir.path().join("tmp0.qcow2");
    run_stdout(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            tmp.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    e.add(json!({"driver": "qcow2", "node-name": "tmp0", "file": {"driver": "file", "filename": tmp.to_str().unwrap()}})).await;
    e.add(
        json!({"driver": "copy-before-write", "node-name": "cbw0", "file": "s0", "target": "tmp0",
        "bitmap": {"node": "s0", "name": "fl"}}),
    )
    .await;
    e.add(json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"}))
        .await;
    let snapshot = read_all(&*e.node("s0").await).await;
    let guest = e.export("cbw0").await;
    guest
        .write(
            0,
            IoBuf::from_slice(&vec![0xaa; 4 * MIB as usize]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
    let acc = e.node("acc0").await;
    let got = acc
        .read(MIB, IoBuf::zeroed(2 * MIB as usize))
        .await
        .unwrap();
    assert!(got[..] == snapshot[MIB as usize..3 * MIB as usize]);
    let err = acc.read(0, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(err.kind().errno(), libc::EACCES);
    let err = acc
        .read(3 * MIB - 4096, IoBuf::zeroed(8192))
        .await
        .unwrap_err();
    assert_eq!(err.kind().errno(), libc::EACCES);
    // Only the bitmap's area was copied to the target.
    let t = e.node("tmp0").await;
    let st = t.block_status(0, MIB).await.unwrap();
    assert!(!st.status.allocated && !st.status.data, "{st:?}");
    // The snapshot-access node insists on a copy-before-write file.
    let mut g = e.env.graph.lock().await;
    let err = strata_graph::blockdev::blockdev_add(
        &mut g,
        &e.objects,
        json!({"driver": "snapshot-access", "node-name": "bad", "file": "pre"})
            .as_object()
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err,
        "snapshot-access: 'file' must be a copy-before-write node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_cbw_error_breaks_the_guest_write_or_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let e = Env::new();
    let size = 4 * MIB;
    let s = qcow2_image(dir.path(), "s.qcow2", size, None, &["write -P 5 0 4M"]);
    e.add_qcow2("s", &s).await;
    for (mode, guest_ok) in [("break-guest-write", false), ("break-snapshot", true)] {
        let (c, a, t) = (
            format!("c-{mode}"),
            format!("a-{mode}"),
            format!("t-{mode}"),
        );
        add_failing(&e, &t, size).await;
        e.add(
            json!({"driver": "copy-before-write", "node-name": c, "file": "s", "target": t,
            "on-cbw-error": mode, "cbw-timeout": 5}),
        )
        .await;
        e.add(json!({"driver": "snapshot-access", "node-name": a, "file": c}))
            .await;
        let acc = e.node(&a).await;
        acc.read(0, IoBuf::zeroed(4096)).await.unwrap();
        let guest = e.export(&c).await;
        let r = guest
            .write(0, IoBuf::from_slice(&[7u8; 4096]), WriteFlags::default())
            .await;
        assert_eq!(r.is_ok(), guest_ok, "{mode}");
        let snap = acc.read(MIB, IoBuf::zeroed(4096)).await;
        if guest_ok {
            // The snapshot is broken everywhere, even where nothing was written.
            assert_eq!(snap.unwrap_err().kind().errno(), libc::EACCES);
        } else {
            assert!(snap.unwrap().iter().all(|&b| b == 5));
        }
        let mut g = e.env.graph.lock().await;
        let id = g
            .parents_of(&c)
            .find(|p| p.user == strata_graph::User::Backend)
            .unwrap()
            .id;
        g.remove_edge(id);
        strata_graph::blockdev::blockdev_del(&mut g, &a)
            .await
            .unwrap();
        strata_graph::blockdev::blockdev_del(&mut g, &c)
            .await
            .unwrap();
    }
}
