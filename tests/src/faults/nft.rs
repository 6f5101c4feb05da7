//! Network faults on one TCP port of this host, by nftables: random loss, resets, a partition.
//!
//! Each [`Nft`] is a table of its own (`inet outflow-fault-<pid>-<serial>`), on this host or in
//! a network namespace, whose two chains match only packets of its port: those to it on the
//! input hook, those from it on the output hook, so that each packet is matched once also
//! between two sockets of one host (loopback packets pass both hooks). Other traffic is
//! untouched.

use std::io::Write as _;
use std::process::{Command, Stdio};

/// What happens to the port's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetFault {
    /// Nothing: every packet passes.
    Heal,
    /// Each packet, in either direction, is dropped with this probability in percent (1-99).
    Loss(u8),
    /// Every packet toward the port is answered with a TCP reset (connections and connection
    /// attempts fail at once); packets from it are dropped.
    Reset,
    /// Every packet is dropped: connections hang and new ones time out.
    Partition,
}

/// An nftables table that applies a [`NetFault`] to one TCP port. Deleted on drop.
pub struct Nft {
    table: String,
    port: u16,
    /// The network namespace the table is in (this host's if None).
    netns: Option<String>,
    /// Whether the port is a local one there (a listener: packets to it come in) or the
    /// remote end's (packets from it come in).
    local: bool,
}

impl Nft {
    /// A table for the local `port` of a listener on this host, passing everything.
    pub fn new(port: u16) -> Self {
        sweep_stale();
        Self::create(port, None, true)
    }

    /// A table in the network namespace `netns` (removed with it) for the traffic of its
    /// connections to `port` of another namespace, passing everything: what comes from that
    /// port is dropped on arrival, after it left the other namespace.
    pub fn in_netns_to(netns: &str, port: u16) -> Self {
        Self::create(port, Some(netns.to_owned()), false)
    }

    fn create(port: u16, netns: Option<String>, local: bool) -> Self {
        let table = format!(
            "outflow-fault-{}-{}",
            std::process::id(),
            crate::next_serial()
        );
        let nft = Self {
            table,
            port,
            netns,
            local,
        };
        nft.apply(&format!(
            "table inet {t} {{\n  chain input {{ type filter hook input priority -10; policy accept; }}\n  chain output {{ type filter hook output priority -10; policy accept; }}\n}}\n",
            t = nft.table
        ));
        nft
    }

    /// Replaces the fault in force.
    pub fn set(&self, fault: NetFault) {
        let (t, p) = (&self.table, self.port);
        // Packets coming in match the port as their destination (a local port) or source.
        let (inp, out) = if self.local {
            ("dport", "sport")
        } else {
            ("sport", "dport")
        };
        let rules = match fault {
            NetFault::Heal => String::new(),
            NetFault::Loss(pct) => {
                assert!((1..=99).contains(&pct), "loss {pct}% is not in 1-99");
                format!(
                    "add rule inet {t} input tcp {inp} {p} numgen random mod 100 < {pct} drop\n\
                     add rule inet {t} output tcp {out} {p} numgen random mod 100 < {pct} drop\n"
                )
            }
            NetFault::Reset => format!(
                "add rule inet {t} input tcp {inp} {p} reject with tcp reset\n\
                 add rule inet {t} output tcp {out} {p} drop\n"
            ),
            NetFault::Partition => format!(
                "add rule inet {t} input tcp {inp} {p} drop\n\
                 add rule inet {t} output tcp {out} {p} drop\n"
            ),
        };
        // One transaction: the flushes and the new rules apply together.
        self.apply(&format!(
            "flush chain inet {t} input\nflush chain inet {t} output\n{rules}"
        ));
    }

    /// `nft`, in the table's namespace.
    fn nft(&self) -> Command {
        match &self.netns {
            None => Command::new("nft"),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]);
                c
            }
        }
    }

    fn apply(&self, script: &str) {
        let mut child = self
            .nft()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("run nft (Debian package nftables; `cargo xtask setup` installs it): {e}")
            });
        child
            .stdin
            .take()
            .expect("nft stdin is piped")
            .write_all(script.as_bytes())
            .unwrap_or_else(|e| panic!("write to nft: {e}"));
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("wait for nft: {e}"));
        assert!(
            out.status.success(),
            "nft -f - failed ({}): {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = self
            .nft()
            .args(["delete", "table", "inet", &self.table])
            .stderr(Stdio::null())
            .status();
    }
}

/// Deletes the tables of test processes that no longer run (killed before their drop).
fn sweep_stale() {
    let Ok(out) = Command::new("nft").args(["list", "tables"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.strip_prefix("table inet outflow-fault-") else {
            continue;
        };
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::process_exists(pid) {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &format!("outflow-fault-{name}")])
                .status();
        }
    }
}
