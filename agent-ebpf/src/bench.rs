//! The benchmark object: outflow's own programs and maps (the `programs` module, the same source
//! as the product object), a reference program that counts per flow in a hash map as flow
//! agents do (`reference`), and cgroup_skb programs that `outflow-bench` runs with
//! BPF_PROG_TEST_RUN.
//!
//! A test run hands the program a dummy socket, not a connection, so these programs first pick
//! a live connection (at random, or the next one) from `BENCH_TUPLES` and find its socket with
//! `bpf_sk_lookup_tcp`, as the network stack would have. Each stage is its own program, so the
//! cost of each is the difference of two of them, measured side by side:
//!
//! - `bench_empty`: nothing (the floor any cgroup_skb program pays);
//! - `bench_lookup`: pick + socket lookup + release (what the stack pays anyway);
//! - `bench_state`: + finding the connection's slot from its socket (`programs::find_slot`:
//!   the socket's address, hashed to its home group, whose slots' owners are compared);
//! - `bench_count`: + the whole per-packet path, `programs::count`, exactly as `count_egress`
//!   runs it;
//! - `bench_flowhash`: pick + socket lookup + release, the socket unused, + the reference's
//!   per-packet path (`reference::flow_of` and `reference::account`, as `flowhash_egress` runs
//!   them), the packet's tuple swapped for the picked connection's after parsing so that each
//!   run counts a live connection's flow.
//!
//! The capture drivers run the ingress path (`programs::count::<false>`, as `count_ingress`
//! runs it) on an accepted connection with capture on, after setting the socket's state as a
//! new payload would find it: `bench_rx_prep` only sets it; `bench_rx` sets it mid-request (the
//! fast path: no turn starts); `bench_rx_turn` sets it as after a response, so that the packet
//! starts a turn and is captured into the ring buffer.
#![cfg_attr(
    target_arch = "bpf",
    no_std,
    no_main,
    feature(asm_experimental_arch, core_intrinsics),
    expect(
        internal_features,
        reason = "core_intrinsics: atomic_xadd for the reference's atomic adds (the bpf target \
                  has no AtomicU64::fetch_add)"
    )
)]

mod maps;
mod packet;
mod programs;
mod reference;
mod runtime;

use agent_common::{
    OWNER_AWAIT_TURN, OWNER_CAPTURE, OWNER_FLAGS,
    bench::{
        BenchConfig, FLOW_EGRESS, FlowKey, LookupTuple, PACKET_CLIENT_ADDR, PACKET_CLIENT_PORT,
        PACKET_SERVER_ADDR, PACKET_SERVER_PORT, PICK_SEQUENTIAL,
    },
};
use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock, bpf_sock_tuple},
    btf_maps::Array,
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::{btf_map, cgroup_skb},
    programs::SkBuffContext,
};

const ALLOW: i32 = 1;
/// `BPF_F_CURRENT_NETNS`: look the socket up in the caller's network namespace.
const CURRENT_NETNS: u64 = u64::MAX;

/// The live connections to pick from; `outflow-bench` sizes and fills it.
#[btf_map]
static BENCH_TUPLES: Array<LookupTuple, 1> = Array::new();

#[btf_map]
static BENCH_CONFIG: Array<BenchConfig, 1> = Array::new();

/// Position of sequential picking. Not per CPU: a long test run may move between CPUs.
#[btf_map]
static BENCH_CURSOR: Array<u32, 1> = Array::new();

#[cgroup_skb]
pub fn bench_empty(_ctx: SkBuffContext) -> i32 {
    ALLOW
}

#[cgroup_skb]
pub fn bench_lookup(ctx: SkBuffContext) -> i32 {
    with_socket(&ctx, |_, _| {});
    ALLOW
}

#[cgroup_skb]
pub fn bench_state(ctx: SkBuffContext) -> i32 {
    // Kept, so that the compiler does not drop the lookup.
    with_socket(&ctx, |_, sk| {
        let groups = maps::CONFIG.get(0).map_or(0, |c| c.slot_groups);
        let (key, ports) = (programs::sock_key(sk), programs::sock_ports(sk));
        core::hint::black_box(programs::find_slot(key, ports, groups).is_some());
    });
    ALLOW
}

#[cgroup_skb]
pub fn bench_count(ctx: SkBuffContext) -> i32 {
    with_socket(&ctx, programs::count::<true>);
    ALLOW
}

#[cgroup_skb]
pub fn bench_flowhash(ctx: SkBuffContext) -> i32 {
    // The socket is not used: it is looked up only so that this driver pays what
    // `bench_lookup` pays and leaves the caches as the stack's lookup would.
    with_picked_socket(&ctx, |skb, _, tuple| {
        if let Some((mut key, bytes)) = reference::flow_of(skb, FLOW_EGRESS) {
            readdress(&mut key, tuple);
            reference::account(&key, bytes);
        }
    });
    ALLOW
}

/// The test packet's flow (server to client) becomes the picked connection's: each field is
/// XORed with the test packet's value and the connection's, so the parsed values stay in use.
#[inline(always)]
fn readdress(key: &mut FlowKey, t: &LookupTuple) {
    // The tuple is from the server's point of view of an arriving packet: its source is the
    // client; the test packet goes the other way.
    xor4(&mut key.src_addr, PACKET_SERVER_ADDR, t.daddr);
    xor4(&mut key.dst_addr, PACKET_CLIENT_ADDR, t.saddr);
    key.src_port ^= PACKET_SERVER_PORT.to_be() ^ t.dport;
    key.dst_port ^= PACKET_CLIENT_PORT.to_be() ^ t.sport;
}

/// `addr`'s IPv4 part (bytes 12..16, network order) ^= `was` ^ `now` (network order).
#[inline(always)]
fn xor4(addr: &mut [u8; 16], was: [u8; 4], now: u32) {
    let now = now.to_ne_bytes();
    let mut i = 0;
    while i < 4 {
        addr[12 + i] ^= was[i] ^ now[i];
        i += 1;
    }
}

#[cgroup_skb]
pub fn bench_rx_prep(ctx: SkBuffContext) -> i32 {
    with_socket(&ctx, |skb, sk| {
        prepare_rx(skb, sk, false);
    });
    ALLOW
}

#[cgroup_skb]
pub fn bench_rx(ctx: SkBuffContext) -> i32 {
    with_socket(&ctx, |skb, sk| {
        if prepare_rx(skb, sk, false) {
            programs::count::<false>(skb, sk);
        }
    });
    ALLOW
}

#[cgroup_skb]
pub fn bench_rx_turn(ctx: SkBuffContext) -> i32 {
    with_socket(&ctx, |skb, sk| {
        if prepare_rx(skb, sk, true) {
            programs::count::<false>(skb, sk);
        }
    });
    ALLOW
}

/// Sets the connection's state as the next packet of new payload finds it on a captured
/// connection: capture on, the receive watermark at the packet's sequence number (so the
/// packet's whole payload is new, run after run), and, with `turn`, the server's response just
/// sent (the packet starts a turn); without, the request's capture done (the packet is a later
/// segment: the fast path). False if the socket has no slot (the first pass gives every
/// connection one).
#[inline(always)]
fn prepare_rx(skb: *mut __sk_buff, sk: *mut bpf_sock, turn: bool) -> bool {
    let st = maps::sk_state(sk, None);
    if st.is_null() {
        return false;
    }
    // SAFETY: non-null socket storage pointer returned by the helper.
    let st = unsafe { &mut *st };
    st.capture_left = 0;
    let Some(s) = maps::CONN_HOT.get_ptr_mut(st.slot) else {
        return false;
    };
    // SAFETY: pointer into the hot lines' table, checked by the lookup.
    let s = unsafe { &mut *s };
    let owner = s.owner & !OWNER_FLAGS;
    s.owner = owner | OWNER_CAPTURE | if turn { OWNER_AWAIT_TURN } else { 0 };
    s.rcv_max = packet::parse(skb).seq;
    true
}

/// Picks a live connection from the tuple map: at random, or the next one.
#[inline(always)]
fn pick() -> Option<*mut LookupTuple> {
    let cfg = BENCH_CONFIG.get(0)?;
    if cfg.conns == 0 {
        return None;
    }
    let index = if cfg.pick == PICK_SEQUENTIAL {
        let cursor = BENCH_CURSOR.get_ptr_mut(0)?;
        // SAFETY: a map value; one test run at a time uses it.
        unsafe {
            let i = *cursor % cfg.conns;
            *cursor = i + 1;
            i
        }
    } else {
        // SAFETY: helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        r % cfg.conns
    };
    BENCH_TUPLES.get_ptr_mut(index)
}

/// Picks a connection, finds its socket, runs `f` on it, and releases it.
#[inline(always)]
fn with_socket(ctx: &SkBuffContext, f: impl FnOnce(*mut __sk_buff, *mut bpf_sock)) {
    with_picked_socket(ctx, |skb, sk, _| f(skb, sk));
}

/// [`with_socket`], `f` also given the picked connection's tuple.
#[inline(always)]
fn with_picked_socket(
    ctx: &SkBuffContext,
    f: impl FnOnce(*mut __sk_buff, *mut bpf_sock, &LookupTuple),
) {
    let Some(tuple) = pick() else {
        return;
    };
    let skb = ctx.skb.skb;
    // SAFETY: the tuple is a map value of `bpf_sock_tuple`'s IPv4 layout and size.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            skb.cast(),
            tuple.cast::<bpf_sock_tuple>(),
            size_of::<LookupTuple>() as u32,
            CURRENT_NETNS,
            0,
        )
    };
    if sk.is_null() {
        return;
    }
    // SAFETY: a map value of the tuple map.
    f(skb, sk, unsafe { &*tuple });
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
