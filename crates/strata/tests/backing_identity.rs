//! Backing-file validation (`strata_qcow2::identity`): an overlay Strata made remembers its
//! backing file, and a backing file changed since is a clear error (a warning when only
//! "cannot tell"), while QEMU's tools keep reading and checking every image Strata wrote.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

/// Run strata with `STRATA_BACKING_CHECK` set.
fn strata_env(dir: &Path, check: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .current_dir(dir)
        .env("STRATA_BACKING_CHECK", check)
        .output()
        .expect("run strata");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Open `img` with its chain (a full read).
fn read_all(d: &Path, img: &str) -> Run {
    strata(d, &["convert", "-O", "raw", img, "out.raw"])
}

/// Write into `base.qcow2` in a Strata session: commit a throwaway overlay into it.
fn strata_writes_base(d: &Path, pattern: u8) {
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "w.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "w.qcow2",
        &[&format!("write -P {pattern} 1M 64k")],
    );
    strata_ok(d, &["commit", "-q", "w.qcow2"]);
    std::fs::remove_file(d.join("w.qcow2")).unwrap();
}

fn overlay(d: &Path, name: &str, backing: &str, fmt: &str) {
    strata_ok(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, name,
        ],
    );
}

/// QEMU reads and checks every image (the extensions and autoclear bit are ignored safely).
fn qemu_accepts(d: &Path, images: &[&str]) {
    for img in images {
        qemu_ok(d, &["check", "-q", img]);
        qemu_ok(d, &["info", "-U", img]);
        qemu_io(d, "qcow2", img, &["read 0 64k"]);
    }
}

#[test]
fn commit_keeps_its_chain_and_fails_the_siblings() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 1 0 4M"]);
    overlay(d, "top.qcow2", "base.qcow2", "qcow2");
    overlay(d, "sib.qcow2", "base.qcow2", "qcow2");
    assert_eq!(read_all(d, "top.qcow2").code, 0, "reopen as made");

    // Commit top into base: top (re-recorded) still opens, the sibling must not.
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 7 0 64k"]);
    strata_ok(d, &["commit", "-q", "top.qcow2"]);
    let r = read_all(d, "top.qcow2");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stderr, "");
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["read -P 7 0 64k", "read -P 1 64k 64k"],
    );
    let r = read_all(d, "sib.qcow2");
    assert_eq!(r.code, 1);
    assert_eq!(
        r.stderr,
        "strata: Could not open 'sib.qcow2': Backing file 'base.qcow2' of 'sib.qcow2' changed \
         since the overlay was created (written by a Strata session since: generation 1); \
         reading through it would show corrupt data. If that is intended, record the new \
         backing with: strata rebase -u -b base.qcow2 -F qcow2 sib.qcow2\n"
    );

    // check reports it (status 2); info reports it on stderr and succeeds.
    let r = strata(d, &["check", "sib.qcow2"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(r.stdout, qemu(d, &["check", "sib.qcow2"]).stdout);
    assert!(
        r.stderr
            .starts_with("ERROR Backing file 'base.qcow2' of 'sib.qcow2' changed")
    );
    let r = strata(d, &["info", "sib.qcow2"]);
    assert_eq!(r.code, 0);
    assert_eq!(
        r.stdout,
        qemu(d, &["info", "sib.qcow2"])
            .stdout
            .replace("qemu-img", "strata")
    );
    assert!(
        r.stderr
            .contains("[recorded: qcow2, virtual size 4194304, no valid generation]")
    );
    // The escape hatches.
    assert_eq!(
        strata_env(d, "off", &["convert", "-O", "raw", "sib.qcow2", "o.raw"]).code,
        0
    );
    let r = strata(d, &["convert", "-U", "-O", "raw", "sib.qcow2", "o.raw"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stderr
            .starts_with("warning: Backing file 'base.qcow2' of 'sib.qcow2' changed")
    );

    // rebase -u accepts the backing as it is now.
    strata_ok(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "sib.qcow2",
        ],
    );
    assert_eq!(read_all(d, "sib.qcow2").code, 0);
    assert_eq!(strata(d, &["check", "sib.qcow2"]).code, 0);

    // Recorded with a valid generation: another Strata session writing the base is caught.
    overlay(d, "late.qcow2", "base.qcow2", "qcow2");
    assert_eq!(read_all(d, "late.qcow2").code, 0);
    strata_writes_base(d, 9);
    let r = read_all(d, "late.qcow2");
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(
            "changed since the overlay was created (written by another session: generation 2, \
             recorded 1)"
        ),
        "{r:?}"
    );
    qemu_accepts(d, &["base.qcow2", "top.qcow2", "sib.qcow2", "late.qcow2"]);
}

#[test]
fn qemu_writes_warn_and_resizes_fail() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    strata_writes_base(d, 3);
    overlay(d, "top.qcow2", "base.qcow2", "qcow2");
    assert_eq!(read_all(d, "top.qcow2").stderr, "");

    // qemu-io opened the base read-write: Strata cannot tell, so it warns.
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 5 0 64k"]);
    let r = read_all(d, "top.qcow2");
    assert_eq!(r.code, 0);
    assert_eq!(
        r.stderr,
        "warning: Backing file 'base.qcow2' of 'top.qcow2' may have changed since the overlay \
         was created (another program opened it read-write since, so Strata cannot tell \
         whether it changed). To accept it as it is: strata rebase -u -b base.qcow2 -F qcow2 \
         top.qcow2\n"
    );
    assert_eq!(strata(d, &["check", "-q", "top.qcow2"]).code, 0);

    // A resized base is an error.
    qemu_ok(d, &["resize", "-q", "base.qcow2", "8M"]);
    let r = read_all(d, "top.qcow2");
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("(virtual size 8388608, recorded 4194304)"),
        "{r:?}"
    );
    qemu_accepts(d, &["base.qcow2", "top.qcow2"]);
}

#[test]
fn raw_backing_files_are_recorded_by_size_and_mtime() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    std::fs::write(d.join("base.raw"), vec![1u8; 1 << 20]).unwrap();
    overlay(d, "top.qcow2", "base.raw", "raw");
    assert_eq!(read_all(d, "top.qcow2").code, 0);
    // Images without a record behave as before, whatever happens to the backing.
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "plain.qcow2",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(d.join("base.raw"), vec![2u8; 1 << 20]).unwrap();
    let r = read_all(d, "top.qcow2");
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("changed since the overlay was created (modified at"),
        "{r:?}"
    );
    assert_eq!(read_all(d, "plain.qcow2").code, 0);
    qemu_accepts(d, &["top.qcow2", "plain.qcow2"]);
}
