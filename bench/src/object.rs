//! The benchmark eBPF object (`agent-ebpf/src/bench.rs`): outflow's programs and maps, the
//! reference flow-map program and the test-run drivers, built by build.rs like the agent's own
//! object.
use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader, programs::CgroupSkb};

/// The object file, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/outflow-bench"));

/// Loads the object with the connection table, its free-slot stack, the tuple map and the
/// reference's flow map sized for `conns` connections. This creates every map of the object
/// (the ring buffer at the product's default size included); programs are loaded by name when
/// used ([`load_programs`]), so the product's other programs (sock_ops, the tracepoint, the
/// setsockopt annotation) are never loaded here.
pub fn load(conns: u32) -> Result<Ebpf> {
    let conns = conns.max(1);
    EbpfLoader::new()
        .map_max_entries(agent_common::names::CONNS, conns)
        .map_max_entries(agent_common::names::FREE_SLOTS, conns)
        .map_max_entries(agent_common::names::LEGACY, conns)
        .map_max_entries(agent_common::bench::TUPLES, conns)
        .map_max_entries(agent_common::bench::FLOWS, conns)
        .load(OBJECT)
        .context("loading the benchmark eBPF object")
}

/// Loads the cgroup_skb programs `names` of the object into the kernel.
pub fn load_programs(ebpf: &mut Ebpf, names: &[&str]) -> Result<()> {
    for &name in names {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} not in the benchmark object"))?
            .try_into()
            .with_context(|| format!("{name} is not a cgroup_skb program"))?;
        prog.load()
            .with_context(|| format!("loading {name} (see the verifier log with RUST_LOG)"))?;
    }
    Ok(())
}
