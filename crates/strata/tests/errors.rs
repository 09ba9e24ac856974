//! Command-line errors: same messages (with our program name) and exit statuses as qemu-img.

mod common;
use common::*;

#[test]
fn usage_errors_match_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["info"],
        &["info", "missing.qcow2"],
        &["info", "--output=xml", "a.qcow2"],
        &["info", "-f", "raw", "a.qcow2", "extra"],
        &["map"],
        &["map", "--output=foo", "a.qcow2"],
        &["map", "--start-offset", "1Q", "a.qcow2"],
        &["check"],
        &["check", "-r", "foo", "a.qcow2"],
        &["check", "-T", "foo", "a.qcow2"],
        &["check", "missing.qcow2"],
        &["compare", "a.qcow2"],
        &["compare", "-T", "foo", "a.qcow2", "a.qcow2"],
        &["create"],
        &["create", "-f", "qcow2", "x.qcow2"],
        &["create", "-f", "qcow2", "x.qcow2", "1Q"],
        &["create", "-f", "qcow2", "x.qcow2", "--", "-1"],
        &["create", "-f", "vmdkx", "x.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", "foo=bar", "x.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", "", "x.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", "x,", "x.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=maybe",
            "x.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "size=3M", "x.qcow2", "1M"],
        &["create", "-f", "qcow2", "x.qcow2", "1M", "extra"],
        &["create", "-f", "raw", "-b", "a.qcow2", "x.raw", "1M"],
        &[
            "create", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "x.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.qcow2",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
        ],
        &["create", "-f", "qcow2", "-b", "a.qcow2", "x.qcow2"],
        &["create", "-f", "qcow2", "-o", "help"],
        &["create", "-f", "raw", "-o", "help"],
        &["create", "-f", "qcow2", "-o", "help", "x.qcow2"],
        &["resize", "a.qcow2"],
        &["resize", "a.qcow2", "abc"],
        &["resize", "--preallocation=foo", "a.qcow2", "2M"],
        &["resize", "a.qcow2", "-512k"],
        &["rebase", "a.qcow2"],
        &["amend", "a.qcow2"],
        &["amend", "-o", "help", "a.qcow2"],
        &["amend", "-f", "qcow2", "-o", "help"],
        &["measure"],
        &["measure", "--size", "1G", "a.qcow2"],
        &["measure", "-f", "qcow2", "--size", "1G"],
        &["measure", "-O", "qcow2", "-o", "foo=bar", "--size", "1G"],
        &["convert", "a.qcow2"],
        &["convert", "-S", "100", "a.qcow2", "b.raw"],
        &["convert", "-m", "17", "a.qcow2", "b.raw"],
        &["convert", "--target-is-zero", "a.qcow2", "b.raw"],
        &["convert", "nope.qcow2", "x.raw"],
        &["convert", "-O", "vmdkx", "a.qcow2", "x.raw"],
        &["convert", "-c", "-O", "raw", "a.qcow2", "x.raw"],
        &[
            "convert", "-O", "qcow2", "-o", "foo=1", "a.qcow2", "x.qcow2",
        ],
        &["convert", "-n", "-o", "cluster_size=4k", "a.qcow2", "x.raw"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=a.qcow2",
            "a.qcow2",
            "x.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "preallocation=full",
            "a.qcow2",
            "x.qcow2",
        ],
        &["convert", "-O", "raw", "-o", "help", "a.qcow2", "x.raw"],
        &["commit", "a.qcow2"],
        &["commit"],
        &["snapshot", "-l", "-c", "x", "a.qcow2"],
        &["dd", "if=a.qcow2"],
        &["dd", "foo"],
        &["bench", "-c", "0", "a.qcow2"],
        &["bench", "--flush-interval", "4", "a.qcow2"],
    ];
    for args in cases {
        let q = qemu(d, args);
        let s = strata(d, args);
        assert_eq!(
            (s.code, &s.stderr, &s.stdout),
            (q.code, &q.stderr, &q.stdout),
            "{args:?}"
        );
    }
}
