//! DNS names an operator configures for certificates (never taken from a caller).

use std::fmt;

/// A DNS name fit for a certificate's dNSName SAN: lowercase letters, digits and
/// hyphens in dot-separated labels of 1 to 63 characters, no label starting or ending
/// with a hyphen, a last label that is not all digits, at most 253 characters, no
/// trailing dot and no wildcard (RFC 1123, RFC 5280 §4.2.1.6). Uppercase is folded to lowercase.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsName(String);

/// Why a string is not a [`DnsName`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not a DNS name: {why}")]
pub struct DnsNameError {
    name: String,
    why: &'static str,
}

impl DnsName {
    /// Checks `name`, folding it to lowercase.
    pub fn parse(name: &str) -> Result<Self, DnsNameError> {
        let fail = |why| {
            Err(DnsNameError {
                name: name.chars().take(260).collect(),
                why,
            })
        };
        if name.is_empty() {
            return fail("empty");
        }
        if name.len() > 253 {
            return fail("longer than 253 characters");
        }
        let lower = name.to_ascii_lowercase();
        for label in lower.split('.') {
            if label.is_empty() {
                return fail("an empty label (two dots, or a dot at an end)");
            }
            if label.len() > 63 {
                return fail("a label longer than 63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return fail("only letters, digits, hyphens and dots are allowed");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return fail("a label starts or ends with a hyphen");
            }
        }
        if lower
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return fail("its last label is all digits (an IP address belongs in an IP SAN)");
        }
        Ok(DnsName(lower))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DnsName({})", self.0)
    }
}

/// Splits a list of host names and IP addresses (a `--server-names` value) into DNS
/// names and addresses; an entry that is neither is an error.
pub fn names_and_addresses<S: AsRef<str>>(
    entries: &[S],
) -> Result<(Vec<DnsName>, Vec<std::net::IpAddr>), DnsNameError> {
    let (mut names, mut ips) = (Vec::new(), Vec::new());
    for e in entries {
        match e.as_ref().parse::<std::net::IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(DnsName::parse(e.as_ref())?),
        }
    }
    Ok((names, ips))
}

#[cfg(test)]
mod tests {
    use super::DnsName;

    #[test]
    fn accepts_service_names_and_folds_case() {
        for ok in [
            "istiod.istio-system.svc",
            "istio-sidecar-injector.istio-system",
            "a",
            "x-1.example.com",
        ] {
            assert_eq!(DnsName::parse(ok).unwrap().as_str(), ok);
        }
        assert_eq!(
            DnsName::parse("Istiod.Istio-System.SVC").unwrap().as_str(),
            "istiod.istio-system.svc"
        );
    }

    #[test]
    fn refuses_what_is_not_a_host_name() {
        let long_label = format!("{}.svc", "a".repeat(64));
        let long_name = vec!["a".repeat(63); 5].join(".");
        for bad in [
            "",
            ".",
            "a..b",
            "a.",
            ".a",
            "*.example.com",
            "-a.example",
            "a-.example",
            "a_b.example",
            "a b",
            "spiffe://cluster.local/ns/a/sa/b",
            "10.0.0.1:443",
            "10.0.0.1",
            "é.example",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(DnsName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
