//! `measure` against `qemu-img measure`: a grid of sizes and options, and real input images.

use std::process::Command;

use serde_json::Value;
use strata_core::Prealloc;
use strata_qcow2::measure::{InputBitmap, MeasureInput, MeasureOptions, measure};

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        eprintln!("qemu-img not installed: skipping");
    }
    ok
}

fn qemu(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn opt_string(o: &MeasureOptions) -> String {
    format!(
        "cluster_size={},refcount_bits={},extended_l2={},compat={},preallocation={}",
        o.cluster_size,
        o.refcount_bits,
        if o.extended_l2 { "on" } else { "off" },
        if o.v3 { "1.1" } else { "0.10" },
        o.prealloc.as_str()
    )
}

#[test]
fn size_grid_matches_qemu_img() {
    if !have_qemu() {
        return;
    }
    let sizes = [0u64, 512, 1 << 20, (1 << 30) + 1, 100 << 30, 3 << 40];
    let mut n = 0;
    for (i, &size) in sizes.iter().enumerate() {
        for (j, &cs) in [512u64, 4096, 65536, 2 << 20].iter().enumerate() {
            for (k, &rb) in [1u64, 16, 64].iter().enumerate() {
                // A diagonal through the remaining options keeps the run short.
                let x = i + j + k;
                let opts = MeasureOptions {
                    size: Some(size),
                    cluster_size: cs,
                    refcount_bits: rb,
                    extended_l2: x % 2 == 1,
                    v3: true,
                    prealloc: [Prealloc::Off, Prealloc::Metadata, Prealloc::Full][x % 3],
                    has_backing_file: false,
                };
                let o = opt_string(&opts);
                let s = size.to_string();
                let (ok, out, err) = qemu(&[
                    "measure",
                    "--output=json",
                    "-O",
                    "qcow2",
                    "--size",
                    &s,
                    "-o",
                    &o,
                ]);
                let ours = measure(&opts, None);
                match ours {
                    Ok(m) => {
                        assert!(ok, "qemu-img failed for {s} {o}: {err}");
                        assert_eq!(m.to_json(), out, "size {s} {o}");
                    }
                    Err(e) => {
                        assert!(!ok, "we failed ({e}) where qemu-img did not: {s} {o}");
                        assert_eq!(format!("qemu-img: {e}\n"), err, "size {s} {o}");
                    }
                }
                n += 1;
            }
        }
    }
    // compat=0.10 and its refusal of other refcount widths.
    for rb in [16u64, 8] {
        let opts = MeasureOptions {
            size: Some(1 << 30),
            refcount_bits: rb,
            v3: false,
            ..Default::default()
        };
        let o = opt_string(&opts);
        let (ok, out, err) = qemu(&["measure", "-O", "qcow2", "--size", "1073741824", "-o", &o]);
        match measure(&opts, None) {
            Ok(m) => assert_eq!(m.to_human(), out, "{o} {ok}"),
            Err(e) => assert_eq!(format!("qemu-img: {e}\n"), err),
        }
    }
    assert!(n > 50);
}

/// Data extents from `qemu-img map`, the same block-status walk qemu-img measure does.
fn input_of(path: &str) -> MeasureInput {
    let (ok, out, err) = qemu(&["map", "--output=json", path]);
    assert!(ok, "{err}");
    let map: Value = serde_json::from_str(&out).unwrap();
    let data_extents = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool().unwrap() && !e["zero"].as_bool().unwrap())
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    let (ok, out, err) = qemu(&["info", "--output=json", path]);
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|bms| {
            bms.iter()
                .map(|b| InputBitmap {
                    name_len: b["name"].as_str().unwrap().len() as u64,
                    granularity: b["granularity"].as_u64().unwrap(),
                })
                .collect()
        })
        .or_else(|| {
            (info["format-specific"]["data"]["compat"].as_str() == Some("1.1")).then(Vec::new)
        });
    MeasureInput {
        size: info["virtual-size"].as_u64().unwrap(),
        data_extents,
        bitmaps,
    }
}

#[test]
fn input_images_match_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("in.qcow2");
    let p = img.to_str().unwrap();
    assert!(
        qemu(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p,
            "300M"
        ])
        .0
    );
    let io = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 5000 3",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 3 100M 70k",
            "-c",
            "write -P 4 299M 1M",
        ])
        .arg(p)
        .output()
        .unwrap();
    assert!(io.status.success());
    let (ok, _, err) = qemu(&["bitmap", "--add", "-g", "8192", p, "backup-one"]);
    assert!(ok, "{err}");
    assert!(qemu(&["bitmap", "--add", p, "b2"]).0);
    let input = input_of(p);
    for (cs, rb, backing, prealloc) in [
        (65536u64, 16u64, false, Prealloc::Off),
        (512, 1, false, Prealloc::Metadata),
        (2 << 20, 64, false, Prealloc::Off),
        (65536, 16, true, Prealloc::Off),
        (16384, 8, false, Prealloc::Falloc),
    ] {
        let opts = MeasureOptions {
            cluster_size: cs,
            refcount_bits: rb,
            prealloc,
            has_backing_file: backing,
            ..Default::default()
        };
        let mut o = opt_string(&opts);
        if backing {
            o.push_str(",backing_file=/nonexistent,backing_fmt=raw");
        }
        let (ok, out, err) = qemu(&["measure", "--output=json", "-O", "qcow2", "-o", &o, p]);
        assert!(ok, "{err}");
        assert_eq!(measure(&opts, Some(&input)).unwrap().to_json(), out, "{o}");
    }
    // A v2 target cannot hold bitmaps: no bitmaps size.
    let opts = MeasureOptions {
        v3: false,
        ..Default::default()
    };
    let (_, out, _) = qemu(&["measure", "-O", "qcow2", "-o", "compat=0.10", p]);
    assert_eq!(measure(&opts, Some(&input)).unwrap().to_human(), out);
}
