//! [`forward_to_child!`](crate::forward_to_child): the `BlockNode` methods a filter passes
//! straight on to its child.

#[doc(hidden)]
pub use strata_core as core;

/// Writes, inside an `impl BlockNode` block, the listed methods as plain calls on the child
/// at `self.<path>` (`file`, or `state.source`): `forward_to_child!(file => size, flush);`.
/// `file` answers `Some(child)`, `as_any` answers `self`.
#[macro_export]
macro_rules! forward_to_child {
    ($($child:ident).+ => $($method:ident),+ $(,)?) => {
        $crate::forward_to_child!(@each [$($child).+] $($method)+);
    };
    (@each $path:tt $($method:ident)+) => {
        $( $crate::forward_to_child!(@one $path $method); )+
    };
    (@one [$($c:tt)+] filename) => {
        fn filename(&self) -> String {
            self.$($c)+.filename()
        }
    };
    (@one [$($c:tt)+] size) => {
        fn size(&self) -> u64 {
            self.$($c)+.size()
        }
    };
    (@one [$($c:tt)+] read_only) => {
        fn read_only(&self) -> bool {
            self.$($c)+.read_only()
        }
    };
    (@one [$($c:tt)+] request_alignment) => {
        fn request_alignment(&self) -> u64 {
            self.$($c)+.request_alignment()
        }
    };
    (@one [$($c:tt)+] read) => {
        fn read(
            &self,
            offset: u64,
            buf: $crate::drivers::forward::core::IoBuf,
        ) -> $crate::drivers::forward::core::BoxFuture<'_, $crate::drivers::forward::core::IoBuf> {
            self.$($c)+.read(offset, buf)
        }
    };
    (@one [$($c:tt)+] write) => {
        fn write(
            &self,
            offset: u64,
            buf: $crate::drivers::forward::core::IoBuf,
            flags: $crate::drivers::forward::core::WriteFlags,
        ) -> $crate::drivers::forward::core::BoxFuture<'_, $crate::drivers::forward::core::IoBuf> {
            self.$($c)+.write(offset, buf, flags)
        }
    };
    (@one [$($c:tt)+] write_zeroes) => {
        fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            flags: $crate::drivers::forward::core::ZeroFlags,
        ) -> $crate::drivers::forward::core::BoxFuture<'_, ()> {
            self.$($c)+.write_zeroes(offset, len, flags)
        }
    };
    (@one [$($c:tt)+] discard) => {
        fn discard(&self, offset: u64, len: u64) -> $crate::drivers::forward::core::BoxFuture<'_, ()> {
            self.$($c)+.discard(offset, len)
        }
    };
    (@one [$($c:tt)+] flush) => {
        fn flush(&self) -> $crate::drivers::forward::core::BoxFuture<'_, ()> {
            self.$($c)+.flush()
        }
    };
    (@one [$($c:tt)+] block_status) => {
        fn block_status(
            &self,
            offset: u64,
            len: u64,
        ) -> $crate::drivers::forward::core::BoxFuture<'_, $crate::drivers::forward::core::Extent> {
            self.$($c)+.block_status(offset, len)
        }
    };
    (@one [$($c:tt)+] truncate) => {
        fn truncate(
            &self,
            size: u64,
            prealloc: $crate::drivers::forward::core::Prealloc,
        ) -> $crate::drivers::forward::core::BoxFuture<'_, ()> {
            self.$($c)+.truncate(size, prealloc)
        }
    };
    (@one [$($c:tt)+] backing) => {
        fn backing(&self) -> Option<$crate::drivers::forward::core::NodeRef> {
            self.$($c)+.backing()
        }
    };
    (@one [$($c:tt)+] file) => {
        fn file(&self) -> Option<$crate::drivers::forward::core::NodeRef> {
            Some(self.$($c)+.clone())
        }
    };
    (@one [$($c:tt)+] debug_event) => {
        fn debug_event(&self, event: $crate::drivers::forward::core::DebugEvent) {
            self.$($c)+.debug_event(event)
        }
    };
    (@one [$($c:tt)+] allocated_size) => {
        fn allocated_size(&self) -> $crate::drivers::forward::core::BoxFuture<'_, Option<u64>> {
            self.$($c)+.allocated_size()
        }
    };
    (@one [$($c:tt)+] close) => {
        fn close(&self) -> $crate::drivers::forward::core::BoxFuture<'_, ()> {
            self.$($c)+.close()
        }
    };
    (@one [$($c:tt)+] as_any) => {
        fn as_any(&self) -> &dyn ::std::any::Any {
            self
        }
    };
}
