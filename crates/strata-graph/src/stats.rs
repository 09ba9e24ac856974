//! Per-node I/O accounting: the numbers `query-blockstats` reports (QEMU's `BlockDeviceStats`),
//! kept with relaxed atomics so the data path never takes a lock for them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The request kinds QEMU accounts separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Reads.
    Read,
    /// Writes, including write-zeroes.
    Write,
    /// Flushes.
    Flush,
    /// Discards (`unmap` in QEMU's names).
    Discard,
}

/// Latency histogram bucket boundaries in nanoseconds (powers of 4 from 1 µs to ~4 s).
const BOUNDARIES: [u64; 12] = [
    1_000,
    4_000,
    16_000,
    64_000,
    256_000,
    1_024_000,
    4_096_000,
    16_384_000,
    65_536_000,
    262_144_000,
    1_048_576_000,
    4_194_304_000,
];

#[derive(Debug, Default)]
struct Counters {
    ops: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    total_ns: AtomicU64,
    bins: [AtomicU64; BOUNDARIES.len() + 1],
}

/// One node's accounting.
#[derive(Debug)]
pub struct IoStats {
    kinds: [Counters; 4],
    wr_highest_offset: AtomicU64,
    created: Instant,
    /// Nanoseconds since `created` of the last completed request (0 = never).
    last_done_ns: AtomicU64,
}

impl Default for IoStats {
    fn default() -> Self {
        IoStats {
            kinds: Default::default(),
            wr_highest_offset: AtomicU64::new(0),
            created: Instant::now(),
            last_done_ns: AtomicU64::new(0),
        }
    }
}

impl IoStats {
    /// Account one finished request of `bytes` at `offset` that took `took`.
    pub fn account(&self, kind: IoKind, offset: u64, bytes: u64, took: Duration, ok: bool) {
        let c = &self.kinds[kind as usize];
        if !ok {
            c.failed.fetch_add(1, Relaxed);
            return;
        }
        let ns = took.as_nanos().min(u64::MAX as u128) as u64;
        c.ops.fetch_add(1, Relaxed);
        c.bytes.fetch_add(bytes, Relaxed);
        c.total_ns.fetch_add(ns, Relaxed);
        let bin = BOUNDARIES
            .iter()
            .position(|b| ns < *b)
            .unwrap_or(BOUNDARIES.len());
        c.bins[bin].fetch_add(1, Relaxed);
        if kind == IoKind::Write {
            self.wr_highest_offset.fetch_max(offset + bytes, Relaxed);
        }
        let now = self.created.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last_done_ns.store(now.max(1), Relaxed);
    }

    /// Completed requests of `kind`.
    pub fn ops(&self, kind: IoKind) -> u64 {
        self.kinds[kind as usize].ops.load(Relaxed)
    }

    /// Bytes moved by completed requests of `kind`.
    pub fn bytes(&self, kind: IoKind) -> u64 {
        self.kinds[kind as usize].bytes.load(Relaxed)
    }

    /// Failed requests of `kind`.
    pub fn failed(&self, kind: IoKind) -> u64 {
        self.kinds[kind as usize].failed.load(Relaxed)
    }

    fn histogram(&self, kind: IoKind) -> Value {
        let c = &self.kinds[kind as usize];
        json!({
            "boundaries": BOUNDARIES,
            "bins": c.bins.iter().map(|b| b.load(Relaxed)).collect::<Vec<_>>(),
        })
    }

    /// QEMU's `BlockDeviceStats` object, members in QEMU's order.
    pub fn to_qmp(&self) -> Value {
        let k = |kind: IoKind| &self.kinds[kind as usize];
        let (r, w, f, d) = (
            k(IoKind::Read),
            k(IoKind::Write),
            k(IoKind::Flush),
            k(IoKind::Discard),
        );
        let mut v = json!({
            "unmap_operations": d.ops.load(Relaxed),
            "unmap_merged": 0,
            "failed_unmap_operations": d.failed.load(Relaxed),
            "flush_total_time_ns": f.total_ns.load(Relaxed),
            "wr_highest_offset": self.wr_highest_offset.load(Relaxed),
            "wr_total_time_ns": w.total_ns.load(Relaxed),
            "failed_wr_operations": w.failed.load(Relaxed),
            "failed_rd_operations": r.failed.load(Relaxed),
            "wr_merged": 0,
            "wr_bytes": w.bytes.load(Relaxed),
            "timed_stats": [],
            "failed_zone_append_operations": 0,
            "unmap_bytes": d.bytes.load(Relaxed),
            "rd_operations": r.ops.load(Relaxed),
            "zone_append_total_time_ns": 0,
            "unmap_total_time_ns": d.total_ns.load(Relaxed),
            "invalid_flush_operations": 0,
            "account_failed": false,
            "zone_append_operations": 0,
            "rd_total_time_ns": r.total_ns.load(Relaxed),
            "invalid_unmap_operations": 0,
            "flush_operations": f.ops.load(Relaxed),
            "wr_operations": w.ops.load(Relaxed),
            "zone_append_merged": 0,
            "rd_merged": 0,
            "rd_bytes": r.bytes.load(Relaxed),
            "invalid_zone_append_operations": 0,
            "invalid_wr_operations": 0,
            "zone_append_bytes": 0,
            "failed_flush_operations": f.failed.load(Relaxed),
            "account_invalid": false,
            "invalid_rd_operations": 0,
        });
        let last = self.last_done_ns.load(Relaxed);
        if last != 0 {
            let now = self.created.elapsed().as_nanos() as u64;
            v["idle_time_ns"] = json!(now.saturating_sub(last));
        }
        v
    }

    /// Latency histograms (Strata extra; QEMU only reports them once configured).
    pub fn histograms(&self) -> Value {
        json!({
            "rd": self.histogram(IoKind::Read),
            "wr": self.histogram(IoKind::Write),
            "flush": self.histogram(IoKind::Flush),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_bytes_failures_and_highest_offset() {
        let s = IoStats::default();
        s.account(IoKind::Write, 4096, 512, Duration::from_micros(3), true);
        s.account(IoKind::Write, 0, 512, Duration::from_micros(3), true);
        s.account(IoKind::Read, 0, 4096, Duration::from_millis(2), true);
        s.account(IoKind::Read, 0, 4096, Duration::from_millis(2), false);
        let v = s.to_qmp();
        assert_eq!(v["wr_operations"], 2);
        assert_eq!(v["wr_bytes"], 1024);
        assert_eq!(v["wr_highest_offset"], 4608);
        assert_eq!(v["rd_operations"], 1);
        assert_eq!(v["failed_rd_operations"], 1);
        assert!(v.get("idle_time_ns").is_some());
        let h = s.histograms();
        assert_eq!(h["wr"]["bins"][1], 2);
        assert_eq!(h["rd"]["bins"][6], 1);
    }
}
