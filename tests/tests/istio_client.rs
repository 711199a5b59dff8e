//! Requests shaped exactly as Istio's own CA client sends them (pilot-agent's
//! `CitadelClient.CSRSign`, Istio 1.12 and later): metadata `{"CertSigner": ""}`, the
//! gRPC header `ClusterID: Kubernetes`, a CSR with an empty `O=` subject and no SANs,
//! 24 h asked; authenticated by a service-account token, by an exported bundle over
//! mutual TLS, and on renewal by the chain Istio's secret cache keeps (leaf,
//! intermediate, root). Both key types Istio's client makes: RSA-2048 and ECDSA P-256.

use std::path::Path;

use e2e::kube_api::{KubeApi, TokenOwner, make_token};
use e2e::{CaProcess, PluggedCa, modern, openssl};
use istio_ca_proto::IstioCertificateRequest;
use prost_types::value::Kind;
use tonic::Code;
use tonic::transport::Channel;

const DAY: i64 = 86_400;

/// A fresh key and a CSR as Go's `x509.CreateCertificateRequest` makes it for Istio:
/// subject `O=` (an empty PrintableString), no SANs, no extensions. Key PEM is PKCS#8.
fn istio_csr(rsa: bool) -> (String, String) {
    let key = if rsa {
        ca_core::keys::KeyAlgorithm::Rsa(2048).generate().unwrap()
    } else {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
    };
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::OrganizationName,
        rcgen::DnValue::PrintableString("".try_into().unwrap()),
    );
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    (key.serialize_pem(), csr)
}

/// The request message and headers Istio's client sends, with optional extra metadata.
fn istio_request(
    csr: String,
    token: Option<&str>,
    metadata: &[(&str, &str)],
) -> tonic::Request<IstioCertificateRequest> {
    let mut fields = prost_types::Struct::default();
    fields.fields.insert(
        "CertSigner".into(),
        prost_types::Value {
            kind: Some(Kind::StringValue(String::new())),
        },
    );
    for (k, v) in metadata {
        fields.fields.insert(
            k.to_string(),
            prost_types::Value {
                kind: Some(Kind::StringValue(v.to_string())),
            },
        );
    }
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: DAY,
        metadata: Some(fields),
    });
    req.metadata_mut()
        .insert("clusterid", "Kubernetes".parse().unwrap());
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().unwrap();
        req.metadata_mut().insert("authorization", value);
    }
    req
}

/// Sends an Istio-shaped request for a fresh key; the key PEM and the answer's chain.
async fn istio_sign(
    ch: &Channel,
    rsa: bool,
    token: Option<&str>,
) -> Result<(String, Vec<String>), tonic::Status> {
    let (key, csr) = istio_csr(rsa);
    let resp = modern(ch)
        .create_certificate(istio_request(csr, token, &[]))
        .await?;
    Ok((key, resp.into_inner().cert_chain))
}

/// What Istio's client checks, and OpenSSL's verdict: leaf, intermediate, root; the
/// leaf names `identity`, is valid for 24 h (plus the CA's 60 s backdating) and verifies.
fn assert_istio_answer(dir: &Path, chain: &[String], plugged: &PluggedCa, identity: &str) {
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[1], plugged.intermediate_pem);
    assert_eq!(chain[2], plugged.root_pem);
    let der = ca_core::pem::parse_certificates(chain[0].as_bytes()).unwrap();
    let facts = ca_core::x509::inspect(&der[0]).unwrap();
    assert_eq!(facts.uri_sans, vec![identity.to_string()]);
    assert_eq!(facts.san_count, 1, "the SPIFFE ID alone");
    assert_eq!(
        (facts.not_after - facts.not_before).whole_seconds(),
        DAY + 60
    );
    std::fs::write(dir.join("root.pem"), &plugged.root_pem).unwrap();
    std::fs::write(dir.join("int.pem"), &plugged.intermediate_pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), &chain[0]).unwrap();
    let out = openssl(
        dir,
        &[
            "verify",
            "-x509_strict",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "int.pem",
            "leaf.pem",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istio_shaped_requests_are_issued_by_token_mtls_and_renewal() {
    let tmp = tempfile::tempdir().unwrap();
    let plugged = PluggedCa::write(&tmp.path().join("cacerts"));
    let api = KubeApi::start().await;
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let cacerts = tmp.path().join("cacerts");
    let ca = CaProcess::start_with_env(
        &tmp.path().join("state"),
        &[
            "--kubernetes-token-auth",
            "--plugged-ca-dir",
            cacerts.to_str().unwrap(),
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let root = &plugged.root_pem;
    let pod = "spiffe://cluster.local/ns/bookinfo/sa/reviews";
    let token = make_token("bookinfo", "reviews", "istio");
    api.add_token(
        &token,
        TokenOwner::service_account("bookinfo", "reviews", &["istio-ca"]),
    );
    let (bundle_chain, bundle_key) =
        ca.export_bundle("vm", "mysqldb", "24h", &tmp.path().join("bundle"));
    let vm = "spiffe://cluster.local/ns/vm/sa/mysqldb";

    for rsa in [true, false] {
        let what = if rsa { "RSA-2048" } else { "P-256" };
        // A pod's first request: its service-account token, no client certificate.
        let anonymous = e2e::channel(ca.grpc, root, None).await;
        let (key, chain) = istio_sign(&anonymous, rsa, Some(&token))
            .await
            .unwrap_or_else(|e| panic!("{what} by token: {e:?}"));
        assert_istio_answer(tmp.path(), &chain, &plugged, pod);

        // Renewal over mutual TLS with what the secret cache holds: the whole chain.
        let held = chain.concat();
        let renewing = e2e::channel(ca.grpc, root, Some((&held, &key))).await;
        let (_, renewed) = istio_sign(&renewing, rsa, None)
            .await
            .unwrap_or_else(|e| panic!("{what} renewal: {e:?}"));
        assert_istio_answer(tmp.path(), &renewed, &plugged, pod);

        // A VM with an exported bundle (PROV_CERT) over mutual TLS.
        let vm_channel = e2e::channel(ca.grpc, root, Some((&bundle_chain, &bundle_key))).await;
        let (_, issued) = istio_sign(&vm_channel, rsa, None)
            .await
            .unwrap_or_else(|e| panic!("{what} with a bundle: {e:?}"));
        assert_istio_answer(tmp.path(), &issued, &plugged, vm);
    }

    let issued = ca.audit_records(&["--outcome", "issued", "--identity", pod]);
    let by = |who: &str| issued.iter().filter(|r| r["authenticator"] == who).count();
    assert_eq!(
        (by("kubernetes-token"), by("client-cert")),
        (2, 2),
        "{issued:#?}"
    );
    assert!(
        ca.audit_records(&["--outcome", "denied"]).is_empty(),
        "nothing refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_options_with_a_value_are_refused_and_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let (chain, key) = ca.export_bundle("vm", "web", "1h", &tmp.path().join("bundle"));
    let ch = ca.channel(Some((&chain, &key))).await;
    for (metadata, named) in [
        (
            (
                "ImpersonatedIdentity",
                "spiffe://cluster.local/ns/kube-system/sa/admin",
            ),
            "ImpersonatedIdentity",
        ),
        (
            ("CertSigner", "kubernetes.io/kube-apiserver-client"),
            "CertSigner",
        ),
    ] {
        let (_, csr) = istio_csr(false);
        let err = modern(&ch)
            .create_certificate(istio_request(csr, None, &[metadata]))
            .await
            .expect_err("an option we do not honour is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            err.message(),
            format!("unsupported request metadata: {named}")
        );
    }
    let denied = ca.audit_records(&["--outcome", "denied"]);
    assert_eq!(denied.len(), 2, "{denied:#?}");
    for r in &denied {
        assert_eq!(r["reason"], "unsupported_metadata");
        assert_eq!(r["caller"], "spiffe://cluster.local/ns/vm/sa/web");
    }
    assert!(
        ca.audit_records(&[
            "--outcome",
            "issued",
            "--identity",
            "spiffe://cluster.local/ns/kube-system/sa/admin"
        ])
        .is_empty()
    );
}
