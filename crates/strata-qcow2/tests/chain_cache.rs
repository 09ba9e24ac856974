//! Reads through a deep chain (served by the overlay's chain mapping cache, which reads host
//! nodes directly) agree with a byte model, also after the layers below the top change:
//! writes, zeroes and discards in a lower layer, a lower layer relinked past another, a
//! lower layer shrunk.

mod common;

use std::sync::Arc;

use common::*;
use strata_core::{BlockNode, IoBuf, NodeRef, Prealloc, ZeroFlags};
use strata_qcow2::{CreateOptions, Qcow2};

const SIZE: u64 = 8 << 20;
const CS: u64 = 64 << 10;

struct Chain {
    layers: Vec<Arc<Qcow2>>,
    model: Vec<u8>,
}

impl Chain {
    fn top(&self) -> &Arc<Qcow2> {
        self.layers.last().unwrap()
    }

    /// The whole guest view, read in uneven pieces.
    async fn view(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIZE as usize);
        let mut off = 0u64;
        let mut step = 3 * 4096 + 512;
        while off < SIZE {
            let n = step.min(SIZE - off);
            out.extend(read(self.top(), off, n as usize).await);
            off += n;
            step = (step * 7 + 4096) % (300 << 10) + 512;
        }
        out
    }

    async fn assert_view(&self, what: &str) {
        let v = self.view().await;
        if let Some(i) = v.iter().zip(&self.model).position(|(a, b)| a != b) {
            panic!("{what}: first difference at byte {i}");
        }
    }
}

fn qcow2_opts(backing: bool) -> CreateOptions {
    let mut o = CreateOptions {
        size: SIZE,
        ..Default::default()
    };
    if backing {
        o.backing_file = Some("below.qcow2".into());
        o.backing_format = Some("qcow2".into());
    }
    o
}

/// A base with data and zero clusters, then `depth` overlays each holding a few clusters
/// (one of them compressed), all writable.
async fn build(depth: usize) -> Chain {
    let mut model = vec![0u8; SIZE as usize];
    let base_mem = create_mem(&qcow2_opts(false), None).await;
    let base = open(&base_mem, false, None, None).await;
    let data = pattern(1, (3 << 20) as usize);
    write(&base, 0, &data).await;
    model[..data.len()].copy_from_slice(&data);
    base.write_zeroes(CS, 2 * CS, ZeroFlags::default())
        .await
        .unwrap();
    model[CS as usize..(3 * CS) as usize].fill(0);
    let mut layers = vec![base];
    for i in 1..=depth {
        let mem = create_mem(&qcow2_opts(true), None).await;
        let below: NodeRef = layers.last().unwrap().clone();
        let q = open(&mem, false, Some(below), None).await;
        let at = (i as u64 * 5 * CS + 4096) % (SIZE - 2 * CS);
        let d = pattern(100 + i as u64, 20 << 10);
        write(&q, at, &d).await;
        model[at as usize..at as usize + d.len()].copy_from_slice(&d);
        if i % 4 == 0 {
            let c = (i as u64 * 3 * CS) % SIZE;
            let d = pattern(200 + i as u64, CS as usize);
            q.write_compressed(c, IoBuf::from_slice(&d)).await.unwrap();
            model[c as usize..(c + CS) as usize].copy_from_slice(&d);
        }
        layers.push(q);
    }
    Chain { layers, model }
}

/// The guest view built layer by layer from each layer's own clusters (never reading
/// through a backing link), leaving out layer `skip`.
async fn layered_view(layers: &[Arc<Qcow2>], skip: Option<usize>) -> Vec<u8> {
    let mut model = vec![0u8; SIZE as usize];
    for (i, q) in layers.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let mut off = 0;
        while off < SIZE {
            let ext = q.block_status(off, SIZE - off).await.unwrap();
            if ext.status.allocated {
                let bytes = read(q, off, ext.len as usize).await;
                model[off as usize..(off + ext.len) as usize].copy_from_slice(&bytes);
            }
            off += ext.len;
        }
    }
    model
}

#[tokio::test]
async fn reads_through_a_deep_chain_match_the_model() {
    let chain = build(40).await;
    assert_eq!(chain.model, layered_view(&chain.layers, None).await);
    chain.assert_view("cold").await;
    chain.assert_view("warm").await;
}

#[tokio::test]
async fn changes_below_the_top_are_seen_at_once() {
    let mut chain = build(12).await;
    chain.assert_view("before").await; // remembers the mappings
    let mid = chain.layers[6].clone();

    // New data in a lower layer where the top read through it (a new allocation there).
    let d = pattern(7, (200 << 10) as usize);
    write(&mid, 2 << 20, &d).await;
    chain.model = layered_view(&chain.layers, None).await;
    assert!(chain.model.windows(d.len()).any(|w| w[..4096] == d[..4096]));
    chain.assert_view("after a lower write").await;

    // Zeroes and a discard below.
    mid.write_zeroes(0, CS, ZeroFlags::default()).await.unwrap();
    chain.layers[3].discard(4 << 20, 4 * CS).await.unwrap();
    chain.model = layered_view(&chain.layers, None).await;
    chain.assert_view("after lower zeroes and a discard").await;

    // A lower layer relinked past its backing (as stream or commit do): layer 5 reads
    // from layer 3 now, so layer 4's clusters vanish from the view.
    let l3: NodeRef = chain.layers[3].clone();
    chain.layers[5].set_backing_link(Some(l3)).unwrap();
    chain.model = layered_view(&chain.layers, Some(4)).await;
    chain.assert_view("after a relink below").await;

    // The base shrinks: what lay beyond reads as zeroes unless a layer above holds it.
    let before = chain.view().await;
    chain.layers[0]
        .truncate(1 << 20, Prealloc::Off)
        .await
        .unwrap();
    let after = chain.view().await;
    assert_ne!(before, after, "the shrink must show");
    chain.layers[0].truncate(SIZE, Prealloc::Off).await.unwrap();
    assert_eq!(chain.view().await, after, "regrown space reads as zeroes");
}
