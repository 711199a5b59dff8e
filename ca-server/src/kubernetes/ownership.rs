//! Which objects in the cluster are this CA's to write.
//!
//! istiod, Citadel or a second CA may keep `istio.<sa>` Secrets and `istio-ca-root-cert`
//! ConfigMaps in the same namespaces. The controllers write an object only if it is
//! theirs: it carries the marker annotation naming this CA's namespace, or it is
//! provably interchangeable with what this CA would write (a Secret whose certificate
//! this CA's key signed, a ConfigMap that already holds this CA's roots), in which case
//! the marker is added without changing the content. Anything else is reported, never
//! replaced.

use std::collections::BTreeMap;

use ca_core::CertificateAuthority;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

/// Annotation set on every object the controllers write; its value names the CA.
pub const MARKER: &str = "ca.istio.io/managed-by";
/// Secret type of identity Secrets.
pub const SECRET_TYPE: &str = "istio.io/key-and-cert";
/// Secret type of serving-certificate Secrets.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// Annotation naming the service account.
pub const SA_ANNOTATION: &str = "istio.io/service-account.name";

/// The marker's value for the CA running in `ca_namespace`.
pub fn marker_value(ca_namespace: &str) -> String {
    format!("istio-ca.{ca_namespace}")
}

/// Whose an existing object is.
#[derive(Debug, PartialEq, Eq)]
pub enum Ownership {
    /// Carries this CA's marker.
    Ours,
    /// Unmarked but interchangeable with this CA's own: mark it, keep its content.
    Adoptable,
    /// Someone else's; the reason says whose or why.
    Foreign(&'static str),
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn by_marker(meta: &ObjectMeta, ca_namespace: &str) -> Option<Ownership> {
    match annotation(meta, MARKER) {
        Some(v) if v == marker_value(ca_namespace) => Some(Ownership::Ours),
        Some(_) => Some(Ownership::Foreign("marked by another CA")),
        None => None,
    }
}

/// The leaf of a Secret's `cert-chain.pem`, if it has one.
pub fn leaf_der(secret: &Secret) -> Option<Vec<u8>> {
    leaf_in(secret, "cert-chain.pem")
}

/// The first certificate of the PEM chain in data `field` of `secret`.
pub fn leaf_in(secret: &Secret, field: &str) -> Option<Vec<u8>> {
    let chain = secret.data.as_ref()?.get(field)?;
    ca_core::pem::parse_certificates(&chain.0)
        .ok()?
        .into_iter()
        .next()
        .map(|c| c.to_vec())
}

/// Whose the identity Secret `existing` of service account `sa` is.
pub fn of_secret(
    existing: &Secret,
    sa: &str,
    ca: &CertificateAuthority,
    ca_namespace: &str,
) -> Ownership {
    if let Some(o) = by_marker(&existing.metadata, ca_namespace) {
        return o;
    }
    if existing.type_.as_deref() != Some(SECRET_TYPE) {
        return Ownership::Foreign("not of type istio.io/key-and-cert");
    }
    if annotation(&existing.metadata, SA_ANNOTATION) != Some(sa) {
        return Ownership::Foreign("its service-account annotation names another account");
    }
    // Written by an earlier version of this CA, or by Citadel holding the same key.
    match leaf_der(existing) {
        Some(leaf) if ca_core::statement::is_signed_by(ca.cert_der(), &leaf) => {
            Ownership::Adoptable
        }
        _ => Ownership::Foreign("its certificate was not issued by this CA"),
    }
}

/// Whose the serving Secret `existing` (type `kubernetes.io/tls`, chain in `tls.crt`) is.
pub fn of_tls_secret(
    existing: &Secret,
    ca: &CertificateAuthority,
    ca_namespace: &str,
) -> Ownership {
    if let Some(o) = by_marker(&existing.metadata, ca_namespace) {
        return o;
    }
    if existing.type_.as_deref() != Some(TLS_SECRET_TYPE) {
        return Ownership::Foreign("not of type kubernetes.io/tls");
    }
    match leaf_in(existing, "tls.crt") {
        Some(leaf) if ca_core::statement::is_signed_by(ca.cert_der(), &leaf) => {
            Ownership::Adoptable
        }
        _ => Ownership::Foreign("its certificate was not issued by this CA"),
    }
}

/// Whose the root ConfigMap `existing` is.
pub fn of_configmap(
    existing: &ConfigMap,
    ca: &CertificateAuthority,
    ca_namespace: &str,
) -> Ownership {
    if let Some(o) = by_marker(&existing.metadata, ca_namespace) {
        return o;
    }
    let holds_our_roots = existing
        .data
        .as_ref()
        .and_then(|d| d.get("root-cert.pem"))
        .is_some_and(|r| r == ca.roots_pem());
    if holds_our_roots {
        Ownership::Adoptable
    } else {
        Ownership::Foreign("it holds another trust bundle")
    }
}

/// The annotations of an object this CA writes (plus `extra`).
pub fn annotations(ca_namespace: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    std::iter::once((MARKER.to_owned(), marker_value(ca_namespace)))
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// The reference that lets the garbage collector delete an identity Secret with its
/// service account.
pub fn owner(sa: &ServiceAccount) -> Option<OwnerReference> {
    let mut r = sa.controller_owner_ref(&())?;
    // The Secret must not block the service account's foreground deletion.
    r.block_owner_deletion = None;
    Some(r)
}

/// Whether `meta` already names `sa` as its controller.
pub fn owned_by(meta: &ObjectMeta, sa: &ServiceAccount) -> bool {
    let uid = sa.metadata.uid.as_deref();
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && Some(r.uid.as_str()) == uid)
}
