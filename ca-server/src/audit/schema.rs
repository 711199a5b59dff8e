//! The store's schema and its versioned migrations: one list, applied in order on
//! start, each in its own transaction and recorded in `schema_migrations`. SQLite and
//! PostgreSQL share one text of every table, column and index; only type names differ.
//!
//! Tables:
//! - `audit_chains`: one hash chain per writer (a replica, an admin command): its head
//!   (last sequence number and hash) and the anchor verification starts from once
//!   retention has pruned older records, with the CA's signature over that anchor
//!   (see [`super::checkpoint::anchor_statement`]),
//! - `audit_records`: every decision, one column each (see [`super::record::Row`]),
//! - `certificates`: every certificate this CA issued, kept until it expires whatever
//!   the audit retention, with the serial of the client certificate it was renewed
//!   from (`parent`) and of the first certificate of that line of renewals (`root`,
//!   typically an exported bundle): what `revoke` checks and what revoking follows.
//!   The root survives the expiry (and pruning) of the certificates in between,
//! - `revocations`: revoked serials, kept until the certificate expires,
//! - `audit_checkpoints`: chain heads signed by the CA,
//! - `store_probe`: one row the writer updates to learn whether the store accepts
//!   writes again after a failure.

use sqlx::{Any, AnyPool, Transaction};

use super::store::{AuditError, Dialect};

/// One step of the schema, written once for both databases: `{id}` is an
/// auto-assigned 64-bit key, `{int}` a 64-bit integer, `{bytes}` a byte string and
/// `{no_rowid}` marks a table clustered on its primary key where SQLite can.
struct Migration {
    version: i64,
    name: &'static str,
    sql: Sql,
}

/// A migration's text: one for both databases, or (triggers) one for each.
enum Sql {
    Both(&'static str),
    Each {
        sqlite: &'static str,
        postgres: &'static str,
    },
}

/// SQLite's triggers (migration 2), made again when migration 4 rebuilds the table.
/// Per row: SQLite has no statement triggers, and its rows are updated in place.
macro_rules! sqlite_triggers {
    () => {
        r#"
CREATE TRIGGER audit_records_certificate AFTER INSERT ON audit_records
WHEN NEW.outcome = 1 AND NEW.serial IS NOT NULL AND NEW.not_after IS NOT NULL
BEGIN
    INSERT INTO certificates (serial, not_after, parent, root, chain_id, seq)
    VALUES (NEW.serial, NEW.not_after, NEW.client_serial,
            COALESCE((SELECT COALESCE(p.root, p.serial) FROM certificates p
                       WHERE p.serial = NEW.client_serial), NEW.client_serial),
            NEW.chain_id, NEW.seq);
END;
CREATE TRIGGER audit_records_head AFTER INSERT ON audit_records
BEGIN
    UPDATE audit_chains SET head_seq = NEW.seq, head_hash = NEW.hash
     WHERE id = NEW.chain_id AND head_seq < NEW.seq;
END;
"#
    };
}
const SQLITE_TRIGGERS: &str = sqlite_triggers!();

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "audit chains and records, certificates, revocations, checkpoints",
        sql: Sql::Both(
            r#"
CREATE TABLE audit_chains (
    id {id},
    name TEXT NOT NULL UNIQUE,
    head_seq {int} NOT NULL,
    head_hash {bytes} NOT NULL,
    anchor_seq {int} NOT NULL,
    anchor_hash {bytes} NOT NULL
);
CREATE TABLE audit_records (
    id {id},
    chain_id {int} NOT NULL,
    seq {int} NOT NULL,
    time_us {int} NOT NULL,
    api {int} NOT NULL,
    outcome {int} NOT NULL,
    reason TEXT,
    detail TEXT,
    authenticator TEXT,
    caller TEXT,
    peer TEXT,
    requested_ttl {int} NOT NULL,
    granted_ttl {int},
    spiffe_id TEXT,
    serial TEXT,
    client_serial TEXT,
    not_before {int},
    not_after {int},
    spki_sha256 {bytes},
    cert_sha256 {bytes},
    hash {bytes} NOT NULL
);
CREATE UNIQUE INDEX audit_records_chain_seq ON audit_records (chain_id, seq);
CREATE INDEX audit_records_identity ON audit_records ((COALESCE(spiffe_id, caller)));
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    not_after {int} NOT NULL,
    parent TEXT,
    root TEXT,
    chain_id {int} NOT NULL,
    seq {int} NOT NULL
){no_rowid};
CREATE INDEX certificates_parent ON certificates (parent) WHERE parent IS NOT NULL;
CREATE INDEX certificates_root ON certificates (root) WHERE root IS NOT NULL;
CREATE TABLE revocations (
    id {id},
    serial TEXT NOT NULL UNIQUE,
    not_after {int} NOT NULL,
    reason TEXT NOT NULL,
    cause TEXT,
    chain_id {int},
    seq {int},
    time_us {int} NOT NULL
);
CREATE INDEX revocations_time ON revocations (time_us);
CREATE TABLE audit_checkpoints (
    id {id},
    time_us {int} NOT NULL,
    body TEXT NOT NULL,
    signature {bytes} NOT NULL
);
CREATE TABLE store_probe (id {int} PRIMARY KEY, time_us {int} NOT NULL);
INSERT INTO store_probe (id, time_us) VALUES (1, 0);
"#,
        ),
    },
    Migration {
        version: 2,
        name: "triggers: an inserted record indexes its certificate and moves its chain's head",
        sql: Sql::Each {
            sqlite: SQLITE_TRIGGERS,
            // Per statement: one update of the chain's row however many records, where a
            // per-row trigger would leave a dead row version behind each record.
            postgres: r#"
CREATE FUNCTION audit_records_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO certificates (serial, not_after, parent, root, chain_id, seq)
    SELECT i.serial, i.not_after, i.client_serial, COALESCE(p.root, p.serial, i.client_serial),
           i.chain_id, i.seq
      FROM inserted i LEFT JOIN certificates p ON p.serial = i.client_serial
     WHERE i.outcome = 1 AND i.serial IS NOT NULL AND i.not_after IS NOT NULL;
    UPDATE audit_chains c SET head_seq = last.seq, head_hash = last.hash
      FROM (SELECT DISTINCT ON (chain_id) chain_id, seq, hash FROM inserted
             ORDER BY chain_id, seq DESC) last
     WHERE c.id = last.chain_id AND c.head_seq < last.seq;
    RETURN NULL;
END
$$;
CREATE TRIGGER audit_records_inserted AFTER INSERT ON audit_records
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION audit_records_inserted();
"#,
        },
    },
    Migration {
        version: 3,
        name: "a chain's anchor carries the CA's signature",
        // NULL until retention first moves the anchor (an anchor at record 1, the
        // chain's start, needs none).
        sql: Sql::Both("ALTER TABLE audit_chains ADD COLUMN anchor_signature {bytes};"),
    },
    Migration {
        version: 4,
        name: "serials as bytes; a caller that is the granted identity stored once; no parent index",
        // About 170 bytes a record of the ~720 the store took per issuance. A serial's
        // normalised hex has no leading zeros, so an odd-length one gets its nibble back.
        // Revocation walks a line of renewals by its root (see `REVOKE_DESCENDANTS`).
        sql: Sql::Each {
            // SQLite changes a column's type by building the table again.
            sqlite: SQLITE_COMPACT,
            postgres: r#"
ALTER TABLE audit_records ADD COLUMN caller_same SMALLINT NOT NULL DEFAULT 0;
UPDATE audit_records SET caller = NULL, caller_same = 1 WHERE caller = spiffe_id;
ALTER TABLE audit_records
    ALTER COLUMN serial TYPE BYTEA USING decode(CASE WHEN length(serial) % 2 = 1 THEN '0' || serial ELSE serial END, 'hex'),
    ALTER COLUMN client_serial TYPE BYTEA
        USING decode(CASE WHEN length(client_serial) % 2 = 1 THEN '0' || client_serial ELSE client_serial END, 'hex');
ALTER TABLE certificates
    ALTER COLUMN serial TYPE BYTEA USING decode(CASE WHEN length(serial) % 2 = 1 THEN '0' || serial ELSE serial END, 'hex'),
    ALTER COLUMN parent TYPE BYTEA USING decode(CASE WHEN length(parent) % 2 = 1 THEN '0' || parent ELSE parent END, 'hex'),
    ALTER COLUMN root TYPE BYTEA USING decode(CASE WHEN length(root) % 2 = 1 THEN '0' || root ELSE root END, 'hex');
DROP INDEX certificates_parent;
ALTER TABLE revocations
    ALTER COLUMN serial TYPE BYTEA USING decode(CASE WHEN length(serial) % 2 = 1 THEN '0' || serial ELSE serial END, 'hex'),
    ALTER COLUMN cause TYPE BYTEA USING decode(CASE WHEN length(cause) % 2 = 1 THEN '0' || cause ELSE cause END, 'hex');
"#,
        },
    },
];

/// Migration 4 on SQLite: each table with serials built again with byte columns, the
/// data copied over, the indexes and triggers made again.
const SQLITE_COMPACT: &str = concat!(
    r#"
DROP TRIGGER audit_records_certificate;
DROP TRIGGER audit_records_head;
CREATE TABLE audit_records_4 (
    id INTEGER PRIMARY KEY,
    chain_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time_us INTEGER NOT NULL,
    api INTEGER NOT NULL,
    outcome INTEGER NOT NULL,
    reason TEXT,
    detail TEXT,
    authenticator TEXT,
    caller TEXT,
    peer TEXT,
    requested_ttl INTEGER NOT NULL,
    granted_ttl INTEGER,
    spiffe_id TEXT,
    serial BLOB,
    client_serial BLOB,
    not_before INTEGER,
    not_after INTEGER,
    spki_sha256 BLOB,
    cert_sha256 BLOB,
    hash BLOB NOT NULL,
    caller_same INTEGER NOT NULL DEFAULT 0
);
INSERT INTO audit_records_4
SELECT id, chain_id, seq, time_us, api, outcome, reason, detail, authenticator,
       CASE WHEN caller = spiffe_id THEN NULL ELSE caller END, peer, requested_ttl,
       granted_ttl, spiffe_id, unhex(CASE WHEN length(serial) % 2 = 1 THEN '0' || serial ELSE serial END),
       unhex(CASE WHEN length(client_serial) % 2 = 1 THEN '0' || client_serial ELSE client_serial END),
       not_before, not_after, spki_sha256, cert_sha256, hash, COALESCE(caller = spiffe_id, 0)
  FROM audit_records;
DROP TABLE audit_records;
ALTER TABLE audit_records_4 RENAME TO audit_records;
CREATE UNIQUE INDEX audit_records_chain_seq ON audit_records (chain_id, seq);
CREATE INDEX audit_records_identity ON audit_records ((COALESCE(spiffe_id, caller)));
CREATE TABLE certificates_4 (
    serial BLOB PRIMARY KEY,
    not_after INTEGER NOT NULL,
    parent BLOB,
    root BLOB,
    chain_id INTEGER NOT NULL,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO certificates_4
SELECT unhex(CASE WHEN length(serial) % 2 = 1 THEN '0' || serial ELSE serial END), not_after,
       unhex(CASE WHEN length(parent) % 2 = 1 THEN '0' || parent ELSE parent END),
       unhex(CASE WHEN length(root) % 2 = 1 THEN '0' || root ELSE root END), chain_id, seq
  FROM certificates;
DROP TABLE certificates;
ALTER TABLE certificates_4 RENAME TO certificates;
CREATE INDEX certificates_root ON certificates (root) WHERE root IS NOT NULL;
CREATE TABLE revocations_4 (
    id INTEGER PRIMARY KEY,
    serial BLOB NOT NULL UNIQUE,
    not_after INTEGER NOT NULL,
    reason TEXT NOT NULL,
    cause BLOB,
    chain_id INTEGER,
    seq INTEGER,
    time_us INTEGER NOT NULL
);
INSERT INTO revocations_4
SELECT id, unhex(CASE WHEN length(serial) % 2 = 1 THEN '0' || serial ELSE serial END), not_after, reason,
       unhex(CASE WHEN length(cause) % 2 = 1 THEN '0' || cause ELSE cause END), chain_id, seq, time_us
  FROM revocations;
DROP TABLE revocations;
ALTER TABLE revocations_4 RENAME TO revocations;
CREATE INDEX revocations_time ON revocations (time_us);
"#,
    sqlite_triggers!(),
);

/// `sql` in `dialect`'s type names.
fn render(sql: &str, dialect: Dialect) -> String {
    let names: [(&str, &str); 4] = match dialect {
        // INTEGER PRIMARY KEY is SQLite's rowid itself: no second index.
        Dialect::Sqlite => [
            ("{id}", "INTEGER PRIMARY KEY"),
            ("{int}", "INTEGER"),
            ("{bytes}", "BLOB"),
            ("{no_rowid}", " WITHOUT ROWID"),
        ],
        Dialect::Postgres => [
            (
                "{id}",
                "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            ),
            ("{int}", "BIGINT"),
            ("{bytes}", "BYTEA"),
            ("{no_rowid}", ""),
        ],
    };
    names
        .iter()
        .fold(sql.to_owned(), |sql, (from, to)| sql.replace(from, to))
}

/// The newest schema version this build knows.
pub fn current_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Checks, without changing anything, that the store's schema is the one this build
/// writes: what a command that only reads needs (it must not migrate a store under a
/// server of another version).
pub async fn check(pool: &AnyPool) -> Result<(), AuditError> {
    let applied: Result<(i64,), sqlx::Error> =
        sqlx::query_as("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(pool)
            .await;
    let found = match applied {
        Ok((v,)) => v,
        // No table yet: a store no server has opened.
        Err(sqlx::Error::Database(_)) => 0,
        Err(e) => return Err(e.into()),
    };
    let known = current_version();
    match found.cmp(&known) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(AuditError::SchemaTooNew { found, known }),
        std::cmp::Ordering::Less => Err(AuditError::SchemaTooOld { found, known }),
    }
}

/// Brings the schema up to [`current_version`]. Safe to run from several replicas at
/// once: SQLite serialises the transactions, PostgreSQL an advisory lock. Refuses a
/// store written by a newer version.
pub async fn migrate(pool: &AnyPool, dialect: Dialect) -> Result<(), AuditError> {
    let mut conn = super::store::WriteConnection::acquire(pool).await?;
    let mut tx = dialect.begin_write(conn.conn()).await?;
    if dialect == Dialect::Postgres {
        // Any fixed number: every replica takes the same lock.
        sqlx::query("SELECT pg_advisory_xact_lock(7305020151)")
            .execute(&mut *tx)
            .await?;
    }
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_us BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let (applied,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await?;
    if applied > current_version() {
        return Err(AuditError::SchemaTooNew {
            found: applied,
            known: current_version(),
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > applied) {
        apply(&mut tx, dialect, m).await?;
    }
    tx.commit().await?;
    conn.committed();
    Ok(())
}

async fn apply(
    tx: &mut Transaction<'_, Any>,
    dialect: Dialect,
    m: &Migration,
) -> Result<(), AuditError> {
    let sql = match (&m.sql, dialect) {
        (Sql::Both(sql), _) => render(sql, dialect),
        (Sql::Each { sqlite, .. }, Dialect::Sqlite) => sqlite.to_string(),
        (Sql::Each { postgres, .. }, Dialect::Postgres) => postgres.to_string(),
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut **tx)
        .await?;
    sqlx::query("INSERT INTO schema_migrations (version, name, applied_us) VALUES ($1, $2, $3)")
        .bind(m.version)
        .bind(m.name)
        .bind(super::store::now_us())
        .execute(&mut **tx)
        .await?;
    tracing::info!(
        version = m.version,
        name = m.name,
        "audit store schema migrated"
    );
    Ok(())
}
