//! kill -9 sweep of offline `strata` commands.
//!
//! Each kill point builds a fresh chain — `base.qcow2` with generation 1 in every sector and
//! `top.qcow2` over it with generation 2 in a seeded random half of its sectors — starts the
//! command, sends SIGKILL after a seeded random delay within the command's measured run
//! time, then checks with `qemu-img`:
//! * `qemu-img check` of every image exits 0, or 3 (leaks only, counted apart);
//! * every sector of the guest view reads back intact and from its own offset;
//! * the view is what it was before: a job never changes the view of the active layer. For
//!   `commit` the base alone may, per sector, hold its old data or the top's (QEMU's commit
//!   copies cluster by cluster and gives no more); for `convert` each sector of the
//!   (partial) output holds the source's data or zeroes (not yet copied).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_testkit::Xorshift;

use crate::Tally;
use crate::pattern::{SECTOR, check_sector, fill};

const DISK: u64 = 8 << 20;
const SECTORS: usize = (DISK as usize) / SECTOR;

/// The operations swept, by name.
pub const OPERATIONS: &[&str] = &["convert", "commit", "rebase", "resize", "amend"];

/// The `strata` binary of the workspace's debug build (`$CARGO_TARGET_DIR` if set, as
/// `scripts/test.sh` builds it there before the tests run).
pub fn strata_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("debug/strata")
}

fn sh(cmd: &str, args: &[&str]) -> Result<std::process::Output, String> {
    Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> Result<(), String> {
    let o = sh(cmd, args)?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Per sector: the generation in the base and in the top's view.
struct Chain {
    top_view: Vec<u64>,
}

fn build_chain(dir: &Path, rng: &mut Xorshift) -> Result<Chain, String> {
    let mut raw = vec![0u8; DISK as usize];
    fill(&mut raw, 0, 1);
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    std::fs::write(p("base.raw"), &raw).map_err(|e| e.to_string())?;
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p("base.raw"),
            &p("base.qcow2"),
        ],
    )?;
    let mut top_view = vec![1u64; SECTORS];
    // Whole 64 KiB clusters so the top allocates only what it changes.
    for c in 0..(DISK / 65536) as usize {
        if rng.next() & 1 == 0 {
            let off = c * 65536;
            fill(&mut raw[off..off + 65536], off as u64, 2);
            top_view[off / SECTOR..(off + 65536) / SECTOR].fill(2);
        }
    }
    std::fs::write(p("top.raw"), &raw).map_err(|e| e.to_string())?;
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-F",
            "qcow2",
            "-B",
            &p("base.qcow2"),
            &p("top.raw"),
            &p("top.qcow2"),
        ],
    )?;
    // A second base with different data, for rebase.
    fill(&mut raw, 0, 3);
    std::fs::write(p("new.raw"), &raw).map_err(|e| e.to_string())?;
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p("new.raw"),
            &p("new.qcow2"),
        ],
    )?;
    Ok(Chain { top_view })
}

fn op_args(op: &str, dir: &Path) -> Vec<String> {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let v: &[&str] = match op {
        "convert" => &["convert", "-O", "qcow2", "TOP", "OUT"],
        "commit" => &["commit", "TOP"],
        "rebase" => &["rebase", "-F", "qcow2", "-b", "NEW", "TOP"],
        "resize" => &["resize", "TOP", "+64M"],
        _ => &["amend", "-o", "compat=0.10", "TOP"],
    };
    v.iter()
        .map(|a| match *a {
            "TOP" => p("top.qcow2"),
            "OUT" => p("out.qcow2"),
            "NEW" => p("new.qcow2"),
            s => s.to_string(),
        })
        .collect()
}

/// The restart: a read-write open by Strata, which repairs the refcounts of an image left
/// with the dirty bit set (as QEMU does). Done in-process on a copy, written back.
fn strata_reopen(img: &Path) -> Result<(), String> {
    let Ok(bytes) = std::fs::read(img) else {
        return Ok(());
    };
    let dirty = bytes.len() >= 80 && bytes[..4] == *b"QFI\xfb" && bytes[79] & 1 != 0;
    if !dirty {
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    let mem = std::sync::Arc::new(strata_core::mem::MemNode::with_data(bytes));
    rt.block_on(async {
        let file: strata_core::NodeRef = mem.clone();
        let opts = strata_qcow2::OpenOptions::default();
        let q = strata_qcow2::Qcow2::open(file, &opts, None, None)
            .await
            .map_err(|e| format!("strata open of {}: {e}", img.display()))?;
        strata_core::BlockNode::close(&*q)
            .await
            .map_err(|e| e.to_string())
    })?;
    std::fs::write(img, mem.snapshot()).map_err(|e| e.to_string())
}

/// `qemu-img check` of `img` after the restart: Ok(true) for leaks only.
fn qemu_check(img: &Path) -> Result<bool, String> {
    strata_reopen(img)?;
    let o = sh("qemu-img", &["check", &img.to_string_lossy()])?;
    match o.status.code() {
        Some(0) => Ok(false),
        Some(3) => Ok(true),
        c => Err(format!(
            "qemu-img check {} exit {c:?}: {}",
            img.display(),
            String::from_utf8_lossy(&o.stdout).trim()
        )),
    }
}

fn view(img: &Path, dir: &Path) -> Result<Vec<u8>, String> {
    let out = dir.join("view.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &img.to_string_lossy(),
            &out.to_string_lossy(),
        ],
    )?;
    let mut v = std::fs::read(&out).map_err(|e| e.to_string())?;
    v.truncate(DISK as usize);
    Ok(v)
}

fn check_view(v: &[u8], allowed: impl Fn(usize) -> Vec<u64>) -> Result<(), String> {
    for (i, s) in v.chunks(SECTOR).enumerate() {
        if let Some(e) = check_sector(s, i as u64, &allowed(i)) {
            return Err(e);
        }
    }
    Ok(())
}

/// Time one uninterrupted run of `op`.
fn measure(op: &str, dir: &Path, rng: &mut Xorshift) -> Result<Duration, String> {
    build_chain(dir, rng)?;
    let t = Instant::now();
    let o = Command::new(strata_bin())
        .args(op_args(op, dir))
        .output()
        .map_err(|e| format!("strata: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "strata {op}: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(t.elapsed())
}

/// Sweep `op` with `points` kill points from `seed`.
pub fn sweep(op: &str, seed: u64, points: u64) -> Tally {
    let mut tally = Tally::default();
    let mut rng = Xorshift::new(seed);
    let Ok(tmp) = tempfile::tempdir() else {
        tally.failures.push("no temporary directory".into());
        return tally;
    };
    let dir = tmp.path();
    let run_time = match measure(op, dir, &mut rng) {
        Ok(t) => t,
        Err(e) => {
            tally.failures.push(format!("{op} seed {seed}: {e}"));
            return tally;
        }
    };
    for k in 0..points {
        let point_seed = rng.next();
        if let Err(e) = kill_point(op, dir, point_seed, run_time, &mut tally) {
            tally
                .failures
                .push(format!("{op} seed {seed} point {k} ({point_seed:#x}): {e}"));
        }
        tally.states += 1;
    }
    tally
}

fn kill_point(
    op: &str,
    dir: &Path,
    point_seed: u64,
    run_time: Duration,
    tally: &mut Tally,
) -> Result<(), String> {
    let mut rng = Xorshift::new(point_seed);
    let _ = std::fs::remove_file(dir.join("out.qcow2"));
    let chain = build_chain(dir, &mut rng)?;
    let delay = Duration::from_nanos(rng.next() % (run_time.as_nanos() as u64 + 1));
    let mut child = Command::new(strata_bin())
        .args(op_args(op, dir))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    std::thread::sleep(delay);
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    let top = dir.join("top.qcow2");
    let base = dir.join("base.qcow2");
    let mut leaks = false;
    // Check errors are reported after the data checks, so both are always looked at.
    let mut check_errors = Vec::new();
    let mut checked = |img: &Path, leaks: &mut bool| match qemu_check(img) {
        Ok(l) => *leaks |= l,
        Err(e) => check_errors.push(e),
    };
    checked(&top, &mut leaks);
    checked(&base, &mut leaks);
    match op {
        "convert" => {
            let out = dir.join("out.qcow2");
            if out.exists()
                && sh("qemu-img", &["info", &out.to_string_lossy()])?
                    .status
                    .success()
            {
                checked(&out, &mut leaks);
                let v = view(&out, dir)?;
                check_view(&v, |i| vec![0, chain.top_view[i]])
                    .map_err(|e| format!("output: {e}"))?;
            }
        }
        "commit" => {
            let v = view(&base, dir)?;
            check_view(&v, |i| vec![1, chain.top_view[i]]).map_err(|e| format!("base: {e}"))?;
        }
        _ => {}
    }
    let v = view(&top, dir)?;
    check_view(&v, |i| vec![chain.top_view[i]]).map_err(|e| format!("top: {e}"))?;
    if !check_errors.is_empty() {
        return Err(check_errors.join("; "));
    }
    if leaks {
        tally.leaks_only += 1;
    }
    Ok(())
}
