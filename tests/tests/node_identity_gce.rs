//! The agent on a (stand-in) GCE VM: identity tokens from the metadata server, the CA's
//! mapping, renewal over mutual TLS, and a metadata server that goes away.

use std::time::Duration;

use e2e::google::{Google, Instance};
use e2e::wait_for;
use e2e::{AgentProcess, CaProcess, generation, published_leaf, run_agent};

fn gce_config(dir: &std::path::Path, g: &Google) -> String {
    let key = dir.join("ca-sa.json");
    g.write_service_account_key(&key);
    let text = format!(
        "audience = \"istio-ca\"\nallowed_projects = [\"shop-prod\"]\njwks_url = \"{}\"\n\
         [compute]\nbase_url = \"{}\"\ncredentials = \"{}\"\n\
         [[mapping]]\nproject = \"shop-prod\"\ninstance_name = \"mysql-*\"\nlabels = {{ role = \"db\" }}\n\
         namespace = \"vm\"\nservice_account = \"mysqldb\"\n",
        g.jwks_url(),
        g.compute_url(),
        key.display()
    );
    let path = dir.join("gce.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A running VM `name` labelled `role=db` in project shop-prod, a CA that maps it to
/// vm/mysqldb, and the CA's root written to `dir/root-cert.pem`.
async fn db_vm_and_ca(
    dir: &std::path::Path,
    name: &str,
) -> (Google, CaProcess, std::path::PathBuf) {
    let mut instance = Instance::running("shop-prod", "us-central1-a", name);
    instance.labels.insert("role".into(), "db".into());
    let g = Google::start(instance).await;
    let cfg = gce_config(dir, &g);
    let ca = CaProcess::start(&dir.join("state"), &["--gce-config", &cfg]);
    let root = dir.join("root-cert.pem");
    std::fs::write(&root, ca.root_pem()).unwrap();
    (g, ca, root)
}

#[tokio::test(flavor = "multi_thread")]
async fn gce_vm_gets_its_mapped_identity_and_renews() {
    let tmp = tempfile::tempdir().unwrap();
    let (g, ca, root) = db_vm_and_ca(tmp.path(), "mysql-1").await;
    let certs = tmp.path().join("certs");
    let status = tmp.path().join("status.json");
    let args = [
        "--platform".to_string(),
        "gce".into(),
        "--metadata-host".into(),
        g.addr.to_string(),
        "--root-cert".into(),
        root.display().to_string(),
        "--ca-address".into(),
        ca.grpc.to_string(),
        "--certs-dir".into(),
        certs.display().to_string(),
        "--bootstrap-dir".into(),
        tmp.path().join("no-bootstrap").display().to_string(),
        "--status-file".into(),
        status.display().to_string(),
        "--ttl".into(),
        "20s".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProcess::start(&args, &tmp.path().join("agent.log"));
    wait_for("first certificate", Duration::from_secs(15), || {
        certs.join("..data").exists()
    });
    let first = published_leaf(&certs);
    assert_eq!(
        first.spiffe_id().unwrap().as_str(),
        "spiffe://cluster.local/ns/vm/sa/mysqldb",
        "{}",
        agent.log_text()
    );
    assert_eq!(g.counters(|c| c.identity_tokens), 1);

    // Renewals use the certificate over mutual TLS: the metadata server can go away.
    g.set_metadata_down(true);
    let gen1 = generation(&certs).unwrap();
    wait_for("first renewal", Duration::from_secs(15), || {
        generation(&certs).unwrap() != gen1
    });
    let gen2 = generation(&certs).unwrap();
    wait_for("second renewal", Duration::from_secs(15), || {
        generation(&certs).unwrap() != gen2
    });
    assert_eq!(
        g.counters(|c| c.identity_tokens),
        1,
        "no token needed while the certificate is valid"
    );

    let issued = ca.audit_records(&[
        "--outcome",
        "issued",
        "--identity",
        "spiffe://cluster.local/ns/vm/sa/mysqldb",
    ]);
    let by: Vec<&str> = issued
        .iter()
        .map(|r| r["authenticator"].as_str().unwrap())
        .collect();
    assert_eq!(by[0], "gce-token", "{by:?}");
    assert!(
        by[1..].iter().all(|a| *a == "client-cert") && by.len() >= 3,
        "{by:?}"
    );
    assert!(
        issued[0]["caller"]
            .as_str()
            .unwrap()
            .contains("shop-prod/us-central1-a/mysql-1")
    );
    let st = run_agent(&[
        "status",
        "--certs-dir",
        certs.to_str().unwrap(),
        "--status-file",
        status.to_str().unwrap(),
    ]);
    assert!(st.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn platform_auto_detects_the_metadata_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (g, ca, root) = db_vm_and_ca(tmp.path(), "mysql-7").await;
    let dead = e2e::free_port().to_string();
    for (host, expect_ok, needle) in [
        (g.addr.to_string(), true, "using instance identity tokens"),
        (dead, false, "no GCE metadata server"),
    ] {
        let certs = tmp.path().join(format!("certs-{expect_ok}"));
        let out = run_agent(&[
            "run",
            "--once",
            "--platform",
            "auto",
            "--metadata-host",
            &host,
            "--root-cert",
            root.to_str().unwrap(),
            "--ca-address",
            &ca.grpc.to_string(),
            "--certs-dir",
            certs.to_str().unwrap(),
            "--bootstrap-dir",
            tmp.path().join("none").to_str().unwrap(),
            "--status-file",
            tmp.path()
                .join(format!("status-{expect_ok}.json"))
                .to_str()
                .unwrap(),
        ]);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains(needle), "{log}");
        assert_eq!(out.status.success(), expect_ok, "{log}");
        if expect_ok {
            assert_eq!(
                published_leaf(&certs).spiffe_id().unwrap().as_str(),
                "spiffe://cluster.local/ns/vm/sa/mysqldb"
            );
        } else {
            assert!(
                log.contains("no valid credential") && log.contains("bootstrap"),
                "{log}"
            );
        }
    }
}
