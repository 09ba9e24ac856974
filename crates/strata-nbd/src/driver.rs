//! The `nbd` block driver for the graph (`blockdev-add driver=nbd`): options as QEMU's
//! `BlockdevOptionsNbd`, TLS from a loaded `tls-creds` object, `open-timeout` (retry the
//! first connection) and `reconnect-delay` (a lost connection is re-established; requests
//! made during the outage wait up to that many seconds for it before failing).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Map, Value};
use strata_core::{
    BlockNode, BoxFuture, Error, ErrorKind, Extent, IoBuf, NodeRef, Prealloc, Result, WriteFlags,
    ZeroFlags,
};
use strata_graph::blockdev::{DriverFactory, Objects};

use crate::client::{ClientOptions, NbdAddr, NbdClient, NbdUri};
use crate::tls::TlsCreds;

/// Registers as `Objects::protocol_drivers["nbd"]`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NbdDriverFactory;

/// Parse a QAPI `SocketAddress` (`{"type": "unix", "path"}` or `{"type": "inet", "host",
/// "port"}`; the port is a string in QAPI, a number is accepted too).
pub fn socket_address(v: &Value) -> std::result::Result<NbdAddr, String> {
    let Some(o) = v.as_object() else {
        return Err("Parameter 'server' is missing".into());
    };
    let s = |k: &str| o.get(k).and_then(Value::as_str);
    match s("type") {
        Some("unix") => {
            let path = s("path").ok_or("Parameter 'server.path' is missing")?;
            Ok(NbdAddr::Unix(PathBuf::from(path)))
        }
        Some("inet") => {
            let host = s("host").ok_or("Parameter 'server.host' is missing")?;
            let port = match o.get("port") {
                Some(Value::String(p)) => p
                    .parse()
                    .map_err(|_| format!("Service '{p}' is not a number"))?,
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or("Invalid port")?,
                _ => return Err("Parameter 'server.port' is missing".into()),
            };
            Ok(NbdAddr::Tcp {
                host: host.to_string(),
                port,
            })
        }
        Some(other) => Err(format!("Address type '{other}' is not supported")),
        None => Err("Parameter 'server.type' is missing".into()),
    }
}

/// The TLS credentials object `id`, which must be for a client.
pub fn client_creds(objects: &Objects, id: &str) -> std::result::Result<Arc<TlsCreds>, String> {
    let Some(obj) = objects.tls_creds.get(id) else {
        return Err(format!("No TLS credentials with id '{id}'"));
    };
    let creds = Arc::clone(obj)
        .downcast::<TlsCreds>()
        .map_err(|_| format!("Object with id '{id}' is not TLS credentials"))?;
    Ok(creds)
}

fn opt_u32(o: &Map<String, Value>, k: &str) -> u64 {
    match o.get(k) {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

impl DriverFactory for NbdDriverFactory {
    fn open<'a>(
        &'a self,
        opts: &'a Map<String, Value>,
        read_only: bool,
        objects: &'a Objects,
    ) -> Pin<Box<dyn Future<Output = std::result::Result<NodeRef, String>> + Send + 'a>> {
        Box::pin(async move {
            let addr = socket_address(opts.get("server").unwrap_or(&Value::Null))?;
            let export = opts.get("export").and_then(Value::as_str).unwrap_or("");
            let mut co = ClientOptions {
                read_only,
                ..Default::default()
            };
            if let Some(id) = opts.get("tls-creds").and_then(Value::as_str) {
                let creds = client_creds(objects, id)?;
                let host = match (opts.get("tls-hostname").and_then(Value::as_str), &addr) {
                    (Some(h), _) => Some(h.to_string()),
                    (None, NbdAddr::Tcp { host, .. }) => Some(host.clone()),
                    (None, NbdAddr::Unix(_)) => None,
                };
                co.tls = Some(creds.client_connector(host.as_deref())?);
            }
            let node = ReconnectingNbd::open(
                addr,
                export,
                co,
                Duration::from_secs(opt_u32(opts, "reconnect-delay")),
                Duration::from_secs(opt_u32(opts, "open-timeout")),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(node as NodeRef)
        })
    }
}

/// An NBD client node that re-establishes its connection (QEMU's `reconnect-delay`).
pub struct ReconnectingNbd {
    addr: NbdAddr,
    export: String,
    opts: ClientOptions,
    delay: Duration,
    size: u64,
    read_only: bool,
    alignment: u64,
    current: Mutex<Arc<NbdClient>>,
    /// When the current outage began.
    outage: Mutex<Option<Instant>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
}

impl fmt::Debug for ReconnectingNbd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconnectingNbd")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

/// First pause between reconnection attempts; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl ReconnectingNbd {
    /// Connect (retrying for up to `open_timeout`).
    pub async fn open(
        addr: NbdAddr,
        export: &str,
        opts: ClientOptions,
        reconnect_delay: Duration,
        open_timeout: Duration,
    ) -> Result<Arc<ReconnectingNbd>> {
        let deadline = Instant::now() + open_timeout;
        let mut backoff = FIRST_BACKOFF;
        let client = loop {
            match NbdClient::connect_with(&addr, export, &opts).await {
                Ok(c) => break c,
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        Ok(Arc::new(ReconnectingNbd {
            size: client.size(),
            read_only: client.read_only(),
            alignment: client.request_alignment(),
            addr,
            export: export.to_string(),
            opts,
            delay: reconnect_delay,
            current: Mutex::new(client),
            outage: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }))
    }

    /// The connection in use now.
    pub fn client(&self) -> Arc<NbdClient> {
        self.current.lock().clone()
    }

    /// A live connection: the current one, or a new one. While the outage is younger than
    /// `reconnect-delay` this keeps trying; after that (or with no delay) one attempt is made.
    async fn live(&self) -> Result<Arc<NbdClient>> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let c = self.client();
            if c.is_connected() {
                return Ok(c);
            }
            let since = *self.outage.lock().get_or_insert_with(Instant::now);
            let deadline = since + self.delay;
            let _g = self.connecting.lock().await;
            let c = self.client();
            if c.is_connected() {
                return Ok(c);
            }
            let now = Instant::now();
            let attempt = NbdClient::connect_with(&self.addr, &self.export, &self.opts);
            let r = if deadline > now {
                tokio::time::timeout(deadline - now, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::new(ErrorKind::Io(libc::ETIMEDOUT), "timed out"))
                    })
            } else {
                attempt.await
            };
            match r {
                Ok(n) if n.size() != self.size => {
                    n.disconnect();
                    return Err(Error::new(
                        ErrorKind::Io(libc::EIO),
                        "NBD export size changed on reconnect",
                    ));
                }
                Ok(n) => {
                    *self.current.lock() = Arc::clone(&n);
                    *self.outage.lock() = None;
                    return Ok(n);
                }
                Err(e) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Error::new(
                            ErrorKind::Io(libc::EIO),
                            format!("NBD connection lost, reconnect failed: {e}"),
                        ));
                    }
                    drop(_g);
                    tokio::time::sleep(backoff.min(deadline - now)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Run `op` on a live connection; with a reconnect delay, an attempt that failed
    /// because the connection dropped is repeated on the next one.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Arc<NbdClient>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        loop {
            let c = self.live().await?;
            match op(Arc::clone(&c)).await {
                Err(_) if !c.is_connected() && !self.delay.is_zero() => continue,
                r => return r,
            }
        }
    }
}

impl BlockNode for ReconnectingNbd {
    fn driver(&self) -> &'static str {
        "nbd"
    }

    fn filename(&self) -> String {
        NbdUri {
            addr: self.addr.clone(),
            export: self.export.clone(),
        }
        .to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u64 {
        self.alignment
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            if self.delay.is_zero() {
                let c = self.live().await?;
                return c.read(offset, buf).await;
            }
            // The buffer of a request lost with its connection is gone: read into a
            // scratch buffer that may be retried, then copy.
            let mut buf = buf;
            let len = buf.len();
            let data = self
                .run(|c| async move { c.read(offset, IoBuf::zeroed(len)).await })
                .await?;
            buf[..].copy_from_slice(&data[..]);
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            if self.delay.is_zero() {
                let c = self.live().await?;
                return c.write(offset, buf, flags).await;
            }
            let src = &buf;
            self.run(|c| async move {
                let mut copy = IoBuf::zeroed(src.len());
                copy[..].copy_from_slice(&src[..]);
                c.write(offset, copy, flags).await.map(|_| ())
            })
            .await?;
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(self.run(move |c| async move { c.write_zeroes(offset, len, flags).await }))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(self.run(move |c| async move { c.discard(offset, len).await }))
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.run(|c| async move { c.flush().await }))
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(self.run(move |c| async move { c.block_status(offset, len).await }))
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.client().truncate(size, prealloc).await })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let c = self.client();
            if c.is_connected() {
                c.close().await
            } else {
                Ok(())
            }
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
