//! Interop both ways with QEMU 10's qemu-img/qemu-io over a covering matrix of qcow2
//! creation options.
//!
//! 1. Strata writes, QEMU reads: `strata create` (same messages as qemu-img), then writes
//!    through `strata bench -w`, `strata convert -n [-c]` and `strata resize`; the same
//!    writes go to a raw reference through qemu-io/qemu-img. `qemu-img check` must be clean,
//!    `qemu-img compare` must find the image identical to the reference, and `info`/`map`
//!    JSON must be the same from both tools.
//! 2. QEMU writes, Strata reads: images with compressed, zero and sub-clusters, snapshots,
//!    odd refcount widths, external data files, version 2 and backing chains must convert to
//!    the same raw bytes, and `map`/`check` must print what qemu-img prints.
//! 3. Round trip: `strata convert` of each image of (2) to qcow2 passes `qemu-img check` and
//!    `qemu-img compare`.
//!
//! Each case is its own test, so a Strata bug shows up (and can be `#[ignore]`d) alone.

mod common;
use common::*;

use std::path::Path;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Virtual size every image of part 1 starts with.
const SIZE: u64 = 8 * M;

// ---------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------

/// Require the files `a` and `b` in `d` to hold the same bytes (naming the first difference).
fn assert_same_bytes(d: &Path, a: &str, b: &str) {
    let x = std::fs::read(d.join(a)).unwrap_or_else(|e| panic!("read {a}: {e}"));
    let y = std::fs::read(d.join(b)).unwrap_or_else(|e| panic!("read {b}: {e}"));
    if x != y {
        let at = x.iter().zip(&y).position(|(p, q)| p != q);
        panic!(
            "{a} ({} bytes) and {b} ({} bytes) differ; first differing byte: {at:?}",
            x.len(),
            y.len()
        );
    }
}

/// The places (JSON paths) where `a` and `b` differ.
fn json_diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => json_diff(&format!("{path}.{k}"), v, w, out),
                    None => out.push(format!("{path}.{k}: {v} vs (absent)")),
                }
            }
            for (k, w) in y {
                if !x.contains_key(k) {
                    out.push(format!("{path}.{k}: (absent) vs {w}"));
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                json_diff(&format!("{path}[{i}]"), v, w, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

/// `info --output=json` of both tools, compared as JSON values field by field.
fn assert_same_info(d: &Path, img: &str) {
    let q = qemu_ok(d, &["info", "--output=json", img]);
    let s = strata_ok(d, &["info", "--output=json", img]);
    let parse = |t: &str| -> serde_json::Value {
        serde_json::from_str(t).unwrap_or_else(|e| panic!("info JSON of {img}: {e}\n{t}"))
    };
    let mut diffs = Vec::new();
    json_diff("", &parse(&s.stdout), &parse(&q.stdout), &mut diffs);
    assert!(
        diffs.is_empty(),
        "info of {img}: strata vs qemu-img differ at\n  {}\nstrata:\n{}\nqemu-img:\n{}",
        diffs.join("\n  "),
        s.stdout,
        q.stdout
    );
}

/// Require strata's text to equal qemu-img's, showing only the lines that differ.
fn assert_same_text(what: &str, strata: &str, qemu: &str) {
    if strata == qemu {
        return;
    }
    let (s, q): (Vec<_>, Vec<_>) = (strata.lines().collect(), qemu.lines().collect());
    let mut diff = String::new();
    for i in 0..s.len().max(q.len()) {
        let (a, b) = (s.get(i), q.get(i));
        if a != b {
            diff += &format!("line {}:\n  strata:   {a:?}\n  qemu-img: {b:?}\n", i + 1);
        }
    }
    panic!("{what}: strata vs qemu-img differ\n{diff}");
}

/// `map --output=json` of both tools must be byte-identical.
fn assert_same_map(d: &Path, img: &str) {
    let q = qemu_ok(d, &["map", "--output=json", img]);
    let s = strata_ok(d, &["map", "--output=json", img]);
    assert_same_text(&format!("map --output=json {img}"), &s.stdout, &q.stdout);
}

/// `qemu-img check` of `img` must find nothing.
fn assert_qemu_check_clean(d: &Path, img: &str) {
    let r = qemu(d, &["check", img]);
    assert_eq!(r.code, 0, "qemu-img check {img}:\n{}{}", r.stdout, r.stderr);
}

/// `qemu-img compare` must call `img` and the raw `reference` identical.
fn assert_qemu_identical(d: &Path, img: &str, reference: &str) {
    let r = qemu(d, &["compare", img, reference]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "Images are identical.\n"),
        "qemu-img compare {img} {reference}: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Part 1: Strata writes, QEMU reads
// ---------------------------------------------------------------------------------------

/// One write operation, done by strata on the image and by QEMU on the raw reference.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// `bench -w --pattern=P -o OFF -s LEN -S STEP -c COUNT -d DEPTH`.
    Bench {
        pattern: u8,
        off: u64,
        len: u64,
        step: u64,
        count: u64,
        depth: u64,
    },
    /// `convert -n [-c]` of `src.raw` (4 MiB: data, holes, unaligned edges) into the image.
    Convert { compress: bool },
    /// Grow by this many bytes (with the image's preallocation mode).
    Grow(u64),
}

const fn bench(pattern: u8, off: u64, len: u64, step: u64, count: u64, depth: u64) -> Step {
    Step::Bench {
        pattern,
        off,
        len,
        step,
        count,
        depth,
    }
}

/// Whole clusters (for the small cluster sizes) at an odd sector: overwritten by `convert -n`,
/// whose holes must then read as zeroes again.
const B_EARLY: Step = bench(0x10, 512, 64 * K, M, 4, 2);
/// Unaligned, sub-cluster requests beyond what `convert -n` touches.
const B_UNALIGNED: Step = bench(0x11, 4 * M + 1000, 3000, 5000, 16, 4);
/// Unaligned requests crossing 64k cluster boundaries.
const B_CROSSING: Step = bench(0x12, 4 * M + 300_007, 70000, 200_000, 5, 2);
/// Sector-sized requests, 4k apart, over the converted data (sub-clusters of 64k/16k
/// clusters, parts of compressed clusters).
const B_SECTORS: Step = bench(0x13, 2 * M + 1536, 512, 4096, 32, 8);
/// Requests straddling the old end after growing by 3 MiB, and in the new space.
const B_GROWN: Step = bench(0x14, SIZE - 1234, 5000, M, 3, 1);

const PLAIN: &[Step] = &[
    B_EARLY,
    B_UNALIGNED,
    B_CROSSING,
    Step::Convert { compress: false },
    B_SECTORS,
    Step::Grow(3 * M),
    B_GROWN,
];

/// Compressed clusters first (compressed writes only go to unallocated clusters), then
/// plain writes over parts of them.
const COMPRESSED: &[Step] = &[
    Step::Convert { compress: true },
    B_UNALIGNED,
    B_CROSSING,
    B_SECTORS,
    Step::Grow(3 * M),
    B_GROWN,
];

/// The 4 MiB raw source of `convert -n`.
fn make_source(d: &Path) {
    qemu_ok(d, &["create", "-q", "-f", "raw", "src.raw", "4M"]);
    qemu_io(
        d,
        "raw",
        "src.raw",
        &[
            "write -P 0x55 0 100k",
            "write -P 0x66 1M 1536k",
            "write -P 0x77 3000000 12345",
            "write -P 0x78 4193792 512",
        ],
    );
}

/// The value of option `key` in a `-o` string.
fn opt<'a>(opts: &'a str, key: &str) -> Option<&'a str> {
    opts.split(',')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Create `img.qcow2` with `-o opts` using both tools (same messages required), write to it
/// with strata, and check the result with QEMU.
fn strata_writes(opts: &str, steps: &[Step]) {
    if !have_qemu() {
        return;
    }
    let size = SIZE.to_string();
    let (_q, s) = both(
        &nothing,
        &["create", "-f", "qcow2", "-o", opts, "img.qcow2", &size],
    );
    let d = s.path();
    assert!(d.join("img.qcow2").exists(), "strata create -o {opts}");
    if matches!(opt(opts, "preallocation"), Some("falloc" | "full")) {
        // Preallocated means the guest's data has its space on the host already.
        use std::os::unix::fs::MetadataExt;
        let host = opt(opts, "data_file").unwrap_or("img.qcow2");
        let used = std::fs::metadata(d.join(host)).unwrap().blocks() * 512;
        assert!(
            used >= SIZE,
            "-o {opts}: only {used} bytes of {host} allocated on the host"
        );
    }
    make_source(d);
    qemu_ok(d, &["create", "-q", "-f", "raw", "ref.raw", &size]);

    for step in steps {
        match *step {
            Step::Bench {
                pattern,
                off,
                len,
                step,
                count,
                depth,
            } => {
                let args = [
                    "bench".to_string(),
                    "-w".into(),
                    format!("--pattern={pattern}"),
                    "-o".into(),
                    off.to_string(),
                    "-s".into(),
                    len.to_string(),
                    "-S".into(),
                    step.to_string(),
                    "-c".into(),
                    count.to_string(),
                    "-d".into(),
                    depth.to_string(),
                    "img.qcow2".into(),
                ];
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                strata_ok(d, &args);
                let cmds: Vec<String> = (0..count)
                    .map(|i| format!("write -P {pattern} {} {len}", off + i * step))
                    .collect();
                let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
                qemu_io(d, "raw", "ref.raw", &cmds);
            }
            Step::Convert { compress } => {
                let mut args = vec!["convert", "-n", "-f", "raw", "-O", "qcow2"];
                if compress {
                    args.push("-c");
                }
                args.extend(["src.raw", "img.qcow2"]);
                let r = strata_ok(d, &args);
                assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{args:?}");
                qemu_ok(
                    d,
                    &[
                        "convert", "-n", "-f", "raw", "-O", "raw", "src.raw", "ref.raw",
                    ],
                );
            }
            Step::Grow(by) => {
                let by = format!("+{by}");
                let prealloc = opt(opts, "preallocation").map(|p| format!("--preallocation={p}"));
                let mut args = vec!["resize"];
                args.extend(prealloc.as_deref());
                args.extend(["img.qcow2", &by]);
                let r = strata_ok(d, &args);
                assert_eq!(r.stdout, "Image resized.\n", "{args:?}");
                qemu_ok(d, &["resize", "-q", "-f", "raw", "ref.raw", &by]);
            }
        }
    }

    assert_qemu_check_clean(d, "img.qcow2");
    assert_qemu_identical(d, "img.qcow2", "ref.raw");
    assert_same_info(d, "img.qcow2");
    assert_same_map(d, "img.qcow2");
    if opt(opts, "data_file_raw") == Some("on") {
        // A raw external data file is the guest disk itself.
        assert_same_bytes(d, opt(opts, "data_file").unwrap(), "ref.raw");
    }
}

/// Creating with `-o opts` must fail, and both tools must say `error` (after the
/// "Formatting ..." line).
fn strata_rejects(opts: &str, error: &str) {
    if !have_qemu() {
        return;
    }
    let size = SIZE.to_string();
    let args = ["create", "-f", "qcow2", "-o", opts, "img.qcow2", &size];
    let (q, _s) = both(&nothing, &args);
    let r = qemu(q.path(), &args);
    assert_eq!(r.code, 1, "{args:?}: {r:?}");
    assert!(
        r.stdout.starts_with("Formatting 'img.qcow2', fmt=qcow2 "),
        "{args:?}: {r:?}"
    );
    assert_eq!(
        r.stderr,
        format!("strata: img.qcow2: {error}\n"),
        "{args:?}"
    );
}

// cluster_size 512
#[test]
fn w_c512() {
    strata_writes("cluster_size=512", PLAIN);
}
#[test]
fn w_c512_rc1_lazy() {
    strata_writes("cluster_size=512,refcount_bits=1,lazy_refcounts=on", PLAIN);
}
#[test]
fn w_c512_rc64_zlib_compressed() {
    strata_writes(
        "cluster_size=512,refcount_bits=64,compression_type=zlib",
        COMPRESSED,
    );
}
// cluster_size 4k
#[test]
fn w_c4k_rc64() {
    strata_writes("cluster_size=4k,refcount_bits=64", PLAIN);
}
#[test]
fn w_c4k_metadata() {
    strata_writes("cluster_size=4k,preallocation=metadata", PLAIN);
}
#[test]
fn w_c4k_full() {
    strata_writes("cluster_size=4k,preallocation=full", PLAIN);
}
#[test]
fn w_c4k_zstd_compressed() {
    strata_writes("cluster_size=4k,compression_type=zstd", COMPRESSED);
}
// cluster_size 64k (the default)
#[test]
fn w_defaults() {
    strata_writes("compat=1.1", PLAIN);
}
#[test]
fn w_falloc_lazy_off() {
    strata_writes("preallocation=falloc,lazy_refcounts=off", PLAIN);
}
#[test]
fn w_zlib_compressed() {
    strata_writes("compression_type=zlib,refcount_bits=16", COMPRESSED);
}
// extended_l2
#[test]
fn w_l2ext() {
    strata_writes("extended_l2=on", PLAIN);
}
#[test]
fn w_l2ext_c16k_rc1() {
    strata_writes("extended_l2=on,cluster_size=16k,refcount_bits=1", PLAIN);
}
#[test]
fn w_l2ext_c2m_metadata() {
    strata_writes(
        "extended_l2=on,cluster_size=2M,preallocation=metadata",
        PLAIN,
    );
}
#[test]
fn w_l2ext_full_lazy() {
    strata_writes("extended_l2=on,preallocation=full,lazy_refcounts=on", PLAIN);
}
#[test]
fn w_l2ext_zstd_compressed() {
    strata_writes("extended_l2=on,compression_type=zstd", COMPRESSED);
}
// cluster_size 2M
#[test]
fn w_c2m_rc64_lazy() {
    strata_writes("cluster_size=2M,refcount_bits=64,lazy_refcounts=on", PLAIN);
}
// compat=0.10
#[test]
fn w_v2() {
    strata_writes("compat=0.10", PLAIN);
}
#[test]
fn w_v2_c4k_falloc() {
    strata_writes("compat=0.10,cluster_size=4k,preallocation=falloc", PLAIN);
}
#[test]
fn w_v2_compressed() {
    strata_writes("compat=0.10,compression_type=zlib", COMPRESSED);
}
// external data files
#[test]
fn w_data_file() {
    strata_writes("data_file=img.data", PLAIN);
}
#[test]
fn w_data_file_raw() {
    strata_writes("data_file=img.data,data_file_raw=on", PLAIN);
}
#[test]
fn w_data_file_raw_full() {
    strata_writes(
        "data_file=img.data,data_file_raw=on,preallocation=full",
        PLAIN,
    );
}
#[test]
fn w_data_file_l2ext_c16k_rc64_metadata() {
    strata_writes(
        "data_file=img.data,extended_l2=on,cluster_size=16k,refcount_bits=64,preallocation=metadata",
        PLAIN,
    );
}

// Combinations QEMU refuses.
#[test]
fn reject_l2ext_small_clusters() {
    let e = "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes";
    strata_rejects("extended_l2=on,cluster_size=4k", e);
    strata_rejects("extended_l2=on,cluster_size=512", e);
}
#[test]
fn reject_v2_features() {
    let v3 = "only supported with compatibility level 1.1 and above (use version=v3 or greater)";
    strata_rejects(
        "compat=0.10,extended_l2=on",
        &format!("Extended L2 entries are {v3}"),
    );
    strata_rejects(
        "compat=0.10,lazy_refcounts=on",
        &format!("Lazy refcounts {v3}"),
    );
    strata_rejects(
        "compat=0.10,compression_type=zstd",
        &format!("Non-zlib compression type is {v3}"),
    );
    strata_rejects(
        "compat=0.10,data_file=img.data",
        &format!("External data files are {v3}"),
    );
    strata_rejects(
        "compat=0.10,refcount_bits=1",
        "Different refcount widths than 16 bits require compatibility level 1.1 or above \
         (use version=v3 or greater)",
    );
}
#[test]
fn reject_bad_values() {
    strata_rejects("data_file_raw=on", "data-file-raw requires data-file");
    strata_rejects(
        "cluster_size=4M",
        "Cluster size must be a power of two between 512 and 2048k",
    );
    strata_rejects(
        "refcount_bits=128",
        "Refcount width must be a power of two and may not exceed 64 bits",
    );
}

/// The same sub-cluster writes into a new image, by strata and by qemu-io: new clusters get
/// their whole space (QEMU zeroes their untouched parts), so both files end at the same
/// cluster end and map alike.
#[test]
fn partial_cluster_writes_fill_like_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    for img in ["q.qcow2", "s.qcow2"] {
        qemu_ok(d, &["create", "-q", "-f", "qcow2", img, "8M"]);
    }
    let Step::Bench {
        pattern,
        off,
        len,
        step,
        count,
        depth,
    } = B_UNALIGNED
    else {
        unreachable!()
    };
    let cmds: Vec<String> = (0..count)
        .map(|i| format!("write -P {pattern} {} {len}", off + i * step))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(d, "qcow2", "q.qcow2", &cmds);
    let args = [
        "bench".to_string(),
        "-w".into(),
        format!("--pattern={pattern}"),
        "-o".into(),
        off.to_string(),
        "-s".into(),
        len.to_string(),
        "-S".into(),
        step.to_string(),
        "-c".into(),
        count.to_string(),
        "-d".into(),
        depth.to_string(),
        "s.qcow2".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    strata_ok(d, &args);
    let size = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
    assert_eq!(size("s.qcow2"), size("q.qcow2"), "file sizes");
    let q = qemu_ok(d, &["map", "--output=json", "q.qcow2"]);
    let s = qemu_ok(d, &["map", "--output=json", "s.qcow2"]);
    assert_same_text("map of the strata-written image", &s.stdout, &q.stdout);
    assert_same_map(d, "s.qcow2");
}

/// `convert -n -c` into an image with an external data file: compressed clusters cannot
/// live there, so the conversion must fail, with qemu-img's words, and leave a clean image.
#[test]
fn reject_compress_into_data_file() {
    if !have_qemu() {
        return;
    }
    let setup = |d: &Path| {
        make_source(d);
        qemu_ok(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=img.data",
                "img.qcow2",
                "8M",
            ],
        );
    };
    let (q, s) = (tmp(), tmp());
    setup(q.path());
    setup(s.path());
    let args = [
        "convert",
        "-n",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "img.qcow2",
    ];
    let rq = qemu(q.path(), &args);
    let rs = strata(s.path(), &args);
    assert_eq!(
        (rq.code, rq.stderr.as_str()),
        (
            1,
            "strata: error while writing at byte 0: Operation not supported\n"
        ),
        "qemu-img {args:?}"
    );
    assert_eq!(rs, rq, "strata vs qemu-img for {args:?}");
    assert_qemu_check_clean(s.path(), "img.qcow2");
}

// ---------------------------------------------------------------------------------------
// Parts 2 and 3: QEMU writes, Strata reads (and rewrites)
// ---------------------------------------------------------------------------------------

/// Builds images with qemu-img/qemu-io in a directory and names the one to read.
type Build = fn(&Path) -> &'static str;

fn create(d: &Path, opts: &str, name: &str, size: &str) {
    qemu_ok(d, &["create", "-q", "-f", "qcow2", "-o", opts, name, size]);
}

fn overlay(d: &Path, backing: &str, fmt: &str, name: &str, size: Option<&str>) {
    let mut args = vec![
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, name,
    ];
    args.extend(size);
    qemu_ok(d, &args);
}

/// Strata reads what QEMU wrote: same raw bytes, same map, same check, compare clean.
fn strata_reads(build: Build) {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    let img = build(d);
    qemu_ok(d, &["convert", "-O", "raw", img, "ref.raw"]);
    let r = strata_ok(d, &["convert", "-O", "raw", img, "out.raw"]);
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
    assert_same_bytes(d, "out.raw", "ref.raw");
    assert_same_map(d, img);
    let (q, s) = (qemu(d, &["check", img]), strata(d, &["check", img]));
    assert_same_text(&format!("check {img}"), &s.stdout, &q.stdout);
    assert_eq!((s.code, &s.stderr), (q.code, &q.stderr), "check {img}");
    let r = strata(d, &["compare", img, "ref.raw"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "Images are identical.\n"),
        "strata compare {img} ref.raw: {r:?}"
    );
}

/// Strata converts what QEMU wrote to qcow2 (with each set of extra `convert` flags), and
/// QEMU finds the copy clean and identical.
fn round_trip(build: Build, flags: &[&[&str]]) {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let d = t.path();
    let img = build(d);
    qemu_ok(d, &["convert", "-O", "raw", img, "ref.raw"]);
    for extra in [&[][..]].iter().chain(flags) {
        let _ = std::fs::remove_file(d.join("rt.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.extend([img, "rt.qcow2"]);
        let r = strata_ok(d, &args);
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""), "{args:?}");
        assert_qemu_check_clean(d, "rt.qcow2");
        assert_qemu_identical(d, "rt.qcow2", "ref.raw");
        assert_qemu_identical(d, "rt.qcow2", img);
    }
}

/// Compressed clusters (zlib, 4k clusters): from `convert -c` and `write -c`, then partly
/// overwritten.
fn q_compressed_zlib(d: &Path) -> &'static str {
    make_source(d);
    qemu_ok(
        d,
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zlib,cluster_size=4k",
            "src.raw",
            "z.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "z.qcow2",
        &[
            "write -c -P 0x21 3M 64k",
            "write -P 0x22 5000 3000",
            "write -z 1050k 8k",
        ],
    );
    "z.qcow2"
}

/// Compressed clusters (zstd, 64k clusters with sub-clusters).
fn q_compressed_zstd(d: &Path) -> &'static str {
    make_source(d);
    qemu_ok(
        d,
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd,extended_l2=on",
            "src.raw",
            "z.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "z.qcow2",
        &[
            "write -c -P 0x23 3M 128k",
            "write -P 0x24 1M 2k",
            "write -z 1088k 4k",
        ],
    );
    "z.qcow2"
}

/// Zero clusters and zeroed parts of clusters, no backing file.
fn q_zero(d: &Path) -> &'static str {
    create(d, "cluster_size=64k", "z.qcow2", "8M");
    qemu_io(
        d,
        "qcow2",
        "z.qcow2",
        &[
            "write -P 1 0 2M",
            "write -z 64k 128k",
            "write -z 300000 5000",
            "write -z -u 1M 256k",
            "write -z 4M 1M",
            "write -P 2 4160k 4k",
        ],
    );
    "z.qcow2"
}

/// Zero clusters over a backing file's data.
fn q_zero_backing(d: &Path) -> &'static str {
    create(d, "cluster_size=64k", "base.qcow2", "8M");
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 1 0 4M"]);
    overlay(d, "base.qcow2", "qcow2", "z.qcow2", None);
    qemu_io(
        d,
        "qcow2",
        "z.qcow2",
        &[
            "write -z 0 256k",
            "write -z 1000000 10000",
            "write -z -u 2M 64k",
            "write -P 2 3M 4k",
            "write -z 3M 64k",
            "write -z 6M 512k",
        ],
    );
    "z.qcow2"
}

/// Sub-clusters (extended L2, 64k clusters of 2k sub-clusters) over a backing file: partial
/// writes, zeroed sub-clusters, unallocated sub-clusters reading the backing file.
fn q_subclusters(d: &Path) -> &'static str {
    create(d, "cluster_size=64k", "base.qcow2", "4M");
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 7 0 4M"]);
    create(d, "extended_l2=on", "sub.qcow2", "4M");
    qemu_ok(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "sub.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "sub.qcow2",
        &[
            "write -P 1 2k 2k",
            "write -P 2 10000 3000",
            "write -z 32k 4k",
            "write -z 128k 6k",
            "write -P 3 1M 64k",
            "write -z 1M 2k",
            "write -z 1034k 2k",
            "discard 1040k 4k",
        ],
    );
    "sub.qcow2"
}

/// Sub-clusters without backing file (2M clusters of 64k sub-clusters).
fn q_subclusters_2m(d: &Path) -> &'static str {
    create(d, "extended_l2=on,cluster_size=2M", "sub.qcow2", "6M");
    qemu_io(
        d,
        "qcow2",
        "sub.qcow2",
        &[
            "write -P 1 64k 64k",
            "write -P 2 300000 70000",
            "write -z 192k 64k",
            "write -P 3 2M 2M",
            "write -z 2368k 128k",
            "discard 3M 128k",
            "write -z 5M 64k",
        ],
    );
    "sub.qcow2"
}

/// Internal snapshots, then overwrites (shared clusters copied on write).
fn q_snapshots(d: &Path) -> &'static str {
    create(d, "cluster_size=64k", "snap.qcow2", "8M");
    qemu_io(d, "qcow2", "snap.qcow2", &["write -P 1 0 2M"]);
    qemu_ok(d, &["snapshot", "-c", "one", "snap.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "snap.qcow2",
        &[
            "write -P 2 100k 50k",
            "write -z 1M 64k",
            "write -P 3 4M 64k",
        ],
    );
    qemu_ok(d, &["snapshot", "-c", "two", "snap.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "snap.qcow2",
        &["write -P 4 4M 4k", "discard 1536k 128k"],
    );
    "snap.qcow2"
}

/// One-bit refcounts, 512-byte clusters.
fn q_refcount1(d: &Path) -> &'static str {
    create(d, "refcount_bits=1,cluster_size=512", "r.qcow2", "3M");
    qemu_io(
        d,
        "qcow2",
        "r.qcow2",
        &[
            "write -P 1 0 256k",
            "write -P 2 1000 3000",
            "write -z 64k 4k",
            "discard 128k 8k",
            "write -P 3 2M 100k",
        ],
    );
    "r.qcow2"
}

/// 64-bit refcounts, with a snapshot (refcounts of 2).
fn q_refcount64(d: &Path) -> &'static str {
    create(d, "refcount_bits=64,cluster_size=4k", "r.qcow2", "4M");
    qemu_io(d, "qcow2", "r.qcow2", &["write -P 1 0 1M"]);
    qemu_ok(d, &["snapshot", "-c", "s", "r.qcow2"]);
    qemu_io(
        d,
        "qcow2",
        "r.qcow2",
        &[
            "write -P 2 6000 3000",
            "write -z 512k 8k",
            "write -P 3 3M 4k",
        ],
    );
    "r.qcow2"
}

fn data_file_writes(d: &Path, img: &str) {
    qemu_io(
        d,
        "qcow2",
        img,
        &[
            "write -P 1 0 1M",
            "write -P 2 2000 3000",
            "write -z 256k 64k",
            "discard 512k 128k",
            "write -P 3 3M 100k",
        ],
    );
}

/// External data file (not raw).
fn q_data_file(d: &Path) -> &'static str {
    create(d, "data_file=x.data", "x.qcow2", "4M");
    data_file_writes(d, "x.qcow2");
    "x.qcow2"
}

/// External raw data file.
fn q_data_file_raw(d: &Path) -> &'static str {
    create(d, "data_file=x.data,data_file_raw=on", "x.qcow2", "4M");
    data_file_writes(d, "x.qcow2");
    "x.qcow2"
}

/// Version 2 images: no zero clusters, a backing file.
fn q_v2(d: &Path) -> &'static str {
    create(d, "compat=0.10", "base.qcow2", "4M");
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 1 0 4M"]);
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "v2.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "v2.qcow2",
        &[
            "write -P 2 100000 5000",
            "write -z 1M 64k",
            "write -z 2M 1000",
            "discard 3M 64k",
        ],
    );
    "v2.qcow2"
}

/// base.raw (3M) <- mid.qcow2 (5M, 4k clusters) <- top.qcow2 (8M): raw and qcow2 mixed,
/// each layer longer than the one below.
fn q_chain(d: &Path) -> &'static str {
    qemu_ok(d, &["create", "-q", "-f", "raw", "base.raw", "3M"]);
    qemu_io(d, "raw", "base.raw", &["write -P 1 0 3M"]);
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "5M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 2 1M 100k",
            "write -z 2M 64k",
            "write -P 3 3M 1M",
            "write -P 4 3070k 4k",
        ],
    );
    overlay(d, "mid.qcow2", "qcow2", "top.qcow2", Some("8M"));
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &[
            "write -P 5 0 64k",
            "write -z 1M 64k",
            "write -P 6 4M 2M",
            "write -z 5M 4k",
            "write -P 7 7M 4k",
        ],
    );
    "top.qcow2"
}

/// Discarded ranges, with and without something beneath.
fn q_discard(d: &Path) -> &'static str {
    create(d, "cluster_size=64k", "base.qcow2", "4M");
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 1 0 4M"]);
    overlay(d, "base.qcow2", "qcow2", "dis.qcow2", Some("6M"));
    qemu_io(
        d,
        "qcow2",
        "dis.qcow2",
        &[
            "write -P 2 0 6M",
            "discard 64k 192k",
            "discard 1000000 200000",
            "discard 3M 2M",
            "discard 5M 4k",
        ],
    );
    "dis.qcow2"
}

/// Metadata preallocation (4k clusters): preallocated clusters are holes in the host file,
/// which QEMU's `map` reports as zero.
fn q_prealloc_metadata(d: &Path) -> &'static str {
    create(
        d,
        "cluster_size=4k,preallocation=metadata",
        "pre.qcow2",
        "8M",
    );
    qemu_io(
        d,
        "qcow2",
        "pre.qcow2",
        &[
            "write -P 1 1M 64k",
            "write -P 2 5000 3000",
            "write -z 2M 8k",
        ],
    );
    "pre.qcow2"
}

#[test]
fn r_prealloc_metadata() {
    strata_reads(q_prealloc_metadata);
}
#[test]
fn rt_prealloc_metadata() {
    round_trip(
        q_prealloc_metadata,
        &[&["-o", "preallocation=metadata,cluster_size=4k"]],
    );
}

macro_rules! reads {
    ($($read:ident, $rt:ident, $build:ident, $flags:expr;)*) => {$(
        #[test]
        fn $read() {
            strata_reads($build);
        }
        #[test]
        fn $rt() {
            round_trip($build, $flags);
        }
    )*};
}

reads! {
    r_compressed_zlib, rt_compressed_zlib, q_compressed_zlib, &[&["-c"]];
    r_compressed_zstd, rt_compressed_zstd, q_compressed_zstd,
        &[&["-c", "-o", "compression_type=zstd"]];
    r_zero, rt_zero, q_zero, &[&["-o", "compat=0.10"]];
    r_zero_backing, rt_zero_backing, q_zero_backing,
        &[&["-B", "base.qcow2", "-F", "qcow2"]];
    r_subclusters, rt_subclusters, q_subclusters,
        &[&["-o", "extended_l2=on", "-B", "base.qcow2", "-F", "qcow2"]];
    r_subclusters_2m, rt_subclusters_2m, q_subclusters_2m,
        &[&["-o", "extended_l2=on,cluster_size=2M"]];
    r_snapshots, rt_snapshots, q_snapshots, &[];
    r_refcount1, rt_refcount1, q_refcount1, &[&["-o", "refcount_bits=1,cluster_size=512"]];
    r_refcount64, rt_refcount64, q_refcount64, &[&["-o", "refcount_bits=64"]];
    r_data_file, rt_data_file, q_data_file, &[&["-o", "data_file=rt.data"]];
    r_data_file_raw, rt_data_file_raw, q_data_file_raw,
        &[&["-o", "data_file=rt.data,data_file_raw=on"]];
    r_v2, rt_v2, q_v2, &[&["-o", "compat=0.10", "-B", "base.qcow2", "-F", "qcow2"]];
    r_chain, rt_chain, q_chain, &[&["-B", "mid.qcow2", "-F", "qcow2"]];
    r_discard, rt_discard, q_discard, &[&["-c"]];
}
