//! Opening nodes from `blockdev-add` options (QEMU's `BlockdevOptions`, already checked
//! against the QMP schema), registering them and their implicit children in the [`Graph`],
//! closing them again, and reopening a node read-only ↔ read-write.
//!
//! Children named by string must exist; children given as objects are opened as implicit
//! nodes with generated names; a qcow2 image without an explicit `backing` opens the chain its
//! header names (formats must be recorded: backing files are never probed).

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use strata_core::{BlockNode, NodeRef};
use strata_io::{Aio, FileNode, FileOptions, Locking};
use strata_qcow2::Qcow2;

use crate::drivers::blkdebug::{BlkdebugNode, BlkdebugOptions};
use crate::drivers::copy_on_read::CopyOnReadNode;
use crate::drivers::null::{NullNode, NullOptions};
use crate::drivers::raw::{RawNode, RawOptions};
use crate::drivers::throttle::ThrottleNode;
use crate::graph::{EdgePerms, Graph, NodeKind, NodeRec, valid_node_name};
use crate::link::Link;
use crate::node::{DetectZeroes, GraphNode};
use crate::open::path_combine;
use crate::perm::{EdgeKind, User};

/// Deepest backing chain opened from image headers (as the image tool).
const MAX_CHAIN_DEPTH: usize = 512;

/// Objects nodes may refer to (`--object` / `object-add`), owned by the daemon.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    /// Throttle groups by id.
    pub throttle_groups: HashMap<String, Arc<crate::drivers::throttle::ThrottleGroup>>,
    /// Protocol drivers implemented outside this crate (e.g. `nbd`), by driver name.
    pub protocol_drivers: HashMap<String, Arc<dyn DriverFactory>>,
    /// Loaded TLS credentials (`tls-creds-x509`/`-psk`) by id; the crate that uses them
    /// knows their type.
    pub tls_creds: HashMap<String, Arc<dyn Any + Send + Sync>>,
}

/// Opens a protocol node for a driver this crate does not know (registered in
/// [`Objects::protocol_drivers`]); the node becomes a `NodeKind::Protocol` node.
pub trait DriverFactory: Send + Sync + std::fmt::Debug {
    /// Open a node from its `blockdev-add` options.
    fn open<'a>(
        &'a self,
        opts: &'a Map<String, Value>,
        read_only: bool,
        objects: &'a Objects,
    ) -> Pin<Box<dyn Future<Output = Result<NodeRef, String>> + Send + 'a>>;
}

/// One `blockdev-add` (or implicit open) in progress: what it registered so far, so a
/// failure can take it all back.
struct Opening<'a> {
    graph: &'a mut Graph,
    objects: &'a Objects,
    created: Vec<String>,
    /// `force-share` of the node whose inline children are being opened (they inherit it).
    inherited_force_share: bool,
    /// `cache` (`direct`, `no-flush`) of the node whose inline children — its file, and
    /// the backing files its header names — are being opened: they inherit what they do
    /// not set themselves, as QEMU's `bdrv_inherited_options`.
    inherited_cache: Map<String, Value>,
    /// `discard=unmap` of that node: inline children without a `discard` of their own
    /// inherit it (QEMU passes `BDRV_O_UNMAP` down in the open flags).
    inherited_unmap: bool,
}

/// The qcow2 runtime options QEMU refuses at open (`read_cache_sizes` and
/// `qcow2_update_options_prepare`), with its texts.
fn check_qcow2_runtime_options(
    opts: &Map<String, Value>,
    header: &strata_qcow2::Header,
) -> Result<(), String> {
    let cs = header.cluster_size();
    let (l2, rc) = (
        opt_u64(opts, "l2-cache-size"),
        opt_u64(opts, "refcount-cache-size"),
    );
    if let Some(combined) = opt_u64(opts, "cache-size") {
        if l2.is_some() && rc.is_some() {
            return Err(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                    .into(),
            );
        }
        if l2.is_some_and(|l| l > combined) {
            return Err("l2-cache-size may not exceed cache-size".into());
        }
        if rc.is_some_and(|r| r > combined) {
            return Err("refcount-cache-size may not exceed cache-size".into());
        }
    }
    if let Some(e) = opt_u64(opts, "l2-cache-entry-size")
        && (e < 512 || e > cs || !e.is_power_of_two())
    {
        return Err(format!(
            "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
        ));
    }
    if let Some(v) = opts.get("cache-clean-interval").and_then(Value::as_i64)
        && !(0..=i64::from(u32::MAX)).contains(&v)
    {
        return Err("Cache clean interval too big".into());
    }
    if opt_bool(opts, "lazy-refcounts", false) && header.version < 3 {
        return Err(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                .into(),
        );
    }
    Ok(())
}

/// `opts` with `"backing": ""` turned into `null`, which QEMU still accepts with a
/// deprecation warning (`None`: nothing to change).
fn empty_backing_as_null(opts: &Map<String, Value>) -> Option<Map<String, Value>> {
    if opts.get("backing").and_then(Value::as_str) != Some("") {
        return None;
    }
    eprintln!("warning: Use of \"backing\": \"\" is deprecated; use \"backing\": null instead");
    let mut out = opts.clone();
    out.insert("backing".into(), Value::Null);
    Some(out)
}

/// `opts` with the `cache` members it does not set taken from `inherited` (`None`: nothing
/// to add).
fn inherit_cache(
    opts: &Map<String, Value>,
    inherited: &Map<String, Value>,
) -> Option<Map<String, Value>> {
    let own = opts.get("cache").and_then(Value::as_object);
    let missing: Vec<(&String, &Value)> = inherited
        .iter()
        .filter(|(k, _)| ["direct", "no-flush"].contains(&k.as_str()))
        .filter(|(k, _)| own.is_none_or(|o| !o.contains_key(*k)))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let mut cache = own.cloned().unwrap_or_default();
    for (k, v) in missing {
        cache.insert(k.clone(), v.clone());
    }
    let mut out = opts.clone();
    out.insert("cache".into(), Value::Object(cache));
    Some(out)
}

/// `cache.<key>` of a node's options (`direct`, `no-flush`); off when not given.
pub fn cache_flag(opts: &Map<String, Value>, key: &str) -> bool {
    opts.get("cache")
        .and_then(|c| c.get(key))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Read an optional member as a bool.
fn opt_bool(o: &Map<String, Value>, key: &str, default: bool) -> bool {
    o.get(key).and_then(Value::as_bool).unwrap_or(default)
}

fn opt_u64(o: &Map<String, Value>, key: &str) -> Option<u64> {
    o.get(key).and_then(Value::as_u64)
}

fn opt_str<'v>(o: &'v Map<String, Value>, key: &str) -> Option<&'v str> {
    o.get(key).and_then(Value::as_str)
}

/// Open the node `opts` describes and register it (and its implicit children). Returns its
/// name.
pub async fn blockdev_add(
    graph: &mut Graph,
    objects: &Objects,
    opts: &Map<String, Value>,
) -> Result<String, String> {
    if opt_str(opts, "node-name").is_none() {
        return Err("'node-name' must be specified for the root node".into());
    }
    let mut op = Opening {
        graph,
        objects,
        created: Vec::new(),
        inherited_force_share: false,
        inherited_cache: Map::new(),
        inherited_unmap: false,
    };
    match op.open(opts, None, 0).await {
        Ok(name) => {
            if let Some(n) = op.graph.node_mut(&name) {
                n.monitor_owned = true;
            }
            Ok(name)
        }
        Err(e) => {
            op.undo().await;
            Err(e)
        }
    }
}

/// Open a node for a command's own use (QEMU's `bdrv_open` from `drive-backup` /
/// `drive-mirror`): like [`blockdev_add`], but without `node-name` the node gets an
/// automatic name, and it is not owned by the monitor.
pub async fn open_node(
    graph: &mut Graph,
    objects: &Objects,
    opts: &Map<String, Value>,
) -> Result<String, String> {
    let mut op = Opening {
        graph,
        objects,
        created: Vec::new(),
        inherited_force_share: false,
        inherited_cache: Map::new(),
        inherited_unmap: false,
    };
    match op.open(opts, None, 0).await {
        Ok(name) => Ok(name),
        Err(e) => {
            op.undo().await;
            Err(e)
        }
    }
}

impl Opening<'_> {
    async fn undo(&mut self) {
        while let Some(name) = self.created.pop() {
            // Only nodes nobody else took a hold of are ours to drop.
            let _ = self.graph.remove_node(&name).await;
        }
    }

    /// Resolve a `BlockdevRef`: a node name or inline options. `inherit_ro` is the parent's
    /// read-only flag for children that follow it.
    async fn child(
        &mut self,
        r: &Value,
        inherit_ro: Option<bool>,
        depth: usize,
    ) -> Result<String, String> {
        match r {
            Value::String(name) => {
                if self.graph.node(name).is_none() {
                    return Err(format!(
                        "Cannot find device='{name}' nor node-name='{name}'"
                    ));
                }
                Ok(name.clone())
            }
            Value::Object(o) => Box::pin(self.open(o, inherit_ro, depth)).await,
            _ => Err("Invalid parameter type for 'file', expected: BlockdevRef".into()),
        }
    }

    /// Open one node from its options; children first.
    async fn open(
        &mut self,
        opts: &Map<String, Value>,
        inherit_ro: Option<bool>,
        depth: usize,
    ) -> Result<String, String> {
        let driver = opt_str(opts, "driver")
            .ok_or("Parameter 'driver' is missing")?
            .to_string();
        let (name, auto) = match opt_str(opts, "node-name") {
            Some(n) if !valid_node_name(n) => return Err(format!("Invalid node-name: '{n}'")),
            Some(n) => {
                if self.graph.node(n).is_some() {
                    return Err(format!("Duplicate nodes with node-name='{n}'"));
                }
                (n.to_string(), false)
            }
            None => (self.graph.auto_name(), true),
        };
        let read_only = match opts.get("read-only").and_then(Value::as_bool) {
            Some(ro) => ro,
            None => inherit_ro.unwrap_or(false),
        };
        let force_share = opts
            .get("force-share")
            .and_then(Value::as_bool)
            .unwrap_or(self.inherited_force_share);
        if force_share && !read_only {
            return Err("force-share=on can only be used with read-only images".into());
        }
        let outer_force_share = std::mem::replace(&mut self.inherited_force_share, force_share);
        let with_cache = inherit_cache(opts, &self.inherited_cache);
        let opts = with_cache.as_ref().unwrap_or(opts);
        let null_backing = empty_backing_as_null(opts);
        let opts = null_backing.as_ref().unwrap_or(opts);
        let own_cache = opts
            .get("cache")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let outer_cache = std::mem::replace(&mut self.inherited_cache, own_cache);
        let unmap = match opt_str(opts, "discard") {
            Some(d) => d == "unmap" || d == "on",
            None => self.inherited_unmap,
        };
        let detect_zeroes = opt_str(opts, "detect-zeroes")
            .and_then(DetectZeroes::parse)
            .unwrap_or(DetectZeroes::Off);
        if detect_zeroes == DetectZeroes::Unmap && !unmap {
            self.inherited_force_share = outer_force_share;
            self.inherited_cache = outer_cache;
            return Err(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
                    .into(),
            );
        }
        let outer_unmap = std::mem::replace(&mut self.inherited_unmap, unmap);
        let mut recorded = opts.clone();
        if force_share {
            recorded.insert("force-share".into(), json!(true));
        }
        // (role, child name, edge kind)
        let mut children: Vec<(&'static str, String, EdgeKind)> = Vec::new();
        let mut links: HashMap<&'static str, Arc<Link>> = HashMap::new();

        let (driver_node, kind): (NodeRef, NodeKind) = match driver.as_str() {
            "file" | "host_device" => {
                let filename =
                    opt_str(opts, "filename").ok_or("Parameter 'filename' is missing")?;
                let aio = match opt_str(opts, "aio") {
                    Some("io_uring") => Aio::IoUring,
                    _ => Aio::Threads,
                };
                let direct = cache_flag(opts, "direct");
                if opt_str(opts, "aio") == Some("native") && !direct {
                    return Err("aio=native was specified, but it requires cache.direct=on, which was not specified.".into());
                }
                let fo = FileOptions {
                    read_only,
                    direct,
                    aio,
                };
                let locking: Locking = match opt_str(opts, "locking") {
                    Some(l) => l.parse().map_err(|e: strata_core::Error| e.to_string())?,
                    None => Locking::Auto,
                };
                let node = FileNode::open(Path::new(filename), &fo).map_err(|e| e.to_string())?;
                node.set_locking(locking);
                node.set_no_flush(cache_flag(opts, "no-flush"));
                (node as NodeRef, NodeKind::Protocol)
            }
            "null-co" | "null-aio" => {
                let no = NullOptions {
                    size: opt_u64(opts, "size").unwrap_or(1 << 30),
                    read_zeroes: opt_bool(opts, "read-zeroes", false),
                };
                (Arc::new(NullNode::new(no)) as NodeRef, NodeKind::Protocol)
            }
            "raw" => {
                let file = self.required_child(opts, "file", read_only, depth).await?;
                let link = self.link_to(&file);
                let ro = RawOptions {
                    offset: opt_u64(opts, "offset").unwrap_or(0),
                    size: opt_u64(opts, "size"),
                    ..Default::default()
                };
                let node = RawNode::open(link.clone(), ro).map_err(|e| e.to_string())?;
                recorded.insert("file".into(), json!(file));
                links.insert("file", link);
                let kind = if opts.contains_key("offset") || opts.contains_key("size") {
                    NodeKind::Format
                } else {
                    NodeKind::Filter
                };
                let edge = if kind == NodeKind::Filter {
                    EdgeKind::Filtered
                } else {
                    EdgeKind::Storage
                };
                children.push(("file", file, edge));
                (Arc::new(node) as NodeRef, kind)
            }
            "qcow2" => {
                let file = self.required_child(opts, "file", read_only, depth).await?;
                let file_link = self.link_to(&file);
                recorded.insert("file".into(), json!(file));
                let header = strata_qcow2::read_header(&(file_link.clone() as NodeRef))
                    .await
                    .map_err(|e| e.to_string())?;
                check_qcow2_runtime_options(opts, &header)?;
                let image_name = file_link.filename();
                // External data file: explicit, or the one the header names.
                let data_file = match opts.get("data-file") {
                    Some(r) => Some(self.child(r, Some(read_only), depth + 1).await?),
                    None => match &header.data_file {
                        Some(df) => {
                            let path = path_combine(&image_name, df);
                            let o =
                                json!({"driver": "file", "filename": path, "read-only": read_only});
                            Some(
                                Box::pin(self.open(
                                    o.as_object().expect("object"),
                                    None,
                                    depth + 1,
                                ))
                                .await?,
                            )
                        }
                        None => None,
                    },
                };
                let data_link = data_file.as_ref().map(|d| self.link_to(d));
                // Backing: explicit node or options, `null` for none, else the header's.
                let backing = match opts.get("backing") {
                    Some(Value::Null) => None,
                    Some(r) => Some(
                        self.child(r, Some(true), depth + 1)
                            .await
                            .map_err(|e| format!("Could not open backing file: {e}"))?,
                    ),
                    None => match &header.backing_file {
                        Some(b) => Some(
                            self.backing_from_header(
                                &image_name,
                                b,
                                header.backing_format.as_deref(),
                                self.graph
                                    .node(&file)
                                    .and_then(|r| r.options.get("aio").cloned()),
                                depth,
                            )
                            .await?,
                        ),
                        None => None,
                    },
                };
                let backing_link = backing.as_ref().map(|b| self.link_to(b));
                let qo = strata_qcow2::OpenOptions {
                    read_only,
                    l2_cache_size: opt_u64(opts, "l2-cache-size")
                        .or_else(|| opt_u64(opts, "cache-size")),
                    refcount_cache_size: opt_u64(opts, "refcount-cache-size"),
                };
                let node = Qcow2::open(
                    file_link.clone(),
                    &qo,
                    backing_link.clone().map(|l| l as NodeRef),
                    data_link.clone().map(|l| l as NodeRef),
                )
                .await
                .map_err(|e| e.to_string())?;
                children.push(("file", file, EdgeKind::Storage));
                links.insert("file", file_link);
                if let (Some(d), Some(l)) = (data_file, data_link) {
                    recorded.insert("data-file".into(), json!(d));
                    children.push(("data-file", d, EdgeKind::Storage));
                    links.insert("data-file", l);
                }
                if let (Some(b), Some(l)) = (backing, backing_link) {
                    if !opts.contains_key("backing") {
                        // Opened from the header: QEMU's "implicit backing" (filenames).
                        recorded.insert(
                            crate::filename::BACKING_FROM_HEADER.into(),
                            json!(header.backing_file),
                        );
                    }
                    recorded.insert("backing".into(), json!(b));
                    children.push(("backing", b, EdgeKind::Cow));
                    links.insert("backing", l);
                }
                (node as NodeRef, NodeKind::Format)
            }
            "copy-before-write" | "snapshot-access" => {
                let (node, kids) = self
                    .open_cbw_family(&driver, opts, read_only, depth)
                    .await?;
                for (role, child, edge, link) in kids {
                    recorded.insert(role.into(), json!(child));
                    links.insert(role, link);
                    children.push((role, child, edge));
                }
                let kind = if driver == "copy-before-write" {
                    NodeKind::Filter
                } else {
                    NodeKind::Format
                };
                (node, kind)
            }
            "throttle" | "copy-on-read" | "blkdebug" => {
                let key = if driver == "blkdebug" {
                    "image"
                } else {
                    "file"
                };
                let file = self.required_child(opts, key, read_only, depth).await?;
                let link = self.link_to(&file);
                let node: NodeRef = match driver.as_str() {
                    "throttle" => {
                        let id = opt_str(opts, "throttle-group").unwrap_or_default();
                        let Some(group) = self.objects.throttle_groups.get(id) else {
                            return Err(format!("Throttle group '{id}' does not exist"));
                        };
                        Arc::new(ThrottleNode::new(link.clone(), group.clone()))
                    }
                    "copy-on-read" => {
                        let bottom = match opt_str(opts, "bottom") {
                            Some(b) => match self.graph.node(b) {
                                Some(n) => Some(n.node.clone() as NodeRef),
                                None => {
                                    return Err(format!(
                                        "Cannot find device='{b}' nor node-name='{b}'"
                                    ));
                                }
                            },
                            None => None,
                        };
                        Arc::new(CopyOnReadNode::new(link.clone(), bottom))
                    }
                    _ => {
                        let bo = BlkdebugOptions::from_json(&Value::Object(opts.clone()))
                            .map_err(|e| e.to_string())?;
                        Arc::new(BlkdebugNode::new(link.clone(), bo).map_err(|e| e.to_string())?)
                    }
                };
                recorded.insert(key.into(), json!(file));
                links.insert(if key == "image" { "image" } else { "file" }, link);
                children.push((
                    if key == "image" { "image" } else { "file" },
                    file,
                    EdgeKind::Filtered,
                ));
                (node, NodeKind::Filter)
            }
            other => match self.objects.protocol_drivers.get(other) {
                Some(f) => (
                    f.open(opts, read_only, self.objects).await?,
                    NodeKind::Protocol,
                ),
                None => return Err(format!("Unknown driver '{other}'")),
            },
        };

        self.inherited_force_share = outer_force_share;
        self.inherited_cache = outer_cache;
        self.inherited_unmap = outer_unmap;
        let node = GraphNode::new(&name, driver_node.clone());
        node.set_write_policy(unmap, detect_zeroes);
        recorded.insert("node-name".into(), json!(name));
        self.graph.insert_node(NodeRec {
            name: name.clone(),
            auto_named: auto,
            node,
            kind,
            options: Value::Object(recorded),
            read_only,
            monitor_owned: false,
        })?;
        self.created.push(name.clone());
        for (role, child, edge) in children {
            let link = links.remove(role);
            self.graph.add_edge(
                User::Node(name.clone()),
                &child,
                role,
                EdgePerms::Derived(edge),
                link,
            )?;
        }
        if driver == "copy-before-write"
            && let Some(id) = self.graph.child(&name, "target").map(|e| e.id)
        {
            self.graph
                .update_edge_perms(id, EdgePerms::Fixed(crate::perm::Use::CbwTarget.perms()))?;
        }
        Ok(name)
    }

    /// `copy-before-write` (`file`, `target`, `bitmap`, `on-cbw-error`, `cbw-timeout`,
    /// `min-cluster-size`) and `snapshot-access` (`file`, a copy-before-write node): the
    /// driver and its children (role, node, edge kind, link).
    async fn open_cbw_family(
        &mut self,
        driver: &str,
        opts: &Map<String, Value>,
        read_only: bool,
        depth: usize,
    ) -> Result<(NodeRef, Vec<(&'static str, String, EdgeKind, Arc<Link>)>), String> {
        use crate::drivers::copy_before_write::{
            CbwNode, CbwOptions, OnCbwError, SnapshotAccessNode,
        };
        let file = self.required_child(opts, "file", read_only, depth).await?;
        let file_link = self.link_to(&file);
        if driver == "snapshot-access" {
            let node = SnapshotAccessNode::new(file_link.clone()).map_err(|e| e.to_string())?;
            return Ok((
                Arc::new(node),
                vec![("file", file, EdgeKind::Filtered, file_link)],
            ));
        }
        let target = self.required_child(opts, "target", false, depth).await?;
        let target_link = self.link_to(&target);
        let mut co = CbwOptions::default();
        if let Some(v) = opts.get("on-cbw-error") {
            let s = v.as_str().unwrap_or_default();
            co.on_cbw_error = OnCbwError::parse(s)
                .ok_or_else(|| format!("Parameter 'on-cbw-error' does not accept value '{s}'"))?;
        }
        co.cbw_timeout = opt_u64(opts, "cbw-timeout")
            .filter(|&t| t > 0)
            .map(std::time::Duration::from_secs);
        co.min_cluster_size = opt_u64(opts, "min-cluster-size").unwrap_or(0);
        if let Some(b) = opts.get("bitmap").and_then(Value::as_object) {
            let (n, bname) = (
                opt_str(b, "node").unwrap_or_default(),
                opt_str(b, "name").unwrap_or_default(),
            );
            let rec = self
                .graph
                .node(n)
                .ok_or_else(|| format!("Node '{n}' not found"))?;
            let snap = rec.node.bitmaps().snapshot(bname);
            co.bitmap =
                Some(snap.ok_or_else(|| strata_core::bitmap::not_found_error(bname).to_string())?);
        }
        let node =
            CbwNode::new(file_link.clone(), target_link.clone(), co).map_err(|e| e.to_string())?;
        Ok((
            Arc::new(node),
            vec![
                ("file", file, EdgeKind::Filtered, file_link),
                ("target", target, EdgeKind::Storage, target_link),
            ],
        ))
    }

    async fn required_child(
        &mut self,
        opts: &Map<String, Value>,
        key: &str,
        read_only: bool,
        depth: usize,
    ) -> Result<String, String> {
        let r = opts
            .get(key)
            .ok_or_else(|| format!("Parameter '{key}' is missing"))?;
        self.child(r, Some(read_only), depth + 1).await
    }

    /// A fresh link to the registered node `name`.
    fn link_to(&self, name: &str) -> Arc<Link> {
        let node = self
            .graph
            .node(name)
            .expect("child was registered")
            .node
            .clone();
        Link::new(node)
    }

    /// Open the backing file a header names, read-only, with its recorded format. Its file
    /// uses the I/O engine (`aio`) of the overlay's file — a Strata extension: QEMU opens
    /// backing files with its default (`threads`) whatever the overlay uses, so a chain
    /// opened with `aio=io_uring` read half its data through the thread pool.
    async fn backing_from_header(
        &mut self,
        image: &str,
        backing: &str,
        format: Option<&str>,
        aio: Option<Value>,
        depth: usize,
    ) -> Result<String, String> {
        if depth + 1 > MAX_CHAIN_DEPTH {
            return Err(format!(
                "Backing chain too deep: more than {MAX_CHAIN_DEPTH} images (at '{backing}', named by '{image}')"
            ));
        }
        let path = path_combine(image, backing);
        let Some(fmt) = format else {
            return Err(format!(
                "Could not open backing file: Backing file specified without backing format: '{path}'"
            ));
        };
        let mut o = json!({
            "driver": fmt,
            "read-only": true,
            "file": {"driver": "file", "filename": path},
        });
        if let Some(aio) = aio {
            o["file"]["aio"] = aio;
        }
        Box::pin(self.open(o.as_object().expect("object"), Some(true), depth + 1))
            .await
            .map_err(|e| format!("Could not open backing file: {e}"))
    }
}

/// `blockdev-del`: only monitor-owned nodes without users.
pub async fn blockdev_del(graph: &mut Graph, name: &str) -> Result<(), String> {
    let Some(rec) = graph.node(name) else {
        return Err(format!("Failed to find node with node-name='{name}'"));
    };
    if !rec.monitor_owned {
        return Err(format!("Node {name} is not owned by the monitor"));
    }
    if graph.parents_of(name).next().is_some() {
        return Err(format!("Node {name} is in use"));
    }
    graph.remove_node(name).await
}

/// Reopen `name` (and its protocol child) read-only or read-write, as commit and stream do
/// with read-only images they write; in-flight requests drain first.
pub async fn reopen(graph: &mut Graph, name: &str, read_only: bool) -> Result<(), String> {
    let Some(rec) = graph.node(name) else {
        return Err(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ));
    };
    if rec.read_only == read_only {
        return Ok(());
    }
    reopen_chain(graph, name, read_only).await?;
    // The locks follow the new permissions; if another user of a file objects, go back.
    if let Err(e) = graph.refresh_locks() {
        let _ = Box::pin(reopen_chain(graph, name, !read_only)).await;
        let _ = graph.refresh_locks();
        return Err(e);
    }
    Ok(())
}

/// [`reopen`] without the lock refresh: the node and its protocol child, in a safe order.
async fn reopen_chain(graph: &mut Graph, name: &str, read_only: bool) -> Result<(), String> {
    if graph.node(name).is_some_and(|r| r.read_only == read_only) {
        return Ok(());
    }
    let file = graph.child(name, "file").map(|e| e.child.clone());
    // Writable from the bottom up; read-only from the top down, so a format's metadata is
    // flushed while its file can still take it.
    if !read_only && let Some(f) = &file {
        Box::pin(reopen_chain(graph, f, read_only)).await?;
    }
    reopen_one(graph, name, read_only).await?;
    if read_only && let Some(f) = &file {
        Box::pin(reopen_chain(graph, f, read_only)).await?;
    }
    Ok(())
}

async fn reopen_one(graph: &mut Graph, name: &str, read_only: bool) -> Result<(), String> {
    let rec = graph.node(name).expect("checked");
    let node = rec.node.clone();
    let opts = rec.options.as_object().cloned().unwrap_or_default();
    let drained = node.driver_link().drain().await;
    let old = node.inner();
    let new: NodeRef = match old.driver() {
        "file" | "host_device" => {
            let filename = opt_str(&opts, "filename").unwrap_or_default();
            let aio = match opt_str(&opts, "aio") {
                Some("io_uring") => Aio::IoUring,
                _ => Aio::Threads,
            };
            let direct = cache_flag(&opts, "direct");
            let file = FileNode::open(
                Path::new(filename),
                &FileOptions {
                    read_only,
                    direct,
                    aio,
                },
            )
            .map_err(|e| e.to_string())?;
            file.set_no_flush(cache_flag(&opts, "no-flush"));
            // The new descriptor takes the old one's locks before the old one goes.
            if let Some(prev) = old.as_any().downcast_ref::<FileNode>() {
                file.take_locks_from(prev);
            }
            file
        }
        "qcow2" => {
            let link = |role: &str| {
                graph
                    .child(name, role)
                    .and_then(|e| e.link.clone())
                    .map(|l| l as NodeRef)
            };
            let (file, backing, data) = (link("file"), link("backing"), link("data-file"));
            let file = file.ok_or("qcow2 node without file")?;
            let bitmaps = old.dirty_bitmaps();
            old.close().await.map_err(|e| e.to_string())?;
            let qo = strata_qcow2::OpenOptions {
                read_only,
                ..Default::default()
            };
            let q = Qcow2::open(file, &qo, backing, data)
                .await
                .map_err(|e| e.to_string())?;
            // Bitmaps the image did not store live on in the reopened instance.
            if let Some(b) = bitmaps {
                q.adopt_bitmaps(&b);
            }
            q
        }
        // Nodes without state of their own follow their child's mode.
        _ => {
            drop(drained);
            graph.node_mut(name).expect("checked").read_only = read_only;
            return Ok(());
        }
    };
    node.driver_link().retarget_drained(&drained, new);
    drop(drained);
    let rec = graph.node_mut(name).expect("checked");
    rec.read_only = read_only;
    if let Some(o) = rec.options.as_object_mut() {
        o.insert("read-only".into(), json!(read_only));
    }
    Ok(())
}
