//! The benchmark eBPF object (`agent-ebpf/src/bench.rs`): outflow's programs and maps plus the
//! test-run drivers, built by build.rs like the agent's own object.
use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader};

/// The object file, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/outflow-bench"));

/// Loads the object (creates its maps; programs are loaded by name when used) with the
/// connection table, its free-slot stack and the tuple map sized for `conns` connections.
pub fn load(conns: u32) -> Result<Ebpf> {
    let conns = conns.max(1);
    EbpfLoader::new()
        .map_max_entries(agent_common::names::CONNS, conns)
        .map_max_entries(agent_common::names::FREE_SLOTS, conns)
        .map_max_entries(agent_common::names::LEGACY, conns)
        .map_max_entries(agent_common::bench::TUPLES, conns)
        .load(OBJECT)
        .context("loading the benchmark eBPF object")
}
