//! Integration-test harness for outflow.
//!
//! Everything here needs root and a Linux kernel with cgroup2 and network namespaces. Each
//! piece is an RAII guard that cleans up when dropped, also while a test panics, and gets a
//! name unique to its process and test so that tests can run in parallel:
//!
//! - [`cgroup::TestCgroup`]: a child cgroup of the cgroup2 mount.
//! - [`netns::NetnsPair`]: a server and a client network namespace joined by a veth pair.
//! - [`peer::Server`]: the `outflow-testpeer` binary serving inside the server namespace and
//!   the test cgroup; [`peer::Client`] makes requests from inside the client namespace.
//! - [`agent::Agent`]: the `outflow-agent` binary under test, its JSON records collected.
//! - [`cluster_agent::RealAgent`]: a real agent and its traffic beside the cluster demo's
//!   simulated fleet.
//! - [`collector::Collector`]: the `outflow-collector` binary under test, and its queries.
//! - [`records`]: sums of the agent's per-connection deltas.
//! - [`http`]: an HTTP/1.1 streaming server and a load of many clients with ids
//!   (`outflow-testpeer http-serve` / `http-load`), and a ledger of who got which bytes.
//! - [`gateway::Nginx`], [`gateway::Haproxy`]: real gateways between those clients and the
//!   server, in the client namespace.
//!
//! Failures panic with a message saying what failed: this is test code.

#![warn(missing_docs)]

pub mod agent;
pub mod cluster_agent;
pub mod collector;
pub mod faults;
pub mod gateway;
pub mod http;
mod lines;
pub mod peer;
pub mod process;
pub mod protocol;
pub mod records;

// The namespace and cgroup guards are a crate of their own, outside the agent's eBPF build,
// for users that must build before the eBPF toolchain is installed (xtask).
pub use outflow_testbed::{cgroup, is_root, netns, tools, wait};

pub(crate) use outflow_testbed::{next_serial, process_exists, sanitize_tag};

/// Path of the `outflow-testpeer` binary, for [`peer::Server::start`].
///
/// Only usable in integration tests and benches of this package, where cargo builds the binary
/// and sets `CARGO_BIN_EXE_outflow-testpeer`.
#[macro_export]
macro_rules! testpeer_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_outflow-testpeer"))
    };
}
