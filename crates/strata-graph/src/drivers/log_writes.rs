//! The `log-writes` filter (in the spirit of Linux's dm-log-writes): passes every request on
//! to its child and records, in completion order, each write, write-zeroes, discard,
//! truncate and flush that succeeded. A replayer (`strata-crashtest`) rebuilds the child's
//! content as a power loss could have left it: everything before a completed flush is
//! durable, anything after it may be present, absent or reordered.
//!
//! A Rust-level driver only (no QMP schema): tests wrap a node in it in-process.

use std::sync::Arc;

use parking_lot::Mutex;
use strata_core::{BlockNode, BoxFuture, IoBuf, NodeRef, Prealloc, WriteFlags, ZeroFlags};

use crate::forward_to_child;

/// One request the child completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    /// Data written at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// `len` bytes at `offset` made to read as zeroes.
    Zeroes { offset: u64, len: u64 },
    /// `len` bytes at `offset` discarded (after a crash: old content or zeroes).
    Discard { offset: u64, len: u64 },
    /// The child resized to `size`.
    Truncate { size: u64 },
    /// A flush completed. `covers` is the number of log entries recorded when it was
    /// issued: those entries are durable; entries recorded while it ran are not.
    Flush { covers: usize },
}

/// The shared, growing log of one [`LogWritesFilter`].
pub type WriteLog = Arc<Mutex<Vec<LogEntry>>>;

/// A pass-through node that appends every completed modifying request to a [`WriteLog`].
#[derive(Debug)]
pub struct LogWritesFilter {
    file: NodeRef,
    log: WriteLog,
}

impl LogWritesFilter {
    /// Wrap `file`; the log starts empty.
    pub fn new(file: NodeRef) -> LogWritesFilter {
        LogWritesFilter {
            file,
            log: Arc::default(),
        }
    }

    /// The log (shared: it keeps growing while the node is in use).
    pub fn log(&self) -> WriteLog {
        self.log.clone()
    }

    fn record(&self, entry: LogEntry) {
        self.log.lock().push(entry);
    }
}

impl BlockNode for LogWritesFilter {
    forward_to_child!(file =>
        filename, size, read_only, request_alignment, read, block_status, backing, file,
        debug_event, allocated_size, as_any,
    );

    fn driver(&self) -> &'static str {
        "log-writes"
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let buf = self.file.write(offset, buf, flags).await?;
            self.record(LogEntry::Write {
                offset,
                data: buf.to_vec(),
            });
            if flags.fua {
                let covers = self.log.lock().len();
                self.record(LogEntry::Flush { covers });
            }
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.file.write_zeroes(offset, len, flags).await?;
            self.record(LogEntry::Zeroes { offset, len });
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.file.discard(offset, len).await?;
            self.record(LogEntry::Discard { offset, len });
            Ok(())
        })
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.file.truncate(size, prealloc).await?;
            self.record(LogEntry::Truncate { size });
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let covers = self.log.lock().len();
            self.file.flush().await?;
            self.record(LogEntry::Flush { covers });
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let covers = self.log.lock().len();
            self.file.close().await?;
            self.record(LogEntry::Flush { covers });
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::mem::MemNode;

    #[tokio::test]
    async fn records_completed_requests_in_order() {
        let f = LogWritesFilter::new(Arc::new(MemNode::with_data(vec![0; 4096])));
        f.write(512, IoBuf::from_slice(&[7; 512]), WriteFlags::default())
            .await
            .unwrap();
        f.flush().await.unwrap();
        f.write_zeroes(0, 512, ZeroFlags::default()).await.unwrap();
        let log = f.log().lock().clone();
        assert_eq!(
            log,
            [
                LogEntry::Write {
                    offset: 512,
                    data: vec![7; 512]
                },
                LogEntry::Flush { covers: 1 },
                LogEntry::Zeroes {
                    offset: 0,
                    len: 512
                },
            ]
        );
        let back = f.read(512, IoBuf::zeroed(512)).await.unwrap();
        assert_eq!(&back[..], &[7; 512]);
    }
}
