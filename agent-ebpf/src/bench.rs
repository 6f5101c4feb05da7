//! The benchmark object: outflow's own programs and maps (the `programs` module, the same source
//! as the product object) plus cgroup_skb programs that `outflow-bench packet` runs with
//! BPF_PROG_TEST_RUN.
//!
//! A test run hands the program a dummy socket, not a connection, so these programs first pick
//! a live connection (at random, or the next one) from `BENCH_TUPLES` and find its socket with
//! `bpf_sk_lookup_tcp`, as the network stack would have. Each stage is its own program, so the
//! cost of each is the difference of two of them, measured side by side:
//!
//! - `bench_empty`: nothing (the floor the issue names);
//! - `bench_lookup`: pick + socket lookup + release (what the stack pays anyway);
//! - `bench_state`: + the socket-storage lookup;
//! - `bench_count`: + the whole per-packet path, `programs::count`, exactly as `count_egress`
//!   runs it.
#![cfg_attr(target_arch = "bpf", no_std, no_main, feature(asm_experimental_arch))]

mod maps;
mod packet;
mod programs;
mod runtime;

use agent_common::bench::{BenchConfig, LookupTuple, PICK_SEQUENTIAL};
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
        core::hint::black_box(maps::sk_state(sk, None));
    });
    ALLOW
}

#[cgroup_skb]
pub fn bench_count(ctx: SkBuffContext) -> i32 {
    with_socket(&ctx, programs::count::<true>);
    ALLOW
}

/// Picks a connection, finds its socket, runs `f` on it, and releases it.
#[inline(always)]
fn with_socket(ctx: &SkBuffContext, f: impl FnOnce(*mut __sk_buff, *mut bpf_sock)) {
    let Some(cfg) = BENCH_CONFIG.get(0) else {
        return;
    };
    if cfg.conns == 0 {
        return;
    }
    let index = if cfg.pick == PICK_SEQUENTIAL {
        let Some(cursor) = BENCH_CURSOR.get_ptr_mut(0) else {
            return;
        };
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
    let Some(tuple) = BENCH_TUPLES.get_ptr_mut(index) else {
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
    f(skb, sk);
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
