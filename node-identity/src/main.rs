#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    node_identity::cli::main()
}
