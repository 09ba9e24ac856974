//! qcow2 operations against qemu-img as the oracle: `commit` emptying the top image
//! (make_empty), internal snapshots, shrinking.

mod common;

use std::path::Path;

use common::*;

/// `qemu-img check` exits 0.
fn check(dir: &Path, img: &str) {
    qemu_ok(dir, &["check", img]);
}

/// Base with 0x11 in [0, 8M), top with 0x22 in [1M, 5M) and 0x33 in [20M, 23M).
fn commit_setup(dir: &Path) {
    qemu_ok(dir, &["create", "-q", "-f", "qcow2", "b.qcow2", "64M"]);
    qemu_io(dir, "qcow2", "b.qcow2", &["write -P 0x11 0 8M"]);
    qemu_ok(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", "64M",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "t.qcow2",
        &["write -P 0x22 1M 4M", "write -P 0x33 20M 3M"],
    );
}

#[test]
fn commit_empties_top_like_qemu() {
    if !have_qemu() {
        return;
    }
    let (q, s) = both(&commit_setup, &["commit", "t.qcow2"]);
    for d in [q.path(), s.path()] {
        check(d, "t.qcow2");
        qemu_io(
            d,
            "qcow2",
            "t.qcow2",
            &[
                "read -P 0x11 0 1M",
                "read -P 0x22 1M 4M",
                "read -P 0x33 20M 3M",
            ],
        );
        let map = qemu_ok(d, &["map", "--output=json", "t.qcow2"]).stdout;
        assert!(!map.contains("\"depth\": 0"), "{map}");
    }
    // The fast path rebuilds the image exactly as QEMU's make_completely_empty.
    let qt = std::fs::read(q.path().join("t.qcow2")).unwrap();
    let st = std::fs::read(s.path().join("t.qcow2")).unwrap();
    assert!(qt == st, "top images differ after commit");
}

#[test]
fn commit_with_snapshot_discards_top() {
    if !have_qemu() {
        return;
    }
    let setup = |d: &Path| {
        commit_setup(d);
        qemu_ok(d, &["snapshot", "-c", "s1", "t.qcow2"]);
        qemu_io(d, "qcow2", "t.qcow2", &["write -P 0x44 2M 1M"]);
    };
    let (q, s) = both(&setup, &["commit", "t.qcow2"]);
    for d in [q.path(), s.path()] {
        check(d, "t.qcow2");
        let map = qemu_ok(d, &["map", "--output=json", "t.qcow2"]).stdout;
        assert!(!map.contains("\"depth\": 0"), "{map}");
        qemu_io(d, "qcow2", "t.qcow2", &["read -P 0x44 2M 1M"]);
        // The snapshot keeps its clusters.
        qemu_ok(d, &["snapshot", "-a", "s1", "t.qcow2"]);
        qemu_io(d, "qcow2", "t.qcow2", &["read -P 0x22 1M 4M"]);
        check(d, "t.qcow2");
    }
}

#[test]
fn shrink_after_parallel_writes_is_clean() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    let d = d.path();
    strata_ok(d, &["create", "-q", "-f", "qcow2", "x", "64M"]);
    strata_ok(d, &["bench", "-w", "-c", "64", "-s", "1M", "-S", "1M", "x"]);
    strata_ok(d, &["resize", "--shrink", "x", "16M"]);
    let r = qemu_ok(d, &["check", "x"]);
    assert!(!r.stdout.contains("Leaked"), "{r:?}");
}

/// Data written around snapshots: 0x01 in [0, 1M) and a compressed 0x05 cluster at 4M.
fn snap_base(dir: &Path, opts: &str) {
    qemu_ok(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", opts, "s.qcow2", "64M"],
    );
    qemu_io(
        dir,
        "qcow2",
        "s.qcow2",
        &["write -P 0x01 0 1M", "write -c -P 0x05 4M 64k"],
    );
}

#[test]
fn strata_snapshots_seen_by_qemu() {
    if !have_qemu() {
        return;
    }
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "extended_l2=on",
        "refcount_bits=4",
    ] {
        let t = tmp();
        let d = t.path();
        snap_base(d, opts);
        strata_ok(d, &["snapshot", "-c", "s1", "s.qcow2"]);
        check(d, "s.qcow2");
        qemu_io(
            d,
            "qcow2",
            "s.qcow2",
            &["write -P 0x02 0 512k", "write -P 0x06 4M 64k"],
        );
        check(d, "s.qcow2");
        strata_ok(d, &["snapshot", "-c", "s2", "s.qcow2"]);
        check(d, "s.qcow2");
        // Same listing from both tools (ID, name, sizes, date).
        let q = qemu_ok(d, &["snapshot", "-l", "s.qcow2"]);
        let s = strata_ok(d, &["snapshot", "-l", "s.qcow2"]);
        assert_eq!(s.stdout, q.stdout, "{opts}");
        assert!(q.stdout.contains("s1") && q.stdout.contains("s2"), "{q:?}");
        qemu_ok(d, &["snapshot", "-a", "s1", "s.qcow2"]);
        qemu_io(
            d,
            "qcow2",
            "s.qcow2",
            &["read -P 0x01 0 1M", "read -P 0x05 4M 64k"],
        );
        check(d, "s.qcow2");
        qemu_ok(d, &["snapshot", "-d", "s1", "s.qcow2"]);
        check(d, "s.qcow2");
        qemu_ok(d, &["snapshot", "-a", "s2", "s.qcow2"]);
        qemu_io(
            d,
            "qcow2",
            "s.qcow2",
            &[
                "read -P 0x02 0 512k",
                "read -P 0x01 512k 512k",
                "read -P 0x06 4M 64k",
            ],
        );
        check(d, "s.qcow2");
    }
}

#[test]
fn qemu_snapshots_applied_and_deleted_by_strata() {
    if !have_qemu() {
        return;
    }
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "extended_l2=on",
        "lazy_refcounts=on",
    ] {
        let t = tmp();
        let d = t.path();
        snap_base(d, opts);
        qemu_ok(d, &["snapshot", "-c", "a", "s.qcow2"]);
        qemu_io(d, "qcow2", "s.qcow2", &["write -P 0x02 0 2M"]);
        qemu_ok(d, &["snapshot", "-c", "b", "s.qcow2"]);
        qemu_io(
            d,
            "qcow2",
            "s.qcow2",
            &["write -P 0x03 1M 2M", "write -z 4M 64k"],
        );
        strata_ok(d, &["snapshot", "-a", "a", "s.qcow2"]);
        check(d, "s.qcow2");
        qemu_io(
            d,
            "qcow2",
            "s.qcow2",
            &[
                "read -P 0x01 0 1M",
                "read -P 0 1M 3M",
                "read -P 0x05 4M 64k",
            ],
        );
        // Writes after the apply must not touch the snapshots' clusters.
        qemu_io(d, "qcow2", "s.qcow2", &["write -P 0x07 0 64k"]);
        check(d, "s.qcow2");
        strata_ok(d, &["snapshot", "-d", "a", "s.qcow2"]);
        check(d, "s.qcow2");
        // Apply by ID.
        strata_ok(d, &["snapshot", "-a", "2", "s.qcow2"]);
        check(d, "s.qcow2");
        qemu_io(d, "qcow2", "s.qcow2", &["read -P 0x02 0 2M"]);
        strata_ok(d, &["snapshot", "-d", "b", "s.qcow2"]);
        let r = qemu_ok(d, &["check", "s.qcow2"]);
        assert!(!r.stdout.contains("Leaked"), "{r:?}");
        let l = qemu_ok(d, &["snapshot", "-l", "s.qcow2"]);
        assert_eq!(l.stdout, "", "{opts}");
        qemu_io(d, "qcow2", "s.qcow2", &["read -P 0x02 0 2M"]);
    }
}

#[test]
fn snapshot_errors_like_qemu() {
    if !have_qemu() {
        return;
    }
    let setup = |d: &Path| {
        qemu_ok(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"]);
        qemu_ok(d, &["snapshot", "-c", "a", "s.qcow2"]);
    };
    both(&setup, &["snapshot", "-a", "nope", "s.qcow2"]);
    both(&setup, &["snapshot", "-d", "nope", "s.qcow2"]);
    // qemu-img deletes by name only.
    both(&setup, &["snapshot", "-d", "1", "s.qcow2"]);
    let df = |d: &Path| {
        qemu_ok(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=s.raw",
                "s.qcow2",
                "1M",
            ],
        );
    };
    both(&df, &["snapshot", "-c", "a", "s.qcow2"]);
    // One-bit refcounts cannot share clusters.
    let rc1 = |d: &Path| {
        qemu_ok(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=1",
                "s.qcow2",
                "1M",
            ],
        );
        qemu_io(d, "qcow2", "s.qcow2", &["write 0 64k"]);
    };
    both(&rc1, &["snapshot", "-c", "a", "s.qcow2"]);
}

/// A 4M image with data, zero clusters (plain and allocated) and an internal snapshot.
fn amend_setup(dir: &Path, create_opts: &str, snapshot: bool) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !create_opts.is_empty() {
        args.extend(["-o", create_opts]);
    }
    args.extend(["a.qcow2", "4M"]);
    qemu_ok(dir, &args);
    qemu_io(
        dir,
        "qcow2",
        "a.qcow2",
        &[
            "write -P 7 0 1M",
            "write -z 1M 1M",
            "write -P 8 3M 64k",
            "write -z 3M 64k",
        ],
    );
    if snapshot {
        qemu_ok(dir, &["snapshot", "-c", "s", "a.qcow2"]);
        qemu_io(dir, "qcow2", "a.qcow2", &["write -P 9 0 512k"]);
    }
}

/// `qemu-img info` without the lines that name the directory, depend on allocation or on
/// when the snapshots were taken (the snapshot rows).
fn info_of(dir: &Path) -> String {
    let out = qemu_ok(dir, &["info", "a.qcow2"]).stdout;
    let mut in_snapshots = false;
    let mut kept = Vec::new();
    for l in out.lines() {
        if l.starts_with("Snapshot list:") {
            in_snapshots = true;
        } else if !l.starts_with(|c: char| c.is_ascii_digit() || c == 'I') {
            in_snapshots = false;
        }
        if in_snapshots || l.contains("a.qcow2") || l.contains("disk size") || l.contains("length")
        {
            continue;
        }
        kept.push(l);
    }
    kept.join("\n")
}

#[test]
fn amend_like_qemu() {
    if !have_qemu() {
        return;
    }
    // (create options, amend options, byte-identical result expected)
    let cases = [
        ("", "compat=0.10", true),
        ("compat=0.10", "compat=1.1", true),
        ("", "lazy_refcounts=on", true),
        ("lazy_refcounts=on", "lazy_refcounts=off", true),
        ("compression_type=zstd", "compat=v2", true),
        ("", "size=8M", true),
        ("", "refcount_bits=1", false),
        ("", "refcount_bits=64", false),
        ("refcount_bits=2", "refcount_bits=16", false),
    ];
    for snapshot in [false, true] {
        for (create, amend, identical) in cases {
            // With a snapshot, the cases that walk or rebuild metadata.
            if snapshot && !matches!(amend, "compat=0.10" | "compat=1.1" | "refcount_bits=64") {
                continue;
            }
            let setup = |d: &Path| amend_setup(d, create, snapshot);
            let (q, s) = both(&setup, &["amend", "-o", amend, "a.qcow2"]);
            check(s.path(), "a.qcow2");
            assert_eq!(info_of(q.path()), info_of(s.path()), "{create} -> {amend}");
            if identical && !snapshot {
                let qa = std::fs::read(q.path().join("a.qcow2")).unwrap();
                let sa = std::fs::read(s.path().join("a.qcow2")).unwrap();
                assert!(qa == sa, "{create} -> {amend}: images differ");
            }
            let d = s.path();
            let first = if snapshot {
                "read -P 9 0 512k"
            } else {
                "read -P 7 0 512k"
            };
            qemu_io(
                d,
                "qcow2",
                "a.qcow2",
                &[first, "read -P 7 512k 512k", "read -P 0 1M 3M"],
            );
            if snapshot {
                qemu_ok(d, &["snapshot", "-a", "s", "a.qcow2"]);
                qemu_io(d, "qcow2", "a.qcow2", &["read -P 7 0 1M"]);
                check(d, "a.qcow2");
            }
        }
    }
}

#[test]
fn amend_errors_like_qemu() {
    if !have_qemu() {
        return;
    }
    let cases = [
        ("refcount_bits=1", "compat=0.10"),
        ("", "refcount_bits=3"),
        ("", "lazy_refcounts=on,compat=0.10"),
        ("compat=0.10", "refcount_bits=8"),
        ("extended_l2=on", "compat=0.10"),
        ("", "data_file=x"),
        ("", "data_file_raw=on"),
        ("", "encrypt.keyslot=1"),
        ("", "compat=0.9"),
        ("", "cluster_size=4k"),
    ];
    for (create, amend) in cases {
        let setup = |d: &Path| amend_setup(d, create, false);
        let (q, s) = both(&setup, &["amend", "-o", amend, "a.qcow2"]);
        let qa = std::fs::read(q.path().join("a.qcow2")).unwrap();
        let sa = std::fs::read(s.path().join("a.qcow2")).unwrap();
        assert!(qa == sa, "{create} -> {amend}: images differ");
    }
    // Refcounts that do not fit the new width.
    let setup = |d: &Path| {
        amend_setup(d, "", false);
        qemu_ok(d, &["snapshot", "-c", "s", "a.qcow2"]);
        qemu_ok(d, &["snapshot", "-c", "t", "a.qcow2"]);
    };
    both(&setup, &["amend", "-o", "refcount_bits=1", "a.qcow2"]);
}

/// The image with the creation times in its snapshot table zeroed.
fn without_dates(path: &Path) -> Vec<u8> {
    let mut d = std::fs::read(path).unwrap();
    let be32 = |d: &[u8], o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap());
    let nb = be32(&d, 60) as usize;
    let mut off = u64::from_be_bytes(d[64..72].try_into().unwrap()) as usize;
    for _ in 0..nb {
        d[off + 16..off + 24].fill(0);
        let id = u16::from_be_bytes([d[off + 12], d[off + 13]]) as usize;
        let name = u16::from_be_bytes([d[off + 14], d[off + 15]]) as usize;
        let extra = be32(&d, off + 36) as usize;
        off += (40 + extra + id + name).next_multiple_of(8);
    }
    d
}

#[test]
fn snapshot_sequence_matches_qemu_bytes() {
    if !have_qemu() {
        return;
    }
    let q = tmp();
    let s = tmp();
    for (dir, tool) in [(q.path(), "qemu"), (s.path(), "strata")] {
        let snap = |args: &[&str]| {
            let mut a = vec!["snapshot"];
            a.extend(args);
            a.push("s.qcow2");
            if tool == "qemu" {
                qemu_ok(dir, &a);
            } else {
                strata_ok(dir, &a);
            }
        };
        qemu_ok(dir, &["create", "-q", "-f", "qcow2", "s.qcow2", "4M"]);
        qemu_io(
            dir,
            "qcow2",
            "s.qcow2",
            &["write -P 1 0 1M", "write -c -P 4 2M 64k"],
        );
        snap(&["-c", "s1"]);
        qemu_io(dir, "qcow2", "s.qcow2", &["write -P 2 0 64k"]);
        snap(&["-c", "s22"]);
        snap(&["-a", "s1"]);
        qemu_io(dir, "qcow2", "s.qcow2", &["write -P 3 512k 64k"]);
        snap(&["-c", "s3"]);
        snap(&["-d", "s1"]);
        snap(&["-a", "s22"]);
        snap(&["-d", "s3"]);
        check(dir, "s.qcow2");
    }
    let a = without_dates(&q.path().join("s.qcow2"));
    let b = without_dates(&s.path().join("s.qcow2"));
    assert!(a == b, "images differ beyond the snapshot dates");
}

/// `bench -w` writes the same clusters as qemu-img 10.0.2, which wraps the request offset at
/// the image size (not at `size - bufsize` as QEMU master does): all 64 MiB, not 63.
#[test]
fn bench_wraps_like_qemu_img_10_0() {
    if !have_qemu() {
        return;
    }
    // Run `bench -w ARGS` on a fresh 64M image with each tool; (map, allocation line of
    // `check`) for qemu-img and for strata.
    let run = |args: &[&str]| -> Vec<(String, String)> {
        [false, true]
            .into_iter()
            .map(|use_strata| {
                let t = tmp();
                let d = t.path();
                qemu_ok(d, &["create", "-q", "-f", "qcow2", "x", "64M"]);
                let mut cmd = vec!["bench", "-w"];
                cmd.extend_from_slice(args);
                cmd.push("x");
                if use_strata {
                    strata_ok(d, &cmd);
                } else {
                    qemu_ok(d, &cmd);
                }
                let chk = qemu_ok(d, &["check", "x"]).stdout;
                let alloc = chk.lines().find(|l| l.contains("allocated")).unwrap_or("");
                let alloc = alloc.split(',').next().unwrap().to_string();
                let map = qemu_ok(d, &["map", "--output=json", "x"]).stdout;
                (map, alloc)
            })
            .collect()
    };
    // In parallel the host offsets depend on completion order: compare what is allocated.
    let r = run(&["-c", "64", "-s", "1M", "-S", "1M"]);
    assert_eq!(r[0].1, "1024/1024 = 100.00% allocated");
    assert_eq!(r[1].1, r[0].1);
    // One request at a time: the maps are the same byte for byte.
    for args in [
        &["-c", "64", "-d", "1", "-s", "1M", "-S", "1M"][..],
        &["-c", "80", "-d", "1", "-s", "1M", "-S", "3M"][..],
        &["-c", "5", "-d", "1", "-s", "1M", "-S", "1536K", "-o", "2M"][..],
    ] {
        let r = run(args);
        assert_eq!(r[1], r[0], "bench {args:?}");
    }
    // A wrapped request that runs past the end fails as qemu-img's does.
    let setup = |d: &Path| {
        qemu_ok(d, &["create", "-q", "-f", "qcow2", "x", "4M"]);
    };
    both(
        &setup,
        &["bench", "-w", "-c", "2", "-s", "1M", "-S", "3584K", "x"],
    );
}

/// base 0x11 in [0, 4M) <- mid 0x22 in [1M, 3M), 0x33 in [5M, 5M+100k) <- top 0x44 in
/// [1.5M, 1.5M+64k); `top0.qcow2` is a copy of the untouched top.
fn rebase_c_setup(d: &Path) {
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 4M"]);
    for (img, back) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        qemu_ok(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-b", back, "-F", "qcow2", img,
            ],
        );
    }
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &["write -P 0x22 1M 2M", "write -P 0x33 5M 100k"],
    );
    qemu_io(d, "qcow2", "top.qcow2", &["write -P 0x44 1536k 64k"]);
    std::fs::copy(d.join("top.qcow2"), d.join("top0.qcow2")).unwrap();
}

/// `rebase -c` writes the copied data as compressed clusters, like qemu-img.
#[test]
fn rebase_compressed_like_qemu() {
    if !have_qemu() {
        return;
    }
    let (q, s) = both(
        &rebase_c_setup,
        &[
            "rebase",
            "-c",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let maps: Vec<String> = [&q, &s]
        .into_iter()
        .map(|t| {
            let d = t.path();
            check(d, "top.qcow2");
            assert_eq!(qemu_compare(d, "top0.qcow2", "top.qcow2"), 0);
            qemu_ok(d, &["map", "--output=json", "top.qcow2"]).stdout
        })
        .collect();
    assert_eq!(maps[1], maps[0]);
    // mid's data now lives in top, compressed; top's own cluster stays plain.
    assert!(
        maps[1].contains(
            "{ \"start\": 1048576, \"length\": 524288, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": true}"
        ),
        "{}",
        maps[1]
    );
    qemu_io(
        s.path(),
        "qcow2",
        "top.qcow2",
        &[
            "read -P 0x22 1M 512k",
            "read -P 0x44 1536k 64k",
            "read -P 0x33 5M 100k",
        ],
    );
    // Not qcow2: refused as qemu-img does.
    let setup = |d: &Path| {
        qemu_ok(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    };
    both(&setup, &["rebase", "-c", "-f", "raw", "-b", "", "r.raw"]);
}
