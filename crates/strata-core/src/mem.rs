//! An in-memory protocol node: the storage under unit tests, property tests and fuzz targets.

use std::any::Any;
use std::sync::Mutex;

use crate::node::Prealloc;
use crate::range::check_request;
use crate::{BlockNode, BlockStatus, BoxFuture, Error, ErrorKind, Extent, IoBuf, Result};
use crate::{WriteFlags, ZeroFlags};

/// A growable byte vector behind the [`BlockNode`] interface (driver name `file`, so format
/// drivers treat it like a host file).
#[derive(Debug, Default)]
pub struct MemNode {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    /// Largest size the node may grow to (a stand-in for a full disk).
    limit: Option<u64>,
}

impl MemNode {
    /// An empty, writable node.
    pub fn new() -> Self {
        Self::default()
    }

    /// A writable node holding `data`.
    pub fn with_data(data: Vec<u8>) -> Self {
        MemNode {
            data: Mutex::new(data),
            ..Self::default()
        }
    }

    /// A read-only node holding `data`.
    pub fn read_only(data: Vec<u8>) -> Self {
        MemNode {
            data: Mutex::new(data),
            read_only: true,
            limit: None,
        }
    }

    /// Refuse to grow past `limit` bytes with ENOSPC.
    #[must_use]
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// A copy of the current content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn write_bytes(&self, offset: u64, bytes: Option<&[u8]>, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "node is read-only"));
        }
        let end = crate::range::end_of(offset, len, "write")?;
        if self.limit.is_some_and(|l| end > l) {
            return Err(Error::from_errno(libc::ENOSPC, "Could not write"));
        }
        let mut data = self.data.lock().unwrap();
        let end =
            usize::try_from(end).map_err(|_| Error::invalid("write past addressable memory"))?;
        if data.len() < end {
            data.resize(end, 0);
        }
        let range = offset as usize..end;
        match bytes {
            Some(b) => data[range].copy_from_slice(b),
            None => data[range].fill(0),
        }
        Ok(())
    }
}

impl BlockNode for MemNode {
    fn driver(&self) -> &'static str {
        "file"
    }

    fn filename(&self) -> String {
        "memory".into()
    }

    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            // Like a host file, reads past EOF return zeroes rather than fail.
            let data = self.data.lock().unwrap();
            let len = data.len() as u64;
            buf.fill(0);
            if offset < len {
                let n = (len - offset).min(buf.len() as u64) as usize;
                let o = offset as usize;
                buf[..n].copy_from_slice(&data[o..o + n]);
            }
            drop(data);
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            self.write_bytes(offset, Some(&buf), buf.len() as u64)?;
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.write_bytes(offset, None, len) })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let size = self.size();
            let end = offset.saturating_add(len).min(size);
            if offset < end {
                self.write_bytes(offset, None, end - offset)
            } else {
                Ok(())
            }
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(async move {
            check_request(offset, len, self.size())?;
            let status = BlockStatus {
                allocated: true,
                data: true,
                host_offset: Some(offset),
                ..Default::default()
            };
            Ok(Extent {
                len,
                status,
                host_node: None,
            })
        })
    }

    fn truncate(&self, size: u64, _prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.limit.is_some_and(|l| size > l) {
                return Err(Error::from_errno(libc::ENOSPC, "Could not resize"));
            }
            let size = usize::try_from(size).map_err(|_| Error::invalid("size too large"))?;
            self.data.lock().unwrap().resize(size, 0);
            Ok(())
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grows_on_write_and_reads_zero_past_eof() {
        let m = MemNode::new();
        m.write(4, IoBuf::from_slice(b"abcd"), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(m.size(), 8);
        let b = m.read(2, IoBuf::zeroed(10)).await.unwrap();
        assert_eq!(&b[..], b"\0\0abcd\0\0\0\0");
    }

    #[tokio::test]
    async fn limit_gives_enospc() {
        let m = MemNode::new().with_limit(16);
        let e = m
            .write(10, IoBuf::zeroed(10), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace);
    }
}
