//! With the `pulsar` feature: compiles the vendored PulsarApi.proto with protox (pure Rust), so
//! building tandem needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_PULSAR").is_none() {
        return Ok(());
    }
    println!("cargo:rerun-if-changed=src/pulsar/PulsarApi.proto");
    let fds = protox::compile(["PulsarApi.proto"], ["src/pulsar"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
