//! The bitmap directory: parsing with QEMU's checks (`bitmap_list_load`, `check_dir_entry`)
//! and serialisation as QEMU's `bitmap_list_store` writes it.
//!
//! Each entry: `bitmap_table_offset` (u64), `bitmap_table_size` (u32, entries), `flags`
//! (u32), `type` (u8, 1 = dirty tracking), `granularity_bits` (u8), `name_size` (u16),
//! `extra_data_size` (u32), then the extra data and the name, padded to 8 bytes.

use strata_core::{Error, Result};

use super::table;
use crate::header::{MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS};

/// The bitmap's data is inconsistent: it was in use by a writer that did not store it.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// The bitmap tracks writes (it is enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Flags this implementation does not know (QEMU refuses them).
pub const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Longest bitmap name (`BME_MAX_NAME_SIZE`).
pub const MAX_NAME_SIZE: usize = 1023;
/// Granularity limits (`BME_MIN/MAX_GRANULARITY_BITS`).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// See [`MIN_GRANULARITY_BITS`].
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Size of the fixed part of an entry.
const ENTRY_HEADER: usize = 24;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Offset of the bitmap table (cluster aligned).
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// [`FLAG_IN_USE`], [`FLAG_AUTO`].
    pub flags: u32,
    /// Bitmap type ([`TYPE_DIRTY_TRACKING`]).
    pub kind: u8,
    /// log2 of the bytes per bit.
    pub granularity_bits: u8,
    /// Name (at most 1023 bytes).
    pub name: String,
    /// Extra data (QEMU supports none: a directory with extra data fails to load).
    pub extra: Vec<u8>,
}

impl DirEntry {
    /// Whether the in-use flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Whether the auto (enabled) flag is set.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Bytes this entry takes in the directory.
    pub fn size(&self) -> u64 {
        entry_size(self.name.len(), self.extra.len())
    }

    /// QEMU's `check_dir_entry` for an image of `disk_size` bytes.
    pub fn check(&self, cs: u64, disk_size: u64) -> bool {
        let bad = self.table_size == 0
            || self.table_offset == 0
            || !self.table_offset.is_multiple_of(cs)
            || u64::from(self.table_size) > table::MAX_TABLE_SIZE
            || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits)
            || self.flags & RESERVED_FLAGS != 0
            || self.name.len() > MAX_NAME_SIZE
            || self.kind != TYPE_DIRTY_TRACKING;
        if bad {
            return false;
        }
        let phys = u64::from(self.table_size) * cs;
        if phys > table::MAX_PHYS_SIZE {
            return false;
        }
        // A consistent bitmap's table must cover the disk (an in-use one may be stale,
        // e.g. from an interrupted resize).
        let covered = (phys * 8).checked_shl(u32::from(self.granularity_bits));
        self.in_use() || covered.is_none_or(|c| disk_size <= c)
    }
}

/// Directory bytes taken by an entry with these lengths.
pub fn entry_size(name_len: usize, extra_len: usize) -> u64 {
    ((ENTRY_HEADER + name_len + extra_len) as u64).next_multiple_of(8)
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Parse a directory of `nb_bitmaps` entries, as QEMU does on open, with its error texts.
pub fn parse(dir: &[u8], nb_bitmaps: u32, cs: u64, disk_size: u64) -> Result<Vec<DirEntry>> {
    if dir.is_empty() {
        return Err(Error::invalid("Requested bitmap directory size is zero"));
    }
    if dir.len() as u64 > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::invalid("Requested bitmap directory size is too big"));
    }
    let broken = || Error::invalid("Broken bitmap directory");
    let mut out = Vec::new();
    let mut o = 0usize;
    while o < dir.len() {
        if dir.len() - o < ENTRY_HEADER {
            return Err(broken());
        }
        if out.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(Error::invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let name_size = usize::from(be16(dir, o + 18));
        let extra_size = be32(dir, o + 20) as usize;
        let size = entry_size(name_size, extra_size);
        if size > (dir.len() - o) as u64 {
            return Err(broken());
        }
        let name_at = o + ENTRY_HEADER + extra_size;
        let raw_name = &dir[name_at..name_at + name_size];
        // QEMU copies the name with g_strndup: it ends at a NUL.
        let n = raw_name.iter().position(|&c| c == 0).unwrap_or(name_size);
        let e = DirEntry {
            table_offset: be64(dir, o),
            table_size: be32(dir, o + 8),
            flags: be32(dir, o + 12),
            kind: dir[o + 16],
            granularity_bits: dir[o + 17],
            name: String::from_utf8_lossy(&raw_name[..n]).into_owned(),
            extra: dir[o + ENTRY_HEADER..name_at].to_vec(),
        };
        if !e.extra.is_empty() {
            return Err(Error::invalid("Bitmap extra data is not supported"));
        }
        if !e.check(cs, disk_size) {
            return Err(Error::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                String::from_utf8_lossy(raw_name)
            )));
        }
        out.push(e);
        o += size as usize;
    }
    if out.len() as u64 != u64::from(nb_bitmaps) {
        return Err(Error::invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

/// Serialise a directory (QEMU's `bitmap_list_store`); fails when it would exceed QEMU's
/// limits or an entry breaks the constraints.
pub fn serialize(entries: &[DirEntry], cs: u64, disk_size: u64) -> Result<Vec<u8>> {
    if entries.len() > MAX_BITMAPS as usize {
        return Err(Error::invalid("Too many persistent bitmaps"));
    }
    let total: u64 = entries.iter().map(DirEntry::size).sum();
    if total == 0 || total > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::invalid("Bitmap directory is too large"));
    }
    let mut out = Vec::with_capacity(total as usize);
    for e in entries {
        if !e.check(cs, disk_size) {
            return Err(Error::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name
            )));
        }
        let start = out.len();
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.kind);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.extra);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(start + e.size() as usize, 0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            name: name.into(),
            extra: vec![],
        }
    }

    #[test]
    fn roundtrip_and_errors() {
        let cs = 65536;
        let es = vec![entry("a", FLAG_AUTO), entry("bitmap-two", FLAG_IN_USE)];
        let d = serialize(&es, cs, 1 << 30).unwrap();
        assert_eq!(d.len(), 32 + 40);
        assert_eq!(parse(&d, 2, cs, 1 << 30).unwrap(), es);
        let msg = |r: Result<Vec<DirEntry>>| r.unwrap_err().message().to_string();
        assert_eq!(
            msg(parse(&d, 1, cs, 1 << 30)),
            "More bitmaps found than specified in header extension"
        );
        assert_eq!(
            msg(parse(&d, 3, cs, 1 << 30)),
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(
            msg(parse(&d[..40], 2, cs, 1 << 30)),
            "Broken bitmap directory"
        );
        assert_eq!(
            msg(parse(&[], 2, cs, 1 << 30)),
            "Requested bitmap directory size is zero"
        );
        // One table cluster covers 2^19 bits of 64 KiB: 32 GiB. A consistent bitmap on a
        // larger disk is refused; an in-use one is tolerated.
        assert_eq!(
            msg(parse(&d, 2, cs, 64 << 30)),
            "Bitmap 'a' doesn't satisfy the constraints"
        );
        let mut bad = d.clone();
        bad[16] = 2;
        assert!(parse(&bad, 2, cs, 1 << 20).is_err());
        let mut extra = entry("x", 0);
        extra.extra = vec![1, 2, 3];
        let mut d = serialize(&[entry("x", 0)], cs, 1).unwrap();
        d[20..24].copy_from_slice(&3u32.to_be_bytes());
        d.resize(40, 0);
        assert_eq!(
            msg(parse(&d, 1, cs, 1)),
            "Bitmap extra data is not supported"
        );
    }

    #[test]
    fn hostile_directories_never_panic() {
        let good = serialize(&[entry("a", FLAG_AUTO), entry("b", 0)], 512, 1 << 20).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % b.len() as u64) as usize;
                b[i] = (x >> 32) as u8;
            }
            let _ = parse(&b, (x % 4) as u32, 512, 1 << 20);
        }
    }
}
