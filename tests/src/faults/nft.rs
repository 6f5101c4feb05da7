//! Network faults on one TCP port of this host, by nftables: random loss, resets, a partition.
//!
//! Each [`Nft`] is a table of its own (`inet outflow-fault-<pid>-<serial>`) whose one chain,
//! on the input hook, matches only packets to or from its port: other traffic of the host
//! (loopback included) is untouched. Packets between two local sockets pass the input hook
//! once per direction, so one chain covers both directions.

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
}

impl Nft {
    /// A table for `port`, passing everything.
    pub fn new(port: u16) -> Self {
        let table = format!(
            "outflow-fault-{}-{}",
            std::process::id(),
            crate::next_serial()
        );
        sweep_stale();
        let nft = Self { table, port };
        nft.apply(&format!(
            "table inet {t} {{\n  chain input {{ type filter hook input priority -10; policy accept; }}\n}}\n",
            t = nft.table
        ));
        nft
    }

    /// Replaces the fault in force.
    pub fn set(&self, fault: NetFault) {
        let (t, p) = (&self.table, self.port);
        let rules = match fault {
            NetFault::Heal => String::new(),
            NetFault::Loss(pct) => {
                assert!((1..=99).contains(&pct), "loss {pct}% is not in 1-99");
                format!(
                    "add rule inet {t} input tcp dport {p} numgen random mod 100 < {pct} drop\n\
                     add rule inet {t} input tcp sport {p} numgen random mod 100 < {pct} drop\n"
                )
            }
            NetFault::Reset => format!(
                "add rule inet {t} input tcp dport {p} reject with tcp reset\n\
                 add rule inet {t} input tcp sport {p} drop\n"
            ),
            NetFault::Partition => format!(
                "add rule inet {t} input tcp dport {p} drop\n\
                 add rule inet {t} input tcp sport {p} drop\n"
            ),
        };
        // One transaction: the flush and the new rules apply together.
        self.apply(&format!("flush chain inet {t} input\n{rules}"));
    }

    fn apply(&self, script: &str) {
        let mut child = Command::new("nft")
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
        let _ = Command::new("nft")
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
