//! Bitmap tables: one 64-bit entry per cluster of serialised bitmap data. An entry is a data
//! cluster offset, or (offset 0) all zeroes, or with bit 0 set all ones.

use super::directory::{MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MIN_GRANULARITY_BITS};

/// Largest bitmap table in entries (`BME_MAX_TABLE_SIZE`).
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Largest serialised bitmap (`BME_MAX_PHYS_SIZE`, 512 MiB): bounds memory too.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Reserved bits of an entry: 1..=8 and 56..=63.
pub const RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// The data cluster offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// With offset 0: the cluster's bits are all ones.
pub const ALL_ONES: u64 = 1;

/// What one table entry says about its cluster of bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// Every bit clear.
    Zeroes,
    /// Every bit set.
    Ones,
    /// The bits are in the data cluster at this offset.
    Data(u64),
}

/// Decode an entry, or `None` when it breaks the spec (QEMU's `check_table_entry`).
pub fn decode(e: u64, cs: u64) -> Option<TableEntry> {
    if e & RESERVED_MASK != 0 {
        return None;
    }
    let off = e & OFFSET_MASK;
    if off == 0 {
        return Some(if e & ALL_ONES != 0 {
            TableEntry::Ones
        } else {
            TableEntry::Zeroes
        });
    }
    if e & ALL_ONES != 0 || !off.is_multiple_of(cs) {
        return None;
    }
    Some(TableEntry::Data(off))
}

/// Bytes of serialised bitmap for a disk of `size` bytes (QEMU's `get_bitmap_bytes_needed`).
pub fn bitmap_bytes(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

/// Entries of the table of a bitmap over `size` bytes.
pub fn table_entries(size: u64, granularity_bits: u8, cs: u64) -> u64 {
    bitmap_bytes(size, granularity_bits).div_ceil(cs)
}

/// QEMU's `check_constraints_on_bitmap`, with its messages.
pub fn check_constraints(name: &str, granularity: u64, size: u64, cs: u64) -> Result<(), String> {
    let bits = granularity.trailing_zeros();
    if bits > u32::from(MAX_GRANULARITY_BITS) {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if bits < u32::from(MIN_GRANULARITY_BITS) {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    let bytes = bitmap_bytes(size, bits as u8);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE.saturating_mul(cs) {
        return Err(
            "Too much space will be occupied by the bitmap. Use larger granularity".to_string(),
        );
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries() {
        assert_eq!(decode(0, 512), Some(TableEntry::Zeroes));
        assert_eq!(decode(1, 512), Some(TableEntry::Ones));
        assert_eq!(decode(0x10000, 65536), Some(TableEntry::Data(0x10000)));
        assert_eq!(decode(0x10001, 65536), None);
        assert_eq!(decode(0x10200, 65536), None);
        assert_eq!(decode(2, 512), None);
        assert_eq!(decode(1 << 60, 512), None);
        assert_eq!(table_entries(64 << 20, 16, 65536), 1);
        assert_eq!(table_entries(1 << 40, 9, 512), (1u64 << 31) / 8 / 512);
    }

    #[test]
    fn constraints() {
        assert!(check_constraints("a", 65536, 1 << 30, 65536).is_ok());
        assert_eq!(
            check_constraints("a", 256, 1 << 30, 65536).unwrap_err(),
            "Granularity is under minimum (512 bytes)"
        );
        assert_eq!(
            check_constraints("a", 1 << 32, 1 << 30, 65536).unwrap_err(),
            "Granularity exceeds maximum (2147483648 bytes)"
        );
        assert!(
            check_constraints("a", 512, 64 << 40, 65536)
                .unwrap_err()
                .starts_with("Too much space")
        );
        assert_eq!(
            check_constraints(&"x".repeat(1024), 65536, 1, 65536).unwrap_err(),
            "Name length exceeds maximum (1023 characters)"
        );
    }
}
