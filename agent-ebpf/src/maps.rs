//! The maps, shared by all programs. Sizes here are defaults: the agent sets the connection
//! table's size at load time, and pins every map so that a restarted agent adopts them.
use agent_common::{
    AgentState, ConnHot, ConnSlot, Counters, KernelConfig, STAT_COUNT, SkState, SlotRef, TurnEvent,
};
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::btf_map,
};

/// Default capacity of the connection table; the agent overrides it (`max_connections`).
const TABLE: usize = 65536;

/// The connection table, memory-mapped by the agent.
#[btf_map]
pub static CONNS: Array<ConnSlot, TABLE, { BPF_F_MMAPABLE as usize }> = Array::new();

/// The connections' hot lines (what the packet path touches), indexed like [`CONNS`],
/// memory-mapped by the agent.
#[btf_map]
pub static CONN_HOT: Array<ConnHot, TABLE, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Claimed slot numbers (the value is unused). A new connection claims a free slot by inserting
/// its number with `BPF_NOEXIST`, which fails for all but one CPU; the agent removes the number
/// after it has reported the closed connection's last counts and reset the slot. Preallocated
/// (about 64 bytes per slot): an insert then never fails for want of memory, which a burst of
/// connections in softirq context makes happen to an allocating map.
#[btf_map]
pub static SLOT_CLAIMS: HashMap<u32, u32, TABLE> = HashMap::new();

/// Connections that predate the agent, by socket address, so the close tracepoint can find
/// their slot.
#[btf_map]
pub static LEGACY: HashMap<u64, SlotRef, TABLE, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Bytes of connections that found the table full.
#[btf_map]
pub static OVERFLOW: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// Event counters, indexed by `agent_common::stat`.
#[btf_map]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

/// Turn and annotation events of accepted connections, for client attribution (bytes; the
/// agent may set another power-of-two size at load time).
#[btf_map]
pub static EVENTS: RingBuf<TurnEvent, { 8 << 20 }> = RingBuf::new();

/// Where an event is put together before it is copied into [`EVENTS`] at its real length
/// (a ring buffer reservation has a constant size: 4 KiB for every request would hold ten
/// times fewer requests).
#[btf_map]
pub static EVENT_SCRATCH: PerCpuArray<TurnEvent, 1> = PerCpuArray::new();

/// Where the packet path turns its socket pointer into a number ([`crate::programs`]'s
/// `sock_key`): the verifier lets a privileged program store a pointer into a map value but
/// not compute with it.
#[btf_map]
pub static SOCK_KEY: PerCpuArray<u64, 1> = PerCpuArray::new();

/// The ring buffer's map pointer, for the helpers aya-ebpf does not wrap.
#[inline(always)]
pub fn events_ptr() -> *mut core::ffi::c_void {
    (&raw const EVENTS).cast_mut().cast()
}

/// Runtime settings, written by the agent.
#[btf_map]
pub static CONFIG: Array<KernelConfig, 1> = Array::new();

/// The agent's bookkeeping (no program uses it; it is here so that it is created and pinned
/// with the rest).
#[btf_map]
pub static AGENT_STATE: Array<AgentState, 1> = Array::new();

/// Socket local storage map definition (BTF-defined; aya-ebpf's own `SkStorage` only takes a
/// sock_addr context, and the per-packet path has a `bpf_sock`).
#[repr(C)]
pub struct SkStorageDef<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}
// SAFETY: placeholder pointers patched by the loader, never dereferenced.
unsafe impl<T> Sync for SkStorageDef<T> {}

/// Per-socket state: the connection's slot and sequence watermarks. Freed with the socket.
#[btf_map]
pub static SK_STATE: SkStorageDef<SkState> = SkStorageDef {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
};

/// The socket's state; with `init`, created from it when absent.
#[inline(always)]
pub fn sk_state<S>(sk: *mut S, init: Option<&SkState>) -> *mut SkState {
    let map = (&raw const SK_STATE).cast_mut().cast();
    let (value, flags) = match init {
        Some(v) => (
            core::ptr::from_ref(v).cast_mut(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        ),
        None => (core::ptr::null_mut(), 0),
    };
    // SAFETY: `sk` is a socket pointer the verifier has typed; the map is a socket storage map.
    unsafe { bpf_sk_storage_get(map, sk.cast(), value.cast(), flags).cast() }
}

/// Frees the socket's state now (it would otherwise go with the socket).
#[inline(always)]
pub fn sk_state_delete<S>(sk: *mut S) {
    let map = (&raw const SK_STATE).cast_mut().cast();
    // SAFETY: as in `sk_state`.
    unsafe { bpf_sk_storage_delete(map, sk.cast()) };
}
