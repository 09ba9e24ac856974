//! Replays every file of the fuzz corpus (`/fuzz/corpus/<target>/`) through the same entry
//! points as the fuzz targets, so what the fuzzer once found stays fixed.

use std::path::Path;
use std::time::{Duration, Instant};

use strata_qmp::fuzzing;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        eprintln!("{}", path.display());
        let t = Instant::now();
        f(&data);
        // Parsers are linear-time: a slow input is a bug even without a hang.
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{}: {:?}",
            path.display(),
            t.elapsed()
        );
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}

#[test]
fn qmp_json_corpus() {
    replay("qmp_json", fuzzing::qmp_json);
}

#[test]
fn keyval_corpus() {
    replay("keyval", fuzzing::keyval);
}
