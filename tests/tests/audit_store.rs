//! The audit store on both backends, against real databases: a SQLite file and a
//! throwaway PostgreSQL cluster. Every behaviour is checked on each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ca_server::audit::{
    Api, Append, AuditStore, AuditWriter, Decision, ListFilter, Outcome, RevocationView, Revoke,
    StoreLocation,
};
use e2e::postgres::{Postgres, connect, execute};
use time::OffsetDateTime;

/// One backend under test: its location, and what keeps it alive.
struct Backend {
    name: &'static str,
    location: StoreLocation,
    _keep: Keep,
}

enum Keep {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(#[allow(dead_code)] Postgres),
}

fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    Backend {
        name: "sqlite",
        location: StoreLocation::Sqlite(dir.path().join("audit.db")),
        _keep: Keep::Dir(dir),
    }
}

fn postgres() -> Backend {
    let pg = Postgres::start();
    Backend {
        name: "postgres",
        location: StoreLocation::Postgres(pg.database()),
        _keep: Keep::Pg(pg),
    }
}

fn backends() -> [Backend; 2] {
    [sqlite(), postgres()]
}

fn issued(serial: &str, parent: Option<&str>) -> Append {
    let not_after = OffsetDateTime::now_utc() + time::Duration::days(365);
    Append {
        decision: Decision {
            api: Some(Api::Modern),
            outcome: Some(Outcome::Issued),
            authenticator: Some("client-cert".into()),
            caller: Some(format!("spiffe://cluster.local/ns/n/sa/{serial}")),
            spiffe_id: Some(format!("spiffe://cluster.local/ns/n/sa/{serial}")),
            serial: Some(serial.into()),
            client_serial: parent.map(str::to_owned),
            not_before: Some(ca_server::audit::rfc3339_secs(
                OffsetDateTime::now_utc().unix_timestamp(),
            )),
            not_after: Some(ca_server::audit::rfc3339_secs(not_after.unix_timestamp())),
            spki_sha256: Some("ab".repeat(32)),
            cert_sha256: Some("cd".repeat(32)),
            ..Default::default()
        },
        revoke: None,
    }
}

fn revocation(serial: &str) -> Append {
    Append {
        decision: Decision {
            api: Some(Api::Admin),
            outcome: Some(Outcome::Revoked),
            reason: Some("admin_revocation".into()),
            detail: Some("test".into()),
            serial: Some(serial.into()),
            ..Default::default()
        },
        revoke: Some(Revoke {
            serial: serial.into(),
            not_after: OffsetDateTime::now_utc().unix_timestamp() + 86400,
        }),
    }
}

async fn append(store: &AuditStore, batch: Vec<Append>) {
    for r in store.append(&batch).await.unwrap().results {
        r.unwrap();
    }
}

async fn problems(store: &AuditStore) -> Vec<String> {
    store.verify(None).await.unwrap().problems
}

/// Verifies the whole store and returns the report, failing on any problem.
async fn intact(store: &AuditStore, b: &Backend) -> ca_server::audit::VerifyReport {
    let report = store.verify(None).await.unwrap();
    assert!(
        report.problems.is_empty(),
        "{}: {:?}",
        b.name,
        report.problems
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_share_commits_and_chain_without_gaps() {
    for b in backends() {
        let store = Arc::new(AuditStore::open(&b.location, "replica-0").await.unwrap());
        let view = Arc::new(RevocationView::new(Duration::from_secs(5)));
        let (writer, task) = AuditWriter::start(store.clone(), view);
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let w = writer.clone();
                tokio::spawn(async move {
                    w.record(issued(&format!("{i:x}"), None).decision)
                        .await
                        .unwrap()
                        .seq
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "{}", b.name);
        assert!(
            writer.commits() < 300,
            "{}: group commit made {} commits for 300 records",
            b.name,
            writer.commits()
        );
        drop(writer);
        task.await.unwrap();
        let report = intact(&store, &b).await;
        assert_eq!(report.checked, 300);
        // Every issued serial is a known certificate.
        assert!(store.certificate("1").await.unwrap().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_versioned_and_a_newer_schema_is_refused() {
    for b in backends() {
        let store = AuditStore::open(&b.location, "a").await.unwrap();
        append(&store, vec![issued("1", None)]).await;
        drop(store);
        // Opening again migrates nothing and keeps the data.
        let store = AuditStore::open(&b.location, "a").await.unwrap();
        assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 1);
        let pool = connect(&b.location).await;
        let (versions,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(versions, 4, "{}", b.name);
        execute(
            &pool,
            "INSERT INTO schema_migrations (version, name, applied_us) VALUES (999, 'future', 0)",
        )
        .await;
        let refused = AuditStore::open(&b.location, "a")
            .await
            .err()
            .unwrap_or_else(|| panic!("{}: opened a store from the future", b.name));
        assert!(
            refused.to_string().contains("schema version 999"),
            "{}: {refused}",
            b.name
        );
    }
}

/// Statements that turn a store of schema 4 back into what schema 3 wrote (serials as
/// hex text, every caller written out), one per entry.
fn as_schema_3(backend: &str) -> Vec<String> {
    let (to_text, retype): (fn(&str) -> String, bool) = match backend {
        "sqlite" => (
            |c| format!("NULLIF(ltrim(lower(hex({c})), '0'), '')"),
            false,
        ),
        _ => (
            |c| format!("NULLIF(ltrim(encode({c}, 'hex'), '0'), '')"),
            true,
        ),
    };
    let mut sql = vec![
        "UPDATE audit_records SET caller = spiffe_id WHERE caller_same = 1".to_owned(),
        "ALTER TABLE audit_records DROP COLUMN caller_same".to_owned(),
    ];
    for (table, columns) in [
        ("audit_records", &["serial", "client_serial"][..]),
        ("certificates", &["serial", "parent", "root"][..]),
        ("revocations", &["serial", "cause"][..]),
    ] {
        let set: Vec<String> = columns
            .iter()
            .map(|c| match retype {
                true => format!("ALTER COLUMN {c} TYPE TEXT USING {}", to_text(c)),
                false => format!("{c} = {}", to_text(c)),
            })
            .collect();
        sql.push(match retype {
            true => format!("ALTER TABLE {table} {}", set.join(", ")),
            false => format!("UPDATE {table} SET {}", set.join(", ")),
        });
    }
    sql.push(
        "CREATE INDEX certificates_parent ON certificates (parent) WHERE parent IS NOT NULL"
            .to_owned(),
    );
    sql.push("DELETE FROM schema_migrations WHERE version = 4".to_owned());
    sql
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_4_keeps_every_record_and_revocation_of_a_store_before_it() {
    for b in backends() {
        let store = AuditStore::open(&b.location, "a").await.unwrap();
        let mut own_caller = issued("abc", Some("7f01"));
        own_caller.decision.caller = Some("gce:project/zone/vm".into());
        let mut no_caller = issued("abd", None);
        no_caller.decision.caller = None;
        let batch = vec![issued("7f01", None), own_caller, no_caller];
        append(&store, batch).await;
        append(&store, vec![issued("abe", Some("abc")), revocation("abc")]).await;
        append(
            &store,
            vec![issued("7f02", None), issued("c01", Some("7f02"))],
        )
        .await;
        let before = store.list(&ListFilter::default()).await.unwrap();
        let revoked_before = store.revoked_since(0).await.unwrap();
        drop(store);
        let pool = connect(&b.location).await;
        for statement in as_schema_3(b.name) {
            execute(&pool, &statement).await;
        }
        let text: (String,) = sqlx::query_as("SELECT root FROM certificates WHERE serial = 'abe'")
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{}: the store is not in schema 3's form: {e}", b.name));
        assert_eq!(text.0, "7f01", "{}", b.name);
        pool.close().await;

        let store = AuditStore::open(&b.location, "a").await.unwrap();
        intact(&store, &b).await;
        assert_eq!(
            store.list(&ListFilter::default()).await.unwrap(),
            before,
            "{}",
            b.name
        );
        assert_eq!(
            store.revoked_since(0).await.unwrap(),
            revoked_before,
            "{}",
            b.name
        );
        let abe = store
            .certificate("abe")
            .await
            .unwrap()
            .expect("abe is known");
        assert_eq!(abe.parent.as_deref(), Some("abc"), "{}", b.name);
        let cause = store
            .revocation("abe")
            .await
            .unwrap()
            .expect("abe revoked with abc");
        assert_eq!(cause.cause.as_deref(), Some("abc"), "{}", b.name);
        // The identity index still finds records whose caller is stored once.
        let filter = ListFilter {
            identity: Some("spiffe://cluster.local/ns/n/sa/7f01".into()),
            ..ListFilter::default()
        };
        assert_eq!(store.list(&filter).await.unwrap().len(), 1, "{}", b.name);
        // And revoking still follows renewals across the converted rows.
        append(&store, vec![revocation("7f02")]).await;
        let followed = store
            .revocation("c01")
            .await
            .unwrap()
            .expect("c01 revoked with 7f02");
        assert_eq!(followed.cause.as_deref(), Some("7f02"), "{}", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_serial_revokes_everything_renewed_from_it() {
    for b in backends() {
        let a = AuditStore::open(&b.location, "replica-a").await.unwrap();
        let other = AuditStore::open(&b.location, "replica-b").await.unwrap();
        // A bundle, renewed twice (on two replicas), and an unrelated certificate.
        append(&a, vec![issued("a1", None), issued("d1", None)]).await;
        append(&other, vec![issued("a2", Some("a1"))]).await;
        append(&a, vec![issued("a3", Some("a2"))]).await;
        // The revocation is made on the other replica, for a serial it never issued.
        append(&other, vec![revocation("a1")]).await;
        for (serial, revoked) in [("a1", true), ("a2", true), ("a3", true), ("d1", false)] {
            let r = a.revocation(serial).await.unwrap();
            assert_eq!(r.is_some(), revoked, "{}: {serial}", b.name);
        }
        assert_eq!(
            a.revocation("a3").await.unwrap().unwrap().cause.as_deref(),
            Some("a2")
        );
        // `show` of a followed certificate names the admin's revocation.
        let shown = a.show("a3").await.unwrap();
        assert_eq!(shown.len(), 2, "{}: {shown:#?}", b.name);
        assert_eq!(shown[1].decision.outcome, Some(Outcome::Revoked));
        assert_eq!(shown[1].decision.serial.as_deref(), Some("a1"));
        // A renewal from a revoked certificate that raced the revocation (committed
        // after it, on another replica) is caught by the follow-up pass.
        append(&a, vec![issued("a4", Some("a3"))]).await;
        assert!(a.revocation("a4").await.unwrap().is_none());
        assert_eq!(a.revoke_followers(0).await.unwrap(), 1, "{}", b.name);
        assert!(a.revocation("a4").await.unwrap().is_some());
        assert!(problems(&a).await.is_empty());

        // A bundle renewed for months: the certificates between it and today's leaf
        // have expired and left the table. Revoking the bundle still reaches the leaf.
        append(&a, vec![issued("dd01", None)]).await;
        append(&a, vec![issued("dd02", Some("dd01"))]).await;
        append(&a, vec![issued("dd03", Some("dd02"))]).await;
        append(&a, vec![issued("dd04", Some("dd03"))]).await;
        let pool = connect(&b.location).await;
        sqlx::query("DELETE FROM certificates WHERE serial = $1 OR serial = $2")
            .bind(vec![0xdd_u8, 0x02])
            .bind(vec![0xdd_u8, 0x03])
            .execute(&pool)
            .await
            .unwrap();
        append(&other, vec![revocation("dd01")]).await;
        assert!(
            a.revocation("dd04").await.unwrap().is_some(),
            "{}: dd04",
            b.name
        );

        // Revoking a certificate inside a line takes what was renewed from it, and
        // neither the line's root nor a branch renewed from the root before it.
        append(&a, vec![issued("f1", None)]).await;
        append(&a, vec![issued("f2", Some("f1")), issued("f4", Some("f1"))]).await;
        append(&a, vec![issued("f3", Some("f2"))]).await;
        append(&other, vec![revocation("f2")]).await;
        for (serial, revoked) in [("f1", false), ("f2", true), ("f3", true), ("f4", false)] {
            let r = a.revocation(serial).await.unwrap();
            assert_eq!(r.is_some(), revoked, "{}: {serial}", b.name);
        }
        append(&a, vec![issued("f5", Some("f3")), issued("f6", Some("f4"))]).await;
        assert_eq!(a.revoke_followers(0).await.unwrap(), 1, "{}", b.name);
        assert!(a.revocation("f5").await.unwrap().is_some(), "{}", b.name);
        assert!(a.revocation("f6").await.unwrap().is_none(), "{}", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_enforces_a_revocation_within_a_second() {
    for b in backends() {
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let mut views = Vec::new();
        let mut stores = Vec::new();
        for i in 0..3 {
            let store = Arc::new(
                AuditStore::open(&b.location, &format!("r{i}"))
                    .await
                    .unwrap(),
            );
            let view = Arc::new(RevocationView::new(Duration::from_secs(2)));
            view.load(&store).await.unwrap();
            tokio::spawn(ca_server::audit::revocations::keep_fresh(
                store.clone(),
                view.clone(),
                shutdown.clone(),
            ));
            views.push(view);
            stores.push(store);
        }
        append(&stores[0], vec![issued("b1", None)]).await;
        assert_eq!(views[2].is_revoked("b1"), Ok(false));
        let revoked_at = Instant::now();
        append(&stores[1], vec![revocation("b1")]).await;
        for (i, view) in views.iter().enumerate() {
            while view.is_revoked("b1") != Ok(true) {
                assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "{}: replica {i} still accepts b1 after 1 s",
                    b.name
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        eprintln!(
            "{}: every replica refuses the revoked serial after {:?}",
            b.name,
            revoked_at.elapsed()
        );
    }
}

#[tokio::test]
async fn a_view_not_confirmed_within_its_bound_is_stale() {
    let view = RevocationView::new(Duration::from_millis(200));
    assert!(view.is_revoked("01").is_err(), "never synced");
    let b = sqlite();
    let store = AuditStore::open(&b.location, "r").await.unwrap();
    view.load(&store).await.unwrap();
    assert_eq!(view.is_revoked("01"), Ok(false));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(view.is_revoked("01").is_err(), "not confirmed for 300 ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_records_but_not_what_revocation_needs() {
    for b in backends() {
        let store = AuditStore::open(&b.location, "r").await.unwrap();
        append(&store, vec![issued("c1", None), issued("c2", Some("c1"))]).await;
        append(&store, vec![issued("c3", None)]).await;
        let future = OffsetDateTime::now_utc() + time::Duration::days(1);
        assert_eq!(
            store
                .prune_before(future, Duration::from_secs(3600), &checkpoint_ca())
                .await
                .unwrap(),
            3,
            "{}",
            b.name
        );
        assert!(store.list(&ListFilter::default()).await.unwrap().is_empty());
        let report = intact(&store, &b).await;
        assert_eq!(report.chains[0].first_seq, 4);
        // The certificates are still known, revocable, and revoking follows renewals.
        assert!(store.certificate("c1").await.unwrap().is_some());
        append(&store, vec![revocation("c1")]).await;
        assert!(
            store.revocation("c2").await.unwrap().is_some(),
            "{}",
            b.name
        );
        // The chain continues from the anchor.
        let report = intact(&store, &b).await;
        assert_eq!(
            (report.chains[0].first_seq, report.chains[0].head_seq),
            (4, 4)
        );

        // Expired certificates and their revocations go once expired for the grace.
        let ago = |minutes: i64| {
            let t = OffsetDateTime::now_utc() - time::Duration::minutes(minutes);
            ca_server::audit::rfc3339_secs(t.unix_timestamp())
        };
        let mut long_ago = issued("e1", None);
        long_ago.decision.not_after = Some(ago(120));
        let mut lately = issued("e2", None);
        lately.decision.not_after = Some(ago(10));
        let mut revoked = revocation("e2");
        revoked.revoke.as_mut().unwrap().not_after =
            (OffsetDateTime::now_utc() - time::Duration::minutes(10)).unix_timestamp();
        append(&store, vec![long_ago, lately]).await;
        append(&store, vec![revoked]).await;
        let past = OffsetDateTime::now_utc() - time::Duration::days(1);
        let ca = checkpoint_ca();
        // (serial, still indexed, still revoked) after each prune.
        for (grace, expect) in [
            (
                3600,
                [("e1", false, false), ("e2", true, true), ("c1", true, true)],
            ),
            (
                60,
                [
                    ("e1", false, false),
                    ("e2", false, false),
                    ("c1", true, true),
                ],
            ),
        ] {
            let grace = Duration::from_secs(grace);
            store.prune_before(past, grace, &ca).await.unwrap();
            for (serial, indexed, revoked) in expect {
                let found = (
                    store.certificate(serial).await.unwrap().is_some(),
                    store.revocation(serial).await.unwrap().is_some(),
                );
                assert_eq!(
                    found,
                    (indexed, revoked),
                    "{}: {serial} after {grace:?}",
                    b.name
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_edits_deletions_renumbering_and_truncation() {
    for b in backends() {
        let store = AuditStore::open(&b.location, "r").await.unwrap();
        let other = AuditStore::open(&b.location, "s").await.unwrap();
        for i in 1..=5 {
            append(&store, vec![issued(&format!("e{i}"), None)]).await;
        }
        append(&other, vec![issued("f1", None)]).await;
        assert!(problems(&store).await.is_empty());
        let pool = connect(&b.location).await;
        let chain = "(SELECT id FROM audit_chains WHERE name = 'r')";
        let cases: Vec<(String, String, &str)> = vec![
            (
                format!(
                    "UPDATE audit_records SET spiffe_id = 'x' WHERE chain_id = {chain} AND seq = 3"
                ),
                format!(
                    "UPDATE audit_records SET spiffe_id = 'spiffe://cluster.local/ns/n/sa/e3' WHERE chain_id = {chain} AND seq = 3"
                ),
                "record 3 was modified",
            ),
            (
                format!("UPDATE audit_records SET seq = 10 WHERE chain_id = {chain} AND seq = 3"),
                format!("UPDATE audit_records SET seq = 3 WHERE chain_id = {chain} AND seq = 10"),
                "record 3 is missing",
            ),
            (
                format!(
                    "UPDATE audit_records SET chain_id = 99 WHERE chain_id = {chain} AND seq = 5"
                ),
                format!("UPDATE audit_records SET chain_id = {chain} WHERE chain_id = 99"),
                "tail of the log was deleted",
            ),
            (
                format!(
                    "UPDATE audit_records SET time_us = time_us + 1 WHERE chain_id = {chain} AND seq = 2"
                ),
                format!(
                    "UPDATE audit_records SET time_us = time_us - 1 WHERE chain_id = {chain} AND seq = 2"
                ),
                "record 2 was modified",
            ),
        ];
        for (tamper, undo, expected) in &cases {
            execute(&pool, tamper).await;
            let found = problems(&store).await;
            assert!(
                found.iter().any(|p| p.contains(expected)),
                "{}: {expected:?} not in {found:?}",
                b.name
            );
            execute(&pool, undo).await;
            assert!(problems(&store).await.is_empty(), "{}: {tamper}", b.name);
        }
        // Records moved to a chain that does not exist are reported.
        execute(
            &pool,
            &format!("UPDATE audit_records SET chain_id = 99 WHERE chain_id = {chain} AND seq = 5"),
        )
        .await;
        execute(
            &pool,
            &format!("UPDATE audit_chains SET head_seq = 4 WHERE id = {chain}"),
        )
        .await;
        let found = problems(&store).await;
        assert!(
            found.iter().any(|p| p.contains("belong to no known chain")),
            "{}: {found:?}",
            b.name
        );
        // Both chains are walked; `list` sees both replicas' records.
        let listed = store.list(&ListFilter::default()).await.unwrap();
        assert!(listed.iter().any(|r| r.chain == "s"));
    }
}

/// A self-signed CA to sign checkpoints with.
fn checkpoint_ca() -> ca_core::CertificateAuthority {
    ca_core::CertificateAuthority::new_self_signed_root(
        rcgen::KeyPair::generate().unwrap(),
        "cluster.local",
        OffsetDateTime::now_utc(),
        Duration::from_secs(86400),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_rewrite_is_caught_by_a_signed_checkpoint() {
    use ca_server::audit::checkpoint;
    for b in backends() {
        let ca = checkpoint_ca();
        let store = AuditStore::open(&b.location, "r").await.unwrap();
        for i in 1..=5 {
            append(&store, vec![issued(&format!("9{i}"), None)]).await;
        }
        let signed = checkpoint::make(&store, &ca).await.unwrap();
        let report = checkpoint::verify_all(&store, Some(ca.cert_der()), &[])
            .await
            .unwrap();
        assert!(
            report.problems.is_empty(),
            "{}: {:?}",
            b.name,
            report.problems
        );
        assert_eq!(report.checkpoints, 1);

        // Someone with write access removes records 4 and 5 and moves the head back:
        // every chain is consistent again, and only the checkpoint tells.
        let pool = connect(&b.location).await;
        execute(&pool, "DELETE FROM audit_records WHERE seq >= 4").await;
        execute(
            &pool,
            "UPDATE audit_chains SET head_seq = 3, head_hash = (SELECT hash FROM audit_records \
             WHERE audit_records.chain_id = audit_chains.id AND seq = 3) WHERE name = 'r'",
        )
        .await;
        assert!(
            problems(&store).await.is_empty(),
            "{}: the chain alone looks intact",
            b.name
        );
        let found = checkpoint::verify_all(&store, Some(ca.cert_der()), &[])
            .await
            .unwrap()
            .problems;
        assert!(
            found.iter().any(|p| p.contains("the store ends at 3")),
            "{}: {found:?}",
            b.name
        );
        // ...and writes new records 4 and 5 in their place (through a CA started after
        // the rewrite: a running one remembers its head, and would leave a gap).
        let store = AuditStore::open(&b.location, "r").await.unwrap();
        append(&store, vec![issued("84", None)]).await;
        append(&store, vec![issued("85", None)]).await;
        assert!(problems(&store).await.is_empty());
        // The stored checkpoints are deleted too; the copy kept elsewhere still tells.
        execute(&pool, "DELETE FROM audit_checkpoints").await;
        let found =
            checkpoint::verify_all(&store, Some(ca.cert_der()), std::slice::from_ref(&signed))
                .await
                .unwrap()
                .problems;
        assert!(
            found
                .iter()
                .any(|p| p.contains("record 5 is not the record the checkpoint signed")),
            "{}: {found:?}",
            b.name
        );
        // A checkpoint cannot be forged without the CA key.
        let mut forged = signed.clone();
        forged.body = forged.body.replace("\"seq\":5", "\"seq\":4");
        let found = checkpoint::verify_all(&store, Some(ca.cert_der()), &[forged])
            .await
            .unwrap()
            .problems;
        assert!(
            found.iter().any(|p| p.contains("does not verify")),
            "{}: {found:?}",
            b.name
        );
    }
}

/// Fails unless one of `found` contains `expected`.
fn expect_problem(found: &[String], expected: &str, b: &Backend) {
    assert!(
        found.iter().any(|p| p.contains(expected)),
        "{}: {expected:?} not in {found:?}",
        b.name
    );
}

/// The hash of record `seq` of `chain`, as stored.
async fn stored_hash(pool: &sqlx::AnyPool, chain: &str, seq: i64) -> Vec<u8> {
    let (hash,): (Vec<u8>,) = sqlx::query_as(
        "SELECT r.hash FROM audit_records r JOIN audit_chains c ON c.id = r.chain_id
          WHERE c.name = $1 AND r.seq = $2",
    )
    .bind(chain)
    .bind(seq)
    .fetch_one(pool)
    .await
    .unwrap();
    hash
}

/// Deletes records up to `seq` - 1 of `chain` and moves its anchor to `seq`, with the
/// hash of the record before it: what retention does, done by hand.
async fn move_anchor_by_hand(pool: &sqlx::AnyPool, chain: &str, seq: i64) {
    let hash = stored_hash(pool, chain, seq - 1).await;
    let id = format!("(SELECT id FROM audit_chains WHERE name = '{chain}')");
    execute(
        pool,
        &format!("DELETE FROM audit_records WHERE chain_id = {id} AND seq < {seq}"),
    )
    .await;
    sqlx::query("UPDATE audit_chains SET anchor_seq = $1, anchor_hash = $2 WHERE name = $3")
        .bind(seq)
        .bind(hash)
        .bind(chain)
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_behind_a_matching_anchor_are_caught() {
    use ca_server::audit::checkpoint;
    for b in backends() {
        let ca = checkpoint_ca();

        // Records retention would have kept, deleted, and the anchor moved past them
        // with the right hash: every hash still links, so the chain alone looks intact.
        let store = AuditStore::open(&b.location, "r").await.unwrap();
        let pool = connect(&b.location).await;
        for i in 1..=5 {
            append(&store, vec![issued(&format!("c0{i}"), None)]).await;
        }
        move_anchor_by_hand(&pool, "r", 4).await;
        for ca_cert in [None, Some(ca.cert_der())] {
            let found = store.verify(ca_cert).await.unwrap().problems;
            expect_problem(
                &found,
                "chain r: records 1 to 3 are gone and the anchor after them carries no signature",
                &b,
            );
        }

        // Retention's own move carries the CA's signature and verifies.
        let store = AuditStore::open(&b.location, "s").await.unwrap();
        for i in 1..=3 {
            append(&store, vec![issued(&format!("d0{i}"), None)]).await;
        }
        let future = OffsetDateTime::now_utc() + time::Duration::days(1);
        store
            .prune_before(future, Duration::from_secs(3600), &ca)
            .await
            .unwrap();
        for i in 4..=6 {
            append(&store, vec![issued(&format!("d0{i}"), None)]).await;
        }
        let report = checkpoint::verify_all(&store, Some(ca.cert_der()), &[])
            .await
            .unwrap();
        let mine: Vec<_> = report
            .problems
            .iter()
            .filter(|p| p.starts_with("chain s"))
            .collect();
        assert!(mine.is_empty(), "{}: {mine:?}", b.name);
        assert_eq!((report.anchors, report.signatures_checked), (2, true));

        // Moving it further by hand keeps a signature, but not one over this anchor.
        move_anchor_by_hand(&pool, "s", 6).await;
        let found = store.verify(Some(ca.cert_der())).await.unwrap().problems;
        expect_problem(
            &found,
            "chain s: the anchor at record 6 is not the one the CA signed when retention pruned",
            &b,
        );
        // Nor does another CA's signature pass for this one's.
        let other = checkpoint_ca();
        store
            .prune_before(future, Duration::from_secs(3600), &other)
            .await
            .unwrap();
        let found = store.verify(Some(ca.cert_der())).await.unwrap().problems;
        expect_problem(
            &found,
            "chain s: the anchor at record 7 is not the one the CA signed",
            &b,
        );

        // A whole chain deleted, its head row with it: a published checkpoint names it.
        let store = AuditStore::open(&b.location, "t").await.unwrap();
        append(&store, vec![issued("dd1", None)]).await;
        let published = checkpoint::make(&store, &ca).await.unwrap();
        let t = "(SELECT id FROM audit_chains WHERE name = 't')";
        execute(
            &pool,
            &format!("DELETE FROM audit_records WHERE chain_id = {t}"),
        )
        .await;
        execute(&pool, "DELETE FROM audit_chains WHERE name = 't'").await;
        execute(&pool, "DELETE FROM audit_checkpoints").await;
        let found = checkpoint::verify_all(&store, Some(ca.cert_der()), &[published])
            .await
            .unwrap()
            .problems;
        expect_problem(&found, "chain t: the chain is gone from the store", &b);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_neither_migrates_nor_writes() {
    for b in backends() {
        let store = AuditStore::open(&b.location, "w").await.unwrap();
        append(&store, vec![issued("e01", None)]).await;
        let pool = connect(&b.location).await;
        let chains = || async {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_chains")
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        };
        let reader = AuditStore::open_reader(&b.location).await.unwrap();
        assert_eq!(reader.list(&ListFilter::default()).await.unwrap().len(), 1);
        assert!(reader.verify(None).await.unwrap().problems.is_empty());
        assert_eq!(chains().await, 1, "{}: a reader added a chain", b.name);
        let refused = reader.append(&[issued("e02", None)]).await.err();
        assert!(
            matches!(refused, Some(ca_server::audit::AuditError::ReadOnly)),
            "{}: {refused:?}",
            b.name
        );
        let future = OffsetDateTime::now_utc() + time::Duration::days(1);
        assert!(
            reader
                .prune_before(future, Duration::from_secs(3600), &checkpoint_ca())
                .await
                .is_err()
        );
        assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 1);

        // A store of an older schema (as a server of the previous version leaves it)
        // is refused, and left as it is.
        let newest = ca_server::audit::schema::current_version();
        execute(
            &pool,
            &format!("DELETE FROM schema_migrations WHERE version = {newest}"),
        )
        .await;
        let refused = AuditStore::open_reader(&b.location).await.err().unwrap();
        assert!(
            refused
                .to_string()
                .contains(&format!("schema version {}", newest - 1)),
            "{}: {refused}",
            b.name
        );
        let (versions,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(versions, newest - 1, "{}: the reader migrated", b.name);
    }
}
