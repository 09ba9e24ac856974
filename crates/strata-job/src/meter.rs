//! [`Meter`]: how fast a value changes over a sliding window (a Strata addition behind the
//! `rate`, `dirty-rate` and `copy-rate` job fields and mirror's `copy-mode: auto`).
//!
//! Callers record `(time, value)` samples whenever convenient (every progress update, every
//! copy-loop turn, every query); the meter keeps one sample per [`MIN_STEP`] and forgets
//! those older than its window, so recording is O(1) amortised however often it is called.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples closer together than this collapse into one.
pub const MIN_STEP: Duration = Duration::from_millis(50);

/// The default window: long enough to smooth 4 KiB writes and 1 MiB copies alike, short
/// enough for a live display to follow a change of load within a few seconds.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(2);

/// The slope of a sampled value over a sliding window.
#[derive(Debug, Clone)]
pub struct Meter {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
    latest: Option<(Instant, u64)>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter::new(DEFAULT_WINDOW)
    }
}

impl Meter {
    /// A meter averaging over `window`.
    pub fn new(window: Duration) -> Meter {
        Meter {
            window,
            samples: VecDeque::new(),
            latest: None,
        }
    }

    /// Records `value` at `now` (times must not go backwards; earlier ones are ignored).
    pub fn record(&mut self, now: Instant, value: u64) {
        if let Some((t, _)) = self.latest
            && now < t
        {
            return;
        }
        self.latest = Some((now, value));
        let keep = match self.samples.back() {
            Some(&(t, _)) => now.duration_since(t) >= MIN_STEP,
            None => true,
        };
        if keep {
            self.samples.push_back((now, value));
        }
        // Keep one sample at least a window old, so the slope always spans the window.
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= self.window {
            self.samples.pop_front();
        }
    }

    /// Change per second from the oldest kept sample to the latest; `None` until the
    /// samples span at least [`MIN_STEP`].
    pub fn slope(&self) -> Option<f64> {
        let (t0, v0) = *self.samples.front()?;
        let (t1, v1) = self.latest?;
        let dt = t1.duration_since(t0);
        if dt < MIN_STEP {
            return None;
        }
        Some((v1 as f64 - v0 as f64) / dt.as_secs_f64())
    }

    /// The slope of a monotonic counter, as a whole non-negative rate per second.
    pub fn rate(&self) -> u64 {
        self.slope().unwrap_or(0.0).max(0.0).round() as u64
    }

    /// The most recently recorded value.
    pub fn latest(&self) -> Option<u64> {
        self.latest.map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_steady_counter() {
        let t = Instant::now();
        let mut m = Meter::new(Duration::from_secs(1));
        assert_eq!(m.slope(), None);
        for i in 0..=40u64 {
            m.record(t + Duration::from_millis(i * 100), i * 1000);
        }
        // 1000 units per 100 ms.
        assert!((m.slope().unwrap() - 10_000.0).abs() < 1.0);
        assert_eq!(m.rate(), 10_000);
        // The window slides: only the last second matters once the counter stops.
        for i in 41..=60u64 {
            m.record(t + Duration::from_millis(i * 100), 40_000);
        }
        assert_eq!(m.rate(), 0);
    }

    #[test]
    fn falling_values_have_negative_slope_and_zero_rate() {
        let t = Instant::now();
        let mut m = Meter::default();
        m.record(t, 5000);
        m.record(t + Duration::from_secs(1), 3000);
        assert!((m.slope().unwrap() + 2000.0).abs() < 1e-6);
        assert_eq!(m.rate(), 0);
        assert_eq!(m.latest(), Some(3000));
    }

    #[test]
    fn bursts_of_samples_collapse() {
        let t = Instant::now();
        let mut m = Meter::new(Duration::from_secs(1));
        for i in 0..10_000u64 {
            m.record(t + Duration::from_micros(i), i);
        }
        assert!(m.samples.len() <= 2);
        // Going back in time is ignored.
        m.record(t, 0);
        assert_eq!(m.latest(), Some(9_999));
    }
}
