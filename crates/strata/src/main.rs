//! `strata`: qemu-img's commands on Strata's engine, flag- and output-compatible with
//! qemu-img 10.0 so scripts work unchanged (errors print "strata: ..." instead of
//! "qemu-img: ...", with the same exit statuses).
//!
//! Layout: `main.rs` parses and dispatches; `cmd/` has one module per subcommand (flags and
//! `run`); `bench.rs` is `bench`; `open.rs` opens images (qemu-img's `img_open`);
//! `image_create.rs` is qemu-img's `bdrv_img_create`; `options.rs` parses `-o` strings;
//! `units.rs` parses sizes; `output.rs` prints sizes, QEMU's JSON and its human dumps;
//! `progress.rs` is `-p`.
//!
//! Not supported yet: `rebase -c` (fails with "not implemented yet"), `--image-opts`,
//! `--object`.

mod bench;
mod cli;
mod cmd;
mod image_create;
mod jobs;
mod open;
mod options;
mod output;
mod progress;
mod units;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

use crate::cli::{CmdResult, PROG};

/// QEMU disk image utility, Strata edition.
#[derive(Debug, Parser)]
#[command(name = "strata", version, disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Update format-specific options of the image
    Amend(cmd::amend::Args),
    /// Run a simple image benchmark
    Bench(bench::Args),
    /// Perform modifications of the persistent bitmap in the image
    Bitmap(cmd::bitmap::Args),
    /// Check basic image integrity
    Check(cmd::check::Args),
    /// Commit image to its backing file
    Commit(cmd::commit::Args),
    /// Check if two images have the same contents
    Compare(cmd::compare::Args),
    /// Copy one or more images to another with optional format conversion
    Convert(cmd::convert::Args),
    /// Create and format a new image file
    Create(cmd::create::Args),
    /// Copy input to output with optional format conversion
    Dd(cmd::dd::Args),
    /// Display information about the image
    Info(cmd::info::Args),
    /// Control the jobs of a running daemon (stratad or qemu-storage-daemon)
    Job(cmd::job::Args),
    /// Dump image metadata
    Map(cmd::map::Args),
    /// Calculate the file size required for a new image
    Measure(cmd::measure::Args),
    /// Change the backing file of the image
    Rebase(cmd::rebase::Args),
    /// Resize the image
    Resize(cmd::resize::Args),
    /// List or manipulate snapshots in the image
    Snapshot(cmd::snapshot::Args),
}

fn main() {
    let code = run(std::env::args_os().collect());
    std::process::exit(code);
}

/// Parse, dispatch and turn the outcome into an exit status.
fn run(mut argv: Vec<OsString>) -> i32 {
    cmd::resize::protect_negative_size(&mut argv);
    let subcmd = argv
        .iter()
        .skip(1)
        .find(|a| !a.to_string_lossy().starts_with('-'))
        .map(|a| a.to_string_lossy().into_owned());
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => return clap_error(e, subcmd.as_deref()),
    };
    let name = subcommand_name(&cli.cmd);
    let result: CmdResult = match cli.cmd {
        Cmd::Amend(a) => cmd::amend::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Bitmap(a) => cmd::bitmap::run(a),
        Cmd::Check(a) => cmd::check::run(a),
        Cmd::Commit(a) => cmd::commit::run(a),
        Cmd::Compare(a) => cmd::compare::run(a),
        Cmd::Convert(a) => cmd::convert::run(a),
        Cmd::Create(a) => cmd::create::run(a),
        Cmd::Dd(a) => cmd::dd::run(a),
        Cmd::Info(a) => cmd::info::run(a),
        Cmd::Job(a) => cmd::job::run(a),
        Cmd::Map(a) => cmd::map::run(a),
        Cmd::Measure(a) => cmd::measure::run(a),
        Cmd::Rebase(a) => cmd::rebase::run(a),
        Cmd::Resize(a) => cmd::resize::run(a),
        Cmd::Snapshot(a) => cmd::snapshot::run(a),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            if let Some(m) = f.message() {
                cli::error_report(m);
            }
            if f.wants_help_hint() {
                eprintln!("Try '{PROG} {name} --help' for more info");
            }
            f.exit_code()
        }
    }
}

fn subcommand_name(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Amend(_) => "amend",
        Cmd::Bench(_) => "bench",
        Cmd::Bitmap(_) => "bitmap",
        Cmd::Check(_) => "check",
        Cmd::Commit(_) => "commit",
        Cmd::Compare(_) => "compare",
        Cmd::Convert(_) => "convert",
        Cmd::Create(_) => "create",
        Cmd::Dd(_) => "dd",
        Cmd::Info(_) => "info",
        Cmd::Job(_) => "job",
        Cmd::Map(_) => "map",
        Cmd::Measure(_) => "measure",
        Cmd::Rebase(_) => "rebase",
        Cmd::Resize(_) => "resize",
        Cmd::Snapshot(_) => "snapshot",
    }
}

/// Report a command-line error the way qemu-img's getopt loop does, with exit status 1.
fn clap_error(e: clap::Error, subcmd: Option<&str>) -> i32 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            0
        }
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("{PROG}: Not enough arguments");
            eprintln!("Try '{PROG} --help' for more info");
            1
        }
        ErrorKind::InvalidSubcommand => {
            eprintln!("{PROG}: Command not found: {}", subcmd.unwrap_or(""));
            eprintln!("Try '{PROG} --help' for more info");
            1
        }
        _ => {
            // clap's first line, without its "error: " prefix.
            let rendered = e.to_string();
            let what = rendered
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ")
                .to_string();
            match subcmd {
                Some(c) => {
                    eprintln!("{PROG} {c}: {what}");
                    eprintln!("Try '{PROG} {c} --help' for more info");
                }
                None => {
                    eprintln!("{PROG}: {what}");
                    eprintln!("Try '{PROG} --help' for more info");
                }
            }
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn unknown_command_exits_1() {
        assert_eq!(run(vec!["strata".into(), "frobnicate".into()]), 1);
        assert_eq!(run(vec!["strata".into()]), 1);
    }
}
