//! Durability and tamper evidence of the audit log.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::{CaProcess, Issuers, run_cli};

/// SIGKILL while clients are being served: every serial any client received is in the
/// audit store after restart, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_delivered_certificate_survives_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let (chain, key) = ca.export_bundle("vm", "load", "1h", &tmp.path().join("b"));
    let ch = ca.channel(Some((&chain, &key))).await;
    // Bounded: at most 2,000 requests per client, each stops at its first error.
    let clients = Issuers::spawn(&ch, 8, 2000);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ca.kill();
    let (received, _) = clients.join().await;
    assert!(
        received.len() >= 20,
        "clients got only {} certificates before the kill",
        received.len()
    );

    // Offline (server down): the store opens directly.
    let state = ca.state_dir.clone();
    let verify = run_cli(&state, &["audit", "verify"]);
    assert!(
        verify.status.success(),
        "verify after SIGKILL: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    ca.restart();
    let recorded: BTreeSet<String> = ca
        .audit_records(&[
            "--outcome",
            "issued",
            "--identity",
            "spiffe://cluster.local/ns/vm/sa/load",
        ])
        .iter()
        .map(|r| r["serial"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = received.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} delivered certificates have no audit record: {missing:?}",
        missing.len()
    );
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

fn tamper(state: &std::path::Path, f: impl FnOnce(&sled::Tree)) {
    let db = sled::open(state.join("audit")).unwrap();
    let records = db.open_tree("records").unwrap();
    f(&records);
    db.flush().unwrap();
}

fn verify_output(state: &std::path::Path) -> (bool, String) {
    let out = run_cli(state, &["audit", "verify"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `audit verify` reports a modified record, a deleted record and a truncated tail.
#[tokio::test(flavor = "multi_thread")]
async fn verify_detects_modification_and_deletion() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut ca = CaProcess::start(&state, &[]);
    for i in 0..5 {
        ca.export_bundle(
            "vm",
            &format!("n{i}"),
            "1h",
            &tmp.path().join(format!("b{i}")),
        );
    }
    ca.stop();
    let (ok, text) = verify_output(&state);
    assert!(ok, "{text}");
    assert!(text.contains("checked 6 records"), "{text}");

    // Modify record 3: change the SPIFFE ID in its body, keep its stated hash.
    let original = {
        let db = sled::open(state.join("audit")).unwrap();
        db.open_tree("records")
            .unwrap()
            .get(3u64.to_be_bytes())
            .unwrap()
            .unwrap()
            .to_vec()
    };
    let forged = String::from_utf8(original.clone())
        .unwrap()
        .replace("/sa/n1", "/sa/xx");
    assert_ne!(forged.as_bytes(), original.as_slice());
    tamper(&state, |t| {
        t.insert(3u64.to_be_bytes(), forged.as_bytes()).unwrap();
    });
    let (ok, text) = verify_output(&state);
    assert!(!ok);
    assert!(text.contains("record 3 was modified"), "{text}");

    // Rewrite the stated hash too: the next record's link exposes it.
    let body = &forged.as_bytes()[65..];
    let rehashed = format!(
        "{}\n{}",
        ca_core::x509::sha256_hex(body),
        String::from_utf8_lossy(body)
    );
    tamper(&state, |t| {
        t.insert(3u64.to_be_bytes(), rehashed.as_bytes()).unwrap();
    });
    let (ok, text) = verify_output(&state);
    assert!(!ok);
    assert!(text.contains("record 4 does not follow record 3"), "{text}");

    // Restore, then delete record 4.
    tamper(&state, |t| {
        t.insert(3u64.to_be_bytes(), original.as_slice()).unwrap();
        t.remove(4u64.to_be_bytes()).unwrap();
    });
    let (ok, text) = verify_output(&state);
    assert!(!ok);
    assert!(text.contains("record 4 is missing"), "{text}");

    // Delete the last record (tail truncation).
    let tmp2 = tempfile::tempdir().unwrap();
    let state2 = tmp2.path().join("state");
    let mut ca2 = CaProcess::start(&state2, &[]);
    ca2.export_bundle("vm", "a", "1h", &tmp2.path().join("b"));
    ca2.stop();
    tamper(&state2, |t| {
        t.remove(2u64.to_be_bytes()).unwrap();
    });
    let (ok, text) = verify_output(&state2);
    assert!(!ok);
    assert!(text.contains("tail of the log was deleted"), "{text}");
}
