//! The renewal loop.

use std::path::PathBuf;
use std::time::Duration;

use ca_core::keys::KeyAlgorithm;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::ca_client::{self, CaEndpoint, CallError};
use crate::credential::{CertDir, Credential, CredentialSource, Found};
use crate::publish::{self, Bundle};
use crate::schedule::{Backoff, RenewalSchedule};
use crate::status::{Status, rfc3339};
use crate::verify;

/// Everything the agent needs, validated.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The CA.
    pub ca: CaEndpoint,
    /// Where the sidecar reads `key.pem`, `cert-chain.pem`, `root-cert.pem`.
    pub certs_dir: PathBuf,
    /// The admin-exported bundle, kept apart from the rotating files.
    pub bootstrap_dir: PathBuf,
    /// Requested certificate lifetime.
    pub ttl: Duration,
    /// When to renew.
    pub schedule: RenewalSchedule,
    /// Key type for new keys.
    pub key_type: KeyAlgorithm,
    /// First retry delay.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
    /// The status file.
    pub status_file: PathBuf,
    /// Make sure a valid, not-yet-due certificate is published, then exit.
    pub once: bool,
    /// Prove the instance with a GCE identity token when no certificate can be used.
    pub gce: Option<crate::gce::GceSettings>,
    /// The identity the machine must receive; unset: the current certificate's, or
    /// whatever the CA maps a token to.
    pub expected_identity: Option<ca_core::SpiffeId>,
}

/// How the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested.
    Shutdown,
    /// `--once` finished with a valid certificate.
    Done,
    /// Nothing the agent can do alone: an admin must act (the message says what).
    Fatal(String),
}

enum RenewError {
    /// Try again later; the current files stay.
    Retry(String),
    /// No credential can work: exit non-zero.
    Fatal(String),
}

/// What a renewal published.
struct Renewed {
    identity: String,
    credential: &'static str,
    verified: verify::Verified,
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.wait_for(|s| *s) => true,
    }
}

/// Runs until shutdown, `--once` completion, or a fatal credential problem.
pub async fn run(cfg: AgentConfig, mut shutdown: watch::Receiver<bool>) -> Exit {
    let current = CertDir::new("current", &cfg.certs_dir);
    let mut status = Status::load(&cfg.status_file);
    let mut backoff = Backoff::new(cfg.min_backoff, cfg.max_backoff);
    loop {
        let now = OffsetDateTime::now_utc();
        if let Found::Credential(c) = current.read()
            && c.is_valid_at(now)
        {
            let delay = cfg.schedule.delay(c.not_before, c.not_after, now);
            if !delay.is_zero() {
                tracing::info!(
                    "certificate for {} valid until {}; renewing in {}",
                    c.who(),
                    rfc3339(c.not_after),
                    human(delay)
                );
                status.identity = Some(c.who());
                status.serial = Some(c.serial.clone());
                status.not_after = Some(rfc3339(c.not_after));
                status.next_renewal = Some(rfc3339(now + delay));
                status.save(&cfg.status_file);
                if cfg.once {
                    return Exit::Done;
                }
                if sleep_or_shutdown(delay, &mut shutdown).await {
                    return Exit::Shutdown;
                }
                continue;
            }
        }
        match renew(&cfg).await {
            Ok(r) => {
                backoff.reset();
                tracing::info!(
                    identity = %r.identity,
                    serial = %r.verified.serial,
                    credential = r.credential,
                    "published a new certificate in {}",
                    cfg.certs_dir.display()
                );
                status.last_success = Some(rfc3339(OffsetDateTime::now_utc()));
                status.last_credential = Some(r.credential.into());
                status.last_error = None;
                status.last_error_at = None;
            }
            Err(RenewError::Fatal(msg)) => {
                tracing::error!("{msg}");
                status.last_error = Some(msg.clone());
                status.last_error_at = Some(rfc3339(OffsetDateTime::now_utc()));
                status.next_renewal = None;
                status.save(&cfg.status_file);
                return Exit::Fatal(msg);
            }
            Err(RenewError::Retry(msg)) => {
                let wait = backoff.next_delay();
                let still = match current.read() {
                    Found::Credential(c) if c.is_valid_at(OffsetDateTime::now_utc()) => {
                        format!(
                            "the current certificate stays valid until {}",
                            rfc3339(c.not_after)
                        )
                    }
                    _ => "no valid certificate is published".to_string(),
                };
                tracing::warn!(
                    "renewal failed: {msg}; {still}; retrying in {}",
                    human(wait).max("1s".into())
                );
                status.last_error = Some(msg.clone());
                status.last_error_at = Some(rfc3339(OffsetDateTime::now_utc()));
                status.next_renewal = Some(rfc3339(OffsetDateTime::now_utc() + wait));
                status.save(&cfg.status_file);
                if cfg.once {
                    return Exit::Fatal(msg);
                }
                if sleep_or_shutdown(wait, &mut shutdown).await {
                    return Exit::Shutdown;
                }
            }
        }
    }
}

/// One renewal with the best valid credential, falling back to the next one when the
/// CA refuses it. Order: the current certificate (mutual TLS), then a GCE token (when
/// on GCE), then the bootstrap bundle.
async fn renew(cfg: &AgentConfig) -> Result<Renewed, RenewError> {
    let now = OffsetDateTime::now_utc();
    // Best first: the current certificate (mutual TLS), a GCE token, the bootstrap bundle.
    let mut sources: Vec<Box<dyn CredentialSource>> =
        vec![Box::new(CertDir::new("current", &cfg.certs_dir))];
    if let Some(gce) = &cfg.gce {
        sources.push(Box::new(gce.clone()));
    }
    sources.push(Box::new(CertDir::new("bootstrap", &cfg.bootstrap_dir)));
    let mut found = Vec::with_capacity(sources.len());
    for source in &sources {
        found.push((source.name(), source.load().await));
    }

    let mut candidates: Vec<Credential> = Vec::new();
    let mut notes = Vec::new();
    let mut transient = Vec::new();
    let mut trusted: Vec<CertificateDer<'static>> = Vec::new();
    for (name, f) in found {
        match f {
            Found::Credential(c) => {
                for r in
                    ca_core::pem::parse_certificates(c.roots_pem.as_bytes()).unwrap_or_default()
                {
                    if !trusted.contains(&r) {
                        trusted.push(r);
                    }
                }
                if c.is_valid_at(now) {
                    candidates.push(*c);
                } else {
                    notes.push(format!(
                        "the {name} certificate {} for {} expired at {}",
                        c.serial,
                        c.who(),
                        rfc3339(c.not_after)
                    ));
                }
            }
            Found::Absent if name == "bootstrap" && cfg.gce.is_some() => {}
            Found::Absent => notes.push(format!("there is no {name} credential")),
            Found::Unusable(e) => notes.push(format!("the {name} credential is unusable: {e}")),
            Found::Unavailable(e) => transient.push(e),
        }
    }
    // An admin who dropped a bundle for another identity wants that identity now.
    if let (Some(cur), Some(boot)) = (candidates.first(), candidates.last())
        && cur.source == "current"
        && boot.source == "bootstrap"
        && cur.identity != boot.identity
    {
        let boot = candidates.pop().expect("checked");
        candidates.insert(0, boot);
    }
    let remedy = if cfg.gce.is_some() {
        "check the CA's GCE configuration (allowed projects, mapping rules) and the CA's audit log (ca-server audit list --outcome denied)".to_string()
    } else {
        format!(
            "an admin must export a new bootstrap bundle (ca-server export-bundle --namespace NS --service-account SA --out DIR), copy it to {} and restart node-identity",
            cfg.bootstrap_dir.display()
        )
    };
    if candidates.is_empty() {
        let mut why = notes.clone();
        why.extend(transient.iter().cloned());
        return Err(if transient.is_empty() {
            RenewError::Fatal(format!("no valid credential: {}; {remedy}", why.join("; ")))
        } else {
            RenewError::Retry(format!(
                "no usable credential right now: {}",
                why.join("; ")
            ))
        });
    }
    let mut refused = Vec::new();
    for cred in &candidates {
        match ca_client::request_certificate(&cfg.ca, cred, cfg.key_type, cfg.ttl).await {
            Ok(answer) => {
                let expected = cred.identity.as_ref().or(cfg.expected_identity.as_ref());
                let verified = verify::verify_answer(
                    &answer.chain,
                    &trusted,
                    expected,
                    &answer.spki_der(),
                    cfg.ttl,
                    OffsetDateTime::now_utc(),
                )
                .map_err(|e| {
                    RenewError::Retry(format!(
                        "rejected the CA's answer ({e}); the current files are kept"
                    ))
                })?;
                let key_pem = answer.key.serialize_pem();
                publish::publish(
                    &cfg.certs_dir,
                    &Bundle {
                        key_pem: &key_pem,
                        chain_pem: &verified.chain_pem,
                        roots_pem: &verified.roots_pem,
                    },
                )
                .map_err(|e| {
                    RenewError::Retry(format!(
                        "could not write {}: {e}; the previous files are untouched",
                        cfg.certs_dir.display()
                    ))
                })?;
                return Ok(Renewed {
                    identity: verified.identity.clone(),
                    credential: cred.source,
                    verified,
                });
            }
            Err(CallError::Refused {
                source_name,
                message,
            }) => {
                tracing::warn!(
                    "the CA refused the {source_name} credential ({}): {message}",
                    cred.serial
                );
                refused.push(format!(
                    "the {source_name} credential ({}) was refused: {message}",
                    cred.serial
                ));
            }
            Err(CallError::Transient(m) | CallError::Local(m)) => return Err(RenewError::Retry(m)),
        }
    }
    refused.extend(notes);
    if !transient.is_empty() {
        refused.extend(transient);
        return Err(RenewError::Retry(format!(
            "every usable credential was refused: {}",
            refused.join("; ")
        )));
    }
    Err(RenewError::Fatal(format!(
        "every credential was refused: {}; {remedy}",
        refused.join("; ")
    )))
}
