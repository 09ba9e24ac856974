//! `bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
//! [-f fmt] [-b source_file [-F source_fmt]] [-g granularity] filename bitmap`: qemu-img's
//! `img_bitmap`. Actions run in command-line order on an image opened read-write; the
//! bitmaps are stored when it is closed.
//!
//! The flags are parsed here (not by clap) because their order is the order of the actions.

use strata_qcow2::Qcow2;

use crate::cli::{CmdResult, Fail};
use crate::open::OpenOpts;
use crate::units::cvtnum;

/// Arguments of `bitmap`, parsed by [`parse`] since their order matters.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// ( --merge SOURCE | --add | --remove | --clear | --enable | --disable ).. [-f FMT]
    /// [-b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE] FILENAME BITMAP
    #[arg(
        value_name = "ARGS",
        num_args = 0..,
        allow_hyphen_values = true,
        trailing_var_arg = true
    )]
    raw: Vec<String>,
}

const HELP: &str = "Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  strata bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly
  --add
     creates BITMAP, enables to record future edits
   -g, --granularity SIZE[KMGTPE]
     sets non-default bitmap granularity for --add to this size
  --remove
     removes BITMAP
  --clear
     clears BITMAP
  --enable, --disable
     starts and stops recording future edits to BITMAP
  --merge SRC_FILENAME
     merges contents of SRC_FILENAME bitmap into BITMAP
   -b, --source-file SRC_FILENAME
     select alternative source file for --merge
   -F, --source-format SRC_FMT
     specify format for SRC_FILENAME explicitly
";

/// One action, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn op(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The parsed command line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    actions: Vec<Action>,
    fmt: Option<String>,
    src_file: Option<String>,
    src_fmt: Option<String>,
    granularity: i64,
    positional: Vec<String>,
    help: bool,
}

/// getopt_long over qemu-img's option table for `bitmap` (long options may be abbreviated
/// by getopt; we accept the full spellings and `--opt=value`).
fn parse(raw: &[String]) -> Result<Parsed, Fail> {
    let mut p = Parsed::default();
    let mut i = 0;
    let mut only_positional = false;
    while i < raw.len() {
        let a = &raw[i];
        i += 1;
        if only_positional || !a.starts_with('-') || a == "-" {
            p.positional.push(a.clone());
            continue;
        }
        if a == "--" {
            only_positional = true;
            continue;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if a.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ if !a.starts_with("--") && a.len() > 2 => {
                (a[..2].to_string(), Some(a[2..].to_string()))
            }
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, Fail> {
            if let Some(v) = &inline {
                return Ok(v.clone());
            }
            let v = raw.get(i).cloned().ok_or_else(|| {
                Fail::usage(format!("option '{name}' requires an argument")).with_code(1)
            })?;
            i += 1;
            Ok(v)
        };
        match flag.as_str() {
            "-h" | "--help" => p.help = true,
            "-f" | "--format" => p.fmt = Some(value(&flag)?),
            "-b" | "--source-file" => p.src_file = Some(value(&flag)?),
            "-F" | "--source-format" => p.src_fmt = Some(value(&flag)?),
            "-g" | "--granularity" => p.granularity = cvtnum("granularity", &value(&flag)?, true)?,
            "--add" => p.actions.push(Action::Add),
            "--remove" => p.actions.push(Action::Remove),
            "--clear" => p.actions.push(Action::Clear),
            "--enable" => p.actions.push(Action::Enable),
            "--disable" => p.actions.push(Action::Disable),
            "--merge" => p.actions.push(Action::Merge(value(&flag)?)),
            "--image-opts" | "--object" => {
                return Err(Fail::msg(format!("{flag} is not supported yet")));
            }
            _ if flag.starts_with("--") => {
                return Err(Fail::usage(format!("unrecognized option '{flag}'")));
            }
            _ => {
                return Err(Fail::usage(format!("invalid option -- '{}'", &flag[1..2])));
            }
        }
    }
    Ok(p)
}

/// Run `bitmap`.
pub fn run(a: Args) -> CmdResult {
    let p = parse(&a.raw)?;
    if p.help {
        print!("{HELP}");
        return Ok(0);
    }
    if p.actions.is_empty() {
        return Err(Fail::msg(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let add = p.actions.contains(&Action::Add);
    let merge = p.actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if p.granularity != 0 && !add {
        return Err(Fail::msg("granularity only supported with --add"));
    }
    if p.src_fmt.is_some() && p.src_file.is_none() {
        return Err(Fail::msg("-F only supported with -b"));
    }
    if p.src_file.is_some() && !merge {
        return Err(Fail::msg(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    let [filename, bitmap] = p.positional.as_slice() else {
        return Err(Fail::msg("Expecting filename and bitmap name"));
    };
    let rt = crate::open::runtime()?;
    rt.block_on(exec(&p, filename, bitmap))
}

async fn exec(p: &Parsed, filename: &str, bitmap: &str) -> CmdResult {
    let opts = OpenOpts {
        fmt: p.fmt.clone(),
        read_only: false,
        ..Default::default()
    };
    let img = crate::open::open(filename, &opts).await?;
    let src = match &p.src_file {
        Some(f) => {
            let o = OpenOpts {
                fmt: p.src_fmt.clone(),
                ..Default::default()
            };
            match crate::open::open(f, &o).await {
                Ok(s) => Some(s),
                Err(e) => {
                    let _ = img.close().await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let result = run_actions(p, &img, src.as_ref(), bitmap).await;
    if let Some(s) = src {
        s.close().await?;
    }
    let closed = img.close().await;
    result?;
    closed?;
    Ok(0)
}

async fn run_actions(
    p: &Parsed,
    img: &crate::open::Image,
    src: Option<&crate::open::Image>,
    bitmap: &str,
) -> Result<(), Fail> {
    for act in &p.actions {
        let r = match img.qcow2() {
            None => Err(unsupported_node(act, bitmap)),
            Some(q) => one(q, act, p.granularity, src, bitmap).await,
        };
        if let Err(e) = r {
            return Err(Fail::msg(format!(
                "Operation {} on bitmap {bitmap} failed: {}",
                act.op(),
                e.message()
            )));
        }
    }
    Ok(())
}

/// What QEMU says when the node cannot have persistent bitmaps (raw, ...): its node is
/// anonymous, named `#block` + digits.
fn unsupported_node(act: &Action, bitmap: &str) -> strata_core::Error {
    match act {
        Action::Add => {
            let r = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            strata_core::Error::unsupported(format!(
                "Can't store persistent bitmaps to #block1{:02}: Operation not supported",
                r % 100
            ))
        }
        _ => strata_core::Error::invalid(format!("Dirty bitmap '{bitmap}' not found")),
    }
}

async fn one(
    q: &Qcow2,
    act: &Action,
    granularity: i64,
    src: Option<&crate::open::Image>,
    bitmap: &str,
) -> strata_core::Result<()> {
    match act {
        // qemu-img hands the granularity to QMP as a 32-bit value.
        Action::Add => q.bitmap_add(
            bitmap,
            (granularity != 0).then_some(u64::from(granularity as u32)),
            true,
        ),
        Action::Remove => q.bitmap_remove(bitmap).await,
        Action::Clear => q.bitmap_clear(bitmap),
        Action::Enable => q.bitmap_enable(bitmap),
        Action::Disable => q.bitmap_disable(bitmap),
        Action::Merge(source) => {
            let from = match src {
                Some(s) => Some(s.qcow2().ok_or_else(|| {
                    strata_core::Error::invalid(format!("Dirty bitmap '{source}' not found"))
                })?),
                None => None,
            };
            q.bitmap_merge(bitmap, from, source).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn actions_keep_their_order() {
        let p = parse(&v(&[
            "--add",
            "-g",
            "64k",
            "--disable",
            "--merge",
            "src",
            "-fqcow2",
            "img",
            "bm",
        ]))
        .unwrap();
        assert_eq!(
            p.actions,
            vec![Action::Add, Action::Disable, Action::Merge("src".into())]
        );
        assert_eq!(p.granularity, 65536);
        assert_eq!(p.fmt.as_deref(), Some("qcow2"));
        assert_eq!(p.positional, v(&["img", "bm"]));
        assert!(parse(&v(&["--bogus"])).is_err());
        assert_eq!(
            parse(&v(&["-g", "abc"])).unwrap_err().message(),
            Some("Invalid granularity specified: 'abc'.")
        );
    }
}
