//! Strata's job extension members (docs/EXTENSIONS.md): off by default (replies and events
//! stay exactly qemu-storage-daemon's), and when enabled appended after QEMU's members with
//! sane values.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;
use strata_job::{JobOptions, JobStatus, JobType};

const EXT: [&str; 4] = ["rate", "remaining", "eta-ms", "phase"];

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn off_by_default() {
    let (m, sink) = manager();
    m.create(
        JobOptions::new("s"),
        TestJob::new(Plan::new(JobType::Stream)),
    )
    .unwrap();
    m.start("s").unwrap();
    wait(&m, "s", JobStatus::Null).await;
    for (_, data) in sink.events() {
        for k in EXT {
            assert!(data.get(k).is_none(), "{data}");
        }
    }
}

#[tokio::test]
async fn rate_remaining_eta_and_phase_when_enabled() {
    let (m, sink) = manager();
    m.set_extensions(true);
    // 8 chunks of 1 MiB, 100 ms each: about 10 MiB/s.
    let mut plan = Plan::mirror();
    plan.chunks = 8;
    plan.chunk = 1 << 20;
    plan.io_time = Duration::from_millis(100);
    m.create(JobOptions::new("j"), TestJob::new(plan)).unwrap();
    m.start("j").unwrap();
    tokio::time::sleep(Duration::from_millis(450)).await;
    let q = &m.query_jobs()[0];
    let b = &m.query_block_jobs()[0];
    // QEMU's members first, untouched; the extension members last.
    let k = keys(q);
    assert_eq!(k[k.len() - 4..], EXT.map(String::from), "{q}");
    let k = keys(b);
    assert_eq!(k[k.len() - 4..], EXT.map(String::from), "{b}");
    let (cur, total) = (
        q["current-progress"].as_u64().unwrap(),
        q["total-progress"].as_u64().unwrap(),
    );
    assert_eq!(q["remaining"].as_u64().unwrap(), total - cur, "{q}");
    let rate = q["rate"].as_u64().unwrap();
    assert!((4 << 20..=20 << 20).contains(&rate), "about 10 MiB/s: {q}");
    let eta = q["eta-ms"].as_u64().unwrap();
    assert!((100..=2000).contains(&eta), "{q}");
    assert_eq!(q["phase"], "running", "{q}");
    wait(&m, "j", JobStatus::Ready).await;
    let q = &m.query_jobs()[0];
    assert_eq!(
        (q["phase"].as_str(), q["remaining"].as_u64()),
        (Some("ready"), Some(0))
    );
    assert_eq!(q["eta-ms"], 0);
    m.job_complete("j").unwrap();
    wait(&m, "j", JobStatus::Null).await;
    let evs = sink.events();
    for name in ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"] {
        let (_, data) = evs.iter().find(|(n, _)| *n == name).unwrap();
        let k = keys(data);
        assert_eq!(k[k.len() - 4..], EXT.map(String::from), "{data}");
        assert_eq!(data["remaining"], 0, "{data}");
    }
    // JOB_STATUS_CHANGE stays as it is.
    assert!(
        evs.iter()
            .filter(|(n, _)| *n == "JOB_STATUS_CHANGE")
            .all(|(_, d)| keys(d) == ["status", "id"])
    );
}
