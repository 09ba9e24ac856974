//! [`GraphNode`]: a named node of the graph as its parents see it — the driver behind a
//! [`Link`] (so `blockdev-reopen` can swap in a reopened driver while I/O is drained), with
//! the generic per-node work QEMU does in `block/io.c`: I/O accounting, marking the dirty
//! bitmaps of drivers that do not keep their own, the `discard` policy and `detect-zeroes`.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use strata_core::bitmap::BitmapSet;
use strata_core::{
    BlockNode, BoxFuture, DebugEvent, Extent, IoBuf, NodeRef, Prealloc, Result, WriteFlags,
    ZeroFlags,
};

use crate::link::Link;
use crate::stats::{IoKind, IoStats};

/// A named node: what links and exports point at.
#[derive(Debug)]
pub struct GraphNode {
    name: String,
    driver: Arc<Link>,
    stats: IoStats,
    /// Bitmaps for drivers without a registry of their own (qcow2 keeps and persists its).
    own_bitmaps: Arc<BitmapSet>,
    /// `block-set-write-threshold` (0 = none) and who hears of the first write past it.
    write_threshold: AtomicU64,
    threshold_cb: parking_lot::Mutex<ThresholdHook>,
    /// `blockdev-set-active`: an inactive node refuses writes.
    inactive: AtomicBool,
    /// `discard=unmap` (QEMU's `BDRV_O_UNMAP`): without it discards succeed doing nothing
    /// and zero writes may not unmap.
    unmap: AtomicBool,
    /// `detect-zeroes` as a [`DetectZeroes`] discriminant.
    detect_zeroes: AtomicU8,
    /// Discards that reached the driver: succeeded, failed, bytes succeeded (the
    /// `driver-specific` block statistics of QEMU's file driver).
    driver_discards: [AtomicU64; 3],
}

/// `detect-zeroes`: whether a write of all-zero data becomes a zero write (that may unmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DetectZeroes {
    Off = 0,
    On = 1,
    Unmap = 2,
}

impl DetectZeroes {
    /// The QAPI name (`off`, `on`, `unmap`) to the mode; `None` for anything else.
    pub fn parse(s: &str) -> Option<DetectZeroes> {
        match s {
            "off" => Some(DetectZeroes::Off),
            "on" => Some(DetectZeroes::On),
            "unmap" => Some(DetectZeroes::Unmap),
            _ => None,
        }
    }

    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }

    fn from_u8(v: u8) -> DetectZeroes {
        match v {
            1 => DetectZeroes::On,
            2 => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        }
    }
}

/// Called once when a write ends past the threshold: (node name, bytes past it, threshold).
pub type ThresholdCallback = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// The armed callback (a newtype for `Debug`).
#[derive(Default)]
struct ThresholdHook(Option<ThresholdCallback>);

impl std::fmt::Debug for ThresholdHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "armed" } else { "none" })
    }
}

impl GraphNode {
    /// Wrap `driver` as the node called `name`.
    pub fn new(name: &str, driver: NodeRef) -> Arc<GraphNode> {
        let own_bitmaps = Arc::new(BitmapSet::new(driver.size()));
        Arc::new(GraphNode {
            name: name.to_string(),
            driver: Link::new(driver),
            stats: IoStats::default(),
            own_bitmaps,
            write_threshold: AtomicU64::new(0),
            threshold_cb: parking_lot::Mutex::new(ThresholdHook(None)),
            inactive: AtomicBool::new(false),
            unmap: AtomicBool::new(true),
            detect_zeroes: AtomicU8::new(DetectZeroes::Off as u8),
            driver_discards: Default::default(),
        })
    }

    /// Set the `discard` policy (`unmap`: pass discards and unmapping zero writes on) and
    /// the `detect-zeroes` mode.
    pub fn set_write_policy(&self, unmap: bool, detect_zeroes: DetectZeroes) {
        self.unmap.store(unmap, Ordering::Relaxed);
        self.detect_zeroes
            .store(detect_zeroes as u8, Ordering::Relaxed);
    }

    /// Whether discards reach the driver (`discard=unmap`).
    pub fn unmaps(&self) -> bool {
        self.unmap.load(Ordering::Relaxed)
    }

    /// Discards that reached the driver: (succeeded, failed, bytes succeeded).
    pub fn driver_discards(&self) -> (u64, u64, u64) {
        let [ok, failed, bytes] = &self.driver_discards;
        (
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed),
        )
    }

    /// The `detect-zeroes` mode.
    pub fn detect_zeroes(&self) -> DetectZeroes {
        DetectZeroes::from_u8(self.detect_zeroes.load(Ordering::Relaxed))
    }

    /// Arm (or with 0, disarm) the write threshold.
    pub fn set_write_threshold(&self, offset: u64, cb: Option<ThresholdCallback>) {
        *self.threshold_cb.lock() = ThresholdHook(cb);
        self.write_threshold.store(offset, Ordering::SeqCst);
    }

    /// The armed write threshold (0 = none).
    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.load(Ordering::SeqCst)
    }

    /// Mark the node active or inactive.
    pub fn set_active(&self, active: bool) {
        self.inactive.store(!active, Ordering::SeqCst);
    }

    /// Whether the node is active.
    pub fn is_active(&self) -> bool {
        !self.inactive.load(Ordering::SeqCst)
    }

    /// Before a write of `[offset, offset + len)`: refuse it on an inactive node, and fire
    /// the one-shot threshold (QEMU's `bdrv_write_threshold_check_write`).
    fn pre_write(&self, offset: u64, len: u64) -> Result<()> {
        if !self.is_active() {
            return Err(strata_core::Error::from_errno(
                libc::EPERM,
                "Operation not permitted",
            ));
        }
        let end = offset + len;
        loop {
            let wtr = self.write_threshold.load(Ordering::SeqCst);
            if wtr == 0 || wtr >= end {
                return Ok(());
            }
            if self
                .write_threshold
                .compare_exchange(wtr, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                if let Some(cb) = self.threshold_cb.lock().0.take() {
                    cb(&self.name, end - wtr, wtr);
                }
                return Ok(());
            }
        }
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver instance behind the node (for downcasting and graph bookkeeping).
    pub fn inner(&self) -> NodeRef {
        self.driver.target()
    }

    /// Swap in a reopened driver once in-flight requests are done.
    pub async fn replace_driver(&self, driver: NodeRef) {
        self.driver.retarget(driver).await
    }

    /// The link to the driver, to hold a drained section across several steps.
    pub fn driver_link(&self) -> &Link {
        &self.driver
    }

    /// The node's live dirty bitmaps: the driver's registry, or the node's own.
    pub fn bitmaps(&self) -> Arc<BitmapSet> {
        self.inner()
            .dirty_bitmaps()
            .unwrap_or_else(|| self.own_bitmaps.clone())
    }

    /// Mark `[offset, offset + len)` in the node's own bitmaps (drivers with a registry of
    /// their own mark it themselves).
    fn mark(&self, offset: u64, len: u64) {
        if !self.own_bitmaps.is_empty() && self.inner().dirty_bitmaps().is_none() {
            self.own_bitmaps.mark(offset, len);
        }
    }

    /// The node's I/O accounting.
    pub fn stats(&self) -> &IoStats {
        &self.stats
    }
}

/// Account a request of `bytes` at `offset` once `$fut` finishes.
macro_rules! accounted {
    ($self:ident, $kind:expr, $offset:expr, $bytes:expr, $fut:expr) => {
        Box::pin(async move {
            let start = Instant::now();
            let r = $fut.await;
            $self
                .stats
                .account($kind, $offset, $bytes, start.elapsed(), r.is_ok());
            r
        })
    };
}

impl BlockNode for GraphNode {
    fn driver(&self) -> &'static str {
        self.driver.driver()
    }

    fn filename(&self) -> String {
        self.driver.filename()
    }

    fn size(&self) -> u64 {
        self.driver.size()
    }

    fn read_only(&self) -> bool {
        self.driver.read_only()
    }

    fn request_alignment(&self) -> u64 {
        self.driver.request_alignment()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        let n = buf.len() as u64;
        accounted!(self, IoKind::Read, offset, n, self.driver.read(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        let n = buf.len() as u64;
        if let Err(e) = self.pre_write(offset, n) {
            return Box::pin(async move { Err(e) });
        }
        self.mark(offset, n);
        let detect = self.detect_zeroes();
        if detect != DetectZeroes::Off && n > 0 && buf.is_zero() {
            // As QEMU's `bdrv_aligned_pwritev`: all-zero data goes as a zero write.
            let zf = ZeroFlags {
                may_unmap: detect == DetectZeroes::Unmap && self.unmaps(),
                no_fallback: false,
            };
            return accounted!(self, IoKind::Write, offset, n, async move {
                self.driver.write_zeroes(offset, n, zf).await.map(|()| buf)
            });
        }
        accounted!(
            self,
            IoKind::Write,
            offset,
            n,
            self.driver.write(offset, buf, flags)
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        if let Err(e) = self.pre_write(offset, len) {
            return Box::pin(async move { Err(e) });
        }
        self.mark(offset, len);
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.unmaps(),
            ..flags
        };
        accounted!(
            self,
            IoKind::Write,
            offset,
            len,
            self.driver.write_zeroes(offset, len, flags)
        )
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        if !self.unmaps() {
            // `discard=ignore`: done, and nothing changed (QEMU's `bdrv_co_pdiscard`).
            return accounted!(self, IoKind::Discard, offset, len, async { Ok(()) });
        }
        self.mark(offset, len);
        accounted!(self, IoKind::Discard, offset, len, async move {
            let r = self.driver.discard(offset, len).await;
            let [ok, failed, bytes] = &self.driver_discards;
            if r.is_ok() {
                ok.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(len, Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            r
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        accounted!(self, IoKind::Flush, 0, 0, self.driver.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        self.driver.block_status(offset, len)
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.driver.truncate(size, prealloc).await?;
            self.own_bitmaps.resize(size);
            Ok(())
        })
    }

    fn dirty_bitmaps(&self) -> Option<Arc<BitmapSet>> {
        Some(self.bitmaps())
    }

    fn backing(&self) -> Option<NodeRef> {
        self.driver.backing()
    }

    fn offer_mapping_cache(&self) -> bool {
        self.driver.offer_mapping_cache()
    }

    fn file(&self) -> Option<NodeRef> {
        self.driver.file()
    }

    fn set_backing_link(&self, backing: Option<NodeRef>) -> Result<()> {
        self.driver.set_backing_link(backing)
    }

    fn debug_event(&self, event: DebugEvent) {
        self.driver.debug_event(event)
    }

    fn allocated_size(&self) -> BoxFuture<'_, Option<u64>> {
        self.driver.allocated_size()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.inner().close().await })
    }

    fn check_bitmap_storable(&self, node_name: &str, name: &str, granularity: u64) -> Result<()> {
        self.driver
            .check_bitmap_storable(node_name, name, granularity)
    }

    fn remove_stored_bitmap(&self, name: &str) -> BoxFuture<'_, ()> {
        let (node, name) = (self.inner(), name.to_string());
        Box::pin(async move { node.remove_stored_bitmap(&name).await })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
