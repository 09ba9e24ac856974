//! `rebase [-f fmt] [-t cache] [-b backing|"" [-F fmt] [-T cache]] [-u] [-c] [-U] [-p] [-q]
//! filename`: in safe mode, copy what differs between the old and the new backing file into
//! the image before switching; `-u` only rewrites the header.

use std::sync::Arc;

use strata_core::NodeRef;
use strata_graph::{RebaseOptions, rebase_data};

use crate::cli::{CacheMode, CmdResult, Fail};
use crate::cmd::common::{
    ForceShareArg, FormatArg, ProgressArgs, cache_option, one_filename, source_cache_option,
};
use crate::open::OpenOpts;
use crate::progress::Progress;
use strata_graph::{CompressedWrite, Qcow2Compressed};

/// Flags of `rebase`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// Cache mode for the image (default: writeback)
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: String,
    /// New backing file ("" for none)
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the new backing file
    #[arg(short = 'F', long = "backing-format")]
    backing_fmt: Option<String>,
    /// Cache mode for the backing files (default: writeback)
    #[arg(short = 'T', long = "backing-cache", default_value = "writeback")]
    src_cache: String,
    /// Unsafe mode: only rewrite the backing file name
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_mode: bool,
    /// Compress the data written into the image
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    #[command(flatten)]
    force_share: ForceShareArg,
    #[command(flatten)]
    pq: ProgressArgs,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// Run `rebase`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let filename = one_filename(&a.args)?;
    if !a.unsafe_mode && a.backing.is_none() {
        return Err(Fail::usage(
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    let cache = cache_option(&a.cache)?;
    source_cache_option(&a.src_cache)?;
    let progress = a.pq.show();
    exec(
        filename,
        a.format.fmt.as_deref(),
        cache,
        a.backing.as_deref(),
        a.backing_fmt.as_deref(),
        a.unsafe_mode,
        a.compress,
        progress,
    )
}

/// Carry out the rebase.
#[allow(clippy::too_many_arguments)]
fn exec(
    filename: &str,
    fmt: Option<&str>,
    cache: CacheMode,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    unsafe_mode: bool,
    compress: bool,
    progress: bool,
) -> CmdResult {
    let bar = Arc::new(Progress::new(progress, 2.0));
    bar.print(0.0, 100);
    let rt = crate::open::runtime()?;
    let res = rt.block_on(async {
        let opts = OpenOpts {
            fmt: fmt.map(str::to_string),
            read_only: false,
            cache,
            no_backing: unsafe_mode,
            ..Default::default()
        };
        let img = crate::open::open(filename, &opts).await?;
        let res = rebase(
            &img,
            filename,
            backing,
            backing_fmt,
            unsafe_mode,
            compress,
            &bar,
        )
        .await;
        let closed = img.close().await;
        res?;
        closed
    });
    bar.end();
    res.map(|()| 0)
}

#[allow(clippy::too_many_arguments)]
async fn rebase(
    img: &crate::open::Image,
    filename: &str,
    backing: Option<&str>,
    backing_fmt: Option<&str>,
    unsafe_mode: bool,
    compress: bool,
    bar: &Arc<Progress>,
) -> Result<(), Fail> {
    let top = img.node();
    let compressor = if compress {
        match Qcow2Compressed::new(&top) {
            Some(c) => Some(c),
            None => return Err(Fail::msg("Compression not supported for this file format")),
        }
    } else {
        None
    };
    if let Some(f) = backing_fmt
        && !crate::options::is_known_format(f)
    {
        return Err(Fail::msg(format!("Invalid format name: '{f}'")));
    }
    if !unsafe_mode {
        let new = match backing {
            Some(b) if !b.is_empty() => {
                let path = crate::image_create::backing_path(filename, b);
                let o = OpenOpts {
                    fmt: backing_fmt.map(str::to_string),
                    ..Default::default()
                };
                let n = crate::open::open_raw_error(&path, &o).await.map_err(|e| {
                    Fail::msg(format!("Could not open new backing file '{b}': {e}"))
                })?;
                Some(n)
            }
            _ => None,
        };
        // When the new backing file is in the old chain, ranges nothing in between
        // allocates are equal on both sides (qemu-img's prefix_chain_bs).
        let common_base = new.as_ref().and_then(|n| {
            let want = std::fs::canonicalize(n.node().filename()).ok()?;
            let mut cur = top.backing();
            while let Some(c) = cur {
                if std::fs::canonicalize(c.filename()).ok().as_ref() == Some(&want) {
                    return Some(c);
                }
                cur = c.backing();
            }
            None
        });
        let report = bar.clone();
        // Compressed writes cover whole clusters (qemu-img aligns to the cluster, not the
        // subcluster, then).
        let write_align = match &compressor {
            Some(c) => c.cluster_size(),
            None => write_align(&top),
        };
        let opts = RebaseOptions {
            write_align,
            compress: compressor.map(|c| Arc::new(c) as Arc<dyn CompressedWrite>),
            common_base,
            progress: Some(Arc::new(move |done, total| {
                report.set_fraction(done, total)
            })),
            ..Default::default()
        };
        let old = top.backing();
        let new_node = new.as_ref().map(|n| n.node());
        let res = rebase_data(&top, old.as_ref(), new_node.as_ref(), &opts)
            .await
            .map(|_| ())
            .map_err(|e| Fail::msg(format!("Error while writing to COW image: {e}")));
        if let Some(n) = new {
            let _ = n.close().await;
        }
        res?;
    }
    let target = backing.filter(|b| !b.is_empty());
    let shown = backing.unwrap_or("");
    let Some(q) = img.qcow2() else {
        return Err(Fail::msg(format!(
            "Could not change the backing file to '{shown}': Operation not supported"
        )));
    };
    if target.is_some() && backing_fmt.is_none() {
        return Err(Fail::msg(format!(
            "Could not change the backing file to '{shown}': backing format must be specified"
        )));
    }
    q.set_backing(target, backing_fmt).await.map_err(|e| {
        if e.kind() == strata_core::ErrorKind::NoSpace || e.message().contains("fit") {
            Fail::msg(format!(
                "Could not change the backing file to '{shown}': No space left in the file header"
            ))
        } else {
            Fail::msg(format!(
                "Could not change the backing file to '{shown}': {e}"
            ))
        }
    })?;
    bar.print(100.0, 0);
    Ok(())
}

/// The image's (sub)cluster size: the unit rebase writes in, so that no partial cluster is
/// left for copy-on-write to fill from the new backing file.
fn write_align(node: &NodeRef) -> u64 {
    match node.as_any().downcast_ref::<strata_qcow2::Qcow2>() {
        Some(q) => {
            let h = q.header();
            if h.extended_l2() {
                h.cluster_size() / 32
            } else {
                h.cluster_size()
            }
        }
        None => 512,
    }
}
