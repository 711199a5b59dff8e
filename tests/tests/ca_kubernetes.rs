//! Kubernetes service-account tokens at the CA, against the API-server stand-in.

use e2e::CaProcess;
use e2e::kube_api::{KubeApi, TokenOwner, make_token};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pod_tokens_get_exactly_their_service_account() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let ca = CaProcess::start_with_env(
        &tmp.path().join("state"),
        &["--kubernetes-token-auth"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let ch = ca.channel(None).await;

    let good = make_token("bookinfo", "reviews", "t1");
    api.add_token(
        &good,
        TokenOwner::service_account("bookinfo", "reviews", &["istio-ca"]),
    );
    let chain = e2e::create_with_bearer(&ch, &good)
        .await
        .expect("a registered token obtains a certificate");
    let leaf = ca_core::pem::parse_certificates(chain[0].as_bytes()).unwrap();
    let facts = ca_core::x509::inspect(&leaf[0]).unwrap();
    assert_eq!(
        facts.uri_sans,
        vec!["spiffe://cluster.local/ns/bookinfo/sa/reviews"]
    );

    let wrong_aud = make_token("bookinfo", "reviews", "t2");
    api.add_token(
        &wrong_aud,
        TokenOwner::service_account("bookinfo", "reviews", &["https://kubernetes.default.svc"]),
    );
    let user = make_token("default", "default", "t3");
    api.add_token(
        &user,
        TokenOwner {
            username: "alice@example.com".into(),
            groups: vec!["system:authenticated".into()],
            audiences: vec!["istio-ca".into()],
        },
    );
    let forged = make_token("kube-system", "admin", "forged");
    for (what, token, reason) in [
        ("forged", forged.as_str(), "token_rejected"),
        ("unknown", "not-even-a-jwt", "token_rejected"),
        ("wrong audience", wrong_aud.as_str(), "token_rejected"),
        (
            "not a service account",
            user.as_str(),
            "not_a_service_account",
        ),
    ] {
        let err = e2e::create_with_bearer(&ch, token).await.expect_err(what);
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        let denied = ca.audit_records(&["--outcome", "denied"]);
        assert!(
            denied
                .iter()
                .any(|r| r["reason"] == reason && r["authenticator"] == "kubernetes-token"),
            "{what}: {denied:#?}"
        );
    }

    // 1,000 requests with one token: the positive review is cached.
    let before = api.reviews();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let ch = ch.clone();
        let token = good.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                e2e::create_with_bearer(&ch, &token)
                    .await
                    .expect("cached review");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        api.reviews() - before,
        0,
        "1,000 requests with a cached token cause no TokenReview"
    );
    assert_eq!(before, 5, "one review per distinct token so far");
}

/// A CA with the KUBECONFIG of `api`, accepting service-account tokens, with `args`.
fn start_ca(tmp: &std::path::Path, api: &KubeApi, args: &[&str]) -> CaProcess {
    let kubeconfig = tmp.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut all = vec!["--kubernetes-token-auth"];
    all.extend_from_slice(args);
    CaProcess::start_with_env(
        &tmp.join("state"),
        &all,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_review_that_does_not_name_our_audience_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let ca = start_ca(tmp.path(), &api, &[]);
    let ch = ca.channel(None).await;
    let token = make_token("bookinfo", "reviews", "t1");
    api.add_token(
        &token,
        TokenOwner::service_account("bookinfo", "reviews", &["istio-ca"]),
    );
    // An authenticator that ignores audiences says "authenticated" with none: the
    // token is good for the API server, which is not proof it was meant for us.
    api.set_audience_unaware(true);
    let err = e2e::create_with_bearer(&ch, &token)
        .await
        .expect_err("a review without our audience");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let denied = ca.audit_records(&["--outcome", "denied"]);
    assert_eq!(
        denied[0]["reason"], "token_audience_mismatch",
        "{denied:#?}"
    );
    api.set_audience_unaware(false);
    // Negative answers are cached for seconds; a new token of the same account passes.
    let fresh = make_token("bookinfo", "reviews", "t2");
    api.add_token(
        &fresh,
        TokenOwner::service_account("bookinfo", "reviews", &["istio-ca"]),
    );
    e2e::create_with_bearer(&ch, &fresh)
        .await
        .expect("an audience-aware review naming istio-ca");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_bogus_tokens_cost_at_most_the_configured_reviews() {
    const TOKENS: usize = 10_000;
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let ca = start_ca(
        tmp.path(),
        &api,
        &["--token-review-rate", "20", "--token-review-burst", "50"],
    );
    let ch = ca.channel(None).await;
    let started = std::time::Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (ch, next) = (ch.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= TOKENS {
                    return codes;
                }
                let token = make_token("kube-system", "admin", &format!("bogus-{i}"));
                let err = e2e::create_with_bearer(&ch, &token)
                    .await
                    .expect_err("a bogus token");
                codes.push(err.code());
            }
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = 50.0 + 20.0 * elapsed + 1.0;
    let reviews = api.reviews() as f64;
    eprintln!(
        "{TOKENS} bogus tokens in {elapsed:.1} s: {reviews} TokenReviews (allowed {allowed:.0})"
    );
    assert!(
        reviews <= allowed,
        "{reviews} reviews, more than {allowed:.0}"
    );
    let throttled = codes.iter().filter(|c| **c == Code::Unavailable).count();
    let refused = codes
        .iter()
        .filter(|c| **c == Code::Unauthenticated)
        .count();
    assert_eq!(throttled + refused, TOKENS, "only throttled or refused");
    assert_eq!(refused as f64, reviews, "each review refused one token");
    // The record of the flood is bounded: a few records per window, not one per token.
    let denied = ca.audit_records(&["--outcome", "denied"]);
    assert!(denied.len() < 50, "{} denial records", denied.len());
}

/// Two replicas starting at once on one cluster end up with the same root, kept in
/// Secret istio-ca-secret; a restart reuses it.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_the_root_secret() {
    use base64::Engine;
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let kc = kubeconfig.display().to_string();
    let starts: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let state = tmp.path().join(name);
            let kc = kc.clone();
            std::thread::spawn(move || {
                CaProcess::start_with_env(
                    &state,
                    &["--root-in-secret"],
                    &[("KUBECONFIG", kc.as_str())],
                )
            })
        })
        .collect();
    let mut cas: Vec<CaProcess> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let secret = api
        .get(
            e2e::kube_api::Kind::Secret,
            "istio-system",
            "istio-ca-secret",
        )
        .expect("root secret created");
    assert_eq!(secret["type"], "istio.io/ca-root");
    let root_pem = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["ca-cert.pem"].as_str().unwrap())
        .unwrap();
    let root_pem = String::from_utf8(root_pem).unwrap();
    assert!(secret["data"]["ca-key.pem"].is_string());
    assert_eq!(
        api.writes().of("Secret"),
        1,
        "one replica created it, the other read it back"
    );
    let root_der = ca_core::pem::parse_certificates(root_pem.as_bytes())
        .unwrap()
        .remove(0);
    for ca in &cas {
        let chain = e2e::serving_chain(ca.grpc, &root_pem).await;
        assert_eq!(
            chain.last().unwrap().as_ref(),
            root_der.as_ref(),
            "both replicas sign under the shared root"
        );
        assert!(
            !ca.state_dir.join("ca/ca-key.pem").exists(),
            "no root key on local disk"
        );
    }
    cas[0].restart();
    let chain = e2e::serving_chain(cas[0].grpc, &root_pem).await;
    assert_eq!(chain.last().unwrap().as_ref(), root_der.as_ref());
    assert_eq!(api.writes().of("Secret"), 1);
}
