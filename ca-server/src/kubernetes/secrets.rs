//! The identity-Secret controller (docs/COMPATIBILITY.md, "Kubernetes objects"): a
//! kube-runtime `Controller` over ServiceAccounts.
//!
//! For each service account of a managed namespace, Secret `istio.<sa>` exists, parses,
//! carries the current `root-cert.pem` and the DNS names configured for the account
//! (Citadel's, [`super::names`]), has more than its grace period left, and is owned by
//! the service account (so the garbage collector deletes it with the account).
//! Otherwise it is created or rotated; the issuance is audited before the write.
//! `cert-chain.pem` is laid out as Citadel wrote it ([`ControllerConfig::chain_pem`]).
//!
//! What is watched, and so held in memory: namespaces, service accounts, and only the
//! Secrets of type `istio.io/key-and-cert` (a field selector), with their private keys
//! dropped from the cached copy. A Secret that is not this CA's (see
//! [`super::ownership`]) is never written: the conflict becomes an Event on the service
//! account and a metric, and the account is looked at again when something changes.
//! A failed watch is retried with the controller's backoff (0.8 s doubling to 30 s).
//! Every failed reconcile is retried with exponential backoff; a successful one is
//! requeued for its next rotation (at most `--secret-check-interval` away).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ca_core::keys::KeyAlgorithm;
use ca_core::{CertificateAuthority, SpiffeId};
use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use rcgen::PublicKeyData;
use time::OffsetDateTime;

use super::names::{IdentityDnsNames, ServingSecret};
use super::ownership::{self, Ownership, SA_ANNOTATION, SECRET_TYPE};
use super::{
    Ready, ReconcileError, Retries, api as call, is_managed, report_secret_conflict, timed,
};
use crate::audit::{Api as AuditApi, AuditWriter, Decision};
use crate::issuance::issued_decision;

/// How the controllers behave.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// The CA's namespace (for the `ca.istio.io/env` label and the ownership marker).
    pub ca_namespace: String,
    /// Whether a namespace without either label is managed.
    pub default_enabled: bool,
    /// Lifetime of workload certificates in Secrets.
    pub workload_ttl: Duration,
    /// Key type of the keys in Secrets.
    pub workload_key: KeyAlgorithm,
    /// Rotate when less than this fraction of the lifetime is left.
    pub grace_ratio: f64,
    /// ...but never with less than this left.
    pub min_grace: Duration,
    /// Parallel reconciles (each may write once).
    pub concurrency: u16,
    /// Longest time between two looks at one Secret.
    pub recheck_interval: Duration,
    /// DNS names added to `istio.<sa>` certificates, by `(namespace, service account)`
    /// (Citadel's `--append-dns-names` and `--custom-dns-names`).
    pub dns_names: Arc<IdentityDnsNames>,
    /// What follows the leaf in `cert-chain.pem`, as Citadel wrote it: nothing under a
    /// self-signed root, the operator's `cert-chain.pem` under a plugged-in CA.
    pub chain_pem: String,
    /// Serving-certificate Secrets to keep (`--serving-cert-secret`).
    pub serving_secrets: Vec<ServingSecret>,
}

impl ControllerConfig {
    /// When a certificate of this lifetime must be replaced: `--secret-grace-ratio` of
    /// its life before expiry, and at least `--secret-min-grace`.
    pub(super) fn renew_at(&self, facts: &ca_core::x509::CertFacts) -> OffsetDateTime {
        let lifetime = (facts.not_after - facts.not_before).as_seconds_f64();
        let grace = (lifetime * self.grace_ratio).max(self.min_grace.as_secs_f64());
        facts.not_after - time::Duration::seconds_f64(grace)
    }
}

/// What an identity-Secret reconcile works with.
pub(super) struct Context {
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    trust_domain: String,
    audit: AuditWriter,
    cfg: ControllerConfig,
    namespaces: Store<Namespace>,
    secrets: Store<Secret>,
    /// Readiness of `namespaces` and `secrets`.
    ready: [Ready; 2],
    events: Recorder,
    retries: Retries,
    /// `(namespace, service account)` whose `istio.<sa>` name is taken by a Secret of
    /// another type (outside the watch): looked up before issuing again.
    blocked: Mutex<HashSet<(String, String)>>,
}

/// The cached copy of an identity Secret keeps whether it has a key, not the key.
fn forget_private_key(secret: &mut Secret) {
    forget_field(secret, "key.pem");
}

/// Drops managedFields, and replaces data `field` (a private key) by a marker that it
/// was there: what a cached copy of a Secret keeps.
pub(super) fn forget_field(secret: &mut Secret, field: &str) {
    secret.managed_fields_mut().clear();
    if let Some(key) = secret.data.as_mut().and_then(|d| d.get_mut(field))
        && !key.0.is_empty()
    {
        key.0 = b"present".to_vec();
    }
}

fn forget_managed_fields<K: Resource>(obj: &mut K) {
    obj.managed_fields_mut().clear();
}

/// Runs the identity-Secret controller until `stop` resolves.
pub async fn run(
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    trust_domain: String,
    audit: AuditWriter,
    cfg: ControllerConfig,
    events: Recorder,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (namespaces, ns_writer) = reflector::store::<Namespace>();
    let (secrets, secret_writer) = reflector::store::<Secret>();
    let (accounts, sa_writer) = reflector::store::<ServiceAccount>();
    let ns_events = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .modify(forget_managed_fields)
    .reflect(ns_writer)
    .touched_objects();
    let secret_events = watcher(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().fields(&format!("type={SECRET_TYPE}")),
    )
    .modify(forget_private_key)
    .reflect(secret_writer)
    .touched_objects();
    let sa_events = watcher(
        Api::<ServiceAccount>::all(client.clone()),
        watcher::Config::default(),
    )
    .modify(forget_managed_fields)
    .reflect(sa_writer)
    .touched_objects();
    let index = accounts.clone();
    let ctx = Arc::new(Context {
        client,
        ca,
        trust_domain,
        audit,
        retries: Retries::default(),
        blocked: Mutex::default(),
        cfg: cfg.clone(),
        ready: [Ready::of(&namespaces), Ready::of(&secrets)],
        namespaces,
        secrets,
        events,
    });
    Controller::for_stream(sa_events, accounts)
        .watches_stream(secret_events, |s: Secret| {
            let ns = s.namespace()?;
            let sa = s.name_any().strip_prefix("istio.")?.to_owned();
            Some(ObjectRef::new(&sa).within(&ns))
        })
        .watches_stream(ns_events, move |n: Namespace| {
            let name = n.name_any();
            index
                .state()
                .iter()
                .filter(|sa| sa.namespace().as_deref() == Some(name.as_str()))
                .map(|sa| ObjectRef::from_obj(sa.as_ref()))
                .collect::<Vec<_>>()
        })
        .with_config(controller::Config::default().concurrency(cfg.concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok(_) => {}
                // The account was deleted; the garbage collector takes its Secret.
                Err(controller::Error::ObjectNotFound(o)) => {
                    tracing::debug!(object = %o, "service account gone")
                }
                Err(e) => tracing::warn!(error = %e, "secret controller"),
            }
        })
        .await;
}

fn error_policy(sa: Arc<ServiceAccount>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let key = ObjectRef::from_obj(sa.as_ref()).to_string();
    let delay = ctx.retries.failed(&key, error);
    tracing::warn!(service_account = %key, %error, retry_in = ?delay, "identity secret not reconciled");
    Action::requeue(delay)
}

async fn reconcile(sa: Arc<ServiceAccount>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let key = ObjectRef::from_obj(sa.as_ref()).to_string();
    let action = ctx.reconcile(&sa).await?;
    ctx.retries.succeeded(&key);
    Ok(action)
}

impl Context {
    async fn reconcile(&self, sa: &ServiceAccount) -> Result<Action, ReconcileError> {
        // Decide nothing before every store holds a complete list.
        for ready in &self.ready {
            ready.wait().await?;
        }
        let (ns, name) = (sa.namespace().unwrap_or_default(), sa.name_any());
        let managed = self
            .namespaces
            .get(&ObjectRef::new(&ns))
            .is_some_and(|n| is_managed(&n, &self.cfg.ca_namespace, self.cfg.default_enabled));
        if !managed {
            return Ok(Action::await_change());
        }
        let secret_name = format!("istio.{name}");
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let Some(existing) = self.secrets.get(&ObjectRef::new(&secret_name).within(&ns)) else {
            return self.create(sa, &api, &ns, &name).await;
        };
        match ownership::of_secret(&existing, &name, &self.ca, &self.cfg.ca_namespace) {
            Ownership::Foreign(why) => {
                self.conflict(sa, &ns, &secret_name, why).await;
                // Typed Secrets are watched: a change to it brings the account back.
                Ok(Action::await_change())
            }
            Ownership::Adoptable => {
                self.mark(sa, &api, &secret_name).await?;
                tracing::info!(namespace = %ns, service_account = %name, "adopted an identity secret this CA's key signed");
                Ok(Action::await_change())
            }
            Ownership::Ours => {
                let now = OffsetDateTime::now_utc();
                match self.rotation_time(&existing, &ns, &name) {
                    Some(at) if at > now => {
                        if !ownership::owned_by(&existing.metadata, sa) {
                            self.mark(sa, &api, &secret_name).await?;
                        }
                        let wait = Duration::try_from(at - now).unwrap_or_default();
                        Ok(Action::requeue(wait.min(self.cfg.recheck_interval)))
                    }
                    _ => self.replace(sa, &api, &existing, &ns, &name).await,
                }
            }
        }
    }

    async fn create(
        &self,
        sa: &ServiceAccount,
        api: &Api<Secret>,
        ns: &str,
        name: &str,
    ) -> Result<Action, ReconcileError> {
        let key = (ns.to_owned(), name.to_owned());
        let secret_name = format!("istio.{name}");
        let blocked = self
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key);
        if blocked {
            if let Some(other) = call("get secret", api.get_opt(&secret_name)).await? {
                let why = match ownership::of_secret(&other, name, &self.ca, &self.cfg.ca_namespace)
                {
                    Ownership::Foreign(why) => why,
                    _ => "not of type istio.io/key-and-cert",
                };
                self.conflict(sa, ns, &secret_name, why).await;
                return Err(ReconcileError::NotOurs);
            }
            self.blocked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        let desired = self.desired(sa, ns, name).await?;
        match timed(
            "create secret",
            api.create(&PostParams::default(), &desired),
        )
        .await?
        {
            Ok(_) => {
                metrics::counter!("ca_secret_writes_total", "verb" => "create").increment(1);
                Ok(Action::requeue(self.cfg.recheck_interval))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Not in the typed watch: a Secret of another type holds the name.
                // What was issued for it is audited and discarded; until that Secret
                // goes, nothing more is issued for this account.
                self.blocked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key);
                self.conflict(sa, ns, &secret_name, "not of type istio.io/key-and-cert")
                    .await;
                Err(ReconcileError::NotOurs)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn replace(
        &self,
        sa: &ServiceAccount,
        api: &Api<Secret>,
        existing: &Secret,
        ns: &str,
        name: &str,
    ) -> Result<Action, ReconcileError> {
        let mut desired = self.desired(sa, ns, name).await?;
        desired.metadata.resource_version = existing.resource_version();
        // A stale resourceVersion answers 409: someone changed it; retried after backoff
        // against what the watch then shows.
        call(
            "replace secret",
            api.replace(&desired.name_any(), &PostParams::default(), &desired),
        )
        .await?;
        metrics::counter!("ca_secret_writes_total", "verb" => "update").increment(1);
        Ok(Action::requeue(self.cfg.recheck_interval))
    }

    /// Adds the marker and the owner reference, leaving the content as it is.
    async fn mark(
        &self,
        sa: &ServiceAccount,
        api: &Api<Secret>,
        secret_name: &str,
    ) -> Result<(), ReconcileError> {
        let patch = serde_json::json!({
            "metadata": {
                "annotations": ownership::annotations(&self.cfg.ca_namespace, &[]),
                "ownerReferences": ownership::owner(sa).into_iter().collect::<Vec<_>>(),
            }
        });
        call(
            "patch secret",
            api.patch(secret_name, &PatchParams::default(), &Patch::Merge(patch)),
        )
        .await?;
        metrics::counter!("ca_secret_writes_total", "verb" => "patch").increment(1);
        Ok(())
    }

    async fn conflict(&self, sa: &ServiceAccount, ns: &str, secret_name: &str, why: &str) {
        let regarding = sa.object_ref(&());
        let secret = (ns, secret_name);
        report_secret_conflict(
            &self.events,
            &regarding,
            "CreateIdentitySecret",
            secret,
            why,
        )
        .await;
    }

    /// When a Secret's certificate must be replaced; `None`: now (it is unreadable, its
    /// roots or DNS names are not the current ones, or its key is missing).
    fn rotation_time(&self, secret: &Secret, ns: &str, sa: &str) -> Option<OffsetDateTime> {
        let data = secret.data.as_ref()?;
        if data.get("root-cert.pem").map(|r| r.0.as_slice()) != Some(self.ca.roots_pem().as_bytes())
            || data.get("key.pem").is_none_or(|k| k.0.is_empty())
        {
            return None;
        }
        let facts = ca_core::x509::inspect(&ownership::leaf_der(secret)?).ok()?;
        let dns = self.dns_names(ns, sa).iter().map(ca_core::DnsName::as_str);
        if !facts.dns_sans.iter().map(String::as_str).eq(dns) {
            return None;
        }
        Some(self.cfg.renew_at(&facts))
    }

    fn dns_names(&self, ns: &str, sa: &str) -> &[ca_core::DnsName] {
        self.cfg
            .dns_names
            .get(&(ns.to_owned(), sa.to_owned()))
            .map_or(&[], Vec::as_slice)
    }

    /// The Secret to write for `ns/sa`: a fresh key and certificate, audited before
    /// they leave.
    async fn desired(
        &self,
        sa: &ServiceAccount,
        ns: &str,
        name: &str,
    ) -> Result<Secret, ReconcileError> {
        let identity = SpiffeId::for_service_account(&self.trust_domain, ns, name)?;
        let (key, public) = super::fresh_key(self.cfg.workload_key).await?;
        let now = OffsetDateTime::now_utc();
        let dns = self.dns_names(ns, name);
        let issued =
            self.ca
                .issue_for_key_with_dns(&public, &identity, dns, self.cfg.workload_ttl, now)?;
        debug_assert_eq!(issued.facts.spki_der, key.subject_public_key_info());
        let mut detail = format!("Secret {ns}/istio.{name}");
        if !dns.is_empty() {
            let list: Vec<&str> = dns.iter().map(ca_core::DnsName::as_str).collect();
            detail.push_str(&format!(" (DNS names {})", list.join(",")));
        }
        self.audit
            .record(issued_decision(
                Decision {
                    api: Some(AuditApi::Internal),
                    authenticator: Some("secret-controller".into()),
                    caller: Some(format!("kubernetes:{ns}/{name}")),
                    detail: Some(detail),
                    ..Default::default()
                },
                &issued,
                now,
            ))
            .await?;
        let chain = format!("{}{}", issued.pem(), self.cfg.chain_pem);
        Ok(Secret {
            metadata: ObjectMeta {
                name: Some(format!("istio.{name}")),
                namespace: Some(ns.to_owned()),
                annotations: Some(ownership::annotations(
                    &self.cfg.ca_namespace,
                    &[(SA_ANNOTATION, name)],
                )),
                owner_references: ownership::owner(sa).map(|r| vec![r]),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.into()),
            data: Some(BTreeMap::from([
                (
                    "key.pem".to_owned(),
                    ByteString(key.serialize_pem().into_bytes()),
                ),
                ("cert-chain.pem".to_owned(), ByteString(chain.into_bytes())),
                (
                    "root-cert.pem".to_owned(),
                    ByteString(self.ca.roots_pem().as_bytes().to_vec()),
                ),
            ])),
            ..Default::default()
        })
    }
}
