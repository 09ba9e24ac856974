//! The data half of a safe `rebase`: before an image's backing file changes from `old` to
//! `new`, copy into the image every range it does not allocate itself and where the two
//! backing views differ, so that its guest view stays the same (QEMU's `img_rebase`).
//! Rewriting the header's backing name is the format driver's job (`set_backing`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use strata_core::range::align_down;
use strata_core::{Error, ErrorKind, IoBuf, NodeRef, Result, WriteFlags, ZeroFlags};

use crate::copy::{CompressedWrite, CopyStats, ProgressFn};
use crate::status::{block_status_above, layer_status};

/// qemu-img's `IO_BUF_SIZE`.
const CHUNK: u64 = 2 << 20;

/// How to rebase.
#[derive(Clone)]
pub struct RebaseOptions {
    /// The image's allocation unit (its cluster size): differences are written in whole
    /// units, so no partial cluster is left for copy-on-write to fill from the new backing.
    pub write_align: u64,
    /// When the new backing node is itself in the old chain, that node: ranges that no
    /// layer between the old backing and it allocates are equal on both sides and skipped.
    pub common_base: Option<NodeRef>,
    /// Called with `(bytes done, total)`.
    pub progress: Option<ProgressFn>,
    /// Set to stop; the rebase then fails with [`ErrorKind::Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Write the copied data compressed through this interface (`rebase -c`): whole,
    /// aligned clusters go compressed, any other piece as a plain write. `write_align`
    /// should then be the cluster size.
    pub compress: Option<Arc<dyn CompressedWrite>>,
}

impl Default for RebaseOptions {
    fn default() -> Self {
        RebaseOptions {
            write_align: 65536,
            common_base: None,
            progress: None,
            cancel: None,
            compress: None,
        }
    }
}

impl std::fmt::Debug for RebaseOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RebaseOptions")
            .field("write_align", &self.write_align)
            .field(
                "common_base",
                &self.common_base.as_ref().map(|b| b.filename()),
            )
            .field("compress", &self.compress.is_some())
            .finish_non_exhaustive()
    }
}

/// Read `len` bytes of `node` at `offset` into the front of `buf` (at least `len` bytes,
/// reused from chunk to chunk so that no chunk pays for a fresh zeroed allocation); past the
/// node's end (or with no node) zeroes. Returns the whole buffer.
async fn read_view(node: Option<&NodeRef>, offset: u64, len: u64, mut buf: IoBuf) -> Result<IoBuf> {
    let size = node.map_or(0, |n| n.size());
    let avail = if offset >= size {
        0
    } else {
        (size - offset).min(len) as usize
    };
    let mut rest = buf.split_off(avail);
    rest[..len as usize - avail].fill(0);
    if let Some(n) = node.filter(|_| avail > 0) {
        buf = n.read(offset, buf).await?;
    }
    buf.unsplit(rest);
    Ok(buf)
}

/// Ranges compared at the same time: the reads of the next ranges overlap the comparison
/// and the writes of this one (a cold cache makes rebase wait for reads, not for the CPU).
const PARALLEL: usize = 4;

/// One step of the rebase, in offset order.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// Leave `[offset, offset + len)` alone.
    Skip(u64, u64),
    /// Compare the two backing views over `[offset, offset + len)` and copy the differences.
    Compare(u64, u64),
}

/// Copy into `image` what changes when its backing view goes from `old` to `new` (either
/// may be `None`: no backing, reads zeroes). `image`'s own allocation is looked at in its
/// top layer only.
pub async fn rebase_data(
    image: &NodeRef,
    old: Option<&NodeRef>,
    new: Option<&NodeRef>,
    opts: &RebaseOptions,
) -> Result<CopyStats> {
    use futures::TryStreamExt;

    let align = opts.write_align;
    if !align.is_power_of_two() {
        return Err(Error::invalid(
            "rebase write alignment must be a power of two",
        ));
    }
    let size = image.size();
    let old_size = old.map_or(0, |o| o.size());
    // Read buffers, reused from range to range (a fresh zeroed 2 MiB buffer per read costs
    // a memset and page faults).
    let pool: std::sync::Mutex<Vec<(IoBuf, IoBuf)>> = std::sync::Mutex::new(Vec::new());

    // Decide range by range (metadata only) what to do.
    let plan = futures::stream::try_unfold(0u64, |offset| async move {
        if offset >= size {
            return Ok(None);
        }
        if opts
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Err(Error::new(ErrorKind::Cancelled, "Operation cancelled"));
        }
        let mut n = CHUNK.min(size - offset);
        // Only the image's own layer: what it allocates stays as it is.
        let own = layer_status(image, offset, n).await?;
        n = own.len;
        if own.status.allocated {
            return Ok(Some((Job::Skip(offset, n), offset + n)));
        }
        // End the range on an allocation unit when that keeps it non-empty, so the next
        // range starts aligned.
        let end = align_down(offset + n, align);
        if end > offset {
            n = end - offset;
        }
        if let (Some(o), Some(cb)) = (old, opts.common_base.as_ref())
            && offset < old_size
        {
            let e = block_status_above(o, Some(cb), offset, n.min(old_size - offset)).await?;
            if !e.status.allocated {
                return Ok(Some((Job::Skip(offset, e.len), offset + e.len)));
            }
            n = n.min(e.len);
        }
        Ok(Some((Job::Compare(offset, n), offset + n)))
    });

    let pool = &pool;
    let run_job = |job: Job| async move {
        let mut stats = CopyStats::default();
        let (offset, n) = match job {
            Job::Skip(offset, n) => {
                stats.bytes_skipped = n;
                return Ok((offset + n, stats));
            }
            Job::Compare(offset, n) => (offset, n),
        };
        let bufs = pool.lock().unwrap().pop();
        let (buf_old, buf_new) =
            bufs.unwrap_or_else(|| (IoBuf::zeroed(CHUNK as usize), IoBuf::zeroed(CHUNK as usize)));
        let (mut buf_old, buf_new) = futures::try_join!(
            read_view(old, offset, n, buf_old),
            read_view(new, offset, n, buf_new)
        )?;
        stats.bytes_read += 2 * n;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut done = 0u64;
        while done < n {
            // A run of whole units that all differ or all match (QEMU's compare_buffers).
            let unit = |at: u64| {
                let a = at as usize;
                let b = (at + align - (offset + at) % align).min(n) as usize;
                buf_old[a..b] != buf_new[a..b]
            };
            let differs = unit(done);
            let mut run = done;
            while run < n && unit(run) == differs {
                run += align - (offset + run) % align;
            }
            let run = run.min(n) - done;
            runs.push((done, run, differs));
            done += run;
        }
        for &(done, run, differs) in &runs {
            let at = offset + done;
            if !differs {
                stats.bytes_skipped += run;
            } else if at >= old_size {
                image.write_zeroes(at, run, ZeroFlags::default()).await?;
                stats.bytes_zeroed += run;
            } else if let Some(c) = &opts.compress {
                write_compressed(
                    image,
                    c.as_ref(),
                    at,
                    &buf_old[done as usize..(done + run) as usize],
                )
                .await?;
                stats.bytes_written += run;
            } else {
                // Write the old view's bytes straight from the read buffer (a view of it).
                let mut piece = buf_old.split_off(done as usize);
                let tail = piece.split_off(run as usize);
                let piece = image.write(at, piece, WriteFlags::default()).await?;
                buf_old.unsplit(piece);
                buf_old.unsplit(tail);
                stats.bytes_written += run;
            }
        }
        pool.lock().unwrap().push((buf_old, buf_new));
        Ok::<_, Error>((offset + n, stats))
    };

    let mut stats = CopyStats::default();
    plan.map_ok(run_job)
        .try_buffered(PARALLEL)
        .try_for_each(|(end, s)| {
            stats.bytes_read += s.bytes_read;
            stats.bytes_written += s.bytes_written;
            stats.bytes_zeroed += s.bytes_zeroed;
            stats.bytes_skipped += s.bytes_skipped;
            if let Some(p) = &opts.progress {
                p(end, size);
            }
            futures::future::ready(Ok(()))
        })
        .await?;
    Ok(stats)
}

/// Write `data` at `offset` of `image`: each whole, aligned cluster (or the image's short
/// last one) compressed through `c`, anything else plain.
async fn write_compressed(
    image: &NodeRef,
    c: &dyn CompressedWrite,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    let cs = c.cluster_size();
    let end = offset + data.len() as u64;
    let mut at = offset;
    while at < end {
        let next = (align_down(at, cs) + cs).min(end);
        let piece = IoBuf::from_slice(&data[(at - offset) as usize..(next - offset) as usize]);
        if at.is_multiple_of(cs) && (next - at == cs || next == image.size()) {
            c.write_compressed(at, piece).await?;
        } else {
            image.write(at, piece, WriteFlags::default()).await?;
        }
        at = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use strata_core::BlockNode;

    use super::*;
    use crate::testing::{FakeNode, Layer, chain};

    const K: u64 = 1024;

    #[tokio::test]
    async fn only_differing_unallocated_units_are_written() {
        // old chain: mid (data at [0,64k)) <- base (data at [64k,256k)).
        let old = chain(&[
            Layer::new(512 * K).data_with(0, 64 * K, 0x10),
            Layer::new(512 * K).data_with(64 * K, 192 * K, 0x20),
        ]);
        // new backing: equal to base in [64k,128k), different in [128k,192k) (zeroes).
        let new = chain(&[Layer::new(512 * K).data_with(64 * K, 64 * K, 0x20)]);
        let img = Arc::new(FakeNode::new(
            "img",
            Layer::new(512 * K).data_with(0, 4 * K, 0x30),
            Some(old[0].clone()),
        ));
        let before = img.read(0, IoBuf::zeroed(512 * K as usize)).await.unwrap();
        let image: NodeRef = img.clone();
        let opts = RebaseOptions::default();
        let stats = rebase_data(&image, Some(&old[0]), Some(&new[0]), &opts)
            .await
            .unwrap();
        // [0,64k) partially own, but the unit is unallocated past 4k: old has mid's data,
        // new has zeroes -> written; [64k,128k) equal; [128k,256k) differs -> written.
        assert_eq!(stats.bytes_written, 60 * K + 128 * K, "{stats:?}");
        // Now the image reads the same over the new backing.
        let over_new = Arc::new(FakeNode::new(
            "img2",
            Layer::new(512 * K),
            Some(new[0].clone()),
        ));
        let on_new: NodeRef = over_new.clone();
        let mut pos = 0;
        while pos < 512 * K {
            let e = image.block_status(pos, 512 * K - pos).await.unwrap();
            if e.status.allocated {
                let b = image
                    .read(pos, IoBuf::zeroed(e.len as usize))
                    .await
                    .unwrap();
                on_new.write(pos, b, WriteFlags::default()).await.unwrap();
            }
            pos += e.len;
        }
        let after = on_new
            .read(0, IoBuf::zeroed(512 * K as usize))
            .await
            .unwrap();
        assert!(before[..] == after[..]);
    }

    #[derive(Debug, Default)]
    struct Recorder {
        writes: std::sync::Mutex<Vec<(u64, usize)>>,
    }

    impl CompressedWrite for Recorder {
        fn cluster_size(&self) -> u64 {
            64 * K
        }
        fn write_compressed(&self, offset: u64, buf: IoBuf) -> strata_core::BoxFuture<'_, ()> {
            self.writes.lock().unwrap().push((offset, buf.len()));
            Box::pin(async move { Ok(()) })
        }
    }

    #[tokio::test]
    async fn compress_writes_whole_clusters_compressed_and_the_rest_plain() {
        // old: data in [0, 200k); new: none; image owns [0, 4k).
        let old = chain(&[Layer::new(256 * K).data_with(0, 200 * K, 0x20)]);
        let img = Arc::new(FakeNode::new(
            "img",
            Layer::new(256 * K).data_with(0, 4 * K, 0x30),
            Some(old[0].clone()),
        ));
        let image: NodeRef = img.clone();
        let rec = Arc::new(Recorder::default());
        let opts = RebaseOptions {
            compress: Some(rec.clone()),
            ..Default::default()
        };
        let stats = rebase_data(&image, Some(&old[0]), None, &opts)
            .await
            .unwrap();
        assert_eq!(stats.bytes_written, 252 * K, "{stats:?}");
        let mut w = rec.writes.lock().unwrap().clone();
        w.sort();
        let c = 64 * K as usize;
        assert_eq!(w, vec![(64 * K, c), (128 * K, c), (192 * K, c)]);
        // The partial first cluster went in as a plain write.
        let e = image.block_status(0, 64 * K).await.unwrap();
        assert!(e.status.allocated && e.len == 64 * K, "{e:?}");
    }
}
