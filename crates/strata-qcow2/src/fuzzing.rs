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

/// Bytes of guest data [`open`] reads at most, and block-status extents it walks at most, so
/// a huge virtual size costs bounded time.
const OPEN_READ_LIMIT: u64 = 4 << 20;
const OPEN_MAP_LIMIT: usize = 4096;

/// Open `data` as a read-only image the way `strata info` does (header first, then the
/// backing and data-file nodes it names, here in-memory stand-ins), then read the guest
/// view in 64 KiB requests and walk its allocation map.
pub fn open(data: &[u8]) {
    use strata_core::IoBuf;

    use crate::node::{OpenOptions, Qcow2};

    futures::executor::block_on(async {
        let file: NodeRef = Arc::new(MemNode::with_data(data.to_vec()));
        let Ok(h) = crate::node::read_header(&file).await else {
            return;
        };
        let backing: Option<NodeRef> = h
            .backing_file
            .as_ref()
            .map(|_| Arc::new(MemNode::with_data(vec![0x5a; 64 << 10])) as NodeRef);
        let data_file: Option<NodeRef> = h
            .has_data_file()
            .then(|| Arc::new(MemNode::with_data(data.to_vec())) as NodeRef);
        let opts = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let Ok(q) = Qcow2::open(file, &opts, backing, data_file).await else {
            return;
        };
        let node: NodeRef = q;
        let size = node.size();
        let mut off = 0;
        while off < size.min(OPEN_READ_LIMIT) {
            let n = (size - off).min(64 << 10);
            if node.read(off, IoBuf::zeroed(n as usize)).await.is_err() {
                break;
            }
            off += n;
        }
        let mut off = 0;
        for _ in 0..OPEN_MAP_LIMIT {
            if off >= size {
                break;
            }
            match node.block_status(off, size - off).await {
                Ok(e) if e.len > 0 => off += e.len,
                _ => break,
            }
        }
    });
}
