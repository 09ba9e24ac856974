//! Crash states from a write log: the durable prefix up to a completed flush, plus a seeded
//! random subset, in a seeded random order, of the requests of the following epoch (the
//! requests completed before the next flush). Discards are modelled as applied or not.

use strata_graph::drivers::log_writes::LogEntry;
use strata_testkit::Xorshift;

/// Apply one request to an image file held in memory.
pub fn apply(img: &mut Vec<u8>, e: &LogEntry) {
    let span = |img: &mut Vec<u8>, off: u64, len: u64| {
        let end = (off + len) as usize;
        if img.len() < end {
            img.resize(end, 0);
        }
        off as usize..end
    };
    match e {
        LogEntry::Write { offset, data } => {
            let r = span(img, *offset, data.len() as u64);
            img[r].copy_from_slice(data);
        }
        LogEntry::Zeroes { offset, len } | LogEntry::Discard { offset, len } => {
            let r = span(img, *offset, *len);
            img[r].fill(0);
        }
        LogEntry::Truncate { size } => img.resize(*size as usize, 0),
        LogEntry::Flush { .. } => {}
    }
}

/// The positions (indices into the log) of the flush entries.
pub fn flush_points(log: &[LogEntry]) -> Vec<usize> {
    log.iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, LogEntry::Flush { .. }))
        .map(|(i, _)| i)
        .collect()
}

/// One crash state: the image as a power loss right after log entry `durable_end` (exclusive)
/// plus `extra` of the later requests could have left it.
#[derive(Debug)]
pub struct CrashState {
    /// Entries `..durable_end` are all applied.
    pub durable_end: usize,
    /// The image file bytes.
    pub image: Vec<u8>,
}

/// Build `variants` crash states for the epoch starting at `durable_end` (the first
/// `variants` - 1 random; the last with the whole epoch applied in order); `base` is the
/// image with `log[..durable_end]` already applied.
pub fn epoch_states(
    base: &[u8],
    log: &[LogEntry],
    durable_end: usize,
    variants: usize,
    rng: &mut Xorshift,
) -> Vec<CrashState> {
    let epoch_end = log[durable_end..]
        .iter()
        .position(|e| matches!(e, LogEntry::Flush { .. }))
        .map_or(log.len(), |p| durable_end + p);
    let epoch: Vec<&LogEntry> = log[durable_end..epoch_end].iter().collect();
    let mut out = Vec::with_capacity(variants);
    for v in 0..variants {
        let mut image = base.to_vec();
        if v + 1 == variants {
            epoch.iter().for_each(|e| apply(&mut image, e));
        } else if !epoch.is_empty() {
            let mut order: Vec<usize> = (0..epoch.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
            }
            let keep = rng.next() % (epoch.len() as u64 + 1);
            for &i in order.iter().take(keep as usize) {
                apply(&mut image, epoch[i]);
            }
        }
        out.push(CrashState { durable_end, image });
    }
    out
}
