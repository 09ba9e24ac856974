//! Dropped write futures: a caller may give up on a write (a timeout, an aborted job) while the
//! I/O engine is still writing its data. The write must still run to the end under its
//! registration, so that a concurrent discard + flush cannot free its host cluster and hand
//! it to another write before the stale data lands there.

mod common;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::future::{Either, select};
use strata_core::mem::MemNode;
use strata_core::{BlockNode, BoxFuture, Extent, IoBuf, NodeRef, Prealloc, WriteFlags, ZeroFlags};
use strata_qcow2::{CreateOptions, OpenOptions, Qcow2};

/// Writes whose data starts with this are held back by [`SlowNode`].
const MAGIC: &[u8; 8] = b"VICTIM!!";
/// How long the engine keeps such a write before it lands.
const HOLD_MS: u64 = 40;

/// A file whose writes complete on a blocking thread, like the thread engine: dropping the
/// caller's future does not stop them. Writes of buffers starting with [`MAGIC`] take
/// [`HOLD_MS`] to land.
#[derive(Debug)]
struct SlowNode {
    inner: Arc<MemNode>,
}

async fn sleep_ms(ms: u64) {
    tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_millis(ms)))
        .await
        .unwrap();
}

impl BlockNode for SlowNode {
    fn driver(&self) -> &'static str {
        "file"
    }
    fn filename(&self) -> String {
        "slow".into()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        let inner = self.inner.clone();
        let hold = buf.len() >= MAGIC.len() && &buf[..MAGIC.len()] == MAGIC;
        let job = tokio::task::spawn_blocking(move || {
            if hold {
                std::thread::sleep(Duration::from_millis(HOLD_MS));
            }
            futures::executor::block_on(inner.write(offset, buf, flags))
        });
        Box::pin(async move { job.await.unwrap() })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        self.inner.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> BoxFuture<'_, ()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        self.inner.block_status(offset, len)
    }
    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        self.inner.truncate(size, prealloc)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn victim_data(seed: u64, len: usize) -> Vec<u8> {
    let mut d = pattern(seed, len);
    d[..MAGIC.len()].copy_from_slice(MAGIC);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_writes_never_clobber_reallocated_clusters() {
    const CS: u64 = 65536;
    const VICTIMS: u64 = 24;
    const OTHERS: u64 = 64;
    let o = CreateOptions {
        size: 16 << 20,
        cluster_size: CS,
        ..Default::default()
    };
    let mem = create_mem(&o, None).await;
    let file: NodeRef = Arc::new(SlowNode { inner: mem.clone() });
    let q: Arc<Qcow2> = Qcow2::open(file, &OpenOptions::default(), None, None)
        .await
        .unwrap();
    // Victim clusters [0, VICTIMS) are allocated, so later writes go to them in place.
    write(&q, 0, &pattern(1, (VICTIMS * CS) as usize)).await;
    q.flush().await.unwrap();

    // Other clusters start at 8 MiB; each is written once, in rounds, after the victims of
    // the round were dropped, discarded and flushed away (so their clusters are free to be
    // reused if nothing holds them).
    let other = |i: u64| (8 << 20) + i * CS;
    let mut expected: Vec<Option<Vec<u8>>> = vec![None; OTHERS as usize];
    let per_round = 4;
    let mut dropped = 0;
    for round in 0..(VICTIMS / per_round) {
        let victims: Vec<u64> = (0..per_round).map(|k| round * per_round + k).collect();
        // Start the victim writes, and drop each future while its data is still held.
        let mut handles = Vec::new();
        for &v in &victims {
            let q = q.clone();
            handles.push(tokio::spawn(async move {
                let w = q.write(
                    v * CS,
                    IoBuf::from_slice(&victim_data(100 + v, CS as usize)),
                    WriteFlags::default(),
                );
                let give_up = Box::pin(sleep_ms(5));
                matches!(select(w, give_up).await, Either::Right(_))
            }));
        }
        for h in handles {
            if h.await.unwrap() {
                dropped += 1;
            }
        }
        // Free the victims' clusters and let a flush apply the refcount decrements.
        for &v in &victims {
            q.discard(v * CS, CS).await.unwrap();
        }
        q.flush().await.unwrap();
        // New allocations, concurrently: with a broken registration they reuse the
        // victims' clusters while the stale data is still on its way.
        let mut writes = Vec::new();
        for k in 0..(OTHERS / (VICTIMS / per_round)) {
            let i = round * (OTHERS / (VICTIMS / per_round)) + k;
            let data = pattern(1000 + i, CS as usize);
            expected[i as usize] = Some(data.clone());
            let q = q.clone();
            writes.push(tokio::spawn(async move {
                q.write(other(i), IoBuf::from_slice(&data), WriteFlags::default())
                    .await
                    .unwrap();
            }));
        }
        for w in writes {
            w.await.unwrap();
        }
        // Let held writes land, then check nothing else was overwritten.
        sleep_ms(HOLD_MS + 20).await;
        for (i, e) in expected.iter().enumerate() {
            if let Some(e) = e {
                let got = read(&q, other(i as u64), CS as usize).await;
                assert!(
                    got == *e,
                    "round {round}: cluster at {:#x} was clobbered",
                    other(i as u64)
                );
            }
        }
    }
    assert!(dropped > 0, "no write future was dropped mid-flight");
    q.close().await.unwrap();
    let expected: Vec<(u64, Vec<u8>)> = expected
        .into_iter()
        .enumerate()
        .filter_map(|(i, e)| Some((other(i as u64), e?)))
        .collect();
    for (off, e) in &expected {
        let got = read(&q, *off, CS as usize).await;
        assert!(got == *e, "cluster at {off:#x} after close");
    }
    drop(q);

    let d = Dir::new();
    let p = d.path("dropped.qcow2");
    save(&mem, &p);
    check_clean(&p);
    let m = load(&p);
    let q = open(&m, true, None, None).await;
    for (off, e) in &expected {
        let got = read(&q, *off, CS as usize).await;
        assert!(got == *e, "cluster at {off:#x} after reopen");
    }
}
