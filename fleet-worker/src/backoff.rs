//! The restart backoff schedule: 100 ms doubling to 30 s, reset after 60 s of healthy service.

use std::time::Duration;

/// The first retry comes this soon: a crash is usually a one-off.
pub const INITIAL: Duration = Duration::from_millis(100);
/// A command that keeps failing is retried at least this often, so a fix is picked up soon.
pub const MAX: Duration = Duration::from_secs(30);
/// An instance that served this long before failing starts the schedule over.
pub const RESET_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt, after a failure of an instance that had been
    /// healthy for `healthy_for`.
    pub fn on_failure(&mut self, healthy_for: Duration) -> Duration {
        if healthy_for >= RESET_AFTER {
            self.failures = 0;
        }
        let delay = INITIAL
            .checked_mul(1u32.checked_shl(self.failures).unwrap_or(u32::MAX))
            .unwrap_or(MAX)
            .min(MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    #[cfg(test)]
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_100ms_and_caps_at_30s() {
        let mut b = Backoff::default();
        let got: Vec<u64> = (0..12)
            .map(|_| b.on_failure(Duration::ZERO).as_millis() as u64)
            .collect();
        assert_eq!(
            got,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        for _ in 0..100 {
            assert_eq!(b.on_failure(Duration::from_secs(59)), MAX);
        }
    }

    #[test]
    fn resets_after_a_minute_of_health() {
        let mut b = Backoff::default();
        for _ in 0..5 {
            b.on_failure(Duration::ZERO);
        }
        assert_eq!(b.on_failure(RESET_AFTER), INITIAL);
        assert_eq!(b.on_failure(Duration::from_secs(1)), INITIAL * 2);
        assert_eq!(b.failures(), 2);
    }
}
