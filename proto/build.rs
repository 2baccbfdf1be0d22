//! Compiles the .proto files with protox (pure Rust), so building tandem needs no protoc.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tandem/v1/tandem.proto",
        "proto/tandem/v1/gateway.proto",
        "proto/tandem/v1/errors.proto",
        "proto/tandem/storage/v1/storage.proto",
        "proto/tandem/replication/v1/events.proto",
        "proto/tandem/cluster/v1/query_node.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Served by gRPC server reflection, so grpcurl and friends work without the .proto files.
    std::fs::write(out.join("tandem_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
