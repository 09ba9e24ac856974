//! `bench/bitmap_enum`: how long walking the dirty extents of a [`DirtyBitmap`] takes for
//! 1 TiB and 16 TiB nodes at 64 KiB granularity with 0.1%, 1% and 10% of the granules dirty
//! at random places (the worst case for the number of extents).
//!
//! Run with `cargo run --release -p strata-core --example bitmap_enum`.

use std::time::Instant;

use strata_core::DirtyBitmap;

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

fn main() {
    const TIB: u64 = 1 << 40;
    const G: u64 = 65536;
    println!("size    dirty   extents    dirty bytes        walk      next_dirty(clean)");
    for (label, size) in [("1 TiB", TIB), ("16 TiB", 16 * TIB)] {
        for per_mille in [1u64, 10, 100] {
            let b = scattered(size, G, per_mille);
            let t = Instant::now();
            let (mut n, mut bytes) = (0u64, 0u64);
            for (_, l) in b.extents() {
                n += 1;
                bytes += l;
            }
            let walk = t.elapsed();
            assert_eq!(bytes, b.count());
            // One far dirty granule in an otherwise clean bitmap: the index skips the rest.
            let mut c = DirtyBitmap::new(size, G);
            c.set_range(size - 1, 1);
            let t = Instant::now();
            let found = c.next_dirty(0);
            let far = t.elapsed();
            assert_eq!(found, Some(size - G));
            println!(
                "{label:<7} {:>4.1}%  {n:>9}  {bytes:>15}  {walk:>12.2?}  {far:>10.2?}",
                per_mille as f64 / 10.0
            );
        }
    }
}
