//! The gRPC protocol itself, below the generated clients: what the server answers to
//! requests a well-behaved client never sends (bad framing, compression, unknown
//! methods, other content types) and how it keeps deadlines. Requests are built by
//! hand and sent over TLS with the `h2` crate, which has no gRPC logic of its own.

use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::{CaProcess, hostile_csr};
use h2::client::SendRequest;
use istio_ca_proto::{CREATE_CERTIFICATE_PATH, HANDLE_CSR_PATH, IstioCertificateRequest};
use prost::Message;

/// What came back: HTTP status, gRPC status and message (from the headers of a
/// trailers-only answer, or from the trailers), and the response body.
struct Answer {
    http: u16,
    grpc_status: Option<String>,
    grpc_message: String,
    accept_encoding: Option<String>,
    data: Vec<u8>,
}

fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut v = vec![flag];
    v.extend_from_slice(&(message.len() as u32).to_be_bytes());
    v.extend_from_slice(message);
    v
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn exchange(
    conn: &SendRequest<Bytes>,
    request: http::Request<()>,
    body: Option<Vec<u8>>,
) -> Answer {
    let mut conn = conn.clone().ready().await.expect("connection ready");
    let (response, mut stream) = conn.send_request(request, false).expect("send headers");
    if let Some(body) = body {
        stream.send_data(body.into(), true).expect("send body");
    }
    let response = response.await.expect("response headers");
    let (head, mut recv) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("response body");
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await.expect("trailers").unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| head.headers.get(name))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    // Keep `stream` alive until the answer is in: dropping it would reset the call.
    drop(stream);
    Answer {
        http: head.status.as_u16(),
        grpc_status: field("grpc-status"),
        grpc_message: percent_decode(&field("grpc-message").unwrap_or_default()),
        accept_encoding: field("grpc-accept-encoding"),
        data,
    }
}

fn request(method: &str, path: &str, content_type: &str) -> http::Request<()> {
    http::Request::builder()
        .method(method)
        .uri(format!("https://istio-ca{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .unwrap()
}

async fn call(conn: &SendRequest<Bytes>, path: &str, body: Vec<u8>) -> Answer {
    exchange(conn, request("POST", path, "application/grpc"), Some(body)).await
}

/// A call whose request never ends, with an optional `grpc-timeout`.
async fn silent_call(conn: &SendRequest<Bytes>, timeout: Option<&'static str>) -> Answer {
    let mut r = request("POST", CREATE_CERTIFICATE_PATH, "application/grpc");
    if let Some(t) = timeout {
        r.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static(t));
    }
    exchange(conn, r, None).await
}

/// Opens a `CreateCertificate` call, sends its headers but no body yet, and gives the
/// server a moment to start on it.
async fn open_call(
    conn: &SendRequest<Bytes>,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut send = conn.clone().ready().await.expect("connection ready");
    let opened = send
        .send_request(
            request("POST", CREATE_CERTIFICATE_PATH, "application/grpc"),
            false,
        )
        .expect("send headers");
    tokio::time::sleep(Duration::from_millis(200)).await;
    opened
}

async fn connect(ca: &CaProcess, dir: &std::path::Path) -> SendRequest<Bytes> {
    let (chain, key) = ca.export_bundle("vm", "wire", "1h", dir);
    e2e::install_crypto();
    e2e::h2_connect(ca.grpc, &ca.root_pem(), Some((&chain, &key)))
        .await
        .expect("connect")
}

/// A request refused before it reaches the API, and how.
struct Case {
    what: &'static str,
    path: &'static str,
    body: Vec<u8>,
    /// gRPC status code.
    code: &'static str,
    /// Audit reason of the denial.
    reason: &'static str,
    /// Part of the status message.
    says: &'static str,
}

fn denials(ca: &CaProcess, reason: &str) -> usize {
    ca.audit_records(&["--outcome", "denied"])
        .iter()
        .filter(|r| r["reason"] == reason)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_calls_are_refused_and_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let conn = connect(&ca, &tmp.path().join("b")).await;
    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let good = IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    }
    .encode_to_vec();

    // A hand-built, well-formed call works: the framing below is the real one.
    let ok = call(&conn, CREATE_CERTIFICATE_PATH, framed(0, &good)).await;
    assert_eq!((ok.http, ok.grpc_status.as_deref()), (200, Some("0")));
    assert_eq!(ok.accept_encoding.as_deref(), Some("identity"));
    assert!(ok.data.len() > 5, "a response message");

    let mut two = framed(0, &good);
    two.extend(framed(0, &good));
    let malformed = "malformed_request";
    let case = |what, path, body, code, reason, says| Case {
        what,
        path,
        body,
        code,
        reason,
        says,
    };
    let cases = [
        case(
            "not protobuf",
            CREATE_CERTIFICATE_PATH,
            framed(0, &[0xff, 0xff, 0xff]),
            "3",
            malformed,
            "does not decode",
        ),
        case(
            "not protobuf, legacy API",
            HANDLE_CSR_PATH,
            framed(0, &[0x0a, 0x80]),
            "3",
            malformed,
            "does not decode",
        ),
        case(
            "compressed",
            CREATE_CERTIFICATE_PATH,
            framed(1, &good),
            "12",
            "compressed_request",
            "compressed",
        ),
        case(
            "two messages",
            CREATE_CERTIFICATE_PATH,
            two,
            "3",
            malformed,
            "more than one message",
        ),
        case(
            "no message",
            CREATE_CERTIFICATE_PATH,
            vec![],
            "3",
            malformed,
            "no request message",
        ),
        case(
            "truncated",
            CREATE_CERTIFICATE_PATH,
            framed(0, &good)[..20].to_vec(),
            "3",
            malformed,
            "truncated",
        ),
    ];
    for c in cases {
        let before = denials(&ca, c.reason);
        let a = call(&conn, c.path, c.body).await;
        let what = c.what;
        assert_eq!(a.http, 200, "{what}");
        assert_eq!(a.grpc_status.as_deref(), Some(c.code), "{what}");
        assert!(
            a.grpc_message.contains(c.says),
            "{what}: {}",
            a.grpc_message
        );
        assert_eq!(a.accept_encoding.as_deref(), Some("identity"), "{what}");
        assert_eq!(
            denials(&ca, c.reason),
            before + 1,
            "{what}: one denied record"
        );
    }

    // A malformed deadline is refused and audited like a malformed body.
    let before = denials(&ca, malformed);
    let mut bad_timeout = request("POST", CREATE_CERTIFICATE_PATH, "application/grpc");
    bad_timeout
        .headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("soon"));
    let a = exchange(&conn, bad_timeout, Some(framed(0, &good))).await;
    assert_eq!(a.grpc_status.as_deref(), Some("3"), "{}", a.grpc_message);
    assert!(
        a.grpc_message.contains("grpc-timeout"),
        "{}",
        a.grpc_message
    );
    assert_eq!(denials(&ca, malformed), before + 1);

    // Not one of our methods, or not gRPC: answered, not audited (no API was called).
    let before = ca.audit_records(&["--outcome", "denied"]).len();
    let other = "/istio.v1.auth.IstioCertificateService/Other";
    let a = call(&conn, other, framed(0, &good)).await;
    assert_eq!((a.http, a.grpc_status.as_deref()), (200, Some("12")));
    let json = request("POST", CREATE_CERTIFICATE_PATH, "application/json");
    assert_eq!(exchange(&conn, json, Some(b"{}".to_vec())).await.http, 415);
    let get = request("GET", CREATE_CERTIFICATE_PATH, "application/grpc");
    assert_eq!(exchange(&conn, get, Some(vec![])).await.http, 405);
    assert_eq!(ca.audit_records(&["--outcome", "denied"]).len(), before);

    // The connection survived all of it.
    let ok = call(&conn, CREATE_CERTIFICATE_PATH, framed(0, &good)).await;
    assert_eq!(ok.grpc_status.as_deref(), Some("0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_come_from_the_server_and_the_client() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &["--request-timeout", "1s"]);
    let conn = connect(&ca, &tmp.path().join("b")).await;

    // Each call never finishes its request, so only a deadline can end it: the server's
    // own, a shorter one from the client, and a longer one that does not lengthen it.
    let ms = Duration::from_millis;
    let cases = [
        (None, ms(900), ms(5000), "the server's deadline of 1 s"),
        (
            Some("100m"),
            ms(100),
            ms(900),
            "the client's grpc-timeout of 100 ms",
        ),
        (
            Some("30S"),
            ms(900),
            ms(5000),
            "the server's 1 s, not the client's 30 s",
        ),
    ];
    for (timeout, at_least, below, what) in cases {
        let started = Instant::now();
        let a = silent_call(&conn, timeout).await;
        let waited = started.elapsed();
        assert_eq!(
            a.grpc_status.as_deref(),
            Some("4"),
            "{what}: DEADLINE_EXCEEDED"
        );
        assert!(
            waited >= at_least && waited < below,
            "{what}: answered after {waited:?}"
        );
    }
}

/// SIGTERM stops new calls but lets the ones in flight finish, then the process exits.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_calls_in_flight_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CaProcess::start(&tmp.path().join("state"), &[]);
    let conn = connect(&ca, &tmp.path().join("b")).await;
    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let body = framed(
        0,
        &IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: None,
        }
        .encode_to_vec(),
    );

    // The call is open (headers sent, no body yet) when the server is told to stop.
    let (response, mut stream) = open_call(&conn).await;
    let pid = ca.pid().expect("running").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(ca.is_running(), "draining, not gone");

    // The call in flight completes and is issued.
    stream.send_data(body.into(), true).unwrap();
    let response = response.await.expect("answer during the drain");
    let (head, mut recv) = response.into_parts();
    assert_eq!(head.status, 200);
    while let Some(chunk) = recv.data().await {
        chunk.expect("response body");
    }
    let trailers = recv.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");

    // Then the server exits by itself, and the certificate is in the audit log.
    e2e::wait_for("ca-server to exit", Duration::from_secs(10), || {
        !ca.is_running()
    });
    let issued = ca.audit_records(&["--outcome", "issued"]);
    assert_eq!(
        issued.iter().filter(|r| r["api"] == "modern").count(),
        1,
        "{issued:?}"
    );
}

/// A call its client resets is abandoned at once, not worked on until its deadline
/// (the reset frees the call's slot on the connection for another one).
#[tokio::test(flavor = "multi_thread")]
async fn a_call_reset_by_its_client_is_abandoned() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start_with_env(
        &tmp.path().join("state"),
        &["--request-timeout", "60s"],
        &[("RUST_LOG", "info,ca_server::grpc=debug")],
    );
    let conn = connect(&ca, &tmp.path().join("b")).await;
    let (_response, mut stream) = open_call(&conn).await;
    stream.send_reset(h2::Reason::CANCEL);
    e2e::wait_for(
        "the server to abandon the call",
        Duration::from_secs(10),
        || ca.log_text().contains("call reset by the client"),
    );
}
