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
    chain_from, copy_loop, drop_unused_implicit, failure_text, filename_of, find_backing_image,
    freeze_links, node_ref, not_found, pin, register_filter, release_pins, restore_ro, unfreeze,
    write_backing_header,
};
use crate::env::{BlockJobEnv, CmdError, SharedGraph, generic};
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
    held: Mutex<Held>,
}

/// One failed step of the copy loop.
struct StepError {
    op: IoOperation,
    errno: i32,
}

impl CommitJob {
    /// Copy what `[offset, ..)` holds above the base; returns the bytes looked at and
    /// whether they were copied.
    async fn step(&self, offset: u64, len: u64) -> Result<(u64, bool), StepError> {
        let rd = |e: strata_core::Error| StepError {
            op: IoOperation::Read,
            errno: e.kind().errno(),
        };
        let wr = |e: strata_core::Error| StepError {
            op: IoOperation::Write,
            errno: e.kind().errno(),
        };
        let n = COMMIT_BUFFER_SIZE.min(len - offset);
        let ext = block_status_above(&self.top, Some(&self.base), offset, n)
            .await
            .map_err(rd)?;
        let n = ext.len.clamp(1, n);
        if !ext.status.allocated {
            return Ok((n, false));
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
            copy_loop(
                &ctx,
                len,
                |offset| self.step(offset, len),
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
                let node: NodeRef = g.node(o).ok_or("overlay vanished")?.node.clone();
                write_backing_header(&node, Some(&id), Some(&fmt)).await?;
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
            restore_ro(&mut g, &self.base_name, self.restore_read_only).await;
        })
    }
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
    if g.parents_of(device)
        .any(|e| matches!(e.user, User::Node(_)))
    {
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
    if is_active || required_on(&g, &top).contains(Perm::WRITE) {
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
    let chain = chain_from(&g, &top);
    let base_idx = chain
        .iter()
        .position(|n| *n == base)
        .expect("base is below top");
    let intermediates: Vec<String> = chain[..base_idx].to_vec();
    let top_ref = node_ref(&g, &top);
    let base_ref = node_ref(&g, &base);
    let grow = base_ref.size() < top_ref.size();
    let restore_read_only = g.node(&base).is_some_and(|r| r.read_only);

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
    Ok(())
}
