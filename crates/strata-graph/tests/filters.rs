//! The `throttle`, `copy-on-read` and `blkdebug` filters: throttling accuracy (real time,
//! a few seconds per test), copy-on-read into the top of a qcow2 chain, and blkdebug rules
//! firing at the qcow2 driver's metadata sites, with `qemu-img check` as the oracle.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::json;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, DebugEvent, ErrorKind, IoBuf, NodeRef, WriteFlags};
use strata_graph::{
    BlkdebugNode, BlkdebugOptions, CopyOnReadNode, ImageOptions, NullNode, NullOptions,
    ThrottleGroup, ThrottleLimits, ThrottleNode, open_image,
};
use strata_io::{FileNode, FileOptions};
use strata_qcow2::Qcow2;

// ------------------------------------------------------------------------ helpers

fn sh(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("QEMU tools are installed");
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check`: exit code and output.
fn check(path: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// No corruption: a clean image, or only leaked clusters (exit code 3).
fn assert_not_corrupt(path: &Path) {
    let (code, out) = check(path);
    assert!(
        code == 0 || code == 3,
        "qemu-img check failed ({code}):\n{out}"
    );
    assert!(!out.contains("ERROR"), "{out}");
}

fn limits(v: serde_json::Value) -> ThrottleLimits {
    ThrottleLimits::from_json(&v).unwrap()
}

fn null() -> NodeRef {
    Arc::new(NullNode::new(NullOptions::default()))
}

/// Run `workers` loops of `req`-byte reads (or writes) on `node` for `dur`, after a
/// `warmup` that is not counted; returns (bytes, requests) completed in the window.
async fn measure(
    node: Arc<ThrottleNode>,
    workers: usize,
    req: usize,
    write: bool,
    warmup: Duration,
    dur: Duration,
) -> (u64, u64) {
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (node, counting, stop, bytes, ops) = (
            node.clone(),
            counting.clone(),
            stop.clone(),
            bytes.clone(),
            ops.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut off = (w * req) as u64;
            while !stop.load(Ordering::Relaxed) {
                let buf = IoBuf::zeroed(req);
                if write {
                    node.write(off, buf, WriteFlags::default()).await.unwrap();
                } else {
                    node.read(off, buf).await.unwrap();
                }
                if counting.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    bytes.fetch_add(req as u64, Ordering::Relaxed);
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                off = (off + (workers * req) as u64) % (512 << 20);
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    counting.store(true, Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let r = (bytes.load(Ordering::Relaxed), ops.load(Ordering::Relaxed));
    for t in tasks {
        t.abort();
    }
    r
}

fn assert_within(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want;
    assert!(
        err <= tol,
        "{what}: got {got:.0}, want {want:.0} (±{:.0}%), off by {:.1}%",
        tol * 100.0,
        err * 100.0
    );
}

// ------------------------------------------------------------------------ throttle

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_bps_limit_is_accurate() {
    let g = ThrottleGroup::new("tg0", limits(json!({"bps-total": 4 << 20})));
    let node = Arc::new(ThrottleNode::new(null(), g));
    assert_eq!(node.driver(), "throttle");
    let (bytes, _) = measure(
        node,
        2,
        64 << 10,
        false,
        Duration::from_millis(300),
        Duration::from_secs(2),
    )
    .await;
    assert_within(
        "bytes in 2 s at 4 MiB/s",
        bytes as f64,
        8.0 * 1048576.0,
        0.10,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_iops_limit_is_accurate() {
    let g = ThrottleGroup::new("tg0", limits(json!({"iops-write": 200})));
    let node = Arc::new(ThrottleNode::new(null(), g));
    let (_, ops) = measure(
        node.clone(),
        3,
        4096,
        true,
        Duration::from_millis(300),
        Duration::from_secs(2),
    )
    .await;
    assert_within("writes in 2 s at 200 iops", ops as f64, 400.0, 0.10);
    // Reads are not limited by a write limit.
    let t = Instant::now();
    for i in 0..200 {
        node.read(i * 4096, IoBuf::zeroed(4096)).await.unwrap();
    }
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_burst_allows_a_spike_then_settles() {
    // 1 MiB/s with a burst of 4 MiB/s for 1 s: 4 MiB go at once, then 1 MiB/s.
    let g = ThrottleGroup::new(
        "tg0",
        limits(json!({"bps-total": 1 << 20, "bps-total-max": 4 << 20})),
    );
    let node = Arc::new(ThrottleNode::new(null(), g));
    let t = Instant::now();
    for i in 0..64 {
        node.read(i * 65536, IoBuf::zeroed(65536)).await.unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "the burst was throttled: {:?}",
        t.elapsed()
    );
    let (bytes, _) = measure(
        node,
        1,
        64 << 10,
        false,
        Duration::ZERO,
        Duration::from_secs(2),
    )
    .await;
    assert_within(
        "bytes in 2 s after the burst",
        bytes as f64,
        2.0 * 1048576.0,
        0.15,
    );

    // With a 2-second burst length the burst itself runs at bps-total-max (2 MiB/s).
    let g = ThrottleGroup::new(
        "tg1",
        limits(json!({"bps-total": 1 << 20, "bps-total-max": 2 << 20,
                      "bps-total-max-length": 2})),
    );
    let node = Arc::new(ThrottleNode::new(null(), g));
    let (bytes, _) = measure(
        node,
        1,
        32 << 10,
        false,
        Duration::from_millis(200),
        Duration::from_secs(1),
    )
    .await;
    assert_within(
        "bytes in 1 s of a 2 MiB/s burst",
        bytes as f64,
        2.0 * 1048576.0,
        0.15,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_group_splits_the_budget_round_robin() {
    let g = ThrottleGroup::new("tg0", limits(json!({"bps-read": 4 << 20})));
    let a = Arc::new(ThrottleNode::new(null(), g.clone()));
    let b = Arc::new(ThrottleNode::new(null(), g.clone()));
    // `a` keeps four requests in flight, `b` only one: round robin still halves the rate.
    let warm = Duration::from_millis(300);
    let dur = Duration::from_secs(2);
    let (ra, rb) = tokio::join!(
        measure(a, 4, 64 << 10, false, warm, dur),
        measure(b, 1, 64 << 10, false, warm, dur)
    );
    let total = (ra.0 + rb.0) as f64;
    assert_within("group total in 2 s", total, 8.0 * 1048576.0, 0.10);
    assert_within("node a's share", ra.0 as f64, total / 2.0, 0.15);
    assert_within("node b's share", rb.0 as f64, total / 2.0, 0.15);
    assert_eq!(g.limits().bps_read, 4 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_set_limits_applies_to_queued_requests() {
    let g = ThrottleGroup::new("tg0", limits(json!({"iops-total": 1})));
    let node = Arc::new(ThrottleNode::new(null(), g.clone()));
    // The burst allowance (0.1 op) lets one request through; the next ones queue for
    // seconds each.
    node.read(0, IoBuf::zeroed(512)).await.unwrap();
    let mut queued = Vec::new();
    for i in 1..=5u64 {
        let n = node.clone();
        queued.push(tokio::spawn(async move {
            n.read(i * 512, IoBuf::zeroed(512)).await.unwrap();
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(queued.iter().all(|t| !t.is_finished()));
    let t = Instant::now();
    g.set_limits(ThrottleLimits::default()).unwrap();
    for q in queued {
        q.await.unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );

    // A rate change at runtime: 1 MiB/s, then 8 MiB/s.
    g.set_limits(limits(json!({"bps-total": 1 << 20}))).unwrap();
    let (bytes, _) = measure(
        node.clone(),
        2,
        64 << 10,
        false,
        Duration::from_millis(200),
        Duration::from_secs(1),
    )
    .await;
    assert_within("bytes in 1 s at 1 MiB/s", bytes as f64, 1048576.0, 0.15);
    let merged = g
        .limits()
        .merged_with_json(&json!({"bps-total": 8 << 20}))
        .unwrap();
    g.set_limits(merged).unwrap();
    let (bytes, _) = measure(
        node,
        2,
        64 << 10,
        false,
        Duration::from_millis(200),
        Duration::from_secs(1),
    )
    .await;
    assert_within(
        "bytes in 1 s at 8 MiB/s",
        bytes as f64,
        8.0 * 1048576.0,
        0.10,
    );
    assert!(g.set_limits(limits(json!({"bps-total": 5}))).is_ok());
    let bad = ThrottleLimits {
        bps_read: 1,
        ..limits(json!({"bps-total": 5}))
    };
    assert_eq!(
        g.set_limits(bad).unwrap_err(),
        "bps/iops/max total values and read/write values cannot be used at the same time"
    );
}

#[tokio::test]
async fn throttle_is_a_transparent_filter() {
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![7; 65536]));
    let g = ThrottleGroup::new("tg0", ThrottleLimits::default());
    let t = ThrottleNode::new(mem.clone(), g);
    assert!(t.backing().is_none());
    assert!(Arc::ptr_eq(&t.file().unwrap(), &mem));
    assert_eq!(t.size(), 65536);
    let b = t.read(0, IoBuf::zeroed(16)).await.unwrap();
    assert_eq!(&b[..], &[7; 16]);
    let direct = mem.block_status(0, 65536).await.unwrap();
    let through = t.block_status(0, 65536).await.unwrap();
    assert_eq!(direct.status, through.status);
    assert_eq!(direct.len, through.len);
}

// ------------------------------------------------------------------------ copy-on-read

/// base.qcow2: 1s at [0, 256k), 2s at [1M, 1M+64k); mid.qcow2: 3s at [512k, 640k);
/// top.qcow2: 4s at [2M, 2M+64k). All 4 MiB, 64 KiB clusters.
fn build_chain(dir: &Path) {
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    sh(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 256k",
            "-c",
            "write -P 2 1M 64k",
            "base.qcow2",
        ],
    );
    for (img, back) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        sh(
            dir,
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", img, "4M",
            ],
        );
    }
    sh(dir, "qemu-io", &["-c", "write -P 3 512k 128k", "mid.qcow2"]);
    sh(dir, "qemu-io", &["-c", "write -P 4 2M 64k", "top.qcow2"]);
}

async fn open_top(dir: &Path) -> NodeRef {
    let opts = ImageOptions::default();
    open_image(dir.join("top.qcow2").to_str().unwrap(), &opts)
        .await
        .unwrap()
        .node
}

async fn top_allocated(top: &NodeRef, offset: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let e = top.block_status(pos, offset + len - pos).await.unwrap();
        if e.status.allocated || e.status.data {
            match out.last_mut() {
                Some((s, l)) if *s + *l == pos => *l += e.len,
                _ => out.push((pos, e.len)),
            }
        }
        pos += e.len;
    }
    out
}

#[tokio::test]
async fn cor_copies_what_was_read_into_the_top_layer() {
    let dir = tempfile::tempdir().unwrap();
    build_chain(dir.path());
    let top = open_top(dir.path()).await;
    assert_eq!(top_allocated(&top, 0, 4 << 20).await, [(2 << 20, 65536)]);
    let cor = CopyOnReadNode::new(top.clone(), None);
    assert_eq!(cor.driver(), "copy-on-read");
    // Chain walks from above see through the filter to the layers below the top.
    assert_eq!(
        cor.backing().map(|b| b.filename()),
        top.backing().map(|b| b.filename())
    );
    // Read 64k..192k from base (clusters 1 and 2) and 520k..530k from mid (cluster 8).
    let b = cor.read(65536, IoBuf::zeroed(131072)).await.unwrap();
    assert!(b.iter().all(|&x| x == 1));
    let b = cor.read(520 << 10, IoBuf::zeroed(10 << 10)).await.unwrap();
    assert!(b.iter().all(|&x| x == 3));
    // A read of unallocated-everywhere data copies nothing.
    let b = cor.read(3 << 20, IoBuf::zeroed(65536)).await.unwrap();
    assert!(b.is_zero());
    assert_eq!(
        top_allocated(&top, 0, 4 << 20).await,
        [(65536, 131072), (512 << 10, 65536), (2 << 20, 65536)]
    );
    // The copied data is what the chain had.
    let b = top.read(0, IoBuf::zeroed(1 << 20)).await.unwrap();
    assert!(b[..256 << 10].iter().all(|&x| x == 1));
    assert!(b[512 << 10..640 << 10].iter().all(|&x| x == 3));
    top.close().await.unwrap();
    drop((cor, top));
    let (code, out) = check(&dir.path().join("top.qcow2"));
    assert_eq!(code, 0, "{out}");
    // qemu-img agrees on what the top image now holds.
    let map = sh(
        dir.path(),
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", "top.qcow2"],
    );
    assert!(
        map.contains("\"start\": 65536, \"length\": 131072, \"depth\": 0"),
        "{map}"
    );
}

#[tokio::test]
async fn cor_respects_bottom() {
    let dir = tempfile::tempdir().unwrap();
    build_chain(dir.path());
    let top = open_top(dir.path()).await;
    let mid = top.backing().unwrap();
    // Copy from mid only: base's data is read but not copied.
    let cor = CopyOnReadNode::new(top.clone(), Some(mid));
    let b = cor.read(0, IoBuf::zeroed(1 << 20)).await.unwrap();
    assert!(b[..256 << 10].iter().all(|&x| x == 1));
    assert!(b[512 << 10..640 << 10].iter().all(|&x| x == 3));
    assert_eq!(
        top_allocated(&top, 0, 4 << 20).await,
        [(512 << 10, 131072), (2 << 20, 65536)]
    );
    // prefetch with bottom = the top itself copies nothing.
    let none = CopyOnReadNode::new(top.clone(), Some(top.clone()));
    none.prefetch(0, 4 << 20).await.unwrap();
    assert_eq!(top_allocated(&top, 0, 4 << 20).await.len(), 2);
}

#[tokio::test]
async fn cor_prefetch_pulls_the_whole_chain_up() {
    let dir = tempfile::tempdir().unwrap();
    build_chain(dir.path());
    let top = open_top(dir.path()).await;
    let before = top.read(0, IoBuf::zeroed(4 << 20)).await.unwrap().to_vec();
    let cor = CopyOnReadNode::new(top.clone(), None);
    cor.prefetch(0, 4 << 20).await.unwrap();
    assert_eq!(
        top_allocated(&top, 0, 4 << 20).await,
        [
            (0, 256 << 10),
            (512 << 10, 128 << 10),
            (1 << 20, 65536),
            (2 << 20, 65536)
        ]
    );
    // Everything is in the top now: detach the backing and compare.
    top.set_backing_link(None).unwrap();
    let after = top.read(0, IoBuf::zeroed(4 << 20)).await.unwrap();
    assert_eq!(&after[..], &before[..]);
    top.close().await.unwrap();
    drop((cor, top));
    let (code, out) = check(&dir.path().join("top.qcow2"));
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cor_never_overwrites_a_concurrent_guest_write() {
    let dir = tempfile::tempdir().unwrap();
    build_chain(dir.path());
    let top = open_top(dir.path()).await;
    let cor = Arc::new(CopyOnReadNode::new(top.clone(), None));
    // Race a copy-on-read of each base cluster against a guest write into it.
    let mut tasks = Vec::new();
    for c in 0..4u64 {
        for k in 0..4u64 {
            let (r, w) = (cor.clone(), cor.clone());
            let off = c * 65536 + k * 4096;
            tasks.push(tokio::spawn(async move {
                r.read(c * 65536, IoBuf::zeroed(65536)).await.unwrap();
            }));
            tasks.push(tokio::spawn(async move {
                w.write(off, IoBuf::from_slice(&[0xee; 4096]), WriteFlags::default())
                    .await
                    .unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let b = top.read(0, IoBuf::zeroed(4 * 65536)).await.unwrap();
    for c in 0..4usize {
        let cl = &b[c * 65536..(c + 1) * 65536];
        assert!(cl[..16384].iter().all(|&x| x == 0xee), "cluster {c}");
        assert!(cl[16384..].iter().all(|&x| x == 1), "cluster {c}");
    }
}

/// Passes everything to `inner`, but holds writes of all-`slow` data for 100 ms: a
/// copy-on-read of such data is then still in flight when a guest write comes in.
#[derive(Debug)]
struct SlowWrites {
    inner: NodeRef,
    slow: u8,
}

impl BlockNode for SlowWrites {
    fn driver(&self) -> &'static str {
        "qcow2"
    }
    fn filename(&self) -> String {
        self.inner.filename()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, o: u64, b: IoBuf) -> strata_core::BoxFuture<'_, IoBuf> {
        self.inner.read(o, b)
    }
    fn write(&self, o: u64, b: IoBuf, f: WriteFlags) -> strata_core::BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            if b.iter().all(|&x| x == self.slow) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            self.inner.write(o, b, f).await
        })
    }
    fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        f: strata_core::ZeroFlags,
    ) -> strata_core::BoxFuture<'_, ()> {
        self.inner.write_zeroes(o, l, f)
    }
    fn discard(&self, o: u64, l: u64) -> strata_core::BoxFuture<'_, ()> {
        self.inner.discard(o, l)
    }
    fn flush(&self) -> strata_core::BoxFuture<'_, ()> {
        self.inner.flush()
    }
    fn block_status(&self, o: u64, l: u64) -> strata_core::BoxFuture<'_, strata_core::Extent> {
        self.inner.block_status(o, l)
    }
    fn truncate(&self, s: u64, p: strata_core::Prealloc) -> strata_core::BoxFuture<'_, ()> {
        self.inner.truncate(s, p)
    }
    fn backing(&self) -> Option<NodeRef> {
        self.inner.backing()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cor_write_in_flight_holds_back_an_overlapping_guest_write() {
    let dir = tempfile::tempdir().unwrap();
    build_chain(dir.path());
    let top = open_top(dir.path()).await;
    let slow: NodeRef = Arc::new(SlowWrites {
        inner: top.clone(),
        slow: 1,
    });
    let cor = Arc::new(CopyOnReadNode::new(slow, None));
    let r = cor.clone();
    let reader = tokio::spawn(async move { r.read(0, IoBuf::zeroed(65536)).await.unwrap() });
    // The copy has read base's data and is writing it up (held for 100 ms).
    tokio::time::sleep(Duration::from_millis(30)).await;
    cor.write(4096, data(0xee, 4096), WriteFlags::default())
        .await
        .unwrap();
    assert!(reader.await.unwrap().iter().all(|&x| x == 1));
    let b = top.read(0, IoBuf::zeroed(65536)).await.unwrap();
    assert!(
        b[4096..8192].iter().all(|&x| x == 0xee),
        "the guest write was lost"
    );
    assert!(b[..4096].iter().all(|&x| x == 1) && b[8192..].iter().all(|&x| x == 1));
}

// ------------------------------------------------------------------------ blkdebug

/// A fresh 4 MiB qcow2 image (64 KiB clusters) opened through blkdebug with `rules`.
async fn qcow2_on_blkdebug(
    dir: &Path,
    rules: serde_json::Value,
) -> (Arc<Qcow2>, Arc<BlkdebugNode>) {
    let path = dir.join("t.qcow2");
    if !path.exists() {
        sh(
            dir,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "t.qcow2", "4M"],
        );
    }
    let file: NodeRef = FileNode::open(&path, &FileOptions::default()).unwrap();
    let opts = BlkdebugOptions::from_json(&rules).unwrap();
    let bd = Arc::new(BlkdebugNode::new(file, opts).unwrap());
    let q = Qcow2::open(bd.clone(), &Default::default(), None, None)
        .await
        .unwrap();
    (q, bd)
}

fn data(byte: u8, len: usize) -> IoBuf {
    IoBuf::from_slice(&vec![byte; len])
}

#[tokio::test]
async fn blkdebug_write_aio_fails_the_data_write_once() {
    let dir = tempfile::tempdir().unwrap();
    let rules = json!({"inject-error": [{"event": "write_aio", "errno": 28, "once": true}]});
    let (q, _bd) = qcow2_on_blkdebug(dir.path(), rules).await;
    let e = q
        .write(0, data(5, 65536), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace);
    assert_eq!(e.message(), "No space left on device");
    // `once`: the next write goes through.
    q.write(0, data(6, 65536), WriteFlags::default())
        .await
        .unwrap();
    q.close().await.unwrap();
    drop(q);
    assert_not_corrupt(&dir.path().join("t.qcow2"));
    let out = sh(dir.path(), "qemu-io", &["-c", "read -P 6 0 64k", "t.qcow2"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[tokio::test]
async fn blkdebug_l2_update_fails_the_flush_before_the_l2_is_visible() {
    let dir = tempfile::tempdir().unwrap();
    let rules = json!({"inject-error": [{"event": "l2_update", "errno": 5}]});
    let (q, _bd) = qcow2_on_blkdebug(dir.path(), rules).await;
    // The L2 entry is cached by the write and written back by the flush.
    q.write(0, data(5, 65536), WriteFlags::default())
        .await
        .unwrap();
    let e = q.flush().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io(libc::EIO));
    assert_eq!(e.message(), "Input/output error");
    drop(q);
    // The refcounts went out, the L2 entry did not: a leak at worst.
    assert_not_corrupt(&dir.path().join("t.qcow2"));
}

#[tokio::test]
async fn blkdebug_refblock_alloc_and_cow_write_fail_the_guest_write() {
    let dir = tempfile::tempdir().unwrap();
    let rules = json!({"inject-error": [{"event": "refblock_alloc", "errno": 5, "once": true}]});
    let (q, _bd) = qcow2_on_blkdebug(dir.path(), rules).await;
    let e = q
        .write(0, data(5, 65536), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io(libc::EIO));
    q.close().await.unwrap_or(());
    drop(q);
    assert_not_corrupt(&dir.path().join("t.qcow2"));

    // A 4k write into a new cluster fills the rest of it: cow_write fires before that.
    // (A fresh image: the failed refcount write above leaves a leaked refcount past the
    // end of the file, which Strata's allocator refuses as corruption.)
    let dir = tempfile::tempdir().unwrap();
    let rules = json!({"inject-error": [{"event": "cow_write", "errno": 5, "once": true}]});
    let (q, _bd) = qcow2_on_blkdebug(dir.path(), rules).await;
    let e = q
        .write(1 << 20, data(5, 4096), WriteFlags::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io(libc::EIO), "{e}");
    q.write(2 << 20, data(7, 4096), WriteFlags::default())
        .await
        .unwrap();
    q.close().await.unwrap_or(());
    drop(q);
    assert_not_corrupt(&dir.path().join("t.qcow2"));
}

#[tokio::test]
async fn blkdebug_flush_to_disk_fails_one_flush() {
    let dir = tempfile::tempdir().unwrap();
    let rules = json!({"inject-error": [
        {"event": "flush_to_disk", "iotype": "flush", "errno": 5, "once": true}
    ]});
    let (q, _bd) = qcow2_on_blkdebug(dir.path(), rules).await;
    q.write(0, data(5, 65536), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(
        q.flush().await.unwrap_err().kind(),
        ErrorKind::Io(libc::EIO)
    );
    q.flush().await.unwrap();
    q.close().await.unwrap();
    drop(q);
    let (code, out) = check(&dir.path().join("t.qcow2"));
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn blkdebug_state_machine() {
    let dir = tempfile::tempdir().unwrap();
    // The first data write moves to state 2; in state 2 data writes fail.
    let rules = json!({
        "inject-error": [{"event": "write_aio", "state": 2, "errno": 5}],
        "set-state": [{"event": "write_aio", "state": 1, "new_state": 2}]
    });
    let (q, bd) = qcow2_on_blkdebug(dir.path(), rules).await;
    assert_eq!(bd.state(), 1);
    q.write(0, data(5, 65536), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(bd.state(), 2);
    assert!(
        q.write(65536, data(5, 65536), WriteFlags::default())
            .await
            .is_err()
    );
    assert_eq!(bd.state(), 2);
}

#[tokio::test]
async fn blkdebug_none_event_immediately_and_sector() {
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    // Rules on `none` are armed at creation.
    let opts = BlkdebugOptions::from_json(&json!({"inject-error": [
        {"event": "none", "iotype": "flush", "immediately": true, "once": true},
        {"event": "none", "iotype": "read", "sector": 8, "errno": 61}
    ]}))
    .unwrap();
    let bd = BlkdebugNode::new(mem.clone(), opts).unwrap();
    // `immediately`: the error is there on the first poll.
    let r = bd
        .flush()
        .now_or_never()
        .expect("completes without yielding");
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Io(libc::EIO));
    bd.flush().await.unwrap();
    // Only requests touching sector 8 fail, every time (no `once`).
    bd.read(0, IoBuf::zeroed(4096)).await.unwrap();
    bd.read(8192, IoBuf::zeroed(4096)).await.unwrap();
    for _ in 0..2 {
        let e = bd.read(0, IoBuf::zeroed(8192)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io(61));
    }
    // Without `immediately` the failure comes after a yield.
    let opts = BlkdebugOptions::from_json(&json!({"inject-error": [
        {"event": "none", "iotype": "flush"}
    ]}))
    .unwrap();
    let bd = BlkdebugNode::new(mem.clone(), opts).unwrap();
    let mut f = bd.flush();
    assert!((&mut f).now_or_never().is_none());
    assert!(f.await.is_err());
    // Events from above re-arm: a later event's inject rules replace the active set.
    let opts = BlkdebugOptions::from_json(&json!({"inject-error": [
        {"event": "l2_load", "iotype": "read", "errno": 5}
    ]}))
    .unwrap();
    let bd = BlkdebugNode::new(mem, opts).unwrap();
    bd.read(0, IoBuf::zeroed(512)).await.unwrap();
    bd.debug_event(DebugEvent::L2Load);
    assert!(bd.read(0, IoBuf::zeroed(512)).await.is_err());
}

#[tokio::test]
async fn blkdebug_pwritev_events_fire_for_plain_writes() {
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    let opts = BlkdebugOptions::from_json(&json!({
        "inject-error": [{"event": "pwritev", "state": 2, "iotype": "write", "once": true}],
        "set-state": [{"event": "pwritev_done", "state": 1, "new_state": 2}]
    }))
    .unwrap();
    let bd = BlkdebugNode::new(mem, opts).unwrap();
    bd.write(0, data(1, 512), WriteFlags::default())
        .await
        .unwrap();
    assert_eq!(bd.state(), 2);
    assert!(
        bd.write(0, data(1, 512), WriteFlags::default())
            .await
            .is_err()
    );
    bd.write(0, data(1, 512), WriteFlags::default())
        .await
        .unwrap();
}

#[test]
fn blkdebug_options_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("blkdebug.conf");
    std::fs::write(
        &cfg,
        "# test rules\n[inject-error]\nevent = \"l2_update\"\nerrno = \"28\"\nonce = \"on\"\n\n\
         [set-state]\nevent = \"l2_load\"\nstate = \"1\"\nnew_state = \"2\"\n",
    )
    .unwrap();
    let o = BlkdebugOptions::from_json(&json!({
        "driver": "blkdebug", "image": "img0", "config": cfg.to_str().unwrap(),
        "align": 4096,
        "inject-error": [{"event": "write_aio", "sector": 16, "iotype": "write-zeroes"}]
    }))
    .unwrap();
    assert_eq!(o.align, 4096);
    assert_eq!(o.inject_error.len(), 2);
    assert_eq!(o.inject_error[0].event, DebugEvent::L2Update);
    assert_eq!(
        (o.inject_error[0].errno, o.inject_error[0].once),
        (28, true)
    );
    assert_eq!(o.inject_error[1].sector, Some(16));
    assert_eq!(o.inject_error[1].errno, libc::EIO);
    assert_eq!(o.set_state[0].new_state, 2);

    let err = |v: serde_json::Value| BlkdebugOptions::from_json(&v).unwrap_err().to_string();
    assert_eq!(
        err(json!({"inject-error": [{"event": "bogus"}]})),
        "Parameter 'inject-error[0].event' does not accept value 'bogus'"
    );
    assert_eq!(
        err(json!({"inject-error": [{"errno": 5}]})),
        "Parameter 'inject-error[0].event' is missing"
    );
    assert_eq!(
        err(json!({"set-state": [{"event": "l2_load"}]})),
        "Parameter 'set-state[0].new_state' is missing"
    );
    assert_eq!(
        err(json!({"inject-error": [{"event": "l2_load", "iotype": "write-same"}]})),
        "Parameter 'inject-error[0].iotype' does not accept value 'write-same'"
    );
    assert_eq!(err(json!({"bogus": 1})), "Parameter 'bogus' is unexpected");
    assert!(
        err(json!({"config": "/nonexistent/blkdebug.conf"}))
            .starts_with("Could not read blkdebug config file: No such file or directory")
    );
    let parse = |t: &str| BlkdebugOptions::parse_config(t).unwrap_err().to_string();
    assert_eq!(parse("event = \"l2_load\"\n"), "no group defined");
    assert_eq!(parse("[inject-error]\nevent l2_load\n"), "parse error");
    assert_eq!(parse("[bogus]\n"), "There is no option group 'bogus'");
    assert_eq!(
        parse("[inject-error]\nevent = \"nope\"\n"),
        "invalid parameter value: nope"
    );
    assert_eq!(
        parse("[inject-error]\nerrno = \"5\"\n"),
        "Missing event name for rule"
    );
    assert_eq!(
        parse("[inject-error]\nevent = \"l2_load\"\nerrno = \"x\"\n"),
        "Parameter 'errno' expects a number"
    );
    assert_eq!(
        parse("[inject-error]\nevent = \"l2_load\"\nonce = \"maybe\"\n"),
        "Parameter 'once' expects 'on' or 'off'"
    );
    assert_eq!(
        parse("[set-state]\nevent = \"l2_load\"\nfoo = \"1\"\n"),
        "Invalid parameter 'foo'"
    );

    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    let mk = |v: serde_json::Value| {
        BlkdebugNode::new(mem.clone(), BlkdebugOptions::from_json(&v).unwrap())
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        mk(json!({"align": 3})),
        "Cannot meet constraints with align 3"
    );
    assert_eq!(
        mk(json!({"align": 4096, "max-transfer": 1000})),
        "Cannot meet constraints with max-transfer 1000"
    );
    assert_eq!(
        mk(json!({"opt-discard": 4096, "max-discard": 6144})),
        "Cannot meet constraints with max-discard 6144"
    );
}

#[tokio::test]
async fn blkdebug_align_is_the_request_alignment() {
    let mem: NodeRef = Arc::new(MemNode::with_data(vec![0; 1 << 20]));
    let opts = BlkdebugOptions::from_json(&json!({"align": 4096})).unwrap();
    let bd = BlkdebugNode::new(mem, opts).unwrap();
    assert_eq!(bd.request_alignment(), 4096);
    assert!(bd.backing().is_none());
    bd.read(4096, IoBuf::zeroed(8192)).await.unwrap();
    let e = bd.read(512, IoBuf::zeroed(4096)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        bd.write(0, data(1, 512), WriteFlags::default())
            .await
            .is_err()
    );
}
