//! Shared test scaffolding: a configurable job driver and QEMU-style JSON printing.
#![allow(dead_code)]

use parking_lot::Mutex;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use strata_job::{
    BoxFuture, ErrorAction, IoOperation, JobContext, JobDriver, JobFailure, JobManager, JobStatus,
    JobType, MemorySink, OnError,
};

/// Prints JSON the way QEMU's monitor does: `{"a": 1, "b": [2, 3]}`.
pub fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let inner: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), qemu_json(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
        Value::Array(a) => {
            let inner: Vec<String> = a.iter().map(qemu_json).collect();
            format!("[{}]", inner.join(", "))
        }
        other => other.to_string(),
    }
}

/// Events as QEMU prints them, minus the timestamp:
/// `{"event": "NAME", "data": {...}}`.
pub fn lines(events: &[(&'static str, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(n, d)| format!("{{\"event\": \"{n}\", \"data\": {}}}", qemu_json(d)))
        .collect()
}

/// What a [`TestJob`] does.
#[derive(Clone)]
pub struct Plan {
    pub ty: JobType,
    pub chunks: u64,
    pub chunk: u64,
    /// Sleep per chunk (simulated I/O), with pause points.
    pub io_time: Duration,
    /// After copying: become READY and wait for complete / cancel (mirror-like).
    pub ready: bool,
    /// Keep a soft cancel soft in READY/STANDBY (mirror's cancel hook).
    pub soft_in_ready: bool,
    /// Fail with this message before this chunk.
    pub fail_at: Option<(u64, String)>,
    /// Hit an I/O error (once) before this chunk, handled with the policy.
    pub io_error_at: Option<(u64, OnError, i32)>,
    /// Hold before finishing until released.
    pub hold: bool,
    pub prepare_error: Option<String>,
    pub has_complete: bool,
}

impl Plan {
    pub fn new(ty: JobType) -> Self {
        Plan {
            ty,
            chunks: 4,
            chunk: 16 << 20,
            io_time: Duration::ZERO,
            ready: false,
            soft_in_ready: false,
            fail_at: None,
            io_error_at: None,
            hold: false,
            prepare_error: None,
            has_complete: false,
        }
    }

    pub fn mirror() -> Self {
        let mut p = Plan::new(JobType::Mirror);
        p.ready = true;
        p.soft_in_ready = true;
        p.has_complete = true;
        p
    }
}

/// A job driver following a [`Plan`], logging its hooks.
pub struct TestJob {
    pub plan: Plan,
    pub log: Mutex<Vec<String>>,
    pub released: AtomicBool,
    pub pivoted: AtomicBool,
}

impl TestJob {
    pub fn new(plan: Plan) -> Arc<Self> {
        Arc::new(TestJob {
            plan,
            log: Mutex::new(Vec::new()),
            released: AtomicBool::new(false),
            pivoted: AtomicBool::new(false),
        })
    }

    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().clone()
    }

    async fn work(self: Arc<Self>, ctx: JobContext) -> Result<(), JobFailure> {
        let p = &self.plan;
        ctx.progress_set_total(p.chunks * p.chunk);
        let mut io_error = p.io_error_at;
        for i in 0..p.chunks {
            if ctx.is_force_cancelled() {
                return Err(JobFailure::canceled());
            }
            if let Some((at, msg)) = &p.fail_at
                && *at == i
            {
                return Err(JobFailure::new(msg.clone()));
            }
            if let Some((at, policy, errno)) = io_error
                && at == i
            {
                io_error = None;
                match ctx.handle_error(policy, IoOperation::Write, errno) {
                    ErrorAction::Report => {
                        return Err(JobFailure::new(strerror(errno)));
                    }
                    ErrorAction::Stop => {
                        ctx.pause_point().await;
                        if ctx.is_force_cancelled() {
                            return Err(JobFailure::canceled());
                        }
                        self.log.lock().push("retry".into());
                    }
                    ErrorAction::Ignore => {}
                }
            }
            if !p.io_time.is_zero() {
                ctx.sleep(p.io_time).await;
            }
            ctx.progress_update(p.chunk);
            ctx.rate_limit(p.chunk).await;
        }
        while p.hold && !self.released.load(Ordering::SeqCst) {
            if ctx.is_force_cancelled() {
                return Err(JobFailure::canceled());
            }
            ctx.sleep_or_wake(Duration::from_millis(2)).await;
        }
        if p.ready {
            ctx.set_ready();
            loop {
                ctx.pause_point().await;
                if ctx.is_force_cancelled() {
                    return Err(JobFailure::canceled());
                }
                if ctx.is_completing() {
                    break;
                }
                ctx.sleep_or_wake(Duration::from_secs(3600)).await;
            }
            if !ctx.is_cancelled() {
                self.pivoted.store(true, Ordering::SeqCst);
            }
        }
        if ctx.is_force_cancelled() {
            return Err(JobFailure::canceled());
        }
        Ok(())
    }
}

impl JobDriver for TestJob {
    fn job_type(&self) -> JobType {
        self.plan.ty
    }

    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(self.work(ctx))
    }

    fn has_complete(&self) -> bool {
        self.plan.has_complete
    }

    fn complete(&self, ctx: &JobContext) -> Result<(), String> {
        self.log.lock().push(format!("complete {}", ctx.id()));
        Ok(())
    }

    fn prepare<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.log.lock().push("prepare".into());
            match &self.plan.prepare_error {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            }
        })
    }

    fn commit(&self, _ctx: &JobContext) {
        self.log.lock().push("commit".into());
    }

    fn abort(&self, _ctx: &JobContext) {
        self.log.lock().push("abort".into());
    }

    fn clean<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.log.lock().push("clean".into());
        })
    }

    fn extra_info(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        if self.plan.ty == JobType::Mirror {
            m.insert("actively-synced".into(), Value::Bool(false));
        }
        m
    }

    fn cancel_requested(&self, force: bool, status: JobStatus) -> bool {
        if self.plan.soft_in_ready {
            force || !status.is_ready()
        } else {
            true
        }
    }
}

/// The two errnos the tests use.
pub fn strerror(errno: i32) -> &'static str {
    match errno {
        28 => "No space left on device",
        _ => "Input/output error",
    }
}

/// A manager recording into a fresh sink.
pub fn manager() -> (JobManager, Arc<MemorySink>) {
    let sink = Arc::new(MemorySink::new());
    (JobManager::new(sink.clone()), sink)
}

/// Waits (bounded) for `id` to reach `status`.
pub async fn wait(m: &JobManager, id: &str, status: JobStatus) {
    tokio::time::timeout(Duration::from_secs(10), m.wait_status(id, status))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "job {id} never reached {status}; now {:?}",
                m.job_status(id)
            )
        });
}
