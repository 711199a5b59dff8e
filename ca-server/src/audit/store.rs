//! The audit store: an append-only, hash-chained log of decisions in sled.
//!
//! Trees:
//! - `records`: big-endian `seq` of a value's first record → the records of one group
//!   commit, each `hash\nbody`, newline-separated (see [`super::record::frames`]),
//! - `by-clock`: the issued serials of one value whose issuance clock (see
//!   [`ca_core::authority::serial_clock_nanos`]) falls in one 10 ms bucket: key
//!   `bucket ‖ seq of the value's first record`, value `serial seq` lines,
//! - `serials`: serial → `seq`, one entry per record: how stores written before
//!   `by-clock` existed index their serials, and the fallback for a serial without
//!   the clock's shape,
//! - `revoked`: serial → revocation (JSON), written in the same batch as its record,
//! - `meta`: `head` (last seq and hash) and `anchor` (where verification starts after
//!   retention pruned older records).
//!
//! A write is only acknowledged after `flush`, so a caller that was answered can rely
//! on the record surviving a crash. The CA private key never goes into sled.
//!
//! Why a value holds several records: sled rewrites a whole leaf node (up to 17
//! entries) on every insert, so with one ~700-byte record per key each insert copied
//! about 10 KB. One insert per group commit does that work once for the batch
//! (`ca-audit-bench`, docs/BENCHMARKS.md). The serial index follows suit: one entry
//! per value and clock bucket, not one per certificate; serials carry their issuance
//! time, so a lookup reads one bucket.

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
    by_clock: sled::Tree,
    serials: sled::Tree,
    revoked: sled::Tree,
    meta: sled::Tree,
    chain: Mutex<ChainPoint>,
    revoked_set: Arc<RwLock<HashSet<String>>>,
}

/// sled's page cache.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// A value is closed once it holds this many bytes. sled writes a log item larger than
/// a quarter of its 512 KiB segment as a file of its own (a "blob"), and a leaf node
/// holds up to 17 values: at 6 KiB a full node stays well inside the log.
const VALUE_BYTES: usize = 6 * 1024;

/// Records encoded for one sled value, not yet inserted.
struct Chunk {
    value: Vec<u8>,
    /// Where the chain stands after the last record of the chunk.
    head: Option<ChainPoint>,
    entries: Vec<ChunkEntry>,
}

impl Chunk {
    fn new() -> Self {
        Chunk {
            // Room for the record that crosses VALUE_BYTES: the value never reallocates.
            value: Vec::with_capacity(VALUE_BYTES + 2048),
            head: None,
            entries: Vec::new(),
        }
    }
}

/// Position in the caller's batch, the record, and its revocation (serial, reason).
type ChunkEntry = (usize, AuditRecord, Option<(String, String)>);

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Width of a `by-clock` bucket: at 10,000 certificates/s a bucket holds about a
/// dozen entries; at ordinary rates, one.
const BUCKET_NANOS: u64 = 10_000_000;

fn clock_bucket(serial: &str) -> Option<[u8; 8]> {
    ca_core::authority::serial_clock_nanos(serial).map(|ns| (ns / BUCKET_NANOS).to_be_bytes())
}

fn by_clock_key(bucket: [u8; 8], first_seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&bucket);
    key[8..].copy_from_slice(&seq_key(first_seq));
    key
}

/// The issued serial of a record, if it issued one.
fn issued_serial(rec: &AuditRecord) -> Option<&str> {
    match rec.decision.outcome {
        Some(Outcome::Issued) => rec.decision.serial.as_deref(),
        _ => None,
    }
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
        let by_clock = db.open_tree("by-clock")?;
        let serials = db.open_tree("serials")?;
        let revoked = db.open_tree("revoked")?;
        let meta = db.open_tree("meta")?;
        let chain = match records.last()? {
            Some((_, v)) => {
                let newest = record::frames(&v)
                    .pop()
                    .unwrap_or_else(|| Err("empty value".into()))
                    .map_err(AuditError::Io)?;
                ChainPoint {
                    seq: newest.record().map_err(AuditError::Io)?.seq,
                    hash: newest.stated_hash(),
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
            by_clock,
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
    /// append, in order; the caller must [`AuditStore::flush`] before acknowledging any
    /// of them.
    pub fn write_batch(&self, batch: Vec<Append>) -> Vec<Result<AuditRecord, AuditError>> {
        let mut chain = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        let mut slots: Vec<Option<Result<AuditRecord, AuditError>>> =
            std::iter::repeat_with(|| None).take(batch.len()).collect();
        let mut chunk = Chunk::new();
        let time = now_rfc3339();
        for (idx, append) in batch.into_iter().enumerate() {
            if append.decision.outcome.is_none() || append.decision.api.is_none() {
                slots[idx] = Some(Err(AuditError::Encode(
                    "decision without outcome or api".into(),
                )));
                continue;
            }
            let head = chunk.head.as_ref().unwrap_or(&chain);
            let rec = AuditRecord {
                seq: head.seq + 1,
                time: time.clone(),
                prev_hash: head.hash.clone(),
                decision: append.decision,
            };
            let mark = chunk.value.len();
            if mark > 0 {
                chunk.value.push(b'\n');
            }
            let hash = match record::encode_into(&rec, &mut chunk.value) {
                Ok(hash) => hash,
                Err(e) => {
                    chunk.value.truncate(mark);
                    slots[idx] = Some(Err(AuditError::Encode(e.to_string())));
                    continue;
                }
            };
            chunk.head = Some(ChainPoint { seq: rec.seq, hash });
            chunk.entries.push((idx, rec, append.revoke));
            if chunk.value.len() >= VALUE_BYTES {
                self.commit(
                    &mut chain,
                    std::mem::replace(&mut chunk, Chunk::new()),
                    &mut slots,
                );
            }
        }
        self.commit(&mut chain, chunk, &mut slots);
        if let Ok(head) = serde_json::to_vec(&*chain)
            && let Err(e) = self.meta.insert("head", head)
        {
            // The records themselves are written; the head is re-derived on open.
            tracing::warn!(error = %e, "could not update the audit head");
        }
        slots
            .into_iter()
            .map(|s| s.unwrap_or_else(|| Err(AuditError::Encode("record was not written".into()))))
            .collect()
    }

    /// Inserts one chunk. The chain only advances when its records are in the tree; if
    /// an index entry then fails, that record is reported failed (the certificate is
    /// not handed out) but stays in the log, which may over-report, never under-report.
    fn commit(
        &self,
        chain: &mut ChainPoint,
        chunk: Chunk,
        slots: &mut [Option<Result<AuditRecord, AuditError>>],
    ) {
        let (Some(head), Some((_, first, _))) = (chunk.head, chunk.entries.first()) else {
            return;
        };
        if let Err(e) = self.records.insert(seq_key(first.seq), chunk.value) {
            let why = e.to_string();
            for (idx, _, _) in chunk.entries {
                slots[idx] = Some(Err(AuditError::Io(why.clone())));
            }
            return;
        }
        *chain = head;
        let first_seq = first.seq;
        let mut failed: Vec<Option<AuditError>> = std::iter::repeat_with(|| None)
            .take(chunk.entries.len())
            .collect();
        // One index entry per clock bucket of this value's serials (usually one).
        let mut buckets: std::collections::BTreeMap<[u8; 8], (String, Vec<usize>)> =
            Default::default();
        for (i, (_, rec, _)) in chunk.entries.iter().enumerate() {
            let Some(serial) = issued_serial(rec) else {
                continue;
            };
            match clock_bucket(serial) {
                Some(bucket) => {
                    let (lines, members) = buckets.entry(bucket).or_default();
                    lines.push_str(&format!("{serial} {}\n", rec.seq));
                    members.push(i);
                }
                None => {
                    if let Err(e) = self.serials.insert(serial.as_bytes(), &seq_key(rec.seq)) {
                        failed[i] = Some(e.into());
                    }
                }
            }
        }
        for (bucket, (lines, members)) in buckets {
            if let Err(e) = self
                .by_clock
                .insert(by_clock_key(bucket, first_seq), lines.as_bytes())
            {
                for i in members {
                    failed[i] = Some(AuditError::Io(e.to_string()));
                }
            }
        }
        for ((idx, rec, revoke), failure) in chunk.entries.into_iter().zip(failed) {
            slots[idx] = Some(match failure {
                Some(e) => Err(e),
                None => self.record_revocation(&rec, revoke).map(|()| rec),
            });
        }
    }

    fn record_revocation(
        &self,
        rec: &AuditRecord,
        revoke: Option<(String, String)>,
    ) -> Result<(), AuditError> {
        if let Some((serial, reason)) = revoke {
            let r = Revocation {
                serial: serial.clone(),
                reason,
                seq: rec.seq,
            };
            let v = serde_json::to_vec(&r).map_err(|e| AuditError::Encode(e.to_string()))?;
            self.revoked.insert(serial.as_bytes(), v)?;
        }
        Ok(())
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

    /// The record with sequence number `seq`, if the log still holds it. A value holds
    /// consecutive records from its key on, so only that one record is parsed.
    fn record_at(&self, seq: u64) -> Result<Option<AuditRecord>, AuditError> {
        let Some(item) = self.records.range(..=seq_key(seq)).next_back() else {
            return Ok(None);
        };
        let (k, v) = item?;
        let position = seq_of(&k).and_then(|first| usize::try_from(seq - first).ok());
        let Some(frame) = position.and_then(|i| record::frames(&v).into_iter().nth(i)) else {
            return Ok(None);
        };
        let rec = frame.and_then(|f| f.record()).map_err(AuditError::Io)?;
        Ok((rec.seq == seq).then_some(rec))
    }

    /// Where the record that issued `serial` is: in its clock bucket, or for serials
    /// indexed one by one (older stores), in `serials`.
    fn seq_of_serial(&self, serial: &str) -> Result<Option<u64>, AuditError> {
        if let Some(bucket) = clock_bucket(serial) {
            for item in self.by_clock.scan_prefix(bucket) {
                let (_, lines) = item?;
                let found = String::from_utf8_lossy(&lines).lines().find_map(|line| {
                    let (s, seq) = line.split_once(' ')?;
                    (s == serial).then(|| seq.parse::<u64>().ok()).flatten()
                });
                if found.is_some() {
                    return Ok(found);
                }
            }
        }
        Ok(self
            .serials
            .get(serial.as_bytes())?
            .and_then(|v| seq_of(&v)))
    }

    /// Whether `serial` was issued by this CA (according to the log).
    pub fn issued_record(&self, serial: &str) -> Result<Option<AuditRecord>, AuditError> {
        let Some(seq) = self.seq_of_serial(serial)? else {
            return Ok(None);
        };
        // The index is written after the records; check that it points at this serial.
        Ok(self
            .record_at(seq)?
            .filter(|rec| issued_serial(rec) == Some(serial)))
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
            && let Some(rec) = self.record_at(rev.seq)?
        {
            out.push(rec);
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
        'values: for item in self.records.iter().rev() {
            let (_, v) = item?;
            for frame in record::frames(&v).into_iter().rev() {
                let Ok(rec) = frame.and_then(|f| f.record()) else {
                    continue;
                };
                if let Some(since) = since {
                    match OffsetDateTime::parse(&rec.time, &Rfc3339) {
                        // Records are in time order: nothing older can match.
                        Ok(t) if t < since => break 'values,
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
                    break 'values;
                }
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
        // Values are keyed by their first record; the anchor may sit inside a value
        // whose older records were written before retention moved it.
        let start = match self.records.range(..=seq_key(anchor.seq)).next_back() {
            Some(item) => item?.0.to_vec(),
            None => seq_key(anchor.seq).to_vec(),
        };
        for item in self.records.range(start..) {
            let (k, v) = item?;
            let Some(key) = seq_of(&k) else {
                report.problems.push("a record has a malformed key".into());
                continue;
            };
            for (i, frame) in record::frames(&v).into_iter().enumerate() {
                let position = key + i as u64;
                let (frame, rec) = match frame.and_then(|f| Ok((f, f.record()?))) {
                    Ok(d) => d,
                    Err(e) => {
                        report.problems.push(format!("record {position}: {e}"));
                        report.checked += 1;
                        expected = position + 1;
                        last_seen = position;
                        continue;
                    }
                };
                let intact = frame.intact();
                // A record's own sequence number is covered by its hash; trust it
                // unless the body was edited.
                let seq = if intact { rec.seq } else { position };
                if seq < anchor.seq {
                    continue;
                }
                if seq != expected {
                    report.problems.push(if seq == expected + 1 {
                        format!("record {expected} is missing (deleted)")
                    } else if seq > expected {
                        format!("records {expected} to {} are missing (deleted)", seq - 1)
                    } else {
                        format!("record {seq} appears again after record {}", expected - 1)
                    });
                }
                if !intact {
                    report.problems.push(format!(
                        "record {seq} was modified (its hash does not match its content)"
                    ));
                } else if i == 0 && rec.seq != key {
                    report.problems.push(format!(
                        "record stored at {key} claims to be record {}",
                        rec.seq
                    ));
                } else if rec.prev_hash != prev && seq == expected {
                    report.problems.push(format!(
                        "record {seq} does not follow record {} (the chain is broken: an earlier record was rewritten)",
                        seq.saturating_sub(1)
                    ));
                }
                prev = frame.stated_hash();
                report.checked += 1;
                expected = seq + 1;
                last_seen = seq;
            }
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

    /// Deletes records older than `cutoff`, keeping the newest group commit so the
    /// chain continues, and moves the verification anchor first (crash-safe order).
    /// A value goes only when all its records are older than the cutoff, so a few
    /// records written in the same group commit as a newer one stay a little longer.
    pub fn prune_before(&self, cutoff: OffsetDateTime) -> Result<u64, AuditError> {
        // Each doomed value: its key, how many records it holds, their issued serials.
        let mut doomed: Vec<(sled::IVec, u64, Vec<String>)> = Vec::new();
        let mut new_anchor: Option<ChainPoint> = None;
        let last = self.records.last()?.map(|(k, _)| k);
        for item in self.records.iter() {
            let (k, v) = item?;
            let Ok(recs) = record::records(&v) else {
                break;
            };
            let (Some((_, first)), Some((_, newest))) = (recs.first(), recs.last()) else {
                break;
            };
            let old = OffsetDateTime::parse(&newest.time, &Rfc3339)
                .map(|t| t < cutoff)
                .unwrap_or(false);
            if !old || Some(&k) == last.as_ref() {
                new_anchor = Some(ChainPoint {
                    seq: first.seq,
                    hash: first.prev_hash.clone(),
                });
                break;
            }
            let serials = recs
                .iter()
                .filter_map(|(_, rec)| issued_serial(rec).map(str::to_owned))
                .collect();
            doomed.push((k, recs.len() as u64, serials));
        }
        let (Some(anchor), false) = (new_anchor, doomed.is_empty()) else {
            return Ok(0);
        };
        let v = serde_json::to_vec(&anchor).map_err(|e| AuditError::Encode(e.to_string()))?;
        self.meta.insert("anchor", v)?;
        self.db.flush()?;
        let mut pruned = 0;
        for (key, records, serials) in &doomed {
            self.records.remove(key)?;
            let first_seq = seq_of(key).unwrap_or_default();
            let buckets: std::collections::BTreeSet<_> =
                serials.iter().filter_map(|s| clock_bucket(s)).collect();
            for bucket in buckets {
                self.by_clock.remove(by_clock_key(bucket, first_seq))?;
            }
            // Older stores indexed serials one by one, and their shape does not tell.
            for s in serials {
                self.serials.remove(s.as_bytes())?;
            }
            pruned += records;
        }
        self.db.flush()?;
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Api;

    /// Opens a store this process has just dropped. sled releases its file lock when
    /// its last background I/O job ends, which can be a moment after the drop.
    fn reopen(dir: &Path) -> AuditStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match AuditStore::open(dir) {
                Err(AuditError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other.unwrap(),
            }
        }
    }

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

    /// One group commit of `appends`, flushed; every record must be written.
    fn write_appends(store: &AuditStore, appends: Vec<Append>) -> Vec<AuditRecord> {
        let written = store
            .write_batch(appends)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        store.flush_blocking().unwrap();
        written
    }

    fn write(store: &AuditStore, range: std::ops::RangeInclusive<u64>) -> Vec<AuditRecord> {
        write_appends(store, range.map(decision).collect())
    }

    #[test]
    fn retention_prunes_without_breaking_verification() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path()).unwrap();
        // Five group commits of one record each.
        for i in 1..=5 {
            write(&store, i..=i);
        }
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
        write(&store, 6..=7);
        drop(store);
        let store = reopen(dir.path());
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
            let written = write_appends(&store, vec![d]);
            store.publish_revocations(&written);
            assert!(store.revoked_set().read().unwrap().contains("9"));
        }
        let store = reopen(dir.path());
        assert!(store.revoked_set().read().unwrap().contains("9"));
        assert_eq!(store.revocation("9").unwrap().unwrap().reason, "test");
    }

    fn problems(store: &AuditStore) -> Vec<String> {
        store.verify().unwrap().problems
    }

    #[test]
    fn a_group_commit_shares_values_and_every_record_stays_reachable() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path()).unwrap();
        let written = write(&store, 1..=3);
        assert_eq!(written.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(store.records.len(), 1, "one value for a small batch");
        // A large batch is split into values of bounded size.
        write(&store, 4..=200);
        let values = store.records.len();
        assert!(values > 2, "{values} values");
        for (_, v) in store.records.iter().map(Result::unwrap) {
            // Closed at VALUE_BYTES, plus the record that crossed it.
            assert!(v.len() < VALUE_BYTES + 2048, "{} bytes", v.len());
        }
        assert!(problems(&store).is_empty(), "{:?}", problems(&store));
        for i in [1, 2, 3, 4, 100, 200] {
            let rec = store.issued_record(&format!("{i:x}")).unwrap().unwrap();
            assert_eq!(rec.seq, i);
        }
        assert!(store.issued_record("fff").unwrap().is_none());
        let listed = store.list(&ListFilter::default()).unwrap();
        assert_eq!(listed.len(), 200);
        assert!(listed.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        let newest = store
            .list(&ListFilter {
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(newest.iter().map(|r| r.seq).collect::<Vec<_>>(), [199, 200]);
        // The chain continues across a restart.
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(write(&store, 201..=201)[0].seq, 201);
        let report = store.verify().unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.checked, report.head_seq), (201, 201));
    }

    /// Rewrites the value holding records 1..=3 with `f` applied to its lines.
    fn tamper_first_value(store: &AuditStore, f: impl FnOnce(&mut Vec<String>)) -> sled::IVec {
        let original = store.records.get(seq_key(1)).unwrap().unwrap();
        let mut lines: Vec<String> = String::from_utf8(original.to_vec())
            .unwrap()
            .split('\n')
            .map(str::to_owned)
            .collect();
        f(&mut lines);
        store
            .records
            .insert(seq_key(1), lines.join("\n").as_bytes())
            .unwrap();
        original
    }

    #[test]
    fn verify_finds_edits_and_deletions_inside_a_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path()).unwrap();
        write(&store, 1..=3);
        write(&store, 4..=4);
        assert!(problems(&store).is_empty());
        type Tamper = fn(&mut Vec<String>);
        // Lines are hash, body, hash, body, ...
        let cases: [(Tamper, &str); 4] = [
            // Edit record 2's body.
            (
                |l| l[3] = l[3].replace("/sa/s2", "/sa/xx"),
                "record 2 was modified",
            ),
            // Edit it and restate its hash: record 3 no longer follows it.
            (
                |l| {
                    l[3] = l[3].replace("/sa/s2", "/sa/xx");
                    l[2] = ca_core::x509::sha256_hex(l[3].as_bytes());
                },
                "record 3 does not follow record 2",
            ),
            // Drop record 2 from the middle of the value.
            (
                |l| {
                    l.drain(2..4);
                },
                "record 2 is missing",
            ),
            // Drop record 3, the last of its value.
            (|l| l.truncate(4), "record 3 is missing"),
        ];
        for (tamper, expected) in cases {
            let original = tamper_first_value(&store, tamper);
            let found = problems(&store);
            assert!(
                found.iter().any(|p| p.contains(expected)),
                "{expected:?} not in {found:?}"
            );
            store.records.insert(seq_key(1), original).unwrap();
            assert!(problems(&store).is_empty());
        }
    }

    #[test]
    fn retention_prunes_whole_group_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path()).unwrap();
        write(&store, 1..=3);
        write(&store, 4..=5);
        write(&store, 6..=6);
        let future = OffsetDateTime::now_utc() + time::Duration::days(1);
        assert_eq!(store.prune_before(future).unwrap(), 5);
        let report = store.verify().unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!((report.first_seq, report.checked), (6, 1));
        assert!(store.issued_record("3").unwrap().is_none());
        assert!(store.issued_record("6").unwrap().is_some());
    }

    fn clock_serial() -> String {
        ca_core::x509::hex(
            &ca_core::authority::fresh_serial(&ring::rand::SystemRandom::new()).unwrap(),
        )
    }

    #[test]
    fn serials_are_indexed_per_value_by_their_clock() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path()).unwrap();
        let serials: Vec<String> = (0..40).map(|_| clock_serial()).collect();
        let batch = |range: std::ops::Range<usize>| {
            range
                .map(|i| {
                    let mut d = decision(i as u64);
                    d.decision.serial = Some(serials[i].clone());
                    d
                })
                .collect::<Vec<_>>()
        };
        write_appends(&store, batch(0..30));
        // A denial carries no serial and is not indexed.
        let mut denied = decision(99);
        denied.decision.outcome = Some(Outcome::Denied);
        denied.decision.serial = None;
        let mut rest = batch(30..40);
        rest.push(denied);
        write_appends(&store, rest);
        let values = store.records.len();
        assert!(
            store.by_clock.len() <= 2 * values,
            "{} index entries for {values} values",
            store.by_clock.len()
        );
        assert_eq!(store.serials.len(), 0, "no per-certificate entries");
        for (i, serial) in serials.iter().enumerate() {
            let rec = store.issued_record(serial).unwrap().unwrap();
            assert_eq!(rec.seq, i as u64 + 1);
        }
        // Same bucket, different serial: not found.
        let mut other = serials[0].clone().into_bytes();
        other[31] = if other[31] == b'0' { b'1' } else { b'0' };
        assert!(
            store
                .issued_record(std::str::from_utf8(&other).unwrap())
                .unwrap()
                .is_none()
        );
        // Pruning removes the index entries of what it prunes.
        write(&store, 1000..=1000);
        let future = OffsetDateTime::now_utc() + time::Duration::days(1);
        assert_eq!(store.prune_before(future).unwrap(), 41);
        assert_eq!(store.by_clock.len(), 0);
        assert!(store.issued_record(&serials[5]).unwrap().is_none());
        assert!(problems(&store).is_empty(), "{:?}", problems(&store));
    }
}
