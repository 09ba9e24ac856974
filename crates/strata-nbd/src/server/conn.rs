//! One client connection: handshake, then the transmission phase. Requests are read in
//! order and each is served in its own task; replies go through one writer task, so chunks
//! of one reply stay together. A request's buffer is owned by its task (and then by the
//! writer) until the reply is on the wire.

use std::sync::Arc;
use std::time::Duration;

use strata_core::{ErrorKind, IoBuf, NodeRef, WriteFlags, ZeroFlags};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::export::{ContextKind, Export, MetaContext};
use super::handshake::{Mode, Session, negotiate};
use super::status::{context_extents, guest_status};
use super::{MAX_IN_FLIGHT, Shared};
use crate::proto::*;

/// Descriptors per context in one block-status reply.
const MAX_EXTENTS: usize = 16384;
/// Granularity of `NBD_CMD_CACHE` read-ahead.
const CACHE_CHUNK: u64 = 1 << 20;

/// A piece of a reply: header bytes or a data buffer.
pub(crate) enum Part {
    Bytes(Vec<u8>),
    Buf(IoBuf),
}

type ReplyMsg = (Vec<Part>, OwnedSemaphorePermit);

/// Serve one accepted connection until it ends.
pub(crate) async fn serve(stream: super::BoxStream, shared: Arc<Shared>) {
    let secs = shared.opts.handshake_max_seconds;
    let hs = negotiate(stream, &shared);
    let session = tokio::select! {
        r = async {
            if secs == 0 {
                hs.await.ok()
            } else {
                tokio::time::timeout(Duration::from_secs(secs.into()), hs).await.ok().and_then(|r| r.ok())
            }
        } => r,
        _ = shared.cancel.cancelled() => None,
    };
    let Some(session) = session else { return };
    if session.export.cancel.is_cancelled() {
        return;
    }
    transmission(session, &shared).await;
}

/// What the request tasks of one connection share.
struct ConnCtx {
    export: Arc<Export>,
    mode: Mode,
    contexts: Vec<MetaContext>,
}

impl ConnCtx {
    fn node(&self) -> &NodeRef {
        &self.export.cfg.node
    }
}

async fn transmission(session: Session, shared: &Arc<Shared>) {
    let Session {
        stream,
        export,
        mode,
        contexts,
        guard: _guard,
    } = session;
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(128 * 1024, rd);
    let (tx, rx) = mpsc::unbounded_channel::<ReplyMsg>();
    let writer = tokio::spawn(writer_task(wr, rx));
    let sem = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let ctx = Arc::new(ConnCtx {
        export: Arc::clone(&export),
        mode,
        contexts,
    });
    let cancel = export.cancel.clone();
    let hlen = request_len(mode == Mode::Extended);

    let hard = loop {
        if writer.is_finished() {
            // The client stopped taking replies.
            break true;
        }
        let permit = tokio::select! {
            p = Arc::clone(&sem).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break true,
            },
            _ = cancel.cancelled() => break true,
        };
        let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
        let r = tokio::select! {
            r = rd.read_exact(&mut hdr[..hlen]) => r,
            _ = cancel.cancelled() => break true,
        };
        if r.is_err() {
            // The client went away: finish what is in flight.
            break false;
        }
        let Ok(req) = decode_request(&hdr[..hlen], mode == Mode::Extended) else {
            // Bad magic: the stream cannot be trusted any more.
            break true;
        };
        if req.kind == CMD_DISC {
            break false;
        }
        // A payload follows writes (and anything flagged with PAYLOAD_LEN in extended mode).
        let payload_len = if req.kind == CMD_WRITE
            || (mode == Mode::Extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0)
        {
            req.len
        } else {
            0
        };
        if payload_len > MAX_BUFFER.into() {
            // Cannot skip that much safely (QEMU disconnects too).
            break true;
        }
        let mut payload = None;
        if payload_len > 0 {
            let mut buf = IoBuf::zeroed(payload_len as usize);
            let r = tokio::select! {
                r = rd.read_exact(&mut buf) => r,
                _ = cancel.cancelled() => break true,
            };
            if r.is_err() {
                break true;
            }
            payload = Some(buf);
        }
        let ctx = Arc::clone(&ctx);
        let tx = tx.clone();
        shared.tracker.spawn(async move {
            let parts = handle(&ctx, req, payload).await;
            let _ = tx.send((parts, permit));
        });
    };
    drop(tx);
    if hard {
        writer.abort();
        let _ = writer.await;
    } else {
        // The writer ends once every request task has sent its reply.
        let wait = async {
            let _ = writer.await;
        };
        tokio::select! {
            _ = wait => {}
            _ = cancel.cancelled() => {}
        }
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<ReplyMsg>) {
    let mut w = BufWriter::with_capacity(128 * 1024, wr);
    while let Some((parts, permit)) = rx.recv().await {
        for p in &parts {
            let r = match p {
                Part::Bytes(b) => w.write_all(b).await,
                Part::Buf(b) => w.write_all(b).await,
            };
            if r.is_err() {
                return;
            }
        }
        drop(parts);
        drop(permit);
        if rx.is_empty() && w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// Builds replies in the negotiated style.
struct Reply<'a> {
    ctx: &'a ConnCtx,
    req: Request,
}

impl Reply<'_> {
    fn extended(&self) -> bool {
        self.ctx.mode == Mode::Extended
    }

    fn chunk_header(&self, flags: u16, kind: u16, len: u64) -> Vec<u8> {
        let h = ChunkHeader {
            flags,
            kind,
            cookie: self.req.cookie,
            offset: if self.extended() { self.req.offset } else { 0 },
            len,
        };
        // Payloads we build fit 32 bits (data ≤ MAX_BUFFER, bounded descriptor lists).
        encode_chunk_header(&h, self.extended()).unwrap_or_default()
    }

    fn chunk(&self, flags: u16, kind: u16, payload: Vec<u8>) -> Vec<Part> {
        let mut v = self.chunk_header(flags, kind, payload.len() as u64);
        v.extend_from_slice(&payload);
        vec![Part::Bytes(v)]
    }

    fn ok(&self) -> Vec<Part> {
        if self.ctx.mode == Mode::Simple {
            vec![Part::Bytes(
                encode_simple_reply(self.req.cookie, 0).to_vec(),
            )]
        } else {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, Vec::new())
        }
    }

    fn error(&self, errno: u32, msg: &str) -> Vec<Part> {
        if self.ctx.mode == Mode::Simple {
            vec![Part::Bytes(
                encode_simple_reply(self.req.cookie, errno).to_vec(),
            )]
        } else {
            self.chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                encode_error_chunk(errno, msg, None),
            )
        }
    }

    fn node_error(&self, e: &strata_core::Error) -> Vec<Part> {
        self.error(to_nbd_errno(e.kind().errno()), e.message())
    }

    fn data(&self, flags: u16, offset: u64, buf: IoBuf) -> Vec<Part> {
        let mut h = self.chunk_header(flags, REPLY_TYPE_OFFSET_DATA, 8 + buf.len() as u64);
        h.extend_from_slice(&offset.to_be_bytes());
        vec![Part::Bytes(h), Part::Buf(buf)]
    }
}

/// Check a request against the export: `Err` carries the NBD errno and a message.
fn validate(ctx: &ConnCtx, req: &Request) -> Result<(), (u32, String)> {
    let structured = ctx.mode >= Mode::Structured;
    let writable = ctx.export.cfg.writable;
    let (valid_flags, writes, check_range) = match req.kind {
        CMD_READ => {
            if req.len > MAX_BUFFER.into() {
                return Err((
                    errno::EINVAL,
                    format!("len ({}) is larger than max len ({})", req.len, MAX_BUFFER),
                ));
            }
            let f = if structured {
                CMD_FLAG_FUA | CMD_FLAG_DF
            } else {
                CMD_FLAG_FUA
            };
            (f, false, true)
        }
        CMD_WRITE if ctx.mode == Mode::Extended => {
            (CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN, true, true)
        }
        CMD_WRITE => (CMD_FLAG_FUA, true, true),
        CMD_WRITE_ZEROES => (
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            true,
            true,
        ),
        CMD_TRIM => (CMD_FLAG_FUA, true, true),
        CMD_FLUSH => (0, false, false),
        CMD_CACHE => (0, false, true),
        CMD_BLOCK_STATUS => {
            if !structured || ctx.contexts.is_empty() {
                return Err((
                    errno::EINVAL,
                    "need non-empty metadata context selection".into(),
                ));
            }
            if req.len == 0 {
                return Err((errno::EINVAL, "zero-length block status".into()));
            }
            let f = if ctx.mode == Mode::Extended {
                CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN
            } else {
                CMD_FLAG_REQ_ONE
            };
            (f, false, true)
        }
        k => {
            return Err((errno::EINVAL, format!("Unsupported command {k}")));
        }
    };
    if writes && !writable {
        return Err((errno::EPERM, "Export is read-only".into()));
    }
    if check_range {
        let size = ctx.node().size();
        if req.offset > size || req.len > size - req.offset {
            let e = if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            return Err((
                e,
                format!(
                    "operation past EOF; From: {}, Len: {}, Size: {}",
                    req.offset, req.len, size
                ),
            ));
        }
    }
    if req.flags & !valid_flags != 0 {
        return Err((
            errno::EINVAL,
            format!("unsupported flags (got {:#x})", req.flags),
        ));
    }
    Ok(())
}

async fn handle(ctx: &ConnCtx, mut req: Request, payload: Option<IoBuf>) -> Vec<Part> {
    let r = Reply { ctx, req };
    let mut selected: Option<Vec<MetaContext>> = None;
    if let Some(p) = &payload
        && req.kind != CMD_WRITE
    {
        // Only block status takes a payload: the effect length and the contexts wanted.
        if req.kind != CMD_BLOCK_STATUS {
            return r.error(errno::EINVAL, "unexpected payload");
        }
        let Ok((len, ids)) = decode_block_status_payload(p) else {
            return r.error(errno::EINVAL, "malformed block status payload");
        };
        let mut chosen: Vec<MetaContext> = Vec::new();
        for id in ids {
            let Some(c) = ctx.contexts.iter().find(|c| c.id == id) else {
                return r.error(errno::EINVAL, &format!("unknown metadata context id {id}"));
            };
            if !chosen.iter().any(|x| x.id == id) {
                chosen.push(c.clone());
            }
        }
        selected = Some(chosen);
        req.len = len;
    }
    let r = Reply { ctx, req };
    if let Err((e, msg)) = validate(ctx, &req) {
        return r.error(e, &msg);
    }
    let node = ctx.node();
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let res = match req.kind {
        CMD_READ => return read(&r, node, req).await,
        CMD_WRITE => {
            let buf = payload.unwrap_or_else(|| IoBuf::zeroed(0));
            if buf.is_empty() {
                Ok(())
            } else {
                node.write(req.offset, buf, WriteFlags { fua })
                    .await
                    .map(drop)
            }
        }
        CMD_WRITE_ZEROES => {
            let flags = ZeroFlags {
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                no_fallback: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            if req.len == 0 {
                Ok(())
            } else {
                match node.write_zeroes(req.offset, req.len, flags).await {
                    Ok(()) if fua => node.flush().await,
                    Err(e) if flags.no_fallback && e.kind() == ErrorKind::Unsupported => {
                        return r.error(errno::ENOTSUP, e.message());
                    }
                    res => res,
                }
            }
        }
        CMD_TRIM => {
            if req.len == 0 {
                Ok(())
            } else {
                match node.discard(req.offset, req.len).await {
                    Ok(()) if fua => node.flush().await,
                    res => res,
                }
            }
        }
        CMD_FLUSH => node.flush().await,
        CMD_CACHE => {
            let mut pos = req.offset;
            let end = req.offset + req.len;
            let mut res = Ok(());
            while pos < end && res.is_ok() {
                let n = (end - pos).min(CACHE_CHUNK);
                res = node.read(pos, IoBuf::zeroed(n as usize)).await.map(drop);
                pos += n;
            }
            res
        }
        CMD_BLOCK_STATUS => {
            let contexts = selected.as_deref().unwrap_or(&ctx.contexts);
            return block_status(&r, node, req, contexts).await;
        }
        _ => Ok(()),
    };
    match res {
        Ok(()) => r.ok(),
        Err(e) => r.node_error(&e),
    }
}

/// Reads up to this long are answered with data only, holes included.
const DENSE_READ_MAX: usize = 64 * 1024;

async fn read(r: &Reply<'_>, node: &NodeRef, req: Request) -> Vec<Part> {
    let len = req.len as usize;
    if r.ctx.mode == Mode::Simple {
        return match node.read(req.offset, IoBuf::zeroed(len)).await {
            Ok(buf) => vec![
                Part::Bytes(encode_simple_reply(req.cookie, 0).to_vec()),
                Part::Buf(buf),
            ],
            Err(e) => r.node_error(&e),
        };
    }
    if len == 0 {
        return r.ok();
    }
    // Small reads go as one data chunk: finding their holes means a block-status walk down
    // the whole chain (at depth 128 it cost more than the read), to save a few KiB on the
    // wire. The protocol lets a server send zeroes as data.
    if req.flags & CMD_FLAG_DF != 0 || len <= DENSE_READ_MAX {
        return match node.read(req.offset, IoBuf::zeroed(len)).await {
            Ok(buf) => r.data(REPLY_FLAG_DONE, req.offset, buf),
            Err(e) => r.node_error(&e),
        };
    }
    // Sparse read: zero runs become hole chunks, the rest is read into views of one buffer.
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let end = req.offset + req.len;
    let mut pos = req.offset;
    while pos < end {
        let g = match guest_status(node, pos, end - pos).await {
            Ok(g) => g,
            Err(e) => return r.node_error(&e),
        };
        let n = g.len.min(end - pos);
        match runs.last_mut() {
            Some(last) if last.2 == g.zero => last.1 += n,
            _ => runs.push((pos, n, g.zero)),
        }
        pos += n;
    }
    let mut buf = IoBuf::zeroed(len);
    let mut reads = Vec::new();
    let mut order = Vec::new();
    for &(off, n, zero) in &runs {
        if zero {
            order.push(None);
            continue;
        }
        let view = buf.split_to(n as usize);
        // Skip the hole's share of the buffer (it stays unused).
        order.push(Some(reads.len()));
        reads.push(node.read(off, view));
    }
    let mut done = match futures::future::try_join_all(reads).await {
        Ok(v) => v.into_iter().map(Some).collect::<Vec<_>>(),
        Err(e) => return r.node_error(&e),
    };
    let mut parts = Vec::new();
    let last = runs.len() - 1;
    for (i, (&(off, n, _), slot)) in runs.iter().zip(order).enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        match slot {
            Some(k) => {
                let view = done[k].take().unwrap_or_else(|| IoBuf::zeroed(0));
                parts.extend(r.data(flags, off, view));
            }
            None => {
                // Hole chunks carry a 32-bit size; reads are at most MAX_BUFFER long.
                let p = encode_hole(off, n as u32).to_vec();
                parts.extend(r.chunk(flags, REPLY_TYPE_OFFSET_HOLE, p));
            }
        }
    }
    parts
}

async fn block_status(
    r: &Reply<'_>,
    node: &NodeRef,
    req: Request,
    contexts: &[MetaContext],
) -> Vec<Part> {
    let kinds: Vec<ContextKind> = contexts.iter().map(|c| c.kind.clone()).collect();
    let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let cap = if r.extended() {
        u64::MAX
    } else {
        u32::MAX.into()
    };
    let lists = match context_extents(node, &kinds, req.offset, req.len, max, cap).await {
        Ok(l) => l,
        Err(e) => return r.node_error(&e),
    };
    let kind = if r.extended() {
        REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        REPLY_TYPE_BLOCK_STATUS
    };
    let mut parts = Vec::new();
    let last = lists.len() - 1;
    for (i, (c, ds)) in contexts.iter().zip(lists).enumerate() {
        let payload = match encode_block_status(c.id, &ds, r.extended()) {
            Ok(p) => p,
            Err(e) => return r.error(errno::EOVERFLOW, &e.to_string()),
        };
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        parts.extend(r.chunk(flags, kind, payload));
    }
    parts
}
