//! `ca-secrets-bench`: cold-start convergence and memory of the Secret controller.
//! Fills the API-server stand-in with N namespaces × M service accounts (and, with
//! `--unrelated-secrets`, that many 4 KiB Opaque Secrets), starts the release
//! `ca-server --secret-controller` against it, and reports the time until every
//! `istio.<sa>` Secret exists, writes per Secret, resident memory, and writes during a
//! steady-state window. With unrelated Secrets it runs twice, without and with them,
//! and prints the memory ratio. `CA_LOG` becomes the server's `RUST_LOG`; when a root
//! ConfigMap is missing at the end, the server's non-INFO log lines are printed. Build
//! first:
//! `cargo build --release -p ca-server -p ca-bench`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use e2e::CaProcess;
use e2e::kube_api::{Kind, KubeApi};
use serde_json::json;

/// Secret-controller benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// The ca-server binary [default: next to this binary].
    #[arg(long)]
    ca_bin: Option<PathBuf>,
    /// Namespaces.
    #[arg(long, default_value_t = 1000)]
    namespaces: usize,
    /// Service accounts per namespace.
    #[arg(long, default_value_t = 10)]
    per_namespace: usize,
    /// Seconds of steady state to watch for writes after convergence.
    #[arg(long, default_value_t = 300)]
    steady_seconds: u64,
    /// Unrelated 4 KiB Opaque Secrets spread over the namespaces (0: none).
    #[arg(long, default_value_t = 0)]
    unrelated_secrets: usize,
    /// Give up converging after this many seconds.
    #[arg(long, default_value_t = 300)]
    limit_seconds: u64,
}

/// Identity Secrets created so far (the write counter: cheaper than listing every
/// Secret of a large stand-in while it serves the CA).
fn identity_secrets(api: &KubeApi) -> usize {
    api.writes()
        .by
        .get(&("Secret".to_string(), "create".to_string()))
        .copied()
        .unwrap_or(0) as usize
}

/// What one run measured.
struct Run {
    converged: Duration,
    rss_mib: f64,
}

#[tokio::main]
async fn main() {
    e2e::install_crypto();
    let args = Args::parse();
    let bin = args
        .ca_bin
        .clone()
        .unwrap_or_else(|| e2e::sibling_bin("ca-server"));
    if args.unrelated_secrets == 0 {
        run(&args, &bin, 0).await;
        return;
    }
    let alone = run(&args, &bin, 0).await;
    let among = run(&args, &bin, args.unrelated_secrets).await;
    println!(
        "among {} unrelated Secrets / alone: resident memory x{:.3}, convergence time x{:.3}",
        args.unrelated_secrets,
        among.rss_mib / alone.rss_mib,
        among.converged.as_secs_f64() / alone.converged.as_secs_f64()
    );
}

async fn run(args: &Args, bin: &std::path::Path, unrelated: usize) -> Run {
    let api = KubeApi::start().await;
    let filler = base64::engine::general_purpose::STANDARD.encode("x".repeat(4096));
    let per_ns_unrelated = unrelated.div_ceil(args.namespaces.max(1));
    for i in 0..args.namespaces {
        let ns = format!("ns{i}");
        api.insert_unwatched(Kind::Namespace, "", [json!({"metadata": {"name": ns}})]);
        api.insert_unwatched(
            Kind::ServiceAccount,
            &ns,
            (0..args.per_namespace).map(|j| json!({"metadata": {"name": format!("sa{j}")}})),
        );
        api.insert_unwatched(
            Kind::Secret,
            &ns,
            (0..per_ns_unrelated).map(|j| {
                json!({"metadata": {"name": format!("app-{j}")}, "type": "Opaque",
                       "data": {"blob": filler}})
            }),
        );
    }
    let expected = args.namespaces * args.per_namespace;
    println!(
        "stand-in: {} namespaces x {} service accounts, {} unrelated Secrets",
        args.namespaces,
        args.per_namespace,
        per_ns_unrelated * args.namespaces
    );

    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let started = Instant::now();
    let ca = CaProcess::start_bin_with_env(
        bin.to_owned(),
        &tmp.path().join("state"),
        &["--secret-controller", "--leader-elect", "false"],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            (
                "RUST_LOG",
                &std::env::var("CA_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ],
    );
    let deadline = started + Duration::from_secs(args.limit_seconds);
    while identity_secrets(&api) < expected {
        assert!(
            Instant::now() < deadline,
            "did not converge within {}s",
            args.limit_seconds
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let converged = started.elapsed();
    let writes = api.writes();
    let pid = ca.pid().expect("running");
    println!(
        "converged: {expected} Secrets in {:.1} s from process start ({:.0} Secrets/s); Secret writes: {} ({:.2} per Secret); ConfigMap writes: {}; resident {:.1} MiB",
        converged.as_secs_f64(),
        expected as f64 / converged.as_secs_f64(),
        writes.of("Secret"),
        writes.of("Secret") as f64 / expected as f64,
        writes.of("ConfigMap"),
        e2e::rss(pid) as f64 / 1048576.0,
    );
    tokio::time::sleep(Duration::from_secs(args.steady_seconds)).await;
    let after = api.writes();
    let rss_mib = e2e::rss(pid) as f64 / 1048576.0;
    println!(
        "steady state: {} Secret writes and {} ConfigMap writes in {} s; resident {rss_mib:.1} MiB",
        after.of("Secret") - writes.of("Secret"),
        after.of("ConfigMap") - writes.of("ConfigMap"),
        args.steady_seconds
    );
    let configmaps = api.objects(Kind::ConfigMap).len();
    if configmaps != args.namespaces {
        println!("only {configmaps} root ConfigMaps; the CA's warnings:");
        for line in ca.log_text().lines().filter(|l| !l.contains("INFO")) {
            println!("  {line}");
        }
    }
    Run { converged, rss_mib }
}
