//! A small LRU cache of metadata tables (L2 tables, refcount blocks) keyed by host offset.
//!
//! The cache only holds tables and dirty flags; loading and writing back are done by the
//! metadata layer, which knows the flush ordering (refcount blocks before the L2 tables that
//! reference new clusters; L2 tables before refcount decrements).

use std::collections::HashMap;

#[derive(Debug)]
struct Slot<T> {
    table: T,
    dirty: bool,
    last_use: u64,
}

/// An LRU cache of at most `capacity` tables.
#[derive(Debug)]
pub(crate) struct TableCache<T> {
    slots: HashMap<u64, Slot<T>>,
    capacity: usize,
    tick: u64,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` (at least 1) tables.
    pub fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
        }
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Whether the table at `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.slots.contains_key(&offset)
    }

    /// The table at `offset`, marking it recently used.
    pub fn get(&mut self, offset: u64) -> Option<&T> {
        let t = self.touch();
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = t;
            &s.table
        })
    }

    /// The table at `offset` for modification; marks it dirty and recently used.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        let t = self.touch();
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = t;
            s.dirty = true;
            &mut s.table
        })
    }

    /// Peek without touching or dirtying (for write-back).
    pub fn peek(&self, offset: u64) -> Option<&T> {
        self.slots.get(&offset).map(|s| &s.table)
    }

    /// Whether the cache is full (an insert needs an eviction first).
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The least recently used table and whether it is dirty.
    pub fn lru(&self) -> Option<(u64, bool)> {
        self.slots
            .iter()
            .min_by_key(|(_, s)| s.last_use)
            .map(|(&k, s)| (k, s.dirty))
    }

    /// Insert a table (the caller made room first).
    pub fn insert(&mut self, offset: u64, table: T, dirty: bool) {
        let last_use = self.touch();
        self.slots.insert(
            offset,
            Slot {
                table,
                dirty,
                last_use,
            },
        );
    }

    /// Drop a table (after write-back, or because its cluster was freed).
    pub fn remove(&mut self, offset: u64) -> Option<T> {
        self.slots.remove(&offset).map(|s| s.table)
    }

    /// Offsets of dirty tables, in ascending order.
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, _)| k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Mark the table at `offset` clean (it was written back).
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_and_dirty() {
        let mut c = TableCache::new(2);
        c.insert(10, 1, false);
        c.insert(20, 2, false);
        assert!(c.is_full());
        c.get(10);
        assert_eq!(c.lru(), Some((20, false)));
        *c.get_mut(20).unwrap() = 5;
        assert_eq!(c.dirty(), vec![20]);
        c.mark_clean(20);
        assert!(c.dirty().is_empty());
        c.remove(20);
        assert!(!c.is_full());
    }
}
