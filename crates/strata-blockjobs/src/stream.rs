//! `block-stream` (job type `stream`): pull the data of the backing layers down to `base`
//! (or `bottom`) up into `device`, then drop those layers from the chain (QEMU
//! `block/stream.c` and `qmp_block_stream`).
//!
//! Setup, as QEMU: the arguments are checked with QEMU's texts; a read-only `device` is
//! reopened read-write; a `copy-on-read` filter (with `bottom` = the lowest node copied
//! from) goes above `device`; the job is created; it pins the filter (`main node`), reads
//! through it with an internal backend, pins `device` (`active node`) and every node from
//! `device`'s backing down to `bottom` (`intermediate node`, no writes, no resize), and
//! freezes those backing links. The copy loop reads, 512 KiB at a time with several chunks
//! in flight ([`crate::parallel`]), every range the top does not allocate but a layer above
//! the base does, through the filter, so the data lands in the top image; guest writes
//! through the filter are serialised against it.
//! On success the filter goes, `device` backs onto the base (header rewritten), and the
//! implicit nodes left without users are closed. Cancel and failure leave the chain as it
//! was (data already copied stays in the top).

use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use strata_core::NodeRef;
use strata_graph::perm::EdgeKind;
use strata_graph::{
    CopyOnReadNode, EdgeId, EdgePerms, Graph, Link, NodeKind, Use, User, block_status_above,
};
use strata_job::{
    BoxFuture, ErrorAction, IoOperation, JobContext, JobDriver, JobFailure, JobOptions, JobType,
    OnError,
};

use crate::chain::{
    OnStepError, arg_bool, arg_on_error, arg_speed, arg_str, backing_format, chain_contains,
    chain_from, check_not_busy, drop_unused_implicit, failure_text, filename_of,
    find_backing_image, freeze_links, node_ref, not_found, pin, register_filter, release_pins,
    restore_ro, unfreeze, write_backing_header,
};
use crate::env::{BlockJobEnv, CmdError, SharedGraph, generic};
use crate::parallel::parallel_copy_loop;

/// How much one iteration of the copy loop looks at (QEMU's `STREAM_CHUNK`).
pub const STREAM_CHUNK: u64 = 512 * 1024;

// ---- the stream job --------------------------------------------------------------------

/// Graph bookkeeping the job undoes at its end.
#[derive(Debug, Default)]
struct Held {
    pins: Vec<EdgeId>,
    frozen: Vec<EdgeId>,
    filter: Option<String>,
    /// Prepare finished its graph changes.
    done: bool,
}

#[derive(Debug)]
struct StreamJob {
    graph: SharedGraph,
    device: String,
    /// The top node as the job reads its allocation.
    top: NodeRef,
    /// Nothing lies between `device` and the base: nothing to copy.
    nothing: bool,
    /// The new backing node (`None`: stream the whole chain).
    base: Option<String>,
    base_node: Option<NodeRef>,
    /// `device`'s backing and everything down to `bottom` (inclusive).
    intermediates: Vec<String>,
    cor: Arc<CopyOnReadNode>,
    backing_file: Option<String>,
    mask_protocol: bool,
    on_error: OnError,
    restore_read_only: bool,
    held: Mutex<Held>,
}

impl StreamJob {
    /// One iteration: how many bytes from `offset` were looked at, and whether they were
    /// copied.
    async fn step(&self, offset: u64, end: u64) -> strata_core::Result<(u64, bool)> {
        let n = STREAM_CHUNK.min(end - offset);
        let ext = self.top.block_status(offset, n).await?;
        let n = ext.len.clamp(1, n);
        if ext.status.allocated || ext.status.data || ext.status.zero {
            return Ok((n, false));
        }
        let Some(backing) = self.top.backing() else {
            return Ok((n, false));
        };
        if offset >= backing.size() {
            // Past the end of the backing file: nothing more to copy.
            return Ok((end - offset, false));
        }
        let below = block_status_above(&backing, self.base_node.as_ref(), offset, n).await?;
        let n = below.len.clamp(1, n);
        if below.status.allocated {
            self.cor.prefetch(offset, n).await?;
            Ok((n, true))
        } else {
            Ok((n, false))
        }
    }

    async fn undo(&self, g: &mut Graph) {
        let mut held = std::mem::take(&mut *self.held.lock());
        release_pins(g, &mut held.pins, &mut held.frozen);
        if let Some(f) = held.filter.take()
            && g.node(&f).is_some()
        {
            let _ = g.remove_filter(&f).await;
        }
    }
}

impl JobDriver for StreamJob {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    fn run(self: Arc<Self>, ctx: JobContext) -> BoxFuture<'static, Result<(), JobFailure>> {
        Box::pin(async move {
            if self.nothing {
                return Ok(());
            }
            let len = self.top.size();
            ctx.progress_set_total(len);
            let mut error: Option<String> = None;
            let on_error = |e: strata_core::Error, offset: u64| {
                let errno = e.kind().errno();
                match ctx.handle_error(self.on_error, IoOperation::Read, errno) {
                    ErrorAction::Stop => OnStepError::Retry,
                    ErrorAction::Report => OnStepError::Fail(JobFailure::new(failure_text(errno))),
                    ErrorAction::Ignore => {
                        error.get_or_insert_with(|| failure_text(errno));
                        // QEMU moves on over the range it looked at.
                        OnStepError::Skip(STREAM_CHUNK.min(len - offset))
                    }
                }
            };
            let step = |offset, end| self.step(offset, end);
            parallel_copy_loop(&ctx, len, STREAM_CHUNK, step, on_error).await?;
            match error {
                Some(e) => Err(JobFailure::new(e)),
                None => Ok(()),
            }
        })
    }

    fn prepare<'a>(&'a self, _ctx: &'a JobContext) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let mut g = self.graph.lock().await;
            // Drop the filter (it holds the chain), then relink.
            unfreeze(&mut g, &mut self.held.lock().frozen);
            let filter = self.held.lock().filter.clone();
            let pins: Vec<EdgeId> = std::mem::take(&mut self.held.lock().pins);
            for id in &pins {
                g.remove_edge(*id);
            }
            if let Some(f) = filter {
                g.remove_filter(&f).await?;
                self.held.lock().filter = None;
            }
            let (id, fmt) = match &self.base {
                Some(b) => (
                    Some(
                        self.backing_file
                            .clone()
                            .unwrap_or_else(|| filename_of(&g, b)),
                    ),
                    Some(backing_format(&g, b, self.mask_protocol)),
                ),
                None => (None, None),
            };
            g.set_backing(&self.device, self.base.as_deref()).await?;
            let node: NodeRef = g.node(&self.device).ok_or("device vanished")?.node.clone();
            write_backing_header(&node, id.as_deref(), fmt.as_deref()).await?;
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
            if self.restore_read_only && g.node(&self.device).is_some() {
                let _ = strata_graph::blockdev::reopen(&mut g, &self.device, true).await;
            }
        })
    }
}

/// `block-stream`.
pub async fn block_stream(env: &BlockJobEnv, args: &Map<String, Value>) -> Result<(), CmdError> {
    let device = arg_str(args, "device").unwrap_or_default();
    let base = arg_str(args, "base");
    let base_node = arg_str(args, "base-node");
    let bottom = arg_str(args, "bottom");
    let backing_file = arg_str(args, "backing-file");
    if base.is_some() && base_node.is_some() {
        return Err(generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if base.is_some() && bottom.is_some() {
        return Err(generic(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if bottom.is_some() && base_node.is_some() {
        return Err(generic(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let job_id = arg_str(args, "job-id").unwrap_or_default().to_string();
    let filter_name = arg_str(args, "filter-node-name");

    let mut g = env.graph.lock().await;
    if g.node(device).is_none() {
        return Err(not_found(device, device));
    }
    let mut base_bs: Option<String> = None;
    if let Some(b) = base {
        match find_backing_image(&g, device, b) {
            Some(n) => base_bs = Some(n),
            None => return Err(generic(format!("Can't find '{b}' in the backing chain"))),
        }
    }
    if let Some(b) = base_node {
        if g.node(b).is_none() {
            return Err(not_found("", b));
        }
        if b == device || !chain_contains(&g, device, b) {
            return Err(generic(format!(
                "Node '{b}' is not a backing image of '{device}'"
            )));
        }
        base_bs = Some(b.to_string());
    }
    let mut bottom_bs: Option<String> = None;
    if let Some(b) = bottom {
        let Some(rec) = g.node(b) else {
            return Err(not_found("", b));
        };
        if rec.kind == NodeKind::Filter {
            return Err(generic(format!(
                "Node '{b}' is a filter, use a non-filter node as 'bottom'"
            )));
        }
        if !chain_contains(&g, device, b) {
            return Err(generic(format!(
                "Node '{b}' is not in a chain starting from '{device}'"
            )));
        }
        bottom_bs = Some(b.to_string());
    }
    if base_bs.is_none() && backing_file.is_some() {
        return Err(generic(
            "backing file specified, but streaming the entire chain",
        ));
    }

    // base_overlay (= bottom): the lowest node data is copied from; above_base: the node
    // directly above the base (filters between them included).
    // The backing chain, without the protocol nodes below a raw (filter-like) bottom.
    let mut chain = chain_from(&g, device);
    while chain.len() > 1
        && g.node(chain.last().expect("non-empty"))
            .is_some_and(|r| r.kind == NodeKind::Protocol)
    {
        chain.pop();
    }
    let (bottom_name, new_base) = match (&bottom_bs, &base_bs) {
        (Some(b), _) => (b.clone(), g.chain_below(b)),
        (None, Some(b)) => {
            let i = chain.iter().position(|n| n == b).expect("checked");
            // The last non-filter node above the base.
            let overlay = chain[..i]
                .iter()
                .rev()
                .find(|n| g.node(n).is_some_and(|r| r.kind != NodeKind::Filter))
                .cloned()
                .unwrap_or_else(|| device.to_string());
            (overlay, Some(b.clone()))
        }
        (None, None) => (chain.last().expect("non-empty").clone(), None),
    };
    let base_idx = new_base
        .as_ref()
        .and_then(|b| chain.iter().position(|n| n == b))
        .unwrap_or(chain.len());
    let intermediates: Vec<String> = chain[1..base_idx.max(1)].to_vec();
    for n in &chain[..base_idx.max(1)] {
        check_not_busy(&g, n)?;
    }
    let nothing = g.skip_filters(device) == bottom_name;

    // A read-only top becomes writable for the job.
    let restore_read_only = g.node(device).is_some_and(|r| r.read_only);
    if restore_read_only {
        strata_graph::blockdev::reopen(&mut g, device, false)
            .await
            .map_err(generic)?;
    }

    // The copy-on-read filter.
    let dev_node = node_ref(&g, device);
    let link = Link::new(dev_node.clone());
    let link_ref: NodeRef = link.clone();
    let bottom_ref: NodeRef = if bottom_name == device {
        link_ref.clone()
    } else {
        node_ref(&g, &bottom_name)
    };
    let cor = Arc::new(CopyOnReadNode::new(link_ref, Some(bottom_ref)));
    let opts = json!({"driver": "copy-on-read", "file": device, "bottom": bottom_name});
    if let Some(n) = filter_name
        && g.node(n).is_some()
    {
        restore_ro(&mut g, device, restore_read_only).await;
        return Err(generic(format!(
            "Could not create node: Duplicate nodes with node-name='{n}'"
        )));
    }
    let filter = match register_filter(
        &mut g,
        filter_name,
        cor.clone(),
        device,
        link,
        opts,
        EdgePerms::Derived(EdgeKind::Filtered),
    )
    .await
    {
        Ok(f) => f,
        Err(e) => {
            restore_ro(&mut g, device, restore_read_only).await;
            return Err(generic(e));
        }
    };
    if let Err(e) = g.insert_filter(&filter, device).await {
        let _ = g.remove_node(&filter).await;
        restore_ro(&mut g, device, restore_read_only).await;
        return Err(generic(e));
    }

    let base_node_ref = new_base.as_ref().map(|b| node_ref(&g, b));
    let job = Arc::new(StreamJob {
        graph: env.graph.clone(),
        device: device.to_string(),
        top: dev_node,
        nothing,
        base: new_base.clone(),
        base_node: base_node_ref,
        intermediates: intermediates.clone(),
        cor,
        backing_file: backing_file.map(str::to_string),
        mask_protocol: arg_bool(args, "backing-mask-protocol", false),
        on_error: arg_on_error(args),
        restore_read_only,
        held: Mutex::new(Held {
            filter: Some(filter.clone()),
            ..Default::default()
        }),
    });
    let opts = JobOptions {
        id: job_id.clone(),
        auto_finalize: arg_bool(args, "auto-finalize", true),
        auto_dismiss: arg_bool(args, "auto-dismiss", true),
        speed: arg_speed(args).max(0) as u64,
        txn: None,
    };
    if let Err(e) = env.jobs.create(opts, job.clone()) {
        job.undo(&mut g).await;
        restore_ro(&mut g, device, restore_read_only).await;
        return Err(e);
    }
    let setup = setup_pins(
        &mut g,
        &job,
        &job_id,
        &filter,
        device,
        &intermediates,
        arg_speed(args),
    );
    if let Err(e) = setup {
        let _ = env.jobs.early_fail(&job_id);
        job.undo(&mut g).await;
        restore_ro(&mut g, device, restore_read_only).await;
        return Err(e);
    }
    drop(g);
    env.jobs.start(&job_id)?;
    Ok(())
}

fn setup_pins(
    g: &mut Graph,
    job: &StreamJob,
    id: &str,
    filter: &str,
    device: &str,
    intermediates: &[String],
    speed: i64,
) -> Result<(), CmdError> {
    if speed < 0 {
        return Err(generic("Parameter 'speed' expects a non-negative value"));
    }
    let user = User::Job {
        kind: "stream",
        id: id.to_string(),
    };
    let add = |g: &mut Graph, user: User, node: &str, role: &str, u: Use| -> Result<(), CmdError> {
        let e = pin(g, user, node, role, u.perms())?;
        job.held.lock().pins.push(e);
        Ok(())
    };
    add(g, user.clone(), filter, "main node", Use::JobMain)?;
    add(g, User::Backend, filter, "root", Use::StreamBackend)?;
    add(g, user.clone(), device, "active node", Use::StreamActive)?;
    for n in intermediates {
        add(
            g,
            user.clone(),
            n,
            "intermediate node",
            Use::StreamIntermediate,
        )?;
    }
    // Freeze the backing links the job depends on.
    let frozen = freeze_links(g, device, intermediates);
    job.held.lock().frozen.extend(frozen);
    Ok(())
}
