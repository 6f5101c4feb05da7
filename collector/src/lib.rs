//! The outflow collector: agents stream per-connection byte deltas to it over gRPC
//! (`outflow.v1.Ingest`); it applies each batch exactly once, aggregates response and request
//! bytes per client address, client prefix, host, workload, client id and TCP peer in rolling
//! windows of batch time (1 m, 10 m, 1 h, 24 h), keeps what must survive a restart in an
//! embedded redb file, and answers `outflow.v1.Query`.
//!
//! The path of a batch:
//!
//! ```text
//! agent ─gRPC─► ingest (codec: bounded decode) ─► collector::Session (model: validate,
//!   ratelimit, aggregate: fold per key) ─► writer (group commit: dedup by watermark, merge
//!   rollups, one redb transaction, then memory) ─► Ack
//! query ─► aggregate::State (window sums over window::Rollup buckets)
//! writer, after each commit ─► detect (per touched key, batch time) ─► alerts (open/update/
//!   resolve; `alerts` table; log; metrics; broadcast) ─► alerts_service (List, Watch)
//! ```
//!
//! Start one in-process with [`server::Server::start`]; drive the protocol without a network
//! with [`collector::Collector::session`].
pub mod aggregate;
pub mod alerts;
pub mod alerts_service;
pub mod auth;
pub mod client;
pub mod codec;
pub mod collector;
pub mod config;
pub mod detect;
pub mod error;
pub mod ingest;
pub mod keys;
pub mod links;
pub mod metrics;
pub mod model;
pub mod query;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod webhook;
pub mod window;
pub mod writer;

pub use config::Config;
pub use server::Server;
