//! `JobInfo` (query-jobs) and `BlockJobInfo` (query-block-jobs) objects, members in the
//! order qemu-storage-daemon prints them.

use crate::qdict::qemu_order;
use crate::state::JobEntry;
use serde_json::{Map, Value, json};

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `JobInfo` for one job.
pub(crate) fn job_info(e: &JobEntry) -> Value {
    let mut m = object(json!({
        "id": e.handle.id,
        "type": e.handle.job_type.as_str(),
        "status": e.status.as_str(),
        "current-progress": e.current,
        "total-progress": e.total,
    }));
    if let Some(err) = &e.err {
        m.insert("error".into(), Value::String(err.clone()));
    }
    Value::Object(qemu_order(m))
}

/// `BlockJobInfo` for one block job, plus the driver's type-specific members.
pub(crate) fn block_job_info(e: &JobEntry, extra: Map<String, Value>) -> Value {
    let mut m = object(json!({
        "type": e.handle.job_type.as_str(),
        "device": e.handle.id,
        "len": e.total,
        "offset": e.current,
        "busy": e.busy,
        "paused": e.pause_count > 0,
        "speed": e.speed,
        "io-status": e.io_status.as_str(),
        "ready": e.status.is_ready(),
        "status": e.status.as_str(),
        "auto-finalize": e.auto_finalize,
        "auto-dismiss": e.auto_dismiss,
    }));
    if let Some(err) = &e.err {
        m.insert("error".into(), Value::String(err.clone()));
    }
    m.extend(extra);
    Value::Object(qemu_order(m))
}
