//! The identity-Secret controller against the API-server stand-in.

use std::time::{Duration, Instant};

use base64::Engine;
use e2e::CaProcess;
use e2e::kube_api::meta;
use e2e::kube_api::{Kind, KubeApi};
use e2e::wait_for;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::Value;

fn secret_data(s: &Value, key: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD
        .decode(s["data"][key].as_str().unwrap_or_default())
        .unwrap();
    String::from_utf8(b).unwrap()
}

/// Labels namespace `name` in (`true`) or out of (`false`) the CA's management.
async fn set_override(namespaces: &Api<Namespace>, name: &str, managed: bool) {
    let label =
        serde_json::json!({"metadata": {"labels": {"ca.istio.io/override": managed.to_string()}}});
    namespaces
        .patch(name, &PatchParams::default(), &Patch::Merge(label))
        .await
        .unwrap();
}

fn identity_secrets(api: &KubeApi, ns: &str) -> Vec<Value> {
    api.objects(Kind::Secret)
        .into_iter()
        .filter(|s| s["metadata"]["namespace"] == ns && s["type"] == "istio.io/key-and-cert")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_managed_service_account_gets_a_secret() {
    e2e::install_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://{}", api.addr).parse().unwrap(),
    ))
    .unwrap();
    let pp = PostParams::default();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    // 100 managed namespaces × 10 service accounts, plus two opted out.
    let mut names: Vec<(String, Vec<(&str, &str)>)> =
        (0..100).map(|i| (format!("ns{i}"), vec![])).collect();
    names.push((
        "kube-system".into(),
        vec![("ca.istio.io/override", "false")],
    ));
    names.push(("elsewhere".into(), vec![("ca.istio.io/env", "other-ca")]));
    for (ns, labels) in &names {
        namespaces
            .create(
                &pp,
                &Namespace {
                    metadata: meta(ns, labels),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        for j in 0..10 {
            sas.create(
                &pp,
                &ServiceAccount {
                    metadata: meta(&format!("sa{j}"), &[]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
    }
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let ca = CaProcess::start_with_env(
        &tmp.path().join("state"),
        &["--secret-controller", "--secret-check-interval", "1s"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let root = ca.root_pem();
    let started = Instant::now();
    wait_for("1,000 identity secrets", Duration::from_secs(120), || {
        api.objects(Kind::Secret)
            .iter()
            .filter(|s| s["type"] == "istio.io/key-and-cert")
            .count()
            >= 1000
    });
    eprintln!("1,000 secrets in {:?}", started.elapsed());

    for i in 0..100 {
        let ns = format!("ns{i}");
        let secrets = identity_secrets(&api, &ns);
        assert_eq!(secrets.len(), 10, "{ns}");
        for s in &secrets {
            let sa = s["metadata"]["annotations"]["istio.io/service-account.name"]
                .as_str()
                .unwrap();
            assert_eq!(s["metadata"]["name"], format!("istio.{sa}"));
            assert_eq!(secret_data(s, "root-cert.pem"), root);
            let chain =
                ca_core::pem::parse_certificates(secret_data(s, "cert-chain.pem").as_bytes())
                    .unwrap();
            assert_eq!(chain.len(), 2, "leaf + root");
            let facts = ca_core::x509::inspect(&chain[0]).unwrap();
            assert_eq!(
                facts.uri_sans,
                vec![format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")]
            );
            let key = rcgen::KeyPair::from_pem(&secret_data(s, "key.pem")).unwrap();
            assert_eq!(
                rcgen::PublicKeyData::subject_public_key_info(&key),
                facts.spki_der
            );
            let hours = (facts.not_after - facts.not_before).whole_hours();
            assert!(
                (24..=25).contains(&hours),
                "24h workload certificates, got {hours}h"
            );
        }
        let cm = api
            .get(Kind::ConfigMap, &ns, "istio-ca-root-cert")
            .expect("root ConfigMap");
        assert_eq!(cm["data"]["root-cert.pem"].as_str().unwrap(), root);
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true");
    }
    assert!(
        identity_secrets(&api, "kube-system").is_empty(),
        "no secrets in opted-out namespaces"
    );
    assert!(identity_secrets(&api, "elsewhere").is_empty());
    let writes = api.writes();
    assert_eq!(
        writes.of("Secret"),
        1000,
        "one write per secret: {writes:?}"
    );
    assert_eq!(writes.of("ConfigMap"), 100, "{writes:?}");
    // Every issuance is audited.
    let audited = ca
        .audit_records(&["--outcome", "issued"])
        .iter()
        .filter(|r| r["authenticator"] == "secret-controller")
        .count();
    assert_eq!(audited, 1000);

    // Steady state: no writes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(api.writes().of("Secret"), 1000, "no writes in steady state");

    // A deleted secret comes back; a deleted service account takes its secret along.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ns7");
    secrets
        .delete("istio.sa3", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("recreated secret", Duration::from_secs(10), || {
        api.get(Kind::Secret, "ns7", "istio.sa3").is_some()
    });
    Api::<ServiceAccount>::namespaced(client.clone(), "ns7")
        .delete("sa4", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "secret of a deleted SA removed",
        Duration::from_secs(10),
        || api.get(Kind::Secret, "ns7", "istio.sa4").is_none(),
    );

    // Relabelling: a namespace opted in gets its secrets; one opted out is left alone.
    set_override(&namespaces, "elsewhere", true).await;
    wait_for(
        "secrets in a namespace opted in",
        Duration::from_secs(15),
        || identity_secrets(&api, "elsewhere").len() == 10,
    );
    set_override(&namespaces, "ns9", false).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    Api::<Secret>::namespaced(client.clone(), "ns9")
        .delete("istio.sa0", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        api.get(Kind::Secret, "ns9", "istio.sa0").is_none(),
        "an unmanaged namespace is not touched"
    );
    assert_eq!(identity_secrets(&api, "ns9").len(), 9);
}

async fn populate(api: &KubeApi, namespaces: usize, per_ns: usize) -> kube::Client {
    e2e::install_crypto();
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://{}", api.addr).parse().unwrap(),
    ))
    .unwrap();
    let pp = PostParams::default();
    for i in 0..namespaces {
        let ns = format!("ns{i}");
        Api::<Namespace>::all(client.clone())
            .create(
                &pp,
                &Namespace {
                    metadata: meta(&ns, &[]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
        for j in 0..per_ns {
            sas.create(
                &pp,
                &ServiceAccount {
                    metadata: meta(&format!("sa{j}"), &[]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
    }
    client
}

fn count_identity_secrets(api: &KubeApi) -> usize {
    api.objects(Kind::Secret)
        .iter()
        .filter(|s| s["type"] == "istio.io/key-and-cert")
        .count()
}

/// Two replicas: only the leader writes; killing it, the other takes over within the
/// lease duration, without a storm of writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_leader_writes_and_a_dead_leader_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let client = populate(&api, 10, 10).await;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let kc = kubeconfig.display().to_string();
    let args = [
        "--secret-controller",
        "--root-in-secret",
        "--leader-lease-duration",
        "4s",
        "--secret-check-interval",
        "1s",
    ];
    let mut a =
        CaProcess::start_with_env(&tmp.path().join("a"), &args, &[("KUBECONFIG", kc.as_str())]);
    let mut b =
        CaProcess::start_with_env(&tmp.path().join("b"), &args, &[("KUBECONFIG", kc.as_str())]);
    wait_for("100 secrets", Duration::from_secs(60), || {
        count_identity_secrets(&api) == 100
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        api.writes().of("Secret"),
        101,
        "one write per identity secret (100) + the shared root secret, with two replicas running"
    );
    let lease = api
        .get(Kind::Lease, "istio-system", "istio-ca-leader")
        .expect("lease");
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap().to_owned();
    let (leader, follower) = if holder.ends_with(&format!("-{}", a.pid().unwrap())) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        holder.ends_with(&format!("-{}", leader.pid().unwrap())),
        "{holder}"
    );
    let follower_pid = follower.pid().unwrap();

    leader.kill();
    let killed = Instant::now();
    wait_for(
        "the follower to take the lease",
        Duration::from_secs(10),
        || {
            api.get(Kind::Lease, "istio-system", "istio-ca-leader")
                .and_then(|l| {
                    l["spec"]["holderIdentity"]
                        .as_str()
                        .map(|h| h.ends_with(&format!("-{follower_pid}")))
                })
                .unwrap_or(false)
        },
    );
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(4) + Duration::from_secs(2),
        "taken over after {took:?} (lease 4s, renew period 1.3s)"
    );
    // The new leader converges without rewriting what is fine ...
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        api.writes().of("Secret"),
        101,
        "no write storm after a failover"
    );
    // ... and acts on new events.
    Api::<Secret>::namespaced(client.clone(), "ns3")
        .delete("istio.sa3", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "recreated by the new leader",
        Duration::from_secs(10),
        || api.get(Kind::Secret, "ns3", "istio.sa3").is_some(),
    );
    assert_eq!(api.writes().of("Secret"), 103, "delete + recreate");
}

/// Injected 500s, conflicts and dropped watches delay convergence but lose or
/// duplicate nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_faults_delay_but_never_lose_or_duplicate() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let client = populate(&api, 10, 10).await;
    // Someone else already wrote one of the secrets (the controller must not fight it
    // into two, and must fix its content).
    Api::<Secret>::namespaced(client.clone(), "ns0")
        .create(
            &PostParams::default(),
            &Secret {
                metadata: meta("istio.sa0", &[]),
                type_: Some("istio.io/key-and-cert".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    api.fail_next(30);
    api.set_slow(Some(Duration::from_millis(20)));
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let _ca = CaProcess::start_with_env(
        &tmp.path().join("state"),
        &[
            "--secret-controller",
            "--leader-elect",
            "false",
            "--secret-check-interval",
            "1s",
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    api.drop_watches();
    api.set_slow(None);
    tokio::time::sleep(Duration::from_millis(800)).await;
    api.drop_watches();
    wait_for("every secret valid", Duration::from_secs(60), || {
        api.objects(Kind::Secret)
            .iter()
            .filter(|s| {
                s["type"] == "istio.io/key-and-cert" && !s["data"]["cert-chain.pem"].is_null()
            })
            .count()
            == 100
    });
    // Meanwhile an SA is deleted while watches are being dropped.
    Api::<ServiceAccount>::namespaced(client.clone(), "ns5")
        .delete("sa5", &DeleteParams::default())
        .await
        .unwrap();
    api.drop_watches();
    wait_for(
        "secret of the deleted SA removed",
        Duration::from_secs(15),
        || api.get(Kind::Secret, "ns5", "istio.sa5").is_none(),
    );
    assert_eq!(count_identity_secrets(&api), 99);
    let writes = api.writes();
    // 99 creates + 1 update of the foreign secret + 1 create of it by the test + 1 delete.
    assert!(
        writes.of("Secret") <= 102,
        "no duplicate writes: {writes:?}"
    );
}

/// A new plugged-in CA: every Secret and ConfigMap is updated; no Secret keeps the old root.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_change_updates_every_secret_and_configmap() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    populate(&api, 5, 4).await;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let kc = kubeconfig.display().to_string();
    let state = tmp.path().join("state");
    let mut ca = CaProcess::start_with_env(
        &state,
        &["--secret-controller", "--leader-elect", "false"],
        &[("KUBECONFIG", kc.as_str())],
    );
    wait_for("20 secrets", Duration::from_secs(30), || {
        count_identity_secrets(&api) == 20
    });
    let old_root = ca.root_pem();
    ca.stop();

    // The operator plugs in an intermediate under a new root.
    let cacerts = tmp.path().join("cacerts");
    std::fs::create_dir_all(&cacerts).unwrap();
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut root_params = rcgen::CertificateParams::default();
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "New Root");
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let root = root_params.self_signed(&root_key).unwrap();
    std::fs::write(cacerts.join("ca-cert.pem"), root.pem()).unwrap();
    std::fs::write(cacerts.join("ca-key.pem"), root_key.serialize_pem()).unwrap();
    std::fs::write(cacerts.join("cert-chain.pem"), root.pem()).unwrap();
    std::fs::write(cacerts.join("root-cert.pem"), root.pem()).unwrap();
    let _ca2 = CaProcess::start_with_env(
        &tmp.path().join("state2"),
        &[
            "--secret-controller",
            "--leader-elect",
            "false",
            "--plugged-ca-dir",
            cacerts.to_str().unwrap(),
        ],
        &[("KUBECONFIG", kc.as_str())],
    );
    wait_for(
        "every secret on the new root",
        Duration::from_secs(30),
        || {
            api.objects(Kind::Secret)
                .iter()
                .filter(|s| s["type"] == "istio.io/key-and-cert")
                .all(|s| secret_data(s, "root-cert.pem") == root.pem())
        },
    );
    wait_for(
        "every ConfigMap on the new root",
        Duration::from_secs(30),
        || {
            (0..5).all(|i| {
                api.get(Kind::ConfigMap, &format!("ns{i}"), "istio-ca-root-cert")
                    .is_some_and(|cm| {
                        cm["data"]["root-cert.pem"].as_str() == Some(root.pem().as_str())
                    })
            })
        },
    );
    assert!(
        api.objects(Kind::Secret)
            .iter()
            .all(|s| secret_data(s, "root-cert.pem") != old_root)
    );
    assert_eq!(
        count_identity_secrets(&api),
        20,
        "rotated in place, none duplicated"
    );
}
