//! The image as the checker sees it: header, active L1 table, refcount table and snapshot
//! table loaded from the protocol node, plus byte I/O and the on-disk refcounts.
//!
//! Tables are read only as far as the file reaches: what lies past the end of the file reads
//! as zeroes, and zero entries mean "unused" everywhere, so a hostile table size never makes
//! us allocate more than the file holds.

use strata_core::{Error, ErrorKind, IoBuf, NodeRef, Result, WriteFlags};

use super::refblock;
use super::report::Counts;
use crate::entry::EntryFormat;
use crate::header::{Header, incompat};

/// The refcount table entry's offset bits and reserved bits (QEMU's `REFT_*_MASK`).
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved low bits of a refcount table entry.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Largest snapshot table QEMU reads (`QCOW_MAX_SNAPSHOTS_SIZE`).
const MAX_SNAPSHOTS_SIZE: u64 = 1024 * 65536;
/// Largest extra data of a snapshot entry (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
const MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;

/// An internal snapshot's L1 table.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Offset of its L1 table.
    pub l1_offset: u64,
    /// Entries in its L1 table.
    pub l1_size: u32,
}

/// An error with an errno: the check stops and qemu-img prints `Check failed: <strerror>`.
pub fn errno_error(errno: i32) -> Error {
    Error::new(ErrorKind::Io(errno), strata_core::error::strerror(errno))
}

pub use strata_core::error::hash_x;

/// The checker's view of one image and the running counters of one pass.
#[derive(Debug)]
pub struct Image {
    /// The protocol node holding the image.
    pub file: NodeRef,
    /// Parsed header.
    pub h: Header,
    /// Cluster size.
    pub cs: u64,
    /// log2 of the cluster size.
    pub cbits: u32,
    /// log2 of the refcount width.
    pub order: u32,
    /// log2 of the entries in one refcount block.
    pub rb_bits: u32,
    /// How L2 entries decode.
    pub fmt: EntryFormat,
    /// The active L1 table (host byte order; may be shorter than `l1_size`: the rest is zero).
    pub l1: Vec<u64>,
    /// The refcount table (may be shorter than its size: the rest is zero).
    pub reftable: Vec<u64>,
    /// Entries the refcount table has room for.
    pub reftable_size: u64,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Bytes of the snapshot table.
    pub snapshots_size: u64,
    /// Counters of this pass.
    pub res: Counts,
    /// Diagnostic lines of this pass.
    pub msgs: Vec<String>,
    /// The last refcount block read: (offset, bytes).
    block_cache: Option<(u64, Vec<u8>)>,
    /// Whether the "image is corrupt" message was already printed.
    signaled_corruption: bool,
    /// Whether repairs may write (decides QEMU's wording of that message).
    pub writable: bool,
    /// L2 entries we may still visit (a bound on work for hostile images).
    pub budget: u64,
}

impl Image {
    /// Load header, active L1, refcount table and snapshot table. An error means the image
    /// could not be opened (qemu-img: "Could not open").
    pub async fn open(file: NodeRef, writable: bool) -> Result<Image> {
        let head = read_at(&file, 0, 4096).await?;
        let bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
        let first = if (9..=21).contains(&bits) && bits > 12 {
            read_at(&file, 0, 1 << bits).await?
        } else {
            head
        };
        let h = Header::parse(&first)?;
        let cs = h.cluster_size();
        let cbits = h.cluster_bits;
        if h.refcount_order > 6 {
            return Err(Error::invalid("Refcount order is too big"));
        }
        let order = h.refcount_order;
        let fmt = EntryFormat {
            cluster_bits: cbits,
            extended_l2: h.extended_l2(),
            external_data_file: h.has_data_file(),
        };
        let reftable_size = u64::from(h.refcount_table_clusters) << (cbits - 3);
        let mut img = Image {
            l1: Vec::new(),
            reftable: Vec::new(),
            reftable_size,
            snapshots: Vec::new(),
            snapshots_size: 0,
            res: Counts::default(),
            msgs: Vec::new(),
            block_cache: None,
            signaled_corruption: false,
            writable,
            budget: 1 << 30,
            cs,
            cbits,
            order,
            rb_bits: cbits + 3 - order,
            fmt,
            h,
            file,
        };
        img.l1 = img
            .read_table(img.h.l1_table_offset, u64::from(img.h.l1_size))
            .await?;
        img.reftable = img
            .read_table(img.h.refcount_table_offset, reftable_size)
            .await?;
        // QEMU loads the bitmap directory on open and refuses an image whose directory is
        // malformed.
        if let Some(ext) = img.h.bitmaps {
            let dir = img
                .read_clamped(ext.bitmap_directory_offset, ext.bitmap_directory_size)
                .await?;
            if img
                .parse_bitmap_dir(&dir, ext.bitmap_directory_size, ext.nb_bitmaps)
                .is_none()
            {
                return Err(Error::invalid("Bitmap directory is corrupted"));
            }
        }
        Ok(img)
    }

    /// Current length of the image file.
    pub fn file_len(&self) -> u64 {
        self.file.size()
    }

    /// Read `len` bytes at `offset`, but only the part inside the file (the rest is zero).
    pub async fn read_clamped(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let avail = self.file_len().saturating_sub(offset).min(len);
        read_at(&self.file, offset, avail).await
    }

    /// Read a table of `entries` big-endian u64 at `offset` (only its in-file part).
    pub async fn read_table(&self, offset: u64, entries: u64) -> Result<Vec<u64>> {
        let bytes = self.read_clamped(offset, entries.saturating_mul(8)).await?;
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect())
    }

    /// Write `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.block_cache = None;
        self.file
            .write(offset, IoBuf::from_slice(data), WriteFlags::default())
            .await?;
        Ok(())
    }

    /// Record a diagnostic line.
    pub fn msg(&mut self, m: impl Into<String>) {
        self.msgs.push(m.into());
    }

    /// "Repairing" when `fixing`, else "ERROR".
    pub fn verb(fixing: bool) -> &'static str {
        if fixing { "Repairing" } else { "ERROR" }
    }

    /// Read the snapshot table (QEMU's `qcow2_check_read_snapshot_table` without repairs).
    pub async fn read_snapshots(&mut self) -> Result<()> {
        let n = u64::from(self.h.nb_snapshots);
        let base = self.h.snapshots_offset;
        let mut off = 0u64;
        for i in 0..n {
            off = off.next_multiple_of(8);
            // Entries are read one by one: only as much as the table really uses.
            let head = self.read_entry_bytes(base, off, 40).await?;
            let be = |o: usize, n: usize| {
                head[o..o + n]
                    .iter()
                    .fold(0u64, |a, &b| (a << 8) | u64::from(b))
            };
            let l1_offset = be(0, 8);
            let l1_size = be(8, 4) as u32;
            let id_len = be(12, 2);
            let name_len = be(14, 2);
            let extra = be(36, 4);
            if extra > MAX_SNAPSHOT_EXTRA_DATA {
                return Err(self.snapshot_table_error(
                    format!("Too much extra metadata in snapshot table entry {i}"),
                    "You can force-remove this extra metadata with qemu-img check -r all".into(),
                ));
            }
            off += 40 + extra;
            let names = self.read_entry_bytes(base, off, id_len + name_len).await?;
            let (id, name) = names.split_at(id_len as usize);
            off += id_len + name_len;
            if off > MAX_SNAPSHOTS_SIZE {
                return Err(self.snapshot_table_error(
                    "Snapshot table is too big".into(),
                    format!(
                        "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                        n - i
                    ),
                ));
            }
            self.snapshots.push(Snapshot {
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                l1_offset,
                l1_size,
            });
        }
        self.snapshots_size = off;
        Ok(())
    }

    /// Report an unreadable snapshot table as QEMU does (the error, then its hint); the
    /// check then fails with EFBIG. Repairing the table (`-r all` dropping extra data or
    /// overhanging entries) is not implemented: such images fail the same way with repair.
    fn snapshot_table_error(&mut self, what: String, hint: String) -> Error {
        self.res.check_errors += 1;
        self.msg(format!(
            "qemu-img: ERROR failed to read the snapshot table: {what}"
        ));
        self.msg(hint);
        errno_error(libc::EFBIG)
    }

    /// `len` bytes at `base + off` of the snapshot table (zero past the end of the file).
    async fn read_entry_bytes(&self, base: u64, off: u64, len: u64) -> Result<Vec<u8>> {
        let at = base
            .checked_add(off)
            .ok_or_else(|| Error::invalid("Snapshot table is too big"))?;
        let mut b = self.read_clamped(at, len).await?;
        b.resize(len as usize, 0);
        Ok(b)
    }

    /// The on-disk refcount of `cluster` (QEMU's `qcow2_get_refcount`): `Ok(Err(errno))`
    /// when the refcount block's offset is unaligned.
    pub async fn disk_refcount(&mut self, cluster: u64) -> Result<std::result::Result<u64, i32>> {
        let idx = cluster >> self.rb_bits;
        let entry = usize::try_from(idx)
            .ok()
            .and_then(|i| self.reftable.get(i))
            .copied()
            .unwrap_or(0);
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(Ok(0));
        }
        if off & (self.cs - 1) != 0 {
            self.signal_corruption(format!(
                "Refblock offset {} unaligned (reftable index: {})",
                hash_x(off),
                hash_x(idx)
            ));
            return Ok(Err(libc::EIO));
        }
        let i = (cluster & ((1 << self.rb_bits) - 1)) as usize;
        let order = self.order;
        let block = self.block(off).await?;
        Ok(Ok(refblock::get(block, order, i)))
    }

    async fn block(&mut self, off: u64) -> Result<&[u8]> {
        if self.block_cache.as_ref().is_none_or(|(o, _)| *o != off) {
            let mut b = self.read_clamped(off, self.cs).await?;
            b.resize(self.cs as usize, 0);
            self.block_cache = Some((off, b));
        }
        Ok(&self.block_cache.as_ref().unwrap().1)
    }

    /// Set the on-disk refcount of `cluster`, whose refcount block exists (repairs only
    /// change counts of clusters that have a non-zero refcount).
    pub async fn set_disk_refcount(&mut self, cluster: u64, v: u64) -> Result<()> {
        let idx = (cluster >> self.rb_bits) as usize;
        let off = self.reftable.get(idx).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        if off == 0 || off & (self.cs - 1) != 0 {
            return Err(errno_error(libc::EIO));
        }
        let i = (cluster & ((1 << self.rb_bits) - 1)) as usize;
        let mut block = self.block(off).await?.to_vec();
        refblock::set(&mut block, self.order, i, v);
        // Write only the bytes that hold the entry (a sector, as a cache flush would).
        let entry_bytes = ((1usize << self.order) / 8).max(1);
        let byte = i * (1usize << self.order) / 8;
        let sector = byte / 512 * 512;
        let end = (byte + entry_bytes).next_multiple_of(512).min(block.len());
        self.write(off + sector as u64, &block[sector..end]).await
    }

    /// QEMU's `qcow2_signal_corruption`, printed once per pass.
    pub fn signal_corruption(&mut self, what: String) {
        if self.signaled_corruption {
            return;
        }
        self.signaled_corruption = true;
        if self.writable {
            self.msg(format!(
                "qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"
            ));
        } else {
            self.msg(format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed"
            ));
        }
    }

    /// QEMU's `qcow2_pre_write_overlap_check`: if `[offset, offset + size)` overlaps metadata,
    /// signal the corruption (marking the image corrupt when writable) and return `true`.
    pub async fn write_blocked(
        &mut self,
        offset: u64,
        size: u64,
        ignore_active_l2: bool,
    ) -> Result<bool> {
        let Some(what) = self.overlap(offset, size, ignore_active_l2) else {
            return Ok(false);
        };
        self.signal_corruption(format!(
            "Preventing invalid write on metadata (overlaps with {what})"
        ));
        if self.writable && self.h.version >= 3 {
            self.h.incompatible_features |= incompat::CORRUPT;
            let v = self.h.incompatible_features.to_be_bytes();
            self.write(72, &v).await?;
        }
        Ok(true)
    }

    /// Clear the dirty and corrupt bits (QEMU's `qcow2_mark_clean` + `mark_consistent`).
    pub async fn mark_clean(&mut self) -> Result<()> {
        let bits = incompat::DIRTY | incompat::CORRUPT;
        if self.h.version >= 3 && self.h.incompatible_features & bits != 0 {
            self.h.incompatible_features &= !bits;
            let v = self.h.incompatible_features.to_be_bytes();
            self.write(72, &v).await?;
            self.file.flush().await?;
        }
        Ok(())
    }
}

/// Read `len` bytes at `offset` of `file`.
pub async fn read_at(file: &NodeRef, offset: u64, len: u64) -> Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| errno_error(libc::ENOMEM))?;
    let buf = file.read(offset, IoBuf::zeroed(len)).await?;
    Ok(buf.to_vec())
}
