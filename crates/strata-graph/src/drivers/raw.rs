//! The `raw` format driver: the guest sees the bytes of its file child, optionally a window
//! `[offset, offset + size)` of it (QEMU's `block/raw-format.c`).

use std::any::Any;

use strata_core::range::end_of;
use strata_core::{
    BlockNode, BoxFuture, Error, ErrorKind, Extent, IoBuf, NodeRef, Prealloc, Result, WriteFlags,
    ZeroFlags,
};

/// The qcow2 magic: a probed raw image may not have it written into its first sector.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// QEMU's `BLOCK_PROBE_BUF_SIZE`: the bytes that probing looks at.
const PROBE_BUF_SIZE: u64 = 512;

/// Options of the raw driver (`offset`, `size`), plus whether the format was probed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawOptions {
    /// Where the guest-visible window starts in the file.
    pub offset: u64,
    /// Fixed size of the window; `None` = the rest of the file (and the node can be resized).
    pub size: Option<u64>,
    /// The format was guessed by probing: writes that would make block 0 look like another
    /// format are refused (QEMU's protection against a guest turning raw into qcow2).
    pub probed: bool,
}

/// A raw format node over `file`.
#[derive(Debug)]
pub struct RawNode {
    file: NodeRef,
    opts: RawOptions,
    size: std::sync::atomic::AtomicU64,
    read_only: bool,
}

impl RawNode {
    /// Open the raw format over `file`, checking `offset`/`size` as QEMU's
    /// `raw_apply_options` does (and with its error texts).
    pub fn open(file: NodeRef, opts: RawOptions) -> Result<RawNode> {
        let real = file.size();
        if opts.offset > real {
            return Err(Error::invalid(format!(
                "Offset ({}) cannot be greater than size of the containing file ({real})",
                opts.offset
            )));
        }
        if let Some(size) = opts.size {
            if real - opts.offset < size {
                return Err(Error::invalid(format!(
                    "The sum of offset ({}) and size ({size}) has to be smaller or equal to \
                     the  actual size of the containing file ({real})",
                    opts.offset
                )));
            }
            if !size.is_multiple_of(512) {
                return Err(Error::invalid("Specified size is not multiple of 512"));
            }
        }
        let size = opts.size.unwrap_or(real - opts.offset);
        let read_only = file.read_only();
        Ok(RawNode {
            file,
            opts,
            size: size.into(),
            read_only,
        })
    }

    /// The options the node was opened with.
    pub fn options(&self) -> RawOptions {
        self.opts
    }

    fn cur_size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Check a request against the window and map it to a file offset. Out-of-range
    /// requests fail with EIO, as QEMU's generic request check does.
    fn map(&self, offset: u64, len: u64) -> Result<u64> {
        let end = end_of(offset, len, "request")?;
        if end > self.cur_size() {
            return Err(Error::from_errno(
                libc::EIO,
                format!("request [{offset}, {end}) past the end of the raw node"),
            ));
        }
        end_of(self.opts.offset, offset, "raw offset")
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "Block node is read-only"));
        }
        Ok(())
    }

    /// QEMU's `raw_check_write`: on a probed image, refuse a write that would make the first
    /// sector probe as qcow2.
    async fn check_probed_write(&self, offset: u64, buf: &IoBuf) -> Result<()> {
        if !self.opts.probed || offset >= PROBE_BUF_SIZE || buf.is_empty() {
            return Ok(());
        }
        let magic_len = QCOW2_MAGIC.len() as u64;
        if offset >= magic_len {
            return Ok(());
        }
        // The first bytes after the write: current content overlaid with the new data.
        let mut head = [0u8; 4];
        if offset > 0 || (buf.len() as u64) < magic_len {
            let cur = self.file.read(self.opts.offset, IoBuf::zeroed(4)).await?;
            head.copy_from_slice(&cur[..4]);
        }
        let start = offset as usize;
        let n = (4 - start).min(buf.len());
        head[start..start + n].copy_from_slice(&buf[..n]);
        if &head == QCOW2_MAGIC {
            return Err(Error::from_errno(libc::EPERM, "Could not write to block 0"));
        }
        Ok(())
    }
}

impl BlockNode for RawNode {
    fn driver(&self) -> &'static str {
        "raw"
    }

    fn filename(&self) -> String {
        self.file.filename()
    }

    fn size(&self) -> u64 {
        self.cur_size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u64 {
        self.file.request_alignment()
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            let at = self.map(offset, buf.len() as u64)?;
            self.file.read(at, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            self.check_writable()?;
            let at = self.map(offset, buf.len() as u64)?;
            self.check_probed_write(offset, &buf).await?;
            self.file.write(at, buf, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.check_writable()?;
            let at = self.map(offset, len)?;
            self.file.write_zeroes(at, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.check_writable()?;
            let at = self.map(offset, len)?;
            self.file.discard(at, len).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        self.file.flush()
    }

    /// Bytes stay where the offset puts them; only a resize changes that (and bumps the
    /// mapping epoch).
    fn offer_mapping_cache(&self) -> bool {
        true
    }

    /// The file's status at the shifted offset (QEMU's `BDRV_BLOCK_RAW` recursion).
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(async move {
            let at = self.map(offset, len)?;
            let mut ext = self.file.block_status(at, len).await?;
            ext.len = ext.len.min(len);
            if ext.host_node.is_none() && ext.status.host_offset.is_some() {
                ext.host_node = Some(self.file.clone());
            }
            Ok(ext)
        })
    }

    fn truncate(&self, size: u64, prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.opts.size.is_some() {
                return Err(Error::unsupported("Cannot resize fixed-size raw disks"));
            }
            self.check_writable()?;
            let file_size = end_of(self.opts.offset, size, "resize")?;
            self.file.truncate(file_size, prealloc).await?;
            self.size.store(size, std::sync::atomic::Ordering::Release);
            strata_core::node::bump_mapping_epoch();
            Ok(())
        })
    }

    fn file(&self) -> Option<NodeRef> {
        Some(self.file.clone())
    }

    fn allocated_size(&self) -> BoxFuture<'_, Option<u64>> {
        self.file.allocated_size()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        self.file.close()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strata_core::mem::MemNode;

    use super::*;

    fn mem(data: Vec<u8>) -> NodeRef {
        Arc::new(MemNode::with_data(data))
    }

    #[tokio::test]
    async fn window_reads_writes_and_status_are_shifted() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let file = mem(data.clone());
        let raw = RawNode::open(
            file.clone(),
            RawOptions {
                offset: 1024,
                size: Some(4096),
                probed: false,
            },
        )
        .unwrap();
        assert_eq!(raw.size(), 4096);
        let b = raw.read(10, IoBuf::zeroed(100)).await.unwrap();
        assert_eq!(&b[..], &data[1034..1134]);
        raw.write(0, IoBuf::from_slice(&[9; 16]), WriteFlags::default())
            .await
            .unwrap();
        let b = file.read(1024, IoBuf::zeroed(16)).await.unwrap();
        assert_eq!(&b[..], &[9; 16]);
        let ext = raw.block_status(512, 1024).await.unwrap();
        assert_eq!(ext.status.host_offset, Some(1536));
        assert_eq!(ext.len, 1024);
        assert!(Arc::ptr_eq(ext.host_node.as_ref().unwrap(), &file));
        let e = raw.read(4000, IoBuf::zeroed(200)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io(libc::EIO));
        let e = raw.truncate(8192, Prealloc::Off).await.unwrap_err();
        assert_eq!(e.message(), "Cannot resize fixed-size raw disks");
    }

    #[test]
    fn option_errors_match_qemu() {
        let file = mem(vec![0; 1 << 20]);
        let open = |offset, size| {
            RawNode::open(
                file.clone(),
                RawOptions {
                    offset,
                    size,
                    probed: false,
                },
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            open(2_000_000, None),
            "Offset (2000000) cannot be greater than size of the containing file (1048576)"
        );
        assert_eq!(
            open(4096, Some(1 << 20)),
            "The sum of offset (4096) and size (1048576) has to be smaller or equal to the  \
             actual size of the containing file (1048576)"
        );
        assert_eq!(
            open(4096, Some(1000)),
            "Specified size is not multiple of 512"
        );
    }

    #[tokio::test]
    async fn resize_without_fixed_size_moves_file_end() {
        let file = mem(vec![0; 8192]);
        let raw = RawNode::open(
            file.clone(),
            RawOptions {
                offset: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        raw.truncate(65536, Prealloc::Off).await.unwrap();
        assert_eq!(raw.size(), 65536);
        assert_eq!(file.size(), 65536 + 4096);
    }

    #[tokio::test]
    async fn probed_images_refuse_a_qcow2_magic_in_block_0() {
        let raw = RawNode::open(
            mem(vec![0; 4096]),
            RawOptions {
                probed: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut sector = IoBuf::zeroed(512);
        sector[..4].copy_from_slice(QCOW2_MAGIC);
        let e = raw
            .write(0, sector, WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind().errno(), libc::EPERM);
        // Completing the magic byte by byte is caught as well.
        raw.write(0, IoBuf::from_slice(b"QFI"), WriteFlags::default())
            .await
            .unwrap();
        assert!(
            raw.write(3, IoBuf::from_slice(b"\xfb"), WriteFlags::default())
                .await
                .is_err()
        );
        raw.write(512, IoBuf::from_slice(QCOW2_MAGIC), WriteFlags::default())
            .await
            .unwrap();
    }
}
