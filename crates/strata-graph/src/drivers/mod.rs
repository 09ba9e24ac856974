//! Drivers that live in the graph crate: the `raw` format, the `null-co` protocol, and the
//! cache-mode filter, and the `throttle`, `copy-on-read` and `blkdebug` filters.

pub mod blkdebug;
pub mod block_copy;
pub mod cache;
pub mod copy_before_write;
pub mod copy_on_read;
pub mod forward;
pub mod log_writes;
pub mod null;
pub mod raw;
pub mod throttle;
