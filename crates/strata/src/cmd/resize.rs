//! `resize [-f fmt] [--preallocation=mode] [--shrink] [-q] filename [+|-]size`.

use std::ffi::OsString;

use strata_core::Prealloc;

use crate::cli::{CmdResult, Fail};
use crate::cmd::common::FormatArg;
use crate::options::{Opts, create_opts};

/// Flags of `resize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// Preallocation mode for the new area
    #[arg(long = "preallocation")]
    prealloc: Option<String>,
    /// Allow shrinking
    #[arg(long = "shrink")]
    shrink: bool,
    /// Quiet mode
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// FILENAME [+-]SIZE
    #[arg(value_name = "ARG")]
    args: Vec<String>,
}

/// qemu-img accepts `resize img -1G`; clap would read `-1G` as flags, so move such a size
/// behind `--`.
pub fn protect_negative_size(argv: &mut Vec<OsString>) {
    let Some(pos) = argv.iter().position(|a| a == "resize") else {
        return;
    };
    if argv[pos + 1..].iter().any(|a| a == "--") {
        return;
    }
    let is_neg = |a: &OsString| {
        let s = a.to_string_lossy();
        let b = s.as_bytes();
        b.len() > 1 && b[0] == b'-' && b[1].is_ascii_digit()
    };
    if let Some(i) = argv[pos + 1..].iter().position(is_neg) {
        let v = argv.remove(pos + 1 + i);
        argv.push("--".into());
        argv.push(v);
    }
}

/// Parse the `[+-]SIZE` argument: (sign, bytes).
pub fn parse_relative(size: &str) -> Result<(i32, u64), Fail> {
    let (rel, s) = match size.as_bytes().first() {
        Some(b'+') => (1, &size[1..]),
        Some(b'-') => (-1, &size[1..]),
        _ => (0, size),
    };
    let mut o = Opts::new(create_opts("raw"));
    o.set("size", s).map_err(Fail::msg)?;
    Ok((rel, o.get_num("size").unwrap_or(0)))
}

/// Run `resize`.
pub fn run(a: Args) -> CmdResult {
    let prealloc = match &a.prealloc {
        Some(p) => Prealloc::parse(p)
            .ok_or_else(|| Fail::msg(format!("Invalid preallocation mode '{p}'")))?,
        None => Prealloc::Off,
    };
    let [filename, size] = a.args.as_slice() else {
        return Err(Fail::usage("Expecting image file name and size"));
    };
    let (rel, n) = parse_relative(size)?;
    exec(
        filename,
        a.format.fmt.as_deref(),
        rel,
        n,
        prealloc,
        a.shrink,
        a.quiet,
    )
}

/// Carry out the resize.
fn exec(
    filename: &str,
    fmt: Option<&str>,
    rel: i32,
    n: u64,
    prealloc: Prealloc,
    shrink: bool,
    quiet: bool,
) -> CmdResult {
    let rt = crate::open::runtime()?;
    rt.block_on(async {
        let opts = crate::open::OpenOpts {
            fmt: fmt.map(str::to_string),
            read_only: false,
            ..Default::default()
        };
        let img = crate::open::open(filename, &opts).await?;
        let node = img.node();
        let current = node.size() as i128;
        let total: i128 = match rel {
            0 => n as i128,
            r => current + i128::from(r) * n as i128,
        };
        let result = if total <= 0 {
            Err(Fail::msg("New image size must be positive"))
        } else if total <= current && prealloc != Prealloc::Off {
            Err(Fail::msg(
                "Preallocation can only be used for growing images",
            ))
        } else if total < current && !shrink {
            crate::cli::error_report("Use the --shrink option to perform a shrink operation.");
            crate::cli::warn_report(
                "Shrinking an image will delete all data beyond the shrunken image's end. \
                 Before performing such an operation, make sure there is no important data there.",
            );
            Err(Fail::code(1))
        } else {
            node.truncate(total as u64, prealloc)
                .await
                .map_err(|e| Fail::msg(e.to_string()))
        };
        let closed = img.close().await;
        result?;
        closed?;
        crate::qprint!(quiet, "Image resized.\n");
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_sizes() {
        assert_eq!(parse_relative("+1G").unwrap(), (1, 1 << 30));
        assert_eq!(parse_relative("-512").unwrap(), (-1, 512));
        assert_eq!(parse_relative("2M").unwrap(), (0, 2 << 20));
        assert!(parse_relative("abc").is_err());
    }

    #[test]
    fn negative_size_goes_behind_double_dash() {
        let mut v: Vec<OsString> = ["strata", "resize", "--shrink", "img", "-1G"]
            .iter()
            .map(Into::into)
            .collect();
        protect_negative_size(&mut v);
        assert_eq!(v, ["strata", "resize", "--shrink", "img", "--", "-1G"]);
    }
}
