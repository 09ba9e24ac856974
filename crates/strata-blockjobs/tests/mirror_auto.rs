//! `copy-mode: auto` (a Strata extension): under a guest writer that outpaces the
//! background copy (here: a full-speed writer against a job limited to 4 MiB/s), a
//! background mirror never converges, while an `auto` mirror switches to write-blocking,
//! reaches READY, and after `job-complete` the target holds exactly what the guest wrote.
//! Also checks the job's extension members (docs/EXTENSIONS.md) along the way.

mod mirror_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_common::*;
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use strata_blockjobs::mirror::blockdev_mirror;
use strata_graph::Graph;
use strata_job::JobStatus;

const SIZE: u64 = 8 * MIB;
const SPEED: u64 = 4 * MIB;

struct Setup {
    _dir: tempfile::TempDir,
    h: Harness,
    export: Arc<strata_graph::Link>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_image(dir.path(), "s.qcow2", SIZE, None, &["write -P 7 0 8M"]);
    let tgt = qcow2_image(dir.path(), "t.qcow2", SIZE, None, &[]);
    let mut g = Graph::new();
    add_qcow2(&mut g, "src", &src).await;
    add_qcow2(&mut g, "tgt", &tgt).await;
    let export = export(&mut g, "src");
    let h = harness(g);
    h.env.jobs.set_extensions(true);
    Setup {
        _dir: dir,
        h,
        export,
    }
}

fn args(mode: &str) -> Map<String, Value> {
    json!({"job-id": "m", "device": "src", "target": "tgt", "sync": "full",
           "copy-mode": mode, "speed": SPEED})
    .as_object()
    .unwrap()
    .clone()
}

fn job(h: &Harness) -> Map<String, Value> {
    h.env.jobs.query_block_jobs()[0]
        .as_object()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_mirror_does_not_converge_under_this_writer() {
    let st = setup().await;
    let h = &st.h;
    let model = Arc::new(Mutex::new(vec![7u8; SIZE as usize]));
    let w = Writer::start(st.export.clone(), vec![model], 11, None);
    blockdev_mirror(&h.env, &args("background")).await.unwrap();
    // Twice the time the copy alone would need at the speed limit.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let j = job(h);
    assert_eq!(j["ready"], false, "{j:?}");
    assert_eq!(j["phase"], "bulk", "{j:?}");
    assert!(j["dirty-rate"].as_u64().unwrap() > 0, "{j:?}");
    assert!(j["remaining"].as_u64().unwrap() > 0, "{j:?}");
    h.env.jobs.block_job_cancel("m", true).unwrap();
    h.wait_gone("m").await;
    assert!(w.stop().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mirror_reaches_ready_and_target_equals_source() {
    let st = setup().await;
    let h = &st.h;
    let model = Arc::new(Mutex::new(vec![7u8; SIZE as usize]));
    let w = Writer::start(st.export.clone(), vec![model.clone()], 12, None);
    let t0 = Instant::now();
    blockdev_mirror(&h.env, &args("auto")).await.unwrap();
    // Watch the extension members until READY.
    let mut phases = Vec::new();
    loop {
        let j = job(h);
        let phase = j["phase"].as_str().unwrap().to_string();
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
        let total = j["len"].as_u64().unwrap();
        let done = j["offset"].as_u64().unwrap();
        assert_eq!(j["remaining"].as_u64().unwrap(), total - done, "{j:?}");
        assert!(j["copy-rate"].is_u64() && j["dirty-rate"].is_u64(), "{j:?}");
        if j["ready"] == true {
            assert_eq!(j["convergence"], "converged", "{j:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "auto mirror never READY: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It started in background mode and switched to write-blocking.
    assert_eq!(
        phases.first().map(String::as_str),
        Some("bulk"),
        "{phases:?}"
    );
    assert!(phases.iter().any(|p| p == "active"), "{phases:?}");
    assert_eq!(
        phases.last().map(String::as_str),
        Some("synced"),
        "{phases:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let j = job(h);
    assert_eq!(j["actively-synced"], true, "{j:?}");
    assert!(j["copy-rate"].as_u64().unwrap() > 0, "{j:?}");
    // Complete under the writer; it keeps writing into the target after the pivot.
    h.env.jobs.job_complete("m").unwrap();
    h.wait_gone("m").await;
    let n = w.stop().await;
    assert!(n > 100, "the writer kept writing ({n} writes)");
    let g = h.env.graph.lock().await;
    assert!(reaches(&g, &st.export, "tgt"), "pivoted to the target");
    let t = read_all(&node(&g, "tgt")).await;
    drop(g);
    assert_eq!(
        first_diff(&t, &model.lock()),
        None,
        "target differs from the guest's writes"
    );
    let evs = h.events();
    assert!(
        evs.iter().any(|e| e.starts_with("BLOCK_JOB_READY")),
        "{evs:?}"
    );
    assert!(
        evs.iter().any(|e| e.starts_with("BLOCK_JOB_COMPLETED")),
        "{evs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_is_a_copy_mode_for_job_change() {
    let st = setup().await;
    let h = &st.h;
    blockdev_mirror(&h.env, &args("auto")).await.unwrap();
    let ch = |m: &str| json!({"type": "mirror", "copy-mode": m});
    // Same mode: no-op; auto → write-blocking is allowed, like background → write-blocking.
    h.env.jobs.block_job_change("m", &ch("auto")).unwrap();
    h.env
        .jobs
        .block_job_change("m", &ch("write-blocking"))
        .unwrap();
    let e = h.env.jobs.block_job_change("m", &ch("auto")).unwrap_err();
    assert!(e.to_string().contains("not implemented"), "{e}");
    h.env.jobs.block_job_set_speed("m", 0).unwrap();
    h.wait_status("m", JobStatus::Ready).await;
    h.env.jobs.block_job_cancel("m", true).unwrap();
    h.wait_gone("m").await;
}
