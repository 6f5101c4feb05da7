//! Many agents against one collector: `outflow-fleet` runs N instances of the agent's export
//! pipeline (identity, disk spool, sender with exponential backoff and full jitter) in one
//! process, each fed one synthetic connection, and [`FleetProcess`] drives it. N real agents
//! would each load the kernel programs; this keeps everything from the durability step on real.
//!
//! Agent `i` is the server side of one connection from [`client_addr`]`(i)`. Its state and
//! spool live under `--base-dir/agent-<i>/` (a [`Tmpfs`] here: the spool fsyncs every
//! interval, which a real disk does too slowly for hundreds of agents).
//!
//! What the binary prints on stdout, one [`FleetLine`] a line:
//! - `{"type":"progress",...}` ([`Progress`]) every 500 ms;
//! - after SIGTERM, SIGINT or the end of its stdin it stops making traffic, waits until every
//!   agent's spool is empty (all acknowledged), prints `{"type":"done",...}` ([`Done`]) and
//!   exits 0; or prints `{"type":"error","message":...}` and exits 1 (also when the spools do
//!   not empty within 120 s).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::faults::tmpfs::Tmpfs;
use crate::lines::JsonLines;
use crate::process::{CapturedText, ChildProcess};

/// Path of the `outflow-fleet` binary, for [`FleetProcess::start`].
///
/// Only usable in integration tests of this package, where cargo builds the binary and sets
/// `CARGO_BIN_EXE_outflow-fleet`.
#[macro_export]
macro_rules! fleet_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_outflow-fleet"))
    };
}

/// Most agents one fleet runs: as many as [`client_addr`] has addresses for.
pub const MAX_AGENTS: usize = 250 * 256;

/// How long the fleet may take to start all its agents and print its first progress line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`FleetProcess::finish`] waits: the fleet's own 120 s for the spools to empty,
/// and some.
const FINISH_TIMEOUT: Duration = Duration::from_secs(150);

/// The client address of agent `i`: `10.64.(i / 250).(i % 250 + 1)` (no `.0`, no `.255`), so
/// that each agent's bytes are one client's in the collector.
pub fn client_addr(i: usize) -> Ipv4Addr {
    assert!(i < MAX_AGENTS, "agent {i}: at most {MAX_AGENTS} agents");
    Ipv4Addr::new(10, 64, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// One line of the fleet's stdout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum FleetLine {
    /// The state of the agents, every 500 ms.
    Progress(Progress),
    /// The last line of a fleet that stopped with every spool empty.
    Done(Done),
    /// The last line of a fleet that failed.
    Error {
        /// What failed.
        message: String,
    },
}

/// The agents' state, from the export record each agent's spooler reported last (the agents are
/// polled every 100 ms, so this is at most that much behind).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Unix milliseconds at which it was taken.
    pub ts_ms: u64,
    /// Agents in the fleet.
    pub agents: usize,
    /// Agents with a stream open to the collector (its Welcome received).
    pub connected: usize,
    /// Connected agents whose spool holds at most one batch not yet acknowledged (the newest
    /// interval's): they have caught up with their backlog.
    pub caught_up: usize,
    /// Batches in the spools, not yet acknowledged.
    pub spooled_batches: u64,
    /// The sum of the agents' highest acknowledged seqs: the batches acknowledged so far (each
    /// agent's new state directory numbers its batches from 1).
    pub acked_batches: u64,
    /// Batches the spools dropped (full), and their response bytes.
    pub lost_batches: u64,
    /// Response bytes of those batches.
    pub lost_bytes_out: u64,
    /// Intervals a spool could not take (disk full) and left to a later one.
    pub deferred_intervals: u64,
    /// Response bytes the agents' connections carried so far (the ground truth).
    pub sent_bytes_out: u64,
    /// Request bytes likewise.
    pub sent_bytes_in: u64,
    /// Times an agent that had been connected became connected again.
    pub reconnects: u64,
    /// Of the connected agents: when the first and the last of them connected (Unix ms; 0 if
    /// none is).
    pub connected_since_min_ms: u64,
    /// See `connected_since_min_ms`.
    pub connected_since_max_ms: u64,
    /// Of the caught-up agents: when the last of them caught up (Unix ms; 0 if none has).
    pub caught_up_since_max_ms: u64,
    /// The fleet was told to stop: no more traffic, waiting for the spools to empty.
    pub stopping: bool,
}

/// What the fleet sent and what became of it, once every spool is empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// Agents in the fleet.
    pub agents: usize,
    /// Response bytes of all the agents' connections (the ground truth).
    pub sent_bytes_out: u64,
    /// Request bytes likewise.
    pub sent_bytes_in: u64,
    /// Response bytes per agent: element `i` is [`client_addr`]`(i)`'s.
    pub sent_bytes_out_by_agent: Vec<u64>,
    /// Request bytes per agent.
    pub sent_bytes_in_by_agent: Vec<u64>,
    /// Batches the spools dropped (full), reported to the collector as lost.
    pub lost_batches: u64,
    /// Response bytes of those batches.
    pub lost_bytes_out: u64,
    /// Intervals a spool could not take and left to a later one.
    pub deferred_intervals: u64,
    /// Times an agent that had been connected became connected again.
    pub reconnects: u64,
    /// From the stop until every spool was empty, milliseconds.
    pub drain_ms: u64,
}

/// A running `outflow-fleet` on a tmpfs of its own. Killed (SIGKILL) when dropped if still
/// running; its stdin stays open until then, and it stops by itself if the test process dies.
pub struct FleetProcess {
    process: ChildProcess,
    output: Arc<JsonLines<FleetLine>>,
    stderr: CapturedText,
    agents: usize,
    // After `process`: unmounted once the fleet is gone.
    _base: Tmpfs,
}

impl FleetProcess {
    /// Starts `bin` (pass [`crate::fleet_bin!()`]) with `agents` agents streaming to
    /// `collector_url`, each making one interval of traffic every `interval`, and waits for its
    /// first progress line.
    pub fn start(bin: &Path, collector_url: &str, agents: usize, interval: Duration) -> Self {
        // A tmpfs is charged for what it holds only: room for a long outage's spools.
        let base = Tmpfs::new("fleet", (64 << 20) + agents as u64 * (1 << 20));
        let mut command = Command::new(bin);
        command
            .args(["--collector", collector_url])
            .args(["--agents", &agents.to_string()])
            .args(["--base-dir", base.as_arg()])
            .args(["--interval", &format!("{}ms", interval.as_millis())])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let process = ChildProcess::spawn("outflow-fleet", &mut command);
        let stderr = CapturedText::capture(
            "outflow-fleet",
            process
                .take_stderr()
                .expect("stderr of outflow-fleet is piped"),
        );
        let output = JsonLines::spawn(
            "fleet-stdout",
            process
                .take_stdout()
                .expect("stdout of outflow-fleet is piped"),
            None,
        );
        let fleet = Self {
            process,
            output,
            stderr,
            agents,
            _base: base,
        };
        fleet.wait_progress("its first progress line", START_TIMEOUT, |_| true);
        fleet
    }

    /// Agents in the fleet.
    pub fn agents(&self) -> usize {
        self.agents
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Every progress line so far, in order.
    pub fn progress(&self) -> Vec<Progress> {
        self.output
            .items()
            .into_iter()
            .filter_map(|l| match l {
                FleetLine::Progress(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    /// Waits until `condition` holds for the latest progress line and returns that line.
    /// Panics, with the fleet's stderr, on timeout, if the fleet fails or exits first.
    pub fn wait_progress(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut(&Progress) -> bool,
    ) -> Progress {
        let lines = self
            .output
            .wait_until(timeout, |lines| {
                error_of(lines).is_some() || last_progress(lines).is_some_and(&mut condition)
            })
            .unwrap_or_else(|e| self.fail(&format!("waiting for {what}: {e}")));
        if let Some(message) = error_of(&lines) {
            self.fail(&format!("waiting for {what}: the fleet failed: {message}"));
        }
        last_progress(&lines)
            .cloned()
            .expect("the condition held for a progress line")
    }

    /// Waits until at least `n` agents are connected.
    pub fn wait_connected(&self, n: usize, timeout: Duration) -> Progress {
        self.wait_progress(&format!("{n} agents connected"), timeout, |p| {
            p.connected >= n
        })
    }

    /// Stops the fleet (SIGTERM): no more traffic; waits until it has every spool empty and
    /// exited, and returns its [`Done`] line. Panics if it fails or does not exit in time.
    pub fn finish(&self) -> Done {
        self.process.signal(Signal::SIGTERM);
        let Some(status) = self.process.wait_timeout(FINISH_TIMEOUT) else {
            self.process.kill();
            self.fail(&format!(
                "it did not exit within {FINISH_TIMEOUT:?} of SIGTERM"
            ));
        };
        let lines = self
            .output
            .wait_closed(Duration::from_secs(10))
            .unwrap_or_else(|e| self.fail(&format!("reading its last lines: {e}")));
        self.stderr.wait_closed(Duration::from_secs(10));
        if let Some(message) = error_of(&lines) {
            self.fail(&format!("it failed ({status}): {message}"));
        }
        if !status.success() {
            self.fail(&format!("it exited with {status}"));
        }
        lines
            .iter()
            .rev()
            .find_map(|l| match l {
                FleetLine::Done(d) => Some(d.clone()),
                _ => None,
            })
            .unwrap_or_else(|| self.fail("it exited without a done line"))
    }

    fn fail(&self, what: &str) -> ! {
        let last = last_progress(&self.output.items()).cloned();
        panic!(
            "outflow-fleet: {what}; its last progress: {last:?}\nits stderr:\n{}",
            self.stderr.tail(40)
        )
    }
}

fn last_progress(lines: &[FleetLine]) -> Option<&Progress> {
    lines.iter().rev().find_map(|l| match l {
        FleetLine::Progress(p) => Some(p),
        _ => None,
    })
}

fn error_of(lines: &[FleetLine]) -> Option<&str> {
    lines.iter().find_map(|l| match l {
        FleetLine::Error { message } => Some(message.as_str()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_distinct_hosts() {
        assert_eq!(client_addr(0), Ipv4Addr::new(10, 64, 0, 1));
        assert_eq!(client_addr(249), Ipv4Addr::new(10, 64, 0, 250));
        assert_eq!(client_addr(250), Ipv4Addr::new(10, 64, 1, 1));
        assert_eq!(client_addr(MAX_AGENTS - 1), Ipv4Addr::new(10, 64, 255, 250));
        let all: std::collections::BTreeSet<Ipv4Addr> = (0..MAX_AGENTS).map(client_addr).collect();
        assert_eq!(all.len(), MAX_AGENTS);
    }

    #[test]
    fn lines_round_trip_with_their_type() {
        let p = FleetLine::Progress(Progress {
            agents: 3,
            connected: 2,
            ..Progress::default()
        });
        let text = serde_json::to_string(&p).expect("serialize");
        assert!(text.starts_with(r#"{"type":"progress","#), "{text}");
        assert_eq!(serde_json::from_str::<FleetLine>(&text).expect("parse"), p);
        let e: FleetLine =
            serde_json::from_str(r#"{"type":"error","message":"x"}"#).expect("parse");
        assert_eq!(
            e,
            FleetLine::Error {
                message: "x".into()
            }
        );
        let d = FleetLine::Done(Done {
            sent_bytes_out_by_agent: vec![1, 2],
            ..Done::default()
        });
        let text = serde_json::to_string(&d).expect("serialize");
        assert!(text.starts_with(r#"{"type":"done","#), "{text}");
        assert_eq!(serde_json::from_str::<FleetLine>(&text).expect("parse"), d);
    }
}
