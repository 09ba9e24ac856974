//! [`JobManager`]: the job registry, creation and start, the `job-*` and `block-job-*`
//! verbs with QEMU's checks and error texts, the queries, and shutdown.

use crate::context::{JobContext, JobRate};
use crate::driver::{JobDriver, JobFailure};
use crate::error_policy::IoStatus;
use crate::events::EventSink;
use crate::info;
use crate::ratelimit::RateLimit;
use crate::state::{JobEntry, JobHandle, Shared, State};
use crate::status::{JobStatus, JobVerb, verb_allowed};
use crate::txn::TxnId;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

/// A QMP error for a job command: `class` is the QAPI error class, `desc` the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct VerbError {
    /// `"GenericError"` or `"DeviceNotActive"`.
    pub class: &'static str,
    /// The human-readable text clients match on.
    pub desc: String,
}

impl VerbError {
    /// QAPI class `GenericError`.
    pub const GENERIC_ERROR: &'static str = "GenericError";
    /// QAPI class `DeviceNotActive` (block-job-* on an unknown or non-block job).
    pub const DEVICE_NOT_ACTIVE: &'static str = "DeviceNotActive";

    /// A `GenericError` with `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: Self::GENERIC_ERROR,
            desc: desc.into(),
        }
    }

    /// `DeviceNotActive`: "Block job '%s' not found".
    pub fn block_job_not_found(id: &str) -> Self {
        Self {
            class: Self::DEVICE_NOT_ACTIVE,
            desc: format!("Block job '{id}' not found"),
        }
    }
}

/// How to create a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOptions {
    /// The job id (must be well formed and unused).
    pub id: String,
    /// false: wait in PENDING for `job-finalize` (default true).
    pub auto_finalize: bool,
    /// false: stay CONCLUDED until `job-dismiss` (default true).
    pub auto_dismiss: bool,
    /// Initial speed limit in bytes/s; 0 = unlimited.
    pub speed: u64,
    /// Join this grouped transaction; `None` = a transaction of its own.
    pub txn: Option<TxnId>,
}

impl JobOptions {
    /// Defaults: auto-finalize and auto-dismiss on, unlimited, own transaction.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
            txn: None,
        }
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn verb_check(e: &JobEntry, verb: JobVerb) -> Result<(), VerbError> {
    if verb_allowed(verb, e.status) {
        Ok(())
    } else {
        Err(VerbError::generic(format!(
            "Job '{}' in state '{}' cannot accept command verb '{}'",
            e.handle.id,
            e.status.as_str(),
            verb.as_str()
        )))
    }
}

fn find<'a>(st: &'a mut State, id: &str) -> Result<&'a mut JobEntry, VerbError> {
    st.by_id_mut(id)
        .ok_or_else(|| VerbError::generic("Job not found"))
}

fn find_block<'a>(st: &'a mut State, id: &str) -> Result<&'a mut JobEntry, VerbError> {
    match st.by_id_mut(id) {
        Some(e) if e.is_block() => Ok(e),
        _ => Err(VerbError::block_job_not_found(id)),
    }
}

/// Which lookup (and error) a verb uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Job,
    Block,
}

fn lookup<'a>(st: &'a mut State, id: &str, f: Flavour) -> Result<&'a mut JobEntry, VerbError> {
    match f {
        Flavour::Job => find(st, id),
        Flavour::Block => find_block(st, id),
    }
}

/// The job registry and lifecycle engine. Cheap to clone (all clones share one
/// registry). The internal lock is never held across an `.await`.
///
/// Jobs run as tokio tasks spawned on the current runtime, so `start` and the verbs
/// that may finish jobs (cancel, finalize) must be called from inside a tokio runtime.
#[derive(Clone)]
pub struct JobManager {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for JobManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobManager")
            .field("jobs", &self.job_count())
            .finish()
    }
}

impl JobManager {
    /// An empty manager reporting events to `events`.
    pub fn new(events: Arc<dyn EventSink>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                events,
                changed: Notify::new(),
                extensions: Default::default(),
            }),
        }
    }

    /// Add Strata's extension members (docs/EXTENSIONS.md) to `query-jobs`,
    /// `query-block-jobs`, and BLOCK_JOB_READY/COMPLETED/CANCELLED (`rate`, `remaining`,
    /// `eta-ms`, `phase`, and the job's own such as mirror's `dirty-rate`). Off by default:
    /// replies and events are then exactly qemu-storage-daemon's.
    pub fn set_extensions(&self, on: bool) {
        self.shared
            .extensions
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A new grouped transaction (`completion-mode: grouped`) to pass in
    /// [`JobOptions::txn`] for each member.
    pub fn new_txn(&self) -> TxnId {
        TxnId(self.shared.state.lock().alloc_txn())
    }

    /// Creates a job in CREATED (JOB_STATUS_CHANGE `created`). Errors: `"Invalid job ID
    /// '%s'"`, `"Job ID '%s' already in use"`.
    pub fn create(&self, opts: JobOptions, driver: Arc<dyn JobDriver>) -> Result<(), VerbError> {
        if !id_wellformed(&opts.id) {
            return Err(VerbError::generic(format!("Invalid job ID '{}'", opts.id)));
        }
        let sh = &self.shared;
        let mut st = sh.state.lock();
        if st.by_id(&opts.id).is_some() {
            return Err(VerbError::generic(format!(
                "Job ID '{}' already in use",
                opts.id
            )));
        }
        let txn = match opts.txn {
            Some(TxnId(t)) => {
                st.txns.entry(t).or_default();
                t
            }
            None => st.alloc_txn(),
        };
        st.next_key += 1;
        let key = st.next_key;
        let mut limit = RateLimit::new();
        limit.set_speed(opts.speed);
        let job_type = driver.job_type();
        let mut e = JobEntry {
            handle: Arc::new(JobHandle {
                key,
                id: opts.id,
                job_type,
                wake: Notify::new(),
                signal: Notify::new(),
            }),
            driver,
            status: JobStatus::Undefined,
            pause_count: 1,
            user_paused: false,
            paused: false,
            busy: false,
            started: false,
            deferred: false,
            cancelled: false,
            force_cancel: false,
            completing: false,
            finalizing: false,
            timer_pending: false,
            speed: opts.speed,
            limit,
            current: 0,
            total: 0,
            io_status: IoStatus::Ok,
            err: None,
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            txn,
            started_at: None,
            meter: crate::meter::Meter::default(),
        };
        sh.transition(&mut e, JobStatus::Created);
        st.jobs.insert(0, e);
        if let Some(t) = st.txns.get_mut(&txn) {
            t.members.insert(0, key);
        }
        Ok(())
    }

    /// Starts a created job: → RUNNING and its `run` is spawned.
    pub fn start(&self, id: &str) -> Result<(), VerbError> {
        let sh = &self.shared;
        let (handle, driver) = {
            let mut st = sh.state.lock();
            let e = find(&mut st, id)?;
            if e.status != JobStatus::Created || e.started || e.cancelled {
                return Err(VerbError::generic(format!(
                    "Job '{}' in state '{}' cannot be started",
                    id,
                    e.status.as_str()
                )));
            }
            e.started = true;
            e.pause_count -= 1;
            e.busy = true;
            e.paused = false;
            e.started_at = Some(Instant::now());
            e.meter.record(Instant::now(), e.current);
            sh.transition(e, JobStatus::Running);
            (e.handle.clone(), e.driver.clone())
        };
        let shared = sh.clone();
        let ctx = JobContext::new(shared.clone(), handle.clone());
        tokio::spawn(async move {
            let work = tokio::spawn(driver.run(ctx));
            let result = match work.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(f)) => Err(f.message),
                Err(e) if e.is_panic() => Err("Job panicked".to_owned()),
                Err(_) => Err(JobFailure::CANCELED.to_owned()),
            };
            shared.job_completed(handle.key, result).await;
        });
        Ok(())
    }

    /// `job_early_fail`: setup failed after `create`; CREATED → NULL, job removed.
    pub fn early_fail(&self, id: &str) -> Result<(), VerbError> {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let e = find(&mut st, id)?;
        if e.status != JobStatus::Created || e.started {
            return Err(VerbError::generic(format!(
                "Job '{}' in state '{}' cannot be discarded",
                id,
                e.status.as_str()
            )));
        }
        let key = e.handle.key;
        sh.dismiss_locked(&mut st, key);
        Ok(())
    }

    fn pause(&self, id: &str, f: Flavour) -> Result<(), VerbError> {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let e = lookup(&mut st, id, f)?;
        verb_check(e, JobVerb::Pause)?;
        if e.user_paused {
            return Err(VerbError::generic("Job is already paused"));
        }
        e.user_paused = true;
        sh.pause_locked(e);
        Ok(())
    }

    fn resume(&self, id: &str, f: Flavour) -> Result<(), VerbError> {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let e = lookup(&mut st, id, f)?;
        if !e.user_paused || e.pause_count == 0 {
            return Err(VerbError::generic("Can't resume a job that was not paused"));
        }
        verb_check(e, JobVerb::Resume)?;
        if e.is_block() {
            e.io_status = IoStatus::Ok;
        }
        e.user_paused = false;
        sh.resume_locked(e);
        Ok(())
    }

    fn cancel(&self, id: &str, force: bool, f: Flavour) -> Result<(), VerbError> {
        let (key, driver, status) = {
            let mut st = self.shared.state.lock();
            let e = lookup(&mut st, id, f)?;
            if f == Flavour::Block && e.user_paused && !force {
                return Err(VerbError::generic(format!(
                    "The block job for device '{id}' is currently paused"
                )));
            }
            verb_check(e, JobVerb::Cancel)?;
            (e.handle.key, e.driver.clone(), e.status)
        };
        let effective = driver.cancel_requested(force, status);
        self.cancel_key(key, effective);
        Ok(())
    }

    /// `job_cancel` after the checks.
    fn cancel_key(&self, key: u64, force: bool) {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let Some(e) = st.get_mut(key) else { return };
        if e.status == JobStatus::Concluded {
            sh.dismiss_locked(&mut st, key);
            return;
        }
        if !e.started {
            sh.cancel_async(e, true);
            e.deferred = true;
            sh.update_rc(e);
            let shared = sh.clone();
            tokio::spawn(async move { shared.txn_abort(key).await });
        } else {
            sh.cancel_async(e, force);
            if e.deferred && e.is_force_cancelled() {
                let shared = sh.clone();
                tokio::spawn(async move { shared.txn_abort(key).await });
            }
        }
    }

    fn complete(&self, id: &str, f: Flavour) -> Result<(), VerbError> {
        let (key, ctx, driver) = {
            let mut st = self.shared.state.lock();
            let e = lookup(&mut st, id, f)?;
            verb_check(e, JobVerb::Complete)?;
            if e.cancelled || !e.driver.has_complete() {
                return Err(VerbError::generic(format!(
                    "The active block job '{id}' cannot be completed"
                )));
            }
            (
                e.handle.key,
                JobContext::new(self.shared.clone(), e.handle.clone()),
                e.driver.clone(),
            )
        };
        driver.complete(&ctx).map_err(VerbError::generic)?;
        let mut st = self.shared.state.lock();
        if let Some(e) = st.get_mut(key) {
            e.completing = true;
            e.handle.signal.notify_waiters();
            e.handle.wake.notify_one();
        }
        Ok(())
    }

    fn finalize(&self, id: &str, f: Flavour) -> Result<(), VerbError> {
        let sh = &self.shared;
        let txn = {
            let mut st = sh.state.lock();
            let e = lookup(&mut st, id, f)?;
            verb_check(e, JobVerb::Finalize)?;
            let txn = e.txn;
            match st.txns.get_mut(&txn) {
                Some(t) if !t.finalizing && !t.aborting => t.finalizing = true,
                _ => return Ok(()),
            }
            txn
        };
        let shared = sh.clone();
        tokio::spawn(async move { shared.do_finalize(txn).await });
        Ok(())
    }

    fn dismiss(&self, id: &str, f: Flavour) -> Result<(), VerbError> {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let e = lookup(&mut st, id, f)?;
        verb_check(e, JobVerb::Dismiss)?;
        let key = e.handle.key;
        sh.dismiss_locked(&mut st, key);
        Ok(())
    }

    /// `job-pause`: verb check, then `"Job is already paused"`; the job parks at its next
    /// pause point (PAUSED/STANDBY event then).
    pub fn job_pause(&self, id: &str) -> Result<(), VerbError> {
        self.pause(id, Flavour::Job)
    }

    /// `job-resume`: `"Can't resume a job that was not paused"`, then verb check; clears
    /// a block job's io-status.
    pub fn job_resume(&self, id: &str) -> Result<(), VerbError> {
        self.resume(id, Flavour::Job)
    }

    /// `job-cancel`: always a forced cancel (allowed while paused).
    pub fn job_cancel(&self, id: &str) -> Result<(), VerbError> {
        self.cancel(id, true, Flavour::Job)
    }

    /// `job-complete`: verb check, then `"The active block job '%s' cannot be
    /// completed"` if a cancel was requested or the type cannot complete, then the
    /// driver's own checks.
    pub fn job_complete(&self, id: &str) -> Result<(), VerbError> {
        self.complete(id, Flavour::Job)
    }

    /// `job-finalize`: only in PENDING; finalizes the job's whole transaction
    /// (asynchronously: the events follow shortly after the reply).
    pub fn job_finalize(&self, id: &str) -> Result<(), VerbError> {
        self.finalize(id, Flavour::Job)
    }

    /// `job-dismiss`: only in CONCLUDED; → NULL and removed.
    pub fn job_dismiss(&self, id: &str) -> Result<(), VerbError> {
        self.dismiss(id, Flavour::Job)
    }

    /// `block-job-set-speed`: verb check, then `"Parameter 'speed' expects a
    /// non-negative value"`; a sleeping job is woken at once if the limit was raised or
    /// removed.
    pub fn block_job_set_speed(&self, id: &str, speed: i64) -> Result<(), VerbError> {
        let mut st = self.shared.state.lock();
        let e = find_block(&mut st, id)?;
        verb_check(e, JobVerb::SetSpeed)?;
        if speed < 0 {
            return Err(VerbError::generic(
                "Parameter 'speed' expects a non-negative value",
            ));
        }
        let speed = speed as u64;
        let old = e.speed;
        e.limit.set_speed(speed);
        e.speed = speed;
        if (speed == 0 || speed > old) && e.timer_pending {
            e.handle.wake.notify_one();
        }
        Ok(())
    }

    /// `block-job-cancel`: `"The block job for device '%s' is currently paused"` for a
    /// user-paused job without `force`; then verb check; soft or forced cancel (the
    /// driver may turn a soft cancel into a forced one).
    pub fn block_job_cancel(&self, id: &str, force: bool) -> Result<(), VerbError> {
        self.cancel(id, force, Flavour::Block)
    }

    /// `block-job-pause`.
    pub fn block_job_pause(&self, id: &str) -> Result<(), VerbError> {
        self.pause(id, Flavour::Block)
    }

    /// `block-job-resume` (also resets io-status to `ok`).
    pub fn block_job_resume(&self, id: &str) -> Result<(), VerbError> {
        self.resume(id, Flavour::Block)
    }

    /// `block-job-complete`.
    pub fn block_job_complete(&self, id: &str) -> Result<(), VerbError> {
        self.complete(id, Flavour::Block)
    }

    /// `block-job-finalize`.
    pub fn block_job_finalize(&self, id: &str) -> Result<(), VerbError> {
        self.finalize(id, Flavour::Block)
    }

    /// `block-job-dismiss`.
    pub fn block_job_dismiss(&self, id: &str) -> Result<(), VerbError> {
        self.dismiss(id, Flavour::Block)
    }

    /// `block-job-change`: verb check, then the driver's `change` with the command's
    /// arguments (default: `"Job type does not support change"`).
    pub fn block_job_change(&self, id: &str, opts: &Value) -> Result<(), VerbError> {
        let (ctx, driver) = {
            let mut st = self.shared.state.lock();
            let e = find_block(&mut st, id)?;
            verb_check(e, JobVerb::Change)?;
            (
                JobContext::new(self.shared.clone(), e.handle.clone()),
                e.driver.clone(),
            )
        };
        driver.change(&ctx, opts).map_err(VerbError::generic)
    }

    /// An internal pause (QEMU's drain): counts like a user pause but is not
    /// user-visible as `user_paused` and cannot be undone with `job-resume`.
    pub fn pause_internal(&self, id: &str) -> Result<(), VerbError> {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let e = find(&mut st, id)?;
        sh.pause_locked(e);
        Ok(())
    }

    /// Ends one [`pause_internal`](Self::pause_internal).
    pub fn resume_internal(&self, id: &str) -> Result<(), VerbError> {
        let sh = &self.shared;
        let mut st = sh.state.lock();
        let e = find(&mut st, id)?;
        let internal = e.pause_count.saturating_sub(u32::from(e.user_paused));
        if internal == 0 {
            return Err(VerbError::generic("Can't resume a job that was not paused"));
        }
        sh.resume_locked(e);
        Ok(())
    }

    /// `query-jobs`: JobInfo for every job, newest first.
    pub fn query_jobs(&self) -> Vec<Value> {
        let exts = self.driver_extensions();
        let mut st = self.shared.state.lock();
        exts.into_iter()
            .filter_map(|(k, x)| {
                let e = st.get_mut(k)?;
                let ext = self.shared.extensions_of(e, x);
                Some(info::job_info(e, ext))
            })
            .collect()
    }

    /// `query-block-jobs`: BlockJobInfo (with the driver's extra members) for every
    /// block job, newest first.
    pub fn query_block_jobs(&self) -> Vec<Value> {
        let drivers: Vec<_> = {
            let st = self.shared.state.lock();
            st.jobs
                .iter()
                .filter(|e| e.is_block())
                .map(|e| (e.handle.key, e.driver.clone()))
                .collect()
        };
        let extras: Vec<_> = drivers
            .into_iter()
            .map(|(k, d)| (k, d.extra_info(), self.shared.driver_extension_info(&*d)))
            .collect();
        let mut st = self.shared.state.lock();
        extras
            .into_iter()
            .filter_map(|(k, extra, x)| {
                let e = st.get_mut(k)?;
                let ext = self.shared.extensions_of(e, x);
                Some(info::block_job_info(e, extra, ext))
            })
            .collect()
    }

    /// Every job's driver extension members, newest first (asked without the lock held:
    /// drivers may take their own locks).
    fn driver_extensions(&self) -> Vec<(u64, Map<String, Value>)> {
        let drivers: Vec<_> = {
            let st = self.shared.state.lock();
            st.jobs
                .iter()
                .map(|e| (e.handle.key, e.driver.clone()))
                .collect()
        };
        drivers
            .into_iter()
            .map(|(k, d)| (k, self.shared.driver_extension_info(&*d)))
            .collect()
    }

    /// The status of job `id`, if it exists.
    pub fn job_status(&self, id: &str) -> Option<JobStatus> {
        self.shared.state.lock().by_id(id).map(|e| e.status)
    }

    /// Throughput and ETA of job `id` (a Strata addition, not in JobInfo).
    pub fn job_rate(&self, id: &str) -> Option<JobRate> {
        self.shared.state.lock().by_id(id).map(JobRate::of)
    }

    /// How many jobs exist (not yet dismissed).
    pub fn job_count(&self) -> usize {
        self.shared.state.lock().jobs.len()
    }

    /// Ids of all jobs, newest first.
    pub fn job_ids(&self) -> Vec<String> {
        let st = self.shared.state.lock();
        st.jobs.iter().map(|e| e.handle.id.clone()).collect()
    }

    /// Waits until job `id` is in `status` (`Null`: until it is gone).
    pub async fn wait_status(&self, id: &str, status: JobStatus) {
        loop {
            let changed = self.shared.changed.notified();
            let now = self.job_status(id).unwrap_or(JobStatus::Null);
            if now == status {
                return;
            }
            changed.await;
        }
    }

    /// Waits until no job exists.
    pub async fn wait_idle(&self) {
        loop {
            let changed = self.shared.changed.notified();
            if self.job_count() == 0 {
                return;
            }
            changed.await;
        }
    }

    /// Daemon shutdown (QEMU `job_cancel_sync_all`): force-cancels every job, dismisses
    /// concluded ones, and waits until none is left.
    pub async fn cancel_all_and_wait(&self) {
        loop {
            let changed = self.shared.changed.notified();
            let todo: Vec<_> = {
                let st = self.shared.state.lock();
                if st.jobs.is_empty() {
                    return;
                }
                st.jobs
                    .iter()
                    .filter(|e| {
                        e.status == JobStatus::Concluded
                            || (!e.is_force_cancelled() && e.status != JobStatus::Aborting)
                    })
                    .map(|e| (e.handle.key, e.driver.clone(), e.status))
                    .collect()
            };
            for (key, driver, status) in todo {
                if status != JobStatus::Concluded {
                    driver.cancel_requested(true, status);
                }
                self.cancel_key(key, true);
            }
            changed.await;
        }
    }
}
