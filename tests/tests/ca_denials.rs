//! Bad input: every case answers the code Istio clients expect and leaves a denied
//! audit record with its reason.

use e2e::{CaProcess, hostile_csr, modern, openssl_csr};
use istio_ca_proto::IstioCertificateRequest;
use tonic::Code;

fn req(csr: String, ttl: i64) -> IstioCertificateRequest {
    IstioCertificateRequest {
        csr,
        validity_duration: ttl,
        metadata: None,
    }
}

fn denied_reasons(ca: &CaProcess) -> Vec<String> {
    ca.audit_records(&["--outcome", "denied"])
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Asserts the call failed with `code` and that exactly one more denial with `reason`
/// is in the audit log.
async fn expect_denied(
    ca: &CaProcess,
    call: impl std::future::Future<
        Output = Result<tonic::Response<istio_ca_proto::IstioCertificateResponse>, tonic::Status>,
    >,
    code: Code,
    reason: &str,
) {
    let before = denied_reasons(ca).iter().filter(|r| *r == reason).count();
    let err = call.await.expect_err(reason);
    assert_eq!(err.code(), code, "{reason}: {err:?}");
    assert!(
        !err.message().contains("/src/"),
        "message leaks internals: {}",
        err.message()
    );
    let after = denied_reasons(ca).iter().filter(|r| *r == reason).count();
    assert_eq!(after, before + 1, "one denied record with reason {reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &["--max-ttl", "24h"]);
    let (chain, key) = ca.export_bundle("vm", "db", "2160h", &tmp.path().join("good"));
    let good = ca.channel(Some((&chain, &key))).await;
    let (_, valid_csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);

    // Garbage CSR.
    expect_denied(
        &ca,
        modern(&good).create_certificate(req("hello".into(), 0)),
        Code::InvalidArgument,
        "malformed_csr",
    )
    .await;

    // A CSR whose signature does not verify: flip the last signature byte.
    let der = ca_core::pem::parse_csr(valid_csr.as_bytes()).unwrap();
    let mut broken = der.clone();
    *broken.last_mut().unwrap() ^= 0x01;
    let broken = ca_core::pem::csr(&broken);
    expect_denied(
        &ca,
        modern(&good).create_certificate(req(broken, 0)),
        Code::InvalidArgument,
        "bad_csr_signature",
    )
    .await;

    // Unsupported keys, from OpenSSL.
    for spec in ["ec:P-521", "rsa:1024"] {
        let csr = openssl_csr(tmp.path(), spec);
        expect_denied(
            &ca,
            modern(&good).create_certificate(req(csr, 0)),
            Code::InvalidArgument,
            "unsupported_key",
        )
        .await;
    }

    // TTL above the maximum.
    expect_denied(
        &ca,
        modern(&good).create_certificate(req(valid_csr.clone(), 24 * 3600 + 1)),
        Code::InvalidArgument,
        "ttl_too_long",
    )
    .await;

    // Request options we do not honour.
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "ImpersonatedIdentity".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                "spiffe://cluster.local/ns/a/sa/b".into(),
            )),
        },
    );
    expect_denied(
        &ca,
        modern(&good).create_certificate(IstioCertificateRequest {
            csr: valid_csr.clone(),
            validity_duration: 0,
            metadata: Some(metadata),
        }),
        Code::InvalidArgument,
        "unsupported_metadata",
    )
    .await;

    // Oversized request (over 64 KiB), refused from its length prefix and still audited.
    let huge = format!("{valid_csr}{}", "A".repeat(70 * 1024));
    expect_denied(
        &ca,
        modern(&good).create_certificate(req(huge, 0)),
        Code::ResourceExhausted,
        "request_too_large",
    )
    .await;

    // No credential at all.
    let anonymous = ca.channel(None).await;
    expect_denied(
        &ca,
        modern(&anonymous).create_certificate(req(valid_csr.clone(), 0)),
        Code::Unauthenticated,
        "no_credential",
    )
    .await;

    // A client certificate from another CA, with a plausible SPIFFE ID.
    let other_state = tmp.path().join("other-state");
    let other = CaProcess::start(&other_state, &[]);
    let (o_chain, o_key) = other.export_bundle("vm", "db", "1h", &tmp.path().join("foreign"));
    drop(other);
    let foreign = ca.channel(Some((&o_chain, &o_key))).await;
    expect_denied(
        &ca,
        modern(&foreign).create_certificate(req(valid_csr.clone(), 0)),
        Code::Unauthenticated,
        "cert_unknown_issuer",
    )
    .await;

    // An expired client certificate (issued for 1 second).
    let (e_chain, e_key) = ca.export_bundle("vm", "short", "1s", &tmp.path().join("expiring"));
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let expired = ca.channel(Some((&e_chain, &e_key))).await;
    expect_denied(
        &ca,
        modern(&expired).create_certificate(req(valid_csr.clone(), 0)),
        Code::Unauthenticated,
        "cert_expired",
    )
    .await;

    // A revoked client certificate: works, is revoked on the running server, then fails.
    let (r_chain, r_key) = ca.export_bundle("vm", "revoked", "1h", &tmp.path().join("revoked"));
    let revoked = ca.channel(Some((&r_chain, &r_key))).await;
    modern(&revoked)
        .create_certificate(req(valid_csr.clone(), 0))
        .await
        .expect("valid before revocation");
    // In OpenSSL's colon form, as an admin would paste it.
    let serial = {
        let (_, pem) = x509_parser::pem::parse_x509_pem(r_chain.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        cert.tbs_certificate.raw_serial_as_string()
    };
    let out = ca.cli(&["revoke", &serial, "--reason", "machine decommissioned"]);
    assert!(
        out.status.success(),
        "revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    expect_denied(
        &ca,
        modern(&revoked).create_certificate(req(valid_csr.clone(), 0)),
        Code::Unauthenticated,
        "cert_revoked",
    )
    .await;

    // The revocation is itself audited, with the admin's words.
    let revs = ca.audit_records(&["--outcome", "revoked"]);
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0]["detail"], "machine decommissioned");
    assert_eq!(
        revs[0]["spiffe_id"],
        "spiffe://cluster.local/ns/vm/sa/revoked"
    );

    // Unknown serials and double revocations are refused with a clear message.
    let out = ca.cli(&["revoke", "abcdef", "--reason", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not issued by this CA"));

    // The good identity still works after all of that.
    modern(&good)
        .create_certificate(req(valid_csr, 0))
        .await
        .expect("good caller unaffected");

    // Every denial carried the peer address.
    for r in ca.audit_records(&["--outcome", "denied"]) {
        assert!(
            r["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{r}"
        );
    }
}

/// Revocations survive a restart.
#[tokio::test(flavor = "multi_thread")]
async fn revocation_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let (chain, key) = ca.export_bundle("vm", "node", "1h", &tmp.path().join("b"));
    let serial = e2e::serial_of(&chain);
    assert!(
        ca.cli(&["revoke", &serial, "--reason", "key leaked"])
            .status
            .success()
    );
    ca.restart();
    let ch = ca.channel(Some((&chain, &key))).await;
    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let err = modern(&ch)
        .create_certificate(req(csr, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// With the server stopped, `revoke` opens the store itself; the revocation is audited
/// and in force when the server starts again.
#[tokio::test(flavor = "multi_thread")]
async fn offline_revocation_takes_effect_on_start() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let (chain, key) = ca.export_bundle("vm", "offline", "1h", &tmp.path().join("b"));
    let serial = e2e::serial_of(&chain);
    ca.stop();
    let out = ca.cli(&["revoke", &serial, "--reason", "stolen laptop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = ca.cli(&["revoke", &serial, "--reason", "twice"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already revoked"));
    ca.restart();
    let revs = ca.audit_records(&["--outcome", "revoked"]);
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0]["authenticator"], "admin-cli");
    let ch = ca.channel(Some((&chain, &key))).await;
    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let err = modern(&ch)
        .create_certificate(req(csr, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}
