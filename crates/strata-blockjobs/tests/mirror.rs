//! blockdev-mirror against qcow2 images made by qemu-img, with a guest writer running
//! through an export-like link; event sequences are the ones qemu-storage-daemon 10.0.2
//! emits for the same scenarios (recorded with a QMP socket script, `len`/`offset` dropped).

mod mirror_common;

use std::sync::Arc;
use std::time::Duration;

use mirror_common::*;
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use strata_blockjobs::mirror::blockdev_mirror;
use strata_core::{BlockNode, DebugEvent, IoBuf, NodeRef, WriteFlags};
use strata_graph::perm::EdgeKind;
use strata_graph::{
    BlkdebugIoType, BlkdebugNode, BlkdebugOptions, EdgePerms, Graph, GraphNode, InjectErrorRule,
    NodeKind, NodeRec,
};
use strata_job::JobStatus;

const SIZE: u64 = 16 * MIB;

fn mirror_events() -> Vec<String> {
    vec![
        ev(
            "BLOCK_JOB_READY",
            json!({"device": "job0", "speed": 0, "type": "mirror"}),
        ),
        ev(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "job0", "speed": 0, "type": "mirror"}),
        ),
    ]
}

/// qsd: created, running, ready, BLOCK_JOB_READY, waiting, pending, BLOCK_JOB_COMPLETED,
/// concluded, null — for complete and for a soft cancel in READY alike.
fn completed_sequence() -> Vec<String> {
    let e = mirror_events();
    let mut v = s(&["created", "running", "ready"]);
    v.push(e[0].clone());
    v.extend(s(&["waiting", "pending"]));
    v.push(e[1].clone());
    v.extend(s(&["concluded", "null"]));
    v
}

struct Setup {
    _dir: tempfile::TempDir,
    src: std::path::PathBuf,
    tgt: std::path::PathBuf,
    h: Harness,
    export: Arc<strata_graph::Link>,
}

async fn setup(tgt_size: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(
        dir.path(),
        "s.qcow2",
        SIZE,
        None,
        &["write -P 1 0 4M", "write -P 2 8M 1M", "write -z 12M 1M"],
    );
    let tgt = qcow2_image(dir.path(), "t.qcow2", tgt_size, None, &[]);
    let mut g = Graph::new();
    add_qcow2(&mut g, "src", &src).await;
    add_qcow2(&mut g, "tgt", &tgt).await;
    let export = export(&mut g, "src");
    Setup {
        _dir: dir,
        src,
        tgt,
        h: harness(g),
        export,
    }
}

fn args(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

async fn close(st: &Setup) {
    let mut g = st.h.drop_backends().await;
    for n in ["src", "tgt"] {
        if g.node(n).is_some() && g.parents_of(n).next().is_none() {
            g.remove_node(n).await.unwrap();
        }
    }
    drop(g);
    check(&st.src);
    check(&st.tgt);
}

/// Mirror with a writer running; then complete (pivot) or soft-cancel.
async fn scenario(sync: &str, mode: &str, pivot: bool) {
    let st = setup(SIZE).await;
    let h = &st.h;
    let src_model = {
        let g = h.env.graph.lock().await;
        read_all(&node(&g, "src")).await
    };
    // What the target must end up holding: the source for full/top (the source has no
    // backing, so top copies what is allocated, the rest of the fresh target reads as
    // zeroes too); for none only the writes made while the job runs.
    let src_m = Arc::new(Mutex::new(src_model.clone()));
    let tgt_m = Arc::new(Mutex::new(src_model));
    // Bytes the writer touched (it never writes zero bytes).
    let touched = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    blockdev_mirror(
        &h.env,
        &args(json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": sync, "copy-mode": mode})),
    )
    .await
    .unwrap();
    // Write-blocking converges under a sustained writer; background needs a slower one.
    let pause = if mode == "write-blocking" {
        None
    } else {
        Some(Duration::from_millis(3))
    };
    let w = Writer::start(
        st.export.clone(),
        vec![src_m.clone(), tgt_m.clone(), touched.clone()],
        0x5eed ^ sync.len() as u64,
        pause,
    );
    h.wait_status("job0", JobStatus::Ready).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let info = h.env.jobs.query_block_jobs();
    assert_eq!(info[0]["type"], "mirror");
    assert_eq!(info[0]["ready"], true);
    if mode == "write-blocking" {
        assert_eq!(info[0]["actively-synced"], true, "{info:?}");
    }
    // sync none copies whole granules (64 KiB, the target's cluster size) around what was
    // written, and nothing else: the rest of the fresh target reads as zeroes. In
    // write-blocking mode (QEMU's do_sync_target_write) the target takes exactly the
    // written bytes and no granule around them.
    let none_model = |src: &[u8], touched: &[u8]| -> Vec<u8> {
        let g = if mode == "write-blocking" { 1 } else { 65536 };
        let mut out = vec![0u8; src.len()];
        for (i, chunk) in touched.chunks(g).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                out[i * g..(i + 1) * g].copy_from_slice(&src[i * g..(i + 1) * g]);
            }
        }
        out
    };
    if pivot {
        // With sync none a write that lands after the pivot in a granule never written
        // before has zeroes around it on the target, not the source's old data; stop the
        // writer first so the granule model stays exact.
        let w = if sync == "none" {
            assert!(w.stop().await > 0);
            None
        } else {
            Some(w)
        };
        h.env.jobs.job_complete("job0").unwrap();
        h.wait_gone("job0").await;
        if let Some(w) = w {
            assert!(w.stop().await > 0);
        }
        if sync == "none" {
            let m = none_model(&src_m.lock(), &touched.lock());
            *tgt_m.lock() = m;
        }
        let g = h.env.graph.lock().await;
        assert!(
            reaches(&g, &st.export, "tgt"),
            "the export now writes the target"
        );
        assert_eq!(
            g.node_names().len(),
            4,
            "mirror_top is gone: {:?}",
            g.node_names()
        );
        // Further writes land in the target only.
        let node_t = node(&g, "tgt");
        let node_s = node(&g, "src");
        drop(g);
        let mut b = IoBuf::zeroed(4096);
        b.fill(0xee);
        (&*st.export as &dyn BlockNode)
            .write(0, b, WriteFlags::default())
            .await
            .unwrap();
        tgt_m.lock()[..4096].fill(0xee);
        let t = read_all(&node_t).await;
        assert_eq!(
            first_diff(&t, &tgt_m.lock()),
            None,
            "target differs from the model"
        );
        let s_now = read_all(&node_s).await;
        assert_ne!(
            s_now[..4096],
            [0xee; 4096][..],
            "the source no longer takes writes"
        );
    } else {
        // The consistent copy is of the source when the cancel lands: stop writing first.
        w.stop().await;
        if sync == "none" {
            let m = none_model(&src_m.lock(), &touched.lock());
            *tgt_m.lock() = m;
        }
        h.env.jobs.block_job_cancel("job0", false).unwrap();
        h.wait_gone("job0").await;
        let g = h.env.graph.lock().await;
        assert!(reaches(&g, &st.export, "src"), "no pivot on a soft cancel");
        let t = read_all(&node(&g, "tgt")).await;
        drop(g);
        assert_eq!(
            first_diff(&t, &tgt_m.lock()),
            None,
            "target differs from the model"
        );
    }
    assert_eq!(h.events(), completed_sequence());
    close(&st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_background_complete() {
    scenario("full", "background", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_write_blocking_complete() {
    scenario("full", "write-blocking", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_background_complete() {
    scenario("top", "background", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_write_blocking_complete() {
    scenario("top", "write-blocking", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_background_complete() {
    scenario("none", "background", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_write_blocking_complete() {
    scenario("none", "write-blocking", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_background_soft_cancel() {
    scenario("full", "background", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_write_blocking_soft_cancel() {
    scenario("full", "write-blocking", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_write_blocking_soft_cancel() {
    scenario("top", "write-blocking", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_cancel_in_ready_and_progress() {
    let st = setup(SIZE).await;
    let h = &st.h;
    blockdev_mirror(
        &h.env,
        &args(json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"})),
    )
    .await
    .unwrap();
    h.wait_status("job0", JobStatus::Ready).await;
    // qsd: len = offset = the disk size for sync full.
    let info = h.env.jobs.query_block_jobs();
    assert_eq!(
        (info[0]["len"].as_u64(), info[0]["offset"].as_u64()),
        (Some(SIZE), Some(SIZE))
    );
    assert_eq!(info[0]["actively-synced"], false);
    h.env.jobs.block_job_cancel("job0", true).unwrap();
    h.wait_gone("job0").await;
    let g = h.env.graph.lock().await;
    assert!(reaches(&g, &st.export, "src"));
    assert_eq!(g.node_names().len(), 4);
    drop(g);
    let mut want = s(&["created", "running", "ready"]);
    want.push(mirror_events()[0].clone());
    want.extend(s(&["aborting"]));
    want.push(ev(
        "BLOCK_JOB_CANCELLED",
        json!({"device": "job0", "speed": 0, "type": "mirror"}),
    ));
    want.extend(s(&["concluded", "null"]));
    assert_eq!(h.events(), want);
    close(&st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_progress_counts_allocated_bytes() {
    let st = setup(SIZE).await;
    let h = &st.h;
    blockdev_mirror(
        &h.env,
        &args(json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "top"})),
    )
    .await
    .unwrap();
    h.wait_status("job0", JobStatus::Ready).await;
    let info = h.env.jobs.query_block_jobs();
    // 4M + 1M of data + the 1M zero cluster range.
    assert_eq!(info[0]["len"].as_u64(), Some(6 * MIB), "{info:?}");
    h.env.jobs.job_complete("job0").unwrap();
    h.wait_gone("job0").await;
    close(&st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_mismatch_fails_inside_the_job() {
    let st = setup(SIZE / 2).await;
    let h = &st.h;
    blockdev_mirror(
        &h.env,
        &args(json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"})),
    )
    .await
    .unwrap();
    h.wait_gone("job0").await;
    let mut want = s(&["created", "running", "aborting"]);
    want.push(ev(
        "BLOCK_JOB_COMPLETED",
        json!({"device": "job0", "speed": 0, "type": "mirror", "error": "Source and target image have different sizes"}),
    ));
    want.extend(s(&["concluded", "null"]));
    assert_eq!(h.events(), want);
    let g = h.env.graph.lock().await;
    assert!(reaches(&g, &st.export, "src"));
    drop(g);
    close(&st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_errors_have_qemu_texts() {
    let st = setup(SIZE).await;
    let h = &st.h;
    let extra = dir_extra();
    for (e, text) in extra {
        let mut a =
            args(json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"}));
        for (k, v) in e.as_object().unwrap() {
            a.insert(k.clone(), v.clone());
        }
        let err = blockdev_mirror(&h.env, &a).await.unwrap_err();
        assert_eq!(err.desc, text, "{e}");
        assert_eq!(err.class, "GenericError");
    }
    // Only the speed error happens after the job exists: created, null (as qsd).
    assert_eq!(h.events(), s(&["created", "null"]));
    // A node with a job on it is no longer a root node.
    blockdev_mirror(
        &h.env,
        &args(json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "none"})),
    )
    .await
    .unwrap();
    let err = blockdev_mirror(
        &h.env,
        &args(json!({"job-id": "job1", "device": "src", "target": "tgt", "sync": "none"})),
    )
    .await
    .unwrap_err();
    assert_eq!(err.desc, "Need a root block node");
    h.wait_status("job0", JobStatus::Ready).await;
    // block-job-change: same mode is a no-op, background → write-blocking works, back not.
    let ch = |m: &str| json!({"type": "mirror", "copy-mode": m});
    h.env
        .jobs
        .block_job_change("job0", &ch("background"))
        .unwrap();
    h.env
        .jobs
        .block_job_change("job0", &ch("write-blocking"))
        .unwrap();
    let err = h
        .env
        .jobs
        .block_job_change("job0", &ch("background"))
        .unwrap_err();
    assert_eq!(
        err.desc,
        "Change to copy mode 'background' is not implemented"
    );
    // Now in write-blocking mode the job reports actively-synced once idle.
    let mut synced = false;
    for _ in 0..200 {
        if h.env.jobs.query_block_jobs()[0]["actively-synced"] == true {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(synced);
    h.env.jobs.block_job_cancel("job0", true).unwrap();
    h.wait_gone("job0").await;
    close(&st).await;
}

fn dir_extra() -> Vec<(Value, &'static str)> {
    vec![
        (
            json!({"speed": -1}),
            "Parameter 'speed' expects a non-negative value",
        ),
        (
            json!({"granularity": 256}),
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ),
        (
            json!({"granularity": 12288}),
            "Parameter 'granularity' expects a power of 2",
        ),
        (json!({"buf-size": -1}), "Invalid parameter 'buf-size'"),
        (
            json!({"sync": "incremental"}),
            "Sync mode 'incremental' not supported",
        ),
        (
            json!({"sync": "bitmap"}),
            "Sync mode 'bitmap' not supported",
        ),
        (json!({"target": "src"}), "Can't mirror node into itself"),
        (
            json!({"device": "nope"}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (
            json!({"target": "nope"}),
            "Cannot find device='nope' nor node-name='nope'",
        ),
        (
            json!({"replaces": "nope"}),
            "Failed to find node with node-name='nope'",
        ),
        (
            json!({"replaces": "tgt"}),
            "Cannot replace 'tgt' by a node mirrored from 'src', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data",
        ),
        (json!({"job-id": "1x"}), "Invalid job ID '1x'"),
    ]
}

/// A target behind blkdebug whose first data write fails with EIO (`pwritev` activates an
/// `inject-error` rule for writes, once), as qsd was run with
/// `{"driver": "blkdebug", "image": ..., "inject-error": [{"event": "pwritev", "iotype": "write", "once": true}]}`.
async fn error_setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(dir.path(), "s.qcow2", SIZE, None, &["write -P 1 0 4M"]);
    let tgt = qcow2_image(dir.path(), "t.qcow2", SIZE, None, &[]);
    let mut g = Graph::new();
    add_qcow2(&mut g, "src", &src).await;
    add_qcow2(&mut g, "tq", &tgt).await;
    let tq: NodeRef = node(&g, "tq");
    let link = strata_graph::Link::new(tq);
    let opts = BlkdebugOptions {
        inject_error: vec![InjectErrorRule {
            event: DebugEvent::Pwritev,
            state: 0,
            iotype: Some(BlkdebugIoType::Write),
            errno: 5,
            sector: None,
            once: true,
            immediately: false,
        }],
        ..Default::default()
    };
    let bd = BlkdebugNode::new(link.clone(), opts).unwrap();
    g.insert_node(NodeRec {
        name: "tgt".into(),
        auto_named: false,
        node: GraphNode::new("tgt", Arc::new(bd)),
        kind: NodeKind::Filter,
        options: json!({"driver": "blkdebug", "node-name": "tgt", "image": "tq"}),
        read_only: false,
        monitor_owned: true,
    })
    .unwrap();
    g.add_edge(
        strata_graph::User::Node("tgt".into()),
        "tq",
        "file",
        EdgePerms::Derived(EdgeKind::Filtered),
        Some(link),
    )
    .unwrap();
    let export = export(&mut g, "src");
    Setup {
        _dir: dir,
        src,
        tgt,
        h: harness(g),
        export,
    }
}

fn error_event(action: &str) -> String {
    ev(
        "BLOCK_JOB_ERROR",
        json!({"device": "job0", "operation": "write", "action": action}),
    )
}

async fn error_scenario(policy: &str) -> Setup {
    let st = error_setup().await;
    blockdev_mirror(
        &st.h.env,
        &args(json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full", "on-target-error": policy})),
    )
    .await
    .unwrap();
    st
}

async fn finish_and_compare(st: &Setup) {
    let h = &st.h;
    h.wait_status("job0", JobStatus::Ready).await;
    assert_eq!(h.env.jobs.query_block_jobs()[0]["actively-synced"], false);
    h.env.jobs.job_complete("job0").unwrap();
    h.wait_gone("job0").await;
    let g = h.env.graph.lock().await;
    let t = read_all(&node(&g, "tq")).await;
    let s = read_all(&node(&g, "src")).await;
    assert!(reaches(&g, &st.export, "tgt"));
    drop(g);
    assert_eq!(first_diff(&t, &s), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_error_report_fails_the_job() {
    let st = error_scenario("report").await;
    let h = &st.h;
    h.wait_gone("job0").await;
    let mut want = s(&["created", "running"]);
    want.push(error_event("report"));
    want.push("aborting".into());
    want.push(ev(
        "BLOCK_JOB_COMPLETED",
        json!({"device": "job0", "speed": 0, "type": "mirror", "error": "Input/output error"}),
    ));
    want.extend(s(&["concluded", "null"]));
    assert_eq!(h.events(), want);
    let g = h.env.graph.lock().await;
    assert!(reaches(&g, &st.export, "src"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_error_ignore_retries_and_completes() {
    let st = error_scenario("ignore").await;
    finish_and_compare(&st).await;
    let mut want = s(&["created", "running"]);
    want.push(error_event("ignore"));
    want.extend(completed_sequence()[2..].to_vec());
    assert_eq!(st.h.events(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_error_stop_pauses_until_resume() {
    let st = error_scenario("stop").await;
    let h = &st.h;
    h.wait_status("job0", JobStatus::Paused).await;
    let info = h.env.jobs.query_block_jobs();
    assert_eq!(info[0]["io-status"], "failed");
    assert_eq!(info[0]["paused"], true);
    assert_eq!(info[0]["status"], "paused");
    h.env.jobs.block_job_resume("job0").unwrap();
    finish_and_compare(&st).await;
    let mut want = s(&["created", "running"]);
    want.push(error_event("stop"));
    want.extend(s(&["paused", "running"]));
    want.extend(completed_sequence()[2..].to_vec());
    assert_eq!(h.events(), want);
}
