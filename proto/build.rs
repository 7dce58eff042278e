//! Generates the gRPC code from `proto/` with protox, so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/workload.proto",
        "proto/lanyard/types.proto",
        "proto/lanyard/agent.proto",
        "proto/lanyard/admin.proto",
        "proto/lanyard/agent_local.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .out_dir(&out_dir)
        // The workload's private key travels in X509SVID; keep it out of Debug output
        // (lib.rs writes a redacting Debug by hand).
        .skip_debug([".X509SVID"])
        .compile_fds(fds)?;
    Ok(())
}
