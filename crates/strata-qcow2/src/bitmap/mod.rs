//! Persistent dirty bitmaps, live in the driver as QEMU keeps them.
//!
//! - [`directory`]: the bitmap directory (entries, flags, QEMU's checks);
//! - [`table`]: bitmap tables (all-zeroes / all-ones / data cluster entries) and limits;
//! - [`dirty`]: [`DirtyBitmap`], the in-memory bitmap (reusable outside qcow2).
//!
//! Life cycle (QEMU's `qcow2_load_dirty_bitmaps` / `qcow2_store_persistent_dirty_bitmaps`):
//! a read-write open loads every bitmap whose `in-use` flag is clear and sets that flag on
//! disk (directory rewritten in place, bracketed by clearing and setting the autoclear bit)
//! before any write can happen; a bitmap already `in-use` is inconsistent: listed, never
//! loaded, never stored. Writes, zero writes, discards and compressed writes mark the
//! enabled bitmaps. Closing stores each loaded bitmap in new clusters (data, then table,
//! then directory, all durable before the header points at them), clears `in-use`, then
//! frees the old clusters. Read-only opens only list the directory.

pub mod directory;
pub mod dirty;
pub mod table;

use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicBool, Ordering};

use strata_core::{BlockNode, Error, ErrorKind, Result};

pub use dirty::DirtyBitmap;

use self::directory::{DirEntry, FLAG_AUTO, FLAG_IN_USE, TYPE_DIRTY_TRACKING};
use self::table::TableEntry;
use crate::header::{BitmapsExt, MAX_BITMAP_DIRECTORY_SIZE, MAX_BITMAPS, autoclear};
use crate::meta::Meta;
use crate::node::Qcow2;
use crate::snapshot::BitmapInfo;

/// QEMU's default granularity for a new bitmap: the cluster size, within [4 KiB, 64 KiB]
/// (`bdrv_get_default_bitmap_granularity`).
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
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
    /// Stored in the image (always true: qcow2 bitmaps here are persistent).
    pub persistent: bool,
    /// Dirty bytes (whole granules); `None` when the data is not loaded (read-only open or
    /// inconsistent bitmap).
    pub count: Option<u64>,
}

/// One bitmap of the open image.
#[derive(Debug)]
struct Bm {
    name: String,
    granularity_bits: u8,
    enabled: bool,
    /// `in-use` on open: never trusted, never stored.
    inconsistent: bool,
    /// The bits: loaded on read-write opens for consistent bitmaps.
    data: Option<DirtyBitmap>,
}

#[derive(Debug, Default)]
struct State {
    /// The directory as last written (or read): what `info` shows.
    disk: Vec<DirEntry>,
    /// Every bitmap, directory order first, then added ones.
    list: Vec<Bm>,
    read_only: bool,
}

/// The persistent bitmaps of an open image.
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    /// Some enabled bitmap is loaded: writes must be tracked (checked without the lock).
    active: AtomicBool,
    state: StdMutex<State>,
}

fn inconsistent_error(name: &str) -> Error {
    Error::invalid(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

fn readonly_error(name: &str) -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        format!("Bitmap '{name}' is readonly and cannot be modified"),
    )
}

fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Dirty bitmap '{name}' not found"),
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

impl State {
    fn find(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|b| b.name == name)
    }

    fn get(&self, name: &str) -> Result<&Bm> {
        self.find(name)
            .map(|i| &self.list[i])
            .ok_or_else(|| not_found(name))
    }

    /// QEMU's `bdrv_dirty_bitmap_check(.., BDRV_BITMAP_DEFAULT)` (or `ALLOW_RO`).
    fn usable(&mut self, name: &str, allow_ro: bool) -> Result<&mut Bm> {
        let ro = self.read_only;
        let i = self.find(name).ok_or_else(|| not_found(name))?;
        let b = &mut self.list[i];
        if ro && !allow_ro {
            return Err(readonly_error(name));
        }
        if b.inconsistent {
            return Err(inconsistent_error(name));
        }
        Ok(b)
    }

    fn any_active(&self) -> bool {
        self.list.iter().any(|b| b.enabled && b.data.is_some())
    }
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
    /// Read the directory and, on a read-write open, load the consistent bitmaps and mark
    /// them `in-use` on disk before the image is used. Sets `m.bitmap_areas`.
    pub(crate) async fn open(m: &mut Meta) -> Result<Bitmaps> {
        let read_only = m.read_only;
        let Some(ext) = m.h.bitmaps else {
            return Ok(Bitmaps {
                active: AtomicBool::new(false),
                state: StdMutex::new(State {
                    read_only,
                    ..Default::default()
                }),
            });
        };
        let bytes = m
            .read_at(ext.bitmap_directory_offset, ext.bitmap_directory_size)
            .await?;
        let mut disk = directory::parse(&bytes, ext.nb_bitmaps, m.cs, m.h.size)?;
        let mut list = Vec::with_capacity(disk.len());
        for e in &disk {
            let data = if e.in_use() {
                None
            } else if read_only {
                // QEMU refuses the open for a bad table even read-only; the bits wait
                // until asked for.
                load_table(m, e, m.h.size).await?;
                None
            } else {
                Some(load_data(m, e, m.h.size).await?)
            };
            list.push(Bm {
                name: e.name.clone(),
                granularity_bits: e.granularity_bits,
                enabled: e.auto(),
                inconsistent: e.in_use(),
                data,
            });
        }
        set_areas(m, &disk);
        let needs_update = list.iter().any(|b| b.data.is_some());
        if needs_update {
            for e in disk.iter_mut() {
                e.flags |= FLAG_IN_USE;
            }
            update_dir_in_place(m, &disk, ext).await?;
        }
        let state = State {
            disk,
            list,
            read_only,
        };
        Ok(Bitmaps {
            active: AtomicBool::new(state.any_active()),
            state: StdMutex::new(state),
        })
    }

    /// Whether the image has no bitmap at all (listed or pending).
    pub(crate) fn is_empty(&self) -> bool {
        self.state.lock().unwrap().list.is_empty()
    }

    /// Mark `[offset, offset + len)` dirty in every enabled bitmap.
    pub(crate) fn track(&self, offset: u64, len: u64) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.state.lock().unwrap();
        for b in s.list.iter_mut().filter(|b| b.enabled) {
            if let Some(d) = &mut b.data {
                d.set_range(offset, len);
            }
        }
    }

    fn refresh_active(&self, s: &State) {
        self.active.store(s.any_active(), Ordering::Release);
    }

    /// The directory as on disk, for `info`.
    pub(crate) fn disk_info(&self) -> Vec<BitmapInfo> {
        let s = self.state.lock().unwrap();
        s.disk
            .iter()
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

    /// QEMU's `qcow2_truncate_bitmaps_check`: every bitmap must be loaded and consistent.
    /// We also refuse a size whose bitmaps could not be stored (QEMU would fail at close).
    pub(crate) fn check_resize(&self, new_size: u64, cs: u64) -> Result<()> {
        let s = self.state.lock().unwrap();
        for b in &s.list {
            if b.inconsistent {
                return Err(inconsistent_error(&b.name));
            }
            if b.data.is_none() {
                return Err(Error::unsupported(
                    "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory",
                ));
            }
            table::check_constraints(&b.name, 1u64 << b.granularity_bits, new_size, cs).map_err(
                |m| {
                    Error::invalid(format!(
                        "Bitmap '{}' doesn't satisfy the constraints: {m}",
                        b.name
                    ))
                },
            )?;
        }
        Ok(())
    }

    /// Follow a resize: new bits are clean, bits past the end are dropped.
    pub(crate) fn resized(&self, new_size: u64) {
        let mut s = self.state.lock().unwrap();
        for b in s.list.iter_mut() {
            if let Some(d) = &mut b.data {
                d.resize(new_size);
            }
        }
    }
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
        m.h.autoclear_features &= !autoclear::BITMAPS;
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
    /// Write-path hook: mark `[offset, offset + len)` in the enabled bitmaps.
    pub(crate) fn track_write(&self, offset: u64, len: u64) {
        self.bitmaps.track(offset, len);
    }

    /// The bitmaps of this image: names, granularity, flags and dirty counts.
    pub fn bitmaps(&self) -> Vec<BitmapStatus> {
        let s = self.bitmaps.state.lock().unwrap();
        s.list
            .iter()
            .map(|b| BitmapStatus {
                name: b.name.clone(),
                granularity: 1u64 << b.granularity_bits,
                in_use: b.inconsistent,
                enabled: b.enabled,
                persistent: true,
                count: b.data.as_ref().map(DirtyBitmap::count),
            })
            .collect()
    }

    /// A copy of a bitmap's bits (loaded from disk on read-only opens), for map-like
    /// readers: use [`DirtyBitmap::extents`]. Fails for an inconsistent bitmap.
    pub async fn bitmap_data(&self, name: &str) -> Result<DirtyBitmap> {
        {
            let s = self.bitmaps.state.lock().unwrap();
            let b = s.get(name)?;
            if b.inconsistent {
                return Err(inconsistent_error(name));
            }
            if let Some(d) = &b.data {
                return Ok(d.clone());
            }
        }
        // Read-only open: read it from the directory entry.
        let m = self.meta.lock().await;
        let e = {
            let s = self.bitmaps.state.lock().unwrap();
            s.disk.iter().find(|e| e.name == name).cloned()
        };
        let e = e.ok_or_else(|| not_found(name))?;
        load_data(&m, &e, self.size()).await
    }

    /// Create a persistent bitmap (QMP `block-dirty-bitmap-add` with `persistent`): stored
    /// at close. `granularity` `None` picks QEMU's default.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("Bitmap name cannot be empty"));
        }
        let g = match granularity {
            Some(g) if g < 512 || !g.is_power_of_two() => {
                return Err(Error::invalid(
                    "Granularity must be power of 2 and at least 512",
                ));
            }
            Some(g) => g,
            None => default_granularity(self.cs),
        };
        let mut s = self.bitmaps.state.lock().unwrap();
        if s.find(name).is_some() {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        let prefix = |m: &str| {
            Error::invalid(format!(
                "Can't make bitmap '{name}' persistent in '{}': {m}",
                node_name()
            ))
        };
        if self.header().version < 3 {
            return Err(prefix("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        table::check_constraints(name, g, self.size(), self.cs).map_err(|m| prefix(&m))?;
        if s.list.len() + 1 > MAX_BITMAPS as usize {
            return Err(prefix(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        let dir: u64 = s
            .list
            .iter()
            .map(|b| directory::entry_size(b.name.len(), 0))
            .sum::<u64>()
            + directory::entry_size(name.len(), 0);
        if dir > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(prefix("Not enough space in the bitmap directory"));
        }
        if s.read_only {
            return Err(Error::new(ErrorKind::ReadOnly, "No write access"));
        }
        s.list.push(Bm {
            name: name.to_string(),
            granularity_bits: g.trailing_zeros() as u8,
            enabled,
            inconsistent: false,
            data: Some(DirtyBitmap::new(self.size(), g)),
        });
        self.bitmaps.refresh_active(&s);
        Ok(())
    }

    /// Delete a bitmap, from the image at once (QEMU's
    /// `qcow2_co_remove_persistent_dirty_bitmap`); inconsistent bitmaps can be removed.
    pub async fn bitmap_remove(&self, name: &str) -> Result<()> {
        let mut m = self.meta.lock().await;
        let (old, disk) = {
            let mut s = self.bitmaps.state.lock().unwrap();
            let i = s.find(name).ok_or_else(|| not_found(name))?;
            if s.read_only {
                return Err(readonly_error(name));
            }
            s.list.remove(i);
            self.bitmaps.refresh_active(&s);
            let old = s.disk.iter().find(|e| e.name == name).cloned();
            let disk: Vec<DirEntry> = s.disk.iter().filter(|e| e.name != name).cloned().collect();
            (old, disk)
        };
        if let Some(old) = old {
            self.check_writable()?;
            write_dir(&mut m, &disk).await.map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("Failed to update bitmap extension: {}", e.message()),
                )
            })?;
            self.bitmaps.state.lock().unwrap().disk = disk;
            free_bitmap_clusters(&mut m, &old).await;
            self.publish_header(&m);
            drop(m);
            self.do_flush().await?;
        }
        Ok(())
    }

    /// Clear every bit (QMP `block-dirty-bitmap-clear`).
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        let mut s = self.bitmaps.state.lock().unwrap();
        let b = s.usable(name, false)?;
        if let Some(d) = &mut b.data {
            d.clear();
        }
        Ok(())
    }

    /// Start tracking writes (QMP `block-dirty-bitmap-enable`).
    pub fn bitmap_enable(&self, name: &str) -> Result<()> {
        self.set_enabled(name, true)
    }

    /// Stop tracking writes (QMP `block-dirty-bitmap-disable`).
    pub fn bitmap_disable(&self, name: &str) -> Result<()> {
        self.set_enabled(name, false)
    }

    fn set_enabled(&self, name: &str, on: bool) -> Result<()> {
        let mut s = self.bitmaps.state.lock().unwrap();
        s.usable(name, true)?.enabled = on;
        self.bitmaps.refresh_active(&s);
        Ok(())
    }

    /// Set in `target` every bit set in `source` of `from` (this image when `None`), as QMP
    /// `block-dirty-bitmap-merge`: the disk sizes must match; granularities may differ.
    pub async fn bitmap_merge(
        &self,
        target: &str,
        from: Option<&Qcow2>,
        source: &str,
    ) -> Result<()> {
        {
            let mut s = self.bitmaps.state.lock().unwrap();
            s.usable(target, false)?;
        }
        let q = from.unwrap_or(self);
        {
            let s = q.bitmaps.state.lock().unwrap();
            if s.get(source)?.inconsistent {
                return Err(inconsistent_error(source));
            }
        }
        let src = q.bitmap_data(source).await?;
        let mut s = self.bitmaps.state.lock().unwrap();
        let t = s.usable(target, false)?;
        if let Some(d) = &mut t.data {
            d.merge(&src).map_err(Error::invalid)?;
        }
        Ok(())
    }

    /// Store every loaded bitmap and clear `in-use` (QEMU's
    /// `qcow2_store_persistent_dirty_bitmaps`, run on close). Afterwards the bitmaps are
    /// released: writes after this are not tracked.
    pub(crate) async fn store_bitmaps(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        let taken: Vec<(String, u8, bool, DirtyBitmap)> = {
            let mut s = self.bitmaps.state.lock().unwrap();
            let v = s
                .list
                .iter_mut()
                .filter_map(|b| {
                    b.data
                        .take()
                        .map(|d| (b.name.clone(), b.granularity_bits, b.enabled, d))
                })
                .collect();
            self.bitmaps.refresh_active(&s);
            v
        };
        if taken.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        let mut disk = self.bitmaps.state.lock().unwrap().disk.clone();
        let mut drop_old = Vec::new();
        let mut new_entries = Vec::new();
        let res: Result<()> = async {
            for (name, bits, enabled, d) in &taken {
                table::check_constraints(name, 1u64 << bits, d.size(), m.cs).map_err(|e| {
                    Error::invalid(format!(
                        "Bitmap '{name}' doesn't satisfy the constraints: {e}"
                    ))
                })?;
                let e = store_one(&mut m, name, *bits, *enabled, d).await?;
                new_entries.push(e.clone());
                match disk.iter_mut().find(|x| &x.name == name) {
                    Some(x) => drop_old.push(std::mem::replace(x, e)),
                    None => disk.push(e),
                }
            }
            // Data and tables are durable (with their refcounts) before the directory.
            m.sync_increments().await?;
            m.sync().await?;
            write_dir(&mut m, &disk).await
        }
        .await;
        if let Err(e) = res {
            // The old directory still rules: the new clusters only leak.
            for e in &new_entries {
                free_bitmap_clusters(&mut m, e).await;
            }
            self.publish_header(&m);
            return Err(e);
        }
        self.bitmaps.state.lock().unwrap().disk = disk;
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
