//! Denials of callers that did not authenticate, aggregated so that an attack's audit
//! record is complete but bounded: per peer address, API, authenticator and reason,
//! the first denial of a window is recorded as it happens, and the identical denials
//! that follow within the window are counted and recorded as one summary when the
//! window closes (or when the server stops). Authenticated callers' decisions never
//! come here.
//!
//! Memory is bounded too: at most [`MAX_KEYS`] windows are open; past that, denials
//! from further peers share one window per API, authenticator and reason.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::audit::{Api, Decision, Outcome};

/// Open windows at most (each a few hundred bytes).
pub const MAX_KEYS: usize = 10_000;

/// What makes two denials identical.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    /// `None`: the shared window of peers beyond [`MAX_KEYS`].
    peer: Option<IpAddr>,
    api: Option<Api>,
    authenticator: Option<String>,
    reason: &'static str,
}

struct Window {
    opened: Instant,
    /// When the first denial was recorded, RFC 3339.
    first_at: String,
    /// Denials counted, not recorded, since.
    suppressed: u64,
}

/// Whether a denial is recorded now or counted into its window.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// The first of its window: record it.
    Record,
    /// Counted; its window's summary will record it.
    Counted,
}

/// The open windows.
pub struct DenialAggregator {
    window: Duration,
    open: Mutex<HashMap<Key, Window>>,
}

impl DenialAggregator {
    /// Windows of `window`; zero records every denial.
    pub fn new(window: Duration) -> Self {
        DenialAggregator {
            window,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// How long a window lasts.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Whether `denial` (an unauthenticated caller's, with its reason set) is recorded
    /// now, or counted into an open window.
    pub fn admit(&self, denial: &Decision, reason: &'static str, now: Instant) -> Admit {
        if self.window.is_zero() {
            return Admit::Record;
        }
        let mut key = Key {
            peer: denial
                .peer
                .as_deref()
                .and_then(|p| p.parse::<std::net::SocketAddr>().ok())
                .map(|a| a.ip()),
            api: denial.api,
            authenticator: denial.authenticator.clone(),
            reason,
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= MAX_KEYS && !open.contains_key(&key) {
            key.peer = None;
        }
        match open.get_mut(&key) {
            // A window past its end that the flusher has not closed yet keeps counting
            // for its summary: nothing falls between two windows.
            Some(w) => {
                w.suppressed += 1;
                metrics::counter!("ca_denials_aggregated_total").increment(1);
                Admit::Counted
            }
            None => {
                open.insert(
                    key,
                    Window {
                        opened: now,
                        first_at: crate::issuance::rfc3339(time::OffsetDateTime::now_utc()),
                        suppressed: 0,
                    },
                );
                Admit::Record
            }
        }
    }

    /// Closes the windows that ended by `now` (all of them with `everything`): the
    /// summary records of those that counted denials.
    pub fn take_closed(&self, now: Instant, everything: bool) -> Vec<Decision> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        // Every ended window leaves; those that counted denials leave a summary.
        open.extract_if(|_, w| everything || now.duration_since(w.opened) >= self.window)
            .filter(|(_, w)| w.suppressed > 0)
            .map(|(key, w)| self.summary(key, &w))
            .collect()
    }

    fn summary(&self, key: Key, w: &Window) -> Decision {
        let from = key
            .peer
            .map_or_else(|| "further peers".to_owned(), |ip| ip.to_string());
        Decision {
            api: key.api,
            outcome: Some(Outcome::Denied),
            reason: Some(key.reason.to_owned()),
            detail: Some(format!(
                "{} more identical denials from {from} in the {:?} after {}",
                w.suppressed, self.window, w.first_at
            )),
            authenticator: key.authenticator,
            peer: key.peer.map(|ip| ip.to_string()),
            ..Default::default()
        }
    }

    /// How many windows are open.
    pub fn open_windows(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The count a summary record carries (its detail starts with it).
pub fn summarised_count(detail: &str) -> Option<u64> {
    detail
        .split_once(" more identical denials from ")?
        .0
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(peer: &str) -> Decision {
        Decision {
            api: Some(Api::Modern),
            peer: Some(peer.into()),
            authenticator: Some("client-cert".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_first_is_recorded_the_rest_counted_into_one_summary() {
        let agg = DenialAggregator::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(
            agg.admit(&denial("10.0.0.1:5000"), "cert_revoked", t0),
            Admit::Record
        );
        for port in 5001..5100 {
            let d = denial(&format!("10.0.0.1:{port}"));
            assert_eq!(agg.admit(&d, "cert_revoked", t0), Admit::Counted);
        }
        // Another peer, another reason: windows of their own.
        assert_eq!(
            agg.admit(&denial("10.0.0.2:1"), "cert_revoked", t0),
            Admit::Record
        );
        assert_eq!(
            agg.admit(&denial("10.0.0.1:1"), "cert_expired", t0),
            Admit::Record
        );
        assert!(
            agg.take_closed(t0 + Duration::from_secs(9), false)
                .is_empty()
        );
        let closed = agg.take_closed(t0 + Duration::from_secs(10), false);
        assert_eq!(
            closed.len(),
            1,
            "only the window that counted has a summary"
        );
        let detail = closed[0].detail.as_deref().unwrap();
        assert_eq!(summarised_count(detail), Some(99), "{detail}");
        assert_eq!(closed[0].peer.as_deref(), Some("10.0.0.1"));
        assert_eq!(closed[0].reason.as_deref(), Some("cert_revoked"));
        assert_eq!(agg.open_windows(), 0);
        // A new window starts with a recorded denial again.
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(
            agg.admit(&denial("10.0.0.1:9"), "cert_revoked", t1),
            Admit::Record
        );
    }

    #[test]
    fn windows_are_bounded_and_nothing_is_lost_at_the_bound() {
        let agg = DenialAggregator::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut recorded = 0u64;
        let total = MAX_KEYS as u64 * 3;
        for i in 0..total {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
            if agg.admit(&denial(&format!("{ip}:1")), "malformed_request", t0) == Admit::Record {
                recorded += 1;
            }
        }
        assert!(agg.open_windows() <= MAX_KEYS + 1);
        let summarised: u64 = agg
            .take_closed(t0, true)
            .iter()
            .map(|d| summarised_count(d.detail.as_deref().unwrap()).unwrap())
            .sum();
        assert_eq!(recorded + summarised, total, "every denial accounted for");
        assert_eq!(recorded, MAX_KEYS as u64 + 1);
    }

    #[test]
    fn a_zero_window_records_everything() {
        let agg = DenialAggregator::new(Duration::ZERO);
        for _ in 0..3 {
            assert_eq!(
                agg.admit(&denial("10.0.0.1:1"), "x", Instant::now()),
                Admit::Record
            );
        }
        assert!(agg.take_closed(Instant::now(), true).is_empty());
    }
}
