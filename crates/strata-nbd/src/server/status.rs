//! Block status as a guest sees an export: the walk down the backing chain behind
//! `base:allocation`, `qemu:allocation-depth` and sparse reads, and the per-context extent
//! lists of `NBD_CMD_BLOCK_STATUS`.

use strata_core::{NodeRef, Result};

use super::export::ContextKind;
use crate::proto::{self, Descriptor};

/// How the guest view of an export stores the start of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestExtent {
    /// Bytes the answer covers (at least 1).
    pub len: u64,
    /// Data is stored somewhere in the chain (otherwise a hole).
    pub data: bool,
    /// Reads are known to return zeroes.
    pub zero: bool,
    /// The layer that decides the content: 0 none (reads as zero), 1 the exported node, 2
    /// its backing node, ...
    pub depth: u32,
}

impl GuestExtent {
    /// The `base:allocation` flags.
    pub fn allocation_flags(&self) -> u32 {
        let mut f = 0;
        if !self.data {
            f |= proto::STATE_HOLE;
        }
        if self.zero {
            f |= proto::STATE_ZERO;
        }
        f
    }
}

/// Block status of `[offset, offset + len)` of `node` as the guest sees it: a range a layer
/// does not allocate falls through to its backing node; a range no layer allocates (or past
/// the end of a shorter backing node) reads as zeroes at depth 0. `len` must be at least 1
/// and the range inside the node.
pub async fn guest_status(node: &NodeRef, offset: u64, len: u64) -> Result<GuestExtent> {
    let mut cur = NodeRef::clone(node);
    let mut depth = 1u32;
    let mut len = len.max(1);
    loop {
        let size = cur.size();
        if offset >= size {
            return Ok(GuestExtent {
                len,
                data: false,
                zero: true,
                depth: 0,
            });
        }
        len = len.min(size - offset);
        let ext = cur.block_status(offset, len).await?;
        let mut n = ext.len.clamp(1, len);
        if ext.status.allocated {
            let mut zero = ext.status.zero;
            // A coarse answer (metadata preallocation): the host file knows where it is
            // sparse.
            if ext.status.recurse
                && ext.status.data
                && !zero
                && let (Some(h), Some(ho)) = (&ext.host_node, ext.status.host_offset)
                && ho < h.size()
            {
                let m = n.min(h.size() - ho);
                let inner = h.block_status(ho, m).await?;
                if inner.status.zero {
                    zero = true;
                    n = inner.len.clamp(1, m);
                }
            }
            return Ok(GuestExtent {
                len: n,
                data: ext.status.data,
                zero,
                depth,
            });
        }
        match cur.backing() {
            Some(b) => {
                cur = b;
                depth += 1;
                len = n;
            }
            None => {
                return Ok(GuestExtent {
                    len: n,
                    data: false,
                    zero: true,
                    depth: 0,
                });
            }
        }
    }
}

/// Builds the run-length descriptors of one context, merging equal neighbours.
pub(crate) struct Runs {
    pub(crate) runs: Vec<Descriptor>,
    max: usize,
}

impl Runs {
    pub(crate) fn new(max: usize) -> Self {
        Runs {
            runs: Vec::new(),
            max: max.max(1),
        }
    }

    pub(crate) fn push(&mut self, len: u64, flags: u64) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.runs.last_mut()
            && last.flags == flags
        {
            last.len += len;
            return;
        }
        self.runs.push(Descriptor { len, flags });
    }

    /// Whether more input cannot change the first `max` runs.
    pub(crate) fn full(&self) -> bool {
        self.runs.len() > self.max
    }

    pub(crate) fn finish(mut self, cap: u64) -> Vec<Descriptor> {
        self.runs.truncate(self.max);
        for d in &mut self.runs {
            d.len = d.len.min(cap);
        }
        self.runs
    }
}

/// Extents of every context in `kinds` for `[offset, offset + len)`, at most `max` per
/// context, lengths capped at `cap` (`u32::MAX` without extended headers).
pub(crate) async fn context_extents(
    node: &NodeRef,
    kinds: &[ContextKind],
    offset: u64,
    len: u64,
    max: usize,
    cap: u64,
) -> Result<Vec<Vec<Descriptor>>> {
    let mut runs: Vec<Runs> = kinds.iter().map(|_| Runs::new(max)).collect();
    let walks = kinds.iter().any(|k| {
        matches!(
            k,
            ContextKind::BaseAllocation | ContextKind::AllocationDepth
        )
    });
    if walks {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let g = guest_status(node, pos, end - pos).await?;
            let n = g.len.min(end - pos);
            let mut all_full = true;
            for (k, r) in kinds.iter().zip(runs.iter_mut()) {
                match k {
                    ContextKind::BaseAllocation => r.push(n, g.allocation_flags().into()),
                    ContextKind::AllocationDepth => r.push(n, g.depth.into()),
                    ContextKind::Dirty(_) => continue,
                }
                all_full &= r.full();
            }
            pos += n;
            if all_full {
                break;
            }
        }
    }
    for (k, r) in kinds.iter().zip(runs.iter_mut()) {
        if let ContextKind::Dirty(src) = k {
            let mut covered = 0u64;
            for (l, dirty) in src.dirty_extents(offset, len) {
                let l = l.min(len - covered);
                r.push(l, if dirty { proto::STATE_DIRTY.into() } else { 0 });
                covered += l;
                if covered >= len || r.full() {
                    break;
                }
            }
            if r.runs.is_empty() {
                // A source that answered nothing: report the range clean.
                r.push(len, 0);
            }
        }
    }
    Ok(runs.into_iter().map(|r| r.finish(cap)).collect())
}
