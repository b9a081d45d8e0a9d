//! Compiles `proto/distill/v1` with the pure-Rust `protox` (no `protoc` needed) and keeps the
//! descriptor set for gRPC reflection.
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "distill/v1/common.proto",
        "distill/v1/labeling.proto",
        "distill/v1/training.proto",
        "distill/v1/teacher.proto",
        "distill/v1/trainer.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("distill_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
