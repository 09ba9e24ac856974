//! An in-memory dirty bitmap: one bit per `granularity` bytes of a disk of `size` bytes.
//!
//! Kept free of qcow2 specifics so the graph and job layers can use it (backup, mirror, NBD
//! `qemu:dirty-bitmap`). Bits live in a flat word array (QEMU's serialisation order: bit `i`
//! is bit `i % 8` of byte `i / 8`, words little-endian), with a summary word per 64 words
//! so that iterating the dirty extents skips clean areas 4096 bits at a time.

/// Bits per summary bit: one summary bit says "this word has a set bit".
const WORD_BITS: u64 = 64;

/// A dirty bitmap with a power-of-two granularity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    gran_bits: u32,
    size: u64,
    nbits: u64,
    words: Vec<u64>,
    /// Bit `w` is set when `words[w] != 0`.
    summary: Vec<u64>,
    /// Number of set bits.
    set: u64,
}

impl DirtyBitmap {
    /// A clean bitmap for a disk of `size` bytes; `granularity` must be a power of two.
    ///
    /// Memory is `size / granularity / 8` bytes: callers bound it (qcow2 refuses bitmaps
    /// over 512 MiB, as QEMU does).
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
            summary: Vec::new(),
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

    /// Dirty bytes, counting every set bit as a whole granule (QEMU's `count`).
    pub fn count(&self) -> u64 {
        self.set << self.gran_bits
    }

    /// Whether no bit is set.
    pub fn is_clean(&self) -> bool {
        self.set == 0
    }

    /// Grow or shrink to cover `size` bytes; new bits are clean, bits past the end dropped.
    pub fn resize(&mut self, size: u64) {
        let nbits = size.div_ceil(1 << self.gran_bits);
        if nbits < self.nbits {
            self.clear_bits(nbits, self.nbits);
        }
        let nwords = usize::try_from(nbits.div_ceil(WORD_BITS)).expect("bitmap fits in memory");
        self.words.resize(nwords, 0);
        self.summary.resize(nwords.div_ceil(64), 0);
        self.size = size;
        self.nbits = nbits;
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
    /// a partly covered granule keeps whatever change it may record.
    pub fn clear_range(&mut self, offset: u64, len: u64) {
        let g = 1u64 << self.gran_bits;
        let end = offset.saturating_add(len).min(self.size);
        let a = offset.div_ceil(g);
        // A range reaching the end of the disk clears its partial last granule too.
        let b = if end == self.size {
            self.nbits
        } else {
            end >> self.gran_bits
        };
        if a < b {
            self.clear_bits(a, b);
        }
    }

    /// Mark everything clean.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.summary.iter_mut().for_each(|w| *w = 0);
        self.set = 0;
    }

    /// Whether the granule containing byte `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        let bit = offset >> self.gran_bits;
        bit < self.nbits && self.words[(bit / WORD_BITS) as usize] >> (bit % WORD_BITS) & 1 != 0
    }

    fn update_word(&mut self, w: usize, new: u64) {
        let old = self.words[w];
        self.set = self.set - u64::from(old.count_ones()) + u64::from(new.count_ones());
        self.words[w] = new;
        let (s, bit) = (w / 64, 1u64 << (w % 64));
        if new != 0 {
            self.summary[s] |= bit;
        } else {
            self.summary[s] &= !bit;
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
    /// `hbitmap_can_merge`); granularities may differ (a coarser target rounds out).
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), &'static str> {
        if other.size != self.size {
            return Err("Bitmaps are incompatible and can't be merged");
        }
        if other.gran_bits == self.gran_bits {
            for w in 0..self.words.len() {
                let new = self.words[w] | other.words[w];
                if new != self.words[w] {
                    self.update_word(w, new);
                }
            }
        } else {
            for (o, l) in other.extents() {
                self.set_range(o, l);
            }
        }
        Ok(())
    }

    /// First word index `>= w` that has a set bit.
    fn next_word(&self, w: usize) -> Option<usize> {
        let mut s = w / 64;
        let mut mask = u64::MAX << (w % 64);
        while s < self.summary.len() {
            let v = self.summary[s] & mask;
            if v != 0 {
                return Some(s * 64 + v.trailing_zeros() as usize);
            }
            s += 1;
            mask = u64::MAX;
        }
        None
    }

    /// First bit `>= bit` with value `want`, or `nbits`.
    fn next_bit(&self, bit: u64, want: bool) -> u64 {
        let mut w = (bit / WORD_BITS) as usize;
        let mut lo = bit % WORD_BITS;
        while (w as u64) * WORD_BITS < self.nbits {
            if want {
                match self.next_word(w) {
                    None => return self.nbits,
                    Some(n) if n != w => {
                        w = n;
                        lo = 0;
                    }
                    Some(_) => {}
                }
            }
            let v = if want { self.words[w] } else { !self.words[w] } & (u64::MAX << lo);
            if v != 0 {
                return ((w as u64) * WORD_BITS + u64::from(v.trailing_zeros())).min(self.nbits);
            }
            w += 1;
            lo = 0;
        }
        self.nbits
    }

    /// The dirty extents as byte ranges `(offset, len)` clamped to the disk size, in order.
    /// Cost: proportional to the extents, plus one summary word per 4096 clean bits.
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

    /// Set bits from QEMU's serialised layout starting at `first_bit` (a multiple of 64).
    /// Bits past the end of the bitmap are ignored.
    pub fn deserialize_part(&mut self, first_bit: u64, bytes: &[u8]) {
        debug_assert!(first_bit.is_multiple_of(WORD_BITS));
        let w0 = (first_bit / WORD_BITS) as usize;
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let w = w0 + i;
            if w >= self.words.len() {
                break;
            }
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let v = u64::from_le_bytes(b);
            if v != 0 {
                let new = self.words[w] | v;
                self.update_word(w, new);
            }
        }
        let end = self.nbits;
        self.clear_bits(end, (self.words.len() as u64) * WORD_BITS);
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
        b.clear();
        assert!(b.is_clean());
        assert_eq!(b.extents().next(), None);
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
    fn against_a_model() {
        let size = 3_000_000u64;
        let g = 512u64;
        let mut b = DirtyBitmap::new(size, g);
        let mut model = vec![false; size.div_ceil(g) as usize];
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = x % size;
            let len = (x >> 20) % 200_000;
            if x & 3 == 0 {
                b.clear_range(off, len);
                let end = (off + len).min(size);
                let a = off.div_ceil(g);
                let e = if end == size {
                    model.len() as u64
                } else {
                    end / g
                };
                for i in a..e.max(a) {
                    model[i as usize] = false;
                }
            } else {
                b.set_range(off, len);
                if len > 0 {
                    let end = (off + len).min(size);
                    for i in off / g..end.div_ceil(g) {
                        model[i as usize] = true;
                    }
                }
            }
        }
        let mut from_model = Vec::new();
        let mut i = 0;
        while i < model.len() {
            if model[i] {
                let s = i;
                while i < model.len() && model[i] {
                    i += 1;
                }
                let e = (i as u64 * g).min(size);
                from_model.push((s as u64 * g, e - s as u64 * g));
            } else {
                i += 1;
            }
        }
        assert_eq!(b.extents().collect::<Vec<_>>(), from_model);
        assert_eq!(b.count(), model.iter().filter(|&&m| m).count() as u64 * g);
    }
}
