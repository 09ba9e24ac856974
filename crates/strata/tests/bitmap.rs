//! `strata bitmap` against `qemu-img bitmap` (QEMU 10): same messages and exit statuses, same
//! resulting images (as `qemu-img info` sees them, and bit for bit in the bitmaps), and
//! images that strata writes through keep consistent bitmaps.

use std::path::Path;
use std::process::Command;

use strata_core::NodeRef;
use strata_qcow2::{OpenOptions, Qcow2};

fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

/// Run `prog args` in `dir`: (exit status, stdout, stderr).
fn run(dir: &Path, prog: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("spawn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn strata(dir: &Path, args: &[&str]) -> (i32, String, String) {
    run(dir, env!("CARGO_BIN_EXE_strata"), args)
}

fn ok(dir: &Path, prog: &str, args: &[&str]) -> String {
    let (code, out, err) = if prog == "strata" {
        strata(dir, args)
    } else {
        run(dir, prog, args)
    };
    assert_eq!(code, 0, "{prog} {args:?}: {out}{err}");
    out
}

/// QEMU names its node `#blockNNN` with random digits: mask them, and the program name.
fn normalize(s: &str) -> String {
    let s = s.replace("qemu-img", "strata");
    let mut out = String::new();
    let mut rest = s.as_str();
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i + 6]);
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('N');
    }
    out.push_str(rest);
    out
}

/// `qemu-img info --output=json` without the fields that depend on the cluster layout.
fn info_json(dir: &Path, img: &str) -> String {
    ok(dir, "qemu-img", &["info", "--output=json", img])
        .lines()
        .filter(|l| {
            !l.contains("\"filename\"")
                && !l.contains("\"actual-size\"")
                && !l.starts_with("                \"virtual-size\"")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every bitmap's (name, dirty extents), read with strata-qcow2 from a read-only open.
fn bits(path: &Path) -> Vec<(String, Vec<(u64, u64)>)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let f: NodeRef = strata_io::FileNode::open(
            path,
            &strata_io::FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let q = Qcow2::open(
            f,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
            None,
            None,
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        for b in q.bitmaps() {
            let d = q.bitmap_data(&b.name).await.unwrap();
            out.push((b.name, d.extents().collect()));
        }
        out
    })
}

/// Make `s.qcow2` and `q.qcow2`: identical images with bitmaps and some writes.
fn twins(d: &Path) {
    for f in ["s.qcow2", "q.qcow2"] {
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", f, "64M"]);
        ok(d, "qemu-img", &["bitmap", "--add", f, "a"]);
        ok(d, "qemu-img", &["bitmap", "--add", "-g", "512", f, "b"]);
        ok(
            d,
            "qemu-io",
            &["-c", "write 0 1k", "-c", "write 10M 100k", f],
        );
        ok(d, "qemu-img", &["bitmap", "--disable", f, "b"]);
    }
}

#[test]
fn errors_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    twins(d);
    ok(
        d,
        "qemu-img",
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
    let long = "x".repeat(1024);
    let cases: Vec<Vec<&str>> = vec![
        vec!["bitmap", "q.qcow2", "a"],
        vec!["bitmap", "--add", "q.qcow2"],
        vec!["bitmap", "-g", "64k", "--remove", "q.qcow2", "a"],
        vec!["bitmap", "-F", "raw", "--remove", "q.qcow2", "a"],
        vec!["bitmap", "-b", "x", "--remove", "q.qcow2", "a"],
        vec!["bitmap", "--add", "-g", "abc", "q.qcow2", "z"],
        vec!["bitmap", "--add", "-g", "3000", "q.qcow2", "z"],
        vec!["bitmap", "--add", "-g", "4G", "q.qcow2", "z"],
        vec!["bitmap", "--add", "q.qcow2", "a"],
        vec!["bitmap", "--add", "q.qcow2", ""],
        vec!["bitmap", "--add", "q.qcow2", &long],
        vec!["bitmap", "--add", "v2.qcow2", "z"],
        vec!["bitmap", "--remove", "q.qcow2", "nope"],
        vec!["bitmap", "--clear", "q.qcow2", "nope"],
        vec!["bitmap", "--enable", "q.qcow2", "nope"],
        vec!["bitmap", "--merge", "nope", "q.qcow2", "a"],
        vec!["bitmap", "--disable", "--add", "q.qcow2", "new"],
        vec!["bitmap", "--remove", "missing.qcow2", "a"],
    ];
    for c in &cases {
        let q = run(d, "qemu-img", c);
        let s = strata(d, c);
        assert_eq!(q.0, s.0, "exit status of {c:?}: {q:?} vs {s:?}");
        assert_eq!(normalize(&q.2), normalize(&s.2), "stderr of {c:?}");
    }
    assert_eq!(info_json(d, "s.qcow2"), info_json(d, "q.qcow2"));
}

#[test]
fn operations_give_the_same_images_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    twins(d);
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"],
    );
    ok(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "x"]);
    ok(d, "qemu-io", &["-c", "write 40M 4k", "src.qcow2"]);
    let steps: &[&[&str]] = &[
        &["--add", "-g", "128k", "--disable", "c"],
        &["--merge", "b", "c"],
        &["--merge", "x", "-b", "src.qcow2", "-F", "qcow2", "a"],
        &["--clear", "--enable", "b"],
        &["--remove", "a"],
        &["--add", "a"],
    ];
    for step in steps {
        for (prog, img) in [("qemu-img", "q.qcow2"), ("strata", "s.qcow2")] {
            let (opts, name) = step.split_at(step.len() - 1);
            let mut args = vec!["bitmap"];
            args.extend_from_slice(opts);
            args.push(img);
            args.push(name[0]);
            ok(d, prog, &args);
        }
        assert_eq!(
            info_json(d, "s.qcow2"),
            info_json(d, "q.qcow2"),
            "after {step:?}"
        );
        assert_eq!(
            bits(&d.join("s.qcow2")),
            bits(&d.join("q.qcow2")),
            "after {step:?}"
        );
    }
    // `strata info` prints the bitmaps exactly as qemu-img does.
    let s = ok(d, "strata", &["info", "s.qcow2"]);
    let q = ok(d, "qemu-img", &["info", "s.qcow2"]);
    assert_eq!(s, q);
    let s = ok(d, "strata", &["info", "--output=json", "s.qcow2"]);
    let q = ok(d, "qemu-img", &["info", "--output=json", "s.qcow2"]);
    assert_eq!(s, q);
    let (code, _, _) = run(d, "qemu-img", &["check", "s.qcow2"]);
    assert_eq!(code, 0);
}

#[test]
fn writes_through_strata_keep_bitmaps_consistent() {
    if !have_qemu() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    twins(d);
    let bench = [
        "bench", "-w", "-c", "20", "-s", "3k", "-S", "1000k", "-o", "512",
    ];
    let mut a: Vec<&str> = bench.to_vec();
    a.push("s.qcow2");
    let mut b: Vec<&str> = bench.to_vec();
    b.push("q.qcow2");
    ok(d, "strata", &a);
    ok(d, "qemu-img", &b);
    // Resize (grow and shrink) as qemu-img does with bitmaps.
    ok(d, "strata", &["resize", "s.qcow2", "+1G"]);
    ok(d, "qemu-img", &["resize", "q.qcow2", "+1G"]);
    ok(d, "strata", &["resize", "--shrink", "s.qcow2", "12000256"]);
    ok(
        d,
        "qemu-img",
        &["resize", "--shrink", "q.qcow2", "12000256"],
    );
    // convert -n writes the whole target.
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "src.raw", "12000256"],
    );
    ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 2M 64k", "src.raw"],
    );
    ok(d, "strata", &["bitmap", "--clear", "s.qcow2", "a"]);
    ok(d, "qemu-img", &["bitmap", "--clear", "q.qcow2", "a"]);
    ok(
        d,
        "strata",
        &["convert", "-n", "-O", "qcow2", "src.raw", "s.qcow2"],
    );
    ok(
        d,
        "qemu-img",
        &["convert", "-n", "-O", "qcow2", "src.raw", "q.qcow2"],
    );
    let info = info_json(d, "s.qcow2");
    assert!(!info.contains("in-use"), "{info}");
    assert_eq!(info, info_json(d, "q.qcow2"));
    assert_eq!(bits(&d.join("s.qcow2")), bits(&d.join("q.qcow2")));
    let (code, out, _) = run(d, "qemu-img", &["check", "s.qcow2"]);
    assert_eq!(code, 0, "{out}");
}
