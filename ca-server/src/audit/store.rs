//! The audit store: an append-only, hash-chained log of decisions in sled.
//!
//! Trees:
//! - `records`: big-endian `seq` → `hash\nbody` (see [`super::record::encode`]),
//! - `serials`: serial → `seq` of the record that issued it,
//! - `revoked`: serial → revocation (JSON), written in the same batch as its record,
//! - `meta`: `head` (last seq and hash) and `anchor` (where verification starts after
//!   retention pruned older records).
//!
//! A write is only acknowledged after `flush`, so a caller that was answered can rely
//! on the record surviving a crash. The CA private key never goes into sled.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::record::{self, AuditRecord, Decision, GENESIS_HASH, Outcome};

/// Why the audit store failed. Any of these stops issuance: no record, no certificate.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Another process holds the store.
    #[error(
        "the audit store at {0} is in use by another process (is ca-server running? admin commands then go through its admin socket)"
    )]
    Locked(String),
    /// sled reported an I/O or corruption error (disk full, permissions, ...).
    #[error("audit store I/O error: {0}")]
    Io(String),
    /// The record could not be encoded.
    #[error("audit record could not be encoded: {0}")]
    Encode(String),
    /// The writer task is gone (the server is shutting down).
    #[error("the audit writer has stopped")]
    WriterGone,
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Io(e.to_string())
    }
}

/// A revocation as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Serial of the revoked certificate.
    pub serial: String,
    /// Why, as the admin said it.
    pub reason: String,
    /// Sequence number of the audit record of the revocation.
    pub seq: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChainPoint {
    seq: u64,
    hash: String,
}

/// What to write in one request.
#[derive(Debug)]
pub struct Append {
    /// The decision.
    pub decision: Decision,
    /// When the decision is a revocation: its serial and reason.
    pub revoke: Option<(String, String)>,
}

/// Result of [`AuditStore::verify`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Records checked.
    pub checked: u64,
    /// Sequence number verification started from (after retention pruning).
    pub first_seq: u64,
    /// Head of the log: last sequence number and its hash. Note it down elsewhere to
    /// detect a truncated tail later.
    pub head_seq: u64,
    /// Hash of the head record.
    pub head_hash: String,
    /// Every problem found; empty means the chain is intact.
    pub problems: Vec<String>,
}

/// Filter for [`AuditStore::list`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListFilter {
    /// Matches the caller or the granted SPIFFE ID.
    pub identity: Option<String>,
    /// Only records at or after this time.
    pub since: Option<String>,
    /// Only this outcome.
    pub outcome: Option<Outcome>,
    /// At most this many (the newest), 0 = all.
    pub limit: usize,
}

/// The sled-backed store. One writer at a time appends (see [`super::AuditWriter`]).
pub struct AuditStore {
    db: sled::Db,
    records: sled::Tree,
    serials: sled::Tree,
    revoked: sled::Tree,
    meta: sled::Tree,
    chain: Mutex<ChainPoint>,
    revoked_set: Arc<RwLock<HashSet<String>>>,
}

/// sled's page cache.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Current time formatted as stored.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

impl AuditStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        // We flush explicitly before every acknowledgement; sled's periodic flusher would
        // only add fsyncs. The store is written far more than read (revocation checks use
        // an in-memory set), so sled's page cache is kept small: its default of 1 GiB
        // would let a busy CA grow past its container's memory limit.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    AuditError::Locked(dir.display().to_string())
                }
                other => AuditError::Io(other.to_string()),
            })?;
        let records = db.open_tree("records")?;
        let serials = db.open_tree("serials")?;
        let revoked = db.open_tree("revoked")?;
        let meta = db.open_tree("meta")?;
        let chain = match records.last()? {
            Some((k, v)) => {
                let (stated, _, _) = record::decode(&v).map_err(AuditError::Io)?;
                ChainPoint {
                    seq: seq_of(&k).unwrap_or(0),
                    hash: stated,
                }
            }
            None => match meta.get("head")? {
                // Every record was pruned: continue the chain from the stored head.
                Some(v) => serde_json::from_slice(&v).map_err(|e| AuditError::Io(e.to_string()))?,
                None => ChainPoint {
                    seq: 0,
                    hash: GENESIS_HASH.into(),
                },
            },
        };
        let mut set = HashSet::new();
        for item in revoked.iter() {
            let (k, _) = item?;
            set.insert(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(AuditStore {
            db,
            records,
            serials,
            revoked,
            meta,
            chain: Mutex::new(chain),
            revoked_set: Arc::new(RwLock::new(set)),
        })
    }

    /// The set of revoked serials, shared with the authenticators.
    pub fn revoked_set(&self) -> Arc<RwLock<HashSet<String>>> {
        self.revoked_set.clone()
    }

    /// Writes a batch of records into sled without flushing. Returns one result per
    /// append; the caller must [`AuditStore::flush`] before acknowledging any of them.
    pub fn write_batch(&self, batch: Vec<Append>) -> Vec<Result<AuditRecord, AuditError>> {
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::with_capacity(batch.len());
        for append in batch {
            out.push(self.write_one(&mut chain, append));
        }
        if let Ok(head) = serde_json::to_vec(&*chain)
            && let Err(e) = self.meta.insert("head", head)
        {
            // The records themselves are written; the head is re-derived on open.
            tracing::warn!(error = %e, "could not update the audit head");
        }
        out
    }

    fn write_one(&self, chain: &mut ChainPoint, append: Append) -> Result<AuditRecord, AuditError> {
        if append.decision.outcome.is_none() || append.decision.api.is_none() {
            return Err(AuditError::Encode("decision without outcome or api".into()));
        }
        let rec = AuditRecord {
            seq: chain.seq + 1,
            time: now_rfc3339(),
            prev_hash: chain.hash.clone(),
            decision: append.decision,
        };
        let (hash, stored) = record::encode(&rec).map_err(|e| AuditError::Encode(e.to_string()))?;
        self.records.insert(seq_key(rec.seq), stored)?;
        if let (Some(Outcome::Issued), Some(serial)) = (rec.decision.outcome, &rec.decision.serial)
        {
            self.serials.insert(serial.as_bytes(), &seq_key(rec.seq))?;
        }
        if let Some((serial, reason)) = append.revoke {
            let r = Revocation {
                serial: serial.clone(),
                reason,
                seq: rec.seq,
            };
            let v = serde_json::to_vec(&r).map_err(|e| AuditError::Encode(e.to_string()))?;
            self.revoked.insert(serial.as_bytes(), v)?;
        }
        chain.seq = rec.seq;
        chain.hash = hash;
        Ok(rec)
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<usize, AuditError> {
        Ok(self.db.flush_async().await?)
    }

    /// Blocking flush, for offline admin commands.
    pub fn flush_blocking(&self) -> Result<usize, AuditError> {
        Ok(self.db.flush()?)
    }

    /// After a successful flush: make revocations in `records` effective in memory.
    pub fn publish_revocations<'a>(&self, records: impl IntoIterator<Item = &'a AuditRecord>) {
        let mut set = self.revoked_set.write().unwrap_or_else(|p| p.into_inner());
        for r in records {
            if r.decision.outcome == Some(Outcome::Revoked)
                && let Some(serial) = &r.decision.serial
            {
                set.insert(serial.clone());
            }
        }
    }

    /// Whether `serial` was issued by this CA (according to the log).
    pub fn issued_record(&self, serial: &str) -> Result<Option<AuditRecord>, AuditError> {
        let Some(seq) = self.serials.get(serial.as_bytes())? else {
            return Ok(None);
        };
        let Some(v) = self.records.get(seq)? else {
            return Ok(None);
        };
        let (_, _, rec) = record::decode(&v).map_err(AuditError::Io)?;
        Ok(Some(rec))
    }

    /// The revocation of `serial`, if any.
    pub fn revocation(&self, serial: &str) -> Result<Option<Revocation>, AuditError> {
        match self.revoked.get(serial.as_bytes())? {
            Some(v) => Ok(Some(
                serde_json::from_slice(&v).map_err(|e| AuditError::Io(e.to_string()))?,
            )),
            None => Ok(None),
        }
    }

    /// Every record about `serial`: its issuance and its revocation.
    pub fn show(&self, serial: &str) -> Result<Vec<AuditRecord>, AuditError> {
        let mut out = Vec::new();
        if let Some(r) = self.issued_record(serial)? {
            out.push(r);
        }
        if let Some(rev) = self.revocation(serial)?
            && let Some(v) = self.records.get(seq_key(rev.seq))?
        {
            out.push(record::decode(&v).map_err(AuditError::Io)?.2);
        }
        Ok(out)
    }

    /// Records matching `filter`, oldest first.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<AuditRecord>, AuditError> {
        let since = match &filter.since {
            Some(s) => Some(
                OffsetDateTime::parse(s, &Rfc3339)
                    .map_err(|e| AuditError::Encode(format!("--since {s:?}: {e}")))?,
            ),
            None => None,
        };
        let mut out = Vec::new();
        for item in self.records.iter().rev() {
            let (_, v) = item?;
            let Ok((_, _, rec)) = record::decode(&v) else {
                continue;
            };
            if let Some(since) = since {
                match OffsetDateTime::parse(&rec.time, &Rfc3339) {
                    // Records are in time order: nothing older can match.
                    Ok(t) if t < since => break,
                    _ => {}
                }
            }
            if filter
                .outcome
                .is_some_and(|o| rec.decision.outcome != Some(o))
            {
                continue;
            }
            if let Some(id) = &filter.identity
                && rec.decision.caller.as_deref() != Some(id)
                && rec.decision.spiffe_id.as_deref() != Some(id)
            {
                continue;
            }
            out.push(rec);
            if filter.limit > 0 && out.len() >= filter.limit {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Walks the chain and reports modified, deleted or reordered records.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        let anchor: ChainPoint = match self.meta.get("anchor")? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| AuditError::Io(e.to_string()))?,
            None => ChainPoint {
                seq: 1,
                hash: GENESIS_HASH.into(),
            },
        };
        let mut report = VerifyReport {
            first_seq: anchor.seq,
            ..Default::default()
        };
        let mut expected = anchor.seq;
        let mut prev = anchor.hash.clone();
        let mut last_seen = anchor.seq.saturating_sub(1);
        for item in self.records.range(seq_key(anchor.seq)..) {
            let (k, v) = item?;
            let Some(seq) = seq_of(&k) else {
                report.problems.push("a record has a malformed key".into());
                continue;
            };
            if seq != expected {
                report.problems.push(if seq == expected + 1 {
                    format!("record {expected} is missing (deleted)")
                } else {
                    format!("records {expected} to {} are missing (deleted)", seq - 1)
                });
            }
            match record::decode(&v) {
                Err(e) => report.problems.push(format!("record {seq}: {e}")),
                Ok((stated, actual, rec)) => {
                    if stated != actual {
                        report.problems.push(format!(
                            "record {seq} was modified (its hash does not match its content)"
                        ));
                    } else if rec.seq != seq {
                        report.problems.push(format!(
                            "record stored at {seq} claims to be record {}",
                            rec.seq
                        ));
                    } else if rec.prev_hash != prev && seq == expected {
                        report.problems.push(format!(
                            "record {seq} does not follow record {} (the chain is broken: an earlier record was rewritten)",
                            seq.saturating_sub(1)
                        ));
                    }
                    prev = stated;
                }
            }
            report.checked += 1;
            expected = seq + 1;
            last_seen = seq;
        }
        report.head_seq = last_seen;
        report.head_hash = prev.clone();
        if let Some(v) = self.meta.get("head")? {
            let head: ChainPoint =
                serde_json::from_slice(&v).map_err(|e| AuditError::Io(e.to_string()))?;
            if head.seq > last_seen {
                report.problems.push(format!(
                    "records {} to {} are missing (the tail of the log was deleted)",
                    last_seen + 1,
                    head.seq
                ));
            } else if head.seq == last_seen && head.hash != prev {
                report.problems.push(format!(
                    "the head record {last_seen} differs from the recorded head"
                ));
            }
        }
        Ok(report)
    }

    /// Deletes records older than `cutoff`, keeping the newest record so the chain
    /// continues, and moves the verification anchor first (crash-safe order).
    pub fn prune_before(&self, cutoff: OffsetDateTime) -> Result<u64, AuditError> {
        let mut doomed = Vec::new();
        let mut new_anchor: Option<ChainPoint> = None;
        let last = self.records.last()?.and_then(|(k, _)| seq_of(&k));
        for item in self.records.iter() {
            let (k, v) = item?;
            let Some(seq) = seq_of(&k) else { continue };
            let Ok((_, _, rec)) = record::decode(&v) else {
                break;
            };
            let old = OffsetDateTime::parse(&rec.time, &Rfc3339)
                .map(|t| t < cutoff)
                .unwrap_or(false);
            if !old || Some(seq) == last {
                new_anchor = Some(ChainPoint {
                    seq,
                    hash: rec.prev_hash,
                });
                break;
            }
            doomed.push((
                seq,
                rec.decision
                    .serial
                    .filter(|_| rec.decision.outcome == Some(Outcome::Issued)),
            ));
        }
        let (Some(anchor), false) = (new_anchor, doomed.is_empty()) else {
            return Ok(0);
        };
        let v = serde_json::to_vec(&anchor).map_err(|e| AuditError::Encode(e.to_string()))?;
        self.meta.insert("anchor", v)?;
        self.db.flush()?;
        for (seq, serial) in &doomed {
            self.records.remove(seq_key(*seq))?;
            if let Some(s) = serial {
                self.serials.remove(s.as_bytes())?;
            }
        }
        self.db.flush()?;
        Ok(doomed.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Api;

    fn decision(i: u64) -> Append {
        Append {
            decision: Decision {
                api: Some(Api::Modern),
                outcome: Some(Outcome::Issued),
                serial: Some(format!("{i:x}")),
                spiffe_id: Some(format!("spiffe://cluster.local/ns/n/sa/s{i}")),
                ..Default::default()
            },
            revoke: None,
        }
    }

    #[test]
    fn retention_prunes_without_breaking_verification() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path()).unwrap();
        for r in store.write_batch((1..=5).map(decision).collect()) {
            r.unwrap();
        }
        store.flush_blocking().unwrap();
        assert_eq!(
            store
                .prune_before(OffsetDateTime::now_utc() - time::Duration::days(1))
                .unwrap(),
            0
        );
        // Everything is older than a cutoff in the future; the newest record stays.
        assert_eq!(
            store
                .prune_before(OffsetDateTime::now_utc() + time::Duration::days(1))
                .unwrap(),
            4
        );
        let report = store.verify().unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(
            (report.first_seq, report.head_seq, report.checked),
            (5, 5, 1)
        );
        assert!(
            store.issued_record("1").unwrap().is_none(),
            "pruned serial index entries go too"
        );
        assert!(store.issued_record("5").unwrap().is_some());
        for r in store.write_batch((6..=7).map(decision).collect()) {
            r.unwrap();
        }
        store.flush_blocking().unwrap();
        drop(store);
        let store = AuditStore::open(dir.path()).unwrap();
        let report = store.verify().unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.first_seq, report.head_seq), (5, 7));
        // Deleting the first retained record is still noticed.
        store.records.remove(seq_key(5)).unwrap();
        let report = store.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("record 5 is missing")),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn revocations_load_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = AuditStore::open(dir.path()).unwrap();
            let mut d = decision(9);
            d.decision.outcome = Some(Outcome::Revoked);
            d.revoke = Some(("9".into(), "test".into()));
            let written: Vec<_> = store
                .write_batch(vec![d])
                .into_iter()
                .map(Result::unwrap)
                .collect();
            store.flush_blocking().unwrap();
            store.publish_revocations(&written);
            assert!(store.revoked_set().read().unwrap().contains("9"));
        }
        let store = AuditStore::open(dir.path()).unwrap();
        assert!(store.revoked_set().read().unwrap().contains("9"));
        assert_eq!(store.revocation("9").unwrap().unwrap().reason, "test");
    }
}
