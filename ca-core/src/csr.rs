//! PKCS#10 requests: parse, check the self-signature, classify the key.
//!
//! Only the public key leaves this module. Subject, SANs, basic constraints, key usages
//! and any other requested extension are deliberately ignored: the identity comes from
//! the authenticated caller (WIRE.md §3).

use der::{Decode, Reader, SliceReader};
use ring::signature as sig;
use x509_cert::request::CertReq;

use crate::error::IssueError;
use crate::keys::{self, PublicKey};

/// Key types the CA issues for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// ECDSA on NIST P-384.
    EcdsaP384,
    /// RSA with the given modulus size in bits (2048–4096).
    Rsa(u32),
}

impl KeyKind {
    /// Short human name for logs and audit records.
    pub fn label(&self) -> String {
        match self {
            KeyKind::EcdsaP256 => "ecdsa-p256".into(),
            KeyKind::EcdsaP384 => "ecdsa-p384".into(),
            KeyKind::Rsa(bits) => format!("rsa-{bits}"),
        }
    }
}

/// A CSR whose self-signature verified and whose key is acceptable.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// The requester's public key, the only thing we take from the CSR.
    pub public_key: PublicKey,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// Parses a CSR given as PEM or DER and verifies it.
pub fn verify(input: &[u8]) -> Result<VerifiedCsr, IssueError> {
    let der = if input.first() == Some(&0x30) {
        input.to_vec()
    } else {
        crate::pem::parse_csr(input).map_err(IssueError::MalformedCsr)?
    };
    let req = CertReq::from_der(&der).map_err(|e| IssueError::MalformedCsr(e.to_string()))?;
    let public_key = classify_key(&req)?;
    let tbs = raw_info_bytes(&der)?;
    let signature = req
        .signature
        .as_bytes()
        .ok_or_else(|| IssueError::MalformedCsr("signature has unused bits".into()))?;
    let alg = verification_algorithm(&req.algorithm.oid.to_string(), public_key.kind)?;
    sig::UnparsedPublicKey::new(alg, public_key.raw())
        .verify(tbs, signature)
        .map_err(|_| IssueError::BadCsrSignature)?;
    Ok(VerifiedCsr { public_key })
}

/// The exact bytes of the first element of a signed structure (a CSR's
/// `certificationRequestInfo`, a certificate's `tbsCertificate`), as signed.
pub(crate) fn raw_info_bytes(der: &[u8]) -> Result<&[u8], IssueError> {
    let malformed = |e: der::Error| IssueError::MalformedCsr(e.to_string());
    let mut reader = SliceReader::new(der).map_err(malformed)?;
    let _outer = der::Header::decode(&mut reader).map_err(malformed)?;
    reader.tlv_bytes().map_err(malformed)
}

fn classify_key(req: &CertReq) -> Result<PublicKey, IssueError> {
    let spki = &req.info.public_key;
    let raw = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| IssueError::MalformedCsr("public key has unused bits".into()))?
        .to_vec();
    match spki.algorithm.oid.to_string().as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<der::asn1::ObjectIdentifier>().ok())
                .map(|oid| oid.to_string())
                .ok_or_else(|| IssueError::UnsupportedKey("EC key without a named curve".into()))?;
            let kind = match curve.as_str() {
                OID_P256 => KeyKind::EcdsaP256,
                OID_P384 => KeyKind::EcdsaP384,
                "1.3.132.0.35" => return Err(IssueError::UnsupportedKey("ECDSA P-521".into())),
                other => return Err(IssueError::UnsupportedKey(format!("EC curve {other}"))),
            };
            PublicKey::new(kind, raw)
        }
        OID_RSA_ENCRYPTION => {
            let bits = keys::rsa_modulus_bits(&raw)
                .map_err(|e| IssueError::MalformedCsr(format!("RSA public key: {e}")))?;
            if !(2048..=4096).contains(&bits) {
                return Err(IssueError::UnsupportedKey(format!("RSA-{bits}")));
            }
            PublicKey::new(KeyKind::Rsa(bits), raw)
        }
        "1.3.101.112" => Err(IssueError::UnsupportedKey("Ed25519".into())),
        other => Err(IssueError::UnsupportedKey(format!("algorithm {other}"))),
    }
}

fn verification_algorithm(
    sig_oid: &str,
    key: KeyKind,
) -> Result<&'static dyn sig::VerificationAlgorithm, IssueError> {
    Ok(match (key, sig_oid) {
        (KeyKind::EcdsaP256, "1.2.840.10045.4.3.2") => &sig::ECDSA_P256_SHA256_ASN1,
        (KeyKind::EcdsaP256, "1.2.840.10045.4.3.3") => &sig::ECDSA_P256_SHA384_ASN1,
        (KeyKind::EcdsaP384, "1.2.840.10045.4.3.2") => &sig::ECDSA_P384_SHA256_ASN1,
        (KeyKind::EcdsaP384, "1.2.840.10045.4.3.3") => &sig::ECDSA_P384_SHA384_ASN1,
        (KeyKind::Rsa(_), "1.2.840.113549.1.1.11") => &sig::RSA_PKCS1_2048_8192_SHA256,
        (KeyKind::Rsa(_), "1.2.840.113549.1.1.12") => &sig::RSA_PKCS1_2048_8192_SHA384,
        (KeyKind::Rsa(_), "1.2.840.113549.1.1.13") => &sig::RSA_PKCS1_2048_8192_SHA512,
        (kind, oid) => {
            return Err(IssueError::MalformedCsr(format!(
                "signature algorithm {oid} is not accepted for a {} key",
                kind.label()
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Encode;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_for(alg: &'static rcgen::SignatureAlgorithm) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".into()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    #[test]
    fn accepts_p256_and_p384_in_pem_and_der() {
        for (alg, kind) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyKind::EcdsaP256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcdsaP384),
        ] {
            let (key, der) = csr_for(alg);
            let v = verify(&der).unwrap();
            assert_eq!(v.public_key.kind, kind);
            assert_eq!(v.public_key.raw(), key.public_key_raw());
            let pem = crate::pem::csr(&der);
            assert!(verify(pem.as_bytes()).is_ok());
        }
    }

    #[test]
    fn refuses_ed25519_and_garbage() {
        let (_, der) = csr_for(&rcgen::PKCS_ED25519);
        assert!(matches!(verify(&der), Err(IssueError::UnsupportedKey(_))));
        assert!(matches!(
            verify(b"not a csr"),
            Err(IssueError::MalformedCsr(_))
        ));
        assert!(matches!(
            verify(&[0x30, 0x03, 0x02, 0x01, 0x00]),
            Err(IssueError::MalformedCsr(_))
        ));
    }

    #[test]
    fn detects_a_broken_signature() {
        let (_, der) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256);
        let mut req = CertReq::from_der(&der).unwrap();
        // Change the signed content (the subject) but keep the old signature.
        req.info.subject = x509_cert::name::Name::default();
        let tampered = req.to_der().unwrap();
        assert_eq!(verify(&tampered).unwrap_err(), IssueError::BadCsrSignature);
    }
}
