//! The reference for the benchmarks: per-flow counting as a user would otherwise deploy it,
//! the design of flow-monitoring agents (NetObserv's eBPF agent keeps its `aggregated_flows`
//! this way). Only in the benchmark object, never in the product.
//!
//! Per packet: parse the IP and L4 headers for the flow's tuple (the socket is not used), look
//! the tuple up in a BPF hash map, and add the packet to its counters; a flow seen for the first
//! time is inserted with `BPF_NOEXIST`. The map is a shared (not per-CPU) `BPF_MAP_TYPE_HASH`
//! and the counters are bumped with atomic adds, as NetObserv's agent does today: one flow's
//! packets are handled on several CPUs at once (the sending thread's, the softirq's of each
//! receive queue), so plain adds would lose counts, and a per-CPU hash multiplies the map's
//! memory by the number of CPUs (and its reader's work, summing every CPU's copy), which at a
//! million flows on a large host is the bigger cost. An uncontended atomic add costs a few
//! nanoseconds more than a plain one. The map is preallocated (NetObserv's is not), so a new
//! flow takes an element from a free list instead of allocating one.
//!
//! Left out, so the reference is if anything cheaper than the real agents: the clock read per
//! packet for first/last-seen times, TCP flags, interface bookkeeping, sampling, filters, and
//! eviction of closed flows.

use agent_common::bench::{
    FLOW_EGRESS, FLOW_INGRESS, FLOW_STAT_COUNT, FlowCounters, FlowKey, flow_stat,
};
use aya_ebpf::{
    bindings::{__sk_buff, BPF_NOEXIST},
    btf_maps::{HashMap, PerCpuArray},
    macros::{btf_map, cgroup_skb},
    programs::SkBuffContext,
};

const ALLOW: i32 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Default capacity; `outflow-bench` sizes the map for each run's connections at load.
const FLOWS_MAX: usize = 65536;

/// The flows, preallocated (no `BPF_F_NO_PREALLOC`): no allocation on first sight.
#[btf_map]
pub static FLOWS: HashMap<FlowKey, FlowCounters, FLOWS_MAX> = HashMap::new();

/// Event counters, indexed by `agent_common::bench::flow_stat`.
#[btf_map]
pub static FLOW_STATS: PerCpuArray<u64, { FLOW_STAT_COUNT as usize }> = PerCpuArray::new();

#[cgroup_skb]
pub fn flowhash_egress(ctx: SkBuffContext) -> i32 {
    if let Some((key, bytes)) = flow_of(ctx.skb.skb, FLOW_EGRESS) {
        account(&key, bytes);
    }
    ALLOW
}

#[cgroup_skb]
pub fn flowhash_ingress(ctx: SkBuffContext) -> i32 {
    if let Some((key, bytes)) = flow_of(ctx.skb.skb, FLOW_INGRESS) {
        account(&key, bytes);
    }
    ALLOW
}

/// The packet's flow and its IP bytes, from its headers (cgroup_skb data starts at the IP
/// header). `None` (counted as unparsed) for what is not IPv4 or IPv6 with readable headers.
#[inline(always)]
pub fn flow_of(skb: *mut __sk_buff, direction: u8) -> Option<(FlowKey, u64)> {
    // SAFETY: `skb` is the program's context.
    let (len, data, data_end) =
        unsafe { ((*skb).len, (*skb).data as usize, (*skb).data_end as usize) };
    let key = parse(data, data_end, direction);
    if key.is_none() {
        bump(flow_stat::UNPARSED);
    }
    Some((key?, u64::from(len)))
}

#[inline(always)]
fn parse(data: usize, data_end: usize, direction: u8) -> Option<FlowKey> {
    let mut key = FlowKey {
        direction,
        ..FlowKey::default()
    };
    // The smallest IP header (a one-byte check would become `data >= data_end`, which the
    // verifier does not take as a bound).
    if data + 20 > data_end {
        return None;
    }
    // SAFETY: every read below is bounds-checked against data_end first (the verifier checks
    // it too).
    let l4 = unsafe {
        match *(data as *const u8) >> 4 {
            4 => {
                let ihl = usize::from(*(data as *const u8) & 0x0f) * 4;
                if ihl < 20 {
                    return None;
                }
                key.protocol = *((data + 9) as *const u8);
                // IPv4-mapped: ::ffff:a.b.c.d
                key.src_addr[10] = 0xff;
                key.src_addr[11] = 0xff;
                key.dst_addr[10] = 0xff;
                key.dst_addr[11] = 0xff;
                copy4(&mut key.src_addr, data + 12);
                copy4(&mut key.dst_addr, data + 16);
                data + ihl
            }
            6 => {
                if data + 40 > data_end {
                    return None;
                }
                // Extension headers are not walked, as in the flow agents.
                key.protocol = *((data + 6) as *const u8);
                key.src_addr = core::ptr::read_unaligned((data + 8) as *const [u8; 16]);
                key.dst_addr = core::ptr::read_unaligned((data + 24) as *const [u8; 16]);
                data + 40
            }
            _ => return None,
        }
    };
    if key.protocol == IPPROTO_TCP || key.protocol == IPPROTO_UDP {
        if l4 + 4 > data_end {
            return None;
        }
        // SAFETY: bounds checked just above.
        unsafe {
            key.src_port = core::ptr::read_unaligned(l4 as *const u16);
            key.dst_port = core::ptr::read_unaligned((l4 + 2) as *const u16);
        }
    }
    Some(key)
}

/// Four bytes of the packet at `at` into the IPv4-mapped address `dst`.
///
/// # Safety
/// `at..at + 4` must be within the packet (checked against data_end).
#[inline(always)]
unsafe fn copy4(dst: &mut [u8; 16], at: usize) {
    // SAFETY: the caller's bounds check.
    let b = unsafe { core::ptr::read_unaligned(at as *const [u8; 4]) };
    dst[12] = b[0];
    dst[13] = b[1];
    dst[14] = b[2];
    dst[15] = b[3];
}

/// Adds one packet of `bytes` to the flow `key`: look up, else insert (`BPF_NOEXIST`); if
/// another CPU inserted it in between, look up again.
#[inline(always)]
pub fn account(key: &FlowKey, bytes: u64) {
    if let Some(v) = FLOWS.get_ptr_mut(key) {
        add(v, bytes);
        return;
    }
    let first = FlowCounters { bytes, packets: 1 };
    match FLOWS.insert(key, first, u64::from(BPF_NOEXIST)) {
        Ok(()) => bump(flow_stat::NEW_FLOWS),
        Err(_) => match FLOWS.get_ptr_mut(key) {
            Some(v) => add(v, bytes),
            None => bump(flow_stat::MAP_FULL),
        },
    }
}

#[inline(always)]
fn add(v: *mut FlowCounters, bytes: u64) {
    // SAFETY: a pointer to a value of the hash map, checked by the lookup.
    unsafe {
        atomic_add(&raw mut (*v).bytes, bytes);
        atomic_add(&raw mut (*v).packets, 1);
    }
}

/// `*p += v` atomically (BPF_ATOMIC | BPF_ADD, `lock *(u64 *)(p) += v`: the result is unused,
/// so it needs no BPF_FETCH).
///
/// # Safety
/// `p` must point to a u64 of a map value.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: the caller's pointer.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, v,
        );
    }
    // The host build only type-checks this crate.
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: the caller's pointer.
    unsafe {
        core::sync::atomic::AtomicU64::from_ptr(p)
            .fetch_add(v, core::sync::atomic::Ordering::Relaxed);
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(v) = FLOW_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU array value: only this CPU writes it.
        unsafe { *v += 1 };
    }
}
