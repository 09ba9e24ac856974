//! The vocabulary every other Strata crate speaks: one error type, owned aligned I/O buffers,
//! the [`BlockNode`] trait that every driver and filter implements, and the block-status
//! answer ("where does this range live?") that map, convert, jobs and NBD all share.

pub mod bitmap;
pub mod buf;
pub mod debug_event;
pub mod error;
pub mod mem;
pub mod node;
pub mod range;

pub use bitmap::{BitmapInfo, BitmapSet, DirtyBitmap};
pub use buf::IoBuf;
pub use debug_event::DebugEvent;
pub use error::{Error, ErrorKind, Result};
pub use node::{
    BlockNode, BlockStatus, BoxFuture, Extent, NodeRef, Prealloc, WriteFlags, ZeroFlags,
};
