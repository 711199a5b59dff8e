//! The container image as a cluster runs it: FROM scratch, uid 65532, a read-only root
//! filesystem, no capabilities, state on a volume; admin commands through `docker
//! exec` with no shell; certificates over mutual TLS from outside the container; a
//! clean exit on SIGTERM; three replicas on a private network sharing one PostgreSQL.
//!
//! These need the Docker engine and the image: `scripts/test-image.sh` builds it with
//! `scripts/build-image.sh` and runs them (`.ci/run` does). Run by hand:
//! `cargo test -p e2e --test image -- --ignored`.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::docker::{Container, Network, POD_SETTINGS, Volume, docker, image, unique};
use e2e::postgres::Postgres;
use e2e::{Issuers, PluggedCa, hostile_csr, modern, request, serial_of};

const GRPC: u16 = 8060;
const HTTP: u16 = 15014;

/// `docker run` arguments: the pod's settings, published ports, `extra`, the image,
/// and `serve` as the StatefulSet runs it.
fn run_args<'a>(extra: &[&'a str], serve: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = POD_SETTINGS.iter().map(|s| s.to_string()).collect();
    args.extend(["-p", "127.0.0.1::8060", "-p", "127.0.0.1::15014"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(image());
    args.extend(
        [
            "serve",
            "--grpc-addr=0.0.0.0:8060",
            "--http-addr=0.0.0.0:15014",
            "--log-format=json",
        ]
        .map(String::from),
    );
    args.extend(serve.iter().map(|s| s.to_string()));
    args
}

fn start(name: &str, extra: &[&str], serve: &[&str]) -> Container {
    let args = run_args(extra, serve);
    Container::run(name, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn spiffe_of(pem: &str) -> String {
    let certs = ca_core::pem::parse_certificates(pem.as_bytes()).unwrap();
    let facts = ca_core::x509::inspect(&certs[0]).unwrap();
    facts
        .spiffe_id()
        .map(|id| id.to_string())
        .unwrap_or_default()
}

#[test]
#[ignore = "needs the image: scripts/test-image.sh"]
fn the_image_is_the_binary_its_roots_and_its_user() {
    let config = docker(&[
        "image",
        "inspect",
        "-f",
        "{{.Config.User}} {{json .Config.Entrypoint}}",
        &image(),
    ]);
    assert_eq!(config, r#"65532:65532 ["/usr/local/bin/ca-server"]"#);
    // Every file of the image (`docker export` of a container never started).
    let name = unique("ca-image-files");
    docker(&["create", "--name", &name, &image()]);
    let out = e2e::docker::docker_output(&["export", &name]);
    docker(&["rm", "-v", &name]);
    assert!(out.status.success());
    let mut archive = tar::Archive::new(out.stdout.as_slice());
    let mut files = BTreeSet::new();
    let mut roots = String::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().unwrap().display().to_string();
        if path == "etc/ssl/certs/ca-certificates.crt" {
            std::io::Read::read_to_string(&mut entry, &mut roots).unwrap();
        }
        files.insert(path);
    }
    // The roots Google's endpoints chain to (OAuth2, Compute, JWKS): Google Trust
    // Services.
    let subjects: Vec<String> = ca_core::pem::parse_certificates(roots.as_bytes())
        .unwrap()
        .iter()
        .map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
            cert.subject().to_string()
        })
        .collect();
    for gts in ["GTS Root R1", "GTS Root R4"] {
        assert!(
            subjects.iter().any(|s| s.contains(gts)),
            "{gts} is not among the image's {} roots",
            subjects.len()
        );
    }
    // What the build copies in, and the files the engine itself places in every
    // container; no shell, no package manager, nothing else.
    let ours = [
        "etc/group",
        "etc/nsswitch.conf",
        "etc/passwd",
        "etc/ssl/certs/ca-certificates.crt",
        "usr/local/bin/ca-server",
    ];
    let engine = [
        ".dockerenv",
        "dev/console",
        "etc/hostname",
        "etc/hosts",
        "etc/resolv.conf",
    ];
    let extra: Vec<_> = files
        .iter()
        .filter(|f| !ours.contains(&f.as_str()) && !engine.contains(&f.as_str()))
        .collect();
    assert!(extra.is_empty(), "unexpected files in the image: {extra:?}");
    for f in ours {
        assert!(files.contains(f), "{f} missing from the image: {files:?}");
    }
}

#[test]
#[ignore = "needs the image: scripts/test-image.sh"]
fn the_image_runs_as_the_pod_runs_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = Volume::create("ca-image-state");
    let volume = format!("{}:/var/lib/istio-ca", state.name);
    let ca = start(&unique("ca-image"), &["-v", &volume], &[]);
    ca.wait_ready(HTTP);
    let grpc = ca.published(GRPC);

    // An admin command through `docker exec`, no shell: the bundle as a tar stream.
    let bundle = ca.export_bundle("vm", "image-test", "24h");
    let names: Vec<_> = bundle.keys().map(String::as_str).collect();
    assert_eq!(names, ["cert-chain.pem", "key.pem", "root-cert.pem"]);
    assert_eq!(bundle["key.pem"].0, 0o600, "key.pem mode");
    let (chain, key, root) = (
        &bundle["cert-chain.pem"].1,
        &bundle["key.pem"].1,
        &bundle["root-cert.pem"].1,
    );
    assert_eq!(
        spiffe_of(chain),
        "spiffe://cluster.local/ns/vm/sa/image-test"
    );

    // A certificate over mutual TLS from outside the container.
    let renewed = rt.block_on(async {
        let ch = e2e::channel(grpc, root, Some((chain, key))).await;
        let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
        modern(&ch)
            .create_certificate(request(csr))
            .await
            .expect("renewal over mutual TLS")
            .into_inner()
            .cert_chain
    });
    assert_eq!(
        spiffe_of(&renewed[0]),
        "spiffe://cluster.local/ns/vm/sa/image-test"
    );
    let received = BTreeSet::from([serial_of(chain), serial_of(&renewed[0])]);
    e2e::assert_all_recorded_via(|a| ca.cli(a), &received);
    // The README's pipeline: `… export-bundle --out - | tar -x -C DIR`.
    let dir = tempfile::tempdir().unwrap();
    let mut tar = std::process::Command::new("tar")
        .args(["-x", "-C"])
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exported = ca.cli(&[
        "export-bundle",
        "--namespace=vm",
        "--service-account=piped",
        "--out",
        "-",
    ]);
    assert!(exported.status.success());
    std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &exported.stdout).unwrap();
    drop(tar.stdin.take());
    assert!(tar.wait().unwrap().success());
    let key = std::fs::metadata(dir.path().join("key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    let piped = std::fs::read_to_string(dir.path().join("cert-chain.pem")).unwrap();
    assert_eq!(spiffe_of(&piped), "spiffe://cluster.local/ns/vm/sa/piped");
    // A checkpoint signed in the container, kept outside, checked through stdin.
    let cp = ca.cli(&["audit", "checkpoint"]);
    assert!(
        cp.status.success(),
        "{}",
        String::from_utf8_lossy(&cp.stderr)
    );
    let verify = ca.exec_with_stdin(
        &["ca-server", "audit", "verify", "--checkpoint", "-"],
        &cp.stdout,
    );
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    // The same checkpoint with its signature altered.
    let mut forged: serde_json::Value = serde_json::from_slice(&cp.stdout).unwrap();
    let signature = forged["signature"].as_str().unwrap().to_owned();
    let flipped = if signature.starts_with('0') { "1" } else { "0" };
    forged["signature"] = format!("{flipped}{}", &signature[1..]).into();
    let forged = forged.to_string();
    let refused = ca.exec_with_stdin(
        &["ca-server", "audit", "verify", "--checkpoint", "-"],
        forged.as_bytes(),
    );
    assert!(!refused.status.success(), "a forged checkpoint passed");
    // The docs' audit query, in the image's environment (no --state-dir).
    let recent = ca.cli(&["audit", "list", "--since", "10m"]);
    assert!(recent.status.success());
    assert!(String::from_utf8_lossy(&recent.stdout).contains("ns/vm/sa/piped"));

    // SIGTERM (docker stop) ends it cleanly, well within the grace period.
    docker(&["stop", "--time", "20", &ca.name]);
    assert_eq!(
        ca.inspect("{{.State.ExitCode}} {{.State.OOMKilled}}"),
        "0 false",
        "{}",
        ca.logs()
    );
    // The state is on the volume: started again, it is the same CA.
    docker(&["start", &ca.name]);
    ca.wait_ready(HTTP);
    let again = ca.export_bundle("vm", "image-test", "1h");
    assert_eq!(
        &again["root-cert.pem"].1, root,
        "the root survives a restart"
    );
}

#[test]
#[ignore = "needs the image: scripts/test-image.sh"]
fn three_replicas_sharing_postgres_lose_nothing_when_one_is_killed() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let net = Network::create("ca-image-net");
    let pg = Postgres::start_for(net.gateway, &net.subnet);
    // The replicas reach the database by name: /etc/hosts through the static binary's
    // resolver.
    let url = pg
        .database()
        .replace(&pg.addr.ip().to_string(), "db.internal");
    let host = format!("db.internal:{}", net.gateway);
    // One plugged-in CA for all three, readable by the image's user only.
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    let plugged = PluggedCa::write(&cacerts);
    let chown = std::process::Command::new("chown")
        .args(["-R", "65532:65532"])
        .arg(&cacerts)
        .status()
        .unwrap();
    assert!(chown.success(), "chown of the CA files (needs root)");
    let mount = format!("{}:/etc/cacerts:ro", cacerts.display());
    let store = format!("CA_STORE={url}");
    let replicas: Vec<Container> = (0..3)
        .map(|i| {
            let chain = format!("--audit-chain=replica-{i}");
            start(
                &unique(&format!("ca-replica-{i}")),
                &[
                    "--network",
                    &net.name,
                    "--add-host",
                    &host,
                    "-v",
                    &mount,
                    // The ha/ overlay's state: only the admin socket, in memory.
                    "--tmpfs",
                    "/var/lib/istio-ca:uid=65532,gid=65532,mode=0700,size=16m",
                    "-e",
                    &store,
                ],
                &["--plugged-ca-dir=/etc/cacerts", &chain],
            )
        })
        .collect();
    let grpc: Vec<_> = replicas
        .iter()
        .map(|r| {
            r.wait_ready(HTTP);
            r.published(GRPC)
        })
        .collect();
    let bundle = replicas[0].export_bundle("vm", "load", "24h");
    let (chain, key) = (&bundle["cert-chain.pem"].1, &bundle["key.pem"].1);

    let (received, errors) = rt.block_on(async {
        // 64 clients spread over the three replicas, then SIGKILL one under load.
        let mut load = Vec::new();
        for (i, addr) in grpc.iter().enumerate() {
            let ch = e2e::channel(*addr, &plugged.root_pem, Some((chain, key))).await;
            load.push(Issuers::spawn(&ch, if i == 0 { 22 } else { 21 }, 150));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        docker(&["kill", "--signal", "KILL", &replicas[0].name]);
        Issuers::join_all(load).await
    });
    assert!(received.len() >= 100, "only {} issued", received.len());
    // Only the killed replica's clients stopped; the other two served to the end.
    assert!(
        errors.len() <= 22,
        "{} clients stopped: {errors:?}",
        errors.len()
    );
    assert_eq!(replicas[1].inspect("{{.State.Running}}"), "true");
    assert_eq!(replicas[2].inspect("{{.State.Running}}"), "true");
    // Every serial any client received, including from the killed replica, is in the
    // shared store, and every chain verifies; asked through a surviving replica.
    let mut all = received;
    all.insert(serial_of(chain));
    e2e::assert_all_recorded_via(|a| replicas[1].cli(a), &all);
    eprintln!(
        "{} certificates delivered, all recorded; {} clients stopped with the killed replica",
        all.len(),
        errors.len()
    );
    drop(replicas);
    drop(pg);
}
