//! blockdev-backup: point-in-time full backups under guest writes, incremental backups with
//! the bitmap successor protocol, failures, two backups of one node, the argument checks
//! with QEMU's texts, and event sequences recorded from qemu-storage-daemon 10.0.2.

mod backup_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backup_common::*;
use serde_json::{Map, Value, json};
use strata_blockjobs::backup::{backup_prepare, blockdev_backup};
use strata_core::bitmap::DirtyBitmap;
use strata_core::{BlockNode, IoBuf, WriteFlags};
use strata_graph::GraphNode;

fn cbw_nodes(g: &strata_graph::Graph) -> usize {
    g.node_names()
        .iter()
        .filter(|n| g.node(n).unwrap().options["driver"] == "copy-before-write")
        .count()
}

fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

const FILL: &[&str] = &[
    "write -P 0x11 0 3M",
    "write -P 0x22 5M 1M",
    "write -z 7M 1M",
    "write -P 0x33 9M 2M",
    "write -P 0x44 15M 1M",
];

/// The writer's final model and the ranges it wrote.
type WriterResult = (Vec<u8>, Vec<(u64, u64)>);

/// Runs a seeded writer through `export` until `stop`; returns the model and the ranges.
fn spawn_writer(
    export: Arc<strata_graph::Link>,
    mut model: Vec<u8>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<WriterResult> {
    tokio::spawn(async move {
        let mut w = Writer::new(seed);
        let mut ranges = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            ranges.push(w.write(&*export, &mut model).await);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        (model, ranges)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backup_is_the_point_in_time_under_writes() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(dir.path(), "src.qcow2", 16 * MIB, None, FILL);
    let tgt = qcow2_image(dir.path(), "tgt.qcow2", 16 * MIB, None, &[]);
    let e = Env::new();
    e.add_qcow2("src", &src).await;
    e.add_qcow2("tgt", &tgt).await;
    let export = e.export("src").await;
    let snapshot = read_all(&*export).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Slow enough that the writer races the copy everywhere.
    blockdev_backup(
        &e.env,
        &args(
            json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full",
                     "speed": 8 * MIB, "x-perf": {"max-workers": 4, "max-chunk": 256 * 1024}}),
        ),
        None,
    )
    .await
    .unwrap();
    let writer = spawn_writer(export.clone(), snapshot.clone(), 7, stop.clone());
    e.wait_gone("job0").await;
    stop.store(true, Ordering::SeqCst);
    let (model, ranges) = writer.await.unwrap();
    assert!(
        ranges.len() > 50,
        "the writer ran during the job ({} writes)",
        ranges.len()
    );
    // The guest sees its writes; the filter is gone again.
    assert_eq!(read_all(&*export).await, model);
    assert_eq!(
        export
            .target()
            .as_any()
            .downcast_ref::<GraphNode>()
            .unwrap()
            .name(),
        "src"
    );
    let ev = e.events(false);
    let done = ev.iter().find(|(n, _)| n == "BLOCK_JOB_COMPLETED").unwrap();
    assert_eq!(done.1["len"], json!(16 * MIB));
    assert_eq!(done.1["offset"], json!(16 * MIB));
    e.del("tgt").await;
    let raw = write_raw(dir.path(), "snap.raw", &snapshot);
    assert_same(&raw, &tgt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backups_of_one_node_run_together() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(dir.path(), "src.qcow2", 16 * MIB, None, FILL);
    let t1 = qcow2_image(dir.path(), "t1.qcow2", 16 * MIB, None, &[]);
    let t2 = qcow2_image(dir.path(), "t2.qcow2", 16 * MIB, None, &[]);
    let e = Env::new();
    e.add_qcow2("src", &src).await;
    e.add_qcow2("t1", &t1).await;
    e.add_qcow2("t2", &t2).await;
    let export = e.export("src").await;
    let snap1 = read_all(&*export).await;
    blockdev_backup(&e.env, &args(json!({"job-id": "b1", "device": "src", "target": "t1", "sync": "full", "speed": 8 * MIB})), None)
        .await
        .unwrap();
    // Writes between the two starts: the second backup sees them, the first does not.
    let mut model = snap1.clone();
    let mut w = Writer::new(99);
    for _ in 0..20 {
        w.write(&*export, &mut model).await;
    }
    let snap2 = model.clone();
    blockdev_backup(&e.env, &args(json!({"job-id": "b2", "device": "src", "target": "t2", "sync": "full", "speed": 16 * MIB})), None)
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(export.clone(), model, 3, stop.clone());
    e.wait_gone("b1").await;
    e.wait_gone("b2").await;
    stop.store(true, Ordering::SeqCst);
    let (model, _) = writer.await.unwrap();
    assert_eq!(read_all(&*export).await, model);
    e.del("t1").await;
    e.del("t2").await;
    assert_same(&write_raw(dir.path(), "s1.raw", &snap1), &t1);
    assert_same(&write_raw(dir.path(), "s2.raw", &snap2), &t2);
    let g = e.env.graph.lock().await;
    assert_eq!(cbw_nodes(&g), 0);
}

fn granules(ranges: &[(u64, u64)], size: u64) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(size, 65536);
    for &(o, l) in ranges {
        b.set_range(o, l);
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_backup_chain_and_bitmap_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let src = qcow2_image(dir.path(), "src.qcow2", size, None, FILL);
    let full = qcow2_image(dir.path(), "full.qcow2", size, None, &[]);
    let inc = qcow2_image(dir.path(), "inc.qcow2", size, None, &[]);
    let e = Env::new();
    e.add_qcow2("src", &src).await;
    e.add_qcow2("full", &full).await;
    e.add_qcow2("inc", &inc).await;
    add_failing(&e, "bad", size).await;
    let export = e.export("src").await;
    let bitmaps = e.node("src").await.bitmaps();

    // Bitmap add + full backup in one step (nothing runs in between).
    let snap1 = read_all(&*export).await;
    bitmaps.add("b0", 65536, false, false).unwrap();
    blockdev_backup(
        &e.env,
        &args(
            json!({"job-id": "full0", "device": "src", "target": "full", "sync": "full",
        "bitmap": "b0", "bitmap-mode": "on-success"}),
        ),
        None,
    )
    .await
    .unwrap();
    e.wait_gone("full0").await;

    // Writes after the full backup: exactly what the bitmap holds.
    let mut model = snap1.clone();
    let mut w = Writer::new(11);
    let mut after_full = Vec::new();
    for _ in 0..40 {
        after_full.push(w.write(&*export, &mut model).await);
    }
    assert_eq!(bitmaps.snapshot("b0").unwrap(), granules(&after_full, size));

    // A failing incremental with on-success keeps every bit (and the writes made meanwhile).
    blockdev_backup(
        &e.env,
        &args(
            json!({"job-id": "bad0", "device": "src", "target": "bad", "sync": "incremental",
        "bitmap": "b0"}),
        ),
        None,
    )
    .await
    .unwrap();
    // (Guest writes to dirty clusters would fail meanwhile: copy-before-write cannot save
    // their old data, and on-cbw-error defaults to break-guest-write.)
    e.wait_gone("bad0").await;
    let ev = e.events(false);
    let failed = ev
        .iter()
        .find(|(n, d)| n == "BLOCK_JOB_COMPLETED" && d["device"] == "bad0")
        .unwrap();
    assert_eq!(failed.1["error"], json!("Input/output error"));
    assert!(ev.iter().any(|(n, d)| n == "BLOCK_JOB_ERROR"
        && d["device"] == "bad0"
        && d["operation"] == "write"
        && d["action"] == "report"));
    let all = after_full.clone();
    assert_eq!(bitmaps.snapshot("b0").unwrap(), granules(&all, size));
    assert!(!bitmaps.get_info("b0").unwrap().busy);

    // The real incremental, with writes going on while it runs.
    let snap2 = model.clone();
    blockdev_backup(
        &e.env,
        &args(
            json!({"job-id": "inc0", "device": "src", "target": "inc", "sync": "bitmap",
        "bitmap": "b0", "bitmap-mode": "on-success", "speed": 4 * MIB}),
        ),
        None,
    )
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(export.clone(), model, 5, stop.clone());
    e.wait_gone("inc0").await;
    stop.store(true, Ordering::SeqCst);
    let (model, during_inc) = writer.await.unwrap();
    assert_eq!(read_all(&*export).await, model);
    let ev = e.events(false);
    let done = ev
        .iter()
        .find(|(n, d)| n == "BLOCK_JOB_COMPLETED" && d["device"] == "inc0")
        .unwrap();
    // len is the dirty count, not the disk.
    assert_eq!(done.1["len"], json!(granules(&all, size).count()));
    assert!(done.1.get("error").is_none());
    // Only writes made since the incremental started are left.
    assert_eq!(bitmaps.snapshot("b0").unwrap(), granules(&during_inc, size));

    e.del("full").await;
    e.del("inc").await;
    run_stdout(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            full.to_str().unwrap(),
            "-F",
            "qcow2",
            inc.to_str().unwrap(),
        ],
    );
    assert_same(&write_raw(dir.path(), "s2.raw", &snap2), &inc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_mode_keeps_uncopied_bits_on_failure_and_never_keeps_all() {
    let size = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(dir.path(), "src.qcow2", size, None, &["write -P 1 0 4M"]);
    let e = Env::new();
    e.add_qcow2("src", &src).await;
    add_failing(&e, "bad", size).await;
    let bitmaps = e.node("src").await.bitmaps();
    bitmaps.add("b", 65536, false, false).unwrap();
    bitmaps.merge("b", &[&granules(&[(0, MIB)], size)]).unwrap();
    for (i, mode) in ["always", "never"].iter().enumerate() {
        let id = format!("j{i}");
        blockdev_backup(
            &e.env,
            &args(
                json!({"job-id": id, "device": "src", "target": "bad", "sync": "bitmap",
            "bitmap": "b", "bitmap-mode": mode}),
            ),
            None,
        )
        .await
        .unwrap();
        e.wait_gone(&id).await;
        // Nothing could be copied: every bit is still there.
        assert_eq!(bitmaps.snapshot("b").unwrap().count(), MIB, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_transaction_aborts_together_and_sync_none_runs_until_cancelled() {
    let size = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(dir.path(), "src.qcow2", size, None, &["write -P 1 0 4M"]);
    let t = qcow2_image(dir.path(), "t.qcow2", size, None, &[]);
    let n = qcow2_image(dir.path(), "n.qcow2", size, None, &[]);
    let e = Env::new();
    e.add_qcow2("src", &src).await;
    e.add_qcow2("t", &t).await;
    e.add_qcow2("n", &n).await;
    add_failing(&e, "bad", size).await;
    let txn = e.env.jobs.new_txn();
    let a = backup_prepare(
        &e.env,
        &args(
            json!({"job-id": "ok", "device": "src", "target": "t", "sync": "full", "speed": MIB}),
        ),
        Some(txn),
    )
    .await
    .unwrap();
    let b = backup_prepare(
        &e.env,
        &args(json!({"job-id": "ko", "device": "src", "target": "bad", "sync": "full"})),
        Some(txn),
    )
    .await
    .unwrap();
    a.commit().await.unwrap();
    b.commit().await.unwrap();
    e.wait_gone("ok").await;
    e.wait_gone("ko").await;
    let ev = e.events(true);
    assert!(
        ev.iter()
            .any(|(n, d)| n == "BLOCK_JOB_CANCELLED" && d["device"] == "ok")
    );
    assert!(ev.iter().any(|(n, d)| n == "BLOCK_JOB_COMPLETED"
        && d["device"] == "ko"
        && d["error"] == "Input/output error"));

    // A prepared action that is aborted leaves nothing behind.
    let c = backup_prepare(&e.env, &args(json!({"job-id": "c", "device": "src", "target": "t", "sync": "full", "filter-node-name": "flt"})), None)
        .await
        .unwrap();
    assert_eq!(c.filter_node_name(), "flt");
    c.abort().await;
    assert!(e.env.graph.lock().await.node("flt").is_none());
    assert_eq!(e.env.jobs.job_status("c"), None);

    // sync=none copies only what guests overwrite and ends only by cancel.
    e.events.take();
    let export = e.export("src").await;
    blockdev_backup(
        &e.env,
        &args(json!({"job-id": "fl", "device": "src", "target": "n", "sync": "none"})),
        None,
    )
    .await
    .unwrap();
    export
        .write(0, IoBuf::from_slice(&[9u8; 65536]), WriteFlags::default())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        e.env.jobs.job_status("fl"),
        Some(strata_job::JobStatus::Running)
    );
    e.env.jobs.block_job_cancel("fl", false).unwrap();
    e.wait_gone("fl").await;
    let ev = e.events(false);
    let c = ev.iter().find(|(n, _)| n == "BLOCK_JOB_CANCELLED").unwrap();
    assert_eq!(c.1["offset"], json!(65536));
    e.del("n").await;
    let old = vec![1u8; 65536];
    let got = run_stdout(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 1 0 64k", n.to_str().unwrap()],
    );
    assert!(got.contains("read 65536/65536"), "{got}");
    let _ = old;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_errors_have_qemus_texts_in_qemus_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(dir.path(), "src.qcow2", 64 * MIB, None, &[]);
    let tgt = qcow2_image(dir.path(), "tgt.qcow2", 64 * MIB, None, &[]);
    let e = Env::new();
    e.add_qcow2("src", &src).await;
    e.add_qcow2("tgt", &tgt).await;
    e.node("src")
        .await
        .bitmaps()
        .add("b0", 65536, false, false)
        .unwrap();
    // Recorded from qemu-storage-daemon 10.0.2 (same graph: file f0/f1 under src/tgt).
    let cases: &[(Value, &str)] = &[
        (
            json!({"sync": "bitmap"}),
            "must provide a valid bitmap name for 'bitmap' sync mode",
        ),
        (
            json!({"sync": "incremental"}),
            "must provide a valid bitmap name for 'incremental' sync mode",
        ),
        (
            json!({"sync": "incremental", "bitmap": "b0", "bitmap-mode": "never"}),
            "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
        ),
        (
            json!({"sync": "full", "bitmap": "nope", "bitmap-mode": "on-success"}),
            "Bitmap 'nope' could not be found",
        ),
        (
            json!({"sync": "full", "bitmap": "b0"}),
            "Bitmap sync mode must be given when providing a bitmap",
        ),
        (
            json!({"sync": "none", "bitmap": "b0", "bitmap-mode": "on-success"}),
            "sync mode 'none' does not produce meaningful bitmap outputs",
        ),
        (
            json!({"sync": "full", "bitmap": "b0", "bitmap-mode": "never"}),
            "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'",
        ),
        (
            json!({"sync": "full", "bitmap-mode": "never"}),
            "Cannot specify bitmap sync mode without a bitmap",
        ),
        (
            json!({"sync": "full", "target": "src"}),
            "Source and target cannot be the same",
        ),
        (
            json!({"sync": "full", "compress": true, "target": "#f1"}),
            "Compression is not supported for this drive ",
        ),
        (
            json!({"sync": "full", "x-perf": {"max-workers": 0}}),
            "max-workers must be between 1 and 2147483647",
        ),
        (
            json!({"sync": "full", "x-perf": {"max-chunk": -1}}),
            "max-chunk must be zero (which means no limit) or positive",
        ),
        (
            json!({"sync": "full", "x-perf": {"max-chunk": 4096}}),
            "Required max-chunk (4096) is less than backup cluster size (65536)",
        ),
        (
            json!({"sync": "full", "target": "#f1"}),
            "Source and target image have different sizes",
        ),
        (
            json!({"sync": "full", "job-id": "1bad"}),
            "Invalid job ID '1bad'",
        ),
        (
            json!({"sync": "full", "speed": -1}),
            "Parameter 'speed' expects a non-negative value",
        ),
        (
            json!({"sync": "full", "x-perf": {"min-cluster-size": 3000}}),
            "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be a power of 2",
        ),
        (
            json!({"sync": "full", "device": "nope"}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (json!({"sync": "full", "job-id": null}), "Invalid job ID ''"),
    ];
    // The file nodes under the images are implicit: look their names up.
    let tgt_file = e
        .env
        .graph
        .lock()
        .await
        .child("tgt", "file")
        .unwrap()
        .child
        .clone();
    for (a, want) in cases {
        let mut m = args(json!({"job-id": "job0", "device": "src", "target": "tgt"}));
        for (k, v) in a.as_object().unwrap() {
            if v.is_null() {
                m.remove(k);
            } else if v == "#f1" {
                m.insert(k.clone(), json!(tgt_file));
            } else {
                m.insert(k.clone(), v.clone());
            }
        }
        let err = blockdev_backup(&e.env, &m, None).await.unwrap_err();
        assert_eq!(err.desc, *want, "{a}");
        assert_eq!(err.class, "GenericError");
        // Nothing is left behind: the bitmap is usable, no filter, no job.
        assert!(
            !e.node("src").await.bitmaps().get_info("b0").unwrap().busy,
            "{a}"
        );
        assert_eq!(e.env.jobs.job_count(), 0, "{a}");
        assert_eq!(cbw_nodes(&*e.env.graph.lock().await), 0, "{a}");
    }
    // Only the speed error reaches job creation (QEMU: created, then null).
    let ev: Vec<_> = e
        .events(false)
        .into_iter()
        .map(|(_, d)| d["status"].clone())
        .collect();
    assert_eq!(ev, [json!("created"), json!("null")]);
}

/// qemu-storage-daemon 10.0.2: 64 MiB qcow2 source (32 MiB written), fresh 64 MiB target,
/// `blockdev-backup sync=full` (tests/backup_common recorder, timestamps dropped).
const QSD_SUCCESS: &str = r#"[["JOB_STATUS_CHANGE",{"status":"created","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"running","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"paused","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"running","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"waiting","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"pending","id":"job0"}],["BLOCK_JOB_COMPLETED",{"device":"job0","len":67108864,"offset":67108864,"speed":0,"type":"backup"}],["JOB_STATUS_CHANGE",{"status":"concluded","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"null","id":"job0"}]]"#;

/// Same, with `speed: 1048576`, `block-job-cancel` after 0.3 s (offset normalised).
const QSD_CANCEL: &str = r#"[["JOB_STATUS_CHANGE",{"status":"created","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"running","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"paused","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"running","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"aborting","id":"job0"}],["BLOCK_JOB_CANCELLED",{"device":"job0","len":67108864,"offset":"N","speed":1048576,"type":"backup"}],["JOB_STATUS_CHANGE",{"status":"concluded","id":"job0"}],["JOB_STATUS_CHANGE",{"status":"null","id":"job0"}]]"#;

fn wire(ev: &[(String, Value)]) -> String {
    serde_json::to_string(&ev.iter().map(|(n, d)| json!([n, d])).collect::<Vec<_>>()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_sequences_match_qemu_storage_daemon() {
    for (cancel, want) in [(false, QSD_SUCCESS), (true, QSD_CANCEL)] {
        let dir = tempfile::tempdir().unwrap();
        let src = qcow2_image(
            dir.path(),
            "src.qcow2",
            64 * MIB,
            None,
            &["write -P 0x11 0 32M"],
        );
        let tgt = qcow2_image(dir.path(), "tgt.qcow2", 64 * MIB, None, &[]);
        let e = Env::new();
        e.add_qcow2("src", &src).await;
        e.add_qcow2("tgt", &tgt).await;
        let mut a = json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"});
        if cancel {
            a["speed"] = json!(MIB);
        }
        blockdev_backup(&e.env, &args(a), None).await.unwrap();
        if cancel {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            e.env.jobs.block_job_cancel("job0", false).unwrap();
        }
        e.wait_gone("job0").await;
        assert_eq!(wire(&e.events(cancel)), want);
        if !cancel {
            e.del("tgt").await;
            e.del("src").await;
            run_stdout(
                "qemu-img",
                &["compare", src.to_str().unwrap(), tgt.to_str().unwrap()],
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_top_backups() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let base = qcow2_image(
        dir.path(),
        "base.qcow2",
        size,
        None,
        &["write -P 0x55 0 8M"],
    );
    let top = qcow2_overlay(dir.path(), "top.qcow2", &base);
    run_stdout(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x66 1M 1M",
            "-c",
            "write -z 4M 64k",
            top.to_str().unwrap(),
        ],
    );
    let comp = qcow2_image(dir.path(), "comp.qcow2", size, None, &[]);
    // The top backup's target shares the source's backing file.
    let tgt_top = qcow2_overlay(dir.path(), "tt.qcow2", &base);
    let e = Env::new();
    e.add_qcow2("top", &top).await;
    e.add_qcow2("comp", &comp).await;
    e.add(
        json!({"driver": "qcow2", "node-name": "tt", "backing": null,
        "file": {"driver": "file", "filename": tgt_top.to_str().unwrap()}}),
    )
    .await;
    blockdev_backup(&e.env, &args(json!({"job-id": "c", "device": "top", "target": "comp", "sync": "full", "compress": true})), None)
        .await
        .unwrap();
    e.wait_gone("c").await;
    blockdev_backup(
        &e.env,
        &args(json!({"job-id": "t", "device": "top", "target": "tt", "sync": "top"})),
        None,
    )
    .await
    .unwrap();
    e.wait_gone("t").await;
    let ev = e.events(false);
    let t_done = ev
        .iter()
        .find(|(n, d)| n == "BLOCK_JOB_COMPLETED" && d["device"] == "t")
        .unwrap();
    // Only the top image's clusters are copied.
    assert_eq!(t_done.1["offset"], json!(MIB + 65536));
    e.del("comp").await;
    e.del("tt").await;
    e.del("top").await;
    run_stdout(
        "qemu-img",
        &["compare", top.to_str().unwrap(), comp.to_str().unwrap()],
    );
    run_stdout("qemu-img", &["check", "-q", comp.to_str().unwrap()]);
    let map = run_stdout(
        "qemu-img",
        &["map", "--output=json", comp.to_str().unwrap()],
    );
    assert!(map.contains("\"compressed\": true"), "{map}");
    run_stdout(
        "qemu-img",
        &["compare", top.to_str().unwrap(), tgt_top.to_str().unwrap()],
    );
    let info = run_stdout(
        "qemu-img",
        &["map", "--output=json", tgt_top.to_str().unwrap()],
    );
    assert!(
        info.contains("\"depth\": 1"),
        "the rest stays in the backing file: {info}"
    );
}

/// `speed` bounds the copy while it runs, not only on average: with 64 workers a copy is
/// admitted only when the limit has room (QEMU's block-copy), so a 32 MiB backup at 4 MiB/s
/// has copied about 4 MiB after one second (it used to report 32 MiB and then sleep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_speed_limits_copies_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(
        dir.path(),
        "src.qcow2",
        32 * MIB,
        None,
        &["write -P 7 0 32M"],
    );
    let t = qcow2_image(dir.path(), "t.qcow2", 32 * MIB, None, &[]);
    let e = Env::new();
    e.add_qcow2("src", &src).await;
    e.add_qcow2("t", &t).await;
    blockdev_backup(
        &e.env,
        &args(
            json!({"job-id": "b", "device": "src", "target": "t", "sync": "full",
                     "speed": 4 * MIB, "x-perf": {"max-workers": 64}}),
        ),
        None,
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let info = e.env.jobs.query_jobs();
    let done = info[0]["current-progress"].as_u64().unwrap();
    // 1 s at 4 MiB/s, plus the copy admitted at once and the one running: 1 MiB chunks.
    assert!(
        (2 * MIB..=7 * MIB).contains(&done),
        "copied {done} bytes after 1 s at 4 MiB/s"
    );
    e.env.jobs.block_job_cancel("b", true).unwrap();
    e.wait_gone("b").await;
}
