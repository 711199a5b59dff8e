//! A token bucket: `rate` tokens a second, at most `burst` saved up. Callers pass the
//! time, so tests need no clock.

use std::sync::Mutex;
use std::time::Instant;

/// The bucket.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens left, as of when.
    state: Mutex<(f64, Option<Instant>)>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilling at `rate` a second.
    pub fn new(rate: f64, burst: u32) -> Self {
        TokenBucket {
            rate: rate.max(0.0),
            burst: f64::from(burst.max(1)),
            state: Mutex::new((f64::from(burst.max(1)), None)),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = *state;
        let refilled = match last {
            Some(t) => (tokens + now.saturating_duration_since(t).as_secs_f64() * self.rate)
                .min(self.burst),
            None => tokens,
        };
        let (left, taken) = if refilled >= 1.0 {
            (refilled - 1.0, true)
        } else {
            (refilled, false)
        };
        *state = (left, Some(now));
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let bucket = TokenBucket::new(10.0, 5);
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| bucket.try_take(t0)).count(), 5);
        // 10 a second: one more every 100 ms, never more than the burst.
        assert!(!bucket.try_take(t0 + Duration::from_millis(50)));
        assert!(bucket.try_take(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| bucket.try_take(later)).count(), 5);
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let bucket = TokenBucket::new(1.0, 1);
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0 - Duration::from_secs(5)));
    }
}
