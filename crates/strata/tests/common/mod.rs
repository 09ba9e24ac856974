//! Helpers for running `strata` and `qemu-img` side by side on the same images.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Result of one run: exit status, stdout, stderr (tool name normalised to "strata").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn finish(out: Output) -> Run {
    let norm = |b: &[u8]| String::from_utf8_lossy(b).replace("qemu-img", "strata");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: norm(&out.stdout),
        stderr: norm(&out.stderr),
    }
}

/// Whether qemu-img is installed (tests that compare with it are skipped otherwise).
pub fn have_qemu() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run `strata args...` in `dir`.
pub fn strata(dir: &Path, args: &[&str]) -> Run {
    finish(
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .current_dir(dir)
            .env("TZ", "UTC")
            .output()
            .expect("run strata"),
    )
}

/// Run `qemu-img args...` in `dir`.
pub fn qemu(dir: &Path, args: &[&str]) -> Run {
    finish(
        Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .env("TZ", "UTC")
            .output()
            .expect("run qemu-img"),
    )
}

/// Run `qemu-io -c cmd... file` in `dir` and require success.
pub fn qemu_io(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(file).output().expect("run qemu-io");
    assert!(out.status.success(), "qemu-io {cmds:?} {file}: {out:?}");
}

/// Run qemu-img and require success.
pub fn qemu_ok(dir: &Path, args: &[&str]) -> Run {
    let r = qemu(dir, args);
    assert_eq!(r.code, 0, "qemu-img {args:?}: {r:?}");
    r
}

/// Run strata and require success.
pub fn strata_ok(dir: &Path, args: &[&str]) -> Run {
    let r = strata(dir, args);
    assert_eq!(r.code, 0, "strata {args:?}: {r:?}");
    r
}

/// Run the same command with both tools in the same directory and require identical
/// results (for commands that do not change the images).
pub fn same(dir: &Path, args: &[&str]) -> Run {
    let q = qemu(dir, args);
    let s = strata(dir, args);
    assert_eq!(s, q, "strata vs qemu-img for {args:?}");
    s
}

/// A fresh temporary directory.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Path of `name` inside `dir`, as a string.
pub fn p(dir: &Path, name: &str) -> String {
    let path: PathBuf = dir.join(name);
    path.to_string_lossy().into_owned()
}

/// `qemu-img compare` exit status of two images.
pub fn qemu_compare(dir: &Path, a: &str, b: &str) -> i32 {
    qemu(dir, &["compare", a, b]).code
}

/// Run `args` with qemu-img in one directory and with strata in another (both prepared by
/// `setup`), require the same stdout/stderr/status, and return both directories
/// (qemu-img's first).
pub fn both(setup: &dyn Fn(&Path), args: &[&str]) -> (tempfile::TempDir, tempfile::TempDir) {
    let q = tmp();
    let s = tmp();
    setup(q.path());
    setup(s.path());
    let rq = qemu(q.path(), args);
    let rs = strata(s.path(), args);
    assert_eq!(rs, rq, "strata vs qemu-img for {args:?}");
    (q, s)
}

/// A `setup` for [`both`] that prepares nothing.
pub fn nothing(_: &Path) {}
