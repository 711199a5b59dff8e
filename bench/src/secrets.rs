//! `ca-secrets-bench`: cold-start convergence of the Secret controller. Fills the
//! API-server stand-in with N namespaces × M service accounts, starts the release
//! `ca-server --secret-controller` against it, and reports the time until every
//! `istio.<sa>` Secret exists, writes per Secret, and writes during a steady-state
//! window. Build first: `cargo build --release -p ca-server -p ca-bench`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use e2e::CaProcess;
use e2e::kube_api::{Kind, KubeApi};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};

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
    /// Give up converging after this many seconds.
    #[arg(long, default_value_t = 300)]
    limit_seconds: u64,
}

fn identity_secrets(api: &KubeApi) -> usize {
    api.objects(Kind::Secret)
        .iter()
        .filter(|s| s["type"] == "istio.io/key-and-cert")
        .count()
}

#[tokio::main]
async fn main() {
    e2e::install_crypto();
    let args = Args::parse();
    let bin = args
        .ca_bin
        .clone()
        .unwrap_or_else(|| e2e::sibling_bin("ca-server"));
    let api = KubeApi::start().await;
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://{}", api.addr).parse().unwrap(),
    ))
    .unwrap();
    let pp = PostParams::default();
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        ..Default::default()
    };
    let filling = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.namespaces {
        let (client, pp) = (client.clone(), pp.clone());
        let per = args.per_namespace;
        tasks.spawn(async move {
            let ns = format!("ns{i}");
            Api::<Namespace>::all(client.clone())
                .create(
                    &pp,
                    &Namespace {
                        metadata: meta(ns.clone()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let sas: Api<ServiceAccount> = Api::namespaced(client, &ns);
            for j in 0..per {
                sas.create(
                    &pp,
                    &ServiceAccount {
                        metadata: meta(format!("sa{j}")),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            }
        });
        while tasks.len() >= 32 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    let expected = args.namespaces * args.per_namespace;
    println!(
        "stand-in filled with {} namespaces x {} service accounts in {:?}",
        args.namespaces,
        args.per_namespace,
        filling.elapsed()
    );

    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let started = Instant::now();
    let _ca = CaProcess::start_bin_with_env(
        bin,
        &tmp.path().join("state"),
        &["--secret-controller", "--leader-elect", "false"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
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
    let writes = api.writes().of("Secret");
    println!(
        "converged: {expected} Secrets in {:.1} s from process start ({:.0} Secrets/s); Secret writes: {writes} ({:.2} per Secret); ConfigMap writes: {}",
        converged.as_secs_f64(),
        expected as f64 / converged.as_secs_f64(),
        writes as f64 / expected as f64,
        api.writes().of("ConfigMap"),
    );
    tokio::time::sleep(Duration::from_secs(args.steady_seconds)).await;
    let after = api.writes();
    println!(
        "steady state: {} Secret writes and {} ConfigMap writes in {} s",
        after.of("Secret") - writes,
        after.of("ConfigMap") as i64 - (args.namespaces as i64),
        args.steady_seconds
    );
}
