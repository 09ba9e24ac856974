//! `dd [-f fmt] [-O fmt] [-U] [bs=size] [count=n] [skip=n] if=input of=output`.

use strata_core::{IoBuf, WriteFlags};

use crate::cli::{CmdResult, Fail};
use crate::cmd::common::ForceShareArg;
use crate::open::OpenOpts;
use crate::options::{Opts, create_opts};
use crate::units::{cvtnum, cvtnum_full};

/// Flags of `dd`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Input format (default: probing is used)
    #[arg(short = 'f', long = "format")]
    fmt: Option<String>,
    /// Output format (default: raw)
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    out_fmt: String,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// Operands: bs=, count=, skip=, if=, of=
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

/// The parsed operands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdOps {
    /// Block size.
    pub bs: u64,
    /// Number of blocks, if limited.
    pub count: Option<u64>,
    /// Blocks to skip in the input.
    pub skip: Option<u64>,
    /// Input file.
    pub input: String,
    /// Output file.
    pub output: String,
}

/// Parse dd operands with qemu-img's messages.
pub fn parse_operands(ops: &[String]) -> Result<DdOps, Fail> {
    let mut bs = 512u64;
    let (mut count, mut skip, mut input, mut output) = (None, None, None, None);
    for op in ops {
        let Some((k, v)) = op.split_once('=') else {
            return Err(Fail::msg(format!("unrecognized operand {op}")));
        };
        match k {
            "bs" => bs = cvtnum_full("bs", v, true, 1, i32::MAX as i64)? as u64,
            "count" => count = Some(cvtnum("count", v, true)? as u64),
            "skip" => skip = Some(cvtnum("skip", v, true)? as u64),
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            _ => return Err(Fail::msg(format!("unrecognized operand {k}"))),
        }
    }
    match (input, output) {
        (Some(input), Some(output)) => Ok(DdOps {
            bs,
            count,
            skip,
            input,
            output,
        }),
        _ => Err(Fail::msg("Must specify both input and output files")),
    }
}

/// The output size and the input start offset, as qemu-img computes them; `None` for the
/// offset means "skip is beyond the input" (an empty output and a warning).
pub fn extent(ops: &DdOps, in_size: u64) -> (u64, Option<u64>) {
    let mut size = in_size;
    if let Some(c) = ops.count
        && let Some(bytes) = c.checked_mul(ops.bs)
        && bytes < size
    {
        size = bytes;
    }
    match ops.skip {
        Some(s) => match s.checked_mul(ops.bs) {
            Some(off) if off <= size => (size - off, Some(off)),
            _ => (0, None),
        },
        None => (size, Some(0)),
    }
}

/// Run `dd`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let ops = parse_operands(&a.operands)?;
    exec(&ops, a.fmt.as_deref(), &a.out_fmt)
}

/// Carry out the copy.
fn exec(ops: &DdOps, fmt: Option<&str>, out_fmt: &str) -> CmdResult {
    let rt = crate::open::runtime()?;
    rt.block_on(async {
        let iopts = OpenOpts {
            fmt: fmt.map(str::to_string),
            ..Default::default()
        };
        let input = crate::open::open(&ops.input, &iopts).await?;
        if !crate::options::is_known_format(out_fmt) {
            return Err(Fail::msg("Unknown file format"));
        }
        let inode = input.node();
        let in_size = inode.size();
        let (out_size, start) = extent(ops, in_size);
        let end = ops
            .count
            .and_then(|c| c.checked_mul(ops.bs))
            .filter(|b| *b < in_size)
            .unwrap_or(in_size);
        let mut opts = Opts::new(create_opts(out_fmt));
        opts.set_number("size", out_size);
        crate::image_create::create_image(&ops.output, out_fmt, out_size, &opts)
            .await
            .map_err(|e| {
                Fail::msg(format!(
                    "{}: error while creating output image: {e}",
                    ops.output
                ))
            })?;
        let oopts = OpenOpts {
            fmt: Some(out_fmt.to_string()),
            read_only: false,
            ..Default::default()
        };
        let output = crate::open::open(&ops.output, &oopts).await?;
        let onode = output.node();
        let res = async {
            let Some(mut pos) = start else {
                crate::cli::error_report(format!("{}: cannot skip to specified offset", ops.input));
                return Ok(());
            };
            // Whole blocks, batched: the output is the same as one request per block.
            let batch = (1u64 << 20).max(ops.bs) / ops.bs * ops.bs;
            let mut out_pos = 0;
            while pos < end {
                let n = batch.min(end - pos);
                let buf = inode
                    .read(pos, IoBuf::zeroed(n as usize))
                    .await
                    .map_err(|e| {
                        Fail::msg(format!("error while reading from input image file: {e}"))
                    })?;
                onode
                    .write(out_pos, buf, WriteFlags::default())
                    .await
                    .map_err(|e| {
                        Fail::msg(format!("error while writing to output image file: {e}"))
                    })?;
                pos += n;
                out_pos += n;
            }
            Ok::<(), Fail>(())
        }
        .await;
        let closed = output.close().await;
        let _ = input.close().await;
        res?;
        closed?;
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(v: &[&str]) -> Result<DdOps, Fail> {
        parse_operands(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_like_qemu() {
        let o = ops(&["if=a", "of=b", "bs=1k", "count=3", "skip=1"]).unwrap();
        assert_eq!((o.bs, o.count, o.skip), (1024, Some(3), Some(1)));
        assert_eq!(extent(&o, 10 << 10), (2048, Some(1024)));
        assert_eq!(
            ops(&["foo"]).unwrap_err().message(),
            Some("unrecognized operand foo")
        );
        assert_eq!(
            ops(&["if=a"]).unwrap_err().message(),
            Some("Must specify both input and output files")
        );
        let o = ops(&["if=a", "of=b", "skip=100"]).unwrap();
        assert_eq!(extent(&o, 1024), (0, None));
    }
}
