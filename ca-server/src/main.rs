#![forbid(unsafe_code)]

// glibc's malloc was the largest single cost after the signatures on the issuance path
// (arena locking and consolidation across worker threads); mimalloc raised throughput
// by about a quarter at the price of a larger resident set (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ca_server::cli::main()
}
