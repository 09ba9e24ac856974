//! The `Qcow2` node: opening an image, its public API, and the [`BlockNode`] implementation
//! (the request paths themselves are in `io.rs`, resize in `resize.rs`).

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use strata_core::{
    BlockNode, BoxFuture, Error, ErrorKind, Extent, IoBuf, NodeRef, Prealloc, Result, WriteFlags,
    ZeroFlags,
};
use tokio::sync::{Mutex, Notify, watch};

use crate::cache::TableCache;
use crate::entry::EntryFormat;
use crate::header::{CompressionType, MAX_L1_SIZE_BYTES};
use crate::header::{Header, MAX_CLUSTER_BITS, V3_MIN_HEADER_LENGTH, autoclear, crypt};
use crate::meta::Meta;
use crate::refcount;
use crate::snapshot::{self, BitmapInfo, SnapshotInfo};

/// QEMU's default maximum L2 cache (`DEFAULT_L2_CACHE_MAX_SIZE`, 32 MiB on Linux).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;

/// Options for [`Qcow2::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// L2 cache size in bytes (QEMU's `l2-cache-size`); default: enough for the whole disk,
    /// at most 32 MiB.
    pub l2_cache_size: Option<u64>,
    /// Refcount block cache size in bytes (`refcount-cache-size`); default: a quarter of the
    /// L2 cache, at least 4 clusters.
    pub refcount_cache_size: Option<u64>,
}

/// What `qemu-img info` shows under "Format specific information".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatInfo {
    /// `"1.1"` (v3) or `"0.10"` (v2).
    pub compat: String,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The corrupt bit is set.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// External data file name, if any.
    pub data_file: Option<String>,
    /// The external data file is a consistent raw image.
    pub data_file_raw: bool,
    /// Persistent bitmaps.
    pub bitmaps: Vec<BitmapInfo>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

/// Data requests in flight, by epoch (see `meta::PendingFree`).
#[derive(Debug, Default)]
pub(crate) struct IoTracker {
    epoch: u64,
    active: BTreeMap<u64, usize>,
}

/// Registration of a data request; dropping it ends the registration.
#[derive(Debug)]
pub(crate) struct IoGuard<'a> {
    tracker: &'a StdMutex<IoTracker>,
    epoch: u64,
}

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.tracker.lock().unwrap();
        if let Some(n) = t.active.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                t.active.remove(&self.epoch);
            }
        }
    }
}

/// Guest clusters being allocated by a write that has not updated L2 yet.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    next_id: u64,
    list: Vec<(u64, u64, u64, watch::Sender<()>)>,
}

/// Reservation of guest clusters `[first, end)`; dropping it wakes waiters.
#[derive(Debug)]
pub(crate) struct AllocGuard<'a> {
    inflight: &'a StdMutex<Inflight>,
    id: u64,
}

impl Drop for AllocGuard<'_> {
    fn drop(&mut self) {
        self.inflight
            .lock()
            .unwrap()
            .list
            .retain(|(id, ..)| *id != self.id);
    }
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    pub(crate) file: NodeRef,
    pub(crate) data_file: Option<NodeRef>,
    /// Swappable: live graph changes (stream, commit, snapshots) relink the chain.
    pub(crate) backing: std::sync::RwLock<Option<NodeRef>>,
    pub(crate) read_only: bool,
    pub(crate) fmt: EntryFormat,
    pub(crate) cs: u64,
    pub(crate) compression: CompressionType,
    pub(crate) size: AtomicU64,
    pub(crate) meta: Mutex<Meta>,
    pub(crate) io: StdMutex<IoTracker>,
    pub(crate) inflight: StdMutex<Inflight>,
    /// Set once a metadata check failed during a write: further writes fail.
    pub(crate) broken: AtomicBool,
    /// Internal snapshots (changed by the snapshot operations).
    pub(crate) snapshots: StdMutex<Vec<SnapshotInfo>>,
    /// Persistent dirty bitmaps (see `bitmap`).
    pub(crate) bitmaps: crate::bitmap::Bitmaps,
    pub(crate) published: Arc<StdMutex<Header>>,
    /// Ourselves, so a request can run as its own task (see [`Qcow2::settled`]).
    pub(crate) me: Weak<Qcow2>,
    /// Requests running as their own tasks, and a wake-up for [`Qcow2::settle_writes`].
    pub(crate) settling: (AtomicUsize, Notify),
    /// Whether the image looks metadata-preallocated (see `metadata_prealloc`).
    pub(crate) metadata_prealloc: crate::metadata_prealloc::Detection,
    /// Where reads below this image land (see `chain_cache`).
    pub(crate) chain_cache: StdMutex<crate::chain_cache::ChainCache>,
    /// An overlay caches our mapping: announce its changes (shared with `Meta`).
    pub(crate) mapping_watched: Arc<AtomicBool>,
    /// Whether this session moved the image's generation yet (see `identity`).
    pub(crate) generation: crate::identity::SessionGeneration,
}

/// Read and parse the header of a qcow2 image (so a chain opener can learn the backing
/// file, its format and the data file before opening).
pub async fn read_header(file: &NodeRef) -> Result<Header> {
    let head = file
        .read(0, IoBuf::zeroed(V3_MIN_HEADER_LENGTH as usize))
        .await?;
    let bits = u32::from_be_bytes(head[20..24].try_into().unwrap());
    let len = if (9..=MAX_CLUSTER_BITS).contains(&bits) {
        1usize << bits
    } else {
        V3_MIN_HEADER_LENGTH as usize
    };
    let first = file.read(0, IoBuf::zeroed(len)).await?;
    Header::parse(&first)
}

impl Qcow2 {
    /// Open an image stored in `file`, with its backing node (if the image has a backing file
    /// and the caller opened it) and external data file node.
    pub async fn open(
        file: NodeRef,
        opts: &OpenOptions,
        backing: Option<NodeRef>,
        data_file: Option<NodeRef>,
    ) -> Result<Arc<Qcow2>> {
        let mut h = read_header(&file).await?;
        let read_only = opts.read_only || file.read_only();
        if h.crypt_method != crypt::NONE {
            return Err(Error::unsupported(
                "Encrypted qcow2 images are not supported",
            ));
        }
        if h.is_corrupt() && !read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        if h.is_dirty() && !read_only {
            // Lazy refcounts were in use and the image was not closed cleanly: rebuild the
            // refcounts before writing, as QEMU does on a read-write open.
            crate::check::repair_dirty(&file).await?;
            h = read_header(&file).await?;
        } else if h.autoclear_features & autoclear::STRATA_SESSION_OPEN != 0 && !read_only {
            // The last Strata session that wrote here was killed: free what it allocated
            // and never referenced. The bit is cleared at this session's clean close.
            crate::check::repair_leaks(&file).await?;
            h = read_header(&file).await?;
        }
        if let Some(b) = &backing {
            // An overlay that recorded its backing file refuses one that changed since.
            crate::identity::check_at_open(&h, &file.filename(), &**b)?;
        }
        if h.has_data_file() && data_file.is_none() {
            return Err(Error::invalid("'data-file' is required for this image"));
        }
        if !h.has_data_file() && data_file.is_some() {
            return Err(Error::invalid(
                "'data-file' can only be set for images with an external data file",
            ));
        }
        if let Some(df) = &data_file
            && !read_only
            && df.read_only()
        {
            return Err(Error::new(ErrorKind::ReadOnly, "data file is read-only"));
        }
        let cs = h.cluster_size();
        let fmt = EntryFormat {
            cluster_bits: h.cluster_bits,
            extended_l2: h.extended_l2(),
            external_data_file: h.has_data_file(),
        };
        let l1_bytes = u64::from(h.l1_size) * 8;
        debug_assert!(l1_bytes <= MAX_L1_SIZE_BYTES);
        let l1 = read_u64s(&*file, h.l1_table_offset, l1_bytes).await?;
        // A read-only image rarely looks at its refcounts (a reopen read-write opens anew):
        // leaving the table on disk until then keeps each backing file of a deep chain at a
        // few KiB.
        let rt = if read_only {
            Vec::new()
        } else {
            file.debug_event(strata_core::DebugEvent::ReftableLoad);
            read_u64s(
                &*file,
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            )
            .await?
        };
        let snapshots = snapshot::read_snapshots(&*file, &h).await?;

        let l2_needed = h.l1_entries_for_size(h.size).max(1) * cs;
        let l2_bytes = opts
            .l2_cache_size
            .unwrap_or_else(|| l2_needed.min(DEFAULT_L2_CACHE_MAX));
        let l2_tables = (l2_bytes / cs).max(2) as usize;
        let rb_tables = opts
            .refcount_cache_size
            .map_or(l2_tables / 4, |b| (b / cs) as usize)
            .max(4);

        let mut snapshot_l1s: Vec<(u64, u64)> = snapshots
            .iter()
            .map(|s| (s.l1_table_offset, u64::from(s.l1_size) * 8))
            .collect();
        snapshot_l1s.retain(|&(_, l)| l > 0);
        let snapshot_table = (
            h.snapshots_offset,
            snapshot::snapshot_table_size(&h, &snapshots),
        );
        let rc_bits = h.refcount_bits();
        let file_end = file.size().next_multiple_of(cs);
        if !read_only {
            // Tables we may write back must lie inside the file (a hostile offset would
            // otherwise grow it to petabytes).
            for (name, off, len) in [
                ("Active L1 table", h.l1_table_offset, l1_bytes),
                (
                    "Reference count table",
                    h.refcount_table_offset,
                    u64::from(h.refcount_table_clusters) * cs,
                ),
            ] {
                if len > 0 && off.saturating_add(len) > file_end {
                    return Err(Error::corrupt(format!(
                        "{name} is past the end of the image file"
                    )));
                }
            }
        }
        let mut meta = Meta {
            file: file.clone(),
            fmt,
            cs,
            l1,
            l2: TableCache::new(l2_tables),
            rt_deferred: read_only && h.refcount_table_clusters > 0,
            rt,
            rb: TableCache::new(rb_tables),
            rb_entries: refcount::entries_per_block(cs, rc_bits),
            rc_bits,
            free_hint: 0,
            pending: Vec::new(),
            file_end,
            incr_unsynced: false,
            lazy: false,
            read_only,
            snapshot_l1s,
            snapshot_table,
            bitmap_areas: Vec::new(),
            free_byte_offset: 0,
            published: Arc::new(StdMutex::new(h.clone())),
            mapping_watched: Arc::new(AtomicBool::new(false)),
            h,
        };
        if !read_only && meta.h.autoclear_features & !autoclear::MASK != 0 {
            // Unknown auto-clear features: we may write only after clearing them.
            meta.h.autoclear_features &= autoclear::MASK;
            meta.write_header().await?;
            meta.sync().await?;
        }
        // Loads the bitmaps and marks them in-use before any write (sets `bitmap_areas`).
        let bitmaps = crate::bitmap::Bitmaps::open(&mut meta).await?;
        let size = meta.h.size;
        let published = meta.published.clone();
        let mapping_watched = meta.mapping_watched.clone();
        Ok(Arc::new_cyclic(|me| Qcow2 {
            me: me.clone(),
            settling: (AtomicUsize::new(0), Notify::new()),
            published,
            file,
            data_file,
            backing: std::sync::RwLock::new(backing),
            read_only,
            fmt,
            cs,
            compression: meta.h.compression_type,
            size: AtomicU64::new(size),
            meta: Mutex::new(meta),
            io: StdMutex::new(IoTracker::default()),
            inflight: StdMutex::new(Inflight::default()),
            broken: AtomicBool::new(false),
            snapshots: StdMutex::new(snapshots),
            bitmaps,
            metadata_prealloc: Default::default(),
            chain_cache: StdMutex::default(),
            mapping_watched,
            generation: Default::default(),
        }))
    }

    /// Run a modifying request to completion even if the caller drops its future.
    ///
    /// Once a write has looked up or allocated its host clusters, stopping it half way is
    /// unsafe: the engine may still be writing the data after the request's registration
    /// (epoch) ended, so a concurrent discard plus flush could free the cluster and another
    /// write reuse it before the stale data lands; allocations would leak; a metadata update
    /// could stop between two dependent writes. So the request runs as its own task, owning
    /// a reference to the node; the caller only waits for it (imago's "settle" idea). Without
    /// a runtime (not the case in practice) it runs inline.
    pub(crate) async fn settled<T, F>(&self, request: impl FnOnce(Arc<Qcow2>) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let Some(me) = self.me.upgrade() else {
            return Err(Error::new(
                ErrorKind::Io(libc::EIO),
                "image is being closed",
            ));
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return request(me).await;
        };
        /// Ends the registration when the task finishes (or unwinds).
        struct Settling(Arc<Qcow2>);
        impl Drop for Settling {
            fn drop(&mut self) {
                if self.0.settling.0.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.0.settling.1.notify_waiters();
                }
            }
        }
        self.settling.0.fetch_add(1, Ordering::AcqRel);
        let reg = Settling(me.clone());
        let fut = request(me);
        let task = rt.spawn(async move {
            let _reg = reg;
            fut.await
        });
        match task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::new(
                ErrorKind::Io(libc::EIO),
                format!("request task failed: {e}"),
            )),
        }
    }

    /// The current backing node.
    pub(crate) fn backing_node(&self) -> Option<NodeRef> {
        self.backing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Wait until every request started through [`Qcow2::settled`] has finished, including
    /// those whose callers went away (QEMU drains a node before closing it).
    pub async fn settle_writes(&self) {
        loop {
            let woken = self.settling.1.notified();
            if self.settling.0.load(Ordering::Acquire) == 0 {
                return;
            }
            woken.await;
        }
    }

    /// A copy of the header as last written.
    pub fn header(&self) -> Header {
        self.published.lock().unwrap().clone()
    }

    /// Format-specific information for `info`.
    pub fn format_info(&self) -> FormatInfo {
        let h = self.header();
        FormatInfo {
            compat: h.compat_str().to_string(),
            compression_type: h.compression_type,
            lazy_refcounts: h.lazy_refcounts(),
            refcount_bits: h.refcount_bits(),
            corrupt: h.is_corrupt(),
            extended_l2: h.extended_l2(),
            data_file: h.data_file.clone(),
            data_file_raw: h.data_file_raw(),
            bitmaps: self.bitmaps.disk_info(),
            snapshots: self.snapshots.lock().unwrap().clone(),
        }
    }

    /// Rewrite the backing file name and format in the header (what `rebase -u` and commit
    /// need). `None` removes the backing file.
    pub async fn set_backing(&self, file: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        // The L2 entries of data copied in (stream, safe rebase) go to disk before a header
        // that stops the backing file from showing through: a kill in between would
        // otherwise read holes where that data was.
        self.do_flush().await?;
        let mut m = self.meta.lock().await;
        if file.is_some() && m.h.data_file_raw() {
            return Err(Error::invalid(
                "Cannot set a backing file on an image with a raw external data file",
            ));
        }
        if let Some(f) = format
            && f.len() >= 16
        {
            return Err(Error::invalid(format!("Backing format name too long: {f}")));
        }
        let mut h = m.h.clone();
        h.backing_file = file.map(str::to_string);
        h.backing_format = file.and(format).map(str::to_string);
        // Remember the new backing file as it is now (see `identity`); a record that does
        // not fit is left out rather than failing the change.
        let record = file.and_then(|f| crate::identity::record_for(&self.filename(), f, format));
        crate::identity::put_record(&mut h, record);
        if record.is_some() && h.serialize(m.cs).is_err() {
            crate::identity::put_record(&mut h, None);
        }
        // Fails (without writing) if the result does not fit in the first cluster.
        let bytes = h.serialize(m.cs)?;
        m.write_at(0, &bytes).await?;
        m.sync().await?;
        m.h = Header::parse(&bytes)?;
        m.publish();
        Ok(())
    }

    /// Record the current backing file (as named in the header) as it is now, so later opens
    /// accept it (see `identity`): after `create -b`, or after a commit into it.
    pub async fn record_backing(&self) -> Result<()> {
        let (file, format) = {
            let m = self.meta.lock().await;
            (m.h.backing_file.clone(), m.h.backing_format.clone())
        };
        match file {
            Some(f) => self.set_backing(Some(&f), format.as_deref()).await,
            None => Ok(()),
        }
    }

    /// Move the image's generation before the first guest-data change of this session
    /// (see `identity`).
    pub(crate) async fn before_data_change(&self) -> Result<()> {
        // A request the image refuses fails later with its own error, unchanged.
        if self.generation.done() || self.check_writable().is_err() {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        self.generation.bump(&mut m).await
    }

    /// The node guest data lives in (the external data file, or the image file).
    pub(crate) fn data_node(&self) -> &NodeRef {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "Image is read-only"));
        }
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Io(libc::EIO),
                "Image is corrupt; further writes are refused",
            ));
        }
        Ok(())
    }

    /// Register a data request (call with the metadata lock held, after the lookup).
    pub(crate) fn io_begin(&self) -> IoGuard<'_> {
        let mut t = self.io.lock().unwrap();
        let epoch = t.epoch;
        *t.active.entry(epoch).or_insert(0) += 1;
        IoGuard {
            tracker: &self.io,
            epoch,
        }
    }

    /// Start a new epoch; returns the last one (requests registered so far have epoch <= it).
    pub(crate) fn bump_epoch(&self) -> u64 {
        let mut t = self.io.lock().unwrap();
        t.epoch += 1;
        t.epoch - 1
    }

    /// Lowest epoch of a request still in flight (`u64::MAX` if none: every freed cluster
    /// is then safe from stale requests).
    pub(crate) fn min_active_epoch(&self) -> u64 {
        let t = self.io.lock().unwrap();
        t.active.keys().next().copied().unwrap_or(u64::MAX)
    }

    /// A receiver to wait on if guest clusters `[first, end)` are being allocated.
    pub(crate) fn inflight_conflict(&self, first: u64, end: u64) -> Option<watch::Receiver<()>> {
        let f = self.inflight.lock().unwrap();
        f.list
            .iter()
            .find(|(_, a, b, _)| *a < end && first < *b)
            .map(|(.., tx)| tx.subscribe())
    }

    /// Reserve guest clusters `[first, end)` for an allocating write.
    pub(crate) fn reserve(&self, first: u64, end: u64) -> AllocGuard<'_> {
        let mut f = self.inflight.lock().unwrap();
        let id = f.next_id;
        f.next_id += 1;
        let (tx, _) = watch::channel(());
        f.list.push((id, first, end, tx));
        AllocGuard {
            inflight: &self.inflight,
            id,
        }
    }

    /// Wait until no allocation overlaps guest clusters `[first, end)`, then return the
    /// metadata lock.
    pub(crate) async fn lock_clusters(
        &self,
        first: u64,
        end: u64,
    ) -> tokio::sync::MutexGuard<'_, Meta> {
        loop {
            let m = self.meta.lock().await;
            match self.inflight_conflict(first, end) {
                None => return m,
                Some(mut rx) => {
                    drop(m);
                    // Returns when the sender (the reservation) is dropped.
                    let _ = rx.changed().await;
                }
            }
        }
    }

    /// Turn a metadata error found while writing into a corruption event (QEMU's
    /// `qcow2_signal_corruption`): set the corrupt bit and refuse further writes.
    pub(crate) async fn signal(&self, m: &mut Meta, e: Error) -> Error {
        if e.kind() == ErrorKind::Corrupt && !self.read_only {
            self.broken.store(true, Ordering::Release);
            return m.mark_corrupt(e.message()).await;
        }
        e
    }

    /// Flush and leave the image clean: clears the dirty bit if lazy refcounts set it.
    pub async fn close_image(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Writes whose callers went away finish first (their data and L2 updates).
        self.settle_writes().await;
        self.store_bitmaps().await?;
        self.do_flush().await?;
        let mut m = self.meta.lock().await;
        if m.lazy {
            m.lazy = false;
            m.set_dirty(false).await?;
        }
        if m.h.autoclear_features & autoclear::STRATA_SESSION_OPEN != 0 {
            m.h.autoclear_features &= !autoclear::STRATA_SESSION_OPEN;
            m.write_header().await?;
            m.sync().await?;
        }
        Ok(())
    }
}

async fn read_u64s(file: &dyn BlockNode, offset: u64, bytes: u64) -> Result<Vec<u64>> {
    let len = usize::try_from(bytes).map_err(|_| Error::invalid("table too large"))?;
    let buf = file.read(offset, IoBuf::zeroed(len)).await?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect())
}

impl BlockNode for Qcow2 {
    fn driver(&self) -> &'static str {
        "qcow2"
    }

    fn filename(&self) -> String {
        self.file.filename()
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(self.do_read(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            self.before_data_change().await?;
            self.before_write(offset, buf.len() as u64).await?;
            let buf = self.do_write(offset, buf).await?;
            if flags.fua {
                self.do_flush().await?;
            }
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.before_data_change().await?;
            self.before_write(offset, len).await?;
            self.do_write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.before_data_change().await?;
            self.before_write(offset, len).await?;
            self.do_discard(offset, len).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            if self.read_only {
                return Ok(());
            }
            self.write_out_bitmaps().await?;
            self.do_flush().await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(self.do_block_status(offset, len))
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(self.resize(size, prealloc))
    }

    fn backing(&self) -> Option<NodeRef> {
        self.backing_node()
    }

    fn set_backing_link(&self, backing: Option<NodeRef>) -> Result<()> {
        *self.backing.write().unwrap_or_else(|e| e.into_inner()) = backing;
        self.forget_chain();
        if self
            .mapping_watched
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            strata_core::node::bump_mapping_epoch();
        }
        Ok(())
    }

    fn offer_mapping_cache(&self) -> bool {
        self.mapping_watched
            .store(true, std::sync::atomic::Ordering::SeqCst);
        true
    }

    fn file(&self) -> Option<NodeRef> {
        Some(self.file.clone())
    }

    fn debug_event(&self, event: strata_core::DebugEvent) {
        self.file.debug_event(event);
    }

    fn allocated_size(&self) -> BoxFuture<'_, Option<u64>> {
        self.file.allocated_size()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close_image())
    }

    fn dirty_bitmaps(&self) -> Option<Arc<strata_core::BitmapSet>> {
        Some(self.bitmaps.set.clone())
    }

    fn check_bitmap_storable(&self, node_name: &str, name: &str, granularity: u64) -> Result<()> {
        self.bitmap_storable(node_name, name, granularity)
    }

    fn remove_stored_bitmap(&self, name: &str) -> BoxFuture<'_, ()> {
        let name = name.to_string();
        Box::pin(async move { self.remove_stored(&name).await })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
