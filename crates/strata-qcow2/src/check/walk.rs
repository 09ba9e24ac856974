//! Counting references: walk every structure that uses host clusters (header, L1/L2 of the
//! active image and of each snapshot, snapshot table, refcount table and blocks, crypto
//! header, bitmaps) into an in-memory refcount table, checking entries on the way
//! (QEMU's `calculate_refcounts` and helpers).

use strata_core::{Prealloc, Result};

use super::Fix;
use super::image::{Image, REFT_OFFSET_MASK, REFT_RESERVED_MASK, errno_error, hash_x};
use super::imrt::Imrt;
use super::refblock;
use crate::entry::{ALL_ALLOC, ALL_ZERO, COPIED, ClusterType, L1_RESERVED_MASK, OFFSET_MASK, ZERO};

/// Reserved bits of a standard L2 entry, as QEMU's check tests them.
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Offset bits of a bitmap table entry.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry.
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Largest bitmap table (entries).
const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Largest bitmap data (bytes).
const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Most growth a repair may give the file when a refcount block lies outside it (beyond
/// doubling the file): QEMU grows a sparse file without limit, but an in-memory or hostile
/// image must not make us allocate gigabytes.
const MAX_REPAIR_GROWTH: u64 = 64 << 20;

impl Image {
    /// Account for visiting `entries` L2 entries; fails once the work bound is used up.
    pub fn spend(&mut self, entries: u64) -> Result<()> {
        self.budget = self.budget.checked_sub(entries).ok_or_else(|| {
            strata_core::Error::new(
                strata_core::ErrorKind::Io(libc::EFBIG),
                "File too large (the image references more than 2^30 L2 entries)",
            )
        })?;
        Ok(())
    }

    /// Count a reference to every cluster of `[offset, offset + size)`
    /// (QEMU's `qcow2_inc_refcounts_imrt`).
    pub fn inc(&mut self, t: &mut Imrt, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let file_len = self.file_len();
        // The last cluster may be partly beyond the end of the file, but not by a cluster.
        if i128::from(offset) + i128::from(size) - i128::from(file_len) >= i128::from(self.cs) {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ));
            self.res.corruptions += 1;
            return Ok(());
        }
        let first = offset >> self.cbits;
        let last = (offset + size - 1) >> self.cbits;
        let max = refblock::max(self.order);
        for k in first..=last {
            if k >= t.len() {
                t.grow(k + 1)?;
            }
            let r = t.get(k);
            if r >= max {
                self.msg(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.cbits
                ));
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img \
                     convert to create a clean copy if the image cannot be opened for writing",
                );
                self.res.corruptions += 1;
                continue;
            }
            t.set(k, r + 1);
        }
        Ok(())
    }

    /// Walk one L1 table (QEMU's `check_refcounts_l1`).
    pub async fn check_l1(
        &mut self,
        t: &mut Imrt,
        l1_offset: u64,
        l1_size: u32,
        frag: bool,
        fix: Fix,
        active: bool,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc(t, l1_offset, u64::from(l1_size) * 8)?;
        let l1 = if active {
            self.l1.clone()
        } else {
            self.read_table(l1_offset, u64::from(l1_size)).await?
        };
        for e in l1 {
            if e == 0 {
                continue;
            }
            if e & L1_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                self.res.corruptions += 1;
            }
            let l2_offset = e & OFFSET_MASK;
            self.inc(t, l2_offset, self.cs)?;
            if l2_offset & (self.cs - 1) != 0 {
                self.msg(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.res.corruptions += 1;
            }
            self.check_l2(t, l2_offset, frag, fix, active).await?;
        }
        Ok(())
    }

    /// Walk one L2 table (QEMU's `check_refcounts_l2`).
    async fn check_l2(
        &mut self,
        t: &mut Imrt,
        l2_offset: u64,
        frag: bool,
        fix: Fix,
        active: bool,
    ) -> Result<()> {
        let esize = self.fmt.entry_size();
        // Entries past the end of the file read as zero and mean nothing: skip them.
        let mut table = self.read_clamped(l2_offset, self.cs).await?;
        let n = table.len() as u64 / esize;
        self.spend(n)?;
        let mut next_contiguous = 0u64;
        for i in 0..n as usize {
            let at = i * esize as usize;
            let entry = u64::from_be_bytes(table[at..at + 8].try_into().unwrap());
            let bitmap = if self.fmt.extended_l2 {
                u64::from_be_bytes(table[at + 8..at + 16].try_into().unwrap())
            } else {
                0
            };
            let ty = self.fmt.cluster_type(entry);
            if ty != ClusterType::Compressed && entry & L2E_STD_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
                self.res.corruptions += 1;
            }
            match ty {
                ClusterType::Compressed => {
                    let d = self.fmt.compressed(entry);
                    if entry & COPIED != 0 {
                        self.msg(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            d.host_offset
                        ));
                        self.res.corruptions += 1;
                    }
                    if self.h.has_data_file() {
                        self.msg(format!(
                            "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        self.msg(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation \
                             bitmap, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    self.inc(t, d.host_offset, d.byte_len())?;
                    if frag {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        // Compressed clusters are fragmented by nature.
                        self.res.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let offset = entry & OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.res.corruptions += 1;
                        self.msg(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster \
                             allocation bitmap"
                        ));
                    }
                    if offset & (self.cs - 1) != 0 {
                        self.res.corruptions += 1;
                        let contains_data = if self.fmt.extended_l2 {
                            bitmap & ALL_ALLOC != 0
                        } else {
                            entry & ZERO == 0
                        };
                        if !contains_data {
                            self.msg(format!(
                                "{} offset={offset:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted.",
                                Image::verb(fix.errors)
                            ));
                            if fix.errors {
                                // Make the entry read as zero without a host cluster.
                                let (e, b) = if self.fmt.extended_l2 {
                                    (0, (bitmap | (bitmap << 32)) & ALL_ZERO)
                                } else {
                                    (ZERO, 0)
                                };
                                table[at..at + 8].copy_from_slice(&e.to_be_bytes());
                                if self.fmt.extended_l2 {
                                    table[at + 8..at + 16].copy_from_slice(&b.to_be_bytes());
                                }
                                let bytes = table[at..at + esize as usize].to_vec();
                                let pos = l2_offset + at as u64;
                                if self.write_blocked(pos, esize, active).await? {
                                    self.msg("ERROR: Overlap check failed");
                                    self.res.check_errors += 1;
                                    return Err(errno_error(libc::EIO));
                                }
                                match self.write(pos, &bytes).await {
                                    Ok(()) => {
                                        self.res.corruptions -= 1;
                                        self.res.corruptions_fixed += 1;
                                        continue;
                                    }
                                    Err(e) => {
                                        self.msg(format!(
                                            "ERROR: Failed to overwrite L2 table entry: {}",
                                            e.message()
                                        ));
                                        self.res.check_errors += 1;
                                    }
                                }
                            }
                        } else {
                            self.msg(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; \
                                 L2 entry corrupted."
                            ));
                        }
                    }
                    if frag {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(self.cs);
                    }
                    if !self.h.has_data_file() {
                        self.inc(t, offset, self.cs)?;
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & ALL_ALLOC != 0 {
                        self.res.corruptions += 1;
                        self.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map",
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Which metadata `[offset, offset + size)` overlaps, if any (QEMU's
    /// `qcow2_check_metadata_overlap` in its default "cached" mode; the active L2 tables are
    /// ignored when `ignore_active_l2`).
    pub fn overlap(&self, offset: u64, size: u64, ignore_active_l2: bool) -> Option<&'static str> {
        if size == 0 {
            return None;
        }
        if offset < self.cs {
            return Some("qcow2_header");
        }
        let start = offset & !(self.cs - 1);
        let end = (offset.saturating_add(size)).next_multiple_of(self.cs);
        let hits = |o: u64, len: u64| len != 0 && o < end && start < o.saturating_add(len);
        if hits(self.h.l1_table_offset, u64::from(self.h.l1_size) * 8) {
            return Some("active L1 table");
        }
        if hits(self.h.refcount_table_offset, self.reftable_size * 8) {
            return Some("refcount table");
        }
        if hits(self.h.snapshots_offset, self.snapshots_size) {
            return Some("snapshot table");
        }
        if self
            .snapshots
            .iter()
            .any(|s| hits(s.l1_offset, u64::from(s.l1_size) * 8))
        {
            return Some("inactive L1 table");
        }
        if !ignore_active_l2
            && self
                .l1
                .iter()
                .any(|&e| e & OFFSET_MASK != 0 && hits(e & OFFSET_MASK, self.cs))
        {
            return Some("active L2 table");
        }
        if self
            .reftable
            .iter()
            .any(|&e| e & REFT_OFFSET_MASK != 0 && hits(e & REFT_OFFSET_MASK, self.cs))
        {
            return Some("refcount block");
        }
        if let Some(b) = &self.h.bitmaps
            && hits(b.bitmap_directory_offset, b.bitmap_directory_size)
        {
            return Some("bitmap directory");
        }
        None
    }

    /// Count and check the refcount blocks (QEMU's `check_refblocks`).
    async fn check_refblocks(&mut self, t: &mut Imrt, fix: Fix, rebuild: &mut bool) -> Result<()> {
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            let offset = raw & REFT_OFFSET_MASK;
            let cluster = offset >> self.cbits;
            if raw & REFT_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if offset & (self.cs - 1) != 0 {
                self.msg(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= t.len() {
                self.res.corruptions += 1;
                self.msg(format!(
                    "{} refcount block {i} is outside image",
                    Image::verb(fix.errors)
                ));
                if fix.errors {
                    match self.grow_file_for(t, offset).await? {
                        Ok(()) => {
                            self.res.corruptions -= 1;
                            self.res.corruptions_fixed += 1;
                            self.inc(t, offset, self.cs)?;
                            continue;
                        }
                        Err(reason) => {
                            *rebuild = true;
                            self.msg(format!("ERROR could not resize image: {reason}"));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc(t, offset, self.cs)?;
                let r = t.get(cluster);
                if r != 1 {
                    self.msg(format!("ERROR refcount block {i} refcount={r}"));
                    self.res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Extend the file so that the cluster at `offset` is inside it; `Ok(Err(reason))` when
    /// that is refused.
    async fn grow_file_for(
        &mut self,
        t: &mut Imrt,
        offset: u64,
    ) -> Result<std::result::Result<(), String>> {
        let new_len = match offset.checked_add(self.cs) {
            Some(l) if l <= i64::MAX as u64 => l,
            _ => return Ok(Err(errno_error(libc::EINVAL).message().to_string())),
        };
        let limit = self
            .file_len()
            .saturating_add(MAX_REPAIR_GROWTH.max(self.file_len()));
        let refused = if new_len > limit {
            Some(errno_error(libc::EFBIG).message().to_string())
        } else {
            match self.file.truncate(new_len, Prealloc::Off).await {
                Ok(()) => None,
                Err(e) => Some(e.message().to_string()),
            }
        };
        if let Some(why) = refused {
            self.msg(format!("qemu-img: Could not resize file: {why}"));
            return Ok(Err(why));
        }
        let clusters = self.file_len().div_ceil(self.cs);
        t.grow(clusters)?;
        if offset >> self.cbits >= t.len() {
            return Ok(Err(errno_error(libc::EINVAL).message().to_string()));
        }
        Ok(Ok(()))
    }

    /// Count the bitmaps' directory, tables and data clusters
    /// (QEMU's `qcow2_check_bitmaps_refcounts`).
    async fn check_bitmaps(&mut self, t: &mut Imrt) -> Result<()> {
        let Some(ext) = self.h.bitmaps else {
            return Ok(());
        };
        self.inc(t, ext.bitmap_directory_offset, ext.bitmap_directory_size)?;
        let dir = self
            .read_clamped(ext.bitmap_directory_offset, ext.bitmap_directory_size)
            .await?;
        let Some(tables) = self.parse_bitmap_dir(&dir, ext.bitmap_directory_size, ext.nb_bitmaps)
        else {
            self.res.corruptions += 1;
            return Err(errno_error(libc::EINVAL));
        };
        for (offset, size) in tables {
            self.inc(t, offset, size * 8)?;
            let table = self.read_table(offset, size).await?;
            for e in table {
                let off = e & BME_OFFSET_MASK;
                let bad = e & BME_RESERVED_MASK != 0
                    || (off != 0 && (e & 1 != 0 || off & (self.cs - 1) != 0));
                if bad {
                    self.res.corruptions += 1;
                    continue;
                }
                if off != 0 {
                    self.inc(t, off, self.cs)?;
                }
            }
        }
        Ok(())
    }

    /// The `(table offset, table entries)` of every bitmap directory entry, or `None` if the
    /// directory is malformed (QEMU's `bitmap_list_load` and `check_dir_entry`).
    pub fn parse_bitmap_dir(
        &self,
        dir: &[u8],
        size: u64,
        expected: u32,
    ) -> Option<Vec<(u64, u64)>> {
        let byte = |o: u64| {
            usize::try_from(o)
                .ok()
                .and_then(|o| dir.get(o))
                .copied()
                .unwrap_or(0)
        };
        let be = |o: u64, n: u64| (0..n).fold(0u64, |a, i| (a << 8) | u64::from(byte(o + i)));
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            if size - pos < 24 {
                return None;
            }
            let table_offset = be(pos, 8);
            let table_size = be(pos + 8, 4);
            let flags = be(pos + 12, 4);
            let ty = be(pos + 16, 1);
            let gran = be(pos + 17, 1);
            let name_size = be(pos + 18, 2);
            let extra = be(pos + 20, 4);
            let len = (24 + extra + name_size).next_multiple_of(8);
            if len > size - pos {
                return None;
            }
            let bad = table_size == 0
                || table_offset == 0
                || table_offset & (self.cs - 1) != 0
                || table_size > BME_MAX_TABLE_SIZE
                || !(9..=31).contains(&gran)
                || flags & !3 != 0
                || name_size > 1023
                || ty != 1;
            // The table must cover the whole disk and stay within QEMU's size limit.
            let phys = table_size * self.cs;
            let covered = (u128::from(phys) * 8) << gran.min(31);
            if bad || phys > BME_MAX_PHYS_SIZE || u128::from(self.h.size) > covered {
                return None;
            }
            out.push((table_offset, table_size));
            pos += len;
        }
        (out.len() as u64 == u64::from(expected)).then_some(out)
    }

    /// Count every reference in the image (QEMU's `calculate_refcounts`).
    pub async fn calculate(&mut self, t: &mut Imrt, fix: Fix, rebuild: &mut bool) -> Result<()> {
        // Header.
        self.inc(t, 0, self.cs)?;
        // Active L1 table.
        self.check_l1(t, self.h.l1_table_offset, self.h.l1_size, true, fix, true)
            .await?;
        // Snapshots.
        if self.h.has_data_file() && !self.snapshots.is_empty() {
            self.msg(format!(
                "ERROR {} snapshots in image with data file",
                self.snapshots.len()
            ));
            self.res.corruptions += 1;
        }
        for sn in self.snapshots.clone() {
            if sn.l1_offset & (self.cs - 1) != 0 {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    sn.id,
                    sn.name,
                    hash_x(sn.l1_offset)
                ));
                self.res.corruptions += 1;
                continue;
            }
            if u64::from(sn.l1_size) > (32 << 20) / 8 {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table \
                     entry corrupted",
                    sn.id,
                    sn.name,
                    hash_x(u64::from(sn.l1_size))
                ));
                self.res.corruptions += 1;
                continue;
            }
            self.check_l1(t, sn.l1_offset, sn.l1_size, false, fix, false)
                .await?;
        }
        self.inc(t, self.h.snapshots_offset, self.snapshots_size)?;
        // Refcount table.
        self.inc(t, self.h.refcount_table_offset, self.reftable_size * 8)?;
        // Encryption header.
        if let Some((off, len)) = self.h.crypto_header {
            self.inc(t, off, len)?;
        }
        self.check_bitmaps(t).await?;
        self.check_refblocks(t, fix, rebuild).await
    }
}
