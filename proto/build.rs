//! Compiles the wire contract without `protoc`: protox parses the .proto files
//! (it ships the well-known types) and tonic-prost-build generates the code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/ca.proto", "proto/istioca.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=proto/google/rpc/status.proto");
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
