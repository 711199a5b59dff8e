//! Kubernetes integration beyond authentication: the controllers that keep an
//! `istio.<sa>` Secret for every service account of every managed namespace
//! ([`secrets`]), the `istio-ca-root-cert` ConfigMap in each of them ([`rootcert`]) and
//! the serving-certificate Secrets the operator names ([`serving`]), with only the DNS
//! names the operator configured ([`names`]), writing only what is theirs
//! ([`ownership`]), and the election that lets one replica run them ([`leader`]).

pub mod leader;
pub mod names;
pub mod ownership;
pub mod rootcert;
pub mod secrets;
pub mod serving;

pub use leader::LeaderElection;
pub use names::ServingSecret;
pub use secrets::ControllerConfig;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ca_core::CertificateAuthority;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{Lookup, Store};
use tokio::sync::watch;

use crate::audit::{AuditError, AuditWriter};

/// Why a reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The API server refused or did not answer.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// The object is someone else's (reported as an Event); looked at again later.
    #[error("the object belongs to someone else")]
    NotOurs,
    /// A namespace or service-account name that is no SPIFFE path component.
    #[error("no SPIFFE identity: {0}")]
    Identity(#[from] ca_core::spiffe::SpiffeIdError),
    /// Key generation failed.
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
    /// Issuance failed.
    #[error("issuance: {0}")]
    Issue(#[from] ca_core::IssueError),
    /// The audit record could not be written, so nothing was.
    #[error("audit: {0}")]
    Audit(#[from] AuditError),
    /// The API server did not answer in time.
    #[error("Kubernetes API: no answer to {0} within {API_CALL_TIMEOUT:?}")]
    Timeout(&'static str),
    /// A watch ended before its first complete list.
    #[error("a watch ended before its first complete list")]
    NotReady,
}

/// Longest wait for one API call of a reconcile. Without it a request that never gets
/// an answer holds one of the controller's workers for good.
pub const API_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `call` within [`API_CALL_TIMEOUT`], the API's own answer kept for the caller to sort.
pub(crate) async fn timed<T>(
    what: &'static str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<Result<T, kube::Error>, ReconcileError> {
    tokio::time::timeout(API_CALL_TIMEOUT, call)
        .await
        .map_err(|_| {
            metrics::counter!("ca_kubernetes_api_timeouts_total", "call" => what).increment(1);
            ReconcileError::Timeout(what)
        })
}

/// `call` within [`API_CALL_TIMEOUT`].
pub(crate) async fn api<T>(
    what: &'static str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ReconcileError> {
    Ok(timed(what, call).await??)
}

/// Reports that `kind` (`Secret`, `ConfigMap`) on `regarding` belongs to someone else:
/// a Warning Event, the conflicts metric and a log line. The Recorder folds repeats of
/// the same event into one series, so a conflict seen on every retry stays one object.
pub(crate) async fn report_conflict(
    events: &Recorder,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    kind: &'static str,
    action: &str,
    note: String,
) {
    metrics::counter!("ca_controller_conflicts_total", "kind" => kind).increment(1);
    tracing::warn!(kind, %note, "not replaced: it belongs to someone else");
    let event = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: format!("{kind}NotOwned"),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = api("publish event", events.publish(&event, regarding)).await {
        tracing::debug!(error = %e, "event not recorded");
    }
}

/// Reports that Secret `ns/name` belongs to someone else (see [`report_conflict`]).
pub(crate) async fn report_secret_conflict(
    events: &Recorder,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    action: &str,
    (ns, name): (&str, &str),
    why: &str,
) {
    let note = format!(
        "Secret {ns}/{name} was not created by this CA ({why}); it is left as it is. Delete it to let the CA create its own."
    );
    report_conflict(events, regarding, "Secret", action, note).await;
}

/// A fresh key of `algorithm` for a Secret, and its public half. RSA generation takes
/// hundreds of milliseconds: it runs off the reconcile workers' threads.
pub(crate) async fn fresh_key(
    algorithm: ca_core::keys::KeyAlgorithm,
) -> Result<(rcgen::KeyPair, ca_core::keys::PublicKey), ReconcileError> {
    let key = tokio::task::spawn_blocking(move || algorithm.generate())
        .await
        .map_err(|e| ca_core::IssueError::Internal(format!("key generation: {e}")))??;
    let public = ca_core::keys::PublicKey::of_key_pair(&key)?;
    Ok((key, public))
}

/// Consecutive failures per object, for the retry backoff: 0.5 s doubling to a minute,
/// and for objects held by someone else 10 s doubling to five minutes.
#[derive(Default)]
pub(crate) struct Retries(Mutex<HashMap<String, u32>>);

impl Retries {
    fn failed(&self, key: &str, error: &ReconcileError) -> Duration {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        let (first, cap) = match error {
            ReconcileError::NotOurs => (Duration::from_secs(10), Duration::from_secs(300)),
            _ => (Duration::from_millis(500), Duration::from_secs(60)),
        };
        let reason = match error {
            ReconcileError::Api(_) | ReconcileError::Timeout(_) => "api",
            ReconcileError::NotOurs => "not_ours",
            ReconcileError::Audit(_) => "audit",
            _ => "issuance",
        };
        metrics::counter!("ca_controller_reconcile_errors_total", "reason" => reason).increment(1);
        first.saturating_mul(1u32 << (*n - 1).min(10)).min(cap)
    }

    fn succeeded(&self, key: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Whether a reflector store holds its first complete list, awaitable by any number of
/// reconciles at once.
///
/// `Store::wait_until_ready` cannot be: its one-shot channel keeps the waker of the
/// last poller only, so of several reconciles waiting together all but one sleep for
/// good (seen as 15 of 16 workers stuck, and 15 namespaces never given a ConfigMap).
/// Here one task waits on the store and publishes the result on a watch channel.
#[derive(Clone)]
pub(crate) struct Ready(watch::Receiver<bool>);

impl Ready {
    /// Starts watching `store`'s readiness.
    pub(crate) fn of<K>(store: &Store<K>) -> Ready
    where
        K: Lookup + Clone + Send + Sync + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let (tx, rx) = watch::channel(false);
        let store = store.clone();
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                let _ = tx.send(true);
            }
        });
        Ready(rx)
    }

    /// Waits until the store is ready; an error if its watch ended first.
    pub(crate) async fn wait(&self) -> Result<(), ReconcileError> {
        let mut rx = self.0.clone();
        match rx.wait_for(|ready| *ready).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ReconcileError::NotReady),
        }
    }
}

/// Whether a namespace is managed (Istio 1.3+ semantics).
pub fn is_managed(ns: &Namespace, ca_namespace: &str, default_enabled: bool) -> bool {
    let labels = ns.metadata.labels.as_ref();
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    match label("ca.istio.io/override") {
        Some("true") => true,
        Some("false") => false,
        _ => match label("ca.istio.io/env") {
            Some(env) => env == ca_namespace,
            None => default_enabled,
        },
    }
}

/// Runs the Secret controller while this replica holds the Lease; with `lease = None`
/// (a single replica) it runs unconditionally.
pub async fn run_controllers(
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    trust_domain: String,
    audit: AuditWriter,
    cfg: ControllerConfig,
    lease: Option<(String, Duration)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (leading_tx, mut leading) = watch::channel(lease.is_none());
    // Without an election the sender must outlive the loop: a closed channel would
    // read as "leadership lost".
    let mut _always_leading = None;
    let election = match lease {
        Some((identity, duration)) => {
            let e = LeaderElection::new(client.clone(), &cfg.ca_namespace, identity, duration);
            Some(tokio::spawn(e.run(leading_tx, shutdown.clone())))
        }
        None => {
            _always_leading = Some(leading_tx);
            None
        }
    };
    loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
            _ = shutdown.wait_for(|s| *s) => break,
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let events = Recorder::new(
            client.clone(),
            Reporter {
                controller: "istio-ca".into(),
                instance: Some(leader::host_name()),
            },
        );
        let mut task = tokio::task::JoinSet::new();
        task.spawn(secrets::run(
            client.clone(),
            ca.clone(),
            trust_domain.clone(),
            audit.clone(),
            cfg.clone(),
            events.clone(),
            stopped(stop_rx.clone()),
        ));
        task.spawn(rootcert::run(
            client.clone(),
            ca.clone(),
            cfg.clone(),
            events.clone(),
            stopped(stop_rx.clone()),
        ));
        task.spawn(serving::run(
            client.clone(),
            ca.clone(),
            audit.clone(),
            cfg.clone(),
            events,
            stop_rx,
        ));
        tokio::select! {
            _ = leading.wait_for(|l| !*l) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
        let _ = stop_tx.send(true);
        task.join_all().await;
        if *shutdown.borrow() {
            break;
        }
    }
    if let Some(e) = election {
        let _ = e.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    /// Every one of many concurrent waiters sees the store become ready.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_wakes_every_waiter() {
        let (store, mut writer) = reflector::store::<Namespace>();
        let ready = Ready::of(&store);
        let waiters: Vec<_> = (0..16)
            .map(|_| {
                let ready = ready.clone();
                tokio::spawn(async move { ready.wait().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("a waiter was not woken")
                .unwrap()
                .unwrap();
        }
    }

    /// A watch that ends before its first list is an error, not a wait forever.
    #[tokio::test]
    async fn a_dropped_watch_is_not_ready() {
        let (store, writer) = reflector::store::<Namespace>();
        let ready = Ready::of(&store);
        drop(writer);
        assert!(matches!(ready.wait().await, Err(ReconcileError::NotReady)));
    }
}
