//! The manager's shared state (QEMU's `job_mutex`-protected fields) and the locked
//! primitives every other module builds on: state transitions with their event,
//! `job_update_rc`, `job_cancel_async`, dismissal.

use crate::driver::{JobDriver, JobFailure};
use crate::error_policy::IoStatus;
use crate::events::{self, EventSink};
use crate::ratelimit::RateLimit;
use crate::status::{JobStatus, JobType, can_transition};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Notify;

/// Everything the manager, the contexts and the lifecycle tasks share.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) events: Arc<dyn EventSink>,
    /// Notified (all waiters) on every status change and removal.
    pub(crate) changed: Notify,
    /// Add Strata's extension members to queries and progress events.
    pub(crate) extensions: std::sync::atomic::AtomicBool,
}

/// The per-job identity shared with its context (no back reference into the state).
pub(crate) struct JobHandle {
    pub(crate) key: u64,
    pub(crate) id: String,
    pub(crate) job_type: JobType,
    /// QEMU's `job_enter`: wakes a sleeping or paused job (one permit).
    pub(crate) wake: Notify,
    /// Broadcast for the flag futures (`cancelled()`, `completed()`).
    pub(crate) signal: Notify,
}

/// The lock-protected fields of one job.
pub(crate) struct JobEntry {
    pub(crate) handle: Arc<JobHandle>,
    pub(crate) driver: Arc<dyn JobDriver>,
    pub(crate) status: JobStatus,
    /// Starts at 1 (a created job counts as paused until started), like QEMU.
    pub(crate) pause_count: u32,
    pub(crate) user_paused: bool,
    /// Currently parked in a pause point.
    pub(crate) paused: bool,
    pub(crate) busy: bool,
    pub(crate) started: bool,
    /// The work is over (QEMU's `deferred_to_main_loop`).
    pub(crate) deferred: bool,
    pub(crate) cancelled: bool,
    pub(crate) force_cancel: bool,
    pub(crate) completing: bool,
    /// `finalize_single` has started for this job.
    pub(crate) finalizing: bool,
    /// In a timed sleep (QEMU's `job_timer_pending`).
    pub(crate) timer_pending: bool,
    pub(crate) speed: u64,
    pub(crate) limit: RateLimit,
    pub(crate) current: u64,
    pub(crate) total: u64,
    pub(crate) io_status: IoStatus,
    /// Set ⇔ QEMU's `job->ret != 0`.
    pub(crate) err: Option<String>,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    pub(crate) txn: u64,
    pub(crate) started_at: Option<Instant>,
    /// `current` over the last seconds (the `rate` extension field).
    pub(crate) meter: crate::meter::Meter,
}

/// One job transaction; members newest first (QEMU inserts at the head).
#[derive(Debug, Default)]
pub(crate) struct TxnState {
    pub(crate) members: Vec<u64>,
    pub(crate) aborting: bool,
    pub(crate) finalizing: bool,
}

/// All jobs (newest first) and transactions.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) jobs: Vec<JobEntry>,
    pub(crate) txns: HashMap<u64, TxnState>,
    pub(crate) next_key: u64,
    pub(crate) next_txn: u64,
}

impl State {
    pub(crate) fn get(&self, key: u64) -> Option<&JobEntry> {
        self.jobs.iter().find(|j| j.handle.key == key)
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut JobEntry> {
        self.jobs.iter_mut().find(|j| j.handle.key == key)
    }

    pub(crate) fn by_id(&self, id: &str) -> Option<&JobEntry> {
        self.jobs.iter().find(|j| j.handle.id == id)
    }

    pub(crate) fn by_id_mut(&mut self, id: &str) -> Option<&mut JobEntry> {
        self.jobs.iter_mut().find(|j| j.handle.id == id)
    }

    /// A fresh transaction id.
    pub(crate) fn alloc_txn(&mut self) -> u64 {
        self.next_txn += 1;
        self.txns.insert(self.next_txn, TxnState::default());
        self.next_txn
    }

    /// Members of `txn`, newest first.
    pub(crate) fn members(&self, txn: u64) -> Vec<u64> {
        self.txns
            .get(&txn)
            .map(|t| t.members.clone())
            .unwrap_or_default()
    }

    /// Removes `key` from its transaction (dropping the transaction when it empties).
    pub(crate) fn txn_del(&mut self, txn: u64, key: u64) {
        if let Some(t) = self.txns.get_mut(&txn) {
            t.members.retain(|&k| k != key);
            if t.members.is_empty() {
                self.txns.remove(&txn);
            }
        }
    }
}

impl JobEntry {
    /// QEMU's `job_is_cancelled`: a forced cancel is in effect.
    pub(crate) fn is_force_cancelled(&self) -> bool {
        self.cancelled && self.force_cancel
    }

    pub(crate) fn is_block(&self) -> bool {
        self.handle.job_type.is_block_job()
    }
}

impl Shared {
    fn extensions_on(&self) -> bool {
        self.extensions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A progress event's data, with the extension members when they are enabled.
    pub(crate) fn progress_data(&self, e: &mut JobEntry, data: Value) -> Value {
        if self.extensions_on() {
            let ext = crate::info::extensions(e, serde_json::Map::new());
            events::with_extensions(data, ext)
        } else {
            data
        }
    }

    /// The driver's extension members, when extensions are enabled (asked without the lock).
    pub(crate) fn driver_extension_info(&self, d: &dyn JobDriver) -> Map<String, Value> {
        if self.extensions_on() {
            d.extension_info()
        } else {
            Map::new()
        }
    }

    /// All extension members of `e` for a query, when extensions are enabled.
    pub(crate) fn extensions_of(
        &self,
        e: &mut JobEntry,
        driver: Map<String, Value>,
    ) -> Map<String, Value> {
        if self.extensions_on() {
            crate::info::extensions(e, driver)
        } else {
            Map::new()
        }
    }

    pub(crate) fn emit(&self, event: &'static str, data: Value) {
        self.events.emit(event, data);
    }

    /// `job_state_transition`: same state is silent; otherwise JOB_STATUS_CHANGE.
    pub(crate) fn transition(&self, e: &mut JobEntry, to: JobStatus) {
        if e.status == to {
            return;
        }
        debug_assert!(
            can_transition(e.status, to),
            "invalid job transition {} -> {}",
            e.status,
            to
        );
        e.status = to;
        self.emit(
            events::JOB_STATUS_CHANGE,
            events::job_status_change(&e.handle.id, to),
        );
        e.handle.signal.notify_waiters();
        self.changed.notify_waiters();
    }

    /// `job_update_rc`: a forced cancel without an error becomes "Operation canceled";
    /// any error moves the job to ABORTING.
    pub(crate) fn update_rc(&self, e: &mut JobEntry) {
        if e.err.is_none() && e.is_force_cancelled() {
            e.err = Some(JobFailure::CANCELED.to_owned());
        }
        if e.err.is_some() {
            self.transition(e, JobStatus::Aborting);
        }
    }

    /// `job_pause` on the locked entry.
    pub(crate) fn pause_locked(&self, e: &mut JobEntry) {
        e.pause_count += 1;
        if !e.paused {
            e.handle.wake.notify_one();
        }
    }

    /// `job_resume` on the locked entry.
    pub(crate) fn resume_locked(&self, e: &mut JobEntry) {
        debug_assert!(e.pause_count > 0);
        e.pause_count = e.pause_count.saturating_sub(1);
        if e.pause_count == 0 {
            e.handle.wake.notify_one();
        }
    }

    /// `job_cancel_async` with the effective force already decided by the driver.
    pub(crate) fn cancel_async(&self, e: &mut JobEntry, force: bool) {
        if e.user_paused {
            if e.is_block() {
                e.io_status = IoStatus::Ok;
            }
            e.user_paused = false;
            e.pause_count = e.pause_count.saturating_sub(1);
        }
        // A soft cancel of a job whose work is already over is ignored.
        if force || !e.deferred {
            e.cancelled = true;
            e.force_cancel |= force;
            if !force && e.status.is_ready() {
                e.completing = true;
            }
        }
        e.handle.wake.notify_one();
        e.handle.signal.notify_waiters();
    }

    /// `job_do_dismiss`: → NULL and gone.
    pub(crate) fn dismiss_locked(&self, st: &mut State, key: u64) {
        let Some(pos) = st.jobs.iter().position(|j| j.handle.key == key) else {
            return;
        };
        let mut e = st.jobs.remove(pos);
        self.transition(&mut e, JobStatus::Null);
        st.txn_del(e.txn, key);
        self.changed.notify_waiters();
    }
}
