//! Request alignment: the one place that knows O_DIRECT's rules.
//!
//! With `cache.direct=on` the kernel wants the file offset, every iovec's length and every
//! iovec's address aligned. [`DataPath`] sends requests that already are straight to the
//! engine; any other request goes through an aligned bounce buffer (reads) or a
//! read-modify-write of the partial blocks at its edges (writes). A read-modify-write must not
//! race with another write to the same blocks, or that write's bytes in the padding would be
//! overwritten with stale data; [`WriteTracker`] serialises them as QEMU's "serialising
//! requests" do. Note that, as in QEMU, an O_DIRECT write past the end of the file rounds the
//! file size up to the request alignment.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use strata_core::range::{align_down, align_up};
use strata_core::{Error, ErrorKind, IoBuf, Result};
use tokio::sync::Notify;

use crate::engine::{Engine, HostFile, total_len};

/// Largest alignment the probe tries (and the alignment of every [`IoBuf`]).
const MAX_ALIGN: usize = strata_core::buf::IO_ALIGN;

/// What the host wants aligned, in bytes (both powers of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Alignment {
    /// File offsets and lengths.
    pub(crate) request: u64,
    /// Buffer addresses.
    pub(crate) memory: usize,
}

impl Alignment {
    /// No constraint (buffered I/O).
    pub(crate) const BYTE: Alignment = Alignment {
        request: 1,
        memory: 1,
    };

    fn is_byte(&self) -> bool {
        self.request == 1 && self.memory == 1
    }

    /// Whether a request at `offset` with `bufs` can go to the kernel as it is.
    pub(crate) fn fits(&self, offset: u64, bufs: &[IoBuf]) -> bool {
        offset.is_multiple_of(self.request)
            && bufs.iter().all(|b| {
                (b.as_ptr() as usize).is_multiple_of(self.memory)
                    && (b.len() as u64).is_multiple_of(self.request)
            })
    }
}

/// Find the O_DIRECT alignment of an open file the way QEMU's `raw_probe_alignment` does:
/// the logical block size for block devices (`BLKSSZGET`), else the kernel's own answer
/// (`statx` `STATX_DIOALIGN`, which also works on empty files), else test reads of 512, 1024,
/// 2048 and 4096 bytes into an aligned buffer, then reads into buffers at 512.. byte offsets.
pub(crate) fn probe(file: &File, block_device: bool) -> Result<Alignment> {
    let fd = file.as_raw_fd();
    let mut request = 0u64;
    let mut memory = 0usize;
    if block_device {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut sector) } == 0 && sector > 0 {
            request = sector as u64;
        }
    } else if let Some((offset_align, mem_align)) = statx_dio_align(file) {
        request = offset_align;
        memory = mem_align;
    }
    let mut buf = IoBuf::zeroed(2 * MAX_ALIGN);
    if request == 0 {
        let mut align = 512;
        while align <= MAX_ALIGN {
            if is_io_aligned(fd, buf.as_mut_ptr(), align) {
                request = align as u64;
                break;
            }
            align *= 2;
        }
    }
    if request == 0 {
        return Err(Error::invalid(
            "Could not find working O_DIRECT alignment (try cache.direct=off)",
        ));
    }
    if memory == 0 {
        let mut align = 512;
        while align <= MAX_ALIGN {
            // SAFETY: `align + request <= 2 * MAX_ALIGN`, inside the buffer.
            let p = unsafe { buf.as_mut_ptr().add(align) };
            if is_io_aligned(fd, p, request as usize) {
                memory = align;
                break;
            }
            align *= 2;
        }
        if memory == 0 {
            memory = request as usize;
        }
    }
    // Our buffers are never aligned to more than a page, and never need to be less.
    Ok(Alignment {
        request: request.clamp(1, MAX_ALIGN as u64),
        memory: memory.clamp(1, MAX_ALIGN),
    })
}

/// `STATX_DIOALIGN` (Linux 6.1+): `(offset alignment, memory alignment)`, if the file system
/// supports O_DIRECT and reports them.
fn statx_dio_align(file: &File) -> Option<(u64, usize)> {
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH queries the descriptor itself; the kernel
    // writes at most `size_of::<statx>()` bytes into `stx`.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (o, m) = (stx.stx_dio_offset_align, stx.stx_dio_mem_align);
    (o.is_power_of_two() && m.is_power_of_two()).then_some((o as u64, m as usize))
}

/// QEMU's `raw_is_io_aligned`: a read that fails with anything but EINVAL counts as aligned.
fn is_io_aligned(fd: libc::c_int, buf: *mut u8, len: usize) -> bool {
    // SAFETY: the caller passes a buffer with at least `len` writable bytes.
    let r = unsafe { libc::pread(fd, buf.cast(), len, 0) };
    r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
}

/// The data path of a file node: an engine plus the alignment rules it must follow.
#[derive(Debug, Clone)]
pub(crate) struct DataPath {
    pub(crate) file: Arc<HostFile>,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) align: Alignment,
    tracker: Arc<WriteTracker>,
}

impl DataPath {
    pub(crate) fn new(file: Arc<HostFile>, engine: Arc<dyn Engine>, align: Alignment) -> Self {
        DataPath {
            file,
            engine,
            align,
            tracker: Arc::new(WriteTracker::default()),
        }
    }

    /// Read into `bufs` at `offset`; bytes past the end of the file read as zeroes.
    pub(crate) async fn readv(&self, offset: u64, mut bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let len = total_len(&bufs) as u64;
        if len == 0 {
            return Ok(bufs);
        }
        if self.align.fits(offset, &bufs) {
            let (mut bufs, n) = self
                .engine
                .readv(Arc::clone(&self.file), offset, bufs)
                .await?;
            zero_from(&mut bufs, n);
            return Ok(bufs);
        }
        let (start, end) = self.padded(offset, len)?;
        let bounce = self.read_bounce(start, end).await?;
        let mut at = (offset - start) as usize;
        for b in &mut bufs {
            let n = b.len();
            b.copy_from_slice(&bounce[at..at + n]);
            at += n;
        }
        Ok(bufs)
    }

    /// Write `bufs` at `offset`, growing the file if needed.
    pub(crate) async fn writev(&self, offset: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        let len = total_len(&bufs) as u64;
        if len == 0 {
            return Ok(bufs);
        }
        strata_core::range::end_of(offset, len, "write")?;
        if self.align.is_byte() {
            return self
                .engine
                .writev(Arc::clone(&self.file), offset, bufs)
                .await;
        }
        if self.align.fits(offset, &bufs) {
            let _guard = self.tracker.enter(offset, offset + len, false).await;
            return self
                .engine
                .writev(Arc::clone(&self.file), offset, bufs)
                .await;
        }
        // The read-modify-write runs as its own task so that it finishes, and keeps its range
        // locked until its write is done, even if our caller goes away halfway.
        let this = self.clone();
        tokio::spawn(async move { this.read_modify_write(offset, len, bufs).await })
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io(libc::EIO),
                    format!("read-modify-write task failed: {e}"),
                )
            })?
    }

    /// `[offset, offset + len)` widened to the request alignment.
    fn padded(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let end = strata_core::range::end_of(offset, len, "request")?;
        let a = self.align.request;
        let up = align_up(end, a);
        if up < end {
            return Err(Error::invalid(
                "request too close to the end of the address space",
            ));
        }
        Ok((align_down(offset, a), up))
    }

    /// An aligned buffer holding `[start, end)` of the file (zeroes past its end).
    async fn read_bounce(&self, start: u64, end: u64) -> Result<IoBuf> {
        self.read_into(start, IoBuf::zeroed((end - start) as usize))
            .await
    }

    /// Fill the aligned view `buf` from `start` (zeroes past the end of the file).
    async fn read_into(&self, start: u64, buf: IoBuf) -> Result<IoBuf> {
        let (mut v, n) = self
            .engine
            .readv(Arc::clone(&self.file), start, vec![buf])
            .await?;
        zero_from(&mut v, n);
        Ok(IoBuf::join(v))
    }

    async fn read_modify_write(
        &self,
        offset: u64,
        len: u64,
        bufs: Vec<IoBuf>,
    ) -> Result<Vec<IoBuf>> {
        let (start, end) = self.padded(offset, len)?;
        let _guard = self.tracker.enter(start, end, true).await;
        let a = self.align.request;
        let head_partial = offset != start;
        let tail_partial = offset + len != end;
        let mut bounce =
            if end - start == a || (head_partial && tail_partial && end - start <= 2 * a) {
                // One or two blocks, both needed: a single read.
                self.read_bounce(start, end).await?
            } else {
                let mut bounce = IoBuf::zeroed((end - start) as usize);
                let mut rest = bounce.split_off(a as usize);
                let mut tail = rest.split_off(rest.len() - a as usize);
                // Reading into the views in place keeps the final unsplit free of copies.
                if head_partial {
                    bounce = self.read_into(start, bounce).await?;
                }
                if tail_partial {
                    tail = self.read_into(end - a, tail).await?;
                }
                bounce.unsplit(rest);
                bounce.unsplit(tail);
                bounce
            };
        let mut at = (offset - start) as usize;
        for b in &bufs {
            bounce[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        self.engine
            .writev(Arc::clone(&self.file), start, vec![bounce])
            .await?;
        Ok(bufs)
    }
}

/// Zero everything after the first `n` bytes of `bufs` (the part a read found past EOF).
pub(crate) fn zero_from(bufs: &mut [IoBuf], mut n: usize) {
    for b in bufs {
        if n >= b.len() {
            n -= b.len();
        } else {
            b[n..].fill(0);
            n = 0;
        }
    }
}

/// Writes in flight on an O_DIRECT node, so that a read-modify-write ("serialising") write
/// never overlaps another write. Each write registers first and then waits for the earlier
/// conflicting ones, so a serialising write cannot be starved by a stream of later writes.
#[derive(Debug, Default)]
pub(crate) struct WriteTracker {
    state: Mutex<TrackerState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct TrackerState {
    next: u64,
    active: Vec<Tracked>,
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

impl Tracked {
    fn conflicts(&self, other: &Tracked) -> bool {
        (self.serialising || other.serialising) && self.start < other.end && other.start < self.end
    }
}

/// Registration of one write; dropping it lets waiting writes go.
#[derive(Debug)]
pub(crate) struct TrackedGuard<'a> {
    tracker: &'a WriteTracker,
    id: u64,
}

impl WriteTracker {
    /// Register a write of `[start, end)` and wait until no earlier conflicting write is left.
    pub(crate) async fn enter(&self, start: u64, end: u64, serialising: bool) -> TrackedGuard<'_> {
        let me = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let me = Tracked {
                id: s.next,
                start,
                end,
                serialising,
            };
            s.next += 1;
            s.active.push(me);
            me
        };
        // Made before waiting, so a future dropped while waiting still unregisters.
        let guard = TrackedGuard {
            tracker: self,
            id: me.id,
        };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if !s.active.iter().any(|t| t.id < me.id && t.conflicts(&me)) {
                    return guard;
                }
            }
            notified.await;
        }
    }
}

impl Drop for TrackedGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.tracker.state.lock().unwrap_or_else(|e| e.into_inner());
        s.active.retain(|t| t.id != self.id);
        drop(s);
        self.tracker.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_checks_offset_length_and_address() {
        let a = Alignment {
            request: 512,
            memory: 512,
        };
        let b = IoBuf::zeroed(1024);
        assert!(a.fits(512, std::slice::from_ref(&b)));
        assert!(!a.fits(100, std::slice::from_ref(&b)));
        let mut odd = IoBuf::zeroed(2048);
        let tail = odd.split_off(1);
        assert!(!a.fits(0, &[tail]));
        assert!(!a.fits(0, &[IoBuf::zeroed(100)]));
        assert!(Alignment::BYTE.fits(3, &[IoBuf::zeroed(7)]));
    }

    #[test]
    fn zero_from_spans_buffers() {
        let mut v = vec![IoBuf::from_slice(&[1; 4]), IoBuf::from_slice(&[2; 4])];
        zero_from(&mut v, 6);
        assert_eq!(&v[0][..], &[1; 4]);
        assert_eq!(&v[1][..], &[2, 2, 0, 0]);
    }

    #[tokio::test]
    async fn serialising_writes_wait_for_overlaps_only() {
        let t = Arc::new(WriteTracker::default());
        let g1 = t.enter(0, 4096, false).await;
        let _g2 = t.enter(8192, 12288, true).await; // disjoint: no wait
        let t2 = Arc::clone(&t);
        let waiter = tokio::spawn(async move {
            let _g = t2.enter(0, 512, true).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g1);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
