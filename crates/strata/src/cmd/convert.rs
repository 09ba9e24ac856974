//! `convert [-f fmt] [-O fmt] [-o options] [-c] [-B backing [-F fmt]] [-n] [-t cache]
//! [-T src_cache] [-W] [-m num] [-S sparse_size] [--target-is-zero] [-p] [-q] src... dst`.

use std::sync::Arc;

use strata_core::error::strerror;
use strata_core::{ErrorKind, NodeRef};
use strata_graph::{CompressedWrite, CopyFailure, CopyOptions, RawOptions, TargetInit};

use crate::cli::{CmdResult, Fail};
use crate::cmd::common::{ForceShareArg, ProgressArgs, cache_option, source_cache_option};
use crate::open::OpenOpts;
use crate::options::{Opts, create_opts};
use crate::progress::Progress;
use crate::units::{cvtnum, cvtnum_full};
use strata_graph::Qcow2Compressed;

/// Largest `-S` in 512-byte sectors (qemu-img's `MAX_BUF_SECTORS`).
const MAX_BUF_SECTORS: i64 = 32768;
/// Largest `-m` (qemu-img's `MAX_COROUTINES`).
const MAX_COROUTINES: i64 = 16;

/// Flags of `convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Source format (default: probing is used)
    #[arg(short = 'f', long = "source-format")]
    fmt: Option<String>,
    /// Source cache mode (default: writeback)
    #[arg(short = 'T', long = "source-cache", default_value = "writeback")]
    src_cache: String,
    /// Target format (default: raw)
    #[arg(short = 'O', long = "target-format")]
    out_fmt: Option<String>,
    /// Target format options
    #[arg(short = 'o', long = "target-options")]
    options: Vec<String>,
    /// Compress the output (qcow2 only)
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Target cache mode (default: unsafe)
    #[arg(short = 't', long = "target-cache", default_value = "unsafe")]
    cache: String,
    /// Make the target a CoW overlay on top of this file
    #[arg(short = 'B', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file
    #[arg(short = 'F', long = "backing-format")]
    backing_fmt: Option<String>,
    /// Do not create the target
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,
    /// The target already reads as zeroes
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Consecutive zero bytes to treat as a gap
    #[arg(short = 'S', long = "sparse-size")]
    sparse: Option<String>,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// I/O rate limit (bytes per second)
    #[arg(short = 'r', long = "rate")]
    rate: Option<String>,
    /// Parallel requests (default 8)
    #[arg(short = 'm', long = "parallel")]
    parallel: Option<String>,
    /// Allow out-of-order writes
    #[arg(short = 'W', long = "oob-writes")]
    oob_writes: bool,
    #[command(flatten)]
    pq: ProgressArgs,
    /// SRC_FILENAME... TGT_FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// The validated request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Source images, concatenated in order.
    pub sources: Vec<String>,
    /// Target file name.
    pub target: String,
    /// Source format.
    pub fmt: Option<String>,
    /// Target format.
    pub out_fmt: String,
    /// Joined `-o` options.
    pub options: Option<String>,
    /// Write compressed clusters.
    pub compress: bool,
    /// Target cache mode.
    pub cache: crate::cli::CacheMode,
    /// Source cache mode.
    pub src_cache: crate::cli::CacheMode,
    /// `-B`.
    pub backing: Option<String>,
    /// `-F`.
    pub backing_fmt: Option<String>,
    /// `-n`.
    pub no_create: bool,
    /// `--target-is-zero`.
    pub target_is_zero: bool,
    /// `-S` in bytes (0: write every byte).
    pub min_sparse: u64,
    /// `-m`.
    pub parallel: usize,
    /// `-W`.
    pub oob_writes: bool,
    /// `-p` and not `-q`.
    pub progress: bool,
}

/// Run `convert`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let options = crate::options::accumulate(&a.options)?;
    let min_sparse = match &a.sparse {
        Some(s) => {
            let v = cvtnum("buffer size for sparse output", s, true)?;
            if v % 512 != 0 || v / 512 > MAX_BUF_SECTORS {
                return Err(Fail::msg(format!(
                    "Invalid buffer size for sparse output specified. Valid sizes are \
                     multiples of 512 up to {}. Select 0 to disable sparse detection \
                     (fully allocates output).",
                    MAX_BUF_SECTORS * 512
                )));
            }
            v as u64
        }
        None => 4096,
    };
    // A rate limit only paces the copy; it is checked like qemu-img but not applied.
    if let Some(r) = &a.rate {
        cvtnum("rate limit", r, true)?;
    }
    let parallel = match &a.parallel {
        Some(m) => cvtnum_full("number of coroutines", m, false, 1, MAX_COROUTINES)? as usize,
        None => 8,
    };
    let out_fmt = a.out_fmt.clone().unwrap_or_else(|| "raw".to_string());
    if a.no_create && options.is_some() {
        return Err(Fail::msg("-o has no effect when skipping image creation"));
    }
    if a.target_is_zero && !a.no_create {
        return Err(Fail::msg("--target-is-zero requires use of -n flag"));
    }
    let out_filename = if a.args.len() >= 2 {
        a.args.last().cloned()
    } else {
        None
    };
    if let Some(list) = &options
        && crate::options::has_help(list)
    {
        return crate::cmd::create::print_help(&out_fmt, out_filename.as_deref());
    }
    if a.args.len() < 2 {
        return Err(Fail::msg("Must specify image file name"));
    }
    let src_cache = source_cache_option(&a.src_cache)?;
    let cache = cache_option(&a.cache)?;
    let mut sources = a.args;
    let target = sources.pop().unwrap_or_default();
    let req = Request {
        sources,
        target,
        fmt: a.fmt,
        out_fmt,
        options,
        compress: a.compress,
        cache,
        src_cache,
        backing: a.backing,
        backing_fmt: a.backing_fmt,
        no_create: a.no_create,
        target_is_zero: a.target_is_zero,
        min_sparse,
        parallel,
        oob_writes: a.oob_writes,
        progress: a.pq.show(),
    };
    exec(req)
}

/// Carry out the conversion.
fn exec(req: Request) -> CmdResult {
    let progress = Arc::new(Progress::new(req.progress, 1.0));
    let rt = crate::open::runtime()?;
    let res = rt.block_on(convert(&req, progress.clone()));
    progress.end();
    res
}

async fn convert(req: &Request, progress: Arc<Progress>) -> CmdResult {
    progress.print(0.0, 100);
    let mut sources = Vec::new();
    for name in &req.sources {
        let opts = OpenOpts {
            fmt: req.fmt.clone(),
            cache: req.src_cache,
            ..Default::default()
        };
        sources.push(crate::open::open(name, &opts).await?);
    }
    let total: u64 = sources.iter().map(|s| s.node().size()).sum();

    let mut target_backing: Option<String> = req.backing.clone();
    let nbd_target = crate::open::is_nbd_uri(&req.target);
    if !req.no_create {
        if !crate::options::is_known_format(&req.out_fmt) {
            return Err(Fail::msg(format!("Unknown file format '{}'", req.out_fmt)));
        }
        let mut opts = Opts::new(create_opts(&req.out_fmt));
        if let Some(list) = &req.options {
            opts.parse(list).map_err(Fail::msg)?;
        }
        opts.set_number("size", total);
        if let Some(b) = &req.backing {
            if !opts.knows("backing_file") {
                return Err(Fail::msg(format!(
                    "Backing file not supported for file format '{}'",
                    req.out_fmt
                )));
            }
            opts.set("backing_file", b).map_err(Fail::msg)?;
        }
        if let Some(bf) = &req.backing_fmt {
            if !opts.knows("backing_fmt") {
                return Err(Fail::msg(format!(
                    "Backing file format not supported for file format '{}'",
                    req.out_fmt
                )));
            }
            opts.set("backing_fmt", bf).map_err(Fail::msg)?;
        }
        let param = opts.get_str("backing_file");
        if let Some(p) = &param {
            target_backing = Some(p.clone());
        }
        check_target(req, &target_backing, sources.len())?;
        if param.is_some() && req.backing.is_none() && opts.get_str("backing_fmt").is_none() {
            return Err(Fail::msg(
                "Use of backing file requires explicit backing format",
            ));
        }
        if req.compress {
            if req.out_fmt != "qcow2" {
                return Err(Fail::msg("Compression not supported for this file format"));
            }
            if opts.get_str("preallocation").is_some_and(|p| p != "off") {
                return Err(Fail::msg(
                    "Compression and preallocation not supported at the same time",
                ));
            }
        }
        if nbd_target {
            // Nothing to create on an export: it must be raw and big enough (below).
            if req.out_fmt != "raw" {
                return Err(Fail::msg(format!(
                    "{}: error while converting {}: Creating {} images on NBD exports is not supported",
                    req.target, req.out_fmt, req.out_fmt
                )));
            }
        } else {
            crate::image_create::create_image(&req.target, &req.out_fmt, total, &opts)
                .await
                .map_err(|e| {
                    Fail::msg(format!(
                        "{}: error while converting {}: {e}",
                        req.target, req.out_fmt
                    ))
                })?;
        }
    } else {
        check_target(req, &target_backing, sources.len())?;
    }

    let topts = OpenOpts {
        fmt: Some(req.out_fmt.clone()),
        read_only: false,
        cache: req.cache,
        ..Default::default()
    };
    let target = crate::open::open(&req.target, &topts).await?;
    let tnode = target.node();
    if req.compress && Qcow2Compressed::new(&tnode).is_none() {
        return Err(Fail::msg("Compression not supported for this file format"));
    }
    if (req.no_create || nbd_target) && tnode.size() < total {
        return Err(Fail::msg("output file is smaller than input file"));
    }
    let has_backing = target_backing.is_some();
    let init = if has_backing && !req.no_create {
        TargetInit::Backing {
            len: tnode.backing().map(|b| b.size()).unwrap_or(0),
        }
    } else if req.target_is_zero
        || (!req.no_create && !nbd_target && req.min_sparse > 0 && !has_backing)
    {
        TargetInit::Zero
    } else {
        TargetInit::Unknown
    };
    let align = match req.min_sparse {
        0 => tnode.request_alignment().max(512),
        s => (1u64 << (63 - s.leading_zeros())).max(tnode.request_alignment()),
    };
    let compress: Option<Arc<dyn CompressedWrite>> = if req.compress {
        Qcow2Compressed::new(&tnode).map(|c| Arc::new(c) as Arc<dyn CompressedWrite>)
    } else {
        None
    };
    let mut offset = 0u64;
    let mut result: Result<(), Fail> = Ok(());
    for src in &sources {
        let snode = src.node();
        let len = snode.size();
        let done_before = offset;
        let report = progress.clone();
        let opts = CopyOptions {
            base: if has_backing { snode.backing() } else { None },
            target_init: init,
            min_sparse: req.min_sparse,
            alignment: align,
            compress: compress.clone(),
            parallel: req.parallel,
            out_of_order: req.oob_writes,
            len: Some(len),
            progress: Some(Arc::new(move |done, _| {
                report.set_fraction(done_before + done, total)
            })),
            ..Default::default()
        };
        // Each source lands at its offset: give the engine a raw window onto the target.
        let window: NodeRef = if sources.len() == 1 {
            tnode.clone()
        } else {
            Arc::new(
                strata_graph::RawNode::open(
                    tnode.clone(),
                    RawOptions {
                        offset,
                        size: Some(len),
                        probed: false,
                    },
                )
                .map_err(Fail::from)?,
            )
        };
        let job = crate::jobs::copy(
            strata_job::JobType::Mirror,
            snode.clone(),
            window.clone(),
            opts,
        );
        if let Err(e) = job.await {
            result = Err(copy_failure(&e, offset));
            break;
        }
        offset += len;
    }
    let closed = target.close().await;
    for s in sources {
        let _ = s.close().await;
    }
    result?;
    closed?;
    progress.print(100.0, 0);
    Ok(0)
}

/// The checks qemu-img makes once it knows whether the target has a backing file.
/// qemu-img's words for a failed copy of the source that starts at byte `base` of the
/// target: "error while {reading,writing} at byte N: <strerror>" (N the start of the chunk)
/// or "error while reading block status at offset N: <strerror>". A qcow2 corruption is told
/// first on a line of its own, as QEMU's `qcow2_signal_corruption` does.
fn copy_failure(e: &strata_core::Error, base: u64) -> Fail {
    let Some((step, detail)) = CopyFailure::of(e) else {
        return Fail::msg(format!("error while converting: {e}"));
    };
    if e.kind() == ErrorKind::Corrupt {
        if detail.starts_with("Marking image as corrupt: ") {
            eprintln!("qcow2: {detail}");
        } else {
            eprintln!(
                "qcow2: Image is corrupt: {detail}; further non-fatal corruption events will be \
                 suppressed"
            );
        }
    }
    let why = strerror(e.kind().errno());
    Fail::msg(match step {
        CopyFailure::BlockStatus(at) => {
            format!(
                "error while reading block status at offset {}: {why}",
                base + at
            )
        }
        CopyFailure::Read(at) => format!("error while reading at byte {}: {why}", base + at),
        CopyFailure::Write(at) => format!("error while writing at byte {}: {why}", base + at),
    })
}

fn check_target(req: &Request, backing: &Option<String>, nsrc: usize) -> Result<(), Fail> {
    if req.target_is_zero && backing.is_some() {
        return Err(Fail::msg(
            "Cannot use --target-is-zero when the destination image has a backing file",
        ));
    }
    if nsrc > 1 && backing.is_some() {
        return Err(Fail::msg(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images",
        ));
    }
    Ok(())
}
