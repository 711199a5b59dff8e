//! GCE instance identity tokens at the CA, against stand-ins for Google's JWKS, OAuth2
//! and Compute endpoints on 127.0.0.1.

use std::path::Path;

use e2e::CaProcess;
use e2e::google::{Google, Instance, sign_hs256};
use istio_ca_proto::CsrRequest;
use serde_json::json;
use tonic::Code;

const AUD: &str = "istio-ca";

fn config(dir: &Path, g: &Google, refetch: &str, compute: bool) -> String {
    let key = dir.join("ca-sa.json");
    g.write_service_account_key(&key);
    let compute = if compute {
        format!(
            "[compute]\nbase_url = \"{}\"\ncredentials = \"{}\"\ncache_ttl = \"5m\"\n",
            g.compute_url(),
            key.display()
        )
    } else {
        String::new()
    };
    let text = format!(
        r#"
audience = "{AUD}"
allowed_projects = ["shop-prod"]
jwks_url = "{}"
jwks_min_refetch_interval = "{refetch}"
leeway = "60s"
{compute}
[[mapping]]
project = "shop-prod"
instance_name = "mysql-*"
namespace = "vm"
service_account = "mysqldb"
"#,
        g.jwks_url()
    );
    let path = dir.join("gce.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn csr() -> String {
    e2e::hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256).1
}

fn spiffe_of(pem: &str) -> String {
    let der = ca_core::pem::parse_certificates(pem.as_bytes()).unwrap();
    ca_core::x509::inspect(&der[0]).unwrap().uri_sans[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn gce_tokens_are_checked_completely() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Google::start(Instance::running("shop-prod", "us-central1-a", "mysql-1")).await;
    let cfg = config(tmp.path(), &g, "0s", true);
    // Every refusal below is checked for its own record: no aggregation of repeats
    // (which ca_hostile tests).
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &["--gce-config", &cfg, "--denial-aggregation-window", "0s"],
    );
    let ch = ca.channel(None).await;

    // Happy path, both APIs: the identity comes from the mapping rule.
    let chain = e2e::create_with_bearer(&ch, &g.token(AUD))
        .await
        .expect("a good token is accepted");
    assert_eq!(
        spiffe_of(&chain[0]),
        "spiffe://cluster.local/ns/vm/sa/mysqldb"
    );
    let legacy = e2e::legacy(&ch)
        .handle_csr(CsrRequest {
            csr_pem: csr().into_bytes(),
            node_agent_credential: g.token(AUD).into_bytes(),
            credential_type: "gcp".into(),
            requested_ttl_minutes: 30,
        })
        .await
        .expect("the legacy API takes the token from node_agent_credential")
        .into_inner();
    assert_eq!(
        spiffe_of(std::str::from_utf8(&legacy.signed_cert).unwrap()),
        "spiffe://cluster.local/ns/vm/sa/mysqldb"
    );
    let issued = ca.audit_records(&[
        "--outcome",
        "issued",
        "--identity",
        "spiffe://cluster.local/ns/vm/sa/mysqldb",
    ]);
    assert_eq!(issued.len(), 2);
    assert_eq!(issued[0]["authenticator"], "gce-token");
    assert!(
        issued[0]["caller"]
            .as_str()
            .unwrap()
            .starts_with("gce:shop-prod/us-central1-a/mysql-1"),
        "{}",
        issued[0]
    );

    let i = g.instance();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let with = |patch: serde_json::Value| {
        let mut c = i.claims(AUD);
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let tampered = {
        let t = g.token(AUD);
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let other = g.sign(None, &with(json!({"email": "attacker@example.com"})));
        parts[1] = other.split('.').nth(1).unwrap().to_owned();
        parts.join(".")
    };
    let stranger = e2e::google::SigningKey::generate("not-published");
    let hs256 = sign_hs256(
        g.public_pem().as_bytes(),
        &json!({"alg": "HS256", "kid": "key-1"}),
        &i.claims(AUD),
    );
    let none = {
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b.encode(json!({"alg": "none"}).to_string()),
            b.encode(i.claims(AUD).to_string())
        )
    };
    let cases: Vec<(&str, String, Code, &str)> = vec![
        (
            "wrong audience",
            g.sign(None, &with(json!({"aud": "someone-else"}))),
            Code::Unauthenticated,
            "gce_wrong_audience",
        ),
        (
            "expired",
            g.sign(None, &with(json!({"iat": now - 7200, "exp": now - 3600}))),
            Code::Unauthenticated,
            "gce_token_expired",
        ),
        (
            "iat in the future",
            g.sign(None, &with(json!({"iat": now + 600, "exp": now + 1800}))),
            Code::Unauthenticated,
            "gce_token_from_future",
        ),
        (
            "wrong issuer",
            g.sign(None, &with(json!({"iss": "https://accounts.example.com"}))),
            Code::Unauthenticated,
            "gce_wrong_issuer",
        ),
        (
            "bad signature",
            tampered,
            Code::Unauthenticated,
            "gce_bad_signature",
        ),
        ("alg none", none, Code::Unauthenticated, "gce_bad_algorithm"),
        (
            "HS256 keyed with the public key",
            hs256,
            Code::Unauthenticated,
            "gce_bad_algorithm",
        ),
        (
            "unknown kid",
            stranger.sign(
                &json!({"alg": "RS256", "kid": "not-published"}),
                &i.claims(AUD),
            ),
            Code::Unauthenticated,
            "gce_unknown_key",
        ),
        (
            "project not allowed",
            g.sign(None, &{
                let mut c = i.claims(AUD);
                c["google"]["compute_engine"]["project_id"] = json!("other-project");
                c
            }),
            Code::PermissionDenied,
            "gce_project_not_allowed",
        ),
    ];
    for (what, token, code, reason) in cases {
        let before = ca
            .audit_records(&["--outcome", "denied"])
            .iter()
            .filter(|r| r["reason"] == reason)
            .count();
        let err = e2e::create_with_bearer(&ch, &token).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        let after = ca
            .audit_records(&["--outcome", "denied"])
            .iter()
            .filter(|r| r["reason"] == reason)
            .count();
        assert_eq!(after, before + 1, "{what}: audited as {reason}");
    }
    // The unknown kid caused exactly one refetch, which did not find it.
    let fetches = g.counters(|c| c.jwks_fetches);
    assert_eq!(
        fetches, 2,
        "initial fetch + one refetch for the unknown kid"
    );

    // Cross-check failures and the mapping.
    for (what, change, reason) in [
        (
            "not running",
            Box::new(|i: &mut Instance| i.status = "TERMINATED".into())
                as Box<dyn Fn(&mut Instance)>,
            "gce_instance_not_running",
        ),
        (
            "recreated under the same name",
            Box::new(|i: &mut Instance| i.created += 60),
            "gce_instance_mismatch",
        ),
        (
            "no mapping rule",
            Box::new(|i: &mut Instance| i.name = "web-1".into()),
            "gce_no_mapping_rule",
        ),
    ] {
        // A fresh CA for each, so the Compute cache does not answer.
        let dir = tmp.path().join(reason);
        std::fs::create_dir_all(&dir).unwrap();
        let g2 = Google::start(Instance::running("shop-prod", "us-central1-a", "mysql-1")).await;
        let cfg2 = config(&dir, &g2, "30s", true);
        let ca2 = CaProcess::start(&dir.join("state"), &["--gce-config", &cfg2]);
        let ch2 = ca2.channel(None).await;
        let token = if reason == "gce_instance_mismatch" {
            g2.token(AUD) // the token says the original creation time
        } else {
            g2.set_instance(|i| change(i));
            g2.token(AUD)
        };
        if reason == "gce_instance_mismatch" {
            g2.set_instance(|i| change(i));
        }
        let err = e2e::create_with_bearer(&ch2, &token).await.expect_err(what);
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
        let denied = ca2.audit_records(&["--outcome", "denied"]);
        assert!(
            denied.iter().any(|r| r["reason"] == reason),
            "{what}: {denied:#?}"
        );
    }
}

/// Key rotation at the JWKS endpoint, the endpoint going down, and the caches: 1,000
/// token-authenticated requests cost at most one JWKS fetch and one Compute lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwks_rotation_outage_and_caching() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Google::start(Instance::running("shop-prod", "us-central1-a", "mysql-1")).await;
    let cfg = config(tmp.path(), &g, "1s", true);
    let ca = CaProcess::start(&tmp.path().join("state"), &["--gce-config", &cfg]);
    let ch = ca.channel(None).await;

    let token = g.token(AUD);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let ch = ch.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..63 {
                e2e::create_with_bearer(&ch, &token)
                    .await
                    .expect("accepted");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    e2e::create_with_bearer(&ch, &token).await.unwrap();
    e2e::create_with_bearer(&ch, &token).await.unwrap();
    let (jwks, lookups) = g.counters(|c| (c.jwks_fetches, c.compute_lookups));
    assert_eq!(
        ca.metric(
            "ca_requests_total{api=\"modern\",outcome=\"issued\",authenticator=\"gce-token\""
        ),
        1010.0
    );
    assert_eq!(jwks, 1, "1,010 requests, one JWKS fetch");
    assert_eq!(
        lookups, 1,
        "1,010 requests, one Compute lookup for the one instance"
    );

    // Rotation: a token signed with a new key is accepted after one refetch.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    g.rotate();
    e2e::create_with_bearer(&ch, &g.token(AUD))
        .await
        .expect("new key accepted");
    assert_eq!(
        g.counters(|c| c.jwks_fetches),
        2,
        "exactly one refetch for the new kid"
    );

    // The JWKS endpoint goes down: tokens signed with cached keys keep working.
    g.set_jwks_down(true);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    e2e::create_with_bearer(&ch, &g.token(AUD))
        .await
        .expect("cached key still verifies");
    let stranger = e2e::google::SigningKey::generate("key-99");
    let err = e2e::create_with_bearer(
        &ch,
        &stranger.sign(
            &json!({"alg": "RS256", "kid": "key-99"}),
            &g.instance().claims(AUD),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "an unknown key is still refused while the endpoint is down"
    );
}

/// The shipped example configuration parses and is accepted by `serve`'s validation.
#[test]
fn example_configuration_is_valid() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/components/gce/gce-auth.toml"
    );
    let cfg = ca_server::authn::gce::GceConfig::load(Path::new(example), "cluster.local").unwrap();
    assert_eq!(cfg.allowed_projects, vec!["shop-prod"]);
    assert_eq!(cfg.mappings.len(), 2);
    assert!(cfg.compute.is_some());
}

#[test]
fn bad_gce_configuration_is_exit_64() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, needle) in [
        (
            "allowed_projects = []\n[[mapping]]\nnamespace = \"a\"\nservice_account = \"b\"\n",
            "allowed_projects",
        ),
        (
            "allowed_projects = [\"p\"]\n",
            "no [[mapping]] or [[service_account_token]] rule",
        ),
        (
            "allowed_projects = [\"p\"]\n[[service_account_token]]\nunique_id = \"vm-sa@p\"\nnamespace = \"a\"\nservice_account = \"b\"\n",
            "is not a service account's numeric unique id",
        ),
        ("allowed_projects = [\"p\"]\nbogus = 1\n", "bogus"),
        (
            "allowed_projects = [\"p\"]\n[[mapping]]\nlabels = { a = \"b\" }\nnamespace = \"a\"\nservice_account = \"b\"\n",
            "[compute]",
        ),
    ] {
        let path = tmp.path().join("gce.toml");
        std::fs::write(&path, text).unwrap();
        let out = e2e::serve_output(
            &tmp.path().join("s"),
            &["--gce-config", path.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {err}");
        assert!(err.contains(needle), "{text}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_key_refetch_does_not_hold_up_tokens_with_known_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let i = Instance::running("shop-prod", "us-central1-a", "mysql-1");
    let g = Google::start(i.clone()).await;
    let cfg = config(tmp.path(), &g, "1s", false);
    let ca = CaProcess::start(&tmp.path().join("state"), &["--gce-config", &cfg]);
    let ch = ca.channel(None).await;
    // The first token fetches the keys.
    e2e::create_with_bearer(&ch, &g.token(AUD))
        .await
        .expect("first token");
    // Google answers slowly now; a token with an unknown key makes the CA refetch
    // (past the 1 s minimum between fetches).
    g.set_jwks_delay(Some(std::time::Duration::from_secs(3)));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let stranger = e2e::google::SigningKey::generate("not-published");
    let unknown = stranger.sign(
        &json!({"alg": "RS256", "kid": "not-published"}),
        &i.claims(AUD),
    );
    let waiting = {
        let ch = ch.clone();
        tokio::spawn(async move { e2e::create_with_bearer(&ch, &unknown).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Meanwhile a token signed with a known key is verified at once.
    let started = std::time::Instant::now();
    e2e::create_with_bearer(&ch, &g.token(AUD))
        .await
        .expect("a token with a known key");
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(1),
        "a known key waited {took:?} for the refetch"
    );
    let err = waiting.await.unwrap().expect_err("unknown key");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        g.counters(|c| c.jwks_fetches),
        2,
        "initial fetch + one refetch"
    );
}
