//! The job enums (`JobStatus`, `JobVerb`, `JobType`) and QEMU's two state tables as
//! `const` data: `JobSTT` ([`TRANSITIONS`]) and `JobVerbTable` ([`VERBS`]).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// QAPI `JobStatus`. The declaration order is QEMU's and indexes the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Erroneous default state; never observed.
    Undefined,
    /// Created but not started.
    Created,
    /// Doing work.
    Running,
    /// Paused at a pause point (was running).
    Paused,
    /// Converged; waiting for `complete` (mirror, active commit).
    Ready,
    /// Paused at a pause point while ready.
    Standby,
    /// Work finished successfully; waiting for the other members of its transaction.
    Waiting,
    /// Every member finished; waiting to be finalized.
    Pending,
    /// Failed or cancelled; being torn down.
    Aborting,
    /// Finished (success or failure); waiting to be dismissed.
    Concluded,
    /// Dismissed; about to disappear.
    Null,
}

impl JobStatus {
    /// Every status in table order.
    pub const ALL: [JobStatus; 11] = [
        JobStatus::Undefined,
        JobStatus::Created,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Ready,
        JobStatus::Standby,
        JobStatus::Waiting,
        JobStatus::Pending,
        JobStatus::Aborting,
        JobStatus::Concluded,
        JobStatus::Null,
    ];

    /// Row/column index in [`TRANSITIONS`] and column index in [`VERBS`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The QAPI spelling (`"running"`, `"standby"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// QEMU's `job_is_completed`: the job's work is over (waiting, pending, aborting,
    /// concluded, null).
    pub const fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }

    /// QEMU's `job_is_ready`: ready or standby (BlockJobInfo's `ready`).
    pub const fn is_ready(self) -> bool {
        matches!(self, JobStatus::Ready | JobStatus::Standby)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown job status '{s}'"))
    }
}

/// QAPI `JobVerb`. The declaration order is QEMU's and indexes [`VERBS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobVerb {
    /// `job-cancel`, `block-job-cancel`.
    Cancel,
    /// `job-pause`, `block-job-pause`.
    Pause,
    /// `job-resume`, `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`, `block-job-complete`.
    Complete,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `block-job-change`.
    Change,
}

impl JobVerb {
    /// Every verb in table order.
    pub const ALL: [JobVerb; 8] = [
        JobVerb::Cancel,
        JobVerb::Pause,
        JobVerb::Resume,
        JobVerb::SetSpeed,
        JobVerb::Complete,
        JobVerb::Dismiss,
        JobVerb::Finalize,
        JobVerb::Change,
    ];

    /// Row index in [`VERBS`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The QAPI spelling (`"set-speed"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Finalize => "finalize",
            JobVerb::Change => "change",
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QAPI `JobType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobType {
    /// block-commit.
    Commit,
    /// block-stream.
    Stream,
    /// drive-mirror / blockdev-mirror.
    Mirror,
    /// drive-backup / blockdev-backup.
    Backup,
    /// blockdev-create.
    Create,
    /// x-blockdev-amend.
    Amend,
    /// snapshot-load.
    SnapshotLoad,
    /// snapshot-save.
    SnapshotSave,
    /// snapshot-delete.
    SnapshotDelete,
}

impl JobType {
    /// Every job type in QAPI order.
    pub const ALL: [JobType; 9] = [
        JobType::Commit,
        JobType::Stream,
        JobType::Mirror,
        JobType::Backup,
        JobType::Create,
        JobType::Amend,
        JobType::SnapshotLoad,
        JobType::SnapshotSave,
        JobType::SnapshotDelete,
    ];

    /// The QAPI spelling (`"snapshot-load"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Create => "create",
            JobType::Amend => "amend",
            JobType::SnapshotLoad => "snapshot-load",
            JobType::SnapshotSave => "snapshot-save",
            JobType::SnapshotDelete => "snapshot-delete",
        }
    }

    /// Block jobs are visible to `block-job-*`, `query-block-jobs` and emit the
    /// `BLOCK_JOB_*` events: backup, commit, mirror and stream.
    pub const fn is_block_job(self) -> bool {
        matches!(
            self,
            JobType::Backup | JobType::Commit | JobType::Mirror | JobType::Stream
        )
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const T: bool = true;
const F: bool = false;

/// QEMU's `JobSTT`: `TRANSITIONS[from][to]` (indices from [`JobStatus::index`]).
pub const TRANSITIONS: [[bool; 11]; 11] = [
    //    U  C  R  P  Y  S  W  D  X  E  N
    /* U */ [F, T, F, F, F, F, F, F, F, F, F],
    /* C */ [F, F, T, F, F, F, F, F, T, F, T],
    /* R */ [F, F, F, T, T, F, T, F, T, F, F],
    /* P */ [F, F, T, F, F, F, F, F, F, F, F],
    /* Y */ [F, F, F, F, F, T, T, F, T, F, F],
    /* S */ [F, F, F, F, T, F, F, F, F, F, F],
    /* W */ [F, F, F, F, F, F, F, T, T, F, F],
    /* D */ [F, F, F, F, F, F, F, F, T, T, F],
    /* X */ [F, F, F, F, F, F, F, F, T, T, F],
    /* E */ [F, F, F, F, F, F, F, F, F, F, T],
    /* N */ [F, F, F, F, F, F, F, F, F, F, F],
];

/// QEMU's `JobVerbTable`: `VERBS[verb][status]` (indices from [`JobVerb::index`] and
/// [`JobStatus::index`]).
pub const VERBS: [[bool; 11]; 8] = [
    //             U  C  R  P  Y  S  W  D  X  E  N
    /* cancel    */
    [F, T, T, T, T, T, T, T, F, F, F],
    /* pause     */ [F, T, T, T, T, T, F, F, F, F, F],
    /* resume    */ [F, T, T, T, T, T, F, F, F, F, F],
    /* set-speed */ [F, T, T, T, T, T, F, F, F, F, F],
    /* complete  */ [F, F, F, F, T, T, F, F, F, F, F],
    /* dismiss   */ [F, F, F, F, F, F, F, F, F, T, F],
    /* finalize  */ [F, F, F, F, F, F, F, T, F, F, F],
    /* change    */ [F, T, T, T, T, T, F, F, F, F, F],
];

/// Whether QEMU allows the state transition `from` → `to`.
pub const fn can_transition(from: JobStatus, to: JobStatus) -> bool {
    TRANSITIONS[from.index()][to.index()]
}

/// Whether `verb` is accepted in `status`.
pub const fn verb_allowed(verb: JobVerb, status: JobStatus) -> bool {
    VERBS[verb.index()][status.index()]
}
