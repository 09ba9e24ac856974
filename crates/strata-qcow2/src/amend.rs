//! Changing the options of an existing image in place (QEMU's `qcow2_amend_options`):
//! compat level (upgrade to 1.1, downgrade to 0.10), lazy refcounts, refcount width, the
//! external data file name and the raw flag, and the disk size.
//!
//! The order is QEMU's: upgrade first (later steps may need v3), then the refcount width,
//! the data file fields, lazy refcounts, the size, and the downgrade last (so that features
//! v2 lacks are gone by then).

use std::collections::HashSet;

use strata_core::{BlockNode, Error, ErrorKind, IoBuf, Prealloc, Result, WriteFlags};

use crate::entry::{self, ClusterType, L1Entry};
use crate::header::{CompressionType, MAX_REFTABLE_SIZE_BYTES, compat, incompat};
use crate::meta::Meta;
use crate::node::Qcow2;
use crate::refcount;
use crate::snapshot_ops::{flush_discard, read_table};

/// What to change; `None` leaves an option as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `Some(true)`: compat=1.1 (v3); `Some(false)`: compat=0.10 (v2).
    pub compat_v3: Option<bool>,
    /// Lazy refcounts on or off (v3 only).
    pub lazy_refcounts: Option<bool>,
    /// New refcount width in bits (a power of two up to 64; v2 only allows 16).
    pub refcount_bits: Option<u32>,
    /// New external data file name (images with a data file only; empty removes the name).
    pub data_file: Option<String>,
    /// Clear (or keep) the raw external data file flag; it cannot be set afterwards.
    pub data_file_raw: Option<bool>,
    /// New disk size in bytes.
    pub size: Option<u64>,
}

impl Qcow2 {
    /// Apply `o` with QEMU's checks and error texts.
    ///
    /// Meant for an otherwise idle image (as `qemu-img amend` uses it). The compression type
    /// used by later compressed writes of this handle is not changed by a downgrade; reopen
    /// the image after amending.
    pub async fn amend(&self, o: &AmendOptions) -> Result<()> {
        self.check_writable()?;
        if self.min_active_epoch() != u64::MAX {
            return Err(Error::new(
                ErrorKind::Io(libc::EBUSY),
                "Cannot amend an image with requests in flight",
            ));
        }
        let h = self.header();
        if let Some(b) = o.refcount_bits
            && (b == 0 || b > 64 || !b.is_power_of_two())
        {
            return Err(Error::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if o.data_file.is_some() && !h.has_data_file() {
            return Err(Error::invalid(
                "data-file can only be set for images that use an external data file",
            ));
        }
        if o.data_file_raw == Some(true) && !h.data_file_raw() {
            return Err(Error::invalid(
                "data-file-raw cannot be set on existing images",
            ));
        }
        let old_version = h.version;
        let new_version = match o.compat_v3 {
            Some(true) => 3,
            Some(false) => 2,
            None => old_version,
        };
        self.do_flush().await?;
        {
            let mut m = self.meta.lock().await;
            let r = self.amend_locked(&mut m, o, old_version, new_version).await;
            if let Err(e) = r {
                return Err(self.signal(&mut m, e).await);
            }
        }
        if let Some(size) = o.size
            && size != self.size()
        {
            self.resize(size, Prealloc::Off).await?;
        }
        if new_version < old_version {
            self.do_flush().await?;
            let mut m = self.meta.lock().await;
            if let Err(e) = self.downgrade(&mut m).await {
                return Err(self.signal(&mut m, e).await);
            }
        }
        Ok(())
    }

    /// Everything but the resize and the downgrade.
    async fn amend_locked(
        &self,
        m: &mut Meta,
        o: &AmendOptions,
        old_version: u32,
        new_version: u32,
    ) -> Result<()> {
        if new_version > old_version {
            upgrade(m).await?;
        }
        if let Some(bits) = o.refcount_bits
            && bits != m.rc_bits
        {
            if new_version < 3 && bits != 16 {
                return Err(Error::invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                ));
            }
            change_refcount_width(m, bits).await?;
        }
        if let Some(raw) = o.data_file_raw {
            if raw {
                m.h.autoclear_features |= crate::header::autoclear::DATA_FILE_RAW;
            } else {
                m.h.autoclear_features &= !crate::header::autoclear::DATA_FILE_RAW;
            }
        }
        if let Some(name) = &o.data_file {
            m.h.data_file = (!name.is_empty()).then(|| name.clone());
        }
        m.write_header().await?;
        m.sync().await?;
        if let Some(lazy) = o.lazy_refcounts
            && lazy != m.h.lazy_refcounts()
        {
            if lazy {
                if new_version < 3 {
                    return Err(Error::invalid(
                        "Lazy refcounts only supported with compatibility level 1.1 and above \
                         (use compat=1.1 or greater)",
                    ));
                }
                m.h.compatible_features |= compat::LAZY_REFCOUNTS;
                m.write_header().await?;
                m.sync().await?;
            } else {
                // Clean first: the refcounts on disk must be complete without the dirty bit.
                mark_clean(m).await?;
                m.h.compatible_features &= !compat::LAZY_REFCOUNTS;
                m.write_header().await?;
                m.sync().await?;
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_downgrade` to v2.
    async fn downgrade(&self, m: &mut Meta) -> Result<()> {
        if m.h.refcount_order != 4 {
            return Err(Error::unsupported("compat=0.10 requires refcount_bits=16"));
        }
        if m.h.has_data_file() {
            return Err(Error::unsupported(
                "Cannot downgrade an image with a data file",
            ));
        }
        let (snaps, _) = read_table(m).await?;
        if snaps
            .iter()
            .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size != m.h.size)
        {
            return Err(Error::unsupported(
                "Internal snapshots prevent downgrade of image",
            ));
        }
        mark_clean(m).await?;
        let other = m.h.incompatible_features & !incompat::COMPRESSION;
        if other != 0 {
            return Err(Error::unsupported(format!(
                "Cannot downgrade an image with incompatible features {other:#x} set"
            )));
        }
        m.h.compatible_features = 0;
        m.h.autoclear_features = 0;
        let backing = m.h.backing_file.is_some();
        expand_zero_clusters(m, &snaps, backing).await?;
        if m.h.incompatible_features & incompat::COMPRESSION != 0 {
            if has_compressed(m).await? {
                return Err(Error::unsupported(
                    "Cannot downgrade an image with zstd compression type and existing \
                     compressed clusters",
                ));
            }
            m.h.incompatible_features &= !incompat::COMPRESSION;
            m.h.compression_type = CompressionType::Zlib;
        }
        m.h.version = 2;
        m.write_header().await?;
        m.sync().await
    }
}

/// Clear the dirty bit after making the refcounts durable (QEMU's `qcow2_mark_clean`).
async fn mark_clean(m: &mut Meta) -> Result<()> {
    if m.h.incompatible_features & incompat::DIRTY != 0 {
        flush_discard(m).await?;
        m.lazy = false;
        m.set_dirty(false).await?;
    }
    Ok(())
}

/// QEMU's `qcow2_upgrade` to v3: snapshot entries get the extra data v3 requires (our table
/// writer always writes it), then the header.
async fn upgrade(m: &mut Meta) -> Result<()> {
    let (snaps, size) = read_table(m).await?;
    if !snaps.is_empty() {
        m.write_snapshot_table(&snaps, size).await?;
        flush_discard(m).await?;
    }
    m.h.version = 3;
    m.h.refcount_order = 4;
    m.h.compression_type = CompressionType::Zlib;
    m.write_header().await?;
    m.sync().await
}

/// Whether the active L1 table reaches a compressed cluster.
async fn has_compressed(m: &mut Meta) -> Result<bool> {
    let l2n = m.h.l2_entries();
    for l1e in m.l1.clone() {
        let Some(l2) = L1Entry(l1e).l2_offset() else {
            continue;
        };
        m.load_l2(l2).await?;
        for i in 0..l2n {
            let e = m.slot(l2, i).entry;
            if m.fmt.cluster_type(e) == ClusterType::Compressed {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// v2 has no zero flag (QEMU's `qcow2_expand_zero_clusters`): in every L2 table, of the
/// active state and of the snapshots, zero clusters become data clusters holding zeroes,
/// or unallocated ones when there is no backing file to show through.
async fn expand_zero_clusters(
    m: &mut Meta,
    snaps: &[crate::snapshot_ops::RawSnapshot],
    backing: bool,
) -> Result<()> {
    let cs = m.cs;
    let mut l1s = vec![m.l1.clone()];
    for s in snaps {
        let raw = m
            .read_at(s.l1_table_offset, u64::from(s.l1_size) * 8)
            .await?;
        l1s.push(
            raw.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect(),
        );
    }
    let mut seen = HashSet::new();
    let l2n = m.h.l2_entries();
    for l1 in &l1s {
        for &l1e in l1 {
            let Some(l2) = L1Entry(l1e).l2_offset() else {
                continue;
            };
            if !seen.insert(l2) {
                continue;
            }
            let l2_rc = m.get_refcount(l2 / cs).await?;
            m.load_l2(l2).await?;
            for i in 0..l2n {
                let s = m.slot(l2, i);
                let new = match m.fmt.cluster_type(s.entry) {
                    ClusterType::ZeroPlain if !backing => 0,
                    ClusterType::ZeroPlain => {
                        let off = m.alloc_clusters(1).await?;
                        m.file
                            .write(off, IoBuf::zeroed(cs as usize), WriteFlags::default())
                            .await?;
                        // A shared table gives the new cluster one reference per sharer.
                        for _ in 1..l2_rc {
                            m.incref(off / cs).await?;
                        }
                        off | if l2_rc == 1 { entry::COPIED } else { 0 }
                    }
                    ClusterType::ZeroAlloc => {
                        let host = m.fmt.host_cluster(s.entry);
                        m.file
                            .write(host, IoBuf::zeroed(cs as usize), WriteFlags::default())
                            .await?;
                        s.entry & !entry::ZERO
                    }
                    _ => continue,
                };
                m.load_l2(l2).await?;
                m.set_slot(
                    l2,
                    i,
                    crate::meta::Slot {
                        entry: new,
                        bitmap: 0,
                    },
                );
            }
        }
    }
    // The zeroes are on disk before the tables that point at them.
    m.sync().await?;
    flush_discard(m).await?;
    Ok(())
}

/// Rebuild the refcount table and blocks with `bits`-wide entries (QEMU's
/// `qcow2_change_refcount_order`): the new structures go after the end of the image and
/// describe themselves; one header write switches to them; the old ones become free.
async fn change_refcount_width(m: &mut Meta, bits: u32) -> Result<()> {
    let cs = m.cs;
    flush_discard(m).await?;
    let end = m.file_end / cs;
    let mut rc = Vec::with_capacity(end as usize);
    for c in 0..end {
        rc.push(m.get_refcount(c).await?);
    }
    // The old structures are dropped by the switch.
    let old_rt = m.h.refcount_table_offset / cs;
    for c in old_rt..old_rt + u64::from(m.h.refcount_table_clusters) {
        if let Some(r) = rc.get_mut(c as usize) {
            *r = 0;
        }
    }
    for &e in &m.rt {
        let off = e & entry::OFFSET_MASK;
        if off != 0
            && let Some(r) = rc.get_mut((off / cs) as usize)
        {
            *r = 0;
        }
    }
    let max = refcount::max(bits);
    if let Some((c, &r)) = rc.iter().enumerate().find(|(_, r)| **r > max) {
        return Err(Error::invalid(format!(
            "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} has \
             a refcount of {r}",
            c as u64 * cs
        )));
    }
    let per_block = refcount::entries_per_block(cs, bits);
    // Blocks and table at the end, covering themselves too.
    let mut nb = end.div_ceil(per_block).max(1);
    let nt = loop {
        let nt = (nb * 8).div_ceil(cs);
        let need = (end + nb + nt).div_ceil(per_block);
        if need <= nb {
            break nt;
        }
        nb = need;
    };
    if nt * cs > MAX_REFTABLE_SIZE_BYTES {
        return Err(Error::from_errno(libc::EFBIG, "Refcount table too large"));
    }
    let total = end + nb + nt;
    rc.resize(total as usize, 0);
    for r in &mut rc[end as usize..] {
        *r = 1;
    }
    let mut table = vec![0u64; (nt * cs / 8) as usize];
    for b in 0..nb {
        let mut block = vec![0u8; cs as usize];
        let first = b * per_block;
        for i in 0..per_block {
            let c = first + i;
            if c >= total {
                break;
            }
            let v = rc[c as usize];
            if v != 0 {
                refcount::set(&mut block, bits, i as usize, v);
            }
        }
        let off = (end + b) * cs;
        m.write_at(off, &block).await?;
        table[b as usize] = off;
    }
    let table_off = (end + nb) * cs;
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    m.write_at(table_off, &bytes).await?;
    m.sync().await?;
    m.h.refcount_order = bits.trailing_zeros();
    m.h.refcount_table_offset = table_off;
    m.h.refcount_table_clusters = u32::try_from(nt)
        .map_err(|_| Error::from_errno(libc::EFBIG, "Refcount table too large"))?;
    m.write_header().await?;
    m.sync().await?;
    // The cached blocks are clean (flushed above) and describe the old layout.
    while let Some((off, _)) = m.rb.lru() {
        m.rb.remove(off);
    }
    m.rt = table;
    m.rc_bits = bits;
    m.rb_entries = per_block;
    m.file_end = total * cs;
    m.free_hint = 0;
    Ok(())
}
