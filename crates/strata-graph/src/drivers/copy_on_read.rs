//! The `copy-on-read` filter (QEMU's `block/copy-on-read.c` with the generic
//! `bdrv_co_do_copy_on_readv`): reads of data that the top image does not hold yet, but a
//! backing layer down to `bottom` (inclusive) does, also write that data into the top
//! image, so later reads are served from it. The stream job uses [`CopyOnReadNode::prefetch`]
//! to pull a range up without needing the data.
//!
//! Copies are made in whole clusters of the top image (only the parts the top image does
//! not allocate), zero data as zero writes, and announce `cor_write` on the way down. A copy
//! never overwrites newer guest data: while a copy of a range is under way, guest writes
//! through this node that overlap it wait, and a copy waits for overlapping guest writes
//! already in flight and then looks again at what the top image holds.

use std::pin::pin;

use parking_lot::Mutex;
use strata_core::buf::is_zero;
use strata_core::range::{align_down, align_up, check_request};
use strata_core::{
    BlockNode, BoxFuture, DebugEvent, Extent, IoBuf, NodeRef, Result, WriteFlags, ZeroFlags,
};
use strata_qcow2::Qcow2;
use tokio::sync::Notify;

use crate::forward_to_child;
use crate::status::{block_status_above, same_node};

/// The most data one copy moves (QEMU bounds its bounce buffer too).
const MAX_COPY: u64 = 16 << 20;

/// One request in flight through the filter.
#[derive(Debug)]
struct Tracked {
    id: u64,
    start: u64,
    end: u64,
    /// A copy-on-read (serialising) rather than a guest write.
    copy: bool,
}

/// The byte ranges in flight: copies exclude everything overlapping them, guest writes
/// exclude only copies.
#[derive(Debug, Default)]
struct Tracker {
    inner: Mutex<(u64, Vec<Tracked>)>,
    changed: Notify,
}

/// Removes its range from the tracker when dropped.
struct RangeGuard<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.tracker.inner.lock().1.retain(|t| t.id != self.id);
        self.tracker.changed.notify_waiters();
    }
}

impl Tracker {
    async fn acquire(&self, start: u64, end: u64, copy: bool) -> RangeGuard<'_> {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            {
                let mut g = self.inner.lock();
                let busy =
                    g.1.iter()
                        .any(|t| t.start < end && start < t.end && (copy || t.copy));
                if !busy {
                    g.0 += 1;
                    let id = g.0;
                    g.1.push(Tracked {
                        id,
                        start,
                        end,
                        copy,
                    });
                    return RangeGuard { tracker: self, id };
                }
            }
            changed.await;
        }
    }
}

/// How the start of a range is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The top image (or nothing below `bottom`) provides it: a plain read.
    Plain,
    /// A layer between the top image and `bottom` provides it: copy it up.
    Copy,
}

/// A `copy-on-read` filter node over `file`.
#[derive(Debug)]
pub struct CopyOnReadNode {
    file: NodeRef,
    bottom: Option<NodeRef>,
    /// Copy granularity: the top image's cluster size (seen through links and graph
    /// nodes), else its request alignment.
    granularity: u64,
    tracker: Tracker,
}

impl CopyOnReadNode {
    /// A filter over `file` that copies data from the backing layers of `file` down to
    /// `bottom` (inclusive; `None` = the whole chain). On a read-only `file` reads pass
    /// through without copying.
    pub fn new(file: NodeRef, bottom: Option<NodeRef>) -> CopyOnReadNode {
        let granularity = crate::link::driver_of(&file)
            .as_any()
            .downcast_ref::<Qcow2>()
            .map_or_else(|| file.request_alignment(), |q| q.header().cluster_size())
            .max(1);
        CopyOnReadNode {
            file,
            bottom,
            granularity,
            tracker: Tracker::default(),
        }
    }

    /// The `bottom` node, if any.
    pub fn bottom(&self) -> Option<&NodeRef> {
        self.bottom.as_ref()
    }

    /// Copy `[offset, offset + len)` into the top image where a layer down to `bottom`
    /// holds it and the top image does not, without returning the data (what the stream
    /// job does). Ranges the top image already allocates are not read at all.
    pub async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        check_request(offset, len, self.size())?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (src, n) = self.classify(pos, end - pos).await?;
            if src == Source::Copy {
                self.copy(pos, n, None).await?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Whether the top image decides the content of a run it reported.
    fn top_allocated(ext: &Extent) -> bool {
        ext.status.allocated || ext.status.data || ext.status.zero
    }

    /// Where the start of `[pos, pos + n)` comes from, and for how many bytes.
    async fn classify(&self, pos: u64, n: u64) -> Result<(Source, u64)> {
        let n = n.min(MAX_COPY);
        let top = self.file.block_status(pos, n).await?;
        let n = top.len.clamp(1, n);
        if Self::top_allocated(&top) || self.file.read_only() {
            return Ok((Source::Plain, n));
        }
        let Some(backing) = self.file.backing() else {
            return Ok((Source::Plain, n));
        };
        if pos >= backing.size() {
            return Ok((Source::Plain, n));
        }
        let n = n.min(backing.size() - pos);
        let base = match &self.bottom {
            Some(b) if same_node(b, &self.file) => return Ok((Source::Plain, n)),
            Some(b) => b.backing(),
            None => None,
        };
        let below = block_status_above(&backing, base.as_ref(), pos, n).await?;
        let n = below.len.clamp(1, n);
        let src = if below.status.allocated {
            Source::Copy
        } else {
            Source::Plain
        };
        Ok((src, n))
    }

    /// Copy the clusters around `[pos, pos + n)` into the top image (the parts it does not
    /// allocate) and, with `out`, fill it with the data of `[pos, pos + n)`.
    async fn copy(&self, pos: u64, n: u64, out: Option<&mut IoBuf>) -> Result<()> {
        let size = self.file.size();
        let start = align_down(pos, self.granularity);
        let end = align_up(pos + n, self.granularity).min(size);
        let _guard = self.tracker.acquire(start, end, true).await;
        let data = self
            .file
            .read(start, IoBuf::zeroed((end - start) as usize))
            .await?;
        let mut p = start;
        while p < end {
            let ext = self.file.block_status(p, end - p).await?;
            let l = ext.len.clamp(1, end - p);
            if !Self::top_allocated(&ext) {
                let part = &data[(p - start) as usize..(p - start + l) as usize];
                self.file.debug_event(DebugEvent::CorWrite);
                if is_zero(part) {
                    self.file.write_zeroes(p, l, ZeroFlags::default()).await?;
                } else {
                    self.file
                        .write(p, IoBuf::from_slice(part), WriteFlags::default())
                        .await?;
                }
            }
            p += l;
        }
        if let Some(out) = out {
            let at = (pos - start) as usize;
            out.copy_from_slice(&data[at..at + n as usize]);
        }
        Ok(())
    }

    async fn cor_read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        check_request(offset, len, self.size())?;
        if len == 0 {
            return Ok(buf);
        }
        let end = offset + len;
        let mut rest = buf;
        let mut parts = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (src, n) = self.classify(pos, end - pos).await?;
            let mut chunk = if pos + n == end {
                std::mem::replace(&mut rest, IoBuf::zeroed(0))
            } else {
                rest.split_to(n as usize)
            };
            match src {
                Source::Copy => self.copy(pos, n, Some(&mut chunk)).await?,
                Source::Plain => chunk = self.file.read(pos, chunk).await?,
            }
            parts.push(chunk);
            pos += n;
        }
        Ok(IoBuf::join(parts))
    }
}

impl BlockNode for CopyOnReadNode {
    fn driver(&self) -> &'static str {
        "copy-on-read"
    }

    // `backing` too: a chain walk from above (a backup reading through this filter, block
    // status for zero detection) must see the layers below the filtered node.
    forward_to_child!(file =>
        filename, size, read_only, request_alignment, flush, block_status, truncate, backing,
        file, debug_event, allocated_size, close, as_any,
    );

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(self.cor_read(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let end = offset.saturating_add(buf.len() as u64);
            let _guard = self.tracker.acquire(offset, end, false).await;
            self.file.write(offset, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _guard = self
                .tracker
                .acquire(offset, offset.saturating_add(len), false)
                .await;
            self.file.write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _guard = self
                .tracker
                .acquire(offset, offset.saturating_add(len), false)
                .await;
            self.file.discard(offset, len).await
        })
    }
}
