//! outflow's kernel programs: count the bytes of every TCP connection in a cgroup.
//!
//! - `count_egress` / `count_ingress` (cgroup_skb): the per-packet path. The socket's address
//!   and ports hash to a group of slots; the hot line whose owner is the socket takes the counts
//!   (socket local storage is the slow way, for a connection's first packets and captures).
//! - `sock_ops`: records the role (server/client) and claims the slot at establishment, and
//!   asks for state callbacks, so that the close marks the slot final.
//! - `sock_close` (raw tracepoint `inet_sock_set_state`): marks the slot final for connections
//!   that were open before the agent attached (sock_ops never saw them), found by socket address.
// Built for the kernel (bpfel-unknown-none, by the agent's build.rs). On the host it only
// type-checks (`cargo check --workspace`, clippy) into an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main, feature(asm_experimental_arch))]

mod maps;
mod packet;
mod programs;
mod runtime;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
