//! bench/throttle_accuracy: achieved vs configured rate of the `throttle` filter over a
//! `null-co` node, for a few limits.
//!
//! ```text
//! cargo run -p strata-graph --example throttle_accuracy [SECONDS]   # default 10
//! ```
//!
//! Each limit runs for SECONDS after a 0.5 s warm-up (the initial burst allowance is not
//! counted), with four requests in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use strata_core::{BlockNode, IoBuf, NodeRef};
use strata_graph::{NullNode, NullOptions, ThrottleGroup, ThrottleLimits, ThrottleNode};

/// Run four readers of `req`-byte requests; returns (bytes, requests, seconds) counted.
async fn run(node: Arc<ThrottleNode>, req: usize, secs: f64) -> (u64, u64, f64) {
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (node, counting, stop, bytes, ops) = (
            node.clone(),
            counting.clone(),
            stop.clone(),
            bytes.clone(),
            ops.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut off = w * req as u64;
            while !stop.load(Ordering::Relaxed) {
                node.read(off, IoBuf::zeroed(req)).await.unwrap();
                if counting.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    bytes.fetch_add(req as u64, Ordering::Relaxed);
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                off = (off + 4 * req as u64) % (512 << 20);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    counting.store(true, Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    let r = (
        bytes.load(Ordering::Relaxed),
        ops.load(Ordering::Relaxed),
        elapsed,
    );
    for t in tasks {
        t.abort();
    }
    r
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SECONDS"))
        .unwrap_or(10.0);
    // (limits, request size, configured rate, unit)
    let cases = [
        (
            json!({"bps-total": 1 << 20}),
            65536,
            (1 << 20) as f64,
            "B/s",
        ),
        (
            json!({"bps-total": 4 << 20}),
            65536,
            (4 << 20) as f64,
            "B/s",
        ),
        (
            json!({"bps-read": 64 << 20}),
            262144,
            (64 << 20) as f64,
            "B/s",
        ),
        (json!({"iops-total": 100}), 4096, 100.0, "IOPS"),
        (json!({"iops-total": 2000}), 4096, 2000.0, "IOPS"),
        (
            json!({"iops-total": 100, "iops-size": 8192}),
            32768,
            100.0 * 8192.0 / 32768.0,
            "IOPS",
        ),
    ];
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "limits", "configured", "achieved", "error"
    );
    for (i, (l, req, want, unit)) in cases.into_iter().enumerate() {
        let limits = ThrottleLimits::from_json(&l).unwrap();
        let g = ThrottleGroup::new(&format!("tg{i}"), limits);
        let file: NodeRef = Arc::new(NullNode::new(NullOptions::default()));
        let node = Arc::new(ThrottleNode::new(file, g));
        let (bytes, ops, elapsed) = run(node, req, secs).await;
        let got = if unit == "B/s" {
            bytes as f64 / elapsed
        } else {
            ops as f64 / elapsed
        };
        println!(
            "{:<44} {:>10.0} {unit:<4} {:>10.0} {unit:<4} {:>+7.2}%",
            format!("{l} ({req} B requests)"),
            want,
            got,
            (got - want) / want * 100.0
        );
    }
}
