//! Crash consistency: every write to the image file is logged; a "crash" keeps all writes
//! before some flush plus any subset of the writes after it (a write-back cache may persist
//! them in any order). Every such image must pass `qemu-img check` without corruptions
//! (leaked clusters are allowed), which is what the metadata write ordering guarantees, and
//! Strata's next read-write open frees those leaks (the session-open autoclear bit).

mod common;

use std::any::Any;
use std::sync::{Arc, Mutex};

use common::*;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, BoxFuture, Extent, IoBuf, NodeRef, Prealloc, WriteFlags, ZeroFlags};
use strata_qcow2::{CreateOptions, OpenOptions, Qcow2};

#[derive(Debug, Clone)]
enum Ev {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Truncate(u64),
    Flush,
}

#[derive(Debug)]
struct LogNode {
    inner: MemNode,
    log: Mutex<Vec<Ev>>,
}

impl BlockNode for LogNode {
    fn driver(&self) -> &'static str {
        "file"
    }
    fn filename(&self) -> String {
        "log".into()
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
        self.log
            .lock()
            .unwrap()
            .push(Ev::Write(offset, buf.to_vec()));
        self.inner.write(offset, buf, flags)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        self.log.lock().unwrap().push(Ev::Zero(offset, len));
        self.inner.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        // MemNode zero-fills discarded ranges; a crash may or may not keep that.
        let end = (offset + len).min(self.inner.size());
        if offset < end {
            self.log
                .lock()
                .unwrap()
                .push(Ev::Zero(offset, end - offset));
        }
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> BoxFuture<'_, ()> {
        self.log.lock().unwrap().push(Ev::Flush);
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        self.inner.block_status(offset, len)
    }
    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        self.log.lock().unwrap().push(Ev::Truncate(size));
        self.inner.truncate(size, prealloc)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn apply(img: &mut Vec<u8>, ev: &Ev) {
    match ev {
        Ev::Write(off, data) => {
            let end = *off as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].copy_from_slice(data);
        }
        Ev::Zero(off, len) => {
            let end = (*off + *len) as usize;
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*off as usize..end].fill(0);
        }
        Ev::Truncate(size) => img.resize(*size as usize, 0),
        Ev::Flush => {}
    }
}

#[tokio::test]
async fn crash_at_any_point_leaves_no_corruption() {
    let d = Dir::new();
    let (mut checked, mut leaky) = (0, 0);
    for (ci, (cs, ext)) in [(65536u64, false), (4096, false), (32768, true)]
        .into_iter()
        .enumerate()
    {
        let o = CreateOptions {
            size: 8 << 20,
            cluster_size: cs,
            extended_l2: ext,
            ..Default::default()
        };
        let base = create_mem(&o, None).await;
        // A snapshot, so copy-on-write of shared clusters and L2 tables is in the log too.
        let p = d.path("base.qcow2");
        save(&base, &p);
        ok("qemu-io", &["-c", "write -P 9 0 1M", p.to_str().unwrap()]);
        ok("qemu-img", &["snapshot", "-c", "s", p.to_str().unwrap()]);
        let initial = std::fs::read(&p).unwrap();
        let node = Arc::new(LogNode {
            inner: MemNode::with_data(initial.clone()),
            log: Mutex::new(Vec::new()),
        });
        let q = Qcow2::open(
            node.clone() as NodeRef,
            &OpenOptions {
                l2_cache_size: Some(1),
                refcount_cache_size: Some(1),
                ..Default::default()
            },
            None,
            None,
        )
        .await
        .unwrap();
        for k in 0..12u64 {
            let off = (k * 700_001) % (7 << 20);
            write(&q, off, &pattern(k, 100_000)).await;
            if k % 3 == 0 {
                q.discard((k * 300_000) % (6 << 20), 200_000).await.unwrap();
            }
            if k % 4 == 1 {
                q.flush().await.unwrap();
            }
        }
        q.truncate(12 << 20, Prealloc::Off).await.unwrap();
        write(&q, 11 << 20, &pattern(99, 300_000)).await;
        q.truncate(10 << 20, Prealloc::Off).await.unwrap();
        q.close().await.unwrap();

        let log = node.log.lock().unwrap().clone();
        let flushes: Vec<usize> = log
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Ev::Flush))
            .map(|(i, _)| i)
            .collect();
        if std::env::var("CRASH_DEBUG").is_ok() {
            let s: Vec<String> = log
                .iter()
                .map(|e| match e {
                    Ev::Write(o, d) => format!("W{o:#x}+{}", d.len()),
                    Ev::Zero(o, l) => format!("Z{o:#x}+{l}"),
                    Ev::Truncate(n) => format!("T{n}"),
                    Ev::Flush => "F".into(),
                })
                .collect();
            eprintln!("config {ci}: {}", s.join(" "));
        }
        let mut seed = 1u64 + ci as u64;
        let is_meta = |e: &Ev| matches!(e, Ev::Write(o, d) if d.len() as u64 == cs || d.len() <= 512 || o.is_multiple_of(cs) && (d.len() as u64).is_multiple_of(cs) && *o < (1 << 20));
        // Crash points: before the first flush and after each flush; the writes of the next
        // window persist either all but one metadata write, or a random subset.
        let mut starts = vec![0usize];
        starts.extend(flushes.iter().map(|&f| f + 1));
        for (n, &f) in starts.iter().enumerate() {
            let next = starts.get(n + 1).map_or(log.len(), |&s| s - 1);
            if f > next {
                continue;
            }
            let window: Vec<usize> = (f..next).collect();
            let mut subsets: Vec<Vec<usize>> = window
                .iter()
                .filter(|&&i| is_meta(&log[i]))
                .map(|&skip| window.iter().copied().filter(|&i| i != skip).collect())
                .collect();
            subsets.push(
                window
                    .iter()
                    .copied()
                    .filter(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed.is_multiple_of(2)
                    })
                    .collect(),
            );
            for keep in subsets {
                let mut img = initial.clone();
                for e in &log[..f] {
                    apply(&mut img, e);
                }
                for i in keep {
                    apply(&mut img, &log[i]);
                }
                let path = d.path("crash.qcow2");
                std::fs::write(&path, &img).unwrap();
                let (code, out) = run("qemu-img", &["check", path.to_str().unwrap()]);
                assert!(
                    code == 0 || code == 3,
                    "config {ci}, crash in window #{n}: qemu-img check exit {code}:\n{out}"
                );
                if code == 3 {
                    // The session-open bit is set: Strata's next read-write open frees the
                    // leaks the crashed session left.
                    let m = Arc::new(MemNode::with_data(img));
                    let q = open(&m, false, None, None).await;
                    q.close().await.unwrap();
                    save(&m, &path);
                    let (code, out) = run("qemu-img", &["check", path.to_str().unwrap()]);
                    assert_eq!(code, 0, "config {ci}, window #{n}, reopened:\n{out}");
                    leaky += 1;
                }
                checked += 1;
            }
        }
    }
    eprintln!("{checked} crash images checked, {leaky} with leaks repaired by a reopen");
    assert!(checked > 10);
    assert!(leaky > 0, "the crash states exercise the leak repair");
}
