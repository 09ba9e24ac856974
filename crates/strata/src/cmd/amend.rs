//! `amend [-f fmt] [-t cache] [--force] [-p] [-q] -o options filename`: change qcow2 header
//! options in place.

use crate::cli::{CacheMode, CmdResult, Fail};
use crate::cmd::common::{CacheArg, FormatArg, ProgressArgs};
use crate::open::OpenOpts;
use crate::options::Opts;
use crate::progress::Progress;

/// Flags of `amend`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Options to change
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    #[command(flatten)]
    format: FormatArg,
    #[command(flatten)]
    cache: CacheArg,
    /// Allow certain unsafe operations
    #[arg(long = "force")]
    force: bool,
    #[command(flatten)]
    pq: ProgressArgs,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// Run `amend`.
pub fn run(a: Args) -> CmdResult {
    let Some(options) = crate::options::accumulate(&a.options)? else {
        return Err(Fail::usage("Must specify options (-o)"));
    };
    let progress = a.pq.show();
    let help = crate::options::has_help(&options);
    if let Some(fmt) = &a.format.fmt
        && help
    {
        return print_help(fmt);
    }
    let [filename] = a.args.as_slice() else {
        return Err(Fail::msg("Expecting one image file name"));
    };
    let cache = a.cache.mode()?;
    exec(
        filename,
        a.format.fmt.as_deref(),
        &options,
        cache,
        a.force,
        progress,
        help,
    )
}

/// Amend's `-o help`.
fn print_help(fmt: &str) -> CmdResult {
    if !crate::options::is_known_format(fmt) {
        return Err(Fail::msg(format!("Unknown file format '{fmt}'")));
    }
    if crate::options::amend_opts(fmt).is_none() {
        return Err(Fail::msg(format!(
            "Format driver '{fmt}' does not support option amendment"
        )));
    }
    print!("{}", crate::options::amend_help_text(fmt));
    Ok(0)
}

/// Carry out the amendment.
fn exec(
    filename: &str,
    fmt: Option<&str>,
    options: &str,
    cache: CacheMode,
    force: bool,
    progress: bool,
    help: bool,
) -> CmdResult {
    let _ = force;
    let bar = Progress::new(progress, 1.0);
    let rt = crate::open::runtime()?;
    let res = rt.block_on(async {
        let o = OpenOpts {
            fmt: fmt.map(str::to_string),
            read_only: false,
            cache,
            ..Default::default()
        };
        let img = crate::open::open(filename, &o).await?;
        let res = amend(&img, options, help, &bar).await;
        let closed = img.close().await;
        res?;
        closed.map(|()| 0)
    });
    bar.end();
    res
}

async fn amend(img: &crate::open::Image, options: &str, help: bool, bar: &Progress) -> CmdResult {
    let node = img.node();
    let fmt = node.driver();
    if help {
        return print_help(fmt);
    }
    let (Some(q), Some(desc)) = (img.qcow2(), crate::options::amend_opts(fmt)) else {
        return Err(Fail::msg(format!(
            "Format driver '{fmt}' does not support option amendment"
        )));
    };
    let mut opts = Opts::new(desc.to_vec());
    if let Err(e) = opts.parse(options) {
        // Say so when the option exists, but only for creation.
        let mut create = Opts::new(crate::options::create_opts(fmt));
        let hint = if create.parse(options).is_ok() {
            "\nThis option is only supported for image creation"
        } else {
            ""
        };
        return Err(Fail::msg(format!("{e}{hint}")));
    }
    bar.print(0.0, 0);
    let h = q.header();
    let backing = opts.get_str("backing_file");
    let backing_fmt = opts.get_str("backing_fmt");
    if (backing.is_some() || backing_fmt.is_some())
        && (backing != h.backing_file || backing_fmt != h.backing_format)
    {
        return Err(Fail::msg(
            "Cannot amend the backing file\nYou can use 'strata rebase' instead.",
        ));
    }
    if opts.keys().any(|k| k.starts_with("encrypt.")) {
        return Err(Fail::msg(
            "Can't amend encryption options - encryption not present",
        ));
    }
    let compat_v3 = match opts.get_str("compat").as_deref() {
        None => None,
        Some("1.1") | Some("v3") => Some(true),
        Some("0.10") | Some("v2") => Some(false),
        Some(v) => return Err(Fail::msg(format!("Unknown compatibility level {v}"))),
    };
    let ao = strata_qcow2::AmendOptions {
        compat_v3,
        lazy_refcounts: opts.get_bool("lazy_refcounts"),
        // Out-of-range widths are refused by the driver with QEMU's text.
        refcount_bits: opts
            .get_num("refcount_bits")
            .map(|v| u32::try_from(v).unwrap_or(0)),
        data_file: opts.get_str("data_file"),
        data_file_raw: opts.get_bool("data_file_raw"),
        size: opts.get_num("size").filter(|&s| s != 0),
    };
    q.amend(&ao).await.map_err(|e| Fail::msg(e.to_string()))?;
    bar.print(100.0, 0);
    Ok(0)
}
