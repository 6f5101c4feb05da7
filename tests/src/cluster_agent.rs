//! A real agent beside the cluster demo's simulated fleet ([`outflow_sim::cluster_demo::Beside`]):
//! the kernel program counting real connections between network namespaces, exporting to the
//! cluster's second ingest node (the one the demo kills on the way, so the agent spools until it
//! is back). Used by `tests/tests/cluster_fleet.rs` and by `outflow-cluster-demo` (what
//! `cargo xtask cluster-demo` runs).
//!
//! What it sent is what its clients received and sent, per client address (an IPv4 and an IPv6
//! one), counted by the clients themselves: the ground truth the cluster's totals are compared
//! with, to the byte.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use outflow_sim::{Truth, cluster_demo::Beside};

use crate::{
    agent::{Agent, PinDir, export_args},
    cgroup::TestCgroup,
    collector::TempDir,
    netns::NetnsPair,
    peer::{Server, Traffic},
};

const PORT: u16 = 8000;
/// Responses of a few sizes, small requests.
const SIZES: &[(u64, u64)] = &[(50_000, 100), (200_000, 300), (7, 1), (1_234_567, 50)];

/// A real agent and the real traffic it counts: a server (`outflow-testpeer`) in a cgroup of the
/// server namespace, and a client (an IPv4 and an IPv6 address) requesting from it in a loop.
/// (Fields drop in this order: the traffic, the agent and the server before their namespaces
/// and cgroup.)
pub struct RealAgent {
    traffic: Option<Traffic>,
    agent: Option<Agent>,
    server: Option<Server>,
    pin: PinDir,
    state: TempDir,
    cgroup: TestCgroup,
    pair: NetnsPair,
    testpeer: PathBuf,
}

impl RealAgent {
    /// Creates its namespaces, cgroup and directories (named after `tag`); starts nothing yet.
    /// `testpeer` is the `outflow-testpeer` binary.
    pub fn new(tag: &str, testpeer: PathBuf) -> Self {
        Self {
            traffic: None,
            agent: None,
            server: None,
            pin: PinDir::new(tag),
            state: TempDir::new(&format!("{tag}-agent")),
            cgroup: TestCgroup::new(tag),
            pair: NetnsPair::new(tag),
            testpeer,
        }
    }

    /// What the agent wrote on stderr (empty if it was not started).
    pub fn stderr(&self) -> String {
        self.agent.as_ref().map(Agent::stderr).unwrap_or_default()
    }
}

impl Beside for RealAgent {
    fn start(&mut self, ingest: &[String]) -> anyhow::Result<()> {
        self.server = Some(Server::start(
            &self.testpeer,
            &self.pair,
            &self.cgroup,
            &[PORT],
        ));
        let spool = self.state.path().join("spool");
        let agent = Agent::start(&export_args(
            self.cgroup.as_arg(),
            self.pin.as_arg(),
            ingest.get(1).context("a second ingest node")?,
            self.state.as_arg(),
            spool.to_str().context("utf-8")?,
        ));
        agent.wait_started(Duration::from_secs(60));
        self.agent = Some(agent);
        self.traffic = Some(Traffic::start_paced(
            &self.pair,
            &[self.pair.server_v4(PORT), self.pair.server_v6(PORT)],
            SIZES,
            4,
            2,
            Duration::from_millis(50),
        ));
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<Truth> {
        let outcomes = self.traffic.take().context("started")?.finish();
        let mut truth = Truth::default();
        for o in &outcomes {
            let c = truth.clients.entry(o.local_addr).or_default();
            c.0 += o.received;
            c.1 += o.sent;
        }
        ensure!(truth.clients.len() == 2, "an IPv4 and an IPv6 client");
        let host = truth
            .clients
            .values()
            .fold((0, 0), |h, c| (h.0 + c.0, h.1 + c.1));
        truth.hosts = BTreeMap::from([(outflow_agent::identity::hostname(), host)]);
        Ok(truth)
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        let agent = self.agent.as_ref().context("started")?;
        let status = agent.stop();
        ensure!(
            status.code() == Some(0),
            "the agent exited with {status}:\n{}",
            agent.stderr()
        );
        Ok(())
    }
}
