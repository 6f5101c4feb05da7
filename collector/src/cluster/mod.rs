//! Cluster mode on NATS JetStream: the parts of it built so far.
//!
//! - [`partition`]: which partition a delta belongs to, and a batch split into its partitions'
//!   parts (`outflow.v1.PartBatch`);
//! - [`publish`]: an ingest node's publisher: every part of a batch into a replicated stream,
//!   with a message id that makes publishing it again a duplicate, done only once JetStream
//!   acknowledged every part.
pub mod config;
pub mod ingest;
pub mod partition;
pub mod publish;
