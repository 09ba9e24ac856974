//! The NBD client: a [`BlockNode`] (driver `nbd`) over one connection to an NBD server.
//!
//! The handshake negotiates fixed newstyle, extended headers or structured replies,
//! `base:allocation` and `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME`). In
//! transmission, requests go out through a writer task (so a dropped caller can never leave
//! half a request on the wire) and a reader task matches replies to requests by cookie; any
//! number of requests may be in flight. A read's buffer lives in the request table until the
//! reply is complete, and the reader fills it straight from the socket.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use strata_core::range::check_request;
use strata_core::{
    BlockNode, BlockStatus, BoxFuture, Error, ErrorKind, Extent, IoBuf, Prealloc, Result,
    WriteFlags, ZeroFlags,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

use crate::proto::*;
use crate::server::BoxStream;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where a server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A parsed `nbd://host[:port]/export` or `nbd+unix:///export?socket=/path` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub addr: NbdAddr,
    /// The export name (empty for the default export).
    pub export: String,
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::invalid(format!("invalid escape in URI '{s}'")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::invalid("URI is not UTF-8"))
}

impl NbdUri {
    /// Parse an NBD URI (schemes `nbd`, `nbd+tcp`, `nbd+unix`; no TLS schemes yet).
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let bad = || Error::invalid(format!("invalid URI '{uri}'"));
        let (scheme, rest) = uri.split_once("://").ok_or_else(bad)?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path)?;
        let mut socket = None;
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("socket", v)) => socket = Some(percent_decode(v)?),
                _ => {
                    return Err(Error::invalid(format!(
                        "unexpected URI query parameter '{kv}'"
                    )));
                }
            }
        }
        let addr = match scheme {
            "nbd" | "nbd+tcp" => {
                if socket.is_some() {
                    return Err(bad());
                }
                let (host, port) = if let Some(h) = authority.strip_prefix('[') {
                    let (h, p) = h.split_once(']').ok_or_else(bad)?;
                    (h.to_string(), p.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h.to_string(), Some(p)),
                        None => (authority.to_string(), None),
                    }
                };
                if host.is_empty() {
                    return Err(bad());
                }
                let port = match port {
                    Some(p) => p.parse().map_err(|_| bad())?,
                    None => DEFAULT_PORT,
                };
                NbdAddr::Tcp { host, port }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad());
                }
                NbdAddr::Unix(PathBuf::from(socket.ok_or_else(bad)?))
            }
            _ => return Err(bad()),
        };
        Ok(NbdUri { addr, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            // As QEMU names them: no path at all for the default export.
            NbdAddr::Unix(p) if self.export.is_empty() => {
                write!(f, "nbd+unix://?socket={}", p.display())
            }
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
            NbdAddr::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "nbd://[{host}]:{port}")?;
                } else {
                    write!(f, "nbd://{host}:{port}")?;
                }
                if self.export.is_empty() {
                    Ok(())
                } else {
                    write!(f, "/{}", self.export)
                }
            }
        }
    }
}

/// The client side of TLS: `NBD_OPT_STARTTLS` hands the plain stream to this and continues
/// the handshake over what it returns (see [`crate::tls::TlsCreds::client_connector`]).
pub trait TlsConnect: Send + Sync + fmt::Debug + 'static {
    /// Run the client side of the TLS handshake on `stream`.
    fn connect(
        &self,
        stream: BoxStream,
    ) -> futures::future::BoxFuture<'static, std::io::Result<BoxStream>>;
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Refuse writes even if the export allows them.
    pub read_only: bool,
    /// Try `NBD_OPT_EXTENDED_HEADERS` first.
    pub extended_headers: bool,
    /// Try `NBD_OPT_STRUCTURED_REPLY` (needed for block status and sparse reads).
    pub structured_replies: bool,
    /// Upgrade the connection with `NBD_OPT_STARTTLS` before any other option
    /// (QEMU's `tls-creds`); the server must agree or the connection fails.
    pub tls: Option<Arc<dyn TlsConnect>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            read_only: false,
            extended_headers: true,
            structured_replies: true,
            tls: None,
        }
    }
}

/// Reply style the connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HeaderMode {
    /// Simple replies only.
    Simple,
    /// Structured replies.
    Structured,
    /// Extended headers (64-bit lengths).
    Extended,
}

/// One request on its way to the writer task.
struct WireReq {
    header: Vec<u8>,
    payload: Option<IoBuf>,
    /// Gets the payload buffer back once written.
    ret: Option<oneshot::Sender<IoBuf>>,
}

/// What a completed request hands back.
#[derive(Default)]
struct Outcome {
    buf: Option<IoBuf>,
    extents: Option<Vec<Descriptor>>,
}

struct Pending {
    offset: u64,
    len: u64,
    buf: Option<IoBuf>,
    extents: Option<Vec<Descriptor>>,
    error: Option<(u32, String)>,
    done: oneshot::Sender<Result<Outcome>>,
}

#[derive(Default)]
struct Table {
    map: HashMap<u64, Pending>,
    next: u64,
    dead: Option<String>,
}

/// State the client, its reader and its writer share.
#[derive(Default)]
struct Shared {
    table: Mutex<Table>,
    /// The id of `base:allocation`, if negotiated.
    base_ctx: Option<u32>,
}

impl Shared {
    /// The connection is gone: fail everything in flight and every later request.
    fn fail_all(&self, why: &str) {
        let mut t = self.table.lock();
        if t.dead.is_none() {
            t.dead = Some(why.to_string());
        }
        for (_, p) in t.map.drain() {
            let _ = p.done.send(Err(conn_error(why)));
        }
    }
}

/// QEMU's "Failed to connect to '%s': <strerror>".
fn connect_error(e: &std::io::Error, what: &str) -> Error {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    let text = match e.raw_os_error() {
        Some(n) => strata_core::error::strerror(n),
        None => e.to_string(),
    };
    Error::new(
        ErrorKind::Io(errno),
        format!("Failed to connect to '{what}': {text}"),
    )
}

fn conn_error(why: &str) -> Error {
    Error::new(
        ErrorKind::Io(libc::EIO),
        format!("NBD connection failed: {why}"),
    )
}

/// An NBD client connection, usable as a block node (driver `nbd`).
pub struct NbdClient {
    uri: NbdUri,
    size: u64,
    flags: u16,
    read_only: bool,
    mode: HeaderMode,
    block_sizes: (u32, u32, u32),
    base_ctx: Option<u32>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<WireReq>,
    closed: AtomicBool,
}

/// The block-node name of [`NbdClient`].
pub type NbdNode = NbdClient;

impl fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClient")
            .field("uri", &self.uri.to_string())
            .field("size", &self.size)
            .field("flags", &self.flags)
            .field("mode", &self.mode)
            .finish()
    }
}

struct Negotiated {
    size: u64,
    flags: u16,
    mode: HeaderMode,
    block_sizes: (u32, u32, u32),
    base_ctx: Option<u32>,
}

async fn read_opt_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).await?;
    let h = decode_option_reply_header(&h).map_err(proto_err)?;
    if h.option != option {
        return Err(Error::corrupt(format!(
            "Unexpected option type {:#x}, expected {option:#x}",
            h.option
        )));
    }
    if h.len > 1 << 20 {
        return Err(Error::corrupt("NBD option reply too long"));
    }
    let mut data = vec![0u8; h.len as usize];
    s.read_exact(&mut data).await?;
    Ok((h.reply, data))
}

fn proto_err(e: ProtoError) -> Error {
    Error::corrupt(format!("NBD protocol error: {e}"))
}

fn opt_error(rep: u32, data: &[u8], what: &str) -> Error {
    let msg = String::from_utf8_lossy(data);
    let kind = match rep {
        REP_ERR_UNKNOWN => ErrorKind::NotFound,
        REP_ERR_UNSUP | REP_ERR_POLICY | REP_ERR_PLATFORM | REP_ERR_TLS_REQD => {
            ErrorKind::Unsupported
        }
        _ => ErrorKind::InvalidArgument,
    };
    let msg = if msg.is_empty() {
        format!("{what} failed (reply {rep:#x})")
    } else {
        format!("{what} failed: {msg}")
    };
    Error::new(kind, msg)
}

/// QEMU's name for an option, for messages.
fn opt_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// `NBD_REP_ERR_TLS_REQD` ends the handshake whatever the option was (QEMU's text).
fn check_tls_reqd(rep: u32, option: u32, data: &[u8]) -> Result<()> {
    if rep == REP_ERR_TLS_REQD {
        let mut msg = format!(
            "TLS negotiation required before option {option} ({})\nDid you forget a valid tls-creds?",
            opt_name(option)
        );
        if !data.is_empty() {
            msg.push_str(&format!(
                "\nserver reported: {}",
                String::from_utf8_lossy(data)
            ));
        }
        return Err(Error::new(ErrorKind::Io(libc::EPERM), msg));
    }
    Ok(())
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake (QEMU's `nbd_receive_starttls`).
async fn starttls(mut s: BoxStream, tls: &dyn TlsConnect) -> Result<BoxStream> {
    s.write_all(&encode_option(OPT_STARTTLS, &[])).await?;
    let (rep, data) = read_opt_reply(&mut s, OPT_STARTTLS).await?;
    if rep != REP_ACK {
        if rep_is_err(rep) && !data.is_empty() {
            return Err(Error::unsupported(format!(
                "Server rejected request to start TLS: {}",
                String::from_utf8_lossy(&data)
            )));
        }
        return Err(Error::unsupported("Server don't support STARTTLS option"));
    }
    if !data.is_empty() {
        return Err(Error::corrupt("Start TLS response was not zero"));
    }
    tls.connect(s)
        .await
        .map_err(|e| Error::new(ErrorKind::Io(libc::EPERM), e.to_string()))
}

async fn handshake(
    mut stream: BoxStream,
    export: &str,
    opts: &ClientOptions,
) -> Result<(BoxStream, Negotiated)> {
    let s = &mut stream;
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).await?;
    let hflags = decode_greeting(&g).map_err(proto_err)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(Error::unsupported("Server does not support fixed newstyle"));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await?;
    if let Some(tls) = &opts.tls {
        stream = starttls(stream, tls.as_ref()).await?;
    }
    let s = &mut stream;

    let mut mode = HeaderMode::Simple;
    if opts.extended_headers {
        s.write_all(&encode_option(OPT_EXTENDED_HEADERS, &[]))
            .await?;
        let (rep, data) = read_opt_reply(s, OPT_EXTENDED_HEADERS).await?;
        check_tls_reqd(rep, OPT_EXTENDED_HEADERS, &data)?;
        if rep == REP_ACK {
            mode = HeaderMode::Extended;
        }
    }
    if mode == HeaderMode::Simple && opts.structured_replies {
        s.write_all(&encode_option(OPT_STRUCTURED_REPLY, &[]))
            .await?;
        let (rep, data) = read_opt_reply(s, OPT_STRUCTURED_REPLY).await?;
        check_tls_reqd(rep, OPT_STRUCTURED_REPLY, &data)?;
        if rep == REP_ACK {
            mode = HeaderMode::Structured;
        }
    }
    let mut base_ctx = None;
    if mode >= HeaderMode::Structured {
        let req = MetaContextRequest {
            export: export.to_string(),
            queries: vec![CONTEXT_BASE_ALLOCATION.to_string()],
        };
        s.write_all(&encode_option(
            OPT_SET_META_CONTEXT,
            &encode_meta_context_request(&req),
        ))
        .await?;
        loop {
            let (rep, data) = read_opt_reply(s, OPT_SET_META_CONTEXT).await?;
            check_tls_reqd(rep, OPT_SET_META_CONTEXT, &data)?;
            match rep {
                REP_META_CONTEXT => {
                    let (id, name) = decode_rep_meta_context(&data).map_err(proto_err)?;
                    if name == CONTEXT_BASE_ALLOCATION {
                        base_ctx = Some(id);
                    }
                }
                REP_ACK => break,
                r if rep_is_err(r) => {
                    base_ctx = None;
                    break;
                }
                _ => return Err(Error::corrupt("unexpected reply to SET_META_CONTEXT")),
            }
        }
    }

    let req = InfoRequest {
        name: export.to_string(),
        items: vec![INFO_BLOCK_SIZE],
    };
    s.write_all(&encode_option(OPT_GO, &encode_info_request(&req)))
        .await?;
    let mut export_info = None;
    let mut block_sizes = (1, 4096, MAX_BUFFER);
    loop {
        let (rep, data) = read_opt_reply(s, OPT_GO).await?;
        check_tls_reqd(rep, OPT_GO, &data)?;
        match rep {
            REP_INFO => match decode_info(&data).map_err(proto_err)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => block_sizes = (min.max(1), preferred.max(1), max.max(min.max(1))),
                _ => {}
            },
            REP_ACK => break,
            REP_ERR_UNSUP if mode != HeaderMode::Extended => {
                // An old server: NBD_OPT_EXPORT_NAME cannot fail politely.
                s.write_all(&encode_option(OPT_EXPORT_NAME, export.as_bytes()))
                    .await?;
                let mut b = [0u8; 10];
                s.read_exact(&mut b).await?;
                if !no_zeroes {
                    let mut pad = [0u8; EXPORT_NAME_PADDING];
                    s.read_exact(&mut pad).await?;
                }
                let size = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
                let flags = u16::from_be_bytes([b[8], b[9]]);
                export_info = Some((size, flags));
                break;
            }
            REP_ERR_UNKNOWN => {
                let _ = s.write_all(&encode_option(OPT_ABORT, &[])).await;
                // QEMU's error, with its hint on the next line.
                let mut msg = "Requested export not available".to_string();
                if !data.is_empty() {
                    msg.push_str(&format!(
                        "\nserver reported: {}",
                        String::from_utf8_lossy(&data)
                    ));
                }
                return Err(Error::new(ErrorKind::NotFound, msg));
            }
            r if rep_is_err(r) => {
                let _ = s.write_all(&encode_option(OPT_ABORT, &[])).await;
                return Err(opt_error(r, &data, &format!("Opening export '{export}'")));
            }
            _ => {}
        }
    }
    let (size, flags) =
        export_info.ok_or_else(|| Error::corrupt("server did not send export info"))?;
    Ok((
        stream,
        Negotiated {
            size,
            flags,
            mode,
            block_sizes,
            base_ctx,
        },
    ))
}

impl NbdClient {
    /// Connect to the export `export` at `addr` with default options.
    pub async fn connect(addr: &NbdAddr, export: &str) -> Result<Arc<NbdClient>> {
        Self::connect_with(addr, export, &ClientOptions::default()).await
    }

    /// Connect to the export a URI names.
    pub async fn connect_uri(uri: &str) -> Result<Arc<NbdClient>> {
        let u = NbdUri::parse(uri)?;
        Self::connect_with(&u.addr, &u.export, &ClientOptions::default()).await
    }

    /// Connect with explicit options.
    pub async fn connect_with(
        addr: &NbdAddr,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Arc<NbdClient>> {
        let stream: BoxStream = match addr {
            NbdAddr::Unix(p) => Box::new(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(|e| connect_error(&e, &p.display().to_string()))?,
            ),
            NbdAddr::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| connect_error(&e, &format!("{host}:{port}")))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        Self::over_stream(stream, addr.clone(), export, opts).await
    }

    /// Run the handshake over an already connected stream (a TLS session, a socket pair).
    pub async fn over_stream(
        stream: BoxStream,
        addr: NbdAddr,
        export: &str,
        opts: &ClientOptions,
    ) -> Result<Arc<NbdClient>> {
        let (stream, n) = handshake(stream, export, opts).await?;
        let (rd, wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared {
            table: Mutex::default(),
            base_ctx: n.base_ctx,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer_task(wr, rx, Arc::clone(&shared)));
        tokio::spawn(reader_task(rd, Arc::clone(&shared)));
        Ok(Arc::new(NbdClient {
            uri: NbdUri {
                addr,
                export: export.to_string(),
            },
            size: n.size,
            flags: n.flags,
            read_only: opts.read_only || n.flags & TFLAG_READ_ONLY != 0,
            mode: n.mode,
            block_sizes: n.block_sizes,
            base_ctx: n.base_ctx,
            shared,
            tx,
            closed: AtomicBool::new(false),
        }))
    }

    /// The export's transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// The negotiated reply style.
    pub fn header_mode(&self) -> HeaderMode {
        self.mode
    }

    /// `(minimum, preferred, maximum)` block sizes the server advertised.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        self.block_sizes
    }

    /// Whether `base:allocation` was negotiated (block status is real, not a guess).
    pub fn has_base_allocation(&self) -> bool {
        self.base_ctx.is_some()
    }

    /// Whether the connection is still up (not closed, no transport failure seen).
    pub fn is_connected(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && self.shared.table.lock().dead.is_none()
    }

    /// The URI of the export.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    fn extended(&self) -> bool {
        self.mode == HeaderMode::Extended
    }

    /// Largest length one request may carry.
    fn max_len(&self, with_payload: bool) -> u64 {
        if with_payload {
            self.block_sizes.2.into()
        } else if self.extended() {
            1 << 62
        } else {
            // 32-bit lengths; keep them aligned.
            u64::from(u32::MAX) & !0xfff
        }
    }

    async fn submit(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<IoBuf>,
        read_buf: Option<IoBuf>,
    ) -> Result<(Outcome, Option<IoBuf>)> {
        let (done_tx, done_rx) = oneshot::channel();
        let cookie = {
            let mut t = self.shared.table.lock();
            if let Some(why) = &t.dead {
                return Err(conn_error(why));
            }
            if self.closed.load(Ordering::SeqCst) {
                return Err(conn_error("client closed"));
            }
            t.next = t.next.wrapping_add(1);
            let cookie = t.next;
            t.map.insert(
                cookie,
                Pending {
                    offset,
                    len,
                    buf: read_buf,
                    extents: None,
                    error: None,
                    done: done_tx,
                },
            );
            cookie
        };
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        let header = encode_request(&req, self.extended()).map_err(proto_err)?;
        let (ret_tx, ret_rx) = if payload.is_some() {
            let (a, b) = oneshot::channel();
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        if self
            .tx
            .send(WireReq {
                header,
                payload,
                ret: ret_tx,
            })
            .is_err()
        {
            self.shared.table.lock().map.remove(&cookie);
            return Err(conn_error("writer gone"));
        }
        let payload_back = match ret_rx {
            Some(rx) => Some(rx.await.map_err(|_| conn_error("writer gone"))?),
            None => None,
        };
        let out = done_rx
            .await
            .map_err(|_| conn_error("connection closed"))??;
        Ok((out, payload_back))
    }

    async fn read_impl(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        check_request(offset, buf.len() as u64, self.size)?;
        let max = self.max_len(true) as usize;
        let mut futs = Vec::new();
        let mut off = offset;
        while !buf.is_empty() {
            let n = buf.len().min(max);
            let view = buf.split_to(n);
            futs.push(async move {
                let (out, _) = self
                    .submit(CMD_READ, 0, off, n as u64, None, Some(view))
                    .await?;
                out.buf.ok_or_else(|| conn_error("read buffer lost"))
            });
            off += n as u64;
        }
        let views = futures::future::try_join_all(futs).await?;
        Ok(IoBuf::join(views))
    }

    async fn write_impl(&self, offset: u64, mut buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "NBD export is read-only"));
        }
        check_request(offset, buf.len() as u64, self.size)?;
        let fua = flags.fua && self.flags & TFLAG_SEND_FUA != 0;
        let max = self.max_len(true) as usize;
        let mut futs = Vec::new();
        let mut off = offset;
        while !buf.is_empty() {
            let n = buf.len().min(max);
            let view = buf.split_to(n);
            let f = if fua { CMD_FLAG_FUA } else { 0 };
            futs.push(async move {
                let (_, back) = self
                    .submit(CMD_WRITE, f, off, n as u64, Some(view), None)
                    .await?;
                back.ok_or_else(|| conn_error("write buffer lost"))
            });
            off += n as u64;
        }
        let views = futures::future::try_join_all(futs).await?;
        if flags.fua && !fua {
            self.flush_impl().await?;
        }
        Ok(IoBuf::join(views))
    }

    async fn zeroes_impl(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "NBD export is read-only"));
        }
        check_request(offset, len, self.size)?;
        if self.flags & TFLAG_SEND_WRITE_ZEROES == 0
            || (flags.no_fallback && self.flags & TFLAG_SEND_FAST_ZERO == 0)
        {
            if flags.no_fallback {
                return Err(Error::unsupported("NBD server cannot write zeroes fast"));
            }
            let mut pos = offset;
            let chunk = self.max_len(true).min(1 << 20);
            while pos < offset + len {
                let n = (offset + len - pos).min(chunk);
                self.write_impl(pos, IoBuf::zeroed(n as usize), WriteFlags::default())
                    .await?;
                pos += n;
            }
            return Ok(());
        }
        let mut f = 0;
        if !flags.may_unmap {
            f |= CMD_FLAG_NO_HOLE;
        }
        if flags.no_fallback {
            f |= CMD_FLAG_FAST_ZERO;
        }
        self.ranged(CMD_WRITE_ZEROES, f, offset, len).await
    }

    /// Send a payload-free ranged command, split to fit the length field.
    async fn ranged(&self, kind: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        let max = self.max_len(false);
        let mut futs = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(max);
            futs.push(self.submit(kind, flags, pos, n, None, None));
            pos += n;
        }
        futures::future::try_join_all(futs).await?;
        Ok(())
    }

    async fn flush_impl(&self) -> Result<()> {
        if self.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.submit(CMD_FLUSH, 0, 0, 0, None, None).await?;
        Ok(())
    }

    async fn status_impl(&self, offset: u64, len: u64) -> Result<Extent> {
        check_request(offset, len, self.size)?;
        let data_extent = |len| Extent {
            len,
            status: BlockStatus {
                allocated: true,
                data: true,
                zero: false,
                compressed: false,
                host_offset: Some(offset),
                recurse: false,
            },
            host_node: None,
        };
        let Some(ctx) = self.base_ctx else {
            return Ok(data_extent(len));
        };
        let n = len.min(self.max_len(false)).max(1);
        let (out, _) = self
            .submit(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, n, None, None)
            .await?;
        let first = out
            .extents
            .and_then(|v| v.into_iter().next())
            .ok_or_else(|| Error::corrupt(format!("server sent no extents for context {ctx}")))?;
        let hole = first.flags & u64::from(STATE_HOLE) != 0;
        let zero = first.flags & u64::from(STATE_ZERO) != 0;
        Ok(Extent {
            len: first.len.min(n),
            status: BlockStatus {
                allocated: true,
                data: !hole,
                zero,
                compressed: false,
                host_offset: Some(offset),
                recurse: false,
            },
            host_node: None,
        })
    }

    /// Send `NBD_CMD_DISC`: no request may follow.
    pub fn disconnect(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let req = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        if let Ok(header) = encode_request(&req, self.extended()) {
            let _ = self.tx.send(WireReq {
                header,
                payload: None,
                ret: None,
            });
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.disconnect();
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<WireReq>,
    shared: Arc<Shared>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, wr);
    let mut failed = false;
    while let Some(req) = rx.recv().await {
        if !failed {
            let mut r = w.write_all(&req.header).await;
            if r.is_ok()
                && let Some(p) = &req.payload
            {
                r = w.write_all(p).await;
            }
            if r.is_ok() && rx.is_empty() {
                r = w.flush().await;
            }
            if let Err(e) = r {
                failed = true;
                shared.fail_all(&e.to_string());
            }
        }
        if let (Some(ret), Some(p)) = (req.ret, req.payload) {
            let _ = ret.send(p);
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// Largest chunk payload the reader accepts (data chunks are bounded by the request).
const MAX_CHUNK: u64 = 64 << 20;

async fn reader_task<R: AsyncRead + Unpin>(rd: R, shared: Arc<Shared>) {
    let mut rd = BufReader::with_capacity(128 * 1024, rd);
    let why = match read_replies(&mut rd, &shared).await {
        Ok(()) => "server closed the connection".to_string(),
        Err(e) => e.to_string(),
    };
    shared.fail_all(&why);
}

fn take(shared: &Shared, cookie: u64) -> Result<Pending> {
    shared
        .table
        .lock()
        .map
        .remove(&cookie)
        .ok_or_else(|| Error::corrupt(format!("reply for unknown cookie {cookie:#x}")))
}

fn complete(p: Pending) {
    let r = match p.error {
        Some((e, msg)) => {
            let msg = if msg.is_empty() {
                "NBD request failed".to_string()
            } else {
                msg
            };
            Err(Error::from_errno(from_nbd_errno(e), msg))
        }
        None => Ok(Outcome {
            buf: p.buf,
            extents: p.extents,
        }),
    };
    let _ = p.done.send(r);
}

async fn read_replies<R: AsyncRead + Unpin>(rd: &mut R, shared: &Shared) -> Result<()> {
    let mut hdr = [0u8; EXTENDED_REPLY_LEN];
    loop {
        match rd.read_exact(&mut hdr[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let hlen = reply_header_len(magic).map_err(proto_err)?;
        rd.read_exact(&mut hdr[4..hlen]).await?;
        match decode_reply_header(&hdr[..hlen]).map_err(proto_err)? {
            ReplyHeader::Simple { error, cookie } => {
                let mut p = take(shared, cookie)?;
                if error != 0 {
                    p.error = Some((error, String::new()));
                } else if let Some(buf) = &mut p.buf {
                    rd.read_exact(&mut buf[..]).await?;
                }
                complete(p);
            }
            ReplyHeader::Chunk(h) => {
                if h.len > MAX_CHUNK {
                    return Err(Error::corrupt("NBD reply chunk too long"));
                }
                let mut p = take(shared, h.cookie)?;
                let len = h.len as usize;
                match h.kind {
                    REPLY_TYPE_NONE => {
                        if len != 0 {
                            return Err(Error::corrupt("NONE chunk with payload"));
                        }
                    }
                    REPLY_TYPE_OFFSET_DATA => {
                        if len < 8 {
                            return Err(Error::corrupt("short data chunk"));
                        }
                        let off = rd.read_u64().await?;
                        let n = (len - 8) as u64;
                        let rel = off
                            .checked_sub(p.offset)
                            .filter(|r| r.checked_add(n).is_some_and(|e| e <= p.len));
                        let (Some(rel), Some(buf)) = (rel, &mut p.buf) else {
                            return Err(Error::corrupt("data chunk outside the request"));
                        };
                        let rel = rel as usize;
                        rd.read_exact(&mut buf[rel..rel + n as usize]).await?;
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        let mut b = [0u8; 12];
                        if len != 12 {
                            return Err(Error::corrupt("bad hole chunk"));
                        }
                        rd.read_exact(&mut b).await?;
                        let (off, n) = decode_hole(&b).map_err(proto_err)?;
                        let n = u64::from(n);
                        let rel = off
                            .checked_sub(p.offset)
                            .filter(|r| r.checked_add(n).is_some_and(|e| e <= p.len));
                        let (Some(rel), Some(buf)) = (rel, &mut p.buf) else {
                            return Err(Error::corrupt("hole chunk outside the request"));
                        };
                        let rel = rel as usize;
                        buf[rel..rel + n as usize].fill(0);
                    }
                    k => {
                        let mut data = vec![0u8; len];
                        rd.read_exact(&mut data).await?;
                        if k == REPLY_TYPE_BLOCK_STATUS || k == REPLY_TYPE_BLOCK_STATUS_EXT {
                            let (id, ds) = decode_block_status(k, &data).map_err(proto_err)?;
                            if p.extents.is_none() && Some(id) == shared.base_ctx {
                                p.extents = Some(ds);
                            }
                        } else if reply_type_is_err(k) {
                            let (e, msg, _) = decode_error_chunk(k, &data).map_err(proto_err)?;
                            if p.error.is_none() {
                                p.error = Some((e, msg));
                            }
                        }
                        // Unknown informational chunks are ignored.
                    }
                }
                if h.flags & REPLY_FLAG_DONE != 0 {
                    complete(p);
                } else {
                    shared.table.lock().map.insert(h.cookie, p);
                }
            }
        }
    }
}

impl BlockNode for NbdClient {
    fn driver(&self) -> &'static str {
        "nbd"
    }

    fn filename(&self) -> String {
        self.uri.to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u64 {
        self.block_sizes.0.into()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(self.read_impl(offset, buf))
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(self.write_impl(offset, buf, flags))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(self.zeroes_impl(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Err(Error::new(ErrorKind::ReadOnly, "NBD export is read-only"));
            }
            check_request(offset, len, self.size)?;
            if self.flags & TFLAG_SEND_TRIM == 0 || len == 0 {
                return Ok(());
            }
            self.ranged(CMD_TRIM, 0, offset, len).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.flush_impl())
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(self.status_impl(offset, len))
    }

    fn truncate(&self, size: u64, _prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if size == self.size {
                Ok(())
            } else if size > self.size {
                Err(Error::unsupported("Cannot grow NBD nodes"))
            } else {
                Err(Error::unsupported("Cannot resize NBD nodes"))
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.closed.load(Ordering::SeqCst) {
                return Ok(());
            }
            let r = self.flush_impl().await;
            self.disconnect();
            r
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parsing() {
        let u = NbdUri::parse("nbd://example.com:1234/disk%20a").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "example.com".into(),
                port: 1234
            }
        );
        assert_eq!(u.export, "disk a");
        let u = NbdUri::parse("nbd://[::1]/").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd+unix:///exp?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "exp");
        assert_eq!(u.to_string(), "nbd+unix:///exp?socket=/tmp/s.sock");
        assert!(NbdUri::parse("nbd+unix:///exp").is_err());
        assert!(NbdUri::parse("http://x/y").is_err());
        assert!(NbdUri::parse("nbd://host:notaport/x").is_err());
        assert!(NbdUri::parse("nbd:///x").is_err());
    }
}
