//! What every subcommand shares: the failure type that carries qemu-img's message and exit
//! status, cache-mode parsing and output-format parsing.

use std::fmt;

/// The program name printed in front of error messages (qemu-img prints "qemu-img").
pub const PROG: &str = "strata";

/// A failed command: an optional message for stderr and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    msg: Option<String>,
    code: i32,
    try_help: bool,
}

impl Fail {
    /// "strata: <msg>", exit 1.
    pub fn msg(msg: impl Into<String>) -> Fail {
        Fail {
            msg: Some(msg.into()),
            code: 1,
            try_help: false,
        }
    }

    /// A usage error: "strata: <msg>" and "Try 'strata CMD --help' for more info", exit 1.
    pub fn usage(msg: impl Into<String>) -> Fail {
        Fail {
            msg: Some(msg.into()),
            code: 1,
            try_help: true,
        }
    }

    /// Exit with `code` and print nothing more (the message was already printed).
    pub fn code(code: i32) -> Fail {
        Fail {
            msg: None,
            code,
            try_help: false,
        }
    }

    /// The same failure with another exit status.
    #[must_use]
    pub fn with_code(mut self, code: i32) -> Fail {
        self.code = code;
        self
    }

    /// The message, if any.
    pub fn message(&self) -> Option<&str> {
        self.msg.as_deref()
    }

    /// The exit status.
    pub fn exit_code(&self) -> i32 {
        self.code
    }

    /// Whether to point the user at `--help`.
    pub fn wants_help_hint(&self) -> bool {
        self.try_help
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.msg.as_deref().unwrap_or(""))
    }
}

impl From<strata_core::Error> for Fail {
    fn from(e: strata_core::Error) -> Fail {
        Fail::msg(e.message().to_string())
    }
}

/// Result of a subcommand: the exit status on success (check and compare use several).
pub type CmdResult = Result<i32, Fail>;

/// Print "strata: <msg>" to stderr, as QEMU's `error_report`.
pub fn error_report(msg: impl fmt::Display) {
    eprintln!("{PROG}: {msg}");
}

/// Print "strata: warning: <msg>" to stderr, as QEMU's `warn_report`.
pub fn warn_report(msg: impl fmt::Display) {
    eprintln!("{PROG}: warning: {msg}");
}

/// `--output human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Text for people (the default).
    #[default]
    Human,
    /// QEMU's pretty JSON.
    Json,
}

/// qemu-img's `parse_output_format`.
pub fn parse_output(arg: Option<&str>) -> Result<OutputFormat, Fail> {
    match arg {
        None | Some("human") => Ok(OutputFormat::Human),
        Some("json") => Ok(OutputFormat::Json),
        Some(other) => Err(Fail::usage(format!(
            "--output expects 'human' or 'json' not '{other}'"
        ))),
    }
}

pub use strata_graph::CacheMode;

/// Parse a cache mode (`none`, `off`, `writeback`, `writethrough`, `directsync`, `unsafe`).
pub fn parse_cache(mode: &str) -> Option<CacheMode> {
    CacheMode::parse(mode).ok()
}

/// Print to stdout unless quiet (qemu-img's `qprintf`).
#[macro_export]
macro_rules! qprint {
    ($quiet:expr, $($arg:tt)*) => {
        if !$quiet {
            print!($($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_cache_parsing() {
        assert_eq!(parse_output(Some("json")).unwrap(), OutputFormat::Json);
        assert_eq!(
            parse_output(Some("xml")).unwrap_err().message(),
            Some("--output expects 'human' or 'json' not 'xml'")
        );
        assert!(parse_cache("none").unwrap().direct());
        assert!(parse_cache("bogus").is_none());
    }
}
