//! Dirty bitmaps: [`DirtyBitmap`], the hierarchical bit array (one bit per granule, with
//! indexes so that dirty-extent walks cost O(extents)), and [`BitmapSet`], the live named
//! bitmaps of one node with QEMU's checks, error texts and backup's successor protocol.
//!
//! Who owns a node's set: a driver that persists bitmaps (qcow2) keeps its own and returns
//! it from [`crate::BlockNode::dirty_bitmaps`]; for other nodes the graph layer keeps one.
//! Every write, write-zeroes and discard of the node calls [`BitmapSet::mark`].

mod dirty;
mod set;

pub use dirty::{DirtyBitmap, DirtyExtents};
pub use set::{
    BitmapInfo, BitmapSet, CheckFlags, LoadedState, MAX_NAME_SIZE, StoredBitmap, check_add_args,
    inconsistent_error, not_found_error,
};

/// QEMU's default granularity for a new bitmap (`bdrv_get_default_bitmap_granularity`, also
/// mirror's default): the node's cluster size clamped to [4 KiB, 64 KiB]; 64 KiB when the
/// node reports no cluster size.
pub fn default_granularity(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(cs) if cs > 0 => cs.clamp(4096, 65536),
        _ => 65536,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn default_granularity_rule() {
        assert_eq!(default_granularity(None), 65536);
        assert_eq!(default_granularity(Some(0)), 65536);
        assert_eq!(default_granularity(Some(512)), 4096);
        assert_eq!(default_granularity(Some(16384)), 16384);
        assert_eq!(default_granularity(Some(2 << 20)), 65536);
    }

    #[tokio::test]
    async fn nodes_without_persistence_refuse_persistent_bitmaps() {
        use crate::BlockNode;
        let n = crate::mem::MemNode::new();
        assert!(n.dirty_bitmaps().is_none());
        let e = n.check_bitmap_storable("r0", "b", 65536).unwrap_err();
        assert_eq!(
            e.message(),
            "Can't store persistent bitmaps to r0: Operation not supported"
        );
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        n.remove_stored_bitmap("b").await.unwrap();
    }

    /// The model: the set of dirty chunk (granule) indexes.
    #[derive(Debug, Clone)]
    struct Model {
        size: u64,
        g: u64,
        dirty: BTreeSet<u64>,
    }

    impl Model {
        fn nbits(&self) -> u64 {
            self.size.div_ceil(self.g)
        }

        fn set(&mut self, off: u64, len: u64) {
            let end = off.saturating_add(len).min(self.size);
            if len == 0 || off >= end {
                return;
            }
            self.dirty.extend(off / self.g..end.div_ceil(self.g));
        }

        fn clear(&mut self, off: u64, len: u64) {
            let end = off.saturating_add(len).min(self.size);
            let a = off.div_ceil(self.g);
            let b = if end == self.size {
                self.nbits()
            } else {
                end / self.g
            };
            for i in a..b.max(a) {
                self.dirty.remove(&i);
            }
        }

        fn next_dirty(&self, off: u64) -> Option<u64> {
            if off >= self.size {
                return None;
            }
            let c = self.dirty.range(off / self.g..).next()?;
            Some((c * self.g).max(off))
        }

        fn next_zero(&self, off: u64) -> Option<u64> {
            if off >= self.size {
                return None;
            }
            let mut c = off / self.g;
            while c < self.nbits() {
                if !self.dirty.contains(&c) {
                    return Some((c * self.g).max(off));
                }
                c += 1;
            }
            None
        }

        fn extents(&self) -> Vec<(u64, u64)> {
            let mut out: Vec<(u64, u64)> = Vec::new();
            for &c in &self.dirty {
                let (o, e) = (c * self.g, ((c + 1) * self.g).min(self.size));
                match out.last_mut() {
                    Some((lo, ll)) if *lo + *ll == o => *ll = e - *lo,
                    _ => out.push((o, e - o)),
                }
            }
            out
        }

        fn resize(&mut self, size: u64) {
            self.size = size;
            let n = self.nbits();
            self.dirty.retain(|&c| c < n);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
        Resize(u64),
        /// Merge a bitmap of the same size (granularity shift, ranges set in it).
        Merge(u32, Vec<(u64, u64)>),
        ClearAll,
    }

    fn op(max: u64) -> impl Strategy<Value = Op> {
        let range = (0..max + 100, 0..max / 2 + 1);
        prop_oneof![
            6 => range.clone().prop_map(|(o, l)| Op::Set(o, l)),
            3 => range.clone().prop_map(|(o, l)| Op::Clear(o, l)),
            1 => (0..max + 1).prop_map(Op::Resize),
            1 => (0u32..4, prop::collection::vec(range, 0..4)).prop_map(|(s, v)| Op::Merge(s, v)),
            1 => Just(Op::ClearAll),
        ]
    }

    fn check_against(b: &DirtyBitmap, m: &Model, probes: &[u64]) {
        assert_eq!(b.size(), m.size);
        assert_eq!(b.count(), m.dirty.len() as u64 * m.g);
        assert_eq!(b.extents().collect::<Vec<_>>(), m.extents());
        for &p in probes {
            assert_eq!(
                b.get(p),
                p < m.size && m.dirty.contains(&(p / m.g)),
                "get {p}"
            );
            assert_eq!(b.next_dirty(p), m.next_dirty(p), "next_dirty {p}");
            assert_eq!(b.next_zero(p), m.next_zero(p), "next_zero {p}");
        }
        // Round trip through QEMU's serialisation, in parts of 2 words.
        let mut c = DirtyBitmap::new(m.size, m.g);
        let mut bit = 0;
        while bit < b.bits() {
            c.deserialize_part(bit, &b.serialize_part(bit, 16));
            bit += 128;
        }
        assert_eq!(&c, b);
        let l0 = b.level0_bytes();
        assert_eq!(l0.len() as u64, b.bits().div_ceil(64).max(1) * 8);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn dirty_bitmap_matches_model(
            gshift in 9u32..13,
            chunks in 1u64..600,
            tail in 0u64..512,
            ops in prop::collection::vec(op(600 * 4096), 1..40),
            probes in prop::collection::vec(0u64..700 * 4096, 8),
        ) {
            let g = 1u64 << gshift;
            let size = chunks * g - tail.min(g - 1);
            let mut b = DirtyBitmap::new(size, g);
            let mut m = Model { size, g, dirty: BTreeSet::new() };
            for o in ops {
                match o {
                    Op::Set(off, len) => {
                        b.set_range(off, len);
                        m.set(off, len);
                    }
                    Op::Clear(off, len) => {
                        b.clear_range(off, len);
                        m.clear(off, len);
                    }
                    Op::Resize(s) => {
                        b.resize(s);
                        m.resize(s);
                    }
                    Op::Merge(shift, ranges) => {
                        let og = ((g << shift) >> 1).max(512);
                        let mut other = DirtyBitmap::new(m.size, og);
                        let mut om = Model { size: m.size, g: og, dirty: BTreeSet::new() };
                        for (o, l) in ranges {
                            other.set_range(o, l);
                            om.set(o, l);
                        }
                        b.merge(&other).unwrap();
                        for (o, l) in om.extents() {
                            m.set(o, l);
                        }
                        let wrong = DirtyBitmap::new(m.size + 1, g);
                        prop_assert!(b.merge(&wrong).is_err());
                    }
                    Op::ClearAll => {
                        b.clear();
                        m.dirty.clear();
                    }
                }
                prop_assert_eq!(b.count(), m.dirty.len() as u64 * g);
            }
            check_against(&b, &m, &probes);
        }
    }

    /// Scattered single-granule writes: the worst case for the number of extents.
    fn scattered(size: u64, g: u64, per_mille: u64) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(size, g);
        let n = b.bits() * per_mille / 1000;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.set_range((x % b.bits()) * g, 1);
        }
        b
    }

    #[test]
    fn sixteen_tib_one_percent_enumerates_fast() {
        let b = scattered(16 << 40, 65536, 10);
        let t = std::time::Instant::now();
        let (mut n, mut bytes) = (0u64, 0u64);
        for (_, l) in b.extents() {
            n += 1;
            bytes += l;
        }
        let el = t.elapsed();
        assert_eq!(bytes, b.count());
        assert!(n > 2_000_000, "{n} extents");
        assert!(el < std::time::Duration::from_secs(2), "took {el:?}");
        // Clean areas are skipped through the indexes: the far end is found at once.
        let mut c = DirtyBitmap::new(16 << 40, 65536);
        c.set_range((16 << 40) - 1, 1);
        let t = std::time::Instant::now();
        for _ in 0..1000 {
            assert_eq!(c.extents().count(), 1);
        }
        assert!(t.elapsed() < std::time::Duration::from_millis(200));
    }
}
