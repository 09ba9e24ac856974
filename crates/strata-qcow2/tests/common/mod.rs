//! Helpers for interop tests: images live in temp files for the QEMU tools and are loaded
//! into `MemNode`s for Strata (so the tests do not depend on the file protocol driver).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags};
use strata_qcow2::{CreateOptions, OpenOptions, Qcow2};

/// Run a command; returns (exit code, stdout + stderr).
pub fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd).args(args).output().expect("spawn");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

/// Run a command that must succeed; returns its output.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, s) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed: {s}");
    s
}

/// `qemu-img check` must report a clean image.
pub fn check_clean(path: &Path) {
    let (code, s) = run("qemu-img", &["check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check {}: {s}", path.display());
}

/// `qemu-io -c 'read -P pat off len'` must succeed on the image.
pub fn qemu_read_pattern(path: &Path, extra: &[&str], pat: u8, off: u64, len: u64) {
    let c = format!("read -P {pat:#x} {off} {len}");
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-c", &c, path.to_str().unwrap()]);
    let s = ok("qemu-io", &args);
    assert!(!s.contains("Pattern verification failed"), "{c}: {s}");
}

pub fn load(path: &Path) -> Arc<MemNode> {
    Arc::new(MemNode::with_data(std::fs::read(path).unwrap()))
}

pub fn save(node: &MemNode, path: &Path) {
    std::fs::write(path, node.snapshot()).unwrap();
}

pub fn node(m: &Arc<MemNode>) -> NodeRef {
    m.clone()
}

pub async fn open(
    m: &Arc<MemNode>,
    read_only: bool,
    backing: Option<NodeRef>,
    data: Option<NodeRef>,
) -> Arc<Qcow2> {
    Qcow2::open(
        node(m),
        &OpenOptions {
            read_only,
            ..Default::default()
        },
        backing,
        data,
    )
    .await
    .unwrap()
}

pub async fn create_mem(opts: &CreateOptions, data: Option<&NodeRef>) -> Arc<MemNode> {
    let m = Arc::new(MemNode::new());
    strata_qcow2::create(&node(&m), opts, data).await.unwrap();
    m
}

pub async fn write(q: &Qcow2, off: u64, data: &[u8]) {
    q.write(off, IoBuf::from_slice(data), WriteFlags::default())
        .await
        .unwrap();
}

pub async fn read(q: &Qcow2, off: u64, len: usize) -> Vec<u8> {
    q.read(off, IoBuf::zeroed(len)).await.unwrap().to_vec()
}

pub struct Dir(pub tempfile::TempDir);

impl Dir {
    pub fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
