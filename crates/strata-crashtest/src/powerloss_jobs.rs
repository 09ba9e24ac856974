//! Power-loss replay of a `block-stream` job across two image files.
//!
//! A base qcow2 (every sector generation 1) and a top qcow2 over it (generation 2 in a seeded
//! subset of sectors) live on memory nodes, each wrapped in a [`TaggedLogFilter`] that appends
//! to ONE shared log, so the order of requests across the two files is kept. The stream is
//! emulated with the public qcow2 API as the job does it: every range top does not allocate is
//! read through top (which reads base) and written into top; at the end the backing chain is
//! flushed and `Qcow2::set_backing(None, None)` drops the backing file, as the job's
//! completion does. Guest writes (generation 3+) and guest flushes go to top in between.
//!
//! Crash states: after each flush (of either file) and at the start, each file keeps what its
//! own last completed flush covers; every later request of that file up to the next flush in
//! the log may be present or absent, in any order. For each state both images must pass the
//! qcow2 check (leaks only are counted apart), top is opened over base only if its header
//! still names a backing file, and every sector of top's guest view must hold a generation
//! written there no older than the one the last durable guest flush acknowledged.
//!
//! A second scenario, [`commit_job`], commits an intermediate image across three files
//! (base <- mid <- top) with the same log, crash model and top-view rule.

use std::sync::Arc;

use parking_lot::Mutex;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, BoxFuture, IoBuf, NodeRef, Prealloc, WriteFlags, ZeroFlags};
use strata_graph::drivers::log_writes::LogEntry;
use strata_qcow2::check::check;
use strata_qcow2::{CreateOptions, OpenOptions, Qcow2, read_header};
use strata_testkit::Xorshift;

use crate::Tally;
use crate::pattern::{SECTOR, check_sector, fill};
use crate::replay::apply;

/// Guest disk size of the scenario.
const DISK: u64 = 4 << 20;
const SECTORS: u64 = DISK / SECTOR as u64;
/// How much one stream step looks at: one cluster, so guest requests interleave finely
/// (the job's own chunk is 512 KiB; the copy per range is the same).
const STEP: u64 = 64 << 10;
/// Guest writes after the job completed.
const WRITES_AFTER: usize = 8;
const BASE: usize = 0;
const TOP: usize = 1;

/// One log shared by several files: `(file index, request)` in completion order. A flush's
/// `covers` counts entries of this shared log.
pub type SharedLog = Arc<Mutex<Vec<(usize, LogEntry)>>>;

/// A pass-through node that appends each completed modifying request of its child, tagged
/// with `file_id`, to a [`SharedLog`].
#[derive(Debug)]
pub struct TaggedLogFilter {
    file: NodeRef,
    log: SharedLog,
    file_id: usize,
}

impl TaggedLogFilter {
    /// Wrap `file`, logging into `log` as file `file_id`.
    pub fn new(file: NodeRef, log: SharedLog, file_id: usize) -> TaggedLogFilter {
        TaggedLogFilter { file, log, file_id }
    }

    fn record(&self, entry: LogEntry) {
        self.log.lock().push((self.file_id, entry));
    }

    fn record_flush(&self, covers: usize) {
        self.record(LogEntry::Flush { covers });
    }
}

impl BlockNode for TaggedLogFilter {
    strata_graph::forward_to_child!(file =>
        filename, size, read_only, request_alignment, read, block_status, backing, file,
        debug_event, allocated_size, as_any,
    );

    fn driver(&self) -> &'static str {
        "log-writes"
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let buf = self.file.write(offset, buf, flags).await?;
            self.record(LogEntry::Write {
                offset,
                data: buf.to_vec(),
            });
            if flags.fua {
                let covers = self.log.lock().len();
                self.record_flush(covers);
            }
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.file.write_zeroes(offset, len, flags).await?;
            self.record(LogEntry::Zeroes { offset, len });
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.file.discard(offset, len).await?;
            self.record(LogEntry::Discard { offset, len });
            Ok(())
        })
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.file.truncate(size, prealloc).await?;
            self.record(LogEntry::Truncate { size });
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let covers = self.log.lock().len();
            self.file.flush().await?;
            self.record_flush(covers);
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let covers = self.log.lock().len();
            self.file.close().await?;
            self.record_flush(covers);
            Ok(())
        })
    }
}

/// The guest's history: per sector, the generations its view showed or was written, and at
/// each guest flush the shared log length when it completed and the view's generations then.
struct GuestHistory {
    written: Vec<Vec<u64>>,
    flushes: Vec<(usize, Vec<u64>)>,
}

/// Stream top from base with guest I/O interleaved (seeded), then replay `variants` crash
/// states per flush point.
pub fn stream_job(seed: u64, variants: usize) -> Tally {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(seed, variants, Completion::SetBacking))
        .unwrap_or_else(|e| Tally {
            states: 0,
            leaks_only: 0,
            failures: vec![format!("stream-job seed {seed}: setup failed: {e}")],
        })
}

/// Run [`stream_job`] with seeds `seed`, `seed + 1`, ... until at least `min_states` crash
/// states were checked (the `--long` mode).
pub fn stream_jobs_at_least(seed: u64, variants: usize, min_states: u64) -> Tally {
    let mut tally = Tally::default();
    let mut s = seed;
    while tally.states < min_states {
        let r = stream_job(s, variants);
        let stuck = r.states == 0;
        tally.absorb(r);
        if stuck {
            break;
        }
        s += 1;
    }
    tally
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Base (all generation 1) and top (generation 2 where `rng` says) as flushed file bytes,
/// and the generation of each sector of top's view.
async fn build_chain(rng: &mut Xorshift) -> Result<(Vec<u8>, Vec<u8>, Vec<u64>), String> {
    let base_mem: NodeRef = Arc::new(MemNode::new());
    let size_only = CreateOptions {
        size: DISK,
        ..Default::default()
    };
    strata_qcow2::create(&base_mem, &size_only, None)
        .await
        .map_err(err)?;
    let base = Qcow2::open(base_mem.clone(), &OpenOptions::default(), None, None)
        .await
        .map_err(err)?;
    let mut buf = IoBuf::zeroed(DISK as usize);
    fill(&mut buf, 0, 1);
    base.write(0, buf, WriteFlags::default())
        .await
        .map_err(err)?;
    base.flush().await.map_err(err)?;
    let top_mem: NodeRef = Arc::new(MemNode::new());
    let with_backing = CreateOptions {
        size: DISK,
        backing_file: Some("base.qcow2".into()),
        backing_format: Some("qcow2".into()),
        ..Default::default()
    };
    strata_qcow2::create(&top_mem, &with_backing, None)
        .await
        .map_err(err)?;
    let below: NodeRef = base.clone();
    let top = Qcow2::open(top_mem.clone(), &OpenOptions::default(), Some(below), None)
        .await
        .map_err(err)?;
    let mut gens = vec![1u64; SECTORS as usize];
    for _ in 0..24 {
        let n = 1 + rng.next() % 64;
        let first = rng.next() % (SECTORS - n);
        let mut buf = IoBuf::zeroed(n as usize * SECTOR);
        fill(&mut buf, first * SECTOR as u64, 2);
        top.write(first * SECTOR as u64, buf, WriteFlags::default())
            .await
            .map_err(err)?;
        gens[first as usize..(first + n) as usize].fill(2);
    }
    top.flush().await.map_err(err)?;
    Ok((read_all(&base_mem).await?, read_all(&top_mem).await?, gens))
}

/// How the emulated job drops the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    /// As the job does: `Qcow2::set_backing(None, None)`.
    SetBacking,
    /// A deliberately wrong order, to show the replay catches it: the header loses its
    /// backing file name before the copied data's metadata is flushed.
    #[cfg_attr(not(test), allow(dead_code))]
    HeaderBeforeFlush,
}

async fn run(seed: u64, variants: usize, completion: Completion) -> Result<Tally, String> {
    let mut rng = Xorshift::new(seed);
    let (base0, top0, gens) = build_chain(&mut rng).await?;
    let log: SharedLog = Arc::default();
    let base_file: NodeRef = Arc::new(TaggedLogFilter::new(
        Arc::new(MemNode::with_data(base0.clone())),
        log.clone(),
        BASE,
    ));
    let top_file: NodeRef = Arc::new(TaggedLogFilter::new(
        Arc::new(MemNode::with_data(top0.clone())),
        log.clone(),
        TOP,
    ));
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let base: NodeRef = Qcow2::open(base_file, &ro, None, None).await.map_err(err)?;
    let top = Qcow2::open(top_file.clone(), &OpenOptions::default(), Some(base), None)
        .await
        .map_err(err)?;
    let mut hist = GuestHistory {
        written: gens.iter().map(|&g| vec![g]).collect(),
        flushes: vec![(0, gens.clone())],
    };
    let mut guest = Guest {
        current: gens,
        next_gen: 3,
    };
    let mut offset = 0;
    while offset < DISK {
        stream_step(&top, offset).await?;
        offset += STEP;
        if rng.next().is_multiple_of(3) {
            guest.write(&top, &mut rng, &mut hist).await?;
        }
        if rng.next().is_multiple_of(5) {
            guest.flush(&top, &log, &mut hist).await?;
        }
    }
    // The job's completion: flush the backing chain, then drop the backing file (which
    // flushes top before it writes the header).
    if let Some(b) = top.backing() {
        b.flush().await.map_err(err)?;
    }
    match completion {
        Completion::SetBacking => top.set_backing(None, None).await.map_err(err)?,
        Completion::HeaderBeforeFlush => {
            // backing_file_offset and backing_file_size (header bytes 8..20) to zero.
            let no_backing = IoBuf::from_slice(&[0; 12]);
            top_file
                .write(8, no_backing, WriteFlags::default())
                .await
                .map_err(err)?;
            top.flush().await.map_err(err)?;
        }
    }
    for w in 0..WRITES_AFTER {
        guest.write(&top, &mut rng, &mut hist).await?;
        if w % 3 == 2 {
            guest.flush(&top, &log, &mut hist).await?;
        }
    }
    let log = log.lock().clone();
    Ok(replay_all([&base0, &top0], &log, &hist, variants, seed).await)
}

/// Copy what top does not allocate in `[offset, offset + STEP)` from below, as the job's
/// copy-on-read prefetch does.
async fn stream_step(top: &Arc<Qcow2>, offset: u64) -> Result<(), String> {
    let end = (offset + STEP).min(DISK);
    let mut at = offset;
    while at < end {
        let ext = top.block_status(at, end - at).await.map_err(err)?;
        let n = ext.len.clamp(1, end - at);
        let s = ext.status;
        if !(s.allocated || s.data || s.zero) {
            let data = top.read(at, IoBuf::zeroed(n as usize)).await.map_err(err)?;
            top.write(at, data, WriteFlags::default())
                .await
                .map_err(err)?;
        }
        at += n;
    }
    Ok(())
}

/// The guest's state: the generation each sector shows and the next generation to write.
struct Guest {
    current: Vec<u64>,
    next_gen: u64,
}

impl Guest {
    async fn write(
        &mut self,
        top: &Arc<Qcow2>,
        rng: &mut Xorshift,
        hist: &mut GuestHistory,
    ) -> Result<(), String> {
        let n = 1 + rng.next() % 16;
        let first = rng.next() % (SECTORS - n);
        let generation = self.next_gen;
        self.next_gen += 1;
        let mut buf = IoBuf::zeroed(n as usize * SECTOR);
        fill(&mut buf, first * SECTOR as u64, generation);
        top.write(first * SECTOR as u64, buf, WriteFlags::default())
            .await
            .map_err(err)?;
        for s in first..first + n {
            self.current[s as usize] = generation;
            hist.written[s as usize].push(generation);
        }
        Ok(())
    }

    async fn flush(
        &self,
        top: &Arc<Qcow2>,
        log: &SharedLog,
        hist: &mut GuestHistory,
    ) -> Result<(), String> {
        top.flush().await.map_err(err)?;
        hist.flushes.push((log.lock().len(), self.current.clone()));
        Ok(())
    }
}

async fn read_all(node: &NodeRef) -> Result<Vec<u8>, String> {
    let buf = node
        .read(0, IoBuf::zeroed(node.size() as usize))
        .await
        .map_err(err)?;
    Ok(buf.to_vec())
}

/// Per file, the log position up to which its entries are durable when the machine stops
/// after `log[..crash]`: what that file's last completed flush covers.
fn durable_bounds(log: &[(usize, LogEntry)], crash: usize) -> [usize; 2] {
    let mut d = [0, 0];
    for (f, e) in &log[..crash] {
        if let LogEntry::Flush { covers } = e {
            d[*f] = d[*f].max(*covers);
        }
    }
    d
}

async fn replay_all(
    initial: [&[u8]; 2],
    log: &[(usize, LogEntry)],
    hist: &GuestHistory,
    variants: usize,
    seed: u64,
) -> Tally {
    let mut tally = Tally::default();
    let mut rng = Xorshift::new(seed ^ 0x5eed);
    let mut durable = [initial[0].to_vec(), initial[1].to_vec()];
    let mut applied = [0usize; 2];
    let mut base_checked: Option<Vec<u8>> = None;
    let mut crashes = vec![0];
    crashes.extend(
        log.iter()
            .enumerate()
            .filter(|(_, (_, e))| matches!(e, LogEntry::Flush { .. }))
            .map(|(i, _)| i + 1),
    );
    for crash in crashes {
        let bounds = durable_bounds(log, crash);
        for f in [BASE, TOP] {
            while applied[f] < bounds[f] {
                let (file, e) = &log[applied[f]];
                if *file == f {
                    apply(&mut durable[f], e);
                }
                applied[f] += 1;
            }
        }
        // Requests completed before the power loss: up to the next flush in the log.
        let epoch_end = log[crash..]
            .iter()
            .position(|(_, e)| matches!(e, LogEntry::Flush { .. }))
            .map_or(log.len(), |p| crash + p);
        let volatile: Vec<&(usize, LogEntry)> = (0..epoch_end)
            .filter(|&i| i >= bounds[log[i].0])
            .map(|i| &log[i])
            .filter(|(_, e)| !matches!(e, LogEntry::Flush { .. }))
            .collect();
        for v in 0..variants {
            let mut files = durable.clone();
            if v + 1 == variants {
                volatile.iter().for_each(|(f, e)| apply(&mut files[*f], e));
            } else if !volatile.is_empty() {
                let mut order: Vec<usize> = (0..volatile.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                let keep = rng.next() % (volatile.len() as u64 + 1);
                for &i in order.iter().take(keep as usize) {
                    let (f, e) = volatile[i];
                    apply(&mut files[*f], e);
                }
            }
            tally.states += 1;
            let [base, top] = files;
            // Base rarely changes (the job only flushes it): check each distinct content once.
            let base_same = base_checked.as_ref() == Some(&base);
            match verify(&base, &top, base_same, crash, hist).await {
                Err(e) => tally.failures.push(format!(
                    "stream-job seed {seed} durable_end {crash} variant {v}: {e}"
                )),
                Ok(leaks) => {
                    tally.leaks_only += u64::from(leaks);
                    if !base_same {
                        base_checked = Some(base);
                    }
                }
            }
        }
    }
    tally
}

/// Check one image file; `Ok(true)` if it has leaks only.
async fn check_file(name: &str, node: &NodeRef) -> Result<bool, String> {
    let r = check(node, None)
        .await
        .map_err(|e| format!("{name} check: {e}"))?;
    match r.exit_code() {
        0 => Ok(false),
        3 => Ok(true),
        c => Err(format!("{name} check exit {c}: {:?}", r.messages)),
    }
}

/// The invariants of one crash state (see the module comment); `Ok(true)` if a check
/// reported leaks only.
async fn verify(
    base: &[u8],
    top: &[u8],
    base_known_good: bool,
    crash: usize,
    hist: &GuestHistory,
) -> Result<bool, String> {
    let base_node: NodeRef = Arc::new(MemNode::with_data(base.to_vec()));
    let top_node: NodeRef = Arc::new(MemNode::with_data(top.to_vec()));
    let mut leaks = false;
    if !base_known_good {
        leaks |= check_file("base", &base_node).await?;
    }
    leaks |= check_file("top", &top_node).await?;
    let header = read_header(&top_node)
        .await
        .map_err(|e| format!("top header: {e}"))?;
    let backing = match header.backing_file {
        Some(_) => {
            let ro = OpenOptions {
                read_only: true,
                ..Default::default()
            };
            let b: NodeRef = Qcow2::open(base_node, &ro, None, None)
                .await
                .map_err(|e| format!("open base: {e}"))?;
            Some(b)
        }
        None => None,
    };
    let img = Qcow2::open(top_node, &OpenOptions::default(), backing, None)
        .await
        .map_err(|e| format!("open top: {e}"))?;
    let view = img
        .read(0, IoBuf::zeroed(DISK as usize))
        .await
        .map_err(|e| format!("read top: {e}"))?;
    // The newest guest flush whose completion is inside what the crash kept.
    let floor = hist
        .flushes
        .iter()
        .rev()
        .find(|(len, _)| *len <= crash)
        .map(|(_, gens)| gens.as_slice());
    for (i, s) in view.chunks(SECTOR).enumerate() {
        let min = floor.map_or(0, |g| g[i]);
        let allowed: Vec<u64> = hist.written[i]
            .iter()
            .copied()
            .filter(|&g| g >= min)
            .collect();
        if let Some(e) = check_sector(s, i as u64, &allowed) {
            let named = if header.backing_file.is_some() {
                "with backing"
            } else {
                "without backing"
            };
            return Err(format!("top ({named}): {e}"));
        }
    }
    Ok(leaks)
}

// ---- commit of an intermediate image (three files) ----
//
// base (generation 1) <- mid (generation 2, seeded) <- top (generation 3, seeded), all three
// logging into one shared log. The commit copies every range mid allocates through mid into
// base (opened read-write) while the guest writes (generation 4+) and flushes top; at the end
// base is flushed and `top.set_backing(Some("base.qcow2"), ..)` rewrites top's header, as the
// job's completion does. Top's guest view must never change because of the commit.

const C_BASE: usize = 0;
const C_MID: usize = 1;
const C_TOP: usize = 2;
const BASE_NAME: &str = "base.qcow2";
const MID_NAME: &str = "mid.qcow2";

/// Commit mid into base with guest I/O into top interleaved (seeded), then replay `variants`
/// crash states per flush point.
pub fn commit_job(seed: u64, variants: usize) -> Tally {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run_commit(seed, variants, CommitEnd::FlushThenHeader))
        .unwrap_or_else(|e| Tally {
            states: 0,
            leaks_only: 0,
            failures: vec![format!("commit-job seed {seed}: setup failed: {e}")],
        })
}

/// Run [`commit_job`] with seeds `seed`, `seed + 1`, ... until at least `min_states` crash
/// states were checked (the `--long` mode).
pub fn commit_jobs_at_least(seed: u64, variants: usize, min_states: u64) -> Tally {
    let mut tally = Tally::default();
    let mut s = seed;
    while tally.states < min_states {
        let r = commit_job(s, variants);
        let stuck = r.states == 0;
        tally.absorb(r);
        if stuck {
            break;
        }
        s += 1;
    }
    tally
}

/// How the emulated commit completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitEnd {
    /// As the job does: flush base, then `set_backing` on top.
    FlushThenHeader,
    /// A deliberately wrong order: top names base before base's copied data is flushed.
    #[cfg_attr(not(test), allow(dead_code))]
    HeaderBeforeFlush,
}

async fn new_qcow2(backing: Option<(&str, NodeRef)>) -> Result<(NodeRef, Arc<Qcow2>), String> {
    let mem: NodeRef = Arc::new(MemNode::new());
    let opts = CreateOptions {
        size: DISK,
        backing_file: backing.as_ref().map(|(n, _)| n.to_string()),
        backing_format: backing.as_ref().map(|_| "qcow2".to_string()),
        ..Default::default()
    };
    strata_qcow2::create(&mem, &opts, None).await.map_err(err)?;
    let img = Qcow2::open(
        mem.clone(),
        &OpenOptions::default(),
        backing.map(|(_, b)| b),
        None,
    )
    .await
    .map_err(err)?;
    Ok((mem, img))
}

/// Write `generation` into 24 seeded extents of `img`, updating `gens`.
async fn seed_writes(
    img: &Arc<Qcow2>,
    rng: &mut Xorshift,
    generation: u64,
    gens: &mut [u64],
) -> Result<(), String> {
    for _ in 0..24 {
        let n = 1 + rng.next() % 64;
        let first = rng.next() % (SECTORS - n);
        let mut buf = IoBuf::zeroed(n as usize * SECTOR);
        fill(&mut buf, first * SECTOR as u64, generation);
        img.write(first * SECTOR as u64, buf, WriteFlags::default())
            .await
            .map_err(err)?;
        gens[first as usize..(first + n) as usize].fill(generation);
    }
    img.flush().await.map_err(err)
}

/// The three flushed files and the generation of each sector of top's view.
async fn build_three(rng: &mut Xorshift) -> Result<([Vec<u8>; 3], Vec<u64>), String> {
    let (base_mem, base) = new_qcow2(None).await?;
    let mut buf = IoBuf::zeroed(DISK as usize);
    fill(&mut buf, 0, 1);
    base.write(0, buf, WriteFlags::default())
        .await
        .map_err(err)?;
    base.flush().await.map_err(err)?;
    let mut gens = vec![1u64; SECTORS as usize];
    let (mid_mem, mid) = new_qcow2(Some((BASE_NAME, base.clone() as NodeRef))).await?;
    seed_writes(&mid, rng, 2, &mut gens).await?;
    let (top_mem, top) = new_qcow2(Some((MID_NAME, mid.clone() as NodeRef))).await?;
    seed_writes(&top, rng, 3, &mut gens).await?;
    let files = [
        read_all(&base_mem).await?,
        read_all(&mid_mem).await?,
        read_all(&top_mem).await?,
    ];
    Ok((files, gens))
}

async fn run_commit(seed: u64, variants: usize, end: CommitEnd) -> Result<Tally, String> {
    let mut rng = Xorshift::new(seed);
    let (initial, gens) = build_three(&mut rng).await?;
    let log: SharedLog = Arc::default();
    let file = |i: usize| -> NodeRef {
        Arc::new(TaggedLogFilter::new(
            Arc::new(MemNode::with_data(initial[i].clone())),
            log.clone(),
            i,
        ))
    };
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let base = Qcow2::open(file(C_BASE), &OpenOptions::default(), None, None)
        .await
        .map_err(err)?;
    let mid = Qcow2::open(file(C_MID), &ro, Some(base.clone() as NodeRef), None)
        .await
        .map_err(err)?;
    let top = Qcow2::open(
        file(C_TOP),
        &OpenOptions::default(),
        Some(mid.clone() as NodeRef),
        None,
    )
    .await
    .map_err(err)?;
    let mut hist = GuestHistory {
        written: gens.iter().map(|&g| vec![g]).collect(),
        flushes: vec![(0, gens.clone())],
    };
    let mut guest = Guest {
        current: gens,
        next_gen: 4,
    };
    let mut offset = 0;
    while offset < DISK {
        commit_step(&mid, &base, offset).await?;
        offset += STEP;
        if rng.next().is_multiple_of(3) {
            guest.write(&top, &mut rng, &mut hist).await?;
        }
        if rng.next().is_multiple_of(5) {
            guest.flush(&top, &log, &mut hist).await?;
        }
    }
    match end {
        CommitEnd::FlushThenHeader => {
            base.flush().await.map_err(err)?;
            top.set_backing(Some(BASE_NAME), Some("qcow2"))
                .await
                .map_err(err)?;
        }
        CommitEnd::HeaderBeforeFlush => {
            top.set_backing(Some(BASE_NAME), Some("qcow2"))
                .await
                .map_err(err)?;
            base.flush().await.map_err(err)?;
        }
    }
    for w in 0..WRITES_AFTER {
        guest.write(&top, &mut rng, &mut hist).await?;
        if w % 3 == 2 {
            guest.flush(&top, &log, &mut hist).await?;
        }
    }
    let log = log.lock().clone();
    Ok(replay_three(&initial, &log, &hist, variants, seed).await)
}

/// Copy what mid itself allocates in `[offset, offset + STEP)` into base, read through mid.
async fn commit_step(mid: &Arc<Qcow2>, base: &Arc<Qcow2>, offset: u64) -> Result<(), String> {
    let end = (offset + STEP).min(DISK);
    let mut at = offset;
    while at < end {
        let ext = mid.block_status(at, end - at).await.map_err(err)?;
        let n = ext.len.clamp(1, end - at);
        let s = ext.status;
        if s.allocated || s.data || s.zero {
            let data = mid.read(at, IoBuf::zeroed(n as usize)).await.map_err(err)?;
            base.write(at, data, WriteFlags::default())
                .await
                .map_err(err)?;
        }
        at += n;
    }
    Ok(())
}

fn durable_bounds_n<const N: usize>(log: &[(usize, LogEntry)], crash: usize) -> [usize; N] {
    let mut d = [0; N];
    for (f, e) in &log[..crash] {
        if let LogEntry::Flush { covers } = e {
            d[*f] = d[*f].max(*covers);
        }
    }
    d
}

async fn replay_three(
    initial: &[Vec<u8>; 3],
    log: &[(usize, LogEntry)],
    hist: &GuestHistory,
    variants: usize,
    seed: u64,
) -> Tally {
    let mut tally = Tally::default();
    let mut rng = Xorshift::new(seed ^ 0xc0ff);
    let mut durable = initial.clone();
    let mut applied = [0usize; 3];
    let mut checked: [Option<Vec<u8>>; 2] = [None, None];
    let mut crashes = vec![0];
    crashes.extend(
        log.iter()
            .enumerate()
            .filter(|(_, (_, e))| matches!(e, LogEntry::Flush { .. }))
            .map(|(i, _)| i + 1),
    );
    for crash in crashes {
        let bounds: [usize; 3] = durable_bounds_n(log, crash);
        for f in [C_BASE, C_MID, C_TOP] {
            while applied[f] < bounds[f] {
                let (file, e) = &log[applied[f]];
                if *file == f {
                    apply(&mut durable[f], e);
                }
                applied[f] += 1;
            }
        }
        let epoch_end = log[crash..]
            .iter()
            .position(|(_, e)| matches!(e, LogEntry::Flush { .. }))
            .map_or(log.len(), |p| crash + p);
        let volatile: Vec<&(usize, LogEntry)> = (0..epoch_end)
            .filter(|&i| i >= bounds[log[i].0])
            .map(|i| &log[i])
            .filter(|(_, e)| !matches!(e, LogEntry::Flush { .. }))
            .collect();
        for v in 0..variants {
            let mut files = durable.clone();
            if v + 1 == variants {
                volatile.iter().for_each(|(f, e)| apply(&mut files[*f], e));
            } else if !volatile.is_empty() {
                let mut order: Vec<usize> = (0..volatile.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
                }
                let keep = rng.next() % (volatile.len() as u64 + 1);
                for &i in order.iter().take(keep as usize) {
                    let (f, e) = volatile[i];
                    apply(&mut files[*f], e);
                }
            }
            tally.states += 1;
            // base and mid change rarely: check each distinct content once.
            let known = [
                checked[0].as_ref() == Some(&files[C_BASE]),
                checked[1].as_ref() == Some(&files[C_MID]),
            ];
            match verify_three(&files, known, crash, hist).await {
                Err(e) => tally.failures.push(format!(
                    "commit-job seed {seed} durable_end {crash} variant {v}: {e}"
                )),
                Ok(leaks) => {
                    tally.leaks_only += u64::from(leaks);
                    let [b, m, _] = files;
                    checked = [Some(b), Some(m)];
                }
            }
        }
    }
    tally
}

async fn open_ro(node: NodeRef, backing: Option<NodeRef>, name: &str) -> Result<NodeRef, String> {
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let img: NodeRef = Qcow2::open(node, &ro, backing, None)
        .await
        .map_err(|e| format!("open {name}: {e}"))?;
    Ok(img)
}

/// The invariants of one crash state of the commit; `Ok(true)` if a check reported leaks only.
async fn verify_three(
    files: &[Vec<u8>; 3],
    known_good: [bool; 2],
    crash: usize,
    hist: &GuestHistory,
) -> Result<bool, String> {
    let node = |i: usize| -> NodeRef { Arc::new(MemNode::with_data(files[i].clone())) };
    let (base_node, mid_node, top_node) = (node(C_BASE), node(C_MID), node(C_TOP));
    let mut leaks = false;
    if !known_good[0] {
        leaks |= check_file("base", &base_node).await?;
    }
    if !known_good[1] {
        leaks |= check_file("mid", &mid_node).await?;
    }
    leaks |= check_file("top", &top_node).await?;
    let header = read_header(&top_node)
        .await
        .map_err(|e| format!("top header: {e}"))?;
    let named = header.backing_file.clone().unwrap_or_default();
    let base = open_ro(base_node, None, "base").await?;
    let backing = match named.as_str() {
        BASE_NAME => base,
        MID_NAME => open_ro(mid_node, Some(base), "mid").await?,
        other => return Err(format!("top names unexpected backing {other:?}")),
    };
    let img = Qcow2::open(top_node, &OpenOptions::default(), Some(backing), None)
        .await
        .map_err(|e| format!("open top: {e}"))?;
    let view = img
        .read(0, IoBuf::zeroed(DISK as usize))
        .await
        .map_err(|e| format!("read top: {e}"))?;
    let floor = hist
        .flushes
        .iter()
        .rev()
        .find(|(len, _)| *len <= crash)
        .map(|(_, gens)| gens.as_slice());
    for (i, s) in view.chunks(SECTOR).enumerate() {
        let min = floor.map_or(0, |g| g[i]);
        let allowed: Vec<u64> = hist.written[i]
            .iter()
            .copied()
            .filter(|&g| g >= min)
            .collect();
        if let Some(e) = check_sector(s, i as u64, &allowed) {
            return Err(format!("top (over {named}): {e}"));
        }
    }
    Ok(leaks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_bounds_are_per_file() {
        let w = |o| LogEntry::Write {
            offset: o,
            data: vec![1],
        };
        let log = vec![
            (BASE, w(0)),
            (TOP, w(0)),
            (TOP, LogEntry::Flush { covers: 2 }),
            (BASE, w(1)),
        ];
        // A flush of top makes nothing of base durable.
        assert_eq!(durable_bounds(&log, 3), [0, 2]);
        assert_eq!(durable_bounds(&log, 0), [0, 0]);
    }

    /// The replay is sensitive to the order that matters: a header without the backing file
    /// reaching the disk before the copied clusters' L2 entries loses data.
    #[test]
    fn header_before_flush_is_caught() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime");
        // Seeds where a guest flush happens to follow the last copy leave nothing to lose.
        let caught = (1..=8).find(|&seed| {
            let r = rt
                .block_on(run(seed, 6, Completion::HeaderBeforeFlush))
                .expect("scenario runs");
            r.failures.iter().any(|f| f.contains("without backing"))
        });
        assert!(caught.is_some(), "no seed caught the wrong order");
    }

    /// Top naming base before base's copied data is flushed loses mid's data.
    #[test]
    fn commit_header_before_flush_is_caught() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime");
        let caught = (1..=8).find(|&seed| {
            let r = rt
                .block_on(run_commit(seed, 6, CommitEnd::HeaderBeforeFlush))
                .expect("scenario runs");
            r.failures.iter().any(|f| f.contains("over base.qcow2"))
        });
        assert!(caught.is_some(), "no seed caught the wrong order");
    }
}
