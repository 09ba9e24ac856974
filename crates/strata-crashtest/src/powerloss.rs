//! Power-loss replay of guest writes on an in-process qcow2 image.
//!
//! The image file is a memory node wrapped in the `log-writes` filter. The guest writes
//! self-describing sectors ([`crate::pattern`]) at seeded random offsets and flushes every
//! few writes. For every file-level flush point and `variants` random subsets/orders of the
//! epoch after it, the crash image must (1) pass the qcow2 check with no corruption (leaks
//! only are counted apart), (2) open read-write, and (3) read back, in every sector, either a
//! generation the guest wrote there no older than the one acknowledged before the last guest
//! flush the crash state contains, and never data of another offset or torn data.

use std::sync::Arc;

use strata_core::mem::MemNode;
use strata_core::{BlockNode, IoBuf, NodeRef, WriteFlags};
use strata_graph::drivers::log_writes::{LogEntry, LogWritesFilter};
use strata_qcow2::check::check;
use strata_qcow2::{CreateOptions, OpenOptions, Qcow2};
use strata_testkit::Xorshift;

use crate::pattern::{SECTOR, check_sector, fill};
use crate::replay::{apply, epoch_states, flush_points};
use crate::{Tally, pattern};

/// Guest disk size of the scenario.
const DISK: u64 = 4 << 20;
const SECTORS: u64 = DISK / SECTOR as u64;

/// The guest's history: per sector, the generations written, and at each guest flush the
/// log length when it completed and the generation each sector had then.
struct GuestHistory {
    written: Vec<Vec<u64>>,
    flushes: Vec<(usize, Vec<u64>)>,
}

/// Run `writes` guest writes (a flush every 1..8 writes) with `seed`, then replay
/// `variants` crash states per file-level epoch.
pub fn guest_writes(seed: u64, writes: usize, variants: usize) -> Tally {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(seed, writes, variants))
        .unwrap_or_else(|e| Tally {
            states: 0,
            leaks_only: 0,
            failures: vec![format!("guest-writes seed {seed}: setup failed: {e}")],
        })
}

async fn run(seed: u64, writes: usize, variants: usize) -> Result<Tally, String> {
    let mem: NodeRef = Arc::new(MemNode::new());
    let opts = CreateOptions {
        size: DISK,
        ..Default::default()
    };
    strata_qcow2::create(&mem, &opts, None)
        .await
        .map_err(|e| e.to_string())?;
    mem.flush().await.map_err(|e| e.to_string())?;
    let base = read_all(&mem).await?;
    let filter = Arc::new(LogWritesFilter::new(mem.clone()));
    let log = filter.log();
    let file: NodeRef = filter;
    let img = Qcow2::open(file, &OpenOptions::default(), None, None)
        .await
        .map_err(|e| e.to_string())?;
    let mut rng = Xorshift::new(seed);
    let mut hist = GuestHistory {
        written: vec![vec![0]; SECTORS as usize],
        flushes: Vec::new(),
    };
    let mut current = vec![0u64; SECTORS as usize];
    let mut next_flush = 1 + rng.next() % 8;
    for w in 0..writes as u64 {
        let n = 1 + rng.next() % 16;
        let first = rng.next() % (SECTORS - n);
        let generation = w + 1;
        let mut buf = IoBuf::zeroed((n as usize) * SECTOR);
        fill(&mut buf, first * SECTOR as u64, generation);
        img.write(first * SECTOR as u64, buf, WriteFlags::default())
            .await
            .map_err(|e| e.to_string())?;
        for s in first..first + n {
            current[s as usize] = generation;
            hist.written[s as usize].push(generation);
        }
        next_flush -= 1;
        if next_flush == 0 {
            img.flush().await.map_err(|e| e.to_string())?;
            hist.flushes.push((log.lock().len(), current.clone()));
            next_flush = 1 + rng.next() % 8;
        }
    }
    let log = log.lock().clone();
    Ok(replay_all(&base, &log, &hist, variants, seed).await)
}

async fn read_all(node: &NodeRef) -> Result<Vec<u8>, String> {
    let buf = node
        .read(0, IoBuf::zeroed(node.size() as usize))
        .await
        .map_err(|e| e.to_string())?;
    Ok(buf.to_vec())
}

async fn replay_all(
    base: &[u8],
    log: &[LogEntry],
    hist: &GuestHistory,
    variants: usize,
    seed: u64,
) -> Tally {
    let mut tally = Tally::default();
    let mut rng = Xorshift::new(seed ^ 0x5eed);
    let mut image = base.to_vec();
    let mut applied = 0;
    // Epoch 0 starts at the beginning; each later one just after a flush entry.
    let mut starts = vec![0];
    starts.extend(flush_points(log).into_iter().map(|i| i + 1));
    for start in starts {
        while applied < start {
            apply(&mut image, &log[applied]);
            applied += 1;
        }
        for state in epoch_states(&image, log, start, variants, &mut rng) {
            tally.states += 1;
            if let Err(e) = verify(&state.image, state.durable_end, hist).await {
                tally.failures.push(format!(
                    "guest-writes seed {seed} durable_end {}: {e}",
                    state.durable_end
                ));
            } else if let Ok(true) = leaks_only(&state.image).await {
                tally.leaks_only += 1;
            }
        }
    }
    tally
}

async fn leaks_only(image: &[u8]) -> Result<bool, String> {
    let node: NodeRef = Arc::new(MemNode::with_data(image.to_vec()));
    let r = check(&node, None).await.map_err(|e| e.to_string())?;
    Ok(r.exit_code() == 3)
}

/// The invariants of one crash state (see the module comment).
async fn verify(image: &[u8], durable_end: usize, hist: &GuestHistory) -> Result<(), String> {
    let node: NodeRef = Arc::new(MemNode::with_data(image.to_vec()));
    let r = check(&node, None).await.map_err(|e| e.to_string())?;
    if !matches!(r.exit_code(), 0 | 3) {
        return Err(format!("check exit {}: {:?}", r.exit_code(), r.messages));
    }
    let img = Qcow2::open(node, &OpenOptions::default(), None, None)
        .await
        .map_err(|e| format!("open: {e}"))?;
    let view = img
        .read(0, IoBuf::zeroed(DISK as usize))
        .await
        .map_err(|e| format!("read: {e}"))?;
    // The newest guest flush whose completion is inside the durable prefix.
    let durable = hist
        .flushes
        .iter()
        .rev()
        .find(|(len, _)| *len <= durable_end)
        .map(|(_, gens)| gens.as_slice());
    for (i, s) in view.chunks(SECTOR).enumerate() {
        let floor = durable.map_or(0, |g| g[i]);
        let allowed: Vec<u64> = hist.written[i]
            .iter()
            .copied()
            .filter(|&g| g >= floor)
            .collect();
        if let Some(e) = check_sector(s, i as u64, &allowed) {
            return Err(e);
        }
    }
    let _ = pattern::decode;
    Ok(())
}
