//! Shared test helpers: a layered in-memory node with allocation state and a backing link,
//! a dirty-bitmap source, server start-up, a raw protocol client for hostile tests, and
//! helpers to run the QEMU and libnbd tools (skipping cleanly when one is missing).

#![allow(dead_code)]

use std::any::Any;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use parking_lot::Mutex;
use strata_core::range::check_request;
use strata_core::{
    BlockNode, BlockStatus, BoxFuture, Error, ErrorKind, Extent, IoBuf, NodeRef, Prealloc,
    WriteFlags, ZeroFlags,
};
use strata_nbd::proto::*;
use strata_nbd::{DirtySource, ExportConfig, ListenAddr, NbdServer, ServerOptions};
// Not every test that includes this module uses it.
#[allow(unused_imports)]
pub use strata_testkit::have;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Cluster size of [`LayerNode`].
pub const CLUSTER: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Unallocated,
    Data,
    Zero,
}

/// A qcow2-like in-memory layer: per-cluster state (unallocated, data, zero) and an optional
/// backing node that unallocated clusters read from.
#[derive(Debug)]
pub struct LayerNode {
    size: u64,
    inner: Mutex<(Vec<u8>, Vec<State>)>,
    backing: Option<NodeRef>,
}

impl LayerNode {
    pub fn new(size: u64, backing: Option<NodeRef>) -> Arc<LayerNode> {
        let clusters = size.div_ceil(CLUSTER) as usize;
        Arc::new(LayerNode {
            size,
            inner: Mutex::new((vec![0; size as usize], vec![State::Unallocated; clusters])),
            backing,
        })
    }

    /// Set cluster `i` to data filled with `byte`.
    pub fn fill(&self, i: usize, byte: u8) {
        let mut g = self.inner.lock();
        let start = i * CLUSTER as usize;
        let end = (start + CLUSTER as usize).min(g.0.len());
        g.0[start..end].fill(byte);
        g.1[i] = State::Data;
    }

    pub fn set_zero(&self, i: usize) {
        let mut g = self.inner.lock();
        let start = i * CLUSTER as usize;
        let end = (start + CLUSTER as usize).min(g.0.len());
        g.0[start..end].fill(0);
        g.1[i] = State::Zero;
    }

    pub fn state(&self, i: usize) -> State {
        self.inner.lock().1[i]
    }

    /// The guest view, synchronously (backing included).
    pub async fn guest_bytes(&self) -> Vec<u8> {
        self.read(0, IoBuf::zeroed(self.size as usize))
            .await
            .unwrap()
            .to_vec()
    }
}

impl BlockNode for LayerNode {
    fn driver(&self) -> &'static str {
        "layer"
    }
    fn filename(&self) -> String {
        "layer".into()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            check_request(offset, buf.len() as u64, self.size)?;
            let mut pos = offset;
            let end = offset + buf.len() as u64;
            while pos < end {
                let c = (pos / CLUSTER) as usize;
                let n = ((c as u64 + 1) * CLUSTER).min(end) - pos;
                let rel = (pos - offset) as usize;
                let st = self.inner.lock().1[c];
                match (st, &self.backing) {
                    (State::Unallocated, Some(b)) => {
                        let bs = b.size();
                        let dst = &mut buf[rel..rel + n as usize];
                        dst.fill(0);
                        if pos < bs {
                            let m = n.min(bs - pos);
                            let got = b.read(pos, IoBuf::zeroed(m as usize)).await?;
                            dst[..m as usize].copy_from_slice(&got);
                        }
                    }
                    _ => {
                        let g = self.inner.lock();
                        buf[rel..rel + n as usize]
                            .copy_from_slice(&g.0[pos as usize..(pos + n) as usize]);
                    }
                }
                pos += n;
            }
            Ok(buf)
        })
    }
    fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            check_request(offset, buf.len() as u64, self.size)?;
            // Copy-on-write of partially written unallocated clusters.
            let first = offset / CLUSTER;
            let last = (offset + buf.len() as u64).div_ceil(CLUSTER);
            for c in first..last {
                if self.inner.lock().1[c as usize] == State::Unallocated {
                    let start = c * CLUSTER;
                    let n = CLUSTER.min(self.size - start);
                    let old = self.read(start, IoBuf::zeroed(n as usize)).await?;
                    let mut g = self.inner.lock();
                    if g.1[c as usize] == State::Unallocated {
                        g.0[start as usize..(start + n) as usize].copy_from_slice(&old);
                    }
                }
            }
            let mut g = self.inner.lock();
            g.0[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
            for c in first..last {
                g.1[c as usize] = State::Data;
            }
            drop(g);
            Ok(buf)
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            check_request(offset, len, self.size)?;
            let aligned = offset.is_multiple_of(CLUSTER)
                && (len.is_multiple_of(CLUSTER) || offset + len == self.size);
            if !aligned {
                if flags.no_fallback {
                    return Err(Error::unsupported("unaligned fast zero"));
                }
                self.write(offset, IoBuf::zeroed(len as usize), WriteFlags::default())
                    .await?;
                return Ok(());
            }
            let mut g = self.inner.lock();
            g.0[offset as usize..(offset + len) as usize].fill(0);
            for c in offset / CLUSTER..(offset + len).div_ceil(CLUSTER) {
                g.1[c as usize] = if flags.may_unmap && self.backing.is_none() {
                    State::Unallocated
                } else {
                    State::Zero
                };
            }
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            check_request(offset, len, self.size)?;
            let mut g = self.inner.lock();
            let first = offset.div_ceil(CLUSTER);
            let last = (offset + len) / CLUSTER;
            for c in first..last {
                let s = (c * CLUSTER) as usize;
                g.0[s..s + CLUSTER as usize].fill(0);
                g.1[c as usize] = State::Unallocated;
            }
            Ok(())
        })
    }
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(async move {
            check_request(offset, len, self.size)?;
            if len == 0 {
                return Err(Error::invalid("zero length"));
            }
            let g = self.inner.lock();
            let st = g.1[(offset / CLUSTER) as usize];
            let end = offset + len;
            let mut pos = offset;
            while pos < end && g.1[(pos / CLUSTER) as usize] == st {
                pos = ((pos / CLUSTER) + 1) * CLUSTER;
            }
            let n = pos.min(end) - offset;
            let status = match st {
                State::Unallocated => BlockStatus::default(),
                State::Data => BlockStatus {
                    allocated: true,
                    data: true,
                    host_offset: Some(offset),
                    ..Default::default()
                },
                State::Zero => BlockStatus {
                    allocated: true,
                    zero: true,
                    ..Default::default()
                },
            };
            Ok(Extent {
                len: n,
                status,
                host_node: None,
            })
        })
    }
    fn truncate(&self, _size: u64, _prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async { Err(Error::new(ErrorKind::Unsupported, "no resize")) })
    }
    fn backing(&self) -> Option<NodeRef> {
        self.backing.clone()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A dirty bitmap over fixed chunks.
#[derive(Debug)]
pub struct TestBitmap {
    pub granularity: u64,
    pub bits: Mutex<Vec<bool>>,
}

impl DirtySource for TestBitmap {
    fn dirty_extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let bits = self.bits.lock();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let i = (pos / self.granularity) as usize;
            let d = bits.get(i).copied().unwrap_or(false);
            let n = ((i as u64 + 1) * self.granularity).min(end) - pos;
            match out.last_mut() {
                Some(l) if l.1 == d => l.0 += n,
                _ => out.push((n, d)),
            }
            pos += n;
        }
        out
    }
}

/// A simple export of `node`.
pub fn export(name: &str, node: NodeRef, writable: bool) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        description: None,
        node,
        writable,
        bitmaps: Vec::new(),
        allocation_depth: false,
        multi_conn: true,
    }
}

/// A server on a fresh Unix socket in `dir`.
pub async fn unix_server(dir: &Path) -> (Arc<NbdServer>, PathBuf) {
    unix_server_with(dir, ServerOptions::default()).await
}

pub async fn unix_server_with(dir: &Path, opts: ServerOptions) -> (Arc<NbdServer>, PathBuf) {
    let sock = dir.join("nbd.sock");
    let s = NbdServer::start(ListenAddr::Unix(sock.clone()), opts)
        .await
        .unwrap();
    (s, sock)
}

pub fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Run a command off the runtime's worker threads; returns (success, stdout, stderr).
pub async fn run(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let cmd = cmd.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let o = Command::new(&cmd).args(&args).output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// A raw protocol client for tests that send what a well-behaved client would not.
pub struct Raw {
    pub s: UnixStream,
    pub extended: bool,
    pub structured: bool,
}

impl Raw {
    pub async fn connect(sock: &Path) -> Raw {
        let mut s = UnixStream::connect(sock).await.unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).await.unwrap();
        let flags = decode_greeting(&g).unwrap();
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        Raw {
            s,
            extended: false,
            structured: false,
        }
    }

    pub async fn option(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.s.write_all(&encode_option(opt, data)).await.unwrap();
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            self.s.read_exact(&mut h).await.unwrap();
            let h = decode_option_reply_header(&h).unwrap();
            assert_eq!(h.option, opt);
            let mut d = vec![0u8; h.len as usize];
            self.s.read_exact(&mut d).await.unwrap();
            let last = h.reply == REP_ACK || rep_is_err(h.reply);
            out.push((h.reply, d));
            if last {
                return out;
            }
        }
    }

    /// `NBD_OPT_GO` on `name`; returns the export size and flags.
    pub async fn go(&mut self, name: &str) -> (u64, u16) {
        let req = InfoRequest {
            name: name.into(),
            items: vec![],
        };
        let replies = self.option(OPT_GO, &encode_info_request(&req)).await;
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        for (r, d) in &replies {
            if *r == REP_INFO
                && let Ok(Info::Export { size, flags }) = decode_info(d)
            {
                return (size, flags);
            }
        }
        panic!("no export info");
    }

    pub async fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u64) {
        let r = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        let b = encode_request(&r, self.extended).unwrap();
        self.s.write_all(&b).await.unwrap();
    }

    /// Read one reply header (and its payload, for chunks).
    pub async fn reply(&mut self) -> std::io::Result<(ReplyHeader, Vec<u8>)> {
        let mut hdr = [0u8; EXTENDED_REPLY_LEN];
        self.s.read_exact(&mut hdr[..4]).await?;
        let magic = u32::from_be_bytes(hdr[..4].try_into().unwrap());
        let n = reply_header_len(magic).unwrap();
        self.s.read_exact(&mut hdr[4..n]).await?;
        let h = decode_reply_header(&hdr[..n]).unwrap();
        let mut payload = Vec::new();
        if let ReplyHeader::Chunk(c) = h {
            payload = vec![0u8; c.len as usize];
            self.s.read_exact(&mut payload).await?;
        }
        Ok((h, payload))
    }

    /// Whether the server closed the connection (EOF within a few seconds).
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
