//! `commit [-f fmt] [-t cache] [-b base] [-d] [-r rate] [-p] [-q] filename`: copy the top
//! image's data into its backing file (or `base`), then empty the top unless `-d`/`-b`.

use std::sync::Arc;

use strata_core::NodeRef;
use strata_graph::{CopyOptions, TargetInit};

use crate::cli::{CacheMode, CmdResult, Fail};
use crate::cmd::common::{CacheArg, FormatArg, ProgressArgs, one_filename};
use crate::open::OpenOpts;
use crate::progress::Progress;
use crate::units::cvtnum;

/// Flags of `commit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    format: FormatArg,
    #[command(flatten)]
    cache: CacheArg,
    /// Commit into this image of the backing chain (implies -d)
    #[arg(short = 'b', long = "base")]
    base: Option<String>,
    /// Do not empty the top image afterwards
    #[arg(short = 'd', long = "drop")]
    drop: bool,
    /// Strata extension: first copy the base's old data for every range the commit will
    /// change up into the image directly above the base, so every image left in the chain
    /// keeps its guest view even if the commit stops midway
    #[arg(long = "safe")]
    safe: bool,
    /// I/O rate limit (bytes per second)
    #[arg(short = 'r', long = "rate-limit")]
    rate: Option<String>,
    #[command(flatten)]
    pq: ProgressArgs,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// Run `commit`.
pub fn run(a: Args) -> CmdResult {
    let rate = match &a.rate {
        Some(r) => Some(cvtnum("rate limit", r, true)? as u64),
        None => None,
    };
    let filename = one_filename(&a.args)?;
    let cache = a.cache.mode()?;
    let drop = a.drop || a.base.is_some();
    let progress = a.pq.show();
    exec(
        filename,
        a.format.fmt.as_deref(),
        cache,
        a.base.as_deref(),
        Mode { drop, safe: a.safe },
        rate,
        progress,
        a.pq.quiet,
    )
}

/// What the commit does besides copying.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// Leave the top image as it is.
    drop: bool,
    /// Copy the base's old data up first (`--safe`).
    safe: bool,
}

/// Carry out the commit.
#[allow(clippy::too_many_arguments)]
fn exec(
    filename: &str,
    fmt: Option<&str>,
    cache: CacheMode,
    base: Option<&str>,
    mode: Mode,
    rate: Option<u64>,
    progress: bool,
    quiet: bool,
) -> CmdResult {
    // The rate limit only paces a job; offline we copy at full speed.
    let _ = rate;
    let bar = Arc::new(Progress::new(progress, 1.0));
    let rt = crate::open::runtime()?;
    let res = rt.block_on(commit(filename, fmt, cache, base, mode, bar.clone()));
    bar.end();
    res?;
    crate::qprint!(quiet, "Image committed.\n");
    Ok(0)
}

async fn commit(
    filename: &str,
    fmt: Option<&str>,
    cache: CacheMode,
    base: Option<&str>,
    mode: Mode,
    bar: Arc<Progress>,
) -> Result<(), Fail> {
    let opts = OpenOpts {
        fmt: fmt.map(str::to_string),
        read_only: false,
        cache,
        backing_writable: true,
        ..Default::default()
    };
    let img = crate::open::open(filename, &opts).await?;
    bar.print(0.0, 100);
    let top = img.node();
    let mut res = commit_into_base(&top, filename, base, mode.safe, bar.clone()).await;
    if res.is_ok() && !mode.drop {
        res = make_empty(&top).await;
    }
    if res.is_ok() {
        res = record_committed_backing(&top, filename, base).await;
    }
    let closed = img.close().await;
    res?;
    closed?;
    Ok(())
}

/// Find the base node and its file name: `-b base` or the immediate backing file.
fn find_base(top: &NodeRef, filename: &str, base: Option<&str>) -> Result<NodeRef, Fail> {
    match base {
        None => top
            .backing()
            .ok_or_else(|| Fail::msg("Image does not have a backing file")),
        Some(b) => {
            let want = std::fs::canonicalize(b).ok();
            let mut cur = top.backing();
            while let Some(n) = cur {
                let name = n.filename();
                if name == b || (want.is_some() && std::fs::canonicalize(&name).ok() == want) {
                    return Ok(n);
                }
                cur = n.backing();
            }
            Err(Fail::msg(format!(
                "Did not find '{b}' in the backing chain of '{filename}'"
            )))
        }
    }
}

/// The image of `top`'s chain whose backing node is `base`.
fn above_base(top: &NodeRef, base: &NodeRef) -> NodeRef {
    let mut cur = top.clone();
    while let Some(b) = cur.backing() {
        if strata_graph::status::same_node(&b, base) {
            break;
        }
        cur = b;
    }
    cur
}

async fn commit_into_base(
    top: &NodeRef,
    filename: &str,
    base: Option<&str>,
    safe: bool,
    bar: Arc<Progress>,
) -> Result<(), Fail> {
    let base_node = find_base(top, filename, base)?;
    let failed = |e: strata_core::Error| Fail::msg(format!("Block job failed: {e}"));
    if safe {
        let above = above_base(top, &base_node);
        strata_blockjobs::commit::copy_up_all(top, &above, &base_node)
            .await
            .map_err(failed)?;
    }
    let base_len = base_node.size();
    if base_len < top.size() {
        base_node
            .truncate(top.size(), strata_core::Prealloc::Off)
            .await
            .map_err(failed)?;
    }
    let report = bar.clone();
    let copy = CopyOptions {
        base: Some(base_node.clone()),
        target_init: TargetInit::Backing { len: base_len },
        progress: Some(Arc::new(move |done, total| {
            report.set_fraction(done, total)
        })),
        ..Default::default()
    };
    crate::jobs::copy(
        strata_job::JobType::Commit,
        top.clone(),
        base_node.clone(),
        copy,
    )
    .await
    .map_err(failed)?;
    base_node.flush().await.map_err(failed)?;
    bar.print(100.0, 0);
    Ok(())
}

/// After a commit into the immediate backing file, the top image still reads the same over
/// it: renew its record of the base (Strata's backing-file validation), so that only other
/// overlays of the base see it changed. Deeper commits leave the images between invalid,
/// as QEMU documents.
async fn record_committed_backing(
    top: &NodeRef,
    filename: &str,
    base: Option<&str>,
) -> Result<(), Fail> {
    let (Some(q), Ok(base_node)) = (
        top.as_any().downcast_ref::<strata_qcow2::Qcow2>(),
        find_base(top, filename, base),
    ) else {
        return Ok(());
    };
    let immediate = top
        .backing()
        .is_some_and(|b| strata_graph::status::same_node(&b, &base_node));
    // Only an overlay that keeps a record gets it renewed (others stay byte for byte
    // what qemu-img leaves).
    let recorded = strata_qcow2::identity::BackingRecord::of(&q.header()).is_some();
    if !immediate || !recorded {
        return Ok(());
    }
    base_node
        .flush()
        .await
        .map_err(|e| Fail::msg(format!("Block job failed: {e}")))?;
    q.record_backing()
        .await
        .map_err(|e| Fail::msg(format!("Could not record the backing file: {e}")))
}

/// Empty the top image so that it reads through to its backing file again (QEMU's
/// `blk_make_empty`): qcow2 images are emptied by the driver; other formats cannot be
/// emptied and are left as they are (qemu-img ignores `ENOTSUP` there too), which is safe
/// since the base now holds the same data.
async fn make_empty(top: &NodeRef) -> Result<(), Fail> {
    let Some(q) = top.as_any().downcast_ref::<strata_qcow2::Qcow2>() else {
        return Ok(());
    };
    q.make_empty().await.map_err(|e| Fail::msg(e.to_string()))
}
