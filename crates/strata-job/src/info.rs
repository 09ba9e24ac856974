//! `JobInfo` (query-jobs) and `BlockJobInfo` (query-block-jobs) objects, members in the
//! order qemu-storage-daemon prints them.

use crate::qdict::qemu_order;
use crate::state::JobEntry;
use crate::status::JobStatus;
use serde_json::{Map, Value, json};
use std::time::Instant;

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Strata's extension members (docs/EXTENSIONS.md), appended after QEMU's so a client
/// that knows only qemu-storage-daemon's members sees them unchanged: `rate` (progress
/// bytes/s over the last seconds), `remaining`, `eta-ms` (absent while the rate is 0 and
/// work remains), `phase` (the driver's while RUNNING or READY, else the status name),
/// then the driver's own members (`driver`, from [`JobDriver::extension_info`]).
///
/// [`JobDriver::extension_info`]: crate::JobDriver::extension_info
pub(crate) fn extensions(e: &mut JobEntry, mut driver: Map<String, Value>) -> Map<String, Value> {
    if e.started && !e.deferred {
        e.meter.record(Instant::now(), e.current);
    }
    let rate = e.meter.rate();
    let remaining = e.total.saturating_sub(e.current);
    let mut m = Map::new();
    m.insert("rate".into(), json!(rate));
    m.insert("remaining".into(), json!(remaining));
    if remaining == 0 {
        m.insert("eta-ms".into(), json!(0));
    } else if rate > 0 {
        let ms = (remaining as u128 * 1000 / rate as u128).min(u64::MAX as u128) as u64;
        m.insert("eta-ms".into(), json!(ms));
    }
    let own = driver.remove("phase");
    let phase = match (e.status, own) {
        (JobStatus::Running | JobStatus::Ready, Some(p)) => p,
        (s, _) => json!(s.as_str()),
    };
    m.insert("phase".into(), phase);
    m.extend(driver);
    m
}

/// `JobInfo` for one job, with Strata's extension members `ext` after QEMU's.
pub(crate) fn job_info(e: &JobEntry, ext: Map<String, Value>) -> Value {
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
    let mut m = qemu_order(m);
    m.extend(ext);
    Value::Object(m)
}

/// `BlockJobInfo` for one block job, plus the driver's type-specific members, then
/// Strata's extension members `ext`.
pub(crate) fn block_job_info(
    e: &JobEntry,
    extra: Map<String, Value>,
    ext: Map<String, Value>,
) -> Value {
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
    let mut m = qemu_order(m);
    m.extend(ext);
    Value::Object(m)
}
