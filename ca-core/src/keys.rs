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

    /// The public half of a key pair this process generated (no CSR round trip: a
    /// CSR would only sign and then verify what we already know).
    pub fn of_key_pair(key: &KeyPair) -> Result<Self, crate::IssueError> {
        let raw = key.public_key_raw().to_vec();
        let alg = key.algorithm();
        let kind = if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
            KeyKind::EcdsaP256
        } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
            KeyKind::EcdsaP384
        } else if alg == &rcgen::PKCS_RSA_SHA256 {
            let bits =
                rsa_modulus_bits(&raw).map_err(|e| crate::IssueError::Internal(e.to_string()))?;
            KeyKind::Rsa(bits)
        } else {
            return Err(crate::IssueError::UnsupportedKey(
                "key pair algorithm".into(),
            ));
        };
        Ok(PublicKey { kind, raw })
    }

    /// The `subjectPublicKey` BIT STRING contents (EC point or PKCS#1 RSAPublicKey).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// DER `SubjectPublicKeyInfo`, as it will appear in the issued certificate. An EC
    /// key's is a fixed header (algorithm, curve, BIT STRING) before its point; this is
    /// on every issuance, so only RSA keys go through rcgen's general DER writer.
    pub fn spki_der(&self) -> Vec<u8> {
        let header: &[u8] = match self.kind {
            KeyKind::EcdsaP256 if self.raw.len() == 65 => P256_SPKI_HEADER,
            KeyKind::EcdsaP384 if self.raw.len() == 97 => P384_SPKI_HEADER,
            _ => return self.subject_public_key_info(),
        };
        [header, self.raw.as_slice()].concat()
    }
}

/// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) }
/// around an uncompressed 65-byte point.
const P256_SPKI_HEADER: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// The same for secp384r1 and a 97-byte point.
const P384_SPKI_HEADER: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

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

/// Key algorithms this project generates: for the CA itself, exported bundles, identity
/// Secrets and the node agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256 (the default).
    EcdsaP256,
    /// ECDSA P-384 with SHA-384.
    EcdsaP384,
    /// RSA with PKCS#1 v1.5 SHA-256 signatures, modulus of the given size.
    Rsa(usize),
}

impl KeyAlgorithm {
    /// Parses the names used on the command line.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "p256" | "ecdsa-p256" => Ok(KeyAlgorithm::EcdsaP256),
            "p384" | "ecdsa-p384" => Ok(KeyAlgorithm::EcdsaP384),
            "rsa2048" => Ok(KeyAlgorithm::Rsa(2048)),
            "rsa3072" => Ok(KeyAlgorithm::Rsa(3072)),
            "rsa4096" => Ok(KeyAlgorithm::Rsa(4096)),
            other => Err(format!(
                "unsupported key type {other:?} (use p256, p384, rsa2048, rsa3072 or rsa4096)"
            )),
        }
    }

    /// Generates a fresh key pair. RSA generation is slow (hundreds of milliseconds
    /// for 2048 bits, seconds for 4096): it is meant for roots and agents, not hot paths.
    pub fn generate(self) -> Result<KeyPair, rcgen::Error> {
        match self {
            KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyAlgorithm::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyAlgorithm::Rsa(bits) => {
                use rsa::pkcs8::EncodePrivateKey;
                // ring signs with RSA keys but cannot generate them; the rsa crate only
                // generates the key here, and ring makes every signature with it.
                let rejected = |what: &str, e: &dyn std::fmt::Display| {
                    rcgen::Error::RingKeyRejected(format!("RSA key {what}: {e}"))
                };
                let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits)
                    .map_err(|e| rejected("generation", &e))?;
                let der = key.to_pkcs8_der().map_err(|e| rejected("encoding", &e))?;
                let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
                KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
            }
        }
    }
}

/// A private key from PEM, in the forms operators have: PKCS#8 (`PRIVATE KEY`), and
/// PKCS#1 RSA (`RSA PRIVATE KEY`: what Citadel wrote to `istio-ca-secret`, and the
/// form of Istio's sample `cacerts`), converted to PKCS#8 for ring. Other forms get an
/// error that says how to convert them.
pub fn key_pair_from_pem(text: &str) -> Result<KeyPair, String> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::EncodePrivateKey;
    let label = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or("no PEM private key")?;
    match label {
        // The one place rcgen reads PEM keys (clippy.toml refuses it elsewhere).
        #[allow(clippy::disallowed_methods)]
        "PRIVATE KEY" => KeyPair::from_pem(text).map_err(|e| format!("PKCS#8 key: {e}")),
        "RSA PRIVATE KEY" => {
            let key = rsa::PrivateKey::from_pkcs1_pem(text)
                .map_err(|e| format!("PKCS#1 RSA key: {e}"))?;
            let der = key
                .to_pkcs8_der()
                .map_err(|e| format!("PKCS#1 RSA key: {e}"))?;
            let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
            KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| format!("PKCS#1 RSA key: {e}"))
        }
        other => Err(format!(
            "a {other:?} PEM block is not a supported key form (convert it to PKCS#8: openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pkcs8)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::KeyAlgorithm;

    /// The PKCS#1 form Citadel and Istio's sample `cacerts` use loads, and signs as
    /// the same key as its PKCS#8 form; other forms are refused with the way out.
    #[test]
    fn pkcs1_rsa_keys_load_as_pkcs8_does() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048).unwrap();
        let pkcs1 = key.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF).unwrap();
        let pkcs8 = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let a = super::key_pair_from_pem(&pkcs1).unwrap();
        let b = super::key_pair_from_pem(&pkcs8).unwrap();
        assert_eq!(a.subject_public_key_info(), b.subject_public_key_info());
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&a)
            .unwrap();
        assert!(crate::csr::verify(csr.der()).is_ok());
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n";
        let err = super::key_pair_from_pem(sec1).unwrap_err();
        assert!(err.contains("openssl pkcs8 -topk8"), "{err}");
        assert!(super::key_pair_from_pem("not a key").is_err());
    }
    use rcgen::PublicKeyData;

    #[test]
    fn generated_keys_make_acceptable_csrs() {
        for (name, kind) in [
            ("p256", crate::KeyKind::EcdsaP256),
            ("p384", crate::KeyKind::EcdsaP384),
            ("rsa2048", crate::KeyKind::Rsa(2048)),
        ] {
            let key = KeyAlgorithm::parse(name).unwrap().generate().unwrap();
            let direct = super::PublicKey::of_key_pair(&key).unwrap();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap();
            let verified = crate::csr::verify(csr.der()).unwrap();
            assert_eq!(verified.public_key.kind, kind);
            assert_eq!(
                verified.public_key.spki_der(),
                key.subject_public_key_info()
            );
            assert_eq!(
                direct, verified.public_key,
                "same key without the CSR round trip"
            );
        }
        assert!(KeyAlgorithm::parse("p521").is_err());
    }

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
