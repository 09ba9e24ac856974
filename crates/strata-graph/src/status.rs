//! Block status across a backing chain: which layer provides `[offset, offset + len)` and
//! how (QEMU's `bdrv_co_do_block_status` for one layer and `bdrv_block_status_above` for a
//! chain).

use std::sync::Arc;

use strata_core::{BlockStatus, Error, NodeRef, Result};

/// The answer for the start of a range, looked up through the chain.
#[derive(Debug, Clone)]
pub struct ChainExtent {
    /// Length of the run that shares this answer (at least 1, at most the length asked).
    pub len: u64,
    /// Index of the layer that answered: 0 = the top. For an unallocated run, the last
    /// layer looked at.
    pub depth: usize,
    /// The status as that layer reports it; `allocated` = allocated somewhere above base
    /// (QEMU's `BDRV_BLOCK_ALLOCATED`, "present" in `map`).
    pub status: BlockStatus,
    /// The node that `status.host_offset` points into.
    pub host_node: Option<NodeRef>,
}

/// Whether `a` and `b` are the same node, looking through links and graph nodes.
pub fn same_node(a: &NodeRef, b: &NodeRef) -> bool {
    let (a, b) = (crate::link::driver_of(a), crate::link::driver_of(b));
    std::ptr::addr_eq(Arc::as_ptr(&a), Arc::as_ptr(&b))
}

/// Whether a driver has a notion of backing files: for those, an unallocated range reads
/// from the backing node, or zeroes when there is none (QEMU's `supports_backing`).
fn supports_backing(node: &NodeRef) -> bool {
    node.backing().is_some()
        || !matches!(
            node.driver(),
            "raw" | "file" | "host_device" | "null-co" | "null-aio" | "nbd"
        )
}

/// One layer's status with QEMU's generic rules applied: data or zero implies allocated;
/// an unallocated range of a format with no backing node, or past the end of its backing
/// node, reads as zeroes. `offset` must be below the node's size.
pub async fn layer_status(node: &NodeRef, offset: u64, len: u64) -> Result<ChainExtent> {
    let size = node.size();
    if offset >= size {
        return Err(Error::invalid(format!(
            "block status at offset {offset} past the end of the {size}-byte node"
        )));
    }
    let len = len.min(size - offset);
    let ext = node.block_status(offset, len).await?;
    let mut status = ext.status;
    if status.data {
        status.allocated = true;
    }
    if !status.allocated && !status.data && !status.zero && supports_backing(node) {
        match node.backing() {
            None => status.zero = true,
            Some(b) if offset >= b.size() => status.zero = true,
            Some(_) => {}
        }
    }
    let host_node = match (&ext.host_node, status.host_offset) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(_)) => Some(node.clone()),
        (None, None) => None,
    };
    let mut len = ext.len.clamp(1, len);
    if status.recurse {
        if status.data
            && !status.zero
            && let (Some(host), Some(hn)) = (status.host_offset, &host_node)
            && !Arc::ptr_eq(hn, node)
        {
            len = recurse_into_host(hn, host, len, &mut status).await;
        }
        status.recurse = false;
    }
    Ok(ChainExtent {
        len,
        depth: 0,
        status,
        host_node,
    })
}

/// Refine a data run of `len` bytes stored at `host` in `hn` by what `hn` knows about that
/// range (QEMU's `BDRV_BLOCK_RECURSE` handling in `bdrv_co_do_block_status`): holes there
/// read as zeroes, and so does everything past its end. Returns the length the refined
/// answer holds for. Errors only mean no refinement: the extra information is optional.
async fn recurse_into_host(hn: &NodeRef, host: u64, len: u64, status: &mut BlockStatus) -> u64 {
    let hsize = hn.size();
    if host >= hsize {
        // All past the end of the host node.
        status.zero = true;
        return len;
    }
    let want = len.min(hsize - host);
    let Ok(h) = hn.block_status(host, want).await else {
        return len;
    };
    let n = h.len.clamp(1, want);
    if host + n == hsize && h.status.zero {
        // A hole up to the end of the host node, and nothing stored past it.
        status.zero = true;
        len
    } else {
        status.zero |= h.status.zero;
        n
    }
}

/// Status of `[offset, offset + len)` as read from `top`, looking through backing nodes
/// down to (excluding) `base` (QEMU's `bdrv_block_status_above` with `include_base` false).
///
/// The walk stops at the first layer that allocates the range. A backing node shorter
/// than the range reads zeroes past its end, as if allocated there. When nothing above
/// `base` allocates the range, `status.allocated` is false and `status.zero` says whether
/// it reads as zeroes anyway.
pub async fn block_status_above(
    top: &NodeRef,
    base: Option<&NodeRef>,
    offset: u64,
    len: u64,
) -> Result<ChainExtent> {
    // Compare drivers: the chain is reached through links and graph nodes.
    let is_base = |n: &NodeRef| base.is_some_and(|b| same_node(n, b));
    if is_base(top) {
        return Ok(ChainExtent {
            len,
            depth: 0,
            status: BlockStatus::default(),
            host_node: None,
        });
    }
    let mut ext = layer_status(top, offset, len).await?;
    if ext.status.allocated {
        return Ok(ext);
    }
    let mut bytes = ext.len;
    let mut depth = 0;
    let mut layer = top.backing();
    while let Some(p) = layer {
        if is_base(&p) {
            break;
        }
        depth += 1;
        if offset >= p.size() {
            // The layer above deferred to a shorter one: its zeroes past EOF count as
            // allocated there.
            return Ok(ChainExtent {
                len: bytes,
                depth,
                status: BlockStatus {
                    allocated: true,
                    zero: true,
                    ..Default::default()
                },
                host_node: None,
            });
        }
        ext = layer_status(&p, offset, bytes).await?;
        ext.depth = depth;
        if ext.status.allocated {
            return Ok(ext);
        }
        bytes = ext.len;
        layer = p.backing();
    }
    ext.len = bytes;
    Ok(ext)
}

/// Whether `[offset, offset + len)` of `top` is allocated in some layer above `base`, and
/// for how long the answer holds (QEMU's `bdrv_is_allocated_above`).
pub async fn is_allocated_above(
    top: &NodeRef,
    base: Option<&NodeRef>,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let ext = block_status_above(top, base, offset, len).await?;
    Ok((ext.status.allocated, ext.len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Layer, chain};

    #[tokio::test]
    async fn walks_down_while_unallocated() {
        // base: data everywhere; mid: zero at [64k,128k); top: data at [0,64k).
        let c = chain(&[
            Layer::new(1 << 20).data(0, 65536),
            Layer::new(1 << 20).zero(65536, 65536),
            Layer::new(1 << 20).data(0, 1 << 20),
        ]);
        let top = &c[0];
        let e = block_status_above(top, None, 0, 1 << 20).await.unwrap();
        assert_eq!((e.len, e.depth), (65536, 0));
        assert!(e.status.data && e.status.allocated);
        let e = block_status_above(top, None, 65536, 1 << 20).await.unwrap();
        assert_eq!((e.len, e.depth), (65536, 1));
        assert!(e.status.zero && !e.status.data);
        let e = block_status_above(top, None, 131072, 8192).await.unwrap();
        assert_eq!((e.len, e.depth), (8192, 2));
        // With mid as base, only the top layer counts.
        let e = block_status_above(top, Some(&c[1]), 131072, 8192)
            .await
            .unwrap();
        assert!(!e.status.allocated && !e.status.zero);
        assert_eq!(e.len, 8192);
    }

    #[tokio::test]
    async fn short_backing_reads_zero_past_its_end() {
        let c = chain(&[Layer::new(2 << 20), Layer::new(1 << 20).data(0, 1 << 20)]);
        let e = block_status_above(&c[0], None, 1 << 20, 1 << 20)
            .await
            .unwrap();
        // As in QEMU, the zeroes past the short backing's end count as allocated there.
        assert!(e.status.zero && e.status.allocated);
        assert_eq!((e.depth, e.len), (1, 1 << 20));
        // The top layer alone already knows the range reads as zeroes.
        let e = layer_status(&c[0], 1 << 20, 1 << 20).await.unwrap();
        assert!(e.status.zero && !e.status.allocated);
        let e = layer_status(&c[0], 0, 1 << 20).await.unwrap();
        assert!(!e.status.zero && !e.status.allocated);
    }

    /// A format node whose every byte is data stored at the same offset of `host`, with
    /// `recurse` set as qcow2 does for metadata-preallocated images.
    #[derive(Debug)]
    struct Preallocated {
        host: NodeRef,
        size: u64,
        recurse: bool,
    }

    impl strata_core::BlockNode for Preallocated {
        fn driver(&self) -> &'static str {
            "preallocated"
        }
        fn filename(&self) -> String {
            "preallocated".into()
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read(
            &self,
            _: u64,
            _: strata_core::IoBuf,
        ) -> strata_core::BoxFuture<'_, strata_core::IoBuf> {
            unimplemented!()
        }
        fn write(
            &self,
            _: u64,
            _: strata_core::IoBuf,
            _: strata_core::WriteFlags,
        ) -> strata_core::BoxFuture<'_, strata_core::IoBuf> {
            unimplemented!()
        }
        fn write_zeroes(
            &self,
            _: u64,
            _: u64,
            _: strata_core::ZeroFlags,
        ) -> strata_core::BoxFuture<'_, ()> {
            unimplemented!()
        }
        fn discard(&self, _: u64, _: u64) -> strata_core::BoxFuture<'_, ()> {
            unimplemented!()
        }
        fn flush(&self) -> strata_core::BoxFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn block_status(
            &self,
            offset: u64,
            len: u64,
        ) -> strata_core::BoxFuture<'_, strata_core::Extent> {
            Box::pin(async move {
                Ok(strata_core::Extent {
                    len,
                    status: BlockStatus {
                        allocated: true,
                        data: true,
                        host_offset: Some(offset),
                        recurse: self.recurse,
                        ..Default::default()
                    },
                    host_node: Some(self.host.clone()),
                })
            })
        }
        fn truncate(&self, _: u64, _: strata_core::Prealloc) -> strata_core::BoxFuture<'_, ()> {
            unimplemented!()
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    }

    #[tokio::test]
    async fn recurse_finds_host_holes() {
        const K: u64 = 1024;
        // The host: data, a hole, data, then a hole up to its end at 32k.
        let host = chain(&[Layer::new(32 * K)
            .data(0, 8 * K)
            .zero(8 * K, 8 * K)
            .data(16 * K, 8 * K)
            .zero(24 * K, 8 * K)])
        .remove(0);
        let top: NodeRef = Arc::new(Preallocated {
            host: host.clone(),
            size: 64 * K,
            recurse: true,
        });
        let at = |off: u64| {
            let top = top.clone();
            async move {
                let e = layer_status(&top, off, 64 * K - off).await.unwrap();
                assert!(e.status.data && e.status.allocated && !e.status.recurse);
                assert_eq!(e.status.host_offset, Some(off));
                (e.status.zero, e.len)
            }
        };
        assert_eq!(at(0).await, (false, 8 * K));
        assert_eq!(at(8 * K).await, (true, 8 * K));
        assert_eq!(at(16 * K).await, (false, 8 * K));
        // A hole up to the host's end: all the rest reads as zeroes, past the end too.
        assert_eq!(at(24 * K).await, (true, 40 * K));
        assert_eq!(at(40 * K).await, (true, 24 * K));

        // Without the flag the host is not asked.
        let plain: NodeRef = Arc::new(Preallocated {
            host,
            size: 64 * K,
            recurse: false,
        });
        let e = layer_status(&plain, 8 * K, 8 * K).await.unwrap();
        assert!(e.status.data && !e.status.zero);
        assert_eq!(e.len, 8 * K);
    }

    #[tokio::test]
    async fn unallocated_without_backing_reads_zero() {
        let c = chain(&[Layer::new(1 << 20).data(4096, 4096)]);
        let e = block_status_above(&c[0], None, 0, 1 << 20).await.unwrap();
        assert!(e.status.zero && !e.status.allocated);
        assert_eq!(e.len, 4096);
    }
}
