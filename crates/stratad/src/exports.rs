//! NBD server and block exports: `nbd-server-start/stop`, `block-export-add/del`, the legacy
//! `nbd-server-add/remove`, `query-block-exports`, and BLOCK_EXPORT_DELETED.
//!
//! An export is a user of its node like QEMU's anonymous block backend: a graph edge with
//! the export's permissions and a [`Link`] the NBD server reads and writes through, so a
//! job's pivot moves the export to the new node with no client noticing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use strata_core::NodeRef;
use strata_core::bitmap::BitmapSet;
use strata_graph::{EdgeId, EdgePerms, Link, Use, User};
use strata_nbd::server::{DirtySource, ExportConfig, ListenAddr, NbdServer, ServerOptions};

use crate::commands::{Args, Reply, arg_str, generic, ok, opt_bool, opt_str};
use crate::daemon::Daemon;

/// One export.
#[derive(Debug)]
struct ExportRec {
    /// NBD export name.
    name: String,
    /// The node it was created on.
    node_name: String,
    /// Its edge in the graph.
    edge: EdgeId,
    /// Its data path (follows pivots).
    link: Arc<Link>,
    /// The NBD server serving it (`""`: the default one).
    server: String,
    /// Bitmaps it made busy: (node, bitmap).
    bitmaps: Vec<(Arc<BitmapSet>, String)>,
}

/// The NBD servers and the exports by id. QEMU runs one server; Strata's `x-id` names more
/// (`""` is the default server, the one a QEMU client starts and stops).
#[derive(Default)]
pub struct NbdState {
    servers: BTreeMap<String, Arc<NbdServer>>,
    exports: BTreeMap<String, ExportRec>,
}

/// QEMU's texts for the default server, with the name for the others.
fn server_error(id: &str, what: &str) -> String {
    if id.is_empty() {
        format!("NBD server {what}")
    } else {
        format!("NBD server '{id}' {what}")
    }
}

impl std::fmt::Debug for NbdState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdState")
            .field("exports", &self.exports)
            .finish_non_exhaustive()
    }
}

/// A bitmap read live by NBD block status.
struct BitmapSource {
    set: Arc<BitmapSet>,
    name: String,
}

impl DirtySource for BitmapSource {
    fn dirty_extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset + len;
        let runs = self.set.with_bitmap(&self.name, |b| {
            let mut out = Vec::new();
            let mut pos = offset;
            for (s, l) in b.extents_in(offset, len) {
                let (s, e) = (s.max(offset), (s + l).min(end));
                if s > pos {
                    out.push((s - pos, false));
                }
                if e > s {
                    out.push((e - s, true));
                }
                pos = e.max(pos);
            }
            if pos < end {
                out.push((end - pos, false));
            }
            out
        });
        runs.unwrap_or_else(|| vec![(len, false)])
    }
}

/// Parse QMP's `SocketAddressLegacy` (`{"type": "unix", "data": {"path": ...}}`) or the
/// flat `SocketAddress` of the command line (`{"type": "unix", "path": ...}`).
pub fn listen_addr(addr: &Value) -> Result<ListenAddr, String> {
    let kind = addr.get("type").and_then(Value::as_str).unwrap_or_default();
    let data = addr.get("data").unwrap_or(addr);
    let s = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_string);
    match kind {
        "unix" => Ok(ListenAddr::Unix(PathBuf::from(
            s("path").unwrap_or_default(),
        ))),
        "inet" => {
            let host = s("host").unwrap_or_default();
            let port = s("port").unwrap_or_default();
            let port: u16 = port.parse().map_err(|_| {
                format!("Service '{port}' is not a number (NBD server ports must be numeric)")
            })?;
            Ok(ListenAddr::Tcp { host, port })
        }
        other => Err(format!("Address type '{other}' is not supported")),
    }
}

/// Start the server (from `--nbd-server` or `nbd-server-start`).
pub async fn start_server(d: &Daemon, a: &Args) -> Result<(), String> {
    let mut st = d.nbd.lock().await;
    let id = opt_str(a, "x-id").unwrap_or_default().to_string();
    if st.servers.contains_key(&id) {
        return Err(server_error(&id, "already running"));
    }
    let addr = listen_addr(a.get("addr").unwrap_or(&Value::Null))?;
    let opts = ServerOptions {
        max_connections: a
            .get("max-connections")
            .and_then(Value::as_u64)
            .unwrap_or(100) as u32,
        handshake_max_seconds: a
            .get("handshake-max-seconds")
            .and_then(Value::as_u64)
            .unwrap_or(10) as u32,
    };
    let tls = match opt_str(a, "tls-creds") {
        Some(id) => {
            let objs = d.objects.lock();
            if !objs.0.contains_key(id) {
                return Err(format!("No TLS credentials with id '{id}'"));
            }
            let creds = objs
                .1
                .tls_creds
                .get(id)
                .cloned()
                .and_then(|c| c.downcast::<strata_nbd::TlsCreds>().ok())
                .ok_or_else(|| format!("Object with id '{id}' is not TLS credentials"))?;
            // `tls-authz` without `tls-creds` is accepted and unused, as in QEMU 10.0.
            let authz = opt_str(a, "tls-authz").map(|id| {
                Arc::new(crate::authz::AuthzById {
                    id: id.to_string(),
                    objects: d.authz.clone(),
                }) as Arc<dyn strata_nbd::Authorizer>
            });
            Some(creds.server_hook_with_authz(authz)?)
        }
        None => None,
    };
    let server = NbdServer::start_with_tls(addr, opts, tls)
        .await
        .map_err(|e| e.to_string())?;
    st.servers.insert(id, server);
    Ok(())
}

pub async fn nbd_server_start(d: Arc<Daemon>, a: Args) -> Reply {
    start_server(&d, &a).await.map_err(generic)?;
    Ok(ok())
}

pub async fn nbd_server_stop(d: Arc<Daemon>, a: Args) -> Reply {
    let id = opt_str(&a, "x-id").unwrap_or_default().to_string();
    let (server, ids) = {
        let st = d.nbd.lock().await;
        let server = st.servers.get(&id).cloned();
        let server = server.ok_or_else(|| generic(server_error(&id, "not running")))?;
        let ids: Vec<String> = st
            .exports
            .iter()
            .filter(|(_, e)| e.server == id)
            .map(|(k, _)| k.clone())
            .collect();
        (server, ids)
    };
    for e in ids {
        let _ = del_export(&d, &e, true).await;
    }
    server.stop().await;
    d.nbd.lock().await.servers.remove(&id);
    Ok(ok())
}

/// Add an export (`block-export-add` arguments).
pub async fn add_export(d: &Daemon, a: &Args) -> Result<(), String> {
    let id = arg_str(a, "id").to_string();
    let node_name = arg_str(a, "node-name").to_string();
    // QEMU's order (blk_exp_add): id, node, writability, iothread, then the driver's own
    // checks.
    let mut st = d.nbd.lock().await;
    if !strata_job::id_wellformed(&id) {
        return Err("Invalid block export id".into());
    }
    if st.exports.contains_key(&id) {
        return Err(format!("Block export id '{id}' is already in use"));
    }
    let writable = opt_bool(a, "writable").unwrap_or(false);
    let mut g = d.env.graph.lock().await;
    let Some(rec) = g.node(&node_name) else {
        return Err(format!("Cannot find device='' nor node-name='{node_name}'"));
    };
    if writable && rec.read_only {
        return Err("Cannot export read-only node as writable".into());
    }
    if let Some(t) = opt_str(a, "iothread")
        && !matches!(
            d.objects.lock().0.get(t),
            Some(crate::daemon::Object::Iothread)
        )
    {
        return Err(format!("iothread \"{t}\" not found"));
    }
    match arg_str(a, "type") {
        "nbd" => {}
        "fuse" => {
            // fuse_export_create's argument checks, then Strata's missing driver.
            let mp = arg_str(a, "mountpoint");
            let md = std::fs::metadata(mp).map_err(|e| {
                format!("Failed to stat '{mp}': {}", crate::commands::errno_text(&e))
            })?;
            if !md.is_file() {
                return Err(format!("'{mp}' is not a regular file"));
            }
            return Err("FUSE exports are not supported by stratad".into());
        }
        "vhost-user-blk" => {
            return Err("vhost-user-blk exports are not supported by stratad".into());
        }
        _ => return Err("No driver found for the requested export type".into()),
    }
    let server_id = opt_str(a, "x-server").unwrap_or_default().to_string();
    let Some(server) = st.servers.get(&server_id).cloned() else {
        return Err(server_error(&server_id, "not running"));
    };
    let name = opt_str(a, "name").unwrap_or(&node_name).to_string();
    if server.exports().contains(&name) {
        return Err(format!("NBD server already has export named '{name}'"));
    }
    let node = rec.node.clone();
    let set = node.bitmaps();
    let mut sources: Vec<(String, Arc<dyn DirtySource>)> = Vec::new();
    let mut busy = Vec::new();
    for b in a
        .get("bitmaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        // A name is looked up on the exported node; `{node, name}` anywhere, with other
        // texts and (as QEMU, which checks the exported node only for names) no
        // read-only-export check.
        let (bset, bname, by_name) = match b {
            Value::String(n) => (set.clone(), n.clone(), true),
            Value::Object(o) => {
                let nn = o.get("node").and_then(Value::as_str).unwrap_or_default();
                let bn = o.get("name").and_then(Value::as_str).unwrap_or_default();
                let Some(r) = g.node(nn) else {
                    return Err(format!("Node '{nn}' not found"));
                };
                (r.node.bitmaps(), bn.to_string(), false)
            }
            _ => continue,
        };
        let Some(info) = bset.get_info(&bname) else {
            return Err(if by_name {
                format!("Bitmap '{bname}' is not found")
            } else {
                format!("Dirty bitmap '{bname}' not found")
            });
        };
        if by_name && info.recording && !writable && !rec.read_only {
            return Err(format!(
                "Enabled bitmap '{bname}' incompatible with readonly export"
            ));
        }
        bset.check(
            &bname,
            strata_core::bitmap::CheckFlags::BUSY | strata_core::bitmap::CheckFlags::INCONSISTENT,
        )
        .map_err(|e| e.message().to_string())?;
        sources.push((
            bname.clone(),
            Arc::new(BitmapSource {
                set: bset.clone(),
                name: bname.clone(),
            }),
        ));
        busy.push((bset, bname));
    }
    let link = Link::new(node.clone());
    let perms = if writable {
        Use::ExportWrite
    } else {
        Use::ExportRead
    };
    let edge = g.add_edge(
        User::Backend,
        &node_name,
        "root",
        EdgePerms::Fixed(perms.perms()),
        Some(link.clone()),
    )?;
    let cfg = ExportConfig {
        name: name.clone(),
        description: opt_str(a, "description").map(str::to_string),
        node: link.clone() as NodeRef,
        writable,
        bitmaps: sources,
        allocation_depth: opt_bool(a, "allocation-depth").unwrap_or(false),
        multi_conn: true,
    };
    if let Err(e) = server.add_export(cfg) {
        g.remove_edge(edge);
        return Err(e.to_string());
    }
    for (s, n) in &busy {
        let _ = s.set_busy(n, true);
    }
    st.exports.insert(
        id,
        ExportRec {
            name,
            node_name,
            edge,
            link,
            server: server_id,
            bitmaps: busy,
        },
    );
    Ok(())
}

pub async fn block_export_add(d: Arc<Daemon>, a: Args) -> Reply {
    add_export(&d, &a).await.map_err(generic)?;
    Ok(ok())
}

pub async fn nbd_server_add(d: Arc<Daemon>, a: Args) -> Reply {
    if !d.nbd.lock().await.servers.contains_key("") {
        return Err(generic("NBD server not running"));
    }
    let device = arg_str(&a, "device");
    let name = opt_str(&a, "name").unwrap_or(device).to_string();
    let mut args = serde_json::Map::new();
    args.insert("type".into(), json!("nbd"));
    args.insert("id".into(), json!(name));
    args.insert("node-name".into(), json!(device));
    args.insert("name".into(), json!(name));
    for k in ["description", "writable"] {
        if let Some(v) = a.get(k) {
            args.insert(k.into(), v.clone());
        }
    }
    if let Some(b) = a.get("bitmap") {
        args.insert("bitmaps".into(), json!([b]));
    }
    add_export(&d, &args).await.map_err(generic)?;
    Ok(ok())
}

/// Remove export `id`; `hard` disconnects clients.
async fn del_export(d: &Daemon, id: &str, hard: bool) -> Result<(), String> {
    let mut st = d.nbd.lock().await;
    let Some(rec) = st.exports.get(id) else {
        return Err(format!("Export '{id}' is not found"));
    };
    if let Some(server) = st.servers.get(&rec.server) {
        if !hard && server.export_clients(&rec.name) > 0 {
            return Err(format!("export '{id}' still in use"));
        }
        server
            .remove_export(&rec.name, hard)
            .map_err(|e| e.to_string())?;
    }
    let rec = st.exports.remove(id).expect("present");
    for (s, n) in &rec.bitmaps {
        let _ = s.set_busy(n, false);
    }
    d.env.graph.lock().await.remove_edge(rec.edge);
    drop(rec.link);
    d.events.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
    Ok(())
}

pub async fn block_export_del(d: Arc<Daemon>, a: Args) -> Reply {
    let hard = opt_str(&a, "mode") == Some("hard");
    del_export(&d, arg_str(&a, "id"), hard)
        .await
        .map_err(generic)?;
    Ok(ok())
}

pub async fn nbd_server_remove(d: Arc<Daemon>, a: Args) -> Reply {
    let hard = opt_str(&a, "mode") == Some("hard");
    del_export(&d, arg_str(&a, "name"), hard)
        .await
        .map_err(generic)?;
    Ok(ok())
}

pub async fn query_block_exports(d: Arc<Daemon>, _a: Args) -> Reply {
    let st = d.nbd.lock().await;
    let list: Vec<Value> = st
        .exports
        .iter()
        .map(|(id, e)| {
            // The node the export reaches now: pivots and job filters move it.
            let target = e.link.target();
            let node = target
                .as_any()
                .downcast_ref::<strata_graph::GraphNode>()
                .map_or(e.node_name.clone(), |g| g.name().to_string());
            json!({"node-name": node, "shutting-down": false, "type": "nbd", "id": id})
        })
        .collect();
    Ok(Value::Array(list))
}

/// Close every export, hard (shutdown).
pub async fn close_all(d: &Daemon) {
    let ids: Vec<String> = d.nbd.lock().await.exports.keys().cloned().collect();
    for id in ids {
        let _ = del_export(d, &id, true).await;
    }
}
