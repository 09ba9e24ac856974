//! Comparing counted references with the refcount blocks, repairing them, rebuilding the
//! refcount structure, and the OFLAG_COPIED pass (QEMU's `compare_refcounts`,
//! `rebuild_refcount_structure`, `check_oflag_copied`).

use strata_core::Result;

use super::Fix;
use super::image::{Image, errno_error};
use super::imrt::Imrt;
use super::refblock;
use crate::entry::{COPIED, ClusterType, OFFSET_MASK};

impl Image {
    /// Compare counted references with on-disk refcounts, fixing what `fix` allows
    /// (QEMU's `compare_refcounts`). Returns the highest used cluster.
    pub async fn compare(&mut self, t: &Imrt, fix: Fix, rebuild: &mut bool) -> Result<u64> {
        let mut highest = 0;
        for i in 0..t.len() {
            let r1 = match self.disk_refcount(i).await? {
                Ok(r) => r,
                Err(errno) => {
                    let why = errno_error(errno);
                    self.msg(format!(
                        "Can't get refcount for cluster {i}: {}",
                        why.message()
                    ));
                    self.res.check_errors += 1;
                    continue;
                }
            };
            let r2 = t.get(i);
            if r1 > 0 || r2 > 0 {
                highest = i;
            }
            if r1 == r2 {
                continue;
            }
            let mut fixing = None;
            if r1 == 0 {
                *rebuild = true;
            } else if r1 > r2 && fix.leaks {
                fixing = Some(true);
            } else if r1 < r2 && fix.errors {
                fixing = Some(false);
            }
            let verb = match fixing {
                Some(_) => "Repairing",
                None if r1 < r2 => "ERROR",
                None => "Leaked",
            };
            self.msg(format!("{verb} cluster {i} refcount={r1} reference={r2}"));
            if let Some(is_leak) = fixing
                && self.set_disk_refcount(i, r2).await.is_ok()
            {
                if is_leak {
                    self.res.leaks_fixed += 1;
                } else {
                    self.res.corruptions_fixed += 1;
                }
                continue;
            }
            if r1 < r2 {
                self.res.corruptions += 1;
            } else {
                self.res.leaks += 1;
            }
        }
        Ok(highest)
    }

    /// Allocate `count` contiguous clusters in the in-memory table, at or after
    /// `*first_free` (QEMU's `alloc_clusters_imrt`). Returns the byte offset.
    fn alloc_imrt(&self, t: &mut Imrt, count: u64, first_free: &mut u64) -> Result<u64> {
        let mut cluster = *first_free;
        let mut first_gap = true;
        let mut run = 0;
        while cluster < t.len() && run < count {
            if t.get(cluster) == 0 {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            cluster += 1;
        }
        if run < count {
            t.grow(cluster + count - run)?;
        }
        cluster -= run;
        for i in 0..count {
            t.set(cluster + i, 1);
        }
        Ok(cluster << self.cbits)
    }

    /// The refcount block `index` as the in-memory table describes it.
    fn encode_block(&self, t: &Imrt, index: u64) -> Vec<u8> {
        let mut block = vec![0u8; self.cs as usize];
        let per = 1u64 << self.rb_bits;
        let max = refblock::max(self.order);
        for j in 0..per {
            let v = t.get(index * per + j);
            if v != 0 {
                refblock::set(&mut block, self.order, j as usize, v.min(max));
            }
        }
        block
    }

    /// Write the refcount blocks for clusters `[first, end)` (QEMU's
    /// `rebuild_refcounts_write_refblocks`). Returns whether `reftable` grew.
    async fn write_refblocks(
        &mut self,
        t: &mut Imrt,
        first: u64,
        mut end: u64,
        reftable: &mut Vec<u64>,
    ) -> Result<bool> {
        let mut first_free = 0;
        let mut grown = false;
        let per = 1u64 << self.rb_bits;
        let mut cluster = first;
        while cluster < end {
            if t.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> self.rb_bits;
            let start = index << self.rb_bits;
            let existing = usize::try_from(index)
                .ok()
                .and_then(|i| reftable.get(i))
                .copied()
                .unwrap_or(0);
            let off = if existing != 0 {
                existing
            } else {
                first_free = first_free.max(start);
                let off = self.alloc_imrt(t, 1, &mut first_free)?;
                end = end.max((off >> self.cbits) + 1);
                let idx = usize::try_from(index).map_err(|_| errno_error(libc::ENOMEM))?;
                if reftable.len() <= idx {
                    let entries = ((index + 1) * 8).next_multiple_of(self.cs) / 8;
                    reftable.resize(entries as usize, 0);
                    grown = true;
                }
                reftable[idx] = off;
                off
            };
            if self.write_blocked(off, self.cs, false).await? {
                self.msg("qemu-img: ERROR writing refblock: Input/output error");
                return Err(errno_error(libc::EIO));
            }
            let block = self.encode_block(t, index);
            self.write(off, &block).await?;
            cluster = start + per;
        }
        Ok(grown)
    }

    /// Build a new refcount structure from the in-memory table alone and point the header at
    /// it (QEMU's `rebuild_refcount_structure`). The old structure is leaked; the caller's
    /// second pass frees it.
    pub async fn rebuild(&mut self, t: &mut Imrt) -> Result<()> {
        let mut reftable = Vec::new();
        let len = t.len();
        self.write_refblocks(t, 0, len, &mut reftable).await?;
        let (offset, clusters) = loop {
            let bytes = reftable.len() as u64 * 8;
            let clusters = bytes.div_ceil(self.cs);
            let mut first_free = 0;
            let offset = self.alloc_imrt(t, clusters, &mut first_free)?;
            let start = offset >> self.cbits;
            if !self
                .write_refblocks(t, start, start + clusters, &mut reftable)
                .await?
            {
                break (offset, clusters);
            }
        };
        // New refblocks must not be judged by the old (possibly overlapping) table.
        let old = std::mem::take(&mut self.reftable);
        let old_size = self.reftable_size;
        let bytes: Vec<u8> = reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        if self
            .write_blocked(offset, bytes.len() as u64, false)
            .await?
        {
            self.reftable = old;
            self.reftable_size = old_size;
            self.msg("qemu-img: ERROR writing reftable: Input/output error");
            return Err(errno_error(libc::EIO));
        }
        self.write(offset, &bytes).await?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.write(48, &hdr).await?;
        self.file.flush().await?;
        self.h.refcount_table_offset = offset;
        self.h.refcount_table_clusters = clusters as u32;
        self.reftable_size = reftable.len() as u64;
        self.reftable = reftable;
        Ok(())
    }

    /// Check (and with `fix`, repair) the COPIED flags of the active L1 and L2 entries
    /// (QEMU's `check_oflag_copied`).
    pub async fn check_oflag_copied(&mut self, fix: Fix) -> Result<()> {
        let repair = if fix.errors {
            true
        } else if fix.leaks {
            // Only when the refcounts are known to be right by now.
            self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
        } else {
            false
        };
        let esize = self.fmt.entry_size() as usize;
        for i in 0..self.l1.len() {
            let l1e = self.l1[i];
            let l2_offset = l1e & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let Ok(r) = self.disk_refcount(l2_offset >> self.cbits).await? else {
                continue;
            };
            if (r == 1) != (l1e & COPIED != 0) {
                self.res.corruptions += 1;
                self.msg(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={r}",
                    Image::verb(repair)
                ));
                if repair {
                    let new = if r == 1 { l1e | COPIED } else { l1e & !COPIED };
                    self.l1[i] = new;
                    let pos = self.h.l1_table_offset + i as u64 * 8;
                    if let Err(e) = self.write(pos, &new.to_be_bytes()).await {
                        self.res.check_errors += 1;
                        return Err(e);
                    }
                    self.res.corruptions -= 1;
                    self.res.corruptions_fixed += 1;
                }
            }
            let mut table = self.read_clamped(l2_offset, self.cs).await?;
            self.spend((table.len() / esize) as u64)?;
            let mut dirty = 0;
            for j in 0..table.len() / esize {
                let at = j * esize;
                let e = u64::from_be_bytes(table[at..at + 8].try_into().unwrap());
                let ty = self.fmt.cluster_type(e);
                if ty != ClusterType::Normal && ty != ClusterType::ZeroAlloc {
                    continue;
                }
                let r = if self.h.has_data_file() {
                    1
                } else {
                    match self.disk_refcount((e & OFFSET_MASK) >> self.cbits).await? {
                        Ok(r) => r,
                        Err(_) => continue,
                    }
                };
                if (r == 1) != (e & COPIED != 0) {
                    self.res.corruptions += 1;
                    self.msg(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={r}",
                        Image::verb(repair)
                    ));
                    if repair {
                        let new = if r == 1 { e | COPIED } else { e & !COPIED };
                        table[at..at + 8].copy_from_slice(&new.to_be_bytes());
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if self.write_blocked(l2_offset, self.cs, true).await? {
                    self.msg(
                        "ERROR: Could not write L2 table; metadata overlap check failed: \
                         Input/output error",
                    );
                    self.res.check_errors += 1;
                    return Err(errno_error(libc::EIO));
                }
                if let Err(e) = self.write(l2_offset, &table).await {
                    self.msg(format!("ERROR: Could not write L2 table: {}", e.message()));
                    self.res.check_errors += 1;
                    return Err(e);
                }
                self.res.corruptions -= dirty;
                self.res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }
}
