//! L1 and L2 table entries: decoding (standard and extended L2, subcluster bitmaps,
//! compressed cluster descriptors) and encoding, following the spec and QEMU's
//! `qcow2_get_cluster_type` / `qcow2_get_subcluster_type`.

/// Bits 9..=55 of an L1 or L2 entry: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the refcount of the referenced cluster is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (v3, no extended L2): reads as zeroes.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (bit 0 is the zero flag, handled separately).
pub const L2_STANDARD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// All allocation bits of a subcluster bitmap.
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// All zero bits of a subcluster bitmap.
pub const ALL_ZERO: u64 = 0xffff_ffff << 32;
/// Unit of compressed data lengths.
pub const COMPRESSED_SECTOR: u64 = 512;

/// The allocation bit of subcluster `i` in an extended L2 bitmap.
pub fn sub_alloc(i: u32) -> u64 {
    1u64 << i
}

/// The reads-as-zero bit of subcluster `i` in an extended L2 bitmap.
pub fn sub_zero(i: u32) -> u64 {
    1u64 << (i + 32)
}

/// Allocation bits for subclusters `[first, first + n)`.
pub fn sub_alloc_range(first: u32, n: u32) -> u64 {
    if n == 0 {
        return 0;
    }
    let ones = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    (ones << first) & ALL_ALLOC
}

/// Zero bits for subclusters `[first, first + n)`.
pub fn sub_zero_range(first: u32, n: u32) -> u64 {
    sub_alloc_range(first, n) << 32
}

/// An L1 table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing at the L2 table at `l2_offset`.
    pub fn new(l2_offset: u64, copied: bool) -> Self {
        L1Entry((l2_offset & OFFSET_MASK) | if copied { COPIED } else { 0 })
    }

    /// Host offset of the L2 table, `None` if unallocated.
    pub fn l2_offset(self) -> Option<u64> {
        let o = self.0 & OFFSET_MASK;
        (o != 0).then_some(o)
    }

    /// The COPIED flag (refcount of the L2 table is 1).
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// Reserved bits that are set (non-zero means a malformed entry).
    pub fn reserved_bits(self) -> u64 {
        self.0 & L1_RESERVED_MASK
    }
}

/// How the entry itself describes a whole cluster (QEMU's `QCow2ClusterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterType {
    /// No offset: reads go to the backing file.
    Unallocated,
    /// Zero flag, no host cluster.
    ZeroPlain,
    /// Zero flag with a (preallocated) host cluster.
    ZeroAlloc,
    /// Data in a host cluster.
    Normal,
    /// Compressed data.
    Compressed,
}

/// How one subcluster (or the cluster, without extended L2) reads
/// (QEMU's `QCow2SubclusterType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterType {
    /// Reads from backing; no host cluster.
    UnallocatedPlain,
    /// Reads from backing; the cluster has a host cluster (other subclusters may use it).
    UnallocatedAlloc,
    /// Reads as zero; no host cluster.
    ZeroPlain,
    /// Reads as zero; a host cluster exists.
    ZeroAlloc,
    /// Data at the host offset.
    Normal,
    /// Compressed cluster.
    Compressed,
    /// The bitmap is inconsistent (a subcluster both allocated and zero, or allocation bits
    /// without a host cluster).
    Invalid,
}

impl SubclusterType {
    /// Whether the subcluster's content is decided by this image (not the backing file).
    pub fn is_allocated(self) -> bool {
        !matches!(
            self,
            SubclusterType::UnallocatedPlain | SubclusterType::UnallocatedAlloc
        )
    }

    /// Whether the subcluster reads as zeroes.
    pub fn is_zero(self) -> bool {
        matches!(self, SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc)
    }
}

/// What is needed to decode L2 entries of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFormat {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (with subcluster bitmaps).
    pub extended_l2: bool,
    /// An external data file is used (host offset 0 is valid with COPIED set).
    pub external_data_file: bool,
}

impl EntryFormat {
    /// Subclusters per cluster (32 with extended L2, else 1).
    pub fn subclusters(&self) -> u32 {
        if self.extended_l2 { SUBCLUSTERS } else { 1 }
    }

    /// Subcluster size in bytes.
    pub fn subcluster_size(&self) -> u64 {
        (1u64 << self.cluster_bits) / u64::from(self.subclusters())
    }

    /// Bytes per L2 entry.
    pub fn entry_size(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// Cluster type of a raw L2 entry (QEMU's `qcow2_get_cluster_type`).
    pub fn cluster_type(&self, entry: u64) -> ClusterType {
        if entry & COMPRESSED != 0 {
            ClusterType::Compressed
        } else if entry & ZERO != 0 && !self.extended_l2 {
            if entry & OFFSET_MASK != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if entry & OFFSET_MASK == 0 {
            // Offset 0 is valid in an external data file; COPIED tells it from unallocated.
            if self.external_data_file && entry & COPIED != 0 {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// Type of subcluster `sc` (0 without extended L2) given the entry and its bitmap
    /// (QEMU's `qcow2_get_subcluster_type`).
    pub fn subcluster_type(&self, entry: u64, bitmap: u64, sc: u32) -> SubclusterType {
        let ct = self.cluster_type(entry);
        if !self.extended_l2 {
            return match ct {
                ClusterType::Compressed => SubclusterType::Compressed,
                ClusterType::ZeroPlain => SubclusterType::ZeroPlain,
                ClusterType::ZeroAlloc => SubclusterType::ZeroAlloc,
                ClusterType::Normal => SubclusterType::Normal,
                ClusterType::Unallocated => SubclusterType::UnallocatedPlain,
            };
        }
        match ct {
            ClusterType::Compressed => SubclusterType::Compressed,
            ClusterType::Normal => {
                if (bitmap >> 32) & bitmap != 0 {
                    SubclusterType::Invalid
                } else if bitmap & sub_zero(sc) != 0 {
                    SubclusterType::ZeroAlloc
                } else if bitmap & sub_alloc(sc) != 0 {
                    SubclusterType::Normal
                } else {
                    SubclusterType::UnallocatedAlloc
                }
            }
            ClusterType::Unallocated => {
                if bitmap & ALL_ALLOC != 0 {
                    SubclusterType::Invalid
                } else if bitmap & sub_zero(sc) != 0 {
                    SubclusterType::ZeroPlain
                } else {
                    SubclusterType::UnallocatedPlain
                }
            }
            // The zero flag is not used with extended L2 (cluster_type never returns these).
            ClusterType::ZeroPlain | ClusterType::ZeroAlloc => SubclusterType::Invalid,
        }
    }

    /// Number of subclusters starting at `sc` with the same type as `sc` (at least 1).
    pub fn run_length(&self, entry: u64, bitmap: u64, sc: u32) -> u32 {
        let t = self.subcluster_type(entry, bitmap, sc);
        let mut n = 1;
        while sc + n < self.subclusters() && self.subcluster_type(entry, bitmap, sc + n) == t {
            n += 1;
        }
        n
    }

    /// Shift of the sector-count field of a compressed descriptor.
    pub fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decode a compressed cluster descriptor (`entry` has bit 62 set).
    pub fn compressed(&self, entry: u64) -> CompressedDescriptor {
        let shift = self.csize_shift();
        let offset_mask = (1u64 << shift) - 1;
        let csize_mask = (1u64 << (self.cluster_bits - 8)) - 1;
        CompressedDescriptor {
            host_offset: entry & offset_mask,
            sectors: ((entry >> shift) & csize_mask) + 1,
        }
    }

    /// Encode a compressed descriptor for `len` bytes of compressed data at `host_offset`;
    /// `None` if the offset or length does not fit the fields.
    pub fn encode_compressed(&self, host_offset: u64, len: u64) -> Option<u64> {
        let shift = self.csize_shift();
        let offset_mask = (1u64 << shift) - 1;
        let csize_mask = (1u64 << (self.cluster_bits - 8)) - 1;
        if host_offset & !offset_mask != 0 || host_offset & !OFFSET_MASK_COMPRESSED_LIMIT != 0 {
            return None;
        }
        let last = host_offset.checked_add(len)?.checked_sub(1)?;
        let extra = last / COMPRESSED_SECTOR - host_offset / COMPRESSED_SECTOR;
        if extra > csize_mask {
            return None;
        }
        Some(COMPRESSED | (extra << shift) | host_offset)
    }

    /// The host offset of a standard entry's cluster (may be 0 with an external data file).
    pub fn host_cluster(&self, entry: u64) -> u64 {
        entry & OFFSET_MASK
    }

    /// Reserved bits set in a standard (non-compressed) L2 entry.
    pub fn reserved_bits(&self, entry: u64) -> u64 {
        let mut mask = L2_STANDARD_RESERVED_MASK;
        if self.extended_l2 {
            mask |= ZERO;
        }
        entry & mask
    }
}

/// Compressed host offsets must stay below 2^56 (the L2 offset field's width).
const OFFSET_MASK_COMPRESSED_LIMIT: u64 = (1 << 56) - 1;

/// Where a compressed cluster's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Byte offset of the compressed data (not aligned).
    pub host_offset: u64,
    /// 512-byte sectors used, counting the one containing `host_offset`.
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Bytes to read: from `host_offset` to the end of the last sector (QEMU's `csize`).
    pub fn byte_len(&self) -> u64 {
        self.sectors * COMPRESSED_SECTOR - (self.host_offset & (COMPRESSED_SECTOR - 1))
    }

    /// Host clusters the data touches, as `(first cluster offset, count)`; QEMU counts a
    /// reference on each of them.
    pub fn host_clusters(&self, cluster_bits: u32) -> (u64, u64) {
        let cs = 1u64 << cluster_bits;
        let first = self.host_offset & !(cs - 1);
        let last_byte = self.host_offset + self.sectors * COMPRESSED_SECTOR
            - (self.host_offset & (COMPRESSED_SECTOR - 1))
            - 1;
        let last = last_byte & !(cs - 1);
        (first, (last - first) / cs + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended_l2: false,
        external_data_file: false,
    };
    const EXT: EntryFormat = EntryFormat {
        cluster_bits: 16,
        extended_l2: true,
        external_data_file: false,
    };

    #[test]
    fn standard_types() {
        assert_eq!(STD.cluster_type(0), ClusterType::Unallocated);
        assert_eq!(STD.cluster_type(ZERO), ClusterType::ZeroPlain);
        assert_eq!(STD.cluster_type(0x50000 | ZERO), ClusterType::ZeroAlloc);
        assert_eq!(STD.cluster_type(COPIED | 0x50000), ClusterType::Normal);
        assert_eq!(STD.cluster_type(COMPRESSED | 5), ClusterType::Compressed);
        let ext_df = EntryFormat {
            external_data_file: true,
            ..STD
        };
        assert_eq!(ext_df.cluster_type(COPIED), ClusterType::Normal);
        assert_eq!(STD.cluster_type(COPIED), ClusterType::Unallocated);
    }

    #[test]
    fn subcluster_types() {
        let e = COPIED | 0x70000;
        let bm = sub_alloc(0) | sub_zero(1);
        assert_eq!(EXT.subcluster_type(e, bm, 0), SubclusterType::Normal);
        assert_eq!(EXT.subcluster_type(e, bm, 1), SubclusterType::ZeroAlloc);
        assert_eq!(
            EXT.subcluster_type(e, bm, 2),
            SubclusterType::UnallocatedAlloc
        );
        assert_eq!(
            EXT.subcluster_type(0, sub_zero(3), 3),
            SubclusterType::ZeroPlain
        );
        assert_eq!(
            EXT.subcluster_type(0, sub_alloc(3), 3),
            SubclusterType::Invalid
        );
        assert_eq!(
            EXT.subcluster_type(e, sub_alloc(3) | sub_zero(3), 0),
            SubclusterType::Invalid
        );
        assert_eq!(EXT.run_length(e, bm, 2), 30);
        assert_eq!(sub_alloc_range(30, 2), 0xc000_0000);
        assert_eq!(sub_alloc_range(0, 32), ALL_ALLOC);
        assert_eq!(sub_zero_range(0, 32), ALL_ZERO);
    }

    #[test]
    fn compressed_roundtrip() {
        for bits in 9..=21 {
            let f = EntryFormat {
                cluster_bits: bits,
                ..STD
            };
            let cs = 1u64 << bits;
            let e = f.encode_compressed(0x12345 * 512 + 100, cs / 2).unwrap();
            let d = f.compressed(e);
            assert_eq!(d.host_offset, 0x12345 * 512 + 100);
            assert!(d.byte_len() >= cs / 2);
            assert!(d.byte_len() < cs / 2 + 512);
        }
        // QEMU's example: 64k clusters put the sector count at bits 54..=61.
        let d = STD.compressed(COMPRESSED | (3 << 54) | 0x30200);
        assert_eq!(d.sectors, 4);
        assert_eq!(d.byte_len(), 2048);
        assert_eq!(d.host_clusters(16), (0x30000, 1));
    }
}
