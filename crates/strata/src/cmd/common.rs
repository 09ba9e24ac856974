//! Flags and preamble checks that several subcommands share, spelled once. Each flattened
//! struct keeps qemu-img's letters and the help text the subcommands had.

use crate::cli::{CacheMode, Fail, parse_cache};

/// `-p` (progress) and `-q` (quiet), in that order.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ProgressArgs {
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet mode
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
}

impl ProgressArgs {
    /// Whether to draw the progress bar: `-p` without `-q`.
    pub fn show(&self) -> bool {
        self.progress && !self.quiet
    }
}

/// `-U`: open images sharing every permission, so that images another process holds open
/// (and locks) can still be read, as qemu-img's `--force-share`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ForceShareArg {
    /// Open in shared mode
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

impl ForceShareArg {
    /// Make every image this command opens honour `-U` (qemu-img's flag is command-wide).
    pub fn apply(self) {
        crate::open::set_force_share(self.force_share);
    }
}

/// The single positional image name, or qemu-img's usage error.
pub fn one_filename(args: &[String]) -> Result<&str, Fail> {
    match args {
        [filename] => Ok(filename),
        _ => Err(Fail::usage("Expecting one image file name")),
    }
}

/// Parse a `-t` cache mode; an unknown one is "Invalid cache option: MODE".
pub fn cache_option(mode: &str) -> Result<CacheMode, Fail> {
    parse_cache(mode).ok_or_else(|| Fail::msg(format!("Invalid cache option: {mode}")))
}

/// Parse a source cache mode (`-T`); an unknown one is "Invalid source cache option: MODE".
pub fn source_cache_option(mode: &str) -> Result<CacheMode, Fail> {
    parse_cache(mode).ok_or_else(|| Fail::msg(format!("Invalid source cache option: {mode}")))
}

/// `-f`: the image's format.
#[derive(Debug, Clone, clap::Args)]
pub struct FormatArg {
    /// Image format (default: probing is used)
    #[arg(short = 'f', long = "format")]
    pub fmt: Option<String>,
}

/// `-t`: the image's cache mode.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArg {
    /// Cache mode (default: writeback)
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    pub cache: String,
}

impl CacheArg {
    /// The parsed mode, or "Invalid cache option: MODE".
    pub fn mode(&self) -> Result<CacheMode, Fail> {
        cache_option(&self.cache)
    }
}

/// `-T`: the cache mode of an image that is only read (`check`, `compare`).
#[derive(Debug, Clone, clap::Args)]
pub struct SourceCacheArg {
    /// Cache mode (default: writeback)
    #[arg(short = 'T', long = "cache", default_value = "writeback")]
    pub cache: String,
}

impl SourceCacheArg {
    /// The parsed mode, or "Invalid source cache option: MODE".
    pub fn mode(&self) -> Result<CacheMode, Fail> {
        source_cache_option(&self.cache)
    }
}
