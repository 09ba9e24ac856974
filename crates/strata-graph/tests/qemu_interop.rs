//! Interop with QEMU 10's tools as oracles: `map` output byte for byte, copies that
//! `qemu-img compare` accepts, `compare` verdicts, and open errors.

use std::path::Path;
use std::process::Command;

use strata_core::NodeRef;
use strata_graph::copy::{CopyOptions, Qcow2Compressed, TargetInit, copy_image};
use strata_graph::{
    CompareOptions, ImageOptions, compare_images, create_image, map_image, open_image,
    render_human, render_json,
};

fn run(dir: &Path, prog: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("QEMU tools are installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sh(dir: &Path, prog: &str, args: &[&str]) -> String {
    let (code, out, err) = run(dir, prog, args);
    assert_eq!(code, 0, "{prog} {args:?}: {err}");
    out
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// base.raw (4M) <- mid.qcow2 (4M: data, zero, compressed) <- top.qcow2 (6M: data,
/// discard, data past the backing's end).
fn build_chain(dir: &Path) {
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "4M"],
    );
    sh(
        dir,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 2M 64k",
            "base.raw",
        ],
    );
    sh(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "4M",
        ],
    );
    sh(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 3 512k 1M",
            "-c",
            "write -z 3M 128k",
            "-c",
            "write -c -P 5 3584k 64k",
            "mid.qcow2",
        ],
    );
    sh(
        dir,
        "qemu-img",
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
            "6M",
        ],
    );
    sh(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 7 64k 64k",
            "-c",
            "discard 512k 64k",
            "-c",
            "write -P 8 5M 64k",
            "-c",
            "write -z 5184k 4k",
            "top.qcow2",
        ],
    );
}

fn ro() -> ImageOptions {
    ImageOptions {
        read_only: true,
        ..Default::default()
    }
}

async fn open(path: &str, fmt: Option<&str>) -> NodeRef {
    let o = ImageOptions {
        format: fmt.map(String::from),
        ..ro()
    };
    open_image(path, &o).await.unwrap().node
}

#[tokio::test]
async fn map_output_matches_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    for (name, fmt) in [
        ("base.raw", "raw"),
        ("mid.qcow2", "qcow2"),
        ("top.qcow2", "qcow2"),
    ] {
        let path = p(dir, name);
        let node = open(&path, Some(fmt)).await;
        let entries = map_image(&node, 0, None).await.unwrap();
        let want = sh(dir, "qemu-img", &["map", "-f", fmt, "--output=json", &path]);
        assert_eq!(render_json(&entries), want, "json map of {name}");
        let (code, want, err) = run(dir, "qemu-img", &["map", "-f", fmt, &path]);
        let (text, res) = render_human(&entries);
        assert_eq!(text, want, "human map of {name}");
        assert_eq!(code != 0, res.is_err(), "{name}: {err}");
        if let Err(e) = res {
            assert_eq!(err.trim_end(), format!("qemu-img: {}", e.message()));
        }
        // A window, as with --start-offset/--max-length.
        let entries = map_image(&node, 65536 * 3, Some(3 << 20)).await.unwrap();
        let want = sh(
            dir,
            "qemu-img",
            &[
                "map",
                "-f",
                fmt,
                "--output=json",
                "-s",
                "196608",
                "-l",
                "3145728",
                &path,
            ],
        );
        assert_eq!(render_json(&entries), want, "windowed json map of {name}");
    }
}

#[tokio::test]
async fn external_data_file_and_forced_raw_maps_match_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    sh(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.raw",
            "df.qcow2",
            "1M",
        ],
    );
    sh(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 1 64k 64k",
            "-c",
            "write -z 256k 64k",
            "df.qcow2",
        ],
    );
    for fmt in ["qcow2", "raw"] {
        let path = p(dir, "df.qcow2");
        let node = open(&path, Some(fmt)).await;
        let entries = map_image(&node, 0, None).await.unwrap();
        let want = sh(dir, "qemu-img", &["map", "-f", fmt, "--output=json", &path]);
        assert_eq!(render_json(&entries), want, "{fmt}");
        // QEMU opens a relative data file name from its working directory (it fails from
        // anywhere else); Strata resolves it against the image's directory, like backing
        // names, so the name printed is the combined path.
        let want = sh(dir, "qemu-img", &["map", "-f", fmt, &path])
            .replace(" df.raw", &format!(" {}", p(dir, "df.raw")));
        assert_eq!(render_human(&entries).0, want, "{fmt}");
    }
    // Opened read-write, the data file is writable too.
    let o = ImageOptions {
        format: Some("qcow2".into()),
        ..Default::default()
    };
    let node = open_image(&p(dir, "df.qcow2"), &o).await.unwrap().node;
    let buf = strata_core::IoBuf::from_slice(&[7; 65536]);
    node.write(0, buf, strata_core::WriteFlags::default())
        .await
        .unwrap();
    node.close().await.unwrap();
    drop(node);
    sh(
        dir,
        "qemu-io",
        &[
            "-c",
            "read -P 7 0 64k",
            "-c",
            "read -P 1 64k 64k",
            "df.qcow2",
        ],
    );
}

#[tokio::test]
async fn json_backing_names_open() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    let b = format!(
        r#"json:{{"driver":"raw","offset":65536,"file":{{"driver":"file","filename":"{}"}}}}"#,
        p(dir, "base.raw")
    );
    sh(
        dir,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", "j.qcow2", "2M",
        ],
    );
    sh(dir, "qemu-io", &["-c", "write -P 4 1M 64k", "j.qcow2"]);
    let node = open(&p(dir, "j.qcow2"), Some("qcow2")).await;
    let entries = map_image(&node, 0, None).await.unwrap();
    let want = sh(
        dir,
        "qemu-img",
        &["map", "--output=json", &p(dir, "j.qcow2")],
    );
    assert_eq!(render_json(&entries), want);
}

#[tokio::test]
async fn null_and_raw_offset_maps_match_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    let base = p(dir, "base.raw");
    for json in [
        r#"{"driver":"null-co","size":1048576}"#.to_string(),
        r#"{"driver":"null-co","size":1048576,"read-zeroes":true}"#.to_string(),
        format!(
            r#"{{"driver":"raw","offset":4096,"size":2097152,"file":{{"driver":"file","filename":"{base}"}}}}"#
        ),
        format!(
            r#"{{"driver":"raw","offset":1048576,"file.driver":"file","file.filename":"{base}"}}"#
        ),
    ] {
        let name = format!("json:{json}");
        let node = open_image(&name, &ro()).await.unwrap().node;
        let entries = map_image(&node, 0, None).await.unwrap();
        let want = sh(dir, "qemu-img", &["map", "--output=json", &name]);
        assert_eq!(render_json(&entries), want, "{name}");
    }
}

#[tokio::test]
async fn copies_of_a_chain_compare_identical() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    let top = open(&p(dir, "top.qcow2"), Some("qcow2")).await;
    let size = top.size();
    let qopts = strata_qcow2::CreateOptions {
        size,
        ..Default::default()
    };
    for (name, fmt, compress) in [
        ("out.raw", "raw", false),
        ("out.qcow2", "qcow2", false),
        ("outc.qcow2", "qcow2", true),
    ] {
        let path = p(dir, name);
        create_image(&path, fmt, &qopts).await.unwrap();
        let o = ImageOptions {
            format: Some(fmt.into()),
            ..Default::default()
        };
        let target = open_image(&path, &o).await.unwrap().node;
        let opts = CopyOptions {
            target_init: TargetInit::Zero,
            compress: if compress {
                Some(std::sync::Arc::new(Qcow2Compressed::new(&target).unwrap()))
            } else {
                None
            },
            ..Default::default()
        };
        let stats = copy_image(&top, &target, &opts).await.unwrap();
        assert!(stats.bytes_written >= 1 << 20, "{stats:?}");
        target.close().await.unwrap();
        // The compressed writer holds the target too; its file lock goes with the last one.
        drop((target, opts));
        let (code, out, err) = run(
            dir,
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", fmt, "top.qcow2", name],
        );
        assert_eq!(
            (code, out.as_str()),
            (0, "Images are identical.\n"),
            "{name}: {err}"
        );
        if fmt == "qcow2" {
            sh(dir, "qemu-img", &["check", name]);
        }
    }
    // The compressed copy really holds compressed clusters.
    let map = sh(dir, "qemu-img", &["map", "--output=json", "outc.qcow2"]);
    assert!(map.contains("\"compressed\": true"), "{map}");
}

#[tokio::test]
async fn copy_above_base_into_an_overlay_of_the_base() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    // Like `convert -B mid.qcow2`: only what top allocates is copied.
    sh(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
            "6M",
        ],
    );
    let top = open(&p(dir, "top.qcow2"), Some("qcow2")).await;
    let mid = top.backing().unwrap();
    let o = ImageOptions {
        format: Some("qcow2".into()),
        ..Default::default()
    };
    let ov = open_image(&p(dir, "ov.qcow2"), &o).await.unwrap().node;
    let opts = CopyOptions {
        base: Some(mid.clone()),
        target_init: TargetInit::Backing { len: mid.size() },
        ..Default::default()
    };
    let stats = copy_image(&top, &ov, &opts).await.unwrap();
    assert_eq!(stats.bytes_read, 2 * 65536, "{stats:?}");
    ov.close().await.unwrap();
    drop(ov);
    let (code, out, _) = run(dir, "qemu-img", &["compare", "top.qcow2", "ov.qcow2"]);
    assert_eq!((code, out.as_str()), (0, "Images are identical.\n"));
    // Nothing but top's own clusters was allocated in the overlay.
    let b = sh(dir, "qemu-img", &["map", "--output=json", "ov.qcow2"]);
    let own: Vec<&str> = b
        .lines()
        .filter(|l| l.contains("\"depth\": 0, \"present\": true, \"zero\": false"))
        .collect();
    assert_eq!(own.len(), 2, "{b}");
}

#[tokio::test]
async fn compare_verdicts_match_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    sh(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "flat.raw"],
    );
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "a.raw", "4M"],
    );
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "b.raw", "6M"],
    );
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "c.raw", "6M"],
    );
    sh(
        dir,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 5M 512", "c.raw"],
    );
    let cases: &[(&str, &str, bool)] = &[
        ("top.qcow2", "flat.raw", false),
        ("top.qcow2", "flat.raw", true),
        ("mid.qcow2", "top.qcow2", false),
        ("a.raw", "b.raw", false),
        ("a.raw", "b.raw", true),
        ("c.raw", "a.raw", false),
        ("a.raw", "c.raw", false),
        ("flat.raw", "flat.raw", true),
    ];
    for &(x, y, strict) in cases {
        let mut args = vec!["compare"];
        if strict {
            args.push("-s");
        }
        args.extend([x, y]);
        let (code, want, _) = run(dir, "qemu-img", &args);
        let (nx, ny) = (open(&p(dir, x), None).await, open(&p(dir, y), None).await);
        let opts = CompareOptions {
            strict,
            ..Default::default()
        };
        let got = compare_images(&nx, x, &ny, y, &opts).await.unwrap();
        assert_eq!(
            (got.exit_code(), got.text()),
            (code, want),
            "compare {args:?}"
        );
    }
}

#[tokio::test]
async fn open_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    let err = |path: String| async move { open_image(&path, &ro()).await.unwrap_err().to_string() };
    sh(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            "miss.qcow2",
            "1M",
        ],
    );
    let (_, _, qemu) = run(dir, "qemu-img", &["map", "miss.qcow2"]);
    let ours = err(p(dir, "miss.qcow2")).await;
    assert_eq!(
        ours,
        format!(
            "Could not open backing file: Could not open '{}': No such file or directory",
            p(dir, "missing.qcow2")
        )
    );
    assert!(qemu.contains(
        "Could not open backing file: Could not open 'missing.qcow2': No such file or directory"
    ));
    // A loop: la -> lb -> la.
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "la.qcow2", "1M"],
    );
    sh(
        dir,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "la.qcow2", "-F", "qcow2", "lb.qcow2", "1M",
        ],
    );
    sh(
        dir,
        "qemu-img",
        &["rebase", "-u", "-b", "lb.qcow2", "-F", "qcow2", "la.qcow2"],
    );
    let e = err(p(dir, "la.qcow2")).await;
    assert!(
        e.ends_with(&format!(
            "Backing file '{}' creates an infinite loop.",
            p(dir, "la.qcow2")
        )),
        "{e}"
    );
    // No recorded backing format: the backing file is not probed.
    sh(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "nofmt.qcow2",
            "4M",
        ],
    );
    strip_backing_format(&dir.join("nofmt.qcow2"));
    let e = err(p(dir, "nofmt.qcow2")).await;
    assert!(
        e.starts_with("Could not open backing file: Backing file specified without backing format"),
        "{e}"
    );
    // Without the chain it opens.
    let o = ImageOptions {
        backing: strata_graph::BackingMode::None,
        ..ro()
    };
    assert!(open_image(&p(dir, "nofmt.qcow2"), &o).await.is_ok());
    // Probing the named image: raw gets QEMU's warning when opened read-write.
    let opened = open_image(&p(dir, "base.raw"), &ro()).await.unwrap();
    assert_eq!(opened.format, "raw");
    assert!(opened.warnings.is_empty());
    let opened = open_image(&p(dir, "base.raw"), &ImageOptions::default())
        .await
        .unwrap();
    let (_, _, qemu) = run(dir, "qemu-io", &["-c", "read 0 512", &p(dir, "base.raw")]);
    assert_eq!(format!("{}\n", opened.warnings[0]), qemu);
    let opened = open_image(&p(dir, "top.qcow2"), &ro()).await.unwrap();
    assert_eq!(opened.format, "qcow2");
    assert!(opened.warnings.is_empty());
}

#[tokio::test]
async fn rebase_data_matches_qemu_img_rebase() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    std::fs::copy(dir.join("top.qcow2"), dir.join("top2.qcow2")).unwrap();
    sh(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "before.raw"],
    );
    sh(
        dir,
        "qemu-img",
        &["rebase", "-b", "base.raw", "-F", "raw", "top.qcow2"],
    );
    let o = ImageOptions {
        format: Some("qcow2".into()),
        ..Default::default()
    };
    let image = open_image(&p(dir, "top2.qcow2"), &o).await.unwrap().node;
    let old = image.backing().unwrap();
    let new = open(&p(dir, "base.raw"), Some("raw")).await;
    let opts = strata_graph::RebaseOptions {
        common_base: Some(new.clone()),
        ..Default::default()
    };
    strata_graph::rebase_data(&image, Some(&old), Some(&new), &opts)
        .await
        .unwrap();
    let q = image
        .as_any()
        .downcast_ref::<strata_qcow2::Qcow2>()
        .unwrap();
    q.set_backing(Some("base.raw"), Some("raw")).await.unwrap();
    image.close().await.unwrap();
    drop((image, old, new));
    let (code, out, _) = run(
        dir,
        "qemu-img",
        &["compare", "-F", "raw", "top2.qcow2", "before.raw"],
    );
    assert_eq!((code, out.as_str()), (0, "Images are identical.\n"));
    let strip = |s: String| {
        s.lines()
            .map(|l| {
                l.split(", \"offset\"")
                    .next()
                    .unwrap()
                    .trim_end_matches([',', '}', ']'])
                    .to_string()
            })
            .collect::<Vec<_>>()
    };
    let a = strip(sh(dir, "qemu-img", &["map", "--output=json", "top.qcow2"]));
    let b = strip(sh(dir, "qemu-img", &["map", "--output=json", "top2.qcow2"]));
    assert_eq!(a, b);
}

#[tokio::test]
async fn commit_through_the_copy_engine_matches_qemu_img_commit() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    build_chain(dir);
    std::fs::copy(dir.join("mid.qcow2"), dir.join("mid-q.qcow2")).unwrap();
    sh(
        dir,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "before.raw"],
    );
    sh(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid-q.qcow2",
            "-F",
            "qcow2",
            "top-q.qcow2",
            "6M",
        ],
    );
    sh(
        dir,
        "qemu-img",
        &[
            "convert",
            "-n",
            "-B",
            "mid-q.qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            "top-q.qcow2",
        ],
    );
    sh(dir, "qemu-img", &["commit", "-q", "top-q.qcow2"]);
    let o = ImageOptions {
        format: Some("qcow2".into()),
        backing_writable: true,
        ..Default::default()
    };
    let top = open_image(&p(dir, "top.qcow2"), &o).await.unwrap().node;
    let mid = top.backing().unwrap();
    assert!(!mid.read_only());
    mid.truncate(top.size(), strata_core::Prealloc::Off)
        .await
        .unwrap();
    let opts = CopyOptions {
        base: Some(mid.clone()),
        target_init: TargetInit::Backing { len: u64::MAX },
        ..Default::default()
    };
    copy_image(&top, &mid, &opts).await.unwrap();
    mid.close().await.unwrap();
    // Close the files too, so their image locks go before qemu-img looks.
    for n in [&top, &mid] {
        n.file().unwrap().close().await.unwrap();
    }
    drop((top, mid));
    for m in ["mid.qcow2", "mid-q.qcow2"] {
        let (code, out, _) = run(dir, "qemu-img", &["compare", "-F", "raw", m, "before.raw"]);
        assert_eq!((code, out.as_str()), (0, "Images are identical.\n"), "{m}");
        sh(dir, "qemu-img", &["check", m]);
    }
}

#[tokio::test]
async fn chains_deeper_than_the_cap_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let n = strata_graph::open::MAX_CHAIN_DEPTH;
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "c.raw", "1M"],
    );
    for i in (0..=n).rev() {
        let (b, f) = if i == n {
            ("c.raw".to_string(), "raw")
        } else {
            (format!("c{}.qcow2", i + 1), "qcow2")
        };
        let opts = strata_qcow2::CreateOptions {
            size: 1 << 20,
            backing_file: Some(b),
            backing_format: Some(f.into()),
            ..Default::default()
        };
        create_image(&p(dir, &format!("c{i}.qcow2")), "qcow2", &opts)
            .await
            .unwrap();
    }
    // c1 has exactly MAX_CHAIN_DEPTH images below it (c2..c512 and c.raw); c0 one more.
    let c1 = open_image(&p(dir, "c1.qcow2"), &ro()).await.unwrap().node;
    // Status and map through the whole chain are iterative.
    let e = strata_graph::block_status_above(&c1, None, 0, 1 << 20)
        .await
        .unwrap();
    assert_eq!(e.depth, n);
    let m = map_image(&c1, 0, None).await.unwrap();
    assert_eq!(m[0].depth, n as u64);
    let b = c1.read(0, strata_core::IoBuf::zeroed(4096)).await.unwrap();
    assert!(b.is_zero());
    drop(c1);
    let e = open_image(&p(dir, "c0.qcow2"), &ro())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("Could not open backing file: Backing chain is deeper than 512 images"),
        "{e}"
    );
}

/// Rename the backing-format header extension so that the image records no format.
fn strip_backing_format(path: &Path) {
    let mut d = std::fs::read(path).unwrap();
    let be32 = |d: &[u8], o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap());
    let mut o = be32(&d, 100) as usize;
    loop {
        let (t, l) = (be32(&d, o), be32(&d, o + 4) as usize);
        if t == 0 {
            break;
        }
        if t == 0xe279_2aca {
            d[o..o + 4].copy_from_slice(&0x0bad_f00du32.to_be_bytes());
        }
        o += 8 + l.next_multiple_of(8);
    }
    std::fs::write(path, d).unwrap();
}
