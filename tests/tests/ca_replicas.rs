//! Three replicas on loopback sharing one PostgreSQL and one (plugged-in) CA: what
//! one replica records, every replica knows.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use e2e::postgres::TestStore;
use e2e::{CaProcess, Issuers, PluggedCa, hostile_csr, modern};
use tonic::Code;

struct Replicas {
    cas: Vec<CaProcess>,
    plugged: PluggedCa,
    _store: TestStore,
    _tmp: tempfile::TempDir,
}

fn start_replicas(n: usize) -> Replicas {
    let tmp = tempfile::tempdir().unwrap();
    let store = TestStore::postgres();
    let cacerts = tmp.path().join("cacerts");
    let plugged = PluggedCa::write(&cacerts);
    let cas = (0..n)
        .map(|i| {
            CaProcess::start_with_env(
                &tmp.path().join(format!("replica-{i}")),
                &[
                    "--plugged-ca-dir",
                    cacerts.to_str().unwrap(),
                    "--audit-chain",
                    &format!("replica-{i}"),
                ],
                &store.env(),
            )
        })
        .collect();
    Replicas {
        cas,
        plugged,
        _store: store,
        _tmp: tmp,
    }
}

async fn renew(ch: &tonic::transport::Channel) -> Result<Vec<String>, tonic::Status> {
    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    modern(ch)
        .create_certificate(e2e::request(csr))
        .await
        .map(|r| r.into_inner().cert_chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_on_one_replica_is_enforced_by_all_within_a_second() {
    let r = start_replicas(3);
    let tmp = tempfile::tempdir().unwrap();
    let (chain, key) = r.cas[0].export_bundle("vm", "db", "24h", &tmp.path().join("b"));
    let root = &r.plugged.root_pem;
    let mut channels = Vec::new();
    for ca in &r.cas {
        channels.push(e2e::channel(ca.grpc, root, Some((&chain, &key))).await);
    }
    // Every replica renews the bundle; replica 2's renewal is used below.
    for ch in &channels {
        renew(ch).await.expect("every replica renews the bundle");
    }
    let renewed_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&renewed_key)
        .unwrap()
        .pem()
        .unwrap();
    let renewed = modern(&channels[2])
        .create_certificate(e2e::request(csr))
        .await
        .unwrap()
        .into_inner()
        .cert_chain
        .concat();

    // Revoke the bundle on replica 1, a replica that did not issue it.
    let serial = e2e::serial_of(&chain);
    let out = r.cas[1].cli(&["revoke", &serial, "--reason", "machine stolen"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = Instant::now();
    for (i, ch) in channels.iter().enumerate() {
        loop {
            match renew(ch).await {
                Err(s) if s.code() == Code::Unauthenticated => break,
                other => assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "replica {i} still serves the revoked bundle after 1 s: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("all replicas refuse after {:?}", revoked_at.elapsed());
    // The certificate renewed from the bundle is revoked with it, and refused
    // everywhere.
    let renewed_serial = e2e::serial_of(&renewed);
    let shown = r.cas[0].cli(&["audit", "show", &renewed_serial, "--json"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("\"outcome\":\"revoked\""), "{shown}");
    let pem = renewed_key.serialize_pem();
    for ca in &r.cas {
        let ch = e2e::channel(ca.grpc, root, Some((&renewed, &pem))).await;
        let err = renew(&ch).await.expect_err("renewed from a revoked bundle");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    // Every replica's audit listing sees every replica's records.
    let denied = r.cas[0].audit_records(&["--outcome", "denied"]);
    let text = |d: &serde_json::Value, k: &str| d[k].as_str().unwrap_or_default().to_owned();
    let reasons: BTreeSet<_> = denied.iter().map(|d| text(d, "reason")).collect();
    assert!(reasons.contains("cert_revoked"), "{denied:#?}");
    let chains: BTreeSet<_> = denied.iter().map(|d| text(d, "chain")).collect();
    assert_eq!(chains.len(), 3, "denials recorded by all three replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_nothing() {
    let mut r = start_replicas(3);
    let tmp = tempfile::tempdir().unwrap();
    let (chain, key) = r.cas[0].export_bundle("vm", "load", "24h", &tmp.path().join("b"));
    let root = r.plugged.root_pem.clone();
    // 64 clients, spread over the three replicas.
    let mut load = Vec::new();
    for (i, ca) in r.cas.iter().enumerate() {
        let ch = e2e::channel(ca.grpc, &root, Some((&chain, &key))).await;
        let clients = if i == 0 { 22 } else { 21 };
        load.push(Issuers::spawn(&ch, clients, 150));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    r.cas[0].kill();
    let (received, errors) = Issuers::join_all(load).await;
    assert!(received.len() >= 100, "only {} issued", received.len());
    // Only the killed replica's clients stopped; the others ran to their bound.
    assert!(
        errors.len() <= 22,
        "{} clients stopped: {errors:?}",
        errors.len()
    );
    r.cas[1].assert_all_recorded(&received);
    let verify = r.cas[2].cli(&["audit", "verify"]);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{text}");
    assert!(text.contains("chain replica-0"), "{text}");
}

/// A database that only speaks TLS: the CA connects with `sslmode=verify-full` (its
/// pool and its revocation listener alike), and refuses to start against a server it
/// cannot verify or without TLS, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_reached_over_verified_tls() {
    let tls = e2e::postgres::ServerTls::generate();
    let pg = e2e::postgres::Postgres::start_tls(&tls);
    let tmp = tempfile::tempdir().unwrap();
    let root_file = tmp.path().join("db-root.pem");
    std::fs::write(&root_file, &tls.root_pem).unwrap();
    let db = pg.database();
    let url = format!(
        "{db}?sslmode=verify-full&sslrootcert={}",
        root_file.display()
    );
    let ca = CaProcess::start_with_env(&tmp.path().join("ca"), &[], &[("CA_STORE", url.as_str())]);
    let (chain, key) = ca.export_bundle("vm", "db", "24h", &tmp.path().join("b"));
    let ch = e2e::channel(ca.grpc, &ca.root_pem(), Some((&chain, &key))).await;
    renew(&ch).await.expect("renews with its store over TLS");
    let db_name = db.rsplit('/').next().unwrap();
    let plain = pg.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity a LEFT JOIN pg_stat_ssl s USING (pid)
              WHERE a.datname = '{db_name}' AND NOT COALESCE(s.ssl, false)"
        ),
    );
    assert_eq!(plain.trim(), "0", "every connection of the CA uses TLS");
    // The revocation listener's connection is among them, and works.
    let out = ca.cli(&["revoke", &e2e::serial_of(&chain), "--reason", "test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = Instant::now();
    loop {
        match renew(&ch).await {
            Err(s) if s.code() == Code::Unauthenticated => break,
            other => assert!(
                revoked_at.elapsed() < Duration::from_secs(2),
                "the revoked bundle still renews: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A root the database's certificate does not chain to: refused, and said so.
    let other = e2e::postgres::ServerTls::generate();
    let other_file = tmp.path().join("other-root.pem");
    std::fs::write(&other_file, &other.root_pem).unwrap();
    let untrusted = format!(
        "{db}?sslmode=verify-full&sslrootcert={}",
        other_file.display()
    );
    let out = e2e::serve_output(&tmp.path().join("ca2"), &["--store", &untrusted]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("certificate"), "{err}");
    // Without TLS the database refuses the connection; the CA says so and stops.
    let plain_url = format!("{db}?sslmode=disable");
    let out = e2e::serve_output(&tmp.path().join("ca3"), &["--store", &plain_url]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no encryption"), "{err}");
}
