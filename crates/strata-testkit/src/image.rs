//! Image builders.

use std::path::{Path, PathBuf};

use crate::qemu::{qemu_img, qemu_io};

/// `dir/name`: a qcow2 image of `size` bytes, optionally over a qcow2 `backing`, filled by
/// the `qemu-io` commands `writes`.
pub fn qcow2_image(
    dir: &Path,
    name: &str,
    size: u64,
    backing: Option<&Path>,
    writes: &[&str],
) -> PathBuf {
    let p = dir.join(name);
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let b;
    if let Some(bp) = backing {
        b = bp.to_str().unwrap().to_string();
        args.extend(["-b", &b, "-F", "qcow2"]);
    }
    let ps = p.to_str().unwrap().to_string();
    args.push(&ps);
    args.push(&size);
    qemu_img(&args);
    for w in writes {
        qemu_io(&p, w);
    }
    p
}

/// `dir/name`: a qcow2 overlay of the qcow2 image `backing`, of the same size.
pub fn qcow2_overlay(dir: &Path, name: &str, backing: &Path) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing.to_str().unwrap(),
        "-F",
        "qcow2",
        p.to_str().unwrap(),
    ]);
    p
}
