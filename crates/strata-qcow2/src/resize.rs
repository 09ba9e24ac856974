//! Resize: grow (with L1 growth and optional preallocation) and shrink (freeing clusters
//! past the new end and truncating the file), as QEMU's `qcow2_co_truncate`.

use std::sync::atomic::Ordering;

use strata_core::{
    BlockNode, Error, ErrorKind, IoBuf, NodeRef, Prealloc, Result, WriteFlags, ZeroFlags,
};

use crate::entry::{self, ClusterType};
use crate::meta::{Meta, PendingFree, Slot};
use crate::node::Qcow2;

impl Meta {
    /// Replace the L1 table with one of exactly `entries` entries (growing only).
    pub(crate) async fn grow_l1(&mut self, entries: u64) -> Result<()> {
        let old_len = self.l1.len() as u64;
        if entries <= old_len {
            return Ok(());
        }
        let bytes = entries * 8;
        if bytes > crate::header::MAX_L1_SIZE_BYTES {
            return Err(Error::from_errno(libc::EFBIG, "L1 table too large"));
        }
        let clusters = bytes.div_ceil(self.cs);
        self.file
            .debug_event(strata_core::DebugEvent::L1GrowAllocTable);
        let off = self.alloc_clusters(clusters).await?;
        self.check_overlap(off, clusters * self.cs, true)?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let data: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.sync_increments().await?;
        self.file
            .debug_event(strata_core::DebugEvent::L1GrowWriteTable);
        self.write_at(off, &data).await?;
        self.sync().await?;
        let old_off = self.h.l1_table_offset;
        self.file
            .debug_event(strata_core::DebugEvent::L1GrowActivateTable);
        self.h.l1_table_offset = off;
        self.h.l1_size = entries as u32;
        self.write_header().await?;
        self.sync().await?;
        self.l1 = l1;
        self.mapping_changed();
        if old_len > 0 {
            self.pending.push(PendingFree {
                cluster: old_off / self.cs,
                count: (old_len * 8).div_ceil(self.cs),
                epoch: 0,
            });
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Grow or shrink the guest size.
    pub(crate) async fn resize(&self, new_size: u64, prealloc: Prealloc) -> Result<()> {
        self.check_writable()?;
        let old_size = self.size();
        let cs = self.cs;
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        if new_size != old_size {
            // Bitmaps follow the size (they are stored at close); inconsistent ones block it.
            self.bitmaps.check_resize(new_size, cs)?;
        }
        if new_size < old_size {
            if prealloc != Prealloc::Off {
                return Err(Error::invalid(
                    "Preallocation can only be used for growing images",
                ));
            }
            // Internal snapshots keep their clusters through their refcounts, so shrinking
            // is safe with them (QEMU 10 allows it too).
            return self.shrink(old_size, new_size).await;
        }
        {
            let mut m = self.meta.lock().await;
            let entries = m.h.l1_entries_for_size(new_size);
            if entries > i32::MAX as u64 || entries * 8 > crate::header::MAX_L1_SIZE_BYTES {
                return Err(Error::invalid(
                    "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
                ));
            }
            m.grow_l1(entries).await?;
            m.h.size = new_size;
            m.write_header().await?;
            m.sync().await?;
            self.size.store(new_size, Ordering::Release);
            m.mapping_changed();
            self.bitmaps.resized(new_size);
        }
        if let Some(df) = &self.data_file
            && df.size() < new_size
            && prealloc == Prealloc::Off
        {
            // Data clusters live at their guest offsets: the data file covers the disk.
            df.truncate(new_size, Prealloc::Off).await?;
        }
        if prealloc != Prealloc::Off && new_size > old_size {
            self.preallocate(old_size - old_size % cs, new_size, prealloc)
                .await?;
        }
        Ok(())
    }

    async fn shrink(&self, old_size: u64, new_size: u64) -> Result<()> {
        let cs = self.cs;
        // Zero the tail of the last partial cluster so a later grow cannot expose old data.
        if !new_size.is_multiple_of(cs) {
            let tail_end = new_size.next_multiple_of(cs).min(old_size);
            if tail_end > new_size {
                self.do_write_zeroes(new_size, tail_end - new_size, Default::default())
                    .await?;
            }
        }
        let first = new_size.div_ceil(cs);
        let end = old_size.div_ceil(cs);
        let mut m = self.lock_clusters(first, end).await;
        let epoch = self.bump_epoch();
        for gci in first..end {
            let (l1i, l2i) = m.split_cluster(gci);
            let Some(l2) = m.l2_offset(l1i)? else {
                continue;
            };
            m.load_l2(l2).await?;
            let s = m.slot(l2, l2i);
            if s == Slot::default() {
                continue;
            }
            let l2 = m.writable_l2(l1i, epoch).await?;
            m.set_slot(l2, l2i, Slot::default());
            m.free_slot(s, epoch);
        }
        // L2 tables wholly past the end go too.
        let keep = m.h.l1_entries_for_size(new_size);
        for l1i in keep..m.l1.len() as u64 {
            if let Some(off) = m.l2_offset(l1i)? {
                m.l1[l1i as usize] = 0;
                m.mapping_changed();
                m.file
                    .debug_event(strata_core::DebugEvent::L1ShrinkWriteTable);
                m.write_l1_entry(l1i).await?;
                m.l2.remove(off);
                m.file
                    .debug_event(strata_core::DebugEvent::L1ShrinkFreeL2Clusters);
                m.free_range(off, cs, epoch);
            }
        }
        m.h.size = new_size;
        m.write_header().await?;
        m.sync().await?;
        self.size.store(new_size, Ordering::Release);
        m.mapping_changed();
        self.bitmaps.resized(new_size);
        drop(m);
        self.do_flush().await?;
        // Give the file back everything past the last cluster in use.
        let mut m = self.meta.lock().await;
        if m.pending.is_empty() {
            let mut last = m.file_end / cs;
            while last > 0 && m.get_refcount(last - 1).await? == 0 {
                last -= 1;
            }
            let new_end = last * cs;
            if new_end < self.file.size() {
                self.file.truncate(new_end, Prealloc::Off).await?;
            }
            m.file_end = new_end;
            m.free_hint = m.free_hint.min(last);
        }
        Ok(())
    }

    /// Allocate data clusters for guest `[from, to)` that have none (QEMU's
    /// `preallocate_co`), then extend the file with `mode`.
    pub(crate) async fn preallocate(&self, from: u64, to: u64, mode: Prealloc) -> Result<()> {
        let cs = self.cs;
        let external = self.fmt.external_data_file;
        let first = from / cs;
        let end = to.div_ceil(cs);
        let mut m = self.lock_clusters(first, end).await;
        let epoch = self.bump_epoch();
        let l2n = m.h.l2_entries();
        let mut gci = first;
        while gci < end {
            let chunk_end = ((gci / l2n + 1) * l2n).min(end);
            // The L2 table first, then its data clusters (QEMU's allocation order).
            m.writable_l2(gci / l2n, epoch).await?;
            // Clusters of this L2 table that need a host cluster.
            let mut need = Vec::new();
            for g in gci..chunk_end {
                let s = m.get_slot(g).await?;
                if matches!(
                    self.fmt.cluster_type(s.entry),
                    ClusterType::Unallocated | ClusterType::ZeroPlain
                ) {
                    need.push(g);
                }
            }
            let mut i = 0;
            while i < need.len() {
                let mut j = i + 1;
                while j < need.len() && need[j] == need[j - 1] + 1 {
                    j += 1;
                }
                let n = (j - i) as u64;
                let old_end = m.file_end;
                let base = if external {
                    need[i] * cs
                } else {
                    m.alloc_clusters(n).await?
                };
                if !external && matches!(mode, Prealloc::Falloc | Prealloc::Full) {
                    // The data area gets its host space now (and reads as zeroes, whatever
                    // reused clusters held), as QEMU's truncate does for these modes.
                    prealloc_area(&m.file, base, n * cs, mode).await?;
                } else if !external && base < old_end {
                    // Reused clusters may hold old data: preallocated space reads as zeroes.
                    let zero_len = (old_end - base).min(n * cs);
                    let _ = m
                        .file
                        .write(
                            base,
                            IoBuf::zeroed(zero_len as usize),
                            WriteFlags::default(),
                        )
                        .await?;
                }
                for (k, g) in need[i..j].iter().enumerate() {
                    let (l1i, l2i) = m.split_cluster(*g);
                    let l2 = m.writable_l2(l1i, epoch).await?;
                    // With subclusters the clusters stay "unallocated but reserved" (reads
                    // still go to the backing file), as QEMU does.
                    let bitmap = 0;
                    m.set_slot(
                        l2,
                        l2i,
                        Slot {
                            entry: (base + k as u64 * cs) | entry::COPIED,
                            bitmap,
                        },
                    );
                }
                i = j;
            }
            gci = chunk_end;
        }
        // Like QEMU, extend the file to the end of the last preallocated mapping.
        let last = m.get_slot(end - 1).await?;
        let target = if external {
            to
        } else {
            self.fmt.host_cluster(last.entry) + (to - (end - 1) * cs)
        };
        let node = self.data_node().clone();
        drop(m);
        if node.size() < target {
            let mode = if mode == Prealloc::Metadata {
                Prealloc::Off
            } else {
                mode
            };
            node.truncate(target, mode).await.map_err(|e| {
                if e.kind() == ErrorKind::Unsupported {
                    Error::unsupported(format!(
                        "Preallocation mode '{}' unsupported",
                        mode.as_str()
                    ))
                } else {
                    e
                }
            })?;
        }
        self.do_flush().await
    }
}

/// Give `[off, off + len)` of `file` host space that reads as zeroes: reserved (`falloc`;
/// written zeroes where the file cannot reserve) or written with zeroes (`full`).
async fn prealloc_area(file: &NodeRef, off: u64, len: u64, mode: Prealloc) -> Result<()> {
    if mode == Prealloc::Falloc {
        return file.write_zeroes(off, len, ZeroFlags::default()).await;
    }
    const CHUNK: u64 = 4 << 20;
    let mut pos = off;
    while pos < off + len {
        let n = CHUNK.min(off + len - pos);
        file.write(pos, IoBuf::zeroed(n as usize), WriteFlags::default())
            .await?;
        pos += n;
    }
    Ok(())
}
