//! Compiles proto/outflow/v1/*.proto into OUT_DIR with a pure-Rust protobuf compiler (protox),
//! so no protoc needs to be installed, and keeps the descriptor set for gRPC reflection.
use std::{env, path::PathBuf};

use anyhow::Context as _;

const PROTOS: &[&str] = &[
    "outflow/v1/ingest.proto",
    "outflow/v1/query.proto",
    "outflow/v1/alerts.proto",
    "outflow/v1/feed.proto",
    "outflow/v1/cluster.proto",
];

fn main() -> anyhow::Result<()> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."]).context("compile the .proto files")?;
    let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let descriptor = out.join("outflow_descriptor.bin");
    std::fs::write(&descriptor, prost::Message::encode_to_vec(&fds))
        .with_context(|| format!("write {}", descriptor.display()))?;
    tonic_prost_build::configure()
        .compile_fds(fds)
        .context("generate Rust code from the descriptors")?;
    Ok(())
}
