//! The collector's cluster mode under a fleet and faults, on real processes: a three-node NATS
//! JetStream cluster (the tools venv's nats-server), two ingest nodes and three aggregators
//! (target/debug/outflow-collector, built by `cargo xtask test` before the tests), 200
//! simulated agents spread over both ingest nodes (`outflow_sim::cluster_demo`, what
//! `cargo xtask cluster-demo` runs), and beside them a real agent: the kernel program counting
//! real connections between network namespaces, exporting to the ingest node that is killed.
//!
//! With an aggregator, an ingest node and a NATS node SIGKILLed on the way and brought back,
//! and another NATS node cut off from the network for ten seconds (its own network namespace),
//! every host's and every client's totals, read through an ingest node (which asks every
//! aggregator and merges), equal what was sent, to the byte: what the simulated agents sent,
//! and what the real agent's clients received and sent. Agents of the killed ingest node went
//! on through the other (the real agent spooled until it was back); and each attack a
//! partitioned cluster judges raised its alert, once, although partitions moved and stores were
//! rebuilt from the stream (the aggregators' consumers apply in step by judgement period, so a
//! replay is judged as the live stream was). Their webhook receiver got each alert change once:
//! what a rebuilt aggregator judged again was found in the cluster's delivery records and not
//! sent again.
//!
//! The simulated day starts at the last full hour and is sent in under a minute: the real agent
//! starts once the fleet's batch time is past the clock, so its batches (stamped with the wall
//! clock) are never ahead of the fleet's, and lie in the same 24 h window; the faults come after
//! it, over the rest of the day.
//!
//! Not here: the pool and the low-and-slow attacks, which need 5-minute batches and a week
//! (`cluster_week.rs` runs them).
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use outflow_sim::{
    Truth,
    cluster_demo::{Beside, DemoConfig, Fleet, default_collector_bin, run},
};
use outflow_tests::{
    agent::{Agent, PinDir, export_args},
    cgroup::TestCgroup,
    collector::TempDir,
    netns::NetnsPair,
    peer::{Server, Traffic},
    testpeer_bin,
};

const PORT: u16 = 8000;
/// Responses of a few sizes, small requests.
const SIZES: &[(u64, u64)] = &[(50_000, 100), (200_000, 300), (7, 1), (1_234_567, 50)];

/// A real agent and the real traffic it counts: a server in a cgroup of the server namespace,
/// and a client (an IPv4 and an IPv6 address) requesting from it in a loop.
/// (Fields drop in this order: the traffic, the agent and the server before their namespaces
/// and cgroup.)
struct RealAgent {
    traffic: Option<Traffic>,
    agent: Option<Agent>,
    server: Option<Server>,
    pin: PinDir,
    state: TempDir,
    cgroup: TestCgroup,
    pair: NetnsPair,
}

impl Beside for RealAgent {
    fn start(&mut self, ingest: &[String]) -> anyhow::Result<()> {
        self.server = Some(Server::start(
            testpeer_bin!(),
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

#[test]
fn the_cluster_keeps_exact_totals_and_alerts_once_through_faults() {
    let dir = TempDir::new("cluster-fleet");
    let mut real = RealAgent {
        traffic: None,
        agent: None,
        server: None,
        pin: PinDir::new("clfleet"),
        state: TempDir::new("clfleet-agent"),
        cgroup: TestCgroup::new("clfleet"),
        pair: NetnsPair::new("clfleet"),
    };
    let out = run(
        &DemoConfig {
            collector_bin: default_collector_bin(),
            dir: dir.path().join("nodes"),
            fleet: Fleet::Day,
            hosts: 200,
            clients: 500,
            seed: 1,
            verbose: true,
            faults: true,
            alert_wait: Duration::from_secs(60),
        },
        Some(&mut real),
    )
    .unwrap_or_else(|e| {
        let agent = real.agent.as_ref().map(Agent::stderr).unwrap_or_default();
        panic!("the demo failed: {e:#}\nthe real agent's stderr:\n{agent}")
    });
    println!("{}", out.line());
    let agent = real.agent.as_ref().map(Agent::stderr).unwrap_or_default();
    assert!(
        out.differences.is_empty(),
        "totals differ: {:?}\nthe real agent's stderr:\n{agent}",
        &out.differences[..out.differences.len().min(10)]
    );
    assert_eq!(out.hosts, 201, "200 simulated hosts and the real agent's");
    assert!(out.clients >= 502, "{}", out.clients);
    assert!(
        out.report.reconnects > 0,
        "the agents of the killed ingest node opened their streams again"
    );
    for a in &out.report.attacks {
        assert!(
            a.detected,
            "no alert on the {} attack: {}",
            a.scenario,
            out.line()
        );
    }
    assert!(out.repeated.is_empty(), "{:?}", out.repeated);
    assert!(out.posted > 0, "the webhook got no alert change");
    assert!(out.posted_twice.is_empty(), "{:?}", out.posted_twice);
    assert!(out.not_posted.is_empty(), "{:?}", out.not_posted);
    assert!(out.passed());
    assert!(
        out.line()
            .ends_with(&format!("totals exact, {} alerts", out.alerts)),
        "{}",
        out.line()
    );
}
