//! Drivers that live in the graph crate: the `raw` format, the `null-co` protocol, and the
//! cache-mode filter.

pub mod cache;
pub mod null;
pub mod raw;
