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
//!   [`Qcow2::write_compressed`], [`Qcow2::set_backing`], [`Qcow2::format_info`],
//!   [`Qcow2::make_empty`], internal snapshots ([`Qcow2::snapshot_create`],
//!   [`Qcow2::snapshot_apply`], [`Qcow2::snapshot_delete`]) and [`Qcow2::amend`];
//! - [`read_header`]: the header of an image before opening it (backing file, data file).
//!
//! Internals: `meta` (metadata state under one async lock: L1, cached L2 tables and refcount
//! blocks, allocation, deferred frees, write-back order), `cache` (LRU table cache), `io`
//! (request paths), `resize`, `make_empty`, `snapshot_ops` (snapshot create/apply/delete),
//! `amend`, [`snapshot`] (snapshot table and bitmap directory, read-only),
//! [`bitmap`] (persistent dirty bitmaps: loaded on read-write opens, tracked on every write,
//! stored on close; [`Qcow2::bitmaps`], [`Qcow2::bitmap_add`] and friends).

// Owned by the format-core work: header, metadata, allocation, the `Qcow2` node.
mod amend;
pub mod bitmap;
mod cache;
mod chain_cache;
pub mod create;
pub mod entry;
pub mod header;
pub mod identity;
mod io;
mod make_empty;
mod meta;
mod metadata_prealloc;
pub mod node;
pub mod refcount;
mod resize;
pub mod snapshot;
mod snapshot_ops;

pub use amend::AmendOptions;
pub use bitmap::{BitmapStatus, DirtyBitmap};
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
