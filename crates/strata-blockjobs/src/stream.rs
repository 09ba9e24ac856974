//! `block-stream` (job type `stream`): pull the data of the backing layers down to `base`
//! (or `bottom`) up into `device`, then drop those layers from the chain (QEMU
//! `block/stream.c` and `qmp_block_stream`).
//!
//! Setup, as QEMU: the arguments are checked with QEMU's texts; a read-only `device` is
//! reopened read-write; a `copy-on-read` filter (with `bottom` = the lowest node copied
//! from) goes above `device`; the job is created; it pins the filter (`main node`), reads
//! through it with an internal backend, pins `device` (`active node`) and every node from
//! `device`'s backing down to `bottom` (`intermediate node`, no writes, no resize), and
//! freezes those backing links. The copy loop reads, 512 KiB at a time, every range the
//! top does not allocate but a layer above the base does, through the filter, so the data
//! lands in the top image; guest writes through the filter are serialised against it.
//! On success the filter goes, `device` backs onto the base (header rewritten), and the
//! implicit nodes left without users are closed. Cancel and failure leave the chain as it
//! was (data already copied stays in the top).

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use strata_core::{BlockNode, NodeRef};
use strata_graph::perm::EdgeKind;
use strata_graph::{
    CopyOnReadNode, EdgeId, EdgePerms, Graph, GraphNode, Link, NodeKind, NodeRec, Use, User,
    block_status_above, driver_of,
};
use strata_job::{
    BoxFuture, ErrorAction, IoOperation, JobContext, JobDriver, JobFailure, JobOptions, JobType,
    OnError,
};
use strata_qcow2::Qcow2;

use crate::env::{BlockJobEnv, CmdError, SharedGraph, generic};

/// How much one iteration of the copy loop looks at (QEMU's `STREAM_CHUNK`).
pub const STREAM_CHUNK: u64 = 512 * 1024;

// ---- argument helpers shared with commit -----------------------------------------------

pub(crate) fn arg_str<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

pub(crate) fn arg_bool(args: &Map<String, Value>, key: &str, default: bool) -> bool {
    args.get(key).and_then(Value::as_bool).unwrap_or(default)
}

pub(crate) fn arg_on_error(args: &Map<String, Value>) -> OnError {
    args.get("on-error")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// `speed`, which may be negative (refused after the job exists, as QEMU does).
pub(crate) fn arg_speed(args: &Map<String, Value>) -> i64 {
    args.get("speed").and_then(Value::as_i64).unwrap_or(0)
}

/// QEMU's text for a node name that names nothing.
pub(crate) fn not_found(device: &str, node: &str) -> CmdError {
    generic(format!(
        "Cannot find device='{device}' nor node-name='{node}'"
    ))
}

/// The chain from `name` down (inclusive), through filters and backing links.
pub(crate) fn chain_from(g: &Graph, name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let mut cur = name.to_string();
    while let Some(next) = g.chain_below(&cur) {
        if out.contains(&next) {
            break;
        }
        out.push(next.clone());
        cur = next;
    }
    out
}

/// Whether `node` is `top` or below it (QEMU `bdrv_chain_contains`).
pub(crate) fn chain_contains(g: &Graph, top: &str, node: &str) -> bool {
    chain_from(g, top).iter().any(|n| n == node)
}

/// The node's file name as QEMU shows it (the image's path).
pub(crate) fn filename_of(g: &Graph, name: &str) -> String {
    g.node(name).map(|r| r.node.filename()).unwrap_or_default()
}

fn canonical(p: &str) -> String {
    std::fs::canonicalize(p).map_or_else(|_| p.to_string(), |c| c.to_string_lossy().into_owned())
}

/// QEMU `bdrv_find_backing_image`: the image below `top` whose file name is `name`, either
/// as written or relative to the directory of the image above it.
pub(crate) fn find_backing_image(g: &Graph, top: &str, name: &str) -> Option<String> {
    let chain = chain_from(g, top);
    for w in chain.windows(2) {
        let (above, cand) = (&w[0], &w[1]);
        let Some(rec) = g.node(cand) else { continue };
        if rec.kind == NodeKind::Filter {
            continue;
        }
        let fname = filename_of(g, cand);
        if fname == name {
            return Some(cand.clone());
        }
        let resolved = if Path::new(name).is_absolute() {
            name.to_string()
        } else {
            let dir = Path::new(&filename_of(g, above))
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            dir.join(name).to_string_lossy().into_owned()
        };
        if canonical(&resolved) == canonical(&fname) {
            return Some(cand.clone());
        }
    }
    None
}

/// The backing format QEMU writes for `base`: its driver, or `raw` for a protocol node with
/// `backing-mask-protocol`.
pub(crate) fn backing_format(g: &Graph, base: &str, mask_protocol: bool) -> String {
    let rec = g.node(base).expect("base exists");
    if mask_protocol && rec.kind == NodeKind::Protocol {
        "raw".into()
    } else {
        BlockNode::driver(&*rec.node).to_string()
    }
}

/// Rewrite the backing file name and format in `node`'s header (qcow2 only; other drivers
/// have no header to change).
pub(crate) async fn write_backing_header(
    node: &NodeRef,
    file: Option<&str>,
    format: Option<&str>,
) -> Result<(), String> {
    let d = driver_of(node);
    match d.as_any().downcast_ref::<Qcow2>() {
        Some(q) => q
            .set_backing(file, format)
            .await
            .map_err(|e| format!("Could not change backing file: {e}")),
        None => Ok(()),
    }
}

/// The job failure text for an I/O error (QEMU reports strerror).
pub(crate) fn failure_text(errno: i32) -> String {
    strata_core::error::strerror(errno)
}

/// Remove the implicit nodes of `chain` that nobody uses any more (each takes its own
/// unused implicit children with it).
pub(crate) async fn drop_unused_implicit(g: &mut Graph, chain: &[String]) {
    for n in chain {
        let unused = g.parents_of(n).next().is_none();
        let implicit = g.node(n).is_some_and(|r| !r.monitor_owned);
        if unused && implicit {
            let _ = g.remove_node(n).await;
        }
    }
}

/// Unfreeze the job's links and drop its pins.
pub(crate) fn release_pins(g: &mut Graph, pins: &mut Vec<EdgeId>, frozen: &mut Vec<EdgeId>) {
    for id in frozen.drain(..) {
        g.set_frozen(id, false);
    }
    for id in pins.drain(..) {
        g.remove_edge(id);
    }
}

/// Register a job filter node over `below` (not yet inserted), its `file` edge taking
/// `perms`.
pub(crate) async fn register_filter(
    g: &mut Graph,
    name: Option<&str>,
    driver: NodeRef,
    below: &str,
    below_link: Arc<Link>,
    options: Value,
    perms: EdgePerms,
) -> Result<String, String> {
    let (fname, auto) = match name {
        Some(n) => (n.to_string(), false),
        None => (g.auto_name(), true),
    };
    let mut opts = options;
    if let Some(o) = opts.as_object_mut() {
        o.insert("node-name".into(), json!(fname));
    }
    g.insert_node(NodeRec {
        name: fname.clone(),
        auto_named: auto,
        node: GraphNode::new(&fname, driver),
        kind: NodeKind::Filter,
        options: opts,
        read_only: false,
        monitor_owned: false,
    })?;
    if let Err(e) = g.add_edge(
        User::Node(fname.clone()),
        below,
        "file",
        perms,
        Some(below_link),
    ) {
        let _ = g.remove_node(&fname).await;
        return Err(e);
    }
    Ok(fname)
}

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
    async fn step(&self, offset: u64, len: u64) -> strata_core::Result<(u64, bool)> {
        let n = STREAM_CHUNK.min(len - offset);
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
            return Ok((len - offset, false));
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
            let mut offset = 0;
            let mut copied = 0;
            let mut error: Option<String> = None;
            while offset < len {
                ctx.rate_limit(copied).await;
                copied = 0;
                if ctx.is_cancelled() {
                    return Err(JobFailure::canceled());
                }
                match self.step(offset, len).await {
                    Ok((n, copy)) => {
                        ctx.progress_update(n);
                        if copy {
                            copied = n;
                        }
                        offset += n;
                    }
                    Err(e) => {
                        let errno = e.kind().errno();
                        match ctx.handle_error(self.on_error, IoOperation::Read, errno) {
                            ErrorAction::Stop => continue,
                            ErrorAction::Report => {
                                return Err(JobFailure::new(failure_text(errno)));
                            }
                            ErrorAction::Ignore => {
                                error.get_or_insert_with(|| failure_text(errno));
                                // QEMU moves on over the range it looked at.
                                let n = STREAM_CHUNK.min(len - offset);
                                ctx.progress_update(n);
                                offset += n;
                            }
                        }
                    }
                }
            }
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
            {
                let mut held = self.held.lock();
                for id in held.frozen.drain(..) {
                    g.set_frozen(id, false);
                }
            }
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
    let nothing = g.skip_filters(device) == bottom_name;

    // A read-only top becomes writable for the job.
    let restore_read_only = g.node(device).is_some_and(|r| r.read_only);
    if restore_read_only {
        strata_graph::blockdev::reopen(&mut g, device, false)
            .await
            .map_err(generic)?;
    }

    // The copy-on-read filter.
    let dev_node: NodeRef = g.node(device).expect("checked").node.clone();
    let link = Link::new(dev_node.clone());
    let link_ref: NodeRef = link.clone();
    let bottom_ref: NodeRef = if bottom_name == device {
        link_ref.clone()
    } else {
        g.node(&bottom_name).expect("in chain").node.clone()
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

    let base_node_ref = new_base
        .as_ref()
        .map(|b| g.node(b).expect("in chain").node.clone() as NodeRef);
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

/// Put a node that was reopened read-write for a job back to read-only.
pub(crate) async fn restore_ro(g: &mut Graph, name: &str, was_read_only: bool) {
    if was_read_only && g.node(name).is_some() {
        let _ = strata_graph::blockdev::reopen(g, name, true).await;
    }
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
        let e = g
            .add_edge(user, node, role, EdgePerms::Fixed(u.perms()), None)
            .map_err(generic)?;
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
    let mut cur = device.to_string();
    for n in intermediates {
        let found = g
            .children_of(&cur)
            .find(|e| &e.child == n && (e.role == "backing" || e.role == "file"))
            .map(|e| e.id);
        if let Some(id) = found {
            g.set_frozen(id, true);
            job.held.lock().frozen.push(id);
        }
        cur = n.clone();
    }
    Ok(())
}
