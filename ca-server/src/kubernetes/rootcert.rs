//! The root ConfigMap controller: a kube-runtime `Controller` over Namespaces keeping
//! `istio-ca-root-cert` (key `root-cert.pem`, label `istio.io/config=true`) equal to the
//! current trust bundle in every managed namespace.
//!
//! Only ConfigMaps of that name are watched (a field selector). istiod writes the same
//! ConfigMap; one that is not this CA's (see [`super::ownership`]) is never replaced:
//! the conflict becomes an Event and a metric. A refused write (a 403 from a missing
//! RBAC rule, say) is retried with exponential backoff, not at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use ca_core::CertificateAuthority;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};

use super::ownership::{self, Ownership};
use super::{
    ControllerConfig, Ready, ReconcileError, Retries, api as call, is_managed, report_conflict,
};

/// Root ConfigMap name.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
const CONFIG_LABEL: &str = "istio.io/config";

pub(super) struct Context {
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    cfg: ControllerConfig,
    configmaps: Store<ConfigMap>,
    ready: Ready,
    events: Recorder,
    retries: Retries,
}

/// Runs the root ConfigMap controller until `stop` resolves.
pub async fn run(
    client: kube::Client,
    ca: Arc<CertificateAuthority>,
    cfg: ControllerConfig,
    events: Recorder,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (configmaps, writer) = reflector::store::<ConfigMap>();
    let cm_events = watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={ROOT_CONFIGMAP}")),
    )
    .modify(|cm: &mut ConfigMap| cm.managed_fields_mut().clear())
    .reflect(writer)
    .touched_objects();
    let ctx = Arc::new(Context {
        client: client.clone(),
        ca,
        cfg: cfg.clone(),
        ready: Ready::of(&configmaps),
        configmaps,
        events,
        retries: Retries::default(),
    });
    Controller::new(Api::<Namespace>::all(client), watcher::Config::default())
        .watches_stream(cm_events, |cm: ConfigMap| {
            cm.namespace().map(|ns| ObjectRef::new(&ns))
        })
        .with_config(controller::Config::default().concurrency(cfg.concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok(_) | Err(controller::Error::ObjectNotFound(_)) => {}
                Err(e) => tracing::warn!(error = %e, "root ConfigMap controller"),
            }
        })
        .await;
}

fn error_policy(ns: Arc<Namespace>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let name = ns.name_any();
    let delay = ctx.retries.failed(&name, error);
    tracing::warn!(namespace = %name, %error, retry_in = ?delay, "root ConfigMap not reconciled");
    Action::requeue(delay)
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let action = ctx.reconcile(&ns).await?;
    ctx.retries.succeeded(&ns.name_any());
    Ok(action)
}

impl Context {
    async fn reconcile(&self, namespace: &Namespace) -> Result<Action, ReconcileError> {
        self.ready.wait().await?;
        if !is_managed(namespace, &self.cfg.ca_namespace, self.cfg.default_enabled) {
            return Ok(Action::await_change());
        }
        let ns = namespace.name_any();
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let existing = self
            .configmaps
            .get(&ObjectRef::new(ROOT_CONFIGMAP).within(&ns));
        let Some(existing) = existing else {
            let desired = self.desired(&ns, None);
            call(
                "create configmap",
                api.create(&PostParams::default(), &desired),
            )
            .await?;
            metrics::counter!("ca_configmap_writes_total", "verb" => "create").increment(1);
            return Ok(Action::await_change());
        };
        match ownership::of_configmap(&existing, &self.ca, &self.cfg.ca_namespace) {
            Ownership::Foreign(why) => {
                self.conflict(namespace, why).await;
                Ok(Action::await_change())
            }
            Ownership::Adoptable | Ownership::Ours if self.is_current(&existing) => {
                Ok(Action::await_change())
            }
            Ownership::Adoptable => {
                let patch = serde_json::json!({"metadata": {
                    "annotations": ownership::annotations(&self.cfg.ca_namespace, &[]),
                    "labels": {CONFIG_LABEL: "true"},
                }});
                let patch = Patch::Merge(patch);
                call(
                    "patch configmap",
                    api.patch(ROOT_CONFIGMAP, &PatchParams::default(), &patch),
                )
                .await?;
                metrics::counter!("ca_configmap_writes_total", "verb" => "patch").increment(1);
                Ok(Action::await_change())
            }
            Ownership::Ours => {
                let desired = self.desired(&ns, existing.resource_version());
                call(
                    "replace configmap",
                    api.replace(ROOT_CONFIGMAP, &PostParams::default(), &desired),
                )
                .await?;
                metrics::counter!("ca_configmap_writes_total", "verb" => "update").increment(1);
                Ok(Action::await_change())
            }
        }
    }

    /// Marked, labelled and holding the current roots.
    fn is_current(&self, cm: &ConfigMap) -> bool {
        let marked = cm.annotations().get(ownership::MARKER)
            == Some(&ownership::marker_value(&self.cfg.ca_namespace));
        let labelled = cm.labels().get(CONFIG_LABEL).map(String::as_str) == Some("true");
        let roots = cm.data.as_ref().and_then(|d| d.get("root-cert.pem"));
        marked && labelled && roots.map(String::as_str) == Some(self.ca.roots_pem())
    }

    fn desired(&self, ns: &str, resource_version: Option<String>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(ROOT_CONFIGMAP.into()),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([(CONFIG_LABEL.into(), "true".into())])),
                annotations: Some(ownership::annotations(&self.cfg.ca_namespace, &[])),
                resource_version,
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "root-cert.pem".to_string(),
                self.ca.roots_pem().to_owned(),
            )])),
            ..Default::default()
        }
    }

    async fn conflict(&self, namespace: &Namespace, why: &str) {
        let ns = namespace.name_any();
        let note = format!(
            "ConfigMap {ns}/{ROOT_CONFIGMAP} was not created by this CA ({why}); it is left as it is."
        );
        let regarding = namespace.object_ref(&());
        report_conflict(
            &self.events,
            &regarding,
            "ConfigMap",
            "WriteRootConfigMap",
            note,
        )
        .await;
    }
}
