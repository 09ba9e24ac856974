//! Measure the `file` node on both engines, buffered and O_DIRECT: 4 KiB random read and write
//! IOPS at queue depth 1 and 32, and 1 MiB sequential read and write throughput (queue
//! depth 1).
//!
//! ```text
//! cargo run --release -p strata-io --example engine_bench -- --file PATH --size 1G [--seconds 2]
//! ```
//!
//! The file is created (fully preallocated with zeroes, so reads hit real blocks) and removed
//! at the end. Buffered runs start with the file read into the page cache (earlier O_DIRECT
//! writes evict it), so they measure the engine rather than the disk. Write figures include a
//! final `fdatasync`, so buffered writes are not just page-cache copies.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use strata_core::{BlockNode, IoBuf, Prealloc, WriteFlags};
use strata_io::{Aio, FileNode, FileOptions};

struct Args {
    file: PathBuf,
    size: u64,
    seconds: f64,
    keep: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("invalid size: {s}"))
}

fn parse_args() -> Result<Args, String> {
    let mut file = None;
    let mut size = 1 << 30;
    let mut seconds = 2.0;
    let mut keep = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--file" => file = Some(PathBuf::from(value()?)),
            "--size" => size = parse_size(&value()?)?,
            "--seconds" => {
                seconds = value()?
                    .parse()
                    .map_err(|_| "invalid --seconds".to_string())?
            }
            "--keep" => keep = true,
            "-h" | "--help" => {
                println!(
                    "usage: engine_bench --file PATH [--size 1G] [--seconds 2] [--keep]\n\
                     Measures 4 KiB random read/write IOPS (QD1, QD32) and 1 MiB sequential\n\
                     MB/s for aio=threads and aio=io_uring, buffered and O_DIRECT."
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument: {other}")),
        }
    }
    let file = file.ok_or("--file PATH is required")?;
    if size < 64 << 20 {
        return Err("--size must be at least 64M".into());
    }
    Ok(Args {
        file,
        size,
        seconds,
        keep,
    })
}

/// xorshift64*: cheap random block numbers.
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[derive(Clone, Copy)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

/// Run `qd` workers doing `bs`-byte requests for `dur`; returns (ops, seconds).
async fn run(
    node: &Arc<FileNode>,
    pattern: Pattern,
    bs: usize,
    qd: usize,
    dur: Duration,
) -> (u64, f64) {
    let ops = Arc::new(AtomicU64::new(0));
    let blocks = node.size() / bs as u64;
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for w in 0..qd {
        let node = Arc::clone(node);
        let ops = Arc::clone(&ops);
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
            let mut buf = IoBuf::zeroed(bs);
            buf.fill(0x5a);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let block = match pattern {
                    Pattern::RandRead | Pattern::RandWrite => next_rand(&mut rng) % blocks,
                    Pattern::SeqRead | Pattern::SeqWrite => {
                        let b = seq % blocks;
                        seq += 1;
                        b
                    }
                };
                let off = block * bs as u64;
                buf = match pattern {
                    Pattern::RandRead | Pattern::SeqRead => node.read(off, buf).await,
                    Pattern::RandWrite | Pattern::SeqWrite => {
                        node.write(off, buf, WriteFlags::default()).await
                    }
                }
                .expect("I/O failed");
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker panicked");
    }
    if matches!(pattern, Pattern::RandWrite | Pattern::SeqWrite) {
        node.flush().await.expect("flush failed");
    }
    (ops.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("engine_bench: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        eprintln!(
            "preparing {} ({} MiB, preallocation=full)...",
            args.file.display(),
            args.size >> 20
        );
        FileNode::create(&args.file, args.size, Prealloc::Full)
            .await
            .unwrap_or_else(|e| panic!("create: {e}"));
        let dur = Duration::from_secs_f64(args.seconds);
        println!(
            "{:<9} {:<9} {:>12} {:>12} {:>12} {:>12} {:>11} {:>11}",
            "aio",
            "cache",
            "rr4k-qd1",
            "rr4k-qd32",
            "rw4k-qd1",
            "rw4k-qd32",
            "seqrd-MB/s",
            "seqwr-MB/s"
        );
        for aio in [Aio::Threads, Aio::IoUring] {
            for direct in [false, true] {
                let opts = FileOptions {
                    read_only: false,
                    direct,
                    aio,
                };
                let node = match FileNode::open(&args.file, &opts) {
                    Ok(n) => n,
                    Err(e) => {
                        println!("{:<9} {:<9} {e}", aio.as_str(), cache_name(direct));
                        continue;
                    }
                };
                if !direct {
                    // Earlier O_DIRECT writes dropped the file from the page cache; buffered
                    // figures should measure the engine with the data cached, so warm it up.
                    let blocks = node.size() >> 20;
                    let mut buf = IoBuf::zeroed(1 << 20);
                    for b in 0..blocks {
                        buf = node.read(b << 20, buf).await.expect("warm-up read");
                    }
                }
                let mut cells = Vec::new();
                for (pattern, qd) in [
                    (Pattern::RandRead, 1),
                    (Pattern::RandRead, 32),
                    (Pattern::RandWrite, 1),
                    (Pattern::RandWrite, 32),
                ] {
                    let (ops, secs) = run(&node, pattern, 4096, qd, dur).await;
                    cells.push(format!("{:>12.0}", ops as f64 / secs));
                }
                for pattern in [Pattern::SeqRead, Pattern::SeqWrite] {
                    let (ops, secs) = run(&node, pattern, 1 << 20, 1, dur).await;
                    cells.push(format!("{:>11.0}", ops as f64 * 1.048_576 / secs));
                }
                println!(
                    "{:<9} {:<9} {}",
                    aio.as_str(),
                    cache_name(direct),
                    cells.join(" ")
                );
            }
        }
        println!(
            "(IOPS for the 4 KiB columns; MB/s = 10^6 bytes/s; writes include a final fdatasync)"
        );
        if !args.keep {
            let _ = std::fs::remove_file(&args.file);
        }
    });
}

fn cache_name(direct: bool) -> &'static str {
    if direct { "direct" } else { "buffered" }
}
