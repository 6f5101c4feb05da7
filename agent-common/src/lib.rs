//! Types shared by the kernel programs (`agent-ebpf`) and the userspace agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, has no `bool` and no implicit padding; each type has a
//! size assertion beside it so the two sides cannot drift apart.
//!
//! # How counting works
//! The per-packet path touches one 64-byte line: the connection's line in the table of hot
//! lines ([`ConnHot`], beside the connection table of [`ConnSlot`]s and indexed alike), which
//! holds its counters, its sequence watermarks and the address of the socket that owns it
//! ([`ConnHot::owner`]). A slot is placed by a hash of
//! that address, in a group of [`SLOT_GROUP`] slots, so the packet path finds it from
//! `skb->sk` alone, without a lookup keyed by the connection and without the socket's local
//! storage ([`SkState`]), which only the cold paths use (a connection's first packet, its
//! turns, its close, and slots that could not be placed in their group). The table is a
//! memory-mapped array: the agent reads every slot's counters without a system call and
//! writes back, into the same slot, what it has reported. The kernel claims a slot (an
//! insert into [`names::SLOT_CLAIMS`] that fails if another CPU got there first) and only the
//! agent gives it back, after it has reported a closed connection's final counts, so nothing
//! counted is ever thrown away by the kernel.
#![no_std]

/// Cumulative per-connection counters. Used for the kernel's counts, for what the agent has
/// reported (its watermark), and for the overflow totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// L4 payload bytes sent: the advance of the highest sequence number sent (retransmissions
    /// are not counted twice).
    pub bytes_out: u64,
    /// L4 payload bytes received: the advance of the highest sequence number received.
    pub bytes_in: u64,
    /// IP bytes sent, headers of every segment included (a GSO skb counts one header per segment).
    pub wire_bytes_out: u64,
    /// IP bytes received, headers of every segment included.
    pub wire_bytes_in: u64,
    /// TCP segments sent (retransmissions included).
    pub segments_out: u64,
    /// TCP segments received.
    pub segments_in: u64,
}
const _: () = assert!(size_of::<Counters>() == 48);

impl Counters {
    /// Field-wise `self - earlier`, wrapping (counters are monotonic, so this is the delta).
    #[must_use]
    pub const fn delta_since(&self, earlier: &Self) -> Self {
        Self {
            bytes_out: self.bytes_out.wrapping_sub(earlier.bytes_out),
            bytes_in: self.bytes_in.wrapping_sub(earlier.bytes_in),
            wire_bytes_out: self.wire_bytes_out.wrapping_sub(earlier.wire_bytes_out),
            wire_bytes_in: self.wire_bytes_in.wrapping_sub(earlier.wire_bytes_in),
            segments_out: self.segments_out.wrapping_sub(earlier.segments_out),
            segments_in: self.segments_in.wrapping_sub(earlier.segments_in),
        }
    }

    /// Field-wise wrapping sum.
    #[must_use]
    pub const fn plus(&self, other: &Self) -> Self {
        Self {
            bytes_out: self.bytes_out.wrapping_add(other.bytes_out),
            bytes_in: self.bytes_in.wrapping_add(other.bytes_in),
            wire_bytes_out: self.wire_bytes_out.wrapping_add(other.wire_bytes_out),
            wire_bytes_in: self.wire_bytes_in.wrapping_add(other.wire_bytes_in),
            segments_out: self.segments_out.wrapping_add(other.segments_out),
            segments_in: self.segments_in.wrapping_add(other.segments_in),
        }
    }

    #[must_use]
    pub const fn is_zero(&self) -> bool {
        self.bytes_out == 0
            && self.bytes_in == 0
            && self.wire_bytes_out == 0
            && self.wire_bytes_in == 0
            && self.segments_out == 0
            && self.segments_in == 0
    }
}

/// [`ConnSlot::state`]: the slot is free (unclaimed).
pub const SLOT_FREE: u32 = 0;
/// [`ConnSlot::state`]: a live connection owns the slot.
pub const SLOT_LIVE: u32 = 1;
/// [`ConnSlot::state`]: the connection closed; its counters are final. The agent reports them
/// and gives the slot back.
pub const SLOT_CLOSED: u32 = 2;

/// [`ConnSlot::role`] and [`SkState::role`]: open before the agent attached.
pub const ROLE_UNKNOWN: u8 = 0;
/// The socket was accepted (passive open).
pub const ROLE_SERVER: u8 = 1;
/// The socket connected (active open).
pub const ROLE_CLIENT: u8 = 2;

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// What the per-packet path reads and writes of one connection: one cache line, in a table of
/// its own ([`names::CONN_HOT`], indexed like the connection table), so that the lines the
/// packets touch lie as close together as they can.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnHot {
    /// Address of the socket that counts here, `|` the [`OWNER_FLAGS`] bits (the address is at
    /// least 8-byte aligned); 0 in its address part while no packet path may use the slot (not
    /// yet published, or closed). Only kernel programs read it as an address.
    pub owner: u64,
    /// Cumulative counts since the connection was first seen.
    pub counters: Counters,
    /// One past the highest sequence number sent (the egress watermark).
    pub snd_max: u32,
    /// One past the highest sequence number received.
    pub rcv_max: u32,
}
const _: () = assert!(size_of::<ConnHot>() == 64);

/// The rest of one connection's slot in the connection table: three 64-byte cache lines, each
/// with one writer pattern, none of them touched per packet.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct ConnSlot {
    // Line 1, written by the agent (the state also by the kernel, when it takes or closes the
    // slot): what the agent reads of every slot at every interval.
    /// Counters the agent has already reported (its watermark): the next delta is
    /// `ConnHot::counters - reported`. Lives in the kernel so a restarted agent neither repeats
    /// nor loses.
    pub reported: Counters,
    /// Generation of the slot, bumped by the agent each time it frees the slot; the socket's
    /// [`SkState::generation`] must match it for the kernel's cold paths to write here.
    pub generation: u32,
    /// [`SLOT_FREE`], [`SLOT_LIVE`] or [`SLOT_CLOSED`]; written last when a slot is taken.
    pub state: u32,
    /// `CLOCK_BOOTTIME` nanoseconds at which the agent last saw this slot's counters change.
    pub last_seen_ns: u64,

    // Line 2, written once by the kernel when the slot is taken.
    /// `CLOCK_BOOTTIME` nanoseconds at which the connection was first seen.
    pub first_seen_ns: u64,
    /// Id of the socket's cgroup v2 (the inode number of its directory).
    pub cgroup_id: u64,
    /// Local address; IPv4 in the first four bytes when `family` is [`AF_INET`].
    pub local_addr: [u8; 16],
    /// Remote address, as `local_addr`.
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// [`AF_INET`] or [`AF_INET6`] (an IPv6 socket may carry v4-mapped addresses).
    pub family: u16,
    /// [`ROLE_UNKNOWN`], [`ROLE_SERVER`] or [`ROLE_CLIENT`].
    pub role: u8,
    pub _pad1: u8,
    /// The kernel's socket cookie: unique per connection for the boot.
    pub cookie: u64,

    // Line 3, written by the kernel once per turn (request).
    /// Number of the connection's latest turn (see [`TurnEvent`]), written when it starts, after
    /// its event is submitted and before any byte after it is counted; 0 = none yet.
    pub turn: u32,
    /// Number of the latest turn whose start event the ring buffer had no room for (0 = none):
    /// the agent cannot know who the bytes after that turn's start belong to.
    pub lost_turn: u32,
    pub _pad2: [u64; 7],
}
const _: () = assert!(size_of::<ConnSlot>() == 192);
const _: () = assert!(core::mem::offset_of!(ConnSlot, generation) == 48);
const _: () = assert!(core::mem::offset_of!(ConnSlot, first_seen_ns) == 64);
const _: () = assert!(core::mem::offset_of!(ConnSlot, turn) == 128);

/// Slots per placement group: a socket's slot is one of the [`SLOT_GROUP`] slots of the group
/// its address hashes to (its *home*), or, when those are taken, one found further on, which
/// the packet path then reaches through the socket's storage. The table's capacity is a
/// multiple of it.
pub const SLOT_GROUP: u32 = 8;
/// Groups after its home that a new connection looks through for a free slot before it
/// overflows.
pub const SLOT_PLACE_GROUPS: u32 = 16;

/// [`ConnHot::owner`] bits: the connection's turns are captured (an accepted connection,
/// capture on).
pub const OWNER_CAPTURE: u64 = 1;
/// [`ConnHot::owner`] bits: the next incoming payload starts a turn (set at establishment and
/// by every outgoing payload of a captured connection).
pub const OWNER_AWAIT_TURN: u64 = 2;
/// [`ConnHot::owner`] bits: the current turn's first bytes are still being captured.
pub const OWNER_CAPTURING: u64 = 4;
/// Every flag bit of [`ConnHot::owner`].
pub const OWNER_FLAGS: u64 = 7;

/// The home group of a socket at address `key` with ports `ports` (both ports, as the packet
/// path reads them from the socket) in a table of `groups` groups: a multiplicative hash,
/// reduced to the range by a multiply-shift (no power-of-two size needed). The ports are in it
/// because the kernel hands a closed socket's memory to the next socket at once: by address
/// alone, a burst of short connections would all go to the same few groups.
#[inline(always)]
#[must_use]
pub const fn home_group(key: u64, ports: u32, groups: u32) -> u32 {
    let h = (((key >> 3) ^ ports as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32;
    ((h as u64 * groups as u64) >> 32) as u32
}

/// `SkState::slot` values that are not slot numbers.
pub mod slot {
    /// Seen in the handshake by sock_ops; no slot taken yet (the first packet takes one).
    pub const UNALLOCATED: u32 = u32::MAX;
    /// The table was full: this connection's bytes go to the overflow counters.
    pub const OVERFLOW: u32 = u32::MAX - 1;
    /// Not counted by configuration (loopback).
    pub const IGNORED: u32 = u32::MAX - 2;
}

/// `SkState::flags`: the highest sequence number sent has been seen (a socket without a slot:
/// a slot keeps its own watermarks, set when it is taken).
pub const SK_SND_INIT: u32 = 1;
/// `SkState::flags`: the highest sequence number received has been seen (as above).
pub const SK_RCV_INIT: u32 = 2;
/// `SkState::flags`: the slot's `cgroup_id` is still to be written (by the first packet: sock_ops
/// cannot read a socket's cgroup).
pub const SK_NEED_CGROUP: u32 = 4;

/// Per-socket state kept in socket local storage (freed with the socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SkState {
    /// Slot number in the connection table, or one of [`slot`]'s values.
    pub slot: u32,
    /// Generation of the slot when it was taken.
    pub generation: u32,
    /// One past the highest sequence number sent (a socket without a slot; a slot keeps its
    /// own, [`ConnHot::snd_max`]).
    pub snd_max: u32,
    /// One past the highest sequence number received (as above).
    pub rcv_max: u32,
    /// [`SK_SND_INIT`] | [`SK_RCV_INIT`] | [`SK_NEED_CGROUP`].
    pub flags: u32,
    /// Role as set by sock_ops (0 for connections that predate the agent).
    pub role: u32,
    /// Number of the current turn (0: none yet).
    pub turn: u32,
    /// Bytes of the current turn still to be captured (0: not capturing).
    pub capture_left: u32,
}
const _: () = assert!(size_of::<SkState>() == 32);

impl SkState {
    /// The state of a socket that has no slot yet.
    #[must_use]
    pub const fn new(role: u8) -> Self {
        Self {
            slot: slot::UNALLOCATED,
            generation: 0,
            snd_max: 0,
            rcv_max: 0,
            flags: 0,
            role: role as u32,
            turn: 0,
            capture_left: 0,
        }
    }
}

/// A connection's addresses and ports, as its slot records them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<TupleKey>() == 40);

/// Where a connection's counts are: the value of `LEGACY`, which finds the slot of a connection
/// that predates the agent, by socket address, when the `inet_sock_set_state` tracepoint says
/// it closed (sock_ops cannot see those closes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotRef {
    pub slot: u32,
    pub generation: u32,
}
const _: () = assert!(size_of::<SlotRef>() == 8);

/// Indexes of the per-CPU event counters ([`STAT_COUNT`] of them) the kernel keeps for
/// everything that did not go the normal way. The agent reports them.
pub mod stat {
    /// Connections that found the table full: their bytes went to the overflow counters.
    pub const CONNS_OVERFLOWED: u32 = 0;
    /// Overflowed connections that have since closed.
    pub const OVERFLOW_CLOSED: u32 = 1;
    /// Connections that predate the agent and could not be registered for close tracking.
    pub const LEGACY_UNTRACKED: u32 = 2;
    /// Packets whose headers could not be parsed (counted by length into the wire counters only).
    pub const UNPARSED_PACKETS: u32 = 3;
    /// Packets of a socket whose slot had been given back (stale generation): counted in overflow.
    pub const STALE_SLOT: u32 = 4;
    /// Turn events (start or continuation) the ring buffer had no room for.
    pub const TURN_EVENTS_LOST: u32 = 5;
    /// Annotations the ring buffer had no room for.
    pub const ANNOTATIONS_LOST: u32 = 6;
    /// Annotations on a socket without a slot (not counted, overflowed, or not TCP).
    pub const ANNOTATIONS_UNTRACKED: u32 = 7;
    /// Connections whose slot is outside their home group (it was full): their packets find
    /// the slot through the socket's storage, the slower way.
    pub const PLACED_AWAY: u32 = 8;
    /// Slots whose owner was a socket gone without its close being seen (found and cleared when
    /// a new socket at the same address took a slot).
    pub const STALE_OWNERS: u32 = 9;
}
pub const STAT_COUNT: u32 = 10;

/// Runtime settings of the kernel programs, in a one-element array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelConfig {
    /// Non-zero: connections whose remote address is loopback are not counted.
    pub exclude_loopback: u32,
    /// Bytes captured at the start of each turn of an accepted connection, at most
    /// [`CAPTURE_MAX`]; 0 = no capture.
    pub capture_bytes: u32,
    /// Placement groups of the connection table (its capacity / [`SLOT_GROUP`]).
    pub slot_groups: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<KernelConfig>() == 16);

/// Layout version of the pinned state; an agent refuses to adopt state of another layout.
pub const STATE_LAYOUT: u32 = 4;

/// Most bytes captured per turn (the data size of a [`TurnEvent`]).
pub const CAPTURE_MAX: usize = 4096;

/// [`TurnEvent::kind`]: a turn starts; `at` holds the counters before its first byte, `data`
/// the first bytes of the turn.
pub const EVENT_TURN: u16 = 1;
/// [`TurnEvent::kind`]: more bytes of the turn (the first packet carried fewer than the
/// capture size); `data` continues where the previous event of the turn stopped.
pub const EVENT_MORE: u16 = 2;
/// [`TurnEvent::kind`]: the serving application annotated its socket
/// (`setsockopt(fd, SOL_OUTFLOW, OUTFLOW_CLIENT_ID, value)`); `at` holds the counters at that
/// moment, `data` the value.
pub const EVENT_ANNOTATION: u16 = 3;

/// The private socket option level of the annotation API.
pub const SOL_OUTFLOW: i32 = 0x4f46;
/// Option name: the client id of what the socket sends from now on.
pub const OUTFLOW_CLIENT_ID: i32 = 1;
/// Longest annotation value kept.
pub const ANNOTATION_MAX: usize = 256;

/// One event of the ring buffer, from the kernel to the agent, about an accepted connection.
///
/// A *turn* starts when the client side sends payload after the server side has sent payload
/// (or at the connection's first payload): on HTTP/1.x keep-alive, one request. The agent reads
/// from its first bytes who the client is (PROXY header, request headers) and splits the
/// connection's counts at `at`: what was counted before belongs to the previous client.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TurnEvent {
    /// The connection's slot and its generation.
    pub slot: u32,
    pub generation: u32,
    /// Number of the turn on this connection (the first is 1).
    pub turn: u32,
    /// [`EVENT_TURN`], [`EVENT_MORE`] or [`EVENT_ANNOTATION`].
    pub kind: u16,
    /// Bytes of `data` that are valid.
    pub len: u16,
    /// The connection's counters just before the turn's first byte (or the annotation).
    pub at: Counters,
    pub data: [u8; CAPTURE_MAX],
}
const _: () = assert!(size_of::<TurnEvent>() == 64 + CAPTURE_MAX);

/// The agent's own bookkeeping, kept in a pinned one-element map that no kernel program
/// touches (bpffs holds no regular files).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AgentState {
    /// [`STATE_LAYOUT`] of the agent that created the pinned state.
    pub layout: u32,
    /// Non-zero once the state is set up and the programs may be attached.
    pub ready: u32,
    /// cgroup id (inode) of the directory the programs are attached to.
    pub cgroup_id: u64,
    /// Overflow counters already reported.
    pub overflow_reported: Counters,
}
const _: () = assert!(size_of::<AgentState>() == 64);

/// Types of the benchmark object (`agent-ebpf/src/bench.rs`, driven by `outflow-bench`), which
/// runs the per-packet path with BPF_PROG_TEST_RUN on real sockets it looks up.
pub mod bench {
    /// A live connection as `bpf_sk_lookup_tcp` takes it (`struct bpf_sock_tuple`, IPv4), from
    /// the point of view of a packet arriving at the server: addresses and ports in network
    /// order.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct LookupTuple {
        pub saddr: u32,
        pub daddr: u32,
        pub sport: u16,
        pub dport: u16,
    }
    const _: () = assert!(size_of::<LookupTuple>() == 12);

    /// Which connection each run picks.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct BenchConfig {
        /// Connections in the tuple map (runs pick among the first `conns`).
        pub conns: u32,
        /// [`PICK_RANDOM`] or [`PICK_SEQUENTIAL`].
        pub pick: u32,
    }
    const _: () = assert!(size_of::<BenchConfig>() == 8);

    /// Each run picks a connection at random (`bpf_get_prandom_u32`).
    pub const PICK_RANDOM: u32 = 0;
    /// Each run takes the next connection, to touch every one once.
    pub const PICK_SEQUENTIAL: u32 = 1;

    /// The test packet's addresses and ports (a server, 127.0.0.1:10000, sending to a client,
    /// 127.1.0.0:20000). The flow-map driver parses the packet and then swaps these for the
    /// picked connection's, so that each run counts a flow of a live connection.
    pub const PACKET_SERVER_ADDR: [u8; 4] = [127, 0, 0, 1];
    pub const PACKET_CLIENT_ADDR: [u8; 4] = [127, 1, 0, 0];
    pub const PACKET_SERVER_PORT: u16 = 10_000;
    pub const PACKET_CLIENT_PORT: u16 = 20_000;

    /// Key of the reference program's flow map (`agent-ebpf/src/reference.rs`): the flow as
    /// the packet's IP and L4 headers name it, and the direction, as flow-monitoring agents
    /// key their maps. An IPv4 address is stored IPv4-mapped (`::ffff:a.b.c.d`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct FlowKey {
        pub src_addr: [u8; 16],
        pub dst_addr: [u8; 16],
        /// Ports in network order (0 for protocols without ports).
        pub src_port: u16,
        pub dst_port: u16,
        /// IP protocol number.
        pub protocol: u8,
        /// [`FLOW_INGRESS`] or [`FLOW_EGRESS`].
        pub direction: u8,
        pub _pad: u16,
    }
    const _: () = assert!(size_of::<FlowKey>() == 40);

    /// [`FlowKey::direction`] of packets the cgroup receives.
    pub const FLOW_INGRESS: u8 = 0;
    /// [`FlowKey::direction`] of packets the cgroup sends.
    pub const FLOW_EGRESS: u8 = 1;

    /// Value of the reference program's flow map; both counters are bumped with atomic adds.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FlowCounters {
        /// IP bytes (`skb->len`), as flow agents count them.
        pub bytes: u64,
        /// skbs (a GSO skb counts once).
        pub packets: u64,
    }
    const _: () = assert!(size_of::<FlowCounters>() == 16);

    /// Indexes of the reference program's per-CPU event counters ([`FLOW_STAT_COUNT`]).
    pub mod flow_stat {
        /// Flows created (first sight, `BPF_NOEXIST` insert that succeeded).
        pub const NEW_FLOWS: u32 = 0;
        /// Packets of a new flow that found the map full (not counted).
        pub const MAP_FULL: u32 = 1;
        /// Packets whose headers could not be parsed (not counted).
        pub const UNPARSED: u32 = 2;
    }
    pub const FLOW_STAT_COUNT: u32 = 3;

    /// Map names of the benchmark object.
    pub const TUPLES: &str = "BENCH_TUPLES";
    pub const CONFIG: &str = "BENCH_CONFIG";
    pub const CURSOR: &str = "BENCH_CURSOR";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_STATS: &str = "FLOW_STATS";
}

/// Names of the maps, as the loader and the pins see them.
pub mod names {
    pub const CONNS: &str = "CONNS";
    /// The connections' hot lines ([`crate::ConnHot`]), indexed like [`CONNS`].
    pub const CONN_HOT: &str = "CONN_HOT";
    /// Claimed slot numbers: a new connection takes a slot by inserting its number (an insert
    /// that fails when another CPU claimed it first); the agent removes it when it frees the slot.
    pub const SLOT_CLAIMS: &str = "SLOT_CLAIMS";
    pub const SK_STATE: &str = "SK_STATE";
    pub const LEGACY: &str = "LEGACY";
    pub const OVERFLOW: &str = "OVERFLOW";
    pub const STATS: &str = "STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const AGENT_STATE: &str = "AGENT_STATE";
    pub const EVENTS: &str = "EVENTS";
    /// Every map, for pinning.
    pub const ALL: [&str; 10] = [
        CONNS,
        CONN_HOT,
        SLOT_CLAIMS,
        SK_STATE,
        LEGACY,
        OVERFLOW,
        STATS,
        CONFIG,
        AGENT_STATE,
        EVENTS,
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        AgentState, ConnHot, ConnSlot, Counters, KernelConfig, SkState, SlotRef, TupleKey,
    };
    // SAFETY: all are repr(C), Copy, without padding or invalid bit patterns.
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for ConnSlot {}
    unsafe impl aya::Pod for ConnHot {}
    unsafe impl aya::Pod for SkState {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for SlotRef {}
    unsafe impl aya::Pod for KernelConfig {}
    unsafe impl aya::Pod for AgentState {}
    unsafe impl aya::Pod for super::bench::LookupTuple {}
    unsafe impl aya::Pod for super::bench::BenchConfig {}
    unsafe impl aya::Pod for super::bench::FlowKey {}
    unsafe impl aya::Pod for super::bench::FlowCounters {}
}
