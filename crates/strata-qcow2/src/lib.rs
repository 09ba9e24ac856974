//! qcow2 on disk: header and extensions, L1/L2 tables, refcounts, allocation, compression,
//! check/repair and measure.

// Owned by the format-core work: header, metadata, allocation, the `Qcow2` node.
// (modules added here)

// Owned by the check/compress/measure work.
pub mod check;
pub mod compress;
pub mod measure;
