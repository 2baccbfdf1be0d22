//! Compiles tandem's own wire-compatible subset of Milvus's protos with protox (pure Rust, no
//! protoc), server side only: tandem serves MilvusService, it never calls it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/milvus/common.proto", "proto/milvus/schema.proto", "proto/milvus/milvus.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(false).build_server(true).compile_fds(fds)?;
    Ok(())
}
