//! The `null-co` protocol driver: a sink of a given size whose reads return nothing useful,
//! or zeroes with `read-zeroes` (QEMU's `block/null.c`).

use std::any::Any;

use strata_core::range::check_request;
use strata_core::{
    BlockNode, BlockStatus, BoxFuture, Error, Extent, IoBuf, Prealloc, WriteFlags, ZeroFlags,
};

/// Options of `null-co`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullOptions {
    /// Size in bytes (QEMU's default: 1 GiB).
    pub size: u64,
    /// Reads fill the buffer with zeroes and block status says zero; otherwise reads leave
    /// the buffer as it is (QEMU leaves it uninitialised) and status says nothing.
    pub read_zeroes: bool,
}

impl Default for NullOptions {
    fn default() -> Self {
        NullOptions {
            size: 1 << 30,
            read_zeroes: false,
        }
    }
}

/// A `null-co` node.
#[derive(Debug)]
pub struct NullNode {
    opts: NullOptions,
}

impl NullNode {
    /// A node with `opts`.
    pub fn new(opts: NullOptions) -> NullNode {
        NullNode { opts }
    }
}

impl BlockNode for NullNode {
    fn driver(&self) -> &'static str {
        "null-co"
    }

    fn filename(&self) -> String {
        "null-co://".into()
    }

    fn size(&self) -> u64 {
        self.opts.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            check_request(offset, buf.len() as u64, self.opts.size)?;
            if self.opts.read_zeroes {
                buf.fill(0);
            }
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            check_request(offset, buf.len() as u64, self.opts.size)?;
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move { check_request(offset, len, self.opts.size) })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move { check_request(offset, len, self.opts.size) })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Offset-valid always; zero (and so allocated) only with `read-zeroes`, as in QEMU.
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(async move {
            check_request(offset, len, self.opts.size)?;
            let z = self.opts.read_zeroes;
            Ok(Extent {
                len,
                status: BlockStatus {
                    allocated: z,
                    zero: z,
                    host_offset: Some(offset),
                    ..Default::default()
                },
                host_node: None,
            })
        })
    }

    fn truncate(&self, _size: u64, _prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async {
            Err(Error::unsupported(
                "Image format driver does not support resize",
            ))
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
    async fn read_zeroes_reads_and_reports_zero() {
        let n = NullNode::new(NullOptions {
            size: 1 << 20,
            read_zeroes: true,
        });
        let mut b = IoBuf::zeroed(512);
        b.fill(7);
        let b = n.read(0, b).await.unwrap();
        assert!(b.is_zero());
        let e = n.block_status(4096, 8192).await.unwrap();
        assert!(e.status.zero && e.status.allocated && !e.status.data);
        assert_eq!(e.status.host_offset, Some(4096));
        assert!(n.read(1 << 20, IoBuf::zeroed(1)).await.is_err());
    }

    #[tokio::test]
    async fn default_is_one_gib_and_unallocated() {
        let n = NullNode::new(NullOptions::default());
        assert_eq!(n.size(), 1 << 30);
        let e = n.block_status(0, 1 << 30).await.unwrap();
        assert!(!e.status.zero && !e.status.allocated && !e.status.data);
        let mut b = IoBuf::zeroed(4);
        b.fill(7);
        assert_eq!(&n.read(0, b).await.unwrap()[..], &[7; 4]);
        n.write(0, IoBuf::zeroed(512), WriteFlags::default())
            .await
            .unwrap();
    }
}
