//! The block graph: drivers that are neither qcow2 nor `file` (raw, null-co), opening images
//! with their backing chains, and the generic "mapping first" algorithms that the image tool,
//! the jobs and NBD share — block status across a chain, `map`, the copy engine and `compare`.
//!
//! Every algorithm here is written against [`strata_core::BlockNode`] only: a format driver
//! answers "where does this range live?" and the code in this crate moves the bytes.
//!
//! - [`open`]: `open_image` (probing only the named image, chains opened read-only with
//!   their recorded formats, depth cap, loop detection), `create_image`.
//! - [`status`]: one layer's status with QEMU's generic rules, and status through a chain.
//! - [`map`]: `qemu-img map`, JSON and human text byte for byte.
//! - [`copy`]: the copy engine behind convert, commit (and the jobs): source view
//!   `top..base`, what the target already holds ([`TargetInit`]), zero detection
//!   ([`sparse`]), compression, parallel in-order or out-of-order requests.
//! - [`rebase`]: the data half of a safe rebase.
//! - [`compare`]: `qemu-img compare`.
//!
//! The named-node graph with permissions and filters will grow here too; the drivers live
//! in [`drivers`].

pub mod blockdev;
pub mod compare;
pub mod copy;
pub mod drivers;
pub mod filename;
pub mod graph;
pub mod link;
mod locks;
pub mod map;
pub mod node;
pub mod open;
pub mod perm;
pub mod rebase;
pub mod sparse;
pub mod stats;
pub mod status;

#[cfg(test)]
pub(crate) mod testing;

pub use compare::{CompareFailure, CompareOptions, CompareOutcome, compare_images};
pub use copy::{
    CompressedWrite, CopyFailure, CopyGate, CopyOptions, CopyStats, Qcow2Compressed, TargetInit,
    copy_image,
};
pub use drivers::blkdebug::{
    BlkdebugIoType, BlkdebugNode, BlkdebugOptions, InjectErrorRule, SetStateRule,
};
pub use drivers::cache::CacheFilter;
pub use drivers::copy_on_read::CopyOnReadNode;
pub use drivers::null::{NullNode, NullOptions};
pub use drivers::raw::{RawNode, RawOptions};
pub use drivers::throttle::{ThrottleGroup, ThrottleLimits, ThrottleNode};
pub use filename::node_filename;
pub use graph::{EdgeId, EdgePerms, EdgeRec, Graph, NodeKind, NodeRec};
pub use link::{Link, driver_of};
pub use map::{MapEntry, map_image, render_human, render_json};
pub use node::GraphNode;
pub use open::{
    BackingMode, CacheMode, ImageOptions, OpenedImage, create_image, open_image, open_image_json,
};
pub use perm::{Perm, PermSpec, Use, User};
pub use rebase::{RebaseOptions, rebase_data};
pub use status::{ChainExtent, block_status_above};
