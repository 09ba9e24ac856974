//! QMP events: timestamped messages broadcast to every negotiated monitor.

use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// How many events a slow monitor may fall behind before it loses the oldest ones.
pub const EVENT_BACKLOG: usize = 4096;

/// Broadcasts events to every connected monitor. Cheap to share (`Arc<EventBus>`);
/// emitting with no monitor connected is fine (the event is dropped).
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Value>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus with [`EVENT_BACKLOG`] slots of buffering per receiver.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(EVENT_BACKLOG);
        EventBus { tx }
    }

    /// Emits event `name`; `data` is the event's `data` member (`Value::Null` for an
    /// event without members: then `data` is omitted, as QEMU does). The timestamp is
    /// taken now.
    pub fn emit(&self, name: &str, data: Value) {
        let msg = event_message(name, data, SystemTime::now());
        let _ = self.tx.send(Arc::new(msg));
    }

    /// A receiver of all events emitted from now on (used by each monitor).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Value>> {
        self.tx.subscribe()
    }
}

/// Builds `{"timestamp": {"seconds", "microseconds"}, "event", "data"}` in QEMU's member
/// order; both timestamp members are -1 if `at` is before the epoch.
pub fn event_message(name: &str, data: Value, at: SystemTime) -> Value {
    let (secs, usecs) = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_micros())),
        Err(_) => (-1, -1),
    };
    let mut ts = Map::new();
    ts.insert("seconds".into(), secs.into());
    ts.insert("microseconds".into(), usecs.into());
    let mut m = Map::new();
    m.insert("timestamp".into(), Value::Object(ts));
    m.insert("event".into(), Value::String(name.into()));
    if !data.is_null() {
        m.insert("data".into(), data);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn shape() {
        let at = UNIX_EPOCH + Duration::new(1795331966, 917_974_123);
        let v = event_message(
            "JOB_STATUS_CHANGE",
            json!({"status": "created", "id": "j"}),
            at,
        );
        assert_eq!(
            crate::json_out::to_qemu_json(&v, false),
            r#"{"timestamp": {"seconds": 1795331966, "microseconds": 917974}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j"}}"#
        );
        let v = event_message("STOP", Value::Null, at);
        assert!(v.get("data").is_none());
    }

    #[tokio::test]
    async fn broadcast() {
        let bus = EventBus::new();
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        bus.emit("X", json!({"n": 1}));
        assert_eq!(a.recv().await.unwrap()["event"], "X");
        assert_eq!(b.recv().await.unwrap()["data"]["n"], 1);
    }
}
