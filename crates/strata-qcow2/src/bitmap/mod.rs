//! Persistent dirty bitmaps, live in the node's [`BitmapSet`] as QEMU keeps them.
//!
//! - [`directory`]: the bitmap directory (entries, flags, QEMU's checks);
//! - [`table`]: bitmap tables (all-zeroes / all-ones / data cluster entries) and limits;
//! - [`DirtyBitmap`] and [`BitmapSet`] live in `strata_core::bitmap`.
//!
//! Life cycle (QEMU's `qcow2_load_dirty_bitmaps` / `qcow2_store_persistent_dirty_bitmaps`):
//! an open loads every bitmap whose `in-use` flag is clear into the node's set (read-only
//! bitmaps on a read-only open); a bitmap already `in-use` is inconsistent: listed, never
//! loaded, never stored. A read-write open sets `in-use` on disk (directory rewritten in
//! place, bracketed by clearing and setting the autoclear bit) before any write can happen.
//! Writes, zero writes, discards and compressed writes mark the set. Non-persistent bitmaps
//! added to the node live in the same set and are not stored. Closing stores each
//! consistent persistent bitmap in new clusters (data, then table, then directory, all
//! durable before the header points at them), clears `in-use`, frees the old clusters and
//! releases the stored bitmaps from the set.
//!
//! Crash safety ([`intent`]): a read-write open with only consistent bitmaps rewrites them
//! as fully allocated copies kept a superset of the live bits, and sets Strata's autoclear
//! bit; an open that finds `in-use` bitmaps with that bit still set loads those copies.

pub mod directory;
pub(crate) mod intent;
pub mod table;

use std::sync::Arc;
use std::sync::Mutex as StdMutex;

use strata_core::bitmap::{
    BitmapSet, CheckFlags, LoadedState, StoredBitmap, check_add_args, inconsistent_error,
    not_found_error,
};
use strata_core::{BlockNode, Error, ErrorKind, Result};

pub use strata_core::bitmap::DirtyBitmap;

use self::directory::{DirEntry, FLAG_AUTO, FLAG_IN_USE, TYPE_DIRTY_TRACKING};
use self::intent::{DiskCopy, WriteIntent};
use self::table::TableEntry;
use crate::header::autoclear::STRATA_WRITE_INTENT;
use crate::header::{BitmapsExt, MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS, autoclear};
use crate::meta::Meta;
use crate::node::Qcow2;
use crate::snapshot::BitmapInfo;

/// QEMU's default granularity for a new bitmap: the cluster size, within [4 KiB, 64 KiB]
/// (`bdrv_get_default_bitmap_granularity`).
pub fn default_granularity(cluster_size: u64) -> u64 {
    strata_core::bitmap::default_granularity(Some(cluster_size))
}

/// A bitmap of an open image, as [`Qcow2::bitmaps`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapStatus {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Found `in-use` on open: its contents are unknown (QEMU: "inconsistent").
    pub in_use: bool,
    /// Tracks writes (stored with the `auto` flag).
    pub enabled: bool,
    /// Stored in the image (false for bitmaps added as non-persistent).
    pub persistent: bool,
    /// Dirty bytes (whole granules); `None` for an inconsistent bitmap.
    pub count: Option<u64>,
}

/// The bitmaps of an open image: the live set, and the directory as on disk.
#[derive(Debug)]
pub(crate) struct Bitmaps {
    pub(crate) set: Arc<BitmapSet>,
    /// The directory as last written (or read): what `info` shows.
    disk: StdMutex<Vec<DirEntry>>,
    /// The on-disk copies kept for crash safety.
    pub(crate) intent: WriteIntent,
    /// What the open found about bitmaps left `in-use` (why they were recovered or not).
    notes: Vec<String>,
    /// The names in the directory at open: bitmaps written to the directory later (kept
    /// copies of bitmaps added while open) are stored at close as QEMU stores new ones.
    from_open: Vec<String>,
}

fn readonly_error(name: &str) -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        format!("Bitmap '{name}' is readonly and cannot be modified"),
    )
}

/// QEMU names an anonymous node `#block` + a counter + two random digits; error texts that
/// name the node use the same shape.
fn node_name() -> String {
    let r = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    format!("#block1{:02}", r % 100)
}

async fn read_table(m: &Meta, e: &DirEntry) -> Result<Vec<u64>> {
    let bytes = m
        .read_at(e.table_offset, u64::from(e.table_size) * 8)
        .await?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect())
}

/// Read and validate a consistent bitmap's table (QEMU's `bitmap_table_load` and the size
/// check of `load_bitmap_data`), with QEMU's error texts.
async fn load_table(m: &Meta, e: &DirEntry, size: u64) -> Result<Vec<TableEntry>> {
    let cs = m.cs;
    let raw = read_table(m, e).await?;
    let entries: Option<Vec<TableEntry>> = raw.iter().map(|&x| table::decode(x, cs)).collect();
    let Some(entries) = entries else {
        return Err(Error::invalid(format!(
            "Could not read bitmap_table table from image for bitmap '{}': Invalid argument",
            e.name
        )));
    };
    if table::table_entries(size, e.granularity_bits, cs) != u64::from(e.table_size) {
        return Err(Error::invalid(format!(
            "Could not read bitmap '{}' from image: Invalid argument",
            e.name
        )));
    }
    Ok(entries)
}

/// Load the bits of a consistent bitmap (QEMU's `load_bitmap`).
async fn load_data(m: &Meta, e: &DirEntry, size: u64) -> Result<DirtyBitmap> {
    let cs = m.cs;
    let entries = load_table(m, e, size).await?;
    let mut b = DirtyBitmap::new(size, 1u64 << e.granularity_bits);
    let bits_per_cluster = cs * 8;
    for (i, t) in entries.iter().enumerate() {
        let first = i as u64 * bits_per_cluster;
        match *t {
            TableEntry::Zeroes => {}
            TableEntry::Ones => b.set_bits_from(first, bits_per_cluster),
            TableEntry::Data(off) => {
                let data = m.read_at(off, cs).await?;
                b.deserialize_part(first, &data);
            }
        }
    }
    Ok(b)
}

impl Bitmaps {
    /// Read the directory and load the consistent bitmaps into a new set; on a read-write
    /// open, mark them `in-use` on disk before the image is used. Sets `m.bitmap_areas`.
    pub(crate) async fn open(m: &mut Meta) -> Result<Bitmaps> {
        let read_only = m.read_only;
        let size = m.h.size;
        let set = Arc::new(BitmapSet::new(size));
        let intent = WriteIntent::default();
        let mut notes = Vec::new();
        // Our promise holds only for the directory it was made for: gone on any write.
        let trusted = m.h.autoclear_features & STRATA_WRITE_INTENT != 0;
        let Some(ext) = m.h.bitmaps else {
            if trusted && !read_only {
                m.h.autoclear_features &= !STRATA_WRITE_INTENT;
                m.write_header().await?;
                m.sync().await?;
            }
            if !read_only && !write_intent_disabled() {
                intent.allow_adoption(m.cs, &set);
            }
            return Ok(Bitmaps {
                set,
                disk: StdMutex::new(Vec::new()),
                intent,
                notes,
                from_open: Vec::new(),
            });
        };
        let bytes = m
            .read_at(ext.bitmap_directory_offset, ext.bitmap_directory_size)
            .await?;
        let mut disk = directory::parse(&bytes, ext.nb_bitmaps, m.cs, size)?;
        let mut loaded = false;
        let mut any_inconsistent = false;
        for e in &disk {
            let inconsistent = e.in_use() && !trusted;
            if e.in_use() {
                notes.push(in_use_note(&e.name, trusted));
            }
            let st = LoadedState {
                recording: e.auto(),
                persistent: true,
                inconsistent,
                read_only,
            };
            let data = if inconsistent {
                any_inconsistent = true;
                DirtyBitmap::new(size, 1u64 << e.granularity_bits)
            } else {
                loaded = true;
                load_data(m, e, size).await?
            };
            set.insert_loaded(&e.name, data, st)?;
        }
        set_areas(m, &disk);
        if !read_only {
            // Set again below only if every bitmap gets a kept copy.
            m.h.autoclear_features &= !STRATA_WRITE_INTENT;
        }
        if loaded && !read_only {
            let mut kept = false;
            if any_inconsistent {
                notes.push(
                    "persistent bitmaps are not crash-safe in this session: an inconsistent \
                     bitmap is in the image (remove it to get them back)"
                        .to_string(),
                );
            } else if write_intent_disabled() {
                notes.push(
                    "persistent bitmaps are not crash-safe in this session: \
                     STRATA_BITMAP_WRITE_INTENT=off"
                        .to_string(),
                );
            } else {
                match start_write_intent(m, &disk, &set).await {
                    Ok((new_disk, copies)) => {
                        for old in std::mem::replace(&mut disk, new_disk) {
                            free_bitmap_clusters(m, &old).await;
                        }
                        intent.activate(copies, m.cs, &set);
                        kept = true;
                    }
                    Err(e) => {
                        m.h.autoclear_features &= !STRATA_WRITE_INTENT;
                        notes.push(format!(
                            "persistent bitmaps are not crash-safe in this session: {}",
                            e.message()
                        ));
                    }
                }
            }
            if !kept {
                // Without kept copies the bitmaps are only `in-use`, as QEMU's.
                let ext = m.h.bitmaps.unwrap_or(ext);
                for e in disk.iter_mut() {
                    e.flags |= FLAG_IN_USE;
                }
                update_dir_in_place(m, &disk, ext).await?;
            }
        } else if trusted && !read_only {
            m.write_header().await?;
            m.sync().await?;
        }
        // QEMU prints its bitmap warnings on stderr too; these say what an unclean stop did.
        // Not on read-only opens: `in-use` may just mean another process has it open.
        if !read_only {
            for n in &notes {
                eprintln!("strata: {n}");
            }
        }
        let from_open = disk.iter().map(|e| e.name.clone()).collect();
        Ok(Bitmaps {
            set,
            disk: StdMutex::new(disk),
            intent,
            notes,
            from_open,
        })
    }

    /// Whether the image has no persistent bitmap (stored or pending).
    pub(crate) fn is_empty(&self) -> bool {
        self.set.info().iter().all(|b| !b.persistent)
    }

    /// The directory as on disk, for `info`.
    pub(crate) fn disk_info(&self) -> Vec<BitmapInfo> {
        let d = self.disk.lock().unwrap();
        d.iter()
            .map(|e| {
                let mut flags = Vec::new();
                if e.in_use() {
                    flags.push("in-use".to_string());
                }
                if e.auto() {
                    flags.push("auto".to_string());
                }
                BitmapInfo {
                    name: e.name.clone(),
                    flags,
                    granularity: 1u64 << e.granularity_bits,
                    table_offset: e.table_offset,
                    table_size: e.table_size,
                }
            })
            .collect()
    }

    /// QEMU's `qcow2_truncate_bitmaps_check`: every stored bitmap must be in memory and pass
    /// the default checks (busy, read-only, inconsistent). We also refuse a size whose
    /// persistent bitmaps could not be stored (QEMU would fail at close).
    pub(crate) fn check_resize(&self, new_size: u64, cs: u64) -> Result<()> {
        let names: Vec<String> = self
            .disk
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        for name in &names {
            if !self.set.contains(name) {
                return Err(Error::unsupported(
                    "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory",
                ));
            }
            self.set.check(name, CheckFlags::DEFAULT)?;
        }
        for b in self.set.info().iter().rev().filter(|b| b.persistent) {
            if b.inconsistent {
                return Err(inconsistent_error(&b.name));
            }
            table::check_constraints(&b.name, b.granularity, new_size, cs).map_err(|m| {
                Error::invalid(format!(
                    "Bitmap '{}' doesn't satisfy the constraints: {m}",
                    b.name
                ))
            })?;
        }
        Ok(())
    }

    /// Follow a resize: new bits are clean, bits past the end are dropped. The kept copies
    /// no longer fit: crash safety ends for this session.
    pub(crate) fn resized(&self, new_size: u64) {
        self.intent.mark_stale();
        self.set.resize(new_size);
    }
}

/// `STRATA_BITMAP_WRITE_INTENT=off`: persistent bitmaps behave as QEMU's (no flush before
/// the first write to a granule, inconsistent after an unclean stop). For measuring the cost,
/// or a disk where that flush hurts more than a full backup after a crash.
fn write_intent_disabled() -> bool {
    std::env::var("STRATA_BITMAP_WRITE_INTENT").is_ok_and(|v| v == "off")
}

/// Why a bitmap found `in-use` at open is (or is not) trusted.
fn in_use_note(name: &str, trusted: bool) -> String {
    if trusted {
        format!(
            "bitmap '{name}' was in use when the image was last closed (unclean stop); \
             loaded its write-intent copy, a superset of the writes since it was stored"
        )
    } else {
        format!(
            "bitmap '{name}' was in use when the image was last closed and the image has \
             no Strata write-intent record (not closed cleanly by QEMU, or opened read-write \
             by a program that does not keep one): it is inconsistent, a full backup is needed"
        )
    }
}

/// Rewrite every bitmap of `disk` as a fully allocated copy marked `in-use`, and point the
/// header at the new directory with our autoclear bit set. Returns the new directory and
/// the copies; the old clusters are the caller's to free. On error the old directory rules
/// (new clusters only leak).
async fn start_write_intent(
    m: &mut Meta,
    disk: &[DirEntry],
    set: &BitmapSet,
) -> Result<(Vec<DirEntry>, Vec<DiskCopy>)> {
    let mut new_disk = Vec::with_capacity(disk.len());
    let mut copies = Vec::with_capacity(disk.len());
    for e in disk {
        let d = set
            .snapshot(&e.name)
            .ok_or_else(|| not_found_error(&e.name))?;
        let (entry, copy) = store_full(m, e, &d).await?;
        new_disk.push(entry);
        copies.push(copy);
    }
    m.sync_increments().await?;
    m.sync().await?;
    m.h.autoclear_features |= STRATA_WRITE_INTENT;
    write_dir(m, &new_disk).await?;
    Ok((new_disk, copies))
}

/// Write bitmap `e`'s bits `d` into one data cluster per table entry (even all-zero ones,
/// so a write never has to allocate) and a new table; the entry keeps its flags, `in-use`
/// set.
async fn store_full(m: &mut Meta, e: &DirEntry, d: &DirtyBitmap) -> Result<(DirEntry, DiskCopy)> {
    let cs = m.cs;
    let n = table::table_entries(d.size(), e.granularity_bits, cs);
    if n > table::MAX_TABLE_SIZE || n * cs > table::MAX_PHYS_SIZE {
        return Err(Error::invalid(format!("Bitmap '{}' is too big", e.name)));
    }
    let bytes = d.serialize_part(0, (n * cs) as usize);
    let data = if n == 0 {
        0
    } else {
        m.alloc_clusters(n).await?
    };
    m.check_overlap(data, n * cs, false)?;
    if n > 0 {
        m.write_at(data, &bytes).await?;
    }
    let clusters: Vec<u64> = (0..n).map(|i| data + i * cs).collect();
    let tbytes: Vec<u8> = clusters.iter().flat_map(|x| x.to_be_bytes()).collect();
    let toff = m.alloc_clusters((tbytes.len() as u64).div_ceil(cs)).await?;
    m.check_overlap(toff, tbytes.len() as u64, false)?;
    m.write_at(toff, &tbytes).await?;
    let nbits = d.size().div_ceil(d.granularity());
    let copy = DiskCopy::new(&e.name, e.granularity_bits, nbits, bytes, clusters);
    let entry = DirEntry {
        table_offset: toff,
        table_size: n as u32,
        flags: e.flags | FLAG_IN_USE,
        ..e.clone()
    };
    Ok((entry, copy))
}

/// Overlap-check areas: the directory and the bitmap tables.
fn set_areas(m: &mut Meta, disk: &[DirEntry]) {
    let mut areas = Vec::new();
    if let Some(ext) = m.h.bitmaps {
        areas.push((ext.bitmap_directory_offset, ext.bitmap_directory_size));
    }
    for e in disk {
        areas.push((e.table_offset, u64::from(e.table_size) * 8));
    }
    m.bitmap_areas = areas;
}

/// Rewrite the directory where it is (same size: only flags change), as QEMU's
/// `update_ext_header_and_dir_in_place`: drop the autoclear bit first so a torn directory
/// write reads as "bitmaps lost", never as wrong bitmaps.
async fn update_dir_in_place(m: &mut Meta, disk: &[DirEntry], ext: BitmapsExt) -> Result<()> {
    let bytes = directory::serialize(disk, m.cs, m.h.size)?;
    if bytes.len() as u64 != ext.bitmap_directory_size {
        return Err(Error::invalid(
            "Can't update bitmap directory: Invalid argument",
        ));
    }
    m.h.autoclear_features &= !autoclear::BITMAPS;
    m.write_header().await?;
    m.sync().await?;
    m.write_at(ext.bitmap_directory_offset, &bytes).await?;
    m.write_header().await?;
    m.sync().await?;
    m.h.autoclear_features |= autoclear::BITMAPS;
    m.write_header().await?;
    m.sync().await
}

/// Write `disk` as a new directory (or drop the extension when empty), make it durable,
/// point the header at it and queue the old directory for freeing (QEMU's
/// `update_ext_header_and_dir`).
async fn write_dir(m: &mut Meta, disk: &[DirEntry]) -> Result<()> {
    let old = m.h.bitmaps;
    if disk.is_empty() {
        m.h.bitmaps = None;
        m.h.autoclear_features &= !(autoclear::BITMAPS | STRATA_WRITE_INTENT);
    } else {
        if disk.len() > MAX_BITMAPS as usize {
            return Err(Error::invalid("Too many persistent bitmaps"));
        }
        let bytes = directory::serialize(disk, m.cs, m.h.size)?;
        let off = m
            .alloc_clusters((bytes.len() as u64).div_ceil(m.cs))
            .await?;
        m.check_overlap(off, bytes.len() as u64, false)?;
        m.write_at(off, &bytes).await?;
        m.sync_increments().await?;
        m.sync().await?;
        m.h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: disk.len() as u32,
            bitmap_directory_size: bytes.len() as u64,
            bitmap_directory_offset: off,
        });
        m.h.autoclear_features |= autoclear::BITMAPS;
    }
    m.write_header().await?;
    m.sync().await?;
    if let Some(o) = old {
        m.free_range(o.bitmap_directory_offset, o.bitmap_directory_size, 0);
    }
    set_areas(m, disk);
    Ok(())
}

/// Queue a bitmap's table and data clusters for freeing (best effort on a bad table, as
/// QEMU: leaked clusters are what `check -r leaks` is for).
async fn free_bitmap_clusters(m: &mut Meta, e: &DirEntry) {
    if let Ok(t) = read_table(m, e).await {
        for x in t {
            if let Some(TableEntry::Data(off)) = table::decode(x, m.cs) {
                m.free_range(off, m.cs, 0);
            }
        }
        m.free_range(e.table_offset, u64::from(e.table_size) * 8, 0);
    }
}

/// Write a bitmap's data clusters and table in new clusters; returns the directory entry
/// (QEMU's `store_bitmap`: only clusters with a set bit get a data cluster).
async fn store_one(
    m: &mut Meta,
    name: &str,
    bits: u8,
    enabled: bool,
    d: &DirtyBitmap,
) -> Result<DirEntry> {
    let cs = m.cs;
    let n = table::table_entries(d.size(), bits, cs);
    if n > table::MAX_TABLE_SIZE || n * cs > table::MAX_PHYS_SIZE {
        return Err(Error::invalid(format!("Bitmap '{name}' is too big")));
    }
    let bits_per_cluster = cs * 8;
    let mut tb = vec![0u64; n as usize];
    for (i, slot) in tb.iter_mut().enumerate() {
        let first = i as u64 * bits_per_cluster;
        if !d.any_in_bits(first, bits_per_cluster) {
            continue;
        }
        let off = m.alloc_clusters(1).await?;
        m.check_overlap(off, cs, false)?;
        m.write_at(off, &d.serialize_part(first, cs as usize))
            .await?;
        *slot = off;
    }
    let tbytes: Vec<u8> = tb.iter().flat_map(|x| x.to_be_bytes()).collect();
    let toff = m.alloc_clusters((tbytes.len() as u64).div_ceil(cs)).await?;
    m.check_overlap(toff, tbytes.len() as u64, false)?;
    m.write_at(toff, &tbytes).await?;
    Ok(DirEntry {
        table_offset: toff,
        table_size: n as u32,
        flags: if enabled { FLAG_AUTO } else { 0 },
        kind: TYPE_DIRTY_TRACKING,
        granularity_bits: bits,
        name: name.to_string(),
        extra: Vec::new(),
    })
}

impl Qcow2 {
    /// Write-path hook, before the data is issued: mark `[offset, offset + len)` in the
    /// recording bitmaps and, when their copies are kept, make the bits durable on disk.
    pub(crate) async fn before_write(&self, offset: u64, len: u64) -> Result<()> {
        let b = &self.bitmaps;
        if b.intent.may_adopt(&b.set) {
            self.keep_new_bitmaps().await;
        }
        b.intent
            .before_write(&b.set, &self.file, &self.meta, offset, len)
            .await
    }

    /// Flush hook: write the kept copies out (bits cleared since, bits merged in).
    pub(crate) async fn write_out_bitmaps(&self) -> Result<()> {
        let b = &self.bitmaps;
        if b.intent.may_adopt(&b.set) {
            self.keep_new_bitmaps().await;
        }
        b.intent.write_out(&b.set, &self.file, false).await
    }

    /// Give persistent bitmaps added since the open a kept copy and a directory entry
    /// (`in-use`), starting write-intent logging if it was not on. Until this is done a
    /// crash loses such a bitmap entirely, as QEMU does; never does it bring one back
    /// incomplete: the entry reaches the directory only once its copy is durable and a
    /// superset. On failure the bitmap stays as QEMU keeps it (stored at close).
    async fn keep_new_bitmaps(&self) {
        let b = &self.bitmaps;
        let mut m = self.meta.lock().await;
        let seen = b.set.change_count();
        if !b.intent.may_adopt(&b.set) {
            return; // another writer did it
        }
        let fresh: Vec<StoredBitmap> = {
            let disk = b.disk.lock().unwrap();
            b.set
                .persistent_bitmaps()
                .into_iter()
                .filter(|p| !disk.iter().any(|e| e.name == p.name) && !b.intent.has_copy(&p.name))
                .collect()
        };
        if !fresh.is_empty() {
            if let Err(e) = self.keep_copies_of(&mut m, &fresh).await {
                eprintln!(
                    "strata: new persistent bitmaps are not crash-safe until the image is \
                     reopened: {}",
                    e.message()
                );
                for p in &fresh {
                    b.intent.forget(&p.name).await;
                }
                if !b.intent.is_active() {
                    m.h.autoclear_features &= !STRATA_WRITE_INTENT;
                }
            }
            self.publish_header(&m);
        }
        if b.intent.is_active()
            && let Err(e) = self.store_recording_flags(&mut m).await
        {
            eprintln!(
                "strata: could not record a bitmap's enabled state in the image: {}",
                e.message()
            );
        }
        b.intent.adopted(seen);
    }

    /// Keep the `auto` flags on disk in step with enable/disable, so a bitmap recovered
    /// after a crash records writes exactly when it did before (one enabled since the open
    /// would otherwise come back disabled and miss the writes after the restart).
    async fn store_recording_flags(&self, m: &mut Meta) -> Result<()> {
        let b = &self.bitmaps;
        let mut disk = b.disk.lock().unwrap().clone();
        let mut changed = false;
        for e in disk.iter_mut() {
            let Some(info) = b.set.get_info(&e.name).filter(|i| !i.inconsistent) else {
                continue;
            };
            let flags = if info.recording {
                e.flags | FLAG_AUTO
            } else {
                e.flags & !FLAG_AUTO
            };
            changed |= flags != e.flags;
            e.flags = flags;
        }
        let Some(ext) = m.h.bitmaps.filter(|_| changed) else {
            return Ok(());
        };
        update_dir_in_place(m, &disk, ext).await?;
        *b.disk.lock().unwrap() = disk;
        self.publish_header(m);
        Ok(())
    }

    async fn keep_copies_of(&self, m: &mut Meta, fresh: &[StoredBitmap]) -> Result<()> {
        let b = &self.bitmaps;
        self.check_writable()?;
        let mut entries = Vec::new();
        let mut copies = Vec::new();
        for p in fresh {
            let d = &p.bitmap;
            table::check_constraints(&p.name, d.granularity(), d.size(), m.cs)
                .map_err(Error::invalid)?;
            let template = DirEntry {
                table_offset: 0,
                table_size: 0,
                flags: if p.recording { FLAG_AUTO } else { 0 },
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: d.granularity().trailing_zeros() as u8,
                name: p.name.clone(),
                extra: Vec::new(),
            };
            let (entry, copy) = store_full(m, &template, d).await?;
            entries.push(entry);
            copies.push(copy);
        }
        m.sync_increments().await?;
        m.sync().await?;
        // Writes mark the copies from now on; the forced write-out adds what was written
        // since the snapshot above, so the copies are a superset before the directory
        // names them.
        b.intent.add_copies(copies);
        b.intent.write_out(&b.set, &self.file, true).await?;
        let mut disk = b.disk.lock().unwrap().clone();
        disk.extend(entries);
        m.h.autoclear_features |= STRATA_WRITE_INTENT;
        write_dir(m, &disk).await?;
        *b.disk.lock().unwrap() = disk;
        b.intent.set_active();
        Ok(())
    }

    /// What the open found about bitmaps left `in-use` by an unclean stop: which were
    /// recovered from their write-intent copy and which are inconsistent, and why.
    pub fn bitmap_notes(&self) -> &[String] {
        &self.bitmaps.notes
    }

    /// Whether the persistent bitmaps are crash-safe in this session (their copies are
    /// kept under Strata's autoclear bit).
    pub fn bitmaps_crash_safe(&self) -> bool {
        self.bitmaps.intent.is_active()
    }

    /// The node's live bitmap set (also [`strata_core::BlockNode::dirty_bitmaps`]).
    pub fn bitmap_set(&self) -> Arc<BitmapSet> {
        self.bitmaps.set.clone()
    }

    /// The bitmaps of this image, in directory order then in order of creation: names,
    /// granularity, flags and dirty counts.
    pub fn bitmaps(&self) -> Vec<BitmapStatus> {
        let mut v: Vec<BitmapStatus> = self
            .bitmaps
            .set
            .info()
            .into_iter()
            .map(|b| BitmapStatus {
                name: b.name,
                granularity: b.granularity,
                in_use: b.inconsistent,
                enabled: b.recording,
                persistent: b.persistent,
                count: (!b.inconsistent).then_some(b.count),
            })
            .collect();
        v.reverse();
        v
    }

    /// A copy of a bitmap's bits, for map-like readers: use [`DirtyBitmap::extents`].
    /// Fails for an inconsistent bitmap.
    pub async fn bitmap_data(&self, name: &str) -> Result<DirtyBitmap> {
        let set = &self.bitmaps.set;
        set.check(name, CheckFlags::INCONSISTENT)?;
        set.snapshot(name).ok_or_else(|| not_found_error(name))
    }

    /// QEMU's `qcow2_co_can_store_new_dirty_bitmap`, with its texts; `node` is the node's
    /// name for them.
    pub(crate) fn bitmap_storable(&self, node: &str, name: &str, granularity: u64) -> Result<()> {
        let set = &self.bitmaps.set;
        if set.contains(name) {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        let prefix = |m: &str| {
            Error::invalid(format!(
                "Can't make bitmap '{name}' persistent in '{node}': {m}"
            ))
        };
        if self.header().version < 3 {
            return Err(prefix("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        table::check_constraints(name, granularity, self.size(), self.cs)
            .map_err(|m| prefix(&m))?;
        let persistent: Vec<_> = set.info().into_iter().filter(|b| b.persistent).collect();
        if persistent.len() + 1 > MAX_BITMAPS as usize {
            return Err(prefix(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        let dir: u64 = persistent
            .iter()
            .map(|b| directory::entry_size(b.name.len(), 0))
            .sum::<u64>()
            + directory::entry_size(name.len(), 0);
        if dir > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(prefix("Not enough space in the bitmap directory"));
        }
        // No write-access check: QEMU accepts a new persistent bitmap on a read-only image.
        // It is stored if the image is reopened read-write before it is closed; closed
        // read-only, it is lost (QEMU reports "Lost persistent bitmaps during inactivation
        // of node '…': No write access" on stderr and closes the node anyway).
        Ok(())
    }

    /// Create a persistent bitmap (QMP `block-dirty-bitmap-add` with `persistent`): stored
    /// at close. `granularity` `None` picks QEMU's default.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        let g = granularity.unwrap_or_else(|| default_granularity(self.cs));
        check_add_args(name, g)?;
        self.bitmap_storable(&node_name(), name, g)?;
        self.bitmaps.set.add(name, g, true, !enabled)
    }

    /// Take over the in-memory bitmaps of the instance this one reopens (QEMU keeps a
    /// node's bitmaps across a reopen): those the image did not store — bitmaps that are
    /// not persistent, and persistent ones created while the image was read-only, which are
    /// then stored when this instance closes read-write. Bitmaps this instance loaded from
    /// the image stay as loaded.
    pub fn adopt_bitmaps(&self, old: &BitmapSet) {
        let set = &self.bitmaps.set;
        // `info` lists newest first; keep the creation order.
        for b in old.info().into_iter().rev() {
            if set.contains(&b.name) {
                continue;
            }
            let Some(data) = old.snapshot(&b.name) else {
                continue;
            };
            let st = LoadedState {
                recording: b.recording,
                persistent: b.persistent,
                inconsistent: b.inconsistent,
                read_only: false,
            };
            let _ = set.insert_loaded(&b.name, data, st);
        }
    }

    /// Delete a bitmap, from the image at once for a persistent one (QEMU's
    /// `qcow2_co_remove_persistent_dirty_bitmap`); inconsistent bitmaps can be removed.
    pub async fn bitmap_remove(&self, name: &str) -> Result<()> {
        let set = &self.bitmaps.set;
        set.check(name, CheckFlags::BUSY | CheckFlags::READ_ONLY)?;
        self.remove_stored(name).await?;
        set.remove(name).map(drop)
    }

    /// Delete the stored copy of bitmap `name`, if the directory has one (the directory is
    /// rewritten, the bitmap's clusters freed).
    pub(crate) async fn remove_stored(&self, name: &str) -> Result<()> {
        let mut m = self.meta.lock().await;
        let (old, disk) = {
            let d = self.bitmaps.disk.lock().unwrap();
            let old = d.iter().find(|e| e.name == name).cloned();
            let disk: Vec<DirEntry> = d.iter().filter(|e| e.name != name).cloned().collect();
            (old, disk)
        };
        let Some(old) = old else {
            return Ok(());
        };
        if self.read_only {
            return Err(readonly_error(name));
        }
        self.check_writable()?;
        write_dir(&mut m, &disk).await.map_err(|e| {
            Error::new(
                e.kind(),
                format!("Failed to update bitmap extension: {}", e.message()),
            )
        })?;
        *self.bitmaps.disk.lock().unwrap() = disk;
        self.bitmaps.intent.forget(name).await;
        if m.h.bitmaps.is_none() {
            self.bitmaps.intent.deactivate().await;
        }
        free_bitmap_clusters(&mut m, &old).await;
        self.publish_header(&m);
        drop(m);
        self.do_flush().await
    }

    /// Clear every bit (QMP `block-dirty-bitmap-clear`).
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.bitmaps.set.clear(name).map(drop)
    }

    /// Start tracking writes (QMP `block-dirty-bitmap-enable`).
    pub fn bitmap_enable(&self, name: &str) -> Result<()> {
        self.bitmaps.set.enable(name).map(drop)
    }

    /// Stop tracking writes (QMP `block-dirty-bitmap-disable`).
    pub fn bitmap_disable(&self, name: &str) -> Result<()> {
        self.bitmaps.set.disable(name).map(drop)
    }

    /// Set in `target` every bit set in `source` of `from` (this image when `None`), as QMP
    /// `block-dirty-bitmap-merge`: the disk sizes must match; granularities may differ.
    pub async fn bitmap_merge(
        &self,
        target: &str,
        from: Option<&Qcow2>,
        source: &str,
    ) -> Result<()> {
        let set = &self.bitmaps.set;
        set.check(target, CheckFlags::NONE)?;
        let src = from.unwrap_or(self).bitmaps.set.merge_source(source)?;
        set.merge(target, &[&src]).map(drop)
    }

    /// Store every consistent persistent bitmap and clear `in-use` (QEMU's
    /// `qcow2_store_persistent_dirty_bitmaps`, run on close). Afterwards the stored bitmaps
    /// are released from the set: writes after this are not tracked in them. On failure
    /// they stay in the set and the old directory stays on disk.
    pub(crate) async fn store_bitmaps(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        let taken = self.bitmaps.set.persistent_bitmaps();
        if taken.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        // Entries written since the open (kept copies) go as if new: QEMU's order, and
        // their copies are freed with the other old clusters.
        let (mut disk, mut drop_old): (Vec<DirEntry>, Vec<DirEntry>) = self
            .bitmaps
            .disk
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .partition(|e| self.bitmaps.from_open.contains(&e.name));
        let mut new_entries = Vec::new();
        let res: Result<()> = async {
            // QEMU walks the node's bitmap list newest first: stored bitmaps keep their
            // directory slot, new ones are appended newest first (`p` then `pd` added in
            // one session are stored as `[pd, p]`).
            for b in taken.iter().rev() {
                let (name, d) = (&b.name, &b.bitmap);
                let bits = d.granularity().trailing_zeros() as u8;
                table::check_constraints(name, d.granularity(), d.size(), m.cs).map_err(|e| {
                    Error::invalid(format!(
                        "Bitmap '{name}' doesn't satisfy the constraints: {e}"
                    ))
                })?;
                let e = store_one(&mut m, name, bits, b.recording, d).await?;
                new_entries.push(e.clone());
                match disk.iter_mut().find(|x| &x.name == name) {
                    Some(x) => drop_old.push(std::mem::replace(x, e)),
                    None => disk.push(e),
                }
            }
            // Data and tables are durable (with their refcounts) before the directory.
            m.sync_increments().await?;
            m.sync().await?;
            // Stored cleanly: nothing `in-use` is left to vouch for.
            m.h.autoclear_features &= !STRATA_WRITE_INTENT;
            write_dir(&mut m, &disk).await
        }
        .await;
        if let Err(e) = res {
            if self.bitmaps.intent.is_active() {
                // The old directory and its kept copies still rule.
                m.h.autoclear_features |= STRATA_WRITE_INTENT;
            }
            // The old directory still rules: the new clusters only leak.
            for e in &new_entries {
                free_bitmap_clusters(&mut m, e).await;
            }
            self.publish_header(&m);
            return Err(e);
        }
        *self.bitmaps.disk.lock().unwrap() = disk;
        // Before the kept copies' clusters are freed below.
        self.bitmaps.intent.deactivate().await;
        let names: Vec<String> = taken.into_iter().map(|b| b.name).collect();
        self.bitmaps.set.release(&names);
        for old in &drop_old {
            free_bitmap_clusters(&mut m, old).await;
        }
        self.publish_header(&m);
        drop(m);
        self.do_flush().await
    }

    fn publish_header(&self, m: &Meta) {
        m.publish();
    }
}
