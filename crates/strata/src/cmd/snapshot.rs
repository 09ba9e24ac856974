//! `snapshot [-f fmt] [-l | -a|-c|-d name] [-U] [-q] filename`: list internal snapshots in
//! qemu-img's table format, or create, apply or delete one (qcow2 only).

use strata_core::error::strerror;

use crate::cli::{CmdResult, Fail};
use crate::cmd::common::{ForceShareArg, FormatArg, one_filename};
use crate::cmd::info;
use crate::open::OpenOpts;

/// Flags of `snapshot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// List snapshots (the default)
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// Create a snapshot
    #[arg(short = 'c', long = "create")]
    create: Option<String>,
    /// Apply a snapshot
    #[arg(short = 'a', long = "apply")]
    apply: Option<String>,
    /// Delete a snapshot
    #[arg(short = 'd', long = "delete")]
    delete: Option<String>,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// Quiet mode
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// Run `snapshot`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let actions = usize::from(a.list)
        + usize::from(a.create.is_some())
        + usize::from(a.apply.is_some())
        + usize::from(a.delete.is_some());
    if actions > 1 {
        return Err(Fail::usage("Cannot mix '-l', '-a', '-c', '-d'"));
    }
    let filename = one_filename(&a.args)?;
    let action = if let Some(n) = a.create {
        Action::Create(n)
    } else if let Some(n) = a.apply {
        Action::Apply(n)
    } else if let Some(n) = a.delete {
        Action::Delete(n)
    } else {
        return exec(filename, a.format.fmt.as_deref());
    };
    modify(filename, a.format.fmt.as_deref(), &action)
}

/// A snapshot change.
#[derive(Debug)]
enum Action {
    Create(String),
    Apply(String),
    Delete(String),
}

/// Create, apply or delete a snapshot, with qemu-img's error texts.
fn modify(filename: &str, fmt: Option<&str>, action: &Action) -> CmdResult {
    let rt = crate::open::runtime()?;
    rt.block_on(async {
        let o = OpenOpts {
            fmt: fmt.map(str::to_string),
            read_only: false,
            ..Default::default()
        };
        let img = crate::open::open(filename, &o).await?;
        let res = match img.qcow2() {
            None => Err(strata_core::Error::unsupported("Operation not supported")),
            Some(q) => match action {
                Action::Create(n) => q.snapshot_create(n).await,
                Action::Apply(n) => q.snapshot_apply(n).await,
                Action::Delete(n) => q.snapshot_delete(n).await,
            },
        };
        let closed = img.close().await;
        if let Err(e) = res {
            return Err(Fail::msg(match action {
                // qemu-img reports only the errno here.
                Action::Create(n) => format!(
                    "Could not create snapshot '{n}': {}",
                    strerror(e.kind().errno())
                ),
                Action::Apply(n) => format!("Could not apply snapshot '{n}': {e}"),
                Action::Delete(n) => format!("Could not delete snapshot '{n}': {e}"),
            }));
        }
        closed?;
        Ok(0)
    })
}

/// List the snapshots (qemu-img's `dump_snapshots`).
fn exec(filename: &str, fmt: Option<&str>) -> CmdResult {
    let rt = crate::open::runtime()?;
    rt.block_on(async {
        let o = OpenOpts {
            fmt: fmt.map(str::to_string),
            ..Default::default()
        };
        let img = crate::open::open(filename, &o).await?;
        let snaps = img
            .qcow2()
            .map(|q| q.format_info().snapshots)
            .unwrap_or_default();
        img.close().await?;
        if !snaps.is_empty() {
            let mut out = format!("Snapshot list:\n{}\n", info::snapshot_header());
            for s in &snaps {
                out.push_str(&info::snapshot_row(&info::snapshot_info(s)));
                out.push('\n');
            }
            print!("{out}");
        }
        Ok(0)
    })
}
