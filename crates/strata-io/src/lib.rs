//! Strata's I/O layer: the `file` protocol node ([`FileNode`]) and the engines that move its
//! bytes, selectable per node with [`Aio`]:
//!
//! - `threads`: `preadv`/`pwritev` on tokio's blocking pool;
//! - `io_uring`: a process-wide io_uring with a completion thread, or the ring of the
//!   [`iothread`] the request is made on.
//!
//! Buffers are owned by the engine while the kernel uses them, so dropping a request's future
//! is always safe. O_DIRECT alignment (bounce buffers, read-modify-write) is handled in one
//! place, the private `align` module.
//!
//! Requests must run inside a tokio runtime (the thread engine uses its blocking pool, and an
//! O_DIRECT read-modify-write runs as its own task so that it completes even if its caller
//! goes away).

mod align;
mod engine;
mod file;
pub mod iothread;
mod lock;

pub use file::{Aio, FileNode, FileOptions, create};
pub use lock::{Locking, PERM_ALL};
