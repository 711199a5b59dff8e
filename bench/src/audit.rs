//! `ca-audit-bench`: the audit store on its own. Writes N issuance records through the
//! real `AuditStore` in group-commit batches (write, then one flush per batch, as the
//! server's writer does) and reports CPU time, disk and memory per record as the store
//! grows. `--serials random` replays the old serial scheme (16 random bytes) to show
//! what the key order of the serial index costs; `--retain-seconds` prunes as
//! retention does. Disk bytes per record are per record still held.
#![forbid(unsafe_code)]

mod procfs;

// The server's allocator, so the figures are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ca_core::x509::{hex, sha256_hex};
use ca_server::audit::{Api, Append, AuditStore, Decision, Outcome};
use clap::{Parser, ValueEnum};
use procfs::cpu_seconds;
use ring::rand::{SecureRandom, SystemRandom};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Serials {
    /// What the CA issues: an issuance clock, then 64 random bits.
    Clock,
    /// 16 random bytes.
    Random,
}

/// Audit store benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Records to write.
    #[arg(long, default_value_t = 300_000)]
    records: u64,
    /// Records per group commit (one flush each). The server's writer gathers about
    /// 28 at concurrency 64.
    #[arg(long, default_value_t = 28)]
    batch: u64,
    /// Serial numbers of the recorded certificates.
    #[arg(long, value_enum, default_value_t = Serials::Clock)]
    serials: Serials,
    /// Report every this many records.
    #[arg(long, default_value_t = 100_000)]
    every: u64,
    /// At every report, prune records older than this many seconds, as retention
    /// does (to see whether pruning gives back memory and disk).
    #[arg(long)]
    retain_seconds: Option<u64>,
    /// Where to put the store [default: a temporary directory].
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

fn serial(kind: Serials, rng: &SystemRandom) -> String {
    let bytes = match kind {
        Serials::Clock => ca_core::authority::fresh_serial(rng).expect("rng"),
        Serials::Random => {
            let mut b = [0u8; 16];
            rng.fill(&mut b).expect("rng");
            b[0] = (b[0] & 0x7f) | 0x40;
            b
        }
    };
    hex(&bytes)
}

fn issuance(i: u64, serial: String) -> Append {
    let id = format!("spiffe://cluster.local/ns/bench/sa/workload-{}", i % 64);
    Append {
        decision: Decision {
            api: Some(Api::Modern),
            outcome: Some(Outcome::Issued),
            authenticator: Some("client-certificate".into()),
            caller: Some(id.clone()),
            peer: Some("127.0.0.1:50412".into()),
            requested_ttl_secs: 0,
            granted_ttl_secs: Some(3600),
            spiffe_id: Some(id),
            serial: Some(serial),
            not_before: Some("2026-11-26T18:00:00Z".into()),
            not_after: Some("2026-11-26T19:01:00Z".into()),
            spki_sha256: Some(sha256_hex(&i.to_be_bytes())),
            cert_sha256: Some(sha256_hex(&(!i).to_be_bytes())),
            ..Default::default()
        },
        revoke: None,
    }
}

fn main() {
    let args = Args::parse();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().join("audit"));
    let store = AuditStore::open(&dir).expect("open the audit store");
    let rng = SystemRandom::new();
    println!(
        "{} records, {} per flush, {:?} serials, store in {}",
        args.records,
        args.batch,
        args.serials,
        dir.display()
    );
    println!(
        "| records | records/s | CPU µs per record | disk MiB | disk bytes per record | RSS MiB | pruned so far |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut pruned = 0;
    let (start, cpu_start) = (Instant::now(), cpu_seconds(std::process::id()));
    let (mut window, mut cpu_window) = (Instant::now(), cpu_start);
    let (mut written, mut reported) = (0, 0);
    while written < args.records {
        let n = args.batch.min(args.records - written);
        let batch = (written..written + n)
            .map(|i| issuance(i, serial(args.serials, &rng)))
            .collect();
        for result in store.write_batch(batch) {
            result.expect("write");
        }
        store.flush_blocking().expect("flush");
        let before = written;
        written += n;
        if written / args.every > before / args.every || written == args.records {
            let span = (written - reported) as f64;
            reported = written;
            if let Some(secs) = args.retain_seconds {
                let cutoff = time::OffsetDateTime::now_utc() - time::Duration::seconds(secs as i64);
                pruned += store.prune_before(cutoff).expect("prune");
            }
            let (now, cpu) = (Instant::now(), cpu_seconds(std::process::id()));
            let disk = disk_bytes(&dir);
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
        "total: {:.0} records/s, {:.1} CPU µs per record",
        written as f64 / start.elapsed().as_secs_f64(),
        (cpu_seconds(std::process::id()) - cpu_start) * 1e6 / written as f64
    );
}
