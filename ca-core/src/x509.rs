//! Read-only inspection of certificates: what the CA re-checks before a certificate
//! leaves, what authenticators read from client certificates, what the agent checks.

use der::{Decode, Encode};
use time::OffsetDateTime;
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName};

/// `id-kp-serverAuth`.
pub const EKU_SERVER_AUTH: &str = "1.3.6.1.5.5.7.3.1";
/// `id-kp-clientAuth`.
pub const EKU_CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";

/// The facts about one certificate that this project makes decisions on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// Serial number as lowercase hex without separators.
    pub serial: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Every URI SAN, in order.
    pub uri_sans: Vec<String>,
    /// How many SAN entries there are of any kind.
    pub san_count: usize,
    /// Whether the SAN extension is marked critical.
    pub san_critical: bool,
    /// Whether the subject DN is empty.
    pub subject_empty: bool,
    /// `basicConstraints.cA` (false when the extension is absent).
    pub is_ca: bool,
    /// keyUsage digitalSignature.
    pub ku_digital_signature: bool,
    /// keyUsage keyEncipherment.
    pub ku_key_encipherment: bool,
    /// keyUsage keyCertSign or cRLSign.
    pub ku_ca_usages: bool,
    /// Extended key usage OIDs, dotted.
    pub ekus: Vec<String>,
    /// DER `SubjectPublicKeyInfo`.
    pub spki_der: Vec<u8>,
    /// DER of the subject name.
    pub subject_der: Vec<u8>,
    /// DER of the issuer name.
    pub issuer_der: Vec<u8>,
}

impl CertFacts {
    /// The SPIFFE ID, if the certificate carries exactly one URI SAN and it is one.
    pub fn spiffe_id(&self) -> Option<crate::SpiffeId> {
        match self.uri_sans.as_slice() {
            [one] => crate::SpiffeId::parse(one).ok(),
            _ => None,
        }
    }
}

fn to_offset(t: &x509_cert::time::Time) -> Result<OffsetDateTime, String> {
    let secs = t.to_unix_duration().as_secs();
    OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|e| e.to_string())
}

/// Lowercase hex of bytes (on every issuance path: serials and digests).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Normalises a serial typed by a person: drops colons and leading zeros, lowercases.
pub fn normalise_serial(input: &str) -> String {
    let s: String = input
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let trimmed = s.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// Parses a serial typed by a person (hex, colons allowed) into the stored form.
pub fn parse_serial(input: &str) -> Result<String, String> {
    let trimmed = input.trim();
    if trimmed.is_empty() || !trimmed.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
        return Err(format!(
            "{input:?} is not a certificate serial: use the hex form printed by `ca-server audit list` or `openssl x509 -serial`"
        ));
    }
    Ok(normalise_serial(trimmed))
}

/// SHA-256 of bytes, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Parses a DER certificate and extracts its [`CertFacts`].
pub fn inspect(der: &[u8]) -> Result<CertFacts, String> {
    let cert =
        Certificate::from_der(der).map_err(|e| format!("certificate does not parse: {e}"))?;
    let tbs = cert.tbs_certificate();
    let enc = |e: der::Error| e.to_string();
    let serial = normalise_serial(&hex(tbs.serial_number().as_bytes()));
    let mut facts = CertFacts {
        serial,
        not_before: to_offset(&tbs.validity().not_before)?,
        not_after: to_offset(&tbs.validity().not_after)?,
        uri_sans: Vec::new(),
        san_count: 0,
        san_critical: false,
        subject_empty: tbs.subject().is_empty(),
        is_ca: false,
        ku_digital_signature: false,
        ku_key_encipherment: false,
        ku_ca_usages: false,
        ekus: Vec::new(),
        spki_der: tbs.subject_public_key_info().to_der().map_err(enc)?,
        subject_der: tbs.subject().to_der().map_err(enc)?,
        issuer_der: tbs.issuer().to_der().map_err(enc)?,
    };
    let ext_err = |e: der::Error| format!("bad extension: {e}");
    if let Some((critical, san)) = tbs.get_extension::<SubjectAltName>().map_err(ext_err)? {
        facts.san_critical = critical;
        facts.san_count = san.0.len();
        for name in san.0 {
            if let GeneralName::UniformResourceIdentifier(uri) = name {
                facts.uri_sans.push(uri.to_string());
            }
        }
    }
    if let Some((_, bc)) = tbs.get_extension::<BasicConstraints>().map_err(ext_err)? {
        facts.is_ca = bc.ca;
    }
    if let Some((_, ku)) = tbs.get_extension::<KeyUsage>().map_err(ext_err)? {
        facts.ku_digital_signature = ku.digital_signature();
        facts.ku_key_encipherment = ku.key_encipherment();
        facts.ku_ca_usages = ku.key_cert_sign() || ku.crl_sign();
    }
    if let Some((_, eku)) = tbs.get_extension::<ExtendedKeyUsage>().map_err(ext_err)? {
        facts.ekus = eku.0.iter().map(|o| o.to_string()).collect();
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(super::hex(&[]), "");
    }

    #[test]
    fn serial_normalisation() {
        assert_eq!(super::normalise_serial("00:AB:cd"), "abcd");
        assert_eq!(super::normalise_serial("0"), "0");
        assert_eq!(super::parse_serial(" 0A:bc ").unwrap(), "abc");
        assert!(super::parse_serial("spiffe://x").is_err());
        assert!(super::parse_serial("").is_err());
    }
}
