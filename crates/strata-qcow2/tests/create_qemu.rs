//! `create` writes the same bytes as `qemu-img create -f qcow2`.

mod common;

use common::*;
use strata_core::Prealloc;
use strata_qcow2::{CompressionType, CreateOptions};

fn qemu_opts(o: &CreateOptions) -> String {
    let mut v = vec![
        format!("cluster_size={}", o.cluster_size),
        format!("compat={}", if o.compat_v3 { "1.1" } else { "0.10" }),
        format!("refcount_bits={}", o.refcount_bits),
        format!("extended_l2={}", if o.extended_l2 { "on" } else { "off" }),
        format!(
            "lazy_refcounts={}",
            if o.lazy_refcounts { "on" } else { "off" }
        ),
        format!("compression_type={}", o.compression_type.as_str()),
        format!("preallocation={}", o.preallocation.as_str()),
    ];
    if let Some(b) = &o.backing_file {
        v.push(format!("backing_file={b}"));
        v.push(format!(
            "backing_fmt={}",
            o.backing_format.as_deref().unwrap()
        ));
    }
    if let Some(d) = &o.data_file {
        v.push(format!("data_file={d}"));
        v.push(format!(
            "data_file_raw={}",
            if o.data_file_raw { "on" } else { "off" }
        ));
    }
    v.join(",")
}

#[tokio::test]
async fn create_is_byte_identical_to_qemu_img() {
    let d = Dir::new();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d.s("base.qcow2"), "1G"],
    );
    let base = CreateOptions::default();
    let cases: Vec<CreateOptions> = vec![
        CreateOptions {
            size: 1 << 20,
            ..base.clone()
        },
        CreateOptions {
            size: 10 << 30,
            ..base.clone()
        },
        CreateOptions {
            size: 1000,
            ..base.clone()
        },
        CreateOptions {
            size: 1 << 30,
            cluster_size: 512,
            ..base.clone()
        },
        CreateOptions {
            size: 1 << 30,
            cluster_size: 4096,
            refcount_bits: 1,
            ..base.clone()
        },
        CreateOptions {
            size: 100 << 30,
            cluster_size: 2 << 20,
            refcount_bits: 64,
            ..base.clone()
        },
        CreateOptions {
            size: 1 << 30,
            extended_l2: true,
            ..base.clone()
        },
        CreateOptions {
            size: 1 << 30,
            lazy_refcounts: true,
            ..base.clone()
        },
        CreateOptions {
            size: 1 << 30,
            compat_v3: false,
            ..base.clone()
        },
        CreateOptions {
            size: 1 << 30,
            compression_type: CompressionType::Zstd,
            ..base.clone()
        },
        CreateOptions {
            size: 1 << 30,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            ..base.clone()
        },
        CreateOptions {
            size: 4 << 20,
            preallocation: Prealloc::Metadata,
            ..base.clone()
        },
        CreateOptions {
            size: 4 << 20,
            cluster_size: 512,
            preallocation: Prealloc::Metadata,
            ..base.clone()
        },
        CreateOptions {
            size: 4 << 20,
            extended_l2: true,
            preallocation: Prealloc::Metadata,
            ..base.clone()
        },
    ];
    for (i, o) in cases.iter().enumerate() {
        let q = d.path(&format!("q{i}.qcow2"));
        let s = d.path(&format!("s{i}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o"];
        let opts = qemu_opts(o);
        args.push(&opts);
        if o.backing_file.is_some() {
            args.push("-u");
        }
        let size = o.size.to_string();
        args.extend([q.to_str().unwrap(), &size]);
        ok("qemu-img", &args);
        let m = create_mem(o, None).await;
        save(&m, &s);
        check_clean(&s);
        let want = std::fs::read(&q).unwrap();
        let got = std::fs::read(&s).unwrap();
        assert_eq!(got.len(), want.len(), "case {i} {opts}: file size");
        if let Some(p) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("case {i} {opts}: first difference at byte {p:#x}");
        }
    }
}

#[tokio::test]
async fn create_with_data_file_matches() {
    let d = Dir::new();
    for raw in [false, true] {
        let o = CreateOptions {
            size: 3 << 20,
            // Absolute: qemu-img creates a relative data file in its working directory.
            data_file: Some(d.s("data.raw")),
            data_file_raw: raw,
            ..Default::default()
        };
        let q = d.path("q.qcow2");
        let opts = qemu_opts(&o);
        let size = o.size.to_string();
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                q.to_str().unwrap(),
                &size,
            ],
        );
        let df = std::sync::Arc::new(strata_core::mem::MemNode::new());
        let dfn: strata_core::NodeRef = df.clone();
        let m = create_mem(&o, Some(&dfn)).await;
        let s = d.path("s.qcow2");
        save(&m, &s);
        assert_eq!(
            std::fs::read(&s).unwrap(),
            std::fs::read(&q).unwrap(),
            "raw={raw}"
        );
        assert_eq!(df.snapshot().len() as u64, o.size);
    }
}

#[test]
fn option_errors_use_qemu_texts() {
    let base = CreateOptions {
        size: 1 << 20,
        ..Default::default()
    };
    let cases = [
        (
            CreateOptions {
                cluster_size: 1000,
                ..base.clone()
            },
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            CreateOptions {
                cluster_size: 4 << 20,
                ..base.clone()
            },
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            CreateOptions {
                refcount_bits: 3,
                ..base.clone()
            },
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            CreateOptions {
                refcount_bits: 128,
                ..base.clone()
            },
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            CreateOptions {
                extended_l2: true,
                cluster_size: 4096,
                ..base.clone()
            },
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ),
        (
            CreateOptions {
                compat_v3: false,
                lazy_refcounts: true,
                ..base.clone()
            },
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ),
        (
            CreateOptions {
                compat_v3: false,
                refcount_bits: 1,
                ..base.clone()
            },
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
        ),
        (
            CreateOptions {
                data_file_raw: true,
                ..base.clone()
            },
            "data-file-raw requires data-file",
        ),
        (
            CreateOptions {
                size: 1 << 50,
                cluster_size: 512,
                ..base.clone()
            },
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ),
    ];
    for (o, msg) in cases {
        assert_eq!(
            strata_qcow2::create::validate(&o).unwrap_err().message(),
            msg
        );
    }
}

/// falloc/full preallocation: QEMU moves the refcount table while preallocating, so the
/// layout differs; the image must still be clean and fully allocated.
#[tokio::test]
async fn full_and_falloc_preallocation() {
    let d = Dir::new();
    for (i, mode) in [Prealloc::Full, Prealloc::Falloc].into_iter().enumerate() {
        let o = CreateOptions {
            size: (3 << 20) + 512,
            cluster_size: 4096,
            preallocation: mode,
            ..Default::default()
        };
        let m = create_mem(&o, None).await;
        let p = d.path(&format!("p{i}.qcow2"));
        save(&m, &p);
        check_clean(&p);
        let map: Vec<serde_json::Value> = serde_json::from_str(&ok(
            "qemu-img",
            &["map", "--output=json", p.to_str().unwrap()],
        ))
        .unwrap();
        assert!(
            map.iter()
                .all(|e| e["data"] == true && e["present"] == true),
            "{map:?}"
        );
        let info = ok("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
        assert!(info.contains("\"virtual-size\": 3146240"), "{info}");
    }
}
