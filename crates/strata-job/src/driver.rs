//! What a concrete job implements: [`JobDriver`] (QEMU's `JobDriver` callbacks).

use crate::context::JobContext;
use crate::status::{JobStatus, JobType};
use serde_json::{Map, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future (the return type of the async hooks).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a job's work failed. `message` becomes the `error` member of JobInfo,
/// BlockJobInfo and BLOCK_JOB_COMPLETED (QEMU uses strerror text, e.g.
/// `"Input/output error"`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobFailure {
    /// The error text shown to clients.
    pub message: String,
}

impl JobFailure {
    /// The text for a cancelled job: strerror(ECANCELED).
    pub const CANCELED: &'static str = "Operation canceled";

    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The failure a job returns when it stops because it was cancelled.
    pub fn canceled() -> Self {
        Self::new(Self::CANCELED)
    }
}

/// The job itself. The manager drives the lifecycle; the driver does the work in
/// [`run`](JobDriver::run) and may hook the lifecycle steps.
///
/// The synchronous hooks are called without the manager's lock held but from the
/// control path (a QMP command), so they must not block.
pub trait JobDriver: Send + Sync + 'static {
    /// The job's QAPI type (decides whether it is a block job).
    fn job_type(&self) -> JobType;

    /// The work. Returns `Ok(())` on success; on failure (including stopping because of
    /// a forced cancel) a [`JobFailure`]. Call [`JobContext::pause_point`] (directly or
    /// via `rate_limit`/`sleep`) regularly and check [`JobContext::is_force_cancelled`].
    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>>;

    /// Whether the job type implements `complete` (QEMU: `driver->complete != NULL`).
    fn has_complete(&self) -> bool {
        false
    }

    /// `job-complete` / `block-job-complete` after the verb check passed. On `Ok` the
    /// manager sets [`JobContext::is_completing`] and wakes the job.
    fn complete(&self, ctx: &JobContext) -> Result<(), String> {
        Err(format!(
            "The active block job '{}' cannot be completed",
            ctx.id()
        ))
    }

    /// Called once every member of the transaction finished successfully, before any
    /// `commit` (graph changes happen here). An error aborts the whole transaction and
    /// becomes this job's error.
    fn prepare<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// The transaction succeeded.
    fn commit(&self, _ctx: &JobContext) {}

    /// The transaction failed or this job was cancelled.
    fn abort(&self, _ctx: &JobContext) {}

    /// Always called after `commit` or `abort`.
    fn clean<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// A cancel was requested with `force` while the job is in `status`; returns the
    /// effective force. The default treats every cancel as forced (stream, commit,
    /// backup); mirror and active commit keep a soft cancel in READY/STANDBY, which then
    /// means "complete without pivot".
    fn cancel_requested(&self, _force: bool, _status: JobStatus) -> bool {
        true
    }

    /// `block-job-change` with the command's arguments (minus `id`, including `type`).
    fn change(&self, _ctx: &JobContext, _opts: &Value) -> Result<(), String> {
        Err("Job type does not support change".to_owned())
    }

    /// Extra BlockJobInfo members of this job type (e.g. mirror's `actively-synced`).
    fn extra_info(&self) -> Map<String, Value> {
        Map::new()
    }

    /// Strata's extension members for `query-jobs`/`query-block-jobs` (docs/EXTENSIONS.md):
    /// a job may give its own `phase` (used while RUNNING or READY) and type-specific
    /// members such as mirror's `dirty-rate`, `copy-rate` and `convergence`. Called
    /// without the manager's lock held.
    fn extension_info(&self) -> Map<String, Value> {
        Map::new()
    }
}
