//! The identity-Secret controller (docs/COMPATIBILITY.md, "Kubernetes objects").
//!
//! Three watchers (kube-runtime, not polling) keep stores of namespaces, service
//! accounts and Secrets; every event marks the (namespace, service account) pairs it
//! concerns as dirty, and workers reconcile dirty pairs against the stores:
//!
//! - service account present in a managed namespace → Secret `istio.<sa>` exists, parses,
//!   carries the current `root-cert.pem`, and has more than its grace period left;
//!   otherwise it is created or rotated (the issuance is audited before the write);
//! - service account gone → its Secret (ours: type and annotation match) is deleted;
//! - namespace not managed → nothing is touched.
//!
//! Writes happen only when something must change, through create (409: someone else
//! did it, the watch will tell) or replace with the stored `resourceVersion` (409:
//! stale, retried after the watch catches up), with bounded concurrency; a failed
//! reconcile (409, 5xx, timeout) is retried with exponential backoff (0.5 s to 60 s). A periodic
//! sweep marks pairs whose rotation is due. After any (re)list every pair is checked
//! again, so events missed while a watch was down are not lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ca_core::keys::KeyAlgorithm;
use ca_core::{CertificateAuthority, SpiffeId};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use rcgen::PublicKeyData;
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore, watch as shutdown_watch};
use tokio_stream::StreamExt;

use crate::audit::{Api as AuditApi, AuditWriter, Decision};
use crate::issuance::issued_decision;

/// Secret type of identity Secrets.
pub const SECRET_TYPE: &str = "istio.io/key-and-cert";
/// Annotation naming the service account.
pub const SA_ANNOTATION: &str = "istio.io/service-account.name";
/// Root ConfigMap name and key.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";

/// How the controller behaves.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The CA's namespace (for the `ca.istio.io/env` label).
    pub ca_namespace: String,
    /// Whether a namespace without either label is managed.
    pub default_enabled: bool,
    /// Lifetime of workload certificates in Secrets.
    pub workload_ttl: Duration,
    /// Rotate when less than this fraction of the lifetime is left.
    pub grace_ratio: f64,
    /// ...but never with less than this left.
    pub min_grace: Duration,
    /// Parallel reconciles (each may write once).
    pub concurrency: usize,
    /// How often to look for due rotations.
    pub sweep_interval: Duration,
}

type Key = (String, String);

#[derive(Default)]
struct Queue {
    dirty: HashSet<Key>,
    dirty_namespaces: HashSet<String>,
    /// When each pair's Secret must next be rotated.
    due: HashMap<Key, OffsetDateTime>,
    /// Consecutive failed reconciles per pair (for the retry backoff).
    failures: HashMap<Key, u32>,
}

/// The controller.
pub struct SecretController {
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    trust_domain: String,
    audit: AuditWriter,
    cfg: ControllerConfig,
    queue: Mutex<Queue>,
    wake: Notify,
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

fn data(s: &Secret, k: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(k)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

impl SecretController {
    /// A controller issuing from `ca`.
    pub fn new(
        client: kube::Client,
        ca: Arc<CertificateAuthority>,
        trust_domain: &str,
        audit: AuditWriter,
        cfg: ControllerConfig,
    ) -> Self {
        SecretController {
            client,
            ca,
            trust_domain: trust_domain.to_owned(),
            audit,
            cfg,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
        }
    }

    fn mark(&self, key: Key) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirty
            .insert(key);
        self.wake.notify_one();
    }

    fn mark_namespace(&self, ns: String) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dirty_namespaces
            .insert(ns);
        self.wake.notify_one();
    }

    /// Runs until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: shutdown_watch::Receiver<bool>) {
        let (ns_store, ns_writer) = reflector::store::<Namespace>();
        let (sa_store, sa_writer) = reflector::store::<ServiceAccount>();
        let (secret_store, secret_writer) = reflector::store::<Secret>();
        let cfg = watcher::Config::default();
        let namespaces = reflector::reflector(
            ns_writer,
            watcher(Api::<Namespace>::all(self.client.clone()), cfg.clone()),
        )
        .default_backoff();
        let sas = reflector::reflector(
            sa_writer,
            watcher(Api::<ServiceAccount>::all(self.client.clone()), cfg.clone()),
        )
        .default_backoff();
        let secrets = reflector::reflector(
            secret_writer,
            watcher(Api::<Secret>::all(self.client.clone()), cfg),
        )
        .default_backoff();

        let me = self.clone();
        let (sa_s, sec_s) = (sa_store.clone(), secret_store.clone());
        let ns_task = tokio::spawn(async move {
            let mut s = std::pin::pin!(namespaces);
            while let Some(ev) = s.next().await {
                match ev {
                    Ok(
                        watcher::Event::Apply(ns)
                        | watcher::Event::Delete(ns)
                        | watcher::Event::InitApply(ns),
                    ) => {
                        let name = ns.metadata.name.clone().unwrap_or_default();
                        for sa in sa_s
                            .state()
                            .iter()
                            .filter(|sa| sa.metadata.namespace.as_deref() == Some(name.as_str()))
                        {
                            me.mark((name.clone(), sa.metadata.name.clone().unwrap_or_default()));
                        }
                        me.mark_namespace(name);
                    }
                    Ok(watcher::Event::InitDone) => me.resync(&sa_s, &sec_s),
                    Ok(watcher::Event::Init) => {}
                    Err(e) => tracing::warn!(error = %e, "namespace watch failed; retrying"),
                }
            }
        });
        let me = self.clone();
        let (sa_s, sec_s) = (sa_store.clone(), secret_store.clone());
        let sa_task = tokio::spawn(async move {
            let mut s = std::pin::pin!(sas);
            while let Some(ev) = s.next().await {
                match ev {
                    Ok(
                        watcher::Event::Apply(sa)
                        | watcher::Event::Delete(sa)
                        | watcher::Event::InitApply(sa),
                    ) => {
                        me.mark((
                            sa.metadata.namespace.clone().unwrap_or_default(),
                            sa.metadata.name.clone().unwrap_or_default(),
                        ));
                    }
                    Ok(watcher::Event::InitDone) => me.resync(&sa_s, &sec_s),
                    Ok(watcher::Event::Init) => {}
                    Err(e) => tracing::warn!(error = %e, "service account watch failed; retrying"),
                }
            }
        });
        let me = self.clone();
        let (sa_s, sec_s) = (sa_store.clone(), secret_store.clone());
        let secret_task = tokio::spawn(async move {
            let mut s = std::pin::pin!(secrets);
            while let Some(ev) = s.next().await {
                match ev {
                    Ok(
                        watcher::Event::Apply(sec)
                        | watcher::Event::Delete(sec)
                        | watcher::Event::InitApply(sec),
                    ) => {
                        let name = sec.metadata.name.clone().unwrap_or_default();
                        if let Some(sa) = name.strip_prefix("istio.") {
                            me.mark((
                                sec.metadata.namespace.clone().unwrap_or_default(),
                                sa.to_owned(),
                            ));
                        }
                    }
                    Ok(watcher::Event::InitDone) => me.resync(&sa_s, &sec_s),
                    Ok(watcher::Event::Init) => {}
                    Err(e) => tracing::warn!(error = %e, "secret watch failed; retrying"),
                }
            }
        });

        // Decide nothing before every store holds a complete list.
        tokio::select! {
            r = async { ns_store.wait_until_ready().await.and(sa_store.wait_until_ready().await).and(secret_store.wait_until_ready().await) } => {
                if r.is_err() { return; }
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
        tracing::info!("secret controller: stores synced; reconciling");
        let limit = Arc::new(Semaphore::new(self.cfg.concurrency.max(1)));
        let mut sweep = tokio::time::interval(self.cfg.sweep_interval);
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = sweep.tick() => self.mark_due(),
                _ = shutdown.wait_for(|s| *s) => break,
            }
            let (keys, namespaces) = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                (
                    std::mem::take(&mut q.dirty),
                    std::mem::take(&mut q.dirty_namespaces),
                )
            };
            let mut tasks = tokio::task::JoinSet::new();
            for ns in namespaces {
                let (me, ns_store, permit) = (
                    self.clone(),
                    ns_store.clone(),
                    limit.clone().acquire_owned().await,
                );
                tasks.spawn(async move {
                    let _permit = permit;
                    me.reconcile_configmap(&ns_store, &ns).await;
                });
            }
            for key in keys {
                let (me, stores, permit) = (
                    self.clone(),
                    (ns_store.clone(), sa_store.clone(), secret_store.clone()),
                    limit.clone().acquire_owned().await,
                );
                tasks.spawn(async move {
                    let result = me.reconcile(&stores.0, &stores.1, &stores.2, &key).await;
                    drop(permit);
                    me.after_reconcile(key, result);
                });
            }
            while tasks.join_next().await.is_some() {}
        }
        ns_task.abort();
        sa_task.abort();
        secret_task.abort();
    }

    /// Failed reconciles are retried after 0.5 s, doubling per consecutive failure up to
    /// a minute, without holding up the other pairs.
    fn after_reconcile(self: &Arc<Self>, key: Key, result: Result<(), String>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                q.failures.remove(&key);
            }
            Err(e) => {
                let n = q.failures.entry(key.clone()).or_insert(0);
                *n = n.saturating_add(1);
                let delay = Duration::from_millis(500)
                    .saturating_mul(1u32 << (*n - 1).min(7))
                    .min(Duration::from_secs(60));
                tracing::warn!(namespace = %key.0, service_account = %key.1, error = %e, retry_in = ?delay, "reconcile failed");
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    me.mark(key);
                });
            }
        }
    }

    fn resync(&self, sas: &Store<ServiceAccount>, secrets: &Store<Secret>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        for sa in sas.state() {
            q.dirty.insert((
                sa.metadata.namespace.clone().unwrap_or_default(),
                sa.metadata.name.clone().unwrap_or_default(),
            ));
            q.dirty_namespaces
                .insert(sa.metadata.namespace.clone().unwrap_or_default());
        }
        for s in secrets.state() {
            if let Some(sa) = s
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix("istio."))
            {
                q.dirty.insert((
                    s.metadata.namespace.clone().unwrap_or_default(),
                    sa.to_owned(),
                ));
            }
        }
        drop(q);
        self.wake.notify_one();
    }

    fn mark_due(&self) {
        let now = OffsetDateTime::now_utc();
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let due: Vec<Key> = q
            .due
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            q.due.remove(&k);
            q.dirty.insert(k);
        }
    }

    /// When a Secret's certificate must be replaced, or now if it must be replaced now.
    fn rotation_time(&self, secret: &Secret) -> Option<OffsetDateTime> {
        if data(secret, "root-cert.pem").as_deref() != Some(self.ca.roots_pem()) {
            return None;
        }
        let chain = data(secret, "cert-chain.pem")?;
        let leaf = ca_core::pem::parse_certificates(chain.as_bytes()).ok()?;
        let facts = ca_core::x509::inspect(&leaf[0]).ok()?;
        data(secret, "key.pem")?;
        let lifetime = (facts.not_after - facts.not_before).as_seconds_f64();
        let grace = (lifetime * self.cfg.grace_ratio).max(self.cfg.min_grace.as_secs_f64());
        Some(facts.not_after - time::Duration::seconds_f64(grace))
    }

    async fn reconcile(
        &self,
        namespaces: &Store<Namespace>,
        sas: &Store<ServiceAccount>,
        secrets: &Store<Secret>,
        (ns, sa): &Key,
    ) -> Result<(), String> {
        let managed = namespaces
            .get(&ObjectRef::new(ns))
            .is_some_and(|n| is_managed(&n, &self.cfg.ca_namespace, self.cfg.default_enabled));
        if !managed {
            return Ok(());
        }
        let name = format!("istio.{sa}");
        let secret = secrets.get(&ObjectRef::new(&name).within(ns));
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        if sas.get(&ObjectRef::new(sa).within(ns)).is_none() {
            let ours = secret.as_ref().is_some_and(|s| {
                s.type_.as_deref() == Some(SECRET_TYPE)
                    && s.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(SA_ANNOTATION))
                        .map(String::as_str)
                        == Some(sa.as_str())
            });
            if ours {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {
                        tracing::info!(namespace = %ns, service_account = %sa, "service account gone: secret deleted")
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(format!("deleting {ns}/{name}: {e}")),
                }
                metrics::counter!("ca_secret_writes_total", "verb" => "delete").increment(1);
            }
            self.queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .due
                .remove(&(ns.clone(), sa.clone()));
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        if let Some(s) = &secret
            && let Some(at) = self.rotation_time(s)
            && at > now
        {
            self.queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .due
                .insert((ns.clone(), sa.clone()), at);
            return Ok(());
        }
        let fresh = self.issue(ns, sa).await?;
        let mut desired = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                annotations: Some(BTreeMap::from([(SA_ANNOTATION.to_string(), sa.clone())])),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.into()),
            data: Some(fresh),
            ..Default::default()
        };
        let result = match &secret {
            None => api
                .create(&PostParams::default(), &desired)
                .await
                .map(|_| "create"),
            Some(existing) => {
                desired.metadata.resource_version = existing.metadata.resource_version.clone();
                api.replace(&name, &PostParams::default(), &desired)
                    .await
                    .map(|_| "update")
            }
        };
        match result {
            Ok(verb) => {
                metrics::counter!("ca_secret_writes_total", "verb" => verb).increment(1);
                tracing::debug!(namespace = %ns, service_account = %sa, verb, "identity secret written");
                Ok(())
            }
            // Someone else wrote it first; the watch will bring it and we decide again.
            Err(kube::Error::Api(e)) if e.code == 409 => Err(format!("{ns}/{name}: {}", e.message)),
            Err(e) => Err(format!("writing {ns}/{name}: {e}")),
        }
    }

    /// Issues a key and certificate for `ns/sa`, audited before it leaves.
    async fn issue(&self, ns: &str, sa: &str) -> Result<BTreeMap<String, ByteString>, String> {
        let identity =
            SpiffeId::for_service_account(&self.trust_domain, ns, sa).map_err(|e| e.to_string())?;
        let key = KeyAlgorithm::EcdsaP256
            .generate()
            .map_err(|e| e.to_string())?;
        let public = ca_core::keys::PublicKey::of_key_pair(&key).map_err(|e| e.to_string())?;
        let now = OffsetDateTime::now_utc();
        let issued = self
            .ca
            .issue_for_key(&public, &identity, self.cfg.workload_ttl, now)
            .map_err(|e| e.to_string())?;
        debug_assert_eq!(issued.facts.spki_der, key.subject_public_key_info());
        self.audit
            .record(issued_decision(
                Decision {
                    api: Some(AuditApi::Internal),
                    authenticator: Some("secret-controller".into()),
                    caller: Some(format!("kubernetes:{ns}/{sa}")),
                    detail: Some(format!("Secret {ns}/istio.{sa}")),
                    ..Default::default()
                },
                &issued,
                now,
            ))
            .await
            .map_err(|e| format!("audit: {e}"))?;
        Ok(BTreeMap::from([
            (
                "key.pem".to_string(),
                ByteString(key.serialize_pem().into_bytes()),
            ),
            (
                "cert-chain.pem".to_string(),
                ByteString(
                    format!("{}{}", issued.pem(), self.ca.ca_chain_pem().concat()).into_bytes(),
                ),
            ),
            (
                "root-cert.pem".to_string(),
                ByteString(self.ca.roots_pem().to_owned().into_bytes()),
            ),
        ]))
    }

    /// The root ConfigMap of a managed namespace equals the current trust bundle.
    async fn reconcile_configmap(&self, namespaces: &Store<Namespace>, ns: &str) {
        let managed = namespaces
            .get(&ObjectRef::new(ns))
            .is_some_and(|n| is_managed(&n, &self.cfg.ca_namespace, self.cfg.default_enabled));
        if !managed {
            return;
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let desired_data =
            BTreeMap::from([("root-cert.pem".to_string(), self.ca.roots_pem().to_owned())]);
        let labels = BTreeMap::from([("istio.io/config".to_string(), "true".to_string())]);
        let result = match api.get_opt(ROOT_CONFIGMAP).await {
            Ok(Some(cm))
                if cm.data.as_ref() == Some(&desired_data)
                    && cm
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("istio.io/config"))
                        .map(String::as_str)
                        == Some("true") =>
            {
                Ok(None)
            }
            Ok(existing) => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(ROOT_CONFIGMAP.into()),
                        namespace: Some(ns.into()),
                        labels: Some(labels),
                        resource_version: existing
                            .as_ref()
                            .and_then(|c| c.metadata.resource_version.clone()),
                        ..Default::default()
                    },
                    data: Some(desired_data),
                    ..Default::default()
                };
                if existing.is_some() {
                    api.replace(ROOT_CONFIGMAP, &PostParams::default(), &cm)
                        .await
                        .map(|_| Some("update"))
                } else {
                    api.create(&PostParams::default(), &cm)
                        .await
                        .map(|_| Some("create"))
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(verb)) => {
                metrics::counter!("ca_configmap_writes_total", "verb" => verb).increment(1)
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(namespace = %ns, error = %e, "root ConfigMap not written; will retry");
                self.mark_namespace(ns.to_owned());
            }
        }
    }
}
