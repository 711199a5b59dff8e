//! Group commit: requests queue their records; one task writes everything queued, then
//! flushes once and answers them all. Durability costs one fsync per batch, not per
//! request, and concurrent requests never wait on each other's fsyncs one by one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::store::{Append, AuditError, AuditStore};
use super::{AuditRecord, Decision};

const MAX_BATCH: usize = 1024;

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
    flushes: Arc<AtomicU64>,
    health: AuditHealth,
}

impl AuditWriter {
    /// Starts the writer task for `store`. It stops when every handle is dropped,
    /// after answering what was queued.
    pub fn start(store: Arc<AuditStore>) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let flushes = Arc::new(AtomicU64::new(0));
        let health = AuditHealth::default();
        let task = tokio::spawn(run(store.clone(), rx, flushes.clone(), health.clone()));
        (
            AuditWriter {
                tx,
                store,
                flushes,
                health,
            },
            task,
        )
    }

    /// Whether decisions are being recorded.
    pub fn health(&self) -> AuditHealth {
        self.health.clone()
    }

    /// The underlying store (for queries).
    pub fn store(&self) -> &Arc<AuditStore> {
        &self.store
    }

    /// How many flushes (fsyncs) the writer has made.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Records `decision` and returns once it is durable.
    pub async fn record(&self, decision: Decision) -> Result<AuditRecord, AuditError> {
        self.submit(Append {
            decision,
            revoke: None,
        })
        .await
    }

    /// Records a revocation and returns once it is durable and in effect.
    pub async fn revoke(
        &self,
        decision: Decision,
        serial: String,
        reason: String,
    ) -> Result<AuditRecord, AuditError> {
        self.submit(Append {
            decision,
            revoke: Some((serial, reason)),
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

async fn run(
    store: Arc<AuditStore>,
    mut rx: mpsc::Receiver<(Append, Reply)>,
    flushes: Arc<AtomicU64>,
    health: AuditHealth,
) {
    let mut appends = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while let Some((append, reply)) = rx.recv().await {
        appends.push(append);
        replies.push(reply);
        // Let handlers that are already running enqueue before we commit: under load
        // this grows the batch (fewer fsyncs); when idle it costs one scheduler pass.
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
        metrics::histogram!("ca_audit_batch_size").record(appends.len() as f64);
        let results = store.write_batch(std::mem::take(&mut appends));
        let started = Instant::now();
        let flushed = store.flush().await;
        flushes.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("ca_audit_flush_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let write_error = results.iter().find_map(|r| match r {
            Err(AuditError::Io(e)) => Some(e.clone()),
            _ => None,
        });
        health.set(match (&flushed, write_error) {
            (Err(e), _) => Some(e.to_string()),
            (Ok(_), Some(e)) => Some(format!("audit store I/O error: {e}")),
            (Ok(_), None) => None,
        });
        match flushed {
            Ok(_) => {
                store.publish_revocations(results.iter().filter_map(|r| r.as_ref().ok()));
                for (reply, result) in replies.drain(..).zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, records = replies.len(), "audit flush failed: refusing the requests of this batch");
                metrics::counter!("ca_audit_flush_failures_total").increment(1);
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(AuditError::Io(e.to_string())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Api, Outcome};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(AuditStore::open(dir.path()).unwrap());
        let (writer, task) = AuditWriter::start(store.clone());
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
            writer.flushes() < 400,
            "group commit: {} flushes for 400 records",
            writer.flushes()
        );
        drop(writer);
        task.await.unwrap();
        assert!(store.verify().unwrap().problems.is_empty());
    }
}
