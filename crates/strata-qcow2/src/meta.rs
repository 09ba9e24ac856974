//! The metadata state of an open image (header, L1, cached L2 tables, refcounts) and the
//! operations on it: lookups, cluster allocation with refcount-block and refcount-table
//! growth, deferred frees, and write-back in dependency order.
//!
//! Everything here runs under the image's metadata lock; data I/O happens outside it.
//!
//! Ordering rules (crash safety):
//! - a refcount increment is durable before any table that references the new cluster is
//!   written (refcount blocks are written and the file flushed first, unless lazy refcounts);
//! - a refcount decrement is applied only after the L2/L1 change that dropped the reference
//!   is durable ([`Meta::flush`] step 3), so a freed cluster is never reused while an old
//!   on-disk table still points at it;
//! - a freed cluster is also not reused while a data request that looked it up earlier may
//!   still be in flight (the epoch in [`PendingFree`]).

use strata_core::error::hash_x;
use strata_core::{Error, ErrorKind, IoBuf, NodeRef, Result, WriteFlags};

use crate::cache::TableCache;
use crate::entry::{self, ClusterType, EntryFormat, L1Entry, SubclusterType};
use crate::header::{Header, MAX_REFTABLE_SIZE_BYTES, incompat};
use crate::refcount;

/// Host offsets must stay below 2^56 (the width of the offset fields).
pub(crate) const MAX_HOST_OFFSET: u64 = (1 << 56) - 1;

/// Clusters whose refcount decrement waits until the reference drop is durable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PendingFree {
    /// First host cluster index.
    pub cluster: u64,
    /// Number of clusters.
    pub count: u64,
    /// Data requests registered at or before this epoch may still use the clusters.
    pub epoch: u64,
}

/// What a guest range maps to in this layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// Reads go to the backing node; `host` is set when the cluster has a host cluster
    /// (extended L2 unallocated subclusters of an allocated cluster).
    Unallocated { host: Option<u64> },
    /// Reads as zeroes; `host` when the cluster keeps an allocation.
    Zero { host: Option<u64> },
    /// Data at `host` (in the data node).
    Data { host: u64 },
    /// A compressed cluster (`entry` is the raw L2 entry); never merged for reads.
    Compressed { entry: u64 },
}

impl RunKind {
    fn host(self) -> Option<u64> {
        match self {
            RunKind::Unallocated { host } | RunKind::Zero { host } => host,
            RunKind::Data { host } => Some(host),
            RunKind::Compressed { .. } => None,
        }
    }

    fn same_kind(self, other: RunKind) -> bool {
        std::mem::discriminant(&self) == std::mem::discriminant(&other)
            && self.host().is_some() == other.host().is_some()
    }

    fn advanced(self, by: u64) -> RunKind {
        match self {
            RunKind::Unallocated { host } => RunKind::Unallocated {
                host: host.map(|h| h + by),
            },
            RunKind::Zero { host } => RunKind::Zero {
                host: host.map(|h| h + by),
            },
            RunKind::Data { host } => RunKind::Data { host: host + by },
            c @ RunKind::Compressed { .. } => c,
        }
    }
}

/// A run of guest bytes with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Length in bytes.
    pub len: u64,
    /// How it is stored (host offsets are those of the run's first byte).
    pub kind: RunKind,
}

/// The L2 entry (and extended bitmap) of one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Slot {
    pub entry: u64,
    pub bitmap: u64,
}

/// Mutable metadata of an open image.
#[derive(Debug)]
pub(crate) struct Meta {
    pub file: NodeRef,
    pub h: Header,
    pub fmt: EntryFormat,
    pub cs: u64,
    pub l1: Vec<u64>,
    pub l2: TableCache<Vec<u64>>,
    pub rt: Vec<u64>,
    /// `rt` is still on disk (read-only opens load it on first use).
    pub rt_deferred: bool,
    pub rb: TableCache<Vec<u8>>,
    pub rb_entries: u64,
    pub rc_bits: u32,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    pub pending: Vec<PendingFree>,
    /// End of the area in use (bytes, cluster aligned): everything past it is free.
    pub file_end: u64,
    /// Refcount blocks hold increments that are not durable yet.
    pub incr_unsynced: bool,
    /// Lazy refcounts in effect (dirty bit set): no ordering flushes for refcounts.
    pub lazy: bool,
    pub read_only: bool,
    /// Snapshot L1 tables `(offset, bytes)`, for overlap checks.
    pub snapshot_l1s: Vec<(u64, u64)>,
    /// Snapshot table `(offset, bytes)`.
    pub snapshot_table: (u64, u64),
    /// Bitmap directory `(offset, bytes)` and bitmap tables.
    pub bitmap_areas: Vec<(u64, u64)>,
    /// Where the next compressed cluster may be packed (0: start a new cluster).
    pub free_byte_offset: u64,
    /// The header as last written, readable without the metadata lock.
    pub published: std::sync::Arc<std::sync::Mutex<Header>>,
    /// An overlay caches where our clusters are: every mapping change must bump the
    /// mapping epoch (see `chain_cache`).
    pub mapping_watched: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

fn u64s_be(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

impl Meta {
    /// Tell overlays that cache our mapping that it changed.
    pub fn mapping_changed(&self) {
        if self
            .mapping_watched
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            strata_core::node::bump_mapping_epoch();
        }
    }

    /// Read `len` bytes at `offset` of the image file.
    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let len = usize::try_from(len).map_err(|_| Error::invalid("metadata read too large"))?;
        let buf = self.file.read(offset, IoBuf::zeroed(len)).await?;
        Ok(buf.to_vec())
    }

    /// Write `data` at `offset` of the image file.
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write(offset, IoBuf::from_slice(data), WriteFlags::default())
            .await?;
        Ok(())
    }

    /// Write the header (first cluster) from `self.h`.
    pub async fn write_header(&mut self) -> Result<()> {
        let bytes = self.h.serialize(self.cs)?;
        self.write_at(0, &bytes).await?;
        self.publish();
        Ok(())
    }

    /// Make the current header visible to [`crate::Qcow2::header`].
    pub fn publish(&self) {
        *self.published.lock().unwrap() = self.h.clone();
    }

    /// Flush the image file.
    pub async fn sync(&self) -> Result<()> {
        self.file.flush().await
    }

    // ---------------------------------------------------------------- L2 tables

    /// Make sure the L2 table at `off` is cached.
    pub async fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        self.make_room_l2().await?;
        self.file.debug_event(strata_core::DebugEvent::L2Load);
        let bytes = self.read_at(off, self.cs).await?;
        self.l2.insert(off, be_u64s(&bytes), false);
        Ok(())
    }

    async fn make_room_l2(&mut self) -> Result<()> {
        while self.l2.is_full() {
            let Some((victim, dirty)) = self.l2.lru() else {
                break;
            };
            if dirty {
                self.sync_increments().await?;
                self.write_l2(victim).await?;
            }
            self.l2.remove(victim);
        }
        Ok(())
    }

    async fn write_l2(&mut self, off: u64) -> Result<()> {
        if let Some(t) = self.l2.peek(off) {
            let bytes = u64s_be(t);
            self.file.debug_event(strata_core::DebugEvent::L2Update);
            self.write_at(off, &bytes).await?;
            self.l2.mark_clean(off);
        }
        Ok(())
    }

    /// The slot of entry `idx` in the cached L2 table at `l2_off`.
    pub fn slot(&mut self, l2_off: u64, idx: u64) -> Slot {
        let k = if self.fmt.extended_l2 { 2 } else { 1 };
        let t = self.l2.get(l2_off).expect("L2 table loaded");
        let i = (idx * k) as usize;
        Slot {
            entry: t[i],
            bitmap: if k == 2 { t[i + 1] } else { 0 },
        }
    }

    /// Set entry `idx` of the cached L2 table at `l2_off` (marks it dirty).
    pub fn set_slot(&mut self, l2_off: u64, idx: u64, s: Slot) {
        self.mapping_changed();
        let k = if self.fmt.extended_l2 { 2 } else { 1 };
        let t = self.l2.get_mut(l2_off).expect("L2 table loaded");
        let i = (idx * k) as usize;
        t[i] = s.entry;
        if k == 2 {
            t[i + 1] = s.bitmap;
        }
    }

    /// L1 index and L2 index of guest cluster `gci`.
    pub fn split_cluster(&self, gci: u64) -> (u64, u64) {
        let n = self.h.l2_entries();
        (gci / n, gci % n)
    }

    /// The validated L2 table offset of L1 entry `l1i`, if any.
    pub fn l2_offset(&self, l1i: u64) -> Result<Option<u64>> {
        let Some(&raw) = self.l1.get(l1i as usize) else {
            return Ok(None);
        };
        let e = L1Entry(raw);
        match e.l2_offset() {
            None => Ok(None),
            Some(off) if off & (self.cs - 1) != 0 => Err(Error::corrupt(format!(
                "L2 table offset {off:#x} unaligned (L1 index: {})",
                hash_x(l1i)
            ))),
            // Only writers need this (they would write the table back there).
            Some(off) if !self.read_only && off >= self.file_end => Err(Error::corrupt(format!(
                "L2 table offset {off:#x} is past the end of the image (L1 index: {})",
                hash_x(l1i)
            ))),
            Some(off) => Ok(Some(off)),
        }
    }

    /// The slot of guest cluster `gci` (an empty slot if no L2 table).
    pub async fn get_slot(&mut self, gci: u64) -> Result<Slot> {
        let (l1i, l2i) = self.split_cluster(gci);
        match self.l2_offset(l1i)? {
            None => Ok(Slot::default()),
            Some(off) => {
                self.load_l2(off).await?;
                Ok(self.slot(off, l2i))
            }
        }
    }

    /// Describe how the guest range `[offset, offset + max_len)` starts: the longest run of
    /// one kind with contiguous host offsets. Compressed clusters are merged only when
    /// `merge_compressed` (block status); reads take them one by one.
    pub async fn map_run(
        &mut self,
        offset: u64,
        max_len: u64,
        merge_compressed: bool,
    ) -> Result<Run> {
        let end = offset + max_len;
        let mut pos = offset;
        let mut first: Option<RunKind> = None;
        while pos < end {
            let step = self.map_step(pos, end).await;
            // Like QEMU, a bad entry after a good run ends the run; the error is reported by
            // the next call, which starts at the bad entry, so it names the right offset.
            let (kind, run_end) = match step {
                Ok(step) => step,
                Err(_) if first.is_some() => break,
                Err(e) => return Err(e),
            };
            match first {
                None => first = Some(kind),
                Some(f) => {
                    let expected = f.advanced(pos - offset);
                    let merge = match (f, kind) {
                        (RunKind::Compressed { .. }, RunKind::Compressed { .. }) => {
                            merge_compressed
                        }
                        _ => f.same_kind(kind) && expected.host() == kind.host(),
                    };
                    if !merge {
                        break;
                    }
                }
            }
            pos = run_end;
            if matches!(kind, RunKind::Compressed { .. }) && !merge_compressed {
                break;
            }
        }
        Ok(Run {
            len: pos - offset,
            kind: first.expect("non-empty range"),
        })
    }

    /// Classify the (sub)cluster at `pos` and say where its run of one kind ends (within
    /// `end`); one step of [`Self::map_run`].
    async fn map_step(&mut self, pos: u64, end: u64) -> Result<(RunKind, u64)> {
        let cs = self.cs;
        let sc_size = self.fmt.subcluster_size();
        let gci = pos / cs;
        let (l1i, l2i) = self.split_cluster(gci);
        let in_cluster = pos % cs;
        Ok(match self.l2_offset(l1i)? {
            None => {
                // No L2 table: everything it would map is unallocated.
                let cover = self.h.l2_coverage();
                let table_end = (l1i + 1).saturating_mul(cover);
                (RunKind::Unallocated { host: None }, table_end.min(end))
            }
            Some(l2_off) => {
                self.load_l2(l2_off).await?;
                let s = self.slot(l2_off, l2i);
                let sc = (in_cluster / sc_size) as u32;
                let t = self.fmt.subcluster_type(s.entry, s.bitmap, sc);
                let n = u64::from(self.fmt.run_length(s.entry, s.bitmap, sc));
                let run_end = (gci * cs + (u64::from(sc) + n) * sc_size).min(end);
                let kind = self.classify(t, s, in_cluster, l2_off, l2i)?;
                let run_end = if run_end == (gci + 1) * cs && run_end < end {
                    self.extend_run(l2_off, l2i, t, s.entry, run_end, end)
                } else {
                    run_end
                };
                (kind, run_end)
            }
        })
    }

    /// Extends a run that fills its cluster over the following entries of the same L2 table
    /// that continue it exactly: the same entry (unallocated or zero, no host cluster) or
    /// the next host cluster with the same flags. A scan of the table in memory: walking a
    /// sparse 1 TiB image one cluster per step (a cache lookup each) cost seconds.
    fn extend_run(
        &self,
        l2_off: u64,
        l2i: u64,
        t: SubclusterType,
        entry: u64,
        mut run_end: u64,
        end: u64,
    ) -> u64 {
        if self.fmt.extended_l2 {
            return run_end;
        }
        let step = match t {
            SubclusterType::UnallocatedPlain | SubclusterType::ZeroPlain => 0,
            SubclusterType::Normal
            | SubclusterType::ZeroAlloc
            | SubclusterType::UnallocatedAlloc => self.cs,
            SubclusterType::Compressed | SubclusterType::Invalid => return run_end,
        };
        let Some(table) = self.l2.peek(l2_off) else {
            return run_end;
        };
        let mut prev = entry;
        for &e in table.iter().skip(l2i as usize + 1) {
            if run_end >= end || e != prev.wrapping_add(step) {
                break;
            }
            prev = e;
            run_end = (run_end + self.cs).min(end);
        }
        run_end
    }

    fn classify(
        &self,
        t: SubclusterType,
        s: Slot,
        in_cluster: u64,
        l2_off: u64,
        l2i: u64,
    ) -> Result<RunKind> {
        let host_cluster = self.fmt.host_cluster(s.entry);
        let check = |h: u64| -> Result<u64> {
            if h & (self.cs - 1) != 0 {
                return Err(Error::corrupt(format!(
                    "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
                    hash_x(h),
                    hash_x(l2_off),
                    hash_x(l2i)
                )));
            }
            Ok(h + in_cluster)
        };
        Ok(match t {
            SubclusterType::UnallocatedPlain => RunKind::Unallocated { host: None },
            SubclusterType::UnallocatedAlloc => RunKind::Unallocated {
                host: Some(check(host_cluster)?),
            },
            SubclusterType::ZeroPlain => RunKind::Zero { host: None },
            SubclusterType::ZeroAlloc => RunKind::Zero {
                host: Some(check(host_cluster)?),
            },
            SubclusterType::Normal => RunKind::Data {
                host: check(host_cluster)?,
            },
            SubclusterType::Compressed => {
                if self.fmt.external_data_file {
                    return Err(Error::corrupt(
                        "Compressed cluster entry found in image with external data file",
                    ));
                }
                RunKind::Compressed { entry: s.entry }
            }
            SubclusterType::Invalid => {
                return Err(Error::corrupt(format!(
                    "Invalid cluster entry found  (L2 offset: {}, L2 index: {})",
                    hash_x(l2_off),
                    hash_x(l2i)
                )));
            }
        })
    }

    // ---------------------------------------------------------------- refcounts

    fn region_block(&self, ri: u64) -> Result<Option<u64>> {
        if self.rt_deferred {
            // Not loaded yet (see `ensure_reftable`): an answer would be a silent "free".
            return Err(Error::invalid("refcount table not loaded (internal error)"));
        }
        let Some(&raw) = self.rt.get(ri as usize) else {
            return Ok(None);
        };
        let off = raw & entry::OFFSET_MASK;
        if raw & 0x1ff != 0 || off & (self.cs - 1) != 0 {
            return Err(Error::corrupt(format!(
                "Refblock offset {raw:#x} unaligned (reftable index: {})",
                hash_x(ri)
            )));
        }
        if !self.read_only && off >= self.file_end {
            return Err(Error::corrupt(format!(
                "Refblock offset {off:#x} is past the end of the image (reftable index: {})",
                hash_x(ri)
            )));
        }
        Ok((off != 0).then_some(off))
    }

    async fn load_rb(&mut self, off: u64) -> Result<()> {
        if self.rb.contains(off) {
            return Ok(());
        }
        while self.rb.is_full() {
            let Some((victim, dirty)) = self.rb.lru() else {
                break;
            };
            if dirty {
                // Refcount blocks only ever hold increments between flushes: safe to write.
                self.write_rb(victim).await?;
            }
            self.rb.remove(victim);
        }
        self.file.debug_event(strata_core::DebugEvent::RefblockLoad);
        let bytes = self.read_at(off, self.cs).await?;
        self.rb.insert(off, bytes, false);
        Ok(())
    }

    async fn write_rb(&mut self, off: u64) -> Result<()> {
        if let Some(b) = self.rb.peek(off) {
            let b = b.clone();
            self.file
                .debug_event(strata_core::DebugEvent::RefblockUpdatePart);
            self.write_at(off, &b).await?;
            self.rb.mark_clean(off);
        }
        Ok(())
    }

    /// Write every dirty refcount block.
    pub async fn write_dirty_rbs(&mut self) -> Result<bool> {
        let dirty = self.rb.dirty();
        for off in &dirty {
            self.write_rb(*off).await?;
        }
        Ok(!dirty.is_empty())
    }

    /// Make refcount increments durable before a table referencing new clusters is written.
    ///
    /// With lazy refcounts (dirty bit set) there is no such ordering: the on-disk refcounts
    /// are rebuilt after a crash, so the blocks stay in the cache until a flush or an
    /// eviction writes them (QEMU's behaviour too).
    pub async fn sync_increments(&mut self) -> Result<()> {
        if self.incr_unsynced && !self.lazy {
            self.write_dirty_rbs().await?;
            self.sync().await?;
            self.incr_unsynced = false;
        }
        Ok(())
    }

    /// Load the refcount table a read-only open left on disk (see `Qcow2::open`); only
    /// the metadata-preallocation probe of block status reads refcounts of such an image.
    async fn ensure_reftable(&mut self) -> Result<()> {
        if self.rt_deferred {
            self.file.debug_event(strata_core::DebugEvent::ReftableLoad);
            let bytes = self.read_at(
                self.h.refcount_table_offset,
                u64::from(self.h.refcount_table_clusters) * self.cs,
            );
            self.rt = be_u64s(&bytes.await?);
            self.rt_deferred = false;
        }
        Ok(())
    }

    /// Refcount of host cluster `ci`.
    pub async fn get_refcount(&mut self, ci: u64) -> Result<u64> {
        self.ensure_reftable().await?;
        let ri = ci / self.rb_entries;
        let Some(off) = self.region_block(ri)? else {
            return Ok(0);
        };
        self.load_rb(off).await?;
        let b = self.rb.get(off).expect("loaded");
        Ok(refcount::get(
            b,
            self.rc_bits,
            (ci % self.rb_entries) as usize,
        ))
    }

    /// Set the refcount of `ci`, whose refcount block must exist.
    async fn set_refcount_existing(&mut self, ci: u64, value: u64) -> Result<()> {
        let ri = ci / self.rb_entries;
        let off = self
            .region_block(ri)?
            .ok_or_else(|| Error::corrupt("refcount block vanished"))?;
        self.load_rb(off).await?;
        let bits = self.rc_bits;
        let b = self.rb.get_mut(off).expect("loaded");
        refcount::set(b, bits, (ci % self.rb_entries) as usize, value);
        Ok(())
    }

    /// First index of `n` contiguous clusters with refcount 0, searching from the hint.
    ///
    /// Clusters past the end of the file may have a refcount: a data or table write that
    /// failed after its refcount was made durable leaves one (a leak, as in QEMU). They are
    /// skipped, but only up to 64 MiB of them: more is not what failed writes leave but
    /// a damaged or hostile refcount block, which would otherwise make this search walk
    /// towards 2^56.
    async fn find_free(&mut self, n: u64) -> Result<u64> {
        /// Leaked bytes past the end skipped before the search gives up.
        const MAX_SKIPPED_PAST_END: u64 = 64 << 20;
        let max_cluster = MAX_HOST_OFFSET / self.cs;
        let mut start = self.free_hint;
        let mut i = start;
        let mut skipped_past_end = 0;
        while i - start < n {
            if i >= max_cluster {
                return Err(Error::from_errno(libc::EFBIG, "Cannot allocate cluster"));
            }
            let ri = i / self.rb_entries;
            if self.region_block(ri)?.is_none() {
                // A whole region without a block is free: skip over it.
                i = (ri + 1) * self.rb_entries;
                continue;
            }
            if self.get_refcount(i).await? != 0 {
                if i * self.cs >= self.file_end {
                    skipped_past_end += self.cs;
                    if skipped_past_end > MAX_SKIPPED_PAST_END {
                        return Err(Error::corrupt(format!(
                            "Refcount of cluster {i:#x} past the end of the image is not zero"
                        )));
                    }
                }
                start = i + 1;
            }
            i += 1;
        }
        Ok(start)
    }

    /// Give back clusters allocated by [`Self::alloc_clusters`] that nothing references yet
    /// because the write that was to fill them failed (QEMU's `qcow2_alloc_cluster_abort`).
    /// Best effort: a refcount block that cannot be loaded leaves a leak, never an error.
    pub async fn dealloc_unreferenced(&mut self, offset: u64, n: u64) {
        let first = offset / self.cs;
        for c in first..first + n {
            let Ok(rc) = self.get_refcount(c).await else {
                continue;
            };
            if rc > 0 && self.set_refcount_existing(c, rc - 1).await.is_ok() && rc == 1 {
                self.free_hint = self.free_hint.min(c);
            }
        }
    }

    /// Allocate `n` contiguous host clusters (refcount 1); returns the byte offset.
    ///
    /// As QEMU: find free clusters (regions without a refcount block count as free), move
    /// the search hint past them, then set their refcounts, allocating missing refcount
    /// blocks after the range.
    pub async fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        self.file.debug_event(strata_core::DebugEvent::ClusterAlloc);
        let ci = self.find_free(n).await?;
        let last = ci + n - 1;
        self.free_hint = last + 1;
        // Claim the range before refcount metadata is allocated, so a refcount table growth
        // (which places itself at the end of the image) lands after it.
        self.file_end = self.file_end.max((last + 1) * self.cs);
        self.file
            .debug_event(strata_core::DebugEvent::RefblockAlloc);
        for c in ci..=last {
            let counted = match self.get_refcount(c).await {
                Ok(0) => self.set_refcount_alloc(c, 1, 0).await,
                Ok(_) => Err(Error::corrupt("allocated cluster is in use")),
                Err(e) => Err(e),
            };
            if let Err(e) = counted {
                // As QEMU's `update_refcount`: undo the part already done.
                self.incr_unsynced = true;
                self.dealloc_unreferenced(ci * self.cs, c - ci).await;
                return Err(e);
            }
        }
        self.incr_unsynced = true;
        self.file_end = self.file_end.max((last + 1) * self.cs);
        Ok(ci * self.cs)
    }

    /// Add one to the refcount of an allocated cluster (a packed compressed cluster).
    pub async fn incref(&mut self, ci: u64) -> Result<()> {
        let rc = self.get_refcount(ci).await?;
        if rc >= refcount::max(self.rc_bits) {
            return Err(Error::invalid("Refcount overflow"));
        }
        self.file
            .debug_event(strata_core::DebugEvent::RefblockAlloc);
        self.set_refcount_alloc(ci, rc + 1, 0).await?;
        self.incr_unsynced = true;
        Ok(())
    }

    /// Set the refcount of `ci`, creating its refcount block if needed.
    fn set_refcount_alloc(
        &mut self,
        ci: u64,
        value: u64,
        depth: u32,
    ) -> futures::future::BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let ri = ci / self.rb_entries;
            if self.region_block(ri)?.is_none() {
                self.ensure_refblock(ri, depth + 1).await?;
            }
            self.set_refcount_existing(ci, value).await
        })
    }

    /// Give region `ri` a refcount block (QEMU's `alloc_refcount_block`): at the next free
    /// cluster, describing itself when it falls in its own region, else counted in the
    /// block of its region (which may be created first, recursively).
    async fn ensure_refblock(&mut self, ri: u64, depth: u32) -> Result<u64> {
        if depth > 8 {
            return Err(Error::corrupt("refcount block allocation did not converge"));
        }
        if ri as usize >= self.rt.len() {
            self.grow_reftable(ri + 1).await?;
        }
        if let Some(off) = self.region_block(ri)? {
            return Ok(off);
        }
        let x = self.find_free(1).await?;
        self.free_hint = x + 1;
        // Claim it before anything else may be placed at the end of the image.
        self.file_end = self.file_end.max((x + 1) * self.cs);
        let rx = x / self.rb_entries;
        let mut block = vec![0u8; self.cs as usize];
        if rx == ri {
            refcount::set(&mut block, self.rc_bits, (x % self.rb_entries) as usize, 1);
        } else {
            self.set_refcount_alloc(x, 1, depth).await?;
            self.incr_unsynced = true;
            self.sync_increments().await?;
        }
        if let Some(off) = self.region_block(ri)? {
            // A reftable growth on the way created it.
            return Ok(off);
        }
        if let Err(e) = self.install_block(ri, x, block).await {
            // The table does not name the block: its cluster is unused again.
            if rx != ri {
                self.dealloc_unreferenced(x * self.cs, 1).await;
            }
            return Err(e);
        }
        Ok(x * self.cs)
    }

    /// Write a new refcount block for region `ri` at cluster `x` and hook it into the table.
    async fn install_block(&mut self, ri: u64, x: u64, block: Vec<u8>) -> Result<()> {
        let off = x * self.cs;
        self.file
            .debug_event(strata_core::DebugEvent::RefblockAllocWrite);
        self.write_at(off, &block).await?;
        if !self.lazy {
            self.sync().await?;
        }
        let entry_off = self.h.refcount_table_offset + ri * 8;
        self.file
            .debug_event(strata_core::DebugEvent::RefblockAllocHookup);
        self.write_at(entry_off, &off.to_be_bytes()).await?;
        // Only a table entry that was written names the block: refcounts cached for a block
        // the table on disk does not know would be lost (and the image corrupt).
        self.rt[ri as usize] = off;
        self.file_end = self.file_end.max(off + self.cs);
        if !self.lazy {
            self.sync().await?;
        }
        Ok(())
    }

    /// Replace the refcount table with one of at least `min_entries` entries, placed with
    /// the refcount blocks it needs at the end of the image (self-describing, as QEMU's
    /// `qcow2_refcount_area`).
    async fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cs;
        let per_cluster = cs / 8;
        self.file.debug_event(strata_core::DebugEvent::ReftableGrow);
        let max_entries = MAX_REFTABLE_SIZE_BYTES / 8;
        let old_len = self.rt.len() as u64;
        let e = self.file_end.div_ceil(cs);
        let mut new_len = min_entries
            .max(old_len + old_len / 2)
            .next_multiple_of(per_cluster);
        let (nb, rt_clusters) = loop {
            if new_len > max_entries {
                return Err(Error::from_errno(libc::EFBIG, "Refcount table too large"));
            }
            let rt_clusters = new_len * 8 / cs;
            let mut nb = 0;
            let nb = loop {
                let area_end = e + nb + rt_clusters;
                let c = (e / self.rb_entries..=(area_end - 1) / self.rb_entries)
                    .filter(|&r| r >= old_len || self.rt[r as usize] == 0)
                    .count() as u64;
                if c == nb {
                    break nb;
                }
                nb = c;
            };
            let last_region = (e + nb + rt_clusters - 1) / self.rb_entries;
            if last_region + 1 > new_len {
                new_len = (last_region + 1).next_multiple_of(per_cluster);
                continue;
            }
            break (nb, rt_clusters);
        };
        let mut new_rt = self.rt.clone();
        new_rt.resize(new_len as usize, 0);
        let area_end = e + nb + rt_clusters;
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut next = e;
        for r in e / self.rb_entries..=(area_end - 1) / self.rb_entries {
            if r >= old_len || self.rt[r as usize] == 0 {
                new_rt[r as usize] = next * cs;
                new_blocks.push((r, vec![0u8; cs as usize]));
                next += 1;
            }
        }
        let rt_off = next * cs;
        // Refcount 1 for every cluster of the area, in whichever block covers it.
        let mut counted_in_old_blocks = Vec::new();
        for c in e..area_end {
            let r = c / self.rb_entries;
            let idx = (c % self.rb_entries) as usize;
            if let Some((_, b)) = new_blocks.iter_mut().find(|(br, _)| *br == r) {
                refcount::set(b, self.rc_bits, idx, 1);
            } else {
                counted_in_old_blocks.push(c);
                if let Err(err) = self.set_refcount_existing(c, 1).await {
                    self.uncount_area(&counted_in_old_blocks).await;
                    return Err(err);
                }
            }
        }
        if let Err(err) = self.write_reftable_area(&new_rt, &new_blocks, rt_off).await {
            // The header still names the old table: the area is unused, so its clusters
            // must not stay counted (they lie past the end of the image).
            self.uncount_area(&counted_in_old_blocks).await;
            return Err(err);
        }
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.file
            .debug_event(strata_core::DebugEvent::RefblockAllocSwitchTable);
        self.h.refcount_table_offset = rt_off;
        self.h.refcount_table_clusters = rt_clusters as u32;
        if let Err(err) = self.write_header().await {
            self.h.refcount_table_offset = old_off;
            self.h.refcount_table_clusters = old_clusters as u32;
            self.uncount_area(&counted_in_old_blocks).await;
            return Err(err);
        }
        // The header names the new table now (even if the flush below fails, the write may
        // have landed): switch over in memory before anything else can fail.
        self.rt = new_rt;
        self.file_end = self.file_end.max(area_end * cs);
        // The old table is unreferenced now; free it (no data request can target it).
        self.pending.push(PendingFree {
            cluster: old_off / cs,
            count: old_clusters,
            epoch: 0,
        });
        self.sync().await?;
        self.incr_unsynced = false;
        Ok(())
    }

    /// Write the new refcount blocks, the dirty cached ones and the new table of a
    /// refcount table growth, and flush.
    async fn write_reftable_area(
        &mut self,
        new_rt: &[u64],
        new_blocks: &[(u64, Vec<u8>)],
        rt_off: u64,
    ) -> Result<()> {
        self.file
            .debug_event(strata_core::DebugEvent::RefblockAllocWriteBlocks);
        for (r, b) in new_blocks {
            self.write_at(new_rt[*r as usize], b).await?;
        }
        self.write_dirty_rbs().await?;
        self.file
            .debug_event(strata_core::DebugEvent::RefblockAllocWriteTable);
        self.write_at(rt_off, &u64s_be(new_rt)).await?;
        self.sync().await
    }

    /// Undo the refcounts a failed refcount table growth gave its area in existing blocks
    /// (best effort: a block that cannot be loaded leaves a leak past the end).
    async fn uncount_area(&mut self, clusters: &[u64]) {
        for &c in clusters {
            let _ = self.set_refcount_existing(c, 0).await;
        }
    }

    /// Queue host clusters covering `[offset, offset + len)` for a refcount decrement.
    pub fn free_range(&mut self, offset: u64, len: u64, epoch: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.cs;
        let last = (offset + len - 1) / self.cs;
        self.pending.push(PendingFree {
            cluster: first,
            count: last - first + 1,
            epoch,
        });
    }

    /// Queue the host storage of an L2 slot for freeing (data file clusters are not
    /// refcounted).
    pub fn free_slot(&mut self, s: Slot, epoch: u64) {
        match self.fmt.cluster_type(s.entry) {
            ClusterType::Compressed => {
                let d = self.fmt.compressed(s.entry);
                let start = d.host_offset & !(entry::COMPRESSED_SECTOR - 1);
                self.free_range(start, d.sectors * entry::COMPRESSED_SECTOR, epoch);
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                if !self.fmt.external_data_file {
                    self.free_range(self.fmt.host_cluster(s.entry), self.cs, epoch);
                }
            }
            ClusterType::Unallocated | ClusterType::ZeroPlain => {}
        }
    }

    /// Write back all metadata in dependency order and apply the refcount decrements that
    /// are safe now (those whose epoch is below `min_active_epoch`). Returns host ranges
    /// that became free (for discarding in the file).
    pub async fn flush(&mut self, min_active_epoch: u64) -> Result<Vec<(u64, u64)>> {
        // 1. Refcount increments before the tables that reference the new clusters (with
        // lazy refcounts: written, in no particular order, as every flush writes them).
        if self.lazy {
            self.write_dirty_rbs().await?;
            self.incr_unsynced = false;
        }
        self.sync_increments().await?;
        // 2. L2 tables (L1 entries are written as they change). As QEMU's cache flush, one
        // failed table does not stop the others (it stays dirty for the next flush).
        let dirty_l2 = self.l2.dirty();
        let mut first_err = None;
        for off in &dirty_l2 {
            if let Err(e) = self.write_l2(*off).await {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        self.file.debug_event(strata_core::DebugEvent::FlushToDisk);
        let ready: Vec<PendingFree> = self
            .pending
            .iter()
            .copied()
            .filter(|p| p.epoch < min_active_epoch)
            .collect();
        if ready.is_empty() {
            self.sync().await?;
            return Ok(Vec::new());
        }
        self.sync().await?;
        // 3. Decrements, now that no durable table references the clusters.
        self.pending.retain(|p| p.epoch >= min_active_epoch);
        let mut freed = Vec::new();
        for p in ready {
            self.file.debug_event(strata_core::DebugEvent::ClusterFree);
            for c in p.cluster..p.cluster + p.count {
                let rc = self.get_refcount(c).await?;
                if rc == 0 {
                    return Err(Error::corrupt(format!(
                        "Refcount of cluster {c:#x} would become negative"
                    )));
                }
                self.set_refcount_existing(c, rc - 1).await?;
                if rc == 1 {
                    self.free_hint = self.free_hint.min(c);
                    let off = c * self.cs;
                    // A freed table must not be written back over reused space.
                    self.l2.remove(off);
                    freed.push((off, self.cs));
                }
            }
        }
        self.write_dirty_rbs().await?;
        self.sync().await?;
        Ok(freed)
    }

    // ---------------------------------------------------------------- L1 / L2 updates

    /// Write L1 entry `l1i` (the aligned 512-byte block containing it).
    pub async fn write_l1_entry(&mut self, l1i: u64) -> Result<()> {
        let first = (l1i / 64) * 64;
        let last = ((first + 64) as usize).min(self.l1.len());
        let bytes = u64s_be(&self.l1[first as usize..last]);
        self.write_at(self.h.l1_table_offset + first * 8, &bytes)
            .await
    }

    /// Make the L2 table of `l1i` exist and be exclusively ours (allocating or copying it);
    /// returns its offset.
    pub async fn writable_l2(&mut self, l1i: u64, epoch: u64) -> Result<u64> {
        if l1i as usize >= self.l1.len() {
            return Err(Error::corrupt(format!(
                "L1 index {l1i} past the L1 table ({} entries)",
                self.l1.len()
            )));
        }
        let old = self.l2_offset(l1i)?;
        let copied = L1Entry(self.l1[l1i as usize]).copied();
        if let (Some(off), true) = (old, copied) {
            self.load_l2(off).await?;
            return Ok(off);
        }
        let table = match old {
            Some(off) => {
                self.file
                    .debug_event(strata_core::DebugEvent::L2AllocCowRead);
                self.load_l2(off).await?;
                self.l2.peek(off).cloned().expect("loaded")
            }
            None => vec![0u64; (self.cs / 8) as usize],
        };
        let old_entry = self.l1[l1i as usize];
        let new = self.alloc_clusters(1).await?;
        if let Err(e) = self.install_l2(l1i, new, table).await {
            // As QEMU's `l2_allocate`: the L1 entry goes back to the old table (or
            // nowhere), so the new cluster is unreferenced; give it back.
            self.l1[l1i as usize] = old_entry;
            self.l2.remove(new);
            self.dealloc_unreferenced(new, 1).await;
            return Err(e);
        }
        if let Some(off) = old {
            self.free_range(off, self.cs, epoch);
        }
        Ok(new)
    }

    /// Write `table` to the new cluster at `new` and point L1 entry `l1i` at it.
    async fn install_l2(&mut self, l1i: u64, new: u64, table: Vec<u64>) -> Result<()> {
        self.check_overlap(new, self.cs, true)?;
        // The new table is on disk, and its refcount durable, before L1 points at it.
        self.sync_increments().await?;
        self.file.debug_event(strata_core::DebugEvent::L2AllocWrite);
        self.write_at(new, &u64s_be(&table)).await?;
        if !self.lazy {
            self.sync().await?;
        }
        self.make_room_l2().await?;
        self.l2.insert(new, table, false);
        self.l1[l1i as usize] = L1Entry::new(new, true).0;
        self.file.debug_event(strata_core::DebugEvent::L1Update);
        self.write_l1_entry(l1i).await
    }

    /// Refuse to write `[off, off + len)` of the image file if it overlaps metadata (QEMU's
    /// overlap check). `is_l2` skips the active-L2 check for a table being placed.
    pub fn check_overlap(&self, off: u64, len: u64, is_l2: bool) -> Result<()> {
        if self.fmt.external_data_file && !is_l2 {
            return Ok(());
        }
        let end = off.saturating_add(len);
        let hit =
            |start: u64, size: u64| size > 0 && off < start.saturating_add(size) && start < end;
        let cs = self.cs;
        let mut what = None;
        if hit(0, cs) {
            what = Some("header");
        } else if hit(
            self.h.l1_table_offset,
            (self.l1.len() as u64 * 8).next_multiple_of(cs),
        ) {
            what = Some("active L1 table");
        } else if hit(
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * cs,
        ) {
            what = Some("refcount table");
        } else if self.rt.iter().any(|&r| hit(r & entry::OFFSET_MASK, cs)) {
            what = Some("refcount block");
        } else if !is_l2 && self.l1.iter().any(|&e| hit(e & entry::OFFSET_MASK, cs)) {
            what = Some("active L2 table");
        } else if hit(
            self.snapshot_table.0,
            self.snapshot_table.1.next_multiple_of(cs),
        ) {
            what = Some("snapshot table");
        } else if self
            .snapshot_l1s
            .iter()
            .any(|&(o, l)| hit(o, l.next_multiple_of(cs)))
        {
            what = Some("inactive L1 table");
        } else if self
            .bitmap_areas
            .iter()
            .any(|&(o, l)| hit(o, l.next_multiple_of(cs)))
        {
            what = Some("bitmap directory");
        }
        match what {
            None => Ok(()),
            Some(w) => Err(Error::corrupt(format!(
                "Preventing invalid write on metadata (overlaps with {w})"
            ))),
        }
    }

    /// Set or clear the dirty bit and write the header.
    pub async fn set_dirty(&mut self, dirty: bool) -> Result<()> {
        if dirty {
            self.h.incompatible_features |= incompat::DIRTY;
        } else {
            self.h.incompatible_features &= !incompat::DIRTY;
        }
        self.write_header().await?;
        self.sync().await
    }

    /// Set the corrupt bit in the header (best effort; the caller reports `msg`).
    pub async fn mark_corrupt(&mut self, msg: &str) -> Error {
        if !self.read_only && self.h.incompatible_features & incompat::CORRUPT == 0 {
            self.h.incompatible_features |= incompat::CORRUPT;
            let _ = self.write_header().await;
            let _ = self.sync().await;
        }
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "Marking image as corrupt: {msg}; further corruption events will be suppressed"
            ),
        )
    }
}
