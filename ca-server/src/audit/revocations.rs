//! This replica's view of the revoked serials, kept fresh from the store.
//!
//! Client-certificate authentication reads the view on every request, so it lives in
//! memory. Revocations reach it three ways: this replica's own commits (at once),
//! PostgreSQL's NOTIFY from other replicas (milliseconds), and a resync from the
//! table every [`SYNC_INTERVAL`] (the bound when notifications are lost, and the only
//! way on SQLite, where admin commands may write beside the server). A view that has
//! not synced for longer than its staleness bound says so, and renewals are refused
//! rather than trusted to it.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::store::{AuditStore, StoreLocation, now_us};

/// PostgreSQL notification channel; the payload is revoked serials, one per line.
pub const NOTIFY_CHANNEL: &str = "istio_ca_revocations";

/// How often the view is resynced from the table.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(250);

/// Every this many syncs the whole table is read again, which also forgets
/// certificates that have expired; the others read recent revocations only.
const FULL_SYNC_EVERY: u32 = 240;

/// How far back an incremental sync looks: a revocation committed this long after it
/// was stamped is still seen (PostgreSQL stamps before commit).
const OVERLAP_US: i64 = 30_000_000;

/// The view could not be confirmed fresh.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the revocation list has not been confirmed for {0:?}")]
pub struct Stale(pub Duration);

/// The revoked serials, shared by the authenticators.
#[derive(Debug)]
pub struct RevocationView {
    serials: RwLock<HashSet<String>>,
    synced: RwLock<Option<Instant>>,
    max_staleness: Duration,
}

impl RevocationView {
    /// An empty view, not yet synced, that counts as stale after `max_staleness`
    /// without a sync.
    pub fn new(max_staleness: Duration) -> Self {
        RevocationView {
            serials: RwLock::default(),
            synced: RwLock::new(None),
            max_staleness,
        }
    }

    /// Whether the view can be trusted now: an error when it was not confirmed within
    /// the allowed staleness.
    pub fn check_fresh(&self) -> Result<(), Stale> {
        let synced = *self.synced.read().unwrap_or_else(|p| p.into_inner());
        match synced.map(|t| t.elapsed()) {
            Some(age) if age <= self.max_staleness => Ok(()),
            age => Err(Stale(age.unwrap_or(Duration::MAX))),
        }
    }

    /// Whether `serial` is revoked; an error when the view cannot be trusted.
    pub fn is_revoked(&self, serial: &str) -> Result<bool, Stale> {
        self.check_fresh()?;
        Ok(self
            .serials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial))
    }

    /// Adds revoked serials (this replica's commits, notifications, syncs).
    pub fn insert(&self, serials: impl IntoIterator<Item = String>) {
        self.serials
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(serials);
    }

    fn replace(&self, serials: HashSet<String>) {
        *self.serials.write().unwrap_or_else(|p| p.into_inner()) = serials;
    }

    fn mark_synced(&self, at: Instant) {
        *self.synced.write().unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    /// How many serials the view holds.
    pub fn len(&self) -> usize {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the view holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Loads the whole table once (at start, before serving).
    pub async fn load(&self, store: &AuditStore) -> Result<(), super::AuditError> {
        let started = Instant::now();
        let all = store.revoked_since(0).await?;
        self.replace(all.into_iter().map(|(s, _)| s).collect());
        self.mark_synced(started);
        Ok(())
    }
}

/// Keeps `view` fresh until `shutdown`: periodic resync, and on PostgreSQL a listener
/// for other replicas' revocations. Also revokes certificates renewed from a revoked
/// one that another replica issued while the revocation committed.
pub async fn keep_fresh(
    store: Arc<AuditStore>,
    view: Arc<RevocationView>,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = match store.location() {
        StoreLocation::Postgres(url) => Some(tokio::spawn(listen(
            url.clone(),
            view.clone(),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let mut ticks = 0u32;
    let mut last_start_us = 0i64;
    loop {
        let started = Instant::now();
        let start_us = now_us();
        let full = ticks.is_multiple_of(FULL_SYNC_EVERY);
        let since = if full { 0 } else { last_start_us - OVERLAP_US };
        match sync_once(&store, &view, since, full).await {
            Ok(()) => {
                view.mark_synced(started);
                last_start_us = start_us;
                ticks = ticks.wrapping_add(1);
            }
            Err(e) => {
                metrics::counter!("ca_revocation_sync_failures_total").increment(1);
                tracing::warn!(error = %e, "could not refresh the revocation list");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    if let Some(l) = listener {
        l.abort();
    }
}

/// One resync. It only reads, unless a revocation is recent: then it also revokes
/// what was renewed from it meanwhile. That write contends for SQLite's one write lock
/// with the group commit, and must not hold up (or make stale) a view that a read
/// could confirm.
async fn sync_once(
    store: &AuditStore,
    view: &RevocationView,
    since_us: i64,
    full: bool,
) -> Result<(), super::AuditError> {
    let revoked = store.revoked_since(since_us).await?;
    let recent = now_us() - OVERLAP_US;
    let any_recent = revoked.iter().any(|(_, t)| *t >= recent);
    let serials = revoked.into_iter().map(|(s, _)| s);
    if full {
        view.replace(serials.collect());
    } else {
        view.insert(serials);
    }
    metrics::gauge!("ca_revoked_serials").set(view.len() as f64);
    if any_recent {
        match store.revoke_followers(recent).await {
            Ok(0) => {}
            Ok(followed) => {
                tracing::warn!(
                    followed,
                    "revoked certificates renewed from a revoked one while its revocation committed"
                );
                let again = store.revoked_since(recent).await?;
                view.insert(again.into_iter().map(|(s, _)| s));
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not revoke certificates renewed from a revoked one; retrying")
            }
        }
    }
    Ok(())
}

/// Applies other replicas' revocations as PostgreSQL announces them. sqlx's listener
/// reconnects by itself; what it misses meanwhile, the periodic sync reads.
async fn listen(url: String, view: Arc<RevocationView>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "revocation listener cannot connect; relying on resync");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        };
        if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::warn!(error = %e, "revocation listener cannot LISTEN; relying on resync");
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        loop {
            tokio::select! {
                n = listener.recv() => match n {
                    Ok(n) => view.insert(n.payload().lines().map(str::to_owned)),
                    Err(e) => {
                        tracing::warn!(error = %e, "revocation listener lost its connection");
                        break;
                    }
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}
