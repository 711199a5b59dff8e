//! One audit record: a decision the CA made, and the hash chain that binds it to the
//! records before it.

use serde::{Deserialize, Serialize};

/// Which entry point a decision came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `IstioCertificateService/CreateCertificate`.
    Modern,
    /// `IstioCAService/HandleCSR`.
    Legacy,
    /// The local admin socket (export-bundle, revoke).
    Admin,
    /// The CA itself (its own serving certificate).
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
}

/// A decision, as the request path fills it in. The store adds sequence, time and chain.
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
    /// Certificate validity start, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Certificate validity end, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// SHA-256 of the certified public key (SPKI DER), hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spki_sha256: Option<String>,
    /// SHA-256 of the certificate DER, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
}

/// A stored record: the decision plus its place in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// When the decision was recorded, RFC 3339 UTC.
    pub time: String,
    /// Hash of the previous record (hex SHA-256); all zeros for the first.
    pub prev_hash: String,
    /// The decision.
    #[serde(flatten)]
    pub decision: Decision,
}

/// The hash that precedes the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Appends a record to `out` as stored: 64 hex characters of SHA-256 over the JSON
/// body, a newline, then the body; returns the hash. Hashing the exact stored bytes
/// means any edit is detected, including fields a reader would not know. The record
/// is serialised in place, so a group commit's value is built without copies. On an
/// error `out` is left as it was (a caller that wrote a separator first removes it).
pub fn encode_into(record: &AuditRecord, out: &mut Vec<u8>) -> Result<String, serde_json::Error> {
    let start = out.len();
    out.extend_from_slice(&[b'0'; 64]);
    out.push(b'\n');
    if let Err(e) = serde_json::to_writer(&mut *out, record) {
        out.truncate(start);
        return Err(e);
    }
    let hash = ca_core::x509::sha256_hex(&out[start + 65..]);
    out[start..start + 64].copy_from_slice(hash.as_bytes());
    Ok(hash)
}

/// One record as stored in a value: the hash it states and its JSON body.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// The hash the record states for its body (64 hex characters when well formed).
    pub stated: &'a [u8],
    /// The JSON body, exactly as stored.
    pub body: &'a [u8],
}

impl Frame<'_> {
    /// The stated hash, as text.
    pub fn stated_hash(&self) -> String {
        String::from_utf8_lossy(self.stated).into_owned()
    }

    /// Whether the body still hashes to what the record states (false after an edit).
    /// Only verification needs this; readers trust the store.
    pub fn intact(&self) -> bool {
        ca_core::x509::sha256_hex(self.body).as_bytes() == self.stated
    }

    /// The record.
    pub fn record(&self) -> Result<AuditRecord, String> {
        serde_json::from_slice(self.body).map_err(|e| format!("record body does not parse: {e}"))
    }
}

/// Splits a stored value into its records, in order. A value holds the records of one
/// group commit, each encoded as by [`encode_into`] and separated by a newline (a compact
/// JSON body never contains one). A value written before values held batches is one
/// record, the same format. A framing error ends the value.
pub fn frames(stored: &[u8]) -> Vec<Result<Frame<'_>, String>> {
    let mut out = Vec::new();
    let mut rest = stored;
    while !rest.is_empty() {
        if rest.len() < 65 || rest[64] != b'\n' {
            out.push(Err("record is not framed as hash + body".into()));
            break;
        }
        let after = &rest[65..];
        let end = after
            .iter()
            .position(|b| *b == b'\n')
            .unwrap_or(after.len());
        out.push(Ok(Frame {
            stated: &rest[..64],
            body: &after[..end],
        }));
        rest = after.get(end + 1..).unwrap_or_default();
    }
    if out.is_empty() {
        out.push(Err("empty value".into()));
    }
    out
}

/// Every record of a stored value, in order (see [`frames`]).
pub fn records(stored: &[u8]) -> Result<Vec<(Frame<'_>, AuditRecord)>, String> {
    frames(stored)
        .into_iter()
        .map(|f| f.and_then(|f| Ok((f, f.record()?))))
        .collect()
}
