//! `ca-audit-bench`: the audit store on its own. Writes N issuance records through the
//! real `AuditStore` in group-commit batches (one durable transaction each, as the
//! server's writer does) on SQLite or on a throwaway PostgreSQL cluster, and reports
//! CPU time, disk and memory per record as the store grows. `--retain-seconds`
//! prunes as retention does. Disk bytes per record are per record still held,
//! indexes and the certificate index included.
#![forbid(unsafe_code)]

mod procfs;

// The server's allocator, so the figures are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ca_core::x509::{hex, sha256_hex};
use ca_server::audit::{Api, Append, AuditStore, Decision, Outcome, StoreLocation};
use clap::{Parser, ValueEnum};
use procfs::cpu_seconds;
use ring::rand::SystemRandom;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// A SQLite file (WAL, synchronous=FULL).
    Sqlite,
    /// A PostgreSQL cluster started for the run (synchronous_commit=on, fsync=on).
    Postgres,
}

/// Audit store benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Records to write.
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// Records per group commit (one transaction each). The server's writer gathers
    /// about 28 at concurrency 64.
    #[arg(long, default_value_t = 28)]
    batch: u64,
    /// Which database.
    #[arg(long, value_enum, default_value_t = Backend::Sqlite)]
    store: Backend,
    /// Report every this many records.
    #[arg(long, default_value_t = 100_000)]
    every: u64,
    /// At every report, prune records older than this many seconds, as retention
    /// does (to see whether pruning gives back memory and disk).
    #[arg(long)]
    retain_seconds: Option<u64>,
    /// Where to put the SQLite file's directory [default: a temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn serial(rng: &SystemRandom) -> String {
    hex(&ca_core::authority::fresh_serial(rng).expect("rng"))
}

/// A renewal over mutual TLS, the common case: the record names the client
/// certificate's serial as well.
fn issuance(i: u64, serial: String, parent: String) -> Append {
    let id = format!("spiffe://cluster.local/ns/bench/sa/workload-{}", i % 10_000);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Append {
        decision: Decision {
            api: Some(Api::Modern),
            outcome: Some(Outcome::Issued),
            authenticator: Some("client-cert".into()),
            caller: Some(id.clone()),
            peer: Some("127.0.0.1:50412".into()),
            requested_ttl_secs: 0,
            granted_ttl_secs: Some(3600),
            spiffe_id: Some(id),
            serial: Some(serial),
            client_serial: Some(parent),
            not_before: Some(ca_server::audit::rfc3339_secs(now - 60)),
            not_after: Some(ca_server::audit::rfc3339_secs(now + 3600)),
            spki_sha256: Some(sha256_hex(&i.to_be_bytes())),
            cert_sha256: Some(sha256_hex(&(!i).to_be_bytes())),
            ..Default::default()
        },
        revoke: None,
    }
}

/// Bytes the store takes on disk: the SQLite files, or the PostgreSQL database less
/// what an empty one takes.
async fn store_bytes(store: &Backend2) -> u64 {
    match store {
        Backend2::Sqlite(dir) => disk_bytes(dir),
        Backend2::Postgres { pg, baseline } => {
            let size: u64 = pg
                .psql("postgres", "SELECT pg_database_size('bench')")
                .trim()
                .parse()
                .unwrap_or(0);
            size.saturating_sub(*baseline)
        }
    }
}

/// The running backend.
enum Backend2 {
    Sqlite(PathBuf),
    Postgres {
        pg: e2e::postgres::Postgres,
        baseline: u64,
    },
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let (location, backend) = match args.store {
        Backend::Sqlite => {
            let dir = args.dir.clone().unwrap_or_else(|| tmp.path().join("audit"));
            (
                StoreLocation::Sqlite(dir.join("audit.db")),
                Backend2::Sqlite(dir),
            )
        }
        Backend::Postgres => {
            let pg = e2e::postgres::Postgres::start();
            pg.psql("postgres", "CREATE DATABASE bench");
            let baseline = pg
                .psql("postgres", "SELECT pg_database_size('bench')")
                .trim()
                .parse()
                .unwrap_or(0);
            (
                StoreLocation::Postgres(pg.url("bench")),
                Backend2::Postgres { pg, baseline },
            )
        }
    };
    // Signs the anchors pruning moves, as the server's CA does.
    let ca = ca_core::CertificateAuthority::new_self_signed_root(
        rcgen::KeyPair::generate().expect("CA key"),
        "cluster.local",
        time::OffsetDateTime::now_utc(),
        std::time::Duration::from_secs(86400),
    )
    .expect("CA");
    let store = AuditStore::open(&location, "bench")
        .await
        .expect("open the audit store");
    let rng = SystemRandom::new();
    println!(
        "{} records, {} per commit, store {}",
        args.records,
        args.batch,
        location.describe()
    );
    println!(
        "| records | records/s | CPU µs per record | disk MiB | disk bytes per record | RSS MiB | pruned so far |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut pruned = 0;
    let (start, cpu_start) = (Instant::now(), cpu_seconds(std::process::id()));
    let (mut window, mut cpu_window) = (Instant::now(), cpu_start);
    let (mut written, mut reported) = (0, 0);
    let mut parent = serial(&rng);
    while written < args.records {
        let n = args.batch.min(args.records - written);
        let batch: Vec<Append> = (written..written + n)
            .map(|i| {
                let s = serial(&rng);
                issuance(i, s.clone(), std::mem::replace(&mut parent, s))
            })
            .collect();
        for result in store.append(&batch).await.expect("commit").results {
            result.expect("record");
        }
        let before = written;
        written += n;
        if written / args.every > before / args.every || written == args.records {
            let span = (written - reported) as f64;
            reported = written;
            if let Some(secs) = args.retain_seconds {
                let cutoff = time::OffsetDateTime::now_utc() - time::Duration::seconds(secs as i64);
                pruned += store
                    .prune_before(cutoff, std::time::Duration::from_secs(3600), &ca)
                    .await
                    .expect("prune");
            }
            let (now, cpu) = (Instant::now(), cpu_seconds(std::process::id()));
            let disk = store_bytes(&backend).await;
            println!(
                "| {written} | {:.0} | {:.1} | {} | {} | {} | {pruned} |",
                span / (now - window).as_secs_f64(),
                (cpu - cpu_window) * 1e6 / span,
                disk >> 20,
                disk / (written - pruned).max(1),
                procfs::status_kib(std::process::id(), "VmRSS").unwrap_or(0) / 1024
            );
            (window, cpu_window) = (now, cpu);
        }
    }
    println!(
        "total: {:.0} records/s, {:.1} CPU µs per record (this process; PostgreSQL's own CPU is not counted)",
        written as f64 / start.elapsed().as_secs_f64(),
        (cpu_seconds(std::process::id()) - cpu_start) * 1e6 / written as f64
    );
    print_relations(&location, written - pruned).await;
}

/// Where the bytes go: each table's and index's pages, per record held (SQLite's
/// `dbstat`, PostgreSQL's relation sizes; the write-ahead log is not in either).
async fn print_relations(location: &StoreLocation, records: u64) {
    let pool = e2e::postgres::connect(location).await;
    let sql = match location {
        StoreLocation::Sqlite(_) => {
            "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT 8"
        }
        StoreLocation::Postgres(_) => {
            "SELECT relname::text, pg_relation_size(oid) FROM pg_class
              WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'i')
              ORDER BY 2 DESC LIMIT 8"
        }
    };
    let rows: Vec<(String, i64)> = sqlx::query_as(sql)
        .fetch_all(&pool)
        .await
        .expect("relation sizes");
    let per = |b: i64| b as f64 / records.max(1) as f64;
    let total: i64 = rows.iter().map(|(_, b)| b).sum();
    println!(
        "bytes per record held, by table and index (total {:.0}):",
        per(total)
    );
    for (name, bytes) in rows {
        println!("  {name}: {:.0}", per(bytes));
    }
}
