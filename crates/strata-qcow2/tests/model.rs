//! Property test: random writes, zero writes, discards, resizes, flushes and reopens against
//! an in-memory model with a backing node; the result must pass `qemu-img check` and read
//! the same through QEMU.

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use strata_core::mem::MemNode;
use strata_core::{BlockNode, NodeRef, Prealloc, ZeroFlags};
use strata_qcow2::CreateOptions;

const BACKING: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Resize(u64),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let off = 0u64..(3 << 20);
    let len = prop_oneof![1u64..600, 512u64..70_000, 60_000u64..300_000];
    prop_oneof![
        5 => (off.clone(), len.clone(), any::<u64>()).prop_map(|(o, l, s)| Op::Write(o, l, s)),
        2 => (off.clone(), len.clone(), any::<bool>()).prop_map(|(o, l, u)| Op::Zero(o, l, u)),
        2 => (off, len).prop_map(|(o, l)| Op::Discard(o, l)),
        1 => ((BACKING / 512)..(3 << 20) / 512).prop_map(|s| Op::Resize(s * 512)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct Config {
    cluster: u64,
    v3: bool,
    extended: bool,
    refcount_bits: u32,
    lazy: bool,
    /// Smallest caches, so eviction and write-back ordering get exercised.
    tiny_cache: bool,
}

fn config() -> impl Strategy<Value = Config> {
    let base = prop_oneof![
        Just((65536, true, false, 16, false)),
        Just((4096, true, false, 1, false)),
        Just((512, true, false, 64, true)),
        Just((65536, false, false, 16, false)),
        Just((32768, true, true, 16, false)),
    ];
    (base, any::<bool>()).prop_map(
        |((cluster, v3, extended, refcount_bits, lazy), tiny_cache)| Config {
            cluster,
            v3,
            extended,
            refcount_bits,
            lazy,
            tiny_cache,
        },
    )
}

async fn open_cfg(
    m: &Arc<MemNode>,
    cfg: &Config,
    backing: Option<NodeRef>,
) -> Arc<strata_qcow2::Qcow2> {
    let opts = strata_qcow2::OpenOptions {
        read_only: false,
        l2_cache_size: cfg.tiny_cache.then_some(1),
        refcount_cache_size: cfg.tiny_cache.then_some(1),
    };
    strata_qcow2::Qcow2::open(m.clone(), &opts, backing, None)
        .await
        .unwrap()
}

async fn scenario(cfg: Config, ops: Vec<Op>, with_backing: bool) {
    let d = Dir::new();
    let backing_bytes = pattern(77, BACKING as usize);
    std::fs::write(d.path("back.raw"), &backing_bytes).unwrap();
    let backing: Option<NodeRef> =
        with_backing.then(|| Arc::new(MemNode::read_only(backing_bytes.clone())) as NodeRef);
    let size0 = 2 << 20;
    let o = CreateOptions {
        size: size0,
        cluster_size: cfg.cluster,
        compat_v3: cfg.v3,
        extended_l2: cfg.extended,
        refcount_bits: cfg.refcount_bits,
        lazy_refcounts: cfg.lazy,
        backing_file: with_backing.then(|| "back.raw".to_string()),
        backing_format: with_backing.then(|| "raw".to_string()),
        ..Default::default()
    };
    let m = create_mem(&o, None).await;
    let mut q = open_cfg(&m, &cfg, backing.clone()).await;
    let mut model = vec![0u8; size0 as usize];
    if with_backing {
        model[..BACKING as usize].copy_from_slice(&backing_bytes);
    }
    let cs = cfg.cluster;
    for op in ops {
        let size = model.len() as u64;
        match op {
            Op::Write(off, len, seed) => {
                let off = off % size;
                let len = len.min(size - off);
                let data = pattern(seed, len as usize);
                write(&q, off, &data).await;
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero(off, len, unmap) => {
                let off = off % size;
                let len = len.min(size - off);
                q.write_zeroes(
                    off,
                    len,
                    ZeroFlags {
                        may_unmap: unmap,
                        no_fallback: false,
                    },
                )
                .await
                .unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard(off, len) => {
                let off = off % size;
                let len = len.min(size - off);
                q.discard(off, len).await.unwrap();
                // Whole clusters: v3 reads zeroes, v2 falls back to the backing file.
                let end = off + len;
                let a = off.next_multiple_of(cs);
                let b = if end == size {
                    end.next_multiple_of(cs)
                } else {
                    end - end % cs
                };
                let mut c = a;
                while c < b {
                    let e = (c + cs).min(size);
                    for i in c..e {
                        model[i as usize] = if !cfg.v3 && with_backing && i < BACKING {
                            backing_bytes[i as usize]
                        } else {
                            0
                        };
                    }
                    c += cs;
                }
            }
            Op::Resize(new) => {
                q.truncate(new, Prealloc::Off).await.unwrap();
                model.resize(new as usize, 0);
            }
            Op::Flush => q.flush().await.unwrap(),
            Op::Reopen => {
                q.close().await.unwrap();
                q = open_cfg(&m, &cfg, backing.clone()).await;
            }
        }
    }
    let got = read(&q, 0, model.len()).await;
    assert!(got == model, "read-back differs from the model");
    q.close().await.unwrap();
    let p = d.path("img.qcow2");
    save(&m, &p);
    check_clean(&p);
    ok(
        "qemu-img",
        &["convert", "-O", "raw", &d.s("img.qcow2"), &d.s("out.raw")],
    );
    assert!(
        std::fs::read(d.path("out.raw")).unwrap() == model,
        "QEMU reads differently"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_ops_match_model(cfg in config(), ops in prop::collection::vec(op(), 1..30), backing in any::<bool>()) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(scenario(cfg, ops, backing));
    }
}
