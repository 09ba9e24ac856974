//! The `copy-before-write` filter (QEMU's `block/copy-before-write.c`): before a guest
//! write, write-zeroes or discard reaches `file` (the source), the old data of the affected
//! clusters that are not copied yet goes to `target`. It also serves the snapshot API the
//! `snapshot-access` node uses: a point-in-time view of the source that reads copied areas
//! from the target and the rest from the source, while keeping guest writes off the areas
//! being read.
//!
//! On a failed copy, `on-cbw-error` decides: `break-guest-write` fails the guest request,
//! `break-snapshot` lets it through and invalidates the snapshot (every later snapshot
//! request fails with `EACCES`, as in QEMU). `cbw-timeout` bounds how long a guest request
//! waits for its copy (the copy itself carries on in the background).

use std::any::Any;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use strata_core::bitmap::DirtyBitmap;
use strata_core::range::{align_down, align_up, check_request};
use strata_core::{
    BlockNode, BlockStatus, BoxFuture, Error, ErrorKind, Extent, IoBuf, NodeRef, Prealloc, Result,
    WriteFlags, ZeroFlags,
};
use tokio::sync::Notify;

use super::block_copy::{BlockCopyOptions, BlockCopyState};
use crate::forward_to_child;
use crate::status::block_status_above;

/// `OnCbwError`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnCbwError {
    /// Fail the guest write (the default).
    #[default]
    BreakGuestWrite,
    /// Let the guest write through; the snapshot becomes unreadable.
    BreakSnapshot,
}

impl OnCbwError {
    /// Parse the QAPI spelling.
    pub fn parse(s: &str) -> Option<OnCbwError> {
        match s {
            "break-guest-write" => Some(OnCbwError::BreakGuestWrite),
            "break-snapshot" => Some(OnCbwError::BreakSnapshot),
            _ => None,
        }
    }
}

/// Options of a copy-before-write node.
#[derive(Debug, Clone, Default)]
pub struct CbwOptions {
    /// What a failed copy breaks.
    pub on_cbw_error: OnCbwError,
    /// How long a guest request waits for its copy (`None` = no limit).
    pub cbw_timeout: Option<Duration>,
    /// Lower bound for the cluster size.
    pub min_cluster_size: u64,
    /// Only areas dirty in this bitmap are copied and readable through the snapshot.
    pub bitmap: Option<DirtyBitmap>,
    /// Discard source clusters once copied (backup's `discard-source`).
    pub discard_source: bool,
    /// Write copies compressed (backup's `compress`; the target must be qcow2).
    pub compress: bool,
    /// Largest copy request (backup's `x-perf.max-chunk`; 0 = default).
    pub max_chunk: u64,
}

#[derive(Debug)]
struct SnapState {
    /// Areas the snapshot user may read.
    access: DirtyBitmap,
    /// Areas copied to the target by copy-before-write operations.
    done: DirtyBitmap,
    /// The first copy error under break-snapshot.
    snapshot_error: Option<Error>,
    /// Snapshot reads of the source in flight: guest writes to these wait.
    frozen: Vec<(u64, u64, u64)>,
    next_id: u64,
}

/// The state a copy-before-write node shares with its snapshot-access users and the
/// backup job.
#[derive(Debug)]
pub struct CbwShared {
    file: NodeRef,
    target: NodeRef,
    bcs: Arc<BlockCopyState>,
    on_cbw_error: OnCbwError,
    timeout: Option<Duration>,
    snap: Mutex<SnapState>,
    changed: Notify,
}

/// Where one snapshot read goes.
enum ReadFrom {
    Target,
    /// The source, with a frozen-read id to release.
    Source(u64),
}

/// Releases a frozen source read.
struct Frozen<'a> {
    s: &'a CbwShared,
    id: Option<u64>,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.s.snap.lock().frozen.retain(|f| f.0 != id);
            self.s.changed.notify_waiters();
        }
    }
}

fn eacces() -> Error {
    Error::from_errno(libc::EACCES, "Snapshot is not accessible")
}

impl CbwShared {
    /// The block-copy state (the backup job drives its background copy through it).
    pub fn block_copy(&self) -> &Arc<BlockCopyState> {
        &self.bcs
    }

    /// The source (`file`) node.
    pub fn file(&self) -> &NodeRef {
        &self.file
    }

    /// The target node.
    pub fn target(&self) -> &NodeRef {
        &self.target
    }

    /// The first copy error under break-snapshot, if any.
    pub fn snapshot_error(&self) -> Option<Error> {
        self.snap.lock().snapshot_error.clone()
    }

    /// QEMU's `cbw_do_copy_before_write`: copy the old data of `[offset, offset + len)`,
    /// then wait for snapshot reads of the source in those clusters.
    async fn copy_before_write(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        if len == 0 || self.snap.lock().snapshot_error.is_some() {
            return Ok(());
        }
        let cs = self.bcs.cluster_size();
        let off = align_down(offset, cs);
        let end = align_up(offset + len, cs).min(self.bcs.size());
        let r = match self.timeout {
            None => self
                .bcs
                .copy_range(off, end - off)
                .await
                .map_err(|e| e.error),
            Some(t) => {
                // The copy carries on in the background when the guest stops waiting.
                let bcs = self.bcs.clone();
                let task = tokio::spawn(async move { bcs.copy_range(off, end - off).await });
                match tokio::time::timeout(t, task).await {
                    Ok(Ok(r)) => r.map_err(|e| e.error),
                    Ok(Err(e)) => Err(Error::new(ErrorKind::Io(libc::EIO), e.to_string())),
                    Err(_) => Err(Error::from_errno(libc::ETIMEDOUT, "copy-before-write")),
                }
            }
        };
        if let Err(e) = &r
            && self.on_cbw_error == OnCbwError::BreakGuestWrite
        {
            return Err(e.clone());
        }
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            {
                let mut s = self.snap.lock();
                match &r {
                    Err(e) => {
                        s.snapshot_error.get_or_insert_with(|| e.clone());
                    }
                    Ok(()) => s.done.set_range(off, end - off),
                }
                if !s.frozen.iter().any(|f| f.1 < end && off < f.2) {
                    return Ok(());
                }
            }
            changed.await;
        }
    }

    /// QEMU's `cbw_snapshot_read_lock`: where `[offset, offset + len)` is read from, for
    /// how many bytes.
    fn snapshot_read_lock(&self, offset: u64, len: u64) -> Result<(ReadFrom, u64)> {
        let mut s = self.snap.lock();
        if s.snapshot_error.is_some() {
            return Err(eacces());
        }
        if s.access.next_zero(offset).is_some_and(|z| z < offset + len) {
            return Err(eacces());
        }
        let done = s.done.get(offset);
        let stop = if done {
            s.done.next_zero(offset)
        } else {
            s.done.next_dirty(offset)
        };
        let n = stop.map_or(len, |x| (x - offset).min(len)).max(1);
        if done {
            Ok((ReadFrom::Target, n))
        } else {
            s.next_id += 1;
            let id = s.next_id;
            s.frozen.push((id, offset, offset + n));
            Ok((ReadFrom::Source(id), n))
        }
    }

    /// Read the point-in-time view.
    pub async fn snapshot_read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        check_request(offset, len, self.file.size())?;
        let end = offset + len;
        let mut rest = buf;
        let mut parts = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (from, n) = self.snapshot_read_lock(pos, end - pos)?;
            let chunk = if pos + n == end {
                std::mem::replace(&mut rest, IoBuf::zeroed(0))
            } else {
                rest.split_to(n as usize)
            };
            let chunk = match from {
                ReadFrom::Target => self.target.read(pos, chunk).await?,
                ReadFrom::Source(id) => {
                    let _frozen = Frozen {
                        s: self,
                        id: Some(id),
                    };
                    self.file.read(pos, chunk).await?
                }
            };
            parts.push(chunk);
            pos += n;
        }
        Ok(IoBuf::join(parts))
    }

    /// Block status of the point-in-time view: always allocated (the view has no backing),
    /// data or zero as the side it is read from says.
    pub async fn snapshot_block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let (from, n) = self.snapshot_read_lock(offset, len)?;
        let (node, id) = match from {
            ReadFrom::Target => (&self.target, None),
            ReadFrom::Source(id) => (&self.file, Some(id)),
        };
        let _frozen = Frozen { s: self, id };
        let ext = block_status_above(node, None, offset, n).await?;
        Ok(Extent {
            len: ext.len.clamp(1, n),
            status: BlockStatus {
                allocated: true,
                data: ext.status.data || !ext.status.zero,
                zero: ext.status.zero,
                ..Default::default()
            },
            host_node: None,
        })
    }

    /// Release `[offset, offset + len)` of the snapshot (whole clusters inside it): it is
    /// no longer readable, needs no copying, and the target may drop it.
    pub async fn snapshot_discard(&self, offset: u64, len: u64) -> Result<()> {
        let cs = self.bcs.cluster_size();
        let start = align_up(offset, cs);
        let end = align_down(offset.saturating_add(len), cs);
        if end <= start {
            return Ok(());
        }
        self.snap.lock().access.clear_range(start, end - start);
        self.bcs.reset(start, end - start);
        self.target.discard(start, end - start).await
    }
}

/// A copy-before-write filter node.
#[derive(Debug)]
pub struct CbwNode {
    shared: Arc<CbwShared>,
}

impl CbwNode {
    /// A filter over `file` copying old data to `target`.
    pub fn new(file: NodeRef, target: NodeRef, opts: CbwOptions) -> Result<CbwNode> {
        if target.size() < file.size() {
            return Err(Error::invalid(
                "Cannot create block-copy-state: target is smaller than the source",
            ));
        }
        let bcs = BlockCopyState::new(
            file.clone(),
            target.clone(),
            BlockCopyOptions {
                min_cluster_size: opts.min_cluster_size,
                discard_source: opts.discard_source,
                bitmap: opts.bitmap,
                compress: opts.compress,
                max_chunk: opts.max_chunk,
            },
        )
        .map_err(|e| e.context("Cannot create block-copy-state"))?;
        let cs = bcs.cluster_size();
        let size = file.size();
        let mut access = DirtyBitmap::new(size, cs);
        for (o, l) in bcs.dirty_bitmap().extents() {
            access.set_range(o, l);
        }
        Ok(CbwNode {
            shared: Arc::new(CbwShared {
                file,
                target,
                bcs,
                on_cbw_error: opts.on_cbw_error,
                timeout: opts.cbw_timeout,
                snap: Mutex::new(SnapState {
                    access,
                    done: DirtyBitmap::new(size, cs),
                    snapshot_error: None,
                    frozen: Vec::new(),
                    next_id: 0,
                }),
                changed: Notify::new(),
            }),
        })
    }

    /// The state shared with snapshot-access nodes and the backup job.
    pub fn shared(&self) -> Arc<CbwShared> {
        self.shared.clone()
    }
}

impl BlockNode for CbwNode {
    fn driver(&self) -> &'static str {
        "copy-before-write"
    }

    forward_to_child!(shared.file =>
        filename, size, read_only, request_alignment, read, flush, block_status, backing, file,
        debug_event, as_any,
    );

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            check_request(offset, buf.len() as u64, self.size())?;
            self.shared
                .copy_before_write(offset, buf.len() as u64)
                .await?;
            self.shared.file.write(offset, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            check_request(offset, len, self.size())?;
            self.shared.copy_before_write(offset, len).await?;
            self.shared.file.write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            check_request(offset, len, self.size())?;
            self.shared.copy_before_write(offset, len).await?;
            self.shared.file.discard(offset, len).await
        })
    }

    fn truncate(&self, _size: u64, _prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async { Err(Error::unsupported("Cannot resize a copy-before-write node")) })
    }

    // The graph closes the children; the filter holds nothing of its own on disk.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// The `snapshot-access` node: the point-in-time view of a copy-before-write node.
#[derive(Debug)]
pub struct SnapshotAccessNode {
    file: NodeRef,
    cbw: Arc<CbwShared>,
}

impl SnapshotAccessNode {
    /// A view of the copy-before-write node `file` (a link to it); fails when `file` is no
    /// copy-before-write node.
    pub fn new(file: NodeRef) -> Result<SnapshotAccessNode> {
        let d = crate::link::driver_of(&file);
        let Some(cbw) = d.as_any().downcast_ref::<CbwNode>() else {
            return Err(Error::invalid(
                "snapshot-access: 'file' must be a copy-before-write node",
            ));
        };
        Ok(SnapshotAccessNode {
            cbw: cbw.shared(),
            file,
        })
    }

    /// The copy-before-write state behind the view.
    pub fn cbw(&self) -> &Arc<CbwShared> {
        &self.cbw
    }
}

impl BlockNode for SnapshotAccessNode {
    fn driver(&self) -> &'static str {
        "snapshot-access"
    }

    fn filename(&self) -> String {
        self.file.filename()
    }

    fn size(&self) -> u64 {
        self.cbw.file.size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(self.cbw.snapshot_read(offset, buf))
    }

    fn write(&self, _offset: u64, _buf: IoBuf, _flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async { Err(Error::from_errno(libc::ENOTSUP, "snapshot-access")) })
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async { Err(Error::from_errno(libc::ENOTSUP, "snapshot-access")) })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(self.cbw.snapshot_discard(offset, len))
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(self.cbw.snapshot_block_status(offset, len))
    }

    fn truncate(&self, _size: u64, _prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async { Err(Error::unsupported("Cannot resize a snapshot-access node")) })
    }

    fn file(&self) -> Option<NodeRef> {
        Some(self.file.clone())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::mem::MemNode;

    fn mem(data: Vec<u8>) -> NodeRef {
        Arc::new(MemNode::with_data(data))
    }

    #[tokio::test]
    async fn snapshot_keeps_point_in_time_and_discard_releases() {
        let size = 1usize << 20;
        let old: Vec<u8> = (0..size).map(|i| (i / 512) as u8).collect();
        let src = mem(old.clone());
        let tgt = mem(vec![0; size]);
        let cbw: NodeRef =
            Arc::new(CbwNode::new(src.clone(), tgt.clone(), CbwOptions::default()).unwrap());
        let snap = SnapshotAccessNode::new(cbw.clone()).unwrap();
        cbw.write(
            70_000,
            IoBuf::from_slice(&[0xee; 100_000]),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        cbw.write_zeroes(500_000, 4096, ZeroFlags::default())
            .await
            .unwrap();
        let r = snap.read(0, IoBuf::zeroed(size)).await.unwrap();
        assert!(r[..] == old[..], "snapshot shows the old data");
        let now = src.read(70_000, IoBuf::zeroed(100_000)).await.unwrap();
        assert!(now.iter().all(|&b| b == 0xee));
        snap.discard(0, 200_000).await.unwrap();
        let e = snap.read(0, IoBuf::zeroed(4096)).await.unwrap_err();
        assert_eq!(e.kind().errno(), libc::EACCES);
        // Only the whole clusters of the discard go.
        snap.read(196_608, IoBuf::zeroed(4096)).await.unwrap();
        let e = snap
            .read(196_608 - 4096, IoBuf::zeroed(4096))
            .await
            .unwrap_err();
        assert_eq!(e.kind().errno(), libc::EACCES);
        let st = snap.block_status(300_000, 4096).await.unwrap();
        assert!(st.status.allocated);
    }
}
