//! Refcount entries packed in refcount blocks: 1..=64 bits each, big-endian for byte-sized
//! and wider entries, least significant bits first inside a byte for the narrow ones (as
//! QEMU's `get_refcount_ro0..ro6` read them).

/// Read entry `i` of a refcount block of `order` (refcount bits = 2^order).
pub fn get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            u64::from((byte >> ((i % per_byte) * bits)) & ((1u16 << bits) - 1) as u8)
        }
        _ => {
            let n = 1usize << (order - 3);
            block[i * n..(i + 1) * n]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

/// Write entry `i` of a refcount block of `order`; `v` must fit the width.
pub fn set(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        _ => {
            let n = 1usize << (order - 3);
            let bytes = v.to_be_bytes();
            block[i * n..(i + 1) * n].copy_from_slice(&bytes[8 - n..]);
        }
    }
}

/// The largest count an entry of `order` can hold.
pub fn max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6 {
            let mut b = vec![0u8; 64];
            let m = max(order);
            for i in 0..((64 * 8) >> order) {
                set(&mut b, order, i, (i as u64 * 7) & m);
            }
            for i in 0..((64 * 8) >> order) {
                assert_eq!(get(&b, order, i), (i as u64 * 7) & m, "order {order} i {i}");
            }
        }
        let mut b = vec![0u8; 2];
        set(&mut b, 0, 1, 1);
        assert_eq!(b[0], 2, "1-bit entries fill a byte from its low bit");
        set(&mut b, 4, 0, 0x1234);
        assert_eq!(b, [0x12, 0x34]);
    }
}
