//! Compiles the llorch contracts into `OUT_DIR`, plus one file descriptor set that the
//! services hand to gRPC server reflection. Nobody else in the workspace runs codegen.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["llorch/tokenizer/v1/tokenizer.proto", "llorch/engine/v1/engine.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("llorch_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
