//! Serving-certificate Secrets (`--serving-cert-secret`): for each one the operator
//! names, a `kubernetes.io/tls` Secret (`tls.crt` = leaf then CA chain, `tls.key`,
//! `ca.crt` = the trust bundle) whose certificate names exactly the configured DNS
//! names. This is how istiod gets its serving certificate when it runs with
//! `ENABLE_CA_SERVER=false` and this CA in its place (docs/ISTIO.md).
//!
//! One kube-runtime `Controller` per Secret, over that Secret's Namespace (so a missing
//! Secret is noticed: there is nothing to watch until it exists), watching only that
//! Secret (a field selector) with its private key dropped from the cached copy. The
//! Secret is created when missing and replaced when its names, roots or key are not
//! current or when less than the grace period of its life is left; istiod reloads the
//! mounted files when they change. A Secret of that name that is not this CA's (see
//! [`super::ownership`]) is never written: the conflict becomes an Event on the
//! Namespace and a metric.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ca_core::CertificateAuthority;
use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use rcgen::PublicKeyData;
use time::OffsetDateTime;

use super::names::ServingSecret;
use super::ownership::{self, Ownership, TLS_SECRET_TYPE};
use super::{
    ControllerConfig, Ready, ReconcileError, Retries, api as call, report_secret_conflict,
};
use crate::audit::{Api as AuditApi, AuditWriter, Decision};
use crate::issuance::issued_decision;

/// The Secret's keys (what cert-manager writes, and istiod's `--tlsCertFile`,
/// `--tlsKeyFile` and `--caCertFile` point at).
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
const CA_KEY: &str = "ca.crt";

struct Context {
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    audit: AuditWriter,
    cfg: ControllerConfig,
    spec: ServingSecret,
    secrets: Store<Secret>,
    ready: Ready,
    events: Recorder,
    retries: Retries,
}

/// Runs one controller per configured serving Secret until `stop` says so.
pub async fn run(
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    audit: AuditWriter,
    cfg: ControllerConfig,
    events: Recorder,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut all = tokio::task::JoinSet::new();
    for spec in cfg.serving_secrets.clone() {
        let mut stop = stop.clone();
        all.spawn(run_one(
            client.clone(),
            ca.clone(),
            audit.clone(),
            cfg.clone(),
            spec,
            events.clone(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
    }
    all.join_all().await;
}

async fn run_one(
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    audit: AuditWriter,
    cfg: ControllerConfig,
    spec: ServingSecret,
    events: Recorder,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (secrets, writer) = reflector::store::<Secret>();
    let secret_events = watcher(
        Api::<Secret>::namespaced(client.clone(), &spec.namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", spec.name)),
    )
    .modify(|s: &mut Secret| super::secrets::forget_field(s, KEY_KEY))
    .reflect(writer)
    .touched_objects();
    let namespaces = Api::<Namespace>::all(client.clone());
    let only_ns = watcher::Config::default().fields(&format!("metadata.name={}", spec.namespace));
    let ctx = Arc::new(Context {
        client,
        ca,
        audit,
        cfg,
        spec,
        ready: Ready::of(&secrets),
        secrets,
        events,
        retries: Retries::default(),
    });
    Controller::new(namespaces, only_ns)
        .watches_stream(secret_events, |s: Secret| {
            s.namespace().map(|ns| ObjectRef::new(&ns))
        })
        .with_config(controller::Config::default().concurrency(1))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok(_) | Err(controller::Error::ObjectNotFound(_)) => {}
                Err(e) => tracing::warn!(error = %e, "serving Secret controller"),
            }
        })
        .await;
}

fn error_policy(_ns: Arc<Namespace>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", ctx.spec.namespace, ctx.spec.name);
    let delay = ctx.retries.failed(&key, error);
    tracing::warn!(secret = %key, %error, retry_in = ?delay, "serving Secret not reconciled");
    Action::requeue(delay)
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let action = ctx.reconcile(&ns).await?;
    ctx.retries
        .succeeded(&format!("{}/{}", ctx.spec.namespace, ctx.spec.name));
    Ok(action)
}

impl Context {
    async fn reconcile(&self, namespace: &Namespace) -> Result<Action, ReconcileError> {
        self.ready.wait().await?;
        let (ns, name) = (&self.spec.namespace, &self.spec.name);
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let Some(existing) = self.secrets.get(&ObjectRef::new(name).within(ns)) else {
            let desired = self.desired(None).await?;
            call(
                "create secret",
                api.create(&PostParams::default(), &desired),
            )
            .await?;
            metrics::counter!("ca_secret_writes_total", "verb" => "create").increment(1);
            return Ok(Action::requeue(self.cfg.recheck_interval));
        };
        match ownership::of_tls_secret(&existing, &self.ca, &self.cfg.ca_namespace) {
            Ownership::Foreign(why) => {
                self.conflict(namespace, why).await;
                Ok(Action::await_change())
            }
            Ownership::Adoptable => {
                let patch = serde_json::json!({"metadata": {
                    "annotations": ownership::annotations(&self.cfg.ca_namespace, &[]),
                }});
                call(
                    "patch secret",
                    api.patch(name, &PatchParams::default(), &Patch::Merge(patch)),
                )
                .await?;
                metrics::counter!("ca_secret_writes_total", "verb" => "patch").increment(1);
                Ok(Action::await_change())
            }
            Ownership::Ours => {
                let now = OffsetDateTime::now_utc();
                match self.rotation_time(&existing) {
                    Some(at) if at > now => {
                        let wait = Duration::try_from(at - now).unwrap_or_default();
                        Ok(Action::requeue(wait.min(self.cfg.recheck_interval)))
                    }
                    _ => {
                        let desired = self.desired(existing.resource_version()).await?;
                        // A stale resourceVersion answers 409: retried after backoff
                        // against what the watch then shows.
                        call(
                            "replace secret",
                            api.replace(name, &PostParams::default(), &desired),
                        )
                        .await?;
                        metrics::counter!("ca_secret_writes_total", "verb" => "update")
                            .increment(1);
                        Ok(Action::requeue(self.cfg.recheck_interval))
                    }
                }
            }
        }
    }

    /// When the Secret's certificate must be replaced; `None`: now.
    fn rotation_time(&self, secret: &Secret) -> Option<OffsetDateTime> {
        let data = secret.data.as_ref()?;
        if data.get(CA_KEY).map(|r| r.0.as_slice()) != Some(self.ca.roots_pem().as_bytes())
            || data.get(KEY_KEY).is_none_or(|k| k.0.is_empty())
            || secret.type_.as_deref() != Some(TLS_SECRET_TYPE)
        {
            return None;
        }
        let facts = ca_core::x509::inspect(&ownership::leaf_in(secret, CERT_KEY)?).ok()?;
        let wanted = self.spec.dns_names.iter().map(ca_core::DnsName::as_str);
        if !facts.uri_sans.is_empty() || !facts.dns_sans.iter().map(String::as_str).eq(wanted) {
            return None;
        }
        Some(self.cfg.renew_at(&facts))
    }

    /// A fresh key and certificate for the configured names, audited before they leave.
    async fn desired(&self, resource_version: Option<String>) -> Result<Secret, ReconcileError> {
        let (ns, name) = (&self.spec.namespace, &self.spec.name);
        let (key, public) = super::fresh_key(self.cfg.workload_key).await?;
        let now = OffsetDateTime::now_utc();
        let issued = self.ca.issue_server_cert(
            &public,
            &self.spec.dns_names,
            &[],
            self.cfg.workload_ttl,
            now,
        )?;
        debug_assert_eq!(issued.facts.spki_der, key.subject_public_key_info());
        let list: Vec<&str> = self.spec.dns_names.iter().map(|d| d.as_str()).collect();
        self.audit
            .record(issued_decision(
                Decision {
                    api: Some(AuditApi::Internal),
                    authenticator: Some("secret-controller".into()),
                    caller: Some(format!("kubernetes:{ns}/{name}")),
                    detail: Some(format!(
                        "serving Secret {ns}/{name} (DNS names {})",
                        list.join(",")
                    )),
                    ..Default::default()
                },
                &issued,
                now,
            ))
            .await?;
        let chain = format!("{}{}", issued.pem(), self.ca.ca_chain_pem().concat());
        let bytes = |s: String| ByteString(s.into_bytes());
        Ok(Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                annotations: Some(ownership::annotations(&self.cfg.ca_namespace, &[])),
                resource_version,
                ..Default::default()
            },
            type_: Some(TLS_SECRET_TYPE.into()),
            data: Some(BTreeMap::from([
                (CERT_KEY.to_owned(), bytes(chain)),
                (KEY_KEY.to_owned(), bytes(key.serialize_pem())),
                (CA_KEY.to_owned(), bytes(self.ca.roots_pem().to_owned())),
            ])),
            ..Default::default()
        })
    }

    async fn conflict(&self, namespace: &Namespace, why: &str) {
        let secret = (self.spec.namespace.as_str(), self.spec.name.as_str());
        let regarding = namespace.object_ref(&());
        report_secret_conflict(&self.events, &regarding, "WriteServingSecret", secret, why).await;
    }
}
