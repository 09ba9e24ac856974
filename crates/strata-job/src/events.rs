//! The event sink the manager reports to, and the job events' data in QEMU's member order.

use crate::error_policy::{ErrorAction, IoOperation};
use crate::qdict::qemu_order;
use crate::status::{JobStatus, JobType};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};

/// Receives job events. The daemon adds timestamps and broadcasts them.
///
/// `emit` is called with the manager's lock held, so events arrive in exactly the order
/// the state changes happened; it must therefore be quick and must not call back into
/// the [`JobManager`](crate::JobManager) (queue the event instead).
pub trait EventSink: Send + Sync {
    /// One event: `event` is the QMP event name, `data` its `data` member (an object,
    /// members already in QEMU's order).
    fn emit(&self, event: &'static str, data: Value);
}

/// A sink that drops every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl EventSink for NullSink {
    fn emit(&self, _event: &'static str, _data: Value) {}
}

/// A sink that records events in memory (tests, diagnostics).
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<(&'static str, Value)>>,
}

impl MemorySink {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything recorded so far.
    pub fn events(&self) -> Vec<(&'static str, Value)> {
        self.events.lock().clone()
    }

    /// Removes and returns everything recorded so far.
    pub fn take(&self) -> Vec<(&'static str, Value)> {
        std::mem::take(&mut *self.events.lock())
    }
}

impl EventSink for MemorySink {
    fn emit(&self, event: &'static str, data: Value) {
        self.events.lock().push((event, data));
    }
}

/// `JOB_STATUS_CHANGE`.
pub const JOB_STATUS_CHANGE: &str = "JOB_STATUS_CHANGE";
/// `BLOCK_JOB_COMPLETED`.
pub const BLOCK_JOB_COMPLETED: &str = "BLOCK_JOB_COMPLETED";
/// `BLOCK_JOB_CANCELLED`.
pub const BLOCK_JOB_CANCELLED: &str = "BLOCK_JOB_CANCELLED";
/// `BLOCK_JOB_READY`.
pub const BLOCK_JOB_READY: &str = "BLOCK_JOB_READY";
/// `BLOCK_JOB_PENDING`.
pub const BLOCK_JOB_PENDING: &str = "BLOCK_JOB_PENDING";
/// `BLOCK_JOB_ERROR`.
pub const BLOCK_JOB_ERROR: &str = "BLOCK_JOB_ERROR";

fn ordered(map: Map<String, Value>) -> Value {
    Value::Object(qemu_order(map))
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `JOB_STATUS_CHANGE` data: `{"status", "id"}` on the wire.
pub fn job_status_change(id: &str, status: JobStatus) -> Value {
    ordered(object(json!({"id": id, "status": status.as_str()})))
}

/// Data shared by `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED` and `BLOCK_JOB_READY`:
/// `{"device", "len", "offset", "speed", "type", "error"?}` on the wire.
pub fn block_job_progress(
    job_type: JobType,
    id: &str,
    len: u64,
    offset: u64,
    speed: u64,
    error: Option<&str>,
) -> Value {
    let mut m = object(json!({
        "type": job_type.as_str(),
        "device": id,
        "len": len,
        "offset": offset,
        "speed": speed,
    }));
    if let Some(e) = error {
        m.insert("error".into(), Value::String(e.to_owned()));
    }
    ordered(m)
}

/// `data` (an event's data object) with Strata's extension members `ext` appended after
/// QEMU's members (docs/EXTENSIONS.md).
pub fn with_extensions(data: Value, ext: Map<String, Value>) -> Value {
    match data {
        Value::Object(mut m) => {
            m.extend(ext);
            Value::Object(m)
        }
        other => other,
    }
}

/// `BLOCK_JOB_PENDING` data: `{"type", "id"}`.
pub fn block_job_pending(job_type: JobType, id: &str) -> Value {
    ordered(object(json!({"type": job_type.as_str(), "id": id})))
}

/// `BLOCK_JOB_ERROR` data: `{"device", "operation", "action"}`.
pub fn block_job_error(id: &str, op: IoOperation, action: ErrorAction) -> Value {
    ordered(object(json!({
        "device": id,
        "operation": op.as_str(),
        "action": action.as_str(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_text_matches_qemu() {
        // Lines as printed by qemu-storage-daemon 10.0.2 (timestamps stripped).
        assert_eq!(
            job_status_change("job0", JobStatus::Created).to_string(),
            r#"{"status":"created","id":"job0"}"#
        );
        assert_eq!(
            block_job_progress(JobType::Stream, "job0", 67108864, 67108864, 0, None).to_string(),
            r#"{"device":"job0","len":67108864,"offset":67108864,"speed":0,"type":"stream"}"#
        );
        assert_eq!(
            block_job_progress(
                JobType::Backup,
                "b2",
                67108864,
                33554432,
                0,
                Some("Input/output error")
            )
            .to_string(),
            r#"{"device":"b2","len":67108864,"offset":33554432,"speed":0,"type":"backup","error":"Input/output error"}"#
        );
        assert_eq!(
            block_job_pending(JobType::Mirror, "m3").to_string(),
            r#"{"type":"mirror","id":"m3"}"#
        );
        assert_eq!(
            block_job_error("b", IoOperation::Write, ErrorAction::Stop).to_string(),
            r#"{"device":"b","operation":"write","action":"stop"}"#
        );
    }
}
