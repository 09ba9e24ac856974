//! `qemu-img check` for qcow2: offline consistency check and repair on the protocol node.
//!
//! The check counts every reference to a host cluster (header, L1/L2 tables of the active
//! image and of every snapshot, snapshot table, refcount table and blocks, crypto header,
//! bitmap directory and tables) into an in-memory refcount table, compares it with the
//! refcount blocks, and checks the COPIED flags. Repair frees leaks (`-r leaks`), fixes
//! refcounts and flags (`-r all`) and rebuilds the refcount structure when it is beyond
//! patching. Messages, counters, output and exit codes follow QEMU 10 (`qcow2-refcount.c`,
//! `qemu-img.c`).
//!
//! Hostile images: tables are read only as far as the file reaches, the in-memory table is
//! bounded ([`imrt::MAX_CLUSTERS`]), L2 walks are bounded, and all offsets are checked, so a
//! damaged image gives a report or an error, never a panic or a hang.
//!
//! The external data file of an image, if any, is not needed: QEMU's check never reads it.

mod fix;
mod image;
pub mod imrt;
mod refblock;
mod report;
mod walk;

use strata_core::{Error, NodeRef, Result};

use image::{Image, errno_error};
use imrt::Imrt;
pub use report::{CheckReport, Counts};

/// What `-r` asks to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// `-r leaks`: free clusters that have a refcount but no reference.
    Leaks,
    /// `-r all`: also fix refcounts that are too low, COPIED flags and the refcount
    /// structure itself.
    All,
}

/// What one pass may repair (QEMU's `BdrvCheckMode` bits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fix {
    pub leaks: bool,
    pub errors: bool,
}

impl Fix {
    fn from_mode(m: Option<RepairMode>) -> Fix {
        match m {
            None => Fix::default(),
            Some(RepairMode::Leaks) => Fix {
                leaks: true,
                errors: false,
            },
            Some(RepairMode::All) => Fix {
                leaks: true,
                errors: true,
            },
        }
    }

    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// The outcome of one pass: its counters and lines, and the error that stopped it, if any.
struct Pass {
    counts: Counts,
    messages: Vec<String>,
    failure: Option<Error>,
}

/// QEMU's `qcow2_check_refcounts`.
async fn check_refcounts(img: &mut Image, fix: Fix) -> Result<()> {
    let cs = img.cs;
    let nb = img.file_len().div_ceil(cs);
    if nb > i32::MAX as u64 {
        img.res.check_errors += 1;
        return Err(errno_error(libc::EFBIG));
    }
    // QEMU's total_sectors rounds the size down to whole sectors.
    img.res.total_clusters = (img.h.size / 512 * 512).div_ceil(cs);
    let mut t = match Imrt::new(nb) {
        Ok(t) => t,
        Err(e) => {
            img.res.check_errors += 1;
            return Err(e);
        }
    };
    let mut rebuild = false;
    img.calculate(&mut t, fix, &mut rebuild).await?;
    // Without a rebuild but with something to fix, the comparison runs again with fixing
    // on, from these counters.
    let pre_compare = img.res;
    let mut highest = img.compare(&t, Fix::default(), &mut rebuild).await?;

    if rebuild && fix.errors {
        let old = img.res;
        let mut fresh_leaks = 0;
        img.msg("Rebuilding refcount structure");
        if let Err(e) = img.rebuild(&mut t).await {
            img.res.check_errors += 1;
            return Err(e);
        }
        img.res.corruptions = 0;
        img.res.leaks = 0;
        // The old refcount structure is now unreferenced: count again.
        rebuild = false;
        t.clear();
        img.calculate(&mut t, Fix::default(), &mut rebuild).await?;
        if fix.leaks {
            let saved = img.res;
            img.res = Counts::default();
            highest = img
                .compare(
                    &t,
                    Fix {
                        leaks: true,
                        errors: false,
                    },
                    &mut rebuild,
                )
                .await?;
            if rebuild {
                img.msg("ERROR rebuilt refcount structure is still broken");
            }
            // Leaks left here were made by the rebuild itself.
            fresh_leaks = img.res.leaks;
            img.res = saved;
        }
        if img.res.corruptions < old.corruptions {
            img.res.corruptions_fixed += old.corruptions - img.res.corruptions;
        }
        if img.res.leaks < old.leaks {
            img.res.leaks_fixed += old.leaks - img.res.leaks;
        }
        img.res.leaks += fresh_leaks;
    } else if fix.any() {
        if rebuild {
            img.msg("ERROR need to rebuild refcount structures");
            img.res.check_errors += 1;
            return Err(errno_error(libc::EIO));
        }
        if img.res.leaks > 0 || img.res.corruptions > 0 {
            img.res = pre_compare;
            highest = img.compare(&t, fix, &mut rebuild).await?;
        }
    }

    img.check_oflag_copied(fix).await?;
    img.res.image_end_offset = (highest + 1) * cs;
    Ok(())
}

/// One check pass over the image (QEMU's `qcow2_co_check_locked`). An `Err` means the
/// image could not be opened.
async fn pass(file: &NodeRef, fix: Fix) -> Result<Pass> {
    let mut img = Image::open(file.clone(), fix.any()).await?;
    let failure = async {
        img.read_snapshots().await?;
        check_refcounts(&mut img, fix).await?;
        if fix.any() && img.res.check_errors == 0 && img.res.corruptions == 0 {
            img.mark_clean().await?;
        }
        Ok(())
    }
    .await
    .err();
    Ok(Pass {
        counts: img.res,
        messages: img.msgs,
        failure,
    })
}

/// `qemu-img check [-r leaks|all]` on the qcow2 image in `file`.
///
/// With a repair mode, a repair pass runs first and, if it fixed anything, a plain second
/// pass reports on the result (carrying the first pass's fixed counts), as qemu-img does.
/// `Err` means the image could not be opened at all (qemu-img: "Could not open", exit 1).
pub async fn check(file: &NodeRef, repair: Option<RepairMode>) -> Result<CheckReport> {
    let fix = Fix::from_mode(repair);
    let first = pass(file, fix).await?;
    let mut messages = first.messages;
    let c = first.counts;
    // A failed pass reports no counters at all (qemu-img's `collect_image_check` returns
    // before filling them), so there is no double check either.
    if let Some(e) = first.failure {
        return Ok(CheckReport {
            counts: Counts::default(),
            repaired: None,
            messages,
            failure: Some(e.message().to_string()),
        });
    }
    if c.corruptions_fixed == 0 && c.leaks_fixed == 0 {
        return Ok(CheckReport {
            counts: c,
            repaired: None,
            messages,
            failure: None,
        });
    }
    let second = pass(file, Fix::default()).await?;
    messages.extend(second.messages);
    let mut counts = second.counts;
    counts.leaks_fixed = c.leaks_fixed;
    counts.corruptions_fixed = c.corruptions_fixed;
    Ok(CheckReport {
        counts,
        repaired: Some((c.leaks_fixed, c.corruptions_fixed)),
        messages,
        failure: second.failure.map(|e| e.message().to_string()),
    })
}

/// Free the leaked clusters of the qcow2 image in `file` (`-r leaks`), before it is opened
/// after an unclean stop of a Strata session.
pub async fn repair_leaks(file: &NodeRef) -> Result<()> {
    let p = pass(file, Fix::from_mode(Some(RepairMode::Leaks))).await?;
    match p.failure {
        Some(e) => Err(Error::new(
            e.kind(),
            format!("Could not free leaked clusters: {}", e.message()),
        )),
        None => Ok(()),
    }
}

/// Repair an image whose dirty bit is set (lazy refcounts), as QEMU does when it opens such
/// an image for writing: one `-r all` pass, which also clears the dirty bit. Fails with
/// "Could not repair dirty image" if the pass hit internal errors.
pub async fn repair_dirty(file: &NodeRef) -> Result<()> {
    let p = pass(file, Fix::from_mode(Some(RepairMode::All))).await?;
    match p.failure {
        Some(e) => Err(Error::new(
            e.kind(),
            format!("Could not repair dirty image: {}", e.message()),
        )),
        None if p.counts.check_errors > 0 => Err(Error::corrupt("Could not repair dirty image")),
        None => Ok(()),
    }
}
