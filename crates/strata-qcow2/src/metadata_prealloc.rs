//! Detecting metadata preallocation (QEMU's `qcow2_detect_metadata_preallocation`).
//!
//! With `preallocation=metadata` every data cluster has a host cluster, but the host file
//! holds holes there until the guest writes. Block status then asks the protocol node too
//! ([`strata_core::BlockStatus::recurse`]) so those holes show as zeroes. Asking the file
//! costs an `lseek` per extent, so, as in QEMU, it is only done when the image looks
//! preallocated: clearly fewer bytes are allocated on the host than the refcounts claim.

use std::sync::atomic::Ordering;

use strata_core::Result;

use crate::meta::Meta;
use crate::node::Qcow2;

/// Per-open state of the detection: not run yet, or its answer.
#[derive(Debug, Default)]
pub(crate) struct Detection(std::sync::atomic::AtomicU8);

const UNKNOWN: u8 = 0;
const NO: u8 = 1;
const YES: u8 = 2;

impl Detection {
    fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Acquire) {
            UNKNOWN => None,
            v => Some(v == YES),
        }
    }

    fn set(&self, yes: bool) {
        self.0.store(if yes { YES } else { NO }, Ordering::Release);
    }
}

impl Qcow2 {
    /// Whether data clusters' block status should recurse into the host file; decided once
    /// per open, on the first block-status request (as QEMU does). `m` is the metadata lock,
    /// which serialises the first decision.
    pub(crate) async fn metadata_preallocated(&self, m: &mut Meta) -> bool {
        if let Some(v) = self.metadata_prealloc.get() {
            return v;
        }
        // Errors just mean "no" (QEMU: `metadata_preallocation = (ret == 1)`).
        let v = self.detect_metadata_preallocation(m).await.unwrap_or(false);
        self.metadata_prealloc.set(v);
        v
    }

    /// Count the clusters with a nonzero refcount below the file's end, stopping once they
    /// clearly exceed (by a ninth, and at least two clusters) what the host has allocated.
    async fn detect_metadata_preallocation(&self, m: &mut Meta) -> Result<bool> {
        let cs = self.cs;
        let file_length = self.file.size();
        let Some(real_allocation) = self.file.allocated_size().await? else {
            return Ok(false);
        };
        let real_clusters = real_allocation / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = file_length.div_ceil(cs);
        let mut count = 0;
        let mut i = 0;
        while i < end_cluster && count < threshold {
            if m.get_refcount(i).await? != 0 {
                count += 1;
            }
            i += 1;
        }
        Ok(count >= threshold)
    }
}
