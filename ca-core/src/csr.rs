//! PKCS#10 requests: parse, check the self-signature, classify the key.
//!
//! Only the public key leaves this module. Subject, SANs, basic constraints, key usages
//! and any other requested extension are deliberately ignored: the identity comes from
//! the authenticated caller (docs/COMPATIBILITY.md).

use der::asn1::{BitStringRef, ObjectIdentifier};
use der::{Decode, Reader, SliceReader};
use ring::signature as sig;
use spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoRef};

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

const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_RSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const OID_RSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const OID_RSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");

/// The parts of a PKCS#10 request (RFC 2986) that issuance reads, borrowed from its DER.
struct CsrParts<'a> {
    /// `certificationRequestInfo`, exactly as signed.
    info: &'a [u8],
    public_key: SubjectPublicKeyInfoRef<'a>,
    signature_algorithm: ObjectIdentifier,
    signature: BitStringRef<'a>,
}

/// Splits a request into [`CsrParts`] without copying or decoding what issuance ignores.
///
/// The structure is checked strictly (DER, no trailing data, version 1, every field in
/// its place), but the subject and the attributes are only checked to be a SEQUENCE and
/// a `[0]` SET: their contents are never used, and the signature covers them.
fn split(der: &[u8]) -> Result<CsrParts<'_>, der::Error> {
    let mut reader = SliceReader::new(der)?;
    let (info, signature_algorithm, signature) = reader.sequence(|r| {
        let info = r.tlv_bytes()?;
        let algorithm = AlgorithmIdentifierRef::decode(r)?;
        Ok::<_, der::Error>((info, algorithm.oid, BitStringRef::decode(r)?))
    })?;
    reader.finish()?;
    let mut reader = SliceReader::new(info)?;
    let public_key = reader.sequence(|r| {
        if u8::decode(r)? != 0 {
            return Err(der::Error::from(der::Tag::Integer.value_error()));
        }
        der::Tag::peek(r)?.assert_eq(der::Tag::Sequence)?;
        r.tlv_bytes()?; // subject
        let public_key = SubjectPublicKeyInfoRef::decode(r)?;
        let attributes = der::Tag::ContextSpecific {
            constructed: true,
            number: der::TagNumber(0),
        };
        der::Tag::peek(r)?.assert_eq(attributes)?;
        r.tlv_bytes()?;
        Ok(public_key)
    })?;
    reader.finish()?;
    Ok(CsrParts {
        info,
        public_key,
        signature_algorithm,
        signature,
    })
}

/// Parses a CSR given as PEM or DER and verifies it.
pub fn verify(input: &[u8]) -> Result<VerifiedCsr, IssueError> {
    let pem_der;
    let der = if input.first() == Some(&0x30) {
        input
    } else {
        pem_der = crate::pem::parse_csr(input).map_err(IssueError::MalformedCsr)?;
        pem_der.as_slice()
    };
    let csr = split(der).map_err(|e| IssueError::MalformedCsr(e.to_string()))?;
    let public_key = classify_key(&csr.public_key)?;
    let signature = csr
        .signature
        .as_bytes()
        .ok_or_else(|| IssueError::MalformedCsr("signature has unused bits".into()))?;
    let alg = verification_algorithm(&csr.signature_algorithm, public_key.kind)?;
    sig::UnparsedPublicKey::new(alg, public_key.raw())
        .verify(csr.info, signature)
        .map_err(|_| IssueError::BadCsrSignature)?;
    Ok(VerifiedCsr { public_key })
}

/// The exact bytes of the first element of a signed structure (a CSR's
/// `certificationRequestInfo`, a certificate's `tbsCertificate`), as signed.
#[cfg(test)]
pub(crate) fn raw_info_bytes(der: &[u8]) -> Result<&[u8], IssueError> {
    let malformed = |e: der::Error| IssueError::MalformedCsr(e.to_string());
    let mut reader = SliceReader::new(der).map_err(malformed)?;
    let _outer = der::Header::decode(&mut reader).map_err(malformed)?;
    reader.tlv_bytes().map_err(malformed)
}

pub(crate) fn classify_key(spki: &SubjectPublicKeyInfoRef<'_>) -> Result<PublicKey, IssueError> {
    let raw = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| IssueError::MalformedCsr("public key has unused bits".into()))?
        .to_vec();
    match spki.algorithm.oid {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                .ok_or_else(|| IssueError::UnsupportedKey("EC key without a named curve".into()))?;
            let kind = match curve {
                OID_P256 => KeyKind::EcdsaP256,
                OID_P384 => KeyKind::EcdsaP384,
                OID_P521 => return Err(IssueError::UnsupportedKey("ECDSA P-521".into())),
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
        OID_ED25519 => Err(IssueError::UnsupportedKey("Ed25519".into())),
        other => Err(IssueError::UnsupportedKey(format!("algorithm {other}"))),
    }
}

fn verification_algorithm(
    sig_oid: &ObjectIdentifier,
    key: KeyKind,
) -> Result<&'static dyn sig::VerificationAlgorithm, IssueError> {
    Ok(match (key, *sig_oid) {
        (KeyKind::EcdsaP256, OID_ECDSA_SHA256) => &sig::ECDSA_P256_SHA256_ASN1,
        (KeyKind::EcdsaP256, OID_ECDSA_SHA384) => &sig::ECDSA_P256_SHA384_ASN1,
        (KeyKind::EcdsaP384, OID_ECDSA_SHA256) => &sig::ECDSA_P384_SHA256_ASN1,
        (KeyKind::EcdsaP384, OID_ECDSA_SHA384) => &sig::ECDSA_P384_SHA384_ASN1,
        (KeyKind::Rsa(_), OID_RSA_SHA256) => &sig::RSA_PKCS1_2048_8192_SHA256,
        (KeyKind::Rsa(_), OID_RSA_SHA384) => &sig::RSA_PKCS1_2048_8192_SHA384,
        (KeyKind::Rsa(_), OID_RSA_SHA512) => &sig::RSA_PKCS1_2048_8192_SHA512,
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
    use x509_cert::request::CertReq;

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

    /// A CSR's outer parts and the four elements of its `certificationRequestInfo`.
    fn elements(der: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>, Vec<u8>) {
        let mut outer = SliceReader::new(der).unwrap();
        let (info, alg, sig) = outer
            .sequence(|r| {
                Ok::<_, der::Error>((
                    r.tlv_bytes()?.to_vec(),
                    r.tlv_bytes()?.to_vec(),
                    r.tlv_bytes()?.to_vec(),
                ))
            })
            .unwrap();
        let mut reader = SliceReader::new(&info).unwrap();
        let fields = reader
            .sequence(|r| {
                let mut fields = Vec::new();
                while !r.is_finished() {
                    fields.push(r.tlv_bytes()?.to_vec());
                }
                Ok::<_, der::Error>(fields)
            })
            .unwrap();
        (fields, alg, sig)
    }

    fn assemble(fields: &[Vec<u8>], alg: &[u8], sig: &[u8]) -> Vec<u8> {
        let mut info = Vec::new();
        crate::leaf::tlv(&mut info, 0x30, &fields.concat());
        let mut csr = Vec::new();
        crate::leaf::tlv(&mut csr, 0x30, &[info, alg.to_vec(), sig.to_vec()].concat());
        csr
    }

    #[test]
    fn refuses_requests_that_are_not_well_formed_pkcs10() {
        let (_, der) = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256);
        let (fields, alg, sig) = elements(&der);
        assert_eq!(fields.len(), 4, "version, subject, key, attributes");
        assert_eq!(
            assemble(&fields, &alg, &sig),
            der,
            "the test rebuilds faithfully"
        );

        let malformed = |bytes: &[u8], why: &str| {
            assert!(
                matches!(verify(bytes), Err(IssueError::MalformedCsr(_))),
                "{why}: {:?}",
                verify(bytes)
            );
        };
        let mut trailing = der.clone();
        trailing.push(0);
        malformed(&trailing, "data after the request");

        let mut v2 = fields.clone();
        v2[0] = vec![0x02, 0x01, 0x01];
        malformed(&assemble(&v2, &alg, &sig), "version 2");

        malformed(&assemble(&fields[..3], &alg, &sig), "no attributes field");

        let mut extra = fields.clone();
        extra.push(vec![0x05, 0x00]);
        malformed(
            &assemble(&extra, &alg, &sig),
            "an element after the attributes",
        );

        let mut subject = fields.clone();
        subject[1] = vec![0x05, 0x00];
        malformed(
            &assemble(&subject, &alg, &sig),
            "a subject that is not a Name",
        );

        malformed(&assemble(&fields, &alg, &[]), "no signature");
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
