//! Emptying an image (QEMU's `qcow2_make_empty`), as `qemu-img commit` does to the top image
//! after copying its data down: afterwards every guest cluster is unallocated, so reads go
//! to the backing file.
//!
//! Two ways, as QEMU:
//! - a v3 image without snapshots, bitmaps or external data file is rebuilt in place
//!   (`make_completely_empty`): header, refcount table, one refcount block and an empty L1
//!   table in the first clusters, the file truncated behind them;
//! - any other image has every cluster discarded to "unallocated" (full discard), which
//!   keeps the clusters snapshots still reference.

use strata_core::{BlockNode, Error, ErrorKind, IoBuf, Prealloc, Result, WriteFlags};

use crate::header::incompat;
use crate::meta::{Meta, Slot};
use crate::node::Qcow2;

impl Qcow2 {
    /// Make every guest cluster unallocated (QEMU's `bdrv_make_empty` for qcow2).
    ///
    /// No data request may be in flight (the CLI calls it on an otherwise idle image).
    pub async fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        if self.min_active_epoch() != u64::MAX {
            return Err(Error::new(
                ErrorKind::Io(libc::EBUSY),
                "Cannot empty an image with requests in flight",
            ));
        }
        let fast = {
            let m = self.meta.lock().await;
            let l1_clusters = (m.l1.len() as u64 * 8).div_ceil(self.cs);
            m.h.version >= 3
                && m.h.nb_snapshots == 0
                && m.h.bitmaps.is_none()
                && self.bitmaps.is_empty()
                && !m.h.has_data_file()
                && 3 + l1_clusters <= m.rb_entries
        };
        if fast {
            self.make_completely_empty().await
        } else {
            self.discard_all().await
        }
    }

    /// Rebuild the metadata of an image as freshly created (same L1 size).
    async fn make_completely_empty(&self) -> Result<()> {
        // Nothing queued may be applied to the rebuilt refcounts later.
        self.do_flush().await?;
        let mut m = self.meta.lock().await;
        let r = rebuild_empty(&mut m).await;
        match r {
            Ok(end) => {
                drop(m);
                self.file.truncate(end, Prealloc::Off).await
            }
            Err(e) => Err(self.signal(&mut m, e).await),
        }
    }

    /// Set every L2 entry to "unallocated" and free what it pointed to (QEMU's
    /// `qcow2_cluster_discard` with `full_discard`), one L2 table at a time.
    async fn discard_all(&self) -> Result<()> {
        let cs = self.cs;
        let end = self.size().div_ceil(cs);
        let l2n = self.header().l2_entries();
        let mut gci = 0;
        while gci < end {
            let chunk_end = ((gci / l2n + 1) * l2n).min(end);
            let mut m = self.lock_clusters(gci, chunk_end).await;
            let epoch = self.bump_epoch();
            let r: Result<()> = async {
                let (l1i, _) = m.split_cluster(gci);
                let Some(l2) = m.l2_offset(l1i)? else {
                    return Ok(());
                };
                m.load_l2(l2).await?;
                for g in gci..chunk_end {
                    let (l1i, l2i) = m.split_cluster(g);
                    let l2 = m
                        .l2_offset(l1i)?
                        .ok_or_else(|| Error::corrupt("L2 table vanished while emptying"))?;
                    m.load_l2(l2).await?;
                    let s = m.slot(l2, l2i);
                    if s == Slot::default() {
                        continue;
                    }
                    // Copies a table shared with a snapshot before changing it.
                    let l2 = m.writable_l2(l1i, epoch).await?;
                    m.set_slot(l2, l2i, Slot::default());
                    m.free_slot(s, epoch);
                }
                Ok(())
            }
            .await;
            if let Err(e) = r {
                return Err(self.signal(&mut m, e).await);
            }
            drop(m);
            gci = chunk_end;
        }
        self.do_flush().await
    }
}

/// Lay out header, refcount table (cluster 1), refcount block (cluster 2) and a zeroed L1
/// table (cluster 3 on) and make the in-memory state match; returns the new file length.
///
/// Crash safety as QEMU: the dirty bit is set first, so an interrupted rebuild leaves an
/// image whose refcounts are repaired on the next open (the data may be lost, which is
/// what emptying wants anyway).
async fn rebuild_empty(m: &mut Meta) -> Result<u64> {
    let cs = m.cs;
    let l1_bytes = m.l1.len() as u64 * 8;
    let l1_clusters = l1_bytes.div_ceil(cs);
    let was_dirty = m.h.incompatible_features & incompat::DIRTY != 0;
    if !was_dirty {
        m.set_dirty(true).await?;
    }
    // The old L1 first: with the dirty bit set, nothing else matters if we stop here.
    if l1_bytes > 0 {
        m.write_at(m.h.l1_table_offset, &vec![0u8; l1_bytes as usize])
            .await?;
    }
    // Forget the cached tables without writing them back.
    while let Some((off, _)) = m.l2.lru() {
        m.l2.remove(off);
    }
    while let Some((off, _)) = m.rb.lru() {
        m.rb.remove(off);
    }
    m.pending.clear();
    m.incr_unsynced = false;
    let area = (2 + l1_clusters)
        .checked_mul(cs)
        .ok_or_else(|| Error::invalid("L1 table too large"))?;
    m.file
        .debug_event(strata_core::DebugEvent::EmptyImagePrepare);
    m.file
        .write(cs, IoBuf::zeroed(area as usize), WriteFlags::default())
        .await?;
    m.sync().await?;
    m.file.debug_event(strata_core::DebugEvent::L1Update);
    m.file.debug_event(strata_core::DebugEvent::ReftableUpdate);
    m.h.l1_table_offset = 3 * cs;
    m.h.refcount_table_offset = cs;
    m.h.refcount_table_clusters = 1;
    m.write_header().await?;
    m.sync().await?;
    m.write_at(cs, &(2 * cs).to_be_bytes()).await?;
    m.sync().await?;
    let mut rt = vec![0u64; (cs / 8) as usize];
    rt[0] = 2 * cs;
    m.rt = rt;
    m.l1.iter_mut().for_each(|e| *e = 0);
    m.mapping_changed();
    let end = (3 + l1_clusters) * cs;
    m.file_end = end;
    m.free_hint = 0;
    m.free_byte_offset = 0;
    // Refcount 1 for header, refcount table, refcount block and L1 table.
    let off = m.alloc_clusters(3 + l1_clusters).await?;
    if off != 0 {
        return Err(Error::corrupt("Rebuilt refcounts are not empty"));
    }
    m.write_dirty_rbs().await?;
    m.sync().await?;
    m.incr_unsynced = false;
    if !was_dirty {
        m.set_dirty(false).await?;
    }
    m.publish();
    Ok(end)
}
