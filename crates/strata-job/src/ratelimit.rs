//! QEMU's `RateLimit` (`include/qemu/ratelimit.h`) with `BLOCK_JOB_SLICE_TIME`.
//!
//! Pure arithmetic over caller-supplied instants, so it is testable without sleeping.

use std::time::{Duration, Instant};

/// Length of one accounting slice (QEMU's `BLOCK_JOB_SLICE_TIME`, 100 ms).
pub const SLICE: Duration = Duration::from_millis(100);

/// A slice-based byte-rate limiter.
///
/// Quota per slice = max(speed × 0.1 s, 1) bytes; bytes are added to the current slice's
/// `dispatched` count; once the quota is reached the slice end is pushed to
/// `start + dispatched / quota × slice` and the caller must wait until then. A new
/// slice starts once the (possibly extended) one has expired.
#[derive(Debug, Clone, Default)]
pub struct RateLimit {
    speed: u64,
    quota: u64,
    dispatched: u64,
    slice_start: Option<Instant>,
    slice_end: Option<Instant>,
}

impl RateLimit {
    /// An unlimited limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes per second; 0 disables limiting.
    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Bytes allowed per slice without delay (0 when unlimited).
    pub fn slice_quota(&self) -> u64 {
        self.quota
    }

    /// Sets the rate (QEMU's `ratelimit_set_speed` with a 100 ms slice). Keeps the
    /// current slice's accounting, like QEMU.
    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
        self.quota = if speed == 0 {
            0
        } else {
            let q = speed as f64 * SLICE.as_secs_f64();
            (q as u64).max(1)
        };
    }

    /// QEMU's `ratelimit_calculate_delay(limit, n)`: accounts `n` bytes at `now` and
    /// returns how long the caller must wait (zero if within quota or unlimited).
    pub fn calculate_delay(&mut self, n: u64, now: Instant) -> Duration {
        if self.quota == 0 {
            return Duration::ZERO;
        }
        let expired = match self.slice_end {
            None => true,
            Some(end) => end < now,
        };
        if expired {
            self.slice_start = Some(now);
            self.slice_end = Some(now + SLICE);
            self.dispatched = 0;
        }
        self.dispatched = self.dispatched.saturating_add(n);
        if self.dispatched < self.quota {
            return Duration::ZERO;
        }
        let slices = self.dispatched as f64 / self.quota as f64;
        let start = self.slice_start.unwrap_or(now);
        let end = start + Duration::from_nanos((slices * SLICE.as_nanos() as f64) as u64);
        self.slice_end = Some(end);
        end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_is_a_tenth_of_speed_at_least_one() {
        let mut r = RateLimit::new();
        assert_eq!(r.slice_quota(), 0);
        r.set_speed(10 << 20);
        assert_eq!(r.slice_quota(), 1 << 20);
        r.set_speed(5);
        assert_eq!(r.slice_quota(), 1);
        r.set_speed(0);
        assert_eq!(r.slice_quota(), 0);
    }

    #[test]
    fn unlimited_never_delays() {
        let mut r = RateLimit::new();
        let now = Instant::now();
        assert_eq!(r.calculate_delay(u64::MAX, now), Duration::ZERO);
    }

    #[test]
    fn delay_follows_qemu_arithmetic() {
        let mut r = RateLimit::new();
        r.set_speed(10 << 20); // quota 1 MiB per 100 ms
        let t0 = Instant::now();
        // Below quota: no delay.
        assert_eq!(r.calculate_delay(512 << 10, t0), Duration::ZERO);
        // Reaching the quota: wait until the end of the slice.
        let d = r.calculate_delay(512 << 10, t0 + Duration::from_millis(10));
        assert_eq!(d, Duration::from_millis(90));
        // More within the same (extended) slice: 1.5 slices from the start.
        let d = r.calculate_delay(512 << 10, t0 + Duration::from_millis(20));
        assert_eq!(d, Duration::from_millis(130));
        // After the extended slice expired a new one starts.
        let d = r.calculate_delay(64 << 10, t0 + Duration::from_millis(200));
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn raising_speed_shortens_the_wait() {
        let mut r = RateLimit::new();
        r.set_speed(1 << 20);
        let t0 = Instant::now();
        let d = r.calculate_delay(1 << 20, t0);
        // quota = 104857 bytes (truncated), so a little over ten slices.
        assert!(
            d >= Duration::from_secs(1) && d < Duration::from_millis(1001),
            "{d:?}"
        );
        r.set_speed(100 << 20);
        let d = r.calculate_delay(0, t0 + Duration::from_millis(1));
        assert_eq!(d, Duration::ZERO);
    }
}
