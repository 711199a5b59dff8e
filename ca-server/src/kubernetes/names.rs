//! DNS names the operator configures, and nothing else: Citadel's names for the
//! control-plane service accounts of `istio.<sa>` Secrets (`--append-dns-names`,
//! `--custom-dns-names`), and the serving-certificate Secrets (`--serving-cert-secret`).
//! No CSR, token or gRPC caller can add a DNS name to anything this CA issues.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ca_core::DnsName;

/// The webhook service accounts Citadel gave DNS names with `--append-dns-names`, and
/// the service whose names they get (`<service>.<ca-namespace>.svc` and
/// `<service>.<ca-namespace>`), in the CA's own namespace only.
pub const CITADEL_WEBHOOKS: [(&str, &str); 2] = [
    (
        "istio-sidecar-injector-service-account",
        "istio-sidecar-injector",
    ),
    ("istio-galley-service-account", "istio-galley"),
];

/// Extra DNS names of `istio.<sa>` certificates, by `(namespace, service account)`.
pub type IdentityDnsNames = BTreeMap<(String, String), Vec<DnsName>>;

/// Citadel's DNS names: with `append`, the webhook accounts of [`CITADEL_WEBHOOKS`] in
/// `ca_namespace`; then each `custom` entry, `SERVICE_ACCOUNT.NAMESPACE:DNS_NAME` (as
/// Citadel's `--custom-dns-names`; several entries may name one account). Unlike
/// Citadel, custom names apply whether or not `append` is set.
pub fn identity_dns_names(
    ca_namespace: &str,
    append: bool,
    custom: &[String],
) -> Result<IdentityDnsNames, String> {
    let mut names = IdentityDnsNames::new();
    let dns = |s: String| DnsName::parse(&s).map_err(|e| e.to_string());
    if append {
        for (account, service) in CITADEL_WEBHOOKS {
            names.insert(
                (ca_namespace.to_owned(), account.to_owned()),
                vec![
                    dns(format!("{service}.{ca_namespace}.svc"))?,
                    dns(format!("{service}.{ca_namespace}"))?,
                ],
            );
        }
    }
    for entry in custom.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let bad = |why: &str| format!("--custom-dns-names entry {entry:?}: {why}");
        let (account, name) = entry
            .split_once(':')
            .ok_or_else(|| bad("expected SERVICE_ACCOUNT.NAMESPACE:DNS_NAME"))?;
        // A namespace is a DNS label (no dots); a service account may contain dots.
        let (sa, ns) = account
            .rsplit_once('.')
            .ok_or_else(|| bad("expected SERVICE_ACCOUNT.NAMESPACE before the colon"))?;
        if !is_label(ns) {
            return Err(bad("the namespace is not a lowercase DNS label"));
        }
        if !is_subdomain(sa) {
            return Err(bad("the service account is not a lowercase DNS subdomain"));
        }
        let name = DnsName::parse(name).map_err(|e| bad(&e.to_string()))?;
        let list = names.entry((ns.to_owned(), sa.to_owned())).or_default();
        if !list.contains(&name) {
            list.push(name);
        }
    }
    Ok(names)
}

/// A Kubernetes object name of the DNS-subdomain kind (service accounts, Secrets).
fn is_subdomain(v: &str) -> bool {
    DnsName::parse(v).is_ok_and(|d| d.as_str() == v)
}

/// A Kubernetes namespace name: one lowercase DNS label.
fn is_label(v: &str) -> bool {
    !v.contains('.') && is_subdomain(v)
}

/// A `kubernetes.io/tls` Secret the CA keeps with a certificate for `dns_names`
/// (`--serving-cert-secret NAMESPACE/NAME=DNS_NAME[,DNS_NAME...]`).
#[derive(Clone, PartialEq, Eq)]
pub struct ServingSecret {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    /// The certificate's names, in order; at least one.
    pub dns_names: Vec<DnsName>,
}

impl fmt::Debug for ServingSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} for ", self.namespace, self.name)?;
        f.debug_list().entries(&self.dns_names).finish()
    }
}

impl FromStr for ServingSecret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("{s:?}: {why} (expected NAMESPACE/NAME=DNS_NAME[,DNS_NAME...])");
        let (object, names) = s.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (namespace, name) = object
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("no '/' between namespace and name"))?;
        if !is_label(namespace) {
            return Err(bad("the namespace is not a lowercase DNS label"));
        }
        if !is_subdomain(name) {
            return Err(bad("the Secret name is not a lowercase DNS subdomain"));
        }
        let mut dns_names = Vec::new();
        for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let n = DnsName::parse(n).map_err(|e| bad(&e.to_string()))?;
            if !dns_names.contains(&n) {
                dns_names.push(n);
            }
        }
        if dns_names.is_empty() {
            return Err(bad("no DNS name"));
        }
        Ok(ServingSecret {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            dns_names,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[DnsName]) -> Vec<&str> {
        list.iter().map(DnsName::as_str).collect()
    }

    #[test]
    fn citadel_webhook_and_custom_names() {
        let custom = vec![
            "istio-pilot-service-account.istio-system:istio-pilot.istio-system".to_owned(),
            "istio-pilot-service-account.istio-system:pilot.example.com".to_owned(),
            "a.b.web:web.example.com".to_owned(),
        ];
        let map = identity_dns_names("istio-system", true, &custom).unwrap();
        let get = |ns: &str, sa: &str| names(&map[&(ns.to_owned(), sa.to_owned())]);
        assert_eq!(
            get("istio-system", "istio-sidecar-injector-service-account"),
            [
                "istio-sidecar-injector.istio-system.svc",
                "istio-sidecar-injector.istio-system"
            ]
        );
        assert_eq!(
            get("istio-system", "istio-galley-service-account"),
            ["istio-galley.istio-system.svc", "istio-galley.istio-system"]
        );
        assert_eq!(
            get("istio-system", "istio-pilot-service-account"),
            ["istio-pilot.istio-system", "pilot.example.com"]
        );
        // The service account may contain dots; the namespace may not.
        assert_eq!(get("web", "a.b"), ["web.example.com"]);
        assert_eq!(map.len(), 4);

        let without = identity_dns_names("istio-system", false, &custom[..1]).unwrap();
        assert_eq!(without.len(), 1, "custom names without the webhook names");
    }

    #[test]
    fn bad_custom_names_are_refused_with_the_entry() {
        for bad in [
            "no-colon",
            "nonamespace:a.example",
            "sa.ns:*.example",
            "sa.NS:a.example",
            "sa.ns:",
        ] {
            let err = identity_dns_names("istio-system", true, &[bad.to_owned()]).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn serving_secret_spec() {
        let s: ServingSecret =
            "istio-system/istiod-tls=istiod.istio-system.svc, istiod-remote.istio-system.svc"
                .parse()
                .unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.name.as_str()),
            ("istio-system", "istiod-tls")
        );
        assert_eq!(
            names(&s.dns_names),
            ["istiod.istio-system.svc", "istiod-remote.istio-system.svc"]
        );
        for bad in [
            "istiod-tls=istiod.istio-system.svc",
            "istio-system/istiod-tls",
            "istio-system/istiod-tls=",
            "Istio/istiod-tls=a.svc",
            "a.b/istiod-tls=a.svc",
            "istio-system/Istiod=a.svc",
            "istio-system/istiod-tls=*.svc",
        ] {
            assert!(bad.parse::<ServingSecret>().is_err(), "{bad:?} accepted");
        }
    }
}
