//! One audit record: a decision the CA made, its place in its writer's hash chain, and
//! the exact encoding its hash covers.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Which entry point a decision came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `IstioCertificateService/CreateCertificate`.
    Modern,
    /// `IstioCAService/HandleCSR`.
    Legacy,
    /// The local admin socket or command line (export-bundle, revoke).
    Admin,
    /// The CA itself (its own serving certificate, the Secret controller).
    Internal,
}

impl Api {
    /// Label used in metrics and listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            Api::Modern => "modern",
            Api::Legacy => "legacy",
            Api::Admin => "admin",
            Api::Internal => "internal",
        }
    }

    /// The stored code. Stable: it is part of every record's hash.
    pub(super) fn code(self) -> i64 {
        match self {
            Api::Modern => 1,
            Api::Legacy => 2,
            Api::Admin => 3,
            Api::Internal => 4,
        }
    }

    pub(super) fn from_code(code: i64) -> Option<Self> {
        [Api::Modern, Api::Legacy, Api::Admin, Api::Internal]
            .into_iter()
            .find(|a| a.code() == code)
    }
}

/// What was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A certificate was issued.
    Issued,
    /// A request was refused; `reason` says why.
    Denied,
    /// A certificate was revoked by an admin.
    Revoked,
}

impl Outcome {
    /// Label used in metrics and listings.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Issued => "issued",
            Outcome::Denied => "denied",
            Outcome::Revoked => "revoked",
        }
    }

    /// Parses the command-line spelling.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "issued" => Ok(Outcome::Issued),
            "denied" => Ok(Outcome::Denied),
            "revoked" => Ok(Outcome::Revoked),
            other => Err(format!(
                "unknown outcome {other:?} (issued, denied or revoked)"
            )),
        }
    }

    /// The stored code. Stable: it is part of every record's hash.
    pub(super) fn code(self) -> i64 {
        match self {
            Outcome::Issued => 1,
            Outcome::Denied => 2,
            Outcome::Revoked => 3,
        }
    }

    pub(super) fn from_code(code: i64) -> Option<Self> {
        [Outcome::Issued, Outcome::Denied, Outcome::Revoked]
            .into_iter()
            .find(|o| o.code() == code)
    }
}

/// A decision, as the request path fills it in. The store adds chain, sequence, time
/// and hash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Which API.
    pub api: Option<Api>,
    /// Outcome; `None` is invalid and rejected by the store.
    pub outcome: Option<Outcome>,
    /// Stable reason code for denials (and the revocation reason for revocations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail (never key material).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Which authenticator vouched for the caller (or failed to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authenticator: Option<String>,
    /// The caller's authenticated identity, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// Peer network address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Requested TTL in seconds (0 = server default).
    pub requested_ttl_secs: i64,
    /// Granted TTL in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granted_ttl_secs: Option<i64>,
    /// SPIFFE ID written into the certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// Serial of the issued (or revoked) certificate, lowercase hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Serial of the client certificate that authenticated the caller, when one did:
    /// what a certificate was renewed from. Revoking it revokes this one too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_serial: Option<String>,
    /// Certificate validity start, RFC 3339 (whole seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Certificate validity end, RFC 3339 (whole seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// SHA-256 of the certified public key (SPKI DER), hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spki_sha256: Option<String>,
    /// SHA-256 of the certificate DER, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
}

/// A stored record: the decision plus its place in its writer's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The writer's chain (one per replica or admin process).
    pub chain: String,
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// When the decision was recorded, RFC 3339 UTC with microseconds.
    pub time: String,
    /// SHA-256 over the previous record's hash and this record's encoding, hex.
    pub hash: String,
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
}

/// The hash that precedes the first record of a chain.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// Why a decision cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A required field is missing.
    #[error("decision without {0}")]
    Missing(&'static str),
    /// A field does not have the shape the store keeps.
    #[error("{field} {value:?} is not {expected}")]
    Shape {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
}

/// A record exactly as stored: one column each, so a record read back hashes as it
/// was written. Two columns are kept compact (schema 4): serials are the certificate's
/// serial bytes, and a caller that is the granted identity itself is stored once
/// (`caller_same`, the common case: about 45 bytes a record). The hash covers the values
/// as a decision states them (serials as lowercase hex, the caller written out), so
/// records written before schema 4 verify unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Row {
    pub seq: i64,
    pub time_us: i64,
    pub api: i64,
    pub outcome: i64,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub authenticator: Option<String>,
    /// `None` when `caller_same` says it is `spiffe_id`.
    pub caller: Option<String>,
    pub peer: Option<String>,
    pub requested_ttl: i64,
    pub granted_ttl: Option<i64>,
    pub spiffe_id: Option<String>,
    pub serial: Option<Vec<u8>>,
    pub client_serial: Option<Vec<u8>>,
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    pub spki_sha256: Option<Vec<u8>>,
    pub cert_sha256: Option<Vec<u8>>,
    /// The caller is `spiffe_id`.
    pub caller_same: bool,
}

/// A serial as stored: its value's bytes, big-endian, from the normalised lowercase hex
/// a decision states it in (no leading zeros: [`ca_core::x509::normalise_serial`]).
/// Any other spelling is refused, so that the bytes read back as the same text.
pub(super) fn serial_bytes(text: &str) -> Option<Vec<u8>> {
    if text.is_empty() || ca_core::x509::normalise_serial(text) != text {
        return None;
    }
    let padded = if text.len() % 2 == 1 {
        format!("0{text}")
    } else {
        text.to_owned()
    };
    decode_hex(&padded)
}

/// A stored serial as decisions state it.
pub(super) fn serial_text(bytes: &[u8]) -> String {
    ca_core::x509::normalise_serial(&ca_core::x509::hex(bytes))
}

/// [`serial_bytes`], or the error that names `field`.
pub(super) fn serial_key(field: &'static str, text: &str) -> Result<Vec<u8>, EncodeError> {
    serial_bytes(text).ok_or_else(|| EncodeError::Shape {
        field,
        value: text.to_owned(),
        expected: "a serial in normalised lowercase hex",
    })
}

fn serial(field: &'static str, v: &Option<String>) -> Result<Option<Vec<u8>>, EncodeError> {
    v.as_deref().map(|s| serial_key(field, s)).transpose()
}

fn unix_secs(field: &'static str, v: &Option<String>) -> Result<Option<i64>, EncodeError> {
    v.as_deref()
        .map(|s| {
            OffsetDateTime::parse(s, &Rfc3339)
                .ok()
                .filter(|t| t.nanosecond() == 0)
                .map(OffsetDateTime::unix_timestamp)
                .ok_or_else(|| EncodeError::Shape {
                    field,
                    value: s.to_owned(),
                    expected: "an RFC 3339 time in whole seconds",
                })
        })
        .transpose()
}

fn digest(field: &'static str, v: &Option<String>) -> Result<Option<Vec<u8>>, EncodeError> {
    v.as_deref()
        .map(|s| {
            decode_hex(s)
                .filter(|b| b.len() == 32)
                .ok_or_else(|| EncodeError::Shape {
                    field,
                    value: s.to_owned(),
                    expected: "a hex SHA-256 digest",
                })
        })
        .transpose()
}

/// Lowercase or uppercase hex to bytes; `None` for anything else.
pub(super) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Formats a unix time in whole seconds as stored decisions show it.
pub fn rfc3339_secs(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Formats a unix time in microseconds as record times show it.
pub fn rfc3339_us(us: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

impl Row {
    /// The stored form of `decision`, at `seq` and `time_us`.
    pub fn encode(decision: &Decision, seq: i64, time_us: i64) -> Result<Row, EncodeError> {
        let d = decision;
        let caller_same = d.caller.is_some() && d.caller == d.spiffe_id;
        Ok(Row {
            seq,
            time_us,
            api: d.api.ok_or(EncodeError::Missing("api"))?.code(),
            outcome: d.outcome.ok_or(EncodeError::Missing("outcome"))?.code(),
            reason: d.reason.clone(),
            detail: d.detail.clone(),
            authenticator: d.authenticator.clone(),
            caller: if caller_same { None } else { d.caller.clone() },
            peer: d.peer.clone(),
            requested_ttl: d.requested_ttl_secs,
            granted_ttl: d.granted_ttl_secs,
            spiffe_id: d.spiffe_id.clone(),
            serial: serial("serial", &d.serial)?,
            client_serial: serial("client_serial", &d.client_serial)?,
            not_before: unix_secs("not_before", &d.not_before)?,
            not_after: unix_secs("not_after", &d.not_after)?,
            spki_sha256: digest("spki_sha256", &d.spki_sha256)?,
            cert_sha256: digest("cert_sha256", &d.cert_sha256)?,
            caller_same,
        })
    }

    /// Whether `caller_same` is set only where [`Row::encode`] sets it.
    fn consistent(&self) -> bool {
        !self.caller_same || (self.caller.is_none() && self.spiffe_id.is_some())
    }

    /// The caller as the decision stated it.
    fn caller(&self) -> Option<&str> {
        match self.caller_same {
            true => self.spiffe_id.as_deref(),
            false => self.caller.as_deref(),
        }
    }

    /// The record as listings show it. `None` when a stored code is unknown (the row
    /// was written by something else than this CA).
    pub fn decode(self, chain: &str, hash: &[u8]) -> Option<AuditRecord> {
        if !self.consistent() {
            return None;
        }
        let caller = self.caller().map(str::to_owned);
        Some(AuditRecord {
            chain: chain.to_owned(),
            seq: u64::try_from(self.seq).ok()?,
            time: rfc3339_us(self.time_us),
            hash: ca_core::x509::hex(hash),
            decision: Decision {
                api: Some(Api::from_code(self.api)?),
                outcome: Some(Outcome::from_code(self.outcome)?),
                reason: self.reason,
                detail: self.detail,
                authenticator: self.authenticator,
                caller,
                peer: self.peer,
                requested_ttl_secs: self.requested_ttl,
                granted_ttl_secs: self.granted_ttl,
                spiffe_id: self.spiffe_id,
                serial: self.serial.as_deref().map(serial_text),
                client_serial: self.client_serial.as_deref().map(serial_text),
                not_before: self.not_before.map(rfc3339_secs),
                not_after: self.not_after.map(rfc3339_secs),
                spki_sha256: self.spki_sha256.as_deref().map(ca_core::x509::hex),
                cert_sha256: self.cert_sha256.as_deref().map(ca_core::x509::hex),
            },
        })
    }

    /// The record's hash: SHA-256 over a domain label, the previous record's hash, the
    /// chain's name and every value, each length-prefixed (or as 8 big-endian bytes),
    /// absent values marked; serials and the caller as the decision states them (see
    /// [`Row`]). Editing, moving or renumbering any record changes it.
    pub fn hash(&self, prev: &[u8; 32], chain: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"istio-ca-rs audit record v1\0");
        ctx.update(prev);
        let text = |ctx: &mut ring::digest::Context, v: Option<&[u8]>| match v {
            None => ctx.update(&[0]),
            Some(b) => {
                ctx.update(&[1]);
                ctx.update(&(b.len() as u64).to_be_bytes());
                ctx.update(b);
            }
        };
        let int = |ctx: &mut ring::digest::Context, v: Option<i64>| match v {
            None => ctx.update(&[0]),
            Some(i) => {
                ctx.update(&[1]);
                ctx.update(&i.to_be_bytes());
            }
        };
        if !self.consistent() {
            // A row no writer produced (edited in the database): a hash no writer made.
            ctx.update(b"inconsistent caller");
        }
        text(&mut ctx, Some(chain.as_bytes()));
        for i in [self.seq, self.time_us, self.api, self.outcome] {
            int(&mut ctx, Some(i));
        }
        for s in [
            self.reason.as_deref(),
            self.detail.as_deref(),
            self.authenticator.as_deref(),
            self.caller(),
            self.peer.as_deref(),
        ] {
            text(&mut ctx, s.map(str::as_bytes));
        }
        int(&mut ctx, Some(self.requested_ttl));
        int(&mut ctx, self.granted_ttl);
        text(&mut ctx, self.spiffe_id.as_deref().map(str::as_bytes));
        for s in [&self.serial, &self.client_serial] {
            let stated = s.as_deref().map(serial_text);
            text(&mut ctx, stated.as_deref().map(str::as_bytes));
        }
        int(&mut ctx, self.not_before);
        int(&mut ctx, self.not_after);
        text(&mut ctx, self.spki_sha256.as_deref());
        text(&mut ctx, self.cert_sha256.as_deref());
        ctx.finish().as_ref().try_into().unwrap_or([0; 32])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued() -> Decision {
        Decision {
            api: Some(Api::Modern),
            outcome: Some(Outcome::Issued),
            authenticator: Some("client-cert".into()),
            caller: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            peer: Some("10.0.0.1:5000".into()),
            requested_ttl_secs: 86400,
            granted_ttl_secs: Some(86400),
            spiffe_id: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            serial: Some("1a2b".into()),
            client_serial: Some("ff".into()),
            not_before: Some("2026-12-01T10:00:00Z".into()),
            not_after: Some("2026-12-02T10:00:00Z".into()),
            spki_sha256: Some("ab".repeat(32)),
            cert_sha256: Some("cd".repeat(32)),
            ..Default::default()
        }
    }

    #[test]
    fn a_decision_round_trips_through_its_row() {
        let row = Row::encode(&issued(), 7, 1_764_583_200_123_456).unwrap();
        let hash = row.hash(&GENESIS_HASH, "replica-0");
        let rec = row.clone().decode("replica-0", &hash).unwrap();
        assert_eq!(rec.decision, issued());
        assert_eq!(rec.seq, 7);
        assert_eq!(rec.time, "2025-12-01T10:00:00.123456Z");
        // Reading a record back and encoding it again gives the same row and hash.
        let again = Row::encode(&rec.decision, 7, row.time_us).unwrap();
        assert_eq!(again, row);
        assert_eq!(again.hash(&GENESIS_HASH, "replica-0"), hash);
    }

    #[test]
    fn every_field_the_chain_and_the_previous_hash_change_the_hash() {
        let row = Row::encode(&issued(), 1, 1).unwrap();
        let base = row.hash(&GENESIS_HASH, "a");
        assert_ne!(row.hash(&[1; 32], "a"), base);
        assert_ne!(row.hash(&GENESIS_HASH, "b"), base);
        let edits: Vec<fn(&mut Row)> = vec![
            |r| r.seq += 1,
            |r| r.time_us += 1,
            |r| r.api = 2,
            |r| r.outcome = 2,
            |r| r.reason = Some(String::new()),
            |r| r.detail = Some("x".into()),
            |r| r.authenticator = None,
            |r| r.caller = Some("spiffe://cluster.local/ns/a/sa/c".into()),
            |r| r.peer = None,
            |r| r.requested_ttl = 1,
            |r| r.granted_ttl = None,
            |r| r.spiffe_id = None,
            |r| r.serial = Some(vec![0x1a, 0x2c]),
            |r| r.client_serial = None,
            |r| r.not_before = None,
            |r| r.not_after = Some(0),
            |r| r.spki_sha256 = None,
            |r| r.cert_sha256 = Some(vec![0; 32]),
            |r| r.caller_same = false,
        ];
        for (i, edit) in edits.into_iter().enumerate() {
            let mut r = row.clone();
            edit(&mut r);
            assert_ne!(r.hash(&GENESIS_HASH, "a"), base, "edit {i}");
        }
        // Moving text between adjacent fields changes it too (length prefixes).
        let mut a = row.clone();
        a.reason = Some("ab".into());
        a.detail = Some("c".into());
        let mut b = row;
        b.reason = Some("a".into());
        b.detail = Some("bc".into());
        assert_ne!(a.hash(&GENESIS_HASH, "a"), b.hash(&GENESIS_HASH, "a"));
    }

    #[test]
    fn decisions_the_store_cannot_keep_are_refused() {
        let mut d = issued();
        d.api = None;
        assert!(matches!(
            Row::encode(&d, 1, 1),
            Err(EncodeError::Missing("api"))
        ));
        let mut d = issued();
        d.not_after = Some("2026-12-02T10:00:00.5Z".into());
        assert!(Row::encode(&d, 1, 1).is_err());
        let mut d = issued();
        d.cert_sha256 = Some("abc".into());
        assert!(Row::encode(&d, 1, 1).is_err());
        // A serial whose bytes would read back as other text.
        for bad in ["1A2B", "01a2", "", "0x1a", "00"] {
            let mut d = issued();
            d.serial = Some(bad.into());
            assert!(Row::encode(&d, 1, 1).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serials_read_back_as_written() {
        for text in ["0", "1", "abc", "1a2b", "7f00000000000000ffffffffffffffff"] {
            let bytes = serial_bytes(text).unwrap();
            assert_eq!(bytes.len(), text.len().div_ceil(2));
            assert_eq!(serial_text(&bytes), text);
        }
    }

    #[test]
    fn a_caller_is_stored_once_when_it_is_the_identity() {
        let row = Row::encode(&issued(), 1, 1).unwrap();
        assert!(row.caller_same && row.caller.is_none());
        // Neither a caller of its own nor none at all is taken for the identity.
        let mut other = issued();
        other.caller = Some("gce:project/vm".into());
        let mut none = issued();
        none.caller = None;
        for d in [other, none] {
            let row = Row::encode(&d, 1, 1).unwrap();
            assert!(!row.caller_same);
            let hash = row.hash(&GENESIS_HASH, "a");
            assert_eq!(row.decode("a", &hash).unwrap().decision, d);
        }
        // The hash is the one of the caller written out: what records before schema 4
        // were hashed over.
        let mut written_out = Row::encode(&issued(), 1, 1).unwrap();
        let compact = written_out.hash(&GENESIS_HASH, "a");
        written_out.caller_same = false;
        written_out.caller = issued().caller;
        assert_eq!(written_out.hash(&GENESIS_HASH, "a"), compact);
    }
}

/// Longest text a caller can place in a record or a log line (a header, a claim, a
/// name from a certificate), in bytes.
pub const MAX_ATTACKER_TEXT: usize = 256;

/// `text` cut to at most `max` bytes on a character boundary, saying how long it was.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

#[cfg(test)]
mod bounded_tests {
    use super::bounded;

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 8), "short");
        assert_eq!(bounded("abcdefghij", 4), "abcd… (10 bytes)");
        // 'é' is two bytes: a cut inside it moves back.
        assert_eq!(bounded("aéé", 2), "a… (5 bytes)");
    }
}
