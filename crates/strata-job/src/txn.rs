//! Job completion and transactions (§2.7, §2.8): `job_completed`, the WAITING →
//! PENDING step of a transaction, finalization (`prepare` for all, then
//! `commit`/`abort` + `clean` + completion event + CONCLUDED per job) and the
//! transaction abort that force-cancels the other members.

use crate::context::JobContext;
use crate::events;
use crate::state::Shared;
use crate::status::JobStatus;
use std::sync::Arc;

/// Identifies a job transaction (`completion-mode: grouped`); get one from
/// [`JobManager::new_txn`](crate::JobManager::new_txn).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxnId(pub(crate) u64);

impl Shared {
    fn ctx(self: &Arc<Self>, key: u64) -> Option<JobContext> {
        let st = self.state.lock();
        st.get(key)
            .map(|e| JobContext::new(self.clone(), e.handle.clone()))
    }

    /// The job's work ended with `result` (QEMU `job_completed`).
    pub(crate) async fn job_completed(self: &Arc<Self>, key: u64, result: Result<(), String>) {
        let (failed, txn) = {
            let mut st = self.state.lock();
            let Some(e) = st.get_mut(key) else { return };
            e.deferred = true;
            e.busy = false;
            e.timer_pending = false;
            if let Err(msg) = result {
                e.err.get_or_insert(msg);
            }
            self.update_rc(e);
            let failed = e.err.is_some();
            if !failed {
                self.transition(e, JobStatus::Waiting);
            }
            e.handle.signal.notify_waiters();
            (failed, e.txn)
        };
        if failed {
            self.txn_abort(key).await;
        } else {
            self.txn_success(txn).await;
        }
    }

    /// All members completed successfully → PENDING; finalize unless one of them has
    /// auto-finalize off.
    async fn txn_success(self: &Arc<Self>, txn: u64) {
        {
            let mut st = self.state.lock();
            let Some(t) = st.txns.get(&txn) else { return };
            if t.aborting || t.finalizing {
                return;
            }
            let members = t.members.clone();
            let all_done = members
                .iter()
                .all(|&k| st.get(k).is_none_or(|e| e.status.is_completed()));
            if !all_done {
                return;
            }
            let mut needs_finalize = false;
            for &k in &members {
                if let Some(e) = st.get_mut(k) {
                    self.transition(e, JobStatus::Pending);
                    if !e.auto_finalize {
                        needs_finalize = true;
                        if e.is_block() {
                            self.emit(
                                events::BLOCK_JOB_PENDING,
                                events::block_job_pending(e.handle.job_type, &e.handle.id),
                            );
                        }
                    }
                }
            }
            if needs_finalize {
                return;
            }
            if let Some(t) = st.txns.get_mut(&txn) {
                t.finalizing = true;
            }
        }
        self.do_finalize(txn).await;
    }

    /// `job_do_finalize`: `prepare` for every member, then finalize each; a failing
    /// prepare aborts the transaction. The caller has set `finalizing`.
    pub(crate) async fn do_finalize(self: &Arc<Self>, txn: u64) {
        let members = self.state.lock().members(txn);
        for &k in &members {
            let (ok, driver) = {
                let st = self.state.lock();
                match st.get(k) {
                    Some(e) => (e.err.is_none(), e.driver.clone()),
                    None => continue,
                }
            };
            if !ok {
                continue;
            }
            let Some(ctx) = self.ctx(k) else { continue };
            let result = driver.prepare(&ctx).await;
            if self.state.lock().txns.get(&txn).is_none_or(|t| t.aborting) {
                return;
            }
            if let Err(msg) = result {
                {
                    let mut st = self.state.lock();
                    if let Some(e) = st.get_mut(k) {
                        e.err = Some(msg);
                        self.update_rc(e);
                    }
                }
                self.txn_abort(k).await;
                return;
            }
        }
        for k in members {
            self.finalize_single(k).await;
        }
    }

    /// `job_completed_txn_abort`: force-cancel every other member, wait until all of
    /// them stopped working, then finalize all (newest first).
    pub(crate) async fn txn_abort(self: &Arc<Self>, failing: u64) {
        let mut hooks = Vec::new();
        let txn = {
            let mut st = self.state.lock();
            let Some(txn) = st.get(failing).map(|e| e.txn) else {
                return;
            };
            let Some(t) = st.txns.get_mut(&txn) else {
                return;
            };
            if t.aborting {
                return;
            }
            t.aborting = true;
            let members = t.members.clone();
            for k in members {
                if k == failing {
                    continue;
                }
                if let Some(e) = st.get_mut(k) {
                    hooks.push((e.driver.clone(), e.status));
                    self.cancel_async(e, true);
                    if !e.started {
                        e.deferred = true;
                        self.update_rc(e);
                    }
                }
            }
            txn
        };
        for (driver, status) in hooks {
            driver.cancel_requested(true, status);
        }
        loop {
            let changed = self.changed.notified();
            let done = {
                let st = self.state.lock();
                st.members(txn)
                    .iter()
                    .all(|&k| st.get(k).is_none_or(|e| e.status.is_completed()))
            };
            if done {
                break;
            }
            changed.await;
        }
        let members = self.state.lock().members(txn);
        for k in members {
            self.finalize_single(k).await;
        }
    }

    /// `job_finalize_single`: commit or abort, clean, completion event, CONCLUDED, and
    /// NULL with auto-dismiss.
    async fn finalize_single(self: &Arc<Self>, key: u64) {
        let (ok, driver) = {
            let mut st = self.state.lock();
            let Some(e) = st.get_mut(key) else { return };
            if !e.status.is_completed() || e.status == JobStatus::Concluded || e.finalizing {
                return;
            }
            e.finalizing = true;
            self.update_rc(e);
            (e.err.is_none(), e.driver.clone())
        };
        let Some(ctx) = self.ctx(key) else { return };
        if ok {
            driver.commit(&ctx);
        } else {
            driver.abort(&ctx);
        }
        driver.clean(&ctx).await;
        let mut st = self.state.lock();
        let Some(e) = st.get_mut(key) else { return };
        // Events only if the job actually started (QEMU job_finalize_single).
        if e.is_block() && e.started {
            let (name, error) = if e.is_force_cancelled() {
                (events::BLOCK_JOB_CANCELLED, None)
            } else {
                (events::BLOCK_JOB_COMPLETED, e.err.as_deref())
            };
            let data = events::block_job_progress(
                e.handle.job_type,
                &e.handle.id,
                e.total,
                e.current,
                e.speed,
                error,
            );
            let data = self.progress_data(e, data);
            self.emit(name, data);
        }
        let txn = e.txn;
        self.transition(e, JobStatus::Concluded);
        let dismiss = e.auto_dismiss;
        st.txn_del(txn, key);
        if dismiss {
            self.dismiss_locked(&mut st, key);
        }
        self.changed.notify_waiters();
    }
}
