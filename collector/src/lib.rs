//! The outflow collector: agents stream per-connection byte deltas to it over gRPC
//! (`outflow.v1.Ingest`); it applies each batch exactly once, aggregates response and request
//! bytes per client address, client prefix, host, workload, client id and TCP peer in rolling
//! windows of batch time (1 m, 10 m, 1 h, 24 h; the detectors keep 7 and 30 days), keeps what
//! must survive a restart in an embedded redb file, and answers `outflow.v1.Query`.
//!
//! The path of a batch:
//!
//! ```text
//! agent ─gRPC─► ingest (codec: bounded decode) ─► collector::Session (model: validate,
//!   ratelimit, aggregate: fold per key) ─► writer (group commit: dedup by watermark, merge
//!   rollups, one redb transaction, then memory) ─► Ack
//! query ─► aggregate::State (window sums over window::Rollup buckets)
//! writer, at each eval_interval of batch time ─► detect (the keys touched since) ─► alerts (open/update/
//!   resolve; `alerts` table; log; metrics; broadcast) ─► alerts_service (List, Watch),
//!   sinks (webhook, otlp)
//! writer, after each commit, before the Acks ─► feed (applied batches by position)
//!   ─► feed_service (outflow.v1.Feed/Follow)
//! writer, per group commit ─► history (the fleet's bytes and top keys per minute, a week)
//! dashboard (the web page at / of the metrics address) ─► aggregate::State (and its
//!   history), alerts
//! ```
//!
//! Imports run one way: `model` ◄ `aggregate` ◄ `detect` ◄ `alerts` ◄ `sinks`; each section of
//! the config is defined beside what it configures and [`config::Config`] gathers them, with
//! one error type ([`config_error::ConfigError`]) that every section's `validate()` returns.
//!
//! Start one in-process with [`server::Server::start`]; drive the protocol without a network
//! with [`collector::Collector::session`].
// The fuzz targets run without AddressSanitizer (xtask/src/fuzz.rs): that holds while this
// crate has no unsafe code.
#![forbid(unsafe_code)]
pub mod aggregate;
pub mod alerts;
pub mod alerts_service;
pub mod auth;
pub mod budget;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod collector;
pub mod config;
pub mod config_error;
pub mod crash;
pub mod dashboard;
pub mod detect;
pub mod detection;
pub mod error;
pub mod feed;
pub mod feed_service;
pub mod history;
pub mod ingest;
pub mod journal;
pub mod keys;
pub mod links;
pub mod metrics;
pub mod model;
pub mod query;
pub mod ratelimit;
pub mod server;
pub mod sinks;
pub mod store;
pub mod systemd;
pub mod top_clients;
pub mod watch;
pub mod window;
pub mod writer;

pub use config::Config;
pub use server::Server;
