//! I/O engines: how a vectored read, write or sync reaches the host file.
//!
//! Both engines take the buffers by value and keep them until the kernel is done with them, so
//! dropping the future of a request never frees memory that is still under I/O: the thread
//! engine moves them into a blocking job, the io_uring engine into its in-flight table.

pub(crate) mod threads;
pub(crate) mod uring;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_core::{BoxFuture, Error, IoBuf};

use crate::file::Aio;

/// Most iovecs one `preadv`/`pwritev`/`IORING_OP_READV` accepts (Linux `UIO_MAXIOV`).
pub(crate) const IOV_MAX: usize = 1024;

/// An engine: the one internal interface both back ends implement.
///
/// Reads fill the buffers in order until they are full or the file ends and report how many
/// bytes were read; writes write every byte or fail. Short transfers, `EINTR` and `EAGAIN` are
/// handled inside the engine.
pub(crate) trait Engine: Send + Sync + fmt::Debug {
    /// Which `aio=` setting this engine implements.
    fn aio(&self) -> Aio;

    /// Read into `bufs` from `offset`; returns the buffers and the number of bytes read
    /// (less than their total length only at end of file).
    fn readv(
        &self,
        file: std::sync::Arc<HostFile>,
        offset: u64,
        bufs: Vec<IoBuf>,
    ) -> BoxFuture<'static, (Vec<IoBuf>, usize)>;

    /// Write all of `bufs` at `offset`.
    fn writev(
        &self,
        file: std::sync::Arc<HostFile>,
        offset: u64,
        bufs: Vec<IoBuf>,
    ) -> BoxFuture<'static, Vec<IoBuf>>;

    /// `fdatasync` (or `fsync` when `datasync` is false).
    fn fsync(&self, file: std::sync::Arc<HostFile>, datasync: bool) -> BoxFuture<'static, ()>;
}

/// An open host file shared by its node and every request in flight on it (so the descriptor
/// stays open until the last request completes), with its cached size.
#[derive(Debug)]
pub(crate) struct HostFile {
    file: File,
    block_device: bool,
    /// Size in bytes; kept right by [`HostFile::after_write`] and the resize paths.
    size: AtomicU64,
    /// Serialises size refreshes against truncation (see `after_write`).
    size_lock: Mutex<()>,
    /// Bumped (under `size_lock`) by every size change other than a growing write.
    resize_gen: AtomicU64,
}

impl HostFile {
    pub(crate) fn new(file: File, block_device: bool, size: u64) -> Self {
        HostFile {
            file,
            block_device,
            size: AtomicU64::new(size),
            size_lock: Mutex::new(()),
            resize_gen: AtomicU64::new(0),
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The cached size.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The resize generation; a write takes it before it is issued and hands it to
    /// [`HostFile::after_write`].
    pub(crate) fn write_gen(&self) -> u64 {
        self.resize_gen.load(Ordering::Acquire)
    }

    /// Called by the engines when a write that ends at `end` has completed (`complete`: every
    /// byte written) or failed: if it may have grown the file, update the size. A complete
    /// write with no resize since `generation` (taken before it was issued) made the file at least
    /// `end` bytes long, so no `fstat` is needed; otherwise the size is re-read. Done under
    /// `size_lock`, the lock truncate holds across its `ftruncate` and size update, so a write
    /// that lands just after a shrink can never leave a stale size behind. Runs inside the
    /// engine, so it happens even when the caller dropped the request's future.
    pub(crate) fn after_write(&self, end: u64, generation: u64, complete: bool) {
        if self.block_device || end <= self.size.load(Ordering::Acquire) {
            return;
        }
        let _g = self.size_lock.lock().unwrap_or_else(|e| e.into_inner());
        if end <= self.size.load(Ordering::Acquire) {
            return;
        }
        if complete && self.resize_gen.load(Ordering::Acquire) == generation {
            self.size.store(end, Ordering::Release);
        } else if let Ok(md) = self.file.metadata() {
            self.size.store(md.len(), Ordering::Release);
        }
    }

    /// Run `f` (which changes the file's size) under the size lock, then re-read the size.
    pub(crate) fn resize_with<T>(&self, f: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
        let _g = self.size_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.resize_gen.fetch_add(1, Ordering::AcqRel);
        let r = f(&self.file);
        if !self.block_device
            && let Ok(md) = self.file.metadata()
        {
            self.size.store(md.len(), Ordering::Release);
        }
        r
    }
}

/// iovecs for `bufs` with their first `skip` bytes left out, at most [`IOV_MAX`] of them.
pub(crate) fn iovecs(bufs: &mut [IoBuf], mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(bufs.len().min(IOV_MAX));
    for b in bufs.iter_mut() {
        if out.len() == IOV_MAX {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        // SAFETY: `skip < b.len()`, so the pointer stays inside the buffer.
        let base = unsafe { b.as_mut_ptr().add(skip) };
        out.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: b.len() - skip,
        });
        skip = 0;
    }
    out
}

/// Total length of `bufs`.
pub(crate) fn total_len(bufs: &[IoBuf]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// What a request was doing, for its error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
    Sync,
}

/// The error a failed request reports.
pub(crate) fn op_error(kind: OpKind, offset: u64, errno: i32) -> Error {
    match kind {
        OpKind::Read => Error::from_errno(errno, format!("error while reading at byte {offset}")),
        OpKind::Write => Error::from_errno(errno, format!("error while writing at byte {offset}")),
        OpKind::Sync => Error::from_errno(errno, "Could not flush"),
    }
}

/// The errno of an `io::Error` (EIO when it has none).
pub(crate) fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}
