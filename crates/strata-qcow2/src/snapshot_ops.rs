//! Creating, applying and deleting internal snapshots (QEMU's `qcow2_snapshot_create`,
//! `qcow2_snapshot_goto`, `qcow2_snapshot_delete`).
//!
//! A snapshot is a copy of the active L1 table plus a reference on every cluster it reaches
//! (L2 tables, data clusters, compressed clusters). While a cluster has more than one
//! reference its `COPIED` flag is clear, so the write path copies it before changing it.
//!
//! Crash safety follows QEMU: refcount increments are durable before anything points at
//! the new references; a new snapshot table is written and flushed before the header points
//! at it, and the old table is freed only afterwards; decrements wait (as deferred frees)
//! until the table change that dropped the references is durable.

use std::time::{SystemTime, UNIX_EPOCH};

use strata_core::{BlockNode, Error, ErrorKind, Prealloc, Result};

use crate::entry::{self, ClusterType, L1Entry};
use crate::header::{MAX_L1_SIZE_BYTES, validate_table};
use crate::meta::{Meta, PendingFree};
use crate::node::Qcow2;
use crate::snapshot::SnapshotInfo;

/// QEMU's `QCOW_MAX_SNAPSHOTS`.
const MAX_SNAPSHOTS: usize = 65536;
/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`: the whole table.
const MAX_SNAPSHOTS_SIZE: u64 = 64 << 20;
/// Bytes of extra data QEMU knows (`QCowSnapshotExtraData`).
const KNOWN_EXTRA: usize = 24;

/// One snapshot table entry as stored, keeping extra data we do not know.
#[derive(Debug, Clone)]
pub(crate) struct RawSnapshot {
    pub(crate) l1_table_offset: u64,
    pub(crate) l1_size: u32,
    id: String,
    name: String,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    pub(crate) vm_state_size: u64,
    pub(crate) disk_size: u64,
    icount: u64,
    /// Extra data past the 24 bytes QEMU knows (preserved as is).
    unknown_extra: Vec<u8>,
}

impl RawSnapshot {
    fn to_info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            icount: (self.icount != u64::MAX).then_some(self.icount),
            disk_size: Some(self.disk_size),
            l1_table_offset: self.l1_table_offset,
            l1_size: self.l1_size,
        }
    }

    /// Append the on-disk entry, starting at the next multiple of 8 (QEMU's
    /// `qcow2_write_snapshots`: padding between entries, none after the last).
    fn serialize(&self, out: &mut Vec<u8>) {
        out.resize(out.len().next_multiple_of(8), 0);
        let extra_len = KNOWN_EXTRA + self.unknown_extra.len();
        out.extend(self.l1_table_offset.to_be_bytes());
        out.extend(self.l1_size.to_be_bytes());
        out.extend((self.id.len() as u16).to_be_bytes());
        out.extend((self.name.len() as u16).to_be_bytes());
        out.extend(self.date_sec.to_be_bytes());
        out.extend(self.date_nsec.to_be_bytes());
        out.extend(self.vm_clock_nsec.to_be_bytes());
        // The legacy 32-bit field, truncated as QEMU does.
        out.extend((self.vm_state_size as u32).to_be_bytes());
        out.extend((extra_len as u32).to_be_bytes());
        out.extend(self.vm_state_size.to_be_bytes());
        out.extend(self.disk_size.to_be_bytes());
        out.extend(self.icount.to_be_bytes());
        out.extend(&self.unknown_extra);
        out.extend(self.id.as_bytes());
        out.extend(self.name.as_bytes());
    }
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Read the snapshot table of the image `m` describes; also returns its size in bytes.
pub(crate) async fn read_table(m: &Meta) -> Result<(Vec<RawSnapshot>, u64)> {
    let mut out = Vec::new();
    let mut off = m.h.snapshots_offset;
    // End of the last entry (the table is not padded after it).
    let mut end = off;
    for _ in 0..m.h.nb_snapshots {
        let head = m.read_at(off, 40).await?;
        let extra = u64::from(be32(&head, 36));
        if extra > 1024 {
            return Err(Error::corrupt(
                "Too much extra metadata in snapshot table entry",
            ));
        }
        let id_len = u64::from(be16(&head, 12));
        let name_len = u64::from(be16(&head, 14));
        let var_start = off
            .checked_add(40)
            .ok_or_else(|| Error::corrupt("Snapshot table offset overflows"))?;
        let var = m.read_at(var_start, extra + id_len + name_len).await?;
        let e = extra as usize;
        let vm_state_size = if e >= 8 {
            be64(&var, 0)
        } else {
            u64::from(be32(&head, 32))
        };
        // Entries from before these fields: QEMU assumes the current size, no icount.
        let disk_size = if e >= 16 { be64(&var, 8) } else { m.h.size };
        let icount = if e >= 24 { be64(&var, 16) } else { u64::MAX };
        let l1_table_offset = be64(&head, 0);
        let l1_size = be32(&head, 8);
        validate_table(
            l1_table_offset,
            u64::from(l1_size),
            8,
            MAX_L1_SIZE_BYTES,
            m.cs,
            "Snapshot L1 table",
        )?;
        let id_end = e + id_len as usize;
        out.push(RawSnapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(&var[e..id_end]).into_owned(),
            name: String::from_utf8_lossy(&var[id_end..]).into_owned(),
            date_sec: be32(&head, 16),
            date_nsec: be32(&head, 20),
            vm_clock_nsec: be64(&head, 24),
            vm_state_size,
            disk_size,
            icount,
            unknown_extra: var[KNOWN_EXTRA.min(e)..e].to_vec(),
        });
        end = var_start + extra + id_len + name_len;
        off = off
            .checked_add((40 + extra + id_len + name_len).next_multiple_of(8))
            .ok_or_else(|| Error::corrupt("Snapshot table offset overflows"))?;
    }
    Ok((out, end - m.h.snapshots_offset))
}

/// What a pass over an L1 table does to the references it reaches (QEMU's `addend` of
/// `qcow2_update_snapshot_refcount`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Add one reference to every cluster, then fix the `COPIED` flags.
    Increment,
    /// Only fix the `COPIED` flags (refcount 1 <=> `COPIED`).
    FixCopied,
}

impl Meta {
    /// Host clusters `(first index, count)` an L2 entry holds a reference on.
    fn entry_clusters(&self, e: u64) -> Option<(u64, u64)> {
        match self.fmt.cluster_type(e) {
            ClusterType::Compressed => {
                let (first, n) = self.fmt.compressed(e).host_clusters(self.fmt.cluster_bits);
                Some((first / self.cs, n))
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let host = self.fmt.host_cluster(e);
                (host != 0).then_some((host / self.cs, 1))
            }
            ClusterType::Unallocated | ClusterType::ZeroPlain => None,
        }
    }

    /// Apply `pass` to the clusters reachable from `l1` (entries are updated in place; L2
    /// tables are changed in the cache and written by the next flush).
    async fn snapshot_pass(&mut self, l1: &mut [u64], pass: Pass) -> Result<()> {
        let l2n = self.h.l2_entries();
        for l1e in l1.iter_mut() {
            let Some(l2_off) = L1Entry(*l1e).l2_offset() else {
                continue;
            };
            if l2_off & (self.cs - 1) != 0 {
                return Err(Error::corrupt(format!(
                    "L2 table offset {l2_off:#x} unaligned"
                )));
            }
            self.load_l2(l2_off).await?;
            for i in 0..l2n {
                let mut s = self.slot(l2_off, i);
                let Some((first, n)) = self.entry_clusters(s.entry) else {
                    continue;
                };
                let mut rc = 0;
                for c in first..first + n {
                    if pass == Pass::Increment {
                        self.incref(c).await?;
                    }
                    rc = self.get_refcount(c).await?;
                }
                // Compressed clusters never carry COPIED.
                if self.fmt.cluster_type(s.entry) != ClusterType::Compressed {
                    let e = if rc == 1 {
                        s.entry | entry::COPIED
                    } else {
                        s.entry & !entry::COPIED
                    };
                    if e != s.entry {
                        s.entry = e;
                        // The table may be loaded again after an eviction.
                        self.load_l2(l2_off).await?;
                        self.set_slot(l2_off, i, s);
                    }
                }
            }
            let c = l2_off / self.cs;
            if pass == Pass::Increment {
                self.incref(c).await?;
            }
            let rc = self.get_refcount(c).await?;
            *l1e = L1Entry::new(l2_off, rc == 1).0;
        }
        Ok(())
    }

    /// Queue a decrement for every cluster reachable from `l1` (applied by the next flush).
    async fn snapshot_release(&mut self, l1: &[u64]) -> Result<()> {
        let l2n = self.h.l2_entries();
        for &l1e in l1 {
            let Some(l2_off) = L1Entry(l1e).l2_offset() else {
                continue;
            };
            self.load_l2(l2_off).await?;
            for i in 0..l2n {
                let s = self.slot(l2_off, i);
                if let Some((first, count)) = self.entry_clusters(s.entry) {
                    self.pending.push(PendingFree {
                        cluster: first,
                        count,
                        epoch: 0,
                    });
                }
            }
            self.free_range(l2_off, self.cs, 0);
        }
        Ok(())
    }

    /// After queued decrements were applied: fix the `COPIED` flags in the L2 tables of
    /// `l1` that are still in use (QEMU fixes them during its decrement pass; the flags of
    /// inactive tables only matter once they become active, but this keeps the images
    /// QEMU's).
    async fn fix_copied_live(&mut self, l1: &[u64]) -> Result<()> {
        let mut live = Vec::with_capacity(l1.len());
        for &e in l1 {
            let keep = match L1Entry(e).l2_offset() {
                Some(off) => self.get_refcount(off / self.cs).await? > 0,
                None => false,
            };
            live.push(if keep { e } else { 0 });
        }
        self.snapshot_pass(&mut live, Pass::FixCopied).await
    }

    /// Write the whole active L1 table.
    async fn write_l1(&mut self) -> Result<()> {
        let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        if !bytes.is_empty() {
            self.write_at(self.h.l1_table_offset, &bytes).await?;
        }
        Ok(())
    }

    /// Replace the snapshot table (QEMU's `qcow2_write_snapshots`): the new table is
    /// written and flushed before the header points at it; the old one is freed after.
    pub(crate) async fn write_snapshot_table(
        &mut self,
        snaps: &[RawSnapshot],
        old_size: u64,
    ) -> Result<()> {
        let mut bytes = Vec::new();
        for s in snaps {
            s.serialize(&mut bytes);
        }
        let size = bytes.len() as u64;
        if size > MAX_SNAPSHOTS_SIZE {
            return Err(Error::from_errno(libc::EFBIG, "Snapshot table too large"));
        }
        let new_off = if size > 0 {
            let off = self.alloc_clusters(size.div_ceil(self.cs)).await?;
            self.sync_increments().await?;
            self.write_at(off, &bytes).await?;
            self.sync().await?;
            off
        } else {
            0
        };
        let old = (self.h.snapshots_offset, old_size);
        self.h.nb_snapshots = snaps.len() as u32;
        self.h.snapshots_offset = new_off;
        self.write_header().await?;
        self.sync().await?;
        if old.1 > 0 {
            self.free_range(old.0, old.1, 0);
        }
        self.snapshot_table = (new_off, size);
        self.snapshot_l1s = snaps
            .iter()
            .filter(|s| s.l1_size > 0)
            .map(|s| (s.l1_table_offset, u64::from(s.l1_size) * 8))
            .collect();
        Ok(())
    }
}

/// Write back everything and apply the queued decrements (no data request is in flight);
/// freed clusters are discarded in the file, as QEMU's `pass-discard-snapshot` does.
pub(crate) async fn flush_discard(m: &mut Meta) -> Result<()> {
    let freed = m.flush(u64::MAX).await?;
    if !freed.is_empty() {
        m.free_byte_offset = 0;
    }
    for (off, len) in freed {
        // Best effort: the clusters are free whether or not the file can punch holes.
        let _ = m.file.discard(off, len).await;
    }
    Ok(())
}

/// QEMU's `find_new_snapshot_id`: one more than the largest numeric ID.
fn new_id(snaps: &[RawSnapshot]) -> Result<String> {
    let max = snaps
        .iter()
        .map(|s| s.id.parse::<u64>().unwrap_or(0))
        .max()
        .unwrap_or(0);
    max.checked_add(1)
        .map(|n| n.to_string())
        .ok_or_else(|| Error::from_errno(libc::EFBIG, "No snapshot ID left"))
}

impl Qcow2 {
    /// Refuse snapshot operations QEMU refuses, and make sure nothing is in flight.
    fn snapshot_preconditions(&self) -> Result<()> {
        self.check_writable()?;
        if self.fmt.external_data_file {
            return Err(Error::unsupported(
                "Internal snapshots and external data files cannot be used together",
            ));
        }
        if self.min_active_epoch() != u64::MAX {
            return Err(Error::new(
                ErrorKind::Io(libc::EBUSY),
                "Snapshot operations need an idle image",
            ));
        }
        Ok(())
    }

    /// Run `f` on the metadata with everything flushed before and after; a metadata error
    /// marks the image corrupt.
    async fn snapshot_op<T>(&self, f: impl AsyncFnOnce(&mut Meta) -> Result<T>) -> Result<T> {
        self.do_flush().await?;
        let mut m = self.meta.lock().await;
        let r = match f(&mut m).await {
            Ok(v) => flush_discard(&mut m).await.map(|()| v),
            Err(e) => Err(e),
        };
        match r {
            Ok(v) => {
                let (snaps, _) = read_table(&m).await?;
                *self.snapshots.lock().unwrap() = snaps.iter().map(RawSnapshot::to_info).collect();
                Ok(v)
            }
            Err(e) => Err(self.signal(&mut m, e).await),
        }
    }

    /// Create an internal snapshot of the current disk state named `name` (as `qemu-img
    /// snapshot -c`: a new numeric ID, the current time, no VM state).
    pub async fn snapshot_create(&self, name: &str) -> Result<()> {
        self.snapshot_create_inner(name, 0, 0).await
    }

    /// [`Self::snapshot_create`] as QEMU's `blockdev-snapshot-internal-sync` does it: its
    /// virtual clock as `vm_clock_nsec`, and no icount (-1: record/replay is off).
    pub async fn snapshot_create_with_clock(&self, name: &str, vm_clock_nsec: u64) -> Result<()> {
        self.snapshot_create_inner(name, vm_clock_nsec, u64::MAX)
            .await
    }

    async fn snapshot_create_inner(
        &self,
        name: &str,
        vm_clock_nsec: u64,
        icount: u64,
    ) -> Result<()> {
        self.snapshot_preconditions()?;
        if name.len() > u16::MAX as usize {
            return Err(Error::invalid("Snapshot name too long"));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let size = self.size();
        self.snapshot_op(async |m: &mut Meta| {
            let (mut snaps, old_size) = read_table(m).await?;
            if snaps.len() >= MAX_SNAPSHOTS {
                return Err(Error::from_errno(libc::EFBIG, "Too many snapshots"));
            }
            if m.rc_bits < 2 {
                // No cluster could be shared: QEMU fails with EINVAL on the first refcount
                // update; we fail before allocating anything.
                return Err(Error::invalid("Refcount overflow"));
            }
            // The snapshot's copy of L1, taken before the flags change (as QEMU does).
            let l1_bytes = m.l1.len() as u64 * 8;
            let l1_off = if l1_bytes > 0 {
                let off = m.alloc_clusters(l1_bytes.div_ceil(m.cs)).await?;
                m.check_overlap(off, l1_bytes, false)?;
                let bytes: Vec<u8> = m.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
                m.write_at(off, &bytes).await?;
                off
            } else {
                0
            };
            let mut l1 = m.l1.clone();
            m.snapshot_pass(&mut l1, Pass::Increment).await?;
            // References and cleared COPIED flags durable before the table names them.
            flush_discard(m).await?;
            m.l1 = l1;
            m.mapping_changed();
            m.write_l1().await?;
            m.sync().await?;
            let id = new_id(&snaps)?;
            snaps.push(RawSnapshot {
                l1_table_offset: l1_off,
                l1_size: m.l1.len() as u32,
                id,
                name: name.to_string(),
                date_sec: now.as_secs() as u32,
                // qemu-img takes the time in microseconds.
                date_nsec: now.subsec_micros() * 1000,
                vm_clock_nsec,
                vm_state_size: 0,
                disk_size: size,
                icount,
                unknown_extra: Vec::new(),
            });
            m.write_snapshot_table(&snaps, old_size).await
        })
        .await
    }

    /// Make the disk state of snapshot `name_or_id` (matched by ID first, then by name, as
    /// QEMU's `find_snapshot_by_id_or_name`) the current one; the current state is lost.
    pub async fn snapshot_apply(&self, name_or_id: &str) -> Result<()> {
        self.snapshot_preconditions()?;
        let sn = {
            let m = self.meta.lock().await;
            let (snaps, _) = read_table(&m).await?;
            snaps
                .iter()
                .find(|s| s.id == name_or_id)
                .or_else(|| snaps.iter().find(|s| s.name == name_or_id))
                .cloned()
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Io(libc::ENOENT),
                        "Failed to load snapshot: No such file or directory",
                    )
                })?
        };
        if sn.disk_size != self.size() {
            // QEMU resizes the disk to the snapshot's size first.
            self.resize(sn.disk_size, Prealloc::Off).await?;
        }
        self.snapshot_op(async |m: &mut Meta| {
            if u64::from(sn.l1_size) > m.l1.len() as u64 {
                m.grow_l1(u64::from(sn.l1_size)).await?;
            }
            let sn_bytes = u64::from(sn.l1_size) * 8;
            let raw = m.read_at(sn.l1_table_offset, sn_bytes).await?;
            let mut new_l1: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            new_l1.resize(m.l1.len(), 0);
            // References for the snapshot's clusters first, durable before L1 uses them.
            m.snapshot_pass(&mut new_l1, Pass::Increment).await?;
            flush_discard(m).await?;
            // The snapshot's own L1 gets the new flags too, as QEMU writes it back.
            let n = sn.l1_size as usize;
            let bytes: Vec<u8> = new_l1[..n].iter().flat_map(|e| e.to_be_bytes()).collect();
            if !bytes.is_empty() {
                // Its own (validated) table: only the flags change.
                m.write_at(sn.l1_table_offset, &bytes).await?;
            }
            let old_l1 = std::mem::replace(&mut m.l1, new_l1);
            m.write_l1().await?;
            m.sync().await?;
            // The old state's references go once the new L1 is durable.
            m.snapshot_release(&old_l1).await?;
            flush_discard(m).await?;
            m.fix_copied_live(&old_l1).await?;
            let mut l1 = m.l1.clone();
            m.snapshot_pass(&mut l1, Pass::FixCopied).await?;
            m.l1 = l1;
            m.mapping_changed();
            m.write_l1().await?;
            Ok(())
        })
        .await
    }

    /// Delete the snapshot named `name` (as `qemu-img snapshot -d`, which matches names
    /// only): its entry goes first, then its references and its L1 table.
    pub async fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.snapshot_preconditions()?;
        self.snapshot_op(async |m: &mut Meta| {
            let (mut snaps, old_size) = read_table(m).await?;
            let i = snaps
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| Error::new(ErrorKind::Io(libc::ENOENT), "snapshot not found"))?;
            let sn = snaps.remove(i);
            m.write_snapshot_table(&snaps, old_size).await?;
            let sn_bytes = u64::from(sn.l1_size) * 8;
            let raw = m.read_at(sn.l1_table_offset, sn_bytes).await?;
            let sn_l1: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            m.snapshot_release(&sn_l1).await?;
            if sn_bytes > 0 {
                m.free_range(sn.l1_table_offset, sn_bytes, 0);
            }
            flush_discard(m).await?;
            m.fix_copied_live(&sn_l1).await?;
            // Clusters only the active state references now get COPIED back.
            let mut l1 = m.l1.clone();
            m.snapshot_pass(&mut l1, Pass::FixCopied).await?;
            m.l1 = l1;
            m.mapping_changed();
            m.write_l1().await?;
            Ok(())
        })
        .await
    }
}
