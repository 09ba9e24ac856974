//! Node commands: add, delete, reopen, create, amend, resize, external snapshots, and
//! rewriting a backing file name.

use std::sync::Arc;

use serde_json::{Value, json};
use strata_core::{BlockNode, NodeRef, Prealloc};
use strata_graph::blockdev;
use strata_graph::{EdgePerms, NodeKind, Use, User};
use strata_qcow2::Qcow2;

use super::{Args, Reply, arg_str, from_verb, generic, ok, opt_str};
use crate::daemon::Daemon;

pub async fn blockdev_add(d: Arc<Daemon>, a: Args) -> Reply {
    let objects = d.graph_objects();
    let mut g = d.env.graph.lock().await;
    blockdev::blockdev_add(&mut g, &objects, &a)
        .await
        .map_err(generic)?;
    Ok(ok())
}

pub async fn blockdev_del(d: Arc<Daemon>, a: Args) -> Reply {
    let mut g = d.env.graph.lock().await;
    blockdev::blockdev_del(&mut g, arg_str(&a, "node-name"))
        .await
        .map_err(generic)?;
    Ok(ok())
}

/// Options `blockdev-reopen` may change on an open node; everything else must be given
/// with the value it has.
const REOPENABLE: &[&str] = &[
    "read-only",
    "node-name",
    "driver",
    "file",
    "backing",
    "data-file",
];

pub async fn blockdev_reopen(d: Arc<Daemon>, a: Args) -> Reply {
    let list = a
        .get("options")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut g = d.env.graph.lock().await;
    // Check everything first, so a bad entry changes nothing.
    let mut plan = Vec::new();
    for o in &list {
        let o = o.as_object().cloned().unwrap_or_default();
        let Some(name) = opt_str(&o, "node-name") else {
            return Err(generic("node-name not specified"));
        };
        let Some(rec) = g.node(name) else {
            return Err(generic(format!("Cannot find node named '{name}'")));
        };
        if opt_str(&o, "driver") != Some(rec.node.driver()) {
            return Err(generic("Cannot change the option 'driver'"));
        }
        for (k, v) in &o {
            if REOPENABLE.contains(&k.as_str()) {
                continue;
            }
            if rec.options.get(k) != Some(v) {
                return Err(generic(format!("Cannot change the option '{k}'")));
            }
        }
        if let Some(b) = o.get("backing") {
            let cur = g.child(name, "backing").map(|e| e.child.clone());
            let want = b.as_str().map(str::to_string);
            let changes = b.is_object() || (cur != want && !(b.is_null() && cur.is_none()));
            if changes
                && let Some(e) = g.child(name, "backing")
                && e.frozen
            {
                return Err(generic(format!(
                    "Cannot change frozen 'backing' link from '{name}' to '{}'",
                    e.child
                )));
            }
        }
        let ro = o.get("read-only").and_then(Value::as_bool).unwrap_or(false);
        plan.push((name.to_string(), ro, o.get("backing").cloned()));
    }
    for (name, ro, backing) in plan {
        blockdev::reopen(&mut g, &name, ro).await.map_err(generic)?;
        match backing {
            Some(Value::Null) => g.set_backing(&name, None).await.map_err(generic)?,
            Some(Value::String(b)) => g.set_backing(&name, Some(&b)).await.map_err(generic)?,
            _ => {}
        }
    }
    Ok(ok())
}

pub async fn blockdev_create(d: Arc<Daemon>, a: Args) -> Reply {
    strata_blockjobs::create::blockdev_create(&d.env, &a)
        .await
        .map_err(from_verb)?;
    Ok(ok())
}

pub async fn blockdev_amend(d: Arc<Daemon>, a: Args) -> Reply {
    strata_blockjobs::create::blockdev_amend(&d.env, &a)
        .await
        .map_err(from_verb)?;
    Ok(ok())
}

/// Find a node by `device` or `node-name` (QEMU's `bdrv_lookup_bs`). `device` names a
/// block backend, and a storage daemon has no named ones: only `node-name` can match.
fn lookup(
    g: &strata_graph::Graph,
    device: Option<&str>,
    node: Option<&str>,
) -> Result<String, String> {
    if let Some(n) = node
        && g.node(n).is_some()
    {
        return Ok(n.to_string());
    }
    Err(match (device, node) {
        (Some(dv), Some(n)) => format!("Cannot find device='{dv}' nor node-name='{n}'"),
        (Some(dv), None) => format!("Cannot find device='{dv}' nor node-name=''"),
        (None, Some(n)) => format!("Cannot find device='' nor node-name='{n}'"),
        (None, None) => "Cannot find device='' nor node-name=''".into(),
    })
}

pub async fn block_resize(d: Arc<Daemon>, a: Args) -> Reply {
    let size = a.get("size").and_then(Value::as_i64).unwrap_or(0);
    if size < 0 {
        return Err(generic("Parameter 'size' expects a >0 size"));
    }
    let mut g = d.env.graph.lock().await;
    let name = lookup(&g, opt_str(&a, "device"), opt_str(&a, "node-name")).map_err(generic)?;
    // A temporary user holding RESIZE: fails with the permission conflict when a job
    // forbids resizing.
    let edge = g
        .add_edge(
            User::Backend,
            &name,
            "root",
            EdgePerms::Fixed(Use::Resize.perms()),
            None,
        )
        .map_err(generic)?;
    let node: NodeRef = g.node(&name).expect("looked up").node.clone();
    let r = node.truncate(size as u64, Prealloc::Off).await;
    g.remove_edge(edge);
    r.map_err(|e| generic(e.to_string()))?;
    Ok(ok())
}

/// The common part of both snapshot commands: `overlay` (already open, without backing)
/// goes on top of `node`.
async fn snapshot(d: &Daemon, node: &str, overlay: &str) -> Reply {
    let mut g = d.env.graph.lock().await;
    let Some(orec) = g.node(overlay) else {
        return Err(generic(format!(
            "Cannot find device='{overlay}' nor node-name='{overlay}'"
        )));
    };
    if g.node(node).is_none() {
        return Err(generic(format!(
            "Cannot find device='{node}' nor node-name='{node}'"
        )));
    }
    if orec.kind == NodeKind::Filter {
        return Err(generic("Filters cannot be used as overlays"));
    }
    if orec.kind != NodeKind::Format || orec.node.driver() == "raw" {
        return Err(generic("The overlay does not support backing images"));
    }
    if g.parents_of(overlay).next().is_some() {
        return Err(generic("The overlay is already in use"));
    }
    if g.child(overlay, "backing").is_some() {
        return Err(generic("The overlay already has a backing image"));
    }
    let base: NodeRef = g.node(node).expect("checked").node.clone();
    base.flush().await.map_err(|e| generic(e.to_string()))?;
    g.set_backing(overlay, Some(node)).await.map_err(generic)?;
    let own = g.child(overlay, "backing").map(|e| e.id);
    if let Err(e) = g.replace_node(node, overlay, |e| Some(e.id) == own).await {
        let _ = g.set_backing(overlay, None).await;
        return Err(generic(e));
    }
    // The old active layer is read-only from now on.
    let _ = blockdev::reopen(&mut g, node, true).await;
    Ok(ok())
}

pub async fn blockdev_snapshot(d: Arc<Daemon>, a: Args) -> Reply {
    snapshot(&d, arg_str(&a, "node"), arg_str(&a, "overlay")).await
}

pub async fn blockdev_snapshot_sync(d: Arc<Daemon>, a: Args) -> Reply {
    let file = arg_str(&a, "snapshot-file").to_string();
    let format = opt_str(&a, "format").unwrap_or("qcow2");
    let existing = opt_str(&a, "mode") == Some("existing");
    if opt_str(&a, "node-name").is_some() && opt_str(&a, "snapshot-node-name").is_none() {
        return Err(generic("New overlay node-name missing"));
    }
    let (node, size, base_file, base_fmt) = {
        let g = d.env.graph.lock().await;
        let name = lookup(&g, opt_str(&a, "device"), opt_str(&a, "node-name")).map_err(generic)?;
        if let Some(s) = opt_str(&a, "snapshot-node-name")
            && g.node(s).is_some()
        {
            return Err(generic("New overlay node-name already in use"));
        }
        let n = g.node(&name).expect("looked up").node.clone();
        (name, n.size(), n.filename(), n.driver())
    };
    if format != "qcow2" {
        return Err(generic(format!("Unsupported snapshot format '{format}'")));
    }
    if !existing {
        strata_io::FileNode::create(std::path::Path::new(&file), 0, Prealloc::Off)
            .await
            .map_err(|e| generic(e.to_string()))?;
        let f: NodeRef = strata_io::FileNode::open(
            std::path::Path::new(&file),
            &strata_io::FileOptions {
                read_only: false,
                direct: false,
                aio: Default::default(),
            },
        )
        .map_err(|e| generic(e.to_string()))?;
        let co = strata_qcow2::CreateOptions {
            size,
            backing_file: Some(base_file),
            backing_format: Some(base_fmt.to_string()),
            ..Default::default()
        };
        strata_qcow2::create(&f, &co, None)
            .await
            .map_err(|e| generic(e.to_string()))?;
        f.close().await.map_err(|e| generic(e.to_string()))?;
    }
    let mut opts = json!({
        "driver": format,
        "file": {"driver": "file", "filename": file},
        "backing": null,
    });
    let overlay_name = match opt_str(&a, "snapshot-node-name") {
        Some(n) => n.to_string(),
        None => d.env.graph.lock().await.auto_name(),
    };
    opts["node-name"] = json!(overlay_name);
    {
        let objects = d.graph_objects();
        let mut g = d.env.graph.lock().await;
        blockdev::blockdev_add(&mut g, &objects, opts.as_object().expect("object"))
            .await
            .map_err(generic)?;
    }
    snapshot(&d, &node, &overlay_name).await
}

pub async fn change_backing_file(d: Arc<Daemon>, a: Args) -> Reply {
    let g = d.env.graph.lock().await;
    let image = arg_str(&a, "image-node-name");
    let Some(rec) = g.node(image) else {
        return Err(generic(format!(
            "Cannot find device='' nor node-name='{image}'"
        )));
    };
    if g.child(image, "backing").is_none() {
        return Err(generic(
            "not allowing backing file change on an image without a backing file",
        ));
    }
    let driver = strata_graph::driver_of(&(rec.node.clone() as NodeRef));
    let Some(q) = driver.as_any().downcast_ref::<Qcow2>() else {
        return Err(generic(
            "Could not change backing file: Operation not supported",
        ));
    };
    let backing = arg_str(&a, "backing-file");
    let fmt = g
        .chain_below(image)
        .and_then(|b| g.node(&b).map(|n| n.node.driver()));
    q.set_backing(Some(backing), fmt)
        .await
        .map_err(|e| generic(format!("Could not change backing file to '{backing}': {e}")))?;
    Ok(ok())
}
