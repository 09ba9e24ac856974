//! Drives a monitor on a Unix socket with raw bytes (no trailing newlines, like the
//! qemu.qmp client). Expected replies were captured from qemu-storage-daemon 10.0.2.

use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;
use strata_qmp::monitor::CommandFuture;
use strata_qmp::{Dispatcher, EventBus, MonitorOptions, QmpError, VersionInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

struct TestDispatcher;

impl Dispatcher for TestDispatcher {
    fn dispatch(&self, command: String, args: Map<String, Value>) -> CommandFuture {
        Box::pin(async move {
            match command.as_str() {
                "job-pause" => Err(QmpError::generic("Job not found")),
                "block-commit" => Err(QmpError::device_not_found("x")),
                "query-jobs" => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(json!([]))
                }
                _ => Ok(Value::Object(args)),
            }
        })
    }
    fn supported_commands(&self) -> Vec<&'static str> {
        vec![
            "job-pause",
            "block-commit",
            "query-jobs",
            "blockdev-add",
            "block-dirty-bitmap-add",
            "quit",
        ]
    }
}

const VER: &str = r#"{"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}"#;

fn version() -> VersionInfo {
    VersionInfo {
        major: 10,
        minor: 0,
        micro: 2,
        package: "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1".into(),
    }
}

async fn start(pretty: bool) -> (tempdir::Dir, Arc<EventBus>) {
    let dir = tempdir::Dir::new();
    let path = dir.0.join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let bus = Arc::new(EventBus::new());
    let opts = MonitorOptions {
        pretty,
        oob: true,
        version: version(),
    };
    tokio::spawn(strata_qmp::serve_unix_listener(
        listener,
        Arc::new(TestDispatcher),
        bus.clone(),
        opts,
    ));
    (dir, bus)
}

mod tempdir {
    /// A unique temporary directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("strata-qmp-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

struct Client {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(dir: &tempdir::Dir) -> Client {
        let s = UnixStream::connect(dir.0.join("qmp.sock")).await.unwrap();
        Client { s, buf: Vec::new() }
    }
    /// Reads one "\r\n"-terminated compact message.
    async fn line(&mut self) -> String {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8(self.buf[..p].to_vec()).unwrap();
                self.buf.drain(..p + 2);
                return l;
            }
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "EOF");
            self.buf.extend_from_slice(&b[..n]);
        }
    }
    async fn send(&mut self, data: &str) {
        self.s.write_all(data.as_bytes()).await.unwrap();
    }
    async fn x(&mut self, data: &str) -> String {
        self.send(data).await;
        self.line().await
    }
}

#[tokio::test]
async fn exchange_matches_qsd() {
    let (dir, _bus) = start(false).await;
    let mut c = Client::connect(&dir).await;
    assert_eq!(
        c.line().await,
        format!(r#"{{"QMP": {{"version": {VER}, "capabilities": ["oob"]}}}}"#)
    );
    let cases: &[(&str, &str)] = &[
        (
            r#"{"execute":"query-version"}"#,
            r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
        ),
        (
            r#"{"execute":"query-version","id":1}"#,
            r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
        ),
        (
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["bogus"]}}"#,
            r#"{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'bogus'"}}"#,
        ),
        (
            r#"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}"#,
        ),
        (
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"], "x":1}}"#,
            r#"{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}"#,
        ),
        (
            r#"{"execute":"qmp_capabilities","id":5}"#,
            r#"{"return": {}, "id": 5}"#,
        ),
        (
            r#"{"execute":"qmp_capabilities","id":5}"#,
            r#"{"id": 5, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#,
        ),
        (
            "[1,2]",
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
        ),
        (
            r#"{"execute":1,"id":3}"#,
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#,
        ),
        (
            r#"{"execute":"a","exec-oob":"b","id":3}"#,
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#,
        ),
        (
            r#"{"execute":"query-version","arguments":[],"id":3}"#,
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#,
        ),
        (
            r#"{"execute":"query-version","foo":1,"id":3}"#,
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}"#,
        ),
        (
            r#"{"id":3}"#,
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
        ),
        (
            r#"{"execute":"nonexist","id":"x"}"#,
            r#"{"id": "x", "error": {"class": "CommandNotFound", "desc": "The command nonexist has not been found"}}"#,
        ),
        (
            "}",
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        ),
        (
            r#"{'execute':'query-version','id':'it\'s'}"#,
            &format!(r#"{{"return": {VER}, "id": "it's"}}"#),
        ),
        (
            r#"{"execute":"query-version","id":{"a":[1]}}"#,
            &format!(r#"{{"return": {VER}, "id": {{"a": [1]}}}}"#),
        ),
        (
            r#"{"execute":"query-version","id":"\u00e9\ud83d\ude00"}"#,
            &format!(r#"{{"return": {VER}, "id": "\u00E9\uD83D\uDE00"}}"#),
        ),
        (
            r#"{"execute":"job-pause","arguments":{"id":1},"id":5}"#,
            r#"{"id": 5, "error": {"class": "GenericError", "desc": "Invalid parameter type for 'id', expected: string"}}"#,
        ),
        (
            r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"a","name":"b","granularity":-1},"id":6}"#,
            r#"{"id": 6, "error": {"class": "GenericError", "desc": "Parameter 'granularity' expects uint32_t"}}"#,
        ),
        (
            r#"{"execute":"blockdev-add","arguments":{"driver":"bogus","node-name":"a"},"id":7}"#,
            r#"{"id": 7, "error": {"class": "GenericError", "desc": "Parameter 'driver' does not accept value 'bogus'"}}"#,
        ),
        (
            r#"{"execute":"block-stream","id":4}"#,
            r#"{"id": 4, "error": {"class": "CommandNotFound", "desc": "The command block-stream has not been found"}}"#,
        ),
        (
            r#"{"execute":"job-pause","arguments":{"id":"j"},"id":8}"#,
            r#"{"id": 8, "error": {"class": "GenericError", "desc": "Job not found"}}"#,
        ),
        (
            r#"{"execute":"block-commit","arguments":{"device":"x"}}"#,
            r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}}"#,
        ),
        (
            r#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n"},"id":9}"#,
            r#"{"return": {"driver": "null-co", "node-name": "n"}, "id": 9}"#,
        ),
    ];
    for (req, want) in cases {
        assert_eq!(c.x(req).await, *want, "{req}");
    }
    // Two requests in one write, no separator; a number id waits for its terminator.
    c.send(r#"{"execute":"query-version","id":1}{"execute":"query-version","id":2}"#)
        .await;
    assert!(c.line().await.ends_with(r#""id": 1}"#));
    assert!(c.line().await.ends_with(r#""id": 2}"#));
    // query-commands: reverse schema order.
    let qc: Value = serde_json::from_str(&c.x(r#"{"execute":"query-commands"}"#).await).unwrap();
    let names: Vec<&str> = qc["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names[..4],
        [
            "query-qmp-schema",
            "quit",
            "query-commands",
            "query-version"
        ]
    );
    assert_eq!(names.last(), Some(&"job-pause"));
    let schema: Value =
        serde_json::from_str(&c.x(r#"{"execute":"query-qmp-schema"}"#).await).unwrap();
    assert!(
        schema["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "blockdev-add")
    );
    assert!(
        !schema["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "block-stream")
    );
}

#[tokio::test]
async fn events_interleave_and_clients_are_sequential() {
    let (dir, bus) = start(false).await;
    let mut c = Client::connect(&dir).await;
    c.line().await;
    // Not delivered before negotiation.
    bus.emit("BEFORE", json!({"x": 1}));
    assert_eq!(
        c.x(r#"{"execute":"qmp_capabilities"}"#).await,
        r#"{"return": {}}"#
    );
    // A slow command; an event emitted meanwhile arrives before its response.
    c.send(r#"{"execute":"query-jobs","id":"slow"}"#).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    bus.emit("JOB_STATUS_CHANGE", json!({"status": "created", "id": "j"}));
    let ev: Value = serde_json::from_str(&c.line().await).unwrap();
    assert_eq!(ev["event"], "JOB_STATUS_CHANGE");
    assert_eq!(
        ev.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["timestamp", "event", "data"]
    );
    assert_eq!(c.line().await, r#"{"return": [], "id": "slow"}"#);

    // A second client waits until the first disconnects, then negotiates anew.
    let mut c2 = Client::connect(&dir).await;
    let mut b = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), c2.s.read(&mut b))
            .await
            .is_err()
    );
    drop(c);
    assert!(c2.line().await.starts_with(r#"{"QMP""#));
    assert!(
        c2.x(r#"{"execute":"query-version"}"#)
            .await
            .contains("Expecting capabilities negotiation")
    );
}

#[tokio::test]
async fn pretty_output_matches_qsd() {
    let (dir, _bus) = start(true).await;
    let mut c = Client::connect(&dir).await;
    let mut b = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"}\r\n") {
        let n = c.s.read(&mut b).await.unwrap();
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(
        String::from_utf8(got).unwrap(),
        "{\r\n    \"QMP\": {\r\n        \"version\": {\r\n            \"qemu\": {\r\n                \"micro\": 2,\r\n                \"minor\": 0,\r\n                \"major\": 10\r\n            },\r\n            \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"\r\n        },\r\n        \"capabilities\": [\r\n            \"oob\"\r\n        ]\r\n    }\r\n}\r\n"
    );
    c.send(r#"{"execute":"qmp_capabilities","id":[1,{"a":[]},{}]}"#)
        .await;
    let want = "{\r\n    \"return\": {\r\n    },\r\n    \"id\": [\r\n        1,\r\n        {\r\n            \"a\": [\r\n            ]\r\n        },\r\n        {\r\n        }\r\n    ]\r\n}\r\n";
    let mut got = Vec::new();
    while got.len() < want.len() {
        let n = c.s.read(&mut b).await.unwrap();
        got.extend_from_slice(&b[..n]);
    }
    assert_eq!(String::from_utf8(got).unwrap(), want);
}

#[tokio::test]
async fn oob_and_stdio_capabilities() {
    let (dir, _bus) = start(false).await;
    let mut c = Client::connect(&dir).await;
    c.line().await;
    assert_eq!(
        c.x(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":2}"#)
            .await,
        r#"{"return": {}, "id": 2}"#
    );
    assert_eq!(
        c.x(r#"{"execute":"a","exec-oob":"b","id":3}"#).await,
        r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#
    );
    assert_eq!(
        c.x(r#"{"exec-oob":"query-version","id":3}"#).await,
        r#"{"id": 3, "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}}"#
    );
    assert_eq!(
        c.x(r#"{"exec-oob":"nonexist","id":3}"#).await,
        r#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command nonexist has not been found"}}"#
    );

    // A monitor without oob (stdio): greeting offers none, enabling it fails.
    let (a, b) = UnixStream::pair().unwrap();
    let bus = EventBus::new();
    let opts = MonitorOptions {
        pretty: false,
        oob: false,
        version: version(),
    };
    let server =
        tokio::spawn(
            async move { strata_qmp::serve(a, Arc::new(TestDispatcher), &bus, &opts).await },
        );
    let mut c = Client {
        s: b,
        buf: Vec::new(),
    };
    assert!(c.line().await.ends_with(r#""capabilities": []}}"#));
    assert_eq!(
        c.x(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
            .await,
        r#"{"error": {"class": "GenericError", "desc": "Capability oob not available"}}"#
    );
    // EOF completes a pending request and ends the session.
    c.send(r#"{"execute":"qmp_capabilities"}"#).await;
    assert_eq!(c.line().await, r#"{"return": {}}"#);
    c.send("[1]").await;
    c.s.shutdown().await.unwrap();
    assert_eq!(
        c.line().await,
        r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#
    );
    server.await.unwrap().unwrap();
}
