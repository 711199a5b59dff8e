//! Command line: `serve` and the admin subcommands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use ca_core::IssuancePolicy;
use ca_core::keys::KeyAlgorithm;
use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::admin::{AdminClient, AdminRequest, AdminResponse};
use crate::audit::{Append, AuditRecord, AuditStore, ListFilter, Outcome, StoreLocation};
use crate::server::{self, ServeConfig};
use crate::state::CaSource;

/// Exit code for bad configuration or usage (EX_USAGE).
pub use cli_exit::EXIT_USAGE;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 1h, 24h, 90d)"))
}

/// Workload-identity certificate authority compatible with Istio's CA APIs.
///
/// Issues short-lived SPIFFE certificates over Istio's CreateCertificate and legacy
/// HandleCSR gRPC APIs, authenticating callers by client certificates it issued, and
/// records every decision in a tamper-evident audit log before answering.
#[derive(Debug, Parser)]
#[command(name = "ca-server", version)]
pub struct Cli {
    /// State directory: CA key and certificate, audit store, admin socket.
    #[arg(long, global = true, env = "CA_STATE_DIR", default_value = "./ca-data")]
    pub state_dir: PathBuf,
    /// Admin socket [default: <state-dir>/admin.sock].
    #[arg(long, global = true, env = "CA_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Audit store: `sqlite` (the file <state-dir>/audit.db), `sqlite:PATH`, or a
    /// PostgreSQL URL shared by every replica (`postgres://USER@HOST/DB`, TLS with
    /// `?sslmode=verify-full&sslrootcert=FILE`; a password is better in PGPASSWORD
    /// than in the URL). Admin commands take the same flag.
    #[arg(long, global = true, env = "CA_STORE", default_value = "sqlite")]
    pub store: String,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the CA (gRPC on --grpc-addr, health and metrics on --http-addr).
    Serve(Box<ServeArgs>),
    /// Issue a key and certificate bundle for a machine outside GCE (key.pem 0600,
    /// cert-chain.pem, root-cert.pem). The key is generated here and never sent to the CA.
    ExportBundle(ExportArgs),
    /// Revoke a certificate: it can no longer authenticate. Survives restarts; audited.
    Revoke(RevokeArgs),
    /// Query and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `serve` flags; each also from the environment variable shown.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC/TLS listen address (both Istio CA APIs).
    #[arg(long, env = "CA_GRPC_ADDR", default_value = "127.0.0.1:8060")]
    pub grpc_addr: SocketAddr,
    /// HTTP listen address for /healthz, /readyz and /metrics.
    #[arg(long, env = "CA_HTTP_ADDR", default_value = "127.0.0.1:15014")]
    pub http_addr: SocketAddr,
    /// SPIFFE trust domain of issued identities.
    #[arg(long, env = "CA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Certificate lifetime when the caller does not ask for one.
    #[arg(long, env = "CA_DEFAULT_TTL", default_value = "1h", value_parser = duration)]
    pub default_ttl: Duration,
    /// Longest lifetime a caller may request; longer requests are refused.
    #[arg(long, env = "CA_MAX_TTL", default_value = "24h", value_parser = duration)]
    pub max_ttl: Duration,
    /// What a legacy HandleCSR request for more than --max-ttl gets: clamp (a
    /// certificate of --max-ttl; the old node agents ask for 90 days by default and
    /// renew from the certificate's own lifetime) or refuse (INVALID_ARGUMENT, as
    /// CreateCertificate always does).
    #[arg(long, env = "CA_LEGACY_TTL_ABOVE_MAX", value_enum, default_value_t = AboveMaxArg::Clamp)]
    pub legacy_ttl_above_max: AboveMaxArg,
    /// Longest lifetime of an exported bootstrap bundle.
    #[arg(long, env = "CA_MAX_EXPORT_TTL", default_value = "8760h", value_parser = duration)]
    pub max_export_ttl: Duration,
    /// Key type of a new self-signed root: p256, p384, rsa2048, rsa3072 or rsa4096.
    #[arg(long, env = "CA_ROOT_KEY_TYPE", default_value = "p256", value_parser = KeyAlgorithm::parse)]
    pub root_key_type: KeyAlgorithm,
    /// Lifetime of a new self-signed root.
    #[arg(long, env = "CA_ROOT_LIFETIME", default_value = "3650d", value_parser = duration)]
    pub root_lifetime: Duration,
    /// Use a plugged-in CA instead: a directory with ca-cert.pem, ca-key.pem,
    /// cert-chain.pem and root-cert.pem (Istio's cacerts layout).
    #[arg(long, env = "CA_PLUGGED_CA_DIR")]
    pub plugged_ca_dir: Option<PathBuf>,
    /// Client certificates renew only if this CA's signing certificate issued them
    /// (under a plugged-in CA, the operator's other intermediates do not count). This
    /// PEM file adds the previous signing certificates whose leaves may still renew,
    /// after the intermediate was rotated.
    #[arg(long, env = "CA_PREVIOUS_SIGNING_CERTS")]
    pub previous_signing_certs: Option<PathBuf>,
    /// Names in the CA's own serving certificate (comma-separated; IPs allowed).
    #[arg(
        long,
        env = "CA_SERVER_NAMES",
        value_delimiter = ',',
        default_value = "istio-ca,istio-ca.istio-system.svc,istio-citadel,istio-citadel.istio-system.svc"
    )]
    pub server_names: Vec<String>,
    /// Lifetime of the serving certificate (renewed at half-life).
    #[arg(long, env = "CA_SERVING_CERT_TTL", default_value = "24h", value_parser = duration)]
    pub serving_cert_ttl: Duration,
    /// Open gRPC connections at most; more are closed at once (counted in
    /// ca_connections_refused_total).
    #[arg(long, env = "CA_MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,
    /// Open gRPC connections at most from one peer address (behind a load balancer that
    /// hides client addresses, every client shares the balancer's few).
    #[arg(long, env = "CA_MAX_CONNECTIONS_PER_PEER", default_value_t = 1_000)]
    pub max_connections_per_peer: usize,
    /// Calls in flight at most, over all connections; more are answered UNAVAILABLE
    /// before any work (counted in ca_calls_shed_total).
    #[arg(long, env = "CA_MAX_CONCURRENT_CALLS", default_value_t = 512)]
    pub max_concurrent_calls: usize,
    /// Concurrent calls one connection may have open (HTTP/2 max concurrent streams).
    #[arg(long, env = "CA_MAX_STREAMS_PER_CONNECTION", default_value_t = 100)]
    pub max_streams_per_connection: u32,
    /// Largest request header block, in bytes.
    #[arg(long, env = "CA_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: u32,
    /// Time for a connection's TLS and HTTP/2 handshakes together.
    #[arg(long, env = "CA_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// A connection with no call for this long is closed.
    #[arg(long, env = "CA_CONNECTION_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub connection_idle_timeout: Duration,
    /// How often each connection is pinged (HTTP/2 PING)...
    #[arg(long, env = "CA_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = duration)]
    pub keepalive_interval: Duration,
    /// ...and how long a ping may go unanswered before the connection is cut off.
    #[arg(long, env = "CA_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub keepalive_timeout: Duration,
    /// Deadline for one gRPC request; a client's `grpc-timeout` can only shorten it.
    #[arg(long, env = "CA_REQUEST_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub request_timeout: Duration,
    /// Audit records older than this are pruned (verification keeps working; issued
    /// certificates stay revocable until they expire, whatever the retention).
    #[arg(long, env = "CA_AUDIT_RETENTION", default_value = "90d", value_parser = duration)]
    pub audit_retention: Duration,
    /// How often retention pruning runs.
    #[arg(long, env = "CA_AUDIT_PRUNE_INTERVAL", default_value = "1h", value_parser = duration)]
    pub audit_prune_interval: Duration,
    /// How long after a certificate expires the store keeps its index entry and its
    /// revocation, for replicas whose clocks run behind (each still accepts a client
    /// certificate its own clock calls valid). At least 1m.
    #[arg(long, env = "CA_EXPIRY_GRACE", default_value = "1h", value_parser = duration)]
    pub expiry_grace: Duration,
    /// Name of this replica's hash chain in the audit store [default: $POD_NAME or the
    /// host name]. Replicas sharing a name stay correct, but contend for it.
    #[arg(long, env = "CA_AUDIT_CHAIN")]
    pub audit_chain: Option<String>,
    /// How often the CA signs a checkpoint of every chain's head (see `audit checkpoint`).
    #[arg(long, env = "CA_AUDIT_CHECKPOINT_INTERVAL", default_value = "1h", value_parser = duration)]
    pub audit_checkpoint_interval: Duration,
    /// Refuse client-certificate renewals (UNAVAILABLE) when the revocation list could
    /// not be confirmed against the store for this long.
    #[arg(long, env = "CA_REVOCATION_MAX_STALENESS", default_value = "2s", value_parser = duration)]
    pub revocation_max_staleness: Duration,
    /// Denials of callers that did not authenticate (bad tokens, unknown certificates,
    /// malformed requests): the first per peer address, API and reason in each window
    /// is recorded, identical ones after it are counted into one summary record when
    /// the window closes. 0s records every one.
    #[arg(long, env = "CA_DENIAL_AGGREGATION_WINDOW", default_value = "10s", value_parser = duration)]
    pub denial_aggregation_window: Duration,
    /// Log format.
    #[arg(long, env = "CA_LOG_FORMAT", value_enum, default_value_t = cli_exit::LogFormat::Text)]
    pub log_format: cli_exit::LogFormat,
    /// Accept GCE instance identity tokens, as configured in this TOML file (allowed
    /// projects, mapping rules, optional Compute API cross-check; see
    /// deploy/kubernetes/components/gce/gce-auth.toml).
    #[arg(long, env = "CA_GCE_CONFIG")]
    pub gce_config: Option<PathBuf>,
    /// Accept Kubernetes service-account tokens, checked with TokenReview against the
    /// cluster of KUBECONFIG or, inside a pod, the in-cluster configuration.
    #[arg(long, env = "CA_KUBERNETES_TOKEN_AUTH")]
    pub kubernetes_token_auth: bool,
    /// Audiences a service-account token must be valid for (comma-separated).
    #[arg(
        long,
        env = "CA_TOKEN_AUDIENCES",
        value_delimiter = ',',
        default_value = "istio-ca"
    )]
    pub token_audiences: Vec<String>,
    /// TokenReviews a second, at most, for tokens not in the cache (a flood of bogus
    /// tokens costs the API server no more); over it, UNAVAILABLE.
    #[arg(long, env = "CA_TOKEN_REVIEW_RATE", default_value_t = 50.0)]
    pub token_review_rate: f64,
    /// TokenReviews that may be sent at once before --token-review-rate applies.
    #[arg(long, env = "CA_TOKEN_REVIEW_BURST", default_value_t = 200)]
    pub token_review_burst: u32,
    /// TokenReview answers cached (least recently used out first).
    #[arg(long, env = "CA_TOKEN_REVIEW_CACHE", default_value_t = 65_536)]
    pub token_review_cache: usize,
    /// Keep the self-signed root in Secret istio-ca-secret of --ca-namespace (shared by
    /// every replica) instead of the state directory. --plugged-ca-dir still wins.
    #[arg(long, env = "CA_ROOT_IN_SECRET")]
    pub root_in_secret: bool,
    /// The CA's own namespace in Kubernetes.
    #[arg(long, env = "CA_NAMESPACE", default_value = "istio-system")]
    pub ca_namespace: String,
    /// Keep a Secret istio.<sa> for every service account of every managed namespace,
    /// and the istio-ca-root-cert ConfigMap in each managed namespace.
    #[arg(long, env = "CA_SECRET_CONTROLLER")]
    pub secret_controller: bool,
    /// Lifetime of the certificates in istio.<sa> Secrets.
    #[arg(long, env = "CA_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = duration)]
    pub workload_cert_ttl: Duration,
    /// Key type of istio.<sa> Secrets: p256, p384, rsa2048 (what Citadel wrote), rsa3072
    /// or rsa4096. An RSA key takes hundreds of milliseconds to generate; a change
    /// applies to each Secret at its next rotation.
    #[arg(long, env = "CA_WORKLOAD_KEY_TYPE", default_value = "p256", value_parser = KeyAlgorithm::parse)]
    pub workload_key_type: KeyAlgorithm,
    /// Whether namespaces without ca.istio.io/override or ca.istio.io/env labels are managed.
    #[arg(long, env = "CA_NAMESPACES_ENABLED_BY_DEFAULT", default_value_t = true, action = clap::ArgAction::Set)]
    pub namespaces_enabled_by_default: bool,
    /// Rotate a Secret's certificate when less than this fraction of its life is left.
    #[arg(long, env = "CA_SECRET_GRACE_RATIO", default_value_t = 0.5)]
    pub secret_grace_ratio: f64,
    /// ...and never later than this before expiry.
    #[arg(long, env = "CA_SECRET_MIN_GRACE", default_value = "10m", value_parser = duration)]
    pub secret_min_grace: Duration,
    /// Longest time between two looks at one identity Secret. Each is looked at again
    /// when its rotation is due and whenever it or its service account changes; this
    /// bounds the wait when a change was missed.
    #[arg(long, env = "CA_SECRET_CHECK_INTERVAL", default_value = "5m", value_parser = duration)]
    pub secret_check_interval: Duration,
    /// Citadel's DNS names for webhook service accounts in --ca-namespace: the
    /// istio.<sa> Secrets of istio-sidecar-injector-service-account and
    /// istio-galley-service-account also name <service>.<ca-namespace>.svc and
    /// <service>.<ca-namespace> (service istio-sidecar-injector, istio-galley).
    #[arg(long, env = "CA_APPEND_DNS_NAMES", default_value_t = true, action = clap::ArgAction::Set)]
    pub append_dns_names: bool,
    /// More DNS names for the istio.<sa> Secret of given service accounts, as Citadel's
    /// flag: SERVICE_ACCOUNT.NAMESPACE:DNS_NAME, comma-separated; an account may be
    /// named several times (e.g. istio-pilot-service-account.istio-system:istio-pilot.istio-system).
    #[arg(long, env = "CA_CUSTOM_DNS_NAMES", value_delimiter = ',')]
    pub custom_dns_names: Vec<String>,
    /// Keep a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) with a certificate for
    /// exactly these DNS names, rotated like istio.<sa> Secrets: istiod's serving
    /// certificate when it runs with ENABLE_CA_SERVER=false (docs/ISTIO.md).
    /// NAMESPACE/NAME=DNS_NAME[,DNS_NAME...]; repeat the flag for more Secrets (in the
    /// environment variable, separate them with ';').
    #[arg(long, env = "CA_SERVING_CERT_SECRET", value_delimiter = ';', value_parser = clap::value_parser!(crate::kubernetes::ServingSecret))]
    pub serving_cert_secret: Vec<crate::kubernetes::ServingSecret>,
    /// Secrets reconciled in parallel.
    #[arg(long, env = "CA_CONTROLLER_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub controller_concurrency: u16,
    /// Run the controllers only while holding the Lease istio-ca-leader in
    /// --ca-namespace (for several replicas). Off: this replica always runs them.
    #[arg(long, env = "CA_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Lease duration: a dead leader is replaced within this time.
    #[arg(long, env = "CA_LEADER_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub leader_lease_duration: Duration,
    /// This replica's name in the Lease [default: $POD_NAME or the host name, and the pid].
    #[arg(long, env = "CA_LEADER_IDENTITY")]
    pub leader_identity: Option<String>,
}

/// `--legacy-ttl-above-max` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AboveMaxArg {
    /// Grant --max-ttl.
    Clamp,
    /// Refuse with INVALID_ARGUMENT.
    Refuse,
}

/// `export-bundle` flags.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Namespace of the identity.
    #[arg(long)]
    pub namespace: String,
    /// Service account of the identity.
    #[arg(long)]
    pub service_account: String,
    /// Lifetime of the bundle's certificate.
    #[arg(long, default_value = "2160h", value_parser = duration)]
    pub ttl: Duration,
    /// Output directory: created (0700) if missing; an existing one must be this user's
    /// and hold nothing but a bundle. Or `-` to write the bundle to stdout as a
    /// tar stream of key.pem, cert-chain.pem and root-cert.pem (for images without a
    /// shell: `kubectl exec … -- ca-server export-bundle --out - … > bundle.tar`).
    #[arg(long)]
    pub out: PathBuf,
    /// Key type: p256, p384, rsa2048, rsa3072 or rsa4096.
    #[arg(long, default_value = "p256", value_parser = KeyAlgorithm::parse)]
    pub key_type: KeyAlgorithm,
    /// Replace the bundle already in --out.
    #[arg(long)]
    pub force: bool,
}

/// `revoke` arguments.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Serial number, hex (colons allowed).
    pub serial: String,
    /// Why (recorded in the audit log).
    #[arg(long)]
    pub reason: String,
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List decisions, oldest first.
    List {
        /// Only records about this identity: the SPIFFE ID a record granted, or the
        /// caller of a record that granted none.
        #[arg(long)]
        identity: Option<String>,
        /// Only records since this time: RFC 3339, or a duration ago (e.g. 2h).
        #[arg(long)]
        since: Option<String>,
        /// Only this outcome: issued, denied or revoked.
        #[arg(long, value_parser = Outcome::parse)]
        outcome: Option<Outcome>,
        /// At most this many (the newest); 0 for all.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Every record about one certificate serial.
    Show {
        /// Serial number, hex.
        serial: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Check every hash chain and every signed checkpoint; exit 1 when a record was
    /// modified, deleted or rewritten.
    Verify {
        /// Also check the store against this checkpoint (a file `audit checkpoint
        /// --out` wrote and you kept elsewhere; `-` reads one from stdin, e.g. through
        /// `kubectl exec -i`); repeatable.
        #[arg(long)]
        checkpoint: Vec<PathBuf>,
        /// The signing CA's certificate, to check checkpoint signatures [default:
        /// <state-dir>/ca/ca-cert.pem when it exists]. A plugged-in CA: its ca-cert.pem.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Have the running CA sign the chains' current heads; the checkpoint is stored and
    /// printed. Keep a copy where the database's writers cannot reach it.
    Checkpoint {
        /// Also write the checkpoint (JSON) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    cli_exit::usage_error("ca-server", msg)
}

fn runtime_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ca-server: {msg}");
    ExitCode::FAILURE
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match cli_exit::parse::<Cli, _, _>("ca-server", std::env::args_os()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let admin_socket = cli
        .admin_socket
        .clone()
        .unwrap_or_else(|| cli.state_dir.join("admin.sock"));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return runtime_error(format!("cannot start the runtime: {e}")),
    };
    match cli.command {
        Command::Serve(args) => {
            let cfg = match serve_config(&cli.state_dir, &admin_socket, &cli.store, &args) {
                Ok(c) => c,
                Err(e) => return usage_error(e),
            };
            cli_exit::init_logging(args.log_format);
            runtime.block_on(serve(cfg))
        }
        Command::ExportBundle(args) => {
            cli_exit::init_logging(cli_exit::LogFormat::Text);
            runtime.block_on(export_bundle(&admin_socket, args))
        }
        Command::Revoke(args) if ca_core::x509::parse_serial(&args.serial).is_err() => {
            usage_error(ca_core::x509::parse_serial(&args.serial).unwrap_err())
        }
        Command::Revoke(_) | Command::Audit(_) => {
            let store = match StoreLocation::parse(&cli.store, &cli.state_dir) {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            let admin = AdminTarget {
                store,
                admin_socket,
                state_dir: cli.state_dir.clone(),
            };
            match cli.command {
                Command::Revoke(args) => runtime.block_on(admin.run(
                    AdminRequest::Revoke {
                        serial: args.serial,
                        reason: args.reason,
                    },
                    false,
                )),
                Command::Audit(cmd) => runtime.block_on(audit(&admin, cmd)),
                _ => unreachable!("matched above"),
            }
        }
    }
}

/// Validates `serve` flags into a [`ServeConfig`]; the error is one line for the operator.
pub fn serve_config(
    state_dir: &Path,
    admin_socket: &Path,
    store: &str,
    a: &ServeArgs,
) -> Result<ServeConfig, String> {
    let store = StoreLocation::parse(store, state_dir)?;
    if a.revocation_max_staleness < crate::audit::revocations::SYNC_INTERVAL * 4 {
        return Err(format!(
            "--revocation-max-staleness must be at least {:?} (four resyncs)",
            crate::audit::revocations::SYNC_INTERVAL * 4
        ));
    }
    ca_core::spiffe::validate_trust_domain(&a.trust_domain)
        .map_err(|e| format!("--trust-domain: {e}"))?;
    if a.default_ttl.is_zero() || a.max_ttl.is_zero() {
        return Err("--default-ttl and --max-ttl must be positive".into());
    }
    if a.default_ttl > a.max_ttl {
        return Err(format!(
            "--default-ttl ({}) is longer than --max-ttl ({})",
            humantime::format_duration(a.default_ttl),
            humantime::format_duration(a.max_ttl)
        ));
    }
    if a.serving_cert_ttl < Duration::from_secs(10) {
        return Err("--serving-cert-ttl must be at least 10s".into());
    }
    if a.root_lifetime < Duration::from_secs(86400) {
        return Err("--root-lifetime must be at least 1d".into());
    }
    if a.server_names.iter().any(|n| n.trim().is_empty()) || a.server_names.is_empty() {
        return Err("--server-names must list at least one non-empty name".into());
    }
    let trimmed: Vec<&str> = a.server_names.iter().map(|n| n.trim()).collect();
    ca_core::dns::names_and_addresses(&trimmed).map_err(|e| format!("--server-names: {e}"))?;
    if a.request_timeout.is_zero() {
        return Err("--request-timeout must be positive".into());
    }
    if a.audit_retention < Duration::from_secs(60) {
        return Err("--audit-retention must be at least 1m".into());
    }
    if a.audit_prune_interval < Duration::from_secs(1) {
        return Err("--audit-prune-interval must be at least 1s".into());
    }
    if a.expiry_grace < Duration::from_secs(60) {
        return Err("--expiry-grace must be at least 1m".into());
    }
    if state_dir.exists() && !state_dir.is_dir() {
        return Err(format!(
            "--state-dir {} is not a directory",
            state_dir.display()
        ));
    }
    let ca_source = match &a.plugged_ca_dir {
        Some(dir) => {
            for f in [
                "ca-cert.pem",
                "ca-key.pem",
                "cert-chain.pem",
                "root-cert.pem",
            ] {
                if !dir.join(f).is_file() {
                    return Err(format!(
                        "--plugged-ca-dir {}: {f} is missing",
                        dir.display()
                    ));
                }
            }
            CaSource::Plugged(dir.clone())
        }
        None if a.root_in_secret => CaSource::KubernetesSecret {
            namespace: a.ca_namespace.clone(),
            key: a.root_key_type,
            lifetime: a.root_lifetime,
        },
        None => CaSource::SelfSigned {
            key: a.root_key_type,
            lifetime: a.root_lifetime,
        },
    };
    Ok(ServeConfig {
        state_dir: state_dir.to_owned(),
        grpc_addr: a.grpc_addr,
        http_addr: a.http_addr,
        trust_domain: a.trust_domain.clone(),
        policy: IssuancePolicy {
            default_ttl: a.default_ttl,
            max_ttl: a.max_ttl,
            above_max: ca_core::policy::AboveMax::Refuse,
        },
        legacy_policy: IssuancePolicy {
            default_ttl: a.default_ttl,
            max_ttl: a.max_ttl,
            above_max: match a.legacy_ttl_above_max {
                AboveMaxArg::Clamp => ca_core::policy::AboveMax::Clamp,
                AboveMaxArg::Refuse => ca_core::policy::AboveMax::Refuse,
            },
        },
        export_policy: IssuancePolicy {
            default_ttl: a.max_export_ttl.min(Duration::from_secs(2160 * 3600)),
            max_ttl: a.max_export_ttl,
            above_max: ca_core::policy::AboveMax::Refuse,
        },
        ca_source,
        server_names: a.server_names.iter().map(|s| s.trim().to_owned()).collect(),
        serving_cert_ttl: a.serving_cert_ttl,
        request_timeout: a.request_timeout,
        audit_retention: a.audit_retention,
        audit_prune_interval: a.audit_prune_interval,
        expiry_grace: a.expiry_grace,
        store,
        audit_chain: a
            .audit_chain
            .clone()
            .unwrap_or_else(crate::kubernetes::leader::host_name),
        revocation_max_staleness: a.revocation_max_staleness,
        denial_aggregation_window: a.denial_aggregation_window,
        limits: crate::grpc::limits::Limits {
            max_connections: a.max_connections.max(1),
            max_connections_per_peer: a.max_connections_per_peer.max(1),
            max_concurrent_calls: a.max_concurrent_calls.max(1),
            max_streams_per_connection: a.max_streams_per_connection.max(1),
            max_header_bytes: a.max_header_bytes.max(1024),
            handshake_timeout: a.handshake_timeout.max(Duration::from_millis(100)),
            idle_timeout: a.connection_idle_timeout.max(Duration::from_millis(100)),
            keepalive_interval: a.keepalive_interval.max(Duration::from_millis(100)),
            keepalive_timeout: a.keepalive_timeout.max(Duration::from_millis(100)),
        },
        previous_signing_certs: match &a.previous_signing_certs {
            None => Vec::new(),
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("--previous-signing-certs {}: {e}", path.display()))?;
                ca_core::pem::parse_certificates(&pem)
                    .map_err(|e| format!("--previous-signing-certs {}: {e}", path.display()))?
                    .into_iter()
                    .map(|c| c.to_vec())
                    .collect()
            }
        },
        audit_checkpoint_interval: a.audit_checkpoint_interval.max(Duration::from_secs(1)),
        admin_socket: admin_socket.to_owned(),
        kubernetes_audiences: a.kubernetes_token_auth.then(|| a.token_audiences.clone()),
        token_review_limits: crate::authn::kubernetes::ReviewLimits {
            cache_entries: a.token_review_cache.max(1),
            rate: a.token_review_rate.max(0.0),
            burst: a.token_review_burst.max(1),
        },
        leader_election: (a.secret_controller && a.leader_elect).then(|| {
            (
                a.leader_identity
                    .clone()
                    .unwrap_or_else(crate::kubernetes::leader::default_identity),
                a.leader_lease_duration.max(Duration::from_secs(2)),
            )
        }),
        secret_controller: if !a.secret_controller
            && (!a.serving_cert_secret.is_empty() || !a.custom_dns_names.is_empty())
        {
            return Err(
                "--serving-cert-secret and --custom-dns-names need --secret-controller".into(),
            );
        } else if a.secret_controller {
            if !(a.secret_grace_ratio > 0.0 && a.secret_grace_ratio < 1.0) {
                return Err(format!(
                    "--secret-grace-ratio {} must be between 0 and 1",
                    a.secret_grace_ratio
                ));
            }
            if a.secret_min_grace >= a.workload_cert_ttl {
                return Err("--secret-min-grace must be shorter than --workload-cert-ttl".into());
            }
            Some(crate::kubernetes::ControllerConfig {
                ca_namespace: a.ca_namespace.clone(),
                default_enabled: a.namespaces_enabled_by_default,
                workload_ttl: a.workload_cert_ttl,
                workload_key: a.workload_key_type,
                grace_ratio: a.secret_grace_ratio,
                min_grace: a.secret_min_grace,
                concurrency: a.controller_concurrency,
                recheck_interval: a.secret_check_interval.max(Duration::from_secs(1)),
                dns_names: std::sync::Arc::new(crate::kubernetes::names::identity_dns_names(
                    &a.ca_namespace,
                    a.append_dns_names,
                    &a.custom_dns_names,
                )?),
                // Filled in once the CA is loaded (server.rs).
                chain_pem: String::new(),
                serving_secrets: a.serving_cert_secret.clone(),
            })
        } else {
            None
        },
        gce: a
            .gce_config
            .as_deref()
            .map(|p| crate::authn::gce::GceConfig::load(p, &a.trust_domain))
            .transpose()
            .map_err(|e| format!("--gce-config {e}"))?,
    })
}

/// A write past the process's file-size limit (`ulimit -f`, `RLIMIT_FSIZE`) raises
/// SIGXFSZ, whose default action kills the process. Handling it turns that into a failed
/// write (EFBIG), which the audit writer treats like a full disk: it refuses to issue,
/// says so on /readyz, and keeps what it already acknowledged.
fn survive_file_size_limit() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
        Ok(mut s) => {
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::error!(
                        "a file reached the process's size limit (SIGXFSZ); writes to it fail"
                    );
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGXFSZ"),
    }
}

async fn serve(cfg: ServeConfig) -> ExitCode {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("signal received");
        let _ = tx.send(true);
    });
    survive_file_size_limit();
    match server::run(cfg, rx).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => runtime_error(e),
    }
}

async fn export_bundle(admin_socket: &Path, a: ExportArgs) -> ExitCode {
    let to_stdout = a.out.as_os_str() == "-";
    if !to_stdout && let Err(e) = prepare_out_dir(&a.out, a.force) {
        return usage_error(e);
    }
    let key = match a.key_type.generate() {
        Ok(k) => k,
        Err(e) => return runtime_error(format!("key generation failed: {e}")),
    };
    let csr = match rcgen::CertificateParams::default().serialize_request(&key) {
        Ok(c) => c,
        Err(e) => return runtime_error(format!("CSR: {e}")),
    };
    let req = AdminRequest::Sign {
        namespace: a.namespace,
        service_account: a.service_account,
        ttl_secs: a.ttl.as_secs() as i64,
        csr_pem: ca_core::pem::csr(csr.der()),
    };
    let client = AdminClient::new(admin_socket);
    if !client.is_up().await {
        return runtime_error(format!(
            "no ca-server answers on {} (export-bundle needs the running CA: start `ca-server serve`, or pass --state-dir/--admin-socket)",
            admin_socket.display()
        ));
    }
    match client.call(&req).await {
        Ok(AdminResponse::Signed {
            cert_chain_pem,
            root_cert_pem,
            serial,
            not_after,
            spiffe_id,
        }) => {
            let key_pem = key.serialize_pem();
            let chain_pem = cert_chain_pem.concat();
            let files = [
                (BUNDLE_FILES[0], key_pem.as_bytes(), 0o600),
                (BUNDLE_FILES[1], chain_pem.as_bytes(), 0o644),
                (BUNDLE_FILES[2], root_cert_pem.as_bytes(), 0o644),
            ];
            let (written, where_to) = if to_stdout {
                (write_bundle_tar(&files), "stdout (tar)".to_owned())
            } else {
                (
                    write_bundle_dir(&a.out, &files),
                    a.out.display().to_string(),
                )
            };
            if let Err(e) = written {
                return runtime_error(format!(
                    "writing {where_to}: {e} (certificate {serial} was issued and audited)"
                ));
            }
            // With --out - stdout is the bundle; the summary goes to stderr.
            let summary = format!(
                "{spiffe_id} serial {serial} valid until {not_after} written to {where_to}"
            );
            if to_stdout {
                eprintln!("{summary}");
            } else {
                println!("{summary}");
            }
            ExitCode::SUCCESS
        }
        Ok(AdminResponse::Error { message }) => runtime_error(message),
        Ok(other) => runtime_error(format!("unexpected answer: {other:?}")),
        Err(e) => runtime_error(e),
    }
}

/// A bundle's files: name, contents, mode.
type BundleFiles<'a> = [(&'a str, &'a [u8], u32); 3];

const BUNDLE_FILES: [&str; 3] = ["key.pem", "cert-chain.pem", "root-cert.pem"];

/// Makes `out` (mode 0700) or checks that an existing one is a directory of this
/// user's holding nothing but a bundle, so that the key cannot be steered into another
/// user's file; an existing key.pem is replaced only with `force`.
fn prepare_out_dir(out: &Path, force: bool) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let shown = out.display();
    let meta = match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| format!("--out {shown}: {e}"))?;
            }
            return std::fs::DirBuilder::new()
                .mode(0o700)
                .create(out)
                .map_err(|e| format!("--out {shown}: {e}"));
        }
        Err(e) => return Err(format!("--out {shown}: {e}")),
        Ok(m) => m,
    };
    if !meta.file_type().is_dir() {
        return Err(format!(
            "--out {shown} exists and is not a directory (a symlink is not accepted)"
        ));
    }
    let uid = crate::fsutil::current_uid().map_err(|e| e.to_string())?;
    if meta.uid() != uid {
        return Err(format!(
            "--out {shown} belongs to uid {}, not to this user ({uid}); give a new directory",
            meta.uid()
        ));
    }
    let entries = std::fs::read_dir(out).map_err(|e| format!("--out {shown}: {e}"))?;
    for entry in entries {
        let name = entry.map_err(|e| e.to_string())?.file_name();
        let name = name.to_string_lossy();
        if !BUNDLE_FILES.contains(&name.as_ref()) {
            return Err(format!(
                "--out {shown} holds {name}, which is not part of a bundle; give an empty or new directory"
            ));
        }
        if name == "key.pem" && !force {
            return Err(format!(
                "{} exists; use --force to replace it",
                out.join("key.pem").display()
            ));
        }
    }
    Ok(())
}

fn write_bundle_dir(out: &Path, files: &BundleFiles) -> std::io::Result<()> {
    for (name, bytes, mode) in files {
        crate::fsutil::write_atomic(&out.join(name), bytes, *mode)?;
    }
    Ok(())
}

/// The bundle as a ustar stream on stdout, each file with its mode and the current
/// time, owned by uid/gid 0 (tar keeps the extracting user's ownership by default).
fn write_bundle_tar(files: &BundleFiles) -> std::io::Result<()> {
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stdout = std::io::stdout().lock();
    let mut tar = tar::Builder::new(stdout);
    for (name, bytes, mode) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, *bytes)?;
    }
    let mut stdout = tar.into_inner()?;
    std::io::Write::flush(&mut stdout)
}

/// Where admin commands go: the running server's socket for revocations (in effect on
/// that replica at once), the store itself for everything else and when no server
/// answers (other replicas pick revocations up within a second).
struct AdminTarget {
    store: StoreLocation,
    admin_socket: PathBuf,
    state_dir: PathBuf,
}

impl AdminTarget {
    async fn run(&self, req: AdminRequest, json: bool) -> ExitCode {
        let response = if matches!(req, AdminRequest::Revoke { .. })
            && AdminClient::new(&self.admin_socket).is_up().await
        {
            AdminClient::new(&self.admin_socket).call(&req).await
        } else {
            self.direct(req).await
        };
        match response {
            Ok(r) => print_response(r, json),
            Err(e) => runtime_error(e),
        }
    }

    async fn direct(&self, req: AdminRequest) -> Result<AdminResponse, String> {
        if let StoreLocation::Sqlite(path) = &self.store
            && !path.exists()
        {
            return Err(format!(
                "no audit store at {} (wrong --state-dir or --store?)",
                path.display()
            ));
        }
        let describe = |e: crate::audit::AuditError| format!("{}: {e}", self.store.describe());
        let AdminRequest::Revoke { serial, reason } = req else {
            // Reading: no migration under a server of another version, no chain.
            let store = AuditStore::open_reader(&self.store)
                .await
                .map_err(describe)?;
            return crate::admin::query(&store, &req)
                .await
                .ok_or_else(|| "signing needs the running CA".into());
        };
        let chain = format!("admin@{}", crate::kubernetes::leader::host_name());
        let store = AuditStore::open(&self.store, &chain)
            .await
            .map_err(describe)?;
        let uid = std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
            .unwrap_or(u32::MAX);
        let (revoke, decision) = crate::admin::revocation_decision(
            &store,
            &serial,
            &reason,
            "admin-cli",
            format!("uid:{uid}"),
        )
        .await?;
        let mut appended = store
            .append(&[Append {
                decision,
                revoke: Some(revoke),
            }])
            .await
            .map_err(|e| e.to_string())?;
        let record = appended.results.remove(0).map_err(|e| e.to_string())?;
        Ok(AdminResponse::Revoked {
            record: Box::new(record),
        })
    }
}

/// `audit verify`'s request: the published checkpoints read, the CA certificate found.
fn verify_request(
    state_dir: &Path,
    files: &[PathBuf],
    ca_cert: Option<&Path>,
) -> Result<AdminRequest, String> {
    let checkpoints = files
        .iter()
        .map(|f| {
            let text = if f.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(f)
            }
            .map_err(|e| format!("{}: {e}", f.display()))?;
            serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a checkpoint: {e}", f.display()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let default = state_dir.join("ca/ca-cert.pem");
    let ca_cert_pem = match ca_cert {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| format!("--ca-cert {}: {e}", p.display()))?,
        ),
        None => std::fs::read_to_string(default).ok(),
    };
    Ok(AdminRequest::AuditVerify {
        checkpoints,
        ca_cert_pem,
    })
}

/// `audit checkpoint`: only the running CA holds the key.
async fn checkpoint(admin: &AdminTarget, out: Option<&Path>) -> ExitCode {
    let client = AdminClient::new(&admin.admin_socket);
    if !client.is_up().await {
        return runtime_error(format!(
            "no ca-server answers on {} (a checkpoint is signed by the running CA)",
            admin.admin_socket.display()
        ));
    }
    match client.call(&AdminRequest::AuditCheckpoint).await {
        Ok(AdminResponse::Checkpointed { checkpoint }) => {
            let text = serde_json::to_string(&checkpoint).unwrap_or_default();
            if let Some(path) = out
                && let Err(e) = crate::fsutil::write_atomic(path, text.as_bytes(), 0o644)
            {
                return runtime_error(format!("{}: {e}", path.display()));
            }
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(AdminResponse::Error { message }) => runtime_error(message),
        Ok(other) => runtime_error(format!("unexpected answer: {other:?}")),
        Err(e) => runtime_error(e),
    }
}

fn since_arg(s: &str) -> Result<String, String> {
    if OffsetDateTime::parse(s, &Rfc3339).is_ok() {
        return Ok(s.to_owned());
    }
    let ago =
        duration(s).map_err(|e| format!("--since {s:?}: neither RFC 3339 nor a duration: {e}"))?;
    (OffsetDateTime::now_utc() - ago)
        .format(&Rfc3339)
        .map_err(|e| e.to_string())
}

async fn audit(admin: &AdminTarget, cmd: AuditCommand) -> ExitCode {
    let (req, json) = match cmd {
        AuditCommand::List {
            identity,
            since,
            outcome,
            limit,
            json,
        } => {
            let since = match since.as_deref().map(since_arg).transpose() {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            (
                AdminRequest::AuditList {
                    filter: ListFilter {
                        identity,
                        since,
                        outcome,
                        limit,
                    },
                },
                json,
            )
        }
        AuditCommand::Show { serial, json } => {
            if let Err(e) = ca_core::x509::parse_serial(&serial) {
                return usage_error(e);
            }
            (AdminRequest::AuditShow { serial }, json)
        }
        AuditCommand::Verify {
            checkpoint,
            ca_cert,
            json,
        } => match verify_request(&admin.state_dir, &checkpoint, ca_cert.as_deref()) {
            Ok(req) => (req, json),
            Err(e) => return usage_error(e),
        },
        AuditCommand::Checkpoint { out } => return checkpoint(admin, out.as_deref()).await,
    };
    admin.run(req, json).await
}

fn print_record(r: &AuditRecord, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    let d = &r.decision;
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    println!(
        "{}#{} {} {:<7} {:<8} {:<14} caller={} id={} serial={} reason={} peer={}",
        r.chain,
        r.seq,
        r.time,
        d.outcome.map(|o| o.as_str()).unwrap_or("-"),
        d.api.map(|a| a.as_str()).unwrap_or("-"),
        dash(&d.authenticator),
        dash(&d.caller),
        dash(&d.spiffe_id),
        dash(&d.serial),
        dash(&d.reason),
        dash(&d.peer),
    );
}

fn print_response(resp: AdminResponse, json: bool) -> ExitCode {
    match resp {
        AdminResponse::Records { records } => {
            if records.is_empty() && !json {
                eprintln!("no matching records");
            }
            for r in &records {
                print_record(r, json);
            }
            ExitCode::SUCCESS
        }
        AdminResponse::Revoked { record } => {
            println!(
                "revoked {}, and every certificate renewed from it; audit record {}#{}",
                record.decision.serial.as_deref().unwrap_or("-"),
                record.chain,
                record.seq
            );
            ExitCode::SUCCESS
        }
        AdminResponse::Verified { report } => {
            if json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                for p in &report.problems {
                    println!("PROBLEM: {p}");
                }
                for c in &report.chains {
                    println!(
                        "chain {}: records {} to {}; head hash {}",
                        c.chain, c.first_seq, c.head_seq, c.head_hash
                    );
                }
                println!(
                    "checked {} records in {} chains ({} anchored by retention), and {} signed checkpoints{}",
                    report.checked,
                    report.chains.len(),
                    report.anchors,
                    report.checkpoints,
                    if report.signatures_checked || report.checkpoints + report.anchors == 0 {
                        ""
                    } else {
                        " (signatures not checked: give --ca-cert)"
                    }
                );
            }
            if report.problems.is_empty() {
                if !json {
                    println!("audit log intact");
                }
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        AdminResponse::Error { message } => runtime_error(message),
        AdminResponse::Checkpointed { checkpoint } => {
            println!("{}", serde_json::to_string(&checkpoint).unwrap_or_default());
            ExitCode::SUCCESS
        }
        AdminResponse::Signed { serial, .. } => {
            println!("signed {serial}");
            ExitCode::SUCCESS
        }
    }
}
