//! Shrinking a qcow2 image leaves it clean for `qemu-img check` (no leaked clusters) and
//! keeps the data before the new end.

mod common;

use common::*;
use strata_core::{BlockNode, IoBuf, Prealloc, WriteFlags};
use strata_qcow2::CreateOptions;

/// Fill `[0, size)` with 1 MiB requests, `depth` of them in flight at once (as
/// `strata bench -w -c 64 -s 1M -S 1M` does), then shrink.
async fn fill_and_shrink(opts: &CreateOptions, depth: usize, new_size: u64) -> Vec<u8> {
    let m = create_mem(opts, None).await;
    let q = open(&m, false, None, None).await;
    let size = opts.size;
    let mib = 1u64 << 20;
    let reqs: Vec<u64> = (0..size / mib).collect();
    for chunk in reqs.chunks(depth) {
        let futs = chunk.iter().map(|&i| {
            let q = q.clone();
            async move {
                let data = pattern(i, mib as usize);
                q.write(i * mib, IoBuf::from_slice(&data), WriteFlags::default())
                    .await
                    .unwrap();
            }
        });
        futures::future::join_all(futs).await;
    }
    q.truncate(new_size, Prealloc::Off).await.unwrap();
    assert_eq!(q.size(), new_size);
    // The data before the new end is intact.
    let got = read(&q, 0, new_size.min(2 * mib) as usize).await;
    let mut want = pattern(0, mib as usize);
    want.extend(pattern(1, mib as usize));
    want.truncate(got.len());
    assert_eq!(got, want);
    q.close_image().await.unwrap();
    m.snapshot()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shrink_leaves_no_leaked_clusters() {
    let d = Dir::new();
    for (cluster_size, new_size) in [
        (65536u64, 16u64 << 20),
        (65536, (16 << 20) - 512),
        (4096, 16 << 20),
        (512, 1 << 20),
    ] {
        let opts = CreateOptions {
            size: 64 << 20,
            cluster_size,
            ..Default::default()
        };
        let img = fill_and_shrink(&opts, 64, new_size).await;
        let p = d.path("x.qcow2");
        std::fs::write(&p, img).unwrap();
        let (code, out) = run("qemu-img", &["check", p.to_str().unwrap()]);
        assert_eq!(
            code, 0,
            "cluster_size {cluster_size}, size {new_size}: {out}"
        );
        assert!(!out.contains("Leaked"), "{out}");
    }
}
