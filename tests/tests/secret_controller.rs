//! The identity-Secret controller against the API-server stand-in.

use std::time::{Duration, Instant};

use base64::Engine;
use e2e::CaProcess;
use e2e::kube_api::meta;
use e2e::kube_api::{Kind, KubeApi, TokenOwner, make_token};
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
    let ca = api.start_ca(&tmp.path().join("state"), &["--secret-controller"]);
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
    wait_for("100 root ConfigMaps", Duration::from_secs(30), || {
        api.objects(Kind::ConfigMap).len() >= 100
    });

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
            assert_eq!(chain.len(), 1, "the leaf alone, as Citadel wrote it");
            let facts = ca_core::x509::inspect(&chain[0]).unwrap();
            assert_eq!(
                facts.uri_sans,
                vec![format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")]
            );
            let key = ca_core::keys::key_pair_from_pem(&secret_data(s, "key.pem")).unwrap();
            assert_eq!(
                rcgen::PublicKeyData::subject_public_key_info(&key),
                facts.spki_der
            );
            assert_eq!(
                s["metadata"]["annotations"]["ca.istio.io/managed-by"], "istio-ca.istio-system",
                "marked as this CA's"
            );
            let owner = &s["metadata"]["ownerReferences"][0];
            let account = api.get(Kind::ServiceAccount, &ns, sa).unwrap();
            assert_eq!(owner["kind"], "ServiceAccount");
            assert_eq!(owner["name"], sa);
            assert_eq!(owner["uid"], account["metadata"]["uid"]);
            assert_eq!(owner["controller"], true);
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

    // A deleted secret comes back; a deleted service account takes its secret along
    // (the garbage collector follows the ownerReference).
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
    let sas: Vec<String> = (0..per_ns).map(|j| format!("sa{j}")).collect();
    let sas: Vec<&str> = sas.iter().map(String::as_str).collect();
    for i in 0..namespaces {
        create_accounts(&client, &format!("ns{i}"), &sas).await;
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
    let args = [
        "--secret-controller",
        "--root-in-secret",
        "--leader-lease-duration",
        "4s",
    ];
    let mut a = api.start_ca(&tmp.path().join("a"), &args);
    let mut b = api.start_ca(&tmp.path().join("b"), &args);
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
    // Someone else already wrote one of the secrets: the controller leaves it alone.
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
    // Fails the first lists (the controller's watches then back off: 0.8 s doubling).
    api.fail_next(5);
    api.set_slow(Some(Duration::from_millis(20)));
    let _ca = api.start_ca(
        &tmp.path().join("state"),
        &["--secret-controller", "--leader-elect", "false"],
    );
    wait_for("a first secret", Duration::from_secs(60), || {
        count_identity_secrets(&api) > 1
    });
    // Writes fail too (each reconcile then backs off: 0.5 s doubling).
    api.fail_next(10);
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
            == 99
    });
    let foreign = api.get(Kind::Secret, "ns0", "istio.sa0").unwrap();
    assert!(foreign["data"].is_null(), "not overwritten: {foreign}");
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
    // 99 creates + the test's own create + the garbage collector's delete.
    assert!(
        writes.of("Secret") <= 101,
        "no duplicate writes: {writes:?}"
    );
}

/// A new plugged-in CA: every Secret and ConfigMap is updated; no Secret keeps the old root.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_change_updates_every_secret_and_configmap() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    populate(&api, 5, 4).await;
    let mut ca = api.start_ca(
        &tmp.path().join("state"),
        &["--secret-controller", "--leader-elect", "false"],
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
    let _ca2 = api.start_ca(
        &tmp.path().join("state2"),
        &[
            "--secret-controller",
            "--leader-elect",
            "false",
            "--plugged-ca-dir",
            cacerts.to_str().unwrap(),
        ],
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

fn events_with_reason(api: &KubeApi, reason: &str) -> Vec<Value> {
    api.objects(Kind::Event)
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

fn issued_for(ca: &CaProcess, secret: &str) -> usize {
    ca.audit_records(&["--outcome", "issued"])
        .iter()
        .filter(|r| r["detail"] == format!("Secret {secret}"))
        .count()
}

/// istiod's root ConfigMap, an Opaque `istio.<sa>`, and an identity Secret from another CA
/// are reported and left alone, issuing nothing more for them; a Secret this CA's key
/// signed (Citadel sharing `cacerts`) is adopted without being reissued; a refused
/// ConfigMap write is retried with backoff, not in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_of_others_are_reported_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let client = populate(&api, 3, 3).await;
    let plugged = e2e::PluggedCa::write(&tmp.path().join("cacerts"));
    let pp = PostParams::default();
    let secret = |name: &str, type_: &str, data: &[(&str, &str)]| Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            annotations: name
                .strip_prefix("istio.")
                .map(|sa| [("istio.io/service-account.name".to_string(), sa.to_string())].into()),
            ..Default::default()
        },
        type_: Some(type_.into()),
        data: Some(
            data.iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        k8s_openapi::ByteString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
        ),
        ..Default::default()
    };
    let ns0: Api<Secret> = Api::namespaced(client.clone(), "ns0");
    // An application's own Secret that happens to hold the name.
    ns0.create(
        &pp,
        &secret("istio.sa0", "Opaque", &[("password", "hunter2")]),
    )
    .await
    .unwrap();
    // An identity Secret from another CA.
    let other = e2e::PluggedCa::write(&tmp.path().join("other"));
    let (other_leaf, other_key) = other.issued_leaf("spiffe://cluster.local/ns/ns0/sa/sa1");
    ns0.create(
        &pp,
        &secret(
            "istio.sa1",
            "istio.io/key-and-cert",
            &[
                ("key.pem", &other_key),
                ("cert-chain.pem", &other_leaf),
                ("root-cert.pem", &other.root_pem),
            ],
        ),
    )
    .await
    .unwrap();
    // One that Citadel, holding the same cacerts, wrote.
    let (leaf, key) = plugged.issued_leaf("spiffe://cluster.local/ns/ns1/sa/sa0");
    let chain = format!("{leaf}{}{}", plugged.intermediate_pem, plugged.root_pem);
    Api::<Secret>::namespaced(client.clone(), "ns1")
        .create(
            &pp,
            &secret(
                "istio.sa0",
                "istio.io/key-and-cert",
                &[
                    ("key.pem", &key),
                    ("cert-chain.pem", &chain),
                    ("root-cert.pem", &plugged.root_pem),
                ],
            ),
        )
        .await
        .unwrap();
    // istiod's root ConfigMap.
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), "ns1")
        .create(
            &pp,
            &k8s_openapi::api::core::v1::ConfigMap {
                metadata: meta("istio-ca-root-cert", &[("istio.io/config", "true")]),
                data: Some([("root-cert.pem".to_string(), other.root_pem.clone())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let before = |ns: &str, name: &str| {
        api.get(Kind::Secret, ns, name).unwrap()["metadata"]["resourceVersion"].clone()
    };
    let (rv_opaque, rv_other) = (before("ns0", "istio.sa0"), before("ns0", "istio.sa1"));
    // No ConfigMap may be written for now.
    api.forbid_writes(Kind::ConfigMap, true);
    let cm_requests_before = api.requests(Kind::ConfigMap);

    let ca = api.start_ca(
        &tmp.path().join("state"),
        &[
            "--secret-controller",
            "--leader-elect",
            "false",
            "--plugged-ca-dir",
            tmp.path().join("cacerts").to_str().unwrap(),
        ],
    );
    wait_for("the other six secrets", Duration::from_secs(30), || {
        api.objects(Kind::Secret)
            .iter()
            .filter(|s| {
                s["metadata"]["annotations"]["ca.istio.io/managed-by"] == "istio-ca.istio-system"
            })
            .count()
            == 7
    });
    wait_for("conflict events", Duration::from_secs(10), || {
        events_with_reason(&api, "SecretNotOwned").len() == 2
            && events_with_reason(&api, "ConfigMapNotOwned").len() == 1
    });
    tokio::time::sleep(Duration::from_secs(8)).await;

    assert_eq!(
        before("ns0", "istio.sa0"),
        rv_opaque,
        "the Opaque secret is untouched"
    );
    assert_eq!(
        before("ns0", "istio.sa1"),
        rv_other,
        "the other CA's secret is untouched"
    );
    let cm = api
        .get(Kind::ConfigMap, "ns1", "istio-ca-root-cert")
        .unwrap();
    assert_eq!(
        cm["data"]["root-cert.pem"].as_str(),
        Some(other.root_pem.as_str())
    );
    assert!(cm["metadata"]["annotations"]["ca.istio.io/managed-by"].is_null());
    // The Opaque one cost one issuance when its name was found taken, and none since;
    // the typed foreign one (visible in the watch) cost none.
    assert_eq!(issued_for(&ca, "ns0/istio.sa0"), 1);
    assert_eq!(issued_for(&ca, "ns0/istio.sa1"), 0);
    // Adopted, not reissued: same certificate, now marked and owned.
    let adopted = api.get(Kind::Secret, "ns1", "istio.sa0").unwrap();
    assert_eq!(secret_data(&adopted, "cert-chain.pem"), chain);
    assert_eq!(issued_for(&ca, "ns1/istio.sa0"), 0);
    assert_eq!(
        adopted["metadata"]["ownerReferences"][0]["uid"],
        api.get(Kind::ServiceAccount, "ns1", "sa0").unwrap()["metadata"]["uid"]
    );
    let note = events_with_reason(&api, "SecretNotOwned")
        .iter()
        .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(note.contains("not of type istio.io/key-and-cert"), "{note}");
    assert!(note.contains("not issued by this CA"), "{note}");
    assert!(ca.metric("ca_controller_conflicts_total{kind=\"Secret\"}") >= 2.0);
    assert!(ca.metric("ca_controller_conflicts_total{kind=\"ConfigMap\"}") >= 1.0);

    // Two ConfigMap creates refused with 403 for ~10 s: each retried after 0.5, 1, 2,
    // 4 s ... (a hot loop would be thousands).
    let cm_requests = api.requests(Kind::ConfigMap) - cm_requests_before;
    assert!(
        cm_requests <= 20,
        "{cm_requests} ConfigMap requests while writes were refused"
    );
    api.forbid_writes(Kind::ConfigMap, false);
    wait_for(
        "root ConfigMaps once allowed",
        Duration::from_secs(30),
        || {
            ["ns0", "ns2"]
                .iter()
                .all(|ns| api.get(Kind::ConfigMap, ns, "istio-ca-root-cert").is_some())
        },
    );

    // Once the application's Secret is gone, the CA creates its own.
    ns0.delete("istio.sa0", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the CA's own istio.sa0", Duration::from_secs(30), || {
        api.get(Kind::Secret, "ns0", "istio.sa0")
            .is_some_and(|s| s["type"] == "istio.io/key-and-cert")
    });
    assert_eq!(issued_for(&ca, "ns0/istio.sa0"), 2);
}

fn lease_holder(api: &KubeApi) -> Option<String> {
    api.get(Kind::Lease, "istio-system", "istio-ca-leader")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

/// A holder whose clock runs an hour behind keeps renewing: its `renewTime` always
/// looks expired to us, but the lease keeps changing, so it is not taken. Once the
/// renewals stop, it is taken within the lease duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_with_a_skewed_clock_keeps_its_lease() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let client = populate(&api, 2, 2).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "istio-system");
    let skewed = || {
        MicroTime(
            k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(1),
        )
    };
    leases
        .create(
            &PostParams::default(),
            &Lease {
                metadata: meta("istio-ca-leader", &[]),
                spec: Some(LeaseSpec {
                    holder_identity: Some("replica-with-a-slow-clock".into()),
                    lease_duration_seconds: Some(4),
                    renew_time: Some(skewed()),
                    ..Default::default()
                }),
            },
        )
        .await
        .unwrap();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let renewer = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
            let mut lease = leases.get("istio-ca-leader").await.unwrap();
            lease.spec.as_mut().unwrap().renew_time = Some(skewed());
            leases
                .replace("istio-ca-leader", &PostParams::default(), &lease)
                .await
                .unwrap();
        }
    });
    let ca = api.start_ca(
        &tmp.path().join("state"),
        &["--secret-controller", "--leader-lease-duration", "4s"],
    );
    // Three lease durations.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        lease_holder(&api).as_deref(),
        Some("replica-with-a-slow-clock")
    );
    assert_eq!(api.writes().of("Secret"), 0, "a follower writes nothing");
    assert_eq!(ca.metric("ca_leader "), 0.0);

    stop.send(true).unwrap();
    renewer.await.unwrap();
    let stopped_at = Instant::now();
    wait_for("the lease taken", Duration::from_secs(10), || {
        lease_holder(&api).is_some_and(|h| h.ends_with(&format!("-{}", ca.pid().unwrap())))
    });
    let took = stopped_at.elapsed();
    // Unchanged for a lease duration by our clock (4 s), seen within a renew period.
    assert!(took <= Duration::from_secs(7), "taken after {took:?}");
    wait_for("the new leader's secrets", Duration::from_secs(15), || {
        count_identity_secrets(&api) == 4
    });
}

/// A leader whose API calls stop being answered stops leading before its lease can
/// expire for the others, instead of waiting on the hung request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_api_calls_hang_stops_within_the_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    populate(&api, 1, 1).await;
    let ca = api.start_ca(
        &tmp.path().join("state"),
        &["--secret-controller", "--leader-lease-duration", "4s"],
    );
    wait_for("leading", Duration::from_secs(15), || {
        ca.metric("ca_leader ") == 1.0
    });
    api.set_slow(Some(Duration::from_secs(120)));
    let hung = Instant::now();
    wait_for("leadership given up", Duration::from_secs(10), || {
        ca.metric("ca_leader ") == 0.0
    });
    let took = hung.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "stopped leading {took:?} after the API hung; the lease is 4 s"
    );
    assert!(ca.log_text().contains("stopped leading"));
    assert!(ca.metric("ca_kubernetes_api_timeouts_total{call=\"lease\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secret_keys_can_be_rsa_2048_as_citadel_wrote_them() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    populate(&api, 1, 3).await;
    let ca = api.start_ca(
        &tmp.path().join("state"),
        &["--secret-controller", "--workload-key-type", "rsa2048"],
    );
    wait_for("3 identity secrets", Duration::from_secs(60), || {
        count_identity_secrets(&api) >= 3
    });
    for s in identity_secrets(&api, "ns0") {
        let key = ca_core::keys::key_pair_from_pem(&secret_data(&s, "key.pem")).unwrap();
        let public = ca_core::keys::PublicKey::of_key_pair(&key).unwrap();
        assert_eq!(public.kind, ca_core::KeyKind::Rsa(2048));
        let chain =
            ca_core::pem::parse_certificates(secret_data(&s, "cert-chain.pem").as_bytes()).unwrap();
        let facts = ca_core::x509::inspect(&chain[0]).unwrap();
        assert_eq!(public.spki_der(), facts.spki_der);
    }
    drop(ca);
    // A key type the CA does not know is a configuration error, named.
    let out = std::process::Command::new(e2e::workspace_bin("ca-server"))
        .args(["serve", "--workload-key-type", "rsa1024"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported key type \"rsa1024\""));
}

/// Creates namespace `ns` (unlabelled) with service accounts `sas`.
async fn create_accounts(client: &kube::Client, ns: &str, sas: &[&str]) {
    let pp = PostParams::default();
    let namespace = Namespace {
        metadata: meta(ns, &[]),
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&pp, &namespace)
        .await
        .unwrap();
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    for sa in sas {
        let account = ServiceAccount {
            metadata: meta(sa, &[]),
            ..Default::default()
        };
        api.create(&pp, &account).await.unwrap();
    }
}

/// The leaf of a PEM chain, its facts, and the leaf alone as PEM.
fn first_cert(chain_pem: &str) -> (ca_core::x509::CertFacts, String) {
    let der = ca_core::pem::parse_certificates(chain_pem.as_bytes()).unwrap()[0].to_vec();
    (
        ca_core::x509::inspect(&der).unwrap(),
        ca_core::pem::certificate(&der),
    )
}

/// `openssl verify -x509_strict` of `leaf_pem` against `root_pem`, with `extra` flags.
fn openssl_verifies(dir: &std::path::Path, leaf_pem: &str, root_pem: &str, extra: &[&str]) {
    std::fs::write(dir.join("leaf.pem"), leaf_pem).unwrap();
    std::fs::write(dir.join("root.pem"), root_pem).unwrap();
    let mut args = vec!["verify", "-x509_strict", "-CAfile", "root.pem"];
    args.extend_from_slice(extra);
    args.push("leaf.pem");
    let out = e2e::openssl(dir, &args);
    assert!(String::from_utf8_lossy(&out.stdout).contains("leaf.pem: OK"));
}

/// The CA's own namespace is managed as Citadel managed it: its control-plane service
/// accounts get `istio.<sa>` Secrets, the webhook accounts with Citadel's DNS names,
/// the operator's `--custom-dns-names` added; `cert-chain.pem` is the leaf alone under
/// a self-signed root, as Citadel wrote it. istiod's serving Secret appears with
/// exactly its configured names, verifies against the root as a TLS server for them,
/// and rotates. A Secret of that name held by someone else is left alone and reported.
/// No DNS name reaches a certificate any other way: a token of the same webhook
/// account gets a plain SPIFFE leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istio_system_gets_citadel_names_and_istiod_its_serving_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://{}", api.addr).parse().unwrap(),
    ))
    .unwrap();
    let pp = PostParams::default();
    let accounts = [
        "default",
        "istiod",
        "istio-ingressgateway-service-account",
        "istio-sidecar-injector-service-account",
        "istio-galley-service-account",
        "istio-pilot-service-account",
    ];
    create_accounts(&client, "istio-system", &accounts).await;
    create_accounts(&client, "web", &["default"]).await;
    // An application Secret that holds the name of the second serving Secret.
    let taken = Secret {
        metadata: meta("taken", &[]),
        type_: Some("Opaque".into()),
        data: Some(
            [(
                "password".to_string(),
                k8s_openapi::ByteString(b"hunter2".to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), "web")
        .create(&pp, &taken)
        .await
        .unwrap();

    let istiod_names =
        "istiod.istio-system.svc,istiod-remote.istio-system.svc,istio-pilot.istio-system.svc";
    let serving = format!("istio-system/istiod-tls={istiod_names}");
    let ca = api.start_ca(
        &tmp.path().join("state"),
        &[
            "--secret-controller",
            "--kubernetes-token-auth",
            "--custom-dns-names",
            "istio-pilot-service-account.istio-system:istio-pilot.istio-system,istio-pilot-service-account.istio-system:pilot.example.com",
            "--serving-cert-secret",
            &serving,
            "--serving-cert-secret",
            "web/taken=web.example.com",
            "--workload-cert-ttl",
            "12s",
            "--secret-min-grace",
            "2s",
        ],
    );
    let root = ca.root_pem();
    wait_for(
        "every istio-system account's Secret",
        Duration::from_secs(30),
        || identity_secrets(&api, "istio-system").len() == accounts.len(),
    );
    let expected_dns = |sa: &str| -> Vec<&str> {
        match sa {
            "istio-sidecar-injector-service-account" => vec![
                "istio-sidecar-injector.istio-system.svc",
                "istio-sidecar-injector.istio-system",
            ],
            "istio-galley-service-account" => {
                vec!["istio-galley.istio-system.svc", "istio-galley.istio-system"]
            }
            "istio-pilot-service-account" => vec!["istio-pilot.istio-system", "pilot.example.com"],
            _ => vec![],
        }
    };
    for sa in accounts {
        let s = api
            .get(Kind::Secret, "istio-system", &format!("istio.{sa}"))
            .unwrap();
        let chain = secret_data(&s, "cert-chain.pem");
        assert_eq!(
            ca_core::pem::parse_certificates(chain.as_bytes())
                .unwrap()
                .len(),
            1,
            "cert-chain.pem is the leaf alone under a self-signed root, as Citadel wrote it"
        );
        let (facts, leaf) = first_cert(&chain);
        assert_eq!(
            facts.uri_sans,
            vec![format!("spiffe://cluster.local/ns/istio-system/sa/{sa}")]
        );
        assert_eq!(facts.dns_sans, expected_dns(sa), "{sa}");
        openssl_verifies(tmp.path(), &leaf, &root, &[]);
        if let Some(name) = expected_dns(sa).first() {
            openssl_verifies(tmp.path(), &leaf, &root, &["-verify_hostname", name]);
        }
    }

    // istiod's serving Secret.
    let serving_leaf = |api: &KubeApi| {
        let s = api.get(Kind::Secret, "istio-system", "istiod-tls")?;
        Some((s.clone(), first_cert(&secret_data(&s, "tls.crt"))))
    };
    wait_for("istiod's serving Secret", Duration::from_secs(30), || {
        serving_leaf(&api).is_some()
    });
    let (s, (facts, leaf)) = serving_leaf(&api).unwrap();
    assert_eq!(s["type"], "kubernetes.io/tls");
    assert_eq!(
        s["metadata"]["annotations"]["ca.istio.io/managed-by"],
        "istio-ca.istio-system"
    );
    assert_eq!(facts.dns_sans, istiod_names.split(',').collect::<Vec<_>>());
    assert!(
        facts.uri_sans.is_empty(),
        "a serving certificate, no SPIFFE ID"
    );
    assert_eq!(facts.san_count, 3);
    assert_eq!(secret_data(&s, "ca.crt"), root);
    let key = ca_core::keys::key_pair_from_pem(&secret_data(&s, "tls.key")).unwrap();
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&key),
        facts.spki_der
    );
    for name in istiod_names.split(',') {
        openssl_verifies(
            tmp.path(),
            &leaf,
            &secret_data(&s, "ca.crt"),
            &["-purpose", "sslserver", "-verify_hostname", name],
        );
    }
    // Rotated before expiry: a new serial, still for the same names.
    let first_serial = facts.serial.clone();
    wait_for(
        "istiod's certificate rotated",
        Duration::from_secs(20),
        || serving_leaf(&api).is_some_and(|(_, (f, _))| f.serial != first_serial),
    );
    let (_, (rotated, rotated_pem)) = serving_leaf(&api).unwrap();
    assert_eq!(rotated.dns_sans, facts.dns_sans);
    assert!(rotated.not_after > facts.not_after);
    openssl_verifies(
        tmp.path(),
        &rotated_pem,
        &root,
        &[
            "-purpose",
            "sslserver",
            "-verify_hostname",
            "istiod.istio-system.svc",
        ],
    );
    let audited = ca
        .audit_records(&["--outcome", "issued"])
        .iter()
        .filter(|r| {
            r["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("serving Secret istio-system/istiod-tls"))
        })
        .count();
    assert!(
        audited >= 2,
        "every serving certificate is audited: {audited}"
    );

    // The name someone else holds: untouched, and reported on its namespace.
    wait_for("the conflict reported", Duration::from_secs(15), || {
        events_with_reason(&api, "SecretNotOwned")
            .iter()
            .any(|e| e["regarding"]["kind"] == "Namespace" && e["regarding"]["name"] == "web")
    });
    let still = api.get(Kind::Secret, "web", "taken").unwrap();
    assert_eq!(still["type"], "Opaque");
    assert_eq!(secret_data(&still, "password"), "hunter2");

    // A caller of the webhook account over gRPC gets its SPIFFE ID and nothing more.
    let token = make_token("istio-system", "istio-galley-service-account", "g1");
    api.add_token(
        &token,
        TokenOwner::service_account(
            "istio-system",
            "istio-galley-service-account",
            &["istio-ca"],
        ),
    );
    let ch = ca.channel(None).await;
    let chain = e2e::create_with_bearer(&ch, &token).await.unwrap();
    let (facts, _) = first_cert(&chain[0]);
    assert!(
        facts.dns_sans.is_empty(),
        "DNS names only on the controller path"
    );
    assert_eq!(facts.san_count, 1);
    drop(ca);

    // Names that are no DNS names are configuration errors, named.
    for (flag, value, says) in [
        (
            "--serving-cert-secret",
            "istio-system/x=*.svc",
            "not a DNS name",
        ),
        (
            "--serving-cert-secret",
            "istiod-tls=istiod.istio-system.svc",
            "no '/'",
        ),
        (
            "--custom-dns-names",
            "istiod:istiod.istio-system.svc",
            "SERVICE_ACCOUNT.NAMESPACE",
        ),
    ] {
        let out = std::process::Command::new(e2e::workspace_bin("ca-server"))
            .args(["serve", "--secret-controller", flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
}

/// Under a plugged-in CA, `cert-chain.pem` is the leaf followed by the operator's
/// `cert-chain.pem` as given (here the intermediate alone, as Istio's old samples
/// shipped it), as Citadel wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cert_chain_follows_the_operators_cert_chain_as_citadel_did() {
    let tmp = tempfile::tempdir().unwrap();
    let api = KubeApi::start().await;
    populate(&api, 1, 2).await;
    let cacerts = tmp.path().join("cacerts");
    let plugged = e2e::PluggedCa::write(&cacerts);
    std::fs::write(cacerts.join("cert-chain.pem"), &plugged.intermediate_pem).unwrap();
    let _ca = api.start_ca(
        &tmp.path().join("state"),
        &[
            "--secret-controller",
            "--plugged-ca-dir",
            cacerts.to_str().unwrap(),
        ],
    );
    wait_for("2 identity secrets", Duration::from_secs(30), || {
        count_identity_secrets(&api) == 2
    });
    for s in identity_secrets(&api, "ns0") {
        let chain = secret_data(&s, "cert-chain.pem");
        let (_, leaf) = first_cert(&chain);
        assert_eq!(chain, format!("{leaf}{}", plugged.intermediate_pem));
        assert_eq!(secret_data(&s, "root-cert.pem"), plugged.root_pem);
        std::fs::write(tmp.path().join("chain.pem"), &plugged.intermediate_pem).unwrap();
        openssl_verifies(
            tmp.path(),
            &leaf,
            &plugged.root_pem,
            &["-untrusted", "chain.pem"],
        );
    }
}

/// What Citadel left behind is taken over: its self-signed RSA root in Secret
/// `istio-ca-secret` (the key in PKCS#1 form, as Citadel wrote it) becomes the CA's
/// root with `--root-in-secret`, and an `istio.<sa>` Secret Citadel issued under it is
/// adopted (marked, content kept) rather than replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn citadels_root_secret_and_identity_secrets_are_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let api = KubeApi::start().await;
    let client = populate(&api, 1, 2).await;
    // Citadel's root: RSA 2048, O=cluster.local, key as "RSA PRIVATE KEY".
    e2e::openssl(
        dir,
        &["genrsa", "-traditional", "-out", "ca-key.pem", "2048"],
    );
    e2e::openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "365",
            "-subj",
            "/O=cluster.local",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
    );
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let (root_pem, root_key) = (read("ca-cert.pem"), read("ca-key.pem"));
    assert!(root_key.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let data = |pairs: &[(&str, &str)]| {
        Some(
            pairs
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        k8s_openapi::ByteString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
        )
    };
    let pp = PostParams::default();
    Api::<Secret>::namespaced(client.clone(), "istio-system")
        .create(
            &pp,
            &Secret {
                metadata: meta("istio-ca-secret", &[]),
                type_: Some("istio.io/ca-root".into()),
                data: data(&[("ca-cert.pem", &root_pem), ("ca-key.pem", &root_key)]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The identity Secret Citadel wrote for ns0/sa0: the leaf alone in cert-chain.pem.
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://cluster.local/ns/ns0/sa/sa0".try_into().unwrap(),
    )];
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &root_pem,
        ca_core::keys::key_pair_from_pem(&root_key).unwrap(),
    )
    .unwrap();
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap().pem();
    let mut citadels = Secret {
        metadata: meta("istio.sa0", &[]),
        type_: Some("istio.io/key-and-cert".into()),
        data: data(&[
            ("cert-chain.pem", &leaf),
            ("key.pem", &leaf_key.serialize_pem()),
            ("root-cert.pem", &root_pem),
        ]),
        ..Default::default()
    };
    citadels.metadata.annotations = Some(
        [(
            "istio.io/service-account.name".to_string(),
            "sa0".to_string(),
        )]
        .into(),
    );
    Api::<Secret>::namespaced(client.clone(), "ns0")
        .create(&pp, &citadels)
        .await
        .unwrap();

    let ca = api.start_ca(
        &dir.join("state"),
        &["--secret-controller", "--root-in-secret"],
    );
    let root_der = ca_core::pem::parse_certificates(root_pem.as_bytes()).unwrap();
    let serving = e2e::serving_chain(ca.grpc, &root_pem).await;
    assert_eq!(
        serving.last().unwrap().as_ref(),
        root_der[0].as_ref(),
        "Citadel's root is the CA's"
    );
    wait_for(
        "sa1's Secret and sa0's adopted",
        Duration::from_secs(30),
        || {
            let adopted = api.get(Kind::Secret, "ns0", "istio.sa0").is_some_and(|s| {
                s["metadata"]["annotations"]["ca.istio.io/managed-by"] == "istio-ca.istio-system"
            });
            adopted && api.get(Kind::Secret, "ns0", "istio.sa1").is_some()
        },
    );
    let sa0 = api.get(Kind::Secret, "ns0", "istio.sa0").unwrap();
    assert_eq!(secret_data(&sa0, "cert-chain.pem"), leaf, "content kept");
    let sa1 = api.get(Kind::Secret, "ns0", "istio.sa1").unwrap();
    let (_, new_leaf) = first_cert(&secret_data(&sa1, "cert-chain.pem"));
    openssl_verifies(dir, &new_leaf, &root_pem, &[]);
}
