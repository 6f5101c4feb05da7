//! Cluster mode on NATS JetStream: the parts of it built so far (see the README, "Cluster mode").
//!
//! - [`partition`]: which partition a delta belongs to, and a batch split into its partitions'
//!   parts (`outflow.v1.PartBatch`);
//! - [`publish`]: an ingest node's publisher: every part of a batch into a replicated stream,
//!   with a message id that makes publishing it again a duplicate, done only once JetStream
//!   acknowledged every part;
//! - [`ingest`]: an ingest node's agent streams, each publishing its batches in order;
//! - [`consume`]: an aggregator's durable consumers, applying its partitions' parts exactly
//!   once to its own store;
//! - [`config`]: `[cluster]`, the node's role.
pub mod config;
pub mod consume;
pub mod ingest;
pub mod partition;
pub mod publish;
