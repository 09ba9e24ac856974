//! `info`, `map`, `check`, `compare`, `snapshot -l` and `measure` on images qemu-img wrote:
//! the output must be byte-identical to qemu-img's.

mod common;
use common::*;

/// A qcow2 image with data, a backing file, internal snapshots and bitmaps, plus raw images.
fn fixture() -> tempfile::TempDir {
    let t = tmp();
    let d = t.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 2 8M 64k", "write -z 16M 1M"],
    );
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
            "top.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 3 512k 128k",
            "write -P 4 32M 4k",
            "discard 8M 64k",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,lazy_refcounts=on,refcount_bits=8",
            "small.qcow2",
            "3M",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "1M",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,compression_type=zstd",
            "ext.qcow2",
            "5M",
        ],
    );
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "snap.qcow2", "8M"]);
    qemu_io(d, "qcow2", "snap.qcow2", &["write -P 5 0 64k"]);
    qemu_ok(d, &["snapshot", "-c", "first", "snap.qcow2"]);
    qemu_ok(d, &["snapshot", "-c", "second one", "snap.qcow2"]);
    qemu_ok(d, &["bitmap", "--add", "snap.qcow2", "bm0"]);
    qemu_ok(d, &["bitmap", "--add", "-g", "128k", "snap.qcow2", "bm1"]);
    qemu_ok(d, &["bitmap", "--disable", "snap.qcow2", "bm1"]);
    qemu_ok(d, &["create", "-q", "-f", "raw", "disk.raw", "4M"]);
    qemu_io(d, "raw", "disk.raw", &["write -P 6 1M 64k"]);
    std::fs::create_dir(d.join("sub")).unwrap();
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "sub/over.qcow2",
        ],
    );
    t
}

const IMAGES: &[&str] = &[
    "base.qcow2",
    "top.qcow2",
    "small.qcow2",
    "v2.qcow2",
    "ext.qcow2",
    "snap.qcow2",
    "sub/over.qcow2",
];

#[test]
fn info_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let t = fixture();
    let d = t.path();
    for img in IMAGES {
        same(d, &["info", img]);
        same(d, &["info", "--output=json", img]);
        same(d, &["info", "-f", "qcow2", "--output", "json", img]);
        same(d, &["info", "--backing-chain", img]);
        same(d, &["info", "--backing-chain", "--output=json", "-U", img]);
    }
    same(d, &["info", "-f", "raw", "disk.raw"]);
    same(d, &["info", "-f", "raw", "--output=json", "disk.raw"]);
    same(d, &["info", "-f", "raw", "--output=json", "base.qcow2"]);
}

#[test]
fn map_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let t = fixture();
    let d = t.path();
    for img in IMAGES {
        same(d, &["map", img]);
        same(d, &["map", "--output=json", img]);
        same(
            d,
            &[
                "map",
                "-f",
                "qcow2",
                "--output=json",
                "--start-offset",
                "600k",
                "--max-length",
                "9M",
                img,
            ],
        );
    }
    same(d, &["map", "-f", "raw", "disk.raw"]);
    same(d, &["map", "-f", "raw", "--output=json", "disk.raw"]);
}

#[test]
fn check_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let t = fixture();
    let d = t.path();
    for img in IMAGES {
        same(d, &["check", img]);
        same(d, &["check", "--output=json", img]);
    }
    same(d, &["check", "-q", "top.qcow2"]);
    let r = same(d, &["check", "-f", "raw", "disk.raw"]);
    assert_eq!(r.code, 63);
}

#[test]
fn compare_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let t = fixture();
    let d = t.path();
    qemu_ok(d, &["convert", "-O", "raw", "top.qcow2", "top.raw"]);
    qemu_ok(d, &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"]);
    assert_eq!(same(d, &["compare", "top.qcow2", "top.raw"]).code, 0);
    assert_eq!(
        same(
            d,
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
                "flat.qcow2"
            ]
        )
        .code,
        0
    );
    assert_eq!(same(d, &["compare", "base.qcow2", "top.qcow2"]).code, 1);
    assert_eq!(
        same(d, &["compare", "-s", "top.qcow2", "flat.qcow2"]).code,
        1
    );
    assert_eq!(
        same(d, &["compare", "-q", "base.qcow2", "top.qcow2"]).code,
        1
    );
    assert_eq!(same(d, &["compare", "small.qcow2", "base.qcow2"]).code, 1);
    assert_eq!(same(d, &["compare", "top.qcow2", "missing.qcow2"]).code, 2);
}

#[test]
fn snapshot_list_and_measure_match_qemu() {
    if !have_qemu() {
        return;
    }
    let t = fixture();
    let d = t.path();
    same(d, &["snapshot", "-l", "snap.qcow2"]);
    same(d, &["snapshot", "snap.qcow2"]);
    same(d, &["snapshot", "-l", "base.qcow2"]);
    for out in ["human", "json"] {
        let o = format!("--output={out}");
        same(d, &["measure", &o, "--size", "1G"]);
        same(d, &["measure", &o, "-O", "qcow2", "--size", "1G"]);
        same(
            d,
            &[
                "measure",
                &o,
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                "--size",
                "100M",
            ],
        );
        same(d, &["measure", &o, "-O", "qcow2", "top.qcow2"]);
        same(d, &["measure", &o, "-O", "qcow2", "snap.qcow2"]);
        same(d, &["measure", &o, "-O", "raw", "top.qcow2"]);
        same(d, &["measure", &o, "-O", "qcow2", "-f", "raw", "disk.raw"]);
    }
}

/// Patch `bytes` at `offset` of the file `name` in `dir`.
fn poke(dir: &std::path::Path, name: &str, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

/// A big-endian u64 of the qcow2 header of `name`.
fn header_u64(dir: &std::path::Path, name: &str, at: usize) -> u64 {
    let h = std::fs::read(dir.join(name)).unwrap();
    u64::from_be_bytes(h[at..at + 8].try_into().unwrap())
}

#[test]
fn check_exit_codes_and_repair_match_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "leak.qcow2", "16M"]);
    qemu_io(d, "qcow2", "leak.qcow2", &["write -P 1 0 128k"]);
    std::fs::copy(d.join("leak.qcow2"), d.join("bad.qcow2")).unwrap();
    // A refcount for a cluster nothing uses: a leak (exit 3).
    let rt = header_u64(d, "leak.qcow2", 48);
    let rb = {
        let f = std::fs::read(d.join("leak.qcow2")).unwrap();
        u64::from_be_bytes(f[rt as usize..rt as usize + 8].try_into().unwrap())
    };
    // Grow the file by a cluster and give that cluster a refcount.
    let len = std::fs::metadata(d.join("leak.qcow2")).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("leak.qcow2"))
        .unwrap();
    f.set_len(len + 65536).unwrap();
    poke(d, "leak.qcow2", rb + len / 65536 * 2, &1u16.to_be_bytes());
    // An L1 entry pointing at an unaligned L2 table: corruption (exit 2).
    let l1 = header_u64(d, "bad.qcow2", 40);
    poke(d, "bad.qcow2", l1, &((1u64 << 63) | 0x200).to_be_bytes());
    for out in ["--output=human", "--output=json"] {
        assert_eq!(same(d, &["check", out, "leak.qcow2"]).code, 3);
        assert_eq!(same(d, &["check", out, "bad.qcow2"]).code, 2);
    }
    // Repair: run each tool on its own copy.
    for name in ["q.qcow2", "s.qcow2"] {
        std::fs::copy(d.join("leak.qcow2"), d.join(name)).unwrap();
    }
    let q = qemu(d, &["check", "-r", "leaks", "q.qcow2"]);
    let s = strata(d, &["check", "-r", "leaks", "s.qcow2"]);
    assert_eq!(s.code, q.code);
    assert_eq!(s.stdout, q.stdout.replace("q.qcow2", "s.qcow2"));
    assert_eq!(qemu(d, &["check", "s.qcow2"]).code, 0);
    // -r all cannot fix an unaligned L2 pointer: same report, same status.
    for name in ["q.qcow2", "s.qcow2"] {
        std::fs::copy(d.join("bad.qcow2"), d.join(name)).unwrap();
    }
    let q = qemu(d, &["check", "-r", "all", "q.qcow2"]);
    let s = strata(d, &["check", "-r", "all", "s.qcow2"]);
    assert_eq!((s.code, &s.stdout), (q.code, &q.stdout));
}

#[test]
fn compare_progress_records() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"]);
    qemu_io(d, "qcow2", "a.qcow2", &["write -P 1 0 1M"]);
    qemu_ok(d, &["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    let r = strata_ok(d, &["compare", "-p", "a.qcow2", "a.raw"]);
    assert!(r.stdout.starts_with("    (0.00/100%)\r"), "{:?}", r.stdout);
    assert!(
        r.stdout
            .ends_with("    (100.00/100%)\rImages are identical.\n\n"),
        "{:?}",
        r.stdout
    );
    let r = strata_ok(d, &["compare", "-p", "-q", "a.qcow2", "a.raw"]);
    assert_eq!(r.stdout, "");
}
