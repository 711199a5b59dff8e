//! Durability and tamper evidence of the audit log, on both store backends.

use std::time::Duration;

use e2e::postgres::{TestStore, execute};
use e2e::{CaProcess, Issuers};

/// SIGKILL while clients are being served: every serial any client received is in the
/// audit store after restart, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_delivered_certificate_survives_sigkill() {
    for store in TestStore::both() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = CaProcess::start_with_env(&tmp.path().join("state"), &[], &store.env());
        let (chain, key) = ca.export_bundle("vm", "load", "1h", &tmp.path().join("b"));
        let ch = ca.channel(Some((&chain, &key))).await;
        // Bounded: at most 2,000 requests per client, each stops at its first error.
        let clients = Issuers::spawn(&ch, 8, 2000);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ca.kill();
        let (received, _) = clients.join().await;
        assert!(
            received.len() >= 20,
            "{}: clients got only {} certificates before the kill",
            store.name,
            received.len()
        );

        // With the server down, admin commands open the store themselves.
        let verify = ca.cli(&["audit", "verify"]);
        assert!(
            verify.status.success(),
            "{}: verify after SIGKILL: {}",
            store.name,
            String::from_utf8_lossy(&verify.stdout)
        );
        ca.restart();
        ca.assert_all_recorded(&received);
        let verify = ca.cli(&["audit", "verify"]);
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
        // `audit show` finds a delivered serial.
        let one = received.iter().next().unwrap();
        let show = ca.cli(&["audit", "show", one, "--json"]);
        assert!(String::from_utf8_lossy(&show.stdout).contains(one.as_str()));
    }
}

fn verify_output(ca: &CaProcess) -> (bool, String) {
    let out = ca.cli(&["audit", "verify"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `audit verify` (the command an operator runs) reports a modified record, a deleted
/// record and a truncated tail, each made directly in the database.
#[tokio::test(flavor = "multi_thread")]
async fn verify_detects_modification_and_deletion() {
    for store in TestStore::both() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let mut ca = CaProcess::start_with_env(&state, &["--audit-chain", "ca-0"], &store.env());
        for i in 0..5 {
            ca.export_bundle(
                "vm",
                &format!("n{i}"),
                "1h",
                &tmp.path().join(format!("b{i}")),
            );
        }
        ca.stop();
        let (ok, text) = verify_output(&ca);
        assert!(ok, "{text}");
        // The serving certificate, then five bundles.
        assert!(text.contains("checked 6 records"), "{}: {text}", store.name);

        let db = store.raw(&state).await;
        let chain = "(SELECT id FROM audit_chains WHERE name = 'ca-0')";
        for (tamper, expected) in [
            (
                format!(
                    "UPDATE audit_records SET spiffe_id = 'spiffe://cluster.local/ns/vm/sa/xx' WHERE chain_id = {chain} AND seq = 3"
                ),
                "record 3 was modified",
            ),
            (
                format!("DELETE FROM audit_records WHERE chain_id = {chain} AND seq = 4"),
                "record 4 is missing",
            ),
            (
                format!("DELETE FROM audit_records WHERE chain_id = {chain} AND seq = 6"),
                "tail of the log was deleted",
            ),
        ] {
            execute(&db, &tamper).await;
            let (ok, text) = verify_output(&ca);
            assert!(!ok, "{}: {tamper}", store.name);
            assert!(text.contains(expected), "{}: {text}", store.name);
        }
    }
}

/// `audit checkpoint --out` and `audit verify --checkpoint`: a truncation made
/// consistently in the database (records and head), invisible to the chains alone,
/// is caught against the checkpoint kept outside, even with the stored ones deleted.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_checkpoint_catches_a_consistent_truncation() {
    for store in TestStore::both() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let mut ca = CaProcess::start_with_env(&state, &["--audit-chain", "ca-0"], &store.env());
        for i in 0..3 {
            ca.export_bundle(
                "vm",
                &format!("c{i}"),
                "1h",
                &tmp.path().join(format!("b{i}")),
            );
        }
        let kept = tmp.path().join("checkpoint.json");
        let out = ca.cli(&["audit", "checkpoint", "--out", kept.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ca.stop();
        let (ok, text) = verify_output(&ca);
        assert!(
            ok && text.contains("1 signed checkpoints"),
            "{}: {text}",
            store.name
        );

        let db = store.raw(&state).await;
        let chain = "(SELECT id FROM audit_chains WHERE name = 'ca-0')";
        execute(
            &db,
            &format!("DELETE FROM audit_records WHERE chain_id = {chain} AND seq >= 3"),
        )
        .await;
        execute(
            &db,
            &format!(
                "UPDATE audit_chains SET head_seq = 2, head_hash = (SELECT hash FROM audit_records \
                 WHERE chain_id = {chain} AND seq = 2) WHERE id = {chain}"
            ),
        )
        .await;
        execute(&db, "DELETE FROM audit_checkpoints").await;
        let (ok, text) = verify_output(&ca);
        assert!(ok, "{}: the chains alone look intact: {text}", store.name);
        let out = ca.cli(&["audit", "verify", "--checkpoint", kept.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{}: {text}", store.name);
        assert!(
            text.contains("the store ends at 2"),
            "{}: {text}",
            store.name
        );
    }
}
