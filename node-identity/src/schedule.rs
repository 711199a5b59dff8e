//! When to renew, and how long to wait after a failure.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

/// A uniformly random factor in `[1 - spread, 1 + spread]`.
fn jitter(spread: f64) -> f64 {
    let mut b = [0u8; 4];
    let r = SystemRandom::new()
        .fill(&mut b)
        .map(|_| f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX));
    1.0 + spread * (2.0 * r.unwrap_or(0.5) - 1.0)
}

/// The renewal plan for a certificate valid from `not_before` to `not_after`:
/// renew at `renew_at` of its lifetime, ±10%.
#[derive(Clone, Copy, Debug)]
pub struct RenewalSchedule {
    /// Fraction of the lifetime after which to renew (0 < renew_at < 1).
    pub renew_at: f64,
}

impl RenewalSchedule {
    /// Delay from `now` until the renewal should start (zero if already due).
    pub fn delay(
        &self,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Duration {
        self.delay_with_jitter(not_before, not_after, now, jitter(0.1))
    }

    /// Same as [`RenewalSchedule::delay`] with an explicit jitter factor.
    pub fn delay_with_jitter(
        &self,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        now: OffsetDateTime,
        factor: f64,
    ) -> Duration {
        let lifetime = (not_after - not_before).as_seconds_f64().max(0.0);
        let due = not_before + time::Duration::seconds_f64(lifetime * self.renew_at * factor);
        // Never plan past expiry: keep a little margin for the round trip.
        let latest = not_after - time::Duration::seconds_f64((lifetime * 0.05).min(60.0));
        let at = due.min(latest);
        Duration::try_from(at - now).unwrap_or(Duration::ZERO)
    }
}

/// Exponential backoff with jitter between `min` and `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// 1 s doubling up to `max` (5 min by default on the command line).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The next wait (±20% jitter, never above `max`), and grows the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next.mul_f64(jitter(0.2)).min(self.max);
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn renews_at_half_life_within_jitter() {
        let s = RenewalSchedule { renew_at: 0.5 };
        let nb = datetime!(2030-01-01 00:00 UTC);
        let na = nb + time::Duration::hours(1);
        assert_eq!(
            s.delay_with_jitter(nb, na, nb, 1.0),
            Duration::from_secs(1800)
        );
        assert_eq!(
            s.delay_with_jitter(nb, na, nb, 0.9),
            Duration::from_secs(1620)
        );
        assert_eq!(
            s.delay_with_jitter(nb, na, nb, 1.1),
            Duration::from_secs(1980)
        );
        // Past due: renew now.
        assert_eq!(
            s.delay_with_jitter(nb, na, nb + time::Duration::minutes(45), 1.0),
            Duration::ZERO
        );
        // A schedule past expiry is pulled before it.
        let late = RenewalSchedule { renew_at: 0.99 };
        assert!(late.delay_with_jitter(nb, na, nb, 1.1) < Duration::from_secs(3600));
        for _ in 0..100 {
            let d = s.delay(nb, na, nb).as_secs();
            assert!((1620..=1980).contains(&d), "{d}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_bound() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let waits: Vec<_> = (0..12).map(|_| b.next_delay()).collect();
        assert!(waits[0] <= Duration::from_millis(1200));
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(300)));
        assert!(waits[11] >= Duration::from_secs(240));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
