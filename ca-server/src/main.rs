#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    ca_server::cli::main()
}
