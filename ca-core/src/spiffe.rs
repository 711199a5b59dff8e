//! SPIFFE identities of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

/// A workload identity. Constructed only through validation, so holding one means the
/// string is a well-formed Istio-style SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    trust_domain_len: usize,
    namespace: String,
    service_account: String,
}

/// Why a string is not an acceptable SPIFFE ID or name.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SpiffeIdError {
    /// Not of the form `spiffe://td/ns/NS/sa/SA`.
    #[error("not an Istio SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>): {0:?}")]
    Shape(String),
    /// A component has characters or a length Kubernetes would not allow.
    #[error(
        "invalid {what} {value:?}: use lowercase letters, digits, '-' and '.', at most 253 characters"
    )]
    Component {
        /// Which component.
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

fn check_component(what: &'static str, value: &str, extra: &[u8]) -> Result<(), SpiffeIdError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b == b'-'
                || b == b'.'
                || extra.contains(&b)
        })
        && !value.starts_with(['-', '.'])
        && !value.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::Component {
            what,
            value: value.to_owned(),
        })
    }
}

/// Validates a trust domain name (`cluster.local`, `example.org`).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    check_component("trust domain", td, b"_")
}

impl SpiffeId {
    /// Builds the identity of a Kubernetes service account.
    pub fn for_service_account(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        check_component("namespace", namespace, b"")?;
        check_component("service account", service_account, b"")?;
        Ok(SpiffeId {
            uri: format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
            trust_domain_len: trust_domain.len(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://td/ns/NS/sa/SA`.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        let shape = || SpiffeIdError::Shape(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(shape)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(shape());
        };
        Self::for_service_account(td, ns, sa)
    }

    /// The URI form, as it appears in the certificate's URI SAN.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len().."spiffe://".len() + self.trust_domain_len]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_istio_identity() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/vm/sa/mysqldb").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "vm");
        assert_eq!(id.service_account(), "mysqldb");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/vm/sa/mysqldb");
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "spiffe://cluster.local/ns/vm",
            "spiffe://cluster.local/ns/vm/sa/db/extra",
            "https://cluster.local/ns/vm/sa/db",
            "spiffe://cluster.local/ns/VM/sa/db",
            "spiffe://cluster.local/ns//sa/db",
            "spiffe://cluster.local/ns/-x/sa/db",
            "spiffe:///ns/a/sa/b",
            // Non-ASCII: the certificate's URI SAN is an IA5String.
            "spiffe://cluster.local/ns/vm/sa/d\u{e9}b",
            "spiffe://clust\u{e9}r.local/ns/vm/sa/db",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
