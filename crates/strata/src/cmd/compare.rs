//! `compare [-f fmt] [-F fmt] [-s] [-T cache] [-U] [-p] [-q] file1 file2`: exit 0 when the
//! images read the same, 1 when they differ, 2 and more on errors.

use std::sync::Arc;

use strata_graph::compare::CompareOptions;

use crate::cli::{CmdResult, Fail};
use crate::cmd::common::{ForceShareArg, ProgressArgs, SourceCacheArg};
use crate::progress::Progress;

/// Flags of `compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the first image
    #[arg(short = 'f', long = "a-format")]
    fmt1: Option<String>,
    /// Format of the second image
    #[arg(short = 'F', long = "b-format")]
    fmt2: Option<String>,
    /// Strict mode: sizes and allocation must match too
    #[arg(short = 's', long = "strict")]
    strict: bool,
    #[command(flatten)]
    cache: SourceCacheArg,
    #[command(flatten)]
    force_share: ForceShareArg,
    #[command(flatten)]
    pq: ProgressArgs,
    /// FILENAME1 FILENAME2
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// Run `compare`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let [f1, f2] = a.args.as_slice() else {
        return Err(Fail::usage("Expecting two image file names"));
    };
    // compare's errors exit 2 ("error while comparing").
    let cache = a.cache.mode().map_err(|e| e.with_code(2))?;
    let progress = a.pq.show();
    let bar = Arc::new(Progress::new(progress, 2.0));
    let rt = crate::open::runtime()?;
    let code = rt.block_on(async {
        let open = |fmt: Option<String>| crate::open::OpenOpts {
            fmt,
            cache,
            ..Default::default()
        };
        let img1 = crate::open::open(f1, &open(a.fmt1.clone()))
            .await
            .map_err(|f| f.with_code(2))?;
        let img2 = crate::open::open(f2, &open(a.fmt2.clone()))
            .await
            .map_err(|f| f.with_code(2))?;
        bar.print(0.0, 100);
        let report = bar.clone();
        let opts = CompareOptions {
            strict: a.strict,
            progress: Some(Arc::new(move |done, total| {
                report.set_fraction(done, total)
            })),
        };
        let outcome =
            strata_graph::compare::compare_images(&img1.node(), f1, &img2.node(), f2, &opts).await;
        let _ = img2.close().await;
        let _ = img1.close().await;
        match outcome {
            Ok(o) => {
                crate::qprint!(a.pq.quiet, "{}", o.text());
                Ok(o.exit_code())
            }
            Err(e) => Err(Fail::msg(e.error.message().to_string()).with_code(e.exit_code)),
        }
    });
    bar.end();
    code
}
