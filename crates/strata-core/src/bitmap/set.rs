//! [`BitmapSet`]: the live named dirty bitmaps of one node, with QEMU's checks and texts
//! (`block/dirty-bitmap.c`, `block/monitor/bitmap-qmp-cmds.c`).
//!
//! One set per node is shared by everything that touches bitmaps: the node's write paths
//! ([`BitmapSet::mark`]), the QMP commands, backup (successors), NBD exports (busy) and, for
//! formats that persist bitmaps, the driver (load on open, store on close). The lock is a
//! `parking_lot` mutex held only for in-memory work, never across an `.await`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::DirtyBitmap;
use crate::{Error, ErrorKind, Result};

/// Longest bitmap name, in bytes (`BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_NAME_SIZE: usize = 1023;

/// Which states [`BitmapSet::check`] refuses (QEMU's `BdrvDirtyBitmapFlags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckFlags(u8);

impl CheckFlags {
    /// Nothing: only the lookup.
    pub const NONE: CheckFlags = CheckFlags(0);
    /// In use by a job or an export (or frozen with a successor).
    pub const BUSY: CheckFlags = CheckFlags(1);
    /// Loaded from a read-only image.
    pub const READ_ONLY: CheckFlags = CheckFlags(2);
    /// Found improperly saved.
    pub const INCONSISTENT: CheckFlags = CheckFlags(4);
    /// Everything (`BDRV_BITMAP_DEFAULT`): clear, merge target.
    pub const DEFAULT: CheckFlags = CheckFlags(7);
    /// Busy and inconsistent (`BDRV_BITMAP_ALLOW_RO`): enable, disable.
    pub const ALLOW_RO: CheckFlags = CheckFlags(5);

    /// Whether every flag of `other` is in `self`.
    pub fn contains(self, other: CheckFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for CheckFlags {
    type Output = CheckFlags;
    fn bitor(self, o: CheckFlags) -> CheckFlags {
        CheckFlags(self.0 | o.0)
    }
}

/// One bitmap as `query-named-block-nodes` shows it (QEMU's `BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Dirty bytes (whole granules); of the bitmap itself, not its successor.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// The bitmap or its successor tracks writes.
    pub recording: bool,
    /// In use by an operation (job, export): cannot be modified.
    pub busy: bool,
    /// Stored in the image (or to be, at close).
    pub persistent: bool,
    /// Found improperly saved: only removal is allowed (QMP shows the member only when true).
    pub inconsistent: bool,
}

/// How a driver hands a bitmap it loaded from the image to [`BitmapSet::insert_loaded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadedState {
    /// Tracks writes (qcow2's `auto` flag).
    pub recording: bool,
    /// Stored in the image.
    pub persistent: bool,
    /// Found `in-use` on open: contents unknown.
    pub inconsistent: bool,
    /// Loaded from a read-only image: cannot be modified.
    pub read_only: bool,
}

/// A persistent bitmap as the driver stores it (see [`BitmapSet::persistent_bitmaps`]).
#[derive(Debug, Clone)]
pub struct StoredBitmap {
    /// Name.
    pub name: String,
    /// Tracks writes (qcow2's `auto` flag): the bitmap's, or its successor's when frozen.
    pub recording: bool,
    /// The bits; a frozen bitmap's successor is merged in, so nothing is lost.
    pub bitmap: DirtyBitmap,
}

#[derive(Debug)]
struct Successor {
    bitmap: DirtyBitmap,
    enabled: bool,
}

#[derive(Debug)]
struct Entry {
    name: String,
    bitmap: DirtyBitmap,
    /// Records writes itself (false while frozen: the successor records).
    enabled: bool,
    persistent: bool,
    busy: bool,
    read_only: bool,
    inconsistent: bool,
    successor: Option<Successor>,
}

impl Entry {
    fn recording(&self) -> bool {
        self.enabled || self.successor.as_ref().is_some_and(|s| s.enabled)
    }

    fn info(&self) -> BitmapInfo {
        BitmapInfo {
            name: self.name.clone(),
            count: self.bitmap.count(),
            granularity: self.bitmap.granularity(),
            recording: self.recording(),
            busy: self.busy,
            persistent: self.persistent,
            inconsistent: self.inconsistent,
        }
    }

    /// QEMU's `bdrv_dirty_bitmap_check`.
    fn check(&self, flags: CheckFlags) -> Result<()> {
        let name = &self.name;
        if flags.contains(CheckFlags::BUSY) && self.busy {
            return Err(Error::invalid(format!(
                "Bitmap '{name}' is currently in use by another operation and cannot be used"
            )));
        }
        if flags.contains(CheckFlags::READ_ONLY) && self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("Bitmap '{name}' is readonly and cannot be modified"),
            ));
        }
        if flags.contains(CheckFlags::INCONSISTENT) && self.inconsistent {
            return Err(inconsistent_error(name));
        }
        Ok(())
    }
}

/// "Bitmap '%s' is inconsistent and cannot be used", with QEMU's hint on a second line
/// (QMP shows only the first line; qemu-img prints both).
pub fn inconsistent_error(name: &str) -> Error {
    Error::invalid(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

/// "Dirty bitmap '%s' not found".
pub fn not_found_error(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("Dirty bitmap '{name}' not found"),
    )
}

/// The argument checks `block-dirty-bitmap-add` makes before asking the node whether it can
/// store a persistent bitmap: an empty name, then the granularity. [`BitmapSet::add`] makes
/// them again, so a caller without a persistence check can skip this.
pub fn check_add_args(name: &str, granularity: u64) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid("Bitmap name cannot be empty"));
    }
    if granularity < 512 || !granularity.is_power_of_two() {
        return Err(Error::invalid(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    Ok(())
}

#[derive(Debug)]
struct State {
    size: u64,
    list: Vec<Entry>,
}

impl State {
    fn find(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|b| b.name == name)
    }

    fn get(&self, name: &str) -> Result<&Entry> {
        self.list
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| not_found_error(name))
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut Entry> {
        self.list
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| not_found_error(name))
    }

    fn recording(&self) -> bool {
        self.list.iter().any(Entry::recording)
    }
}

/// The live named dirty bitmaps of one node.
#[derive(Debug)]
pub struct BitmapSet {
    state: Mutex<State>,
    /// Some bitmap or successor records writes: [`BitmapSet::mark`] checks it without the
    /// lock.
    recording: AtomicBool,
    /// Bumped whenever bits are set other than by [`BitmapSet::mark`] (merge, restore,
    /// reclaim): a driver keeping an on-disk superset must write those out.
    grown: AtomicU64,
    /// Bumped whenever bits may have been cleared (clear, abdicate, restore, remove...): a
    /// driver keeping an on-disk superset may then write the smaller set out lazily.
    changed: AtomicU64,
}

impl BitmapSet {
    /// An empty set for a node of `size` bytes.
    pub fn new(size: u64) -> BitmapSet {
        BitmapSet {
            state: Mutex::new(State {
                size,
                list: Vec::new(),
            }),
            recording: AtomicBool::new(false),
            grown: AtomicU64::new(0),
            changed: AtomicU64::new(0),
        }
    }

    fn bump(&self, grown: bool) {
        if grown {
            self.grown.fetch_add(1, Ordering::AcqRel);
        }
        self.changed.fetch_add(1, Ordering::AcqRel);
    }

    /// How many times bits were set other than by [`BitmapSet::mark`].
    pub fn grow_count(&self) -> u64 {
        self.grown.load(Ordering::Acquire)
    }

    /// How many times bits were changed other than by [`BitmapSet::mark`].
    pub fn change_count(&self) -> u64 {
        self.changed.load(Ordering::Acquire)
    }

    /// Whether [`BitmapSet::mark`] sets bits of `name` (it records, or its successor does).
    pub fn is_recording(&self, name: &str) -> bool {
        self.state.lock().get(name).is_ok_and(Entry::recording)
    }

    fn refresh(&self, s: &State) {
        self.recording.store(s.recording(), Ordering::Release);
    }

    /// The node size the bitmaps cover.
    pub fn size(&self) -> u64 {
        self.state.lock().size
    }

    /// Whether the set has no bitmap.
    pub fn is_empty(&self) -> bool {
        self.state.lock().list.is_empty()
    }

    /// The names, in creation order.
    pub fn names(&self) -> Vec<String> {
        self.state
            .lock()
            .list
            .iter()
            .map(|b| b.name.clone())
            .collect()
    }

    /// Whether a bitmap is called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.state.lock().find(name).is_some()
    }

    /// Create an empty bitmap (`block-dirty-bitmap-add`), recording unless `disabled`.
    /// Checks, in QEMU's order: empty name, granularity, duplicate, name length. A
    /// persistent bitmap needs the node's [`crate::BlockNode::check_bitmap_storable`]
    /// first (after [`check_add_args`]).
    pub fn add(
        &self,
        name: &str,
        granularity: u64,
        persistent: bool,
        disabled: bool,
    ) -> Result<()> {
        check_add_args(name, granularity)?;
        let mut s = self.state.lock();
        if s.find(name).is_some() {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        if name.len() > MAX_NAME_SIZE {
            return Err(Error::invalid(format!("Bitmap name too long: {name}")));
        }
        let bitmap = DirtyBitmap::new(s.size, granularity);
        s.list.push(Entry {
            name: name.to_string(),
            bitmap,
            enabled: !disabled,
            persistent,
            busy: false,
            read_only: false,
            inconsistent: false,
            successor: None,
        });
        self.refresh(&s);
        self.bump(false);
        Ok(())
    }

    /// Install a bitmap a driver loaded from its image. An inconsistent bitmap never
    /// records. The bitmap is resized to the node if needed.
    pub fn insert_loaded(
        &self,
        name: &str,
        mut bitmap: DirtyBitmap,
        st: LoadedState,
    ) -> Result<()> {
        let mut s = self.state.lock();
        if s.find(name).is_some() {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        if bitmap.size() != s.size {
            bitmap.resize(s.size);
        }
        s.list.push(Entry {
            name: name.to_string(),
            bitmap,
            enabled: st.recording && !st.inconsistent,
            persistent: st.persistent || st.inconsistent,
            busy: false,
            read_only: st.read_only,
            inconsistent: st.inconsistent,
            successor: None,
        });
        self.refresh(&s);
        Ok(())
    }

    /// QEMU's `bdrv_dirty_bitmap_check`: the lookup error, then busy, read-only and
    /// inconsistent as `flags` asks.
    pub fn check(&self, name: &str, flags: CheckFlags) -> Result<()> {
        self.state.lock().get(name)?.check(flags)
    }

    /// Delete a bitmap (`block-dirty-bitmap-remove`: refused when busy or read-only;
    /// inconsistent ones can go). Returns what it was. For a persistent bitmap call the
    /// node's `remove_stored_bitmap` first (after [`BitmapSet::check`] with `BUSY |
    /// READ_ONLY`), as QEMU deletes the stored copy before releasing the bitmap.
    pub fn remove(&self, name: &str) -> Result<BitmapInfo> {
        let mut s = self.state.lock();
        let i = s.find(name).ok_or_else(|| not_found_error(name))?;
        s.list[i].check(CheckFlags::BUSY | CheckFlags::READ_ONLY)?;
        let e = s.list.remove(i);
        self.refresh(&s);
        self.bump(false);
        Ok(e.info())
    }

    /// Clean every bit (`block-dirty-bitmap-clear`; default checks). Returns the old
    /// contents, for a transaction's rollback ([`BitmapSet::restore`]).
    pub fn clear(&self, name: &str) -> Result<DirtyBitmap> {
        let mut s = self.state.lock();
        let e = s.get_mut(name)?;
        e.check(CheckFlags::DEFAULT)?;
        let old = e.bitmap.clone();
        e.bitmap.clear();
        self.bump(false);
        Ok(old)
    }

    /// Put back contents saved by [`BitmapSet::clear`] or [`BitmapSet::merge`] (transaction
    /// abort). The bitmap must cover the node's size.
    pub fn restore(&self, name: &str, bitmap: DirtyBitmap) -> Result<()> {
        let mut s = self.state.lock();
        let size = s.size;
        let e = s.get_mut(name)?;
        if bitmap.size() != size || bitmap.granularity() != e.bitmap.granularity() {
            return Err(Error::invalid(
                "Bitmaps are incompatible and can't be merged",
            ));
        }
        e.bitmap = bitmap;
        self.bump(true);
        Ok(())
    }

    /// Start recording (`block-dirty-bitmap-enable`: busy and inconsistent refused,
    /// read-only allowed). Returns the previous state, for a rollback.
    pub fn enable(&self, name: &str) -> Result<bool> {
        self.set_enabled(name, true)
    }

    /// Stop recording (`block-dirty-bitmap-disable`, same checks as enable). Returns the
    /// previous state.
    pub fn disable(&self, name: &str) -> Result<bool> {
        self.set_enabled(name, false)
    }

    fn set_enabled(&self, name: &str, on: bool) -> Result<bool> {
        let mut s = self.state.lock();
        let e = s.get_mut(name)?;
        e.check(CheckFlags::ALLOW_RO)?;
        let was = e.enabled;
        e.enabled = on;
        self.refresh(&s);
        self.bump(false);
        Ok(was)
    }

    /// A source for [`BitmapSet::merge`], from this node: the lookup and the checks QEMU
    /// makes on merge sources (busy and inconsistent refused, read-only allowed), then a copy
    /// of the bits.
    pub fn merge_source(&self, name: &str) -> Result<DirtyBitmap> {
        let s = self.state.lock();
        let e = s.get(name)?;
        e.check(CheckFlags::ALLOW_RO)?;
        Ok(e.bitmap.clone())
    }

    /// OR `sources` into `target` (`block-dirty-bitmap-merge`); sources may come from other
    /// nodes (get them with [`BitmapSet::merge_source`]). QEMU's order: the target lookup,
    /// then each source's size, then the target's default checks. `target` is unchanged on
    /// error. Returns the target's previous contents (for a rollback).
    pub fn merge(&self, target: &str, sources: &[&DirtyBitmap]) -> Result<DirtyBitmap> {
        let mut s = self.state.lock();
        let size = s.size;
        let e = s.get_mut(target)?;
        let mut anon = DirtyBitmap::new(size, e.bitmap.granularity());
        for src in sources {
            if src.size() != size {
                return Err(Error::invalid(format!(
                    "Bitmaps are of different sizes (destination size is {size}, source size \
                     is {}) and can't be merged",
                    src.size()
                )));
            }
            anon.merge(src).map_err(Error::invalid)?;
        }
        e.check(CheckFlags::DEFAULT)?;
        let old = e.bitmap.clone();
        e.bitmap.merge(&anon).map_err(Error::invalid)?;
        self.bump(true);
        Ok(old)
    }

    /// Mark `[offset, offset + len)` dirty in every recording bitmap and successor. Called
    /// by the node on every write, write-zeroes and discard; cheap when nothing records.
    pub fn mark(&self, offset: u64, len: u64) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.state.lock();
        for e in s.list.iter_mut() {
            if e.enabled {
                e.bitmap.set_range(offset, len);
            }
            if let Some(sc) = e.successor.as_mut().filter(|sc| sc.enabled) {
                sc.bitmap.set_range(offset, len);
            }
        }
    }

    /// Every bitmap, newest first (the order of QEMU's `dirty-bitmaps` lists; bitmaps loaded
    /// from an image count as created in directory order).
    pub fn info(&self) -> Vec<BitmapInfo> {
        self.state
            .lock()
            .list
            .iter()
            .rev()
            .map(Entry::info)
            .collect()
    }

    /// One bitmap's info.
    pub fn get_info(&self, name: &str) -> Option<BitmapInfo> {
        self.state.lock().get(name).ok().map(Entry::info)
    }

    /// A copy of a bitmap's bits (a frozen bitmap's are the point-in-time ones).
    pub fn snapshot(&self, name: &str) -> Option<DirtyBitmap> {
        self.with_bitmap(name, DirtyBitmap::clone)
    }

    /// Run `f` on a bitmap's bits under the lock (keep it short: no I/O).
    pub fn with_bitmap<R>(&self, name: &str, f: impl FnOnce(&DirtyBitmap) -> R) -> Option<R> {
        self.state.lock().get(name).ok().map(|e| f(&e.bitmap))
    }

    /// Mark a bitmap in use by an operation (an NBD export) or release it.
    pub fn set_busy(&self, name: &str, busy: bool) -> Result<()> {
        self.state.lock().get_mut(name)?.busy = busy;
        Ok(())
    }

    /// Freeze a bitmap for backup (`bdrv_dirty_bitmap_create_successor`): it becomes busy and
    /// stops recording; an anonymous successor with its recording state records from now on.
    /// The caller makes the job's checks first (busy, inconsistent, read-only).
    pub fn create_successor(&self, name: &str) -> Result<()> {
        let mut s = self.state.lock();
        let e = s.get_mut(name)?;
        if e.busy {
            return Err(Error::invalid(
                "Cannot create a successor for a bitmap that is in-use by an operation",
            ));
        }
        if e.successor.is_some() {
            return Err(Error::invalid(
                "Cannot create a successor for a bitmap that already has one",
            ));
        }
        e.successor = Some(Successor {
            bitmap: DirtyBitmap::new(e.bitmap.size(), e.bitmap.granularity()),
            enabled: e.enabled,
        });
        e.enabled = false;
        e.busy = true;
        self.refresh(&s);
        Ok(())
    }

    /// Job success (`bdrv_dirty_bitmap_abdicate`): the successor takes the name, so the
    /// bitmap now holds only the writes made since the freeze; it records as the original
    /// did and is no longer busy.
    pub fn abdicate(&self, name: &str) -> Result<()> {
        let mut s = self.state.lock();
        let e = s.get_mut(name)?;
        let Some(sc) = e.successor.take() else {
            return Err(Error::invalid(
                "Cannot relinquish control if there's no successor present",
            ));
        };
        e.bitmap = sc.bitmap;
        e.enabled = sc.enabled;
        e.busy = false;
        self.refresh(&s);
        self.bump(false);
        Ok(())
    }

    /// Job failure (`bdrv_dirty_bitmap_reclaim`): the successor's bits are merged back into
    /// the original, which records again as before and is no longer busy.
    pub fn reclaim(&self, name: &str) -> Result<()> {
        let mut s = self.state.lock();
        let e = s.get_mut(name)?;
        let Some(sc) = e.successor.take() else {
            return Err(Error::invalid(
                "Cannot reclaim a successor when none is present",
            ));
        };
        e.bitmap.merge(&sc.bitmap).map_err(Error::invalid)?;
        e.enabled = sc.enabled;
        e.busy = false;
        self.refresh(&s);
        self.bump(true);
        Ok(())
    }

    /// Follow a node resize: new bits are clean, bits past the end dropped.
    pub fn resize(&self, size: u64) {
        let mut s = self.state.lock();
        s.size = size;
        for e in s.list.iter_mut() {
            e.bitmap.resize(size);
            if let Some(sc) = &mut e.successor {
                sc.bitmap.resize(size);
            }
        }
    }

    /// Mark every bitmap read-only or writable (the node was opened or reopened read-only
    /// or read-write).
    pub fn set_read_only(&self, read_only: bool) {
        for e in self.state.lock().list.iter_mut() {
            e.read_only = read_only;
        }
    }

    /// Whether a bitmap is read-only.
    pub fn is_read_only(&self, name: &str) -> Option<bool> {
        self.state.lock().get(name).ok().map(|e| e.read_only)
    }

    /// Flag a persistent bitmap as improperly saved: it stops recording and only removal is
    /// allowed afterwards.
    pub fn set_inconsistent(&self, name: &str) -> Result<()> {
        let mut s = self.state.lock();
        let e = s.get_mut(name)?;
        e.inconsistent = true;
        e.persistent = true;
        e.enabled = false;
        self.refresh(&s);
        Ok(())
    }

    /// The consistent persistent bitmaps, for the driver to store (a frozen bitmap with its
    /// successor's bits merged in).
    pub fn persistent_bitmaps(&self) -> Vec<StoredBitmap> {
        let s = self.state.lock();
        s.list
            .iter()
            .filter(|e| e.persistent && !e.inconsistent)
            .map(|e| {
                let mut bitmap = e.bitmap.clone();
                if let Some(sc) = &e.successor {
                    let _ = bitmap.merge(&sc.bitmap);
                }
                StoredBitmap {
                    name: e.name.clone(),
                    recording: e.recording(),
                    bitmap,
                }
            })
            .collect()
    }

    /// Drop the named bitmaps without checks (a driver releasing what it stored at close).
    pub fn release(&self, names: &[String]) {
        let mut s = self.state.lock();
        s.list.retain(|e| !names.contains(&e.name));
        self.refresh(&s);
        self.bump(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn msg<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().message().to_string()
    }

    #[test]
    fn add_checks_and_texts() {
        let s = BitmapSet::new(64 * MIB);
        assert_eq!(
            msg(s.add("", 65536, false, false)),
            "Bitmap name cannot be empty"
        );
        assert_eq!(
            msg(s.add("", 100, false, false)),
            "Bitmap name cannot be empty"
        );
        for g in [0, 256, 1000, 3 << 10] {
            assert_eq!(
                msg(s.add("a", g, false, false)),
                "Granularity must be power of 2 and at least 512"
            );
        }
        s.add("a", 512, false, false).unwrap();
        assert_eq!(
            msg(s.add("a", 65536, true, true)),
            "Bitmap already exists: a"
        );
        let long = "x".repeat(MAX_NAME_SIZE + 1);
        assert_eq!(
            msg(s.add(&long, 65536, false, false)),
            format!("Bitmap name too long: {long}")
        );
        s.add(&long[1..], 65536, true, true).unwrap();
        let i = s.info();
        assert_eq!(i.len(), 2);
        assert_eq!(
            i[1],
            BitmapInfo {
                name: "a".into(),
                count: 0,
                granularity: 512,
                recording: true,
                busy: false,
                persistent: false,
                inconsistent: false,
            }
        );
        assert!(!i[0].recording && i[0].persistent, "newest first");
        assert_eq!(check_add_args("b", 1 << 31), Ok(()));
    }

    #[test]
    fn mark_records_only_in_enabled_bitmaps() {
        let s = BitmapSet::new(64 * MIB);
        s.mark(0, MIB);
        s.add("on", 65536, false, false).unwrap();
        s.add("off", 65536, false, true).unwrap();
        s.mark(MIB, 1);
        assert_eq!(s.get_info("on").unwrap().count, 65536);
        assert_eq!(s.get_info("off").unwrap().count, 0);
        assert!(s.disable("on").unwrap(), "was enabled");
        s.mark(2 * MIB, 1);
        assert_eq!(s.get_info("on").unwrap().count, 65536);
        assert!(!s.enable("off").unwrap(), "was disabled");
        s.mark(3 * MIB, 1);
        assert_eq!(s.get_info("off").unwrap().count, 65536);
        assert_eq!(
            s.snapshot("off").unwrap().extents().collect::<Vec<_>>(),
            vec![(3 * MIB, 65536)]
        );
        assert_eq!(s.with_bitmap("on", |b| b.get(MIB)), Some(true));
        assert!(s.snapshot("nope").is_none());
    }

    #[test]
    fn lookup_busy_readonly_inconsistent_texts() {
        let s = BitmapSet::new(MIB);
        let nf = "Dirty bitmap 'x' not found";
        assert_eq!(msg(s.check("x", CheckFlags::NONE)), nf);
        assert_eq!(msg(s.remove("x")), nf);
        assert_eq!(msg(s.clear("x")), nf);
        assert_eq!(msg(s.enable("x")), nf);
        assert_eq!(msg(s.disable("x")), nf);
        assert_eq!(msg(s.merge("x", &[])), nf);
        assert_eq!(msg(s.merge_source("x")), nf);
        assert_eq!(msg(s.set_busy("x", true)), nf);
        assert_eq!(
            s.check("x", CheckFlags::NONE).unwrap_err().kind(),
            ErrorKind::NotFound
        );

        s.add("b", 512, false, false).unwrap();
        s.set_busy("b", true).unwrap();
        let busy = "Bitmap 'b' is currently in use by another operation and cannot be used";
        assert_eq!(msg(s.clear("b")), busy);
        assert_eq!(msg(s.enable("b")), busy);
        assert_eq!(msg(s.disable("b")), busy);
        assert_eq!(msg(s.remove("b")), busy);
        assert_eq!(msg(s.merge("b", &[])), busy);
        assert_eq!(
            msg(s.create_successor("b")),
            "Cannot create a successor for a bitmap that is in-use by an operation"
        );
        assert!(s.get_info("b").unwrap().busy);
        assert_eq!(msg(s.merge_source("b")), busy);
        s.set_busy("b", false).unwrap();

        let ro = "Bitmap 'r' is readonly and cannot be modified";
        s.insert_loaded(
            "r",
            DirtyBitmap::new(MIB, 65536),
            LoadedState {
                recording: true,
                persistent: true,
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(msg(s.clear("r")), ro);
        assert_eq!(s.clear("r").unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(msg(s.remove("r")), ro);
        assert_eq!(msg(s.merge("r", &[])), ro);
        assert!(s.disable("r").unwrap(), "enable/disable allow read-only");
        assert!(!s.enable("r").unwrap());
        assert!(s.merge_source("r").is_ok());
        assert_eq!(s.is_read_only("r"), Some(true));
        s.set_read_only(false);
        s.clear("r").unwrap();

        let inc = "Bitmap 'i' is inconsistent and cannot be used\n\
                   Try block-dirty-bitmap-remove to delete this bitmap from disk";
        s.insert_loaded(
            "i",
            DirtyBitmap::new(MIB, 65536),
            LoadedState {
                recording: true,
                inconsistent: true,
                ..Default::default()
            },
        )
        .unwrap();
        let info = s.get_info("i").unwrap();
        assert!(info.inconsistent && info.persistent && !info.recording && !info.busy);
        assert_eq!(msg(s.clear("i")), inc);
        assert_eq!(msg(s.enable("i")), inc);
        assert_eq!(msg(s.disable("i")), inc);
        assert_eq!(msg(s.merge("i", &[])), inc);
        assert_eq!(msg(s.merge_source("i")), inc);
        assert_eq!(msg(s.check("i", CheckFlags::INCONSISTENT)), inc);
        assert!(
            s.check("i", CheckFlags::BUSY | CheckFlags::READ_ONLY)
                .is_ok()
        );
        assert!(s.persistent_bitmaps().iter().all(|b| b.name != "i"));
        assert!(s.remove("i").unwrap().inconsistent, "removal is allowed");
        assert_eq!(
            msg(s.insert_loaded("b", DirtyBitmap::new(MIB, 512), LoadedState::default())),
            "Bitmap already exists: b"
        );
        s.add("c", 512, false, false).unwrap();
        s.set_inconsistent("c").unwrap();
        assert_eq!(msg(s.clear("c")), inc.replace("'i'", "'c'"));
    }

    #[test]
    fn merge_sources_sizes_and_rollback() {
        let a = BitmapSet::new(4 * MIB);
        let other = BitmapSet::new(4 * MIB);
        let small = BitmapSet::new(MIB);
        a.add("t", 65536, false, true).unwrap();
        a.add("s", 512, false, false).unwrap();
        other.add("o", 4096, false, false).unwrap();
        small.add("x", 65536, false, false).unwrap();
        a.mark(100, 1);
        other.mark(3 * MIB, 4096);
        small.mark(0, 1);
        let s1 = a.merge_source("s").unwrap();
        let s2 = other.merge_source("o").unwrap();
        let bad = small.merge_source("x").unwrap();
        assert_eq!(
            msg(a.merge("t", &[&s1, &bad])),
            format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) \
                 and can't be merged",
                4 * MIB,
                MIB
            )
        );
        assert_eq!(
            a.get_info("t").unwrap().count,
            0,
            "target unchanged on error"
        );
        let old = a.merge("t", &[&s1, &s2]).unwrap();
        assert!(old.is_clean());
        assert_eq!(
            a.snapshot("t").unwrap().extents().collect::<Vec<_>>(),
            vec![(0, 65536), (3 * MIB, 65536)]
        );
        // Merging never clears target bits; a bitmap merges with itself.
        let me = a.merge_source("t").unwrap();
        a.merge("t", &[&me]).unwrap();
        assert_eq!(a.get_info("t").unwrap().count, 2 * 65536);
        a.restore("t", old).unwrap();
        assert_eq!(a.get_info("t").unwrap().count, 0);
        let saved = a.clear("s").unwrap();
        assert_eq!(saved.count(), 512);
        assert_eq!(a.get_info("s").unwrap().count, 0);
        a.restore("s", saved).unwrap();
        assert_eq!(a.get_info("s").unwrap().count, 512);
        assert!(a.restore("s", DirtyBitmap::new(MIB, 512)).is_err());
    }

    #[test]
    fn successor_abdicate_keeps_only_new_writes() {
        let s = BitmapSet::new(16 * MIB);
        s.add("b", 65536, true, false).unwrap();
        s.mark(0, 1);
        s.create_successor("b").unwrap();
        assert_eq!(
            msg(s.create_successor("b")),
            "Cannot create a successor for a bitmap that is in-use by an operation"
        );
        let i = s.get_info("b").unwrap();
        assert!(i.busy && i.recording && i.persistent);
        assert_eq!(
            msg(s.clear("b")),
            "Bitmap 'b' is currently in use by another operation and cannot be used"
        );
        s.mark(MIB, 1);
        // The frozen bitmap is the point in time; its count is the original's.
        assert_eq!(
            s.snapshot("b").unwrap().extents().collect::<Vec<_>>(),
            vec![(0, 65536)]
        );
        // Stored at close: both, so nothing is lost.
        let st = s.persistent_bitmaps();
        assert_eq!(st[0].bitmap.count(), 2 * 65536);
        assert!(st[0].recording);
        s.abdicate("b").unwrap();
        let i = s.get_info("b").unwrap();
        assert!(!i.busy && i.recording);
        assert_eq!(
            s.snapshot("b").unwrap().extents().collect::<Vec<_>>(),
            vec![(MIB, 65536)]
        );
        s.mark(2 * MIB, 1);
        assert_eq!(s.get_info("b").unwrap().count, 2 * 65536);
        assert_eq!(
            msg(s.abdicate("b")),
            "Cannot relinquish control if there's no successor present"
        );
        assert_eq!(
            msg(s.reclaim("b")),
            "Cannot reclaim a successor when none is present"
        );
    }

    #[test]
    fn successor_reclaim_loses_nothing_and_keeps_disabled_state() {
        let s = BitmapSet::new(16 * MIB);
        s.add("on", 65536, false, false).unwrap();
        s.add("off", 65536, false, true).unwrap();
        s.mark(0, 1);
        s.create_successor("on").unwrap();
        s.create_successor("off").unwrap();
        assert!(!s.get_info("off").unwrap().recording);
        s.mark(5 * MIB, 1);
        s.reclaim("on").unwrap();
        s.reclaim("off").unwrap();
        assert_eq!(
            s.snapshot("on").unwrap().extents().collect::<Vec<_>>(),
            vec![(0, 65536), (5 * MIB, 65536)]
        );
        assert!(s.snapshot("off").unwrap().is_clean());
        let i = s.get_info("on").unwrap();
        assert!(i.recording && !i.busy);
        assert!(!s.get_info("off").unwrap().recording);
        s.mark(6 * MIB, 1);
        assert_eq!(s.get_info("on").unwrap().count, 3 * 65536);
        assert_eq!(s.get_info("off").unwrap().count, 0);
    }

    #[test]
    fn resize_and_release() {
        let s = BitmapSet::new(4 * MIB);
        s.add("a", 65536, true, false).unwrap();
        s.add("n", 65536, false, false).unwrap();
        s.create_successor("n").unwrap();
        s.mark(3 * MIB, 1);
        s.resize(2 * MIB);
        assert_eq!(s.size(), 2 * MIB);
        assert_eq!(s.get_info("a").unwrap().count, 0);
        s.resize(8 * MIB);
        s.mark(7 * MIB, 1);
        assert_eq!(s.get_info("a").unwrap().count, 65536);
        s.reclaim("n").unwrap();
        assert_eq!(s.snapshot("n").unwrap().size(), 8 * MIB);
        assert_eq!(s.get_info("n").unwrap().count, 65536);
        let p = s.persistent_bitmaps();
        assert_eq!(p.len(), 1);
        s.release(&[p[0].name.clone()]);
        assert_eq!(s.names(), vec!["n".to_string()]);
        assert!(s.contains("n") && !s.contains("a"));
        s.remove("n").unwrap();
        assert!(s.is_empty());
        // Nothing records: mark is a no-op.
        s.mark(0, 1);
    }
}
