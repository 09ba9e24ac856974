//! Exports: what a server offers under a name, and the set of them.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;
use strata_core::{Error, NodeRef, Result};
use tokio_util::sync::CancellationToken;

use crate::proto;

/// Dirty-bitmap data behind a `qemu:dirty-bitmap:NAME` context. The daemon adapts its bitmap
/// type to it.
pub trait DirtySource: Send + Sync {
    /// Runs of `(length, dirty)` that cover `[offset, offset + len)` in order.
    fn dirty_extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)>;
}

/// What to export and how.
#[derive(Clone)]
pub struct ExportConfig {
    /// Export name (unique per server).
    pub name: String,
    /// Description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (≤ 4096 bytes).
    pub description: Option<String>,
    /// The node served. Nothing else is cached: every request asks it (size included), so a
    /// node that forwards to a swappable child works.
    pub node: NodeRef,
    /// Whether clients may write.
    pub writable: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` contexts.
    pub bitmaps: Vec<(String, Arc<dyn DirtySource>)>,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (unless the server allows one connection only).
    pub multi_conn: bool,
}

impl fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportConfig")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("node", &self.node)
            .field("writable", &self.writable)
            .field(
                "bitmaps",
                &self.bitmaps.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("allocation_depth", &self.allocation_depth)
            .field("multi_conn", &self.multi_conn)
            .finish()
    }
}

/// A metadata context an export offers.
#[derive(Clone)]
pub(crate) enum ContextKind {
    BaseAllocation,
    AllocationDepth,
    Dirty(Arc<dyn DirtySource>),
}

/// A context with its name and the id the server uses for it.
#[derive(Clone)]
pub(crate) struct MetaContext {
    pub(crate) id: u32,
    pub(crate) name: String,
    pub(crate) kind: ContextKind,
}

/// A live export.
pub(crate) struct Export {
    pub(crate) cfg: ExportConfig,
    /// Cancelled when the export is removed hard (or the server stops).
    pub(crate) cancel: CancellationToken,
    /// Connected clients.
    pub(crate) clients: AtomicUsize,
}

impl Export {
    /// Every context this export offers, with stable ids: `base:allocation` 0,
    /// `qemu:allocation-depth` 1, bitmap *i* 2 + *i*.
    pub(crate) fn contexts(&self) -> Vec<MetaContext> {
        let mut v = vec![MetaContext {
            id: 0,
            name: proto::CONTEXT_BASE_ALLOCATION.into(),
            kind: ContextKind::BaseAllocation,
        }];
        if self.cfg.allocation_depth {
            v.push(MetaContext {
                id: 1,
                name: proto::CONTEXT_ALLOCATION_DEPTH.into(),
                kind: ContextKind::AllocationDepth,
            });
        }
        for (i, (name, src)) in self.cfg.bitmaps.iter().enumerate() {
            v.push(MetaContext {
                id: 2 + i as u32,
                name: format!("{}{name}", proto::CONTEXT_DIRTY_BITMAP_PREFIX),
                kind: ContextKind::Dirty(Arc::clone(src)),
            });
        }
        v
    }

    /// The contexts matching `query`. Namespace wildcards (`base:`, `qemu:`,
    /// `qemu:dirty-bitmap:`) only match when listing, as in QEMU.
    pub(crate) fn match_query(&self, query: &str, list: bool) -> Vec<MetaContext> {
        let all = self.contexts();
        let wildcard = |prefix: &str| -> Vec<MetaContext> {
            if list {
                all.iter()
                    .filter(|c| c.name.starts_with(prefix))
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            }
        };
        match query {
            "base:" => wildcard("base:"),
            "qemu:" => wildcard("qemu:"),
            proto::CONTEXT_DIRTY_BITMAP_PREFIX => wildcard(proto::CONTEXT_DIRTY_BITMAP_PREFIX),
            q => all.iter().filter(|c| c.name == q).cloned().collect(),
        }
    }

    /// Transmission flags for a client in the given reply mode.
    pub(crate) fn transmission_flags(
        &self,
        structured: bool,
        extended: bool,
        max_connections: u32,
    ) -> u16 {
        use proto::*;
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
        if self.cfg.writable {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        } else {
            f |= TFLAG_READ_ONLY;
        }
        if self.cfg.multi_conn && max_connections != 1 {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        if structured {
            f |= TFLAG_SEND_DF;
        }
        if extended {
            f |= TFLAG_BLOCK_STAT_PAYLOAD;
        }
        f
    }
}

/// Counts a client as connected to an export for as long as it lives.
pub(crate) struct ClientGuard(Arc<Export>);

impl ClientGuard {
    pub(crate) fn new(export: Arc<Export>) -> Self {
        export.clients.fetch_add(1, Ordering::SeqCst);
        ClientGuard(export)
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The exports of one server, in the order they were added.
#[derive(Default)]
pub(crate) struct ExportSet {
    list: RwLock<Vec<Arc<Export>>>,
}

impl ExportSet {
    pub(crate) fn add(&self, cfg: ExportConfig, server_cancel: &CancellationToken) -> Result<()> {
        if cfg.name.len() > proto::MAX_STRING {
            return Err(Error::invalid(format!(
                "export name '{}' too long",
                cfg.name
            )));
        }
        if let Some(d) = cfg
            .description
            .as_ref()
            .filter(|d| d.len() > proto::MAX_STRING)
        {
            return Err(Error::invalid(format!("description '{d}' too long")));
        }
        if cfg.writable && cfg.node.read_only() {
            return Err(Error::invalid("Cannot export read-only node as writable"));
        }
        let mut list = self.list.write();
        if list.iter().any(|e| e.cfg.name == cfg.name) {
            return Err(Error::invalid(format!(
                "NBD server already has export named '{}'",
                cfg.name
            )));
        }
        list.push(Arc::new(Export {
            cfg,
            cancel: server_cancel.child_token(),
            clients: AtomicUsize::new(0),
        }));
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str, hard: bool) -> Result<()> {
        let mut list = self.list.write();
        let Some(i) = list.iter().position(|e| e.cfg.name == name) else {
            return Err(Error::new(
                strata_core::ErrorKind::NotFound,
                format!("Export '{name}' is not found"),
            ));
        };
        if !hard && list[i].clients.load(Ordering::SeqCst) > 0 {
            return Err(Error::invalid(format!("export '{name}' still in use")));
        }
        let e = list.remove(i);
        e.cancel.cancel();
        Ok(())
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.list
            .read()
            .iter()
            .find(|e| e.cfg.name == name)
            .cloned()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        self.list.read().clone()
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.list
            .read()
            .iter()
            .map(|e| e.cfg.name.clone())
            .collect()
    }

    pub(crate) fn clear(&self) {
        for e in self.list.write().drain(..) {
            e.cancel.cancel();
        }
    }
}
