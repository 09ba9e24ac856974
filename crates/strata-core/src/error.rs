//! One error type for the whole stack: a matchable [`ErrorKind`] plus a human message.
//!
//! The kind decides how the error leaves the process (QMP class, NBD errno, exit code); the
//! message is what a user reads, and follows QEMU's wording where QEMU has one.

use std::fmt;
use std::io;

/// What went wrong, coarse enough to map onto QMP classes and NBD errnos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An I/O error from the host, with its errno.
    Io(i32),
    /// The caller asked for something malformed or out of range.
    InvalidArgument,
    /// The image's metadata is inconsistent or hostile.
    Corrupt,
    /// A valid request for a feature this build does not implement.
    Unsupported,
    /// A named file, node or object does not exist.
    NotFound,
    /// The node is read-only or the permission is not held.
    ReadOnly,
    /// The host ran out of space.
    NoSpace,
    /// The operation was cancelled.
    Cancelled,
}

impl ErrorKind {
    /// The errno that best describes this kind (used by NBD replies and exit statuses).
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io(e) => e,
            ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::Corrupt => libc::EIO,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Cancelled => libc::ECANCELED,
        }
    }
}

/// Strata's error: a kind to match on and a message to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Result with Strata's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// An error from an errno value, with `message` saying what was being done.
    pub fn from_errno(errno: i32, message: impl Into<String>) -> Self {
        let kind = match errno {
            libc::ENOSPC | libc::EDQUOT => ErrorKind::NoSpace,
            libc::ENOENT => ErrorKind::NotFound,
            libc::EROFS => ErrorKind::ReadOnly,
            e => ErrorKind::Io(e),
        };
        let os = io::Error::from_raw_os_error(errno);
        Self::new(
            kind,
            format!("{}: {}", message.into(), strip_os_suffix(&os)),
        )
    }

    /// The kind, for matching.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, as shown to the user.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with what the caller was doing (`"{context}: {message}"`).
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

/// C's `strerror(errno)`: the text QEMU prints after "...: " for a failed request.
pub fn strerror(errno: i32) -> String {
    strip_os_suffix(&io::Error::from_raw_os_error(errno))
}

/// C's `%#x`, which QEMU's messages use: `0` for zero, else `0x...`.
pub fn hash_x(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// `io::Error`'s Display appends " (os error N)"; QEMU prints only the strerror text.
fn strip_os_suffix(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(errno) => Error::from_errno(errno, "I/O error"),
            None => Error::new(ErrorKind::Io(libc::EIO), e.to_string()),
        }
    }
}

/// Attach context to any `Result<T, Error>`.
pub trait ResultExt<T> {
    /// Prefix the error message with `context()`.
    fn ctx<D: fmt::Display>(self, context: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn ctx<D: fmt::Display>(self, context: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().context(context()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_messages_read_like_strerror() {
        let e = Error::from_errno(libc::ENOSPC, "Could not write");
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.to_string(), "Could not write: No space left on device");
        assert_eq!(e.kind().errno(), libc::ENOSPC);
    }

    #[test]
    fn context_prefixes() {
        let r: Result<()> = Err(Error::corrupt("L2 table offset 0x1 unaligned"));
        let e = r.ctx(|| "img.qcow2").unwrap_err();
        assert_eq!(e.message(), "img.qcow2: L2 table offset 0x1 unaligned");
    }
}
