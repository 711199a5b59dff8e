//! Public keys taken from requests, and key generation for the CA and its clients.

use std::fmt;

use der::{Decode, Reader, SliceReader, asn1::UintRef};
use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm};

use crate::csr::KeyKind;

/// A requester's public key: the raw `subjectPublicKey` bits and their kind.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// What kind of key this is.
    pub kind: KeyKind,
    raw: Vec<u8>,
}

impl PublicKey {
    pub(crate) fn new(kind: KeyKind, raw: Vec<u8>) -> Result<Self, crate::IssueError> {
        Ok(PublicKey { kind, raw })
    }

    /// The `subjectPublicKey` BIT STRING contents (EC point or PKCS#1 RSAPublicKey).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// DER `SubjectPublicKeyInfo`, as it will appear in the issued certificate.
    pub fn spki_der(&self) -> Vec<u8> {
        self.subject_public_key_info()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PublicKey({}, {} bytes)",
            self.kind.label(),
            self.raw.len()
        )
    }
}

impl PublicKeyData for PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    // rcgen only uses this to write the SPKI algorithm identifier, which for every
    // RSA signature algorithm is `rsaEncryption`; for EC keys it names the curve.
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self.kind {
            KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

/// Size in bits of the modulus of a PKCS#1 `RSAPublicKey`.
pub fn rsa_modulus_bits(pkcs1: &[u8]) -> Result<u32, der::Error> {
    let mut reader = SliceReader::new(pkcs1)?;
    let modulus = reader.sequence(|r| {
        let n = UintRef::decode(r)?;
        let _e = UintRef::decode(r)?;
        Ok::<_, der::Error>(n.as_bytes().to_vec())
    })?;
    reader.finish()?;
    let leading = modulus.first().map_or(0, |b| b.leading_zeros());
    Ok((modulus.len() as u32) * 8 - leading)
}

/// Key algorithms the CA can generate for itself or for exported bundles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256 (the default).
    EcdsaP256,
    /// ECDSA P-384 with SHA-384.
    EcdsaP384,
}

impl KeyAlgorithm {
    /// Parses the names used on the command line.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "p256" | "ecdsa-p256" => Ok(KeyAlgorithm::EcdsaP256),
            "p384" | "ecdsa-p384" => Ok(KeyAlgorithm::EcdsaP384),
            other => Err(format!(
                "unsupported key algorithm {other:?} (use p256 or p384)"
            )),
        }
    }

    /// Generates a fresh key pair.
    pub fn generate(self) -> Result<KeyPair, rcgen::Error> {
        KeyPair::generate_for(match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rsa_modulus_size_ignores_sign_byte() {
        // SEQUENCE { INTEGER 0x00 0x80..(256 bytes) , INTEGER 65537 }
        let mut modulus = vec![0x80u8];
        modulus.extend(std::iter::repeat_n(0x11, 255));
        let mut n = vec![0x02, 0x82, 0x01, 0x01, 0x00];
        n.extend(&modulus);
        let e = [0x02, 0x03, 0x01, 0x00, 0x01];
        let body_len = n.len() + e.len();
        let mut der = vec![0x30, 0x82, (body_len >> 8) as u8, body_len as u8];
        der.extend(n);
        der.extend(e);
        assert_eq!(super::rsa_modulus_bits(&der).unwrap(), 2048);
    }
}
