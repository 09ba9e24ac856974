//! `check [-f fmt] [-T cache] [-r leaks|all] [-U] [--output=human|json] [-q] filename`.
//!
//! Exit statuses as qemu-img: 0 clean, 1 check not completed, 2 corruptions, 3 only leaks,
//! 63 format without checks.

use strata_qcow2::check::{self, RepairMode};

use crate::cli::{CmdResult, Fail, OutputFormat, parse_output};
use crate::cmd::common::{ForceShareArg, FormatArg, SourceCacheArg, one_filename};

/// Flags of `check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    format: FormatArg,
    #[command(flatten)]
    cache: SourceCacheArg,
    /// Repair leaks or all errors
    #[arg(short = 'r', long = "repair")]
    repair: Option<String>,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// Output format: human or json
    #[arg(long = "output")]
    output: Option<String>,
    /// Quiet mode
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// What `-r` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Only look.
    None,
    /// Fix leaked clusters.
    Leaks,
    /// Fix leaks and corruptions.
    All,
}

/// Run `check`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let repair = match a.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => {
            return Err(Fail::usage(format!(
                "--repair (-r) expects 'leaks' or 'all' not '{other}'"
            )));
        }
    };
    let output = parse_output(a.output.as_deref())?;
    let filename = one_filename(&a.args)?;
    let cache = a.cache.mode()?;
    exec(
        filename,
        a.format.fmt.as_deref(),
        cache,
        repair,
        output,
        a.quiet,
    )
}

/// Report an overlay whose recorded backing file changed since (Strata's backing-file
/// validation, `strata_qcow2::identity`): the message on stderr and, when it changed, exit
/// status 2 as for corruptions (reading through it shows corrupt data), unless the check
/// found worse. Images without a record are reported as before.
fn backing_verdict(filename: &str, code: i32) -> i32 {
    use strata_qcow2::identity::{CheckPolicy, Verdict, check_policy, verify_file};
    if check_policy() == CheckPolicy::Off {
        return code;
    }
    match verify_file(filename) {
        Some((_, Verdict::Changed(_), text)) => {
            eprintln!("ERROR {text}");
            if code == 0 || code == 3 { 2 } else { code }
        }
        Some((_, Verdict::Unknown(_), text)) => {
            eprintln!("Warning: {text}");
            code
        }
        _ => code,
    }
}

/// Carry out the check on the protocol node (a damaged image must not need a full open).
fn exec(
    filename: &str,
    fmt: Option<&str>,
    cache: crate::cli::CacheMode,
    repair: Repair,
    output: OutputFormat,
    quiet: bool,
) -> CmdResult {
    let rt = crate::open::runtime()?;
    rt.block_on(async {
        let opts = crate::open::OpenOpts {
            fmt: Some("file".to_string()),
            read_only: repair == Repair::None,
            cache,
            ..Default::default()
        };
        let file = crate::open::open(filename, &opts).await?;
        let node = file.node();
        let format = match fmt {
            Some(f) => f.to_string(),
            None => crate::open::probe_format(&node)
                .await
                .map_err(|e| Fail::msg(format!("Could not open '{filename}': {e}")))?
                .to_string(),
        };
        if format == "qcow2" {
            crate::open::lock_as_qcow2_file(&node, repair == Repair::None)
                .map_err(|e| Fail::msg(format!("Could not open '{filename}': {e}")))?;
        }
        if format != "qcow2" {
            if crate::options::is_known_format(&format) {
                return Err(Fail::msg("This image format does not support checks").with_code(63));
            }
            return Err(Fail::msg(format!(
                "Could not open '{filename}': Unknown driver '{format}'"
            )));
        }
        let mode = match repair {
            Repair::None => None,
            Repair::Leaks => Some(RepairMode::Leaks),
            Repair::All => Some(RepairMode::All),
        };
        let report = check::check(&node, mode)
            .await
            .map_err(|e| Fail::msg(format!("Could not open '{filename}': {e}")))?;
        for m in &report.messages {
            eprintln!("{m}");
        }
        let text = match output {
            OutputFormat::Human => report.render_human(),
            OutputFormat::Json => report.render_json(filename),
        };
        crate::qprint!(quiet, "{text}");
        file.close().await?;
        if let Some(line) = report.failure_line() {
            return Err(Fail::msg(line));
        }
        Ok(backing_verdict(filename, report.exit_code()))
    })
}
