//! `block-commit` (job type `commit`): push the data of `top` and the layers below it down to
//! `base` (QEMU `block/commit.c` and `qmp_block_commit`).
//!
//! When `top` is the active layer (or someone writes to it) the mirror machinery does an
//! active commit ([`crate::mirror::start_active_commit`]). Otherwise this module runs an
//! intermediate commit: a `commit_top` filter goes above `top`; the job pins `device`
//! (`main node`), every node from `top` down to above the base (`intermediate node`: others
//! may write, nobody may read consistently), the base (`base`), and writes the base through
//! its own backend (growing it when it is smaller than `top`); the backing links from the
//! filter down to the base are frozen. The copy loop moves what is allocated in
//! `top`..above-base into the base, 512 KiB at a time (zero runs as write-zeroes). On success
//! every user of the filter (the overlay of `top`) now uses the base, the overlay's header
//! names the base, and the implicit nodes left without users are closed; a read-only base is
//! reopened read-write for the job and put back afterwards.
//!
//! ## Safe commit (`x-safe: true`, a Strata extension)
//!
//! A plain commit overwrites the base, so every image that still reads through it (the ones
//! between `top` and the base, which drop out of the chain but stay on disk) stops being a
//! valid delta of its backing file, and a commit stopped midway leaves even `top`'s chain
//! showing a mix. With `x-safe`, before a range of the base is written, the base's current
//! data for every part of that range that the image directly above the base (`B+1`, the
//! lowest non-filter node of the intermediates) does not allocate itself is copied up into
//! `B+1`, and `B+1` is flushed. The invariant, true before and after every step, after a
//! cancel, an I/O error or a crash:
//!
//! > for every offset the base has been (or is being) changed at, `B+1` allocates that
//! > offset itself, holding what the base showed there before the job started.
//!
//! So `B+1`'s view never depends on the changed parts of the base, and every image above
//! `B+1` (which reads the base only through `B+1`) keeps its original guest view too. A
//! copy-up writes what `B+1` already showed, so it needs only `write unchanged` on `B+1`,
//! which the job's own `intermediate node` pins share. A retried step skips what `B+1`
//! already allocates, so a base range half-written by a failed step is never copied up.
//! When `B+1` is `top` itself (`top` directly above the base) nothing is ever copied up:
//! the job writes into the base only ranges `top` allocates. An active commit (the mirror
//! machinery) accepts `x-safe` only in that case, for the same reason: the mirror writes into
//! the base only what `top` allocates or what the base already holds, so `top`'s view
//! changes only by the guest's own writes until the job drops it at completion.

use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use strata_core::{
    BlockNode, BoxFuture as IoFuture, IoBuf, NodeRef, Prealloc, WriteFlags, ZeroFlags,
};
use strata_graph::{
    EdgeId, EdgePerms, Graph, Link, NodeKind, Perm, PermSpec, Use, User, block_status_above,
};
use strata_job::{
    BoxFuture, ErrorAction, IoOperation, JobContext, JobDriver, JobFailure, JobOptions, JobType,
    OnError,
};

use crate::chain::{
    OnStepError, arg_bool, arg_on_error, arg_speed, arg_str, backing_format, chain_contains,
    chain_from, drop_unused_implicit, failure_text, filename_of, find_backing_image, freeze_links,
    node_ref, not_found, pin, register_filter, release_pins, restore_ro, unfreeze,
    write_backing_header,
};
use crate::env::{BlockJobEnv, CmdError, SharedGraph, generic};
use crate::parallel::parallel_copy_loop;
use strata_graph::forward_to_child;

/// The commit job's buffer: the most one iteration copies (QEMU's `COMMIT_BUFFER_SIZE`).
pub const COMMIT_BUFFER_SIZE: u64 = 512 * 1024;

/// QEMU's `commit_top` filter: shows `top` unchanged to the overlay above it, so the job
/// can hold the chain below it. Reads, writes and status pass through; its backing is
/// `top`'s, so chain walks from the overlay see the same layers as before.
#[derive(Debug)]
pub struct CommitTopNode {
    file: NodeRef,
}

impl CommitTopNode {
    /// A `commit_top` filter over `file`.
    pub fn new(file: NodeRef) -> CommitTopNode {
        CommitTopNode { file }
    }
}

impl BlockNode for CommitTopNode {
    fn driver(&self) -> &'static str {
        "commit_top"
    }

    forward_to_child!(file =>
        filename, size, read_only, request_alignment, read, write, write_zeroes, discard, flush,
        block_status, truncate, backing, file, debug_event, allocated_size, as_any,
    );

    // The filter owns nothing: closing it leaves `top` to the graph.
    fn close(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

#[derive(Debug, Default)]
struct Held {
    pins: Vec<EdgeId>,
    frozen: Vec<EdgeId>,
    /// The base's backend (dropped first in prepare, as QEMU does).
    base_backend: Option<EdgeId>,
    filter: Option<String>,
    done: bool,
}

#[derive(Debug)]
struct CommitJob {
    graph: SharedGraph,
    top: NodeRef,
    base_name: String,
    base: NodeRef,
    /// `top` and the nodes below it above the base.
    intermediates: Vec<String>,
    backing_file: Option<String>,
    mask_protocol: bool,
    on_error: OnError,
    restore_read_only: bool,
    /// `x-safe`: the image directly above the base, which copy-ups go into.
    safe: Option<SafeTarget>,
    held: Mutex<Held>,
}

/// Where a safe commit keeps the base's old data.
#[derive(Debug)]
struct SafeTarget {
    name: String,
    node: NodeRef,
    /// It was read-only before the job (reopened read-write for the copy-ups).
    restore_read_only: bool,
}

/// One failed step of the copy loop.
struct StepError {
    op: IoOperation,
    errno: i32,
}

impl CommitJob {
    /// Copy what `[offset, ..)` holds above the base; returns the bytes looked at and
    /// whether they were copied.
    async fn step(&self, offset: u64, end: u64) -> Result<(u64, bool), StepError> {
        let rd = |e: strata_core::Error| StepError {
            op: IoOperation::Read,
            errno: e.kind().errno(),
        };
        let wr = |e: strata_core::Error| StepError {
            op: IoOperation::Write,
            errno: e.kind().errno(),
        };
        let n = COMMIT_BUFFER_SIZE.min(end - offset);
        let ext = block_status_above(&self.top, Some(&self.base), offset, n)
            .await
            .map_err(rd)?;
        let n = ext.len.clamp(1, n);
        if !ext.status.allocated {
            return Ok((n, false));
        }
        if let Some(safe) = &self.safe {
            copy_up_base_range(&safe.node, &self.base, offset, n)
                .await
                .map_err(|(op, e)| StepError {
                    op,
                    errno: e.kind().errno(),
                })?;
        }
        if ext.status.zero && !ext.status.data {
            self.base
                .write_zeroes(
                    offset,
                    n,
                    ZeroFlags {
                        may_unmap: true,
                        ..Default::default()
                    },
                )
                .await
                .map_err(wr)?;
        } else {
            let buf = self
                .top
                .read(offset, IoBuf::zeroed(n as usize))
                .await
                .map_err(rd)?;
            self.base
                .write(offset, buf, WriteFlags::default())
                .await
                .map_err(wr)?;
        }
        Ok((n, true))
    }

    /// Put the safe commit's copy-up target back to read-only if it was.
    async fn restore_safe_ro(&self, g: &mut Graph) {
        if let Some(s) = &self.safe {
            restore_ro(g, &s.name, s.restore_read_only).await;
        }
    }

    async fn undo(&self, g: &mut Graph) {
        let mut held = std::mem::take(&mut *self.held.lock());
        release_pins(g, &mut held.pins, &mut held.frozen);
        if let Some(b) = held.base_backend.take() {
            g.remove_edge(b);
        }
        if let Some(f) = held.filter.take()
            && g.node(&f).is_some()
        {
            let _ = g.remove_filter(&f).await;
        }
    }
}

impl JobDriver for CommitJob {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            let len = self.top.size();
            ctx.progress_set_total(len);
            if self.base.size() < len {
                self.base
                    .truncate(len, Prealloc::Off)
                    .await
                    .map_err(|e| JobFailure::new(failure_text(e.kind().errno())))?;
            }
            parallel_copy_loop(
                &ctx,
                len,
                COMMIT_BUFFER_SIZE,
                |offset, end| self.step(offset, end),
                |e: StepError, _| {
                    // `stop` pauses and `ignore` moves on; both retry this range.
                    if ctx.handle_error(self.on_error, e.op, e.errno) == ErrorAction::Report {
                        OnStepError::Fail(JobFailure::new(failure_text(e.errno)))
                    } else {
                        OnStepError::Retry
                    }
                },
            )
            .await
        })
    }

    fn prepare<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut g = self.graph.lock().await;
            let (filter, base_backend) = {
                let mut held = self.held.lock();
                unfreeze(&mut g, &mut held.frozen);
                (held.filter.clone(), held.base_backend.take())
            };
            if let Some(b) = base_backend {
                g.remove_edge(b);
            }
            let filter = filter.ok_or("commit filter missing")?;
            // Every user of the filter (the overlay's backing link) now uses the base.
            let overlays: Vec<String> = g
                .parents_of(&filter)
                .filter(|e| e.role == "backing")
                .filter_map(|e| match &e.user {
                    User::Node(n) => Some(n.clone()),
                    _ => None,
                })
                .collect();
            g.replace_node(&filter, &self.base_name, |e| {
                matches!(e.user, User::Job { .. })
            })
            .await?;
            let id = self
                .backing_file
                .clone()
                .unwrap_or_else(|| filename_of(&g, &self.base_name));
            let fmt = backing_format(&g, &self.base_name, self.mask_protocol);
            for o in &overlays {
                // A read-only overlay (an implicit backing node) is reopened read-write
                // for the header change, as QEMU does.
                let was_read_only = g.node(o).ok_or("overlay vanished")?.read_only;
                if was_read_only {
                    strata_graph::blockdev::reopen(&mut g, o, false).await?;
                }
                let node: NodeRef = g.node(o).ok_or("overlay vanished")?.node.clone();
                let written = write_backing_header(&node, Some(&id), Some(&fmt)).await;
                restore_ro(&mut g, o, was_read_only).await;
                written?;
            }
            let pins: Vec<EdgeId> = std::mem::take(&mut self.held.lock().pins);
            for p in pins {
                g.remove_edge(p);
            }
            self.held.lock().filter = None;
            g.remove_node(&filter).await?;
            drop_unused_implicit(&mut g, &self.intermediates).await;
            self.held.lock().done = true;
            Ok(())
        })
    }

    fn clean<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut g = self.graph.lock().await;
            if !self.held.lock().done {
                self.undo(&mut g).await;
            }
            self.restore_safe_ro(&mut g).await;
            restore_ro(&mut g, &self.base_name, self.restore_read_only).await;
        })
    }
}

/// Safe commit's copy-up: before `[offset, offset + len)` of `base` is overwritten, copy
/// the base's current data for every part of it that `above_base` (an image whose backing
/// chain reaches `base` through filters only) does not allocate into `above_base`, then
/// flush it so the copy is on disk before the base changes. Returns whether anything was
/// copied; a failure says whether reading the base or writing the image failed.
///
/// Ranges `above_base` allocates (data or zero) are left alone: it already shows its own
/// data there. Beyond `above_base`'s size there is nothing it shows.
pub async fn copy_up_base_range(
    above_base: &NodeRef,
    base: &NodeRef,
    offset: u64,
    len: u64,
) -> Result<bool, (IoOperation, strata_core::Error)> {
    let end = (offset + len).min(above_base.size());
    let mut pos = offset;
    let mut copied = false;
    while pos < end {
        let ext = block_status_above(above_base, Some(base), pos, end - pos)
            .await
            .map_err(|e| (IoOperation::Read, e))?;
        let n = ext.len.clamp(1, end - pos);
        if !ext.status.allocated {
            // What `above_base` shows here is the base's data (zeroes past its end).
            let buf = above_base
                .read(pos, IoBuf::zeroed(n as usize))
                .await
                .map_err(|e| (IoOperation::Read, e))?;
            above_base
                .write(pos, buf, WriteFlags::default())
                .await
                .map_err(|e| (IoOperation::Write, e))?;
            copied = true;
        }
        pos += n;
    }
    if copied {
        above_base
            .flush()
            .await
            .map_err(|e| (IoOperation::Write, e))?;
    }
    Ok(copied)
}

/// Safe commit's copy-up over the whole image, done before an offline commit: everything
/// `top` allocates above `base` that `above_base` does not is copied up from the base.
pub async fn copy_up_all(
    top: &NodeRef,
    above_base: &NodeRef,
    base: &NodeRef,
) -> strata_core::Result<()> {
    let len = top.size();
    let mut pos = 0;
    while pos < len {
        let n = COMMIT_BUFFER_SIZE.min(len - pos);
        let ext = block_status_above(top, Some(base), pos, n).await?;
        let n = ext.len.clamp(1, n);
        if ext.status.allocated {
            copy_up_base_range(above_base, base, pos, n)
                .await
                .map_err(|(_, e)| e)?;
        }
        pos += n;
    }
    Ok(())
}

/// The image directly above `base` in the chain from `top`: the lowest node of
/// `intermediates` (top first) that is not a filter.
fn above_base_of(g: &Graph, intermediates: &[String]) -> Option<String> {
    intermediates
        .iter()
        .rev()
        .find(|n| g.node(n).is_some_and(|r| r.kind != NodeKind::Filter))
        .cloned()
}

/// The permissions a node's parents require, all together.
fn required_on(g: &Graph, node: &str) -> Perm {
    let perms = g.effective_perms();
    g.parents_of(node)
        .fold(Perm::NONE, |acc, e| acc.union(perms[&e.id].perm))
}

/// `block-commit`.
pub async fn block_commit(env: &BlockJobEnv, args: &Map<String, Value>) -> Result<(), CmdError> {
    let device = arg_str(args, "device").unwrap_or_default();
    let mut g = env.graph.lock().await;
    if g.node(device).is_none() {
        return Err(CmdError {
            class: "DeviceNotFound",
            desc: format!("Device '{device}' not found"),
        });
    }
    // A job holding the node makes it a non-root too (QEMU's job parents), unless Strata's
    // `x-parallel` asks to run beside it (checked below: what this commit changes must be
    // free).
    let parallel = arg_bool(args, "x-parallel", false);
    if g.parents_of(device).any(|e| match e.user {
        User::Node(_) => true,
        User::Job { .. } => !parallel || e.role != "main node",
        _ => false,
    }) {
        return Err(generic("Need a root block node"));
    }

    let top_node = arg_str(args, "top-node");
    let top_file = arg_str(args, "top");
    let top: String = match (top_node, top_file) {
        (Some(_), Some(_)) => return Err(generic("'top-node' and 'top' are mutually exclusive")),
        (Some(t), None) => {
            if g.node(t).is_none() {
                return Err(not_found("", t));
            }
            if !chain_contains(&g, device, t) {
                return Err(generic(format!("'{t}' is not in this backing file chain")));
            }
            t.to_string()
        }
        (None, Some(t)) => {
            let found = if filename_of(&g, device) == t {
                Some(device.to_string())
            } else {
                find_backing_image(&g, device, t)
            };
            found.ok_or_else(|| generic(format!("Top image file {t} not found")))?
        }
        (None, None) => device.to_string(),
    };

    let base_node = arg_str(args, "base-node");
    let base_file = arg_str(args, "base");
    let base: String = match (base_node, base_file) {
        (Some(_), Some(_)) => return Err(generic("'base-node' and 'base' are mutually exclusive")),
        (Some(b), None) => {
            if g.node(b).is_none() {
                return Err(not_found("", b));
            }
            if !chain_contains(&g, &top, b) {
                return Err(generic(format!("'{b}' is not in this backing file chain")));
            }
            b.to_string()
        }
        (None, Some(b)) => find_backing_image(&g, &top, b)
            .ok_or_else(|| generic(format!("Can't find '{b}' in the backing chain")))?,
        (None, None) => {
            let chain = chain_from(&g, &top);
            chain
                .iter()
                .rev()
                .find(|n| g.node(n).is_some_and(|r| r.kind != NodeKind::Protocol))
                .cloned()
                .ok_or_else(|| generic("There is no backimg image"))?
        }
    };
    if top == base {
        return Err(generic("cannot commit an image into itself"));
    }

    let backing_file = arg_str(args, "backing-file");
    let speed = arg_speed(args);
    let job_id = arg_str(args, "job-id").unwrap_or_default().to_string();
    let filter_name = arg_str(args, "filter-node-name");
    let is_active = g.skip_filters(&top) == g.skip_filters(device);
    let safe = arg_bool(args, "x-safe", false);
    let chain = chain_from(&g, &top);
    let Some(base_idx) = chain.iter().position(|n| *n == base) else {
        return Err(generic(format!(
            "'{base}' is not in this backing file chain"
        )));
    };
    let intermediates: Vec<String> = chain[..base_idx].to_vec();
    for n in &chain[..=base_idx] {
        crate::chain::check_not_busy(&g, n)?;
    }
    if parallel {
        // The image above `top` gets a new backing link when this commit completes (its view
        // stays): another job may keep it as its main node or write into it as its base, but
        // must not be removing it from the chain.
        let overlays: Vec<String> = g
            .parents_of(&top)
            .filter(|e| e.role == "backing")
            .filter_map(|e| match &e.user {
                User::Node(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        for o in &overlays {
            crate::chain::check_held_only_as(&g, o, &["main node", "base"])?;
        }
    }
    if is_active || required_on(&g, &top).contains(Perm::WRITE) {
        if safe && above_base_of(&g, &intermediates).is_some_and(|n| n != g.skip_filters(&top)) {
            return Err(generic(
                "'x-safe' is not supported for an active commit with images between 'top' and 'base'",
            ));
        }
        if backing_file.is_some() {
            return Err(generic(if is_active {
                "'backing-file' specified, but 'top' is the active layer"
            } else {
                "'backing-file' specified, but 'top' has a writer on it"
            }));
        }
        drop(g);
        let a = crate::mirror::ActiveCommitArgs {
            job_id,
            top,
            base,
            speed,
            on_error: arg_on_error(args),
            filter_node_name: filter_name.map(str::to_string),
            auto_finalize: arg_bool(args, "auto-finalize", true),
            auto_dismiss: arg_bool(args, "auto-dismiss", true),
        };
        return crate::mirror::start_active_commit(env, a).await;
    }

    // Intermediate commit.
    if g.skip_filters(&top) == g.skip_filters(&base) {
        return Err(generic(
            "Invalid files for merge: top and base are the same",
        ));
    }
    let top_ref = node_ref(&g, &top);
    let base_ref = node_ref(&g, &base);
    let grow = base_ref.size() < top_ref.size();
    let restore_read_only = g.node(&base).is_some_and(|r| r.read_only);
    // With `top` directly above the base nothing is ever copied up (see the module doc).
    let top_image = g.skip_filters(&top);
    let safe = safe
        .then(|| above_base_of(&g, &intermediates))
        .flatten()
        .filter(|n| *n != top_image)
        .map(|name| SafeTarget {
            node: node_ref(&g, &name),
            restore_read_only: g.node(&name).is_some_and(|r| r.read_only),
            name,
        });

    let job = Arc::new(CommitJob {
        graph: env.graph.clone(),
        top: top_ref.clone(),
        base_name: base.clone(),
        base: base_ref,
        intermediates: intermediates.clone(),
        backing_file: backing_file.map(str::to_string),
        mask_protocol: arg_bool(args, "backing-mask-protocol", false),
        on_error: arg_on_error(args),
        restore_read_only,
        safe,
        held: Mutex::new(Held::default()),
    });
    let opts = JobOptions {
        id: job_id.clone(),
        auto_finalize: arg_bool(args, "auto-finalize", true),
        auto_dismiss: arg_bool(args, "auto-dismiss", true),
        speed: speed.max(0) as u64,
        txn: None,
    };
    env.jobs.create(opts, job.clone())?;
    if speed < 0 {
        let _ = env.jobs.early_fail(&job_id);
        return Err(generic("Parameter 'speed' expects a non-negative value"));
    }
    if restore_read_only && let Err(e) = strata_graph::blockdev::reopen(&mut g, &base, false).await
    {
        let _ = env.jobs.early_fail(&job_id);
        return Err(generic(e));
    }
    if let Some(s) = &job.safe
        && s.restore_read_only
        && let Err(e) = strata_graph::blockdev::reopen(&mut g, &s.name, false).await
    {
        let _ = env.jobs.early_fail(&job_id);
        restore_ro(&mut g, &base, restore_read_only).await;
        return Err(generic(e));
    }
    let r = setup(
        &mut g,
        &job,
        &job_id,
        device,
        &top,
        &base,
        &intermediates,
        filter_name,
        grow,
    )
    .await;
    if let Err(e) = r {
        let _ = env.jobs.early_fail(&job_id);
        job.undo(&mut g).await;
        job.restore_safe_ro(&mut g).await;
        restore_ro(&mut g, &base, restore_read_only).await;
        return Err(e);
    }
    drop(g);
    env.jobs.start(&job_id)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn setup(
    g: &mut Graph,
    job: &CommitJob,
    id: &str,
    device: &str,
    top: &str,
    base: &str,
    intermediates: &[String],
    filter_name: Option<&str>,
    grow: bool,
) -> Result<(), CmdError> {
    let user = User::Job {
        kind: "commit",
        id: id.to_string(),
    };
    let hold = |g: &mut Graph,
                user: User,
                node: &str,
                role: &str,
                p: PermSpec|
     -> Result<EdgeId, CmdError> {
        let e = pin(g, user, node, role, p)?;
        job.held.lock().pins.push(e);
        Ok(e)
    };
    hold(g, user.clone(), device, "main node", Use::JobMain.perms())?;
    if let Some(n) = filter_name
        && g.node(n).is_some()
    {
        return Err(generic(format!("Duplicate nodes with node-name='{n}'")));
    }
    let link = Link::new(node_ref(g, top));
    let filter_drv = Arc::new(CommitTopNode::new(link.clone()));
    let opts = json!({"driver": "commit_top", "file": top});
    // QEMU's commit_top takes nothing on `top` and shares everything.
    let perms = EdgePerms::Fixed(Use::JobMain.perms());
    let filter = register_filter(g, filter_name, filter_drv, top, link, opts, perms)
        .await
        .map_err(generic)?;
    job.held.lock().filter = Some(filter.clone());
    g.insert_filter(&filter, top).await.map_err(generic)?;

    // The nodes that drop out of the chain: others may keep writing, nobody may rely on a
    // consistent view (except of filters directly on the base).
    let w = Use::CommitIntermediate.perms();
    for n in intermediates {
        let on_base = g.node(n).is_some_and(|r| r.kind == NodeKind::Filter)
            && g.skip_filters(n) == g.skip_filters(base);
        let p = if on_base {
            PermSpec {
                perm: w.perm,
                shared: w.shared.union(Perm::CONSISTENT_READ),
            }
        } else {
            w
        };
        hold(g, user.clone(), n, "intermediate node", p)?;
    }
    // Freeze the links from the filter down to the base.
    let mut below: Vec<String> = intermediates.to_vec();
    below.push(base.to_string());
    let frozen = freeze_links(g, &filter, &below);
    job.held.lock().frozen.extend(frozen);
    hold(g, user.clone(), base, "base", Use::JobTarget.perms())?;
    let bb = if grow {
        Use::CommitBaseGrow
    } else {
        Use::CommitBase
    };
    let e = g
        .add_edge(
            User::Backend,
            base,
            "root",
            EdgePerms::Fixed(bb.perms()),
            None,
        )
        .map_err(generic)?;
    job.held.lock().base_backend = Some(e);
    hold(g, User::Backend, top, "root", Use::JobMain.perms())?;
    if let Some(s) = &job.safe {
        // A copy-up writes what the image already shows.
        let p = PermSpec {
            perm: Perm::WRITE_UNCHANGED,
            shared: Perm::ALL,
        };
        hold(g, User::Backend, &s.name, "root", p)?;
    }
    Ok(())
}
