//! The VM agent against the real CA on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e::{
    AgentProcess, CaProcess, free_port, generation, pair_matches, published_leaf, run_agent,
    wait_for,
};

struct Setup {
    _tmp: tempfile::TempDir,
    ca: CaProcess,
    bootstrap: PathBuf,
    certs: PathBuf,
    status: PathBuf,
    root: PathBuf,
    bootstrap_serial: String,
}

fn setup(grpc: Option<std::net::SocketAddr>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let state = root.join("state");
    let ca = match grpc {
        Some(addr) => CaProcess::start_at(&state, addr, &[]),
        None => CaProcess::start(&state, &[]),
    };
    let bootstrap = root.join("bootstrap");
    let (chain, _) = ca.export_bundle("vm", "mysqldb", "2160h", &bootstrap);
    let bootstrap_serial = {
        let leaf = ca_core::pem::parse_certificates(chain.as_bytes()).unwrap();
        ca_core::x509::inspect(&leaf[0]).unwrap().serial
    };
    Setup {
        ca,
        bootstrap,
        certs: root.join("certs"),
        status: root.join("status.json"),
        root,
        bootstrap_serial,
        _tmp: tmp,
    }
}

impl Setup {
    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--ca-address".into(),
            self.ca.grpc.to_string(),
            "--bootstrap-dir".into(),
            self.bootstrap.display().to_string(),
            "--certs-dir".into(),
            self.certs.display().to_string(),
            "--status-file".into(),
            self.status.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn agent(&self, extra: &[&str], log: &str) -> AgentProcess {
        let args = self.args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        AgentProcess::start(&args, &self.root.join(log))
    }

    fn once(&self, extra: &[&str]) -> std::process::Output {
        let mut args = vec!["run".to_string(), "--once".to_string()];
        args.extend(self.args(extra));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_agent(&args)
    }

    /// [`Setup::once`], which must succeed.
    fn once_ok(&self, extra: &[&str]) {
        let out = self.once(extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn status(&self) -> (i32, String) {
        let o = run_agent(&[
            "status",
            "--certs-dir",
            self.certs.to_str().unwrap(),
            "--status-file",
            self.status.to_str().unwrap(),
        ]);
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }
}

/// A reader that checks the key/certificate pair on every change, the way a sidecar
/// reads them (through the public paths). A mismatch while `..data` stayed the same is
/// a failure; a read that straddled a generation switch is re-read.
struct PairWatcher {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Watched>,
}

/// Matched-pair checks, reads that straddled a switch, and each generation first seen.
type Watched = (usize, usize, Vec<(Instant, PathBuf)>);

impl PairWatcher {
    fn start(certs: &Path) -> PairWatcher {
        let certs = certs.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut checks, mut straddles) = (0usize, 0usize);
            let mut changes: Vec<(Instant, PathBuf)> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let before = generation(&certs);
                let result = pair_matches(&certs);
                let after = generation(&certs);
                if let (Some(b), Some(ok)) = (before.clone(), result) {
                    if before == after {
                        assert!(
                            ok,
                            "key.pem and cert-chain.pem do not match within generation {b:?}"
                        );
                        checks += 1;
                        if changes.last().map(|(_, g)| g) != Some(&b) {
                            changes.push((Instant::now(), b));
                        }
                    } else {
                        straddles += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (checks, straddles, changes)
        });
        PairWatcher { stop, handle }
    }

    fn finish(self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("pair watcher")
    }
}

/// 20-second certificates: at least three renewals, each near half-life, and a reader
/// never sees a key that does not match the certificate.
#[test]
fn renews_at_half_life_and_the_pair_always_matches() {
    let s = setup(None);
    let watcher = PairWatcher::start(&s.certs);
    let mut agent = s.agent(&["--ttl", "20s"], "agent.log");
    wait_for("first certificate", Duration::from_secs(10), || {
        s.certs.join("..data").exists()
    });
    let first = published_leaf(&s.certs);
    assert_eq!(
        first.spiffe_id().unwrap().as_str(),
        "spiffe://cluster.local/ns/vm/sa/mysqldb"
    );
    assert_eq!(
        (first.not_after - first.not_before).whole_seconds(),
        22,
        "20s plus 2s backdating"
    );
    std::thread::sleep(Duration::from_secs(36));
    assert!(
        agent.wait_exit(Duration::ZERO).is_none(),
        "agent still running:\n{}",
        agent.log_text()
    );
    let (checks, straddles, changes) = watcher.finish();
    assert!(
        changes.len() >= 4,
        "initial + at least 3 renewals, saw {} generations:\n{}",
        changes.len(),
        agent.log_text()
    );
    // Renewal at 0.5 of a 22 s lifetime (±10%) counted from not_before = 2 s before
    // issuance: 7.9 s to 10.1 s after the previous certificate, plus the round trip
    // (generous on a loaded 2-core CI machine; expiry is 20 s away).
    for w in changes.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(
            gap >= Duration::from_millis(7000) && gap <= Duration::from_millis(13000),
            "renewal gap {gap:?}"
        );
    }
    assert!(checks > 1000, "the reader checked only {checks} times");
    eprintln!("pair checks: {checks}, reads that straddled a switch and were re-read: {straddles}");
    let log = agent.log_text();
    assert!(
        log.contains("certificate for spiffe://cluster.local/ns/vm/sa/mysqldb valid until"),
        "{log}"
    );
    assert!(log.contains("renewing in"), "{log}");
    let (code, text) = s.status();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("spiffe://cluster.local/ns/vm/sa/mysqldb"));
    // Every renewal went over mutual TLS with the previous certificate.
    let renewals = s.ca.audit_records(&[
        "--outcome",
        "issued",
        "--identity",
        "spiffe://cluster.local/ns/vm/sa/mysqldb",
    ]);
    let by_cert: Vec<_> = renewals.iter().filter(|r| r["api"] == "modern").collect();
    assert!(by_cert.len() >= 4);
}

/// The CA goes away for longer than a renewal period: the files stay valid and
/// untouched; when the CA comes back, the agent renews within its backoff bound.
#[test]
fn survives_a_ca_outage() {
    let addr = free_port();
    let mut s = setup(Some(addr));
    let _agent = s.agent(&["--ttl", "40s", "--max-backoff", "4s"], "agent.log");
    wait_for("first certificate", Duration::from_secs(10), || {
        s.certs.join("..data").exists()
    });
    let before = generation(&s.certs).unwrap();
    let leaf = published_leaf(&s.certs);
    let key_before = std::fs::read(s.certs.join("key.pem")).unwrap();
    s.ca.stop();
    // Renewal is due ~20 s after issuance; stay down for 26 s.
    std::thread::sleep(Duration::from_secs(26));
    assert_eq!(
        generation(&s.certs).unwrap(),
        before,
        "files untouched during the outage"
    );
    assert_eq!(std::fs::read(s.certs.join("key.pem")).unwrap(), key_before);
    assert!(
        leaf.not_after > time::OffsetDateTime::now_utc(),
        "still valid"
    );
    let (code, status) = s.status();
    assert_eq!(
        code, 0,
        "status reports a valid certificate during the outage: {status}"
    );
    assert!(status.contains("cannot reach the CA"), "{status}");
    s.ca.restart();
    let back = Instant::now();
    wait_for(
        "renewal after the CA returned",
        Duration::from_secs(10),
        || generation(&s.certs).unwrap() != before,
    );
    let took = back.elapsed();
    assert!(
        took <= Duration::from_secs(8),
        "renewed {took:?} after the CA came back (backoff bound 4s + jitter)"
    );
    assert_eq!(pair_matches(&s.certs), Some(true));
}

/// The machine was off longer than its certificate's life: on start the agent renews
/// with the bootstrap bundle, without help.
#[test]
fn expired_certificate_falls_back_to_bootstrap() {
    let s = setup(None);
    s.once_ok(&["--ttl", "10s"]);
    let first = published_leaf(&s.certs);
    std::thread::sleep(Duration::from_millis(
        u64::try_from((first.not_after - time::OffsetDateTime::now_utc()).whole_milliseconds())
            .unwrap_or(0)
            + 1500,
    ));
    let (code, _) = s.status();
    assert_eq!(code, 1, "status fails while the certificate is expired");
    s.once_ok(&["--ttl", "10s"]);
    let second = published_leaf(&s.certs);
    assert_ne!(second.serial, first.serial);
    assert!(second.not_after > time::OffsetDateTime::now_utc());
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&s.status).unwrap()).unwrap();
    assert_eq!(status["last_credential"], "bootstrap");
    assert_eq!(s.status().0, 0);
}

/// Bootstrap revoked and current expired: a clear error, a non-zero exit, and a denied
/// record at the CA.
#[test]
fn revoked_bootstrap_and_expired_current_is_fatal() {
    let s = setup(None);
    s.once_ok(&["--ttl", "10s"]);
    let revoke =
        s.ca.cli(&["revoke", &s.bootstrap_serial, "--reason", "machine retired"]);
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let leaf = published_leaf(&s.certs);
    wait_for("expiry", Duration::from_secs(15), || {
        leaf.not_after < time::OffsetDateTime::now_utc()
    });
    let mut agent = s.agent(&["--ttl", "10s"], "agent.log");
    let code = agent.wait_exit(Duration::from_secs(20));
    assert_eq!(
        code,
        Some(1),
        "agent must exit non-zero:\n{}",
        agent.log_text()
    );
    let log = agent.log_text();
    assert!(
        log.contains("was refused") && log.contains("revoked"),
        "{log}"
    );
    assert!(
        log.contains("export-bundle"),
        "the error names what the admin must do: {log}"
    );
    assert!(log.contains("expired at"), "{log}");
    let denied = s.ca.audit_records(&["--outcome", "denied"]);
    assert!(
        denied.iter().any(|r| r["reason"] == "cert_revoked"
            && r["detail"].as_str().unwrap().contains(&s.bootstrap_serial)),
        "{denied:#?}"
    );
    // The expired files are still there (nothing is deleted), and status says so.
    assert!(s.certs.join("cert-chain.pem").exists());
    let (code, text) = s.status();
    assert_eq!(code, 1);
    assert!(
        text.contains("EXPIRED") && text.contains("revoked"),
        "{text}"
    );
}

#[test]
fn bad_configuration_is_exit_64() {
    for (args, needle) in [
        (vec!["run", "--bootstrap-dir", "/x"], "--ca-address"),
        (vec!["run", "--ca-address", "nohost"], "HOST:PORT"),
        (
            vec!["run", "--ca-address", "h:1", "--renew-at", "1.5"],
            "--renew-at",
        ),
        (
            vec!["run", "--ca-address", "h:1", "--platform", "azure"],
            "azure",
        ),
        (
            vec!["run", "--ca-address", "h:1", "--key-type", "p521"],
            "p521",
        ),
    ] {
        let out = run_agent(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1);
    }
}

/// The agent's answers checker, against a CA that answers wrongly: foreign SPIFFE ID,
/// chain to an unknown root, another key. The old files stay; a right answer is then
/// published.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_answers_are_rejected_and_old_files_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = e2e::fake_ca::FakeCa::start(tmp.path()).await;
    let certs = tmp.path().join("certs");
    let status = tmp.path().join("status.json");
    let args = [
        "--ca-address".to_string(),
        fake.addr.to_string(),
        "--bootstrap-dir".into(),
        fake.bootstrap.display().to_string(),
        "--certs-dir".into(),
        certs.display().to_string(),
        "--status-file".into(),
        status.display().to_string(),
        "--ttl".into(),
        "30s".into(),
        "--renew-at".into(),
        "0.3".into(),
        "--max-backoff".into(),
        "1s".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _agent = AgentProcess::start(&args, &tmp.path().join("agent.log"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let good = generation(&certs).expect("a first, correct certificate is published");
    for (mode, needle) in [
        (e2e::fake_ca::Mode::ForeignIdentity, "but this machine is"),
        (
            e2e::fake_ca::Mode::UnknownRoot,
            "does not chain to a trusted root",
        ),
        (e2e::fake_ca::Mode::OtherKey, "different public key"),
    ] {
        fake.set_mode(mode);
        let served = fake.served();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let st: serde_json::Value = std::fs::read(&status)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            if fake.served() > served
                && st["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(needle))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode:?}: agent did not reject ({st})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            generation(&certs).unwrap(),
            good,
            "{mode:?}: the old files stay"
        );
        assert_eq!(pair_matches(&certs), Some(true));
    }
    fake.set_mode(e2e::fake_ca::Mode::Good);
    let deadline = Instant::now() + Duration::from_secs(10);
    while generation(&certs).unwrap() == good {
        assert!(
            Instant::now() < deadline,
            "a correct answer is published again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
