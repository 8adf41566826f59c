//! Pacing the generator: a token bucket that says how long to wait before
//! the next send. It reserves tokens ahead (the level may go negative), so a
//! sleep that overshoots by a timer tick is made up by the following sends
//! instead of lowering the rate.

use std::time::{Duration, Instant};

/// A bucket refilled at `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

/// How much sending may run ahead of the rate: 20 ms worth, well above
/// tokio's 1 ms timer resolution, so oversleeping never lowers the rate.
const BURST_SECONDS: f64 = 0.02;

impl TokenBucket {
    /// `None` for a rate of zero (or below, or not a number): unpaced.
    pub fn new(rate_per_second: f64, now: Instant) -> Option<Self> {
        if rate_per_second.is_nan() || rate_per_second <= 0.0 {
            return None;
        }
        let burst = (rate_per_second * BURST_SECONDS).max(1.0);
        Some(TokenBucket {
            rate: rate_per_second,
            burst,
            tokens: burst,
            last: now,
        })
    }

    /// Takes one token and returns how long to wait before using it (zero
    /// when one was available).
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `n` times, sleeping exactly as told (plus `oversleep`), and
    /// returns the simulated time taken.
    fn simulate(rate: f64, n: usize, oversleep: Duration) -> Duration {
        let start = Instant::now();
        let mut now = start;
        let mut bucket = TokenBucket::new(rate, now).unwrap();
        for _ in 0..n {
            let wait = bucket.take(now);
            if !wait.is_zero() {
                now += wait + oversleep;
            }
        }
        now - start
    }

    #[test]
    fn holds_the_rate() {
        // 1000 sends at 500/s: the first 10 are the burst, the rest take 1.98 s.
        let took = simulate(500.0, 1000, Duration::ZERO).as_secs_f64();
        assert!((1.97..2.0).contains(&took), "{took}");
    }

    #[test]
    fn oversleeping_does_not_lower_the_rate() {
        let took = simulate(5000.0, 10_000, Duration::from_millis(1)).as_secs_f64();
        assert!((1.9..2.1).contains(&took), "{took}");
    }

    #[test]
    fn a_slow_rate_waits_between_every_send() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2.0, start).unwrap();
        assert_eq!(bucket.take(start), Duration::ZERO, "a full bucket of one");
        assert_eq!(bucket.take(start), Duration::from_millis(500));
        assert_eq!(
            bucket.take(start + Duration::from_millis(500)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn zero_means_unpaced() {
        assert!(TokenBucket::new(0.0, Instant::now()).is_none());
        assert!(TokenBucket::new(f64::NAN, Instant::now()).is_none());
    }
}
