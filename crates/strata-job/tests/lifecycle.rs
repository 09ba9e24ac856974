//! Event sequences, verb errors and queries, checked against what qemu-storage-daemon
//! 10.0.2 printed for the same scenarios (block-stream, blockdev-mirror,
//! blockdev-backup with blkdebug-injected errors, a grouped transaction). The
//! `"timestamp"` member is left out; everything else is the daemon's text verbatim.

mod common;

use common::{Plan, TestJob, lines, manager, qemu_json, wait};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_job::{ENOSPC, JobDriver, JobOptions, JobStatus, JobType, OnError, VerbError};

fn err(desc: &str) -> Result<(), VerbError> {
    Err(VerbError::generic(desc))
}

async fn wait_offset(m: &strata_job::JobManager, id: &str, offset: u64) {
    let t = Instant::now();
    loop {
        let jobs = m.query_jobs();
        let cur = jobs
            .iter()
            .find(|j| j["id"] == id)
            .map(|j| j["current-progress"].as_u64().unwrap());
        if cur == Some(offset) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "offset {cur:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn stream_success() {
    let (m, sink) = manager();
    let job = TestJob::new(Plan::new(JobType::Stream));
    m.create(JobOptions::new("job0"), job.clone()).unwrap();
    m.start("job0").unwrap();
    wait(&m, "job0", JobStatus::Null).await;
    assert_eq!(
        lines(&sink.take()),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "job0"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "job0"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "job0"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "job0"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "job0", "len": 67108864, "offset": 67108864, "speed": 0, "type": "stream"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "job0"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "job0"}}"#,
        ]
    );
    assert_eq!(job.log(), ["prepare", "commit", "clean"]);
    assert!(m.query_jobs().is_empty());
}

#[tokio::test]
async fn error_texts_for_unknown_and_bad_ids() {
    let (m, _sink) = manager();
    assert_eq!(m.job_pause("nope"), err("Job not found"));
    let dna = Err(VerbError {
        class: "DeviceNotActive",
        desc: "Block job 'nope' not found".into(),
    });
    assert_eq!(m.block_job_pause("nope"), dna);
    assert_eq!(m.block_job_set_speed("nope", -1), dna);
    let drv = TestJob::new(Plan::new(JobType::Stream));
    assert_eq!(
        m.create(JobOptions::new("1bad"), drv.clone()),
        err("Invalid job ID '1bad'")
    );
    assert_eq!(
        m.create(JobOptions::new(""), drv.clone()),
        err("Invalid job ID ''")
    );
    m.create(JobOptions::new("a-1.b_c"), drv.clone()).unwrap();
    assert_eq!(
        m.create(JobOptions::new("a-1.b_c"), drv.clone()),
        err("Job ID 'a-1.b_c' already in use")
    );
    // A created job counts as paused (pause count 1) until started.
    let q = m.query_block_jobs();
    assert_eq!(q[0]["paused"], true);
    assert_eq!(q[0]["status"], "created");
    m.early_fail("a-1.b_c").unwrap();
    assert_eq!(m.job_count(), 0);
}

#[tokio::test]
async fn auto_finalize_off_and_auto_dismiss_off() {
    let (m, sink) = manager();
    let mut opts = JobOptions::new("job1");
    opts.auto_finalize = false;
    opts.auto_dismiss = false;
    opts.speed = 1048576;
    let mut plan = Plan::new(JobType::Stream);
    plan.chunks = 0;
    m.create(opts, TestJob::new(plan)).unwrap();
    m.start("job1").unwrap();
    wait(&m, "job1", JobStatus::Pending).await;
    // query-block-jobs / query-jobs text as printed by the daemon.
    assert_eq!(
        qemu_json(&json!(m.query_block_jobs())),
        r#"[{"auto-finalize": false, "io-status": "ok", "device": "job1", "auto-dismiss": false, "busy": false, "len": 0, "offset": 0, "status": "pending", "paused": false, "speed": 1048576, "ready": false, "type": "stream"}]"#
    );
    assert_eq!(
        qemu_json(&json!(m.query_jobs())),
        r#"[{"current-progress": 0, "status": "pending", "total-progress": 0, "type": "stream", "id": "job1"}]"#
    );
    // Verb check comes before the speed check.
    assert_eq!(
        m.block_job_set_speed("job1", -1),
        err("Job 'job1' in state 'pending' cannot accept command verb 'set-speed'")
    );
    assert_eq!(
        m.job_complete("job1"),
        err("Job 'job1' in state 'pending' cannot accept command verb 'complete'")
    );
    assert_eq!(
        m.job_dismiss("job1"),
        err("Job 'job1' in state 'pending' cannot accept command verb 'dismiss'")
    );
    m.job_finalize("job1").unwrap();
    wait(&m, "job1", JobStatus::Concluded).await;
    assert_eq!(
        m.job_cancel("job1"),
        err("Job 'job1' in state 'concluded' cannot accept command verb 'cancel'")
    );
    assert_eq!(
        m.job_finalize("job1"),
        err("Job 'job1' in state 'concluded' cannot accept command verb 'finalize'")
    );
    m.job_dismiss("job1").unwrap();
    assert_eq!(m.job_dismiss("job1"), err("Job not found"));
    assert_eq!(
        lines(&sink.take()),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "job1"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "job1"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "job1"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "job1"}}"#,
            r#"{"event": "BLOCK_JOB_PENDING", "data": {"type": "stream", "id": "job1"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "job1", "len": 0, "offset": 0, "speed": 1048576, "type": "stream"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "job1"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "job1"}}"#,
        ]
    );
}

#[tokio::test]
async fn mirror_pause_resume_then_ready_standby_and_soft_cancel() {
    let (m, sink) = manager();
    let mut plan = Plan::mirror();
    plan.chunk = 16 << 20;
    let job = TestJob::new(plan);
    let mut opts = JobOptions::new("m");
    opts.speed = 8 * 1024 * 1024;
    m.create(opts, job.clone()).unwrap();
    m.start("m").unwrap();
    // First 16 MiB chunk done, now sleeping ~2 s on the 8 MiB/s limit.
    wait_offset(&m, "m", 16777216).await;
    assert_eq!(
        m.job_complete("m"),
        err("Job 'm' in state 'running' cannot accept command verb 'complete'")
    );
    assert_eq!(
        m.block_job_complete("m"),
        err("Job 'm' in state 'running' cannot accept command verb 'complete'")
    );
    assert_eq!(
        m.job_resume("m"),
        err("Can't resume a job that was not paused")
    );
    m.job_pause("m").unwrap();
    wait(&m, "m", JobStatus::Paused).await;
    assert_eq!(m.job_pause("m"), err("Job is already paused"));
    assert_eq!(m.block_job_pause("m"), err("Job is already paused"));
    assert_eq!(
        qemu_json(&json!(m.query_block_jobs())),
        r#"[{"auto-finalize": true, "io-status": "ok", "device": "m", "auto-dismiss": true, "busy": false, "len": 67108864, "offset": 16777216, "status": "paused", "paused": true, "speed": 8388608, "ready": false, "type": "mirror", "actively-synced": false}]"#
    );
    assert_eq!(
        m.block_job_cancel("m", false),
        err("The block job for device 'm' is currently paused")
    );
    assert_eq!(
        m.block_job_change("m", &json!({"type": "mirror"})),
        err("Job type does not support change")
    );
    m.job_resume("m").unwrap();
    wait(&m, "m", JobStatus::Running).await;
    m.block_job_set_speed("m", 0).unwrap();
    wait(&m, "m", JobStatus::Ready).await;
    assert_eq!(
        qemu_json(&json!(m.query_jobs())),
        r#"[{"current-progress": 67108864, "status": "ready", "total-progress": 67108864, "type": "mirror", "id": "m"}]"#
    );
    let q = &m.query_block_jobs()[0];
    assert_eq!(
        (q["ready"].clone(), q["paused"].clone()),
        (json!(true), json!(false))
    );
    m.job_pause("m").unwrap();
    wait(&m, "m", JobStatus::Standby).await;
    assert_eq!(m.query_block_jobs()[0]["ready"], true);
    m.job_resume("m").unwrap();
    wait(&m, "m", JobStatus::Ready).await;
    // Soft cancel in READY = complete without pivot: BLOCK_JOB_COMPLETED.
    m.block_job_cancel("m", false).unwrap();
    wait(&m, "m", JobStatus::Null).await;
    assert!(!job.pivoted.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        lines(&sink.take()),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "m"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "m"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "paused", "id": "m"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "m"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "ready", "id": "m"}}"#,
            r#"{"event": "BLOCK_JOB_READY", "data": {"device": "m", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "standby", "id": "m"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "ready", "id": "m"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "m"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "m"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "m", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "m"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "m"}}"#,
        ]
    );
}

#[tokio::test]
async fn mirror_ready_forced_cancel() {
    let (m, sink) = manager();
    let job = TestJob::new(Plan::mirror());
    m.create(JobOptions::new("m2"), job.clone()).unwrap();
    m.start("m2").unwrap();
    wait(&m, "m2", JobStatus::Ready).await;
    m.block_job_cancel("m2", true).unwrap();
    wait(&m, "m2", JobStatus::Null).await;
    assert_eq!(
        lines(&sink.take()),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "m2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "m2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "ready", "id": "m2"}}"#,
            r#"{"event": "BLOCK_JOB_READY", "data": {"device": "m2", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "m2"}}"#,
            r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "m2", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "m2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "m2"}}"#,
        ]
    );
    assert_eq!(job.log(), ["abort", "clean"]);
}

#[tokio::test]
async fn mirror_ready_completed_with_manual_finalize_and_dismiss() {
    let (m, sink) = manager();
    let job = TestJob::new(Plan::mirror());
    let mut opts = JobOptions::new("m3");
    opts.auto_finalize = false;
    opts.auto_dismiss = false;
    m.create(opts, job.clone()).unwrap();
    m.start("m3").unwrap();
    wait(&m, "m3", JobStatus::Ready).await;
    m.job_complete("m3").unwrap();
    wait(&m, "m3", JobStatus::Pending).await;
    assert_eq!(
        qemu_json(&json!(m.query_jobs())),
        r#"[{"current-progress": 67108864, "status": "pending", "total-progress": 67108864, "type": "mirror", "id": "m3"}]"#
    );
    m.job_finalize("m3").unwrap();
    wait(&m, "m3", JobStatus::Concluded).await;
    assert_eq!(
        qemu_json(&json!(m.query_jobs())),
        r#"[{"current-progress": 67108864, "status": "concluded", "total-progress": 67108864, "type": "mirror", "id": "m3"}]"#
    );
    assert_eq!(
        qemu_json(&json!(m.query_block_jobs())),
        r#"[{"auto-finalize": false, "io-status": "ok", "device": "m3", "auto-dismiss": false, "busy": false, "len": 67108864, "offset": 67108864, "status": "concluded", "paused": false, "speed": 0, "ready": false, "type": "mirror", "actively-synced": false}]"#
    );
    m.job_dismiss("m3").unwrap();
    assert!(job.pivoted.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(job.log(), ["complete m3", "prepare", "commit", "clean"]);
    assert_eq!(
        lines(&sink.take()),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "m3"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "m3"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "ready", "id": "m3"}}"#,
            r#"{"event": "BLOCK_JOB_READY", "data": {"device": "m3", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "m3"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "m3"}}"#,
            r#"{"event": "BLOCK_JOB_PENDING", "data": {"type": "mirror", "id": "m3"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "m3", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "m3"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "m3"}}"#,
        ]
    );
}

fn slow_stream() -> Plan {
    // 64 MiB in 512 KiB chunks at 1 MiB/s: after the first chunk the job sleeps 0.5 s.
    let mut p = Plan::new(JobType::Stream);
    p.chunks = 128;
    p.chunk = 512 << 10;
    p
}

#[tokio::test]
async fn running_stream_forced_cancel() {
    let (m, sink) = manager();
    let mut opts = JobOptions::new("s");
    opts.speed = 1048576;
    m.create(opts, TestJob::new(slow_stream())).unwrap();
    m.start("s").unwrap();
    wait_offset(&m, "s", 524288).await;
    m.job_cancel("s").unwrap();
    wait(&m, "s", JobStatus::Null).await;
    assert_eq!(
        lines(&sink.take()),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "s"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "s"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "s"}}"#,
            r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "s", "len": 67108864, "offset": 524288, "speed": 1048576, "type": "stream"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "s"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "s"}}"#,
        ]
    );
}

#[tokio::test]
async fn soft_cancel_of_running_stream_is_forced_and_reports_canceled() {
    let (m, sink) = manager();
    let mut opts = JobOptions::new("s2");
    opts.speed = 1048576;
    opts.auto_dismiss = false;
    m.create(opts, TestJob::new(slow_stream())).unwrap();
    m.start("s2").unwrap();
    wait_offset(&m, "s2", 524288).await;
    m.block_job_cancel("s2", false).unwrap();
    wait(&m, "s2", JobStatus::Concluded).await;
    assert_eq!(
        qemu_json(&json!(m.query_jobs())),
        r#"[{"current-progress": 524288, "status": "concluded", "total-progress": 67108864, "type": "stream", "id": "s2", "error": "Operation canceled"}]"#
    );
    assert_eq!(
        qemu_json(&json!(m.query_block_jobs())),
        r#"[{"auto-finalize": true, "io-status": "ok", "device": "s2", "auto-dismiss": false, "busy": false, "len": 67108864, "offset": 524288, "status": "concluded", "paused": false, "speed": 1048576, "ready": false, "type": "stream", "error": "Operation canceled"}]"#
    );
    m.job_dismiss("s2").unwrap();
    let ev = lines(&sink.take());
    assert_eq!(
        ev[3],
        r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "s2", "len": 67108864, "offset": 524288, "speed": 1048576, "type": "stream"}}"#
    );
    assert_eq!(ev.len(), 6);
}

#[tokio::test]
async fn failure_reports_completed_with_error() {
    let (m, sink) = manager();
    let mut plan = Plan::new(JobType::Backup);
    plan.io_error_at = Some((2, OnError::Report, 5));
    let job = TestJob::new(plan);
    let mut opts = JobOptions::new("b2");
    opts.auto_dismiss = false;
    m.create(opts, job.clone()).unwrap();
    m.start("b2").unwrap();
    wait(&m, "b2", JobStatus::Concluded).await;
    assert_eq!(
        qemu_json(&json!(m.query_block_jobs())),
        r#"[{"auto-finalize": true, "io-status": "ok", "device": "b2", "auto-dismiss": false, "busy": false, "len": 67108864, "offset": 33554432, "status": "concluded", "paused": false, "speed": 0, "ready": false, "type": "backup", "error": "Input/output error"}]"#
    );
    assert_eq!(
        qemu_json(&json!(m.query_jobs())),
        r#"[{"current-progress": 33554432, "status": "concluded", "total-progress": 67108864, "type": "backup", "id": "b2", "error": "Input/output error"}]"#
    );
    m.job_dismiss("b2").unwrap();
    assert_eq!(job.log(), ["abort", "clean"]);
    assert_eq!(
        lines(&sink.take()),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "b2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "b2"}}"#,
            r#"{"event": "BLOCK_JOB_ERROR", "data": {"device": "b2", "operation": "write", "action": "report"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "b2"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "b2", "len": 67108864, "offset": 33554432, "speed": 0, "type": "backup", "error": "Input/output error"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "b2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "b2"}}"#,
        ]
    );
}

#[tokio::test]
async fn error_policy_stop_sets_io_status_and_resume_retries() {
    let (m, sink) = manager();
    let mut plan = Plan::new(JobType::Backup);
    plan.chunks = 64;
    plan.chunk = 1 << 20;
    plan.io_error_at = Some((63, OnError::Stop, ENOSPC));
    let job = TestJob::new(plan);
    m.create(JobOptions::new("b"), job.clone()).unwrap();
    m.start("b").unwrap();
    wait(&m, "b", JobStatus::Paused).await;
    assert_eq!(
        qemu_json(&json!(m.query_block_jobs())),
        r#"[{"auto-finalize": true, "io-status": "nospace", "device": "b", "auto-dismiss": true, "busy": false, "len": 67108864, "offset": 66060288, "status": "paused", "paused": true, "speed": 0, "ready": false, "type": "backup"}]"#
    );
    assert_eq!(
        qemu_json(&json!(m.query_jobs())),
        r#"[{"current-progress": 66060288, "status": "paused", "total-progress": 67108864, "type": "backup", "id": "b"}]"#
    );
    assert_eq!(
        m.block_job_cancel("b", false),
        err("The block job for device 'b' is currently paused")
    );
    m.job_resume("b").unwrap();
    wait(&m, "b", JobStatus::Null).await;
    assert_eq!(job.log(), ["retry", "prepare", "commit", "clean"]);
    assert_eq!(
        lines(&sink.take()),
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "b"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "b"}}"#,
            r#"{"event": "BLOCK_JOB_ERROR", "data": {"device": "b", "operation": "write", "action": "stop"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "paused", "id": "b"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "b"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "b"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "b"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "b", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "b"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "b"}}"#,
        ]
    );
}

#[tokio::test]
async fn error_policy_stop_then_forced_cancel() {
    let (m, sink) = manager();
    let mut plan = Plan::new(JobType::Backup);
    plan.io_error_at = Some((1, OnError::Enospc, ENOSPC));
    m.create(JobOptions::new("b"), TestJob::new(plan)).unwrap();
    m.start("b").unwrap();
    wait(&m, "b", JobStatus::Paused).await;
    m.job_cancel("b").unwrap();
    wait(&m, "b", JobStatus::Null).await;
    let ev = lines(&sink.take());
    assert_eq!(
        ev[4..],
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "running", "id": "b"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "b"}}"#,
            r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "b", "len": 67108864, "offset": 16777216, "speed": 0, "type": "backup"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "b"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "b"}}"#,
        ]
    );
}

#[tokio::test]
async fn grouped_txn_one_member_fails() {
    let (m, sink) = manager();
    let txn = m.new_txn();
    let mut p1 = Plan::new(JobType::Backup);
    p1.chunks = 64;
    p1.chunk = 1 << 20;
    let mut p2 = Plan::new(JobType::Backup);
    p2.io_error_at = Some((2, OnError::Report, 5));
    let (j1, j2) = (TestJob::new(p1), TestJob::new(p2));
    let mut o1 = JobOptions::new("g1");
    o1.speed = 4 * 1024 * 1024;
    o1.txn = Some(txn);
    let mut o2 = JobOptions::new("g2");
    o2.txn = Some(txn);
    m.create(o1, j1.clone()).unwrap();
    m.create(o2, j2.clone()).unwrap();
    m.start("g1").unwrap();
    wait_offset(&m, "g1", 1 << 20).await;
    m.start("g2").unwrap();
    m.wait_idle().await;
    let ev = lines(&sink.take());
    let from = ev
        .iter()
        .position(|l| l.contains("BLOCK_JOB_ERROR"))
        .unwrap();
    // The tail as printed by qemu-storage-daemon for a grouped blockdev-backup
    // transaction whose second member hit EIO.
    assert_eq!(
        ev[from..],
        [
            r#"{"event": "BLOCK_JOB_ERROR", "data": {"device": "g2", "operation": "write", "action": "report"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "g2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "aborting", "id": "g1"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "g2", "len": 67108864, "offset": 33554432, "speed": 0, "type": "backup", "error": "Input/output error"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "g2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "g2"}}"#,
            r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "g1", "len": 67108864, "offset": 1048576, "speed": 4194304, "type": "backup"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "g1"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "g1"}}"#,
        ]
    );
    assert_eq!(j1.log(), ["abort", "clean"]);
    assert_eq!(j2.log(), ["abort", "clean"]);
}

#[tokio::test]
async fn grouped_txn_success_waits_and_finalizes_together() {
    let (m, sink) = manager();
    let txn = m.new_txn();
    let quick = TestJob::new(Plan::new(JobType::Backup));
    let mut slow_plan = Plan::new(JobType::Backup);
    slow_plan.hold = true;
    let slow = TestJob::new(slow_plan);
    for (id, j) in [("g1", &quick), ("g2", &slow)] {
        let mut o = JobOptions::new(id);
        o.txn = Some(txn);
        o.auto_finalize = false;
        m.create(o, j.clone()).unwrap();
        m.start(id).unwrap();
    }
    wait(&m, "g1", JobStatus::Waiting).await;
    assert_eq!(m.job_status("g2"), Some(JobStatus::Running));
    assert!(quick.log().is_empty());
    slow.release();
    wait(&m, "g2", JobStatus::Pending).await;
    assert_eq!(m.job_status("g1"), Some(JobStatus::Pending));
    // One finalize finalizes the whole transaction.
    m.block_job_finalize("g1").unwrap();
    m.wait_idle().await;
    assert_eq!(quick.log(), ["prepare", "commit", "clean"]);
    assert_eq!(slow.log(), ["prepare", "commit", "clean"]);
    let ev = lines(&sink.take());
    assert_eq!(
        ev[4..],
        [
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "g1"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "waiting", "id": "g2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "g2"}}"#,
            r#"{"event": "BLOCK_JOB_PENDING", "data": {"type": "backup", "id": "g2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "pending", "id": "g1"}}"#,
            r#"{"event": "BLOCK_JOB_PENDING", "data": {"type": "backup", "id": "g1"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "g2", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "g2"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "g2"}}"#,
            r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "g1", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "concluded", "id": "g1"}}"#,
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "g1"}}"#,
        ]
    );
}

#[tokio::test]
async fn failing_prepare_aborts_the_transaction() {
    let (m, sink) = manager();
    let txn = m.new_txn();
    let ok = TestJob::new(Plan::new(JobType::Backup));
    let mut bad_plan = Plan::new(JobType::Backup);
    bad_plan.prepare_error = Some("Could not prepare".into());
    let bad = TestJob::new(bad_plan);
    // "bad" is newest, so it is prepared first.
    for (id, j) in [("ok", &ok), ("bad", &bad)] {
        let mut o = JobOptions::new(id);
        o.txn = Some(txn);
        m.create(o, j.clone()).unwrap();
    }
    m.start("ok").unwrap();
    m.start("bad").unwrap();
    m.wait_idle().await;
    assert_eq!(bad.log(), ["prepare", "abort", "clean"]);
    assert_eq!(ok.log(), ["abort", "clean"]);
    let ev = lines(&sink.take());
    assert!(ev.contains(&r#"{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "bad", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup", "error": "Could not prepare"}}"#.to_string()));
    assert!(ev.contains(&r#"{"event": "BLOCK_JOB_CANCELLED", "data": {"device": "ok", "len": 67108864, "offset": 67108864, "speed": 0, "type": "backup"}}"#.to_string()));
}

#[tokio::test]
async fn non_block_job_emits_only_status_changes() {
    let (m, sink) = manager();
    let mut plan = Plan::new(JobType::Create);
    plan.fail_at = Some((1, "Image size must be a multiple of 512 bytes".into()));
    let mut opts = JobOptions::new("c");
    opts.auto_dismiss = false;
    m.create(opts, TestJob::new(plan)).unwrap();
    m.start("c").unwrap();
    wait(&m, "c", JobStatus::Concluded).await;
    assert!(m.query_block_jobs().is_empty());
    assert_eq!(
        m.block_job_dismiss("c"),
        Err(VerbError {
            class: "DeviceNotActive",
            desc: "Block job 'c' not found".into()
        })
    );
    assert_eq!(
        m.query_jobs()[0]["error"],
        "Image size must be a multiple of 512 bytes"
    );
    m.job_dismiss("c").unwrap();
    let names: Vec<_> = sink
        .take()
        .into_iter()
        .map(|(n, d)| (n, d["status"].clone()))
        .collect();
    assert_eq!(
        names,
        ["created", "running", "aborting", "concluded", "null"]
            .map(|s| ("JOB_STATUS_CHANGE", json!(s)))
    );
}

#[tokio::test]
async fn cancel_before_start_and_early_fail() {
    let (m, sink) = manager();
    m.create(
        JobOptions::new("x"),
        TestJob::new(Plan::new(JobType::Stream)),
    )
    .unwrap();
    m.early_fail("x").unwrap();
    m.create(
        JobOptions::new("y"),
        TestJob::new(Plan::new(JobType::Stream)),
    )
    .unwrap();
    m.job_cancel("y").unwrap();
    assert_eq!(
        m.start("y"),
        err("Job 'y' in state 'aborting' cannot be started")
    );
    m.wait_idle().await;
    // A job that never started emits no BLOCK_JOB_CANCELLED.
    let names: Vec<_> = sink
        .take()
        .into_iter()
        .map(|(n, d)| format!("{n} {}", d["status"]))
        .collect();
    assert_eq!(
        names,
        [
            "JOB_STATUS_CHANGE \"created\"",
            "JOB_STATUS_CHANGE \"null\"",
            "JOB_STATUS_CHANGE \"created\"",
            "JOB_STATUS_CHANGE \"aborting\"",
            "JOB_STATUS_CHANGE \"concluded\"",
            "JOB_STATUS_CHANGE \"null\"",
        ]
    );
}

#[tokio::test]
async fn internal_pause_nests_with_user_pause() {
    let (m, sink) = manager();
    let mut plan = Plan::new(JobType::Stream);
    plan.hold = true;
    let job = TestJob::new(plan);
    m.create(JobOptions::new("j"), job.clone()).unwrap();
    m.start("j").unwrap();
    m.pause_internal("j").unwrap();
    wait(&m, "j", JobStatus::Paused).await;
    // An internal pause is not a user pause.
    assert_eq!(
        m.job_resume("j"),
        err("Can't resume a job that was not paused")
    );
    m.job_pause("j").unwrap();
    m.resume_internal("j").unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(m.job_status("j"), Some(JobStatus::Paused));
    m.job_resume("j").unwrap();
    wait(&m, "j", JobStatus::Running).await;
    job.release();
    wait(&m, "j", JobStatus::Null).await;
    let st: Vec<_> = sink
        .take()
        .into_iter()
        .map(|(_, d)| d["status"].clone())
        .collect();
    // No event for the nested pause: same state, no JOB_STATUS_CHANGE.
    assert_eq!(
        st[..4],
        [
            json!("created"),
            json!("running"),
            json!("paused"),
            json!("running")
        ]
    );
}

#[tokio::test]
async fn cancel_all_and_wait_cleans_up_everything() {
    let (m, _sink) = manager();
    let mut hold = Plan::new(JobType::Stream);
    hold.hold = true;
    m.create(JobOptions::new("run"), TestJob::new(hold.clone()))
        .unwrap();
    m.start("run").unwrap();
    m.create(JobOptions::new("paused"), TestJob::new(hold))
        .unwrap();
    m.start("paused").unwrap();
    m.job_pause("paused").unwrap();
    let mut o = JobOptions::new("done");
    o.auto_dismiss = false;
    m.create(o, TestJob::new(Plan::new(JobType::Stream)))
        .unwrap();
    m.start("done").unwrap();
    wait(&m, "done", JobStatus::Concluded).await;
    m.create(JobOptions::new("ready"), TestJob::new(Plan::mirror()))
        .unwrap();
    m.start("ready").unwrap();
    wait(&m, "ready", JobStatus::Ready).await;
    m.create(
        JobOptions::new("new"),
        TestJob::new(Plan::new(JobType::Create)),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), m.cancel_all_and_wait())
        .await
        .unwrap();
    assert_eq!(m.job_count(), 0);
}

#[tokio::test]
async fn rate_limit_speed_is_honoured() {
    let (m, _sink) = manager();
    let mut plan = Plan::new(JobType::Stream);
    plan.chunks = 32;
    plan.chunk = 64 << 10; // 2 MiB in total
    let mut opts = JobOptions::new("r");
    opts.speed = 10 << 20;
    let t = Instant::now();
    m.create(opts, TestJob::new(plan)).unwrap();
    m.start("r").unwrap();
    wait(&m, "r", JobStatus::Null).await;
    let secs = t.elapsed().as_secs_f64();
    assert!(
        (0.12..=0.28).contains(&secs),
        "took {secs} s, expected ~0.2 s"
    );
}

#[tokio::test]
async fn raising_the_speed_wakes_a_sleeping_job() {
    let (m, _sink) = manager();
    let mut plan = Plan::new(JobType::Stream);
    plan.chunks = 4;
    plan.chunk = 1 << 20;
    let mut opts = JobOptions::new("r");
    opts.speed = 1 << 20; // 4 MiB at 1 MiB/s would take ~4 s
    let t = Instant::now();
    m.create(opts, TestJob::new(plan)).unwrap();
    m.start("r").unwrap();
    wait_offset(&m, "r", 1 << 20).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    m.block_job_set_speed("r", 0).unwrap();
    wait(&m, "r", JobStatus::Null).await;
    let secs = t.elapsed().as_secs_f64();
    assert!(secs < 0.5, "took {secs} s");
    // Lowering the speed does not need a wake-up, and a job's rate is observable.
    let (m, _sink) = manager();
    let mut plan = Plan::new(JobType::Stream);
    plan.chunks = 0;
    plan.hold = true;
    let job = TestJob::new(plan);
    m.create(JobOptions::new("q"), job.clone()).unwrap();
    m.start("q").unwrap();
    m.block_job_set_speed("q", 100).unwrap();
    assert_eq!(m.query_block_jobs()[0]["speed"], 100);
    assert!(m.job_rate("q").is_some());
    job.release();
    wait(&m, "q", JobStatus::Null).await;
}

#[tokio::test]
async fn complete_errors() {
    let (m, _sink) = manager();
    // A READY job whose type cannot complete.
    struct NoComplete;
    impl JobDriver for NoComplete {
        fn job_type(&self) -> JobType {
            JobType::Commit
        }
        fn run(
            self: Arc<Self>,
            ctx: strata_job::JobContext,
        ) -> strata_job::BoxFuture<'static, Result<(), strata_job::JobFailure>> {
            Box::pin(async move {
                ctx.set_ready();
                ctx.force_cancelled().await;
                Err(strata_job::JobFailure::canceled())
            })
        }
    }
    m.create(JobOptions::new("c"), Arc::new(NoComplete))
        .unwrap();
    m.start("c").unwrap();
    wait(&m, "c", JobStatus::Ready).await;
    assert_eq!(
        m.job_complete("c"),
        err("The active block job 'c' cannot be completed")
    );
    m.job_cancel("c").unwrap();
    wait(&m, "c", JobStatus::Null).await;

    // A soft-cancelled READY mirror can no longer be completed.
    let mut p = Plan::mirror();
    p.hold = true;
    let j = TestJob::new(p);
    m.create(JobOptions::new("m"), j.clone()).unwrap();
    m.start("m").unwrap();
    wait_offset(&m, "m", 64 << 20).await;
    j.release();
    wait(&m, "m", JobStatus::Ready).await;
    m.job_pause("m").unwrap();
    wait(&m, "m", JobStatus::Standby).await;
    m.job_resume("m").unwrap();
    m.pause_internal("m").unwrap();
    wait(&m, "m", JobStatus::Standby).await;
    m.block_job_cancel("m", false).unwrap();
    assert_eq!(
        m.job_complete("m"),
        err("The active block job 'm' cannot be completed")
    );
    m.resume_internal("m").unwrap();
    wait(&m, "m", JobStatus::Null).await;
    assert!(!j.pivoted.load(std::sync::atomic::Ordering::SeqCst));
}
