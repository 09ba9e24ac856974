//! The thread engine (`aio=threads`): `preadv`/`pwritev`/`fdatasync` on tokio's blocking pool.
//!
//! The buffers are moved into the blocking job, which runs to completion even if the caller's
//! future is dropped, so the kernel never writes into freed memory.

use std::sync::Arc;

use strata_core::{BoxFuture, Error, ErrorKind, IoBuf, Result};

use super::{Engine, HostFile, OpKind, errno_of, iovecs, op_error, total_len};
use crate::file::Aio;

/// `aio=threads`.
#[derive(Debug, Default)]
pub(crate) struct ThreadsEngine;

/// Run `f` on the blocking pool and wait for it.
pub(crate) async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::new(
            ErrorKind::Io(libc::EIO),
            format!("I/O worker thread failed: {e}"),
        )
    })?
}

/// Repeat `syscall` (`preadv` or `pwritev` on the iovecs and file position it is given) until
/// all of `bufs` is transferred, retrying `EINTR`/`EAGAIN`. Returns the bytes moved and
/// whether a call stopped making progress (end of file for reads).
fn transfer_full(
    offset: u64,
    bufs: &mut [IoBuf],
    kind: OpKind,
    syscall: impl Fn(&[libc::iovec], libc::off_t) -> isize,
) -> Result<(usize, bool)> {
    let total = total_len(bufs);
    let mut done = 0;
    while done < total {
        let iov = iovecs(bufs, done);
        let pos = offset + done as u64;
        let n = syscall(&iov, pos as libc::off_t);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match errno_of(&e) {
                libc::EINTR | libc::EAGAIN => continue,
                errno => return Err(op_error(kind, pos, errno)),
            }
        }
        if n == 0 {
            return Ok((done, true));
        }
        done += n as usize;
    }
    Ok((done, false))
}

/// `preadv` until `bufs` are full or the file ends; returns the bytes read.
pub(crate) fn preadv_full(file: &HostFile, offset: u64, bufs: &mut [IoBuf]) -> Result<usize> {
    let (done, _eof) = transfer_full(offset, bufs, OpKind::Read, |iov, pos| {
        // SAFETY: every iovec points into a buffer we own exclusively (`&mut`) for the whole
        // call, with its length in bounds.
        unsafe { libc::preadv(file.fd(), iov.as_ptr(), iov.len() as libc::c_int, pos) }
    })?;
    Ok(done)
}

/// `pwritev` until every byte of `bufs` is written.
pub(crate) fn pwritev_full(file: &HostFile, offset: u64, bufs: &mut [IoBuf]) -> Result<()> {
    let total = total_len(bufs);
    let generation = file.write_gen();
    let r = transfer_full(offset, bufs, OpKind::Write, |iov, pos| {
        // SAFETY: every iovec points into a buffer we own for the whole call, in bounds; the
        // kernel only reads from them.
        unsafe { libc::pwritev(file.fd(), iov.as_ptr(), iov.len() as libc::c_int, pos) }
    })
    .and_then(|(done, stalled)| {
        if stalled {
            // QEMU treats a write that makes no progress as a full disk.
            Err(op_error(OpKind::Write, offset + done as u64, libc::ENOSPC))
        } else {
            Ok(())
        }
    });
    file.after_write(offset + total as u64, generation, r.is_ok());
    r
}

/// `fdatasync`/`fsync`, retrying on `EINTR`.
pub(crate) fn fsync_blocking(file: &HostFile, datasync: bool) -> Result<()> {
    loop {
        // SAFETY: plain syscalls on a descriptor that `file` keeps open.
        let r = unsafe {
            if datasync {
                libc::fdatasync(file.fd())
            } else {
                libc::fsync(file.fd())
            }
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if errno_of(&e) != libc::EINTR {
            return Err(op_error(OpKind::Sync, 0, errno_of(&e)));
        }
    }
}

impl Engine for ThreadsEngine {
    fn aio(&self) -> Aio {
        Aio::Threads
    }

    fn readv(
        &self,
        file: Arc<HostFile>,
        offset: u64,
        mut bufs: Vec<IoBuf>,
    ) -> BoxFuture<'static, (Vec<IoBuf>, usize)> {
        Box::pin(run_blocking(move || {
            let n = preadv_full(&file, offset, &mut bufs)?;
            Ok((bufs, n))
        }))
    }

    fn writev(
        &self,
        file: Arc<HostFile>,
        offset: u64,
        mut bufs: Vec<IoBuf>,
    ) -> BoxFuture<'static, Vec<IoBuf>> {
        Box::pin(run_blocking(move || {
            pwritev_full(&file, offset, &mut bufs)?;
            Ok(bufs)
        }))
    }

    fn fsync(&self, file: Arc<HostFile>, datasync: bool) -> BoxFuture<'static, ()> {
        Box::pin(run_blocking(move || fsync_blocking(&file, datasync)))
    }
}
