//! outflow's public gRPC API, package `outflow.v1`: the `Ingest` stream from agents to
//! collectors and the `Query` service of a collector. The `.proto` files in `proto/outflow/v1`
//! are the documentation and the contract; this crate is their Rust form (tonic + prost).
//!
//! Wire types stay at the edges: agents and collectors convert them to their own domain types.

/// Generated messages and services of `outflow.v1`.
#[allow(
    clippy::all,
    missing_docs,
    unused_qualifications,
    reason = "generated code"
)]
pub mod v1 {
    tonic::include_proto!("outflow.v1");
}

/// The encoded `FileDescriptorSet` of every outflow proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("outflow_descriptor");
