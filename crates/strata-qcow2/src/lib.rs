//! qcow2 on disk: header and extensions, L1/L2 tables, refcounts, allocation, compression,
//! check/repair and measure.
//!
//! The format core:
//! - [`header`]: the header and its extensions ([`Header::parse`] / [`Header::serialize`]);
//! - [`entry`]: L1/L2 entry decoding (standard and extended L2, compressed descriptors);
//! - [`refcount`]: refcount block entries of every width;
//! - [`create()`]: `qemu-img create -f qcow2`, byte for byte;
//! - [`Qcow2`]: an open image as a [`strata_core::BlockNode`] (read, write with allocation
//!   and copy-on-write, zero writes, discard, flush, block status, resize), plus
//!   [`Qcow2::write_compressed`], [`Qcow2::set_backing`] and [`Qcow2::format_info`];
//! - [`read_header`]: the header of an image before opening it (backing file, data file).
//!
//! Internals: `meta` (metadata state under one async lock: L1, cached L2 tables and refcount
//! blocks, allocation, deferred frees, write-back order), `cache` (LRU table cache), `io`
//! (request paths), `resize`, [`snapshot`] (snapshot table and bitmap directory, read-only).

// Owned by the format-core work: header, metadata, allocation, the `Qcow2` node.
mod cache;
pub mod create;
pub mod entry;
pub mod header;
mod io;
mod meta;
pub mod node;
pub mod refcount;
mod resize;
pub mod snapshot;

pub use create::{CreateOptions, create};
pub use header::{CompressionType, Header};
pub use node::{FormatInfo, OpenOptions, Qcow2, read_header};
pub use snapshot::{BitmapInfo, SnapshotInfo};
pub use strata_core::Prealloc;

// Owned by the check/compress/measure work.
pub mod check;
pub mod compress;
#[doc(hidden)]
pub mod fuzzing;
pub mod measure;
