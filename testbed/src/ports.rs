//! TCP ports on 127.0.0.1 for servers that are killed and started again on the same port.
//!
//! A port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999 by
//! default) can be drawn as the source port of a client reconnecting to it while its server
//! is down, and a connection from a port to itself succeeds (TCP simultaneous open): the
//! server started again could not bind it. So the ports come from 30000-32699, below that
//! range, each handed out once in a process, from a place that depends on the process id
//! (processes running side by side rarely meet), and only if nothing holds it now.
use std::{
    net::{Ipv4Addr, TcpListener},
    sync::atomic::{AtomicU16, Ordering},
};

const FIRST: u16 = 30_000;
const COUNT: u16 = 2_700;

/// A TCP port free on 127.0.0.1 now, below the ephemeral range, not handed out before in this
/// process. Panics if none is free.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 1_000) as u16 * 2;
    for _ in 0..COUNT {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = FIRST + (start + offset) % COUNT;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free TCP port in {FIRST}-{} on 127.0.0.1",
        FIRST + COUNT - 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_handed_out_twice() {
        let ports: Vec<u16> = (0..100).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|p| (FIRST..FIRST + COUNT).contains(p)));
    }
}
