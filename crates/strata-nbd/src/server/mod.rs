//! The NBD server: listeners, the handshake, the per-connection request loop and the exports
//! a daemon adds and removes at run time.
//!
//! One [`NbdServer`] serves one listen address; a process may run several. Each accepted
//! connection runs in its own task: the handshake (bounded by `handshake_max_seconds`), then
//! a loop that reads requests and serves each in a task of its own, with the replies
//! serialised through a writer task and at most [`MAX_IN_FLIGHT`] requests per connection.

mod conn;
mod export;
mod handshake;
mod status;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use strata_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use export::ExportSet;
pub use export::{DirtySource, ExportConfig};
pub use status::{GuestExtent, guest_status};

/// Requests one connection may have in flight (QEMU's `MAX_NBD_REQUESTS`).
pub const MAX_IN_FLIGHT: usize = 16;

/// A byte stream a connection runs over (a socket, or a TLS session wrapping one).
pub trait NbdStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> NbdStream for T {}

/// A boxed [`NbdStream`].
pub type BoxStream = Box<dyn NbdStream>;

/// The hook `NBD_OPT_STARTTLS` calls to wrap the plain stream in TLS (after the server has
/// acknowledged the option). With a hook installed the server runs in FORCEDTLS mode: every
/// option but `STARTTLS` and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until TLS is up.
pub trait TlsHook: Send + Sync + 'static {
    /// Run the server side of the TLS handshake on `stream`.
    fn wrap(&self, stream: BoxStream) -> BoxFuture<'static, std::io::Result<BoxStream>>;
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix domain socket at this path (an existing socket file is replaced).
    Unix(PathBuf),
    /// TCP; port 0 picks a free port (see [`NbdServer::local_addr`]).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            ListenAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Server limits (QMP `nbd-server-start`'s `max-connections` and `handshake-max-seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerOptions {
    /// Most clients connected at once; 0 = unlimited. 1 also stops multi-conn advertising.
    pub max_connections: u32,
    /// Seconds a client has to finish the handshake; 0 = unlimited.
    pub handshake_max_seconds: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 100,
            handshake_max_seconds: 10,
        }
    }
}

/// State shared by the acceptor and every connection.
pub(crate) struct Shared {
    pub(crate) exports: ExportSet,
    pub(crate) opts: ServerOptions,
    pub(crate) tls: Option<Arc<dyn TlsHook>>,
    /// Cancelled by [`NbdServer::stop`].
    pub(crate) cancel: CancellationToken,
    /// Connection tasks and their request tasks.
    pub(crate) tracker: TaskTracker,
    connections: AtomicU32,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// An NBD server on one listen address.
pub struct NbdServer {
    addr: ListenAddr,
    shared: Arc<Shared>,
    acceptors: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The socket file to remove on stop.
    unix_path: Option<PathBuf>,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("addr", &self.addr)
            .field("exports", &self.exports())
            .finish()
    }
}

impl NbdServer {
    /// Bind `addr` and start accepting clients.
    pub async fn start(addr: ListenAddr, opts: ServerOptions) -> Result<Arc<NbdServer>> {
        Self::start_with_tls(addr, opts, None).await
    }

    /// [`NbdServer::start`] with a TLS hook for `NBD_OPT_STARTTLS`.
    pub async fn start_with_tls(
        addr: ListenAddr,
        opts: ServerOptions,
        tls: Option<Arc<dyn TlsHook>>,
    ) -> Result<Arc<NbdServer>> {
        let mut listeners = Vec::new();
        let mut unix_path = None;
        let local = match &addr {
            ListenAddr::Unix(path) => {
                // As QEMU does: a stale socket file from an earlier run is replaced.
                if let Ok(md) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if md.file_type().is_socket() {
                        let _ = std::fs::remove_file(path);
                    }
                }
                let l = UnixListener::bind(path).map_err(|e| {
                    Error::from(e).context(format!(
                        "Failed to bind socket to {}",
                        path.to_string_lossy()
                    ))
                })?;
                listeners.push(Listener::Unix(l));
                unix_path = Some(path.clone());
                addr.clone()
            }
            ListenAddr::Tcp { host, port } => {
                let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::InvalidArgument,
                            format!("address resolution failed for {host}:{port}: {e}"),
                        )
                    })?
                    .collect();
                let mut last_err = None;
                let mut bound_port = *port;
                for sa in addrs {
                    let mut sa = sa;
                    // With port 0, every address family shares the first port picked.
                    if *port == 0 && bound_port != 0 {
                        sa.set_port(bound_port);
                    }
                    match TcpListener::bind(sa).await {
                        Ok(l) => {
                            if let Ok(a) = l.local_addr() {
                                bound_port = a.port();
                            }
                            listeners.push(Listener::Tcp(l));
                        }
                        Err(e) => last_err = Some(e),
                    }
                }
                if listeners.is_empty() {
                    let e = last_err
                        .map(Error::from)
                        .unwrap_or_else(|| Error::invalid("no address to listen on"));
                    return Err(e.context(format!("Failed to bind socket to {host}:{port}")));
                }
                ListenAddr::Tcp {
                    host: host.clone(),
                    port: bound_port,
                }
            }
        };
        let shared = Arc::new(Shared {
            exports: ExportSet::default(),
            opts,
            tls,
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            connections: AtomicU32::new(0),
        });
        let acceptors = listeners
            .into_iter()
            .map(|l| tokio::spawn(accept_loop(l, Arc::clone(&shared))))
            .collect();
        Ok(Arc::new(NbdServer {
            addr: local,
            shared,
            acceptors: Mutex::new(acceptors),
            unix_path,
        }))
    }

    /// The address the server listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// The options the server runs with.
    pub fn options(&self) -> ServerOptions {
        self.shared.opts
    }

    /// Export a node.
    pub fn add_export(&self, cfg: ExportConfig) -> Result<()> {
        if self.shared.cancel.is_cancelled() {
            return Err(Error::invalid("NBD server not running"));
        }
        self.shared.exports.add(cfg, &self.shared.cancel)
    }

    /// Remove an export. `hard` disconnects its clients; otherwise an export with clients
    /// is refused with "export '...' still in use".
    pub fn remove_export(&self, name: &str, hard: bool) -> Result<()> {
        self.shared.exports.remove(name, hard)
    }

    /// How many clients are connected to the export `name` (0 if there is none).
    pub fn export_clients(&self, name: &str) -> usize {
        self.shared
            .exports
            .get(name)
            .map_or(0, |e| e.clients.load(Ordering::SeqCst))
    }

    /// Export names, in the order they were added.
    pub fn exports(&self) -> Vec<String> {
        self.shared.exports.names()
    }

    /// Connected clients (including those still in the handshake).
    pub fn connections(&self) -> u32 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Stop: close the listeners, disconnect every client, drop every export, and wait
    /// until no request is running any more.
    pub async fn stop(&self) {
        self.shared.cancel.cancel();
        let acceptors = std::mem::take(&mut *self.acceptors.lock());
        for a in acceptors {
            a.abort();
            let _ = a.await;
        }
        self.shared.exports.clear();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Serves one connection over `stream` with `exports` and no listener, then waits for its
/// request tasks: the fuzz target's way into the real handshake and request loop.
#[doc(hidden)]
pub async fn serve_detached(
    stream: BoxStream,
    exports: Vec<ExportConfig>,
    opts: ServerOptions,
) -> Result<()> {
    let shared = Arc::new(Shared {
        exports: ExportSet::default(),
        opts,
        tls: None,
        cancel: CancellationToken::new(),
        tracker: TaskTracker::new(),
        connections: AtomicU32::new(0),
    });
    for cfg in exports {
        shared.exports.add(cfg, &shared.cancel)?;
    }
    conn::serve(stream, Arc::clone(&shared)).await;
    shared.tracker.close();
    shared.tracker.wait().await;
    Ok(())
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        for a in self.acceptors.get_mut().drain(..) {
            a.abort();
        }
    }
}

/// Decrements the connection count when a connection ends.
struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An accepted connection, detached from the runtime that accepted it so that it can be
/// served on an I/O thread (each runtime polls the sockets registered with it).
enum Accepted {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Accepted {
    /// Registers the socket with the runtime this runs on.
    fn into_stream(self) -> std::io::Result<BoxStream> {
        Ok(match self {
            Accepted::Unix(s) => Box::new(tokio::net::UnixStream::from_std(s)?),
            Accepted::Tcp(s) => Box::new(tokio::net::TcpStream::from_std(s)?),
        })
    }
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    Ok(match listener {
        Listener::Unix(l) => Accepted::Unix(l.accept().await?.0.into_std()?),
        Listener::Tcp(l) => {
            let s = l.accept().await?.0;
            let _ = s.set_nodelay(true);
            Accepted::Tcp(s.into_std()?)
        }
    })
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    loop {
        let accepted = match accept(&listener).await {
            Ok(a) => a,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.cancel.is_cancelled() {
            return;
        }
        let max = shared.opts.max_connections;
        let n = shared.connections.fetch_add(1, Ordering::SeqCst);
        let guard = ConnGuard(Arc::clone(&shared));
        if max != 0 && n >= max {
            // Over the limit: close at once.
            drop(accepted);
            drop(guard);
            continue;
        }
        let sh = Arc::clone(&shared);
        let serve = async move {
            let _guard = guard;
            if let Ok(stream) = accepted.into_stream() {
                conn::serve(stream, sh).await;
            }
        };
        // A connection lives on one I/O thread: its requests never change threads.
        match strata_io::iothread::global() {
            Some(threads) => shared.tracker.spawn_on(serve, threads.next_handle()),
            None => shared.tracker.spawn(serve),
        };
    }
}
