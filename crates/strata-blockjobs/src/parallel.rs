//! The copy loop of stream and commit with several chunks in flight.
//!
//! QEMU's stream and commit loops copy one chunk at a time, so each chunk pays the full
//! latency of a read and then a write. Here up to [`IN_FLIGHT`] chunks of a fixed size run
//! at once (their ranges are disjoint, and the copy-on-read filter and the qcow2 driver
//! already serialise overlapping requests), which keeps the disk busy.
//!
//! What stays as in QEMU: progress only grows; with a `speed` limit the loop runs one chunk
//! at a time and sleeps between chunks exactly as before; a pause or cancel request stops
//! new chunks, lets those in flight finish (never dropped half-way through an allocating
//! write), and only then parks or returns; an error is handed to the job's policy with the
//! offset where it happened, and `stop` retries the rest of the chunk after the pause.

use std::future::Future;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use strata_job::{JobContext, JobFailure};

use crate::chain::OnStepError;

/// Chunks in flight when no speed limit is set (with 512 KiB chunks: 4 MiB of buffers).
pub const IN_FLIGHT: usize = 8;

/// Runs `step(offset, end)` over `[0, len)` in chunks of `chunk` bytes, several at once.
/// `step` answers how many bytes from `offset` (below `end`) it looked at and whether it
/// copied them; `on_error(error, offset)` decides what a failed step leads to.
pub(crate) async fn parallel_copy_loop<E, Fut>(
    ctx: &JobContext,
    len: u64,
    chunk: u64,
    step: impl Fn(u64, u64) -> Fut,
    mut on_error: impl FnMut(E, u64) -> OnStepError,
) -> Result<(), JobFailure>
where
    Fut: Future<Output = Result<(u64, bool), E>>,
{
    let chunk = chunk.max(1);
    // One chunk: its steps in order, progress as they finish. It ends with the bytes it
    // copied (for the speed limit), or the error and the part of the chunk still to do.
    let run = |mut offset: u64, end: u64| {
        let step = &step;
        async move {
            let mut copied = 0;
            while offset < end {
                match step(offset, end).await {
                    Ok((n, copy)) => {
                        let n = n.clamp(1, end - offset);
                        ctx.progress_update(n);
                        if copy {
                            copied += n;
                        }
                        offset += n;
                    }
                    Err(e) => return Err((e, offset, end)),
                }
            }
            Ok(copied)
        }
    };
    let mut in_flight = FuturesUnordered::new();
    // Ranges to redo after an error the policy retries (`stop`) or skips over.
    let mut todo: Vec<(u64, u64)> = Vec::new();
    let mut next = 0;
    let mut copied = 0;
    let mut failure: Option<JobFailure> = None;
    loop {
        while failure.is_none() && (next < len || !todo.is_empty()) {
            let limited = ctx.speed() > 0;
            let width = if limited { 1 } else { IN_FLIGHT };
            if in_flight.len() >= width {
                break;
            }
            if !in_flight.is_empty() && (limited || ctx.pause_requested()) {
                break; // drain first, then sleep or park below
            }
            if in_flight.is_empty() {
                // The pause point and the speed limit, as in the sequential loop.
                ctx.rate_limit(copied).await;
                copied = 0;
            }
            if ctx.is_cancelled() {
                failure = Some(JobFailure::canceled());
                break;
            }
            let (a, b) = match todo.pop() {
                Some(r) => r,
                None => {
                    let r = (next, (next + chunk).min(len));
                    next = r.1;
                    r
                }
            };
            in_flight.push(run(a, b));
        }
        let Some(done) = in_flight.next().await else {
            break;
        };
        match done {
            Ok(n) => copied += n,
            // After a failure the rest only drains: one error reaches the policy (and
            // one BLOCK_JOB_ERROR the client), as with the sequential loop.
            Err(_) if failure.is_some() => {}
            Err((e, offset, end)) => match on_error(e, offset) {
                OnStepError::Retry => todo.push((offset, end)),
                OnStepError::Skip(n) => {
                    let n = n.clamp(1, end - offset);
                    ctx.progress_update(n);
                    if offset + n < end {
                        todo.push((offset + n, end));
                    }
                }
                OnStepError::Fail(f) => {
                    failure.get_or_insert(f);
                }
            },
        }
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;
    use strata_job::{
        BoxFuture, ErrorAction, IoOperation, JobDriver, JobManager, JobOptions, JobStatus, JobType,
        MemorySink, OnError,
    };

    const LEN: u64 = 64 << 20;
    const CHUNK: u64 = 512 << 10;

    /// A job whose steps take 1 ms each, copy 64 KiB at a time, record which bytes they
    /// covered and how many ran at once, and fail once at `fail_at` (EIO) if asked.
    #[derive(Default)]
    struct Probe {
        covered: parking_lot::Mutex<Vec<(u64, u64)>>,
        now: AtomicUsize,
        peak: AtomicUsize,
        fail_at: Option<u64>,
        failed: AtomicU64,
        policy: Option<OnError>,
    }

    impl Probe {
        async fn step(&self, offset: u64, end: u64) -> Result<(u64, bool), i32> {
            let n = (64 << 10).min(end - offset);
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            if self.fail_at == Some(offset) && self.failed.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(libc::EIO);
            }
            self.covered.lock().push((offset, offset + n));
            Ok((n, true))
        }
    }

    impl JobDriver for Probe {
        fn job_type(&self) -> JobType {
            JobType::Stream
        }

        fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
            Box::pin(async move {
                ctx.progress_set_total(LEN);
                let policy = self.policy.unwrap_or(OnError::Report);
                let on_error = |errno: i32, _offset| match ctx.handle_error(
                    policy,
                    IoOperation::Read,
                    errno,
                ) {
                    ErrorAction::Stop => OnStepError::Retry,
                    ErrorAction::Report => OnStepError::Fail(JobFailure::new("EIO")),
                    ErrorAction::Ignore => OnStepError::Skip(64 << 10),
                };
                let step = |offset, end| self.step(offset, end);
                parallel_copy_loop(&ctx, LEN, CHUNK, step, on_error).await
            })
        }
    }

    async fn run(probe: Arc<Probe>, speed: Option<i64>) -> (JobManager, Arc<Probe>) {
        let m = JobManager::new(Arc::new(MemorySink::new()));
        m.create(JobOptions::new("j"), probe.clone()).unwrap();
        if let Some(s) = speed {
            m.block_job_set_speed("j", s).unwrap();
        }
        m.start("j").unwrap();
        (m, probe)
    }

    /// Every byte covered exactly once, in order once sorted.
    fn assert_exact_cover(probe: &Probe) {
        let mut c = probe.covered.lock().clone();
        c.sort_unstable();
        let mut at = 0;
        for (a, b) in c {
            assert_eq!(a, at, "gap or overlap at {at}");
            at = b;
        }
        assert_eq!(at, LEN);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unlimited_runs_chunks_at_once_and_covers_every_byte_once() {
        let (m, probe) = run(Arc::new(Probe::default()), None).await;
        tokio::time::timeout(Duration::from_secs(20), m.wait_status("j", JobStatus::Null))
            .await
            .unwrap();
        assert_exact_cover(&probe);
        assert_eq!(probe.peak.load(Ordering::SeqCst), IN_FLIGHT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_speed_limit_means_one_chunk_at_a_time() {
        let (m, probe) = run(Arc::new(Probe::default()), Some(1 << 40)).await;
        tokio::time::timeout(Duration::from_secs(20), m.wait_status("j", JobStatus::Null))
            .await
            .unwrap();
        assert_exact_cover(&probe);
        assert_eq!(probe.peak.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pause_drains_what_is_in_flight_and_stop_retries_the_failed_rest() {
        let probe = Arc::new(Probe {
            fail_at: Some(20 * CHUNK + (128 << 10)),
            policy: Some(OnError::Stop),
            ..Probe::default()
        });
        let (m, probe) = run(probe, None).await;
        // The error pauses the job with nothing left in flight.
        tokio::time::timeout(
            Duration::from_secs(20),
            m.wait_status("j", JobStatus::Paused),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(probe.now.load(Ordering::SeqCst), 0);
        let done = probe.covered.lock().len();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(probe.covered.lock().len(), done, "no steps while paused");
        m.job_resume("j").unwrap();
        tokio::time::timeout(Duration::from_secs(20), m.wait_status("j", JobStatus::Null))
            .await
            .unwrap();
        assert_exact_cover(&probe);
    }
}
