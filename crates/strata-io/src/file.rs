//! The `file` protocol node: a host file (or block device) behind the [`BlockNode`] interface,
//! following QEMU's `file-posix` driver.

use std::any::Any;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Weak};

use strata_core::range::{align_up, check_request, end_of};
use strata_core::{
    BlockNode, BlockStatus, BoxFuture, Error, ErrorKind, Extent, IoBuf, Prealloc, Result,
    WriteFlags, ZeroFlags,
};

use crate::align::{self, Alignment, DataPath};
use crate::engine::threads::{ThreadsEngine, run_blocking};
use crate::engine::{Engine, HostFile, errno_of, uring};
use crate::lock::{self, LockState, Locking, PERM_ALL};

/// The `aio=` option: which engine runs a node's requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Aio {
    /// `preadv`/`pwritev` on a thread pool (QEMU's default).
    #[default]
    Threads,
    /// Linux io_uring.
    IoUring,
}

impl Aio {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Aio::Threads => "threads",
            Aio::IoUring => "io_uring",
        }
    }
}

impl fmt::Display for Aio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Aio {
    type Err = Error;

    /// Parse QEMU's spellings; `native` (Linux AIO) is recognised but not implemented.
    fn from_str(s: &str) -> Result<Aio> {
        match s {
            "threads" => Ok(Aio::Threads),
            "io_uring" => Ok(Aio::IoUring),
            "native" => Err(Error::unsupported(
                "aio=native is not supported; use aio=threads or aio=io_uring",
            )),
            other => Err(Error::invalid(format!("invalid parameter value: {other}"))),
        }
    }
}

/// How to open a [`FileNode`].
#[derive(Debug, Clone, Default)]
pub struct FileOptions {
    /// Open read-only (`read-only=on`).
    pub read_only: bool,
    /// Bypass the host page cache with `O_DIRECT` (`cache.direct=on`).
    pub direct: bool,
    /// The I/O engine (`aio=`).
    pub aio: Aio,
}

/// A host file or block device as a protocol node (driver `file`, or `host_device` for a
/// block device).
///
/// Reads past the end of the file return zeroes and writes past it grow the file, as with
/// QEMU's file-posix. The size is cached and kept right across growing writes and truncation.
#[derive(Debug)]
pub struct FileNode {
    filename: String,
    opts: FileOptions,
    io: DataPath,
    /// Ourselves, for the `host_node` of block-status answers.
    me: Weak<FileNode>,
    /// The image locks this node's descriptor holds (see [`crate::lock`]).
    locks: std::sync::Mutex<LockState>,
    /// `cache.no-flush=on`: flushes (and the one at close) skip `fdatasync`.
    no_flush: std::sync::atomic::AtomicBool,
}

/// `BLKGETSIZE64` = `_IOR(0x12, 114, u64)`; libc does not export it.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const BLKGETSIZE64: libc::c_ulong = 0x4008_1272;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size of a block device in bytes.
fn block_device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// `fallocate(2)`, retrying on EINTR; the error is an errno.
fn fallocate(
    file: &File,
    mode: libc::c_int,
    offset: u64,
    len: u64,
) -> std::result::Result<(), i32> {
    loop {
        // SAFETY: plain syscall on an open descriptor.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        match errno_of(&std::io::Error::last_os_error()) {
            libc::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// Errnos that mean "this file system or device cannot do that fallocate mode".
fn is_unsupported(errno: i32) -> bool {
    matches!(
        errno,
        libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::EBUSY
    )
}

/// Make `[offset, offset + len)` read as zeroes without writing data, as QEMU's
/// `handle_aiocb_write_zeroes{,_unmap}` do. `Err(EOPNOTSUPP)` means no method worked.
fn fallocate_zeroes(
    f: &HostFile,
    offset: u64,
    len: u64,
    may_unmap: bool,
) -> std::result::Result<(), i32> {
    let end = offset + len;
    let blk = f.is_block_device();
    if may_unmap {
        // A punched hole reads as zeroes; past EOF the file just grows by a hole.
        let size = f.size();
        let punch_end = if blk { end } else { end.min(size) };
        let punched = if offset < punch_end {
            fallocate(
                f.file(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                punch_end - offset,
            )
        } else {
            Ok(())
        };
        match punched {
            Ok(()) => {
                if !blk && end > size {
                    f.resize_with(|file| {
                        if file.metadata()?.len() < end {
                            file.set_len(end)?;
                        }
                        Ok(())
                    })
                    .map_err(|e| errno_of(&e))?;
                }
                return Ok(());
            }
            Err(e) if is_unsupported(e) => {}
            Err(e) => return Err(e),
        }
    }
    // Without KEEP_SIZE, ZERO_RANGE also grows a regular file; block devices require it.
    let mode = libc::FALLOC_FL_ZERO_RANGE | if blk { libc::FALLOC_FL_KEEP_SIZE } else { 0 };
    let generation = f.write_gen();
    let r = fallocate(f.file(), mode, offset, len);
    f.after_write(end, generation, r.is_ok());
    match r {
        Ok(()) => Ok(()),
        Err(e) if is_unsupported(e) => Err(libc::EOPNOTSUPP),
        Err(e) => Err(e),
    }
}

/// QEMU's `find_allocation`: `Ok((data, hole))` with `data == start` when `start` is in a data
/// extent that ends at `hole`, or `hole == start` when it is in a hole that ends at `data`.
/// `Err(ENXIO)` is a hole that runs to the end of the file.
fn find_allocation(file: &File, start: u64) -> std::result::Result<(u64, u64), i32> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on an open descriptor; the offset is only used for this query (we never
    // use the file position, all I/O is positioned).
    let data = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        return Err(errno_of(&std::io::Error::last_os_error()));
    }
    let data = data as u64;
    if data < start {
        return Err(libc::EIO);
    }
    if data > start {
        return Ok((data, start));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(errno_of(&std::io::Error::last_os_error()));
    }
    let hole = hole as u64;
    if hole <= start {
        return Err(if hole < start { libc::EIO } else { libc::EBUSY });
    }
    Ok((start, hole))
}

fn read_only_error() -> Error {
    Error::new(ErrorKind::ReadOnly, "Block node is read-only")
}

/// Change a regular file's size with a preallocation mode, as QEMU's `raw_regular_truncate`.
/// Returns the old size; `Full` leaves writing the zeroes to the caller.
fn regular_truncate(f: &HostFile, size: u64, prealloc: Prealloc) -> Result<u64> {
    if prealloc == Prealloc::Metadata {
        return Err(Error::unsupported(format!(
            "Unsupported preallocation mode: {}",
            prealloc.as_str()
        )));
    }
    f.resize_with(|file| {
        let current = file.metadata()?.len();
        if current > size && prealloc != Prealloc::Off {
            return Ok(Err(Error::unsupported(
                "Cannot use preallocation for shrinking files",
            )));
        }
        match prealloc {
            Prealloc::Falloc if size > current => {
                if let Err(e) = fallocate(file, 0, current, size - current) {
                    return Ok(Err(Error::from_errno(e, "Could not preallocate new data")));
                }
            }
            _ => {
                if let Err(e) = file.set_len(size) {
                    return Ok(Err(Error::from_errno(
                        errno_of(&e),
                        "Could not resize file",
                    )));
                }
            }
        }
        Ok(Ok(current))
    })
    .map_err(|e| Error::from_errno(errno_of(&e), "Could not resize file"))?
}

/// Write zeroes over `[from, to)` of a freshly resized file with plain writes (`Full`
/// preallocation at create time), then sync.
fn write_zeroes_blocking(file: &File, from: u64, to: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let chunk = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], pos).map_err(|e| {
            Error::from_errno(errno_of(&e), "Could not write zeros for preallocation")
        })?;
        pos += n as u64;
    }
    file.sync_all()
        .map_err(|e| Error::from_errno(errno_of(&e), "Could not flush file to disk"))
}

/// Create (or truncate) the file at `path` with `size` bytes and the given preallocation, as
/// `qemu-img create -f raw` does through QEMU's file driver.
pub async fn create(path: &Path, size: u64, prealloc: Prealloc) -> Result<()> {
    let path: PathBuf = path.to_path_buf();
    run_blocking(move || {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::from_errno(errno_of(&e), format!("Could not create '{name}'")))?;
        let md = file
            .metadata()
            .map_err(|e| Error::from_errno(errno_of(&e), format!("Could not create '{name}'")))?;
        if !md.file_type().is_file() {
            return Err(Error::invalid(format!(
                "'file' driver requires '{name}' to be a regular file"
            )));
        }
        // QEMU's raw_co_create: take `write` and `resize`, sharing all but `resize`, and make
        // sure no other user of the image objects, before destroying its contents.
        const WRITE_RESIZE: u8 = 0x02 | 0x08;
        lock::lock_fd(file.as_raw_fd(), WRITE_RESIZE, PERM_ALL & !0x08, &name)?;
        let host = HostFile::new(file, false, md.len());
        // Clear the file first, then grow it to its final size with the preallocation asked
        // for (QEMU's order: the file system sees the final size up front).
        regular_truncate(&host, 0, Prealloc::Off)?;
        let old = regular_truncate(&host, size, prealloc)?;
        if prealloc == Prealloc::Full && size > old {
            write_zeroes_blocking(host.file(), old, size)?;
        }
        Ok(())
    })
    .await
}

impl FileNode {
    /// Open `path` as a protocol node.
    ///
    /// Errors read like QEMU's: `Could not open 'PATH': No such file or directory`;
    /// `io_uring is not available: ...` when `aio=io_uring` cannot be set up.
    pub fn open(path: &Path, opts: &FileOptions) -> Result<Arc<FileNode>> {
        let filename = path.display().to_string();
        let engine: Arc<dyn Engine> = match opts.aio {
            Aio::Threads => Arc::new(ThreadsEngine),
            Aio::IoUring => Arc::new(uring::global()?),
        };
        let open_err = |e: std::io::Error| {
            Error::from_errno(errno_of(&e), format!("Could not open '{filename}'"))
        };
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(open_err)?;
        let md = file.metadata().map_err(open_err)?;
        let ft = md.file_type();
        if ft.is_dir() {
            return Err(Error::from_errno(
                libc::EISDIR,
                format!("Could not open '{filename}'"),
            ));
        }
        let block_device = ft.is_block_device();
        if !block_device && !ft.is_file() {
            return Err(Error::invalid(format!(
                "'file' driver requires '{filename}' to be a regular file"
            )));
        }
        let size = if block_device {
            block_device_size(&file).map_err(open_err)?
        } else {
            md.len()
        };
        let align = if opts.direct {
            align::probe(&file, block_device)?
        } else {
            Alignment::BYTE
        };
        let host = Arc::new(HostFile::new(file, block_device, size));
        let io = DataPath::new(host, engine, align);
        Ok(Arc::new_cyclic(|me| FileNode {
            filename,
            opts: opts.clone(),
            io,
            me: me.clone(),
            locks: std::sync::Mutex::new(LockState::new(true)),
            no_flush: Default::default(),
        }))
    }

    /// `cache.no-flush`: with `on`, flushes succeed without reaching the disk (QEMU's
    /// `BDRV_O_NO_FLUSH`; data may be lost on a host crash).
    pub fn set_no_flush(&self, on: bool) {
        self.no_flush
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn skips_flush(&self) -> bool {
        self.no_flush.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, LockState> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `locking` option; set before the node takes permissions. `off` lets go of any
    /// lock held.
    pub fn set_locking(&self, locking: Locking) {
        let mut st = self.lock_state();
        if !locking.enabled() {
            st.release(self.io.file.fd());
        }
    }

    /// Whether this node takes image locks.
    pub fn locking(&self) -> bool {
        self.lock_state().enabled
    }

    /// QEMU's `bdrv_check_perm` for this node: take the locks that `perm` (QEMU's
    /// `BLK_PERM_*` bits) and not sharing what `shared` lacks need, keeping the current
    /// ones, and fail with QEMU's text (`Failed to get "write" lock`, then a hint line) if
    /// another user of the file conflicts. Follow with [`FileNode::set_perm`] or
    /// [`FileNode::abort_perm`].
    pub fn check_perm(&self, perm: u8, shared: u8) -> Result<()> {
        self.lock_state()
            .prepare(self.io.file.fd(), perm, shared, &self.filename)
    }

    /// Hold exactly the locks of `perm`/`shared` (after a successful check).
    pub fn set_perm(&self, perm: u8, shared: u8) {
        self.lock_state().commit(self.io.file.fd(), perm, shared);
    }

    /// Undo a [`FileNode::check_perm`].
    pub fn abort_perm(&self) {
        self.lock_state().abort(self.io.file.fd());
    }

    /// Check and take `perm`/`shared` in one step (an image opened outside the graph).
    pub fn lock_perm(&self, perm: u8, shared: u8) -> Result<()> {
        let mut st = self.lock_state();
        st.prepare(self.io.file.fd(), perm, shared, &self.filename)?;
        st.commit(self.io.file.fd(), perm, shared);
        Ok(())
    }

    /// The permissions this node's locks stand for: (held, shared).
    pub fn perm(&self) -> (u8, u8) {
        let st = self.lock_state();
        (st.perm, st.shared)
    }

    /// Reopen: this node (a fresh descriptor of `old`'s file) takes over `old`'s locks, and
    /// `old` lets go of its own, as QEMU moves locks to the new descriptor before closing
    /// the old one. With `old` not locking, neither does this node.
    pub fn take_locks_from(&self, old: &FileNode) {
        let mut prev = old.lock_state();
        let mut st = self.lock_state();
        if !prev.enabled {
            st.release(self.io.file.fd());
            return;
        }
        let snapshot = *prev;
        prev.release(old.io.file.fd());
        // Read locks of ours never conflict with each other; a failure here is the host's.
        let _ = st.inherit(self.io.file.fd(), &snapshot);
    }

    /// Create (or truncate) a file; see [`create`].
    pub async fn create(path: &Path, size: u64, prealloc: Prealloc) -> Result<()> {
        create(path, size, prealloc).await
    }

    /// The options the node was opened with.
    pub fn options(&self) -> &FileOptions {
        &self.opts
    }

    /// The engine running this node's requests.
    pub fn aio(&self) -> Aio {
        self.io.engine.aio()
    }

    /// Whether this is a block device (driver `host_device`).
    pub fn is_block_device(&self) -> bool {
        self.io.file.is_block_device()
    }

    /// The alignment buffer addresses need to avoid a bounce buffer (1 unless O_DIRECT).
    pub fn memory_alignment(&self) -> usize {
        self.io.align.memory
    }

    /// Vectored read at `offset`; bytes past the end of the file read as zeroes.
    pub async fn readv(&self, offset: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        end_of(offset, crate::engine::total_len(&bufs) as u64, "read")?;
        self.io.readv(offset, bufs).await
    }

    /// Vectored write at `offset`; a write past the end of the file grows it.
    pub async fn writev(&self, offset: u64, bufs: Vec<IoBuf>) -> Result<Vec<IoBuf>> {
        if self.opts.read_only {
            return Err(read_only_error());
        }
        self.io.writev(offset, bufs).await
    }

    async fn write_impl(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        let bufs = self.writev(offset, vec![buf]).await?;
        if flags.fua {
            self.io
                .engine
                .fsync(Arc::clone(&self.io.file), true)
                .await?;
        }
        Ok(IoBuf::join(bufs))
    }

    /// Write zero buffers over `[offset, offset + len)` (the fallback of write_zeroes).
    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut buf = IoBuf::zeroed(len.min(CHUNK) as usize);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(CHUNK) as usize;
            if n < buf.len() {
                drop(buf.split_off(n));
            }
            buf = IoBuf::join(self.io.writev(pos, vec![buf]).await?);
            pos += n as u64;
        }
        Ok(())
    }

    async fn write_zeroes_impl(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.opts.read_only {
            return Err(read_only_error());
        }
        end_of(offset, len, "write zeroes")?;
        if len == 0 {
            return Ok(());
        }
        let file = Arc::clone(&self.io.file);
        let r =
            run_blocking(move || Ok(fallocate_zeroes(&file, offset, len, flags.may_unmap))).await?;
        match r {
            Ok(()) => Ok(()),
            Err(libc::EOPNOTSUPP) if flags.no_fallback => Err(Error::unsupported(
                "Writing zeroes without writing data is not supported by this file system",
            )),
            Err(libc::EOPNOTSUPP) => self.write_zero_buffers(offset, len).await,
            Err(e) => Err(Error::from_errno(
                e,
                format!("error while writing zeroes at byte {offset}"),
            )),
        }
    }

    async fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        if self.opts.read_only {
            return Err(read_only_error());
        }
        let end = end_of(offset, len, "discard")?;
        let file = Arc::clone(&self.io.file);
        let end = if file.is_block_device() {
            end
        } else {
            end.min(file.size())
        };
        if offset >= end {
            return Ok(());
        }
        let r = run_blocking(move || {
            Ok(fallocate(
                file.file(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                end - offset,
            ))
        })
        .await?;
        match r {
            // Discard is a hint: where the host cannot punch holes it is a no-op (as in QEMU,
            // whose block layer ignores ENOTSUP from discard).
            Ok(()) => Ok(()),
            Err(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV | libc::ENOTTY) => Ok(()),
            Err(e) => Err(Error::from_errno(
                e,
                format!("error while discarding at byte {offset}"),
            )),
        }
    }

    fn block_status_impl(&self, offset: u64, len: u64) -> Result<Extent> {
        check_request(offset, len, self.size())?;
        let (data, n) = match find_allocation(self.io.file.file(), offset) {
            // Trailing hole.
            Err(libc::ENXIO) => (false, len),
            // No information (no SEEK_DATA support, block device, ...): pretend it is all data.
            Err(_) => (true, len),
            Ok((data, hole)) if data == offset => {
                // A data extent may end in a partial block at EOF; never report less than a
                // whole aligned block.
                let n = align_up(hole - offset, self.io.align.request);
                (true, n.min(len))
            }
            Ok((data, _)) => (false, (data - offset).min(len)),
        };
        let host_node = self.me.upgrade().map(|me| me as strata_core::NodeRef);
        Ok(Extent {
            len: n,
            status: BlockStatus {
                allocated: true,
                data,
                zero: !data,
                compressed: false,
                host_offset: Some(offset),
                recurse: false,
            },
            host_node,
        })
    }

    async fn truncate_impl(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        if self.opts.read_only {
            return Err(read_only_error());
        }
        let file = Arc::clone(&self.io.file);
        if file.is_block_device() {
            if prealloc != Prealloc::Off {
                return Err(Error::unsupported(format!(
                    "Preallocation mode '{}' unsupported for this non-regular file",
                    prealloc.as_str()
                )));
            }
            if size > file.size() {
                return Err(Error::unsupported("Cannot grow device files"));
            }
            return Ok(());
        }
        let old = run_blocking(move || regular_truncate(&file, size, prealloc)).await?;
        if prealloc == Prealloc::Full && size > old {
            // Through the node's own write path, so O_DIRECT alignment is handled.
            self.write_zero_buffers(old, size - old)
                .await
                .map_err(|e| e.context("Could not write zeros for preallocation"))?;
            self.io
                .engine
                .fsync(Arc::clone(&self.io.file), false)
                .await?;
        }
        Ok(())
    }
}

impl BlockNode for FileNode {
    fn driver(&self) -> &'static str {
        if self.is_block_device() {
            "host_device"
        } else {
            "file"
        }
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn size(&self) -> u64 {
        self.io.file.size()
    }

    fn read_only(&self) -> bool {
        self.opts.read_only
    }

    fn request_alignment(&self) -> u64 {
        self.io.align.request
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move { Ok(IoBuf::join(self.readv(offset, vec![buf]).await?)) })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(self.write_impl(offset, buf, flags))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(self.write_zeroes_impl(offset, len, flags))
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(self.discard_impl(offset, len))
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        if self.skips_flush() {
            return Box::pin(async { Ok(()) });
        }
        Box::pin(self.io.engine.fsync(Arc::clone(&self.io.file), true))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let r = if self.skips_flush() {
                Ok(())
            } else {
                self.io.engine.fsync(Arc::clone(&self.io.file), true).await
            };
            // The image is no longer ours to protect, even if a reference to the node
            // outlives the close (QEMU closes the descriptor here).
            self.lock_state().release(self.io.file.fd());
            r
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        // Two lseeks: cheap enough to answer inline, as QEMU does.
        let r = self.block_status_impl(offset, len);
        Box::pin(async move { r })
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(self.truncate_impl(size, prealloc))
    }

    fn allocated_size(&self) -> BoxFuture<'_, Option<u64>> {
        let r = self
            .io
            .file
            .file()
            .metadata()
            .map(|md| Some(md.blocks() * 512))
            .map_err(|e| Error::from_errno(errno_of(&e), "Could not stat file"));
        Box::pin(async move { r })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
