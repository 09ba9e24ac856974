//! `map [-f fmt] [--output=human|json] [--start-offset OFFSET] [--max-length LENGTH] [-U]
//! filename`.

use crate::cli::{CmdResult, OutputFormat, parse_output};
use crate::cmd::common::{ForceShareArg, FormatArg, one_filename};
use crate::units::cvtnum;

/// Flags of `map`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    format: FormatArg,
    /// Start at this offset in the image
    #[arg(short = 's', long = "start-offset")]
    start_offset: Option<String>,
    /// Process at most this many bytes
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    /// Output format: human or json
    #[arg(long = "output")]
    output: Option<String>,
    #[command(flatten)]
    force_share: ForceShareArg,
    /// FILENAME
    #[arg(value_name = "FILENAME")]
    args: Vec<String>,
}

/// Run `map`.
pub fn run(a: Args) -> CmdResult {
    a.force_share.apply();
    let start = match &a.start_offset {
        Some(s) => cvtnum("start offset", s, true)? as u64,
        None => 0,
    };
    let max_len = match &a.max_length {
        Some(s) => Some(cvtnum("max length", s, true)? as u64),
        None => None,
    };
    let output = parse_output(a.output.as_deref())?;
    let filename = one_filename(&a.args)?;
    let rt = crate::open::runtime()?;
    rt.block_on(async {
        let opts = crate::open::OpenOpts {
            fmt: a.format.fmt.clone(),
            ..Default::default()
        };
        let img = crate::open::open(filename, &opts).await?;
        let node = img.node();
        let entries = strata_graph::map::map_image(&node, start, max_len).await;
        let code = match entries {
            Ok(entries) => match output {
                OutputFormat::Json => {
                    print!("{}", strata_graph::map::render_json(&entries));
                    0
                }
                OutputFormat::Human => {
                    let (text, res) = strata_graph::map::render_human(&entries);
                    print!("{text}");
                    match res {
                        Ok(()) => 0,
                        Err(e) => {
                            crate::cli::error_report(e);
                            1
                        }
                    }
                }
            },
            Err(e) => {
                // qemu-img prints the header before it fails.
                if output == OutputFormat::Human {
                    println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
                } else {
                    print!("[");
                }
                crate::cli::error_report(e);
                1
            }
        };
        img.close().await?;
        Ok(code)
    })
}
