//! Self-describing sector contents: bytes 0..8 are the sector's guest offset, 8..16 its
//! generation (1 for the first write), the rest a filler derived from both. An all-zero
//! sector is generation 0 (never written).

/// The unit the patterns describe.
pub const SECTOR: usize = 512;

/// Fill `buf` (a whole number of sectors) as generation `generation` of the sectors at `offset`.
pub fn fill(buf: &mut [u8], offset: u64, generation: u64) {
    for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
        fill_sector(s, offset + (i * SECTOR) as u64, generation);
    }
}

fn fill_sector(s: &mut [u8], offset: u64, generation: u64) {
    s[..8].copy_from_slice(&offset.to_le_bytes());
    s[8..16].copy_from_slice(&generation.to_le_bytes());
    let mut x = (offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation) | 1;
    for b in &mut s[16..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// What a sector read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sector {
    /// Generation `n` of the sector at `offset` (0: all zeroes).
    Gen { offset: u64, generation: u64 },
    /// Neither zeroes nor an intact pattern: torn or foreign data.
    Garbage,
}

/// Decode one sector.
pub fn decode(s: &[u8]) -> Sector {
    if s.iter().all(|&b| b == 0) {
        return Sector::Gen {
            offset: u64::MAX,
            generation: 0,
        };
    }
    let offset = u64::from_le_bytes(s[..8].try_into().unwrap_or_default());
    let generation = u64::from_le_bytes(s[8..16].try_into().unwrap_or_default());
    let mut want = vec![0u8; SECTOR];
    fill_sector(&mut want, offset, generation);
    if want == s {
        Sector::Gen { offset, generation }
    } else {
        Sector::Garbage
    }
}

/// Check that sector `index` of a view holds a generation in `allowed`; `None` if it does,
/// else a description of what is wrong.
pub fn check_sector(s: &[u8], index: u64, allowed: &[u64]) -> Option<String> {
    let at = index * SECTOR as u64;
    match decode(s) {
        Sector::Gen { generation: 0, .. } if allowed.contains(&0) => None,
        Sector::Gen { offset, generation } if generation != 0 && offset != at => Some(format!(
            "sector at {at:#x} holds data of offset {offset:#x} (generation {generation})"
        )),
        Sector::Gen { generation, .. } if allowed.contains(&generation) => None,
        Sector::Gen { generation, .. } => Some(format!(
            "sector at {at:#x} holds generation {generation}, expected one of {allowed:?}"
        )),
        Sector::Garbage => Some(format!("sector at {at:#x} holds torn or foreign data")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_misplacement() {
        let mut b = vec![0u8; 2 * SECTOR];
        fill(&mut b, 4096, 3);
        assert_eq!(
            decode(&b[SECTOR..]),
            Sector::Gen {
                offset: 4608,
                generation: 3
            }
        );
        assert!(check_sector(&b[..SECTOR], 8, &[3]).is_none());
        assert!(check_sector(&b[..SECTOR], 9, &[3]).is_some());
        b[100] ^= 1;
        assert_eq!(decode(&b[..SECTOR]), Sector::Garbage);
    }
}
