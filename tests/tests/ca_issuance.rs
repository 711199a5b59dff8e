//! Certificates from both APIs, checked by verifiers independent of the code that built
//! them (OpenSSL and x509-parser), against the rules in docs/COMPATIBILITY.md.

use std::path::Path;

use e2e::{CaProcess, hostile_csr, legacy, modern, openssl, openssl_csr};
use istio_ca_proto::{CsrRequest, IstioCertificateRequest};
use x509_parser::prelude::*;

/// Checks every SPIFFE X.509-SVID rule (docs/COMPATIBILITY.md) with x509-parser, and the chain
/// with `openssl verify`.
fn assert_svid(
    dir: &Path,
    leaf_pem: &str,
    chain_after_leaf: &[String],
    root_pem: &str,
    identity: &str,
    rsa: bool,
) {
    let (_, pem) = parse_x509_pem(leaf_pem.as_bytes()).expect("leaf is PEM");
    let cert = pem.parse_x509().expect("leaf parses with x509-parser");
    let tbs = &cert.tbs_certificate;
    assert!(tbs.subject.iter().next().is_none(), "subject must be empty");
    let san = tbs
        .subject_alternative_name()
        .unwrap()
        .expect("SAN present");
    assert!(
        san.critical,
        "SAN must be critical when the subject is empty"
    );
    assert_eq!(san.value.general_names.len(), 1, "exactly one SAN");
    match &san.value.general_names[0] {
        GeneralName::URI(uri) => assert_eq!(*uri, identity),
        other => panic!("SAN is not a URI: {other:?}"),
    }
    let bc = tbs
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "leaf must not be a CA");
    let ku = tbs.key_usage().unwrap().expect("keyUsage present").value;
    assert!(ku.digital_signature());
    assert_eq!(
        ku.key_encipherment(),
        rsa,
        "keyEncipherment only for RSA keys"
    );
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    let eku = tbs
        .extended_key_usage()
        .unwrap()
        .expect("EKU present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(tbs.raw_serial().len() >= 8, "serial has at least 64 bits");

    let leaf = dir.join("leaf.pem");
    let root = dir.join("root.pem");
    let untrusted = dir.join("untrusted.pem");
    std::fs::write(&leaf, leaf_pem).unwrap();
    std::fs::write(&root, root_pem).unwrap();
    // Everything between the leaf and the root is untrusted input to OpenSSL.
    let intermediates: String = chain_after_leaf
        .iter()
        .filter(|c| c.trim() != root_pem.trim())
        .cloned()
        .collect();
    std::fs::write(&untrusted, &intermediates).unwrap();
    let mut args = vec![
        "verify",
        "-x509_strict",
        "-purpose",
        "sslclient",
        "-CAfile",
        root.to_str().unwrap(),
    ];
    if !intermediates.is_empty() {
        args.extend(["-untrusted", untrusted.to_str().unwrap()]);
    }
    args.push(leaf.to_str().unwrap());
    let out = openssl(dir, &args);
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
}

fn lifetime_secs(pem: &str) -> i64 {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()
}

#[tokio::test(flavor = "multi_thread")]
async fn both_apis_issue_svids_for_the_caller_not_the_csr() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let (chain, key) = ca.export_bundle("vm", "mysqldb", "2160h", &tmp.path().join("bundle"));
    let identity = "spiffe://cluster.local/ns/vm/sa/mysqldb";
    let ch = ca.channel(Some((&chain, &key))).await;
    let root = ca.root_pem();

    // Modern API: hostile CSR (other SPIFFE ID, DNS name, CA:true, keyCertSign).
    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let resp = modern(&ch)
        .create_certificate(e2e::request(csr))
        .await
        .expect("modern API issues")
        .into_inner();
    assert_eq!(resp.cert_chain.len(), 2, "leaf then root");
    assert_eq!(resp.cert_chain[1].trim(), root.trim(), "root last");
    assert_svid(
        tmp.path(),
        &resp.cert_chain[0],
        &resp.cert_chain[1..],
        &root,
        identity,
        false,
    );
    assert_eq!(
        lifetime_secs(&resp.cert_chain[0]),
        3600 + 60,
        "default TTL 1h (plus 60s backdating)"
    );

    // Legacy API with a P-384 key and a 30 minute TTL.
    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P384_SHA384);
    let resp = legacy(&ch)
        .handle_csr(CsrRequest {
            csr_pem: csr.into_bytes(),
            node_agent_credential: chain.clone().into_bytes(),
            credential_type: "onprem".into(),
            requested_ttl_minutes: 30,
        })
        .await
        .expect("legacy API issues")
        .into_inner();
    assert!(resp.is_approved);
    assert_eq!(resp.status.unwrap().code, 0);
    assert!(
        resp.cert_chain.is_empty(),
        "self-signed root: legacy cert_chain is empty"
    );
    let leaf = String::from_utf8(resp.signed_cert).unwrap();
    assert_svid(tmp.path(), &leaf, &[], &root, identity, false);
    assert_eq!(lifetime_secs(&leaf), 1800 + 60);

    // RSA-2048 from OpenSSL's own CSR code.
    let csr = openssl_csr(tmp.path(), "rsa:2048");
    let resp = modern(&ch)
        .create_certificate(IstioCertificateRequest {
            csr,
            validity_duration: 7200,
            metadata: None,
        })
        .await
        .expect("RSA-2048 accepted")
        .into_inner();
    assert_svid(
        tmp.path(),
        &resp.cert_chain[0],
        &resp.cert_chain[1..],
        &root,
        identity,
        true,
    );
    assert_eq!(lifetime_secs(&resp.cert_chain[0]), 7200 + 60);

    // Every issuance is in the audit log with its serial and hashes.
    let issued = ca.audit_records(&["--outcome", "issued", "--identity", identity]);
    let grpc: Vec<_> = issued.iter().filter(|r| r["api"] != "admin").collect();
    assert_eq!(grpc.len(), 3, "{issued:#?}");
    for r in grpc {
        assert_eq!(r["authenticator"], "client-cert");
        assert_eq!(r["caller"], identity);
        assert!(r["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert_eq!(r["cert_sha256"].as_str().unwrap().len(), 64);
        assert_eq!(r["spki_sha256"].as_str().unwrap().len(), 64);
    }
}

/// A plugged-in intermediate: the modern chain is leaf, intermediate, root; the legacy
/// answer splits the leaf from the CA chain.
#[tokio::test(flavor = "multi_thread")]
async fn plugged_in_intermediate_chains() {
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    let plugged = e2e::PluggedCa::write(&cacerts);
    let (root, int) = (&plugged.root_pem, &plugged.intermediate_pem);
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &["--plugged-ca-dir", cacerts.to_str().unwrap()],
    );
    let (chain, key) = ca.export_bundle("ns1", "sa1", "1h", &tmp.path().join("bundle"));
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("bundle/root-cert.pem")).unwrap(),
        *root
    );
    let ch = e2e::channel(ca.grpc, root, Some((&chain, &key))).await;
    let identity = "spiffe://cluster.local/ns/ns1/sa/sa1";

    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let resp = modern(&ch)
        .create_certificate(e2e::request(csr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.cert_chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(&resp.cert_chain[1], int);
    assert_eq!(&resp.cert_chain[2], root);
    assert_svid(
        tmp.path(),
        &resp.cert_chain[0],
        &resp.cert_chain[1..],
        root,
        identity,
        false,
    );

    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let resp = legacy(&ch)
        .handle_csr(CsrRequest {
            csr_pem: csr.into_bytes(),
            requested_ttl_minutes: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let leaf = String::from_utf8(resp.signed_cert).unwrap();
    assert_eq!(
        leaf.matches("BEGIN CERTIFICATE").count(),
        1,
        "signed_cert is the leaf alone"
    );
    assert_eq!(
        String::from_utf8(resp.cert_chain).unwrap(),
        format!("{int}{root}")
    );
    assert_svid(
        tmp.path(),
        &leaf,
        std::slice::from_ref(int),
        root,
        identity,
        false,
    );
}

/// The root's key type is selectable; leaves chain to an RSA or P-384 root as well.
#[tokio::test(flavor = "multi_thread")]
async fn root_key_type_is_selectable() {
    for (key_type, needle) in [
        ("rsa3072", "Public-Key: (3072 bit)"),
        ("p384", "NIST CURVE: P-384"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaProcess::start(&tmp.path().join("state"), &["--root-key-type", key_type]);
        let root = ca.root_pem();
        std::fs::write(tmp.path().join("root.pem"), &root).unwrap();
        let text = openssl(tmp.path(), &["x509", "-in", "root.pem", "-noout", "-text"]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains(needle), "{key_type}: {text}");
        assert!(text.contains("CA:TRUE"));
        let (chain, key) = ca.export_bundle("ns", "sa", "1h", &tmp.path().join("b"));
        let ch = ca.channel(Some((&chain, &key))).await;
        let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        let resp = modern(&ch)
            .create_certificate(e2e::request(csr))
            .await
            .unwrap()
            .into_inner();
        assert_svid(
            tmp.path(),
            &resp.cert_chain[0],
            &resp.cert_chain[1..],
            &root,
            "spiffe://cluster.local/ns/ns/sa/sa",
            false,
        );
        // Restarting reuses the same root.
        drop(ch);
        let mut ca = ca;
        ca.restart();
        assert_eq!(ca.root_pem(), root);
    }
}

/// The CA's own serving certificate is issued by itself for the configured names and
/// renewed at half-life without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn serving_certificate_is_renewed() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &["--serving-cert-ttl", "10s"]);
    let root = ca.root_pem();
    let first = e2e::serving_chain(ca.grpc, &root).await;
    let (_, leaf) = X509Certificate::from_der(first[0].as_ref()).unwrap();
    let names: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.contains("istio-ca.istio-system.svc")),
        "{names:?}"
    );
    let first_serial = leaf.raw_serial().to_vec();
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    let second = e2e::serving_chain(ca.grpc, &root).await;
    let (_, leaf2) = X509Certificate::from_der(second[0].as_ref()).unwrap();
    assert_ne!(
        leaf2.raw_serial(),
        first_serial.as_slice(),
        "renewed after half of 10s"
    );
    let internal = ca
        .audit_records(&["--outcome", "issued"])
        .into_iter()
        .filter(|r| r["api"] == "internal")
        .count();
    assert!(internal >= 2, "each serving certificate is audited");
}
