//! A QMP monitor on one byte stream: greeting, capability negotiation, request
//! validation, schema validation of arguments, dispatch of one in-band command at a time,
//! built-in `qmp_capabilities` / `query-commands` / `query-qmp-schema` / `query-version`,
//! and event delivery after negotiation.

use crate::error::{ErrorClass, QmpError};
use crate::events::EventBus;
use crate::json_out::to_qemu_json;
use crate::json_stream::{JsonStream, StreamItem};
use crate::schema::Schema;
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

/// The future a dispatched command returns.
pub type CommandFuture = Pin<Box<dyn Future<Output = Result<Value, QmpError>> + Send>>;

/// Runs commands for the monitor. Arguments have already been validated against the
/// schema (when the command is in it).
pub trait Dispatcher: Send + Sync + 'static {
    /// Runs `command` with its (validated) arguments; the result is the `return` value
    /// (`{}` for commands without a return type).
    fn dispatch(&self, command: String, args: Map<String, Value>) -> CommandFuture;
    /// The commands this dispatcher implements (the monitor adds its built-ins).
    fn supported_commands(&self) -> Vec<&'static str>;
}

/// The version reported in the greeting and by `query-version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// Package string (`""` for upstream builds).
    pub package: String,
}

impl Default for VersionInfo {
    /// QEMU 10.0.2 with an empty package string.
    fn default() -> Self {
        VersionInfo {
            major: 10,
            minor: 0,
            micro: 2,
            package: String::new(),
        }
    }
}

impl VersionInfo {
    /// `{"qemu": {"micro", "minor", "major"}, "package"}` in qsd's member order.
    pub fn to_json(&self) -> Value {
        let mut q = Map::new();
        q.insert("micro".into(), self.micro.into());
        q.insert("minor".into(), self.minor.into());
        q.insert("major".into(), self.major.into());
        let mut v = Map::new();
        v.insert("qemu".into(), Value::Object(q));
        v.insert("package".into(), Value::String(self.package.clone()));
        Value::Object(v)
    }
}

/// Per-monitor settings.
#[derive(Debug, Clone, Default)]
pub struct MonitorOptions {
    /// Pretty-print output (`--monitor ...,pretty=on`).
    pub pretty: bool,
    /// Offer the `oob` capability (socket monitors do, stdio monitors do not).
    pub oob: bool,
    /// The version to report.
    pub version: VersionInfo,
}

const BUILTINS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-qmp-schema",
    "query-version",
];

/// The greeting message.
pub fn greeting(opts: &MonitorOptions) -> Value {
    let mut q = Map::new();
    q.insert("version".into(), opts.version.to_json());
    q.insert(
        "capabilities".into(),
        Value::Array(if opts.oob {
            vec![Value::String("oob".into())]
        } else {
            vec![]
        }),
    );
    let mut m = Map::new();
    m.insert("QMP".into(), Value::Object(q));
    Value::Object(m)
}

fn error_response(err: &QmpError, id: Option<&Value>) -> Value {
    let mut m = Map::new();
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    m.insert("error".into(), err.to_json());
    Value::Object(m)
}

fn return_response(ret: Value, id: Option<&Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), ret);
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    Value::Object(m)
}

/// What to do with one request.
enum Action {
    Reply(Value),
    Dispatch {
        command: String,
        args: Map<String, Value>,
        id: Option<Value>,
    },
}

/// Per-connection protocol state.
struct Session<'a> {
    schema: &'a Schema,
    dispatcher: &'a Arc<dyn Dispatcher>,
    opts: &'a MonitorOptions,
    negotiated: bool,
    oob_enabled: bool,
}

impl Session<'_> {
    fn supported(&self) -> Vec<&'static str> {
        let mut v = self.dispatcher.supported_commands();
        for b in BUILTINS {
            if !v.contains(b) {
                v.push(b);
            }
        }
        v
    }

    fn handle(&mut self, item: StreamItem) -> Action {
        let req = match item {
            Err(desc) => return Action::Reply(error_response(&QmpError::generic(desc), None)),
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Action::Reply(error_response(
                    &QmpError::generic("QMP input must be a JSON object"),
                    None,
                ));
            }
        };
        let id = req.get("id").cloned();
        match self.check(req) {
            Ok(Action::Dispatch { command, args, .. }) => Action::Dispatch { command, args, id },
            // Built-ins answer with their return value.
            Ok(Action::Reply(ret)) => Action::Reply(return_response(ret, id.as_ref())),
            Err(e) => {
                let e = if !self.negotiated && e.class == ErrorClass::CommandNotFound {
                    QmpError::new(
                        ErrorClass::CommandNotFound,
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    )
                } else {
                    e
                };
                Action::Reply(error_response(&e, id.as_ref()))
            }
        }
    }

    /// QEMU's `qmp_dispatch` checks, then the built-ins; `Dispatch` carries no id yet.
    fn check(&mut self, req: Map<String, Value>) -> Result<Action, QmpError> {
        let mut exec: Option<(String, bool)> = None;
        let mut saw_exec_keys = 0;
        for (k, v) in &req {
            let is_exec = k == "execute";
            let is_oob = k == "exec-oob" && self.oob_enabled;
            if is_exec || is_oob {
                let Value::String(s) = v else {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{k}' must be a string"
                    )));
                };
                saw_exec_keys += 1;
                if saw_exec_keys > 1 {
                    return Err(QmpError::generic(
                        "QMP input member 'execute' clashes with 'exec-oob'",
                    ));
                }
                exec = Some((s.clone(), is_oob));
            } else if k == "arguments" {
                if !v.is_object() {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            } else if k != "id" {
                return Err(QmpError::generic(format!(
                    "QMP input member '{k}' is unexpected"
                )));
            }
        }
        let Some((command, oob)) = exec else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        let found = if self.negotiated {
            self.supported().contains(&command.as_str())
        } else {
            command == "qmp_capabilities"
        };
        if !found {
            return Err(QmpError::command_not_found(&command));
        }
        if oob {
            return Err(QmpError::generic(format!(
                "The command {command} does not support OOB"
            )));
        }
        let args = match req.get("arguments") {
            Some(Value::Object(a)) => a.clone(),
            _ => Map::new(),
        };
        if self.schema.has_command(&command) {
            self.schema.validate_command_args(&command, &args)?;
        }
        match command.as_str() {
            "qmp_capabilities" => {
                if self.negotiated {
                    return Err(QmpError::new(
                        ErrorClass::CommandNotFound,
                        "Capabilities negotiation is already complete, command ignored",
                    ));
                }
                let mut want_oob = false;
                let mut missing: Vec<&str> = Vec::new();
                if let Some(Value::Array(caps)) = args.get("enable") {
                    for c in caps {
                        if c == "oob" {
                            if self.opts.oob {
                                want_oob = true;
                            } else if !missing.contains(&"oob") {
                                missing.push("oob");
                            }
                        }
                    }
                }
                if !missing.is_empty() {
                    return Err(QmpError::generic(format!(
                        "Capability {} not available",
                        missing.join(", ")
                    )));
                }
                self.oob_enabled = want_oob;
                self.negotiated = true;
                Ok(Action::Reply(Value::Object(Map::new())))
            }
            "query-version" => Ok(Action::Reply(self.opts.version.to_json())),
            "query-commands" => {
                let sup = self.supported();
                let list = self
                    .schema
                    .query_commands_order(&sup)
                    .into_iter()
                    .map(|c| {
                        let mut m = Map::new();
                        m.insert("name".into(), Value::String(c.into()));
                        Value::Object(m)
                    })
                    .collect();
                Ok(Action::Reply(Value::Array(list)))
            }
            "query-qmp-schema" => Ok(Action::Reply(self.schema.introspect(&self.supported()))),
            _ => Ok(Action::Dispatch {
                command,
                args,
                id: None,
            }),
        }
    }
}

async fn write_msg<W: AsyncWrite + Unpin>(
    w: &mut W,
    v: &Value,
    pretty: bool,
) -> std::io::Result<()> {
    let mut s = to_qemu_json(v, pretty);
    if pretty {
        s = s.replace('\n', "\r\n");
    }
    s.push_str("\r\n");
    w.write_all(s.as_bytes()).await?;
    w.flush().await
}

/// Serves one QMP client on `stream` until it disconnects (or an I/O error). In-band
/// commands run one at a time, responses in request order; events are delivered after
/// negotiation, also while a command runs.
pub async fn serve<S>(
    stream: S,
    dispatcher: Arc<dyn Dispatcher>,
    events: &EventBus,
    opts: &MonitorOptions,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let schema = Schema::qsd();
    let mut ev_rx = events.subscribe();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut session = Session {
        schema,
        dispatcher: &dispatcher,
        opts,
        negotiated: false,
        oob_enabled: false,
    };
    write_msg(&mut wr, &greeting(opts), opts.pretty).await?;
    let mut parser = JsonStream::new();
    let mut queue: VecDeque<StreamItem> = VecDeque::new();
    let mut inflight: Option<(CommandFuture, Option<Value>)> = None;
    let mut eof = false;
    let mut events_open = true;
    let mut buf = vec![0u8; 8192];
    loop {
        // Start the next request if idle.
        while inflight.is_none() {
            let Some(item) = queue.pop_front() else { break };
            if !session.negotiated {
                // Events are not delivered during negotiation: drop what has queued up.
                while let Ok(_) | Err(TryRecvError::Lagged(_)) = ev_rx.try_recv() {}
            }
            match session.handle(item) {
                Action::Reply(v) => write_msg(&mut wr, &v, opts.pretty).await?,
                Action::Dispatch { command, args, id } => {
                    inflight = Some((dispatcher.dispatch(command, args), id));
                }
            }
        }
        if eof && inflight.is_none() && queue.is_empty() {
            return Ok(());
        }
        let negotiated = session.negotiated;
        tokio::select! {
            r = rd.read(&mut buf), if inflight.is_none() && !eof => {
                let n = r?;
                let mut items = Vec::new();
                if n == 0 {
                    eof = true;
                    parser.finish(&mut items);
                } else {
                    parser.feed(&buf[..n], &mut items);
                }
                queue.extend(items);
            }
            res = async { inflight.as_mut().map(|f| &mut f.0).expect("guarded").await }, if inflight.is_some() => {
                let (_, id) = inflight.take().expect("guarded");
                let v = match res {
                    Ok(ret) => return_response(ret, id.as_ref()),
                    Err(e) => error_response(&e, id.as_ref()),
                };
                write_msg(&mut wr, &v, opts.pretty).await?;
            }
            ev = ev_rx.recv(), if negotiated && events_open => {
                match ev {
                    Ok(msg) => write_msg(&mut wr, &msg, opts.pretty).await?,
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => events_open = false,
                }
            }
        }
    }
}

/// Accepts clients on a Unix socket one after another (a socket monitor serves one client
/// at a time; a second client gets its greeting when the first disconnects). Runs until
/// `accept` fails. Errors on a client connection end that connection only.
pub async fn serve_unix_listener(
    listener: tokio::net::UnixListener,
    dispatcher: Arc<dyn Dispatcher>,
    events: Arc<EventBus>,
    opts: MonitorOptions,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = serve(stream, dispatcher.clone(), &events, &opts).await;
    }
}

/// [`serve_unix_listener`] for a TCP listener.
pub async fn serve_tcp_listener(
    listener: tokio::net::TcpListener,
    dispatcher: Arc<dyn Dispatcher>,
    events: Arc<EventBus>,
    opts: MonitorOptions,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = serve(stream, dispatcher.clone(), &events, &opts).await;
    }
}
