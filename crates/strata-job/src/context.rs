//! [`JobContext`]: what a running job uses to talk to the job layer — pause points,
//! cancellation, rate limiting, progress, readiness, completion and the error policy.

use crate::error_policy::{ErrorAction, IoOperation, IoStatus, OnError, decide};
use crate::events;
use crate::state::{JobEntry, JobHandle, Shared};
use crate::status::{JobStatus, JobType};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The running job's handle on the job layer. Cheap to clone; every method is safe to
/// call from any task.
#[derive(Clone)]
pub struct JobContext {
    shared: Arc<Shared>,
    handle: Arc<JobHandle>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.handle.id)
            .field("type", &self.handle.job_type)
            .finish()
    }
}

/// Throughput of a job so far (an addition of Strata; not part of QEMU's JobInfo).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobRate {
    /// Progress units (bytes) per second since the job started.
    pub per_second: f64,
    /// Estimated time to reach the current total at that rate (`None` if unknown).
    pub eta: Option<Duration>,
}

impl JobRate {
    pub(crate) fn of(e: &JobEntry) -> JobRate {
        let elapsed = e
            .started_at
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let per_second = if elapsed > 0.0 {
            e.current as f64 / elapsed
        } else {
            0.0
        };
        let remaining = e.total.saturating_sub(e.current);
        let eta = if remaining == 0 {
            Some(Duration::ZERO)
        } else if per_second > 0.0 {
            Some(Duration::from_secs_f64(remaining as f64 / per_second))
        } else {
            None
        };
        JobRate { per_second, eta }
    }
}

/// Leaves a pause point: back to the saved status (also when the future is dropped).
struct Unpark<'a> {
    ctx: &'a JobContext,
    saved: Option<JobStatus>,
}

impl Drop for Unpark<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.saved.take() {
            self.ctx.with(|sh, e| {
                e.paused = false;
                e.busy = true;
                sh.transition(e, s);
            });
        }
    }
}

impl JobContext {
    pub(crate) fn new(shared: Arc<Shared>, handle: Arc<JobHandle>) -> Self {
        Self { shared, handle }
    }

    /// Runs `f` on the locked entry; `None` once the job is gone.
    fn with<R>(&self, f: impl FnOnce(&Shared, &mut JobEntry) -> R) -> Option<R> {
        let mut st = self.shared.state.lock();
        st.get_mut(self.handle.key).map(|e| f(&self.shared, e))
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.handle.id
    }

    /// The job type.
    pub fn job_type(&self) -> JobType {
        self.handle.job_type
    }

    /// The current status.
    pub fn status(&self) -> JobStatus {
        self.with(|_, e| e.status).unwrap_or(JobStatus::Null)
    }

    /// A cancel (soft or forced) was requested (QEMU `job_cancel_requested`).
    pub fn is_cancelled(&self) -> bool {
        self.with(|_, e| e.cancelled).unwrap_or(true)
    }

    /// A forced cancel was requested (QEMU `job_is_cancelled`): stop as soon as possible
    /// and return [`JobFailure::canceled`](crate::JobFailure::canceled).
    pub fn is_force_cancelled(&self) -> bool {
        self.with(|_, e| e.is_force_cancelled()).unwrap_or(true)
    }

    /// A pause is requested (pause count > 0): a job with I/O in flight should let it
    /// finish and then reach a pause point.
    pub fn pause_requested(&self) -> bool {
        self.with(|_, e| e.pause_count > 0).unwrap_or(false)
    }

    /// Resolves once any cancel is requested.
    pub async fn cancelled(&self) {
        loop {
            let n = self.handle.signal.notified();
            if self.is_cancelled() {
                return;
            }
            n.await;
        }
    }

    /// Resolves once a forced cancel is requested.
    pub async fn force_cancelled(&self) {
        loop {
            let n = self.handle.signal.notified();
            if self.is_force_cancelled() {
                return;
            }
            n.await;
        }
    }

    /// `job-complete` succeeded, or a soft cancel arrived in READY/STANDBY (then
    /// [`is_cancelled`](Self::is_cancelled) is also true: finish without pivoting).
    pub fn is_completing(&self) -> bool {
        self.with(|_, e| e.completing).unwrap_or(false)
    }

    /// Resolves once [`is_completing`](Self::is_completing) is true.
    pub async fn completed(&self) {
        loop {
            let n = self.handle.signal.notified();
            if self.is_completing() {
                return;
            }
            n.await;
        }
    }

    /// QEMU `job_pause_point`: while a pause is requested (pause count > 0) the job
    /// parks here as PAUSED (or STANDBY when READY), emitting the status changes, and
    /// returns to its previous status on resume. Returns at once under a forced cancel.
    /// Cancel-safe: dropping the future while parked restores the previous status.
    pub async fn pause_point(&self) {
        let mut guard = Unpark {
            ctx: self,
            saved: None,
        };
        loop {
            let woken = self.handle.wake.notified();
            let saved = &mut guard.saved;
            let park = self
                .with(|sh, e| {
                    if e.pause_count == 0 || e.is_force_cancelled() {
                        return false;
                    }
                    if saved.is_none() {
                        let to = match e.status {
                            JobStatus::Running => JobStatus::Paused,
                            JobStatus::Ready => JobStatus::Standby,
                            _ => return false,
                        };
                        *saved = Some(e.status);
                        sh.transition(e, to);
                        e.paused = true;
                        e.busy = false;
                    }
                    true
                })
                .unwrap_or(false);
            if !park {
                break;
            }
            woken.await;
        }
    }

    /// QEMU `job_sleep_ns`: returns at once under a forced cancel; otherwise sleeps
    /// (unless a pause is pending) until `dur` elapsed or the job is woken (pause,
    /// cancel, speed raise), then passes a pause point. A zero `dur` still yields.
    pub async fn sleep_or_wake(&self, dur: Duration) {
        let woken = self.handle.wake.notified();
        let sleep = self
            .with(|_, e| {
                if e.is_force_cancelled() {
                    return None;
                }
                if e.pause_count > 0 {
                    return Some(false);
                }
                e.timer_pending = true;
                e.busy = false;
                Some(true)
            })
            .flatten();
        let Some(sleep) = sleep else { return };
        if sleep {
            if dur.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(dur) => {}
                    _ = woken => {}
                }
            }
            self.with(|_, e| {
                e.timer_pending = false;
                e.busy = true;
            });
        }
        self.pause_point().await;
    }

    /// Sleeps for `dur`, honouring pause requests meanwhile (time spent paused counts);
    /// returns early under a forced cancel.
    pub async fn sleep(&self, dur: Duration) {
        let deadline = Instant::now() + dur;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.sleep_or_wake(left).await;
            if left.is_zero() || self.is_force_cancelled() || Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Accounts `bytes` just processed and sleeps as the speed limit requires (QEMU
    /// `block_job_ratelimit_processed_bytes` + `block_job_ratelimit_sleep`): always at
    /// least one yield and pause point; the delay is recomputed after every wake-up, so
    /// raising the speed with `block-job-set-speed` takes effect at once.
    pub async fn rate_limit(&self, bytes: u64) {
        let now = Instant::now();
        self.with(|_, e| e.limit.calculate_delay(bytes, now));
        loop {
            let now = Instant::now();
            let delay = self
                .with(|_, e| e.limit.calculate_delay(0, now))
                .unwrap_or(Duration::ZERO);
            self.sleep_or_wake(delay).await;
            if delay.is_zero() || self.is_force_cancelled() {
                return;
            }
        }
    }

    /// Waits until the speed limit has room, then accounts `bytes` about to be processed
    /// (QEMU's block-copy: a copy is counted when it starts, so copies running in parallel
    /// cannot overshoot the speed the way accounting at completion lets them).
    pub async fn rate_admit(&self, bytes: u64) {
        self.rate_limit(0).await;
        let now = Instant::now();
        self.with(|_, e| e.limit.calculate_delay(bytes, now));
    }

    /// The current speed limit in bytes/s (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.with(|_, e| e.speed).unwrap_or(0)
    }

    /// Sets the total amount of work (`total-progress`, `len`).
    pub fn progress_set_total(&self, total: u64) {
        self.with(|_, e| e.total = total);
    }

    /// Grows the total amount of work.
    pub fn progress_add_total(&self, delta: u64) {
        self.with(|_, e| e.total = e.total.saturating_add(delta));
    }

    /// Records `done` more units of work (`current-progress`, `offset`; monotonic).
    pub fn progress_update(&self, done: u64) {
        self.with(|_, e| {
            e.current = e.current.saturating_add(done);
            e.meter.record(Instant::now(), e.current);
        });
    }

    /// `(current, total)` progress.
    pub fn progress(&self) -> (u64, u64) {
        self.with(|_, e| (e.current, e.total)).unwrap_or((0, 0))
    }

    /// Throughput and ETA so far.
    pub fn rate(&self) -> JobRate {
        self.with(|_, e| JobRate::of(e)).unwrap_or(JobRate {
            per_second: 0.0,
            eta: None,
        })
    }

    /// Marks the job busy (doing I/O) or quiescent (BlockJobInfo `busy`).
    pub fn set_busy(&self, busy: bool) {
        self.with(|_, e| e.busy = busy);
    }

    /// The job converged: RUNNING → READY (JOB_STATUS_CHANGE), then BLOCK_JOB_READY.
    /// Does nothing when already ready.
    pub fn set_ready(&self) {
        self.with(|sh, e| {
            if e.status != JobStatus::Running {
                return;
            }
            sh.transition(e, JobStatus::Ready);
            if e.is_block() {
                let data = events::block_job_progress(
                    e.handle.job_type,
                    &e.handle.id,
                    e.total,
                    e.current,
                    e.speed,
                    None,
                );
                let data = sh.progress_data(e, data);
                sh.emit(events::BLOCK_JOB_READY, data);
            }
        });
    }

    /// QEMU `block_job_error_action` for a failed `op` with positive `errno`: decides
    /// the action from `policy`, emits BLOCK_JOB_ERROR (block jobs), and for `stop`
    /// pauses the job as if user-paused and records io-status `nospace`/`failed`. After
    /// `Stop` the job should call [`pause_point`](Self::pause_point) and retry.
    pub fn handle_error(&self, policy: OnError, op: IoOperation, errno: i32) -> ErrorAction {
        let action = decide(policy, errno);
        self.with(|sh, e| {
            if e.is_block() {
                sh.emit(
                    events::BLOCK_JOB_ERROR,
                    events::block_job_error(&e.handle.id, op, action),
                );
            }
            if action == ErrorAction::Stop {
                if !e.user_paused {
                    sh.pause_locked(e);
                    e.user_paused = true;
                }
                if e.io_status == IoStatus::Ok {
                    e.io_status = IoStatus::for_errno(errno);
                }
            }
        });
        action
    }

    /// The job's current io-status.
    pub fn io_status(&self) -> IoStatus {
        self.with(|_, e| e.io_status).unwrap_or_default()
    }
}
