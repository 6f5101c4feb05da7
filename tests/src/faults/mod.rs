//! The fault suite's tools: faults to inject between an agent and its collector, and the
//! ledger every fault run ends with.
//!
//! - [`nft::Nft`]: an nftables table of its own that drops, resets or partitions the TCP
//!   traffic of one port on this host (loss by `numgen random`), removed on drop.
//! - [`proxy::FaultProxy`]: a TCP proxy that delays or stalls what it forwards (what nftables
//!   cannot do: this kernel has no `sch_netem`).
//! - [`tmpfs::Tmpfs`]: a small tmpfs to fill up and grow again.
//! - [`fleet::FleetProcess`]: hundreds of agents' export pipelines in one process
//!   (`outflow-fleet`), for faults that hit a whole fleet at once.
//! - [`Row`]: bytes sent (what the clients received), bytes in the collector, lost as
//!   reported, and what that leaves: lost silently and counted twice, both of which must be 0.
//!
//! `OUTFLOW_FAULTS=full` selects the long runs of `cargo xtask faults` ([`Scale::Full`]); the
//! short ones run in `cargo xtask test`. Each row is printed and, with `OUTFLOW_FAULTS_TABLE`
//! set to a file, appended to it as a line of a Markdown table.

pub mod fleet;
pub mod nft;
pub mod proxy;
pub mod tmpfs;

use std::fs::OpenOptions;
use std::io::Write as _;
use std::time::Duration;

/// Environment variable that selects the long runs (`full`).
pub const SCALE_ENV: &str = "OUTFLOW_FAULTS";
/// Environment variable naming a file each row is appended to.
pub const TABLE_ENV: &str = "OUTFLOW_FAULTS_TABLE";

/// How long and how often each fault is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    /// Inside `cargo xtask test`: each fault briefly.
    Short,
    /// `cargo xtask faults`: what the issue asks (a one-minute partition, 50 kills, ...).
    Full,
}

impl Scale {
    /// [`Scale::Full`] if `OUTFLOW_FAULTS=full`, else [`Scale::Short`].
    pub fn from_env() -> Self {
        match std::env::var(SCALE_ENV) {
            Ok(v) if v == "full" => Self::Full,
            _ => Self::Short,
        }
    }

    /// `short` or `full`, by scale.
    pub fn pick<T>(self, short: T, full: T) -> T {
        match self {
            Self::Short => short,
            Self::Full => full,
        }
    }
}

/// The header of the table [`Row::line`] makes lines of.
pub const TABLE_HEADER: &str = "| fault | bytes sent | bytes in the collector | of which unattributed | lost (reported) | lost (silent) | double-counted | recovery |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

/// One fault run, compared with the ground truth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// What was done, e.g. `loss 30% for 30 s`.
    pub fault: String,
    /// Response bytes the clients received (the ground truth).
    pub sent: u64,
    /// Response bytes the collector holds (per client, plus unattributed).
    pub collected: u64,
    /// Of `collected`: bytes the agent counted without a connection slot (its table was full),
    /// held by the collector per host, not per client.
    pub unattributed: u64,
    /// Bytes reported lost (agent spool full, as the collector was told).
    pub lost_reported: u64,
    /// From the end of the fault until the collector held everything.
    pub recovery: Duration,
}

impl Row {
    /// Bytes neither in the collector nor reported lost.
    pub fn lost_silent(&self) -> u64 {
        self.sent
            .saturating_sub(self.collected.saturating_add(self.lost_reported))
    }

    /// Bytes the collector and the loss reports hold beyond what was sent.
    pub fn double_counted(&self) -> u64 {
        self.collected
            .saturating_add(self.lost_reported)
            .saturating_sub(self.sent)
    }

    /// The row as a line of the table under [`TABLE_HEADER`].
    pub fn line(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            self.fault,
            self.sent,
            self.collected,
            self.unattributed,
            self.lost_reported,
            self.lost_silent(),
            self.double_counted(),
            self.recovery.as_secs_f64()
        )
    }

    /// Prints the row, appends it to `$OUTFLOW_FAULTS_TABLE` if set, and panics if anything
    /// was lost silently or counted twice.
    pub fn report(&self) {
        let line = self.line();
        eprintln!("{TABLE_HEADER}\n{line}");
        if let Some(path) = std::env::var_os(TABLE_ENV) {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.to_string_lossy()));
            writeln!(f, "{line}")
                .unwrap_or_else(|e| panic!("write {}: {e}", path.to_string_lossy()));
        }
        assert_eq!(self.lost_silent(), 0, "bytes lost silently: {line}");
        assert_eq!(self.double_counted(), 0, "bytes counted twice: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_loss_and_double_counts_are_what_the_reports_do_not_explain() {
        let row = |collected, lost_reported| Row {
            fault: "x".into(),
            sent: 100,
            collected,
            unattributed: 0,
            lost_reported,
            recovery: Duration::ZERO,
        };
        assert_eq!(
            (row(100, 0).lost_silent(), row(100, 0).double_counted()),
            (0, 0)
        );
        assert_eq!(
            (row(70, 30).lost_silent(), row(70, 30).double_counted()),
            (0, 0)
        );
        assert_eq!(
            (row(60, 30).lost_silent(), row(60, 30).double_counted()),
            (10, 0)
        );
        assert_eq!(
            (row(90, 30).lost_silent(), row(90, 30).double_counted()),
            (0, 20)
        );
    }
}
