//! Commands that write images: the results must read the same as qemu-img's (checked with
//! `qemu-img compare` and `qemu-img check`), and the messages must be qemu-img's.

mod common;
use common::*;

/// A base image with data, a middle and a top overlay, and the flattened reference.
fn chain(d: &std::path::Path) {
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 2 8M 64k", "write -P 3 60M 1M"],
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
            "mid.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &["write -P 4 4M 64k", "write -z 0 64k", "write -P 5 60M 4k"],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "100M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 9 512k 64k",
            "write -P 7 80M 64k",
            "write -z 8M 4k",
        ],
    );
    qemu_ok(d, &["convert", "-O", "raw", "top.qcow2", "ref.raw"]);
    qemu_ok(d, &["convert", "-O", "raw", "mid.qcow2", "mid.raw"]);
}

#[test]
fn create_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "a.qcow2", "1G"],
        &["create", "a.raw", "1.5M"],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            "a.raw",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=8",
            "a.qcow2",
            "100M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=v3,extended_l2=on,compression_type=zstd",
            "a.qcow2",
            "5M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,data_file=a.data",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=a.data,data_file_raw=on",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=falloc",
            "a.qcow2",
            "3M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nowhere.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
            "7M",
        ],
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=1000",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,compat=0.10",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,extended_l2=on",
            "a.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "compat=2", "a.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=lz4",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=foo",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=metadata",
            "a.raw",
            "1M",
        ],
    ];
    for args in cases {
        let (q, s) = both(&nothing, args);
        let name = args[args.len() - 2];
        let (qi, si) = (q.path().join(name), s.path().join(name));
        if qi.exists() && std::fs::metadata(&qi).unwrap().len() > 0 {
            assert!(si.exists(), "{args:?}");
            let fmt = if name.ends_with("qcow2") {
                "qcow2"
            } else {
                "raw"
            };
            if fmt == "qcow2" && !args.contains(&"-u") {
                assert_eq!(qemu(s.path(), &["check", "-q", name]).code, 0, "{args:?}");
            }
            // Same guest view and the same `info` (but for the bytes used on the host).
            let qi = qemu(q.path(), &["info", "-U", "-f", fmt, "--output=json", name]);
            let si = qemu(s.path(), &["info", "-U", "-f", fmt, "--output=json", name]);
            let strip = |t: &str| {
                t.lines()
                    .filter(|l| {
                        !l.contains("actual-size")
                            && !l.contains("virtual-size\": 1")
                            && !l.contains("\"virtual-size\": 2")
                            && !l.contains("\"virtual-size\": 3")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(strip(&si.stdout), strip(&qi.stdout), "{args:?}");
        }
    }
}

#[test]
fn create_with_backing_takes_its_size() {
    if !have_qemu() {
        return;
    }
    let setup = |d: &std::path::Path| {
        qemu_ok(d, &["create", "-q", "-f", "qcow2", "b.qcow2", "3M"]);
        std::fs::create_dir(d.join("sub")).unwrap();
    };
    both(
        &setup,
        &[
            "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2",
        ],
    );
    both(
        &setup,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "../b.qcow2",
            "-F",
            "qcow2",
            "sub/o.qcow2",
        ],
    );
    both(
        &setup,
        &["create", "-f", "qcow2", "-b", "b.qcow2", "o.qcow2"],
    );
    both(
        &setup,
        &[
            "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "raw", "o.qcow2", "1M",
        ],
    );
    let (_q, s) = both(
        &setup,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=b.qcow2,backing_fmt=qcow2",
            "o.qcow2",
        ],
    );
    same(s.path(), &["info", "o.qcow2"]);
}

#[test]
fn convert_reads_the_same() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    chain(d);
    let cases: &[&[&str]] = &[
        &["convert", "-O", "raw", "top.qcow2", "o.raw"],
        &["convert", "-O", "qcow2", "top.qcow2", "o.qcow2"],
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-c",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,compat=0.10",
            "-S",
            "0",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-m",
            "16",
            "-W",
            "-S",
            "64k",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-q",
            "-t",
            "none",
            "-T",
            "writeback",
            "-O",
            "raw",
            "ref.raw",
            "o.raw",
        ],
    ];
    for args in cases {
        let out = args[args.len() - 1];
        let _ = std::fs::remove_file(d.join(out));
        let r = strata(d, args);
        assert_eq!(
            (r.code, r.stdout.as_str(), r.stderr.as_str()),
            (0, "", ""),
            "{args:?}"
        );
        assert_eq!(qemu_compare(d, out, "ref.raw"), 0, "{args:?}");
        if out.ends_with("qcow2") {
            assert_eq!(qemu(d, &["check", "-q", out]).code, 0, "{args:?}");
        }
    }
    // -B leaves what the new backing file provides unallocated.
    strata_ok(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "o.qcow2",
        ],
    );
    let m = qemu_ok(d, &["map", "--output=json", "o.qcow2"]).stdout;
    assert!(m.contains("\"depth\": 1"), "{m}");

    // Several sources are concatenated; -n writes into an existing image.
    strata_ok(
        d,
        &[
            "convert", "-f", "raw", "-O", "raw", "mid.raw", "ref.raw", "cat.raw",
        ],
    );
    let cat = std::fs::read(d.join("cat.raw")).unwrap();
    let mut want = std::fs::read(d.join("mid.raw")).unwrap();
    want.extend(std::fs::read(d.join("ref.raw")).unwrap());
    assert!(cat == want, "concatenation differs");
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "n.qcow2", "100M"]);
    strata_ok(d, &["convert", "-n", "-O", "qcow2", "top.qcow2", "n.qcow2"]);
    assert_eq!(qemu_compare(d, "n.qcow2", "ref.raw"), 0);

    // Progress when stdout is not a terminal: qemu-img's "(NN.NN/100%)" records.
    let r = strata_ok(d, &["convert", "-p", "-O", "raw", "top.qcow2", "p.raw"]);
    assert!(r.stdout.starts_with("    (0.00/100%)\r"), "{:?}", r.stdout);
    assert!(
        r.stdout.ends_with("    (100.00/100%)\r\n"),
        "{:?}",
        r.stdout
    );
}

#[test]
fn commit_reads_the_same() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    chain(d);
    let r = strata_ok(d, &["commit", "top.qcow2"]);
    assert_eq!(r.stdout, "Image committed.\n");
    assert_eq!(qemu_compare(d, "top.qcow2", "ref.raw"), 0);
    assert_eq!(qemu_compare(d, "mid.qcow2", "ref.raw"), 0);
    assert_eq!(qemu(d, &["check", "-q", "mid.qcow2"]).code, 0);
    assert_eq!(qemu(d, &["check", "-q", "top.qcow2"]).code, 0);
    // The top was emptied: nothing is allocated in it any more.
    let m = qemu_ok(d, &["map", "--output=json", "top.qcow2"]).stdout;
    assert!(
        !m.contains("\"depth\": 0, \"present\": true, \"zero\": false"),
        "{m}"
    );

    let t = tmp();
    let d = t.path();
    chain(d);
    let r = strata_ok(d, &["commit", "-q", "-b", "base.qcow2", "top.qcow2"]);
    assert_eq!(r.stdout, "");
    assert_eq!(qemu_compare(d, "base.qcow2", "ref.raw"), 0);
    assert_eq!(qemu_compare(d, "top.qcow2", "ref.raw"), 0);
    same(d, &["commit", "-b", "nowhere.qcow2", "top.qcow2"]);
    same(d, &["commit", "base.qcow2"]);
}

#[test]
fn rebase_reads_the_same() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    chain(d);
    for f in ["t1", "t2", "t3", "t4"] {
        std::fs::copy(d.join("top.qcow2"), d.join(format!("{f}.qcow2"))).unwrap();
    }
    strata_ok(
        d,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "t1.qcow2"],
    );
    assert_eq!(qemu_compare(d, "t1.qcow2", "ref.raw"), 0);
    strata_ok(d, &["rebase", "-p", "-b", "", "t2.qcow2"]);
    assert_eq!(qemu_compare(d, "t2.qcow2", "ref.raw"), 0);
    strata_ok(
        d,
        &["rebase", "-q", "-b", "mid.qcow2", "-F", "qcow2", "t3.qcow2"],
    );
    assert_eq!(qemu_compare(d, "t3.qcow2", "ref.raw"), 0);
    for f in ["t1", "t2", "t3"] {
        assert_eq!(qemu(d, &["check", "-q", &format!("{f}.qcow2")]).code, 0);
    }
    let i = qemu_ok(d, &["info", "t2.qcow2"]).stdout;
    assert!(!i.contains("backing file"), "{i}");
    strata_ok(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "t4.qcow2",
        ],
    );
    let i = qemu_ok(d, &["info", "t4.qcow2"]).stdout;
    assert!(
        i.contains("backing file: base.qcow2\nbacking file format: qcow2\n"),
        "{i}"
    );
    same(d, &["rebase", "-F", "foo", "-b", "base.qcow2", "t4.qcow2"]);
    same(
        d,
        &["rebase", "-b", "nope.qcow2", "-F", "qcow2", "t4.qcow2"],
    );
    same(d, &["rebase", "-u", "-b", "base.qcow2", "t4.qcow2"]);
}

#[test]
fn resize_dd_amend_bench() {
    if !have_qemu() {
        return;
    }
    let setup = |d: &std::path::Path| {
        qemu_ok(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]);
        qemu_io(
            d,
            "qcow2",
            "a.qcow2",
            &["write -P 1 0 1M", "write -P 2 40M 1M"],
        );
        qemu_ok(d, &["create", "-q", "-f", "raw", "r.raw", "4M"]);
    };
    for args in [
        &["resize", "a.qcow2", "+1G"][..],
        &["resize", "-q", "a.qcow2", "128M"],
        &["resize", "-f", "raw", "r.raw", "5M"],
        &[
            "resize",
            "-f",
            "raw",
            "--preallocation=full",
            "r.raw",
            "+1M",
        ],
        &["resize", "-f", "raw", "--shrink", "r.raw", "-1M"],
        &["resize", "a.qcow2", "-1M"],
        &["resize", "a.qcow2", "--", "-64M"],
    ] {
        let (q, s) = both(&setup, args);
        let f = if args.contains(&"r.raw") {
            "r.raw"
        } else {
            "a.qcow2"
        };
        let fmt = if f.ends_with("raw") { "raw" } else { "qcow2" };
        let v = |d: &std::path::Path| qemu(d, &["info", "-f", fmt, "--output=json", f]).stdout;
        let size = |t: String| {
            t.lines()
                .filter(|l| l.starts_with("    \"virtual-size\""))
                .collect::<String>()
        };
        assert_eq!(size(v(s.path())), size(v(q.path())), "{args:?}");
        assert_eq!(
            qemu(
                s.path(),
                &["compare", "-f", fmt, "-F", fmt, f, &p(q.path(), f)]
            )
            .code,
            0,
            "{args:?}"
        );
    }
    for args in [
        &[
            "dd",
            "if=a.qcow2",
            "of=o.raw",
            "bs=64k",
            "count=100",
            "skip=3",
        ][..],
        &["dd", "-O", "qcow2", "if=a.qcow2", "of=o.qcow2", "bs=1M"],
        &["dd", "if=a.qcow2", "of=o.raw", "skip=1000000"],
    ] {
        let (q, s) = both(&setup, args);
        let out = args.iter().find_map(|a| a.strip_prefix("of=")).unwrap();
        assert_eq!(
            qemu(s.path(), &["compare", out, &p(q.path(), out)]).code,
            0,
            "{args:?}"
        );
    }
    for args in [
        &["amend", "-o", "compat=1.1", "a.qcow2"][..],
        &["amend", "-o", "size=128M", "a.qcow2"],
        &[
            "amend",
            "-o",
            "refcount_bits=16,lazy_refcounts=off",
            "a.qcow2",
        ],
        &["amend", "-o", "backing_file=r.raw", "a.qcow2"],
        &["amend", "-o", "cluster_size=4k", "a.qcow2"],
        &["amend", "-f", "raw", "-o", "size=1M", "r.raw"],
    ] {
        let (q, s) = both(&setup, args);
        assert_eq!(
            qemu(s.path(), &["compare", "a.qcow2", &p(q.path(), "a.qcow2")]).code,
            0
        );
        assert_eq!(qemu(s.path(), &["check", "-q", "a.qcow2"]).code, 0);
    }
    let t = tmp();
    let d = t.path();
    setup(d);
    let r = strata_ok(
        d,
        &["bench", "-c", "2000", "-d", "8", "-s", "4k", "a.qcow2"],
    );
    assert!(r.stdout.starts_with(
        "Sending 2000 read requests, 4096 bytes each, 8 in parallel (starting at offset 0, step size 4096)\nRun completed in "
    ), "{}", r.stdout);
    let r = strata_ok(
        d,
        &[
            "bench",
            "-w",
            "-c",
            "64",
            "-d",
            "4",
            "--pattern",
            "0x55",
            "--flush-interval",
            "16",
            "-o",
            "1M",
            "-S",
            "8k",
            "a.qcow2",
        ],
    );
    assert!(
        r.stdout.contains("Sending flush every 16 requests\n"),
        "{}",
        r.stdout
    );
    assert_eq!(qemu(d, &["check", "-q", "a.qcow2"]).code, 0);
    qemu_io(
        d,
        "qcow2",
        "a.qcow2",
        &["read -P 0x55 1M 4k", "read -P 0x55 1056k 4k"],
    );
}
