//! `bench`: qemu-img's simple benchmark, run in-process through our node at queue depth
//! `-d`, with the same options and output.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use strata_core::{IoBuf, NodeRef, WriteFlags};
use tokio::sync::Mutex;

use crate::cli::{CmdResult, Fail, parse_cache};
use crate::cmd::common::{ForceShareArg, FormatArg, one_filename};
use crate::units::{cvtnum, cvtnum_full};

/// Flags of `bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of I/O requests to perform
    #[arg(short = 'c', long = "count")]
    count: Option<String>,
    /// Number of requests to perform in parallel
    #[arg(short = 'd', long = "depth")]
    depth: Option<String>,
    #[command(flatten)]
    format: FormatArg,
    /// Use native AIO
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Start the first request at this offset
    #[arg(short = 'o', long = "offset")]
    offset: Option<String>,
    /// Write this pattern byte instead of zero
    #[arg(long = "pattern")]
    pattern: Option<String>,
    /// Quiet mode
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Size of each request
    #[arg(short = 's', long = "buffer-size")]
    bufsize: Option<String>,
    /// Offset increment of each next request
    #[arg(short = 'S', long = "step-size")]
    step: Option<String>,
    /// Cache mode (default: writeback)
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Perform a write test (default is read)
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// I/O engine: threads, native, io_uring
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    /// Flush after this number of requests
    #[arg(long = "flush-interval")]
    flush_interval: Option<String>,
    /// Do not wait for in-flight requests when flushing
    #[arg(long = "no-drain")]
    no_drain: bool,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// A validated benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Requests in total.
    pub count: u64,
    /// Requests in flight.
    pub depth: u64,
    /// First offset.
    pub offset: u64,
    /// Bytes per request.
    pub bufsize: u64,
    /// Offset increment.
    pub step: u64,
    /// Write instead of read.
    pub write: bool,
    /// Byte to write.
    pub pattern: u8,
    /// Flush every this many requests (0: never).
    pub flush_interval: u64,
    /// Wait for in-flight requests before a flush.
    pub drain: bool,
}

impl Plan {
    /// The first line qemu-img prints (and the flush line when flushing).
    pub fn banner(&self) -> String {
        let mut s = format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
            self.count,
            if self.write { "write" } else { "read" },
            self.bufsize,
            self.depth,
            self.offset,
            self.step
        );
        if self.flush_interval > 0 {
            s.push_str(&format!(
                "Sending flush every {} requests\n",
                self.flush_interval
            ));
        }
        s
    }

    /// The offset of request `i`. qemu-img 10.0.2 wraps at `image_size` (master wraps at
    /// `image_size - bufsize`), so a wrapped request may run past the end and fail.
    pub fn offset_of(&self, i: u64, image_size: u64) -> u64 {
        if i == 0 {
            return self.offset;
        }
        if image_size == 0 {
            return 0;
        }
        // Each step is reduced modulo the size, so the sequence is (offset + i*step) mod
        // size once it has wrapped; the first element is the unreduced start offset.
        ((self.offset as u128 + i as u128 * self.step as u128) % image_size as u128) as u64
    }
}

/// "Run completed in N.NNN seconds."
pub fn completion_line(secs: f64) -> String {
    format!("Run completed in {secs:3.3} seconds.\n")
}

fn parse_plan(a: &Args) -> Result<Plan, Fail> {
    let count = match &a.count {
        Some(c) => cvtnum_full("request count", c, false, 1, i32::MAX as i64)? as u64,
        None => 75000,
    };
    let depth = match &a.depth {
        Some(d) => cvtnum_full("queue depth", d, false, 1, i32::MAX as i64)? as u64,
        None => 64,
    };
    let offset = match &a.offset {
        Some(o) => cvtnum("offset", o, true)? as u64,
        None => 0,
    };
    let bufsize = match &a.bufsize {
        Some(s) => cvtnum_full("buffer size", s, true, 1, i32::MAX as i64)? as u64,
        None => 4096,
    };
    let step = match &a.step {
        Some(s) => cvtnum_full("step size", s, true, 0, i32::MAX as i64)? as u64,
        None => 0,
    };
    let pattern = match &a.pattern {
        Some(p) => cvtnum_full("pattern byte", p, false, 0, 0xff)? as u8,
        None => 0,
    };
    let flush_interval = match &a.flush_interval {
        Some(f) => cvtnum_full("flush interval", f, false, 0, i32::MAX as i64)? as u64,
        None => 0,
    };
    Ok(Plan {
        count,
        depth,
        offset,
        bufsize,
        step: if step == 0 { bufsize } else { step },
        write: a.write,
        pattern,
        flush_interval,
        drain: !a.no_drain,
    })
}

/// Run `bench`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let plan = parse_plan(&a)?;
    let cache = match &a.cache {
        Some(c) => parse_cache(c).ok_or_else(|| Fail::msg("Invalid cache mode"))?,
        None => crate::cli::CacheMode::Writeback,
    };
    let aio = match (&a.aio, a.native) {
        (Some(x), _) if matches!(x.as_str(), "threads" | "native" | "io_uring") => Some(x.clone()),
        (Some(x), _) => return Err(Fail::msg(format!("Invalid aio option: {x}"))),
        // -n asks for native AIO "if possible"; without Linux AIO the default engine serves.
        (None, true) => None,
        (None, false) => None,
    };
    let filename = one_filename(&a.args)?;
    if !plan.write && plan.flush_interval > 0 {
        return Err(Fail::msg(
            "--flush-interval is only available in write tests",
        ));
    }
    if plan.flush_interval > 0 && plan.flush_interval < plan.depth {
        return Err(Fail::msg("Flush interval can't be smaller than depth"));
    }
    let rt = crate::open::runtime()?;
    rt.block_on(async {
        let opts = crate::open::OpenOpts {
            fmt: a.format.fmt.clone(),
            read_only: !plan.write,
            cache,
            aio,
            ..Default::default()
        };
        let img = crate::open::open(filename, &opts).await?;
        print!("{}", plan.banner());
        let start = Instant::now();
        bench_node(img.node(), &plan).await?;
        let secs = start.elapsed().as_secs_f64();
        img.close().await?;
        print!("{}", completion_line(secs));
        Ok(0)
    })
}

/// Issue the planned requests against `node`, at most `depth` at a time.
pub async fn bench_node(node: NodeRef, plan: &Plan) -> Result<(), Fail> {
    let size = node.size();
    let plan = Arc::new(plan.clone());
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    // Held for reading by each request, for writing by a draining flush.
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let flush_lock = Arc::new(Mutex::new(()));
    let mut tasks = Vec::new();
    for _ in 0..plan.depth.min(plan.count) {
        let (node, plan, next, done, gate, flush_lock) = (
            node.clone(),
            plan.clone(),
            next.clone(),
            done.clone(),
            gate.clone(),
            flush_lock.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut buf = IoBuf::zeroed(plan.bufsize as usize);
            if plan.pattern != 0 {
                buf = IoBuf::from_slice(&vec![plan.pattern; plan.bufsize as usize]);
            }
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= plan.count {
                    return Ok::<(), Fail>(());
                }
                let off = plan.offset_of(i, size);
                // Like the block layer's request check: past the end is EIO.
                if off.checked_add(plan.bufsize).is_none_or(|end| end > size) {
                    return Err(Fail::msg("Failed request: Input/output error"));
                }
                {
                    let _g = gate.read().await;
                    buf = if plan.write {
                        node.write(off, buf, WriteFlags::default()).await
                    } else {
                        node.read(off, buf).await
                    }
                    .map_err(|e| Fail::msg(format!("Failed request: {e}")))?;
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if plan.flush_interval > 0 && n % plan.flush_interval == 0 {
                    let _f = flush_lock.lock().await;
                    let _g = if plan.drain {
                        Some(gate.write().await)
                    } else {
                        None
                    };
                    node.flush()
                        .await
                        .map_err(|e| Fail::msg(format!("Failed flush request: {e}")))?;
                }
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Fail::msg(format!("Failed request: {e}")))??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            count: 75000,
            depth: 64,
            offset: 0,
            bufsize: 4096,
            step: 4096,
            write: false,
            pattern: 0,
            flush_interval: 0,
            drain: true,
        }
    }

    #[test]
    fn banner_like_qemu() {
        // `qemu-img bench -c 10 -d 2 -w --flush-interval 4 img` (10.0.2)
        let p = Plan {
            count: 10,
            depth: 2,
            write: true,
            flush_interval: 4,
            ..plan()
        };
        assert_eq!(
            p.banner(),
            "Sending 10 write requests, 4096 bytes each, 2 in parallel (starting at offset 0, step size 4096)\nSending flush every 4 requests\n"
        );
        assert_eq!(completion_line(0.0123), "Run completed in 0.012 seconds.\n");
    }

    #[test]
    fn offsets_wrap_like_qemu() {
        let p = plan();
        let size = 16384;
        let offs: Vec<u64> = (0..6).map(|i| p.offset_of(i, size)).collect();
        // qemu-img 10.0.2 wraps at the image size, not at `size - bufsize`.
        assert_eq!(offs, [0, 4096, 8192, 12288, 0, 4096]);
        assert_eq!(p.offset_of(5, 4096), 0);
        assert_eq!(p.offset_of(3, 0), 0);
        let q = Plan {
            step: 1536 * 1024,
            bufsize: 1 << 20,
            ..plan()
        };
        let offs: Vec<u64> = (0..5).map(|i| q.offset_of(i, 4 << 20)).collect();
        assert_eq!(offs, [0, 1536 << 10, 3 << 20, 512 << 10, 2 << 20]);
    }
}
