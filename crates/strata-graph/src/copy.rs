//! The copy engine: copies the guest view of a source chain (top down to an optional base)
//! into a target node, driven by block status, with zero detection, optional compression
//! and several requests in flight (QEMU's `qemu-img convert` loop: `convert_do_copy`,
//! `convert_iteration_sectors`, `convert_co_do_copy`, `convert_co_write`).
//!
//! One implementation serves convert, commit and rebase (and later the jobs): the caller
//! says what the target already holds ([`TargetInit`]) and the engine skips what it need
//! not write.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::future::try_join_all;
use strata_core::{BoxFuture, Error, ErrorKind, IoBuf, NodeRef, Result, WriteFlags, ZeroFlags};
use tokio::sync::{Mutex, watch};

use crate::sparse;
use crate::status::block_status_above;

/// qemu-img's `IO_BUF_SIZE`: the largest data request (2 MiB).
pub const DEFAULT_CHUNK: usize = 2 << 20;
/// qemu-img's default number of coroutines (`-m`).
pub const DEFAULT_PARALLEL: usize = 8;
/// qemu-img's default sparse size (`-S 4k`).
pub const DEFAULT_MIN_SPARSE: u64 = 4096;
/// Largest zero/skip run handled as one request.
const MAX_ZERO_REQUEST: u64 = 1 << 30;

/// A target that stores whole clusters compressed (qcow2's `write_compressed`).
pub trait CompressedWrite: Send + Sync + fmt::Debug {
    /// Size of one compressed unit; writes are whole, aligned clusters (the image's last
    /// cluster may be short).
    fn cluster_size(&self) -> u64;
    /// Write one cluster compressed at `offset` (the buffer is consumed).
    fn write_compressed(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, ()>;
}

/// [`CompressedWrite`] for a qcow2 target node.
#[derive(Debug, Clone)]
pub struct Qcow2Compressed {
    node: NodeRef,
    cluster_size: u64,
}

impl Qcow2Compressed {
    /// The compressed-write interface of `node`, if it is a qcow2 node.
    pub fn new(node: &NodeRef) -> Option<Qcow2Compressed> {
        let q = node.as_any().downcast_ref::<strata_qcow2::Qcow2>()?;
        Some(Qcow2Compressed {
            node: node.clone(),
            cluster_size: q.header().cluster_size(),
        })
    }
}

impl CompressedWrite for Qcow2Compressed {
    fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn write_compressed(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let q = self
                .node
                .as_any()
                .downcast_ref::<strata_qcow2::Qcow2>()
                .ok_or_else(|| Error::unsupported("compression needs a qcow2 target"))?;
            q.write_compressed(offset, buf).await
        })
    }
}

/// What the target reads before the copy, so that the engine can leave ranges alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetInit {
    /// Nothing known: zero ranges are written as zeroes.
    Unknown,
    /// The target reads zeroes everywhere (a fresh image without backing, or
    /// `--target-is-zero`): zero ranges are skipped.
    Zero,
    /// The target already reads what the source's `base` provides, for the first `len`
    /// bytes, and zeroes after that. Ranges not allocated above base are left alone; zero
    /// ranges are written as zeroes below `len` and skipped past it.
    ///
    /// `convert -B`: base = the source's backing, target = the new overlay, `len` = its
    /// backing's size. Commit: base = the commit base, target = that base node itself,
    /// `len` = `u64::MAX` (every zero range above base must reach it).
    Backing {
        /// Bytes of the target that read from its backing node.
        len: u64,
    },
}

/// Progress callback: `(bytes done, bytes total)`.
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A checkpoint every request passes before it starts: where a job rate-limits the copy
/// and pauses it (the copy engine knows nothing about jobs).
pub trait CopyGate: Send + Sync {
    /// Wait until a request moving `bytes` of data (0 for zero or skipped ranges) may go.
    fn pass(
        &self,
        bytes: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

/// How to copy.
#[derive(Clone)]
pub struct CopyOptions {
    /// The source view stops above this node (it must be in the source's chain).
    pub base: Option<NodeRef>,
    /// What the target holds already.
    pub target_init: TargetInit,
    /// Zero runs in data at least this long become zero writes or holes; 0 = write every
    /// byte, zero ranges included (fully allocated target, `-S 0`).
    pub min_sparse: u64,
    /// Alignment of the target's allocation unit, used to align zero runs (power of two).
    pub alignment: u64,
    /// Write data compressed through this target interface (`-c`).
    pub compress: Option<Arc<dyn CompressedWrite>>,
    /// Requests in flight (`-m`, 1..=16 in qemu-img).
    pub parallel: usize,
    /// Allow writes to complete out of order (`-W`).
    pub out_of_order: bool,
    /// Largest data request in bytes.
    pub chunk_size: usize,
    /// Bytes to copy; `None` = the source's size.
    pub len: Option<u64>,
    /// Called after each request with the bytes done so far and the total.
    pub progress: Option<ProgressFn>,
    /// Set to stop the copy; it then fails with [`ErrorKind::Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Passed before every request (rate limit, pause).
    pub gate: Option<Arc<dyn CopyGate>>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            base: None,
            target_init: TargetInit::Unknown,
            min_sparse: DEFAULT_MIN_SPARSE,
            alignment: 4096,
            compress: None,
            parallel: DEFAULT_PARALLEL,
            out_of_order: false,
            chunk_size: DEFAULT_CHUNK,
            len: None,
            progress: None,
            cancel: None,
            gate: None,
        }
    }
}

impl fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyOptions")
            .field("base", &self.base.as_ref().map(|b| b.filename()))
            .field("target_init", &self.target_init)
            .field("min_sparse", &self.min_sparse)
            .field("alignment", &self.alignment)
            .field("compress", &self.compress.is_some())
            .field("parallel", &self.parallel)
            .field("out_of_order", &self.out_of_order)
            .field("chunk_size", &self.chunk_size)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written as data (before compression).
    pub bytes_written: u64,
    /// Bytes made zero with write-zeroes requests.
    pub bytes_zeroed: u64,
    /// Bytes left alone (already zero, or provided by the target's backing).
    pub bytes_skipped: u64,
}

/// Contexts [`copy_image`] puts before an error, each followed by a byte offset and ": ".
const STATUS_CTX: &str = "error while reading block status at offset ";
const READ_CTX: &str = "error while reading at byte ";
const WRITE_CTX: &str = "error while writing at byte ";

/// What a failed [`copy_image`] was doing, and at which byte of the source (the start of the
/// chunk, as qemu-img reports it), so callers can word the failure like qemu-img does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFailure {
    /// Asking the source's block status.
    BlockStatus(u64),
    /// Reading the source.
    Read(u64),
    /// Writing (data or zeroes) to the target.
    Write(u64),
}

impl CopyFailure {
    /// The step an error of [`copy_image`] failed in and the error's own message (without
    /// the step's context); `None` for errors from outside the data path (bad options).
    pub fn of(e: &Error) -> Option<(CopyFailure, &str)> {
        let msg = e.message();
        [
            (
                STATUS_CTX,
                CopyFailure::BlockStatus as fn(u64) -> CopyFailure,
            ),
            (READ_CTX, CopyFailure::Read),
            (WRITE_CTX, CopyFailure::Write),
        ]
        .into_iter()
        .find_map(|(ctx, step)| {
            let (at, detail) = msg.strip_prefix(ctx)?.split_once(": ")?;
            Some((step(at.parse().ok()?), detail))
        })
    }
}

/// How a planned range is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Read from the source and write.
    Data,
    /// Reads as zeroes: write zeroes unless the target already reads them.
    Zero,
    /// Leave the target alone.
    Skip,
}

/// The shared cursor: the next range to copy and the current block-status answer.
struct Planner {
    offset: u64,
    status_end: u64,
    kind: Kind,
    seq: u64,
}

/// One request handed to a worker.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    seq: u64,
    offset: u64,
    len: u64,
    kind: Kind,
}

struct Engine {
    source: NodeRef,
    target: NodeRef,
    opts: CopyOptions,
    size: u64,
    planner: Mutex<Planner>,
    /// Sequence number of the next chunk allowed to write (in-order mode).
    written: watch::Sender<u64>,
    failed: AtomicBool,
    /// The first error: what the copy reports, whichever worker notices the stop first.
    first_error: std::sync::Mutex<Option<Error>>,
    done: AtomicU64,
    read: AtomicU64,
    wrote: AtomicU64,
    zeroed: AtomicU64,
    skipped: AtomicU64,
}

/// Copy the guest view of `source` (down to `opts.base`) into `target`.
pub async fn copy_image(
    source: &NodeRef,
    target: &NodeRef,
    opts: &CopyOptions,
) -> Result<CopyStats> {
    let size = opts.len.unwrap_or_else(|| source.size());
    if target.size() < size {
        return Err(Error::invalid(format!(
            "target is smaller ({} bytes) than the {size} bytes to copy",
            target.size()
        )));
    }
    if !opts.alignment.is_power_of_two() || opts.chunk_size == 0 {
        return Err(Error::invalid("copy alignment must be a power of two"));
    }
    let mut chunk = opts.chunk_size as u64;
    if let Some(c) = &opts.compress {
        let cs = c.cluster_size();
        if cs == 0 || !cs.is_power_of_two() {
            return Err(Error::invalid(
                "compressed cluster size must be a power of two",
            ));
        }
        chunk = chunk.max(cs).next_multiple_of(cs);
    }
    let (written, _) = watch::channel(0u64);
    let engine = Arc::new(Engine {
        source: source.clone(),
        target: target.clone(),
        opts: opts.clone(),
        size,
        planner: Mutex::new(Planner {
            offset: 0,
            status_end: 0,
            kind: Kind::Data,
            seq: 0,
        }),
        written,
        failed: AtomicBool::new(false),
        first_error: std::sync::Mutex::new(None),
        done: AtomicU64::new(0),
        read: AtomicU64::new(0),
        wrote: AtomicU64::new(0),
        zeroed: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
    });
    let workers = opts.parallel.max(1);
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        // Workers as tasks, so zero detection and request setup run on every core; the
        // set aborts them if this future is dropped.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let e = engine.clone();
            set.spawn(async move { e.worker(chunk as usize).await });
        }
        while let Some(r) = set.join_next().await {
            let r = r.map_err(|e| {
                Error::new(ErrorKind::Io(libc::EIO), format!("copy worker failed: {e}"))
            });
            if let Err(e) = r.and_then(|r| r) {
                return Err(engine.first_error().unwrap_or(e));
            }
        }
    } else if let Err(e) = try_join_all((0..workers).map(|_| engine.worker(chunk as usize))).await {
        return Err(engine.first_error().unwrap_or(e));
    }
    Ok(CopyStats {
        bytes_read: engine.read.load(Ordering::Relaxed),
        bytes_written: engine.wrote.load(Ordering::Relaxed),
        bytes_zeroed: engine.zeroed.load(Ordering::Relaxed),
        bytes_skipped: engine.skipped.load(Ordering::Relaxed),
    })
}

impl Engine {
    /// Classify a block-status answer (QEMU's `BLK_DATA` / `BLK_ZERO` / `BLK_BACKING_FILE`).
    fn classify(&self, offset: u64, allocated: bool, data: bool, zero: bool) -> Kind {
        let backing_len = match self.opts.target_init {
            TargetInit::Backing { len } => Some(len),
            _ => None,
        };
        if zero {
            match backing_len {
                // Past the target's backing the target reads zeroes already.
                Some(len) if offset >= len => Kind::Skip,
                _ => Kind::Zero,
            }
        } else if data || allocated {
            Kind::Data
        } else if backing_len.is_some() {
            Kind::Skip
        } else {
            Kind::Data
        }
    }

    /// Take the next range to copy, asking block status when the last answer is used up.
    async fn next(&self, chunk: u64) -> Result<Option<Chunk>> {
        let mut p = self.planner.lock().await;
        if p.offset >= self.size {
            return Ok(None);
        }
        let offset = p.offset;
        let mut limit = self.size;
        if let TargetInit::Backing { len } = self.opts.target_init {
            // Zeroes are handled differently on each side of the target's backing end.
            if offset < len {
                limit = limit.min(len);
            }
        }
        if p.status_end <= offset {
            let want = (limit - offset).min(MAX_ZERO_REQUEST);
            let ext = block_status_above(&self.source, self.opts.base.as_ref(), offset, want)
                .await
                .map_err(|e| e.context(format!("{STATUS_CTX}{offset}")))?;
            let st = ext.status;
            p.kind = self.classify(offset, st.allocated, st.data, st.zero);
            p.status_end = offset + ext.len.clamp(1, want);
        }
        let mut kind = p.kind;
        let mut len = p.status_end.min(limit) - offset;
        if self.opts.min_sparse == 0 && kind == Kind::Zero {
            // Fully allocated target: zeroes are written as data.
            kind = Kind::Data;
        }
        if kind == Kind::Data {
            len = len.min(chunk);
        }
        if let Some(c) = &self.opts.compress {
            // Compressed clusters are written whole.
            let cs = c.cluster_size();
            if len < cs {
                len = cs.min(self.size - offset);
                kind = Kind::Data;
            } else {
                len -= len % cs;
            }
        }
        p.offset = offset + len;
        let seq = p.seq;
        p.seq += 1;
        Ok(Some(Chunk {
            seq,
            offset,
            len,
            kind,
        }))
    }

    fn cancelled(&self) -> bool {
        self.opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    async fn worker(&self, chunk: usize) -> Result<()> {
        let mut buf = IoBuf::zeroed(0);
        loop {
            if self.failed.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.cancelled() {
                return Err(self.fail(Error::new(ErrorKind::Cancelled, "Operation cancelled")));
            }
            let c = match self.next(chunk as u64).await {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fail(e)),
            };
            if let Some(g) = &self.opts.gate {
                g.pass(if c.kind == Kind::Data { c.len } else { 0 }).await;
                if self.cancelled() {
                    return Err(self.fail(Error::new(ErrorKind::Cancelled, "Operation cancelled")));
                }
            }
            // Compressed writes consume their buffers; allocate again when that happened.
            if buf.len() < chunk && c.kind == Kind::Data {
                buf = IoBuf::zeroed(chunk);
            }
            match self.copy_chunk(c, buf).await {
                Ok(b) => buf = b,
                Err(e) => return Err(self.fail(e)),
            }
            let done = self.done.fetch_add(c.len, Ordering::AcqRel) + c.len;
            if let Some(p) = &self.opts.progress {
                p(done, self.size);
            }
        }
    }

    fn first_error(&self) -> Option<Error> {
        self.first_error.lock().unwrap().clone()
    }

    /// Record a failure and wake writers waiting for their turn.
    fn fail(&self, e: Error) -> Error {
        self.first_error
            .lock()
            .unwrap()
            .get_or_insert_with(|| e.clone());
        self.failed.store(true, Ordering::Release);
        self.written.send_modify(|_| {});
        e
    }

    async fn copy_chunk(&self, c: Chunk, mut buf: IoBuf) -> Result<IoBuf> {
        let mut data = None;
        if c.kind == Kind::Data {
            let tail = buf.split_off(c.len as usize);
            let mut view = std::mem::replace(&mut buf, tail);
            if self.opts.min_sparse == 0 && self.is_zero_range(c.offset, c.len).await? {
                view.fill(0);
            } else {
                view = self
                    .source
                    .read(c.offset, view)
                    .await
                    .map_err(|e| e.context(format!("{READ_CTX}{}", c.offset)))?;
                self.read.fetch_add(c.len, Ordering::Relaxed);
            }
            data = Some(view);
        }
        if !self.opts.out_of_order {
            self.wait_turn(c.seq).await?;
        }
        match data {
            Some(view) => {
                let mut view = self.write_data(c.offset, view).await?;
                view.unsplit(buf);
                buf = view;
            }
            None if c.kind == Kind::Zero => self.write_zero(c.offset, c.len).await?,
            None => {
                self.skipped.fetch_add(c.len, Ordering::Relaxed);
            }
        }
        if !self.opts.out_of_order {
            self.written.send_modify(|n| *n += 1);
        }
        Ok(buf)
    }

    /// In-order mode: wait until every earlier chunk is written.
    async fn wait_turn(&self, seq: u64) -> Result<()> {
        let mut rx = self.written.subscribe();
        let failed = &self.failed;
        rx.wait_for(|&next| next == seq || failed.load(Ordering::Acquire))
            .await
            .map_err(|_| Error::new(ErrorKind::Cancelled, "copy writers gone"))?;
        if failed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Cancelled,
                "copy stopped by an earlier error",
            ));
        }
        Ok(())
    }

    /// Whether the range is a zero range of the source (so `-S 0` need not read it).
    async fn is_zero_range(&self, offset: u64, len: u64) -> Result<bool> {
        let ext = block_status_above(&self.source, self.opts.base.as_ref(), offset, len).await?;
        Ok(ext.status.zero && ext.len >= len)
    }

    /// Zero `[offset, offset + len)` on the target unless it reads zeroes already.
    async fn write_zero(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_target(offset, len)
            .await
            .map_err(|e| e.context(format!("{WRITE_CTX}{offset}")))
    }

    /// [`Self::write_zero`] without the error context.
    async fn zero_target(&self, offset: u64, len: u64) -> Result<()> {
        let skip = match self.opts.target_init {
            TargetInit::Zero => true,
            TargetInit::Backing { len: blen } => offset >= blen,
            TargetInit::Unknown => false,
        };
        if skip {
            self.skipped.fetch_add(len, Ordering::Relaxed);
            return Ok(());
        }
        let flags = ZeroFlags {
            may_unmap: true,
            no_fallback: false,
        };
        self.target.write_zeroes(offset, len, flags).await?;
        self.zeroed.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Write a data buffer, turning zero runs into zero writes or holes; returns the buffer.
    async fn write_data(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        if let Some(c) = &self.opts.compress {
            return self.write_compressed(c.as_ref(), offset, buf).await;
        }
        let runs = if self.opts.min_sparse == 0 {
            vec![(true, buf.len())]
        } else {
            sparse::runs(&buf, offset, self.opts.min_sparse, self.opts.alignment)
        };
        let mut rest = buf;
        let mut out = IoBuf::zeroed(0);
        let mut at = offset;
        for (is_data, n) in runs {
            let piece = rest.split_to(n);
            if is_data {
                // Failures name the chunk's start, as qemu-img does.
                let piece = self
                    .target
                    .write(at, piece, WriteFlags::default())
                    .await
                    .map_err(|e| e.context(format!("{WRITE_CTX}{offset}")))?;
                self.wrote.fetch_add(n as u64, Ordering::Relaxed);
                out.unsplit(piece);
            } else {
                self.zero_target(at, n as u64)
                    .await
                    .map_err(|e| e.context(format!("{WRITE_CTX}{offset}")))?;
                out.unsplit(piece);
            }
            at += n as u64;
        }
        out.unsplit(rest);
        Ok(out)
    }

    /// Write whole clusters compressed; all-zero clusters become zeroes or holes. The
    /// buffer is consumed (compressed writes take ownership), so an empty one is returned.
    async fn write_compressed(
        &self,
        c: &dyn CompressedWrite,
        offset: u64,
        buf: IoBuf,
    ) -> Result<IoBuf> {
        let cs = c.cluster_size() as usize;
        let mut rest = buf;
        let mut at = offset;
        while !rest.is_empty() {
            let n = cs.min(rest.len());
            let piece = rest.split_to(n);
            if piece.is_zero() {
                self.write_zero(at, n as u64).await?;
            } else {
                c.write_compressed(at, piece)
                    .await
                    .map_err(|e| e.context(format!("{WRITE_CTX}{at}")))?;
                self.wrote.fetch_add(n as u64, Ordering::Relaxed);
            }
            at += n as u64;
        }
        Ok(IoBuf::zeroed(0))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use strata_core::mem::MemNode;

    use super::*;
    use crate::testing::{FakeNode, Layer, State, chain};

    const M: u64 = 1 << 20;

    #[test]
    fn copy_failures_name_the_step() {
        let e = Error::unsupported("no").context(format!("{WRITE_CTX}65536"));
        assert_eq!(CopyFailure::of(&e), Some((CopyFailure::Write(65536), "no")));
        let e = Error::corrupt("bad: really").context(format!("{READ_CTX}0"));
        assert_eq!(
            CopyFailure::of(&e),
            Some((CopyFailure::Read(0), "bad: really"))
        );
        let e = Error::corrupt("x").context(format!("{STATUS_CTX}512"));
        assert_eq!(
            CopyFailure::of(&e),
            Some((CopyFailure::BlockStatus(512), "x"))
        );
        assert_eq!(CopyFailure::of(&Error::invalid("target is smaller")), None);
    }

    fn three_layers() -> Vec<NodeRef> {
        chain(&[
            Layer::new(4 * M)
                .data(64 << 10, 64 << 10)
                .zero(M, 128 << 10)
                .data_zeroes(2 * M, 256 << 10),
            Layer::new(4 * M)
                .data_with(0, 2 * M, 0x22)
                .zero(3 * M, 64 << 10),
            Layer::new(3 * M).data_with(512 << 10, 3 * M - (512 << 10), 0x33),
        ])
    }

    async fn content(n: &NodeRef) -> Vec<u8> {
        n.read(0, IoBuf::zeroed(n.size() as usize))
            .await
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn chain_to_flat_target_in_every_mode() {
        let c = three_layers();
        let want = content(&c[0]).await;
        for (parallel, out_of_order, min_sparse) in [
            (1, false, 4096),
            (8, false, 4096),
            (8, true, 512),
            (3, true, 0),
        ] {
            let target: NodeRef = Arc::new(MemNode::with_data(vec![0xee; 4 * M as usize]));
            let opts = CopyOptions {
                parallel,
                out_of_order,
                min_sparse,
                chunk_size: 256 << 10,
                ..Default::default()
            };
            let stats = copy_image(&c[0], &target, &opts).await.unwrap();
            assert_eq!(content(&target).await, want, "{opts:?}");
            assert_eq!(
                stats.bytes_written + stats.bytes_zeroed + stats.bytes_skipped,
                4 * M
            );
        }
    }

    #[tokio::test]
    async fn fresh_target_gets_only_data() {
        let c = three_layers();
        let t = Arc::new(FakeNode::new("t", Layer::new(4 * M), None));
        let target: NodeRef = t.clone();
        let opts = CopyOptions {
            target_init: TargetInit::Zero,
            ..Default::default()
        };
        let stats = copy_image(&c[0], &target, &opts).await.unwrap();
        assert_eq!(content(&target).await, content(&c[0]).await);
        assert_eq!(stats.bytes_zeroed, 0);
        let states = t.states();
        let sector = |off: u64| states[(off / 512) as usize];
        assert_eq!(sector(0), State::Data);
        // Zero clusters and all-zero data stay holes.
        assert_eq!(sector(M), State::Unallocated);
        assert_eq!(sector(2 * M + 4096), State::Unallocated);
        assert_eq!(sector(3 * M), State::Unallocated);
    }

    #[tokio::test]
    async fn copy_above_base_leaves_backing_ranges_alone() {
        let c = three_layers();
        // The target's backing is a copy of the source's base (layer 1 and below).
        let t = Arc::new(FakeNode::new("t", Layer::new(4 * M), Some(c[1].clone())));
        let target: NodeRef = t.clone();
        let opts = CopyOptions {
            base: Some(c[1].clone()),
            target_init: TargetInit::Backing { len: 4 * M },
            ..Default::default()
        };
        let stats = copy_image(&c[0], &target, &opts).await.unwrap();
        assert_eq!(content(&target).await, content(&c[0]).await);
        assert_eq!(stats.bytes_read, (64 << 10) + (256 << 10));
        let states = t.states();
        let sector = |off: u64| states[(off / 512) as usize];
        assert_eq!(sector(0), State::Unallocated);
        assert_eq!(sector(64 << 10), State::Data);
        // A zero cluster above base must hide the backing's data.
        assert_eq!(sector(M), State::Zero);
        assert_eq!(sector(2 * M), State::Zero);
    }

    #[derive(Debug, Default)]
    struct Recorder {
        writes: StdMutex<Vec<(u64, usize)>>,
    }

    impl CompressedWrite for Recorder {
        fn cluster_size(&self) -> u64 {
            65536
        }
        fn write_compressed(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, ()> {
            self.writes.lock().unwrap().push((offset, buf.len()));
            Box::pin(async move { Ok(()) })
        }
    }

    #[tokio::test]
    async fn compression_writes_whole_nonzero_clusters() {
        let c = chain(&[Layer::new(M + 4096).data(4096, 512).data(M, 4096)]);
        let rec = Arc::new(Recorder::default());
        let target: NodeRef = Arc::new(MemNode::with_data(vec![0; (M + 4096) as usize]));
        let opts = CopyOptions {
            target_init: TargetInit::Zero,
            compress: Some(rec.clone()),
            ..Default::default()
        };
        copy_image(&c[0], &target, &opts).await.unwrap();
        let mut w = rec.writes.lock().unwrap().clone();
        w.sort();
        assert_eq!(w, vec![(0, 65536), (M, 4096)]);
    }

    #[tokio::test]
    async fn cancel_and_errors_stop_the_copy() {
        let c = three_layers();
        let flag = Arc::new(AtomicBool::new(true));
        let target: NodeRef = Arc::new(MemNode::with_data(vec![0; 4 * M as usize]));
        let opts = CopyOptions {
            cancel: Some(flag),
            ..Default::default()
        };
        let e = copy_image(&c[0], &target, &opts).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cancelled);
        let full: NodeRef = Arc::new(MemNode::with_data(vec![0; 4 * M as usize]).with_limit(4 * M));
        let small: NodeRef = Arc::new(MemNode::with_data(vec![0; M as usize]));
        assert!(
            copy_image(&c[0], &small, &CopyOptions::default())
                .await
                .is_err()
        );
        let done = Arc::new(AtomicU64::new(0));
        let d2 = done.clone();
        let opts = CopyOptions {
            progress: Some(Arc::new(move |d, t| {
                assert_eq!(t, 4 * M);
                d2.store(d, Ordering::Relaxed);
            })),
            ..Default::default()
        };
        copy_image(&c[0], &full, &opts).await.unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 4 * M);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn worker_tasks_copy_and_report_the_first_error() {
        let c = three_layers();
        let want = content(&c[0]).await;
        let target: NodeRef = Arc::new(MemNode::with_data(vec![0xee; 4 * M as usize]));
        let opts = CopyOptions {
            chunk_size: 64 << 10,
            min_sparse: 0,
            ..Default::default()
        };
        copy_image(&c[0], &target, &opts).await.unwrap();
        assert_eq!(content(&target).await, want);
        // A target that fills up: the copy fails with ENOSPC, not with a follow-up error.
        let full: NodeRef = Arc::new(MemNode::new().with_limit(M));
        let t2: NodeRef = Arc::new(TruncatedView(full, 4 * M));
        let e = copy_image(&c[0], &t2, &opts).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    }

    /// Claims a size its inner node cannot reach.
    #[derive(Debug)]
    struct TruncatedView(NodeRef, u64);

    impl strata_core::BlockNode for TruncatedView {
        fn driver(&self) -> &'static str {
            "file"
        }
        fn filename(&self) -> String {
            "view".into()
        }
        fn size(&self) -> u64 {
            self.1
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, o: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
            self.0.read(o, buf)
        }
        fn write(&self, o: u64, buf: IoBuf, f: WriteFlags) -> BoxFuture<'_, IoBuf> {
            self.0.write(o, buf, f)
        }
        fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> BoxFuture<'_, ()> {
            self.0.write_zeroes(o, l, f)
        }
        fn discard(&self, o: u64, l: u64) -> BoxFuture<'_, ()> {
            self.0.discard(o, l)
        }
        fn flush(&self) -> BoxFuture<'_, ()> {
            self.0.flush()
        }
        fn block_status(&self, o: u64, l: u64) -> BoxFuture<'_, strata_core::Extent> {
            self.0.block_status(o, l)
        }
        fn truncate(&self, s: u64, p: strata_core::Prealloc) -> BoxFuture<'_, ()> {
            self.0.truncate(s, p)
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }
}
