//! DER of the certificate the CA issues at volume: a SPIFFE leaf (docs/COMPATIBILITY.md).
//!
//! The shape is fixed: empty subject; extensions authority key identifier, subject
//! alternative name (critical, one URI), key usage (critical), extended key usage
//! (serverAuth, clientAuth), subject key identifier, basic constraints (critical,
//! `cA` false). Only the serial, validity, public key and SPIFFE ID vary, so the leaf
//! is written directly instead of through a general-purpose encoder: fewer
//! allocations on the hot path, and short enough to read in full.
//!
//! rcgen remains the reference. The parts that depend on the CA (signature algorithm
//! identifier, issuer name, authority key identifier) are taken from a prototype leaf
//! that rcgen signs when the authority is assembled, and a unit test holds this
//! encoder byte-for-byte equal to rcgen for every key type. After signing, the
//! authority re-parses the result with an independent parser and re-checks it.

use der::{Decode, Encode};
use time::{OffsetDateTime, UtcOffset};
use x509_cert::Certificate;

use crate::csr::KeyKind;
use crate::policy::Validity;

const OID_AUTHORITY_KEY_ID: &str = "2.5.29.35";
const TAG_SEQUENCE: u8 = 0x30;
const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_URI: u8 = 0x86; // [6] IMPLICIT IA5String, GeneralName uniformResourceIdentifier
const TAG_EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;

/// `[0] EXPLICIT INTEGER 2`: X.509 v3.
const VERSION_V3: &[u8] = &[0xa0, 0x03, 0x02, 0x01, 0x02];
/// An empty subject name.
const EMPTY_NAME: &[u8] = &[0x30, 0x00];
/// subjectAltName, critical (the subject is empty): OID and `BOOLEAN TRUE`.
const SAN_HEAD: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x11, 0x01, 0x01, 0xff];
/// keyUsage, critical: digitalSignature.
const KU_SIGNATURE: &[u8] = &[
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x07, 0x80,
];
/// keyUsage, critical: digitalSignature and keyEncipherment (RSA keys).
const KU_SIGNATURE_ENCIPHERMENT: &[u8] = &[
    0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x05, 0xa0,
];
/// extKeyUsage: serverAuth, clientAuth.
const EKU_SERVER_CLIENT: &[u8] = &[
    0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x25, 0x04, 0x16, 0x30, 0x14, 0x06, 0x08, 0x2b, 0x06, 0x01,
    0x05, 0x05, 0x07, 0x03, 0x01, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02,
];
/// subjectKeyIdentifier: OID, then the 22-byte OCTET STRING holding a 20-byte one.
const SKI_HEAD: &[u8] = &[
    0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14,
];
/// basicConstraints, critical: `cA` false (an empty SEQUENCE).
const BC_NOT_CA: &[u8] = &[
    0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
];

/// What every leaf of one CA shares, taken from a prototype rcgen signed.
#[derive(Clone, Debug)]
pub(crate) struct LeafProfile {
    /// `AlgorithmIdentifier` of the CA's signatures.
    signature_algorithm: Vec<u8>,
    /// The CA's subject name, the leaf's issuer.
    issuer: Vec<u8>,
    /// The whole authority key identifier `Extension`.
    authority_key_id: Vec<u8>,
}

impl LeafProfile {
    /// Reads the CA-dependent parts from `prototype`, a leaf the CA signed with rcgen.
    pub(crate) fn from_prototype(prototype: &[u8]) -> Result<Self, String> {
        let cert = Certificate::from_der(prototype).map_err(|e| e.to_string())?;
        let tbs = cert.tbs_certificate();
        let encode = |r: der::Result<Vec<u8>>| r.map_err(|e| e.to_string());
        let authority_key_id = tbs
            .extensions()
            .into_iter()
            .flatten()
            .find(|e| e.extn_id.to_string() == OID_AUTHORITY_KEY_ID)
            .ok_or("the prototype leaf has no authority key identifier")?;
        Ok(LeafProfile {
            signature_algorithm: encode(cert.signature_algorithm().to_der())?,
            issuer: encode(tbs.issuer().to_der())?,
            authority_key_id: encode(authority_key_id.to_der())?,
        })
    }

    /// The `TBSCertificate` of a leaf. `serial` must be positive without a leading
    /// zero byte (its first byte below 0x80 and non-zero); `spki_sha256` is the SHA-256
    /// of `spki` (its first 20 bytes are the subject key identifier, as rcgen makes
    /// it); `uri` must be ASCII.
    pub(crate) fn tbs(
        &self,
        serial: &[u8],
        validity: Validity,
        spki: &[u8],
        spki_sha256: &[u8],
        kind: KeyKind,
        uri: &str,
    ) -> Vec<u8> {
        debug_assert!(serial.first().is_some_and(|b| (1..0x80).contains(b)));
        debug_assert!(uri.is_ascii());
        debug_assert_eq!(spki_sha256.len(), 32);
        let mut times = Vec::with_capacity(34);
        time(&mut times, validity.not_before);
        time(&mut times, validity.not_after);

        let mut general_names = Vec::with_capacity(uri.len() + 4);
        tlv(&mut general_names, TAG_URI, uri.as_bytes());
        let mut san_value = Vec::with_capacity(general_names.len() + 4);
        tlv(&mut san_value, TAG_SEQUENCE, &general_names);
        let mut san = Vec::with_capacity(san_value.len() + 16);
        san.extend_from_slice(SAN_HEAD);
        tlv(&mut san, TAG_OCTET_STRING, &san_value);

        let mut extensions = Vec::with_capacity(256 + uri.len());
        extensions.extend_from_slice(&self.authority_key_id);
        tlv(&mut extensions, TAG_SEQUENCE, &san);
        extensions.extend_from_slice(match kind {
            KeyKind::Rsa(_) => KU_SIGNATURE_ENCIPHERMENT,
            KeyKind::EcdsaP256 | KeyKind::EcdsaP384 => KU_SIGNATURE,
        });
        extensions.extend_from_slice(EKU_SERVER_CLIENT);
        extensions.extend_from_slice(SKI_HEAD);
        extensions.extend_from_slice(&spki_sha256[..20]);
        extensions.extend_from_slice(BC_NOT_CA);
        let mut extensions_seq = Vec::with_capacity(extensions.len() + 4);
        tlv(&mut extensions_seq, TAG_SEQUENCE, &extensions);

        let mut body = Vec::with_capacity(extensions_seq.len() + spki.len() + 160);
        body.extend_from_slice(VERSION_V3);
        tlv(&mut body, TAG_INTEGER, serial);
        body.extend_from_slice(&self.signature_algorithm);
        body.extend_from_slice(&self.issuer);
        tlv(&mut body, TAG_SEQUENCE, &times);
        body.extend_from_slice(EMPTY_NAME);
        body.extend_from_slice(spki);
        tlv(&mut body, TAG_EXTENSIONS, &extensions_seq);
        let mut tbs = Vec::with_capacity(body.len() + 4);
        tlv(&mut tbs, TAG_SEQUENCE, &body);
        tbs
    }

    /// The signed certificate: `tbs`, the signature algorithm, the signature.
    pub(crate) fn certificate(&self, tbs: &[u8], signature: &[u8]) -> Vec<u8> {
        let mut bits = Vec::with_capacity(signature.len() + 1);
        bits.push(0); // no unused bits
        bits.extend_from_slice(signature);
        let mut body =
            Vec::with_capacity(tbs.len() + self.signature_algorithm.len() + bits.len() + 8);
        body.extend_from_slice(tbs);
        body.extend_from_slice(&self.signature_algorithm);
        tlv(&mut body, TAG_BIT_STRING, &bits);
        let mut cert = Vec::with_capacity(body.len() + 4);
        tlv(&mut cert, TAG_SEQUENCE, &body);
        cert
    }
}

/// Appends tag, DER length (shortest definite form) and `content`.
pub(crate) fn tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}

/// RFC 5280 §4.1.2.5: UTCTime for 1950–2049, GeneralizedTime otherwise; whole seconds,
/// UTC.
fn time(out: &mut Vec<u8>, t: OffsetDateTime) {
    let t = t.to_offset(UtcOffset::UTC);
    let mut text = String::with_capacity(15);
    let tag = if (1950..2050).contains(&t.year()) {
        push_digits(&mut text, (t.year() % 100) as u32, 2);
        TAG_UTC_TIME
    } else {
        push_digits(&mut text, t.year().clamp(0, 9999) as u32, 4);
        TAG_GENERALIZED_TIME
    };
    for (v, width) in [
        (u8::from(t.month()) as u32, 2),
        (t.day() as u32, 2),
        (t.hour() as u32, 2),
        (t.minute() as u32, 2),
        (t.second() as u32, 2),
    ] {
        push_digits(&mut text, v, width);
    }
    text.push('Z');
    tlv(out, tag, text.as_bytes());
}

fn push_digits(s: &mut String, v: u32, width: u32) {
    for i in (0..width).rev() {
        let d = (v / 10u32.pow(i)) % 10;
        s.push(char::from(b'0' + d as u8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_the_shortest_form() {
        for (n, head) in [
            (0usize, vec![0x04, 0x00]),
            (127, vec![0x04, 0x7f]),
            (128, vec![0x04, 0x81, 0x80]),
            (255, vec![0x04, 0x81, 0xff]),
            (256, vec![0x04, 0x82, 0x01, 0x00]),
            (70_000, vec![0x04, 0x83, 0x01, 0x11, 0x70]),
        ] {
            let mut out = Vec::new();
            tlv(&mut out, 0x04, &vec![0u8; n]);
            assert_eq!(&out[..head.len()], head.as_slice(), "length {n}");
            assert_eq!(out.len(), head.len() + n);
        }
    }

    #[test]
    fn times_switch_to_generalized_in_2050() {
        let mut out = Vec::new();
        time(&mut out, time::macros::datetime!(2049-12-31 23:59:59 UTC));
        assert_eq!(out, b"\x17\x0d491231235959Z");
        let mut out = Vec::new();
        // Converted to UTC (still 2049) and truncated to whole seconds.
        time(
            &mut out,
            time::macros::datetime!(2050-01-01 00:00:00.5 +01:00),
        );
        assert_eq!(out, b"\x17\x0d491231230000Z");
        let mut out = Vec::new();
        time(&mut out, time::macros::datetime!(2050-01-01 00:00:00 UTC));
        assert_eq!(out, b"\x18\x0f20500101000000Z");
    }
}
