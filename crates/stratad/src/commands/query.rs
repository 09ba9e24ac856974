//! Graph queries: `query-named-block-nodes`, `x-debug-query-block-graph`,
//! `query-blockstats`, `query-block`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use strata_core::NodeRef;
use strata_graph::perm::User;
use strata_graph::{Graph, driver_of, node_filename};
use strata_qcow2::Qcow2;

use super::{Args, Reply, opt_bool};
use crate::commands::bitmap::cluster_size;
use crate::daemon::Daemon;

/// The `ImageInfo`s with nested backing images already built by one query, by node name:
/// a listing of every node of a deep chain repeats each chain below it, and building them
/// once keeps that listing linear in I/O (the allocated sizes) rather than quadratic.
type ChainInfos = BTreeMap<String, Value>;

/// QEMU's `ImageInfo` for one node; with `backing`, nested `backing-image`s.
async fn image_info(g: &Graph, name: &str, backing: bool, memo: &mut ChainInfos) -> Value {
    if backing && let Some(v) = memo.get(name) {
        return v.clone();
    }
    let rec = g.node(name).expect("listed");
    let node: NodeRef = rec.node.clone();
    let mut v = Map::new();
    v.insert("filename".into(), json!(node_filename(g, name)));
    v.insert("format".into(), json!(node.driver()));
    v.insert("virtual-size".into(), json!(node.size()));
    if let Ok(Some(n)) = node.allocated_size().await {
        v.insert("actual-size".into(), json!(n));
    }
    if let Some(cs) = cluster_size(&node) {
        v.insert("cluster-size".into(), json!(cs));
    }
    let driver = driver_of(&node);
    if let Some(q) = driver.as_any().downcast_ref::<Qcow2>() {
        let h = q.header();
        v.insert("dirty-flag".into(), json!(false));
        if let Some(b) = &h.backing_file {
            v.insert("backing-filename".into(), json!(b));
            let full = strata_graph::open::path_combine(&node.filename(), b);
            v.insert("full-backing-filename".into(), json!(full));
            if let Some(f) = &h.backing_format {
                v.insert("backing-filename-format".into(), json!(f));
            }
        }
        let fi = q.format_info();
        v.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": {
                "compat": fi.compat,
                "compression-type": if h.compression_type.as_u8() == 1 { "zstd" } else { "zlib" },
                "lazy-refcounts": fi.lazy_refcounts,
                "refcount-bits": fi.refcount_bits,
                "corrupt": fi.corrupt,
                "extended-l2": fi.extended_l2,
            }}),
        );
    } else if node.driver() == "file" {
        v.insert("dirty-flag".into(), json!(false));
        v.insert(
            "format-specific".into(),
            json!({"type": "file", "data": {}}),
        );
    }
    if backing
        && let Some(b) = g.chain_below(name)
        && rec.kind == strata_graph::NodeKind::Format
    {
        v.insert(
            "backing-image".into(),
            Box::pin(image_info(g, &b, true, memo)).await,
        );
    }
    let v = Value::Object(v);
    if backing {
        memo.insert(name.to_string(), v.clone());
    }
    v
}

/// Depth of `name`'s backing chain.
fn backing_depth(g: &Graph, name: &str) -> usize {
    let mut depth = 0;
    let mut cur = name.to_string();
    while g
        .node(&cur)
        .is_some_and(|r| r.kind == strata_graph::NodeKind::Format)
        && let Some(b) = g.chain_below(&cur)
    {
        depth += 1;
        cur = g.skip_filters(&b);
    }
    depth
}

/// QEMU's `BlockDeviceInfo` for one node.
async fn device_info(g: &Graph, name: &str, flat: bool, memo: &mut ChainInfos) -> Value {
    let rec = g.node(name).expect("listed");
    let node: NodeRef = rec.node.clone();
    let mut v = Map::new();
    v.insert("file".into(), json!(node_filename(g, name)));
    v.insert("node-name".into(), json!(name));
    v.insert("ro".into(), json!(rec.read_only));
    v.insert("drv".into(), json!(node.driver()));
    if let Some(b) = g
        .chain_below(name)
        .filter(|_| rec.kind == strata_graph::NodeKind::Format)
    {
        v.insert("backing_file".into(), json!(node_filename(g, &b)));
    }
    v.insert(
        "backing_file_depth".into(),
        json!(if flat { 0 } else { backing_depth(g, name) }),
    );
    v.insert("encrypted".into(), json!(false));
    v.insert(
        "detect_zeroes".into(),
        json!(rec.node.detect_zeroes().as_str()),
    );
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        v.insert(k.into(), json!(0));
    }
    v.insert("image".into(), image_info(g, name, !flat, memo).await);
    v.insert("write_threshold".into(), json!(rec.node.write_threshold()));
    v.insert("active".into(), json!(rec.node.is_active()));
    let opts = rec.options.as_object().cloned().unwrap_or_default();
    v.insert(
        "cache".into(),
        json!({
            "writeback": true,
            "direct": strata_graph::blockdev::cache_flag(&opts, "direct"),
            "no-flush": strata_graph::blockdev::cache_flag(&opts, "no-flush"),
        }),
    );
    let bitmaps: Vec<Value> = rec
        .node
        .bitmaps()
        .info()
        .into_iter()
        .map(|b| {
            let mut o = json!({
                "name": b.name, "recording": b.recording, "persistent": b.persistent,
                "busy": b.busy, "granularity": b.granularity, "count": b.count,
            });
            if b.inconsistent {
                o["inconsistent"] = json!(true);
            }
            o
        })
        .collect();
    if !bitmaps.is_empty() {
        v.insert("dirty-bitmaps".into(), Value::Array(bitmaps));
    }
    Value::Object(v)
}

pub async fn query_named_block_nodes(d: Arc<Daemon>, a: Args) -> Reply {
    let flat = opt_bool(&a, "flat").unwrap_or(false);
    let g = d.env.graph.lock().await;
    let mut out = Vec::new();
    let mut memo = ChainInfos::new();
    for name in g.node_names().iter().rev() {
        out.push(device_info(&g, name, flat, &mut memo).await);
    }
    Ok(Value::Array(out))
}

pub async fn x_debug_query_block_graph(d: Arc<Daemon>, _a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    let mut nodes = Vec::new();
    let mut ids: BTreeMap<String, u64> = BTreeMap::new();
    let mut next = 1u64;
    for name in g.node_names() {
        ids.insert(name.clone(), next);
        nodes.push(json!({"id": next, "type": "block-driver", "name": name}));
        next += 1;
    }
    let perms = g.effective_perms();
    let mut edges = Vec::new();
    let mut users: BTreeMap<String, u64> = BTreeMap::new();
    for e in g.edges() {
        let parent = match &e.user {
            User::Node(n) => ids[n],
            User::Backend => {
                nodes.push(json!({"id": next, "type": "block-backend", "name": ""}));
                next += 1;
                next - 1
            }
            User::Job { id, .. } => *users.entry(id.clone()).or_insert_with(|| {
                nodes.push(json!({"id": next, "type": "block-job", "name": id}));
                next += 1;
                next - 1
            }),
        };
        let p = perms[&e.id];
        edges.push(json!({
            "parent": parent, "child": ids[&e.child], "name": e.role,
            "perm": p.perm.qapi_names(), "shared-perm": p.shared.qapi_names(),
        }));
    }
    Ok(json!({"nodes": nodes, "edges": edges}))
}

fn stats_of(g: &Graph, name: &str, depth: usize) -> Value {
    let rec = g.node(name).expect("listed");
    let mut v = Map::new();
    v.insert("node-name".into(), json!(name));
    v.insert("stats".into(), rec.node.stats().to_qmp());
    let driver = strata_core::BlockNode::driver(&*rec.node);
    if driver == "file" || driver == "host_device" {
        let (ok, failed, bytes) = rec.node.driver_discards();
        v.insert(
            "driver-specific".into(),
            json!({"driver": driver, "discard-nb-ok": ok, "discard-nb-failed": failed,
                   "discard-bytes-ok": bytes}),
        );
    }
    if depth < 64 {
        if let Some(f) = g.child(name, "file") {
            v.insert("parent".into(), stats_of(g, &f.child, depth + 1));
        }
        if let Some(b) = g.child(name, "backing") {
            v.insert("backing".into(), stats_of(g, &b.child, depth + 1));
        }
    }
    Value::Object(v)
}

pub async fn query_blockstats(d: Arc<Daemon>, a: Args) -> Reply {
    if !opt_bool(&a, "query-nodes").unwrap_or(false) {
        // qemu-storage-daemon has no named block backends.
        return Ok(json!([]));
    }
    let g = d.env.graph.lock().await;
    // Oldest node first, as QEMU walks its node list here (query-named-block-nodes lists
    // newest first).
    Ok(Value::Array(
        g.node_names().iter().map(|n| stats_of(&g, n, 0)).collect(),
    ))
}

pub async fn query_block(_d: Arc<Daemon>, _a: Args) -> Reply {
    Ok(json!([]))
}
