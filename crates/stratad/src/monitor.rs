//! Character devices (`--chardev socket,...` / `stdio`) and the QMP monitors on them.

use std::sync::Arc;

use serde_json::Value;
use strata_qmp::keyval::ChardevOpts;
use strata_qmp::{Dispatcher, EventBus, MonitorOptions};
use tokio::net::{TcpListener, UnixListener};

/// An opened character device, waiting for its monitor.
#[derive(Debug)]
pub enum Chardev {
    /// A listening Unix socket.
    Unix(UnixListener),
    /// A listening TCP socket.
    Tcp(TcpListener),
    /// Standard input and output.
    Stdio,
}

impl Chardev {
    /// Socket monitors offer out-of-band execution; stdio ones do not (as in QEMU).
    pub fn oob_capable(&self) -> bool {
        !matches!(self, Chardev::Stdio)
    }
}

fn opt<'a>(c: &'a ChardevOpts, k: &str) -> Option<&'a Value> {
    c.opts.get(k)
}

/// Bind the device `c` describes. Only server sockets and stdio make sense for a daemon.
pub async fn open_chardev(c: &ChardevOpts) -> Result<Chardev, String> {
    let id = c.id.clone().unwrap_or_default();
    match c.backend.as_deref() {
        Some("socket") => {
            let server = opt(c, "server").and_then(Value::as_bool).unwrap_or(false);
            if !server {
                return Err(format!(
                    "chardev '{id}': client sockets are not supported by stratad"
                ));
            }
            if let Some(path) = opt(c, "path").and_then(Value::as_str) {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)
                    .map_err(|e| format!("Failed to bind socket to {path}: {e}"))?;
                return Ok(Chardev::Unix(l));
            }
            let host = opt(c, "host").and_then(Value::as_str).unwrap_or("0.0.0.0");
            let port = match opt(c, "port") {
                Some(Value::String(p)) => p.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => return Err("chardev: socket: no host given".into()),
            };
            let l = TcpListener::bind(format!("{host}:{port}"))
                .await
                .map_err(|e| format!("Failed to bind socket: {e}"))?;
            Ok(Chardev::Tcp(l))
        }
        Some("stdio") => Ok(Chardev::Stdio),
        Some(other) => Err(format!(
            "chardev backend '{other}' is not supported by stratad"
        )),
        None => Err("chardev: \"backend\" not specified".into()),
    }
}

/// Serve QMP on `c` until the daemon exits; socket monitors take one client at a time.
pub fn spawn_monitor(
    c: Chardev,
    dispatcher: Arc<dyn Dispatcher>,
    events: Arc<EventBus>,
    opts: MonitorOptions,
) {
    tokio::spawn(async move {
        let _ = match c {
            Chardev::Unix(l) => {
                strata_qmp::monitor::serve_unix_listener(l, dispatcher, events, opts).await
            }
            Chardev::Tcp(l) => {
                strata_qmp::monitor::serve_tcp_listener(l, dispatcher, events, opts).await
            }
            Chardev::Stdio => {
                let io = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
                strata_qmp::monitor::serve(io, dispatcher, &events, &opts).await
            }
        };
    });
}
