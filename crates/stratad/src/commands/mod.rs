//! The QMP commands stratad implements, as one table: name → handler. Handlers take the
//! daemon and the arguments (already checked against the schema, so types are right) and
//! return QEMU's reply or error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value};
use strata_qmp::{Dispatcher, ErrorClass, QmpError};

use crate::daemon::Daemon;

pub mod bitmap;
pub mod block;
pub mod chardev;
pub mod drive;
pub mod jobs;
pub mod nodes;
pub mod objects;
pub mod qom;
pub mod query;
pub mod snapshot_internal;
pub mod transaction;

/// A command's result.
pub type Reply = Result<Value, QmpError>;

/// Arguments of a command.
pub type Args = Map<String, Value>;

type Handler = fn(Arc<Daemon>, Args) -> Pin<Box<dyn Future<Output = Reply> + Send>>;

macro_rules! table {
    ($($name:literal => $f:path,)*) => {
        /// Every command with its handler, in `query-commands` order.
        const COMMANDS: &[(&str, Handler)] = &[
            $(($name, |d, a| Box::pin($f(d, a))),)*
        ];
    };
}

table! {
    "blockdev-add" => block::blockdev_add,
    "blockdev-del" => block::blockdev_del,
    "blockdev-reopen" => block::blockdev_reopen,
    "blockdev-create" => block::blockdev_create,
    "x-blockdev-amend" => block::blockdev_amend,
    "block_resize" => block::block_resize,
    "blockdev-snapshot" => block::blockdev_snapshot,
    "blockdev-snapshot-sync" => block::blockdev_snapshot_sync,
    "change-backing-file" => block::change_backing_file,
    "block-dirty-bitmap-add" => bitmap::add,
    "block-dirty-bitmap-remove" => bitmap::remove,
    "block-dirty-bitmap-clear" => bitmap::clear,
    "block-dirty-bitmap-enable" => bitmap::enable,
    "block-dirty-bitmap-disable" => bitmap::disable,
    "block-dirty-bitmap-merge" => bitmap::merge,
    "x-debug-block-dirty-bitmap-sha256" => bitmap::sha256,
    "block-stream" => jobs::block_stream,
    "block-commit" => jobs::block_commit,
    "blockdev-mirror" => jobs::blockdev_mirror,
    "blockdev-backup" => jobs::blockdev_backup,
    "job-pause" => jobs::job_pause,
    "job-resume" => jobs::job_resume,
    "job-cancel" => jobs::job_cancel,
    "job-complete" => jobs::job_complete,
    "job-finalize" => jobs::job_finalize,
    "job-dismiss" => jobs::job_dismiss,
    "block-job-set-speed" => jobs::block_job_set_speed,
    "block-job-cancel" => jobs::block_job_cancel,
    "block-job-pause" => jobs::block_job_pause,
    "block-job-resume" => jobs::block_job_resume,
    "block-job-complete" => jobs::block_job_complete,
    "block-job-finalize" => jobs::block_job_finalize,
    "block-job-dismiss" => jobs::block_job_dismiss,
    "block-job-change" => jobs::block_job_change,
    "query-jobs" => jobs::query_jobs,
    "query-block-jobs" => jobs::query_block_jobs,
    "transaction" => transaction::transaction,
    "query-named-block-nodes" => query::query_named_block_nodes,
    "x-debug-query-block-graph" => query::x_debug_query_block_graph,
    "query-blockstats" => query::query_blockstats,
    "query-block" => query::query_block,
    "nbd-server-start" => crate::exports::nbd_server_start,
    "nbd-server-stop" => crate::exports::nbd_server_stop,
    "nbd-server-add" => crate::exports::nbd_server_add,
    "nbd-server-remove" => crate::exports::nbd_server_remove,
    "block-export-add" => crate::exports::block_export_add,
    "block-export-del" => crate::exports::block_export_del,
    "query-block-exports" => crate::exports::query_block_exports,
    "object-add" => objects::object_add,
    "object-del" => objects::object_del,
    "qom-list" => qom::qom_list,
    "qom-get" => qom::qom_get,
    "qom-set" => qom::qom_set,
    "qom-list-types" => qom::qom_list_types,
    "qom-list-properties" => qom::qom_list_properties,
    "chardev-add" => chardev::chardev_add,
    "chardev-change" => chardev::chardev_change,
    "chardev-remove" => chardev::chardev_remove,
    "chardev-send-break" => chardev::chardev_send_break,
    "query-chardev" => chardev::query_chardev,
    "query-chardev-backends" => chardev::query_chardev_backends,
    "ringbuf-write" => chardev::ringbuf_write,
    "ringbuf-read" => chardev::ringbuf_read,
    "blockdev-snapshot-internal-sync" => snapshot_internal::blockdev_snapshot_internal_sync,
    "blockdev-snapshot-delete-internal-sync" => snapshot_internal::blockdev_snapshot_delete_internal_sync,
    "drive-backup" => drive::drive_backup,
    "drive-mirror" => drive::drive_mirror,
    "block-set-write-threshold" => nodes::block_set_write_threshold,
    "blockdev-set-active" => nodes::blockdev_set_active,
    "x-blockdev-change" => nodes::x_blockdev_change,
    "x-blockdev-set-iothread" => nodes::x_blockdev_set_iothread,
    "quit" => quit,
}

async fn quit(d: Arc<Daemon>, _a: Args) -> Reply {
    d.shutdown.cancel();
    Ok(ok())
}

/// `{}`.
pub fn ok() -> Value {
    Value::Object(Map::new())
}

/// A GenericError.
pub fn generic(desc: impl Into<String>) -> QmpError {
    QmpError::generic(desc)
}

/// A job-layer error as a QMP error.
pub fn from_verb(e: strata_job::VerbError) -> QmpError {
    let class = match e.class {
        "DeviceNotActive" => ErrorClass::DeviceNotActive,
        "DeviceNotFound" => ErrorClass::DeviceNotFound,
        "CommandNotFound" => ErrorClass::CommandNotFound,
        _ => ErrorClass::GenericError,
    };
    QmpError::new(class, e.desc)
}

/// A required string argument (the schema guarantees presence and type).
pub fn arg_str<'a>(a: &'a Args, key: &str) -> &'a str {
    a.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// An optional string argument.
pub fn opt_str<'a>(a: &'a Args, key: &str) -> Option<&'a str> {
    a.get(key).and_then(Value::as_str)
}

/// An I/O error as `strerror` words ("No such file or directory"), as QEMU prints them.
pub fn errno_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// An optional bool argument.
pub fn opt_bool(a: &Args, key: &str) -> Option<bool> {
    a.get(key).and_then(Value::as_bool)
}

/// QEMU's error hints (`Is another process using the image [...]?`) are lines after the
/// message; the command line prints them, QMP replies carry only the message.
fn without_hint(mut e: QmpError) -> QmpError {
    if let Some(i) = e.desc.find('\n') {
        e.desc.truncate(i);
    }
    e
}

/// The QMP dispatcher for a daemon.
#[derive(Debug, Clone)]
pub struct DaemonDispatcher(pub Arc<Daemon>);

impl Dispatcher for DaemonDispatcher {
    fn dispatch(&self, command: String, args: Args) -> Pin<Box<dyn Future<Output = Reply> + Send>> {
        let d = self.0.clone();
        Box::pin(async move {
            match COMMANDS.iter().find(|(n, _)| *n == command) {
                Some((_, h)) => h(d, args).await.map_err(without_hint),
                None => Err(QmpError::command_not_found(&command)),
            }
        })
    }

    fn supported_commands(&self) -> Vec<&'static str> {
        COMMANDS.iter().map(|(n, _)| *n).collect()
    }
}
