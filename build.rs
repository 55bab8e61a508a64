//! Compiles the protocol in `proto/` into Rust (server and client) and a descriptor set for
//! gRPC server reflection. protoc comes from the `protoc-bin-vendored` crate, so no system
//! protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts are single-threaded; edition 2021 allows this call.
    std::env::set_var("PROTOC", protoc);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("stoker_descriptor.bin"))
        .compile_protos(&["proto/stoker/v1/stoker.proto"], &["proto"])?;
    Ok(())
}
