//! The old VM node agents (Istio 0.8 to 1.4, the mesh-expansion guides), each request
//! built as the agent built it with its default flags: `HandleCSR` over TLS to the
//! CA verified as `istio-citadel` against `/etc/certs/root-cert.pem`, an RSA-2048 CSR
//! with an empty organisation and the agent's own guess of its SPIFFE ID, and the
//! agent's default lifetime: 90 days (`--workload-cert-ttl` 2160h, Istio 1.0 and
//! later) or 19 hours (earlier). Off GCE the agent proves itself with the certificate
//! in `/etc/certs` (`--env onprem`: credential type `onprem`, the chain as the
//! credential); on GCE with a standard-format identity token for the fixed audience
//! `grpc://istio-citadel:8060` (`--env gcp`: credential type `gcp`, the token both as
//! the credential and as bearer metadata).

use e2e::CaProcess;
use e2e::google::{Google, Instance};
use istio_ca_proto::CsrRequest;
use serde_json::json;
use tonic::Code;
use tonic::metadata::MetadataValue;

const NINETY_DAYS_MINUTES: i32 = 90 * 24 * 60;
const OLD_AUDIENCE: &str = "grpc://istio-citadel:8060";
/// The Google service account the VM runs as (its unique id is the token's `sub`).
const GSA_ID: &str = "104417925629436215178";

/// The agent's CSR (Go's `x509.CreateCertificateRequest` from `pkiutil.GenCSR`): RSA
/// 2048, subject `O=` (an empty PrintableString), its own idea of its identity as the
/// URI SAN.
fn agent_csr(guess: &str) -> String {
    let key = ca_core::keys::KeyAlgorithm::Rsa(2048).generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::OrganizationName,
        rcgen::DnValue::PrintableString("".try_into().unwrap()),
    );
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(guess.try_into().unwrap()));
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn leaf_facts(signed_cert: &[u8]) -> ca_core::x509::CertFacts {
    let der = ca_core::pem::parse_certificates(signed_cert).unwrap();
    assert_eq!(der.len(), 1, "signed_cert is the leaf alone");
    ca_core::x509::inspect(&der[0]).unwrap()
}

fn lifetime_secs(f: &ca_core::x509::CertFacts) -> i64 {
    (f.not_after - f.not_before).whole_seconds()
}

/// `--env onprem`: mutual TLS with the certificate in /etc/certs (here an exported
/// bundle), credential type `onprem`, 90 days asked. The CA grants `--max-ttl` (the
/// agent renews from the certificate's own lifetime) and records what was asked;
/// `--legacy-ttl-above-max refuse` turns that into a refusal.
#[tokio::test(flavor = "multi_thread")]
async fn the_onprem_agents_default_request_is_granted_the_maximum() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let root = ca.root_pem();
    let (chain, key) = ca.export_bundle("vm", "mysqldb", "2160h", &tmp.path().join("etc-certs"));
    let identity = "spiffe://cluster.local/ns/vm/sa/mysqldb";
    let ch = e2e::channel_to(ca.grpc, "istio-citadel", &root, Some((&chain, &key))).await;
    let request = || CsrRequest {
        csr_pem: agent_csr(identity).into_bytes(),
        node_agent_credential: chain.clone().into_bytes(),
        credential_type: "onprem".into(),
        requested_ttl_minutes: NINETY_DAYS_MINUTES,
    };
    let resp = e2e::legacy(&ch)
        .handle_csr(request())
        .await
        .expect("the old agent's default request is granted")
        .into_inner();
    assert!(resp.is_approved);
    let facts = leaf_facts(&resp.signed_cert);
    assert_eq!(facts.uri_sans, vec![identity.to_owned()]);
    assert_eq!(lifetime_secs(&facts), 24 * 3600 + 60, "--max-ttl, 24 h");
    let issued = ca.audit_records(&["--outcome", "issued", "--identity", identity]);
    let record = issued.iter().find(|r| r["api"] == "legacy").unwrap();
    assert_eq!(
        record["requested_ttl_secs"],
        i64::from(NINETY_DAYS_MINUTES) * 60
    );
    let granted = record["granted_ttl_secs"].as_i64().unwrap();
    assert!((24 * 3600 - 1..=24 * 3600).contains(&granted), "{granted}");

    // Istio before 1.0 asked for 19 hours: granted as asked.
    let resp = e2e::legacy(&ch)
        .handle_csr(CsrRequest {
            requested_ttl_minutes: 19 * 60,
            ..request()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        lifetime_secs(&leaf_facts(&resp.signed_cert)),
        19 * 3600 + 60
    );
    drop(ch);
    drop(ca);

    // The operator who would rather refuse.
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &["--legacy-ttl-above-max", "refuse"],
    );
    let ch = e2e::channel_to(ca.grpc, "istio-citadel", &root, Some((&chain, &key))).await;
    let err = e2e::legacy(&ch).handle_csr(request()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// `--env gcp` (and the default on GCE): a standard-format token for the fixed
/// audience, which names only the VM's Google service account. Accepted for the
/// service accounts the GCE configuration grants, with the granted identity (not the
/// agent's guess); refused for any other.
#[tokio::test(flavor = "multi_thread")]
async fn the_gcp_agents_default_request_is_accepted_for_a_granted_service_account() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Google::start(Instance::running("shop-prod", "us-central1-a", "mysql-1")).await;
    let cfg = tmp.path().join("gce.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
allowed_projects = ["shop-prod"]
jwks_url = "{}"

[[mapping]]
project = "shop-prod"
namespace = "vm"
service_account = "default"

[[service_account_token]]
unique_id = "{GSA_ID}"
namespace = "vm"
service_account = "mysqldb"
"#,
            g.jwks_url()
        ),
    )
    .unwrap();
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &["--gce-config", cfg.to_str().unwrap()],
    );
    let root = ca.root_pem();
    let ch = e2e::channel_to(ca.grpc, "istio-citadel", &root, None).await;
    // instance/service-accounts/default/identity?audience=grpc://istio-citadel:8060
    let standard_token = |sub: &str, aud: &str| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        g.sign(
            None,
            &json!({
                "iss": "https://accounts.google.com",
                "aud": aud,
                "azp": sub,
                "sub": sub,
                "iat": now,
                "exp": now + 3600,
            }),
        )
    };
    let agent_request = |token: &str| {
        let mut req = tonic::Request::new(CsrRequest {
            csr_pem: agent_csr(
                "spiffe://cluster.local/ns/default/sa/vm-sa@shop-prod.iam.gserviceaccount.com",
            )
            .into_bytes(),
            node_agent_credential: token.as_bytes().to_vec(),
            credential_type: "gcp".into(),
            requested_ttl_minutes: NINETY_DAYS_MINUTES,
        });
        let bearer: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        req.metadata_mut().insert("authorization", bearer);
        req
    };
    let resp = e2e::legacy(&ch)
        .handle_csr(agent_request(&standard_token(GSA_ID, OLD_AUDIENCE)))
        .await
        .expect("the old gcp agent's default request is accepted")
        .into_inner();
    let facts = leaf_facts(&resp.signed_cert);
    assert_eq!(
        facts.uri_sans,
        vec!["spiffe://cluster.local/ns/vm/sa/mysqldb".to_owned()],
        "the granted identity, not the agent's guess"
    );
    assert_eq!(lifetime_secs(&facts), 24 * 3600 + 60);
    let record = ca
        .audit_records(&["--outcome", "issued"])
        .into_iter()
        .find(|r| r["api"] == "legacy")
        .unwrap();
    assert_eq!(record["authenticator"], "gce-token");
    assert_eq!(record["caller"], format!("gce-service-account:{GSA_ID}"));

    // Another service account's token, the new audience on a standard token, and the
    // old audience on a full token: all refused.
    for (token, code, reason) in [
        (
            standard_token("999999999999999999999", OLD_AUDIENCE),
            Code::PermissionDenied,
            "gce_no_mapping_rule",
        ),
        (
            standard_token(GSA_ID, "istio-ca"),
            Code::Unauthenticated,
            "gce_wrong_audience",
        ),
        (
            g.token(OLD_AUDIENCE),
            Code::Unauthenticated,
            "gce_wrong_audience",
        ),
    ] {
        let err = e2e::legacy(&ch)
            .handle_csr(agent_request(&token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{reason}: {err:?}");
        let denied = ca.audit_records(&["--outcome", "denied"]);
        assert!(
            denied.iter().any(|r| r["reason"] == reason),
            "{reason} not audited: {denied:#?}"
        );
    }
}
