//! A test-only format layer with scripted allocation, for exercising the chain algorithms
//! without a real format driver.

use std::any::Any;
use std::sync::{Arc, Mutex};

use strata_core::range::check_request;
use strata_core::{
    BlockNode, BlockStatus, BoxFuture, Extent, IoBuf, NodeRef, Prealloc, WriteFlags, ZeroFlags,
};

/// Granularity of the allocation map.
pub const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Unallocated,
    Data,
    Zero,
    Compressed,
}

/// A description of one layer: size and allocation. Data written by the builder is a
/// pattern that depends on the layer's name and the offset, never zero.
#[derive(Debug, Clone)]
pub struct Layer {
    size: u64,
    map: Vec<State>,
    data: Vec<u8>,
}

impl Layer {
    pub fn new(size: u64) -> Layer {
        let sectors = size.div_ceil(SECTOR) as usize;
        Layer {
            size,
            map: vec![State::Unallocated; sectors],
            data: vec![0; size as usize],
        }
    }

    fn mark(mut self, off: u64, len: u64, s: State) -> Layer {
        for i in off / SECTOR..(off + len).div_ceil(SECTOR) {
            self.map[i as usize] = s;
        }
        self
    }

    /// Allocated data with a non-zero pattern `seed`.
    pub fn data_with(mut self, off: u64, len: u64, seed: u8) -> Layer {
        for i in off..off + len {
            self.data[i as usize] = (i % 253) as u8 ^ seed | 1;
        }
        self.mark(off, len, State::Data)
    }

    /// Allocated data with a pattern.
    pub fn data(self, off: u64, len: u64) -> Layer {
        self.data_with(off, len, 0x40)
    }

    /// Allocated data that happens to be all zero bytes.
    pub fn data_zeroes(mut self, off: u64, len: u64) -> Layer {
        self.data[off as usize..(off + len) as usize].fill(0);
        self.mark(off, len, State::Data)
    }

    pub fn zero(mut self, off: u64, len: u64) -> Layer {
        self.data[off as usize..(off + len) as usize].fill(0);
        self.mark(off, len, State::Zero)
    }

    pub fn compressed(self, off: u64, len: u64) -> Layer {
        self.data_with(off, len, 0x11)
            .mark(off, len, State::Compressed)
    }
}

/// A format-like node over a [`Layer`], with an optional backing node.
#[derive(Debug)]
pub struct FakeNode {
    name: String,
    layer: Mutex<Layer>,
    backing: Option<NodeRef>,
}

impl FakeNode {
    pub fn new(name: &str, layer: Layer, backing: Option<NodeRef>) -> FakeNode {
        FakeNode {
            name: name.into(),
            layer: Mutex::new(layer),
            backing,
        }
    }

    fn set(&self, off: u64, len: u64, s: State, bytes: Option<&[u8]>) {
        let mut l = self.layer.lock().unwrap();
        let taken = std::mem::replace(&mut *l, Layer::new(0));
        let mut taken = taken.mark(off, len, s);
        let range = off as usize..(off + len) as usize;
        match bytes {
            Some(b) => taken.data[range].copy_from_slice(b),
            None => taken.data[range].fill(0),
        }
        *l = taken;
    }

    /// The allocation state of each sector.
    pub fn states(&self) -> Vec<State> {
        self.layer.lock().unwrap().map.clone()
    }
}

/// Build a chain from layers given top first; returns the nodes top first. Layer `i` is
/// named `layer{i}`.
pub fn chain(layers: &[Layer]) -> Vec<NodeRef> {
    let mut nodes: Vec<NodeRef> = Vec::new();
    let mut below: Option<NodeRef> = None;
    for (i, l) in layers.iter().enumerate().rev() {
        let n: NodeRef = Arc::new(FakeNode::new(&format!("layer{i}"), l.clone(), below));
        below = Some(n.clone());
        nodes.push(n);
    }
    nodes.reverse();
    nodes
}

impl BlockNode for FakeNode {
    fn driver(&self) -> &'static str {
        "fake"
    }

    fn filename(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.layer.lock().unwrap().size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            check_request(offset, buf.len() as u64, self.size())?;
            let mut pos = 0u64;
            while pos < buf.len() as u64 {
                let ext = self
                    .block_status(offset + pos, buf.len() as u64 - pos)
                    .await?;
                let n = ext.len as usize;
                let p = pos as usize;
                if ext.status.allocated {
                    let l = self.layer.lock().unwrap();
                    let o = (offset + pos) as usize;
                    buf[p..p + n].copy_from_slice(&l.data[o..o + n]);
                } else if let Some(b) = self.backing.as_ref().filter(|b| offset + pos < b.size()) {
                    let avail = (b.size() - offset - pos).min(n as u64) as usize;
                    let mut part = IoBuf::zeroed(avail);
                    part = b.read(offset + pos, part).await?;
                    buf[p..p + avail].copy_from_slice(&part);
                    buf[p + avail..p + n].fill(0);
                } else {
                    buf[p..p + n].fill(0);
                }
                pos += ext.len;
            }
            Ok(buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, _flags: WriteFlags) -> BoxFuture<'_, IoBuf> {
        Box::pin(async move {
            check_request(offset, buf.len() as u64, self.size())?;
            self.set(offset, buf.len() as u64, State::Data, Some(&buf));
            Ok(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            check_request(offset, len, self.size())?;
            self.set(offset, len, State::Zero, None);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            check_request(offset, len, self.size())?;
            self.set(offset, len, State::Unallocated, None);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Extent> {
        Box::pin(async move {
            check_request(offset, len, self.size())?;
            let l = self.layer.lock().unwrap();
            let first = (offset / SECTOR) as usize;
            let s = l.map[first];
            let mut end = (first as u64 + 1) * SECTOR;
            while end < offset + len && l.map[(end / SECTOR) as usize] == s {
                end += SECTOR;
            }
            let len = end.min(offset + len) - offset;
            let status = match s {
                State::Unallocated => BlockStatus::default(),
                State::Data => BlockStatus {
                    allocated: true,
                    data: true,
                    host_offset: Some(offset),
                    ..Default::default()
                },
                State::Zero => BlockStatus {
                    allocated: true,
                    zero: true,
                    ..Default::default()
                },
                State::Compressed => BlockStatus {
                    allocated: true,
                    data: true,
                    compressed: true,
                    ..Default::default()
                },
            };
            Ok(Extent {
                len,
                status,
                host_node: None,
            })
        })
    }

    fn truncate(&self, _size: u64, _prealloc: Prealloc) -> BoxFuture<'_, ()> {
        Box::pin(async { Err(strata_core::Error::unsupported("fake nodes do not resize")) })
    }

    fn backing(&self) -> Option<NodeRef> {
        self.backing.clone()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
