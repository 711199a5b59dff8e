//! Reads back a certificate this CA has just signed, for the re-check before it leaves.
//!
//! [`crate::x509::inspect`] reads any certificate with x509-parser; on the issuance path
//! that general parse was the largest cost after the signatures (about 4% of the
//! server's CPU per certificate, docs/BENCHMARKS.md). This reader walks the DER
//! directly: single-byte tags (all X.509 uses), definite minimal lengths, every field
//! of RFC 5280 §4.1 in its place, nothing left over at any level, each extension at
//! most once, and the four extensions the facts come from decoded whole. It shares no
//! code with the writer in [`crate::leaf`], and the tests hold it to
//! [`crate::x509::inspect`] on every kind of certificate and on damaged ones.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use crate::x509::{CertFacts, EKU_CLIENT_AUTH, EKU_SERVER_AUTH, hex, normalise_serial};

const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const VERSION: u8 = 0xa0;
const ISSUER_UID: u8 = 0x81;
const SUBJECT_UID: u8 = 0x82;
const EXTENSIONS: u8 = 0xa3;
const SAN_URI: u8 = 0x86;
/// GeneralName dNSName, `[2] IA5String`.
const SAN_DNS: u8 = 0x82;

const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
const OID_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
const OID_EKU: &[u8] = &[0x55, 0x1d, 0x25];
const OID_KP_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const OID_KP_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// A cursor over DER elements.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(input: &'a [u8]) -> Self {
        Der { rest: input }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next element: its tag, its contents, and the whole element.
    fn any(&mut self) -> Result<(u8, &'a [u8], &'a [u8]), String> {
        let input = self.rest;
        let (&tag, after_tag) = input.split_first().ok_or("truncated: no tag")?;
        if tag & 0x1f == 0x1f {
            return Err(format!("multi-byte tag {tag:#04x}"));
        }
        let (&first, after_len) = after_tag.split_first().ok_or("truncated: no length")?;
        let (len, contents) = match first {
            0x00..=0x7f => (usize::from(first), after_len),
            0x81..=0x84 => {
                let n = usize::from(first & 0x7f);
                if after_len.len() < n {
                    return Err("truncated length".into());
                }
                let (bytes, contents) = after_len.split_at(n);
                let len = bytes.iter().fold(0usize, |l, b| (l << 8) | usize::from(*b));
                // DER: the shortest form, so no leading zero byte and nothing below 128.
                if bytes[0] == 0 || len < 0x80 {
                    return Err("length not in its shortest form".into());
                }
                (len, contents)
            }
            _ => return Err(format!("unsupported length byte {first:#04x}")),
        };
        if contents.len() < len {
            return Err(format!(
                "truncated: {len} bytes announced, {} left",
                contents.len()
            ));
        }
        let header = input.len() - contents.len();
        self.rest = &contents[len..];
        Ok((tag, &contents[..len], &input[..header + len]))
    }

    /// The contents of the next element, which must carry `tag`.
    fn expect(&mut self, tag: u8, what: &str) -> Result<&'a [u8], String> {
        let (found, contents, _) = self.any()?;
        if found != tag {
            return Err(format!("{what}: tag {found:#04x}, expected {tag:#04x}"));
        }
        Ok(contents)
    }

    /// The next element whole (header included), which must carry `tag`.
    fn expect_whole(&mut self, tag: u8, what: &str) -> Result<&'a [u8], String> {
        let (found, _, whole) = self.any()?;
        if found != tag {
            return Err(format!("{what}: tag {found:#04x}, expected {tag:#04x}"));
        }
        Ok(whole)
    }

    /// The contents of the next element if it carries `tag`.
    fn optional(&mut self, tag: u8, what: &str) -> Result<Option<&'a [u8]>, String> {
        if self.peek() == Some(tag) {
            self.expect(tag, what).map(Some)
        } else {
            Ok(None)
        }
    }

    fn finish(&self, what: &str) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{what}: {} bytes left over", self.rest.len()))
        }
    }

    /// An OBJECT IDENTIFIER's contents, checked to be well formed: every subidentifier
    /// complete and in its shortest form.
    fn oid(&mut self, what: &str) -> Result<&'a [u8], String> {
        let oid = self.expect(OID, what)?;
        let mut starts = true;
        for b in oid {
            if starts && *b == 0x80 {
                return Err(format!(
                    "{what}: OID subidentifier not in its shortest form"
                ));
            }
            starts = b & 0x80 == 0;
        }
        if !starts || oid.is_empty() {
            return Err(format!("{what}: OID truncated"));
        }
        Ok(oid)
    }

    /// A DER BOOLEAN: one byte, 0x00 or 0xff.
    fn boolean(&mut self, what: &str) -> Result<bool, String> {
        match self.expect(BOOLEAN, what)? {
            [0x00] => Ok(false),
            [0xff] => Ok(true),
            _ => Err(format!("{what}: not a DER BOOLEAN")),
        }
    }
}

/// The contents of the only element of `input`, which must carry `tag`.
fn only<'a>(input: &'a [u8], tag: u8, what: &str) -> Result<&'a [u8], String> {
    let mut der = Der::new(input);
    let contents = der.expect(tag, what)?;
    der.finish(what)?;
    Ok(contents)
}

/// Reads a DER certificate into its [`CertFacts`], strictly.
pub fn read(der: &[u8]) -> Result<CertFacts, String> {
    read_certificate(der).map_err(|e| format!("certificate does not parse: {e}"))
}

fn read_certificate(der: &[u8]) -> Result<CertFacts, String> {
    let mut cert = Der::new(only(der, SEQUENCE, "certificate")?);
    let tbs = cert.expect(SEQUENCE, "tbsCertificate")?;
    cert.expect(SEQUENCE, "signatureAlgorithm")?;
    let signature = cert.expect(BIT_STRING, "signatureValue")?;
    if signature.first() != Some(&0) {
        return Err("signatureValue: unused bits".into());
    }
    cert.finish("certificate")?;

    let mut tbs = Der::new(tbs);
    let version = match tbs.optional(VERSION, "version")? {
        None => 0,
        Some(v) => match only(v, INTEGER, "version")? {
            [1] => 1,
            [2] => 2,
            other => return Err(format!("unknown version {other:02x?}")),
        },
    };
    let serial = tbs.expect(INTEGER, "serialNumber")?;
    if serial.is_empty() {
        return Err("serialNumber: empty".into());
    }
    tbs.expect(SEQUENCE, "signature")?;
    let issuer = name(&mut tbs, "issuer")?;
    let mut validity = Der::new(tbs.expect(SEQUENCE, "validity")?);
    let not_before = time(&mut validity, "notBefore")?;
    let not_after = time(&mut validity, "notAfter")?;
    validity.finish("validity")?;
    let subject = name(&mut tbs, "subject")?;
    let spki = tbs.expect_whole(SEQUENCE, "subjectPublicKeyInfo")?;
    let mut key = Der::new(only(spki, SEQUENCE, "subjectPublicKeyInfo")?);
    key.expect(SEQUENCE, "subjectPublicKeyInfo algorithm")?;
    key.expect(BIT_STRING, "subjectPublicKey")?;
    key.finish("subjectPublicKeyInfo")?;
    let mut facts = CertFacts {
        serial: normalise_serial(&hex(serial)),
        not_before,
        not_after,
        uri_sans: Vec::new(),
        dns_sans: Vec::new(),
        san_count: 0,
        san_critical: false,
        // An RDNSequence with no RDN.
        subject_empty: subject == [SEQUENCE, 0x00],
        is_ca: false,
        ku_digital_signature: false,
        ku_key_encipherment: false,
        ku_ca_usages: false,
        ekus: Vec::new(),
        spki_der: spki.to_vec(),
        subject_der: subject.to_vec(),
        issuer_der: issuer.to_vec(),
    };
    tbs.optional(ISSUER_UID, "issuerUniqueID")?;
    tbs.optional(SUBJECT_UID, "subjectUniqueID")?;
    if let Some(extensions) = tbs.optional(EXTENSIONS, "extensions")? {
        if version != 2 {
            return Err("extensions in a certificate that is not version 3".into());
        }
        let mut list = Der::new(only(extensions, SEQUENCE, "extensions")?);
        let mut seen: Vec<&[u8]> = Vec::with_capacity(8);
        while !list.is_empty() {
            let mut ext = Der::new(list.expect(SEQUENCE, "extension")?);
            let oid = ext.oid("extnID")?;
            let critical = match ext.peek() {
                Some(BOOLEAN) => ext.boolean("critical")?,
                _ => false,
            };
            let value = ext.expect(OCTET_STRING, "extnValue")?;
            ext.finish("extension")?;
            if seen.contains(&oid) {
                return Err(format!("repeats extension {}", dotted(oid)));
            }
            seen.push(oid);
            read_extension(&mut facts, oid, critical, value)
                .map_err(|e| format!("bad extension {}: {e}", dotted(oid)))?;
        }
    }
    tbs.finish("tbsCertificate")?;
    Ok(facts)
}

/// A Name (an RDNSequence: SEQUENCE OF SET OF { type OID, value }), whole.
fn name<'a>(der: &mut Der<'a>, what: &str) -> Result<&'a [u8], String> {
    let whole = der.expect_whole(SEQUENCE, what)?;
    let mut rdns = Der::new(only(whole, SEQUENCE, what)?);
    while !rdns.is_empty() {
        let mut rdn = Der::new(rdns.expect(SET, what)?);
        if rdn.is_empty() {
            return Err(format!("{what}: empty RDN"));
        }
        while !rdn.is_empty() {
            let mut attribute = Der::new(rdn.expect(SEQUENCE, what)?);
            attribute.oid(what)?;
            attribute.any()?;
            attribute.finish(what)?;
        }
    }
    Ok(whole)
}

fn read_extension(
    facts: &mut CertFacts,
    oid: &[u8],
    critical: bool,
    value: &[u8],
) -> Result<(), String> {
    match oid {
        OID_SAN => {
            facts.san_critical = critical;
            let mut names = Der::new(only(value, SEQUENCE, "SAN")?);
            while !names.is_empty() {
                let (tag, contents, _) = names.any()?;
                // GeneralName: [0], [3], [4], [5] constructed; [1], [2], [6], [7], [8]
                // primitive (RFC 5280 §4.2.1.6).
                if !matches!(
                    tag,
                    0xa0 | 0x81 | 0x82 | 0xa3 | 0xa4 | 0xa5 | 0x86 | 0x87 | 0x88
                ) {
                    return Err(format!("SAN: not a GeneralName tag {tag:#04x}"));
                }
                facts.san_count += 1;
                if tag == SAN_URI {
                    if !contents.is_ascii() {
                        return Err("URI SAN is not IA5".into());
                    }
                    // ASCII is UTF-8.
                    let uri = std::str::from_utf8(contents).map_err(|e| e.to_string())?;
                    facts.uri_sans.push(uri.to_owned());
                } else if tag == SAN_DNS {
                    if !contents.is_ascii() {
                        return Err("DNS SAN is not IA5".into());
                    }
                    let dns = std::str::from_utf8(contents).map_err(|e| e.to_string())?;
                    facts.dns_sans.push(dns.to_owned());
                }
            }
        }
        OID_BASIC_CONSTRAINTS => {
            let mut bc = Der::new(only(value, SEQUENCE, "basicConstraints")?);
            if bc.peek() == Some(BOOLEAN) {
                facts.is_ca = bc.boolean("cA")?;
            }
            bc.optional(INTEGER, "pathLenConstraint")?;
            bc.finish("basicConstraints")?;
        }
        OID_KEY_USAGE => {
            let bits = only(value, BIT_STRING, "keyUsage")?;
            let (&unused, bytes) = bits.split_first().ok_or("keyUsage: empty")?;
            if unused > 7 || (bytes.is_empty() && unused != 0) {
                return Err("keyUsage: bad unused-bits count".into());
            }
            let bit = |n: usize| bytes.get(n / 8).is_some_and(|b| b & (0x80 >> (n % 8)) != 0);
            facts.ku_digital_signature = bit(0);
            facts.ku_key_encipherment = bit(2);
            facts.ku_ca_usages = bit(5) || bit(6);
        }
        OID_EKU => {
            let mut list = Der::new(only(value, SEQUENCE, "extKeyUsage")?);
            facts.ekus.clear();
            while !list.is_empty() {
                let purpose = list.oid("KeyPurposeId")?;
                facts.ekus.push(match purpose {
                    OID_KP_SERVER_AUTH => EKU_SERVER_AUTH.to_owned(),
                    OID_KP_CLIENT_AUTH => EKU_CLIENT_AUTH.to_owned(),
                    other => dotted(other),
                });
            }
            facts.ekus.sort();
            facts.ekus.dedup();
        }
        // Any other extension: one well-formed element.
        _ => {
            let mut der = Der::new(value);
            der.any()?;
            der.finish("extension value")?;
        }
    }
    Ok(())
}

/// An OID's contents in dotted form (for messages and uncommon key purposes).
pub(crate) fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for b in oid {
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`), as DER requires them.
fn time(der: &mut Der<'_>, what: &str) -> Result<OffsetDateTime, String> {
    let (tag, text, _) = der.any()?;
    let digits = |s: &[u8]| -> Result<u32, String> {
        s.iter().try_fold(0u32, |n, c| match c {
            b'0'..=b'9' => Ok(n * 10 + u32::from(c - b'0')),
            _ => Err(format!("{what}: not a DER time")),
        })
    };
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return Err(format!("{what}: not a DER UTCTime or GeneralizedTime")),
    };
    if rest[10] != b'Z' {
        return Err(format!("{what}: not in UTC"));
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let bad = |e: time::error::ComponentRange| format!("{what}: {e}");
    let month = Month::try_from(field(0)? as u8).map_err(bad)?;
    let date = Date::from_calendar_date(year as i32, month, field(2)? as u8).map_err(bad)?;
    let clock = Time::from_hms(field(4)? as u8, field(6)? as u8, field(8)? as u8).map_err(bad)?;
    Ok(PrimitiveDateTime::new(date, clock).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::read;
    use crate::x509::{EKU_CLIENT_AUTH, EKU_SERVER_AUTH, inspect};

    fn samples() -> Vec<Vec<u8>> {
        crate::x509::tests::sample_certificates()
    }

    /// Facts with the key purposes in one order: x509-parser names the purposes it knows
    /// first, this reader keeps the certificate's order.
    fn sorted(mut facts: crate::x509::CertFacts) -> crate::x509::CertFacts {
        facts.ekus.sort();
        facts
    }

    #[test]
    fn reads_what_the_general_parser_reads() {
        for der in samples() {
            assert_eq!(sorted(read(&der).unwrap()), sorted(inspect(&der).unwrap()));
        }
    }

    #[test]
    fn damage_is_refused_or_read_as_the_general_parser_reads_it() {
        for der in samples() {
            for len in 0..der.len() {
                assert!(read(&der[..len]).is_err(), "truncated to {len}");
            }
            let mut longer = der.clone();
            longer.push(0);
            assert!(read(&longer).is_err(), "trailing byte");
            // Every single-bit flip: never a panic, and never facts that the general
            // parser reads differently (a flip inside a signature or a key is fine).
            for i in 0..der.len() {
                for bit in 0..8 {
                    let mut bad = der.clone();
                    bad[i] ^= 1 << bit;
                    if let (Ok(ours), Ok(theirs)) = (read(&bad), inspect(&bad)) {
                        // Key purposes other than the two the re-check reads may differ:
                        // x509-parser writes an OID whose first arc is 2 with a second
                        // arc of 40 or more wrongly ("4.11" for 2.51).
                        // It also reports a purpose listed twice once.
                        let known = |mut f: crate::x509::CertFacts| {
                            f.ekus
                                .retain(|e| e == EKU_SERVER_AUTH || e == EKU_CLIENT_AUTH);
                            f.ekus.sort();
                            f.ekus.dedup();
                            f
                        };
                        assert_eq!(known(ours), known(theirs), "byte {i} bit {bit}");
                    }
                }
            }
        }
    }

    #[test]
    fn refuses_what_der_forbids() {
        let der = &samples()[2];
        // The outer length in a longer form than needed.
        let mut padded = vec![0x30, 0x83, 0x00];
        padded.extend_from_slice(&der[2..]);
        assert!(read(&padded).unwrap_err().contains("shortest form"));
        // Malformed and repeated extensions: x509::tests run both readers on them.
    }

    #[test]
    fn dotted_oids() {
        assert_eq!(
            super::dotted(super::OID_KP_SERVER_AUTH),
            "1.3.6.1.5.5.7.3.1"
        );
        assert_eq!(super::dotted(&[0x55, 0x1d, 0x11]), "2.5.29.17");
        assert_eq!(
            super::dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            "1.2.840.113549"
        );
    }
}
