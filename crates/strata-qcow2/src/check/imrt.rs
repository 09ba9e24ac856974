//! The in-memory refcount table (QEMU's "IMRT"): how often each host cluster is referenced,
//! computed from the metadata, to compare with what the refcount blocks say.

use strata_core::{Error, Result};

/// Most clusters we are willing to count (1 GiB of counters at 2 bytes each): a file this
/// large is far beyond any sane image, and a hostile sparse file must not make us allocate
/// without bound. QEMU's own limit is `INT_MAX` clusters.
pub const MAX_CLUSTERS: u64 = 1 << 29;

/// Reference counts, one per host cluster. Counts up to `u16::MAX - 1` live in a compact
/// vector; larger ones (only possible with absurd sharing) spill into a map.
#[derive(Debug, Default, Clone)]
pub struct Imrt {
    small: Vec<u16>,
    big: std::collections::HashMap<u64, u64>,
}

const SPILL: u16 = u16::MAX;

impl Imrt {
    /// A table of `n` zero counts.
    pub fn new(n: u64) -> Result<Self> {
        let mut t = Imrt::default();
        t.grow(n)?;
        Ok(t)
    }

    /// Number of clusters covered.
    pub fn len(&self) -> u64 {
        self.small.len() as u64
    }

    /// Whether no cluster is covered.
    pub fn is_empty(&self) -> bool {
        self.small.is_empty()
    }

    /// Cover at least `n` clusters (new ones count zero).
    pub fn grow(&mut self, n: u64) -> Result<()> {
        if n > MAX_CLUSTERS {
            return Err(Error::new(
                strata_core::ErrorKind::Io(libc::EFBIG),
                format!("image file too large to check ({n} clusters)"),
            ));
        }
        if n > self.len() {
            self.small.resize(n as usize, 0);
        }
        Ok(())
    }

    /// The count of cluster `k` (0 beyond the end).
    pub fn get(&self, k: u64) -> u64 {
        match usize::try_from(k).ok().and_then(|i| self.small.get(i)) {
            Some(&SPILL) => self.big.get(&k).copied().unwrap_or(0),
            Some(&v) => u64::from(v),
            None => 0,
        }
    }

    /// Set the count of cluster `k`, which must be covered.
    pub fn set(&mut self, k: u64, v: u64) {
        let i = k as usize;
        if v >= u64::from(SPILL) {
            self.small[i] = SPILL;
            self.big.insert(k, v);
        } else {
            self.small[i] = v as u16;
            self.big.remove(&k);
        }
    }

    /// Forget every count, keeping the size.
    pub fn clear(&mut self) {
        self.small.fill(0);
        self.big.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_spill_past_u16() {
        let mut t = Imrt::new(4).unwrap();
        t.set(1, 70000);
        t.set(2, 5);
        assert_eq!(t.get(1), 70000);
        assert_eq!(t.get(2), 5);
        assert_eq!(t.get(100), 0);
        t.set(1, 3);
        assert_eq!(t.get(1), 3);
        assert!(Imrt::new(MAX_CLUSTERS + 1).is_err());
    }
}
