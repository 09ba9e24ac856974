//! The io_uring engine (`aio=io_uring`).
//!
//! One ring per process, shared by every node that asks for it. Submitters push entries under
//! a mutex; one of them at a time tells the kernel (the others leave their entries to it, so
//! they never queue on the ring's own lock); a reaper thread sits in
//! `io_uring_enter(GETEVENTS)` without submitting and handles completions. Each
//! request lives in an in-flight table that owns its buffers, its iovec array and the file
//! until its completion arrives, so a caller that drops its future never frees memory the
//! kernel is using: the result is then simply dropped by the reaper. Short transfers and
//! `EAGAIN`/`EINTR` are resubmitted by the reaper. The number of requests in flight is bounded
//! by the ring size (a semaphore permit travels with each request), so the submission queue
//! can never be full and the completion queue never overflows.
//!
//! An I/O thread ([`crate::iothread`]) has a ring of its own instead, without a completion
//! thread: the kernel signals an eventfd that the thread's runtime polls with its other
//! sockets, and a task there drains the completions. A request made on that thread is
//! submitted, completed and resumed on it, with no thread handing it over (QEMU's
//! iothread-with-io_uring model); it goes to its own ring whatever node it is for.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{IoUring, opcode, squeue, types};
use strata_core::{BoxFuture, Error, ErrorKind, IoBuf, Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::{Engine, HostFile, OpKind, errno_of, iovecs, op_error, total_len};
use crate::file::Aio;

/// Submission queue entries (the completion queue gets twice as many).
const RING_ENTRIES: u32 = 256;

/// `IORING_ENTER_GETEVENTS` (the io-uring crate keeps its flag type private).
const ENTER_GETEVENTS: u32 = 1;

/// The process-wide ring, or why it could not be set up.
static GLOBAL: OnceLock<std::result::Result<Arc<UringEngine>, String>> = OnceLock::new();

/// The shared io_uring engine, started on first use.
pub(crate) fn global() -> Result<Arc<UringEngine>> {
    GLOBAL
        .get_or_init(|| UringEngine::setup().map(Arc::new).and_then(spawn_reaper))
        .clone()
        .map_err(|m| Error::unsupported(format!("io_uring is not available: {m}")))
}

thread_local! {
    /// This thread's own ring (an I/O thread's), if it has one.
    static LOCAL: OnceCell<Arc<UringEngine>> = const { OnceCell::new() };
}

/// Gives the calling thread a ring of its own, drained by a task on its runtime (which must
/// be a current-thread runtime living as long as the thread). Requests made on this thread
/// then use it. Errors leave the thread on the shared ring.
pub(crate) fn init_local() -> std::result::Result<(), String> {
    let engine = Arc::new(UringEngine::setup()?);
    // SAFETY: plain eventfd(2); the result is checked before it is owned.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor nobody else owns.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    engine
        .ring
        .submitter()
        .register_eventfd(efd.as_raw_fd())
        .map_err(|e| format!("cannot register the eventfd: {e}"))?;
    // SAFETY: the AsyncFd owns `efd`, an open eventfd, for its whole life.
    let efd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.to_string())?;
    tokio::spawn(drive_local(Arc::clone(&engine), efd));
    LOCAL.with(|l| {
        let _ = l.set(engine);
    });
    Ok(())
}

/// The completion side of a thread's own ring: wait for the eventfd, then drain.
async fn drive_local(engine: Arc<UringEngine>, efd: tokio::io::unix::AsyncFd<OwnedFd>) {
    loop {
        let Ok(mut ready) = efd.readable().await else {
            return;
        };
        // Clear readiness, then the counter, then drain: a completion after the drain
        // signals the eventfd again and wakes this loop.
        ready.clear_ready();
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into `counter` from our non-blocking eventfd.
        let _ = unsafe {
            libc::read(
                efd.get_ref().as_raw_fd(),
                (&raw mut counter).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        engine.drain();
    }
}

fn spawn_reaper(engine: Arc<UringEngine>) -> std::result::Result<Arc<UringEngine>, String> {
    let e = Arc::clone(&engine);
    std::thread::Builder::new()
        .name("strata-uring".into())
        .spawn(move || e.reap())
        .map_err(|e| format!("cannot start the completion thread: {e}"))?;
    Ok(engine)
}

/// iovec arrays hold raw pointers; they point into buffers owned by the same request.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers refer to the request's own `IoBuf`s, which are `Send`; the array moves
// with them and is only read by the kernel.
unsafe impl Send for IoVecs {}

/// The outcome delivered to the waiting caller.
type Outcome = Result<(Vec<IoBuf>, usize)>;

/// A request in flight.
struct Op {
    kind: OpKind,
    datasync: bool,
    file: Arc<HostFile>,
    offset: u64,
    bufs: Vec<IoBuf>,
    total: usize,
    done: usize,
    /// The file's resize generation when the request was made (see `HostFile::after_write`).
    generation: u64,
    /// The iovecs of the current submission (must outlive it).
    iov: IoVecs,
    tx: oneshot::Sender<Outcome>,
    _permit: OwnedSemaphorePermit,
}

impl Op {
    /// The submission entry for what is left of this request.
    fn prepare(&mut self, key: u64) -> squeue::Entry {
        let fd = types::Fd(self.file.fd());
        let pos = self.offset + self.done as u64;
        let entry = match self.kind {
            OpKind::Sync => {
                let flags = if self.datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(fd).flags(flags).build()
            }
            OpKind::Read | OpKind::Write => {
                self.iov = IoVecs(iovecs(&mut self.bufs, self.done));
                let iov = &self.iov.0;
                let single = iov.len() == 1 && iov[0].iov_len <= u32::MAX as usize;
                match (self.kind, single) {
                    (OpKind::Read, true) => {
                        opcode::Read::new(fd, iov[0].iov_base.cast(), iov[0].iov_len as u32)
                            .offset(pos)
                            .build()
                    }
                    (OpKind::Read, false) => opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                        .offset(pos)
                        .build(),
                    (_, true) => opcode::Write::new(
                        fd,
                        iov[0].iov_base.cast_const().cast(),
                        iov[0].iov_len as u32,
                    )
                    .offset(pos)
                    .build(),
                    (_, false) => opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                        .offset(pos)
                        .build(),
                }
            }
        };
        entry.user_data(key)
    }

    /// Deliver the result; the buffers go back to the caller, or are freed here if the caller
    /// is gone (the kernel is done with them: their completion has arrived).
    fn finish(self, result: Result<usize>) {
        if self.kind == OpKind::Write {
            let end = self.offset + self.total as u64;
            self.file.after_write(end, self.generation, result.is_ok());
        }
        let outcome = result.map(|n| (self.bufs, n));
        let _ = self.tx.send(outcome);
    }
}

/// In-flight requests by `user_data`.
#[derive(Default)]
struct Table {
    ops: HashMap<u64, Op>,
    next: u64,
}

/// `aio=io_uring`.
pub(crate) struct UringEngine {
    ring: IoUring,
    /// Serialises every access to the submission queue.
    sq_lock: Mutex<()>,
    /// Entries pushed but maybe not yet submitted; whoever raises it from zero submits until
    /// it falls back to zero.
    unsubmitted: AtomicUsize,
    /// A submission failed and left entries queued: the reaper retries after completions.
    stalled: AtomicBool,
    table: Mutex<Table>,
    permits: Arc<Semaphore>,
}

impl fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringEngine")
            .field("entries", &RING_ENTRIES)
            .field("available", &self.permits.available_permits())
            .finish()
    }
}

impl UringEngine {
    fn setup() -> std::result::Result<UringEngine, String> {
        let ring = IoUring::new(RING_ENTRIES).map_err(|e| e.to_string())?;
        let mut probe = io_uring::Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("cannot probe opcodes: {e}"))?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Readv::CODE, "READV"),
            (opcode::Writev::CODE, "WRITEV"),
            (opcode::Fsync::CODE, "FSYNC"),
        ] {
            if !probe.is_supported(code) {
                return Err(format!("the kernel lacks IORING_OP_{name}"));
            }
        }
        Ok(UringEngine {
            ring,
            sq_lock: Mutex::new(()),
            unsubmitted: AtomicUsize::new(0),
            stalled: AtomicBool::new(false),
            table: Mutex::new(Table::default()),
            permits: Arc::new(Semaphore::new(RING_ENTRIES as usize)),
        })
    }

    /// Run one request to completion.
    async fn run(
        self: Arc<Self>,
        kind: OpKind,
        datasync: bool,
        file: Arc<HostFile>,
        offset: u64,
        bufs: Vec<IoBuf>,
    ) -> Outcome {
        let total = total_len(&bufs);
        if total == 0 && kind != OpKind::Sync {
            return Ok((bufs, 0));
        }
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::new(ErrorKind::Io(libc::EIO), "io_uring engine is closed"))?;
        let (tx, rx) = oneshot::channel();
        let op = Op {
            kind,
            datasync,
            generation: file.write_gen(),
            file,
            offset,
            bufs,
            total,
            done: 0,
            iov: IoVecs(Vec::new()),
            tx,
            _permit: permit,
        };
        // From here on the table owns the request; dropping this future only drops `rx`.
        self.begin(op);
        rx.await.map_err(|_| {
            Error::new(
                ErrorKind::Io(libc::EIO),
                "io_uring request was lost without a completion",
            )
        })?
    }

    fn begin(&self, op: Op) {
        let sqe = {
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let key = table.next;
            table.next = table.next.wrapping_add(1);
            let op = table.ops.entry(key).insert_entry(op).into_mut();
            // The entry points at heap memory (buffers, iovec array) that stays put when the
            // table rehashes and moves `Op` itself.
            op.prepare(key)
        };
        self.push(&sqe);
        self.kick();
    }

    /// Make sure the entry just pushed gets submitted. Only one thread at a time enters the
    /// kernel to submit: concurrent submitters would spin on the ring's lock (that cost 15%
    /// of the CPU at queue depth 32). An entry is pushed before the counter is raised, so the
    /// thread that submits after reading the counter submits it.
    fn kick(&self) {
        if self.unsubmitted.fetch_add(1, Ordering::AcqRel) != 0 {
            return; // the thread submitting now will see it
        }
        loop {
            let seen = self.unsubmitted.load(Ordering::Acquire);
            self.submit();
            if self.unsubmitted.fetch_sub(seen, Ordering::AcqRel) == seen {
                return;
            }
        }
    }

    /// Queue `sqe` (the request it belongs to must be in the table).
    fn push(&self, sqe: &squeue::Entry) {
        let _g = self.sq_lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // SAFETY: `sq_lock` makes this the only live handle on the submission queue.
            let mut sq = unsafe { self.ring.submission_shared() };
            // SAFETY: the memory the entry points to is owned by its `Op` in the table, which
            // is removed only after the entry's completion has been reaped.
            if unsafe { sq.push(sqe) }.is_ok() {
                return;
            }
            drop(sq);
            // Cannot happen while in-flight requests are bounded by the ring size; make room
            // anyway rather than lose the request.
            let _ = self.ring.submitter().submit();
            std::thread::yield_now();
        }
    }

    /// Tell the kernel about queued entries. Errors leave them queued; the reaper submits
    /// whatever is queued each time it wakes.
    fn submit(&self) {
        for _ in 0..100 {
            match self.ring.submitter().submit() {
                Ok(_) => return,
                Err(e) => match errno_of(&e) {
                    libc::EINTR => continue,
                    // Short of kernel memory: try again shortly.
                    libc::EAGAIN => std::thread::sleep(std::time::Duration::from_micros(50)),
                    // EBUSY: completions are pending, so the reaper is about to wake; it
                    // submits what is left. Anything else: the reaper retries too.
                    _ => {
                        self.stalled.store(true, Ordering::Release);
                        return;
                    }
                },
            }
        }
    }

    /// The completion thread. It only waits: submitting is left to the submitters.
    fn reap(&self) {
        loop {
            // SAFETY: no submission, no argument: a plain wait for one completion.
            let waited = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 1, ENTER_GETEVENTS, None)
            };
            if let Err(e) = waited {
                match errno_of(&e) {
                    libc::EINTR | libc::EBUSY | libc::EAGAIN => {}
                    // Should not happen; do not spin.
                    _ => std::thread::sleep(std::time::Duration::from_millis(1)),
                }
            }
            self.drain();
        }
    }

    /// Handles every completion queued. Only one thread drains a ring: its reaper thread,
    /// or for an I/O thread's own ring that thread.
    fn drain(&self) {
        let mut done: Vec<(u64, i32)> = Vec::new();
        {
            // SAFETY: only the draining thread touches the completion queue.
            let cq = unsafe { self.ring.completion_shared() };
            done.extend(cq.map(|c| (c.user_data(), c.result())));
        }
        for (key, res) in done {
            self.complete(key, res);
        }
        if self.stalled.swap(false, Ordering::AcqRel) {
            self.kick();
        }
    }

    fn complete(&self, key: u64, res: i32) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(op) = table.ops.get_mut(&key) else {
            return;
        };
        // None: resubmit what is left.
        let outcome: Option<Result<usize>> = if res == -libc::EAGAIN || res == -libc::EINTR {
            None
        } else if res < 0 {
            Some(Err(op_error(op.kind, op.offset + op.done as u64, -res)))
        } else {
            match op.kind {
                OpKind::Sync => Some(Ok(0)),
                OpKind::Read if res == 0 => Some(Ok(op.done)), // end of file
                OpKind::Write if res == 0 => Some(Err(op_error(
                    OpKind::Write,
                    op.offset + op.done as u64,
                    libc::ENOSPC,
                ))),
                _ => {
                    op.done += res as usize;
                    (op.done >= op.total).then_some(Ok(op.done))
                }
            }
        };
        match outcome {
            None => {
                let sqe = op.prepare(key);
                drop(table);
                self.push(&sqe);
                self.kick();
            }
            Some(r) => {
                let op = table.ops.remove(&key).expect("op present");
                drop(table);
                op.finish(r);
            }
        }
    }
}

/// The ring a request made now should use: this thread's own, else `shared`.
fn ring_for(shared: &Arc<UringEngine>) -> Arc<UringEngine> {
    LOCAL
        .with(|l| l.get().cloned())
        .unwrap_or_else(|| Arc::clone(shared))
}

impl Engine for Arc<UringEngine> {
    fn aio(&self) -> Aio {
        Aio::IoUring
    }

    fn readv(
        &self,
        file: Arc<HostFile>,
        offset: u64,
        bufs: Vec<IoBuf>,
    ) -> BoxFuture<'static, (Vec<IoBuf>, usize)> {
        Box::pin(ring_for(self).run(OpKind::Read, false, file, offset, bufs))
    }

    fn writev(
        &self,
        file: Arc<HostFile>,
        offset: u64,
        bufs: Vec<IoBuf>,
    ) -> BoxFuture<'static, Vec<IoBuf>> {
        let fut = ring_for(self).run(OpKind::Write, false, file, offset, bufs);
        Box::pin(async move { fut.await.map(|(b, _)| b) })
    }

    fn fsync(&self, file: Arc<HostFile>, datasync: bool) -> BoxFuture<'static, ()> {
        let fut = ring_for(self).run(OpKind::Sync, datasync, file, 0, Vec::new());
        Box::pin(async move { fut.await.map(|_| ()) })
    }
}
