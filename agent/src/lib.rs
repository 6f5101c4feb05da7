//! outflow's host agent: loads the kernel programs that count every TCP connection's bytes,
//! reads the connection table each interval and turns it into per-connection deltas.
//!
//! Modules, one concern each:
//! - [`config`]: the TOML file, command-line overrides, validation.
//! - [`kernel`]: environment checks, loading, pinning and adopting kernel state, attaching.
//! - [`table`]: the memory-mapped connection table: deltas, closes, giving slots back.
//! - [`enrich`]: cgroup paths and process names for the records.
//! - [`filter`]: which connections are reported.
//! - [`record`]: the records the agent emits, and their JSON and text forms.
//! - [`agent`]: the read loop that ties them together.
pub mod agent;
pub mod config;
pub mod enrich;
pub mod filter;
pub mod kernel;
pub mod record;
pub mod table;
