//! Replays every file of `/fuzz/corpus/nbd_server/` through the fuzz target's entry point
//! (the real server handshake and request loop over an in-memory stream), plus random
//! mutations of those seeds. `STRATA_WRITE_NBD_SEEDS=1` rewrites the seed files first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use strata_nbd::fuzzing;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_server")
}

fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

#[test]
fn nbd_server_corpus() {
    if std::env::var_os("STRATA_WRITE_NBD_SEEDS").is_some() {
        for (name, data) in fuzzing::seed_sessions() {
            std::fs::write(corpus_dir().join(format!("seed_{name}")), data).unwrap();
        }
    }
    let files = corpus();
    assert!(!files.is_empty(), "empty corpus");
    for (path, data) in &files {
        eprintln!("{}", path.display());
        let t = Instant::now();
        fuzzing::server_session(data);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}: {:?}",
            path.display(),
            t.elapsed()
        );
    }
}

/// Every seed is a valid session: it must reach the end without the server hanging up early,
/// which the replay alone would not notice.
#[test]
fn seeds_are_valid_sessions() {
    let seeds = fuzzing::seed_sessions();
    assert!(seeds.len() >= 20, "{}", seeds.len());
    for (name, data) in seeds {
        let out = fuzzing::session_output(&data);
        if name.starts_with("opt_") {
            // Handshake only: an answer to the option, then the abort's ack.
            assert!(out.len() > 18 + 20, "{name}: {} bytes", out.len());
            continue;
        }
        // The reply echoes the request's cookie (0x1000 + command), so the request was served.
        let cookie = (0x1000u64 + u64::from(data_kind(&data))).to_be_bytes();
        assert!(
            out.windows(8).any(|w| w == cookie),
            "{name}: no reply with cookie {cookie:?} in {} bytes",
            out.len()
        );
    }
}

/// The command of a transmission seed: its first request (the handshake prefix is implied
/// by byte 0, not stored).
fn data_kind(data: &[u8]) -> u16 {
    u16::from_be_bytes([data[2 + 6], data[2 + 7]])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random byte flips, truncations and insertions on a random seed.
    #[test]
    fn mutated_seeds(
        pick in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        insert in prop::collection::vec(any::<u8>(), 0..64),
        at in any::<prop::sample::Index>(),
    ) {
        let seeds = fuzzing::seed_sessions();
        let mut data = seeds[pick.index(seeds.len())].1.clone();
        for (i, b) in flips {
            let i = i.index(data.len());
            data[i] ^= b;
        }
        let at = at.index(data.len() + 1);
        data.splice(at..at, insert);
        data.truncate(2 + cut.index(data.len() - 1));
        fuzzing::server_session(&data);
    }
}
