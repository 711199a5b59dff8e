//! Limits at the front door, before any work is done for a caller: how many
//! connections in all and per peer address, how many calls in flight in all and per
//! connection, how long a handshake may take, how long a connection may sit idle, and
//! how a dead peer is noticed (HTTP/2 pings). Each refusal is counted in metrics; none
//! is audited (a refusal for load is not a decision about an identity, and recording
//! it would hand a flood the disk).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The limits, each a `serve` flag.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections at most from one peer address.
    pub max_connections_per_peer: usize,
    /// Calls in flight at most, over all connections; more are shed (UNAVAILABLE).
    pub max_concurrent_calls: usize,
    /// Concurrent streams one connection may open (HTTP/2 SETTINGS).
    pub max_streams_per_connection: u32,
    /// Largest request header block (HTTP/2 SETTINGS).
    pub max_header_bytes: u32,
    /// Time for the TLS and the HTTP/2 handshakes together.
    pub handshake_timeout: Duration,
    /// A connection with no call for this long is closed.
    pub idle_timeout: Duration,
    /// How often a connection is pinged; a peer that does not answer within
    /// `keepalive_timeout` is cut off.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    /// Sized for a mesh of 10,000 workloads renewing every 12 hours or so (a few calls
    /// a second on average, bursts of thousands after an outage; idle connections are
    /// closed after five minutes, so few stay open) within the pod's 256 MiB: a
    /// connection costs tens of KiB, a call in flight up to its 64 KiB body.
    fn default() -> Self {
        Limits {
            max_connections: 4_096,
            max_connections_per_peer: 1_000,
            max_concurrent_calls: 512,
            max_streams_per_connection: 100,
            max_header_bytes: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Counts what is open against the limits.
pub struct Gate {
    /// The limits.
    pub limits: Limits,
    connections: Arc<Semaphore>,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    calls: Arc<Semaphore>,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` are open.
    Total,
    /// `max_connections_per_peer` are open from this address.
    PerPeer,
}

impl Refused {
    fn label(&self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::PerPeer => "max_connections_per_peer",
        }
    }
}

/// An admitted connection; its slots are freed when dropped.
pub struct ConnectionSlot {
    gate: Arc<Gate>,
    peer: IpAddr,
    _total: OwnedSemaphorePermit,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_peer = self.gate.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&self.peer);
            }
        }
        metrics::gauge!("ca_connections_open").decrement(1.0);
    }
}

impl Gate {
    /// A gate for `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Gate {
            connections: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            calls: Arc::new(Semaphore::new(limits.max_concurrent_calls.max(1))),
            per_peer: Mutex::new(HashMap::new()),
            limits,
        })
    }

    /// Admits a connection from `peer`, or says which limit it is over (and counts it).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnectionSlot, Refused> {
        let refused = |why: Refused| {
            metrics::counter!("ca_connections_refused_total", "limit" => why.label()).increment(1);
            why
        };
        let total = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| refused(Refused::Total))?;
        let mut per_peer = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_peer.entry(peer).or_insert(0);
        if *n >= self.limits.max_connections_per_peer {
            return Err(refused(Refused::PerPeer));
        }
        *n += 1;
        metrics::gauge!("ca_connections_open").increment(1.0);
        Ok(ConnectionSlot {
            gate: self.clone(),
            peer,
            _total: total,
        })
    }

    /// A slot for one call, or `None` when `max_concurrent_calls` are in flight (the
    /// call is shed, and counted).
    pub fn call_slot(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.calls.clone().try_acquire_owned().ok();
        if slot.is_none() {
            metrics::counter!("ca_calls_shed_total").increment(1);
        }
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(total: usize, per_peer: usize, calls: usize) -> Arc<Gate> {
        Gate::new(Limits {
            max_connections: total,
            max_connections_per_peer: per_peer,
            max_concurrent_calls: calls,
            ..Limits::default()
        })
    }

    #[test]
    fn connections_are_capped_in_all_and_per_peer_and_freed_on_drop() {
        let g = gate(3, 2, 1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = g.admit(a).unwrap();
        let _a2 = g.admit(a).unwrap();
        assert_eq!(g.admit(a).err(), Some(Refused::PerPeer));
        let _b1 = g.admit(b).unwrap();
        assert_eq!(g.admit(b).err(), Some(Refused::Total));
        drop(a1);
        let _a3 = g.admit(a).unwrap();
        assert_eq!(g.per_peer.lock().unwrap()[&a], 2);
    }

    #[test]
    fn calls_beyond_the_limit_are_shed_until_one_finishes() {
        let g = gate(1, 1, 2);
        let one = g.call_slot().unwrap();
        let _two = g.call_slot().unwrap();
        assert!(g.call_slot().is_none());
        drop(one);
        assert!(g.call_slot().is_some());
    }
}
