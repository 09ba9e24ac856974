//! Dirty bitmap commands (`block-dirty-bitmap-*`), with QEMU's lookups and checks; the
//! bitmaps live in each node's [`strata_core::bitmap::BitmapSet`].

use std::sync::Arc;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use strata_core::bitmap::{BitmapSet, CheckFlags, default_granularity};
use strata_core::{BlockNode, NodeRef};
use strata_graph::{Graph, GraphNode, driver_of};
use strata_qcow2::Qcow2;

use super::{Args, Reply, arg_str, generic, ok, opt_bool};
use crate::daemon::Daemon;

/// The node for every bitmap command except add: "Node '%s' not found".
fn node<'g>(g: &'g Graph, name: &str) -> Result<&'g Arc<GraphNode>, strata_qmp::QmpError> {
    g.node(name)
        .map(|n| &n.node)
        .ok_or_else(|| generic(format!("Node '{name}' not found")))
}

/// A node's cluster size, for the default granularity.
pub fn cluster_size(node: &NodeRef) -> Option<u64> {
    let d = driver_of(node);
    d.as_any()
        .downcast_ref::<Qcow2>()
        .map(|q| q.header().cluster_size())
}

fn set_of(n: &Arc<GraphNode>) -> Arc<BitmapSet> {
    n.bitmaps()
}

fn err(e: strata_core::Error) -> strata_qmp::QmpError {
    generic(e.message().to_string())
}

pub async fn add(d: Arc<Daemon>, a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    let name = arg_str(&a, "node");
    let Some(rec) = g.node(name) else {
        return Err(generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        )));
    };
    let bitmap = arg_str(&a, "name");
    let node: NodeRef = rec.node.clone();
    let granularity = match a.get("granularity").and_then(Value::as_u64) {
        Some(g) => g,
        None => default_granularity(cluster_size(&node)),
    };
    let persistent = opt_bool(&a, "persistent").unwrap_or(false);
    strata_core::bitmap::check_add_args(bitmap, granularity).map_err(err)?;
    if persistent {
        node.check_bitmap_storable(name, bitmap, granularity)
            .map_err(err)?;
    }
    set_of(&rec.node)
        .add(
            bitmap,
            granularity,
            persistent,
            opt_bool(&a, "disabled").unwrap_or(false),
        )
        .map_err(err)?;
    Ok(ok())
}

pub async fn remove(d: Arc<Daemon>, a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    let n = node(&g, arg_str(&a, "node"))?;
    let set = set_of(n);
    let name = arg_str(&a, "name");
    set.check(name, CheckFlags::BUSY | CheckFlags::READ_ONLY)
        .map_err(err)?;
    let info = set.get_info(name).expect("checked");
    if info.persistent {
        n.remove_stored_bitmap(name).await.map_err(err)?;
    }
    set.remove(name).map_err(err)?;
    Ok(ok())
}

pub async fn clear(d: Arc<Daemon>, a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    set_of(node(&g, arg_str(&a, "node"))?)
        .clear(arg_str(&a, "name"))
        .map_err(err)?;
    Ok(ok())
}

pub async fn enable(d: Arc<Daemon>, a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    set_of(node(&g, arg_str(&a, "node"))?)
        .enable(arg_str(&a, "name"))
        .map_err(err)?;
    Ok(ok())
}

pub async fn disable(d: Arc<Daemon>, a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    set_of(node(&g, arg_str(&a, "node"))?)
        .disable(arg_str(&a, "name"))
        .map_err(err)?;
    Ok(ok())
}

pub async fn merge(d: Arc<Daemon>, a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    let target_node = node(&g, arg_str(&a, "node"))?;
    let target_set = set_of(target_node);
    let target = arg_str(&a, "target");
    // QEMU looks the target up first.
    target_set.check(target, CheckFlags::NONE).map_err(err)?;
    let mut sources = Vec::new();
    for s in a
        .get("bitmaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (n, name) = match s {
            Value::String(name) => (target_node, name.as_str()),
            Value::Object(o) => {
                let nn = o.get("node").and_then(Value::as_str).unwrap_or_default();
                (
                    node(&g, nn)?,
                    o.get("name").and_then(Value::as_str).unwrap_or_default(),
                )
            }
            _ => continue,
        };
        sources.push(set_of(n).merge_source(name).map_err(err)?);
    }
    let refs: Vec<_> = sources.iter().collect();
    target_set.merge(target, &refs).map_err(err)?;
    Ok(ok())
}

pub async fn sha256(d: Arc<Daemon>, a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    let set = set_of(node(&g, arg_str(&a, "node"))?);
    let name = arg_str(&a, "name");
    let Some(bytes) = set.with_bitmap(name, |b| b.level0_bytes()) else {
        return Err(generic(format!("Dirty bitmap '{name}' not found")));
    };
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(json!({ "sha256": hex }))
}
