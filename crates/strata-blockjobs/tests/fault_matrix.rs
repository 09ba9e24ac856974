//! The error-injection matrix: a `blkdebug` filter between a qcow2 node and its file fails
//! one request (EIO or ENOSPC) after each metadata update site qcow2 announces, while each
//! kind of job (and plain guest writes) works on that image. For every cell:
//!
//! - a delivered fault makes the operation report an error (the job ends with an error
//!   within 5 s; a guest write or flush fails) — never a success;
//! - after closing, `qemu-img check` finds no corruption in any image (leaks are counted);
//! - the same operation retried without the fault succeeds and gives the right content
//!   (`qemu-img compare`).
//!
//! `STRATA_LONG=1` adds every other blkdebug event, ENOSPC for every job, and injects
//! without `once` too. `FAULT_SITE=<event>` runs one row.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use strata_blockjobs::BlockJobEnv;
use strata_blockjobs::backup::blockdev_backup;
use strata_blockjobs::commit::block_commit;
use strata_blockjobs::create::blockdev_create;
use strata_blockjobs::mirror::blockdev_mirror;
use strata_blockjobs::stream::block_stream;
use strata_core::{DebugEvent, IoBuf, NodeRef, WriteFlags};
use strata_graph::Graph;
use strata_graph::blockdev::{Objects, blockdev_add};
use strata_graph::drivers::blkdebug::{BlkdebugIoType, BlkdebugNode};
use strata_job::{JobManager, JobStatus, MemorySink};
use strata_testkit::{MIB, run};

const SIZE: u64 = 2 * MIB;
/// The faulty image: 512-byte clusters and 64-bit refcounts, so that 2 MiB of data
/// allocate L2 tables, refcount blocks and grow the refcount table.
const SMALL: &str = "cluster_size=512,refcount_bits=64";

/// The metadata update sites (blkdebug events) of the CI matrix.
const SITES: &[DebugEvent] = &[
    DebugEvent::L1Update,
    DebugEvent::L2Load,
    DebugEvent::L2Update,
    DebugEvent::L2AllocCowRead,
    DebugEvent::L2AllocWrite,
    DebugEvent::RefblockLoad,
    DebugEvent::RefblockUpdatePart,
    DebugEvent::RefblockAlloc,
    DebugEvent::RefblockAllocWrite,
    DebugEvent::RefblockAllocHookup,
    DebugEvent::ReftableGrow,
    DebugEvent::RefblockAllocWriteBlocks,
    DebugEvent::RefblockAllocWriteTable,
    DebugEvent::RefblockAllocSwitchTable,
    DebugEvent::ClusterAlloc,
    DebugEvent::ClusterFree,
    DebugEvent::CowRead,
    DebugEvent::CowWrite,
    DebugEvent::WriteAio,
    DebugEvent::FlushToOs,
    DebugEvent::FlushToDisk,
    DebugEvent::EmptyImagePrepare,
    DebugEvent::ReftableUpdate,
];

fn long() -> bool {
    std::env::var_os("STRATA_LONG").is_some_and(|v| v != "0")
}

/// What runs on the faulty image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Unaligned guest writes (with COW from a backing file), then a flush.
    GuestWrite,
    /// `block-stream` into the faulty top.
    Stream,
    /// `block-commit` of an intermediate node into the faulty base.
    CommitIntermediate,
    /// Active `block-commit` into the faulty base (READY, then complete).
    CommitActive,
    /// `blockdev-mirror` sync full to the faulty target (READY, then complete).
    Mirror,
    /// `blockdev-backup` sync full to the faulty target.
    BackupFull,
    /// `blockdev-backup` sync incremental (bitmap of the guest's writes) to the faulty target.
    BackupIncremental,
    /// `blockdev-create` of a qcow2 image on a faulty file.
    Create,
}

/// Image files of one cell, and what the graph is made of.
struct Cell {
    dir: tempfile::TempDir,
    op: Op,
}

/// What one attempt of an operation reported.
#[derive(Debug)]
struct Attempt {
    error: Option<String>,
    elapsed: Duration,
    /// Requests blkdebug failed before the operation ended: (reads, writes and flushes).
    injected: (u64, u64),
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

fn qemu_img_create(path: &str, opts: &str, backing: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    let size = SIZE.to_string();
    args.extend([path, size.as_str()]);
    run("qemu-img", &args);
}

fn qemu_io(path: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(path);
    run("qemu-io", &args);
}

/// The guest writes of [`Op::GuestWrite`]: unaligned, nearly covering the image, so every
/// cluster is allocated with COW and the refcount table has to grow.
fn guest_writes() -> Vec<(u64, u64, u8)> {
    (0..SIZE / (16 << 10))
        .map(|i| (i * (16 << 10) + 300, (16 << 10) - 700, (i % 200) as u8 + 20))
        .collect()
}

/// Build the template images of `op` in `dir`, and the raw file of the expected result.
fn make_template(op: Op, dir: &Path) {
    let expected = p(dir, "expected.raw");
    match op {
        Op::GuestWrite => {
            qemu_img_create(&p(dir, "base.qcow2"), "", None);
            qemu_io(&p(dir, "base.qcow2"), &["write -P 1 0 2M"]);
            qemu_img_create(&p(dir, "img.qcow2"), SMALL, Some("base.qcow2"));
            let mut model = vec![1u8; SIZE as usize];
            for (off, len, pat) in guest_writes() {
                model[off as usize..(off + len) as usize].fill(pat);
            }
            std::fs::write(&expected, model).expect("model");
        }
        Op::Stream => {
            qemu_img_create(&p(dir, "base.qcow2"), "", None);
            qemu_io(
                &p(dir, "base.qcow2"),
                &["write -P 1 0 2M", "write -P 2 512k 100k"],
            );
            qemu_img_create(&p(dir, "top.qcow2"), SMALL, Some("base.qcow2"));
            qemu_io(&p(dir, "top.qcow2"), &["write -P 3 1M 64k"]);
        }
        Op::CommitIntermediate | Op::CommitActive => {
            qemu_img_create(&p(dir, "base.qcow2"), SMALL, None);
            qemu_io(&p(dir, "base.qcow2"), &["write -P 1 0 1M"]);
            qemu_img_create(&p(dir, "mid.qcow2"), "", Some("base.qcow2"));
            qemu_io(&p(dir, "mid.qcow2"), &["write -P 2 512k 1536k"]);
            qemu_img_create(&p(dir, "top.qcow2"), "", Some("mid.qcow2"));
            qemu_io(&p(dir, "top.qcow2"), &["write -P 3 1M 256k"]);
        }
        Op::Mirror | Op::BackupFull | Op::BackupIncremental => {
            qemu_img_create(&p(dir, "src.qcow2"), "", None);
            qemu_io(&p(dir, "src.qcow2"), &["write -P 1 0 2M"]);
            qemu_img_create(&p(dir, "tgt.qcow2"), SMALL, None);
        }
        Op::Create => {
            std::fs::write(dir.join("new.qcow2"), b"").expect("empty file");
            std::fs::write(&expected, vec![0u8; SIZE as usize]).expect("model");
        }
    }
    // The guest view of the source, as every job but create and guest writes copies it.
    let src = match op {
        Op::Stream | Op::CommitIntermediate | Op::CommitActive => Some("top.qcow2"),
        Op::Mirror | Op::BackupFull | Op::BackupIncremental => Some("src.qcow2"),
        Op::GuestWrite | Op::Create => None,
    };
    if let Some(src) = src {
        run(
            "qemu-img",
            &["convert", "-O", "raw", &p(dir, src), &expected],
        );
    }
}

/// The images of `op` (files in the cell directory) and which one sits on blkdebug.
fn images(op: Op) -> (&'static [&'static str], &'static str) {
    match op {
        Op::GuestWrite => (&["base.qcow2", "img.qcow2"], "img.qcow2"),
        Op::Stream => (&["base.qcow2", "top.qcow2"], "top.qcow2"),
        Op::CommitIntermediate | Op::CommitActive => {
            (&["base.qcow2", "mid.qcow2", "top.qcow2"], "base.qcow2")
        }
        Op::Mirror | Op::BackupFull | Op::BackupIncremental => {
            (&["src.qcow2", "tgt.qcow2"], "tgt.qcow2")
        }
        Op::Create => (&["new.qcow2"], "new.qcow2"),
    }
}

/// The file child of the faulty image: blkdebug failing one request (or all, without
/// `once`) after the first `event`, with `errno`; no rules when `event` is `None`.
fn faulty_file(path: &str, fault: Option<(DebugEvent, i32, bool)>) -> Value {
    let mut o = json!({
        "driver": "blkdebug",
        "node-name": "dbg",
        "image": {"driver": "file", "filename": path},
    });
    if let Some((event, errno, once)) = fault {
        // Only the first occurrence arms the rule: state 1 → 2 on the event.
        o["inject-error"] =
            json!([{"event": event.as_str(), "state": 1, "errno": errno, "once": once}]);
        o["set-state"] = json!([{"event": event.as_str(), "state": 1, "new_state": 2}]);
    }
    o
}

impl Cell {
    fn new(op: Op, template: &Path) -> Cell {
        let dir = tempfile::tempdir().expect("tempdir");
        for entry in std::fs::read_dir(template).expect("template") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
        Cell { dir, op }
    }

    fn path(&self, name: &str) -> String {
        p(self.dir.path(), name)
    }

    /// Open the nodes of the operation, with the fault (if any) under the faulty image.
    async fn open(&self, fault: Option<(DebugEvent, i32, bool)>) -> (BlockJobEnv, Arc<MemorySink>) {
        let (files, faulty) = images(self.op);
        let mut g = Graph::new();
        let objects = Objects::default();
        let mut prev: Option<String> = None;
        for f in files {
            let name = f.trim_end_matches(".qcow2").to_string();
            let file = if *f == faulty {
                faulty_file(&self.path(f), fault)
            } else {
                json!({"driver": "file", "filename": self.path(f)})
            };
            let mut o = if self.op == Op::Create {
                file
            } else {
                json!({"driver": "qcow2", "node-name": name, "file": file})
            };
            let chained = matches!(
                self.op,
                Op::GuestWrite | Op::Stream | Op::CommitIntermediate | Op::CommitActive
            );
            if chained && let Some(b) = &prev {
                o["backing"] = json!(b);
            }
            blockdev_add(&mut g, &objects, o.as_object().expect("object"))
                .await
                .unwrap_or_else(|e| panic!("blockdev-add {f}: {e}"));
            prev = Some(name);
        }
        let sink = Arc::new(MemorySink::new());
        let env = BlockJobEnv {
            graph: Arc::new(tokio::sync::Mutex::new(g)),
            jobs: Arc::new(JobManager::new(sink.clone())),
        };
        (env, sink)
    }

    /// Run the operation once; reports the error it ended with.
    async fn attempt(&self, env: &BlockJobEnv, sink: &MemorySink) -> Attempt {
        let t0 = Instant::now();
        let error = match self.op {
            Op::GuestWrite => guest_write(env).await,
            _ => run_job(env, sink, self.op).await,
        };
        let elapsed = t0.elapsed();
        Attempt {
            error,
            elapsed,
            injected: injected(env).await,
        }
    }

    /// Close every node; returns the first close error.
    async fn close(&self, env: &BlockJobEnv) -> Option<String> {
        let mut g = env.graph.lock().await;
        let mut err = None;
        for _ in 0..8 {
            let roots: Vec<String> = g
                .node_names()
                .iter()
                .filter(|n| g.parents_of(n).next().is_none())
                .cloned()
                .collect();
            if roots.is_empty() {
                break;
            }
            for n in roots {
                if let Err(e) = g.remove_node(&n).await {
                    err.get_or_insert(format!("closing {n}: {e}"));
                }
            }
        }
        err
    }

    /// `qemu-img check` every image: an error for corruption, else the leaked clusters.
    fn check(&self) -> Result<u64, String> {
        let mut leaks = 0;
        for f in images(self.op).0 {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "--output=json", &self.path(f)])
                .output()
                .expect("qemu-img check");
            let code = out.status.code().unwrap_or(-1);
            if code != 0 && code != 3 {
                return Err(format!(
                    "qemu-img check {f}: exit {code}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            leaks += v["leaks"].as_u64().unwrap_or(0);
        }
        Ok(leaks)
    }

    /// Compare the result image with the expected raw content.
    fn verify(&self) -> Result<(), String> {
        let result = match self.op {
            Op::GuestWrite => "img.qcow2",
            Op::Stream | Op::CommitIntermediate | Op::CommitActive => "top.qcow2",
            Op::Mirror | Op::BackupFull | Op::BackupIncremental => "tgt.qcow2",
            Op::Create => "new.qcow2",
        };
        let mut extra = Vec::new();
        if matches!(self.op, Op::CommitActive) {
            // The base itself must hold everything now.
            extra.push("base.qcow2");
        }
        for img in std::iter::once(result).chain(extra) {
            let out = std::process::Command::new("qemu-img")
                .args([
                    "compare",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    &self.path(img),
                    &self.path("expected.raw"),
                ])
                .output()
                .expect("qemu-img compare");
            if !out.status.success() {
                return Err(format!(
                    "qemu-img compare {img}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Ok(())
    }
}

async fn node_ref(env: &BlockJobEnv, name: &str) -> NodeRef {
    let g = env.graph.lock().await;
    g.node(name).expect("node").node.clone()
}

/// Requests the blkdebug node has failed so far: (reads, other requests).
async fn injected(env: &BlockJobEnv) -> (u64, u64) {
    let g = env.graph.lock().await;
    let Some(n) = g.node("dbg") else {
        return (0, 0);
    };
    let inner = n.node.inner();
    let Some(d) = inner.as_any().downcast_ref::<BlkdebugNode>() else {
        return (0, 0);
    };
    let others = [
        BlkdebugIoType::Write,
        BlkdebugIoType::WriteZeroes,
        BlkdebugIoType::Discard,
        BlkdebugIoType::Flush,
    ];
    (
        d.injected(BlkdebugIoType::Read),
        others.iter().map(|t| d.injected(*t)).sum(),
    )
}

/// Guest writes straight to the faulty qcow2 node, then a flush; the first error ends it.
async fn guest_write(env: &BlockJobEnv) -> Option<String> {
    let img = node_ref(env, "img").await;
    for (off, len, pat) in guest_writes() {
        let mut buf = IoBuf::zeroed(len as usize);
        buf.fill(pat);
        if let Err(e) = img.write(off, buf, WriteFlags::default()).await {
            return Some(format!("write at {off}: {e}"));
        }
    }
    img.flush().await.err().map(|e| format!("flush: {e}"))
}

fn args(v: Value) -> Map<String, Value> {
    v.as_object().expect("object").clone()
}

/// Start the job of `op`, complete it when READY, and wait (at most 5 s) for it to end;
/// returns its error.
async fn run_job(env: &BlockJobEnv, sink: &MemorySink, op: Op) -> Option<String> {
    let id = "job0";
    let started = match op {
        Op::Stream => block_stream(env, &args(json!({"job-id": id, "device": "top"}))).await,
        Op::CommitIntermediate => {
            block_commit(
                env,
                &args(json!({"job-id": id, "device": "top", "top-node": "mid", "base-node": "base"})),
            )
            .await
        }
        Op::CommitActive => {
            block_commit(env, &args(json!({"job-id": id, "device": "top"}))).await
        }
        Op::Mirror => {
            blockdev_mirror(
                env,
                &args(json!({"job-id": id, "device": "src", "target": "tgt", "sync": "full"})),
            )
            .await
        }
        Op::BackupFull => {
            blockdev_backup(
                env,
                &args(json!({"job-id": id, "device": "src", "target": "tgt", "sync": "full"})),
                None,
            )
            .await
        }
        Op::BackupIncremental => {
            // The bitmap is made (all dirty) by the guest writing the whole image.
            let src = node_ref(env, "src").await;
            {
                let g = env.graph.lock().await;
                let n = g.node("src").expect("src");
                n.node
                    .bitmaps()
                    .add("b0", 65536, false, false)
                    .expect("add bitmap");
            }
            let mut buf = IoBuf::zeroed(SIZE as usize);
            buf.fill(1);
            src.write(0, buf, WriteFlags::default())
                .await
                .expect("guest write");
            blockdev_backup(
                env,
                &args(json!({"job-id": id, "device": "src", "target": "tgt", "sync": "incremental", "bitmap": "b0"})),
                None,
            )
            .await
        }
        Op::Create => {
            blockdev_create(
                env,
                &args(json!({"job-id": id, "options": {"driver": "qcow2", "file": "dbg", "size": SIZE, "cluster-size": 512, "refcount-bits": 64}})),
            )
            .await
        }
        Op::GuestWrite => unreachable!("not a job"),
    };
    if let Err(e) = started {
        return Some(format!("start: {e:?}"));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut completed = false;
    loop {
        match env.jobs.job_status(id) {
            None | Some(JobStatus::Null) => break,
            Some(JobStatus::Ready) if !completed => {
                env.jobs.job_complete(id).expect("job-complete");
                completed = true;
            }
            Some(JobStatus::Concluded) => {
                // blockdev-create jobs wait for job-dismiss; their error is in query-jobs.
                let info = env.jobs.query_jobs();
                let err = info
                    .iter()
                    .find(|j| j["id"] == id)
                    .and_then(|j| j["error"].as_str().map(str::to_string));
                env.jobs.job_dismiss(id).expect("job-dismiss");
                return err;
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{op:?}: job did not end within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A block job's error is in its BLOCK_JOB_COMPLETED event.
    sink.events()
        .into_iter()
        .find(|(name, _)| *name == "BLOCK_JOB_COMPLETED")
        .and_then(|(_, data)| data["error"].as_str().map(str::to_string))
}

/// The outcome of one cell, one row of the report.
#[derive(Debug)]
struct Outcome {
    site: DebugEvent,
    errno: i32,
    once: bool,
    /// The fault was delivered during the operation.
    hit: bool,
    /// Only a read failed, and the operation absorbed it.
    absorbed_read: bool,
    error: Option<String>,
    close_error: Option<String>,
    leaks: u64,
    elapsed: Duration,
    /// Why the cell fails, if it does.
    failure: Option<String>,
}

/// Run one cell: the operation with the fault, close, check, retry without the fault,
/// check and compare.
async fn run_cell(op: Op, template: &Path, site: DebugEvent, errno: i32, once: bool) -> Outcome {
    let cell = Cell::new(op, template);
    let (env, sink) = cell.open(Some((site, errno, once))).await;
    let a = cell.attempt(&env, &sink).await;
    let close_error = cell.close(&env).await;
    let mut failure = None;
    let (failed_reads, failed_writes) = a.injected;
    let hit = failed_reads + failed_writes > 0;
    // A failed metadata write or flush must fail the operation. A failed read may be
    // absorbed where QEMU absorbs it too (the metadata-preallocation probe of the first
    // block-status request treats an error as "no"); such cells are counted.
    let absorbed_read = failed_writes == 0 && failed_reads > 0 && a.error.is_none();
    if failed_writes > 0 && a.error.is_none() {
        failure = Some(format!(
            "{failed_writes} write/flush request(s) failed, yet the operation reported success"
        ));
    }
    if !hit && let Some(e) = &a.error {
        failure = Some(format!("no fault delivered, yet an error: {e}"));
    }
    let leaks = match cell.check() {
        Ok(l) => l,
        Err(e) => {
            failure.get_or_insert(e);
            0
        }
    };
    if failure.is_none() {
        // The retry: same operation, the fault gone.
        let (env, sink) = cell.open(None).await;
        let r = cell.attempt(&env, &sink).await;
        let close = cell.close(&env).await;
        if let Some(e) = r.error {
            failure = Some(format!("retry failed: {e}"));
        } else if let Some(e) = close {
            failure = Some(format!("retry close failed: {e}"));
        } else if let Err(e) = cell.check().and_then(|_| cell.verify()) {
            failure = Some(format!("after retry: {e}"));
        }
    }
    Outcome {
        site,
        errno,
        once,
        hit,
        absorbed_read,
        error: a.error,
        close_error,
        leaks,
        elapsed: a.elapsed,
        failure,
    }
}

/// Run `op` against every site and fail with the list of failing cells.
async fn matrix(op: Op) {
    let template = tempfile::tempdir().expect("tempdir");
    make_template(op, template.path());
    let sites: Vec<DebugEvent> = if long() {
        DebugEvent::ALL
            .iter()
            .copied()
            .filter(|e| *e != DebugEvent::None)
            .collect()
    } else {
        SITES.to_vec()
    };
    // `FAULT_SITE=<event>` runs one row (for debugging a cell).
    let only = std::env::var("FAULT_SITE").ok();
    let sites: Vec<DebugEvent> = sites
        .into_iter()
        .filter(|s| only.as_deref().is_none_or(|o| o == s.as_str()))
        .collect();
    let onces: &[bool] = if long() { &[true, false] } else { &[true] };
    let t0 = Instant::now();
    let mut rows = Vec::new();
    // CI budget: ENOSPC on every site for guest writes and full backup only (its error
    // paths are the same as EIO's elsewhere); `STRATA_LONG=1` runs it everywhere.
    let errnos: &[i32] = if long() || matches!(op, Op::GuestWrite | Op::BackupFull) {
        &[libc::EIO, libc::ENOSPC]
    } else {
        &[libc::EIO]
    };
    for &site in &sites {
        for &errno in errnos {
            for &once in onces {
                rows.push(run_cell(op, template.path(), site, errno, once).await);
            }
        }
    }
    let hits = rows.iter().filter(|r| r.hit).count();
    let fails: Vec<&Outcome> = rows.iter().filter(|r| r.failure.is_some()).collect();
    for r in &rows {
        eprintln!(
            "{op:?} {:<28} errno={:<2} once={} hit={} absorbed_read={} {:>5}ms leaks={} err={:?} close={:?}{}",
            r.site.as_str(),
            r.errno,
            r.once,
            r.hit,
            r.absorbed_read,
            r.elapsed.as_millis(),
            r.leaks,
            r.error,
            r.close_error,
            r.failure
                .as_ref()
                .map(|f| format!(" FAIL: {f}"))
                .unwrap_or_default()
        );
    }
    eprintln!(
        "MATRIX {op:?}: {} cells, {hits} with a delivered fault, {} failing, {:.1}s",
        rows.len(),
        fails.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(fails.is_empty(), "{} failing cells", fails.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_guest_write() {
    matrix(Op::GuestWrite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_stream() {
    matrix(Op::Stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_commit_intermediate() {
    matrix(Op::CommitIntermediate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_commit_active() {
    matrix(Op::CommitActive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_mirror() {
    matrix(Op::Mirror).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_backup_full() {
    matrix(Op::BackupFull).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_backup_incremental() {
    matrix(Op::BackupIncremental).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_create() {
    matrix(Op::Create).await;
}
