//! Per-node controls: `block-set-write-threshold` (+ BLOCK_WRITE_THRESHOLD),
//! `blockdev-set-active`, `x-blockdev-change` and `x-blockdev-set-iothread`.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use strata_graph::{Graph, User};

use super::{Args, Reply, arg_str, generic, ok, opt_bool, opt_str};
use crate::daemon::{Daemon, Object};

pub async fn block_set_write_threshold(d: Arc<Daemon>, a: Args) -> Reply {
    let name = arg_str(&a, "node-name");
    let threshold = a
        .get("write-threshold")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let g = d.env.graph.lock().await;
    let Some(rec) = g.node(name) else {
        return Err(generic(format!("Device '{name}' not found")));
    };
    let events = d.events.clone();
    let cb: strata_graph::node::ThresholdCallback = Arc::new(move |node, exceeded, at| {
        let mut data = Map::new();
        data.insert("node-name".into(), json!(node));
        data.insert("amount-exceeded".into(), json!(exceeded));
        data.insert("write-threshold".into(), json!(at));
        events.emit(
            "BLOCK_WRITE_THRESHOLD",
            Value::Object(strata_job::qdict::qemu_order(data)),
        );
    });
    rec.node
        .set_write_threshold(threshold, (threshold != 0).then_some(cb));
    Ok(ok())
}

/// Node `name`'s children in the graph.
fn node_children(g: &Graph, name: &str) -> Vec<String> {
    g.children_of(name).map(|e| e.child.clone()).collect()
}

/// Whether some parent node of `name` is active.
fn has_active_parent(g: &Graph, name: &str) -> bool {
    g.parents_of(name).any(|e| match &e.user {
        User::Node(p) => g.node(p).is_some_and(|r| r.node.is_active()),
        _ => false,
    })
}

/// QEMU's `bdrv_activate`: the node and everything below it.
pub fn activate(g: &Graph, name: &str) {
    if let Some(rec) = g.node(name) {
        for c in node_children(g, name) {
            activate(g, &c);
        }
        rec.node.set_active(true);
    }
}

/// QEMU's `bdrv_inactivate_recurse`: a node whose users are all inactive nodes goes
/// inactive, then its children that have no active parent left.
fn inactivate(g: &Graph, name: &str, top: bool) -> Result<(), String> {
    let Some(rec) = g.node(name) else {
        return Ok(());
    };
    if !rec.node.is_active() {
        return Ok(());
    }
    if has_active_parent(g, name) {
        return if top {
            Err("Node has active parent node".into())
        } else {
            Ok(())
        };
    }
    // A block backend (an export) keeps its node active.
    if g.parents_of(name).any(|e| matches!(e.user, User::Backend)) {
        return Err("Failed to inactivate node: Operation not permitted".into());
    }
    rec.node.set_active(false);
    for c in node_children(g, name) {
        if let Err(e) = inactivate(g, &c, false) {
            rec.node.set_active(true);
            return Err(e);
        }
    }
    Ok(())
}

pub async fn blockdev_set_active(d: Arc<Daemon>, a: Args) -> Reply {
    let active = opt_bool(&a, "active").unwrap_or(true);
    let g = d.env.graph.lock().await;
    match opt_str(&a, "node-name") {
        Some(name) => {
            if g.node(name).is_none() {
                return Err(generic(format!(
                    "Failed to find node with node-name='{name}'"
                )));
            }
            if active {
                activate(&g, name);
            } else {
                inactivate(&g, name, true).map_err(generic)?;
            }
        }
        None => {
            // Every node: top-level ones recursively (bdrv_activate_all/_inactivate_all).
            let tops: Vec<String> = g
                .node_names()
                .iter()
                .filter(|n| !g.parents_of(n).any(|e| matches!(e.user, User::Node(_))))
                .cloned()
                .collect();
            for n in &tops {
                if active {
                    activate(&g, n);
                } else {
                    inactivate(&g, n, false).map_err(generic)?;
                }
            }
        }
    }
    Ok(ok())
}

/// `x-blockdev-change`: only quorum nodes take or give up children at runtime, and Strata
/// has no quorum driver, so every lookup succeeds or fails as in QEMU and then the parent
/// refuses as QEMU's non-quorum drivers do.
pub async fn x_blockdev_change(d: Arc<Daemon>, a: Args) -> Reply {
    let parent = arg_str(&a, "parent");
    let (child, node) = (opt_str(&a, "child"), opt_str(&a, "node"));
    let g = d.env.graph.lock().await;
    if g.node(parent).is_none() {
        return Err(generic(format!(
            "Cannot find device='{parent}' nor node-name='{parent}'"
        )));
    }
    match (child, node) {
        (Some(_), Some(_)) => Err(generic("The parameters child and node are in conflict")),
        (None, None) => Err(generic("Either child or node must be specified")),
        (Some(c), None) => {
            if g.child(parent, c).is_none() {
                return Err(generic(format!(
                    "Node '{parent}' does not have child '{c}'"
                )));
            }
            Err(generic(format!(
                "The node {parent} does not support removing a child"
            )))
        }
        (None, Some(n)) => {
            if g.node(n).is_none() {
                return Err(generic(format!("Node '{n}' not found")));
            }
            Err(generic(format!(
                "The node {parent} does not support adding a child"
            )))
        }
    }
}

/// `x-blockdev-set-iothread`: QEMU's checks; Strata's runtime schedules every node's I/O
/// itself, so a valid move changes nothing else.
pub async fn x_blockdev_set_iothread(d: Arc<Daemon>, a: Args) -> Reply {
    let name = arg_str(&a, "node-name");
    let force = opt_bool(&a, "force").unwrap_or(false);
    let g = d.env.graph.lock().await;
    if g.node(name).is_none() {
        return Err(generic(format!(
            "Failed to find node with node-name='{name}'"
        )));
    }
    if !force && g.parents_of(name).any(|e| matches!(e.user, User::Backend)) {
        return Err(generic(format!(
            "Node {name} is associated with a BlockBackend and could be in use (use force=true to override this check)"
        )));
    }
    if let Some(Value::String(t)) = a.get("iothread")
        && !matches!(d.objects.lock().0.get(t), Some(Object::Iothread))
    {
        return Err(generic(format!("Cannot find iothread {t}")));
    }
    Ok(ok())
}
