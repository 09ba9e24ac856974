//! Crash-consistency harness (issue 7 items 1 and 2).
//!
//! * [`pattern`]: sector contents that name their own offset and generation, so a sector
//!   read back from the wrong place, a stale one, or a torn one is recognised.
//! * [`replay`]: rebuilds the crash states a write log (from the `log-writes` filter) allows.
//! * [`powerloss`]: runs guest writes on an in-process qcow2 over a logged memory file and
//!   checks every replayed crash state.
//! * [`powerloss_jobs`]: the same for a stream job across a base and a top image file.
//! * [`killsweep`]: runs `strata` commands and SIGKILLs them at seeded random points.

pub mod killsweep;
pub mod pattern;
pub mod powerloss;
pub mod powerloss_jobs;
pub mod replay;

/// What one sweep measured.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Crash states (kill points or replayed states) checked.
    pub states: u64,
    /// States whose check reported leaks only (exit 3).
    pub leaks_only: u64,
    /// Invariant violations, one line each (with the seed to reproduce).
    pub failures: Vec<String>,
}

impl Tally {
    /// Add `other`'s counts to `self`.
    pub fn absorb(&mut self, other: Tally) {
        self.states += other.states;
        self.leaks_only += other.leaks_only;
        self.failures.extend(other.failures);
    }
}
