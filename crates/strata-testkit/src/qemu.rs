//! The qemu tools, panicking with their stderr when they fail.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::process::{KillOnDrop, wait_for_path};

/// `qemu-img args`; its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -f qcow2 -c cmd img`.
pub fn qemu_io(img: impl AsRef<Path>, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd])
        .arg(img.as_ref())
        .output()
        .expect("qemu-io runs");
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-nbd` serving `img` (format `fmt`) persistently on the unix socket `sock`, with
/// `extra` arguments first; returns once the socket exists (or after 5 s).
pub fn qemu_nbd(sock: &Path, fmt: &str, img: &Path, extra: &[&str]) -> KillOnDrop {
    let child = Command::new("qemu-nbd")
        .args(extra)
        .args(["-k", sock.to_str().unwrap(), "-f", fmt, "--persistent"])
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd runs");
    let child = KillOnDrop(child);
    wait_for_path(sock, 200);
    child
}
