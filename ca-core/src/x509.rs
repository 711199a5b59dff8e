//! Read-only inspection of certificates: what the CA re-checks before a certificate
//! leaves, what authenticators read from client certificates, what the agent checks.

use time::OffsetDateTime;

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
    /// Every DNS-name SAN, in order.
    pub dns_sans: Vec<String>,
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
    /// Extended key usage OIDs, dotted, sorted, each once: a set, so that both
    /// certificate readers agree whatever order a certificate lists them in.
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
///
/// The parser is x509-parser, which borrows from the input: this runs on every
/// issuance (the re-check) and on every new client certificate, and x509-cert's owned
/// types made it three times slower. It is also not the DER writer that built our
/// leaves (`crate::leaf`), which is the point of a re-check.
pub fn inspect(der: &[u8]) -> Result<CertFacts, String> {
    use x509_parser::extensions::{
        BasicConstraints, ExtendedKeyUsage, GeneralName, KeyUsage, SubjectAlternativeName,
    };
    use x509_parser::nom::Parser;
    use x509_parser::oid_registry::{
        OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
        OID_X509_EXT_SUBJECT_ALT_NAME,
    };
    use x509_parser::prelude::{FromDer, X509CertificateParser};
    // Extensions are parsed below, only those the facts come from: the deep parse
    // also decoded key identifiers and built a map of every extension.
    let (rest, cert) = X509CertificateParser::new()
        .with_deep_parse_extensions(false)
        .parse(der)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    if !rest.is_empty() {
        return Err("certificate does not parse: trailing data".into());
    }
    let tbs = &cert.tbs_certificate;
    let to_offset = |t: x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| e.to_string())
    };
    let mut facts = CertFacts {
        serial: normalise_serial(&hex(tbs.raw_serial())),
        not_before: to_offset(tbs.validity.not_before)?,
        not_after: to_offset(tbs.validity.not_after)?,
        uri_sans: Vec::new(),
        dns_sans: Vec::new(),
        san_count: 0,
        san_critical: false,
        subject_empty: tbs.subject.iter().next().is_none(),
        is_ca: false,
        ku_digital_signature: false,
        ku_key_encipherment: false,
        ku_ca_usages: false,
        ekus: Vec::new(),
        spki_der: tbs.subject_pki.raw.to_vec(),
        subject_der: tbs.subject.as_raw().to_vec(),
        issuer_der: tbs.issuer.as_raw().to_vec(),
    };
    /// The whole extension value as `T`, or why not.
    fn value<'a, T: FromDer<'a, x509_parser::error::X509Error>>(
        ext: &x509_parser::extensions::X509Extension<'a>,
    ) -> Result<T, String> {
        match T::from_der(ext.value) {
            Ok(([], parsed)) => Ok(parsed),
            Ok(_) => Err(format!("bad extension {}: trailing data", ext.oid)),
            Err(e) => Err(format!("bad extension {}: {e}", ext.oid)),
        }
    }
    // RFC 5280 §4.2: an extension appears at most once. A second SAN would be one
    // that this check never read and a relying party might.
    let extensions = tbs.extensions();
    for (i, ext) in extensions.iter().enumerate() {
        if extensions[..i].iter().any(|e| e.oid == ext.oid) {
            return Err(format!("certificate repeats extension {}", ext.oid));
        }
        if ext.oid == OID_X509_EXT_SUBJECT_ALT_NAME {
            let san: SubjectAlternativeName = value(ext)?;
            facts.san_critical = ext.critical;
            facts.san_count = san.general_names.len();
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => facts.uri_sans.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => facts.dns_sans.push((*dns).to_owned()),
                    _ => {}
                }
            }
        } else if ext.oid == OID_X509_EXT_BASIC_CONSTRAINTS {
            facts.is_ca = value::<BasicConstraints>(ext)?.ca;
        } else if ext.oid == OID_X509_EXT_KEY_USAGE {
            let ku: KeyUsage = value(ext)?;
            facts.ku_digital_signature = ku.digital_signature();
            facts.ku_key_encipherment = ku.key_encipherment();
            facts.ku_ca_usages = ku.key_cert_sign() || ku.crl_sign();
        } else if ext.oid == OID_X509_EXT_EXTENDED_KEY_USAGE {
            let eku: ExtendedKeyUsage = value(ext)?;
            let known = [
                (eku.any, "2.5.29.37.0"),
                (eku.server_auth, EKU_SERVER_AUTH),
                (eku.client_auth, EKU_CLIENT_AUTH),
                (eku.code_signing, "1.3.6.1.5.5.7.3.3"),
                (eku.email_protection, "1.3.6.1.5.5.7.3.4"),
                (eku.time_stamping, "1.3.6.1.5.5.7.3.8"),
                (eku.ocsp_signing, "1.3.6.1.5.5.7.3.9"),
            ];
            facts.ekus = known
                .into_iter()
                .filter(|(present, _)| *present)
                .map(|(_, oid)| oid.to_owned())
                // Written by the re-check's reader: x509-parser prints a first
                // subidentifier of 80 or more wrongly (X.690 8.19.4: it is 2.(n-80)).
                .chain(
                    eku.other
                        .iter()
                        .map(|oid| crate::reread::dotted(oid.as_bytes())),
                )
                .collect();
            facts.ekus.sort();
            facts.ekus.dedup();
        }
    }
    Ok(facts)
}

#[cfg(test)]
pub(crate) mod tests {
    use der::{Decode, Encode};
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::{BasicConstraints as Bc, ExtendedKeyUsage, KeyUsage};

    /// The same facts read with x509-cert, a second parser.
    pub(crate) fn facts_by_x509_cert(der: &[u8]) -> super::CertFacts {
        let cert = x509_cert::Certificate::from_der(der).unwrap();
        let tbs = cert.tbs_certificate();
        let time = |t: &x509_cert::time::Time| {
            super::OffsetDateTime::from_unix_timestamp(t.to_unix_duration().as_secs() as i64)
                .unwrap()
        };
        let mut facts = super::CertFacts {
            serial: super::normalise_serial(&super::hex(tbs.serial_number().as_bytes())),
            not_before: time(&tbs.validity().not_before),
            not_after: time(&tbs.validity().not_after),
            uri_sans: Vec::new(),
            dns_sans: Vec::new(),
            san_count: 0,
            san_critical: false,
            subject_empty: tbs.subject().is_empty(),
            is_ca: false,
            ku_digital_signature: false,
            ku_key_encipherment: false,
            ku_ca_usages: false,
            ekus: Vec::new(),
            spki_der: tbs.subject_public_key_info().to_der().unwrap(),
            subject_der: tbs.subject().to_der().unwrap(),
            issuer_der: tbs.issuer().to_der().unwrap(),
        };
        if let Some((critical, san)) = tbs.get_extension::<SubjectAltName>().unwrap() {
            facts.san_critical = critical;
            facts.san_count = san.0.len();
            for name in san.0 {
                match name {
                    GeneralName::UniformResourceIdentifier(uri) => {
                        facts.uri_sans.push(uri.to_string())
                    }
                    GeneralName::DnsName(dns) => facts.dns_sans.push(dns.to_string()),
                    _ => {}
                }
            }
        }
        if let Some((_, bc)) = tbs.get_extension::<Bc>().unwrap() {
            facts.is_ca = bc.ca;
        }
        if let Some((_, ku)) = tbs.get_extension::<KeyUsage>().unwrap() {
            facts.ku_digital_signature = ku.digital_signature();
            facts.ku_key_encipherment = ku.key_encipherment();
            facts.ku_ca_usages = ku.key_cert_sign() || ku.crl_sign();
        }
        if let Some((_, eku)) = tbs.get_extension::<ExtendedKeyUsage>().unwrap() {
            facts.ekus = eku.0.iter().map(|o| o.to_string()).collect();
        }
        facts
    }

    /// Certificates of every shape the project reads: a leaf-like certificate with
    /// several SANs and key purposes and a validity past 2050, a CA with a path length
    /// and a serial with a leading zero, a bare one, and leaves as the CA issues them
    /// for each key type.
    pub(crate) fn sample_certificates() -> Vec<Vec<u8>> {
        let key = KeyPair::generate().unwrap();
        let mut leafish = CertificateParams::default();
        leafish.subject_alt_names = vec![
            SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap()),
            SanType::DnsName("a.example".try_into().unwrap()),
            SanType::URI("https://second.example/".try_into().unwrap()),
        ];
        leafish.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leafish.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::CodeSigning,
        ];
        leafish.not_after = time::macros::datetime!(2051-02-03 04:05:06 UTC);
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "a CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(2));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.serial_number = Some(vec![0x00, 0x8f, 0x01].into());
        let bare = CertificateParams::default();
        let mut certs: Vec<Vec<u8>> = [leafish, ca, bare]
            .into_iter()
            .map(|p| p.self_signed(&key).unwrap().der().to_vec())
            .collect();
        // Leaves as the CA issues them, for each key type it signs for.
        certs.extend(crate::authority::tests::leaves_of_every_key_type());
        certs
    }

    #[test]
    fn inspect_agrees_with_a_second_parser() {
        let key = KeyPair::generate().unwrap();
        for der in sample_certificates() {
            let facts = super::inspect(&der).unwrap();
            let mut expected = facts_by_x509_cert(&der);
            // x509-parser names the usages it knows first; the set is what counts.
            expected.ekus.sort();
            let mut got = facts.clone();
            got.ekus.sort();
            assert_eq!(got, expected);
        }
        // A CA:true certificate is seen as one, and a leading zero of the serial goes.
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.serial_number = Some(vec![0x00, 0x8f, 0x01].into());
        let facts = super::inspect(ca.self_signed(&key).unwrap().der()).unwrap();
        assert!(facts.is_ca);
        assert_eq!(facts.serial, "8f01");
        assert!(super::inspect(b"\x30\x03\x02\x01\x01").is_err());
        let mut trailing = CertificateParams::default()
            .self_signed(&key)
            .unwrap()
            .der()
            .to_vec();
        trailing.push(0);
        assert!(super::inspect(&trailing).is_err());
    }

    /// Both readers of certificates: the general one, and the re-check's own.
    type Reader = fn(&[u8]) -> Result<super::CertFacts, String>;
    const READERS: [(&str, Reader); 2] =
        [("inspect", super::inspect), ("reread", crate::reread::read)];

    #[test]
    fn a_malformed_fact_extension_is_an_error() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        let der = params.self_signed(&key).unwrap().der().to_vec();
        for (_, read) in READERS {
            assert!(read(&der).is_ok());
        }
        // The first byte of each fact extension's value: SAN, basicConstraints and EKU
        // hold a SEQUENCE, keyUsage a BIT STRING. Retagging it keeps every length intact.
        for (oid, first) in [
            (&[0x55, 0x1d, 0x11][..], 0x30),
            (&[0x55, 0x1d, 0x13], 0x30),
            (&[0x55, 0x1d, 0x0f], 0x03),
            (&[0x55, 0x1d, 0x25], 0x30),
        ] {
            let at = der
                .windows(3)
                .position(|w| w == oid)
                .expect("extension present");
            // OID, then an optional critical BOOLEAN, then the OCTET STRING header.
            let mut i = at + 3;
            if der[i] == 0x01 {
                i += 3;
            }
            assert_eq!(der[i], 0x04);
            let value = i + 2;
            assert_eq!(der[value], first);
            let mut bad = der.clone();
            bad[value] = 0x31;
            for (reader, read) in READERS {
                let err = read(&bad).unwrap_err();
                assert!(err.contains("bad extension"), "{reader} {oid:02x?}: {err}");
            }
        }
    }

    #[test]
    fn a_repeated_extension_is_an_error() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        )];
        let once = params.self_signed(&key).unwrap().der().to_vec();
        // A second SAN, which a relying party might read instead of the first.
        params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &[2, 5, 29, 17],
            // SEQUENCE { [6] "spiffe://x/y" }
            [&[0x30, 0x0e, 0x86, 0x0c][..], b"spiffe://x/y"].concat(),
        )];
        let twice = params.self_signed(&key).unwrap().der().to_vec();
        for (reader, read) in READERS {
            assert!(read(&once).is_ok(), "{reader}");
            let err = read(&twice).unwrap_err();
            assert!(
                err.contains("repeats extension 2.5.29.17"),
                "{reader}: {err}"
            );
        }
    }

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
