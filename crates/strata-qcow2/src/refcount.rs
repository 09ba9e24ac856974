//! Refcount block entries of any width (1 to 64 bits), as the spec lays them out: sub-byte
//! widths pack from the least significant bit, byte widths are big-endian.

/// Read entry `index` of a refcount block with `bits`-wide entries.
pub fn get(block: &[u8], bits: u32, index: usize) -> u64 {
    match bits {
        1 | 2 | 4 => {
            let per_byte = 8 / bits as usize;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) as u32 * bits;
            u64::from((byte >> shift) & ((1u8 << bits) - 1))
        }
        _ => {
            let w = bits as usize / 8;
            block[index * w..index * w + w]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

/// Write entry `index` (the caller checked `value <= max(bits)`).
pub fn set(block: &mut [u8], bits: u32, index: usize, value: u64) {
    match bits {
        1 | 2 | 4 => {
            let per_byte = 8 / bits as usize;
            let shift = (index % per_byte) as u32 * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut block[index / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let w = bits as usize / 8;
            let bytes = value.to_be_bytes();
            block[index * w..index * w + w].copy_from_slice(&bytes[8 - w..]);
        }
    }
}

/// Largest refcount representable in `bits`.
pub fn max(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Entries in one refcount block.
pub fn entries_per_block(cluster_size: u64, bits: u32) -> u64 {
    cluster_size * 8 / u64::from(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_widths_roundtrip() {
        for order in 0..=6 {
            let bits = 1u32 << order;
            let mut block = vec![0u8; 512];
            let n = entries_per_block(512, bits) as usize;
            for i in 0..n {
                set(&mut block, bits, i, (i as u64 * 7 + 3) & max(bits));
            }
            for i in 0..n {
                assert_eq!(get(&block, bits, i), (i as u64 * 7 + 3) & max(bits));
            }
        }
        // Sub-byte entries start at the least significant bit.
        let mut b = vec![0u8; 1];
        set(&mut b, 1, 0, 1);
        assert_eq!(b[0], 1);
        set(&mut b, 4, 1, 0xf);
        assert_eq!(b[0], 0xf1);
        let mut w = vec![0u8; 4];
        set(&mut w, 16, 1, 0x0102);
        assert_eq!(w, [0, 0, 1, 2]);
    }
}
