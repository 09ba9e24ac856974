//! The block-job error policy (§3.5): `BlockdevOnError`, `BlockErrorAction`,
//! `IoOperationType`, `BlockDeviceIoStatus`, and QEMU's `block_job_error_action` decision.

use serde::{Deserialize, Serialize};

/// Linux `ENOSPC`, the only errno the policy distinguishes.
pub const ENOSPC: i32 = 28;

/// QAPI `BlockdevOnError`: what a job does on an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail the job (the default).
    #[default]
    Report,
    /// Carry on.
    Ignore,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// Stop (pause as if user-paused).
    Stop,
    /// Same as `enospc` for jobs.
    Auto,
}

impl OnError {
    /// The QAPI spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Enospc => "enospc",
            OnError::Stop => "stop",
            OnError::Auto => "auto",
        }
    }
}

/// QAPI `BlockErrorAction`: the decision taken for one error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorAction {
    /// The error was ignored.
    Ignore,
    /// The error is reported: the job fails.
    Report,
    /// The job stopped (user-paused); it retries after resume.
    Stop,
}

impl ErrorAction {
    /// The QAPI spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

/// QAPI `IoOperationType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoOperation {
    /// A read failed.
    Read,
    /// A write failed.
    Write,
}

impl IoOperation {
    /// The QAPI spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// QAPI `BlockDeviceIoStatus` (BlockJobInfo's `io-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoStatus {
    /// No error recorded.
    #[default]
    Ok,
    /// Stopped on an error other than ENOSPC.
    Failed,
    /// Stopped on ENOSPC.
    Nospace,
}

impl IoStatus {
    /// The QAPI spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }

    /// The io-status a stop on `errno` records (QEMU's `block_job_iostatus_set_err`).
    pub const fn for_errno(errno: i32) -> IoStatus {
        if errno == ENOSPC {
            IoStatus::Nospace
        } else {
            IoStatus::Failed
        }
    }
}

/// QEMU's policy → action mapping; `errno` is positive (e.g. 28 for ENOSPC).
pub const fn decide(policy: OnError, errno: i32) -> ErrorAction {
    match policy {
        OnError::Enospc | OnError::Auto => {
            if errno == ENOSPC {
                ErrorAction::Stop
            } else {
                ErrorAction::Report
            }
        }
        OnError::Stop => ErrorAction::Stop,
        OnError::Report => ErrorAction::Report,
        OnError::Ignore => ErrorAction::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_table() {
        use ErrorAction as A;
        use OnError as P;
        let eio = 5;
        let cases = [
            (P::Report, eio, A::Report),
            (P::Report, ENOSPC, A::Report),
            (P::Ignore, eio, A::Ignore),
            (P::Ignore, ENOSPC, A::Ignore),
            (P::Stop, eio, A::Stop),
            (P::Stop, ENOSPC, A::Stop),
            (P::Enospc, eio, A::Report),
            (P::Enospc, ENOSPC, A::Stop),
            (P::Auto, eio, A::Report),
            (P::Auto, ENOSPC, A::Stop),
        ];
        for (p, e, a) in cases {
            assert_eq!(decide(p, e), a, "{p:?} {e}");
        }
        assert_eq!(IoStatus::for_errno(ENOSPC), IoStatus::Nospace);
        assert_eq!(IoStatus::for_errno(eio), IoStatus::Failed);
    }

    #[test]
    fn spellings() {
        assert_eq!(serde_json::to_value(OnError::Enospc).unwrap(), "enospc");
        assert_eq!(serde_json::to_value(IoStatus::Nospace).unwrap(), "nospace");
        assert_eq!(ErrorAction::Stop.as_str(), "stop");
        assert_eq!(IoOperation::Write.as_str(), "write");
    }
}
