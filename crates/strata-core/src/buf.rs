//! Owned, aligned I/O buffers.
//!
//! An [`IoBuf`] is moved into every read and write and handed back when the I/O completes.
//! Because the engine owns it while the request is in flight, a caller that drops its future
//! early can never free memory the kernel is still writing into (imago's `settle_writes` rule,
//! crosvm's `BackingMemory`). Buffers can be split into disjoint views that share one
//! allocation (so a request that spans several clusters becomes several I/Os with no copy) and
//! joined back with [`IoBuf::unsplit`].

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every allocation: enough for O_DIRECT on any device we meet.
pub const IO_ALIGN: usize = 4096;

/// One heap allocation, freed when the last view of it goes.
struct Alloc {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: `Alloc` is plain memory; access to it is partitioned between `IoBuf` views, which
// never overlap (see the invariant on `IoBuf`).
unsafe impl Send for Alloc {}
// SAFETY: as above; `Alloc` itself exposes no access.
unsafe impl Sync for Alloc {}

impl Drop for Alloc {
    fn drop(&mut self) {
        // SAFETY: allocated in `IoBuf::zeroed` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A view of `len` bytes at `start` of an aligned allocation.
///
/// Invariant: the views of one allocation that are alive at the same time never overlap, so
/// `&mut self` access to the bytes of a view is exclusive. Views are only made by splitting a
/// view (which consumes its range), never by cloning.
pub struct IoBuf {
    alloc: Arc<Alloc>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes, aligned to [`IO_ALIGN`].
    pub fn zeroed(len: usize) -> Self {
        let size = len.max(1).next_multiple_of(IO_ALIGN);
        let layout = Layout::from_size_align(size, IO_ALIGN).expect("I/O buffer too large");
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf {
            alloc: Arc::new(Alloc { ptr, layout }),
            start: 0,
            len,
        }
    }

    /// An aligned copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the start address and length are multiples of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        (self.as_ptr() as usize).is_multiple_of(align) && self.len.is_multiple_of(align)
    }

    /// Raw pointer to the first byte, for engines that hand the memory to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: `start` is within the allocation (constructor and split keep it so).
        unsafe { self.alloc.ptr.as_ptr().add(self.start) }
    }

    /// Mutable raw pointer to the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: as in `as_ptr`.
        unsafe { self.alloc.ptr.as_ptr().add(self.start) }
    }

    /// Split into `[0, at)` (kept in `self`) and `[at, len)` (returned).
    ///
    /// # Panics
    /// If `at > len`.
    pub fn split_off(&mut self, at: usize) -> IoBuf {
        assert!(
            at <= self.len,
            "split_off({at}) past the end of a {}-byte buffer",
            self.len
        );
        let tail = IoBuf {
            alloc: Arc::clone(&self.alloc),
            start: self.start + at,
            len: self.len - at,
        };
        self.len = at;
        tail
    }

    /// Split into `[0, at)` (returned) and `[at, len)` (kept in `self`).
    pub fn split_to(&mut self, at: usize) -> IoBuf {
        let tail = self.split_off(at);
        std::mem::replace(self, tail)
    }

    /// Append `other` to `self`. Free when `other` is the view right after `self` in the same
    /// allocation (the usual case after a split); otherwise the bytes are copied.
    pub fn unsplit(&mut self, other: IoBuf) {
        if other.is_empty() {
            return;
        }
        if self.is_empty() {
            *self = other;
            return;
        }
        if Arc::ptr_eq(&self.alloc, &other.alloc) && self.start + self.len == other.start {
            self.len += other.len;
            return;
        }
        let mut joined = IoBuf::zeroed(self.len + other.len);
        joined[..self.len].copy_from_slice(self);
        joined[self.len..].copy_from_slice(&other);
        *self = joined;
    }

    /// Join views in order (see [`IoBuf::unsplit`]).
    pub fn join(parts: impl IntoIterator<Item = IoBuf>) -> IoBuf {
        let mut parts = parts.into_iter();
        // Start from the first part: no allocation in the usual one-part case.
        let Some(mut out) = parts.next() else {
            return IoBuf::zeroed(0);
        };
        for p in parts {
            out.unsplit(p);
        }
        out
    }

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        is_zero(self)
    }
}

/// Whether every byte of `data` is zero (word-at-a-time; this runs on every copied block).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0, |acc, w| acc | w) == 0)
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the view is in bounds and no live view overlaps it.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: the view is in bounds and exclusively ours (`&mut self`, disjoint views).
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), len) }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_buffers_are_aligned_and_zero() {
        let b = IoBuf::zeroed(10_000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert!(b.is_zero());
        assert_eq!(b.len(), 10_000);
    }

    #[test]
    fn split_and_unsplit_share_memory() {
        let mut b = IoBuf::zeroed(8192);
        let base = b.as_ptr();
        let mut tail = b.split_off(4096);
        tail.fill(7);
        b.fill(1);
        assert!(b.is_aligned(4096) && tail.is_aligned(4096));
        b.unsplit(tail);
        assert_eq!(b.as_ptr(), base);
        assert_eq!(b.len(), 8192);
        assert!(b[..4096].iter().all(|&x| x == 1));
        assert!(b[4096..].iter().all(|&x| x == 7));
    }

    #[test]
    fn unsplit_of_unrelated_buffers_copies() {
        let mut a = IoBuf::from_slice(b"abc");
        a.unsplit(IoBuf::from_slice(b"def"));
        assert_eq!(&a[..], b"abcdef");
        let head = {
            let mut x = IoBuf::from_slice(b"0123456789");
            x.split_to(4)
        };
        assert_eq!(&head[..], b"0123");
    }

    #[test]
    fn zero_detection() {
        let mut b = IoBuf::zeroed(65536 + 3);
        assert!(b.is_zero());
        b[65536 + 2] = 1;
        assert!(!b.is_zero());
        b[65536 + 2] = 0;
        b[17] = 1;
        assert!(!b.is_zero());
    }
}
