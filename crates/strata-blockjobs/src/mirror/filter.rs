//! The `mirror_top` filter QEMU inserts above a mirror's source (and an active commit's top):
//! every write through it marks the job's dirty bitmap, or — in write-blocking mode — is
//! also written to the target before it completes ("active mirroring").
//!
//! In write-blocking mode a data write goes to the source and the target at the same time
//! (the target gets a copy of the buffer): the guest waits for the slower of the two, not
//! for their sum. Only writes overlapping a range with a copy operation in flight wait
//! for it first.
//!
//! The filter also carries the job's *drain gate*: every request holds it shared, and the
//! job takes it exclusively for the final synchronisation, so no guest write slips in
//! between the last copy and the pivot (QEMU keeps the source drained for that span).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use strata_core::{
    BlockNode, BoxFuture, DirtyBitmap, IoBuf, NodeRef, Prealloc, Result, WriteFlags, ZeroFlags,
};
use strata_graph::Link;
use strata_graph::forward_to_child;
use strata_job::JobContext;
use strata_job::error_policy::{ErrorAction, IoOperation, OnError};
use strata_job::meter::Meter;
use tokio::sync::{Notify, OwnedRwLockWriteGuard, RwLock};

/// State shared by the job's copy loop and its filter.
pub(crate) struct MirrorState {
    /// Bytes per dirty bit.
    pub granularity: u64,
    /// What still differs between source and target.
    pub dirty: Mutex<DirtyBitmap>,
    /// Granule-aligned ranges with an operation in flight (copy op or active write); no
    /// two overlap.
    pub in_flight: Mutex<Vec<(u64, u64)>>,
    /// Bytes of background copy operations in flight.
    pub copy_bytes_in_flight: AtomicU64,
    /// Bytes of active (write-blocking) target writes in flight.
    pub active_bytes_in_flight: AtomicU64,
    /// Signalled when new data gets dirty (wakes the copy loop).
    pub changed: Notify,
    /// Signalled when an in-flight range ends (wakes writes waiting for it). Apart from
    /// `changed` so a busy guest does not wake the copy loop on every write.
    pub range_freed: Notify,
    /// Copy mode write-blocking.
    pub write_blocking: AtomicBool,
    /// Target known to be in sync and kept in sync by active writes.
    pub actively_synced: AtomicBool,
    /// The job is over: the filter passes everything through.
    pub stopped: AtomicBool,
    /// An active write failed with `report`: the job must fail with this errno.
    pub failed: Mutex<Option<i32>>,
    /// The job's target (through its own link).
    pub target: NodeRef,
    /// The filter's child link (the source), which the job also reads through.
    pub source: Arc<Link>,
    /// The drain gate (see the module docs).
    pub gate: Arc<RwLock<()>>,
    /// The exclusive hold of the gate from the final sync until the graph change.
    pub drained: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
    /// The job's context, for progress and the error policy.
    pub ctx: Mutex<Option<JobContext>>,
    /// Error policy for target writes.
    pub on_target_error: OnError,
    /// Bytes newly marked dirty by writes through the filter (the work guests create).
    pub dirtied_bytes: AtomicU64,
    /// Bytes written to the target, by copy operations and active writes alike.
    pub copied_bytes: AtomicU64,
    /// The job has been READY (it stays mirroring afterwards).
    pub ready: AtomicBool,
    /// Rates behind the `dirty-rate`, `copy-rate` and `convergence` extension members.
    pub meters: Mutex<MirrorMeters>,
}

/// Sliding-window meters of a mirror job (see [`Meter`]).
#[derive(Default)]
pub(crate) struct MirrorMeters {
    /// Of `dirtied_bytes`.
    pub dirtied: Meter,
    /// Of `copied_bytes`.
    pub copied: Meter,
    /// Of the bytes still to copy (dirty + in flight): falling means converging.
    pub remaining: Meter,
}

impl MirrorState {
    /// Register `[off, end)` once no in-flight range overlaps it.
    pub(crate) async fn acquire_range(&self, off: u64, end: u64) {
        loop {
            let notified = self.range_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut f = self.in_flight.lock();
                if !f.iter().any(|&(a, b)| a < end && off < b) {
                    f.push((off, end));
                    return;
                }
            }
            notified.await;
        }
    }

    pub(crate) fn release_range(&self, off: u64, end: u64) {
        let mut f = self.in_flight.lock();
        if let Some(i) = f.iter().position(|&r| r == (off, end)) {
            f.swap_remove(i);
        }
        drop(f);
        self.range_freed.notify_waiters();
    }

    pub(crate) fn mark_dirty(&self, off: u64, len: u64) {
        {
            let mut d = self.dirty.lock();
            let before = d.count();
            d.set_range(off, len);
            let new = d.count().saturating_sub(before);
            self.dirtied_bytes.fetch_add(new, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }

    /// Bytes still to copy: dirty, or in flight in a background copy operation.
    pub(crate) fn remaining(&self) -> u64 {
        self.dirty.lock().count() + self.copy_bytes_in_flight.load(Ordering::Relaxed)
    }

    /// Samples the meters (cheap; called every copy-loop turn and every query).
    pub(crate) fn sample_meters(&self) {
        let now = std::time::Instant::now();
        let remaining = self.remaining();
        let mut m = self.meters.lock();
        m.dirtied
            .record(now, self.dirtied_bytes.load(Ordering::Relaxed));
        m.copied
            .record(now, self.copied_bytes.load(Ordering::Relaxed));
        m.remaining.record(now, remaining);
    }

    /// total = done + dirty + in flight.
    pub(crate) fn update_progress(&self) {
        if let Some(ctx) = self.ctx.lock().as_ref() {
            let (cur, _) = ctx.progress();
            let rest = self.dirty.lock().count()
                + self.copy_bytes_in_flight.load(Ordering::Relaxed)
                + self.active_bytes_in_flight.load(Ordering::Relaxed);
            ctx.progress_set_total(cur + rest);
        }
    }

    fn ctx(&self) -> Option<JobContext> {
        self.ctx.lock().clone()
    }

    /// An active write: write the source, then the target (QEMU's
    /// `bdrv_mirror_top_do_write` + `do_sync_target_write`).
    async fn active_write(&self, offset: u64, len: u64, op: WriteOp) -> Result<Option<IoBuf>> {
        let g = self.granularity;
        let size = self.source.size();
        let a_off = offset / g * g;
        let a_end = (offset + len)
            .next_multiple_of(g)
            .min(size.next_multiple_of(g));
        self.acquire_range(a_off, a_end).await;
        let r = match op.apply(&*self.source, offset, len).await {
            Ok(()) => self.sync_target(offset, len, op, None).await,
            Err(e) => Err(e),
        };
        self.release_range(a_off, a_end);
        r
    }

    /// The source took the write; copy it to the target while the range is held.
    async fn sync_target(
        &self,
        offset: u64,
        len: u64,
        op: WriteOp,
        buf: Option<IoBuf>,
    ) -> Result<Option<IoBuf>> {
        // The job may have stopped while we waited for a conflicting operation.
        if self.stopped.load(Ordering::Acquire) || self.failed.lock().is_some() {
            self.mark_dirty(offset, len);
            return Ok(buf);
        }
        let g = self.granularity;
        let inner_off = offset.next_multiple_of(g);
        let end = offset + len;
        let size = self.source.size();
        let inner_end = if end == size { end } else { end / g * g };
        {
            let mut d = self.dirty.lock();
            if inner_end > inner_off {
                d.clear_range(inner_off, inner_end - inner_off);
            }
            // Partly written granules keep their bit: the target takes exactly the bytes the
            // source takes, so a clean granule stays in sync and a dirty one still needs the
            // background copy. (Marking them dirty would turn every 4 KiB guest write into
            // a granule of background work and keep a busy disk from ever converging.)
        }
        self.active_bytes_in_flight
            .fetch_add(len, Ordering::Relaxed);
        let ctx = self.ctx();
        if let Some(c) = &ctx {
            c.progress_add_total(len);
        }
        let (buf, res) = match op {
            WriteOp::Write(flags) => {
                let b = buf.expect("a write carries its buffer");
                match self.target.write(offset, b, flags).await {
                    Ok(b) => (Some(b), Ok(())),
                    Err(e) => (None, Err(e)),
                }
            }
            WriteOp::Zero(flags) => (None, self.target.write_zeroes(offset, len, flags).await),
            WriteOp::Discard => (None, self.target.discard(offset, len).await),
        };
        self.active_bytes_in_flight
            .fetch_sub(len, Ordering::Relaxed);
        match res {
            Ok(()) => {
                self.copied_bytes.fetch_add(len, Ordering::Relaxed);
                if let Some(c) = &ctx {
                    c.progress_update(len);
                }
            }
            Err(e) => {
                self.actively_synced.store(false, Ordering::Release);
                self.mark_dirty(offset, len);
                if let Some(c) = &ctx {
                    let errno = e.kind().errno();
                    if c.handle_error(self.on_target_error, IoOperation::Write, errno)
                        == ErrorAction::Report
                    {
                        self.failed.lock().get_or_insert(errno);
                    }
                }
            }
        }
        self.update_progress();
        // A guest write completes with the source's result; a copy that failed only costs
        // the job its sync (and, with `report`, the job itself).
        Ok(buf)
    }
}

/// One kind of write request.
#[derive(Clone, Copy)]
enum WriteOp {
    /// A data write (its buffer travels separately).
    Write(WriteFlags),
    Zero(ZeroFlags),
    Discard,
}

impl WriteOp {
    /// Apply a zero or discard request to `node` (data writes are issued by the caller).
    async fn apply(self, node: &dyn BlockNode, offset: u64, len: u64) -> Result<()> {
        match self {
            WriteOp::Write(_) => Ok(()),
            WriteOp::Zero(f) => node.write_zeroes(offset, len, f).await,
            WriteOp::Discard => node.discard(offset, len).await,
        }
    }
}

/// The `mirror_top` driver.
pub(crate) struct MirrorTop {
    pub state: Arc<MirrorState>,
}

impl std::fmt::Debug for MirrorTop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorTop").finish_non_exhaustive()
    }
}

impl MirrorTop {
    fn below(&self) -> &Link {
        &self.state.source
    }

    fn copying(&self) -> bool {
        let s = &self.state;
        s.write_blocking.load(Ordering::Acquire)
            && !s.stopped.load(Ordering::Acquire)
            && s.failed.lock().is_none()
    }

    /// After a write of the source in background mode (or while the job stops).
    fn after_write(&self, offset: u64, len: u64) {
        let s = &self.state;
        if !s.stopped.load(Ordering::Acquire) {
            s.actively_synced.store(false, Ordering::Release);
            s.mark_dirty(offset, len);
        }
    }

    async fn do_write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let _pass = self.state.gate.read().await;
        let len = buf.len() as u64;
        if self.copying() {
            let s = &self.state;
            let g = s.granularity;
            let size = s.source.size();
            let a_off = offset / g * g;
            let a_end = (offset + len)
                .next_multiple_of(g)
                .min(size.next_multiple_of(g));
            s.acquire_range(a_off, a_end).await;
            // The source and the target take the write at the same time; the guest gets
            // the source's result. If the source fails, whatever the target took is
            // overwritten from the source later (the range is dirty again).
            let copy = IoBuf::from_slice(&buf);
            let (r, _) = tokio::join!(
                self.below().write(offset, buf, flags),
                s.sync_target(offset, len, WriteOp::Write(flags), Some(copy)),
            );
            if r.is_err() {
                s.mark_dirty(offset, len);
            }
            s.release_range(a_off, a_end);
            return r;
        }
        let r = self.below().write(offset, buf, flags).await;
        self.after_write(offset, len);
        r
    }

    async fn do_zero_or_discard(
        &self,
        offset: u64,
        len: u64,
        zero: Option<ZeroFlags>,
    ) -> Result<()> {
        let _pass = self.state.gate.read().await;
        let op = match zero {
            Some(f) => WriteOp::Zero(f),
            None => WriteOp::Discard,
        };
        if self.copying() {
            return self.state.active_write(offset, len, op).await.map(|_| ());
        }
        let r = op.apply(self.below(), offset, len).await;
        self.after_write(offset, len);
        r
    }
}

impl BlockNode for MirrorTop {
    fn driver(&self) -> &'static str {
        "mirror_top"
    }

    forward_to_child!(state.source =>
        filename, size, read_only, request_alignment, block_status, backing, file, debug_event,
        as_any,
    );

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let _pass = self.state.gate.read().await;
            self.below().read(offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(self.do_write(offset, buf, flags))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(self.do_zero_or_discard(offset, len, Some(flags)))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(self.do_zero_or_discard(offset, len, None))
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _pass = self.state.gate.read().await;
            self.below().flush().await
        })
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _pass = self.state.gate.read().await;
            self.below().truncate(size, prealloc).await
        })
    }

    // The graph drops the filter; the node below stays open.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
