//! `measure [--output=human|json] [-O fmt] [-o options] [-f fmt] [-l snapshot] [-U]
//! (--size N | filename)`.

use strata_qcow2::measure::{InputBitmap, MeasureInput, MeasureOptions, Measurement};

use crate::cli::{CmdResult, Fail, OutputFormat, parse_output};
use crate::cmd::common::ForceShareArg;
use crate::open::OpenOpts;
use crate::options::{Opts, create_opts};
use crate::units::cvtnum;

/// Flags of `measure`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of FILENAME (default: probing is used)
    #[arg(short = 'f', long = "format")]
    fmt: Option<String>,
    /// Use this snapshot of FILENAME as the source
    #[arg(short = 'l', long = "snapshot")]
    snapshot: Option<String>,
    /// Target format (default: raw)
    #[arg(short = 'O', long = "target-format", default_value = "raw")]
    out_fmt: String,
    /// Target format options
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    /// Output format: human or json
    #[arg(long = "output")]
    output: Option<String>,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// Measure for an image of this size
    #[arg(short = 's', long = "size")]
    size: Option<String>,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// Run `measure`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let options = crate::options::accumulate(&a.options)?;
    let output = parse_output(a.output.as_deref())?;
    let size = match &a.size {
        Some(s) => Some(cvtnum("image size", s, true)? as u64),
        None => None,
    };
    if a.args.len() > 1 {
        return Err(Fail::msg("At most one filename argument is allowed."));
    }
    let filename = a.args.first();
    if filename.is_none() && (a.fmt.is_some() || a.snapshot.is_some()) {
        return Err(Fail::msg(
            "--image-opts, -f, and -l require a filename argument.",
        ));
    }
    if filename.is_some() && size.is_some() {
        return Err(Fail::msg(
            "--size N cannot be used together with a filename.",
        ));
    }
    if filename.is_none() && size.is_none() {
        return Err(Fail::msg(
            "Either --size N or one filename must be specified.",
        ));
    }
    if a.snapshot.is_some() {
        return Err(Fail::msg(
            "Failed to load snapshot: measuring internal snapshots is not supported",
        ));
    }
    exec(
        filename.map(String::as_str),
        a.fmt.as_deref(),
        &a.out_fmt,
        options.as_deref(),
        size,
        output,
    )
}

/// Carry out the measurement.
fn exec(
    filename: Option<&str>,
    fmt: Option<&str>,
    out_fmt: &str,
    options: Option<&str>,
    size: Option<u64>,
    output: OutputFormat,
) -> CmdResult {
    let rt = crate::open::runtime()?;
    rt.block_on(async {
        let input = match filename {
            Some(f) => {
                let o = OpenOpts {
                    fmt: fmt.map(str::to_string),
                    ..Default::default()
                };
                Some(crate::open::open(f, &o).await?)
            }
            None => None,
        };
        let res = measure(input.as_ref(), out_fmt, options, size).await;
        if let Some(i) = input {
            let _ = i.close().await;
        }
        let m = res?;
        match output {
            OutputFormat::Human => print!("{}", m.to_human()),
            OutputFormat::Json => print!("{}", m.to_json()),
        }
        Ok(0)
    })
}

async fn measure(
    input: Option<&crate::open::Image>,
    out_fmt: &str,
    options: Option<&str>,
    size: Option<u64>,
) -> Result<Measurement, Fail> {
    if !crate::options::is_known_format(out_fmt) {
        return Err(Fail::msg(format!("Unknown file format '{out_fmt}'")));
    }
    let mut opts = Opts::new(create_opts(out_fmt));
    if let Some(list) = options
        && let Err(e) = opts.parse(list)
    {
        crate::cli::error_report(e);
        return Err(Fail::msg(format!(
            "Invalid options for file format '{out_fmt}'"
        )));
    }
    if let Some(s) = size {
        opts.set_number("size", s);
    }
    let size = opts.get_num("size").unwrap_or(0);
    if out_fmt == "raw" {
        // Unallocated sectors count towards the file size of a raw image.
        let required = match input {
            Some(i) => i.node().size(),
            None => size.div_ceil(512) * 512,
        };
        return Ok(Measurement {
            required,
            fully_allocated: required,
            bitmaps: None,
        });
    }
    let co = crate::image_create::qcow2_options(size, &opts).map_err(Fail::msg)?;
    let mo = MeasureOptions {
        size: Some(size),
        cluster_size: co.cluster_size,
        refcount_bits: u64::from(co.refcount_bits),
        extended_l2: co.extended_l2,
        v3: co.compat_v3,
        prealloc: co.preallocation,
        has_backing_file: co.backing_file.is_some(),
    };
    let inp = match input {
        Some(i) => Some(measure_input(i).await?),
        None => None,
    };
    strata_qcow2::measure::measure(&mo, inp.as_ref()).map_err(Fail::from)
}

/// What measure needs to know of the input image: its size, where it holds data and its
/// persistent bitmaps.
async fn measure_input(img: &crate::open::Image) -> Result<MeasureInput, Fail> {
    let node = img.node();
    let size = node.size();
    let mut data_extents = Vec::new();
    let mut offset = 0;
    while offset < size {
        let ext = strata_graph::block_status_above(&node, None, offset, size - offset)
            .await
            .map_err(Fail::from)?;
        let st = ext.status;
        if !st.zero && st.data && st.allocated {
            data_extents.push((offset, ext.len));
        }
        offset += ext.len;
    }
    let bitmaps = img.qcow2().map(|q| {
        q.format_info()
            .bitmaps
            .iter()
            .map(|b| InputBitmap {
                name_len: b.name.len() as u64,
                granularity: b.granularity,
            })
            .collect()
    });
    Ok(MeasureInput {
        size,
        data_extents,
        bitmaps,
    })
}
