//! `snapshot [-f fmt] [-l | -a|-c|-d name] [-U] [-q] filename`: list internal snapshots in
//! qemu-img's table format. Creating, applying and deleting snapshots are not supported yet.

use crate::cli::{CmdResult, Fail};
use crate::cmd::info;
use crate::open::OpenOpts;

/// Flags of `snapshot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format (default: probing is used)
    #[arg(short = 'f', long = "format")]
    fmt: Option<String>,
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
    /// Open in shared mode (accepted; images are not locked)
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// Quiet mode
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// Run `snapshot`.
pub fn run(a: Args) -> CmdResult {
    let actions = usize::from(a.list)
        + usize::from(a.create.is_some())
        + usize::from(a.apply.is_some())
        + usize::from(a.delete.is_some());
    if actions > 1 {
        return Err(Fail::usage("Cannot mix '-l', '-a', '-c', '-d'"));
    }
    let [filename] = a.args.as_slice() else {
        return Err(Fail::usage("Expecting one image file name"));
    };
    if a.create.is_some() || a.apply.is_some() || a.delete.is_some() {
        return Err(Fail::msg(
            "snapshot: creating, applying and deleting snapshots is not implemented yet",
        ));
    }
    exec(filename, a.fmt.as_deref())
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
