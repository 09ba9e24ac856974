//! The flush side of qemu-img's cache modes, as a thin filter over a protocol node:
//! `writethrough`/`directsync` make every write durable before it completes (FUA), and
//! `unsafe` ignores flushes. (`O_DIRECT` is the file node's own `direct` option.)

use std::any::Any;

use strata_core::{BlockNode, BoxFuture, Extent, IoBuf, NodeRef, Prealloc, WriteFlags, ZeroFlags};

/// A pass-through node applying a flush policy to `inner`.
#[derive(Debug)]
pub struct CacheFilter {
    inner: NodeRef,
    writethrough: bool,
    no_flush: bool,
}

impl CacheFilter {
    /// Wrap `inner`: with `writethrough` every write carries FUA; with `no_flush` flushes
    /// succeed without doing anything.
    pub fn new(inner: NodeRef, writethrough: bool, no_flush: bool) -> CacheFilter {
        CacheFilter {
            inner,
            writethrough,
            no_flush,
        }
    }
}

impl BlockNode for CacheFilter {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }

    fn filename(&self) -> String {
        self.inner.filename()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn request_alignment(&self) -> u64 {
        self.inner.request_alignment()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        let flags = WriteFlags {
            fua: flags.fua || self.writethrough,
        };
        self.inner.write(offset, buf, flags)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        if !self.writethrough {
            return self.inner.write_zeroes(offset, len, flags);
        }
        Box::pin(async move {
            self.inner.write_zeroes(offset, len, flags).await?;
            self.inner.flush().await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        self.inner.discard(offset, len)
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        if self.no_flush {
            return Box::pin(async { Ok(()) });
        }
        self.inner.flush()
    }

    /// The inner node's status; the filter is transparent to block status.
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        self.inner.block_status(offset, len)
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        self.inner.truncate(size, prealloc)
    }

    /// The wrapped node (so code looking for the file node finds it).
    fn file(&self) -> Option<NodeRef> {
        Some(self.inner.clone())
    }

    fn allocated_size(&self) -> BoxFuture<'_, Option<u64>> {
        self.inner.allocated_size()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        if self.no_flush {
            return Box::pin(async { Ok(()) });
        }
        self.inner.close()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records the calls that reach it.
    #[derive(Debug, Default)]
    struct Spy {
        calls: Mutex<Vec<String>>,
    }

    impl BlockNode for Spy {
        fn driver(&self) -> &'static str {
            "file"
        }
        fn filename(&self) -> String {
            "spy".into()
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read(&self, _o: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
            Box::pin(async move { Ok(buf) })
        }
        fn write(&self, _o: u64, buf: IoBuf, f: WriteFlags) -> BoxFuture<'_, IoBuf> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("write fua={}", f.fua));
            Box::pin(async move { Ok(buf) })
        }
        fn write_zeroes(&self, _o: u64, _l: u64, _f: ZeroFlags) -> BoxFuture<'_, ()> {
            self.calls.lock().unwrap().push("zero".into());
            Box::pin(async { Ok(()) })
        }
        fn discard(&self, _o: u64, _l: u64) -> BoxFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> BoxFuture<'_, ()> {
            self.calls.lock().unwrap().push("flush".into());
            Box::pin(async { Ok(()) })
        }
        fn block_status(&self, _o: u64, len: u64) -> BoxFuture<'_, Extent> {
            Box::pin(async move { Ok(Extent::unallocated(len)) })
        }
        fn truncate(&self, _s: u64, _p: Prealloc) -> BoxFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    #[tokio::test]
    async fn writethrough_and_unsafe() {
        let spy = std::sync::Arc::new(Spy::default());
        let wt = CacheFilter::new(spy.clone(), true, false);
        wt.write(0, IoBuf::zeroed(512), WriteFlags::default())
            .await
            .unwrap();
        wt.write_zeroes(0, 512, ZeroFlags::default()).await.unwrap();
        let un = CacheFilter::new(spy.clone(), false, true);
        un.write(0, IoBuf::zeroed(512), WriteFlags::default())
            .await
            .unwrap();
        un.flush().await.unwrap();
        assert_eq!(
            *spy.calls.lock().unwrap(),
            ["write fua=true", "zero", "flush", "write fua=false"]
        );
    }
}
