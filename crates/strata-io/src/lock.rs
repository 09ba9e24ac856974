//! Image locking as QEMU's file-posix does it, so that Strata and QEMU processes see each
//! other's use of an image.
//!
//! Every permission bit `i` (QEMU's `BLK_PERM_*` order: consistent read, write, write
//! unchanged, resize) maps to two bytes of the file, locked with shared open-file-description
//! locks (`F_OFD_SETLK`, `F_RDLCK`): byte `100 + i` while the node holds permission `i`, byte
//! `200 + i` while it does not share it. A node that wants permission `i` checks that nobody
//! holds `200 + i`; a node that does not share `i` checks that nobody holds `100 + i` (a test
//! for an exclusive lock with `F_OFD_GETLK`). OFD locks belong to one open file description,
//! so two nodes of one process on the same file conflict as two processes do.

use std::os::fd::RawFd;
use std::str::FromStr;

use strata_core::{Error, ErrorKind, Result};

/// First byte of the "holds permission" locks (QEMU's `RAW_LOCK_PERM_BASE`).
const PERM_BASE: i64 = 100;
/// First byte of the "does not share permission" locks (`RAW_LOCK_SHARED_BASE`).
const SHARED_BASE: i64 = 200;

/// Every permission bit QEMU 10 defines (`BLK_PERM_ALL`).
pub const PERM_ALL: u8 = 0x0f;

/// Names of the permission bits in QEMU's messages (`bdrv_perm_names`), by bit number.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// The file driver's `locking` option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock when OFD locks are available (always on Linux).
    #[default]
    Auto,
    /// Lock.
    On,
    /// Neither take nor respect locks.
    Off,
}

impl FromStr for Locking {
    type Err = Error;

    fn from_str(s: &str) -> Result<Locking> {
        match s {
            "auto" => Ok(Locking::Auto),
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            other => Err(Error::invalid(format!(
                "Parameter 'locking' does not accept value '{other}'"
            ))),
        }
    }
}

impl Locking {
    /// Whether locks are used.
    pub fn enabled(self) -> bool {
        self != Locking::Off
    }
}

/// `fcntl` with an OFD lock request on the single byte `off`.
fn ofd(fd: RawFd, cmd: libc::c_int, kind: libc::c_short, off: i64) -> std::io::Result<libc::flock> {
    // SAFETY: flock is plain data; all-zero is a valid value (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = off as libc::off_t;
    fl.l_len = 1;
    fl.l_type = kind;
    loop {
        // SAFETY: fcntl on an open descriptor with a valid flock pointer.
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
        if r != -1 {
            return Ok(fl);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// QEMU's `raw_lock_error_setg_errno`: a conflict (`EAGAIN`) is the message alone, any
/// other failure carries its errno.
fn lock_error(errno: i32, msg: String) -> Error {
    if errno == libc::EAGAIN {
        Error::new(ErrorKind::Io(libc::EAGAIN), msg)
    } else {
        Error::from_errno(errno, msg)
    }
}

/// Whether another open file description holds a lock on byte `off` (`qemu_lock_fd_test`).
fn held_elsewhere(fd: RawFd, off: i64) -> std::result::Result<bool, i32> {
    let fl =
        ofd(fd, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, off).map_err(|e| errno(&e))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// The locks one open file description holds, and the permissions they stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockState {
    /// Whether this node locks at all (`locking=` and the fd's liveness).
    pub enabled: bool,
    /// Permissions committed (QEMU's `s->perm`).
    pub perm: u8,
    /// Permissions shared, committed (`s->shared_perm`).
    pub shared: u8,
    /// Bytes `100 + i` locked now.
    locked_perm: u8,
    /// Bytes `200 + i` locked now.
    locked_unshared: u8,
}

impl LockState {
    /// Nothing held, everything shared.
    pub fn new(enabled: bool) -> LockState {
        LockState {
            enabled,
            perm: 0,
            shared: PERM_ALL,
            locked_perm: 0,
            locked_unshared: 0,
        }
    }

    /// QEMU's `raw_apply_lock_bytes`: lock the bytes for `perm` and `unshared`; with
    /// `unlock`, also release the ones no longer needed.
    fn apply(&mut self, fd: RawFd, perm: u8, unshared: u8, unlock: bool) -> Result<()> {
        for (base, want, locked) in [
            (PERM_BASE, perm, &mut self.locked_perm),
            (SHARED_BASE, unshared & PERM_ALL, &mut self.locked_unshared),
        ] {
            for i in 0..PERM_NAMES.len() {
                let bit = 1u8 << i;
                let off = base + i as i64;
                if want & bit != 0 && *locked & bit == 0 {
                    ofd(fd, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short, off)
                        .map_err(|e| lock_error(errno(&e), format!("Failed to lock byte {off}")))?;
                    *locked |= bit;
                } else if unlock && *locked & bit != 0 && want & bit == 0 {
                    ofd(fd, libc::F_OFD_SETLK, libc::F_UNLCK as libc::c_short, off).map_err(
                        |e| Error::from_errno(errno(&e), format!("Failed to unlock byte {off}")),
                    )?;
                    *locked &= !bit;
                }
            }
        }
        Ok(())
    }

    /// QEMU's `raw_check_lock_bytes`: does anyone else hold what `perm`/`shared` exclude?
    fn check(fd: RawFd, perm: u8, shared: u8) -> Result<()> {
        for (i, name) in PERM_NAMES.iter().enumerate() {
            if perm & (1 << i) != 0 {
                match held_elsewhere(fd, SHARED_BASE + i as i64) {
                    Ok(false) => {}
                    Ok(true) => {
                        return Err(lock_error(
                            libc::EAGAIN,
                            format!("Failed to get \"{name}\" lock"),
                        ));
                    }
                    Err(e) => return Err(lock_error(e, format!("Failed to get \"{name}\" lock"))),
                }
            }
        }
        for (i, name) in PERM_NAMES.iter().enumerate() {
            if shared & (1 << i) == 0 {
                let msg = || format!("Failed to get shared \"{name}\" lock");
                match held_elsewhere(fd, PERM_BASE + i as i64) {
                    Ok(false) => {}
                    Ok(true) => return Err(lock_error(libc::EAGAIN, msg())),
                    Err(e) => return Err(lock_error(e, msg())),
                }
            }
        }
        Ok(())
    }

    /// QEMU's `RAW_PL_PREPARE`: keep what is locked, add what `perm`/`shared` need, and check
    /// for conflicts; on failure everything goes back to the committed state. `filename`
    /// goes into the hint line QEMU adds to a conflict.
    pub fn prepare(&mut self, fd: RawFd, perm: u8, shared: u8, filename: &str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if self.perm | perm == self.perm && self.shared & shared == self.shared {
            // Only unlocking ahead: nothing to check.
            return Ok(());
        }
        let r = self
            .apply(fd, self.perm | perm, !self.shared | !shared, false)
            .and_then(|()| LockState::check(fd, perm, shared).map_err(|e| with_hint(e, filename)));
        if r.is_err() {
            self.abort(fd);
        }
        r
    }

    /// QEMU's `RAW_PL_COMMIT`: hold exactly what `perm`/`shared` need.
    pub fn commit(&mut self, fd: RawFd, perm: u8, shared: u8) {
        if !self.enabled {
            return;
        }
        // Only unlocks can be left to do; QEMU ignores their failure too.
        let _ = self.apply(fd, perm, !shared, true);
        self.perm = perm;
        self.shared = shared;
    }

    /// QEMU's `RAW_PL_ABORT`: back to the committed state.
    pub fn abort(&mut self, fd: RawFd) {
        if !self.enabled {
            return;
        }
        let _ = self.apply(fd, self.perm, !self.shared, true);
    }

    /// Take the committed permissions of `old` (another descriptor of the same file, about
    /// to be closed) onto `fd` without checking: our own locks never conflict with each other
    /// once `old` lets go. Used by reopen, which opens the new descriptor first.
    pub fn inherit(&mut self, fd: RawFd, old: &LockState) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        self.apply(fd, old.perm, !old.shared, true)?;
        self.perm = old.perm;
        self.shared = old.shared;
        Ok(())
    }

    /// Let go of every lock (the descriptor is being replaced).
    pub fn release(&mut self, fd: RawFd) {
        if self.enabled {
            let _ = self.apply(fd, 0, 0, true);
            self.perm = 0;
            self.shared = PERM_ALL;
        }
        self.enabled = false;
    }
}

/// QEMU's `error_append_hint` for a lock conflict, as a second line (monitors show only the
/// first line; the command line and the image tool print both).
pub fn with_hint(e: Error, filename: &str) -> Error {
    let msg = format!(
        "{}\nIs another process using the image [{filename}]?",
        e.message()
    );
    Error::new(e.kind(), msg)
}

/// Take the locks of `perm` (not sharing what `shared` lacks) on `fd` and check that nobody
/// else conflicts, for a descriptor that is not a node's (QEMU's `raw_co_create` takes
/// `write` and `resize`, sharing all but `resize`, before it truncates the file).
pub fn lock_fd(fd: RawFd, perm: u8, shared: u8, filename: &str) -> Result<()> {
    let mut st = LockState::new(true);
    st.apply(fd, perm, !shared, false)?;
    LockState::check(fd, perm, shared).map_err(|e| with_hint(e, filename))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;

    fn open(p: &std::path::Path) -> std::fs::File {
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn two_descriptions_conflict_like_two_processes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"x").unwrap();
        let (a, b) = (open(&p), open(&p));
        let (cr, w, wu, rs) = (1u8, 2u8, 4u8, 8u8);
        let mut la = LockState::new(true);
        // A writable qcow2's file: reads, writes, resizes; shares reads and unchanged writes.
        la.prepare(a.as_raw_fd(), cr | w | rs, cr | wu, "img")
            .unwrap();
        la.commit(a.as_raw_fd(), cr | w | rs, cr | wu);
        let mut lb = LockState::new(true);
        let e = lb
            .prepare(b.as_raw_fd(), cr | w | rs, cr | wu, "img")
            .unwrap_err();
        assert_eq!(
            e.message(),
            "Failed to get \"write\" lock\nIs another process using the image [img]?"
        );
        let e = lb.prepare(b.as_raw_fd(), cr, cr | wu, "img").unwrap_err();
        assert!(
            e.message()
                .starts_with("Failed to get shared \"write\" lock\n")
        );
        // A failed prepare leaves nothing behind.
        assert_eq!(lb, LockState::new(true));
        // Sharing everything (force-share) is fine.
        lb.prepare(b.as_raw_fd(), cr, PERM_ALL, "img").unwrap();
        lb.commit(b.as_raw_fd(), cr, PERM_ALL);
        // Once the first lets go of writing, a second writer may come.
        la.prepare(a.as_raw_fd(), cr, cr | wu, "img").unwrap();
        la.commit(a.as_raw_fd(), cr, PERM_ALL);
        let mut lc = LockState::new(true);
        lc.prepare(open(&p).as_raw_fd(), cr, cr | wu, "img")
            .unwrap();
    }

    #[test]
    fn locking_option() {
        assert_eq!("off".parse::<Locking>().unwrap(), Locking::Off);
        assert_eq!(
            "foo".parse::<Locking>().unwrap_err().message(),
            "Parameter 'locking' does not accept value 'foo'"
        );
    }
}
