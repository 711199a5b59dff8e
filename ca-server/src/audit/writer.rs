//! Group commit: requests queue their records; one task writes everything queued, then
//! commits it in one transaction and answers them all. Durability costs one commit
//! (one fsync) per batch, not per request, and concurrent requests never wait on each other's fsyncs one by one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::revocations::RevocationView;
use super::store::{Append, AuditError, AuditStore, Revoke};
use super::{AuditRecord, Decision};

const MAX_BATCH: usize = 1024;

/// Longest a batch may take to commit before its requests are refused. A database that
/// hangs (a full disk, a PostgreSQL that stopped answering) must not hold requests
/// past their deadlines, nor keep the server from stopping.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// While the store is failing and nothing is queued, how often to try a probe write,
/// so that readiness comes back when the cause goes away even with no traffic.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

type Reply = oneshot::Sender<Result<AuditRecord, AuditError>>;

/// Whether the last batch could be made durable; read by `/readyz`.
#[derive(Clone, Debug, Default)]
pub struct AuditHealth(Arc<RwLock<Option<String>>>);

impl AuditHealth {
    /// Why the last batch failed, or `None` when it was written.
    pub fn failure(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, failure: Option<String>) {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        match (&*current, &failure) {
            (Some(_), None) => tracing::info!("the audit store is writable again"),
            (None, Some(why)) => tracing::error!(error = %why, "the audit store cannot write"),
            _ => {}
        }
        *current = failure;
    }
}

/// Handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<(Append, Reply)>,
    store: Arc<AuditStore>,
    revocations: Arc<RevocationView>,
    commits: Arc<AtomicU64>,
    health: AuditHealth,
}

impl AuditWriter {
    /// Starts the writer task for `store`; the revocations it commits go into
    /// `revocations` at once. It stops when every handle is dropped, after answering
    /// what was queued.
    pub fn start(
        store: Arc<AuditStore>,
        revocations: Arc<RevocationView>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let writer = AuditWriter {
            tx,
            store,
            revocations,
            commits: Arc::new(AtomicU64::new(0)),
            health: AuditHealth::default(),
        };
        let task = tokio::spawn(run(writer.clone_state(), rx));
        (writer, task)
    }

    fn clone_state(&self) -> WriterState {
        WriterState {
            store: self.store.clone(),
            revocations: self.revocations.clone(),
            commits: self.commits.clone(),
            health: self.health.clone(),
            recovering: Arc::default(),
        }
    }

    /// Whether decisions are being recorded.
    pub fn health(&self) -> AuditHealth {
        self.health.clone()
    }

    /// The underlying store (for queries).
    pub fn store(&self) -> &Arc<AuditStore> {
        &self.store
    }

    /// The revoked serials as this replica sees them.
    pub fn revocations(&self) -> &Arc<RevocationView> {
        &self.revocations
    }

    /// How many transactions (durable commits) the writer has made.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Records `decision` and returns once it is durable.
    pub async fn record(&self, decision: Decision) -> Result<AuditRecord, AuditError> {
        self.submit(Append {
            decision,
            revoke: None,
        })
        .await
    }

    /// Records a revocation and returns once it is durable and in effect here.
    pub async fn revoke(
        &self,
        decision: Decision,
        revoke: Revoke,
    ) -> Result<AuditRecord, AuditError> {
        self.submit(Append {
            decision,
            revoke: Some(revoke),
        })
        .await
    }

    async fn submit(&self, append: Append) -> Result<AuditRecord, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((append, reply))
            .await
            .map_err(|_| AuditError::WriterGone)?;
        rx.await.map_err(|_| AuditError::WriterGone)?
    }
}

/// What the writer task owns.
struct WriterState {
    store: Arc<AuditStore>,
    revocations: Arc<RevocationView>,
    commits: Arc<AtomicU64>,
    health: AuditHealth,
    /// Whether a recovery task is probing the failing store.
    recovering: Arc<std::sync::atomic::AtomicBool>,
}

impl WriterState {
    /// Commits one batch and answers its requests.
    async fn commit(&self, appends: Vec<Append>, replies: Vec<Reply>) {
        metrics::histogram!("ca_audit_batch_size").record(appends.len() as f64);
        let started = Instant::now();
        let result = match tokio::time::timeout(COMMIT_TIMEOUT, self.store.append(&appends)).await {
            Ok(r) => r,
            Err(_) => Err(AuditError::Timeout(COMMIT_TIMEOUT)),
        };
        self.commits.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("ca_audit_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(appended) => {
                self.health.set(None);
                self.revocations.insert(appended.revoked);
                for (reply, result) in replies.into_iter().zip(appended.results) {
                    let _ = reply.send(result.map_err(AuditError::from));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                self.health
                    .set(Some(format!("{} ({e})", self.store.location().describe())));
                tracing::warn!(error = %e, records = replies.len(), "audit commit failed: refusing the requests of this batch");
                metrics::counter!("ca_audit_commit_failures_total").increment(1);
                for reply in replies {
                    let _ = reply.send(Err(AuditError::Unavailable(e.clone())));
                }
                self.start_recovery();
            }
        }
    }

    /// Probes the failing store in a task of its own, once a second, until a probe
    /// write succeeds: readiness comes back when the cause goes away, with or without
    /// traffic, and no queued request ever waits on a probe (a probe of a database that
    /// does not answer takes the whole commit timeout).
    fn start_recovery(&self) {
        if self.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, health, recovering) = (
            self.store.clone(),
            self.health.clone(),
            self.recovering.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let failure = match tokio::time::timeout(COMMIT_TIMEOUT, store.probe()).await {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{} ({e})", store.location().describe())),
                    Err(_) => Some(format!(
                        "{} (no answer within {COMMIT_TIMEOUT:?})",
                        store.location().describe()
                    )),
                };
                let healthy = failure.is_none();
                health.set(failure);
                if healthy {
                    recovering.store(false, Ordering::Release);
                    return;
                }
            }
        });
    }
}

async fn run(state: WriterState, mut rx: mpsc::Receiver<(Append, Reply)>) {
    let mut appends = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while let Some((append, reply)) = rx.recv().await {
        appends.push(append);
        replies.push(reply);
        // Let handlers that are already running enqueue before we commit: under load
        // this grows the batch (fewer commits); when idle it costs one scheduler pass.
        tokio::task::yield_now().await;
        while appends.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((a, r)) => {
                    appends.push(a);
                    replies.push(r);
                }
                Err(_) => break,
            }
        }
        // A store known to be failing is not written (the recovery task probes it):
        // queued requests are refused at once instead of each batch waiting out a
        // commit timeout past the callers' deadlines.
        if let Some(why) = state.health.failure() {
            appends.clear();
            for reply in replies.drain(..) {
                let _ = reply.send(Err(AuditError::Failing(why.clone())));
            }
            continue;
        }
        state
            .commit(std::mem::take(&mut appends), std::mem::take(&mut replies))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Api, Outcome};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let location = crate::audit::StoreLocation::Sqlite(dir.path().join("audit.db"));
        let store = Arc::new(AuditStore::open(&location, "test").await.unwrap());
        let view = Arc::new(RevocationView::new(Duration::from_secs(5)));
        let (writer, task) = AuditWriter::start(store.clone(), view);
        let mut handles = Vec::new();
        for i in 0..400u64 {
            let w = writer.clone();
            handles.push(tokio::spawn(async move {
                w.record(Decision {
                    api: Some(Api::Modern),
                    outcome: Some(Outcome::Denied),
                    reason: Some(format!("r{i}")),
                    ..Default::default()
                })
                .await
                .unwrap()
                .seq
            }));
        }
        let mut seqs = Vec::new();
        for h in handles {
            seqs.push(h.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=400).collect::<Vec<_>>(),
            "every record acknowledged once, no gaps"
        );
        assert!(
            writer.commits() < 400,
            "group commit: {} commits for 400 records",
            writer.commits()
        );
        drop(writer);
        task.await.unwrap();
        assert!(store.verify(None).await.unwrap().problems.is_empty());
    }
}
