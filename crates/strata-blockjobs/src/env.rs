//! What every job command needs: the graph (behind the control lock), the job manager, and
//! the error type commands answer with.

use std::sync::Arc;

use strata_graph::Graph;
use strata_job::JobManager;

/// The graph as the daemon shares it: one async lock, taken by commands and by jobs at
/// their graph-changing steps (start, prepare, abort), never across data I/O.
pub type SharedGraph = Arc<tokio::sync::Mutex<Graph>>;

/// A failed command: QMP error class and QEMU's text.
pub type CmdError = strata_job::VerbError;

/// Everything a job command works with.
#[derive(Clone)]
pub struct BlockJobEnv {
    /// The node graph.
    pub graph: SharedGraph,
    /// The job manager.
    pub jobs: Arc<JobManager>,
}

impl std::fmt::Debug for BlockJobEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockJobEnv").finish_non_exhaustive()
    }
}

/// A GenericError with `desc`.
pub fn generic(desc: impl Into<String>) -> CmdError {
    CmdError {
        class: "GenericError",
        desc: desc.into(),
    }
}
