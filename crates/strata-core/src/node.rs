//! The [`BlockNode`] trait: what every format driver, protocol and filter offers the layers
//! above it, and the block-status answer that says where a range of guest data lives.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::{BitmapSet, DebugEvent, Error, IoBuf, Result};

/// A boxed, sendable future returning a Strata [`Result`]; the object-safe form of an
/// `async fn` in [`BlockNode`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A shared handle to a node.
pub type NodeRef = Arc<dyn BlockNode>;

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the write completes.
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (a hole or zero cluster) rather than written.
    pub may_unmap: bool,
    /// Fail with `Unsupported` rather than fall back to writing zero buffers (NBD FAST_ZERO).
    pub no_fallback: bool,
}

/// Preallocation mode for create and resize (QEMU's `PreallocMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prealloc {
    /// Allocate nothing up front.
    #[default]
    Off,
    /// Allocate metadata only (format drivers).
    Metadata,
    /// Reserve space with `fallocate`.
    Falloc,
    /// Write zeroes to every byte.
    Full,
}

impl Prealloc {
    /// Parse QEMU's spelling (`off`, `metadata`, `falloc`, `full`).
    pub fn parse(s: &str) -> Option<Prealloc> {
        Some(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return None,
        })
    }

    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// How one layer stores the start of a range (QEMU's `BDRV_BLOCK_*` flags, as a struct).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStatus {
    /// This layer decides the content; otherwise reads fall through to the backing node.
    pub allocated: bool,
    /// Data is stored (not known to read as zero).
    pub data: bool,
    /// Reads are known to return zeroes.
    pub zero: bool,
    /// Stored compressed; there is no linear host offset.
    pub compressed: bool,
    /// Where the bytes live, as an offset into `host_node` (QEMU's `OFFSET_VALID`).
    pub host_offset: Option<u64>,
    /// The answer is coarse: ask `host_node` at `host_offset` too, as it may know that parts
    /// of the data read as zeroes (QEMU's `BDRV_BLOCK_RECURSE`, set by qcow2 on images with
    /// metadata preallocation). `strata_graph`'s status walk resolves and clears it.
    pub recurse: bool,
}

/// The answer to "how is `[offset, offset + len)` stored?": the first run of bytes that
/// share one [`BlockStatus`].
#[derive(Debug, Clone)]
pub struct Extent {
    /// Length of the run, at least 1 byte and at most the length asked for.
    pub len: u64,
    /// How the run is stored.
    pub status: BlockStatus,
    /// The node `status.host_offset` points into (the protocol node under a format).
    pub host_node: Option<NodeRef>,
}

impl Extent {
    /// A run that this layer does not allocate (reads go to the backing node).
    pub fn unallocated(len: u64) -> Extent {
        Extent {
            len,
            status: BlockStatus::default(),
            host_node: None,
        }
    }
}

/// A node of the block graph: a protocol (file, nbd, null), a format (raw, qcow2) or a filter.
///
/// All data methods take owned buffers and return them when done, so a request can outlive
/// a dropped caller safely. Offsets and lengths are bytes; requests must lie within
/// [`BlockNode::size`], which drivers check.
pub trait BlockNode: Send + Sync + fmt::Debug + Any {
    /// Driver name as QEMU spells it (`file`, `raw`, `qcow2`, `null-co`, ...).
    fn driver(&self) -> &'static str;

    /// The filename shown by `info` and `map` (the protocol file under a format).
    fn filename(&self) -> String;

    /// Guest-visible size in bytes.
    fn size(&self) -> u64;

    /// Whether writes are refused.
    fn read_only(&self) -> bool;

    /// The smallest unit this node can address without read-modify-write.
    fn request_alignment(&self) -> u64 {
        1
    }

    /// Read `buf.len()` bytes at `offset`, the guest view (backing data included).
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf>;

    /// Write `buf` at `offset`.
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf>;

    /// Make `[offset, offset + len)` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()>;

    /// Hint that `[offset, offset + len)` is unused; its content becomes unspecified. What it
    /// then reads as is the format's choice, as in QEMU (qcow2 v3 reads zeroes, v2 falls
    /// through to the backing node).
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()>;

    /// Make every completed write durable.
    fn flush(&self) -> BoxFuture<'_, ()>;

    /// How this layer stores the start of `[offset, offset + len)` (see [`Extent`]).
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent>;

    /// Grow or shrink to `size` bytes.
    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()>;

    /// The backing node, for formats that have one.
    fn backing(&self) -> Option<NodeRef> {
        None
    }

    /// The child this node stores its bytes in (a format's protocol node).
    fn file(&self) -> Option<NodeRef> {
        None
    }

    /// Replace the backing link at runtime (stream, commit and snapshots change chains while
    /// the node is in use). Only formats with backing files support it.
    fn set_backing_link(&self, backing: Option<NodeRef>) -> Result<()> {
        let _ = backing;
        Err(Error::unsupported(format!(
            "Driver '{}' does not support backing files",
            self.driver()
        )))
    }

    /// A format driver announces `event` on its `file` child (QEMU's `BLKDBG_EVENT`); filters
    /// and links forward it downwards, a `blkdebug` node arms its rules on it.
    fn debug_event(&self, event: DebugEvent) {
        let _ = event;
    }

    /// Bytes the node occupies on the host (`disk size` / `actual-size`), if known.
    fn allocated_size(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async { Ok(None) })
    }

    /// Flush and leave the image clean on disk (clear dirty bits, store bitmaps). Called once
    /// when the last user is done; the node must not be written afterwards.
    fn close(&self) -> BoxFuture<'_, ()> {
        self.flush()
    }

    /// The node's live dirty bitmaps, for drivers that own them (qcow2 loads and stores its
    /// persistent ones); `None` means the graph layer keeps the node's set.
    fn dirty_bitmaps(&self) -> Option<Arc<BitmapSet>> {
        None
    }

    /// Whether a new persistent bitmap `name` of `granularity` could be stored in this node
    /// (QEMU's `bdrv_can_store_new_dirty_bitmap`); `node_name` is the node's graph name,
    /// which QEMU's messages include. The default is QEMU's answer for drivers without
    /// persistent bitmaps.
    fn check_bitmap_storable(&self, node_name: &str, name: &str, granularity: u64) -> Result<()> {
        let _ = (name, granularity);
        Err(Error::unsupported(format!(
            "Can't store persistent bitmaps to {node_name}: Operation not supported"
        )))
    }

    /// Delete the stored copy of persistent bitmap `name` at once (the live bitmap is the
    /// caller's to release). Nothing to do for drivers that store none.
    fn remove_stored_bitmap(&self, name: &str) -> BoxFuture<'_, ()> {
        let _ = name;
        Box::pin(async { Ok(()) })
    }

    /// For downcasting to a concrete driver (e.g. qcow2 for `check` and `info`).
    /// Whether an overlay may remember where this node keeps its data (its block-status
    /// answers, down to the host node) and read the host node directly. A node that says
    /// yes announces every later change of that mapping (allocation, zeroing, discard, a
    /// new backing link, resize, snapshot revert) with [`bump_mapping_epoch`]. Formats
    /// whose mapping is their own say yes; filters say no, so reads still pass through them.
    fn offer_mapping_cache(&self) -> bool {
        false
    }

    fn as_any(&self) -> &dyn Any;
}

/// Bumped whenever a node that offered its mapping to overlays changes it (see
/// [`BlockNode::offer_mapping_cache`]); a remembered mapping is good while this is unchanged.
static MAPPING_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The current mapping epoch.
pub fn mapping_epoch() -> u64 {
    MAPPING_EPOCH.load(std::sync::atomic::Ordering::SeqCst)
}

/// Invalidate every remembered mapping.
pub fn bump_mapping_epoch() {
    MAPPING_EPOCH.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}
