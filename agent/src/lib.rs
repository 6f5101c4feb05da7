//! outflow's host agent: loads the kernel programs that count every TCP connection's bytes,
//! reads the connection table each interval and turns it into per-connection deltas.
//!
//! Modules, one concern each:
//! - [`config`]: the TOML file, its defaults, validation (the `outflow-agent-config` crate,
//!   apart so that it can be fuzzed without the eBPF build; command-line overrides are in main.rs).
//! - [`probe`]: what the running kernel and the process offer (features, capabilities), and
//!   what the agent does about it: refuse in one line, run without a part, or go on.
//! - [`mounts`]: where cgroup v2 and bpffs are mounted.
//! - [`kernel`]: environment checks, loading, pinning and adopting kernel state, attaching.
//! - [`table`]: the memory-mapped connection table: deltas, closes, giving slots back.
//! - [`enrich`]: cgroup paths and process names for the records.
//! - [`filter`]: which connections are reported.
//! - [`record`]: the records the agent emits, and their JSON and text forms.
//! - [`durability`]: the read loop's step that keeps an interval before it is committed.
//! - [`agent`]: the read loop that ties them together.
//! - [`metrics`]: the HTTP endpoint: Prometheus metrics, liveness, readiness.
//! - [`crash`]: crash points the fault suite arms to kill the agent at chosen places.
//!
//! Export to a collector (`outflow.v1.Ingest`), when one is configured:
//! - [`identity`]: the agent id, host name, boot id.
//! - [`durable_file`]: small files written all or nothing (the agent id, the epoch, the spool's).
//! - [`random`]: random numbers from the kernel (the agent id, the epoch).
//! - [`wire`]: records to wire types, at the edge.
//! - [`spool`]: the bounded disk spool of batches and the sequence state (epoch, seq).
//! - [`sender`]: the task that streams the spool to the collector, with backoff.
//! - [`export`]: settings checked at start, the durability step that spools each interval,
//!   shutdown.
pub mod agent;
pub mod attribution;
pub mod crash;
pub mod durability;
pub mod durable_file;
pub mod enrich;
pub mod export;
pub mod filter;
pub mod identity;
pub mod kernel;
pub mod metrics;
pub mod mounts;
pub mod probe;
pub mod random;
pub mod record;
pub mod sender;
pub mod spool;
pub mod table;
pub mod wire;

pub use outflow_agent_config as config;
