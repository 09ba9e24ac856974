//! Read-only views of the internal snapshot table and the persistent bitmap directory: what
//! `info` shows, and which clusters they own (for overlap checks). The bitmaps themselves
//! (loading, tracking, storing) live in [`crate::bitmap`].

use strata_core::{BlockNode, Error, IoBuf, Result};

use crate::header::{Header, MAX_L1_SIZE_BYTES, validate_table};

/// QEMU's limit on the extra data of one snapshot entry (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
const MAX_SNAPSHOT_EXTRA: u64 = 1024;

/// One internal snapshot, as `qemu-img info` and `qemu-img snapshot -l` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time: seconds since the Epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest run time at the snapshot, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Record/replay instruction count, `None` when disabled (-1 on disk) or absent.
    pub icount: Option<u64>,
    /// Virtual disk size at the snapshot, if recorded.
    pub disk_size: Option<u64>,
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
}

/// One persistent dirty bitmap, as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Flag names in QEMU's spelling (`in-use`, `auto`).
    pub flags: Vec<String>,
    /// Bytes per bit.
    pub granularity: u64,
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
}

async fn read(file: &dyn BlockNode, offset: u64, len: u64) -> Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| Error::invalid("table too large"))?;
    Ok(file.read(offset, IoBuf::zeroed(len)).await?.to_vec())
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

/// Read and validate the snapshot table.
pub async fn read_snapshots(file: &dyn BlockNode, h: &Header) -> Result<Vec<SnapshotInfo>> {
    let cs = h.cluster_size();
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        let head = read(file, off, 40).await?;
        let extra = u64::from(be32(&head, 36));
        if extra > MAX_SNAPSHOT_EXTRA {
            return Err(Error::corrupt(
                "Too much extra metadata in snapshot table entry",
            ));
        }
        let id_len = u64::from(be16(&head, 12));
        let name_len = u64::from(be16(&head, 14));
        let var = read(file, off + 40, extra + id_len + name_len).await?;
        let e = extra as usize;
        let mut vm_state_size = u64::from(be32(&head, 32));
        let mut disk_size = None;
        let mut icount = None;
        if e >= 8 {
            vm_state_size = be64(&var, 0);
        }
        if e >= 16 {
            disk_size = Some(be64(&var, 8));
        }
        if e >= 24 {
            let v = be64(&var, 16);
            icount = (v != u64::MAX).then_some(v);
        }
        let l1_table_offset = be64(&head, 0);
        let l1_size = be32(&head, 8);
        validate_table(
            l1_table_offset,
            u64::from(l1_size),
            8,
            MAX_L1_SIZE_BYTES,
            cs,
            "Snapshot L1 table",
        )?;
        out.push(SnapshotInfo {
            id: String::from_utf8_lossy(&var[e..e + id_len as usize]).into_owned(),
            name: String::from_utf8_lossy(&var[e + id_len as usize..]).into_owned(),
            vm_state_size,
            date_sec: be32(&head, 16),
            date_nsec: be32(&head, 20),
            vm_clock_nsec: be64(&head, 24),
            icount,
            disk_size,
            l1_table_offset,
            l1_size,
        });
        off = off
            .checked_add((40 + extra + id_len + name_len).next_multiple_of(8))
            .ok_or_else(|| Error::corrupt("Snapshot table offset overflows"))?;
    }
    Ok(out)
}

/// Size in bytes of the snapshot table (for overlap checks).
pub fn snapshot_table_size(h: &Header, snaps: &[SnapshotInfo]) -> u64 {
    let _ = h;
    snaps
        .iter()
        .map(|s| {
            let extra = 24u64; // QEMU writes 24 bytes of extra data; an upper bound is fine
            (40 + extra + s.id.len() as u64 + s.name.len() as u64).next_multiple_of(8)
        })
        .sum()
}

/// Read the bitmap directory named by the bitmaps extension.
pub async fn read_bitmaps(file: &dyn BlockNode, h: &Header) -> Result<Vec<BitmapInfo>> {
    let Some(ext) = h.bitmaps else {
        return Ok(Vec::new());
    };
    let dir = read(file, ext.bitmap_directory_offset, ext.bitmap_directory_size).await?;
    let mut out = Vec::new();
    let mut o = 0usize;
    for _ in 0..ext.nb_bitmaps {
        if o + 24 > dir.len() {
            return Err(Error::corrupt("Bitmap directory is truncated"));
        }
        let flags_raw = be32(&dir, o + 12);
        let gran_bits = dir[o + 17];
        let name_size = be16(&dir, o + 18) as usize;
        let extra = be32(&dir, o + 20) as usize;
        let end = o + 24 + extra + name_size;
        if end > dir.len() || gran_bits > 63 {
            return Err(Error::corrupt("Bitmap directory entry is invalid"));
        }
        let mut flags = Vec::new();
        if flags_raw & 1 != 0 {
            flags.push("in-use".to_string());
        }
        if flags_raw & 2 != 0 {
            flags.push("auto".to_string());
        }
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(&dir[o + 24 + extra..end]).into_owned(),
            flags,
            granularity: 1u64 << gran_bits,
            table_offset: be64(&dir, o),
            table_size: be32(&dir, o + 8),
        });
        o = end.next_multiple_of(8);
    }
    Ok(out)
}
