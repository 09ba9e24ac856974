//! Active commit (block-commit with top = the active layer) on a three-image chain made by
//! qemu-img, with a guest writer on the top; event sequences as qemu-storage-daemon 10.0.2
//! emits them (`len`/`offset` dropped).

mod mirror_common;

use std::sync::Arc;
use std::time::Duration;

use mirror_common::*;
use parking_lot::Mutex;
use serde_json::json;
use strata_blockjobs::mirror::{ActiveCommitArgs, start_active_commit};
use strata_graph::Graph;
use strata_job::{JobStatus, OnError};

const SIZE: u64 = 16 * MIB;

struct Chain {
    _dir: tempfile::TempDir,
    paths: [std::path::PathBuf; 3],
    h: Harness,
    export: Arc<strata_graph::Link>,
    base: String,
    mid: String,
}

async fn chain() -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let b = qcow2_image(dir.path(), "base.qcow2", SIZE, None, &["write -P 1 0 4M"]);
    let m = qcow2_image(
        dir.path(),
        "mid.qcow2",
        SIZE,
        Some(&b),
        &["write -P 2 1M 1M"],
    );
    let t = qcow2_image(
        dir.path(),
        "top.qcow2",
        SIZE,
        Some(&m),
        &["write -P 3 2M 512k"],
    );
    let mut g = Graph::new();
    add_qcow2(&mut g, "top", &t).await;
    let mid = g.chain_below("top").unwrap();
    let base = g.chain_below(&mid).unwrap();
    assert!(g.node(&base).unwrap().read_only);
    let export = export(&mut g, "top");
    Chain {
        _dir: dir,
        paths: [b, m, t],
        h: harness(g),
        export,
        base,
        mid,
    }
}

fn args(c: &Chain) -> ActiveCommitArgs {
    ActiveCommitArgs {
        job_id: "job0".into(),
        top: "top".into(),
        base: c.base.clone(),
        speed: 0,
        on_error: OnError::Report,
        filter_node_name: None,
        auto_finalize: true,
        auto_dismiss: true,
    }
}

fn commit_ev(name: &str) -> String {
    ev(
        name,
        json!({"device": "job0", "speed": 0, "type": "commit"}),
    )
}

fn completed() -> Vec<String> {
    let mut v = s(&["created", "running", "ready"]);
    v.push(commit_ev("BLOCK_JOB_READY"));
    v.extend(s(&["waiting", "pending"]));
    v.push(commit_ev("BLOCK_JOB_COMPLETED"));
    v.extend(s(&["concluded", "null"]));
    v
}

async fn close(c: &Chain) {
    let mut g = c.h.drop_backends().await;
    g.remove_node("top").await.unwrap();
    assert!(g.node_names().is_empty(), "{:?}", g.node_names());
    drop(g);
    for p in &c.paths {
        check(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_while_writing_then_pivot() {
    let c = chain().await;
    let h = &c.h;
    let model = {
        let g = h.env.graph.lock().await;
        Arc::new(Mutex::new(read_all(&node(&g, "top")).await))
    };
    start_active_commit(&h.env, args(&c)).await.unwrap();
    {
        let g = h.env.graph.lock().await;
        assert!(
            !g.node(&c.base).unwrap().read_only,
            "base reopened read-write"
        );
        // The chain is frozen while the job runs.
        assert!(g.child(&c.mid, "backing").unwrap().frozen);
    }
    let w = Writer::start(
        c.export.clone(),
        vec![model.clone()],
        77,
        Some(Duration::from_millis(2)),
    );
    h.wait_status("job0", JobStatus::Ready).await;
    let info = h.env.jobs.query_block_jobs();
    assert_eq!(info[0]["type"], "commit");
    assert!(info[0].get("actively-synced").is_none());
    assert_eq!(h.env.jobs.query_jobs()[0]["type"], "commit");
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.env.jobs.job_complete("job0").unwrap();
    h.wait_gone("job0").await;
    w.stop().await;
    let g = h.env.graph.lock().await;
    assert!(
        reaches(&g, &c.export, &c.base),
        "the export now uses the base"
    );
    assert!(!g.child(&c.mid, "backing").unwrap().frozen);
    let base = node(&g, &c.base);
    drop(g);
    // Further writes land in the base.
    let mut b = strata_core::IoBuf::zeroed(4096);
    b.fill(0x77);
    strata_core::BlockNode::write(&*c.export, 8 * MIB, b, Default::default())
        .await
        .unwrap();
    model.lock()[8 * MIB as usize..8 * MIB as usize + 4096].fill(0x77);
    let data = read_all(&base).await;
    assert_eq!(first_diff(&data, &model.lock()), None);
    assert_eq!(h.events(), completed());
    close(&c).await;
    let info = qemu_img(&["info", "--backing-chain", c.paths[0].to_str().unwrap()]);
    assert_eq!(info.matches("image:").count(), 1, "{info}");
    // The base alone holds everything the guest saw.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-c", "read -P 119 8M 4k"])
        .arg(&c.paths[0])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 4096/4096"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_cancel_in_ready_completes_without_pivot() {
    let c = chain().await;
    let h = &c.h;
    start_active_commit(&h.env, args(&c)).await.unwrap();
    h.wait_status("job0", JobStatus::Ready).await;
    // qsd: len = offset = the bytes allocated above the base (1 MiB + 512 KiB).
    let info = h.env.jobs.query_block_jobs();
    assert_eq!(info[0]["len"].as_u64(), Some(1536 * 1024), "{info:?}");
    h.env.jobs.block_job_cancel("job0", false).unwrap();
    h.wait_gone("job0").await;
    let g = h.env.graph.lock().await;
    assert!(reaches(&g, &c.export, "top"));
    // As qsd: the base stays read-write after a soft cancel.
    assert!(!g.node(&c.base).unwrap().read_only);
    let top = read_all(&node(&g, "top")).await;
    let base = read_all(&node(&g, &c.base)).await;
    drop(g);
    assert_eq!(
        first_diff(&top, &base),
        None,
        "the base holds the committed data"
    );
    assert_eq!(h.events(), completed());
    close(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_cancel_puts_the_base_back_read_only() {
    let c = chain().await;
    let h = &c.h;
    start_active_commit(&h.env, args(&c)).await.unwrap();
    h.wait_status("job0", JobStatus::Ready).await;
    h.env.jobs.block_job_cancel("job0", true).unwrap();
    h.wait_gone("job0").await;
    let g = h.env.graph.lock().await;
    assert!(reaches(&g, &c.export, "top"));
    assert!(g.node(&c.base).unwrap().read_only);
    drop(g);
    let mut want = s(&["created", "running", "ready"]);
    want.push(commit_ev("BLOCK_JOB_READY"));
    want.push("aborting".into());
    want.push(commit_ev("BLOCK_JOB_CANCELLED"));
    want.extend(s(&["concluded", "null"]));
    assert_eq!(h.events(), want);
    let err = h
        .env
        .jobs
        .block_job_change("job0", &json!({"type": "commit"}));
    assert!(err.is_err());
    close(&c).await;
}
