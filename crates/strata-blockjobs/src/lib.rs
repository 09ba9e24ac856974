//! The block jobs: stream, commit (intermediate and active), mirror, backup (with the
//! copy-before-write filter and the snapshot-access node for fleecing), create and amend.
//!
//! Each job is a [`strata_job::JobDriver`]; the command that starts it (`block-stream`,
//! `block-commit`, `blockdev-mirror`, `blockdev-backup`, `blockdev-create`) checks its
//! arguments with QEMU's texts, changes the graph (filters, permission edges, frozen links)
//! under the graph lock, and hands the job to the [`strata_job::JobManager`]. The copy loops
//! run in the job's task and never hold the graph lock across disk I/O.

pub mod backup;
mod chain;
pub mod commit;
pub mod create;
pub mod env;
pub mod mirror;
pub mod offline;
mod parallel;
pub mod stream;

pub use env::{BlockJobEnv, CmdError, SharedGraph};
