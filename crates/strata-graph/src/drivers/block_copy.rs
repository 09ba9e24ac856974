//! Block-copy state (QEMU's `block/block-copy.c`): what still has to be copied from a source
//! node to a target node, in clusters, shared by the `copy-before-write` filter (which
//! copies the old data of clusters a guest write is about to change) and the backup job
//! (which copies everything else in the background).
//!
//! The copy bitmap has one bit per cluster; a set bit means "not copied yet". Whoever copies
//! a cluster claims it first (clears its bit and records the range as in flight), so a
//! cluster is copied at most once; a copy that fails puts its bits back. A caller that needs
//! a range copied waits for in-flight copies of other callers that overlap it, then copies
//! what is still dirty itself.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use strata_core::bitmap::DirtyBitmap;
use strata_core::range::{align_down, align_up};
use strata_core::{Error, IoBuf, NodeRef, Result, WriteFlags, ZeroFlags};
use strata_qcow2::Qcow2;
use tokio::sync::Notify;

use crate::copy::{CompressedWrite, Qcow2Compressed};
use crate::link::driver_of;
use crate::status::block_status_above;

/// The smallest cluster block-copy uses (QEMU's `BLOCK_COPY_CLUSTER_SIZE_DEFAULT`).
pub const MIN_CLUSTER: u64 = 64 << 10;

/// The largest buffered copy request when no `max-chunk` is given (QEMU's
/// `BLOCK_COPY_MAX_BUFFER`).
pub const MAX_BUFFER: u64 = 1 << 20;

/// Which side of a copy failed (the job's error policy distinguishes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOp {
    /// Reading the source (or its block status).
    Read,
    /// Writing the target (or discarding the source).
    Write,
}

/// A failed copy: the side and the error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyError {
    /// Read or write side.
    pub op: CopyOp,
    /// What went wrong.
    pub error: Error,
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// Options of a block-copy state.
#[derive(Debug, Clone, Default)]
pub struct BlockCopyOptions {
    /// Lower bound for the cluster size (`min-cluster-size`; 0 = none). Must be a power of
    /// two when non-zero.
    pub min_cluster_size: u64,
    /// Write clusters compressed (the target must be qcow2).
    pub compress: bool,
    /// Discard source clusters once they are copied (`discard-source`).
    pub discard_source: bool,
    /// Largest request (0 = the default buffer size); rounded down to whole clusters.
    pub max_chunk: u64,
    /// Only clusters dirty in this bitmap need copying (all of them when `None`).
    pub bitmap: Option<DirtyBitmap>,
}

#[derive(Debug)]
struct Task {
    id: u64,
    start: u64,
    end: u64,
}

#[derive(Debug)]
struct Inner {
    /// Set = still to be copied.
    bitmap: DirtyBitmap,
    in_flight: Vec<Task>,
    next_id: u64,
}

/// A claimed range: on drop it leaves the in-flight list, and is dirty again unless the
/// copy succeeded.
struct Claim<'a> {
    s: &'a BlockCopyState,
    id: u64,
    o: u64,
    l: u64,
    done: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        {
            let mut g = self.s.inner.lock();
            g.in_flight.retain(|t| t.id != self.id);
            if !self.done {
                g.bitmap.set_range(self.o, self.l);
            }
        }
        self.s.changed.notify_waiters();
    }
}

/// What is left to copy from `source` to `target`, and the copies under way.
pub struct BlockCopyState {
    source: NodeRef,
    target: NodeRef,
    cluster: u64,
    size: u64,
    chunk: u64,
    compress: Option<Qcow2Compressed>,
    discard_source: bool,
    inner: Mutex<Inner>,
    changed: Notify,
    copied: AtomicU64,
}

impl std::fmt::Debug for BlockCopyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCopyState")
            .field("cluster", &self.cluster)
            .field("size", &self.size)
            .field("dirty", &self.dirty_count())
            .finish_non_exhaustive()
    }
}

/// The cluster size a target reports (qcow2's cluster size), if any.
pub fn target_cluster_size(target: &NodeRef) -> Option<u64> {
    let d = driver_of(target);
    d.as_any()
        .downcast_ref::<Qcow2>()
        .map(|q| q.header().cluster_size())
}

/// QEMU's rule: max(min-cluster-size, 64 KiB, the target's cluster size).
pub fn cluster_size_for(target: &NodeRef, min_cluster_size: u64) -> u64 {
    let c = target_cluster_size(target).unwrap_or(MIN_CLUSTER);
    c.max(MIN_CLUSTER).max(min_cluster_size)
}

impl BlockCopyState {
    /// A state copying `source` to `target`: every cluster dirty unless `opts.bitmap`
    /// limits it.
    pub fn new(source: NodeRef, target: NodeRef, opts: BlockCopyOptions) -> Result<Arc<Self>> {
        if opts.min_cluster_size != 0 && !opts.min_cluster_size.is_power_of_two() {
            return Err(Error::invalid("min-cluster-size needs to be a power of 2"));
        }
        let cluster = cluster_size_for(&target, opts.min_cluster_size);
        let size = source.size();
        let compress = if opts.compress {
            let d = driver_of(&target);
            Some(Qcow2Compressed::new(&d).ok_or_else(|| {
                Error::unsupported("Compression is not supported for this target")
            })?)
        } else {
            None
        };
        let chunk = match opts.max_chunk {
            0 => MAX_BUFFER.max(cluster),
            n => align_down(n.max(cluster), cluster),
        };
        let mut bitmap = DirtyBitmap::new(size, cluster);
        match &opts.bitmap {
            Some(b) => {
                for (o, l) in b.extents() {
                    bitmap.set_range(o, l);
                }
            }
            None => bitmap.set_range(0, size),
        }
        Ok(Arc::new(BlockCopyState {
            source,
            target,
            cluster,
            size,
            chunk,
            compress,
            discard_source: opts.discard_source,
            inner: Mutex::new(Inner {
                bitmap,
                in_flight: Vec::new(),
                next_id: 0,
            }),
            changed: Notify::new(),
            copied: AtomicU64::new(0),
        }))
    }

    /// The cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The largest request.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// The source node size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The source node.
    pub fn source(&self) -> &NodeRef {
        &self.source
    }

    /// The target node.
    pub fn target(&self) -> &NodeRef {
        &self.target
    }

    /// Bytes still to copy (in-flight copies excluded).
    pub fn dirty_count(&self) -> u64 {
        self.inner.lock().bitmap.count()
    }

    /// Bytes copied so far (by anyone).
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// A copy of the copy bitmap (set = not copied yet).
    pub fn dirty_bitmap(&self) -> DirtyBitmap {
        self.inner.lock().bitmap.clone()
    }

    /// Replace what is to be copied by the dirty areas of `b` (backup's sync=bitmap) — or
    /// everything when `None`.
    pub fn set_dirty_from(&self, b: Option<&DirtyBitmap>) {
        let mut g = self.inner.lock();
        g.bitmap.clear();
        match b {
            Some(b) => {
                for (o, l) in b.extents() {
                    g.bitmap.set_range(o, l);
                }
            }
            None => {
                let size = self.size;
                g.bitmap.set_range(0, size);
            }
        }
    }

    /// Whether any cluster touching `[offset, offset + len)` is still to be copied.
    pub fn is_dirty(&self, offset: u64, len: u64) -> bool {
        self.inner
            .lock()
            .bitmap
            .next_dirty_area(offset, offset.saturating_add(len), 1)
            .is_some()
    }

    /// Nothing needs copying in the whole clusters of `[offset, offset + len)` any more
    /// (snapshot discard; backup's sync=top for unallocated clusters).
    pub fn reset(&self, offset: u64, len: u64) {
        let start = align_up(offset, self.cluster);
        let end = align_down(offset.saturating_add(len), self.cluster).max(start);
        let end = if offset.saturating_add(len) >= self.size {
            self.size
        } else {
            end
        };
        if end > start {
            self.inner.lock().bitmap.clear_range(start, end - start);
            self.changed.notify_waiters();
        }
    }

    /// The next area still to copy, starting at or after `from`, at most `max` bytes.
    pub fn next_dirty_area(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        self.inner
            .lock()
            .bitmap
            .next_dirty_area(from, self.size, max.max(1))
    }

    /// Make sure every cluster touching `[offset, offset + len)` is on the target: copy
    /// what is still dirty (in chunks) and wait for other callers' copies of the rest. On
    /// error, the failed chunk is dirty again.
    pub async fn copy_range(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        let start = align_down(offset, self.cluster);
        let end = align_up(offset.saturating_add(len), self.cluster).min(self.size);
        if start >= end {
            return Ok(());
        }
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            let claim = {
                let mut g = self.inner.lock();
                match g.bitmap.next_dirty_area(start, end, self.chunk) {
                    Some((o, l)) => {
                        let l = (align_up(o + l, self.cluster).min(self.size)) - o;
                        g.bitmap.clear_range(o, l);
                        g.next_id += 1;
                        let id = g.next_id;
                        g.in_flight.push(Task {
                            id,
                            start: o,
                            end: o + l,
                        });
                        Some((id, o, l))
                    }
                    None => {
                        let busy = g.in_flight.iter().any(|t| t.start < end && start < t.end);
                        if !busy {
                            return Ok(());
                        }
                        None
                    }
                }
            };
            match claim {
                Some((id, o, l)) => self.run_claimed(id, o, l).await?,
                None => changed.await,
            }
        }
    }

    async fn run_claimed(&self, id: u64, o: u64, l: u64) -> Result<(), CopyError> {
        // The guard gives the claim back even when the caller's future is dropped midway,
        // so nobody waits for a copy that will never finish.
        let mut claim = Claim {
            s: self,
            id,
            o,
            l,
            done: false,
        };
        let r = self.do_copy(o, l).await;
        claim.done = r.is_ok();
        drop(claim);
        if r.is_ok() {
            self.copied.fetch_add(l, Ordering::Relaxed);
        }
        r
    }

    /// Copy `[o, o + l)` (claimed): zero runs as write-zeroes, data read and written (or
    /// written compressed cluster by cluster).
    async fn do_copy(&self, o: u64, l: u64) -> Result<(), CopyError> {
        let rd = |error| CopyError {
            op: CopyOp::Read,
            error,
        };
        let wr = |error| CopyError {
            op: CopyOp::Write,
            error,
        };
        let end = o + l;
        let mut pos = o;
        while pos < end {
            let ext = block_status_above(&self.source, None, pos, end - pos)
                .await
                .map_err(rd)?;
            let n = ext.len.clamp(1, end - pos);
            if ext.status.zero && !ext.status.data {
                let flags = ZeroFlags {
                    may_unmap: true,
                    no_fallback: false,
                };
                self.target.write_zeroes(pos, n, flags).await.map_err(wr)?;
            } else {
                let buf = self
                    .source
                    .read(pos, IoBuf::zeroed(n as usize))
                    .await
                    .map_err(rd)?;
                match &self.compress {
                    Some(c) => self.write_compressed(c, pos, buf).await.map_err(wr)?,
                    None => {
                        self.target
                            .write(pos, buf, WriteFlags::default())
                            .await
                            .map_err(wr)?;
                    }
                }
            }
            pos += n;
        }
        if self.discard_source {
            // QEMU ignores discard failures of the source.
            let _ = self.source.discard(o, l).await;
        }
        Ok(())
    }

    async fn write_compressed(&self, c: &Qcow2Compressed, pos: u64, mut buf: IoBuf) -> Result<()> {
        // Block-copy chunks are whole clusters of the target (the cluster size is a multiple
        // of the target's), except a short last cluster; block status may split a chunk in
        // the middle of a target cluster, which then is written plainly.
        let tc = c.cluster_size();
        let mut p = pos;
        while !buf.is_empty() {
            let n = (buf.len() as u64).min(tc - p % tc);
            let part = if n as usize == buf.len() {
                std::mem::replace(&mut buf, IoBuf::zeroed(0))
            } else {
                buf.split_to(n as usize)
            };
            let whole = p.is_multiple_of(tc) && (n == tc || p + n == self.size);
            if whole {
                c.write_compressed(p, part).await?;
            } else {
                self.target.write(p, part, WriteFlags::default()).await?;
            }
            p += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::mem::MemNode;

    fn mem(data: Vec<u8>) -> NodeRef {
        Arc::new(MemNode::with_data(data))
    }

    #[tokio::test]
    async fn copies_each_cluster_once_and_waits_for_others() {
        let size = 1u64 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 | 1).collect();
        let src = mem(data.clone());
        let dst = mem(vec![0; size as usize]);
        let bcs =
            BlockCopyState::new(src.clone(), dst.clone(), BlockCopyOptions::default()).unwrap();
        assert_eq!(bcs.cluster_size(), 65536);
        assert_eq!(bcs.dirty_count(), size);
        let (a, b) = tokio::join!(bcs.copy_range(0, 300_000), bcs.copy_range(100_000, 10));
        a.unwrap();
        b.unwrap();
        assert_eq!(bcs.dirty_count(), size - 5 * 65536);
        assert_eq!(bcs.copied(), 5 * 65536);
        let r = dst.read(0, IoBuf::zeroed(5 * 65536)).await.unwrap();
        assert_eq!(&r[..], &data[..5 * 65536]);
        bcs.reset(5 * 65536 + 1, size);
        assert_eq!(bcs.dirty_count(), 65536);
        bcs.set_dirty_from(None);
        assert_eq!(bcs.dirty_count(), size);
    }
}
