//! The chain mapping cache: where reads that fall through this image land.
//!
//! A read of a cluster this image does not allocate goes to its backing node, which looks
//! the cluster up and may pass it further down — one metadata lookup, one lock and one
//! async call per layer, so a read through a chain of 128 overlays costs 128 lookups. Here
//! the overlay remembers, per guest range, the answer of that walk (the host node and
//! offset that hold the data, or "reads as zero") and reads the host node directly.
//!
//! Why it stays right: only nodes that offer it take part (qcow2 and raw formats, through
//! graph links; a filter anywhere below disables the cache for that range, so reads still
//! pass through it), and such a node bumps the process-wide mapping epoch whenever a
//! mapping it offered may change (see [`strata_core::BlockNode::offer_mapping_cache`]), as
//! does re-pointing a graph link. A remembered answer is used only while the epoch is the
//! one read before the walk that produced it. This image's own clusters are always looked
//! up first, so its own writes never need the cache to forget anything.

use std::collections::BTreeMap;

use strata_core::node::mapping_epoch;
use strata_core::{IoBuf, NodeRef, Result};

use crate::node::Qcow2;

/// Most remembered runs before the cache starts over (a run is at least a cluster of the
/// layer that holds it: 64 Ki runs cover 4 GiB of 64 KiB clusters).
const MAX_RUNS: usize = 1 << 16;

/// One walk down the chain maps a whole aligned window of this size, so that random reads
/// walk once per window rather than once per run (per-layer lookups are async calls).
const WINDOW: u64 = 8 << 20;

/// Where a run of guest bytes below this image reads from.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// No layer holds data: zeroes.
    Zero,
    /// The bytes at `offset` of `node` (a protocol node under the layer that holds them).
    Host { node: NodeRef, offset: u64 },
}

impl Target {
    /// The same target `skip` bytes further on.
    fn at(&self, skip: u64) -> Target {
        match self {
            Target::Zero => Target::Zero,
            Target::Host { node, offset } => Target::Host {
                node: node.clone(),
                offset: offset + skip,
            },
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct ChainCache {
    /// The epoch the runs were found in.
    epoch: u64,
    /// Guest start → (guest end, target at the start).
    runs: BTreeMap<u64, (u64, Target)>,
}

impl ChainCache {
    /// The remembered run containing `guest`: how many bytes from `guest` it covers, and
    /// where `guest` reads from.
    fn lookup(&mut self, guest: u64) -> Option<(u64, Target)> {
        let now = mapping_epoch();
        if self.epoch != now {
            self.runs.clear();
            self.epoch = now;
            return None;
        }
        let (&start, (end, target)) = self.runs.range(..=guest).next_back()?;
        if guest >= *end {
            return None;
        }
        Some((end - guest, target.at(guest - start)))
    }

    fn remember(&mut self, epoch: u64, guest: u64, len: u64, target: Target) {
        if epoch != self.epoch {
            if epoch != mapping_epoch() {
                return; // found in an epoch that is already over
            }
            self.runs.clear();
            self.epoch = epoch;
        }
        if self.runs.len() >= MAX_RUNS {
            self.runs.clear();
        }
        self.runs.insert(guest, (guest + len, target));
    }
}

impl Qcow2 {
    fn chain_cache(&self) -> std::sync::MutexGuard<'_, ChainCache> {
        self.chain_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget every remembered run (this image's backing changed).
    pub(crate) fn forget_chain(&self) {
        *self.chain_cache() = ChainCache::default();
    }

    /// Reads `buf` at `guest` from the layers below this image (`below` is its backing
    /// node), straight from the host nodes where the chain allows it.
    pub(crate) async fn read_below(
        &self,
        below: &NodeRef,
        guest: u64,
        buf: IoBuf,
    ) -> Result<IoBuf> {
        let mut rest = buf;
        let mut pos = guest;
        let mut pieces = Vec::new();
        while !rest.is_empty() {
            let want = rest.len() as u64;
            let found = self.chain_cache().lookup(pos);
            let found = match found {
                Some(f) => Some(f),
                None => self.walk_below(below, pos).await?,
            };
            let Some((n, target)) = found else {
                // Not cacheable: the ordinary read through the backing node.
                pieces.push(below.read(pos, rest).await?);
                break;
            };
            let n = n.min(want);
            let mut piece = rest.split_to(n as usize);
            match target {
                Target::Zero => piece.fill(0),
                Target::Host { node, offset } => piece = node.read(offset, piece).await?,
            }
            pieces.push(piece);
            pos += n;
        }
        Ok(IoBuf::join(pieces))
    }

    /// Maps the window of the chain below around `guest` (all of it, layer by layer, so one
    /// walk serves every later read in the window), remembers what it found, and answers for
    /// `guest`: how many bytes from there read from one place, and that place; `None` if the
    /// run is not cacheable (a layer that does not offer its mapping, a compressed run).
    async fn walk_below(&self, below: &NodeRef, guest: u64) -> Result<Option<(u64, Target)>> {
        let epoch = mapping_epoch();
        let start = guest - guest % WINDOW;
        let mut open = vec![(start, start + WINDOW)];
        let mut found: Vec<(u64, u64, Target)> = Vec::new();
        let mut layer = Some(below.clone());
        while !open.is_empty() {
            let Some(node) = layer.take() else {
                found.extend(open.drain(..).map(|(a, b)| (a, b, Target::Zero)));
                break;
            };
            // Offer first: from now on the node announces changes, so what it answers below
            // is either current or out of date by the epoch read above.
            if !node.offer_mapping_cache() {
                break; // what is still open stays uncached
            }
            let size = node.size();
            let mut next = Vec::new();
            for (a, b) in open.drain(..) {
                if b > size {
                    found.push((a.max(size), b, Target::Zero));
                }
                let mut pos = a;
                while pos < b.min(size) {
                    let ext = node.block_status(pos, b.min(size) - pos).await?;
                    let n = ext.len.clamp(1, b.min(size) - pos);
                    let st = ext.status;
                    if !(st.allocated || st.data || st.zero) {
                        match next.last_mut() {
                            Some((_, e)) if *e == pos => *e = pos + n,
                            _ => next.push((pos, pos + n)),
                        }
                    } else if st.compressed {
                        // No linear host offset: left to the ordinary read.
                    } else if st.zero && node.driver() == "qcow2" {
                        // A qcow2 zero cluster reads as zeroes whatever its host cluster
                        // holds (a raw layer's "zero" is a hole, read from the host below).
                        found.push((pos, pos + n, Target::Zero));
                    } else if let (Some(host), Some(offset)) = (ext.host_node, st.host_offset) {
                        found.push((pos, pos + n, Target::Host { node: host, offset }));
                    } else if st.zero {
                        found.push((pos, pos + n, Target::Zero));
                    }
                    pos += n;
                }
            }
            open = next;
            layer = node.backing();
        }
        let mut cache = self.chain_cache();
        let mut answer = None;
        for (a, b, target) in found {
            if (a..b).contains(&guest) {
                answer = Some((b - guest, target.at(guest - a)));
            }
            cache.remember(epoch, a, b - a, target);
        }
        Ok(answer)
    }
}
