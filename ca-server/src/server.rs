//! Wiring: loads state, starts every task, and shuts them down in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ca_core::keys::KeyAlgorithm;
use ca_core::{CertificateAuthority, IssuancePolicy, SpiffeId};
use rcgen::PublicKeyData;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{AdminService, serve_socket};
use crate::audit::{Api, AuditStore, AuditWriter, Decision, RevocationView, StoreLocation};
use crate::authn::{AuthChain, ClientCertAuthenticator};
use crate::grpc::{self, CaService, tls};
use crate::http::{self, Readiness};
use crate::issuance::Issuance;
use crate::issuance::issued_decision;
use crate::state::{self, CaSource};

/// Everything `ca-server serve` needs, already validated.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// State directory (CA key and certificate, audit store, admin socket).
    pub state_dir: PathBuf,
    /// gRPC/TLS listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP side-port listen address.
    pub http_addr: SocketAddr,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// TTL policy for gRPC callers.
    pub policy: IssuancePolicy,
    /// TTL policy for legacy `HandleCSR` callers.
    pub legacy_policy: IssuancePolicy,
    /// TTL policy for admin exports.
    pub export_policy: IssuancePolicy,
    /// Where the CA comes from.
    pub ca_source: CaSource,
    /// DNS names (or IPs) in the serving certificate.
    pub server_names: Vec<String>,
    /// Lifetime of the serving certificate; renewed at half-life.
    pub serving_cert_ttl: Duration,
    /// Per-request deadline.
    pub request_timeout: Duration,
    /// Audit records older than this are pruned.
    pub audit_retention: Duration,
    /// How often pruning runs.
    pub audit_prune_interval: Duration,
    /// How long certificates stay indexed, and revocations kept, after they expire.
    pub expiry_grace: Duration,
    /// Where the audit store is.
    pub store: StoreLocation,
    /// This replica's hash chain in the store.
    pub audit_chain: String,
    /// Renewals are refused when the revocation list is older than this.
    pub revocation_max_staleness: Duration,
    /// Connections, calls, handshakes, idle connections.
    pub limits: crate::grpc::limits::Limits,
    /// Earlier signing certificates (DER) whose leaves may still renew.
    pub previous_signing_certs: Vec<Vec<u8>>,
    /// Window of aggregated unauthenticated denials (zero: record each).
    pub denial_aggregation_window: Duration,
    /// How often the chains' heads are signed.
    pub audit_checkpoint_interval: Duration,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// GCE instance-identity-token authentication, when configured.
    pub gce: Option<crate::authn::gce::GceConfig>,
    /// Kubernetes TokenReview authentication with these audiences, when enabled.
    pub kubernetes_audiences: Option<Vec<String>>,
    /// Cache and rate of TokenReviews.
    pub token_review_limits: crate::authn::kubernetes::ReviewLimits,
    /// The identity-Secret controller, when enabled.
    pub secret_controller: Option<crate::kubernetes::ControllerConfig>,
    /// Leader election (identity, lease duration) for the controllers; `None` runs
    /// them unconditionally.
    pub leader_election: Option<(String, Duration)>,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something in the state directory.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The audit store.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// Binding or serving.
    #[error("{0}")]
    Io(String),
}

fn io(what: &str) -> impl Fn(std::io::Error) -> ServeError + '_ {
    move |e| ServeError::Io(format!("{what}: {e}"))
}

/// Issues (and audits) the CA's own serving certificate; returns its expiry.
async fn refresh_serving_cert(
    ca: &CertificateAuthority,
    cfg: &ServeConfig,
    serving: &tls::ServingCert,
    audit: &AuditWriter,
) -> Result<OffsetDateTime, String> {
    let key = KeyAlgorithm::EcdsaP256
        .generate()
        .map_err(|e| e.to_string())?;
    let public = ca_core::keys::PublicKey::of_key_pair(&key).map_err(|e| e.to_string())?;
    let now = OffsetDateTime::now_utc();
    let (names, ips) =
        ca_core::dns::names_and_addresses(&cfg.server_names).map_err(|e| e.to_string())?;
    let issued = ca
        .issue_server_cert(&public, &names, &ips, cfg.serving_cert_ttl, now)
        .map_err(|e| e.to_string())?;
    debug_assert_eq!(key.subject_public_key_info(), issued.facts.spki_der);
    audit
        .record(issued_decision(
            Decision {
                api: Some(Api::Internal),
                authenticator: Some("self".into()),
                caller: Some("ca-server".into()),
                detail: Some(format!(
                    "serving certificate for {}",
                    cfg.server_names.join(",")
                )),
                ..Default::default()
            },
            &issued,
            now,
        ))
        .await
        .map_err(|e| e.to_string())?;
    let mut chain = vec![issued.der.clone()];
    chain.extend(ca.ca_chain().map(<[u8]>::to_vec));
    serving
        .install(chain, key.serialize_der())
        .map_err(|e| e.to_string())?;
    metrics::gauge!("ca_serving_cert_expiry_timestamp_seconds")
        .set(issued.facts.not_after.unix_timestamp() as f64);
    tracing::info!(serial = %issued.facts.serial, not_after = %issued.facts.not_after, "serving certificate installed");
    Ok(issued.facts.not_after)
}

/// Runs the CA until `shutdown` becomes true.
pub async fn run(cfg: ServeConfig, shutdown: watch::Receiver<bool>) -> Result<(), ServeError> {
    crate::fsutil::create_private_dir(&cfg.state_dir).map_err(io("state directory"))?;
    let _lock = lock_state_dir(&cfg.state_dir)?;
    let ready = Readiness::starting("loading the CA and the audit store");
    let http_listener = TcpListener::bind(cfg.http_addr)
        .await
        .map_err(io("binding the HTTP port"))?;
    let http_addr = http_listener.local_addr().map_err(io("HTTP port"))?;
    let http_task = tokio::spawn(http::serve(http_listener, ready.clone(), shutdown.clone()));

    let store = Arc::new(AuditStore::open(&cfg.store, &cfg.audit_chain).await?);
    tracing::info!(store = %cfg.store.describe(), chain = %cfg.audit_chain, "audit store open");
    let revocations = Arc::new(RevocationView::new(cfg.revocation_max_staleness));
    revocations.load(&store).await?;
    let revocation_task = tokio::spawn(crate::audit::revocations::keep_fresh(
        store.clone(),
        revocations.clone(),
        shutdown.clone(),
    ));
    let (audit, audit_task) = AuditWriter::start(store.clone(), revocations.clone());
    ready.track_audit(audit.health());
    ready.track_revocations(audit.revocations().clone());
    let needs_kube = cfg.kubernetes_audiences.is_some()
        || cfg.secret_controller.is_some()
        || matches!(cfg.ca_source, CaSource::KubernetesSecret { .. });
    let kube_client = if needs_kube {
        let config = kube::Config::infer()
            .await
            .map_err(|e| ServeError::Io(format!("Kubernetes client configuration: {e}")))?;
        Some(
            kube::Client::try_from(config)
                .map_err(|e| ServeError::Io(format!("Kubernetes client: {e}")))?,
        )
    } else {
        None
    };
    let ca = Arc::new(match (&cfg.ca_source, &kube_client) {
        (
            CaSource::KubernetesSecret {
                namespace,
                key,
                lifetime,
            },
            Some(client),
        ) => {
            state::load_or_create_in_cluster(
                client.clone(),
                namespace,
                &cfg.trust_domain,
                *key,
                *lifetime,
            )
            .await?
        }
        _ => state::load_or_create(&cfg.state_dir, &cfg.trust_domain, &cfg.ca_source)?,
    });
    metrics::gauge!("ca_root_expiry_timestamp_seconds")
        .set(ca.facts().not_after.unix_timestamp() as f64);
    if SpiffeId::for_service_account(&cfg.trust_domain, "default", "default").is_err() {
        return Err(ServeError::Io(format!(
            "invalid trust domain {:?}",
            cfg.trust_domain
        )));
    }

    let serving = Arc::new(tls::ServingCert::default());
    let serving_expiry = refresh_serving_cert(&ca, &cfg, &serving, &audit)
        .await
        .map_err(ServeError::Io)?;
    let root_subjects = ca
        .roots()
        .iter()
        .filter_map(|r| ca_core::x509::inspect(r).ok().map(|f| f.subject_der))
        .collect();
    let tls_config = tls::server_config(
        serving.clone(),
        Arc::new(tls::RequestClientCert::new(root_subjects)),
    )
    .map_err(|e| ServeError::Io(format!("TLS configuration: {e}")))?;

    // Leaves renew only if this CA signed them: with its roots when it is its own root,
    // with its intermediate when plugged in under an operator's root.
    let mut issuers = if ca.signer_is_root() {
        ca.roots().to_vec()
    } else {
        vec![ca.cert_der().to_vec()]
    };
    issuers.extend(cfg.previous_signing_certs.iter().cloned());
    let client_cert =
        ClientCertAuthenticator::new(ca.roots(), &issuers, &cfg.trust_domain, revocations.clone())
            .map_err(ServeError::Io)?;
    let mut authn = AuthChain::default().with(Arc::new(client_cert));
    if let (Some(audiences), Some(client)) = (&cfg.kubernetes_audiences, kube_client.clone()) {
        authn = authn.with(Arc::new(
            crate::authn::kubernetes::KubernetesTokenAuthenticator::new(
                client,
                audiences.clone(),
                &cfg.trust_domain,
                cfg.gce.is_none(),
                &cfg.token_review_limits,
            ),
        ));
    }
    if let Some(gce) = &cfg.gce {
        let a = crate::authn::gce::GceAuthenticator::new(gce.clone(), &cfg.trust_domain)
            .await
            .map_err(ServeError::Io)?;
        authn = authn.with(Arc::new(a));
    }
    let issuance = Arc::new(Issuance {
        ca: ca.clone(),
        policy: cfg.policy,
        legacy_policy: cfg.legacy_policy,
        export_policy: cfg.export_policy,
        trust_domain: cfg.trust_domain.clone(),
        authn,
        audit: audit.clone(),
        issued_metrics: Default::default(),
        denials: crate::denials::DenialAggregator::new(cfg.denial_aggregation_window),
    });
    let denials_task = tokio::spawn(flush_denials(issuance.clone(), shutdown.clone()));

    let grpc_listener = TcpListener::bind(cfg.grpc_addr)
        .await
        .map_err(io("binding the gRPC port"))?;
    let grpc_addr = grpc_listener.local_addr().map_err(io("gRPC port"))?;
    let admin_task = serve_socket(
        cfg.admin_socket.clone(),
        AdminService::new(issuance.clone()),
        shutdown.clone(),
    )
    .await
    .map_err(io("admin socket"))?;
    let grpc_task = tokio::spawn(grpc::serve(
        grpc_listener,
        tls_config,
        CaService::new(issuance.clone()),
        cfg.request_timeout,
        cfg.limits.clone(),
        shutdown.clone(),
    ));
    let renew_task = tokio::spawn(renew_serving_cert(
        ca.clone(),
        cfg.clone(),
        serving,
        audit.clone(),
        serving_expiry,
        shutdown.clone(),
    ));
    let controller_task = match (&cfg.secret_controller, &kube_client) {
        (Some(c), Some(client)) => Some(tokio::spawn(crate::kubernetes::run_controllers(
            client.clone(),
            ca.clone(),
            cfg.trust_domain.clone(),
            audit.clone(),
            crate::kubernetes::ControllerConfig {
                chain_pem: state::citadel_chain_pem(&cfg.ca_source)?,
                ..c.clone()
            },
            cfg.leader_election.clone(),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let prune_task = tokio::spawn(prune_audit(
        store.clone(),
        ca.clone(),
        cfg.audit_retention,
        cfg.audit_prune_interval,
        cfg.expiry_grace,
        shutdown.clone(),
    ));
    let checkpoint_task = tokio::spawn(checkpoint_audit(
        store.clone(),
        ca.clone(),
        cfg.audit_checkpoint_interval,
        shutdown.clone(),
    ));

    let endpoints = serde_json::json!({
        "grpc": grpc_addr.to_string(),
        "http": http_addr.to_string(),
        "admin_socket": cfg.admin_socket.display().to_string(),
        "pid": std::process::id(),
    });
    // Ready before announcing the endpoints: whoever reads endpoints.json may ask
    // /readyz at once.
    ready.set(None);
    let endpoints_path = cfg.state_dir.join("endpoints.json");
    crate::fsutil::write_atomic(&endpoints_path, endpoints.to_string().as_bytes(), 0o644)
        .map_err(io("endpoints.json"))?;
    tracing::info!(%grpc_addr, %http_addr, admin_socket = %cfg.admin_socket.display(), trust_domain = %cfg.trust_domain, "ca-server ready");

    let mut stop = shutdown.clone();
    let _ = stop.wait_for(|s| *s).await;
    ready.set(Some("shutting down".into()));
    tracing::info!("shutting down: draining requests");
    let drain = async {
        let _ = grpc_task.await;
        let _ = admin_task.await;
        let _ = http_task.await;
        // No call is left to be denied: every open window's count is recorded.
        let _ = denials_task.await;
        issuance.flush_denials(true).await;
        renew_task.abort();
        prune_task.abort();
        checkpoint_task.abort();
        revocation_task.abort();
        if let Some(t) = controller_task {
            let _ = t.await;
        }
        drop(issuance);
        drop(audit);
        let _ = audit_task.await;
        store.close().await;
    };
    if tokio::time::timeout(Duration::from_secs(15), drain)
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; stopping anyway");
    }
    let _ = std::fs::remove_file(&endpoints_path);
    Ok(())
}

/// Holds `<state-dir>/ca-server.lock` for the life of the server: the admin socket,
/// `endpoints.json` and a self-signed CA key belong to one server. (The audit store
/// itself may be shared: several servers on one PostgreSQL, or admin commands on the
/// same SQLite file.)
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, ServeError> {
    let path = dir.join("ca-server.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("state directory lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServeError::Io(format!(
            "the state directory {} is in use by another process (a ca-server already runs on it; give each server its own --state-dir)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(io("state directory lock")(e)),
    }
}

async fn renew_serving_cert(
    ca: Arc<CertificateAuthority>,
    cfg: ServeConfig,
    serving: Arc<tls::ServingCert>,
    audit: AuditWriter,
    mut expiry: OffsetDateTime,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let remaining = (expiry - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let wait = Duration::try_from(remaining / 2)
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match refresh_serving_cert(&ca, &cfg, &serving, &audit).await {
            Ok(t) => expiry = t,
            Err(e) => tracing::error!(error = %e, "serving certificate renewal failed; retrying"),
        }
    }
}

async fn prune_audit(
    store: Arc<AuditStore>,
    ca: Arc<CertificateAuthority>,
    retention: Duration,
    interval: Duration,
    expiry_grace: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let cutoff = OffsetDateTime::now_utc() - retention;
        match store.prune_before(cutoff, expiry_grace, &ca).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "audit retention pruned old records"),
            Err(e) => tracing::error!(error = %e, "audit retention failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Records the summaries of aggregated denials as their windows close.
async fn flush_denials(issuance: Arc<Issuance>, mut shutdown: watch::Receiver<bool>) {
    let every = (issuance.denials.window() / 4).max(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        issuance.flush_denials(false).await;
    }
}

/// Signs a checkpoint of every chain's head every `interval`.
async fn checkpoint_audit(
    store: Arc<AuditStore>,
    ca: Arc<CertificateAuthority>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match crate::audit::checkpoint::make(&store, &ca).await {
            Ok(c) => tracing::info!(checkpoint = %c.body, "audit checkpoint signed"),
            Err(e) => tracing::error!(error = %e, "audit checkpoint failed"),
        }
    }
}
