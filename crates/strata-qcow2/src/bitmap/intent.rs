//! Write-intent logging: persistent bitmaps that survive an unclean stop (the idea of
//! md-raid's write-intent bitmap).
//!
//! While an image with persistent bitmaps is open read-write, each loaded bitmap owns a
//! fully allocated copy on disk (every bitmap-table entry a data cluster), listed in the
//! directory with `in-use` set, and the header carries our autoclear bit
//! [`STRATA_WRITE_INTENT`]. That copy is kept a superset of the live bits:
//! - before a write, write-zeroes or discard reaching a granule whose bit is not yet set on
//!   disk is issued, the bit is written and the file flushed; writers racing on fresh
//!   granules share one flush (group commit). Granules already set on disk cost nothing;
//! - bits set other than by writes (merge, restore, a failed backup's reclaim) are written
//!   out before the next write, and at flush;
//! - cleared bits are written out lazily, at flush: a stale set bit is safe, a missing one
//!   is not.
//!
//! After an unclean stop the bitmaps are `in-use`. With our bit still set no other program
//! opened the image read-write since (one that does not know an autoclear bit clears it),
//! so the on-disk copy is loaded as the bitmap. Without it they are inconsistent, as QEMU
//! reports them. A resize withdraws the promise (our bit is cleared before the next write).
//!
//! Lock order: the metadata lock, then `io`, then `state`, then the [`BitmapSet`]'s own.

use std::collections::BTreeSet;
use std::sync::Mutex as StdMutex;

use strata_core::bitmap::BitmapSet;
use strata_core::{IoBuf, NodeRef, Result, WriteFlags};

use crate::header::autoclear::STRATA_WRITE_INTENT;
use crate::meta::Meta;

/// Bytes written per dirty piece of a copy (at most a cluster).
const PAGE: u64 = 4096;

/// One bitmap's on-disk copy.
#[derive(Debug)]
pub(crate) struct DiskCopy {
    pub(crate) name: String,
    pub(crate) granularity_bits: u8,
    /// Bits in the bitmap (granules of the disk).
    pub(crate) nbits: u64,
    /// The copy as it is (or is about to be) on disk, QEMU's serialized layout.
    pub(crate) bytes: Vec<u8>,
    /// Host offset of each data cluster, in table order.
    pub(crate) clusters: Vec<u64>,
    /// Pages of `bytes` not yet written.
    dirty: BTreeSet<usize>,
}

impl DiskCopy {
    pub(crate) fn new(
        name: &str,
        granularity_bits: u8,
        nbits: u64,
        bytes: Vec<u8>,
        clusters: Vec<u64>,
    ) -> DiskCopy {
        DiskCopy {
            name: name.to_string(),
            granularity_bits,
            nbits,
            bytes,
            clusters,
            dirty: BTreeSet::new(),
        }
    }

    /// Set the bits of `[offset, offset + len)`; true if any was clear.
    fn mark(&mut self, offset: u64, len: u64, page: u64) -> bool {
        if len == 0 || self.nbits == 0 {
            return false;
        }
        let first = offset >> self.granularity_bits;
        let last = ((offset + len - 1) >> self.granularity_bits).min(self.nbits - 1);
        let mut changed = false;
        let mut bit = first;
        while bit <= last {
            let byte = (bit / 8) as usize;
            // A whole byte at once where the range covers it.
            let mask: u8 = if bit.is_multiple_of(8) && bit + 7 <= last {
                0xff
            } else {
                1 << (bit % 8)
            };
            let Some(b) = self.bytes.get_mut(byte) else {
                break;
            };
            if *b & mask != mask {
                *b |= mask;
                self.dirty.insert(byte / page as usize);
                changed = true;
            }
            bit += if mask == 0xff { 8 } else { 1 };
        }
        changed
    }

    /// Replace the copy by `bytes` (same length); true if anything changed.
    fn replace(&mut self, bytes: &[u8], page: u64) -> bool {
        let mut changed = false;
        for (i, (old, new)) in self
            .bytes
            .chunks_mut(page as usize)
            .zip(bytes.chunks(page as usize))
            .enumerate()
        {
            if old != new {
                old.copy_from_slice(new);
                self.dirty.insert(i);
                changed = true;
            }
        }
        changed
    }
}

/// Pages to write: (host offset, bytes), and their (copy, page) keys to put back on failure.
#[derive(Debug, Default)]
struct Batch {
    writes: Vec<(u64, Vec<u8>)>,
    keys: Vec<(usize, usize)>,
}

#[derive(Debug, Default)]
struct State {
    /// Our autoclear bit is set on disk and the copies are kept a superset.
    active: bool,
    /// The disk was resized: the copies no longer fit, our bit goes before the next write.
    stale: bool,
    copies: Vec<DiskCopy>,
    cluster_size: u64,
    /// Generations of marks: asked for, and durable on disk.
    requested: u64,
    durable: u64,
    /// The set's counters as of the last write-out.
    grown_seen: u64,
    changed_seen: u64,
    /// Persistent bitmaps added while open may get kept copies (the image is read-write,
    /// holds no inconsistent bitmap, and write-intent is not turned off).
    adoptable: bool,
    /// The set's change counter as of the last look for bitmaps without a copy.
    adopt_seen: u64,
}

impl State {
    fn page(&self) -> u64 {
        PAGE.min(self.cluster_size)
    }

    /// The dirty pages, now clean until the batch is put back.
    fn take_dirty(&mut self) -> Batch {
        let page = self.page() as usize;
        let cs = self.cluster_size as usize;
        let mut b = Batch::default();
        for (ci, c) in self.copies.iter_mut().enumerate() {
            for p in std::mem::take(&mut c.dirty) {
                let start = p * page;
                let Some(&host) = c.clusters.get(start / cs) else {
                    continue;
                };
                let end = (start + page).min(c.bytes.len());
                b.writes
                    .push((host + (start % cs) as u64, c.bytes[start..end].to_vec()));
                b.keys.push((ci, p));
            }
        }
        b
    }

    fn put_back(&mut self, batch: Batch) {
        for (ci, p) in batch.keys {
            if let Some(c) = self.copies.get_mut(ci) {
                c.dirty.insert(p);
            }
        }
    }
}

/// What a write must wait for before its data may be issued.
enum Need {
    Nothing,
    /// The marks of this generation must be durable.
    Sync(u64),
    /// Bits set by merge/restore must be written out first.
    WriteOut,
    /// The copies are stale: withdraw our bit.
    Withdraw,
}

/// The write-intent state of one open image.
#[derive(Debug, Default)]
pub(crate) struct WriteIntent {
    state: StdMutex<State>,
    /// Serializes writing the copies, so the last write of a page carries its newest bytes.
    io: tokio::sync::Mutex<()>,
}

impl WriteIntent {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start keeping `copies` (already durable, with our bit set in the header).
    pub(crate) fn activate(&self, copies: Vec<DiskCopy>, cluster_size: u64, set: &BitmapSet) {
        let mut st = self.lock();
        *st = State {
            active: true,
            copies,
            cluster_size,
            grown_seen: set.grow_count(),
            changed_seen: set.change_count(),
            adoptable: true,
            adopt_seen: set.change_count(),
            ..State::default()
        };
    }

    /// Let persistent bitmaps added later get copies, though none is kept yet.
    pub(crate) fn allow_adoption(&self, cluster_size: u64, set: &BitmapSet) {
        let mut st = self.lock();
        st.adoptable = true;
        st.cluster_size = cluster_size;
        st.adopt_seen = set.change_count();
    }

    /// Whether bitmaps may have been added since the last look (cheap: a counter).
    pub(crate) fn may_adopt(&self, set: &BitmapSet) -> bool {
        let st = self.lock();
        st.adoptable && !st.stale && st.adopt_seen != set.change_count()
    }

    /// Record that every persistent bitmap as of change `seen` has a copy (or cannot).
    pub(crate) fn adopted(&self, seen: u64) {
        self.lock().adopt_seen = seen;
    }

    /// Whether bitmap `name` has a kept copy.
    pub(crate) fn has_copy(&self, name: &str) -> bool {
        self.lock().copies.iter().any(|c| c.name == name)
    }

    /// Add copies written just now from a snapshot of the bits; writes mark them from now
    /// on, and [`WriteIntent::write_out`] with `force` then brings them to the live bits.
    /// They must not be in the directory until that write-out is durable.
    pub(crate) fn add_copies(&self, copies: Vec<DiskCopy>) {
        let mut st = self.lock();
        st.copies.extend(copies);
    }

    /// Our bit is set on disk with the copies in the directory.
    pub(crate) fn set_active(&self) {
        self.lock().active = true;
    }

    /// Whether the copies are kept (our bit is set on disk).
    pub(crate) fn is_active(&self) -> bool {
        self.lock().active
    }

    /// Stop keeping the copies (our bit is gone from disk, or the clusters are about to
    /// be freed). Waits for a write of the copies in progress.
    pub(crate) async fn deactivate(&self) {
        let _io = self.io.lock().await;
        let mut st = self.lock();
        st.active = false;
        st.copies.clear();
    }

    /// Forget the copy of bitmap `name` (its clusters are about to be freed).
    pub(crate) async fn forget(&self, name: &str) {
        let _io = self.io.lock().await;
        self.lock().copies.retain(|c| c.name != name);
    }

    /// The disk size changed: the copies no longer describe it.
    pub(crate) fn mark_stale(&self) {
        let mut st = self.lock();
        if st.active {
            st.stale = true;
        }
    }

    /// Mark `[offset, offset + len)` in the live set and, when the copies are kept, make
    /// the bits durable on disk before returning: call before the data is issued. `meta`
    /// is taken only to withdraw our bit after a resize.
    pub(crate) async fn before_write(
        &self,
        set: &BitmapSet,
        file: &NodeRef,
        meta: &tokio::sync::Mutex<Meta>,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let need = {
            let mut st = self.lock();
            // Under our lock, so a write-out's snapshot of the set and the copies agree.
            set.mark(offset, len);
            if !st.active && st.copies.is_empty() {
                Need::Nothing
            } else if st.stale {
                Need::Withdraw
            } else {
                let page = st.page();
                let mut changed = false;
                for c in st.copies.iter_mut() {
                    if set.is_recording(&c.name) {
                        changed |= c.mark(offset, len, page);
                    }
                }
                if changed {
                    st.requested += 1;
                }
                let grown = set.grow_count() != st.grown_seen;
                let behind = st.durable < st.requested;
                if grown || (behind && set.change_count() != st.changed_seen) {
                    // Bits set by merges must be on disk first; cleared bits ride along
                    // with a flush this write pays for anyway.
                    Need::WriteOut
                } else if behind {
                    Need::Sync(st.requested)
                } else {
                    Need::Nothing
                }
            }
        };
        match need {
            Need::Nothing => Ok(()),
            Need::Sync(target) => self.sync_to(file, target).await,
            Need::WriteOut => self.write_out(set, file, false).await,
            Need::Withdraw => self.withdraw(meta).await,
        }
    }

    /// Write the pending pages and flush, unless generation `target` is durable already
    /// (another writer's flush covered it).
    async fn sync_to(&self, file: &NodeRef, target: u64) -> Result<()> {
        let _io = self.io.lock().await;
        let (gen_, batch) = {
            let mut st = self.lock();
            if st.durable >= target || st.copies.is_empty() {
                return Ok(());
            }
            (st.requested, st.take_dirty())
        };
        self.write_pages(file, gen_, batch).await
    }

    /// Bring the copies to the live bits (set bits from merges, cleared bits from clears
    /// and successful backups) and make them durable. Called at flush, and before a write
    /// when bits were set other than by writes.
    pub(crate) async fn write_out(
        &self,
        set: &BitmapSet,
        file: &NodeRef,
        force: bool,
    ) -> Result<()> {
        let _io = self.io.lock().await;
        let (gen_, batch) = {
            let mut st = self.lock();
            if st.copies.is_empty() || st.stale {
                return Ok(());
            }
            let (grown, changed) = (set.grow_count(), set.change_count());
            if force || grown != st.grown_seen || changed != st.changed_seen {
                st.grown_seen = grown;
                st.changed_seen = changed;
                let page = st.page();
                let live = set.persistent_bitmaps();
                let mut any = false;
                for c in st.copies.iter_mut() {
                    if let Some(b) = live.iter().find(|b| b.name == c.name) {
                        let bytes = b.bitmap.serialize_part(0, c.bytes.len());
                        any |= c.replace(&bytes, page);
                    }
                }
                if any {
                    st.requested += 1;
                }
            }
            if st.durable >= st.requested {
                return Ok(());
            }
            (st.requested, st.take_dirty())
        };
        self.write_pages(file, gen_, batch).await
    }

    async fn write_pages(&self, file: &NodeRef, gen_: u64, batch: Batch) -> Result<()> {
        let res: Result<()> = async {
            for (off, data) in &batch.writes {
                file.write(*off, IoBuf::from_slice(data), WriteFlags::default())
                    .await?;
            }
            file.flush().await
        }
        .await;
        let mut st = self.lock();
        match res {
            Ok(()) => {
                st.durable = st.durable.max(gen_);
                Ok(())
            }
            Err(e) => {
                st.put_back(batch);
                Err(e)
            }
        }
    }

    /// Clear our bit on disk after a resize: from now on the bitmaps, still `in-use`, are
    /// inconsistent after an unclean stop (as QEMU's).
    async fn withdraw(&self, meta: &tokio::sync::Mutex<Meta>) -> Result<()> {
        let mut m = meta.lock().await;
        let _io = self.io.lock().await;
        if self.lock().active {
            m.h.autoclear_features &= !STRATA_WRITE_INTENT;
            m.write_header().await?;
            m.sync().await?;
        }
        let mut st = self.lock();
        st.active = false;
        st.adoptable = false;
        st.copies.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(bits: u64) -> DiskCopy {
        DiskCopy::new("b", 16, bits, vec![0; 8192], vec![1 << 20, 2 << 20])
    }

    #[test]
    fn mark_sets_bits_and_dirty_pages_once() {
        let mut c = copy(65536);
        // Granules 1..=17 (64 KiB each).
        assert!(c.mark(65536, 17 * 65536, 4096));
        assert_eq!(c.bytes[0], 0xfe);
        assert_eq!(c.bytes[1], 0xff);
        assert_eq!(c.bytes[2], 0x03);
        assert_eq!(c.dirty.iter().copied().collect::<Vec<_>>(), vec![0]);
        assert!(!c.mark(65536, 65536, 4096), "already set: nothing to do");
        // Past the end of the disk: clamped.
        assert!(c.mark(65535 * 65536, 10 * 65536, 4096));
        assert_eq!(c.bytes[8191], 0x80);
    }

    #[test]
    fn dirty_pages_map_to_their_clusters() {
        let mut st = State {
            active: true,
            cluster_size: 4096,
            copies: vec![copy(65536)],
            ..State::default()
        };
        st.copies[0].mark(4096 * 8 * 65536, 65536, 4096);
        let b = st.take_dirty();
        assert_eq!(b.writes.len(), 1);
        assert_eq!(
            b.writes[0].0,
            2 << 20,
            "second page lives in the second cluster"
        );
        assert_eq!(b.writes[0].1[0], 1);
        st.put_back(b);
        assert_eq!(st.copies[0].dirty.len(), 1);
    }
}
