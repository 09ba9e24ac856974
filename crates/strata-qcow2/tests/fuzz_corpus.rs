//! Replays every file of the fuzz corpus (`/fuzz/corpus/<target>/`) through the same entry
//! points as the fuzz targets, so what the fuzzer once found stays fixed.

use std::path::Path;

use strata_qcow2::fuzzing;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        eprintln!("{}", path.display());
        f(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}

#[test]
fn qcow2_header_corpus() {
    replay("qcow2_header", fuzzing::header);
}

#[test]
fn qcow2_check_corpus() {
    replay("qcow2_check", fuzzing::check);
}

#[test]
fn qcow2_decompress_corpus() {
    replay("qcow2_decompress", fuzzing::decompress);
}

/// The unmodified seed images (written by QEMU) check clean, without needing QEMU here.
#[test]
fn pristine_seeds_check_clean() {
    use std::sync::Arc;
    use strata_core::NodeRef;
    use strata_core::mem::MemNode;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/qcow2_check");
    for name in ["c512", "c4k", "ext", "lazy"] {
        let data = std::fs::read(dir.join(name)).unwrap();
        let node: NodeRef = Arc::new(MemNode::with_data(data));
        let r = futures::executor::block_on(strata_qcow2::check::check(&node, None)).unwrap();
        assert_eq!(
            r.exit_code(),
            0,
            "{name}: {}{}",
            r.render_human(),
            r.render_stderr()
        );
        assert!(r.messages.is_empty(), "{name}");
        assert!(
            r.render_human()
                .starts_with("No errors were found on the image.\n")
        );
    }
}

/// Includes QEMU's CVE classes (huge L1/refcount sizes, overlapping metadata, hostile
/// backing and data-file names), made by `fuzz/make-seeds.sh`.
#[test]
fn qcow2_open_corpus() {
    replay("qcow2_open", fuzzing::open);
}
