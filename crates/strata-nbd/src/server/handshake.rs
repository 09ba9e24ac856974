//! The fixed newstyle handshake: option haggling up to `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::export::{ClientGuard, Export, MetaContext};
use super::{BoxStream, Shared};
use crate::proto::*;

/// Reply header style negotiated for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Mode {
    Simple,
    Structured,
    Extended,
}

/// The outcome of a successful handshake.
pub(crate) struct Session {
    pub(crate) stream: BoxStream,
    pub(crate) export: Arc<Export>,
    pub(crate) mode: Mode,
    pub(crate) contexts: Vec<MetaContext>,
    /// Counts the client on the export (taken before the final reply of the handshake, so
    /// the count is right once the client sees it).
    pub(crate) guard: ClientGuard,
}

/// Option data we read into memory; longer options are drained and refused.
const MAX_OPTION_DATA: u32 = 1 << 20;

/// Why the handshake ended without a session.
#[derive(Debug)]
pub(crate) enum HandshakeEnd {
    /// The client aborted or misbehaved, or the connection failed.
    Closed,
}

impl From<std::io::Error> for HandshakeEnd {
    fn from(_: std::io::Error) -> Self {
        HandshakeEnd::Closed
    }
}

impl From<ProtoError> for HandshakeEnd {
    fn from(_: ProtoError) -> Self {
        HandshakeEnd::Closed
    }
}

type HsResult<T> = std::result::Result<T, HandshakeEnd>;

struct Haggle {
    stream: BoxStream,
    mode: Mode,
    /// `(export name, contexts)` chosen by `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(String, Vec<MetaContext>)>,
    tls_done: bool,
    no_zeroes: bool,
}

impl Haggle {
    async fn reply(&mut self, option: u32, rep: u32, data: &[u8]) -> HsResult<()> {
        self.stream
            .write_all(&encode_option_reply(option, rep, data))
            .await?;
        Ok(())
    }

    async fn error(&mut self, option: u32, rep: u32, msg: &str) -> HsResult<()> {
        self.reply(option, rep, msg.as_bytes()).await
    }

    async fn drain(&mut self, mut n: u64) -> HsResult<()> {
        let mut buf = vec![0u8; 64 * 1024];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            self.stream.read_exact(&mut buf[..k]).await?;
            n -= k as u64;
        }
        Ok(())
    }
}

/// Run the handshake on `stream`.
pub(crate) async fn negotiate(stream: BoxStream, shared: &Shared) -> HsResult<Session> {
    let mut h = Haggle {
        stream,
        mode: Mode::Simple,
        meta: None,
        tls_done: false,
        no_zeroes: false,
    };
    h.stream
        .write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await?;
    let cflags = h.stream.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeEnd::Closed);
    }
    let fixed = cflags & FLAG_C_FIXED_NEWSTYLE != 0;
    h.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        h.stream.read_exact(&mut hdr).await?;
        let OptionHeader { option, len } = decode_option_header(&hdr)?;

        if option == OPT_EXPORT_NAME {
            if len as usize > MAX_STRING {
                return Err(HandshakeEnd::Closed);
            }
            let mut name = vec![0u8; len as usize];
            h.stream.read_exact(&mut name).await?;
            let name = String::from_utf8(name).map_err(|_| HandshakeEnd::Closed)?;
            // No way to report an error: close. Extended headers forbid this option.
            if (shared.tls.is_some() && !h.tls_done) || h.mode == Mode::Extended {
                return Err(HandshakeEnd::Closed);
            }
            let export = shared
                .exports
                .get(&name)
                .filter(|e| !e.cancel.is_cancelled())
                .ok_or(HandshakeEnd::Closed)?;
            let flags = export.transmission_flags(
                h.mode >= Mode::Structured,
                h.mode == Mode::Extended,
                shared.opts.max_connections,
            );
            let reply = encode_export_name_reply(export.cfg.node.size(), flags, h.no_zeroes);
            let guard = ClientGuard::new(Arc::clone(&export));
            h.stream.write_all(&reply).await?;
            return Ok(finish(h, export, &name, guard));
        }
        if !fixed {
            // Plain newstyle knows no option replies.
            return Err(HandshakeEnd::Closed);
        }
        if len > MAX_OPTION_DATA {
            h.drain(len.into()).await?;
            h.error(option, REP_ERR_TOO_BIG, "option payload too big")
                .await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        h.stream.read_exact(&mut data).await?;

        if shared.tls.is_some() && !h.tls_done && option != OPT_STARTTLS && option != OPT_ABORT {
            h.error(option, REP_ERR_TLS_REQD, "Option not permitted before TLS")
                .await?;
            continue;
        }

        match option {
            OPT_ABORT => {
                let _ = h.reply(option, REP_ACK, &[]).await;
                let _ = h.stream.shutdown().await;
                return Err(HandshakeEnd::Closed);
            }
            OPT_LIST => {
                if len != 0 {
                    h.error(option, REP_ERR_INVALID, "OPT_LIST should not have length")
                        .await?;
                    continue;
                }
                for e in shared.exports.all() {
                    let d = encode_rep_server(&e.cfg.name, e.cfg.description.as_deref());
                    h.reply(option, REP_SERVER, &d).await?;
                }
                h.reply(option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                if len != 0 {
                    h.error(
                        option,
                        REP_ERR_INVALID,
                        "OPT_STARTTLS should not have length",
                    )
                    .await?;
                } else if h.tls_done {
                    h.error(option, REP_ERR_INVALID, "TLS already enabled")
                        .await?;
                } else if let Some(tls) = shared.tls.clone() {
                    h.reply(option, REP_ACK, &[]).await?;
                    let plain = std::mem::replace(&mut h.stream, Box::new(tokio::io::empty()));
                    h.stream = tls.wrap(plain).await?;
                    h.tls_done = true;
                } else {
                    h.error(option, REP_ERR_POLICY, "TLS not configured")
                        .await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let Ok(req) = decode_info_request(&data) else {
                    h.error(option, REP_ERR_INVALID, "malformed info request")
                        .await?;
                    continue;
                };
                let Some(export) = shared
                    .exports
                    .get(&req.name)
                    .filter(|e| !e.cancel.is_cancelled())
                else {
                    let msg = format!("export '{}' not present", req.name);
                    h.error(option, REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let flags = export.transmission_flags(
                    h.mode >= Mode::Structured,
                    h.mode == Mode::Extended,
                    shared.opts.max_connections,
                );
                let mut infos = vec![Info::Export {
                    size: export.cfg.node.size(),
                    flags,
                }];
                if req.items.contains(&INFO_NAME) {
                    infos.push(Info::Name(export.cfg.name.clone()));
                }
                if req.items.contains(&INFO_DESCRIPTION)
                    && let Some(d) = &export.cfg.description
                {
                    infos.push(Info::Description(d.clone()));
                }
                infos.push(Info::BlockSize {
                    min: 1,
                    preferred: 4096,
                    max: MAX_BUFFER,
                });
                for i in &infos {
                    h.reply(option, REP_INFO, &encode_info(i)).await?;
                }
                let guard = (option == OPT_GO).then(|| ClientGuard::new(Arc::clone(&export)));
                h.reply(option, REP_ACK, &[]).await?;
                if let Some(guard) = guard {
                    return Ok(finish(h, export, &req.name, guard));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    h.error(option, REP_ERR_INVALID, "option should not have length")
                        .await?;
                } else if h.mode == Mode::Extended {
                    h.error(
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else if h.mode == Mode::Structured {
                    h.error(
                        option,
                        REP_ERR_INVALID,
                        "structured reply already negotiated",
                    )
                    .await?;
                } else {
                    h.reply(option, REP_ACK, &[]).await?;
                    h.mode = Mode::Structured;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if len != 0 {
                    h.error(option, REP_ERR_INVALID, "option should not have length")
                        .await?;
                } else if h.mode == Mode::Extended {
                    h.error(
                        option,
                        REP_ERR_INVALID,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else {
                    h.reply(option, REP_ACK, &[]).await?;
                    h.mode = Mode::Extended;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = option == OPT_LIST_META_CONTEXT;
                if h.mode == Mode::Simple {
                    h.error(
                        option,
                        REP_ERR_INVALID,
                        "request structured replies or extended headers first",
                    )
                    .await?;
                    continue;
                }
                let Ok(req) = decode_meta_context_request(&data) else {
                    h.error(option, REP_ERR_INVALID, "malformed meta context request")
                        .await?;
                    continue;
                };
                let Some(export) = shared.exports.get(&req.export) else {
                    let msg = format!("export '{}' not present", req.export);
                    h.error(option, REP_ERR_UNKNOWN, &msg).await?;
                    continue;
                };
                let mut chosen: Vec<MetaContext> = Vec::new();
                if list && req.queries.is_empty() {
                    chosen = export.contexts();
                } else {
                    for q in &req.queries {
                        for c in export.match_query(q, list) {
                            if !chosen.iter().any(|x| x.id == c.id) {
                                chosen.push(c);
                            }
                        }
                    }
                }
                for c in &chosen {
                    h.reply(
                        option,
                        REP_META_CONTEXT,
                        &encode_rep_meta_context(c.id, &c.name),
                    )
                    .await?;
                }
                h.reply(option, REP_ACK, &[]).await?;
                if !list {
                    h.meta = Some((req.export, chosen));
                }
            }
            _ => {
                let msg = format!("Unsupported option {option:#x}");
                h.error(option, REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

fn finish(h: Haggle, export: Arc<Export>, name: &str, guard: ClientGuard) -> Session {
    // Contexts chosen for another export do not apply.
    let contexts = match h.meta {
        Some((n, c)) if n == name && h.mode >= Mode::Structured => c,
        _ => Vec::new(),
    };
    Session {
        stream: h.stream,
        export,
        mode: h.mode,
        contexts,
        guard,
    }
}
