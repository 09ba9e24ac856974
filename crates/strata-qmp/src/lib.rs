//! QMP for Strata: everything protocol- and schema-related that `stratad` needs to be a
//! drop-in `qemu-storage-daemon`.
//!
//! - [`json_stream`]: splitting a byte stream into JSON values (QEMU's lexer/streamer/parser);
//! - [`json_out`]: QEMU's JSON writer (compact and pretty);
//! - [`error`]: error classes and the error value;
//! - [`schema`]: the embedded qsd 10.0.2 schema, argument validation with QEMU's texts,
//!   introspection, keyval conversion;
//! - [`keyval`]: command-line option strings (keyval, JSON, QemuOpts for `--chardev`);
//! - [`events`]: the event bus;
//! - [`monitor`]: a QMP monitor on a stream: greeting, negotiation, request validation,
//!   dispatch, built-in commands, events.

pub mod error;
pub mod events;
pub mod fuzzing;
pub mod json_out;
pub mod json_stream;
pub mod keyval;
pub mod monitor;
pub mod schema;
mod unexpected;
pub use unexpected::ghash_iteration_order;

pub use error::{ErrorClass, QmpError};
pub use events::EventBus;
pub use monitor::{
    Dispatcher, MonitorOptions, VersionInfo, serve, serve_tcp_listener, serve_unix_listener,
};
pub use schema::Schema;
