//! `FileNode` on both engines, buffered and O_DIRECT, against a byte-vector model and against
//! what QEMU's own tools see in the same file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use strata_core::{BlockNode, ErrorKind, IoBuf, Prealloc, WriteFlags, ZeroFlags};
use strata_io::{Aio, FileNode, FileOptions};

/// A directory on a file system that accepts O_DIRECT (tmpfs does not).
fn test_dir() -> tempfile::TempDir {
    let candidates = [
        PathBuf::from("/var/tmp"),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        std::env::temp_dir(),
    ];
    for c in &candidates {
        let Ok(dir) = tempfile::Builder::new().prefix("strata-io-").tempdir_in(c) else {
            continue;
        };
        if direct_io_works(dir.path()) {
            return dir;
        }
    }
    panic!("no directory supports O_DIRECT among {candidates:?}");
}

fn direct_io_works(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.join("probe"))
        .is_ok()
}

/// Every engine × cache mode.
fn configs() -> Vec<FileOptions> {
    let mut v = Vec::new();
    for aio in [Aio::Threads, Aio::IoUring] {
        for direct in [false, true] {
            v.push(FileOptions {
                read_only: false,
                direct,
                aio,
            });
        }
    }
    v
}

fn label(o: &FileOptions) -> String {
    format!("aio={} direct={}", o.aio, o.direct)
}

/// A small deterministic PRNG (xorshift64*), so failures replay.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

/// Fresh file of `size` zero bytes (sparse), opened with `opts`.
async fn new_file(dir: &Path, name: &str, size: u64, opts: &FileOptions) -> Arc<FileNode> {
    let path = dir.join(name);
    FileNode::create(&path, size, Prealloc::Off).await.unwrap();
    FileNode::open(&path, opts).unwrap()
}

async fn read_all(node: &FileNode, offset: u64, len: usize) -> Vec<u8> {
    node.read(offset, IoBuf::zeroed(len))
        .await
        .unwrap()
        .to_vec()
}

/// A buffer whose address is `skew` bytes past an aligned one (to force bounce buffers).
fn skewed(data: &[u8], skew: usize) -> IoBuf {
    let mut b = IoBuf::zeroed(skew + data.len());
    let mut tail = b.split_off(skew);
    tail.copy_from_slice(data);
    tail
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_and_alignment_report() {
    let dir = test_dir();
    for opts in configs() {
        let node = new_file(dir.path(), "rt", 1 << 20, &opts).await;
        assert_eq!(node.size(), 1 << 20, "{}", label(&opts));
        assert_eq!(node.driver(), "file");
        assert_eq!(node.aio(), opts.aio);
        if opts.direct {
            let a = node.request_alignment();
            assert!(a.is_power_of_two() && (512..=4096).contains(&a), "{a}");
        } else {
            assert_eq!(node.request_alignment(), 1);
        }
        let data = pattern(1, 128 << 10);
        node.write(65536, IoBuf::from_slice(&data), WriteFlags { fua: true })
            .await
            .unwrap();
        node.flush().await.unwrap();
        assert_eq!(
            read_all(&node, 65536, data.len()).await,
            data,
            "{}",
            label(&opts)
        );
        assert!(read_all(&node, 0, 65536).await.iter().all(|&b| b == 0));
    }
}

/// Random unaligned, misaligned-memory and vectored requests checked against a model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_and_vectored_requests_match_a_model() {
    let dir = test_dir();
    for (i, opts) in configs().into_iter().enumerate() {
        const SIZE: usize = 256 << 10;
        let node = new_file(dir.path(), &format!("model{i}"), SIZE as u64, &opts).await;
        let mut model = vec![0u8; SIZE];
        let mut rng = Rng(0x1234 + i as u64);
        for round in 0..300 {
            let len = 1 + rng.below(20_000) as usize;
            let off = rng.below((SIZE - len) as u64) as usize;
            let nbufs = 1 + rng.below(4) as usize;
            // Split [off, off+len) into `nbufs` pieces of random lengths and skews.
            let mut cuts: Vec<usize> = (0..nbufs - 1)
                .map(|_| rng.below(len as u64) as usize)
                .collect();
            cuts.push(0);
            cuts.push(len);
            cuts.sort_unstable();
            if rng.below(2) == 0 {
                let data = pattern(rng.next(), len);
                let bufs: Vec<IoBuf> = cuts
                    .windows(2)
                    .map(|w| skewed(&data[w[0]..w[1]], rng.below(3) as usize * 7))
                    .collect();
                let back = node.writev(off as u64, bufs).await.unwrap();
                assert_eq!(back.iter().map(|b| b.len()).sum::<usize>(), len);
                model[off..off + len].copy_from_slice(&data);
            } else {
                let bufs: Vec<IoBuf> = cuts
                    .windows(2)
                    .map(|w| skewed(&vec![0xee; w[1] - w[0]], rng.below(2) as usize * 3))
                    .collect();
                let got = node.readv(off as u64, bufs).await.unwrap();
                let got: Vec<u8> = got.iter().flat_map(|b| b.iter().copied()).collect();
                assert_eq!(
                    got,
                    &model[off..off + len],
                    "{} round {round}",
                    label(&opts)
                );
            }
        }
        // Everything, in one aligned read.
        assert_eq!(read_all(&node, 0, SIZE).await, model, "{}", label(&opts));
        assert_eq!(node.size(), SIZE as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_past_eof_are_zero_and_writes_grow() {
    let dir = test_dir();
    for (i, opts) in configs().into_iter().enumerate() {
        let path = dir.path().join(format!("eof{i}"));
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        let node = FileNode::open(&path, &opts).unwrap();
        assert_eq!(node.size(), 1000);
        let got = read_all(&node, 500, 3000).await;
        assert!(got[..500].iter().all(|&b| b == 7), "{}", label(&opts));
        assert!(got[500..].iter().all(|&b| b == 0), "{}", label(&opts));
        // Entirely past EOF.
        assert!(read_all(&node, 1 << 20, 4096).await.iter().all(|&b| b == 0));

        node.write(10_000, IoBuf::from_slice(&[9; 100]), WriteFlags::default())
            .await
            .unwrap();
        let real = std::fs::metadata(&path).unwrap().len();
        assert_eq!(node.size(), real, "size cache follows the file");
        if opts.direct {
            // As in QEMU, an O_DIRECT write past EOF rounds up to the request alignment.
            assert!(real >= 10_100 && real.is_multiple_of(node.request_alignment()));
        } else {
            assert_eq!(real, 10_100);
        }
        let got = read_all(&node, 900, 9300).await;
        assert!(got[..100].iter().all(|&b| b == 7));
        assert!(got[100..9100].iter().all(|&b| b == 0));
        assert!(got[9100..9200].iter().all(|&b| b == 9));

        node.truncate(4096, Prealloc::Off).await.unwrap();
        assert_eq!(node.size(), 4096);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        node.truncate(3 << 20, Prealloc::Falloc).await.unwrap();
        assert_eq!(node.size(), 3 << 20);
        assert!(node.allocated_size().await.unwrap().unwrap() >= 3 << 20);
        node.truncate(4 << 20, Prealloc::Full).await.unwrap();
        assert_eq!(node.size(), 4 << 20);
        assert!(node.allocated_size().await.unwrap().unwrap() >= 4 << 20);
        assert!(read_all(&node, 4096, 4 << 20).await.iter().all(|&b| b == 0));
        let e = node.truncate(1 << 20, Prealloc::Falloc).await.unwrap_err();
        assert_eq!(e.message(), "Cannot use preallocation for shrinking files");
        let e = node
            .truncate(8 << 20, Prealloc::Metadata)
            .await
            .unwrap_err();
        assert_eq!(e.message(), "Unsupported preallocation mode: metadata");
    }
}

/// (data?, start, len) runs of `node` from block_status.
async fn extents(node: &FileNode) -> Vec<(bool, u64, u64)> {
    let mut out: Vec<(bool, u64, u64)> = Vec::new();
    let mut off = 0;
    while off < node.size() {
        let e = node.block_status(off, node.size() - off).await.unwrap();
        assert!(e.status.allocated);
        assert_eq!(e.status.host_offset, Some(off));
        assert_eq!(e.status.data, !e.status.zero);
        assert_eq!(e.host_node.as_ref().unwrap().filename(), node.filename());
        match out.last_mut() {
            Some(last) if last.0 == e.status.data => last.2 += e.len,
            _ => out.push((e.status.data, off, e.len)),
        }
        off += e.len;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroes_discard_and_block_status_on_a_sparse_file() {
    let dir = test_dir();
    const M: u64 = 1 << 20;
    for (i, opts) in configs().into_iter().enumerate() {
        let node = new_file(dir.path(), &format!("sparse{i}"), M, &opts).await;
        assert_eq!(extents(&node).await, vec![(false, 0, M)]);
        node.write(12288, IoBuf::from_slice(&[1; 4096]), WriteFlags::default())
            .await
            .unwrap();
        node.write(
            256 << 10,
            IoBuf::from_slice(&[2; 65536]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        node.flush().await.unwrap();
        assert_eq!(
            extents(&node).await,
            vec![
                (false, 0, 12288),
                (true, 12288, 4096),
                (false, 16384, (256 << 10) - 16384),
                (true, 256 << 10, 65536),
                (false, 320 << 10, M - (320 << 10)),
            ],
            "{}",
            label(&opts)
        );
        // A zeroed range that may be unmapped becomes a hole.
        node.write_zeroes(
            12288,
            4096,
            ZeroFlags {
                may_unmap: true,
                no_fallback: true,
            },
        )
        .await
        .unwrap();
        // Zeroes without unmap read as zero (ZERO_RANGE may keep the blocks allocated).
        node.write_zeroes(256 << 10, 4096, ZeroFlags::default())
            .await
            .unwrap();
        // Unaligned zeroing inside data.
        node.write_zeroes((256 << 10) + 5000, 3, ZeroFlags::default())
            .await
            .unwrap();
        let got = read_all(&node, 0, (320 << 10) as usize).await;
        assert!(
            got[..(256 << 10) + 4096].iter().all(|&b| b == 0),
            "{}",
            label(&opts)
        );
        let tail = &got[(256 << 10) + 4096..];
        assert_eq!(&tail[..904], &[2; 904][..]);
        assert_eq!(&tail[904..907], &[0; 3]);
        assert!(tail[907..].iter().all(|&b| b == 2));
        // The punched hole merged with the holes around it (ZERO_RANGE may or may not leave
        // its range reported as data, depending on the file system and the page cache).
        let ext = extents(&node).await;
        assert!(
            !ext[0].0 && ext[0].2 >= 256 << 10,
            "{}: {ext:?}",
            label(&opts)
        );

        // Discard punches a hole.
        node.discard(256 << 10, 65536).await.unwrap();
        assert_eq!(
            extents(&node).await,
            vec![(false, 0, M)],
            "{}",
            label(&opts)
        );
        assert!(
            read_all(&node, 256 << 10, 65536)
                .await
                .iter()
                .all(|&b| b == 0)
        );

        // Zeroes past EOF grow the file.
        node.write_zeroes(
            M - 4096,
            8192,
            ZeroFlags {
                may_unmap: true,
                no_fallback: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(node.size(), M + 4096);
        node.write_zeroes(M + 4096, 4096, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(node.size(), M + 8192);
        // Out-of-range block status is refused.
        assert!(node.block_status(M, 1 << 20).await.is_err());
    }
}

/// Poll a future once (starting its I/O) and drop it.
fn start_and_drop<F: std::future::Future>(f: F) {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    let _ = f.as_mut().poll(&mut cx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_futures_never_corrupt_memory_or_the_file() {
    let dir = test_dir();
    const N: u64 = 400; // more than the ring holds, so some wait for a permit when dropped
    const CHUNK: usize = 8192;
    for (i, opts) in configs().into_iter().enumerate() {
        let node = new_file(dir.path(), &format!("drop{i}"), N * CHUNK as u64, &opts).await;
        for j in 0..N {
            // Every third write unaligned, to exercise the read-modify-write task under O_DIRECT.
            let (off, len) = if j % 3 == 0 {
                (j * CHUNK as u64 + 100, CHUNK - 200)
            } else {
                (j * CHUNK as u64, CHUNK)
            };
            let data = vec![(j % 251) as u8 + 1; len];
            start_and_drop(node.write(off, IoBuf::from_slice(&data), WriteFlags::default()));
            // Reads too: the kernel must not write into freed buffers.
            start_and_drop(node.read(off, IoBuf::zeroed(len)));
        }
        // A write whose I/O started completes on its own; one dropped before it started
        // (waiting for a ring slot, or out of tokio's co-op budget) never happens. Either way
        // no chunk may stay torn, and the first ones certainly started.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut previous = Vec::new();
        loop {
            let got = read_all(&node, 0, (N as usize) * CHUNK).await;
            let stable = got == previous;
            let mut written = 0;
            let bad = (0..N as usize).find(|&j| {
                let c = &got[j * CHUNK..(j + 1) * CHUNK];
                let v = (j % 251) as u8 + 1;
                let (lo, hi) = if j % 3 == 0 {
                    (100, CHUNK - 100)
                } else {
                    (0, CHUNK)
                };
                let outside_zero = c[..lo].iter().chain(&c[hi..]).all(|&b| b == 0);
                let inside = &c[lo..hi];
                if inside.iter().all(|&b| b == v) {
                    written += 1;
                    !outside_zero
                } else {
                    !(outside_zero && inside.iter().all(|&b| b == 0))
                }
            });
            // Settled: nothing torn, the early writes landed, and nothing changes any more.
            if bad.is_none() && written >= 32 && stable {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: never settled (first torn chunk {bad:?}, {written} written)",
                label(&opts)
            );
            previous = got;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(node.size(), N * CHUNK as u64);
        // The node still works.
        node.write(0, IoBuf::from_slice(&[0xaa; 4096]), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(read_all(&node, 0, 4096).await, vec![0xaa; 4096]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight() {
    let dir = test_dir();
    for (i, opts) in configs().into_iter().enumerate() {
        let node = new_file(dir.path(), &format!("conc{i}"), 4 << 20, &opts).await;
        // 256 concurrent 16 KiB writes to disjoint places, then concurrent reads.
        let mut tasks = Vec::new();
        for j in 0..256u64 {
            let n = Arc::clone(&node);
            tasks.push(tokio::spawn(async move {
                let data = pattern(j, 16384);
                n.write(j * 16384, IoBuf::from_slice(&data), WriteFlags::default())
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut tasks = Vec::new();
        for j in 0..256u64 {
            let n = Arc::clone(&node);
            tasks.push(tokio::spawn(async move {
                let got = read_all(&n, j * 16384, 16384).await;
                assert_eq!(got, pattern(j, 16384));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Concurrent tiny unaligned writes into the same blocks: under O_DIRECT each is a
        // read-modify-write of a shared block, which must not lose its neighbours' bytes.
        let mut tasks = Vec::new();
        for j in 0..200u64 {
            let n = Arc::clone(&node);
            tasks.push(tokio::spawn(async move {
                n.write(
                    j * 7 + 3,
                    IoBuf::from_slice(&[j as u8; 7]),
                    WriteFlags::default(),
                )
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let got = read_all(&node, 0, 1403).await;
        for j in 0..200usize {
            assert_eq!(
                &got[j * 7 + 3..j * 7 + 10],
                &[j as u8; 7],
                "{} writer {j}",
                label(&opts)
            );
        }
    }
}

fn qemu_io_available() -> bool {
    Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn qemu_io(path: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(path).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io {cmds:?}: {text}");
    assert!(
        !text.contains("Pattern verification failed"),
        "qemu-io {cmds:?}: {text}"
    );
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tools_see_what_we_wrote_and_we_see_theirs() {
    if !qemu_io_available() {
        eprintln!("qemu-io not installed; skipping interop test");
        return;
    }
    let dir = test_dir();
    for (i, opts) in configs().into_iter().enumerate() {
        let path = dir.path().join(format!("interop{i}.raw"));
        FileNode::create(&path, 4 << 20, Prealloc::Off)
            .await
            .unwrap();
        let node = FileNode::open(&path, &opts).unwrap();
        node.write(
            65536,
            IoBuf::from_slice(&[0xab; 65536]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        node.write(1000, skewed(&[0xcd; 2000], 5), WriteFlags::default())
            .await
            .unwrap();
        node.writev(
            1 << 20,
            vec![
                IoBuf::from_slice(&[0x11; 3000]),
                IoBuf::from_slice(&[0x22; 5192]),
            ],
        )
        .await
        .unwrap();
        node.flush().await.unwrap();
        qemu_io(
            &path,
            &[
                "read -P 0xab 65536 65536",
                "read -P 0xcd 1000 2000",
                "read -P 0 0 1000",
                "read -P 0 3000 62536",
                "read -P 0x11 1048576 3000",
                "read -P 0x22 1051576 5192",
            ],
        );

        // And the other way round.
        qemu_io(
            &path,
            &["write -P 0x5a 2097152 12288", "write -z 65536 4096"],
        );
        let got = read_all(&node, 2 << 20, 12288).await;
        assert!(got.iter().all(|&b| b == 0x5a), "{}", label(&opts));
        assert!(read_all(&node, 65536, 4096).await.iter().all(|&b| b == 0));

        // Our block status agrees with `qemu-img map`.
        drop(node);
        let node = FileNode::open(&path, &opts).unwrap();
        let out = Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let theirs: Vec<(bool, u64, u64)> = map
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["offset"], e["start"]);
                assert_eq!(e["present"], true);
                (
                    e["data"].as_bool().unwrap(),
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(extents(&node).await, theirs, "{}", label(&opts));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_read_like_qemu() {
    let dir = test_dir();
    let missing = dir.path().join("missing");
    let e = FileNode::open(&missing, &FileOptions::default()).unwrap_err();
    assert_eq!(
        e.message(),
        format!(
            "Could not open '{}': No such file or directory",
            missing.display()
        )
    );
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = FileNode::open(dir.path(), &FileOptions::default()).unwrap_err();
    assert_eq!(
        e.message(),
        format!("Could not open '{}': Is a directory", dir.path().display())
    );
    let e = FileNode::open(Path::new("/dev/null"), &FileOptions::default()).unwrap_err();
    assert_eq!(
        e.message(),
        "'file' driver requires '/dev/null' to be a regular file"
    );

    let nodir = dir.path().join("nodir/x");
    let e = FileNode::create(&nodir, 1 << 20, Prealloc::Off)
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        format!(
            "Could not create '{}': No such file or directory",
            nodir.display()
        )
    );
    let meta = dir.path().join("meta");
    let e = FileNode::create(&meta, 1 << 20, Prealloc::Metadata)
        .await
        .unwrap_err();
    assert_eq!(e.message(), "Unsupported preallocation mode: metadata");

    assert_eq!("threads".parse::<Aio>().unwrap(), Aio::Threads);
    assert_eq!("io_uring".parse::<Aio>().unwrap(), Aio::IoUring);
    assert_eq!(Aio::IoUring.as_str(), "io_uring");
    let e = "native".parse::<Aio>().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.message().contains("aio=native is not supported"));
    assert_eq!(
        "foo".parse::<Aio>().unwrap_err().message(),
        "invalid parameter value: foo"
    );

    // Read-only nodes refuse every kind of write.
    let path = dir.path().join("ro");
    FileNode::create(&path, 65536, Prealloc::Off).await.unwrap();
    for aio in [Aio::Threads, Aio::IoUring] {
        let opts = FileOptions {
            read_only: true,
            direct: false,
            aio,
        };
        let node = FileNode::open(&path, &opts).unwrap();
        assert!(node.read_only());
        let e = node
            .write(0, IoBuf::zeroed(512), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert!(
            node.write_zeroes(0, 512, ZeroFlags::default())
                .await
                .is_err()
        );
        assert!(node.discard(0, 512).await.is_err());
        assert!(node.truncate(0, Prealloc::Off).await.is_err());
        assert_eq!(read_all(&node, 0, 512).await, vec![0; 512]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_preallocates() {
    let dir = test_dir();
    for (name, prealloc) in [
        ("off", Prealloc::Off),
        ("falloc", Prealloc::Falloc),
        ("full", Prealloc::Full),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, vec![1u8; 100_000]).unwrap(); // create truncates old content
        FileNode::create(&path, 3 << 20, prealloc).await.unwrap();
        let node = FileNode::open(&path, &FileOptions::default()).unwrap();
        assert_eq!(node.size(), 3 << 20);
        let alloc = node.allocated_size().await.unwrap().unwrap();
        match prealloc {
            Prealloc::Off => assert!(alloc < 1 << 20, "{alloc}"),
            _ => assert!(alloc >= 3 << 20, "{name}: {alloc}"),
        }
        assert!(read_all(&node, 0, 3 << 20).await.iter().all(|&b| b == 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_buffers_than_one_syscall_takes() {
    let dir = test_dir();
    for (i, opts) in configs().into_iter().enumerate() {
        let node = new_file(dir.path(), &format!("iov{i}"), 0, &opts).await;
        // 1500 buffers > IOV_MAX (1024): the engines must split the request.
        let data = pattern(77, 1500 * 4096);
        let bufs: Vec<IoBuf> = data.chunks(4096).map(IoBuf::from_slice).collect();
        node.writev(0, bufs).await.unwrap();
        assert_eq!(node.size(), data.len() as u64);
        let bufs: Vec<IoBuf> = (0..1500).map(|_| IoBuf::zeroed(4096)).collect();
        let got = node.readv(0, bufs).await.unwrap();
        assert_eq!(got.len(), 1500);
        let got: Vec<u8> = got.iter().flat_map(|b| b.iter().copied()).collect();
        assert!(got == data, "{}", label(&opts));
    }
}

/// tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: the fallback and `no_fallback`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_fallback_where_zero_range_is_missing() {
    let Ok(dir) = tempfile::Builder::new()
        .prefix("strata-io-")
        .tempdir_in("/dev/shm")
    else {
        eprintln!("no /dev/shm; skipping");
        return;
    };
    for aio in [Aio::Threads, Aio::IoUring] {
        let opts = FileOptions {
            read_only: false,
            direct: false,
            aio,
        };
        let path = dir.path().join(format!("z-{aio}"));
        std::fs::write(&path, vec![3u8; 65536]).unwrap();
        let node = FileNode::open(&path, &opts).unwrap();
        let strict = ZeroFlags {
            may_unmap: false,
            no_fallback: true,
        };
        match node.write_zeroes(4096, 4096, strict).await {
            // Some kernels do implement ZERO_RANGE on tmpfs.
            Ok(()) => {}
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}"),
        }
        node.write_zeroes(100, 1000, ZeroFlags::default())
            .await
            .unwrap();
        node.write_zeroes(
            8192,
            8192,
            ZeroFlags {
                may_unmap: true,
                no_fallback: true,
            },
        )
        .await
        .unwrap();
        let got = read_all(&node, 0, 65536).await;
        assert!(got[..100].iter().all(|&b| b == 3));
        assert!(got[100..1100].iter().all(|&b| b == 0));
        assert!(got[8192..16384].iter().all(|&b| b == 0));
        assert!(got[16384..].iter().all(|&b| b == 3));
        // Past EOF through the fallback: the file grows.
        node.write_zeroes(65536, 4096, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(node.size(), 65536 + 4096);
    }
}

/// On an I/O thread, requests go to that thread's own ring (completions drained by a task on
/// its runtime, no completion thread): random writes and reads from many tasks at once, and
/// requests whose futures are dropped mid-flight, behave exactly as on the shared ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_thread_rings_serve_concurrent_requests() {
    let Some(threads) = strata_io::iothread::global() else {
        eprintln!("skipped: no I/O threads (STRATA_IOTHREADS=0)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for direct in [false, true] {
        if direct && !direct_io_works(dir.path()) {
            continue;
        }
        let opts = FileOptions {
            read_only: false,
            direct,
            aio: Aio::IoUring,
        };
        let node = new_file(dir.path(), &format!("t{direct}"), 4 << 20, &opts).await;
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let node = Arc::clone(&node);
            tasks.push(threads.spawn(async move {
                let name = std::thread::current()
                    .name()
                    .unwrap_or_default()
                    .to_string();
                assert!(name.starts_with("strata-io"), "ran on {name}");
                // Each task owns a 256 KiB slice: write, read back, drop a read mid-flight.
                let base = t * (256 << 10);
                for i in 0..8u64 {
                    let data = pattern(t * 100 + i, 32 << 10);
                    let off = base + i * (32 << 10);
                    node.write(off, IoBuf::from_slice(&data), WriteFlags::default())
                        .await
                        .unwrap();
                    assert_eq!(read_all(&node, off, data.len()).await, data);
                    // Polled once (submitted), then dropped by the elapsed timeout.
                    let _ =
                        tokio::time::timeout(Duration::ZERO, node.read(off, IoBuf::zeroed(4096)))
                            .await;
                }
                node.flush().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for t in 0..16u64 {
            for i in 0..8u64 {
                let off = t * (256 << 10) + i * (32 << 10);
                assert_eq!(
                    read_all(&node, off, 32 << 10).await,
                    pattern(t * 100 + i, 32 << 10),
                    "{direct} task {t} piece {i}"
                );
            }
        }
    }
}
