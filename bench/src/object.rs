//! The benchmark eBPF object (`agent-ebpf/src/bench.rs`): outflow's programs and maps, the
//! reference flow-map program and the test-run drivers, built by build.rs like the agent's own
//! object.
use agent_common::KernelConfig;
use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData},
    programs::CgroupSkb,
};

/// The object file, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/outflow-bench"));

/// Slots of the connection table for `conns` live connections: twice as many, the headroom the
/// agent's documentation asks for (a new connection finds a free slot in its home group), and a
/// multiple of the placement group.
pub fn table_slots(conns: u32) -> u32 {
    (conns.max(1) * 2).next_multiple_of(agent_common::SLOT_GROUP)
}

/// Writes the kernel programs' settings for a table of [`table_slots`]`(conns)` slots:
/// loopback counted (the benchmark's connections are loopback), `capture_bytes` per turn.
pub fn configure_kernel(ebpf: &mut Ebpf, conns: u32, capture_bytes: u32) -> Result<()> {
    let mut config: Array<&mut MapData, KernelConfig> = Array::try_from(
        ebpf.map_mut(agent_common::names::CONFIG)
            .context("config map missing")?,
    )?;
    let kc = KernelConfig {
        exclude_loopback: 0,
        capture_bytes,
        slot_groups: table_slots(conns) / agent_common::SLOT_GROUP,
        _pad: 0,
    };
    config.set(0, kc, 0)?;
    Ok(())
}

/// Loads the object with the connection table and its claims sized by [`table_slots`], and the
/// tuple map and the reference's flow map sized for `conns` connections. This creates every map of the object
/// (the ring buffer at the product's default size included); programs are loaded by name when
/// used ([`load_programs`]), so the product's other programs (sock_ops, the tracepoint, the
/// setsockopt annotation) are never loaded here.
pub fn load(conns: u32) -> Result<Ebpf> {
    let conns = conns.max(1);
    EbpfLoader::new()
        .map_max_entries(agent_common::names::CONNS, table_slots(conns))
        .map_max_entries(agent_common::names::CONN_HOT, table_slots(conns))
        .map_max_entries(agent_common::names::SLOT_CLAIMS, table_slots(conns))
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
