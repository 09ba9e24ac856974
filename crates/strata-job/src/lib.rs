//! Strata's generic job layer ("jobs for everyone"): QEMU's job state machine and verb
//! permissions as `const` tables, the job lifecycle (completion, transactions,
//! finalization, dismissal), pause points, the block-job speed limiter, the error
//! policy, and the JOB_STATUS_CHANGE / BLOCK_JOB_* events with QEMU's exact member
//! order. It knows nothing about blocks: concrete jobs implement [`JobDriver`].
//!
//! | module | role |
//! |---|---|
//! | [`status`] | `JobStatus`, `JobVerb`, `JobType`, `TRANSITIONS`, `VERBS` |
//! | [`error_policy`] | `OnError` → `ErrorAction`, `IoOperation`, `IoStatus` |
//! | [`ratelimit`] | QEMU's slice-based `RateLimit` |
//! | [`qdict`] | QEMU's JSON member order (QDict hash order) |
//! | [`events`] | `EventSink` and the event data builders |
//! | [`driver`] | the `JobDriver` trait and `JobFailure` |
//! | `context` | `JobContext`, what a running job calls |
//! | `manager` | `JobManager`: create/start, verbs, queries, shutdown |
//! | `txn` | completion, transactions, finalization (`TxnId`) |
//! | [`meter`] | `Meter`: the slope of a value over a sliding window (job rates) |
//! | `state`, `info` | locked state primitives; JobInfo/BlockJobInfo builders |

#![warn(missing_docs)]

mod context;
pub mod driver;
pub mod error_policy;
pub mod events;
mod info;
mod manager;
pub mod meter;
pub mod qdict;
pub mod ratelimit;
mod state;
pub mod status;
mod txn;

pub use context::{JobContext, JobRate};
pub use driver::{BoxFuture, JobDriver, JobFailure};
pub use error_policy::{ENOSPC, ErrorAction, IoOperation, IoStatus, OnError};
pub use events::{EventSink, MemorySink, NullSink};
pub use manager::{JobManager, JobOptions, VerbError, id_wellformed};
pub use ratelimit::RateLimit;
pub use status::{JobStatus, JobType, JobVerb, TRANSITIONS, VERBS, can_transition, verb_allowed};
pub use txn::TxnId;
