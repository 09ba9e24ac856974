//! Entry points shared by the fuzz targets (`/fuzz`) and the corpus replay test: each takes
//! arbitrary bytes and must return without panicking, hanging or allocating without bound.

use std::sync::Arc;

use strata_core::NodeRef;
use strata_core::mem::MemNode;

use crate::check::{self as ck, RepairMode};
use crate::compress::{CompressionType, decompress_cluster};
use crate::header::Header;

/// Parse `data` as an image header.
pub fn header(data: &[u8]) {
    let _ = Header::parse(data);
}

/// Run `check` on `data` as an image file: plain, then `-r all` on a copy, then a plain
/// check of the repaired copy.
pub fn check(data: &[u8]) {
    futures::executor::block_on(async {
        let node: NodeRef = Arc::new(MemNode::with_data(data.to_vec()));
        if ck::check(&node, None).await.is_err() {
            return;
        }
        let node: NodeRef = Arc::new(MemNode::with_data(data.to_vec()));
        let _ = ck::check(&node, Some(RepairMode::All)).await;
        let _ = ck::check(&node, None).await;
    });
}

/// Decompress `data[2..]` into a cluster: byte 0 picks the algorithm, byte 1 the cluster size
/// (512 B to 2 MiB).
pub fn decompress(data: &[u8]) {
    let [kind, bits, rest @ ..] = data else {
        return;
    };
    let kind = if kind & 1 == 0 {
        CompressionType::Zlib
    } else {
        CompressionType::Zstd
    };
    let cs = 1usize << (9 + u32::from(*bits) % 13);
    let mut out = vec![0u8; cs];
    let _ = decompress_cluster(kind, rest, &mut out);
}
