//! The data half of a safe `rebase`: before an image's backing file changes from `old` to
//! `new`, copy into the image every range it does not allocate itself and where the two
//! backing views differ, so that its guest view stays the same (QEMU's `img_rebase`).
//! Rewriting the header's backing name is the format driver's job (`set_backing`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use strata_core::range::align_down;
use strata_core::{Error, ErrorKind, IoBuf, NodeRef, Result, WriteFlags, ZeroFlags};

use crate::copy::{CopyStats, ProgressFn};
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
}

impl Default for RebaseOptions {
    fn default() -> Self {
        RebaseOptions {
            write_align: 65536,
            common_base: None,
            progress: None,
            cancel: None,
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
            .finish_non_exhaustive()
    }
}

/// Read `len` bytes of `node` at `offset`; past its end (or with no node) zeroes.
async fn read_view(node: Option<&NodeRef>, offset: u64, len: u64) -> Result<IoBuf> {
    let mut buf = IoBuf::zeroed(len as usize);
    let Some(n) = node else { return Ok(buf) };
    let size = n.size();
    if offset >= size {
        return Ok(buf);
    }
    let avail = (size - offset).min(len) as usize;
    let tail = buf.split_off(avail);
    let mut head = n.read(offset, buf).await?;
    head.unsplit(tail);
    Ok(head)
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
    let align = opts.write_align;
    if !align.is_power_of_two() {
        return Err(Error::invalid(
            "rebase write alignment must be a power of two",
        ));
    }
    let size = image.size();
    let old_size = old.map_or(0, |o| o.size());
    let mut stats = CopyStats::default();
    let mut offset = 0;
    while offset < size {
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
            stats.bytes_skipped += n;
            offset += n;
            continue;
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
                stats.bytes_skipped += e.len;
                offset += e.len;
                continue;
            }
            n = n.min(e.len);
        }
        let (buf_old, buf_new) =
            futures::try_join!(read_view(old, offset, n), read_view(new, offset, n))?;
        stats.bytes_read += 2 * n;
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
            let at = offset + done;
            if differs {
                if at >= old_size {
                    image.write_zeroes(at, run, ZeroFlags::default()).await?;
                    stats.bytes_zeroed += run;
                } else {
                    let piece = IoBuf::from_slice(&buf_old[done as usize..(done + run) as usize]);
                    image.write(at, piece, WriteFlags::default()).await?;
                    stats.bytes_written += run;
                }
            } else {
                stats.bytes_skipped += run;
            }
            done += run;
        }
        offset += n;
        if let Some(p) = &opts.progress {
            p(offset, size);
        }
    }
    Ok(stats)
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
}
