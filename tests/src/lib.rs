//! Shared pieces of the end-to-end suites: run the real `ca-server` binary on
//! 127.0.0.1 with port 0, talk to it over real TLS, make CSRs and identities.
#![forbid(unsafe_code)]

pub mod docker;
pub mod fake_ca;
pub mod google;
pub mod kube_api;
pub mod postgres;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use istio_ca_proto::istio_ca_service_client::IstioCaServiceClient;
use istio_ca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Installs ring as the process crypto provider (idempotent).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Path of a workspace binary, built once per test process so it is never stale.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // What cargo sets for this test process only. Build scripts that watch one of
        // these (ring's watches CARGO_MANIFEST_DIR) would otherwise see it change from
        // the `cargo test` build, and everything above ring would be rebuilt (~45 s).
        for (var, _) in std::env::vars_os() {
            let name = var.to_string_lossy();
            if [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| name.starts_with(p))
                || [
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&name.as_ref())
            {
                build.env_remove(&var);
            }
        }
        let out = build
            .args([
                "build",
                "--quiet",
                "-p",
                "ca-server",
                "-p",
                "node-identity",
                "--bins",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    if let Err(e) = built {
        panic!("building the binaries failed: {e}");
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join(name);
    assert!(bin.exists(), "{} not found", bin.display());
    bin
}

/// A binary built next to the running one (the benchmarks run from target/release),
/// checked to exist.
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    let bin = exe.parent().expect("target directory").join(name);
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p ca-server -p ca-bench)",
        bin.display()
    );
    bin
}

/// A running `ca-server serve` on loopback, killed when dropped.
pub struct CaProcess {
    child: Option<Child>,
    /// The state directory (kept across restarts).
    pub state_dir: PathBuf,
    /// gRPC address.
    pub grpc: SocketAddr,
    /// HTTP side port.
    pub http: SocketAddr,
    extra_args: Vec<String>,
    log: PathBuf,
    bin: PathBuf,
    listen: String,
    env: Vec<(String, String)>,
}

impl CaProcess {
    /// Starts a CA with its state in `state_dir` and extra `serve` flags.
    pub fn start(state_dir: &Path, extra_args: &[&str]) -> CaProcess {
        Self::start_bin(workspace_bin("ca-server"), state_dir, extra_args)
    }

    /// Like [`CaProcess::start`] with a given `ca-server` binary (e.g. a release build).
    pub fn start_bin(bin: PathBuf, state_dir: &Path, extra_args: &[&str]) -> CaProcess {
        Self::launch(bin, state_dir, "127.0.0.1:0", extra_args, &[])
    }

    /// Starts a CA with extra environment variables (e.g. KUBECONFIG).
    pub fn start_with_env(
        state_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> CaProcess {
        Self::start_bin_with_env(workspace_bin("ca-server"), state_dir, extra_args, env)
    }

    /// [`CaProcess::start_with_env`] with a given binary.
    pub fn start_bin_with_env(
        bin: PathBuf,
        state_dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> CaProcess {
        Self::launch(bin, state_dir, "127.0.0.1:0", extra_args, env)
    }

    /// Starts a CA whose gRPC port is fixed (so it can come back on the same address).
    pub fn start_at(state_dir: &Path, grpc: SocketAddr, extra_args: &[&str]) -> CaProcess {
        Self::launch(
            workspace_bin("ca-server"),
            state_dir,
            &grpc.to_string(),
            extra_args,
            &[],
        )
    }

    fn launch(
        bin: PathBuf,
        state_dir: &Path,
        listen: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> CaProcess {
        let mut p = CaProcess {
            bin,
            listen: listen.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            state_dir: state_dir.to_owned(),
            grpc: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            log: state_dir.with_extension("log"),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let endpoints = self.state_dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.bin)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args([
                "serve",
                "--grpc-addr",
                &self.listen,
                "--http-addr",
                "127.0.0.1:0",
            ])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ca-server");
        self.child = Some(child);
        // Under valgrind (instruction counts, docs/BENCHMARKS.md) a start takes minutes.
        let patience = std::env::var("E2E_START_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        let deadline = Instant::now() + Duration::from_secs(patience);
        loop {
            if let Ok(text) = std::fs::read_to_string(&endpoints) {
                let v: serde_json::Value = serde_json::from_str(&text).expect("endpoints.json");
                self.grpc = v["grpc"].as_str().unwrap().parse().unwrap();
                self.http = v["http"].as_str().unwrap().parse().unwrap();
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "ca-server exited with {status} during start:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ca-server did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// PEM of the CA's trust bundle (self-signed layout).
    pub fn root_pem(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("ca/ca-cert.pem")).expect("root certificate")
    }

    /// Whether the process is still running (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "ca-server did not stop on SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the process again on the same state directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs `ca-server --state-dir <dir> ARGS...` (an admin command), with the
    /// server's environment (so on the server's store).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()
            .expect("run ca-server")
    }

    /// Exports a bundle for `ns/sa` into `out` and returns (chain PEM, key PEM).
    pub fn export_bundle(&self, ns: &str, sa: &str, ttl: &str, out: &Path) -> (String, String) {
        let o = self.cli(&export_bundle_args(ns, sa, ttl, out.to_str().unwrap()));
        assert!(
            o.status.success(),
            "export-bundle failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        (
            std::fs::read_to_string(out.join("cert-chain.pem")).unwrap(),
            std::fs::read_to_string(out.join("key.pem")).unwrap(),
        )
    }

    /// Audit records as JSON values (`audit list --json` plus extra filters).
    pub fn audit_records(&self, extra: &[&str]) -> Vec<serde_json::Value> {
        audit_records_via(|a| self.cli(a), extra)
    }

    /// Asserts that `audit verify` passes and that every serial in `received` has its
    /// issuance record: nothing a client was given went unrecorded.
    pub fn assert_all_recorded(&self, received: &std::collections::BTreeSet<String>) {
        assert_all_recorded_via(|a| self.cli(a), received)
    }

    /// The value of the first series on `/metrics` that starts with `series` (a name,
    /// or a name and the first of its labels), 0 when there is none.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = http_get(self.http, "/metrics");
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// A gRPC channel over TLS, verifying the server as `istio-ca`, optionally with a
    /// client certificate.
    pub async fn channel(&self, client: Option<(&str, &str)>) -> Channel {
        channel(self.grpc, &self.root_pem(), client).await
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what the server said last.
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of the CA's log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// `export-bundle` for `ns/sa` with lifetime `ttl` into `out` (a directory, or `-`).
pub fn export_bundle_args<'a>(
    ns: &'a str,
    sa: &'a str,
    ttl: &'a str,
    out: &'a str,
) -> [&'a str; 9] {
    [
        "export-bundle",
        "--namespace",
        ns,
        "--service-account",
        sa,
        "--ttl",
        ttl,
        "--out",
        out,
    ]
}

/// Audit records as JSON values, from `audit list --json --limit 0` plus `extra` run
/// by `cli` (a local process, or `docker exec` in a container).
pub fn audit_records_via(
    cli: impl Fn(&[&str]) -> Output,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let mut args = vec!["audit", "list", "--json", "--limit", "0"];
    args.extend_from_slice(extra);
    let o = cli(&args);
    assert!(
        o.status.success(),
        "audit list failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts, through the admin commands `cli` runs, that `audit verify` passes and that
/// every serial in `received` has its issuance record.
pub fn assert_all_recorded_via(
    cli: impl Fn(&[&str]) -> Output,
    received: &std::collections::BTreeSet<String>,
) {
    let verify = cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let recorded: std::collections::BTreeSet<String> =
        audit_records_via(&cli, &["--outcome", "issued"])
            .iter()
            .filter_map(|r| r["serial"].as_str().map(str::to_owned))
            .collect();
    let missing: Vec<_> = received.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} delivered certificates have no audit record: {missing:?}",
        missing.len()
    );
}

/// Runs the `ca-server` CLI against a state directory.
pub fn run_cli(state_dir: &Path, args: &[&str]) -> Output {
    Command::new(workspace_bin("ca-server"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ca-server")
}

/// TLS channel to `addr` trusting `root_pem`, with an optional client identity.
pub async fn channel(addr: SocketAddr, root_pem: &str, client: Option<(&str, &str)>) -> Channel {
    channel_to(addr, "istio-ca", root_pem, client).await
}

/// [`channel`], verifying the server as `server_name`.
pub async fn channel_to(
    addr: SocketAddr,
    server_name: &str,
    root_pem: &str,
    client: Option<(&str, &str)>,
) -> Channel {
    install_crypto();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(server_name);
    if let Some((chain, key)) = client {
        tls = tls.identity(Identity::from_pem(chain, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the CA")
}

/// A rustls client configuration (ring) trusting `root_pem`, offering HTTP/2, with a
/// client certificate (chain, key) when given.
pub fn client_tls_config(
    root_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut config = match client {
        Some((chain_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            let key =
                PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// An HTTP/2 connection over TLS on the `h2` crate alone, verifying the server as
/// `istio-ca`, presenting a client certificate (chain, key) when given. For callers
/// that build gRPC requests by hand: wire-level tests, and the load tool, which must
/// cost the server's machine as little as possible.
pub async fn h2_connect(
    addr: SocketAddr,
    root_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<h2::client::SendRequest<bytes::Bytes>, String> {
    use rustls::pki_types::ServerName;
    let config = client_tls_config(root_pem, client)?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let name = ServerName::try_from("istio-ca").map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake::<_, bytes::Bytes>(tls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection to the CA ended: {e}");
        }
    });
    Ok(send)
}

/// Modern API client.
pub fn modern(ch: &Channel) -> IstioCertificateServiceClient<Channel> {
    IstioCertificateServiceClient::new(ch.clone())
}

/// Legacy API client.
pub fn legacy(ch: &Channel) -> IstioCaServiceClient<Channel> {
    IstioCaServiceClient::new(ch.clone())
}

/// A CSR (PEM) for a fresh key of `alg`, asking for a hostile identity and CA powers
/// that the CA must ignore.
pub fn hostile_csr(alg: &'static rcgen::SignatureAlgorithm) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example.com".into()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    let csr = params.serialize_request(&key).unwrap();
    (key, csr.pem().unwrap())
}

/// Runs `openssl` with `args` in `dir`, panicking with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) -> Output {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A CSR made by OpenSSL (an independent implementation) for a key of `spec`:
/// `rsa:N` or `ec:CURVE`. Returns the CSR PEM.
pub fn openssl_csr(dir: &Path, spec: &str) -> String {
    let key = dir.join(format!("{}.key", spec.replace(':', "-")));
    let csr = dir.join(format!("{}.csr", spec.replace(':', "-")));
    let (alg, opt) = spec.split_once(':').unwrap();
    let opt = if alg == "rsa" {
        format!("rsa_keygen_bits:{opt}")
    } else {
        format!("ec_paramgen_curve:{opt}")
    };
    let alg = if alg == "rsa" { "RSA" } else { "EC" };
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            alg,
            "-pkeyopt",
            &opt,
            "-out",
            key.to_str().unwrap(),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            "/CN=ignored",
            "-out",
            csr.to_str().unwrap(),
        ],
    );
    std::fs::read_to_string(csr).unwrap()
}

/// Completes a TLS handshake with the CA as `istio-ca` (no client certificate) and
/// returns the serving certificate chain it presented.
pub async fn serving_chain(
    addr: SocketAddr,
    root_pem: &str,
) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("istio-ca").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the CA");
    tls.get_ref().1.peer_certificates().unwrap().to_vec()
}

/// A free loopback port (bound then released; fine for tests on one machine).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A running `node-identity`, killed when dropped.
pub struct AgentProcess {
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts `node-identity run ARGS...` logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> AgentProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(workspace_bin("node-identity"))
            .arg("run")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn node-identity");
        AgentProcess {
            child,
            log: log.to_owned(),
        }
    }

    /// Waits up to `limit` for the process to exit; its exit code, or None if it runs on.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `node-identity ARGS...` to completion.
pub fn run_agent(args: &[&str]) -> Output {
    Command::new(workspace_bin("node-identity"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run node-identity")
}

/// The generation directory `certs/..data` points at.
pub fn generation(certs: &Path) -> Option<PathBuf> {
    std::fs::read_link(certs.join("..data")).ok()
}

/// Reads `key.pem` and `cert-chain.pem` through the public paths and tells whether the
/// key matches the leaf. `None` when the files are absent or unparsable.
pub fn pair_matches(certs: &Path) -> Option<bool> {
    let key = std::fs::read_to_string(certs.join("key.pem")).ok()?;
    let chain = std::fs::read_to_string(certs.join("cert-chain.pem")).ok()?;
    let key = ca_core::keys::key_pair_from_pem(&key).ok()?;
    let leaf = ca_core::pem::parse_certificates(chain.as_bytes()).ok()?;
    let facts = ca_core::x509::inspect(&leaf[0]).ok()?;
    Some(rcgen::PublicKeyData::subject_public_key_info(&key) == facts.spki_der)
}

/// Facts about the published leaf.
pub fn published_leaf(certs: &Path) -> ca_core::x509::CertFacts {
    let chain = std::fs::read_to_string(certs.join("cert-chain.pem")).unwrap();
    let leaf = ca_core::pem::parse_certificates(chain.as_bytes()).unwrap();
    ca_core::x509::inspect(&leaf[0]).unwrap()
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Polls `f` every 50 ms until it holds, failing the test after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `CreateCertificate` for a fresh P-256 CSR with `authorization: Bearer <token>`;
/// the chain on success.
pub async fn create_with_bearer(ch: &Channel, token: &str) -> Result<Vec<String>, tonic::Status> {
    let (_, csr) = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut req = tonic::Request::new(istio_ca_proto::IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    });
    let value = format!("Bearer {token}")
        .parse()
        .expect("token is a valid header value");
    req.metadata_mut().insert("authorization", value);
    modern(ch)
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

/// Runs `ca-server serve` on `state_dir` (loopback, ephemeral ports) with `args` to
/// completion: for configurations that must be refused before anything listens.
pub fn serve_output(state_dir: &Path, args: &[&str]) -> Output {
    Command::new(workspace_bin("ca-server"))
        .arg("--state-dir")
        .arg(state_dir)
        .arg("serve")
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ca-server serve")
}

/// A plain HTTP/1.1 GET: status code and the whole response text.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text)
}

/// The serial (normalised lowercase hex) of the first certificate in `pem`.
pub fn serial_of(pem: &str) -> String {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    ca_core::x509::normalise_serial(
        &p.parse_x509()
            .unwrap()
            .tbs_certificate
            .raw_serial_as_string(),
    )
}

/// A `CreateCertificate` request with the server's default TTL.
pub fn request(csr: String) -> istio_ca_proto::IstioCertificateRequest {
    istio_ca_proto::IstioCertificateRequest {
        csr,
        validity_duration: 0,
        metadata: None,
    }
}

/// Clients issuing certificates concurrently until each is refused (see [`Issuers::spawn`]).
pub struct Issuers {
    tasks: Vec<tokio::task::JoinHandle<(Vec<String>, Option<tonic::Status>)>>,
}

impl Issuers {
    /// Starts `clients` tasks on `ch`, each with its own P-256 CSR, each sending
    /// `CreateCertificate` until the first error or `max_each` requests (bounded).
    pub fn spawn(ch: &Channel, clients: usize, max_each: usize) -> Issuers {
        let tasks = (0..clients)
            .map(|_| {
                let ch = ch.clone();
                let csr = hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256).1;
                tokio::spawn(async move {
                    let mut serials = Vec::new();
                    for _ in 0..max_each {
                        match modern(&ch).create_certificate(request(csr.clone())).await {
                            Ok(r) => serials.push(serial_of(&r.into_inner().cert_chain[0])),
                            Err(status) => return (serials, Some(status)),
                        }
                    }
                    (serials, None)
                })
            })
            .collect();
        Issuers { tasks }
    }

    /// Waits for every client of every group: the serials they received, and the
    /// errors that stopped them.
    pub async fn join_all(
        groups: Vec<Issuers>,
    ) -> (std::collections::BTreeSet<String>, Vec<tonic::Status>) {
        let mut received = std::collections::BTreeSet::new();
        let mut errors = Vec::new();
        for g in groups {
            let (serials, e) = g.join().await;
            received.extend(serials);
            errors.extend(e);
        }
        (received, errors)
    }

    /// Waits for every client: the serials they received, and the errors that stopped
    /// them.
    pub async fn join(self) -> (std::collections::BTreeSet<String>, Vec<tonic::Status>) {
        let mut received = std::collections::BTreeSet::new();
        let mut errors = Vec::new();
        for t in self.tasks {
            let (serials, error) = t.await.expect("issuing client panicked");
            received.extend(serials);
            errors.extend(error);
        }
        (received, errors)
    }
}

/// An operator's CA in Istio's `cacerts` layout: a root and an intermediate under it
/// that signs (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`).
pub struct PluggedCa {
    /// PEM of the operator's root.
    pub root_pem: String,
    /// PEM of the intermediate the CA signs with.
    pub intermediate_pem: String,
    /// PEM of the root's key (the operator's, for minting other intermediates).
    root_key_pem: String,
    /// PEM of the intermediate's key (the CA's own).
    intermediate_key_pem: String,
}

impl PluggedCa {
    /// Creates the four files in `dir` (created if missing).
    pub fn write(dir: &Path) -> PluggedCa {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let ca_params = |name: &str, constraint| {
            let mut p = CertificateParams::default();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(constraint);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p
        };
        std::fs::create_dir_all(dir).unwrap();
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params("Operator Root", BasicConstraints::Unconstrained);
        let root = root_params.self_signed(&root_key).unwrap();
        let int_key = KeyPair::generate().unwrap();
        let mut int_params = ca_params("Cluster Intermediate", BasicConstraints::Constrained(0));
        int_params.use_authority_key_identifier_extension = true;
        let int = int_params
            .signed_by(&int_key, &Issuer::from_params(&root_params, &root_key))
            .unwrap();
        let (root_pem, intermediate_pem) = (root.pem(), int.pem());
        let files = [
            ("ca-cert.pem", intermediate_pem.clone()),
            ("ca-key.pem", int_key.serialize_pem()),
            ("cert-chain.pem", format!("{intermediate_pem}{root_pem}")),
            ("root-cert.pem", root_pem.clone()),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        PluggedCa {
            root_pem,
            intermediate_pem,
            root_key_pem: root_key.serialize_pem(),
            intermediate_key_pem: int_key.serialize_pem(),
        }
    }

    /// A client certificate for `spiffe_id` from another intermediate under the same
    /// root, named like the CA's own: (chain PEM leaf first, key PEM).
    pub fn sibling_leaf(&self, spiffe_id: &str) -> (String, String) {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let root_key = ca_core::keys::key_pair_from_pem(&self.root_key_pem).unwrap();
        let root = Issuer::from_ca_cert_pem(&self.root_pem, root_key).unwrap();
        let mut int_params = CertificateParams::default();
        int_params
            .distinguished_name
            .push(DnType::CommonName, "Cluster Intermediate");
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let int_key = KeyPair::generate().unwrap();
        let int = int_params.signed_by(&int_key, &root).unwrap();
        let (leaf, key) = spiffe_leaf(spiffe_id, &Issuer::from_params(&int_params, &int_key));
        (format!("{leaf}{}", int.pem()), key)
    }

    /// A certificate for `spiffe_id` signed with the CA's own key, as another program
    /// holding the same `cacerts` (Citadel, say) would issue it: (leaf PEM, key PEM).
    pub fn issued_leaf(&self, spiffe_id: &str) -> (String, String) {
        let key = ca_core::keys::key_pair_from_pem(&self.intermediate_key_pem).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.intermediate_pem, key).unwrap();
        spiffe_leaf(spiffe_id, &issuer)
    }
}

/// A SPIFFE leaf valid for a day, signed by `issuer`: (leaf PEM, key PEM).
fn spiffe_leaf(
    spiffe_id: &str,
    issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
) -> (String, String) {
    use rcgen::{CertificateParams, KeyPair, KeyUsagePurpose, SanType};
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(1);
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, issuer).unwrap();
    (leaf.pem(), key.serialize_pem())
}
