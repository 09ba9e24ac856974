//! What stream and commit share: their argument helpers with QEMU's texts, lookups along
//! a backing chain, the job's pins and frozen links, and the filter it puts in.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use strata_core::{BlockNode, NodeRef};
use strata_graph::{
    EdgeId, EdgePerms, Graph, GraphNode, Link, NodeKind, NodeRec, PermSpec, User, driver_of,
};
use strata_job::{JobFailure, OnError};
use strata_qcow2::Qcow2;

use crate::env::{CmdError, generic};

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
/// have no header to change). The new backing chain is flushed first: what a commit wrote
/// into the base must be on disk before a header makes the overlay read it there.
pub(crate) async fn write_backing_header(
    node: &NodeRef,
    file: Option<&str>,
    format: Option<&str>,
) -> Result<(), String> {
    let mut below = node.backing();
    while let Some(b) = below {
        b.flush()
            .await
            .map_err(|e| format!("Could not flush the backing chain: {e}"))?;
        below = b.backing();
    }
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
    unfreeze(g, frozen);
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

/// Put a node that was reopened read-write for a job back to read-only.
pub(crate) async fn restore_ro(g: &mut Graph, name: &str, was_read_only: bool) {
    if was_read_only && g.node(name).is_some() {
        let _ = strata_graph::blockdev::reopen(g, name, true).await;
    }
}

/// The driver of the node `name`, which the caller has checked exists.
pub(crate) fn node_ref(g: &Graph, name: &str) -> NodeRef {
    g.node(name).expect("checked").node.clone()
}

/// A job's pin: an edge from `user` on `node` with fixed permissions.
pub(crate) fn pin(
    g: &mut Graph,
    user: User,
    node: &str,
    role: &str,
    perms: PermSpec,
) -> Result<EdgeId, CmdError> {
    g.add_edge(user, node, role, EdgePerms::Fixed(perms), None)
        .map_err(generic)
}

/// Freeze the backing (or file) links from `from` down through `below`, in order; returns
/// the frozen edges.
pub(crate) fn freeze_links(g: &mut Graph, from: &str, below: &[String]) -> Vec<EdgeId> {
    let mut frozen = Vec::new();
    let mut cur = from.to_string();
    for n in below {
        let found = g
            .children_of(&cur)
            .find(|e| &e.child == n && (e.role == "backing" || e.role == "file"))
            .map(|e| e.id);
        if let Some(id) = found {
            g.set_frozen(id, true);
            frozen.push(id);
        }
        cur = n.clone();
    }
    frozen
}

/// Unfreeze the links a job froze.
pub(crate) fn unfreeze(g: &mut Graph, frozen: &mut Vec<EdgeId>) {
    for id in frozen.drain(..) {
        g.set_frozen(id, false);
    }
}

/// What the copy loop does after a failed step.
pub(crate) enum OnStepError {
    /// Look at the same range again.
    Retry,
    /// Count this many bytes as done and move on.
    Skip(u64),
    /// End the job with this failure.
    Fail(JobFailure),
}

/// For a job started with Strata's `x-parallel`: node `node` may be held by other jobs only
/// in the `roles` given (e.g. `main node`: the job keeps that node's view and its place in
/// the chain), never as a node another job removes from the chain or writes into.
pub(crate) fn check_held_only_as(g: &Graph, node: &str, roles: &[&str]) -> Result<(), CmdError> {
    let other = g.parents_of(node).find_map(|e| match &e.user {
        User::Job { kind, .. } if !roles.contains(&e.role.as_str()) => Some(*kind),
        _ => None,
    });
    match other {
        Some(kind) => Err(generic(format!(
            "Node '{node}' is busy: block device is in use by block job: {kind}"
        ))),
        None => Ok(()),
    }
}

/// QEMU's op blockers for block jobs: every node a job holds (its pins, QEMU's
/// `block_job_add_bdrv`) is busy for other jobs, whatever the permissions would allow —
/// without this, two jobs could change the same node's chain under each other.
pub(crate) fn check_not_busy(g: &Graph, node: &str) -> Result<(), CmdError> {
    let job = g.parents_of(node).find_map(|e| match &e.user {
        User::Job { kind, .. } => Some(*kind),
        _ => None,
    });
    match job {
        Some(kind) => Err(generic(format!(
            "Node '{node}' is busy: block device is in use by block job: {kind}"
        ))),
        None => Ok(()),
    }
}
