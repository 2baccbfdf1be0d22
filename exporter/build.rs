//! With the `pulsar` feature: compiles frames.proto, tandem's own definition of the part of
//! Pulsar's binary protocol its client speaks, with protox (pure Rust), so building tandem needs
//! no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_PULSAR").is_none() {
        return Ok(());
    }
    println!("cargo:rerun-if-changed=src/pulsar/frames.proto");
    let fds = protox::compile(["frames.proto"], ["src/pulsar"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
