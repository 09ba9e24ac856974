//! Zero detection in copied data, as `qemu-img convert -S` does it (`is_allocated_sectors`
//! and `is_allocated_sectors_min` in QEMU's `qemu-img.c`): a data buffer is cut into runs
//! of data and of zeroes, where zero runs shorter than the sparse size are kept as data and
//! run ends are aligned to the target's alignment.

use strata_core::buf::is_zero;

/// The unit zero detection works in.
pub const SECTOR: usize = 512;

/// Whether sector `i` of `buf` (the last one may be partial) is all zeroes.
fn sector_is_zero(buf: &[u8], i: usize) -> bool {
    let start = i * SECTOR;
    is_zero(&buf[start..(start + SECTOR).min(buf.len())])
}

/// The first run of `n` sectors starting at `sector` that is all data or all zeroes:
/// `(is_data, sectors)`, with the end aligned to `align` sectors (a power of two).
fn first_run(buf: &[u8], n: usize, sector: u64, align: u64) -> (bool, usize) {
    if n == 0 {
        return (false, 0);
    }
    let zero = sector_is_zero(buf, 0);
    let mut i = 1;
    while i < n && sector_is_zero(buf, i) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, i);
    }
    let tail = ((sector + i as u64) & (align - 1)) as usize;
    if tail != 0 {
        if zero && i <= tail {
            // The next sector is data and its write will cover this short zero run anyway.
            return (true, i);
        }
        if zero {
            i -= tail;
        } else {
            i = (i + align as usize - tail).min(n);
        }
    }
    (!zero, i)
}

/// QEMU's `is_allocated_sectors_min`: like [`first_run`], but a data run swallows zero
/// runs shorter than `min` sectors that are followed by more data.
fn first_run_min(buf: &[u8], n: usize, min: usize, sector: u64, align: u64) -> (bool, usize) {
    let min = min.min(n);
    let (data, first) = first_run(buf, n, sector, align);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    while checked < n {
        let (d, p) = first_run(
            &buf[checked * SECTOR..],
            n - checked,
            sector + checked as u64,
            align,
        );
        checked += p;
        if d {
            used = checked;
        } else if p >= min {
            break;
        }
    }
    (true, used)
}

/// Cut `buf`, which holds the data at byte offset `offset` (a multiple of 512), into
/// `(is_data, bytes)` runs. `min_sparse` and `align` are in bytes (`align` a power of two).
pub fn runs(buf: &[u8], offset: u64, min_sparse: u64, align: u64) -> Vec<(bool, usize)> {
    let sectors = buf.len().div_ceil(SECTOR);
    let min = (min_sparse as usize).div_ceil(SECTOR).max(1);
    let align = (align / SECTOR as u64).max(1);
    let mut out: Vec<(bool, usize)> = Vec::new();
    let mut s = 0;
    while s < sectors {
        let (d, n) = first_run_min(
            &buf[s * SECTOR..],
            sectors - s,
            min,
            offset / SECTOR as u64 + s as u64,
            align,
        );
        let bytes = (n * SECTOR).min(buf.len() - s * SECTOR);
        match out.last_mut() {
            Some((ld, lb)) if *ld == d => *lb += bytes,
            _ => out.push((d, bytes)),
        }
        s += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(sectors: &[u8]) -> Vec<u8> {
        sectors.iter().flat_map(|&v| vec![v; SECTOR]).collect()
    }

    #[test]
    fn short_zero_gaps_stay_data() {
        // 1 data sector, 2 zero sectors, 1 data, then 16 zero sectors.
        let mut s = vec![1, 0, 0, 1];
        s.extend([0; 16]);
        let b = buf(&s);
        assert_eq!(
            runs(&b, 0, 4096, 512),
            vec![(true, 4 * SECTOR), (false, 16 * SECTOR)]
        );
        // With -S 512 the short gap becomes a hole.
        assert_eq!(
            runs(&b, 0, 512, 512),
            vec![
                (true, SECTOR),
                (false, 2 * SECTOR),
                (true, SECTOR),
                (false, 16 * SECTOR)
            ]
        );
    }

    #[test]
    fn run_ends_align_to_the_target() {
        // Data in sector 1 only; 4k alignment rounds the data run to whole 4k blocks.
        let mut s = vec![0; 24];
        s[1] = 1;
        let b = buf(&s);
        assert_eq!(
            runs(&b, 0, 4096, 4096),
            vec![(true, 8 * SECTOR), (false, 16 * SECTOR)]
        );
        assert!(runs(&vec![0u8; 1000], 0, 4096, 4096) == vec![(false, 1000)]);
    }
}
