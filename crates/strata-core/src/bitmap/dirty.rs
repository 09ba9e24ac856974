//! [`DirtyBitmap`]: one bit per `granularity` bytes of a disk of `size` bytes, hierarchical so
//! that finding dirty (or clean) areas costs what the answer costs, not what the disk costs.
//!
//! The bits live in a flat array of 64-bit words (QEMU's serialisation order: bit `i` is bit
//! `i % 8` of byte `i / 8`, words little-endian). Two indexes sit on top of it, each a tower
//! of levels with one bit per word of the level below (QEMU's `HBitmap` keeps one such tower):
//!
//! - `dirty`: bit `w` of its first level is set when word `w` has a set bit;
//! - `clean`: bit `w` of its first level is set when word `w` has a clear bit.
//!
//! `next_dirty` climbs the `dirty` tower to skip clean areas, `next_zero` climbs the `clean`
//! tower to skip fully dirty areas, so walking the dirty extents costs a few word reads per
//! extent whatever the disk size. The set-bit count is maintained on every change.

const WORD_BITS: u64 = 64;

/// A tower of summary levels: `levels[0]` has one bit per item (a word of the bitmap),
/// `levels[k + 1]` one bit per word of `levels[k]`, set when that word is non-zero. The top
/// level has at most one word.
#[derive(Debug, Clone, Default)]
struct Index {
    levels: Vec<Vec<u64>>,
}

impl Index {
    /// An index over `n` items where `flag(i)` says whether item `i` is marked.
    fn build(n: usize, flag: impl Fn(usize) -> bool) -> Index {
        let mut l0 = vec![0u64; n.div_ceil(64)];
        for i in (0..n).filter(|&i| flag(i)) {
            l0[i / 64] |= 1 << (i % 64);
        }
        let mut levels = vec![l0];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let prev = levels.last().unwrap();
            let mut next = vec![0u64; prev.len().div_ceil(64)];
            for (i, _) in prev.iter().enumerate().filter(|(_, w)| **w != 0) {
                next[i / 64] |= 1 << (i % 64);
            }
            levels.push(next);
        }
        Index { levels }
    }

    /// Mark or unmark item `i`, updating the levels above while a word changes between zero
    /// and non-zero.
    fn set(&mut self, mut i: usize, mut on: bool) {
        for l in self.levels.iter_mut() {
            let (wi, bit) = (i / 64, 1u64 << (i % 64));
            let old = l[wi];
            let new = if on { old | bit } else { old & !bit };
            l[wi] = new;
            if (old != 0) == (new != 0) {
                break;
            }
            on = new != 0;
            i = wi;
        }
    }

    /// The first marked item `>= i`.
    fn find(&self, i: usize) -> Option<usize> {
        self.find_at(0, i)
    }

    fn find_at(&self, k: usize, i: usize) -> Option<usize> {
        let l = &self.levels[k];
        let wi = i / 64;
        if wi >= l.len() {
            return None;
        }
        let v = l[wi] & (u64::MAX << (i % 64));
        if v != 0 {
            return Some(wi * 64 + v.trailing_zeros() as usize);
        }
        let next = if k + 1 < self.levels.len() {
            self.find_at(k + 1, wi + 1)?
        } else {
            (wi + 1..l.len()).find(|&j| l[j] != 0)?
        };
        Some(next * 64 + l[next].trailing_zeros() as usize)
    }
}

/// A dirty bitmap with a power-of-two granularity.
///
/// Byte ranges map to whole granules: a range dirties every granule it touches, and
/// `clear_range` cleans only granules it covers entirely (except the partial granule at the
/// end of the disk). The last granule may be partial; extents are clamped to the disk size.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    gran_bits: u32,
    size: u64,
    nbits: u64,
    words: Vec<u64>,
    dirty: Index,
    clean: Index,
    /// Number of set bits.
    set: u64,
}

impl PartialEq for DirtyBitmap {
    fn eq(&self, o: &DirtyBitmap) -> bool {
        self.gran_bits == o.gran_bits && self.size == o.size && self.words == o.words
    }
}

impl Eq for DirtyBitmap {}

impl DirtyBitmap {
    /// A clean bitmap for a disk of `size` bytes; `granularity` must be a power of two.
    ///
    /// Memory is about `size / granularity / 8` bytes (plus 1/32 for the indexes): callers
    /// bound it (qcow2 refuses bitmaps over 512 MiB, as QEMU does).
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        assert!(
            granularity.is_power_of_two(),
            "granularity must be a power of two"
        );
        let mut b = DirtyBitmap {
            gran_bits: granularity.trailing_zeros(),
            size: 0,
            nbits: 0,
            words: Vec::new(),
            dirty: Index::default(),
            clean: Index::default(),
            set: 0,
        };
        b.resize(size);
        b
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.gran_bits
    }

    /// The disk size the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of bits (`ceil(size / granularity)`).
    pub fn bits(&self) -> u64 {
        self.nbits
    }

    /// Dirty bytes, counting every set bit as a whole granule (QEMU's `count`). O(1).
    pub fn count(&self) -> u64 {
        self.set << self.gran_bits
    }

    /// Number of set bits. O(1).
    pub fn dirty_bits(&self) -> u64 {
        self.set
    }

    /// Whether no bit is set.
    pub fn is_clean(&self) -> bool {
        self.set == 0
    }

    fn rebuild(&mut self) {
        let w = &self.words;
        self.dirty = Index::build(w.len(), |i| w[i] != 0);
        self.clean = Index::build(w.len(), |i| w[i] != u64::MAX);
    }

    /// Grow or shrink to cover `size` bytes; new bits are clean, bits past the end dropped.
    /// Costs O(size / granularity / 64) (the indexes are rebuilt).
    pub fn resize(&mut self, size: u64) {
        let nbits = size.div_ceil(1 << self.gran_bits);
        if nbits < self.nbits {
            self.clear_bits(nbits, self.nbits);
        }
        let nwords = usize::try_from(nbits.div_ceil(WORD_BITS)).expect("bitmap fits in memory");
        self.words.resize(nwords, 0);
        self.words.shrink_to_fit();
        self.size = size;
        self.nbits = nbits;
        self.rebuild();
    }

    /// The bits `[first, end)` touched by the byte range `[offset, offset + len)`, clamped to
    /// the disk.
    fn bit_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return (0, 0);
        }
        (offset >> self.gran_bits, end.div_ceil(1 << self.gran_bits))
    }

    /// Mark the bytes `[offset, offset + len)` dirty (whole granules).
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let (a, b) = self.bit_range(offset, len);
        self.set_bits(a, b);
    }

    /// Mark bytes `[offset, offset + len)` clean: only granules wholly inside the range, so
    /// a partly covered granule keeps whatever change it may record. A range reaching the
    /// end of the disk cleans the partial last granule too.
    pub fn clear_range(&mut self, offset: u64, len: u64) {
        let g = 1u64 << self.gran_bits;
        let end = offset.saturating_add(len).min(self.size);
        let a = offset.div_ceil(g);
        let b = if end == self.size {
            self.nbits
        } else {
            end >> self.gran_bits
        };
        if a < b {
            self.clear_bits(a, b);
        }
    }

    /// Mark everything clean. Costs O(dirty words).
    pub fn clear(&mut self) {
        let mut w = 0;
        while let Some(n) = self.dirty.find(w) {
            self.update_word(n, 0);
            w = n + 1;
        }
    }

    /// Whether the granule containing byte `offset` is dirty (false past the end).
    pub fn get(&self, offset: u64) -> bool {
        let bit = offset >> self.gran_bits;
        offset < self.size && self.words[(bit / WORD_BITS) as usize] >> (bit % WORD_BITS) & 1 != 0
    }

    fn update_word(&mut self, w: usize, new: u64) {
        let old = self.words[w];
        if old == new {
            return;
        }
        self.set = self.set - u64::from(old.count_ones()) + u64::from(new.count_ones());
        self.words[w] = new;
        if (old != 0) != (new != 0) {
            self.dirty.set(w, new != 0);
        }
        if (old == u64::MAX) != (new == u64::MAX) {
            self.clean.set(w, new != u64::MAX);
        }
    }

    /// Apply `f(word, mask)` to every word overlapping bits `[a, b)`.
    fn for_words(&mut self, a: u64, b: u64, f: impl Fn(u64, u64) -> u64) {
        let mut bit = a;
        while bit < b {
            let w = bit / WORD_BITS;
            let lo = bit % WORD_BITS;
            let hi = (b - w * WORD_BITS).min(WORD_BITS);
            let mask = if hi - lo == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let new = f(self.words[w as usize], mask);
            self.update_word(w as usize, new);
            bit = (w + 1) * WORD_BITS;
        }
    }

    fn set_bits(&mut self, a: u64, b: u64) {
        self.for_words(a, b.min(self.nbits), |w, m| w | m);
    }

    fn clear_bits(&mut self, a: u64, b: u64) {
        self.for_words(a, b.min(self.nbits), |w, m| w & !m);
    }

    /// Set every bit set in `other`, which must cover the same disk size (QEMU's
    /// `hbitmap_can_merge`); granularities may differ (a coarser target rounds out, as
    /// QEMU's `hbitmap_sparse_merge`). Costs O(dirty part of `other`).
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), &'static str> {
        if other.size != self.size {
            return Err("Bitmaps are incompatible and can't be merged");
        }
        if other.gran_bits == self.gran_bits {
            let mut w = 0;
            while let Some(n) = other.dirty.find(w) {
                self.update_word(n, self.words[n] | other.words[n]);
                w = n + 1;
            }
        } else {
            for (o, l) in other.extents() {
                self.set_range(o, l);
            }
        }
        Ok(())
    }

    /// First bit `>= bit` with value `want`, or `nbits`.
    fn next_bit(&self, bit: u64, want: bool) -> u64 {
        if bit >= self.nbits {
            return self.nbits;
        }
        let read = |w: usize| if want { self.words[w] } else { !self.words[w] };
        let w = (bit / WORD_BITS) as usize;
        let v = read(w) & (u64::MAX << (bit % WORD_BITS));
        if v != 0 {
            return ((w as u64) * WORD_BITS + u64::from(v.trailing_zeros())).min(self.nbits);
        }
        let idx = if want { &self.dirty } else { &self.clean };
        match idx.find(w + 1) {
            None => self.nbits,
            Some(n) => {
                ((n as u64) * WORD_BITS + u64::from(read(n).trailing_zeros())).min(self.nbits)
            }
        }
    }

    /// The first dirty byte at or after `offset` (`offset` itself when its granule is
    /// dirty), or `None` when the rest of the disk is clean (QEMU's
    /// `bdrv_dirty_bitmap_next_dirty`).
    pub fn next_dirty(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let b = self.next_bit(offset >> self.gran_bits, true);
        (b < self.nbits).then(|| (b << self.gran_bits).max(offset))
    }

    /// The first clean byte at or after `offset` (`offset` itself when its granule is
    /// clean), or `None` when the rest of the disk is dirty (QEMU's
    /// `bdrv_dirty_bitmap_next_zero`).
    pub fn next_zero(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let b = self.next_bit(offset >> self.gran_bits, false);
        (b < self.nbits).then(|| (b << self.gran_bits).max(offset))
    }

    /// The first dirty area starting at or after `offset` and before `end`, clipped to
    /// `[offset, end)`, at most `max_len` bytes long (QEMU's
    /// `bdrv_dirty_bitmap_next_dirty_area`).
    pub fn next_dirty_area(&self, offset: u64, end: u64, max_len: u64) -> Option<(u64, u64)> {
        let end = end.min(self.size);
        let start = self.next_dirty(offset).filter(|&s| s < end)?;
        let stop = self.next_zero(start).unwrap_or(self.size).min(end);
        Some((start, (stop - start).min(max_len)))
    }

    /// The dirty extents as byte ranges `(offset, len)` clamped to the disk size, in order.
    /// Cost: a few word reads per extent, whatever the disk size.
    pub fn extents(&self) -> DirtyExtents<'_> {
        DirtyExtents { b: self, bit: 0 }
    }

    /// The dirty extents overlapping `[offset, offset + len)`, clipped to it.
    pub fn extents_in(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = offset.saturating_add(len).min(self.size);
        DirtyExtents {
            b: self,
            bit: offset >> self.gran_bits,
        }
        .take_while(move |&(o, _)| o < end)
        .filter_map(move |(o, l)| {
            let a = o.max(offset);
            let e = (o + l).min(end);
            (a < e).then_some((a, e - a))
        })
    }

    /// The bitmap serialised for bits `[first_bit, first_bit + nbytes * 8)`: QEMU's on-disk
    /// layout (bit `i` is bit `i % 8` of byte `i / 8`); bits past the end read as zero.
    /// `first_bit` must be a multiple of 64.
    pub fn serialize_part(&self, first_bit: u64, nbytes: usize) -> Vec<u8> {
        debug_assert!(first_bit.is_multiple_of(WORD_BITS));
        let mut out = vec![0u8; nbytes];
        let w0 = (first_bit / WORD_BITS) as usize;
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            if let Some(w) = self.words.get(w0 + i) {
                let b = w.to_le_bytes();
                chunk.copy_from_slice(&b[..chunk.len()]);
            }
        }
        out
    }

    /// Set (OR in) bits from QEMU's serialised layout starting at `first_bit` (a multiple of
    /// 64). Bits past the end of the bitmap are ignored.
    pub fn deserialize_part(&mut self, first_bit: u64, bytes: &[u8]) {
        debug_assert!(first_bit.is_multiple_of(WORD_BITS));
        let w0 = (first_bit / WORD_BITS) as usize;
        let last = self.nbits % WORD_BITS;
        let nwords = self.words.len();
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let w = w0 + i;
            if w >= nwords {
                break;
            }
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let mut v = u64::from_le_bytes(b);
            if w + 1 == nwords && last != 0 {
                v &= (1u64 << last) - 1;
            }
            if v != 0 {
                self.update_word(w, self.words[w] | v);
            }
        }
    }

    /// The whole level-0 bit array as little-endian 64-bit words, at least one word: the
    /// bytes QEMU's `x-debug-block-dirty-bitmap-sha256` hashes (`hbitmap_sha256` digests
    /// the last `HBitmap` level, `max(ceil(bits / 64), 1)` longs, on a little-endian host).
    pub fn level0_bytes(&self) -> Vec<u8> {
        if self.words.is_empty() {
            return vec![0; 8];
        }
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Set bits `[first_bit, first_bit + n)`.
    pub fn set_bits_from(&mut self, first_bit: u64, n: u64) {
        self.set_bits(first_bit, first_bit.saturating_add(n));
    }

    /// Whether bits `[first_bit, first_bit + n)` hold any set bit.
    pub fn any_in_bits(&self, first_bit: u64, n: u64) -> bool {
        let end = first_bit.saturating_add(n).min(self.nbits);
        first_bit < end && self.next_bit(first_bit, true) < end
    }
}

/// Iterator over dirty byte extents (see [`DirtyBitmap::extents`]).
#[derive(Debug)]
pub struct DirtyExtents<'a> {
    b: &'a DirtyBitmap,
    bit: u64,
}

impl Iterator for DirtyExtents<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.b.next_bit(self.bit, true);
        if start >= self.b.nbits {
            self.bit = self.b.nbits;
            return None;
        }
        let end = self.b.next_bit(start, false);
        self.bit = end;
        let g = self.b.gran_bits;
        let off = start << g;
        let e = (end << g).min(self.b.size);
        Some((off, e - off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_extents() {
        let mut b = DirtyBitmap::new(1 << 20, 4096);
        assert_eq!(b.bits(), 256);
        b.set_range(5000, 1);
        b.set_range(64 * 4096 - 1, 2);
        assert_eq!(b.count(), 3 * 4096);
        let e: Vec<_> = b.extents().collect();
        assert_eq!(e, vec![(4096, 4096), (63 * 4096, 2 * 4096)]);
        b.clear_range(63 * 4096, 4096);
        assert_eq!(
            b.extents().collect::<Vec<_>>(),
            vec![(4096, 4096), (64 * 4096, 4096)]
        );
        b.set_range(0, 1 << 20);
        assert_eq!(b.extents().collect::<Vec<_>>(), vec![(0, 1 << 20)]);
        assert_eq!(b.count(), 1 << 20);
        assert_eq!(b.next_zero(0), None);
        b.clear();
        assert!(b.is_clean());
        assert_eq!(b.extents().next(), None);
        assert_eq!(b.next_dirty(0), None);
    }

    #[test]
    fn partial_last_granule_and_resize() {
        let mut b = DirtyBitmap::new(10_000, 4096);
        assert_eq!(b.bits(), 3);
        b.set_range(9_999, 100);
        assert_eq!(b.extents().collect::<Vec<_>>(), vec![(8192, 10_000 - 8192)]);
        b.resize(8192);
        assert!(b.is_clean());
        b.set_range(0, 8192);
        b.resize(1 << 20);
        assert_eq!(b.extents().collect::<Vec<_>>(), vec![(0, 8192)]);
        assert_eq!(
            b.extents_in(4096, 100).collect::<Vec<_>>(),
            vec![(4096, 100)]
        );
    }

    #[test]
    fn serialization_matches_qemu_bit_order_and_merge() {
        let mut b = DirtyBitmap::new(1 << 30, 65536);
        b.set_range(0, 1);
        b.set_range(9 * 65536, 1);
        let s = b.serialize_part(0, 16);
        assert_eq!(&s[..2], &[0x01, 0x02]);
        let mut c = DirtyBitmap::new(1 << 30, 65536);
        c.deserialize_part(0, &s);
        assert_eq!(b, c);
        let mut d = DirtyBitmap::new(1 << 30, 512);
        d.set_range(100 << 20, 1);
        c.merge(&d).unwrap();
        assert_eq!(c.count(), 3 * 65536);
        assert!(c.get(100 << 20));
        assert!(c.merge(&DirtyBitmap::new(1 << 29, 65536)).is_err());
    }

    #[test]
    fn level0_bytes_as_qemu_hashes_them() {
        // 1 MiB at 64 KiB: 16 bits, one word.
        let mut b = DirtyBitmap::new(1 << 20, 65536);
        assert_eq!(b.level0_bytes(), vec![0; 8]);
        b.set_range(65536, 1);
        assert_eq!(b.level0_bytes(), vec![2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(DirtyBitmap::new(0, 512).level0_bytes(), vec![0; 8]);
        assert_eq!(DirtyBitmap::new(65 * 512, 512).level0_bytes().len(), 16);
    }

    #[test]
    fn deep_index_skips_far() {
        // 2^24 bits in 2^18 words: index levels of 2^12, 2^6 and 1 words.
        let mut b = DirtyBitmap::new(1 << 33, 512);
        assert_eq!(b.dirty.levels.len(), 3);
        b.set_range((1 << 33) - 512, 512);
        assert_eq!(b.next_dirty(0), Some((1 << 33) - 512));
        b.set_range(0, 1 << 33);
        b.clear_range(1 << 32, 512);
        assert_eq!(b.next_zero(0), Some(1 << 32));
        assert_eq!(b.next_zero((1 << 32) + 1), Some((1 << 32) + 1));
        assert_eq!(b.next_zero((1 << 32) + 512), None);
        assert_eq!(b.extents().count(), 2);
    }
}
