//! Compressed clusters against QEMU: we decompress what qemu-io / qemu-img convert wrote
//! (zlib and zstd), and qemu-io reads what we compressed.

use std::process::Command;

use strata_qcow2::compress::{CompressionType, compress_cluster, decompress_cluster};
use strata_qcow2::entry::{COMPRESSED, EntryFormat, OFFSET_MASK};
use strata_qcow2::header::Header;

fn have_qemu() -> bool {
    let ok = Command::new("qemu-io").arg("--version").output().is_ok();
    if !ok {
        eprintln!("qemu-io not installed: skipping");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn be64(d: &[u8], o: u64) -> u64 {
    u64::from_be_bytes(d[o as usize..o as usize + 8].try_into().unwrap())
}

/// Every compressed cluster of the image: (guest cluster index, L2 entry).
fn compressed_entries(d: &[u8], h: &Header) -> Vec<(u64, u64)> {
    let cs = h.cluster_size();
    let esize = h.l2_entry_size();
    let per_l2 = cs / esize;
    let mut out = Vec::new();
    for i in 0..u64::from(h.l1_size) {
        let l2 = be64(d, h.l1_table_offset + 8 * i) & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        for j in 0..per_l2 {
            let e = be64(d, l2 + j * esize);
            if e & COMPRESSED != 0 {
                out.push((i * per_l2 + j, e));
            }
        }
    }
    out
}

/// Guest data the test writes: compressible but not trivial.
fn pattern(cluster: u64, cs: usize) -> Vec<u8> {
    (0..cs)
        .map(|i| ((i / 3) as u64 ^ cluster.wrapping_mul(0x9e37)) as u8 & 0x3f)
        .collect()
}

fn fmt_of(h: &Header) -> EntryFormat {
    EntryFormat {
        cluster_bits: h.cluster_bits,
        extended_l2: h.extended_l2(),
        external_data_file: false,
    }
}

#[test]
fn qemu_compressed_clusters_decompress() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (kind, cs) in [
        ("zlib", 65536usize),
        ("zstd", 65536),
        ("zlib", 4096),
        ("zstd", 2 << 20),
        ("zstd", 512),
    ] {
        // A raw source with several clusters of varied data, converted with -c.
        let raw = dir.path().join("src.raw");
        let n = 4u64;
        let mut src = Vec::new();
        for c in 0..n {
            src.extend(pattern(c, cs));
        }
        std::fs::write(&raw, &src).unwrap();
        let img = dir.path().join(format!("{kind}-{cs}.qcow2"));
        let opts = format!("compression_type={kind},cluster_size={cs}");
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &opts,
                raw.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        // And one cluster written by qemu-io, beyond the converted ones.
        let off = (n * cs as u64).to_string();
        let len = cs.to_string();
        let w = format!("write -c -P 0x5a {off} {len}");
        run(
            "qemu-img",
            &[
                "resize",
                "-q",
                img.to_str().unwrap(),
                &((n + 2) * cs as u64).to_string(),
            ],
        );
        run("qemu-io", &["-c", &w, img.to_str().unwrap()]);

        let d = std::fs::read(&img).unwrap();
        let h = Header::parse(&d).unwrap();
        let ct = h.compression_type;
        assert_eq!(ct.as_str(), kind);
        let fmt = fmt_of(&h);
        let entries = compressed_entries(&d, &h);
        assert_eq!(entries.len() as u64, n + 1, "{kind} {cs}");
        for (cluster, e) in entries {
            let desc = fmt.compressed(e);
            let start = desc.host_offset as usize;
            let end = (start + desc.byte_len() as usize).min(d.len());
            let mut out = vec![0u8; cs];
            decompress_cluster(ct, &d[start..end], &mut out).unwrap();
            let want = if cluster < n {
                pattern(cluster, cs)
            } else {
                vec![0x5a; cs]
            };
            assert!(out == want, "{kind} {cs}: cluster {cluster} differs");
        }
    }
}

#[test]
fn qemu_reads_our_compressed_clusters() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for kind in [CompressionType::Zlib, CompressionType::Zstd] {
        let cs = 65536usize;
        let img = dir.path().join(format!("ours-{}.qcow2", kind.as_str()));
        let p = img.to_str().unwrap();
        let opts = format!("compression_type={}", kind.as_str());
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opts, p, "1M"],
        );
        run("qemu-io", &["-c", "write -c -P 0x11 0 64k", p]);
        let mut d = std::fs::read(&img).unwrap();
        let h = Header::parse(&d).unwrap();
        let fmt = fmt_of(&h);
        let (_, e) = compressed_entries(&d, &h)[0];
        // Our compressed data for a new pattern, appended at the end of the file.
        let data = pattern(7, cs);
        let c = compress_cluster(kind, &data, cs - 1).unwrap().unwrap();
        let at = d.len().next_multiple_of(512) as u64;
        d.resize(at as usize, 0);
        d.extend_from_slice(&c);
        d.resize(d.len().next_multiple_of(512), 0);
        let new = fmt.encode_compressed(at, c.len() as u64).unwrap();
        let l2 = be64(&d, h.l1_table_offset) & OFFSET_MASK;
        let slot = (0..cs as u64 / 8)
            .find(|j| be64(&d, l2 + j * 8) == e)
            .unwrap();
        d[(l2 + slot * 8) as usize..(l2 + slot * 8 + 8) as usize]
            .copy_from_slice(&new.to_be_bytes());
        std::fs::write(&img, &d).unwrap();
        // qemu-io reads it back; compare through a raw export of the guest data.
        let raw = dir.path().join("out.raw");
        run(
            "qemu-img",
            &["convert", "-O", "raw", p, raw.to_str().unwrap()],
        );
        let got = std::fs::read(&raw).unwrap();
        assert!(got[..cs] == data[..], "{kind:?}: qemu read different data");
    }
}
