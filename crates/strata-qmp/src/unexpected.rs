//! Which unexpected member QEMU reports first.
//!
//! QEMU's QObject input visitor copies an object's keys into a GLib hash table (walking the
//! `QDict` in its own bucket order), removes each key as a member consumes it, and reports
//! the first key the table's iterator yields. That order is GLib's (GLib 2.74, as linked
//! by qemu-storage-daemon 10.0.2): `g_str_hash`, index `(hash * 11) % prime`, quadratic
//! probing, tombstones, and in-place resizes. [`first_unexpected`] replays exactly that.

use serde_json::{Map, Value};

/// QEMU's `tdb_hash` (qobject/qdict.c): the `QDict` bucket hash.
fn tdb_hash(name: &str) -> u32 {
    let bytes = name.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &c) in bytes.iter().enumerate() {
        value = value.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The keys of `map` (given in insertion order) in `qdict_first`/`qdict_next` order: 512
/// buckets ascending, the latest insertion first within a bucket.
fn qdict_order(map: &Map<String, Value>) -> Vec<&str> {
    let mut keys: Vec<(u32, usize, &str)> = map
        .keys()
        .enumerate()
        .map(|(i, k)| (tdb_hash(k) % 512, i, k.as_str()))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    keys.into_iter().map(|(_, _, k)| k).collect()
}

/// GLib's `g_str_hash` (djb2 over signed chars).
fn g_str_hash(key: &str) -> u32 {
    key.as_bytes().iter().fold(5381u32, |h, &c| {
        h.wrapping_mul(33).wrapping_add(c as i8 as i32 as u32)
    })
}

/// `g_hash_table`'s prime moduli by shift.
const PRIME_MOD: [u32; 32] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
];
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;
const MIN_SHIFT: usize = 3;

/// A GHashTable of string keys, as far as insertion order, removal and iteration go.
struct GHash<'a> {
    mask: usize,
    modulo: u32,
    hashes: Vec<u32>,
    keys: Vec<Option<&'a str>>,
    nnodes: usize,
    noccupied: usize,
}

impl<'a> GHash<'a> {
    fn new() -> Self {
        let mut t = GHash {
            mask: 0,
            modulo: 0,
            hashes: Vec::new(),
            keys: Vec::new(),
            nnodes: 0,
            noccupied: 0,
        };
        let size = t.set_shift(MIN_SHIFT);
        t.hashes = vec![UNUSED; size];
        t.keys = vec![None; size];
        t
    }

    fn set_shift(&mut self, shift: usize) -> usize {
        self.modulo = PRIME_MOD[shift];
        self.mask = (1 << shift) - 1;
        1 << shift
    }

    fn size(&self) -> usize {
        self.mask + 1
    }

    fn index(&self, hash: u32) -> usize {
        (hash.wrapping_mul(11) % self.modulo) as usize
    }

    /// `g_hash_table_lookup_node`: the slot of `key` (found) or where it would go.
    fn lookup(&self, key: &str) -> (usize, u32, bool) {
        let mut hash = g_str_hash(key);
        if hash < 2 {
            hash = 2;
        }
        let mut i = self.index(hash);
        let mut step = 0;
        let mut tomb = None;
        while self.hashes[i] != UNUSED {
            if self.hashes[i] == hash && self.keys[i] == Some(key) {
                return (i, hash, true);
            }
            if self.hashes[i] == TOMBSTONE && tomb.is_none() {
                tomb = Some(i);
            }
            step += 1;
            i = (i + step) & self.mask;
        }
        (tomb.unwrap_or(i), hash, false)
    }

    fn insert(&mut self, key: &'a str) {
        let (i, hash, found) = self.lookup(key);
        if found {
            return;
        }
        let was = self.hashes[i];
        self.hashes[i] = hash;
        self.keys[i] = Some(key);
        self.nnodes += 1;
        if was == UNUSED {
            self.noccupied += 1;
        }
        self.maybe_resize();
    }

    fn remove(&mut self, key: &str) {
        let (i, _, found) = self.lookup(key);
        if !found {
            return;
        }
        self.hashes[i] = TOMBSTONE;
        self.keys[i] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    fn maybe_resize(&mut self) {
        let size = self.size();
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT)
            || size <= self.noccupied + self.noccupied / 16
        {
            self.resize();
        }
    }

    /// `g_hash_table_resize` with `resize_map`'s in-place relocation.
    fn resize(&mut self) {
        let old = self.size();
        let mut n = (self.nnodes as f64 * 1.333) as usize;
        let mut shift = 0;
        while n != 0 {
            n >>= 1;
            shift += 1;
        }
        let size = self.set_shift(shift.max(MIN_SHIFT));
        if size > old {
            self.hashes.resize(size, UNUSED);
            self.keys.resize(size, None);
        }
        let mut moved = vec![false; size.max(old)];
        for i in 0..old {
            let mut hash = self.hashes[i];
            if hash < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if moved[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut key = self.keys[i].take();
            loop {
                let mut step = 0;
                let mut h = self.index(hash);
                while moved[h] {
                    step += 1;
                    h = (h + step) & self.mask;
                }
                moved[h] = true;
                let replaced = self.hashes[h];
                self.hashes[h] = hash;
                if replaced < 2 {
                    self.keys[h] = key;
                    break;
                }
                hash = replaced;
                key = std::mem::replace(&mut self.keys[h], key);
            }
        }
        self.hashes.truncate(size);
        self.keys.truncate(size);
        self.noccupied = self.nnodes;
    }

    fn first(&self) -> Option<&'a str> {
        (0..self.size())
            .find(|&i| self.hashes[i] >= 2)
            .and_then(|i| self.keys[i])
    }
}

/// The member of `input` QEMU reports as "Parameter '%s' is unexpected", given the members
/// the visitor consumed (in the order it consumed them), if any is left over.
pub fn first_unexpected<'a>(input: &'a Map<String, Value>, consumed: &[&str]) -> Option<&'a str> {
    if input.keys().all(|k| consumed.contains(&k.as_str())) {
        return None;
    }
    let mut t = GHash::new();
    for k in qdict_order(input) {
        t.insert(k);
    }
    for k in consumed {
        t.remove(k);
    }
    t.first()
}

/// The order in which a GLib string hash table iterates its keys after `ops` (each a key and
/// whether it was inserted, else removed), as QEMU's QOM property tables do (`qom-list`,
/// `query-chardev`).
pub fn ghash_iteration_order(ops: &[(&str, bool)]) -> Vec<String> {
    let mut t = GHash::new();
    for &(k, insert) in ops {
        if insert {
            t.insert(k);
        } else {
            t.remove(k);
        }
    }
    (0..t.size())
        .filter(|&i| t.hashes[i] >= 2)
        .filter_map(|i| t.keys[i].map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn first(keys: &[&str], consumed: &[&str]) -> Option<String> {
        let m: Map<String, Value> = keys.iter().map(|k| (k.to_string(), json!(1))).collect();
        first_unexpected(&m, consumed).map(str::to_string)
    }

    #[test]
    fn matches_qemu_storage_daemon_10_0_2() {
        // `blockdev-create` with driver raw, as answered by qemu-storage-daemon 10.0.2.
        assert_eq!(
            first(&["driver", "file", "size"], &["driver"]).as_deref(),
            Some("size")
        );
        assert_eq!(
            first(&["driver", "zz", "cluster-size", "b"], &["driver"]).as_deref(),
            Some("b")
        );
        assert_eq!(
            first(
                &[
                    "driver",
                    "refcount-bits",
                    "file",
                    "preallocation",
                    "cluster-size",
                    "node-name",
                    "zzz",
                    "size",
                    "zz"
                ],
                &["driver"]
            )
            .as_deref(),
            Some("file")
        );
        assert_eq!(first(&["driver"], &["driver"]), None);
    }

    #[test]
    fn chardev_container_order() {
        // qemu-storage-daemon 10.0.2's `query-chardev` (which prepends, so reversed).
        let mut ops: Vec<(&str, bool)> = ["m", "rb", "rb3", "nl", "s1", "f1", "p1"]
            .iter()
            .map(|k| (*k, true))
            .collect();
        ops.push(("nl", false));
        let mut order = ghash_iteration_order(&ops);
        order.reverse();
        assert_eq!(order, ["f1", "rb3", "p1", "m", "rb", "s1"]);
    }
}
