//! [`Link`]: a parent's reference to a child node that the graph can re-point while I/O runs
//! (QEMU's `BdrvChild`, data path only). Every request holds the link's gate shared for its
//! whole life; re-pointing takes it exclusively, so it waits for in-flight requests to finish
//! and holds new ones back until the switch is done (a drained section). No request is lost,
//! and none straddles the switch, so nothing is reordered across a flush.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use parking_lot::RwLock;
use strata_core::{
    BlockNode, BoxFuture, DebugEvent, Extent, IoBuf, NodeRef, Prealloc, Result, WriteFlags,
    ZeroFlags,
};
use tokio::sync::{RwLock as Gate, RwLockWriteGuard};

/// A re-pointable, drainable edge to a child node.
pub struct Link {
    target: RwLock<NodeRef>,
    gate: Gate<()>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("target", &self.target.read().filename())
            .finish()
    }
}

/// While held, no request passes the link (see [`Link::drain`]).
pub type Drained<'a> = RwLockWriteGuard<'a, ()>;

impl Link {
    /// A link to `target`.
    pub fn new(target: NodeRef) -> Arc<Link> {
        Arc::new(Link {
            target: RwLock::new(target),
            gate: Gate::new(()),
        })
    }

    /// The node the link points at now.
    pub fn target(&self) -> NodeRef {
        self.target.read().clone()
    }

    /// Wait for in-flight requests to finish and hold new ones back until the guard drops.
    pub async fn drain(&self) -> Drained<'_> {
        self.gate.write().await
    }

    /// Point the link at `node` once in-flight requests are done.
    pub async fn retarget(&self, node: NodeRef) {
        let _drained = self.gate.write().await;
        *self.target.write() = node;
        // Overlays may have remembered mappings that went through this link.
        strata_core::node::bump_mapping_epoch();
    }

    /// Point the link at `node` inside a drained section the caller already holds.
    pub fn retarget_drained(&self, _drained: &Drained<'_>, node: NodeRef) {
        *self.target.write() = node;
        strata_core::node::bump_mapping_epoch();
    }

    /// Whether `node` is a link (used to look through links for the driver behind them).
    pub fn of(node: &NodeRef) -> Option<&Link> {
        node.as_any().downcast_ref::<Link>()
    }
}

/// Run `$call` on the current target while holding the gate shared.
macro_rules! through {
    ($self:ident, |$t:ident| $call:expr) => {
        Box::pin(async move {
            let _pass = $self.gate.read().await;
            let $t = $self.target();
            $call.await
        })
    };
}

impl BlockNode for Link {
    fn driver(&self) -> &'static str {
        self.target.read().driver()
    }

    fn filename(&self) -> String {
        self.target.read().filename()
    }

    fn size(&self) -> u64 {
        self.target.read().size()
    }

    fn read_only(&self) -> bool {
        self.target.read().read_only()
    }

    fn request_alignment(&self) -> u64 {
        self.target.read().request_alignment()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        through!(self, |t| t.read(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        through!(self, |t| t.write(offset, buf, flags))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        through!(self, |t| t.write_zeroes(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        through!(self, |t| t.discard(offset, len))
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        through!(self, |t| t.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        through!(self, |t| t.block_status(offset, len))
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        through!(self, |t| t.truncate(size, prealloc))
    }

    fn backing(&self) -> Option<NodeRef> {
        self.target().backing()
    }

    fn offer_mapping_cache(&self) -> bool {
        self.target().offer_mapping_cache()
    }

    fn file(&self) -> Option<NodeRef> {
        self.target().file()
    }

    fn set_backing_link(&self, backing: Option<NodeRef>) -> Result<()> {
        self.target().set_backing_link(backing)
    }

    fn debug_event(&self, event: DebugEvent) {
        self.target().debug_event(event)
    }

    fn dirty_bitmaps(&self) -> Option<Arc<strata_core::bitmap::BitmapSet>> {
        self.target().dirty_bitmaps()
    }

    fn allocated_size(&self) -> BoxFuture<'_, Option<u64>> {
        through!(self, |t| t.allocated_size())
    }

    // Closing is the graph's business (a node may have several parents); a link never
    // closes what it points at.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn check_bitmap_storable(&self, node_name: &str, name: &str, granularity: u64) -> Result<()> {
        self.target()
            .check_bitmap_storable(node_name, name, granularity)
    }

    fn remove_stored_bitmap(&self, name: &str) -> BoxFuture<'_, ()> {
        let (node, name) = (self.target(), name.to_string());
        Box::pin(async move { node.remove_stored_bitmap(&name).await })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The driver behind any number of links and graph nodes, for downcasting to a concrete
/// driver type.
pub fn driver_of(node: &NodeRef) -> NodeRef {
    let mut n = node.clone();
    loop {
        if let Some(l) = Link::of(&n) {
            n = l.target();
        } else if let Some(g) = n.as_any().downcast_ref::<crate::node::GraphNode>() {
            n = g.inner();
        } else {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use strata_core::mem::MemNode;

    fn mem(size: u64) -> NodeRef {
        Arc::new(MemNode::with_data(vec![0; size as usize]))
    }

    #[tokio::test]
    async fn retarget_waits_for_in_flight_and_switches() {
        let a = mem(1 << 20);
        let b = mem(1 << 20);
        let link = Link::new(a.clone());
        let mut buf = IoBuf::zeroed(4096);
        buf.fill(0xaa);
        link.write(0, buf, WriteFlags::default()).await.unwrap();
        link.retarget(b.clone()).await;
        let mut buf = IoBuf::zeroed(4096);
        buf.fill(0xbb);
        link.write(0, buf, WriteFlags::default()).await.unwrap();
        let r = a.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(r.iter().all(|x| *x == 0xaa));
        let r = b.read(0, IoBuf::zeroed(4096)).await.unwrap();
        assert!(r.iter().all(|x| *x == 0xbb));
    }

    #[tokio::test]
    async fn drained_section_holds_new_requests_back() {
        let link = Link::new(mem(1 << 20));
        let guard = link.drain().await;
        let l2 = link.clone();
        let req = tokio::spawn(async move { l2.read(0, IoBuf::zeroed(512)).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!req.is_finished());
        drop(guard);
        req.await.unwrap().unwrap();
    }
}
