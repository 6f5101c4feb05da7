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

/// Limits of `outflow.v1` that both sides enforce: agents stay within them, collectors refuse
/// what exceeds them (INVALID_ARGUMENT naming the field).
pub mod limits {
    /// `Batch.deltas`: at most this many per batch.
    pub const MAX_DELTAS_PER_BATCH: usize = 100_000;
    /// `ConnDelta.client_id`: at most this many characters.
    pub const MAX_CLIENT_ID_LEN: usize = 256;
    /// `ConnDelta.client_source`: at most this many characters.
    pub const MAX_CLIENT_SOURCE_LEN: usize = 128;
}
