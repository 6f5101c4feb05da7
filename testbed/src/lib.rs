//! Network namespaces and cgroups for outflow's kernel tests, benchmarks and demo.
//!
//! Everything here needs root and a Linux kernel with cgroup2 and network namespaces. Each
//! piece is an RAII guard that cleans up when dropped, also while a test panics, and gets a
//! name unique to its process so that tests can run in parallel; the first guard of a kind
//! in a process removes what killed processes left:
//!
//! - [`cgroup::TestCgroup`]: a child cgroup of the cgroup2 mount.
//! - [`netns::NetnsPair`]: a server and a client network namespace joined by a veth pair.
//! - [`netns::NetnsIsland`]: a network namespace joined to the caller's, that can be cut off.
//! - [`ports::free_port`]: a port on loopback for a server killed and started again on it.
//! - [`tools`]: the checkers and peers that are not Rust (promtool, the tools venv's Python).
//! - [`nats::NatsCluster`]: a NATS JetStream cluster of real `nats-server` processes on
//!   loopback, whose nodes can be killed and started again (and one cut off from the others).
//! - [`webhook::Receiver`]: a webhook receiver on loopback that keeps what it was POSTed.
//!
//! The constructors panic with a message saying what failed, as test code wants; each has a
//! `try_` twin that returns the error instead, for tools (xtask's demo).

#![warn(missing_docs)]

pub mod cgroup;
pub mod nats;
pub mod netns;
pub mod ports;
pub mod tools;
pub mod wait;
pub mod webhook;

use std::{
    os::unix::process::CommandExt as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

/// A number unique within this process, for names of kernel objects.
pub fn next_serial() -> u32 {
    static SERIAL: AtomicU32 = AtomicU32::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

/// Keeps the characters of `tag` that are safe in file and interface names, at most `max` of them.
pub fn sanitize_tag(tag: &str, max: usize) -> String {
    tag.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(max)
        .collect()
}

/// Whether this process runs as root (its effective uid, from `/proc/self/status`).
pub fn is_root() -> std::io::Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .ok_or_else(|| std::io::Error::other("no effective uid in /proc/self/status"))?;
    Ok(euid == "0")
}

/// Whether a process with this pid exists, for sweeping objects left by killed runs.
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Makes the process `command` starts get SIGKILL when the thread that spawns it exits
/// (`PR_SET_PDEATHSIG`), so that a test or demo killed halfway (Ctrl-C, a timeout) leaves no
/// daemon behind. Spawn from a thread that lives as long as the process should: the main
/// thread, a test's thread, a runtime's worker (not a blocking-pool thread, which exits when
/// idle).
pub fn die_with_parent(command: &mut Command) {
    // SAFETY: the hook makes one async-signal-safe system call.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
