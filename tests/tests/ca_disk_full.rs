//! A full disk: the audit store cannot grow. The CA must refuse to issue (it may not
//! hand out a certificate it has not recorded), stay up, say why on /readyz, and lose
//! nothing it acknowledged before the disk filled.
//!
//! The disk is filled by a file-size limit (`prlimit --fsize`, RLIMIT_FSIZE) on the
//! server process: a write that would grow the audit store past it fails with EFBIG,
//! as a write to a full file system fails with ENOSPC. Both reach sled as an I/O error.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;

use e2e::{CaProcess, Issuers, hostile_csr, http_get, modern, workspace_bin};
use istio_ca_proto::IstioCertificateRequest;
use tonic::Code;

/// Headroom above the store's size at start, room for sled to open its next segments and take some records.
const HEADROOM: u64 = 2 * 1024 * 1024;

fn request() -> IstioCertificateRequest {
    e2e::request(hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256).1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_refuses_to_issue_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut ca = CaProcess::start(&state, &[]);
    let (chain, key) = ca.export_bundle("vm", "load", "1h", &tmp.path().join("b"));
    ca.stop();

    let size = std::fs::metadata(state.join("audit").join("db"))
        .unwrap()
        .len();
    let limited = tmp.path().join("ca-server-limited");
    std::fs::write(
        &limited,
        format!(
            "#!/bin/sh\nexec prlimit --fsize={} {} \"$@\"\n",
            size + HEADROOM,
            workspace_bin("ca-server").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&limited, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut ca = CaProcess::start_bin(limited, &state, &[]);
    assert_eq!(http_get(ca.http, "/readyz").0, 200);

    let ch = ca.channel(Some((&chain, &key))).await;
    // Bounded: at most 3,000 requests per client, each stops at its first refusal.
    let (received, refusals) = Issuers::spawn(&ch, 8, 3000).join().await;
    assert!(
        received.len() >= 20,
        "only {} certificates before the disk filled",
        received.len()
    );
    assert!(!refusals.is_empty(), "the disk never filled");
    eprintln!(
        "disk full after {} certificates; {} clients refused",
        received.len(),
        refusals.len()
    );
    for status in &refusals {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("cannot record decisions"),
            "{status:?}"
        );
    }

    // Still running (SIGXFSZ did not kill it), still refusing, and saying why.
    assert!(ca.is_running(), "the CA died:\n{}", ca.log_text());
    let again = modern(&ch)
        .create_certificate(request())
        .await
        .expect_err("a certificate left the CA without an audit record");
    assert_eq!(again.code(), Code::Unavailable);
    let (code, body) = http_get(ca.http, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("audit store"), "{body}");
    assert!(ca.log_text().contains("audit store cannot write"));
    ca.stop();

    // Space again: nothing acknowledged was lost, the chain verifies, issuance resumes.
    let mut ca = CaProcess::start(&state, &[]);
    let verify = ca.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let recorded: BTreeSet<String> = ca
        .audit_records(&["--outcome", "issued"])
        .iter()
        .filter_map(|r| r["serial"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<_> = received.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged certificates have no audit record: {missing:?}",
        missing.len()
    );
    assert_eq!(http_get(ca.http, "/readyz").0, 200);
    let ch = ca.channel(Some((&chain, &key))).await;
    modern(&ch)
        .create_certificate(request())
        .await
        .expect("issuance resumes once the disk has space");
    ca.stop();
}
