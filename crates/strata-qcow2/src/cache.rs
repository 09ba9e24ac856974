//! A small LRU cache of metadata tables (L2 tables, refcount blocks) keyed by host offset.
//!
//! The cache only holds tables and dirty flags; loading and writing back are done by the
//! metadata layer, which knows the flush ordering (refcount blocks before the L2 tables that
//! reference new clusters; L2 tables before refcount decrements).
//!
//! Every operation is O(1) (hash lookup plus an intrusive doubly linked recency list over a
//! slab of slots), except [`TableCache::dirty`], which lists the dirty tables for write-back.

use std::collections::HashMap;

/// End of the recency list.
const NIL: usize = usize::MAX;

#[derive(Debug)]
struct Slot<T> {
    offset: u64,
    table: T,
    dirty: bool,
    /// Towards the most recently used end.
    newer: usize,
    /// Towards the least recently used end.
    older: usize,
}

/// An LRU cache of at most `capacity` tables.
#[derive(Debug)]
pub(crate) struct TableCache<T> {
    index: HashMap<u64, usize>,
    slots: Vec<Option<Slot<T>>>,
    /// Free slab positions.
    free: Vec<usize>,
    /// Most recently used slot.
    head: usize,
    /// Least recently used slot.
    tail: usize,
    /// Number of dirty tables (so a clean cache answers `dirty` without a scan).
    ndirty: usize,
    capacity: usize,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` (at least 1) tables.
    pub fn new(capacity: usize) -> Self {
        TableCache {
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            ndirty: 0,
            capacity: capacity.max(1),
        }
    }

    fn slot(&self, i: usize) -> &Slot<T> {
        self.slots[i].as_ref().expect("live cache slot")
    }

    fn slot_mut(&mut self, i: usize) -> &mut Slot<T> {
        self.slots[i].as_mut().expect("live cache slot")
    }

    fn unlink(&mut self, i: usize) {
        let (newer, older) = {
            let s = self.slot(i);
            (s.newer, s.older)
        };
        if newer == NIL {
            self.head = older;
        } else {
            self.slot_mut(newer).older = older;
        }
        if older == NIL {
            self.tail = newer;
        } else {
            self.slot_mut(older).newer = newer;
        }
    }

    fn push_front(&mut self, i: usize) {
        let head = self.head;
        {
            let s = self.slot_mut(i);
            s.newer = NIL;
            s.older = head;
        }
        if head == NIL {
            self.tail = i;
        } else {
            self.slot_mut(head).newer = i;
        }
        self.head = i;
    }

    /// Mark slot `i` most recently used.
    fn touch(&mut self, i: usize) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Whether the table at `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.index.contains_key(&offset)
    }

    /// The table at `offset`, marking it recently used.
    pub fn get(&mut self, offset: u64) -> Option<&T> {
        let i = *self.index.get(&offset)?;
        self.touch(i);
        Some(&self.slot(i).table)
    }

    /// The table at `offset` for modification; marks it dirty and recently used.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut T> {
        let i = *self.index.get(&offset)?;
        self.touch(i);
        let s = self.slots[i].as_mut().expect("live cache slot");
        if !s.dirty {
            s.dirty = true;
            self.ndirty += 1;
        }
        Some(&mut s.table)
    }

    /// Peek without touching or dirtying (for write-back).
    pub fn peek(&self, offset: u64) -> Option<&T> {
        self.index.get(&offset).map(|&i| &self.slot(i).table)
    }

    /// Whether the cache is full (an insert needs an eviction first).
    pub fn is_full(&self) -> bool {
        self.index.len() >= self.capacity
    }

    /// The least recently used table and whether it is dirty.
    pub fn lru(&self) -> Option<(u64, bool)> {
        (self.tail != NIL).then(|| {
            let s = self.slot(self.tail);
            (s.offset, s.dirty)
        })
    }

    /// Insert a table (the caller made room first); replaces a table cached at `offset`.
    pub fn insert(&mut self, offset: u64, table: T, dirty: bool) {
        self.remove(offset);
        let slot = Slot {
            offset,
            table,
            dirty,
            newer: NIL,
            older: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        if dirty {
            self.ndirty += 1;
        }
        self.index.insert(offset, i);
        self.push_front(i);
    }

    /// Drop a table (after write-back, or because its cluster was freed).
    pub fn remove(&mut self, offset: u64) -> Option<T> {
        let i = self.index.remove(&offset)?;
        self.unlink(i);
        let s = self.slots[i].take().expect("live cache slot");
        self.free.push(i);
        if s.dirty {
            self.ndirty -= 1;
        }
        Some(s.table)
    }

    /// Offsets of dirty tables, in ascending order.
    pub fn dirty(&self) -> Vec<u64> {
        if self.ndirty == 0 {
            return Vec::new();
        }
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| s.dirty)
            .map(|s| s.offset)
            .collect();
        v.sort_unstable();
        v
    }

    /// Mark the table at `offset` clean (it was written back).
    pub fn mark_clean(&mut self, offset: u64) {
        if let Some(&i) = self.index.get(&offset) {
            let s = self.slot_mut(i);
            if s.dirty {
                s.dirty = false;
                self.ndirty -= 1;
            }
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

    /// Against a naive model: recency order, dirty set and contents after random operations.
    #[test]
    fn matches_a_naive_lru() {
        let mut c = TableCache::new(4);
        // (offset, value, dirty), most recently used last.
        let mut model: Vec<(u64, u32, bool)> = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % 7) * 0x10000;
            let pos = model.iter().position(|e| e.0 == off);
            match (x >> 8) % 6 {
                0 | 1 => {
                    let got = c.get(off).copied();
                    assert_eq!(got, pos.map(|p| model[p].1));
                    if let Some(p) = pos {
                        let e = model.remove(p);
                        model.push(e);
                    }
                }
                2 => {
                    if let Some(t) = c.get_mut(off) {
                        *t = step;
                        let e = model.remove(pos.unwrap());
                        model.push((e.0, step, true));
                    } else {
                        assert!(pos.is_none());
                    }
                }
                3 => {
                    if pos.is_none() {
                        while c.is_full() {
                            let (victim, dirty) = c.lru().unwrap();
                            assert_eq!((victim, dirty), (model[0].0, model[0].2));
                            assert_eq!(c.remove(victim), Some(model[0].1));
                            model.remove(0);
                        }
                        let dirty = step % 3 == 0;
                        c.insert(off, step, dirty);
                        model.push((off, step, dirty));
                    }
                }
                4 => {
                    assert_eq!(c.remove(off), pos.map(|p| model.remove(p).1));
                }
                _ => {
                    c.mark_clean(off);
                    if let Some(p) = pos {
                        model[p].2 = false;
                    }
                }
            }
            assert_eq!(c.lru().map(|l| l.0), model.first().map(|e| e.0));
            let mut d: Vec<u64> = model.iter().filter(|e| e.2).map(|e| e.0).collect();
            d.sort_unstable();
            assert_eq!(c.dirty(), d);
            assert!(model.len() <= 4);
        }
    }
}
