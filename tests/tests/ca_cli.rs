//! The command line and the HTTP side port, as an operator meets them.

use std::process::{Command, Stdio};

use e2e::{CaProcess, http_get, serve_output, workspace_bin};

fn serve_with(args: &[&str]) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    serve_output(&tmp.path().join("s"), args)
}

#[test]
fn bad_configuration_is_one_line_and_exit_64() {
    for (args, needle) in [
        (vec!["--default-ttl", "48h"], "--default-ttl"),
        (vec!["--max-ttl", "soon"], "soon"),
        (vec!["--trust-domain", "Bad Domain"], "trust domain"),
        (
            vec!["--plugged-ca-dir", "/nonexistent"],
            "ca-cert.pem is missing",
        ),
        (vec!["--root-key-type", "ed448"], "ed448"),
        (vec!["--no-such-flag"], "no-such-flag"),
    ] {
        let out = serve_with(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{args:?}: one line, got {stderr}"
        );
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn environment_configures_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(workspace_bin("ca-server"))
        .args(["serve"])
        .env("CA_STATE_DIR", tmp.path().join("s"))
        .env("CA_DEFAULT_TTL", "2h")
        .env("CA_MAX_TTL", "1h")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--default-ttl (2h) is longer than --max-ttl (1h)")
    );
}

#[test]
fn an_expiry_grace_shorter_than_clock_skew_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = e2e::serve_output(&tmp.path().join("s"), &["--expiry-grace", "10s"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--expiry-grace must be at least 1m"), "{err}");
}

#[test]
fn help_explains_every_serve_flag() {
    let out = Command::new(workspace_bin("ca-server"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--grpc-addr",
        "--http-addr",
        "--trust-domain",
        "--default-ttl",
        "--max-ttl",
        "--audit-retention",
        "--expiry-grace",
        "CA_MAX_TTL",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = CaProcess::start(&tmp.path().join("state"), &[]);
    assert_eq!(http_get(ca.http, "/healthz").0, 200);
    assert_eq!(http_get(ca.http, "/readyz").0, 200);
    let (chain, key) = ca.export_bundle("vm", "m", "1h", &tmp.path().join("b"));
    let ch = ca.channel(Some((&chain, &key))).await;
    let (_, csr) = e2e::hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    e2e::modern(&ch)
        .create_certificate(e2e::request(csr))
        .await
        .unwrap();
    let (code, metrics) = http_get(ca.http, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "ca_requests_total{api=\"modern\",outcome=\"issued\",authenticator=\"client-cert\",reason=\"\"} 1",
        "ca_issuance_duration_seconds_bucket",
        "ca_audit_commit_duration_seconds_bucket",
        "ca_root_expiry_timestamp_seconds",
        "ca_serving_cert_expiry_timestamp_seconds",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
}

/// A second server on the same state directory fails clearly instead of corrupting it.
#[test]
fn second_server_on_same_state_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _ca = CaProcess::start(&state, &[]);
    let out = serve_output(&state, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
}

#[test]
fn serials_must_be_hex() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        vec![
            "revoke",
            "spiffe://cluster.local/ns/a/sa/b",
            "--reason",
            "x",
        ],
        vec!["audit", "show", "xyz"],
    ] {
        let out = e2e::run_cli(tmp.path(), &args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a certificate serial"));
    }
}
