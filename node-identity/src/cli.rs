//! Command line of `node-identity`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ca_core::keys::KeyAlgorithm;
use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;

use crate::agent::{self, AgentConfig, Exit};
use crate::ca_client::CaEndpoint;
use crate::credential::{Found, read_dir};
use crate::schedule::RenewalSchedule;
use crate::status::{Status, rfc3339};

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 20s, 30m, 1h)"))
}

fn key_type(s: &str) -> Result<KeyAlgorithm, String> {
    match s {
        "p256" | "rsa2048" => KeyAlgorithm::parse(s),
        other => Err(format!(
            "unsupported key type {other:?} (use p256 or rsa2048)"
        )),
    }
}

/// Keeps this machine's SPIFFE certificate fresh in --certs-dir for the sidecar.
///
/// Proves the machine's identity to the CA with the best valid credential (the current
/// certificate, else the admin-exported bootstrap bundle), obtains a certificate for a
/// fresh key over mutual TLS, checks it, publishes key.pem, cert-chain.pem and
/// root-cert.pem atomically, and renews at --renew-at of its lifetime. Failures are
/// retried with backoff; a valid certificate is never removed.
#[derive(Debug, Parser)]
#[command(name = "node-identity", version)]
pub struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct Common {
    /// Where the sidecar reads key.pem, cert-chain.pem and root-cert.pem.
    #[arg(
        long,
        global = true,
        env = "NODE_IDENTITY_CERTS_DIR",
        default_value = "/etc/certs"
    )]
    certs_dir: PathBuf,
    /// The status file written by the agent and read by `status`.
    #[arg(
        long,
        global = true,
        env = "NODE_IDENTITY_STATUS_FILE",
        default_value = "/var/lib/node-identity/status.json"
    )]
    status_file: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run(Box<RunArgs>),
    /// Print identity, expiry, next renewal and last error; exit 0 only when the
    /// published certificate is valid.
    Status,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The CA's gRPC address, HOST:PORT (e.g. the internal load balancer's IP:8060).
    #[arg(long, env = "NODE_IDENTITY_CA_ADDRESS")]
    ca_address: Option<String>,
    /// TLS name the CA's certificate must carry (VMs often dial an IP).
    #[arg(long, env = "NODE_IDENTITY_CA_SERVER_NAME", default_value = "istio-ca")]
    ca_server_name: String,
    /// The admin-exported bundle (key.pem, cert-chain.pem, root-cert.pem), kept apart
    /// from the rotating files.
    #[arg(
        long,
        env = "NODE_IDENTITY_BOOTSTRAP_DIR",
        default_value = "/etc/node-identity/bootstrap"
    )]
    bootstrap_dir: PathBuf,
    /// Requested certificate lifetime.
    #[arg(long, env = "NODE_IDENTITY_TTL", default_value = "1h", value_parser = duration)]
    ttl: Duration,
    /// Renew at this fraction of the lifetime (±10% jitter).
    #[arg(long, env = "NODE_IDENTITY_RENEW_AT", default_value_t = 0.5)]
    renew_at: f64,
    /// Key type of new keys: p256 or rsa2048.
    #[arg(long, env = "NODE_IDENTITY_KEY_TYPE", default_value = "p256", value_parser = key_type)]
    key_type: KeyAlgorithm,
    /// How this machine proves its identity: onprem (client certificates from the
    /// bootstrap bundle), gce (an instance identity token from the metadata server),
    /// or auto (gce when a metadata server answers within a second).
    #[arg(long, env = "NODE_IDENTITY_PLATFORM", value_enum, default_value_t = Platform::Onprem)]
    platform: Platform,
    /// GCE metadata server, HOST[:PORT].
    #[arg(
        long,
        env = "NODE_IDENTITY_METADATA_HOST",
        default_value = "metadata.google.internal"
    )]
    metadata_host: String,
    /// Audience of GCE identity tokens (the CA's `audience`).
    #[arg(long, env = "NODE_IDENTITY_GCE_AUDIENCE", default_value = "istio-ca")]
    gce_audience: String,
    /// Trust bundle for the CA's certificate when there is no bootstrap bundle (GCE).
    #[arg(
        long,
        env = "NODE_IDENTITY_ROOT_CERT",
        default_value = "/etc/node-identity/root-cert.pem"
    )]
    root_cert: PathBuf,
    /// The SPIFFE ID this machine must receive (optional; checked in every answer).
    #[arg(long, env = "NODE_IDENTITY_EXPECTED_IDENTITY")]
    expected_identity: Option<String>,
    /// First retry delay after a failure.
    #[arg(long, env = "NODE_IDENTITY_MIN_BACKOFF", default_value = "1s", value_parser = duration)]
    min_backoff: Duration,
    /// Largest retry delay.
    #[arg(long, env = "NODE_IDENTITY_MAX_BACKOFF", default_value = "5m", value_parser = duration)]
    max_backoff: Duration,
    /// Deadline for connecting to the CA and for one request.
    #[arg(long, env = "NODE_IDENTITY_TIMEOUT", default_value = "10s", value_parser = duration)]
    timeout: Duration,
    /// Make sure a valid certificate is published (renewing if due), then exit.
    #[arg(long)]
    once: bool,
    /// Log format.
    #[arg(long, env = "NODE_IDENTITY_LOG_FORMAT", value_enum, default_value_t = cli_exit::LogFormat::Text)]
    log_format: cli_exit::LogFormat,
}

/// `--platform`: how the machine proves who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Platform {
    /// Client certificates from the bootstrap bundle.
    Onprem,
    /// Instance identity tokens from the GCE metadata server.
    Gce,
    /// `gce` when a metadata server answers within a second, else `onprem`.
    Auto,
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    cli_exit::usage_error("node-identity", msg)
}

/// Entry point.
pub fn main() -> ExitCode {
    let mut argv: Vec<String> = std::env::args().collect();
    // `node-identity --ca-address X` means `node-identity run --ca-address X`.
    if !argv.iter().skip(1).any(|a| {
        matches!(
            a.as_str(),
            "run" | "status" | "help" | "-h" | "--help" | "-V" | "--version"
        )
    }) {
        argv.insert(1, "run".into());
    }
    let cli = match cli_exit::parse::<Cli, _, _>("node-identity", argv) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match cli.command {
        Some(Command::Status) => status(&cli.common),
        Some(Command::Run(args)) => run(&cli.common, *args),
        None => usage_error("no command"),
    }
}

fn agent_config(common: &Common, a: &RunArgs) -> Result<AgentConfig, String> {
    let address = a
        .ca_address
        .clone()
        .ok_or("--ca-address (or NODE_IDENTITY_CA_ADDRESS) is required")?;
    if address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        return Err(format!("--ca-address {address:?} must be HOST:PORT"));
    }
    if !(a.renew_at > 0.05 && a.renew_at < 0.95) {
        return Err(format!(
            "--renew-at {} must be between 0.05 and 0.95",
            a.renew_at
        ));
    }
    if a.ttl < Duration::from_secs(10) {
        return Err("--ttl must be at least 10s".into());
    }
    if a.min_backoff.is_zero() || a.min_backoff > a.max_backoff {
        return Err("--min-backoff must be positive and at most --max-backoff".into());
    }
    if common.certs_dir == a.bootstrap_dir {
        return Err("--bootstrap-dir must differ from --certs-dir: the bootstrap bundle is never overwritten".into());
    }
    Ok(AgentConfig {
        ca: CaEndpoint {
            address,
            server_name: a.ca_server_name.clone(),
            timeout: a.timeout,
        },
        certs_dir: common.certs_dir.clone(),
        bootstrap_dir: a.bootstrap_dir.clone(),
        ttl: a.ttl,
        schedule: RenewalSchedule {
            renew_at: a.renew_at,
        },
        key_type: a.key_type,
        min_backoff: a.min_backoff,
        max_backoff: a.max_backoff,
        status_file: common.status_file.clone(),
        once: a.once,
        gce: (a.platform != Platform::Onprem).then(|| crate::gce::GceSettings {
            metadata_host: a.metadata_host.clone(),
            audience: a.gce_audience.clone(),
            root_cert: a.root_cert.clone(),
        }),
        expected_identity: a
            .expected_identity
            .as_deref()
            .map(ca_core::SpiffeId::parse)
            .transpose()
            .map_err(|e| format!("--expected-identity: {e}"))?,
    })
}

fn run(common: &Common, args: RunArgs) -> ExitCode {
    let cfg = match agent_config(common, &args) {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    cli_exit::init_logging(args.log_format);
    // One thread is plenty for one renewal every half hour, and keeps the footprint small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("node-identity: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = tx.send(true);
        });
        let mut cfg = cfg;
        if args.platform == Platform::Auto {
            let host = cfg.gce.as_ref().map(|g| g.metadata_host.clone()).unwrap_or_default();
            if crate::gce::detect(&host).await {
                tracing::info!("platform auto: a GCE metadata server answers at {host}; using instance identity tokens");
            } else {
                tracing::info!("platform auto: no GCE metadata server at {host}; using the bootstrap bundle only");
                cfg.gce = None;
            }
        }
        match agent::run(cfg, rx).await {
            Exit::Shutdown | Exit::Done => ExitCode::SUCCESS,
            Exit::Fatal(msg) => {
                eprintln!("node-identity: {msg}");
                ExitCode::FAILURE
            }
        }
    })
}

fn status(common: &Common) -> ExitCode {
    let st = Status::load(&common.status_file);
    let now = OffsetDateTime::now_utc();
    let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let valid = match read_dir("current", &common.certs_dir) {
        Found::Credential(c) => {
            let ok = c.is_valid_at(now) && c.not_before <= now + time::Duration::minutes(5);
            println!("identity:      {}", c.who());
            println!("serial:        {}", c.serial);
            println!(
                "valid until:   {}{}",
                rfc3339(c.not_after),
                if ok { "" } else { " (EXPIRED)" }
            );
            ok
        }
        Found::Absent => {
            println!(
                "identity:      - (no certificate in {})",
                common.certs_dir.display()
            );
            false
        }
        Found::Unusable(e) | Found::Unavailable(e) => {
            println!("identity:      - (unusable: {e})");
            false
        }
    };
    println!("next renewal:  {}", show(&st.next_renewal));
    println!(
        "last renewal:  {} (credential: {})",
        show(&st.last_success),
        show(&st.last_credential)
    );
    match (&st.last_error, &st.last_error_at) {
        (Some(e), Some(t)) => println!("last error:    {t}: {e}"),
        (Some(e), None) => println!("last error:    {e}"),
        _ => println!("last error:    -"),
    }
    if valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
