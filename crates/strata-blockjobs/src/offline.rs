//! Offline operations as jobs: `strata commit`, `strata convert` and `strata rebase` run their
//! copy through the same job machinery as the daemon (QEMU's old wish: "make qemu-img use
//! the live-job implementations"), so they share its state machine, rate limit, pause
//! points, cancellation and progress.
//!
//! The copy itself is `strata_graph::copy_image` / `rebase_data`; the job gives it a
//! [`CopyGate`] (pause point + rate limit before every request), a progress callback and a
//! cancel flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use strata_graph::CopyGate;
use strata_graph::copy::ProgressFn;
use strata_job::{
    BoxFuture, JobContext, JobDriver, JobFailure, JobManager, JobOptions, JobStatus, JobType,
    NullSink,
};

/// What the job body gets: hand these to the copy engine.
#[derive(Clone)]
pub struct JobHooks {
    /// Pause point and rate limit before every request.
    pub gate: Arc<dyn CopyGate>,
    /// Progress reports (bytes done, total).
    pub progress: ProgressFn,
    /// Set when the job is cancelled.
    pub cancel: Arc<AtomicBool>,
}

impl std::fmt::Debug for JobHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHooks").finish_non_exhaustive()
    }
}

/// The work of an offline job.
pub type Body = Box<dyn FnOnce(JobHooks) -> BoxFuture<'static, strata_core::Result<()>> + Send>;

/// A job around one body.
struct BodyJob {
    kind: JobType,
    body: Mutex<Option<Body>>,
}

/// The gate a job gives the copy engine.
struct JobGate(JobContext);

impl CopyGate for JobGate {
    fn pass(
        &self,
        bytes: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.0.pause_point().await;
            self.0.rate_limit(bytes).await;
        })
    }
}

impl JobDriver for BodyJob {
    fn job_type(&self) -> JobType {
        self.kind
    }

    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            let Some(body) = self.body.lock().take() else {
                return Err(JobFailure::new("job body already ran"));
            };
            let cancel = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (ctx, cancel) = (ctx.clone(), cancel.clone());
                tokio::spawn(async move {
                    ctx.cancelled().await;
                    cancel.store(true, Ordering::Relaxed);
                })
            };
            let last = Arc::new(Mutex::new((0u64, 0u64)));
            let progress: ProgressFn = {
                let (ctx, last) = (ctx.clone(), last.clone());
                Arc::new(move |done, total| {
                    let mut l = last.lock();
                    if total != l.1 {
                        ctx.progress_set_total(total);
                        l.1 = total;
                    }
                    if done > l.0 {
                        ctx.progress_update(done - l.0);
                        l.0 = done;
                    }
                })
            };
            let hooks = JobHooks {
                gate: Arc::new(JobGate(ctx.clone())),
                progress,
                cancel,
            };
            let r = body(hooks).await;
            watcher.abort();
            if ctx.is_cancelled() {
                return Err(JobFailure::canceled());
            }
            r.map_err(|e| JobFailure::new(e.to_string()))
        })
    }
}

/// Run `body` as a job of type `kind` limited to `speed` bytes/s (0 = unlimited) and wait for
/// it; the error is the job's. `on_progress` sees (done, total) as the job reports it.
pub async fn run_job(kind: JobType, speed: u64, body: Body) -> Result<(), String> {
    let jobs = JobManager::new(Arc::new(NullSink));
    let id = format!("strata-{}", kind.as_str());
    let mut opts = JobOptions::new(id.clone());
    opts.auto_dismiss = false;
    opts.speed = speed;
    jobs.create(
        opts,
        Arc::new(BodyJob {
            kind,
            body: Mutex::new(Some(body)),
        }),
    )
    .map_err(|e| e.desc)?;
    jobs.start(&id).map_err(|e| e.desc)?;
    jobs.wait_status(&id, JobStatus::Concluded).await;
    let info = jobs.query_jobs();
    let err = info
        .iter()
        .find(|j| j.get("id").and_then(|v| v.as_str()) == Some(id.as_str()))
        .and_then(|j| j.get("error"))
        .and_then(|e| e.as_str())
        .map(str::to_string);
    let _ = jobs.job_dismiss(&id);
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use strata_core::mem::MemNode;
    use strata_core::{IoBuf, NodeRef, WriteFlags};
    use strata_graph::{CopyOptions, copy_image};

    fn mem(data: Vec<u8>) -> NodeRef {
        Arc::new(MemNode::with_data(data))
    }

    #[tokio::test]
    async fn a_copy_runs_as_a_job_with_its_speed_limit() {
        let src = mem((0..4 << 20).map(|i| (i / 4096) as u8 | 1).collect());
        let dst = mem(vec![0; 4 << 20]);
        let (s, d) = (src.clone(), dst.clone());
        let start = Instant::now();
        run_job(
            JobType::Mirror,
            8 << 20,
            Box::new(move |h: JobHooks| {
                Box::pin(async move {
                    let opts = CopyOptions {
                        gate: Some(h.gate),
                        progress: Some(h.progress),
                        cancel: Some(h.cancel),
                        chunk_size: 1 << 20,
                        ..Default::default()
                    };
                    copy_image(&s, &d, &opts).await.map(|_| ())
                })
            }),
        )
        .await
        .unwrap();
        // 4 MiB at 8 MiB/s: about half a second (the first slice is free).
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(250), "{took:?}");
        let a = src.read(0, IoBuf::zeroed(4 << 20)).await.unwrap();
        let b = dst.read(0, IoBuf::zeroed(4 << 20)).await.unwrap();
        assert!(a[..] == b[..]);
    }

    /// What the read-only node says to a write.
    async fn node_err_text() -> String {
        let node: NodeRef = Arc::new(MemNode::read_only(vec![0; 4096]));
        let e = node
            .write(0, IoBuf::zeroed(4096), WriteFlags::default())
            .await
            .unwrap_err();
        e.to_string()
    }

    #[tokio::test]
    async fn a_failing_body_fails_the_job_with_its_message() {
        let node: NodeRef = Arc::new(MemNode::read_only(vec![0; 4096]));
        let err = run_job(
            JobType::Commit,
            0,
            Box::new(move |_h: JobHooks| {
                Box::pin(async move {
                    node.write(0, IoBuf::zeroed(4096), WriteFlags::default())
                        .await
                        .map(|_| ())
                })
            }),
        )
        .await
        .unwrap_err();
        let expect = node_err_text().await;
        assert_eq!(err, expect);
    }
}
