//! QEMU's JSON member order.
//!
//! QEMU builds event data and command results as `QDict`s and prints them by walking the
//! dict's hash buckets, so the member order on the wire is fixed by the key names, not by
//! the schema (e.g. `{"status": ..., "id": ...}` for JOB_STATUS_CHANGE). [`qemu_order`]
//! reproduces it: QDict's `tdb_hash` modulo 512 buckets, walked in bucket order; within a
//! bucket the most recently inserted key comes first.

use serde_json::{Map, Value};

const QDICT_BUCKET_MAX: u32 = 512;

/// QEMU's `tdb_hash` (qobject/qdict.c).
pub fn tdb_hash(name: &str) -> u32 {
    let bytes = name.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &c) in bytes.iter().enumerate() {
        value = value.wrapping_add((c as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The QDict bucket a key lands in.
pub fn bucket(name: &str) -> u32 {
    tdb_hash(name) % QDICT_BUCKET_MAX
}

/// Reorders `map` (given in QAPI schema order, i.e. insertion order) into the order in
/// which QEMU prints the equivalent QDict. Nested values are left as they are.
pub fn qemu_order(map: Map<String, Value>) -> Map<String, Value> {
    let mut entries: Vec<(usize, u32, String, Value)> = map
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| (i, bucket(&k), k, v))
        .collect();
    // Bucket ascending; inside a bucket, later insertions first.
    entries.sort_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)));
    entries.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: Map<String, Value>) -> Vec<String> {
        qemu_order(v).keys().cloned().collect()
    }

    fn obj(keys: &[&str]) -> Map<String, Value> {
        keys.iter().map(|k| (k.to_string(), json!(0))).collect()
    }

    #[test]
    fn matches_qemu_storage_daemon_10_0_2_output() {
        // Orders observed on the wire from qemu-storage-daemon 10.0.2.
        assert_eq!(keys(obj(&["id", "status"])), ["status", "id"]);
        assert_eq!(
            keys(obj(&["type", "device", "len", "offset", "speed", "error"])),
            ["device", "len", "offset", "speed", "type", "error"]
        );
        assert_eq!(keys(obj(&["type", "id"])), ["type", "id"]);
        assert_eq!(
            keys(obj(&["device", "operation", "action"])),
            ["device", "operation", "action"]
        );
        assert_eq!(
            keys(obj(&[
                "type",
                "device",
                "len",
                "offset",
                "busy",
                "paused",
                "speed",
                "io-status",
                "ready",
                "status",
                "auto-finalize",
                "auto-dismiss",
                "error",
                "actively-synced"
            ])),
            [
                "auto-finalize",
                "io-status",
                "device",
                "auto-dismiss",
                "busy",
                "len",
                "offset",
                "status",
                "paused",
                "speed",
                "ready",
                "type",
                "actively-synced",
                "error"
            ]
        );
        assert_eq!(
            keys(obj(&[
                "id",
                "type",
                "status",
                "current-progress",
                "total-progress",
                "error"
            ])),
            [
                "current-progress",
                "status",
                "total-progress",
                "type",
                "id",
                "error"
            ]
        );
    }
}
