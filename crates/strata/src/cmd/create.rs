//! `create [-f fmt] [-o options] [-b backing [-F backing_fmt]] [-u] [-q] filename [size]`.

use crate::cli::{CmdResult, Fail};
use crate::options;
use crate::units::cvtnum;

/// Flags of `create`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the new image (default: raw)
    #[arg(short = 'f', long = "format", default_value = "raw")]
    fmt: String,
    /// Format-specific options ('-o help' lists them)
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Create the image as a CoW overlay on top of this file
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file
    #[arg(short = 'F', long = "backing-format")]
    backing_fmt: Option<String>,
    /// Do not fail if the backing file cannot be opened
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_backing: bool,
    /// Quiet mode
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// FILENAME [SIZE]
    #[arg(allow_hyphen_values = true, value_name = "ARG")]
    args: Vec<String>,
}

/// Run `create`.
pub fn run(a: Args) -> CmdResult {
    let opt_list = options::accumulate(&a.options)?;
    let filename = a.args.first().cloned();
    if let Some(list) = &opt_list
        && options::has_help(list)
    {
        return print_help(&a.fmt, filename.as_deref());
    }
    let Some(filename) = filename else {
        return Err(Fail::usage("Expecting image file name"));
    };
    let size = match a.args.get(1) {
        Some(s) => Some(cvtnum("image size", s, true)? as u64),
        None => None,
    };
    if let Some(extra) = a.args.get(2) {
        return Err(Fail::usage(format!("Unexpected argument: {extra}")));
    }
    let req = crate::image_create::CreateRequest {
        filename: filename.clone(),
        fmt: a.fmt,
        options: opt_list,
        size,
        backing: a.backing,
        backing_fmt: a.backing_fmt,
        unsafe_backing: a.unsafe_backing,
        quiet: a.quiet,
    };
    let rt = crate::open::runtime()?;
    rt.block_on(crate::image_create::img_create(&req))
        .map_err(|e| Fail::msg(format!("{filename}: {e}")))?;
    Ok(0)
}

/// `-o help`: the format's option list.
pub fn print_help(fmt: &str, filename: Option<&str>) -> CmdResult {
    if options::format_opts(fmt).is_none() {
        return Err(Fail::msg(format!("Unknown file format '{fmt}'")));
    }
    print!("{}", options::help_text(fmt, filename.is_some()));
    Ok(0)
}
