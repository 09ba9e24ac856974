//! `blockdev-mirror` and active commit (QEMU's `block/mirror.c`): a `mirror_top` filter above
//! the source feeds a dirty bitmap (or, in write-blocking mode, writes the target itself);
//! the copy loop copies dirty ranges to the target with up to 16 operations in flight, never
//! two on overlapping ranges; once nothing is dirty and nothing in flight the job flushes the
//! target and becomes READY, and keeps mirroring. `job-complete` drains the source, copies
//! the rest and pivots: every parent of the source (or of `replaces`) switches to the target.
//! A soft cancel in READY finishes the sync without pivoting (BLOCK_JOB_COMPLETED).
//!
//! `copy-mode: auto` (a Strata extension) starts in background mode and switches to
//! write-blocking once the bytes still to copy stop reaching new lows for [`AUTO_STALL`]:
//! background copying alone never converges under a writer faster than the copy, active
//! mirroring always does.
//!
//! Active commit is the same machinery with the target being the base of the top's chain
//! (job type `commit`, sync top, both error directions from `on-error`).

mod filter;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use strata_core::{BlockNode, DirtyBitmap, IoBuf, NodeRef, WriteFlags, ZeroFlags};
use strata_graph::perm::EdgeKind;
use strata_graph::status::block_status_above;
use strata_graph::{
    EdgeId, EdgePerms, EdgeRec, Graph, GraphNode, Link, NodeKind, NodeRec, Perm, PermSpec, Use,
    User, driver_of,
};
use strata_job::error_policy::{ErrorAction, IoOperation, OnError};
use strata_job::{BoxFuture, JobContext, JobDriver, JobFailure, JobOptions, JobStatus, JobType};
use tokio::sync::RwLock;
use tokio::task::JoinSet;

use crate::env::{BlockJobEnv, CmdError, generic};
use filter::{MirrorState, MirrorTop};

/// Most copy operations in flight (QEMU's `MAX_IN_FLIGHT`).
const MAX_IN_FLIGHT: usize = 16;
/// Smallest upper bound of one copy operation (QEMU's `MAX_IO_BYTES`).
const MAX_IO_BYTES: u64 = 1 << 20;
/// Default `buf-size`.
const DEFAULT_BUF_SIZE: u64 = 16 << 20;
/// `copy-mode: auto` switches to write-blocking when the bytes left to copy have not
/// reached a new low for this long (several copy operations' worth at any copy speed).
pub const AUTO_STALL: Duration = Duration::from_secs(1);

/// `MirrorSyncMode` values mirror accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Copy what is allocated above the source's backing node.
    Top,
    /// Copy everything (unallocated ranges become zeroes on the target).
    Full,
    /// Copy only what gets written while the job runs.
    None,
}

/// `MirrorCopyMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Copy dirty ranges asynchronously.
    Background,
    /// Also write guest writes to the target before they complete.
    WriteBlocking,
    /// Background until the copy stops converging, then write-blocking (Strata).
    Auto,
}

impl CopyMode {
    fn parse(s: &str) -> Option<CopyMode> {
        match s {
            "background" => Some(CopyMode::Background),
            "write-blocking" => Some(CopyMode::WriteBlocking),
            "auto" => Some(CopyMode::Auto),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
            CopyMode::Auto => "auto",
        }
    }
}

/// What `block-commit` passes when top is the active layer.
#[derive(Debug, Clone)]
pub struct ActiveCommitArgs {
    /// The job id.
    pub job_id: String,
    /// The active layer (the command's `device`, filters skipped).
    pub top: String,
    /// The base node (`base-node`, or the bottom of the chain).
    pub base: String,
    /// Speed limit in bytes/s (0 = unlimited); negative is refused.
    pub speed: i64,
    /// Error policy for reads and writes.
    pub on_error: OnError,
    /// Name for the mirror_top filter (auto-named otherwise).
    pub filter_node_name: Option<String>,
    /// Wait in PENDING for `job-finalize` when false.
    pub auto_finalize: bool,
    /// Stay CONCLUDED until `job-dismiss` when false.
    pub auto_dismiss: bool,
}

/// Everything a mirror job is started with.
#[derive(Debug, Clone)]
struct Params {
    job_id: String,
    job_type: JobType,
    source: String,
    target: String,
    replaces: Option<String>,
    sync: SyncMode,
    speed: i64,
    granularity: u64,
    buf_size: u64,
    on_source_error: OnError,
    on_target_error: OnError,
    filter_node_name: Option<String>,
    copy_mode: CopyMode,
    auto_finalize: bool,
    auto_dismiss: bool,
    target_is_zero: bool,
}

fn bad_type(key: &str, want: &str) -> CmdError {
    generic(format!(
        "Invalid parameter type for '{key}', expected: {want}"
    ))
}

fn opt_str<'a>(a: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CmdError> {
    match a.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad_type(key, "string")),
    }
}

fn opt_bool(a: &Map<String, Value>, key: &str, default: bool) -> Result<bool, CmdError> {
    match a.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad_type(key, "boolean")),
    }
}

fn opt_int(a: &Map<String, Value>, key: &str) -> Result<Option<i64>, CmdError> {
    match a.get(key) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| bad_type(key, "integer")),
    }
}

fn on_error(a: &Map<String, Value>, key: &str) -> Result<OnError, CmdError> {
    match opt_str(a, key)? {
        None => Ok(OnError::Report),
        Some(s) => serde_json::from_value(json!(s))
            .map_err(|_| generic(format!("Parameter '{key}' does not accept value '{s}'"))),
    }
}

fn not_found(name: &str) -> CmdError {
    generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

fn msg(e: String) -> CmdError {
    generic(e)
}

/// The cluster size of the qcow2 image behind `node`, if it is one.
fn cluster_size(node: &NodeRef) -> Option<u64> {
    let d = driver_of(node);
    d.as_any()
        .downcast_ref::<strata_qcow2::Qcow2>()
        .map(|q| q.header().cluster_size())
}

/// `blockdev-mirror` with its QMP arguments (already checked against the schema).
pub async fn blockdev_mirror(env: &BlockJobEnv, args: &Map<String, Value>) -> Result<(), CmdError> {
    let job_id = opt_str(args, "job-id")?.unwrap_or("").to_string();
    let device =
        opt_str(args, "device")?.ok_or_else(|| generic("Parameter 'device' is missing"))?;
    let target =
        opt_str(args, "target")?.ok_or_else(|| generic("Parameter 'target' is missing"))?;
    let sync = match opt_str(args, "sync")?.ok_or_else(|| generic("Parameter 'sync' is missing"))? {
        "top" => SyncMode::Top,
        "full" => SyncMode::Full,
        "none" => SyncMode::None,
        s @ ("incremental" | "bitmap") => {
            return Err(generic(format!("Sync mode '{s}' not supported")));
        }
        s => {
            return Err(generic(format!(
                "Parameter 'sync' does not accept value '{s}'"
            )));
        }
    };
    let granularity = opt_int(args, "granularity")?.unwrap_or(0);
    if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
        return Err(generic(
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ));
    }
    if granularity & (granularity - 1).max(0) != 0 {
        return Err(generic("Parameter 'granularity' expects a power of 2"));
    }
    let buf_size = opt_int(args, "buf-size")?.unwrap_or(0);
    if buf_size < 0 {
        return Err(generic("Invalid parameter 'buf-size'"));
    }
    let copy_mode = match opt_str(args, "copy-mode")? {
        None => CopyMode::Background,
        Some(s) => CopyMode::parse(s)
            .ok_or_else(|| generic(format!("Parameter 'copy-mode' does not accept value '{s}'")))?,
    };
    let p = Params {
        job_id,
        job_type: JobType::Mirror,
        source: device.to_string(),
        target: target.to_string(),
        replaces: opt_str(args, "replaces")?.map(str::to_string),
        sync,
        speed: opt_int(args, "speed")?.unwrap_or(0),
        granularity: granularity as u64,
        buf_size: buf_size as u64,
        on_source_error: on_error(args, "on-source-error")?,
        on_target_error: on_error(args, "on-target-error")?,
        filter_node_name: opt_str(args, "filter-node-name")?.map(str::to_string),
        copy_mode,
        auto_finalize: opt_bool(args, "auto-finalize", true)?,
        auto_dismiss: opt_bool(args, "auto-dismiss", true)?,
        target_is_zero: opt_bool(args, "target-is-zero", false)?,
    };
    start(env, p).await
}

/// Active commit: `block-commit` when top is the active layer.
pub async fn start_active_commit(
    env: &BlockJobEnv,
    args: ActiveCommitArgs,
) -> Result<(), CmdError> {
    let p = Params {
        job_id: args.job_id,
        job_type: JobType::Commit,
        source: args.top,
        target: args.base,
        replaces: None,
        sync: SyncMode::Top,
        speed: args.speed,
        granularity: 0,
        buf_size: 0,
        on_source_error: args.on_error,
        on_target_error: args.on_error,
        filter_node_name: args.filter_node_name,
        copy_mode: CopyMode::Background,
        auto_finalize: args.auto_finalize,
        auto_dismiss: args.auto_dismiss,
        target_is_zero: false,
    };
    start(env, p).await
}

/// Whether `name` is a root node: only backends (exports) use it.
fn is_root(g: &Graph, name: &str) -> bool {
    g.parents_of(name).all(|e| e.user == User::Backend)
}

/// Nodes from `top` (exclusive) down to `base` (exclusive) through backing/filter links,
/// or `None` when `base` is not in `top`'s chain.
fn chain_between(g: &Graph, top: &str, base: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = g.chain_below(top)?;
    while cur != base {
        out.push(cur.clone());
        cur = g.chain_below(&cur)?;
    }
    Some(out)
}

fn in_chain(g: &Graph, top: &str, node: &str) -> bool {
    let mut cur = Some(top.to_string());
    while let Some(c) = cur {
        if c == node {
            return true;
        }
        cur = g.chain_below(&c);
    }
    false
}

async fn start(env: &BlockJobEnv, p: Params) -> Result<(), CmdError> {
    let commit = p.job_type == JobType::Commit;
    let mut guard = env.graph.lock().await;
    let g = &mut *guard;
    let src_rec = g.node(&p.source).ok_or_else(|| not_found(&p.source))?;
    let src_node: NodeRef = src_rec.node.clone();
    if !commit && !is_root(g, &p.source) {
        return Err(generic("Need a root block node"));
    }
    if !commit {
        crate::chain::check_not_busy(g, &p.target)?;
    }
    let tgt_rec = g.node(&p.target).ok_or_else(|| not_found(&p.target))?;
    let tgt_node: NodeRef = tgt_rec.node.clone();
    let base_ro = tgt_rec.read_only;
    if p.source == p.target {
        return Err(generic("Can't mirror node into itself"));
    }
    if !commit {
        let below = g.skip_filters(&p.target);
        if below != p.target && in_chain(g, &p.source, &below) {
            return Err(generic(
                "Cannot mirror to a filter on top of a node in the source's backing chain",
            ));
        }
    }
    let to_replace = match &p.replaces {
        None => p.source.clone(),
        Some(r) => {
            let rec = g
                .node(r)
                .ok_or_else(|| generic(format!("Failed to find node with node-name='{r}'")))?;
            // Only the source itself (through filters) can be replaced safely here.
            if g.skip_filters(r) != g.skip_filters(&p.source) {
                return Err(generic(format!(
                    "Cannot replace '{r}' by a node mirrored from '{}', because it cannot be guaranteed that doing so would not lead to an abrupt change of visible data",
                    p.source
                )));
            }
            if rec.node.size() != tgt_node.size() {
                return Err(generic(
                    "cannot replace image with a mirror image of different size",
                ));
            }
            r.clone()
        }
    };
    let intermediates = if commit {
        chain_between(g, &p.source, &p.target)
            .ok_or_else(|| generic(format!("'{}' is not in this backing file chain", p.target)))?
    } else {
        Vec::new()
    };
    if let Some(f) = &p.filter_node_name
        && g.node(f).is_some()
    {
        return Err(generic(format!("Duplicate nodes with node-name='{f}'")));
    }

    // Granularity and buffer (QEMU's mirror_start_job).
    let cluster = cluster_size(&tgt_node);
    let granularity = if p.granularity != 0 {
        p.granularity
    } else {
        strata_core::bitmap::default_granularity(cluster)
    };
    let mut buf_size = if p.buf_size == 0 {
        DEFAULT_BUF_SIZE
    } else {
        p.buf_size
    };
    buf_size = buf_size.next_multiple_of(granularity);
    let target_has_backing = g.chain_below(&p.target).is_some();
    if let Some(cs) = cluster
        && !target_has_backing
        && granularity < cs
    {
        buf_size = buf_size.max(cs);
    }

    // The filter and the state it shares with the job.
    let filter_name = match &p.filter_node_name {
        Some(n) => n.clone(),
        None => g.auto_name(),
    };
    let below = Link::new(src_node.clone());
    let target_link = Link::new(tgt_node.clone());
    let size = src_node.size();
    let state = Arc::new(MirrorState {
        granularity,
        dirty: Mutex::new(DirtyBitmap::new(size, granularity)),
        in_flight: Mutex::new(Vec::new()),
        copy_bytes_in_flight: AtomicU64::new(0),
        active_bytes_in_flight: AtomicU64::new(0),
        changed: tokio::sync::Notify::new(),
        range_freed: tokio::sync::Notify::new(),
        write_blocking: AtomicBool::new(p.copy_mode == CopyMode::WriteBlocking),
        actively_synced: AtomicBool::new(false),
        stopped: AtomicBool::new(false),
        failed: Mutex::new(None),
        target: target_link.clone(),
        source: below.clone(),
        gate: Arc::new(RwLock::new(())),
        drained: Mutex::new(None),
        ctx: Mutex::new(None),
        on_target_error: p.on_target_error,
        dirtied_bytes: AtomicU64::new(0),
        copied_bytes: AtomicU64::new(0),
        ready: AtomicBool::new(false),
        meters: Mutex::new(Default::default()),
    });
    let base_chain = if commit {
        Some(tgt_node.clone())
    } else {
        match p.sync {
            SyncMode::Top => g
                .chain_below(&g.skip_filters(&p.source))
                .and_then(|b| g.node(&b).map(|n| n.node.clone() as NodeRef)),
            _ => None,
        }
    };
    let job = Arc::new(MirrorJob {
        p: p.clone(),
        env: env.clone(),
        state: state.clone(),
        filter_name: filter_name.clone(),
        to_replace,
        base: base_chain,
        target_node: tgt_node.clone(),
        buf_size,
        edges: Mutex::new(Vec::new()),
        base_ro: base_ro && commit,
        aborted: AtomicBool::new(false),
        pivoted: AtomicBool::new(false),
        cleaned: AtomicBool::new(false),
    });
    let mut opts = JobOptions::new(p.job_id.clone());
    opts.auto_finalize = p.auto_finalize;
    opts.auto_dismiss = p.auto_dismiss;
    opts.speed = p.speed.max(0) as u64;
    env.jobs.create(opts, job.clone())?;
    let fail = |e: CmdError| {
        let _ = env.jobs.early_fail(&p.job_id);
        e
    };
    if p.speed < 0 {
        return Err(fail(generic(
            "Parameter 'speed' expects a non-negative value",
        )));
    }

    // Graph changes; each step is undone if a later one fails.
    let mut edges: Vec<EdgeId> = Vec::new();
    let r = setup_graph(
        g,
        &job,
        &p,
        &intermediates,
        &below,
        &target_link,
        &mut edges,
    )
    .await;
    *job.edges.lock() = edges;
    if let Err(e) = r {
        job.teardown(g).await;
        return Err(fail(msg(e)));
    }
    drop(guard);
    env.jobs.start(&p.job_id)?;
    Ok(())
}

/// Insert the filter, take the job's permissions, freeze the chain (active commit).
async fn setup_graph(
    g: &mut Graph,
    job: &MirrorJob,
    p: &Params,
    intermediates: &[String],
    below: &Arc<Link>,
    target_link: &Arc<Link>,
    edges: &mut Vec<EdgeId>,
) -> Result<(), String> {
    let commit = p.job_type == JobType::Commit;
    let user = User::Job {
        kind: p.job_type.as_str(),
        id: p.job_id.clone(),
    };
    // Active commit: the base becomes writable (and grows) first.
    let mut grow = false;
    if commit {
        if job.base_ro {
            strata_graph::blockdev::reopen(g, &p.target, false).await?;
        }
        grow = job.target_node.size() < below.size();
    }
    // The job's pin on the source stays there when the filter goes in.
    edges.push(g.add_edge(
        user.clone(),
        &p.source,
        "source",
        EdgePerms::Fixed(Use::MirrorSourceNode.perms()),
        None,
    )?);
    let tuse = match (commit, grow) {
        (false, _) => Use::MirrorTarget,
        (true, false) => Use::ActiveCommitBase,
        (true, true) => Use::ActiveCommitBaseGrow,
    };
    edges.push(g.add_edge(
        User::Backend,
        &p.target,
        "root",
        EdgePerms::Fixed(tuse.perms()),
        Some(target_link.clone()),
    )?);
    edges.push(g.add_edge(
        user.clone(),
        &p.target,
        "target",
        EdgePerms::Fixed(Use::JobTarget.perms()),
        None,
    )?);
    if grow {
        let size = below.size();
        target_link
            .truncate(size, strata_core::Prealloc::Off)
            .await
            .map_err(|e| {
                format!("Top and base image sizes differ and base cannot be resized: {e}")
            })?;
    }

    // The filter.
    let mirror_top = GraphNode::new(
        &job.filter_name,
        Arc::new(MirrorTop {
            state: job.state.clone(),
        }),
    );
    g.insert_node(NodeRec {
        name: job.filter_name.clone(),
        auto_named: p.filter_node_name.is_none(),
        node: mirror_top,
        kind: NodeKind::Filter,
        options: json!({"driver": "mirror_top", "node-name": job.filter_name, "file": p.source}),
        read_only: false,
        monitor_owned: false,
    })?;
    // Active commit's filter does not need consistent reads of the top (its backing chain
    // is inconsistent while the commit runs) and shares writes.
    let fperms = if commit {
        EdgePerms::Fixed(PermSpec {
            perm: Perm::WRITE,
            shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::WRITE,
        })
    } else {
        EdgePerms::Derived(EdgeKind::Filtered)
    };
    g.add_edge(
        User::Node(job.filter_name.clone()),
        &p.source,
        "file",
        fperms,
        Some(below.clone()),
    )?;
    g.insert_filter(&job.filter_name, &p.source).await?;
    edges.push(g.add_edge(
        user.clone(),
        &job.filter_name,
        "main node",
        EdgePerms::Fixed(Use::MirrorSource.perms()),
        None,
    )?);
    // Intermediate nodes: only once the filter no longer passes consistent reads down.
    for n in intermediates {
        edges.push(g.add_edge(
            user.clone(),
            n,
            "intermediate node",
            EdgePerms::Fixed(Use::CommitIntermediate.perms()),
            None,
        )?);
    }
    if commit {
        // Freeze the backing links from the top down to the base.
        let mut frozen = Vec::new();
        let mut cur = p.source.clone();
        while cur != p.target {
            let Some(e) = g.child(&cur, "backing").or_else(|| g.child(&cur, "file")) else {
                break;
            };
            frozen.push(e.id);
            cur = e.child.clone();
        }
        for id in frozen {
            g.set_frozen(id, true);
        }
    }
    Ok(())
}

/// The mirror (or active commit) job.
struct MirrorJob {
    p: Params,
    env: BlockJobEnv,
    state: Arc<MirrorState>,
    filter_name: String,
    to_replace: String,
    /// Copy only what is allocated above this node (sync top / active commit).
    base: Option<NodeRef>,
    target_node: NodeRef,
    buf_size: u64,
    /// Edges the job added (job pins and the target backend).
    edges: Mutex<Vec<EdgeId>>,
    /// Active commit: the base was read-only.
    base_ro: bool,
    aborted: AtomicBool,
    pivoted: AtomicBool,
    cleaned: AtomicBool,
}

/// `copy-mode: auto`'s decision: switch once the bytes left to copy stop reaching new lows.
struct AutoSwitch {
    best: u64,
    best_at: std::time::Instant,
}

impl AutoSwitch {
    fn new() -> AutoSwitch {
        AutoSwitch {
            best: u64::MAX,
            best_at: std::time::Instant::now(),
        }
    }

    /// Feeds the bytes left to copy now; true when it is time for write-blocking.
    fn should_switch(&mut self, remaining: u64) -> bool {
        let now = std::time::Instant::now();
        if remaining < self.best || remaining == 0 {
            self.best = remaining;
            self.best_at = now;
            return false;
        }
        now.duration_since(self.best_at) >= AUTO_STALL
    }
}

/// How one copy operation ended.
struct OpDone {
    off: u64,
    end: u64,
    result: Result<(), (IoOperation, i32)>,
}

impl MirrorJob {
    fn errno_msg(errno: i32) -> String {
        strata_core::error::strerror(errno)
    }

    /// Mark the initial dirty ranges (QEMU's `mirror_dirty_init`).
    async fn dirty_init(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let st = &self.state;
        let size = st.source.size();
        let src: NodeRef = st.source.clone();
        let mark_all = self.p.sync == SyncMode::Full && !self.p.target_is_zero;
        if mark_all {
            st.dirty.lock().set_range(0, size);
            return Ok(());
        }
        if self.p.sync == SyncMode::None {
            return Ok(());
        }
        let base = match self.p.sync {
            SyncMode::Full => None,
            _ => self.base.as_ref(),
        };
        let mut off = 0;
        while off < size {
            if ctx.is_force_cancelled() {
                return Err(JobFailure::canceled());
            }
            let ext = block_status_above(&src, base, off, size - off)
                .await
                .map_err(|e| JobFailure::new(Self::errno_msg(e.kind().errno())))?;
            let len = ext.len.max(1).min(size - off);
            let skip = self.p.target_is_zero && ext.status.zero;
            if ext.status.allocated && !skip {
                st.dirty.lock().set_range(off, len);
            }
            off += len;
        }
        Ok(())
    }

    /// Pick the next dirty area at or after `cursor` that no in-flight range overlaps,
    /// clear it and register it in flight. Returns (offset, end) or `None`.
    fn next_op(&self, cursor: &mut u64, max_io: u64) -> Option<(u64, u64)> {
        let st = &self.state;
        let size = st.source.size();
        let g = st.granularity;
        let mut dirty = st.dirty.lock();
        let mut inflight = st.in_flight.lock();
        for pass in 0..2 {
            let mut pos = if pass == 0 { *cursor } else { 0 };
            let stop = if pass == 0 { size } else { (*cursor).min(size) };
            while pos < stop {
                let Some((off, len)) = dirty.next_dirty_area(pos, stop, max_io) else {
                    break;
                };
                let a_off = off / g * g;
                let mut a_end = (off + len)
                    .next_multiple_of(g)
                    .min(size.next_multiple_of(g));
                // Trim the area to the part before the first in-flight overlap.
                let mut blocked = false;
                for &(s, e) in inflight.iter() {
                    if s < a_end && a_off < e {
                        if s > a_off {
                            a_end = a_end.min(s);
                        } else {
                            blocked = true;
                            pos = pos.max(e);
                        }
                    }
                }
                if blocked {
                    if pos <= off {
                        pos = a_end;
                    }
                    continue;
                }
                let end = a_end.min(size);
                dirty.clear_range(a_off, end - a_off);
                inflight.push((a_off, a_end));
                *cursor = a_end;
                return Some((a_off, a_end));
            }
        }
        None
    }

    /// One copy operation: read the source (or learn it reads as zeroes), write the
    /// target. On failure the range is dirty again.
    async fn copy_op(st: Arc<MirrorState>, off: u64, a_end: u64) -> OpDone {
        let size = st.source.size();
        let end = a_end.min(size);
        let len = end - off;
        let src: NodeRef = st.source.clone();
        let mut result = Ok(());
        let mut pos = off;
        while pos < end {
            let ext = match block_status_above(&src, None, pos, end - pos).await {
                Ok(e) => e,
                Err(e) => {
                    result = Err((IoOperation::Read, e.kind().errno()));
                    break;
                }
            };
            let n = ext.len.clamp(1, end - pos);
            if ext.status.zero && !ext.status.data {
                let f = ZeroFlags {
                    may_unmap: true,
                    no_fallback: false,
                };
                if let Err(e) = st.target.write_zeroes(pos, n, f).await {
                    result = Err((IoOperation::Write, e.kind().errno()));
                    break;
                }
            } else {
                let buf = match src.read(pos, IoBuf::zeroed(n as usize)).await {
                    Ok(b) => b,
                    Err(e) => {
                        result = Err((IoOperation::Read, e.kind().errno()));
                        break;
                    }
                };
                if let Err(e) = st.target.write(pos, buf, WriteFlags::default()).await {
                    result = Err((IoOperation::Write, e.kind().errno()));
                    break;
                }
            }
            pos += n;
        }
        if result.is_err() {
            st.dirty.lock().set_range(off, len);
        } else {
            st.copied_bytes.fetch_add(len, Ordering::Relaxed);
        }
        st.copy_bytes_in_flight.fetch_sub(len, Ordering::Relaxed);
        st.release_range(off, a_end);
        OpDone { off, end, result }
    }

    /// The copy loop (QEMU's `mirror_run`).
    async fn work(&self, ctx: &JobContext) -> Result<(), JobFailure> {
        let st = &self.state;
        *st.ctx.lock() = Some(ctx.clone());
        if self.p.job_type == JobType::Mirror && st.source.size() != self.target_node.size() {
            return Err(JobFailure::new(
                "Source and target image have different sizes",
            ));
        }
        self.dirty_init(ctx).await?;
        st.update_progress();
        let max_io = (self.buf_size / MAX_IN_FLIGHT as u64).max(MAX_IO_BYTES);
        let mut ops: JoinSet<OpDone> = JoinSet::new();
        let mut cursor = 0u64;
        let mut ready = false;
        let mut failure: Option<String> = None;
        let mut auto = (self.p.copy_mode == CopyMode::Auto).then(AutoSwitch::new);
        loop {
            if ctx.is_force_cancelled() {
                break;
            }
            if let Some(errno) = *st.failed.lock() {
                failure.get_or_insert(Self::errno_msg(errno));
            }
            if failure.is_some() {
                break;
            }
            // Reap finished operations.
            while let Some(done) = ops.try_join_next() {
                self.op_done(ctx, done, &mut failure);
            }
            if failure.is_some() {
                break;
            }
            st.update_progress();
            st.sample_meters();
            if let Some(a) = &mut auto
                && a.should_switch(st.remaining())
            {
                st.write_blocking.store(true, Ordering::Release);
                auto = None;
            }
            let in_flight_bytes = st.copy_bytes_in_flight.load(Ordering::Relaxed);
            let dirty = st.dirty.lock().count();
            // Start another copy operation when there is room.
            if dirty > 0 && ops.len() < MAX_IN_FLIGHT && in_flight_bytes < self.buf_size {
                let room = (self.buf_size - in_flight_bytes).max(st.granularity);
                if let Some((off, a_end)) = self.next_op(&mut cursor, max_io.min(room)) {
                    let len = a_end.min(st.source.size()) - off;
                    st.copy_bytes_in_flight.fetch_add(len, Ordering::Relaxed);
                    // Only copied bytes count against the speed limit, not zeroed ranges.
                    let src: NodeRef = st.source.clone();
                    let acct = match block_status_above(&src, None, off, len).await {
                        Ok(e) if e.status.zero && !e.status.data && e.len >= len => 0,
                        _ => len,
                    };
                    ops.spawn(Self::copy_op(st.clone(), off, a_end));
                    ctx.rate_limit(acct).await;
                    continue;
                }
            }
            // Active writes in flight do not hold READY back (the guest waits for their
            // target half); under a busy guest there nearly always is one. The final sync
            // below waits for them behind the drain gate.
            if dirty == 0 && ops.is_empty() {
                if !ready {
                    if let Err(e) = st.target.flush().await {
                        self.handle(ctx, IoOperation::Write, e.kind().errno(), &mut failure);
                        continue;
                    }
                    ready = true;
                    st.ready.store(true, Ordering::Release);
                    if st.write_blocking.load(Ordering::Acquire) {
                        st.actively_synced.store(true, Ordering::Release);
                    }
                    ctx.set_ready();
                }
                if ready && st.write_blocking.load(Ordering::Acquire) && st.failed.lock().is_none()
                {
                    st.actively_synced.store(true, Ordering::Release);
                }
                if ctx.is_completing() {
                    // Hold guest writes back, then check that nothing is left.
                    let guard = st.gate.clone().write_owned().await;
                    let clean = st.dirty.lock().count() == 0 && st.in_flight.lock().is_empty();
                    if clean && st.failed.lock().is_none() {
                        if let Err(e) = st.target.flush().await {
                            drop(guard);
                            self.handle(ctx, IoOperation::Write, e.kind().errno(), &mut failure);
                            continue;
                        }
                        *st.drained.lock() = Some(guard);
                        st.stopped.store(true, Ordering::Release);
                        st.update_progress();
                        return Ok(());
                    }
                    continue;
                }
            }
            // Wait for an operation to end, new dirty data, or a verb.
            let changed = st.changed.notified();
            tokio::select! {
                Some(done) = ops.join_next(), if !ops.is_empty() => self.op_done(ctx, done, &mut failure),
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            ctx.pause_point().await;
        }
        // Failure or forced cancel: let the operations in flight end first.
        st.stopped.store(true, Ordering::Release);
        while let Some(done) = ops.join_next().await {
            if let Ok(d) = done
                && d.result.is_ok()
            {
                ctx.progress_update(d.end - d.off);
            }
        }
        st.update_progress();
        if ctx.is_force_cancelled() && failure.is_none() {
            return Err(JobFailure::canceled());
        }
        Err(JobFailure::new(
            failure.unwrap_or_else(|| JobFailure::CANCELED.to_string()),
        ))
    }

    fn op_done(
        &self,
        ctx: &JobContext,
        done: Result<OpDone, tokio::task::JoinError>,
        failure: &mut Option<String>,
    ) {
        let d = match done {
            Ok(d) => d,
            Err(_) => {
                failure.get_or_insert_with(|| "Job panicked".to_string());
                return;
            }
        };
        match d.result {
            // Zeroed ranges count as progress too (QEMU counts every operation's bytes).
            Ok(()) => ctx.progress_update(d.end - d.off),
            Err((op, errno)) => self.handle(ctx, op, errno, failure),
        }
    }

    fn handle(&self, ctx: &JobContext, op: IoOperation, errno: i32, failure: &mut Option<String>) {
        self.state.actively_synced.store(false, Ordering::Release);
        let policy = match op {
            IoOperation::Read => self.p.on_source_error,
            IoOperation::Write => self.p.on_target_error,
        };
        if ctx.handle_error(policy, op, errno) == ErrorAction::Report {
            failure.get_or_insert_with(|| Self::errno_msg(errno));
        }
    }

    /// Undo what the job did to the graph (all but the pivot).
    async fn teardown(&self, g: &mut Graph) {
        if self.cleaned.swap(true, Ordering::AcqRel) {
            return;
        }
        self.state.stopped.store(true, Ordering::Release);
        drop(self.state.drained.lock().take());
        // Unfreeze everything the job froze.
        let frozen: Vec<EdgeId> = g
            .edges()
            .iter()
            .filter(|e| e.frozen)
            .map(|e| e.id)
            .collect();
        for id in frozen {
            if self.froze(g, id) {
                g.set_frozen(id, false);
            }
        }
        for id in std::mem::take(&mut *self.edges.lock()) {
            g.remove_edge(id);
        }
        if g.node(&self.filter_name).is_some() {
            if g.child(&self.filter_name, "file").is_some() {
                let _ = g.remove_filter(&self.filter_name).await;
            } else {
                let _ = g.remove_node(&self.filter_name).await;
            }
        }
        if self.base_ro
            && self.aborted.load(Ordering::Acquire)
            && !self.pivoted.load(Ordering::Acquire)
        {
            let _ = strata_graph::blockdev::reopen(g, &self.p.target, true).await;
        }
    }

    /// Whether the frozen edge `id` is one of this job's (active commit's chain).
    fn froze(&self, g: &Graph, id: EdgeId) -> bool {
        if self.p.job_type != JobType::Commit {
            return false;
        }
        let mut cur = self.p.source.clone();
        while cur != self.p.target {
            let Some(e) = g.child(&cur, "backing").or_else(|| g.child(&cur, "file")) else {
                return false;
            };
            if e.id == id {
                return true;
            }
            cur = e.child.clone();
        }
        false
    }

    /// The pivot (QEMU's `mirror_exit_common` with `should_complete`).
    async fn pivot(&self, g: &mut Graph) -> Result<(), String> {
        let st = &self.state;
        // Stop writing the target through the job's backend; unfreeze the chain.
        let job_edges: Vec<EdgeId> = self.edges.lock().clone();
        let frozen: Vec<EdgeId> = g
            .edges()
            .iter()
            .filter(|e| e.frozen)
            .map(|e| e.id)
            .collect();
        for id in frozen {
            if self.froze(g, id) {
                g.set_frozen(id, false);
            }
        }
        for id in &job_edges {
            if g.edge(*id).is_some_and(|e| e.user == User::Backend) {
                g.remove_edge(*id);
            }
        }
        self.edges.lock().retain(|id| g.edge(*id).is_some());
        if g.node(&self.to_replace).is_none() {
            return Err(format!("Node name '{}' not found", self.to_replace));
        }
        let mine: Vec<EdgeId> = self.edges.lock().clone();
        let keep = move |e: &EdgeRec| mine.contains(&e.id);
        g.replace_node(&self.to_replace, &self.p.target, keep)
            .await?;
        self.pivoted.store(true, Ordering::Release);
        st.stopped.store(true, Ordering::Release);
        // Guest writes may flow again: through the filter, into the target.
        drop(st.drained.lock().take());
        Ok(())
    }
}

impl JobDriver for MirrorJob {
    fn job_type(&self) -> JobType {
        self.p.job_type
    }

    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            let r = self.work(&ctx).await;
            if r.is_err() {
                self.state.stopped.store(true, Ordering::Release);
            }
            r
        })
    }

    fn has_complete(&self) -> bool {
        true
    }

    fn complete(&self, _ctx: &JobContext) -> Result<(), String> {
        if let Some(r) = &self.p.replaces
            && let Ok(g) = self.env.graph.try_lock()
            && g.node(r).is_none()
        {
            return Err(format!("Node name '{r}' not found"));
        }
        Ok(())
    }

    fn prepare<'a>(&'a self, ctx: &'a JobContext) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if ctx.is_cancelled() || !ctx.is_completing() {
                return Ok(());
            }
            let mut g = self.env.graph.lock().await;
            let r = self.pivot(&mut g).await;
            if r.is_err() {
                drop(self.state.drained.lock().take());
            }
            r
        })
    }

    fn abort(&self, _ctx: &JobContext) {
        self.aborted.store(true, Ordering::Release);
    }

    fn clean<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.state.stopped.store(true, Ordering::Release);
            // Let blocked guest writes go on before the graph changes (they pass through).
            drop(self.state.drained.lock().take());
            let mut g = self.env.graph.lock().await;
            self.teardown(&mut g).await;
            *self.state.ctx.lock() = None;
        })
    }

    fn cancel_requested(&self, force: bool, status: JobStatus) -> bool {
        force || !matches!(status, JobStatus::Ready | JobStatus::Standby)
    }

    fn change(&self, _ctx: &JobContext, opts: &Value) -> Result<(), String> {
        if self.p.job_type != JobType::Mirror {
            return Err("Job type does not support change".to_string());
        }
        let want = match opts.get("copy-mode").and_then(Value::as_str) {
            Some(s) => CopyMode::parse(s)
                .ok_or_else(|| format!("Parameter 'copy-mode' does not accept value '{s}'"))?,
            None => CopyMode::Background,
        };
        let cur = if self.state.write_blocking.load(Ordering::Acquire) {
            CopyMode::WriteBlocking
        } else if self.p.copy_mode == CopyMode::Auto {
            CopyMode::Auto
        } else {
            CopyMode::Background
        };
        if want == cur {
            return Ok(());
        }
        if want != CopyMode::WriteBlocking {
            return Err(format!(
                "Change to copy mode '{}' is not implemented",
                want.as_str()
            ));
        }
        match self.state.write_blocking.compare_exchange(
            false,
            true,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "Expected current copy mode '{}', got '{}'",
                cur.as_str(),
                CopyMode::WriteBlocking.as_str()
            )),
        }
    }

    fn extension_info(&self) -> Map<String, Value> {
        let st = &self.state;
        st.sample_meters();
        let ready = st.ready.load(Ordering::Acquire);
        let completing = st.ctx.lock().as_ref().is_some_and(|c| c.is_completing());
        let phase = if completing {
            "completing"
        } else if ready {
            "synced"
        } else if st.write_blocking.load(Ordering::Acquire) {
            "active"
        } else {
            "bulk"
        };
        let m = st.meters.lock();
        let convergence = if ready {
            "converged"
        } else {
            match m.remaining.slope() {
                Some(s) if s >= 0.0 => "diverging",
                _ => "converging",
            }
        };
        let mut out = Map::new();
        out.insert("phase".into(), json!(phase));
        out.insert("dirty-rate".into(), json!(m.dirtied.rate()));
        out.insert("copy-rate".into(), json!(m.copied.rate()));
        out.insert("convergence".into(), json!(convergence));
        out
    }

    fn extra_info(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if self.p.job_type == JobType::Mirror {
            m.insert(
                "actively-synced".into(),
                json!(self.state.actively_synced.load(Ordering::Acquire)),
            );
        }
        m
    }
}
