//! Statements the CA signs that are not certificates: the audit store's checkpoints.
//!
//! A statement's signature covers a fixed context label before the body, so no
//! signature over a statement can be passed off as one over a certificate (or the
//! reverse), whatever the body holds. Verification needs only the CA certificate.

use der::Decode;
use ring::signature as sig;
use spki::SubjectPublicKeyInfoRef;

use crate::authority::CertificateAuthority;
use crate::csr::{KeyKind, classify_key};
use crate::error::IssueError;

/// What the signature covers before the body.
const CONTEXT: &[u8] = b"istio-ca-rs signed statement v1\0";

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    [CONTEXT, body].concat()
}

impl CertificateAuthority {
    /// Signs `body` with the CA key.
    pub fn sign_statement(&self, body: &[u8]) -> Result<Vec<u8>, IssueError> {
        rcgen::SigningKey::sign(self.signer(), &signed_bytes(body))
            .map_err(|e| IssueError::Internal(format!("signing a statement: {e}")))
    }
}

/// Why a statement did not verify.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// The certificate could not be read.
    #[error("the CA certificate cannot be read: {0}")]
    Certificate(String),
    /// The signature is not the CA's over this body.
    #[error("the signature does not verify with this CA certificate")]
    BadSignature,
}

/// Checks that `signature` is the key of `ca_cert_der`'s signature over `body`.
pub fn verify_statement(
    ca_cert_der: &[u8],
    body: &[u8],
    signature: &[u8],
) -> Result<(), StatementError> {
    verify_signed(ca_cert_der, &signed_bytes(body), signature)
}

/// Whether `cert_der` carries a signature by `ca_cert_der`'s key, made the way this CA
/// signs (ownership of a certificate found in the cluster, not path validation).
pub fn is_signed_by(ca_cert_der: &[u8], cert_der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return false;
    };
    verify_signed(
        ca_cert_der,
        cert.tbs_certificate.as_ref(),
        &cert.signature_value.data,
    )
    .is_ok()
}

fn verify_signed(
    ca_cert_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), StatementError> {
    let facts = crate::x509::inspect(ca_cert_der)
        .map_err(|e| StatementError::Certificate(e.to_string()))?;
    let spki = SubjectPublicKeyInfoRef::from_der(&facts.spki_der)
        .map_err(|e| StatementError::Certificate(e.to_string()))?;
    let key = classify_key(&spki).map_err(|e| StatementError::Certificate(e.to_string()))?;
    // The algorithms rcgen signs with for each key type.
    let alg: &'static dyn sig::VerificationAlgorithm = match key.kind {
        KeyKind::EcdsaP256 => &sig::ECDSA_P256_SHA256_ASN1,
        KeyKind::EcdsaP384 => &sig::ECDSA_P384_SHA384_ASN1,
        KeyKind::Rsa(_) => &sig::RSA_PKCS1_2048_8192_SHA256,
    };
    sig::UnparsedPublicKey::new(alg, key.raw())
        .verify(message, signature)
        .map_err(|_| StatementError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyAlgorithm;

    #[test]
    fn statements_verify_with_the_ca_certificate_only() {
        for alg in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::EcdsaP384,
            KeyAlgorithm::Rsa(2048),
        ] {
            let ca = CertificateAuthority::new_self_signed_root(
                alg.generate().unwrap(),
                "cluster.local",
                time::OffsetDateTime::now_utc(),
                std::time::Duration::from_secs(86400),
            )
            .unwrap();
            let body = br#"{"chains":[]}"#;
            let signature = ca.sign_statement(body).unwrap();
            verify_statement(ca.cert_der(), body, &signature).unwrap();
            assert!(matches!(
                verify_statement(ca.cert_der(), br#"{"chains":[1]}"#, &signature),
                Err(StatementError::BadSignature)
            ));
            let other = CertificateAuthority::new_self_signed_root(
                alg.generate().unwrap(),
                "cluster.local",
                time::OffsetDateTime::now_utc(),
                std::time::Duration::from_secs(86400),
            )
            .unwrap();
            assert!(verify_statement(other.cert_der(), body, &signature).is_err());
        }
    }

    #[test]
    fn certificate_ownership_is_the_signing_key() {
        let now = time::OffsetDateTime::now_utc();
        let day = std::time::Duration::from_secs(86400);
        let root = || {
            CertificateAuthority::new_self_signed_root(
                KeyAlgorithm::EcdsaP256.generate().unwrap(),
                "cluster.local",
                now,
                day,
            )
            .unwrap()
        };
        let (ca, other) = (root(), root());
        let key = KeyAlgorithm::EcdsaP256.generate().unwrap();
        let public = crate::keys::PublicKey::of_key_pair(&key).unwrap();
        let id = crate::SpiffeId::for_service_account("cluster.local", "ns", "sa").unwrap();
        let leaf = ca.issue_for_key(&public, &id, day / 24, now).unwrap();
        assert!(is_signed_by(ca.cert_der(), &leaf.der));
        assert!(!is_signed_by(other.cert_der(), &leaf.der));
        let mut flipped = leaf.der.clone();
        let at = flipped.len() - 5;
        flipped[at] ^= 1;
        assert!(!is_signed_by(ca.cert_der(), &flipped));
        assert!(!is_signed_by(ca.cert_der(), b"not a certificate"));
    }
}
