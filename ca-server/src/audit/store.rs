//! The audit store: decisions, the certificates they issued and the revocations, in
//! SQLite (a file in the state directory, the embedded default) or PostgreSQL (shared
//! by every replica), through one code path on sqlx's Any driver.
//!
//! Durability: a batch is acknowledged only after its transaction commits. SQLite runs
//! in WAL mode with `synchronous = FULL`, so every commit fsyncs the log; PostgreSQL
//! sessions set `synchronous_commit = on`, so a commit returns once the WAL is flushed.
//!
//! Tamper evidence with several writers: each writer appends to a hash chain of its
//! own (`audit_chains`). Two processes that share a chain name still never fork it:
//! (chain, seq) is unique, so a writer appending after a stale remembered head has the
//! whole batch refused, and then appends with the chain's head row locked.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection as _, Row as _, Transaction};
use time::OffsetDateTime;

use super::record::{
    self, AuditRecord, Decision, EncodeError, GENESIS_HASH, Outcome, Row, serial_bytes, serial_text,
};
use super::schema;

/// Why the audit store failed. Any of these stops issuance: no record, no certificate.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database refused or could not be reached.
    #[error("audit store error: {0}")]
    Database(#[from] sqlx::Error),
    /// A batch could not be committed; shared by every request of the batch.
    #[error("{0}")]
    Unavailable(Arc<AuditError>),
    /// The store failed recently and has not accepted a probe write since.
    #[error("the audit store is failing: {0}")]
    Failing(String),
    /// The database did not answer in time.
    #[error("the audit store did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The store was written by a newer version of this CA.
    #[error(
        "the audit store has schema version {found}; this build knows up to {known}: upgrade ca-server"
    )]
    SchemaTooNew {
        /// Version in the store.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// The store has not been migrated to this build's schema, and the command only
    /// reads (it does not migrate a store a running server of another version uses).
    #[error(
        "the audit store has schema version {found}; this build reads version {known}: start ca-server of this version once to migrate it, or use the ca-server that wrote it"
    )]
    SchemaTooOld {
        /// Version in the store.
        found: i64,
        /// Version this build reads.
        known: i64,
    },
    /// A store opened for reading was asked to write.
    #[error("the audit store was opened for reading only")]
    ReadOnly,
    /// SQLite could not switch to write-ahead logging, which durability relies on.
    #[error(
        "SQLite at {0} did not accept journal_mode=WAL (a file system without shared-memory support?)"
    )]
    NoWal(String),
    /// The record could not be encoded.
    #[error("audit record could not be encoded: {0}")]
    Encode(#[from] EncodeError),
    /// A stored row this CA cannot read.
    #[error("audit store holds a row this CA cannot read: {0}")]
    Corrupt(String),
    /// The writer task is gone (the server is shutting down).
    #[error("the audit writer has stopped")]
    WriterGone,
}

/// Which SQL the store speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite, embedded.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Dialect {
    /// Begins a transaction that writes. SQLite takes its write lock at once, so two
    /// writers never both read a chain head and then collide on the upgrade.
    pub(super) async fn begin_write(
        self,
        conn: &mut AnyConnection,
    ) -> Result<Transaction<'_, Any>, sqlx::Error> {
        match self {
            Dialect::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => conn.begin().await,
        }
    }

    /// What locks a selected row until the transaction ends (SQLite's write lock
    /// already covers the whole database).
    fn for_update(self) -> &'static str {
        match self {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }
}

/// A pooled connection for one write transaction. Unless the transaction is marked
/// committed, the connection is closed rather than returned to the pool: a COMMIT
/// that failed (a full disk) can leave SQLite's transaction open, and a transaction
/// abandoned mid-way (a timeout) leaves the connection in an unknown state.
pub(super) struct WriteConnection {
    conn: PoolConnection<Any>,
    committed: bool,
}

impl WriteConnection {
    pub(super) async fn acquire(pool: &AnyPool) -> Result<Self, sqlx::Error> {
        Ok(WriteConnection {
            conn: pool.acquire().await?,
            committed: false,
        })
    }

    pub(super) fn conn(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }

    /// The transaction committed: the connection may be reused.
    pub(super) fn committed(&mut self) {
        self.committed = true;
    }
}

impl Drop for WriteConnection {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}

/// Where the store lives: `--store`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://user:password@host/db?sslmode=verify-full`).
    Postgres(String),
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl StoreLocation {
    /// Parses `--store`: empty or `sqlite` for `<state-dir>/audit.db`, `sqlite:PATH`,
    /// or a `postgres://` / `postgresql://` URL.
    pub fn parse(spec: &str, state_dir: &Path) -> Result<Self, String> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "sqlite" {
            return Ok(StoreLocation::Sqlite(state_dir.join("audit.db")));
        }
        if let Some(path) = spec
            .strip_prefix("sqlite://")
            .or_else(|| spec.strip_prefix("sqlite:"))
        {
            if path.is_empty() || path.contains(['?', '#', '%']) {
                return Err(format!(
                    "--store {spec:?}: give a plain file path after sqlite: (no '?', '#' or '%')"
                ));
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            url::Url::parse(spec)
                .map_err(|e| format!("--store: not a valid PostgreSQL URL: {e}"))?;
            return Ok(StoreLocation::Postgres(spec.to_owned()));
        }
        Err(format!(
            "--store {:?}: use sqlite, sqlite:PATH or postgres://USER@HOST/DB",
            StoreLocation::Postgres(spec.to_owned()).describe()
        ))
    }

    /// For messages and logs: the PostgreSQL URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Sqlite(p) => format!("sqlite:{}", p.display()),
            StoreLocation::Postgres(url) => match url::Url::parse(url) {
                Ok(mut u) => {
                    if u.password().is_some() {
                        let _ = u.set_password(Some("***"));
                    }
                    u.to_string()
                }
                Err(_) => "postgres://(unparsable URL)".into(),
            },
        }
    }

    fn dialect(&self) -> Dialect {
        match self {
            StoreLocation::Sqlite(_) => Dialect::Sqlite,
            StoreLocation::Postgres(_) => Dialect::Postgres,
        }
    }

    fn url(&self) -> String {
        match self {
            StoreLocation::Sqlite(p) => format!("sqlite://{}?mode=rwc", p.display()),
            StoreLocation::Postgres(url) => url.clone(),
        }
    }
}

/// A revocation to record with its decision.
#[derive(Clone, Debug)]
pub struct Revoke {
    /// Serial of the revoked certificate.
    pub serial: String,
    /// When it expires: the revocation is kept until then.
    pub not_after: i64,
}

/// What to write in one request.
#[derive(Debug)]
pub struct Append {
    /// The decision.
    pub decision: Decision,
    /// When the decision is a revocation: what it revokes.
    pub revoke: Option<Revoke>,
}

/// A certificate this CA issued, as `certificates` keeps it until it expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// Serial, hex.
    pub serial: String,
    /// End of validity, unix seconds.
    pub not_after: i64,
    /// The client certificate it was renewed from, if any.
    pub parent: Option<String>,
    /// Chain and sequence number of its audit record (which retention may have pruned).
    pub chain: String,
    /// See `chain`.
    pub seq: u64,
}

/// A revocation as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Serial of the revoked certificate.
    pub serial: String,
    /// Why, as the admin said it (or why it followed another revocation).
    pub reason: String,
    /// For a certificate revoked because it was renewed from a revoked one: that one.
    pub cause: Option<String>,
}

/// One chain's part of [`VerifyReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// The chain's name.
    pub chain: String,
    /// Sequence number verification started from (after retention pruning).
    pub first_seq: u64,
    /// Last sequence number.
    pub head_seq: u64,
    /// Hash of the head record, hex.
    pub head_hash: String,
}

/// Result of [`AuditStore::verify`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Records checked, over every chain.
    pub checked: u64,
    /// Every chain's extent and head. Note them down elsewhere (or sign them: `audit
    /// checkpoint`) to detect a rewritten or truncated store later.
    pub chains: Vec<ChainHead>,
    /// Signed checkpoints checked against the chains.
    pub checkpoints: u64,
    /// Chains whose anchor retention has moved: each must carry the CA's signature.
    pub anchors: u64,
    /// Whether the signatures of checkpoints and anchors were checked (the CA
    /// certificate was at hand); without it only their presence is.
    pub signatures_checked: bool,
    /// Every problem found; empty means every chain is intact.
    pub problems: Vec<String>,
}

/// Filter for [`AuditStore::list`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListFilter {
    /// The record's identity: the SPIFFE ID it granted, or, when it granted none, the
    /// caller.
    pub identity: Option<String>,
    /// Only records at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only this outcome.
    pub outcome: Option<Outcome>,
    /// At most this many (the newest), 0 = all.
    pub limit: usize,
}

/// The writer's chain; none for a store opened to read.
#[derive(Clone, Debug)]
struct Chain {
    id: i64,
    name: String,
}

/// The store. Cheap to share; every method is one or a few transactions.
pub struct AuditStore {
    pool: AnyPool,
    /// The group commit's own connection, opened on first use. One connection keeps
    /// SQLite's page cache warm: a pool hands out its connections in turn, and each
    /// found its cache stale after the others' commits and read its pages again.
    /// Taken out while a batch is written, and put back only after it committed, so
    /// a batch abandoned mid-way (a timeout) closes it.
    committer: tokio::sync::Mutex<Option<AnyConnection>>,
    dialect: Dialect,
    location: StoreLocation,
    /// The chain appends go to; `None` when opened with [`AuditStore::open_reader`].
    chain: Option<Chain>,
    /// The chain's head as this writer last committed it, while it is known.
    head: std::sync::Mutex<Option<(i64, [u8; 32])>>,
}

impl AuditStore {
    /// Closes every connection, waiting for those in use: SQLite then checkpoints its
    /// write-ahead log into the database and removes it, so a stopped server leaves
    /// one file behind.
    pub async fn close(&self) {
        if let Some(conn) = self.committer.lock().await.take()
            && let Err(e) = conn.close().await
        {
            tracing::warn!(error = %e, "closing the audit store's commit connection");
        }
        self.pool.close().await;
    }
}

/// What every connection runs first.
fn session_statements(dialect: Dialect) -> &'static [&'static str] {
    match dialect {
        // Per connection: FULL makes every commit fsync the write-ahead log.
        Dialect::Sqlite => &["PRAGMA synchronous = FULL", "PRAGMA busy_timeout = 5000"],
        Dialect::Postgres => &["SET synchronous_commit = on"],
    }
}

/// Current time in unix microseconds.
pub fn now_us() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// Rows per multi-row INSERT: 21 parameters each, well under both databases' limits.
const INSERT_ROWS: usize = 64;

/// Records of a batch, chained: the row, its hash, and the append it came from.
type ChainedRows<'a> = Vec<(Row, [u8; 32], &'a Append)>;

/// The columns of `audit_records` after `id`, in the order [`Row`] binds them.
const RECORD_COLUMNS: &str = "chain_id, seq, time_us, api, outcome, reason, detail, authenticator, caller, peer, requested_ttl, granted_ttl, spiffe_id, serial, client_serial, not_before, not_after, spki_sha256, cert_sha256, hash, caller_same";

/// `INSERT INTO table (columns) VALUES (...), (...)` for `rows` rows of `width`
/// parameters. SQLite gets anonymous `?` parameters: sqlx binds named ones (`$1`) by
/// asking SQLite each parameter's name, a linear search per parameter, which made a
/// multi-row INSERT's binding quadratic (the largest cost of a commit, in a profile).
fn insert_sql(dialect: Dialect, table: &str, columns: &str, width: usize, rows: usize) -> String {
    let mut sql = format!("INSERT INTO {table} ({columns}) VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            if c > 0 {
                sql.push_str(", ");
            }
            match dialect {
                Dialect::Sqlite => sql.push('?'),
                Dialect::Postgres => sql.push_str(&format!("${}", r * width + c + 1)),
            }
        }
        sql.push(')');
    }
    sql
}

type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>;

fn bind_row<'q>(q: AnyQuery<'q>, chain_id: i64, row: &Row, hash: &[u8; 32]) -> AnyQuery<'q> {
    q.bind(chain_id)
        .bind(row.seq)
        .bind(row.time_us)
        .bind(row.api)
        .bind(row.outcome)
        .bind(row.reason.clone())
        .bind(row.detail.clone())
        .bind(row.authenticator.clone())
        .bind(row.caller.clone())
        .bind(row.peer.clone())
        .bind(row.requested_ttl)
        .bind(row.granted_ttl)
        .bind(row.spiffe_id.clone())
        .bind(row.serial.clone())
        .bind(row.client_serial.clone())
        .bind(row.not_before)
        .bind(row.not_after)
        .bind(row.spki_sha256.clone())
        .bind(row.cert_sha256.clone())
        .bind(hash.to_vec())
        .bind(i16::from(row.caller_same))
}

const SELECT_RECORD: &str = "SELECT c.name, r.seq, r.time_us, r.api, r.outcome, r.reason, r.detail, r.authenticator, r.caller, r.peer, r.requested_ttl, r.granted_ttl, r.spiffe_id, r.serial, r.client_serial, r.not_before, r.not_after, r.spki_sha256, r.cert_sha256, r.hash, r.caller_same FROM audit_records r JOIN audit_chains c ON c.id = r.chain_id";

/// Reads the columns of [`SELECT_RECORD`] (chain name first, then the row, the hash).
fn read_row(row: &sqlx::any::AnyRow) -> Result<(String, Row, Vec<u8>), sqlx::Error> {
    Ok((
        row.try_get(0)?,
        Row {
            seq: row.try_get(1)?,
            time_us: row.try_get(2)?,
            api: row.try_get(3)?,
            outcome: row.try_get(4)?,
            reason: row.try_get(5)?,
            detail: row.try_get(6)?,
            authenticator: row.try_get(7)?,
            caller: row.try_get(8)?,
            peer: row.try_get(9)?,
            requested_ttl: row.try_get(10)?,
            granted_ttl: row.try_get(11)?,
            spiffe_id: row.try_get(12)?,
            serial: row.try_get(13)?,
            client_serial: row.try_get(14)?,
            not_before: row.try_get(15)?,
            not_after: row.try_get(16)?,
            spki_sha256: row.try_get(17)?,
            cert_sha256: row.try_get(18)?,
            caller_same: row.try_get::<i64, _>(20)? != 0,
        },
        row.try_get(19)?,
    ))
}

fn decode_record(row: &sqlx::any::AnyRow) -> Result<AuditRecord, AuditError> {
    let (chain, r, hash) = read_row(row)?;
    let seq = r.seq;
    r.decode(&chain, &hash)
        .ok_or_else(|| AuditError::Corrupt(format!("record {seq} of chain {chain}")))
}

fn hash32(v: &[u8]) -> [u8; 32] {
    v.try_into().unwrap_or([0xff; 32])
}

/// The reason stored for a certificate revoked because it was renewed from one.
const FOLLOWED: &str = "renewed from a revoked certificate";

/// Revokes every certificate renewed, directly or not, from `$1`, recording `$1` as
/// the cause and the admin revocation's record (`$2`, `$3`) as the decision.
///
/// A line of renewals shares its `root` (the first certificate of the line, typically
/// a bundle), and the walk stays inside the line, through the `root` index: no index
/// on `parent` is needed (it would cost ~44 bytes a record). Revoking a line's root
/// takes the whole line, because the certificates between a bundle and today's leaf
/// have expired and left the table; revoking one inside a line follows `parent` from it.
const REVOKE_DESCENDANTS: &str = "WITH RECURSIVE line(serial, not_after, parent) AS (
        SELECT serial, not_after, parent FROM certificates
         WHERE root = COALESCE((SELECT root FROM certificates WHERE serial = $1), $1)
    ),
    descendants(serial, not_after, parent) AS (
        SELECT serial, not_after, parent FROM line
         WHERE parent = $1
            OR NOT EXISTS (SELECT 1 FROM certificates WHERE serial = $1 AND root IS NOT NULL)
        UNION
        SELECT l.serial, l.not_after, l.parent FROM line l JOIN descendants d ON l.parent = d.serial
    )
    INSERT INTO revocations (serial, not_after, reason, cause, chain_id, seq, time_us)
    SELECT serial, not_after, $4, parent, $2, $3, $5 FROM descendants WHERE true
    ON CONFLICT (serial) DO NOTHING
    RETURNING serial";

/// What one committed batch did.
#[derive(Debug, Default)]
pub struct Appended {
    /// One result per append, in order.
    pub results: Vec<Result<AuditRecord, EncodeError>>,
    /// Every serial the batch revoked: the admins' and those renewed from them.
    pub revoked: Vec<String>,
}

impl AuditStore {
    /// Opens (creating and migrating if needed) the store at `location`, appending to
    /// the chain named `chain`.
    pub async fn open(location: &StoreLocation, chain: &str) -> Result<Self, AuditError> {
        let (pool, dialect) = Self::connect(location).await?;
        schema::migrate(&pool, dialect).await?;
        sqlx::query(
            "INSERT INTO audit_chains (name, head_seq, head_hash, anchor_seq, anchor_hash)
             VALUES ($1, 0, $2, 1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(chain)
        .bind(GENESIS_HASH.to_vec())
        .execute(&pool)
        .await?;
        let (id,): (i64,) = sqlx::query_as("SELECT id FROM audit_chains WHERE name = $1")
            .bind(chain)
            .fetch_one(&pool)
            .await?;
        Ok(AuditStore {
            pool,
            committer: tokio::sync::Mutex::new(None),
            dialect,
            location: location.clone(),
            chain: Some(Chain {
                id,
                name: chain.to_owned(),
            }),
            head: std::sync::Mutex::new(None),
        })
    }

    /// Opens the store at `location` to read (list, show, verify): no migration, no
    /// chain of its own, and a schema other than this build's is refused. Appending,
    /// pruning and checkpointing fail with [`AuditError::ReadOnly`].
    pub async fn open_reader(location: &StoreLocation) -> Result<Self, AuditError> {
        let (pool, dialect) = Self::connect(location).await?;
        schema::check(&pool).await?;
        Ok(AuditStore {
            pool,
            committer: tokio::sync::Mutex::new(None),
            dialect,
            location: location.clone(),
            chain: None,
            head: std::sync::Mutex::new(None),
        })
    }

    /// The connection pool, each connection set up for durable commits.
    async fn connect(location: &StoreLocation) -> Result<(AnyPool, Dialect), AuditError> {
        sqlx::any::install_default_drivers();
        let dialect = location.dialect();
        if let StoreLocation::Sqlite(path) = location
            && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        {
            crate::fsutil::create_private_dir(dir)
                .map_err(|e| AuditError::Database(sqlx::Error::Io(e)))?;
        }
        let session = session_statements(dialect);
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .min_connections(0)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    for s in session {
                        sqlx::raw_sql(*s).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&location.url())
            .await?;
        if dialect == Dialect::Sqlite {
            let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode = WAL")
                .fetch_one(&pool)
                .await?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(AuditError::NoWal(location.describe()));
            }
        }
        Ok((pool, dialect))
    }

    /// The group commit's connection, taken out of its slot (opened if there is none):
    /// the caller puts it back after a commit, and dropping it instead closes it.
    async fn committer(
        &self,
    ) -> Result<
        (
            tokio::sync::MutexGuard<'_, Option<AnyConnection>>,
            AnyConnection,
        ),
        AuditError,
    > {
        let mut slot = self.committer.lock().await;
        let conn = match slot.take() {
            Some(conn) => conn,
            None => self.connect_one().await?,
        };
        Ok((slot, conn))
    }

    /// A connection of the store's own, set up as the pool's are.
    async fn connect_one(&self) -> Result<AnyConnection, AuditError> {
        let mut conn = AnyConnection::connect(&self.location.url()).await?;
        for s in session_statements(self.dialect) {
            sqlx::raw_sql(*s).execute(&mut conn).await?;
        }
        Ok(conn)
    }

    /// The chain appends go to, or [`AuditError::ReadOnly`].
    fn chain(&self) -> Result<&Chain, AuditError> {
        self.chain.as_ref().ok_or(AuditError::ReadOnly)
    }

    /// Where the store is, for messages.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Writes a batch in one transaction and returns once it is durable. Appends that
    /// cannot be encoded fail alone; when the transaction fails, the whole batch does
    /// (the outer error) and nothing of it was recorded.
    pub async fn append(&self, batch: &[Append]) -> Result<Appended, AuditError> {
        self.chain()?;
        let time_us = now_us();
        let simple = batch.len() <= INSERT_ROWS && batch.iter().all(|a| a.revoke.is_none());
        let cached = *self.head.lock().unwrap_or_else(|p| p.into_inner());
        if let (true, Some(head)) = (simple, cached) {
            match self.append_one_statement(batch, head, time_us).await {
                Ok(done) => return Ok(done),
                // Another writer appended to this chain since: start from the store's head.
                Err(AuditError::Database(sqlx::Error::Database(e)))
                    if e.kind() == sqlx::error::ErrorKind::UniqueViolation =>
                {
                    tracing::debug!("the chain's head moved under this writer; rereading it");
                }
                Err(e) => {
                    self.forget_head();
                    return Err(e);
                }
            }
        }
        let done = self.append_locked(batch, time_us).await;
        if done.is_err() {
            self.forget_head();
        }
        done
    }

    fn forget_head(&self) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn remember_head(&self, seq: i64, hash: [u8; 32]) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = Some((seq, hash));
    }

    /// Encodes and chains `batch` after `head`: the rows to insert, and each append's
    /// result. Appends that cannot be encoded fail alone and take no place in the chain.
    fn chain_rows<'a>(
        &self,
        chain: &Chain,
        batch: &'a [Append],
        head: (i64, [u8; 32]),
        time_us: i64,
    ) -> (ChainedRows<'a>, Vec<Result<AuditRecord, EncodeError>>) {
        let (mut seq, mut prev) = head;
        let mut rows = Vec::with_capacity(batch.len());
        let results = batch
            .iter()
            .map(|append| {
                let row = Row::encode(&append.decision, seq + 1, time_us)?;
                seq += 1;
                let hash = row.hash(&prev, &chain.name);
                prev = hash;
                rows.push((row, hash, append));
                Ok(AuditRecord {
                    chain: chain.name.clone(),
                    seq: seq as u64,
                    time: record::rfc3339_us(time_us),
                    hash: ca_core::x509::hex(&hash),
                    decision: append.decision.clone(),
                })
            })
            .collect();
        (rows, results)
    }

    /// The common case, a batch of decisions without revocations: one INSERT, atomic
    /// and durable on its own; the database's triggers index the certificates and move
    /// the chain's head. One round trip to the database per commit instead of five.
    /// The head comes from this writer's memory; if another writer has appended to the
    /// chain since, the sequence numbers collide and nothing is written.
    async fn append_one_statement(
        &self,
        batch: &[Append],
        head: (i64, [u8; 32]),
        time_us: i64,
    ) -> Result<Appended, AuditError> {
        let (rows, results) = self.chain_rows(self.chain()?, batch, head, time_us);
        if let Some((last, last_hash, _)) = rows.last() {
            let (mut slot, mut conn) = self.committer().await?;
            self.insert_records(&mut conn, &rows).await?;
            *slot = Some(conn);
            self.remember_head(last.seq, *last_hash);
        }
        Ok(Appended {
            results,
            revoked: Vec::new(),
        })
    }

    /// Every other batch (revocations, more rows than one INSERT takes, an unknown
    /// head): one transaction that locks the chain's head first.
    async fn append_locked(&self, batch: &[Append], time_us: i64) -> Result<Appended, AuditError> {
        let (mut slot, mut conn) = self.committer().await?;
        let done = self.append_locked_on(&mut conn, batch, time_us).await?;
        *slot = Some(conn);
        Ok(done)
    }

    async fn append_locked_on(
        &self,
        conn: &mut AnyConnection,
        batch: &[Append],
        time_us: i64,
    ) -> Result<Appended, AuditError> {
        let mut tx = self.dialect.begin_write(conn).await?;
        let (head_seq, head_hash): (i64, Vec<u8>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT head_seq, head_hash FROM audit_chains WHERE id = $1{}",
            self.dialect.for_update()
        )))
        .bind(self.chain()?.id)
        .fetch_one(&mut *tx)
        .await?;
        let head = (head_seq, hash32(&head_hash));
        let (rows, results) = self.chain_rows(self.chain()?, batch, head, time_us);
        for chunk in rows.chunks(INSERT_ROWS) {
            self.insert_records(&mut tx, chunk).await?;
        }
        let mut revoked = Vec::new();
        for (row, _, append) in &rows {
            if let Some(revoke) = &append.revoke {
                revoked.extend(
                    self.insert_revocation(&mut tx, row, revoke, time_us)
                        .await?,
                );
            }
        }
        tx.commit().await?;
        let (seq, hash) = rows.last().map_or(head, |(r, h, _)| (r.seq, *h));
        self.remember_head(seq, hash);
        Ok(Appended { results, revoked })
    }

    /// One multi-row INSERT of chained records.
    async fn insert_records(
        &self,
        conn: &mut AnyConnection,
        rows: &[(Row, [u8; 32], &Append)],
    ) -> Result<(), AuditError> {
        let chain_id = self.chain()?.id;
        let sql = insert_sql(
            self.dialect,
            "audit_records",
            RECORD_COLUMNS,
            21,
            rows.len(),
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (row, hash, _) in rows {
            q = bind_row(q, chain_id, row, hash);
        }
        q.execute(conn).await?;
        Ok(())
    }

    /// Records a revocation and revokes everything renewed from the certificate, in the
    /// batch's transaction; PostgreSQL replicas are told at commit. Returns every
    /// serial revoked.
    async fn insert_revocation(
        &self,
        tx: &mut Transaction<'_, Any>,
        row: &Row,
        revoke: &Revoke,
        time_us: i64,
    ) -> Result<Vec<String>, AuditError> {
        let reason = row.detail.clone().unwrap_or_else(|| "revoked".into());
        let key = record::serial_key("serial", &revoke.serial)?;
        sqlx::query(
            "INSERT INTO revocations (serial, not_after, reason, cause, chain_id, seq, time_us)
             VALUES ($1, $2, $3, NULL, $4, $5, $6) ON CONFLICT (serial) DO NOTHING",
        )
        .bind(key.clone())
        .bind(revoke.not_after)
        .bind(reason)
        .bind(self.chain()?.id)
        .bind(row.seq)
        .bind(time_us)
        .execute(&mut **tx)
        .await?;
        let followed: Vec<(Vec<u8>,)> = sqlx::query_as(REVOKE_DESCENDANTS)
            .bind(key)
            .bind(self.chain()?.id)
            .bind(row.seq)
            .bind(FOLLOWED)
            .bind(time_us)
            .fetch_all(&mut **tx)
            .await?;
        if !followed.is_empty() {
            tracing::info!(serial = %revoke.serial, followed = followed.len(), "revoked the certificates renewed from it too");
        }
        let mut revoked = vec![revoke.serial.clone()];
        revoked.extend(followed.iter().map(|(s,)| serial_text(s)));
        if self.dialect == Dialect::Postgres {
            self.notify(tx, &revoked).await?;
        }
        Ok(revoked)
    }

    /// Tells the other replicas about `serials` when the transaction commits: one
    /// notification per few hundred serials (a payload holds under 8000 bytes).
    async fn notify(
        &self,
        tx: &mut Transaction<'_, Any>,
        serials: &[String],
    ) -> Result<(), AuditError> {
        for chunk in serials.chunks(100) {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(super::revocations::NOTIFY_CHANNEL)
                .bind(chunk.join("\n"))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Revokes certificates renewed from a revoked one that a revocation's own pass
    /// did not see: one issued by another replica while the revocation committed.
    /// Looks at revocations since `since_us`; returns how many it added.
    pub async fn revoke_followers(&self, since_us: i64) -> Result<u64, AuditError> {
        let result = sqlx::query(
            "WITH RECURSIVE recent(serial, root, whole_line, chain_id, seq) AS (
                SELECT r.serial, COALESCE(c.root, r.serial), c.root IS NULL, r.chain_id, r.seq
                  FROM revocations r LEFT JOIN certificates c ON c.serial = r.serial
                 WHERE r.time_us >= $1
            ),
            descendants(serial, not_after, parent, root, chain_id, seq) AS (
                SELECT c.serial, c.not_after, c.parent, c.root, r.chain_id, r.seq
                  FROM recent r JOIN certificates c ON c.root = r.root
                 WHERE r.whole_line OR c.parent = r.serial
                UNION
                SELECT c.serial, c.not_after, c.parent, c.root, d.chain_id, d.seq
                  FROM descendants d JOIN certificates c ON c.root = d.root AND c.parent = d.serial
            )
            INSERT INTO revocations (serial, not_after, reason, cause, chain_id, seq, time_us)
            SELECT serial, not_after, $2, parent, chain_id, seq, $3 FROM descendants WHERE true
            ON CONFLICT (serial) DO NOTHING",
        )
        .bind(since_us)
        .bind(FOLLOWED)
        .bind(now_us())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// Revoked serials, and when each revocation was recorded, for revocations recorded
    /// at or after `since_us` (all of them for 0), skipping expired certificates.
    pub async fn revoked_since(&self, since_us: i64) -> Result<Vec<(String, i64)>, AuditError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
            "SELECT serial, time_us FROM revocations WHERE time_us >= $1 AND not_after >= $2",
        )
        .bind(since_us)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(serial, time)| (serial_text(&serial), time))
            .collect())
    }

    /// Writes the probe row: whether the store accepts a commit right now.
    pub async fn probe(&self) -> Result<(), AuditError> {
        sqlx::query("UPDATE store_probe SET time_us = $1 WHERE id = 1")
            .bind(now_us())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The certificate with `serial`, while it is valid (or expired less than the
    /// expiry grace ago).
    pub async fn certificate(&self, serial: &str) -> Result<Option<IssuedCertificate>, AuditError> {
        let Some(key) = serial_bytes(serial) else {
            return Ok(None);
        };
        let row: Option<CertificateRow> = sqlx::query_as(
            "SELECT c.serial, c.not_after, c.parent, ch.name, c.seq
               FROM certificates c JOIN audit_chains ch ON ch.id = c.chain_id
              WHERE c.serial = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(
            |(serial, not_after, parent, chain, seq)| IssuedCertificate {
                serial: serial_text(&serial),
                not_after,
                parent: parent.as_deref().map(serial_text),
                chain,
                seq: seq as u64,
            },
        ))
    }

    /// The revocation of `serial`, if any.
    pub async fn revocation(&self, serial: &str) -> Result<Option<Revocation>, AuditError> {
        let Some(key) = serial_bytes(serial) else {
            return Ok(None);
        };
        let row: Option<(Vec<u8>, String, Option<Vec<u8>>)> =
            sqlx::query_as("SELECT serial, reason, cause FROM revocations WHERE serial = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(serial, reason, cause)| Revocation {
            serial: serial_text(&serial),
            reason,
            cause: cause.as_deref().map(serial_text),
        }))
    }

    async fn record_at(&self, chain: &str, seq: i64) -> Result<Option<AuditRecord>, AuditError> {
        let sql = format!("{SELECT_RECORD} WHERE c.name = $1 AND r.seq = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(chain)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode_record).transpose()
    }

    /// The audit record of the issuance of `serial`, while the certificate is known and
    /// retention has kept the record.
    pub async fn issued_record(&self, serial: &str) -> Result<Option<AuditRecord>, AuditError> {
        match self.certificate(serial).await? {
            Some(c) => self.record_at(&c.chain, c.seq as i64).await,
            None => Ok(None),
        }
    }

    /// Every record about `serial`: its issuance and the revocation that took it out
    /// (an admin's, or the one of the certificate it was renewed from).
    pub async fn show(&self, serial: &str) -> Result<Vec<AuditRecord>, AuditError> {
        let mut out = Vec::new();
        let Some(key) = serial_bytes(serial) else {
            return Ok(out);
        };
        if let Some(c) = self.certificate(serial).await? {
            out.extend(self.record_at(&c.chain, c.seq as i64).await?);
        } else {
            // Expired and pruned from `certificates`: the records may still be there.
            let sql = format!("{SELECT_RECORD} WHERE r.serial = $1 AND r.outcome = $2");
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(key.clone())
                .bind(Outcome::Issued.code())
                .fetch_optional(&self.pool)
                .await?;
            out.extend(row.as_ref().map(decode_record).transpose()?);
        }
        let revoked: Option<(Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT ch.name, r.seq FROM revocations r LEFT JOIN audit_chains ch ON ch.id = r.chain_id
              WHERE r.serial = $1",
        )
        .bind(key.clone())
        .fetch_optional(&self.pool)
        .await?;
        if let Some((Some(chain), Some(seq))) = revoked {
            out.extend(self.record_at(&chain, seq).await?);
        }
        Ok(out)
    }

    /// Records matching `filter`, oldest first, from every chain.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<AuditRecord>, AuditError> {
        let mut sql = format!("{SELECT_RECORD} WHERE 1 = 1");
        let mut n = 0;
        let mut param = |sql: &mut String, clause: &str| {
            n += 1;
            sql.push_str(&clause.replace("$?", &format!("${n}")));
        };
        let since = match &filter.since {
            Some(s) => Some(
                OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| AuditError::Corrupt(format!("--since {s:?}: {e}")))?,
            ),
            None => None,
        };
        if since.is_some() {
            param(&mut sql, " AND r.time_us >= $?");
        }
        if filter.outcome.is_some() {
            param(&mut sql, " AND r.outcome = $?");
        }
        if filter.identity.is_some() {
            param(&mut sql, " AND COALESCE(r.spiffe_id, r.caller) = $?");
        }
        sql.push_str(" ORDER BY r.id DESC");
        if filter.limit > 0 {
            param(&mut sql, " LIMIT $?");
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(t) = since {
            q = q.bind((t.unix_timestamp_nanos() / 1000) as i64);
        }
        if let Some(o) = filter.outcome {
            q = q.bind(o.code());
        }
        if let Some(id) = &filter.identity {
            q = q.bind(id.clone());
        }
        if filter.limit > 0 {
            q = q.bind(filter.limit as i64);
        }
        let mut out = q
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(decode_record)
            .collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Walks every chain and reports modified, deleted, renumbered or truncated
    /// records, records of no known chain, and anchors moved past records without the
    /// CA's signature (checked against `ca_cert_der`, the signing CA's certificate,
    /// when given).
    pub async fn verify(&self, ca_cert_der: Option<&[u8]>) -> Result<VerifyReport, AuditError> {
        let chains: Vec<ChainRow> = sqlx::query_as(
            "SELECT id, name, head_seq, head_hash, anchor_seq, anchor_hash, anchor_signature
               FROM audit_chains ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut report = VerifyReport {
            signatures_checked: ca_cert_der.is_some(),
            ..VerifyReport::default()
        };
        for (id, name, head_seq, head_hash, anchor_seq, anchor_hash, signature) in chains {
            let head = ChainState {
                head_seq,
                head_hash: hash32(&head_hash),
                anchor_seq,
                anchor_hash: hash32(&anchor_hash),
            };
            if anchor_seq > 1 {
                report.anchors += 1;
                if let Some(p) = anchor_problem(&name, &head, signature.as_deref(), ca_cert_der) {
                    report.problems.push(format!("chain {name}: {p}"));
                }
            }
            self.verify_chain(id, &name, &head, &mut report).await?;
        }
        let (orphans,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM audit_records WHERE chain_id NOT IN (SELECT id FROM audit_chains)",
        )
        .fetch_one(&self.pool)
        .await?;
        if orphans > 0 {
            report.problems.push(format!(
                "{orphans} records belong to no known chain (a chain's head was deleted)"
            ));
        }
        Ok(report)
    }

    async fn verify_chain(
        &self,
        id: i64,
        name: &str,
        head: &ChainState,
        report: &mut VerifyReport,
    ) -> Result<(), AuditError> {
        let sql = format!("{SELECT_RECORD} WHERE r.chain_id = $1 AND r.seq >= $2 ORDER BY r.seq");
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(head.anchor_seq)
            .fetch(&self.pool);
        let (mut expected, mut prev) = (head.anchor_seq, head.anchor_hash);
        let mut problem = |p: String| report.problems.push(format!("chain {name}: {p}"));
        let mut checked = 0u64;
        while let Some(row) = rows.try_next().await? {
            let (_, r, stored) = read_row(&row)?;
            let seq = r.seq;
            if seq != expected {
                problem(if seq == expected + 1 {
                    format!("record {expected} is missing (deleted)")
                } else {
                    format!("records {expected} to {} are missing (deleted)", seq - 1)
                });
            }
            if r.hash(&prev, name).as_slice() != stored.as_slice() {
                problem(format!(
                    "record {seq} was modified, or a record before it was rewritten (its hash does not match)"
                ));
            }
            prev = hash32(&stored);
            expected = seq + 1;
            checked += 1;
        }
        drop(rows);
        let last = expected - 1;
        if head.head_seq > last {
            report.problems.push(format!(
                "chain {name}: records {} to {} are missing (the tail of the log was deleted)",
                last + 1,
                head.head_seq
            ));
        } else if head.head_seq < last {
            report.problems.push(format!(
                "chain {name}: records after the recorded head {} were added outside the CA",
                head.head_seq
            ));
        } else if head.head_seq >= head.anchor_seq && head.head_hash != prev {
            report.problems.push(format!(
                "chain {name}: the head record {last} differs from the recorded head"
            ));
        }
        report.checked += checked;
        report.chains.push(ChainHead {
            chain: name.to_owned(),
            first_seq: head.anchor_seq as u64,
            head_seq: head.head_seq as u64,
            head_hash: ca_core::x509::hex(&head.head_hash),
        });
        Ok(())
    }

    /// Every chain's head, by name.
    pub async fn heads(&self) -> Result<Vec<super::checkpoint::CheckpointHead>, AuditError> {
        let rows: Vec<(String, i64, Vec<u8>)> =
            sqlx::query_as("SELECT name, head_seq, head_hash FROM audit_chains ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(chain, seq, hash)| super::checkpoint::CheckpointHead {
                chain,
                seq: seq as u64,
                hash: ca_core::x509::hex(&hash),
            })
            .collect())
    }

    /// Stores a signed checkpoint.
    pub async fn save_checkpoint(
        &self,
        c: &super::checkpoint::Checkpoint,
    ) -> Result<(), AuditError> {
        self.chain()?;
        let signature = record::decode_hex(&c.signature)
            .ok_or_else(|| AuditError::Corrupt("checkpoint signature is not hex".into()))?;
        sqlx::query("INSERT INTO audit_checkpoints (time_us, body, signature) VALUES ($1, $2, $3)")
            .bind(now_us())
            .bind(c.body.clone())
            .bind(signature)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The stored checkpoints, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<super::checkpoint::Checkpoint>, AuditError> {
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT body, signature FROM audit_checkpoints ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(body, signature)| super::checkpoint::Checkpoint {
                body,
                signature: ca_core::x509::hex(&signature),
            })
            .collect())
    }

    /// Whether the chain still holds what a checkpoint stated of it; the problem if not.
    /// A head older than retention is checked against the anchor when it is the record
    /// just before it, and otherwise cannot be checked any more (not a problem: the
    /// anchor past it carries the CA's signature, which [`AuditStore::verify`] checks).
    pub async fn check_head(
        &self,
        head: &super::checkpoint::CheckpointHead,
    ) -> Result<Option<String>, AuditError> {
        let chain: Option<(i64, i64, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT id, head_seq, anchor_seq, anchor_hash FROM audit_chains WHERE name = $1",
        )
        .bind(head.chain.clone())
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, head_seq, anchor_seq, anchor_hash)) = chain else {
            return Ok(Some("the chain is gone from the store".into()));
        };
        let seq = head.seq as i64;
        if seq == 0 {
            return Ok(None);
        }
        if seq > head_seq {
            return Ok(Some(format!(
                "the checkpoint saw record {seq}, the store ends at {head_seq} (records were removed)"
            )));
        }
        let stored: Option<Vec<u8>> = if seq >= anchor_seq {
            let row: Option<(Vec<u8>,)> =
                sqlx::query_as("SELECT hash FROM audit_records WHERE chain_id = $1 AND seq = $2")
                    .bind(id)
                    .bind(seq)
                    .fetch_optional(&self.pool)
                    .await?;
            match row {
                Some((h,)) => Some(h),
                None => return Ok(Some(format!("record {seq} is missing"))),
            }
        } else if seq == anchor_seq - 1 {
            Some(anchor_hash)
        } else {
            None
        };
        Ok(stored
            .filter(|h| ca_core::x509::hex(h) != head.hash)
            .map(|_| {
                format!(
                    "record {seq} is not the record the checkpoint signed (the chain was rewritten)"
                )
            }))
    }

    /// Deletes audit records older than `cutoff`, a bounded transaction at a time per
    /// chain, moving each chain's anchor in the same transaction (so verification keeps
    /// working across a crash) and signing the new anchor with `ca`. Certificates and
    /// revocations are kept until their certificate has been expired for
    /// `expiry_grace`, whatever the cutoff. Returns how many records went.
    pub async fn prune_before(
        &self,
        cutoff: OffsetDateTime,
        expiry_grace: std::time::Duration,
        ca: &ca_core::CertificateAuthority,
    ) -> Result<u64, AuditError> {
        self.chain()?;
        let cutoff_us = (cutoff.unix_timestamp_nanos() / 1000) as i64;
        let chains: Vec<(i64,)> = sqlx::query_as("SELECT id FROM audit_chains")
            .fetch_all(&self.pool)
            .await?;
        let mut pruned = 0;
        for (chain_id,) in chains {
            while let n @ 1.. = self.prune_chain_step(chain_id, cutoff_us, ca).await? {
                pruned += n;
            }
        }
        let expired = (OffsetDateTime::now_utc() - expiry_grace).unix_timestamp();
        for table in ["certificates", "revocations"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE not_after < $1"
            )))
            .bind(expired)
            .execute(&self.pool)
            .await?;
        }
        Ok(pruned)
    }

    /// One transaction of [`AuditStore::prune_before`]: up to [`PRUNE_STEP`] records.
    async fn prune_chain_step(
        &self,
        chain_id: i64,
        cutoff_us: i64,
        ca: &ca_core::CertificateAuthority,
    ) -> Result<u64, AuditError> {
        let mut conn = WriteConnection::acquire(&self.pool).await?;
        let mut tx = self.dialect.begin_write(conn.conn()).await?;
        let (name, anchor_seq): (String, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT name, anchor_seq FROM audit_chains WHERE id = $1{}",
            self.dialect.for_update()
        )))
        .bind(chain_id)
        .fetch_one(&mut *tx)
        .await?;
        let oldest: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, time_us, hash FROM audit_records
              WHERE chain_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
        )
        .bind(chain_id)
        .bind(anchor_seq)
        .bind(PRUNE_STEP)
        .fetch_all(&mut *tx)
        .await?;
        let Some((last_seq, _, last_hash)) =
            oldest.iter().take_while(|(_, t, _)| *t < cutoff_us).last()
        else {
            tx.rollback().await?;
            conn.committed();
            return Ok(0);
        };
        let deleted = sqlx::query(
            "DELETE FROM audit_records WHERE chain_id = $1 AND seq >= $2 AND seq <= $3",
        )
        .bind(chain_id)
        .bind(anchor_seq)
        .bind(*last_seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let statement = super::checkpoint::anchor_statement(&name, *last_seq as u64 + 1, last_hash);
        let signature = ca
            .sign_statement(&statement)
            .map_err(|e| AuditError::Corrupt(format!("signing the anchor: {e}")))?;
        sqlx::query(
            "UPDATE audit_chains SET anchor_seq = $1, anchor_hash = $2, anchor_signature = $3
              WHERE id = $4",
        )
        .bind(last_seq + 1)
        .bind(last_hash.clone())
        .bind(signature)
        .bind(chain_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        conn.committed();
        Ok(deleted)
    }
}

/// `certificates` as selected: serial, expiry, parent, and the chain and sequence number
/// of its record.
type CertificateRow = (Vec<u8>, i64, Option<Vec<u8>>, String, i64);

/// Records per pruning transaction.
const PRUNE_STEP: i64 = 5000;

/// `audit_chains` as selected: id, name, head (seq, hash), anchor (seq, hash,
/// signature).
type ChainRow = (i64, String, i64, Vec<u8>, i64, Vec<u8>, Option<Vec<u8>>);

/// What is wrong with a chain's moved anchor, if anything: only the CA moves one (when
/// retention prunes), and it signs the anchor it moves to.
fn anchor_problem(
    name: &str,
    head: &ChainState,
    signature: Option<&[u8]>,
    ca_cert_der: Option<&[u8]>,
) -> Option<String> {
    let first = head.anchor_seq;
    let Some(signature) = signature else {
        return Some(format!(
            "records 1 to {} are gone and the anchor after them carries no signature of the CA: they were deleted outside retention",
            first - 1
        ));
    };
    let statement = super::checkpoint::anchor_statement(name, first as u64, &head.anchor_hash);
    let der = ca_cert_der?;
    ca_core::statement::verify_statement(der, &statement, signature)
        .err()
        .map(|e| {
            format!(
                "the anchor at record {first} is not the one the CA signed when retention pruned ({e}): records before it were deleted outside retention, or the store was signed by another CA"
            )
        })
}

/// A chain's row in `audit_chains`.
struct ChainState {
    head_seq: i64,
    head_hash: [u8; 32],
    anchor_seq: i64,
    anchor_hash: [u8; 32],
}
