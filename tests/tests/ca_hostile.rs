//! Floods from callers with no credential at all, against the real server: what they
//! cost the audit store, the log and the caller's answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use e2e::CaProcess;
use istio_ca_proto::CREATE_CERTIFICATE_PATH;

/// Bytes of the audit store on disk (the database and its write-ahead log).
fn store_bytes(state: &std::path::Path) -> u64 {
    ["audit.db", "audit.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(state.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// A `CreateCertificate` call with a `grpc-timeout` of `timeout` and no body.
fn call_with_timeout(timeout: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://istio-ca{CREATE_CERTIFICATE_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_malformed_requests_is_recorded_completely_in_bounded_space() {
    const REQUESTS: usize = 100_000;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut ca = CaProcess::start(&state, &["--denial-aggregation-window", "2s"]);
    // Measured between clean stops, when the write-ahead log is folded in.
    ca.stop();
    let store_before = store_bytes(&state);
    ca.restart();
    let root = ca.root_pem();
    let log_before = ca.log_text().len();

    // 2 KiB of attacker text in a header, on every request (eight times what a record
    // keeps); no client certificate.
    let junk = Arc::new(format!("9{}", "x".repeat(2 * 1024)));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let conn = e2e::h2_connect(ca.grpc, &root, None)
            .await
            .expect("connect");
        for _ in 0..32 {
            let (mut conn, junk, sent) = (conn.clone(), junk.clone(), sent.clone());
            clients.push(tokio::spawn(async move {
                let mut answered = 0usize;
                while sent.fetch_add(1, Ordering::Relaxed) < REQUESTS {
                    conn = conn.ready().await.expect("connection open");
                    let (response, _) = conn
                        .send_request(call_with_timeout(&junk), true)
                        .expect("send");
                    let response = response.await.expect("an answer");
                    let status = response.headers().get("grpc-status").cloned();
                    assert_eq!(status.as_ref().map(|s| s.as_bytes()), Some(&b"3"[..]));
                    let message = response.headers().get("grpc-message").unwrap();
                    assert!(message.len() < 400, "{} bytes of message", message.len());
                    answered += 1;
                }
                answered
            }));
        }
    }
    let mut answered = 0;
    for c in clients {
        answered += c.await.unwrap();
    }
    assert_eq!(answered, REQUESTS);
    // SIGTERM: the windows still open are recorded before the server exits.
    ca.stop();
    let growth = store_bytes(&state).saturating_sub(store_before);
    let logged = ca.log_text().len() - log_before;
    eprintln!("{REQUESTS} malformed requests: store +{growth} bytes, log +{logged} bytes");
    assert!(growth < 1 << 20, "the store grew by {growth} bytes");
    assert!(logged < 1 << 20, "the log grew by {logged} bytes");

    // Complete: every refused request is in a record, alone or counted in a summary.
    let records = e2e::audit_records_via(|a| e2e::run_cli(&state, a), &["--outcome", "denied"]);
    let mut accounted = 0u64;
    for r in &records {
        assert_eq!(r["reason"], "malformed_request", "{r}");
        let detail = r["detail"].as_str().unwrap_or_default();
        assert!(detail.len() < 400, "{} bytes of detail", detail.len());
        accounted += ca_server::denials::summarised_count(detail).unwrap_or(1);
    }
    eprintln!("{} records account for them", records.len());
    assert_eq!(accounted, REQUESTS as u64);
    assert!(records.len() < 100, "{} records", records.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leaf_from_another_intermediate_under_the_root_does_not_renew() {
    let tmp = tempfile::tempdir().unwrap();
    let cacerts = tmp.path().join("cacerts");
    let plugged = e2e::PluggedCa::write(&cacerts);
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &["--plugged-ca-dir", cacerts.to_str().unwrap()],
    );
    let admin = "spiffe://cluster.local/ns/kube-system/sa/admin";
    let (chain, key) = plugged.sibling_leaf(admin);
    let ch = e2e::channel(ca.grpc, &plugged.root_pem, Some((&chain, &key))).await;
    let (_, csr) = e2e::hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let err = e2e::modern(&ch)
        .create_certificate(e2e::request(csr))
        .await
        .expect_err("a certificate this CA did not issue renewed");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let denied = ca.audit_records(&["--outcome", "denied"]);
    assert_eq!(denied[0]["reason"], "cert_foreign_issuer", "{denied:#?}");
    assert!(
        ca.audit_records(&["--outcome", "issued", "--identity", admin])
            .is_empty()
    );
    // The CA's own leaves still renew.
    let (chain, key) = ca.export_bundle("vm", "web", "1h", &tmp.path().join("b"));
    let ch = e2e::channel(ca.grpc, &plugged.root_pem, Some((&chain, &key))).await;
    let (_, csr) = e2e::hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    e2e::modern(&ch)
        .create_certificate(e2e::request(csr))
        .await
        .expect("a leaf of the CA's own intermediate renews");
}

/// `export-bundle --out DIR` through the CLI: its output.
fn export_to(ca: &CaProcess, out: &std::path::Path, force: bool) -> std::process::Output {
    let mut args = e2e::export_bundle_args("vm", "db", "1h", out.to_str().unwrap()).to_vec();
    if force {
        args.push("--force");
    }
    ca.cli(&args)
}

#[test]
fn export_bundle_writes_only_into_a_directory_of_its_own() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let issued = || ca.audit_records(&["--outcome", "issued"]).len();
    let before = issued();

    // Another user's file, and a directory where it is planted as key.pem.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "another user's file").unwrap();
    let planted = tmp.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    std::os::unix::fs::symlink(&victim, planted.join(".key.pem.tmp")).unwrap();
    let out = export_to(&ca, &planted, false);
    assert!(
        !out.status.success(),
        "a directory with foreign entries was accepted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not part of a bundle"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --out itself a symlink to a directory: refused too.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path().join("elsewhere"), &link).unwrap();
    std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
    assert!(!export_to(&ca, &link, false).status.success());
    assert_eq!(issued(), before, "nothing issued for a refused --out");

    // A bundle whose key.pem is a symlink to the victim: with --force the link is
    // replaced, never followed.
    let bundle = tmp.path().join("bundle");
    assert!(export_to(&ca, &bundle, false).status.success());
    let mode = std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "a new --out is private");
    std::fs::remove_file(bundle.join("key.pem")).unwrap();
    std::os::unix::fs::symlink(&victim, bundle.join("key.pem")).unwrap();
    assert!(export_to(&ca, &bundle, true).status.success());
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "another user's file"
    );
    let key = std::fs::symlink_metadata(bundle.join("key.pem")).unwrap();
    assert!(key.file_type().is_file());
    assert_eq!(key.permissions().mode() & 0o777, 0o600);

    // A directory that belongs to another user (when we can make one).
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        let out = export_to(&ca, &foreign, false);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to uid 65534"));
    }
}

#[test]
fn the_state_directory_and_admin_socket_are_private_from_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = CaProcess::start(&state, &[]);
    let mode =
        |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "an open state directory is tightened");
    assert_eq!(mode(&state.join("admin.sock")), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".admin-socket"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    drop(ca);
}

/// A call whose headers are sent and whose body never ends: it holds a call slot until
/// its deadline.
fn stall(
    conn: &mut h2::client::SendRequest<bytes::Bytes>,
    body: usize,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("https://istio-ca{CREATE_CERTIFICATE_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut stream) = conn.send_request(request, false).expect("send");
    // A length prefix announcing 64,000 bytes, then less than that.
    let mut data = vec![0u8, 0, 0, 0xfa, 0];
    data.resize(body.max(5), 7);
    stream.reserve_capacity(data.len());
    // A call the server shed may already be closed: its data has nowhere to go.
    let _ = stream.send_data(bytes::Bytes::from(data), false);
    (response, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_per_peer_limit_are_closed_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &["--max-connections-per-peer", "4"],
    );
    let root = ca.root_pem();
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(
            e2e::h2_connect(ca.grpc, &root, None)
                .await
                .expect("within the limit"),
        );
    }
    assert!(
        e2e::h2_connect(ca.grpc, &root, None).await.is_err(),
        "a fifth connection from one address"
    );
    assert_eq!(
        ca.metric("ca_connections_refused_total{limit=\"max_connections_per_peer\"}"),
        1.0
    );
    // A closed connection frees its slot.
    drop(open.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while e2e::h2_connect(ca.grpc, &root, None).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &["--connection-idle-timeout", "1s"],
    );
    let conn = e2e::h2_connect(ca.grpc, &ca.root_pem(), None)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let refused = match conn.ready().await {
        Err(_) => true,
        Ok(mut c) => c.send_request(call_with_timeout("1S"), true).is_err(),
    };
    assert!(
        refused,
        "an idle connection is still open after twice the idle timeout"
    );
    assert!(ca.metric("ca_connections_closed_total{why=\"idle\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_over_the_limit_are_shed_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &["--max-concurrent-calls", "3"]);
    let mut conn = e2e::h2_connect(ca.grpc, &ca.root_pem(), None)
        .await
        .unwrap();
    let records = ca.audit_records(&[]).len();
    let _held: Vec<_> = (0..3).map(|_| stall(&mut conn, 1000)).collect();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let (response, _) = conn
        .send_request(call_with_timeout("5S"), true)
        .expect("send");
    let response = response.await.expect("an answer");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(
        response.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"14"[..]),
        "UNAVAILABLE"
    );
    assert_eq!(ca.metric("ca_calls_shed_total"), 1.0);
    assert_eq!(
        ca.audit_records(&[]).len(),
        records,
        "a shed call is not recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_idle_and_a_hundred_stalled_connections_stay_within_memory() {
    // The bound this test holds the server to (a debug build, default limits; the
    // pod's limit is 256 MiB). Figures: docs/BENCHMARKS.md.
    const LIMIT: u64 = 176 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &["--max-connections-per-peer", "2000"],
    );
    let root = ca.root_pem();
    let pid = ca.pid().unwrap();
    let base = e2e::rss(pid);
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(
            e2e::h2_connect(ca.grpc, &root, None)
                .await
                .expect("idle connection"),
        );
    }
    let mut stalled = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..100 {
        let mut conn = e2e::h2_connect(ca.grpc, &root, None)
            .await
            .expect("connection");
        for _ in 0..20 {
            pending.push(stall(&mut conn, 60 * 1024));
        }
        stalled.push(conn);
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let loaded = e2e::rss(pid);
    eprintln!(
        "RSS {} MiB at start, {} MiB with 1,000 idle and 100 stalled connections (2,000 streams); {} calls shed",
        base >> 20,
        loaded >> 20,
        ca.metric("ca_calls_shed_total")
    );
    assert!(loaded < LIMIT, "{} MiB", loaded >> 20);
    // Still serving.
    let ch = ca.channel(None).await;
    let (_, csr) = e2e::hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let err = e2e::modern(&ch)
        .create_certificate(e2e::request(csr))
        .await
        .expect_err("no credential");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unauthenticated | tonic::Code::Unavailable
        ),
        "{err:?}"
    );
    drop((idle, stalled, pending));
}

#[test]
fn a_connection_that_never_finishes_its_handshake_is_closed() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &["--handshake-timeout", "500ms"]);
    // TCP only: no ClientHello ever comes.
    let mut tcp = std::net::TcpStream::connect(ca.grpc).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let n = tcp
        .read(&mut byte)
        .expect("closed, not timed out on our side");
    assert_eq!(n, 0, "the server closes the connection");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_stops_answering_pings_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(
        &tmp.path().join("state"),
        &[
            "--keepalive-interval",
            "300ms",
            "--keepalive-timeout",
            "300ms",
        ],
    );
    // A TLS connection that says the HTTP/2 preface and an empty SETTINGS frame, then
    // never reads or writes again: the server's pings go unanswered.
    let config = e2e::client_tls_config(&ca.root_pem(), None).unwrap();
    let tcp = tokio::net::TcpStream::connect(ca.grpc).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("istio-ca").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        ca.metric("ca_connections_closed_total{why=\"keepalive\"}"),
        1.0,
        "the unanswered ping closed the connection"
    );
    // What the server sent in the meantime ends with the connection closed.
    let mut sent = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tls.read_to_end(&mut sent),
    );
    assert!(read.await.is_ok(), "the connection is still open");
    // An answering peer is not cut off: an ordinary client stays connected.
    let conn = e2e::h2_connect(ca.grpc, &ca.root_pem(), None)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(
        conn.ready().await.is_ok(),
        "a peer answering pings was cut off"
    );
    assert_eq!(
        ca.metric("ca_connections_closed_total{why=\"keepalive\"}"),
        1.0
    );
}
