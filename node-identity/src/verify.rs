//! Checks on the CA's answer before anything is published: a wrong answer must never
//! replace good files.

use std::sync::Arc;

use ca_core::SpiffeId;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

/// Why an answer was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    /// The chain is empty or not PEM.
    #[error("the CA's answer is not a certificate chain: {0}")]
    Malformed(String),
    /// The leaf does not chain to a root we trust.
    #[error("the CA's certificate does not chain to a trusted root: {0}")]
    Untrusted(String),
    /// The leaf names another identity.
    #[error("the CA issued {got} but this machine is {expected}")]
    WrongIdentity {
        /// Expected SPIFFE ID.
        expected: String,
        /// What the certificate says.
        got: String,
    },
    /// The leaf certifies another key.
    #[error("the CA's certificate is for a different public key than the one we sent")]
    KeyMismatch,
    /// Validity makes no sense.
    #[error("the CA's certificate has an unusable validity: {0}")]
    Validity(String),
}

/// A verified answer, ready to publish.
#[derive(Debug)]
pub struct Verified {
    /// Leaf then CA chain, PEM.
    pub chain_pem: String,
    /// Trust bundle to publish, PEM (the root the answer chained to first).
    pub roots_pem: String,
    /// Leaf serial.
    pub serial: String,
    /// The SPIFFE ID in the leaf.
    pub identity: String,
    /// Validity.
    pub not_before: OffsetDateTime,
    /// Validity.
    pub not_after: OffsetDateTime,
}

/// Verifies `chain` (PEM per element, leaf first) against `trusted_roots`.
pub fn verify_answer(
    chain: &[String],
    trusted_roots: &[CertificateDer<'static>],
    expected: Option<&SpiffeId>,
    spki_der: &[u8],
    requested_ttl: std::time::Duration,
    now: OffsetDateTime,
) -> Result<Verified, AnswerError> {
    let certs: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|pem| ca_core::pem::parse_certificates(pem.as_bytes()).map(|mut v| v.remove(0)))
        .collect::<Result<_, _>>()
        .map_err(AnswerError::Malformed)?;
    let leaf = certs
        .first()
        .ok_or_else(|| AnswerError::Malformed("empty chain".into()))?;
    let facts = ca_core::x509::inspect(leaf).map_err(AnswerError::Malformed)?;

    let mut store = RootCertStore::empty();
    for r in trusted_roots {
        store
            .add(r.clone())
            .map_err(|e| AnswerError::Untrusted(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| AnswerError::Untrusted(e.to_string()))?;
    verifier
        .verify_client_cert(leaf, &certs[1..], UnixTime::now())
        .map_err(|e| AnswerError::Untrusted(e.to_string()))?;

    let identity = facts.spiffe_id();
    let got = identity
        .as_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| format!("{:?}", facts.uri_sans));
    match (expected, &identity) {
        (Some(e), _) if got != e.as_str() => {
            return Err(AnswerError::WrongIdentity {
                expected: e.to_string(),
                got,
            });
        }
        (None, None) => {
            return Err(AnswerError::WrongIdentity {
                expected: "a SPIFFE ID".into(),
                got,
            });
        }
        _ => {}
    }
    if facts.spki_der != spki_der {
        return Err(AnswerError::KeyMismatch);
    }
    let skew = time::Duration::minutes(5);
    if facts.not_before > now + skew || facts.not_after <= now {
        return Err(AnswerError::Validity(format!(
            "{} to {}",
            facts.not_before, facts.not_after
        )));
    }
    let granted = facts.not_after - now;
    let allowed = time::Duration::try_from(requested_ttl).unwrap_or(time::Duration::MAX) + skew;
    if granted > allowed {
        return Err(AnswerError::Validity(format!(
            "valid for {granted}, more than the {requested_ttl:?} asked for"
        )));
    }

    // Publish the root this answer chained to first, then the other trusted roots.
    let root = certs.last().filter(|c| trusted_roots.contains(c)).cloned();
    let mut roots: Vec<&CertificateDer<'static>> = root.iter().collect();
    roots.extend(trusted_roots.iter().filter(|r| Some(*r) != root.as_ref()));
    Ok(Verified {
        chain_pem: chain.concat(),
        roots_pem: roots.iter().map(|r| ca_core::pem::certificate(r)).collect(),
        serial: facts.serial,
        identity: got,
        not_before: facts.not_before,
        not_after: facts.not_after,
    })
}
