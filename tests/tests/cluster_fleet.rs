//! The collector's cluster mode under a fleet and faults, on real processes: a three-node NATS
//! JetStream cluster (the tools venv's nats-server), two ingest nodes and three aggregators
//! (target/debug/outflow-collector, built by `cargo xtask test` before the tests), 200
//! simulated agents spread over both ingest nodes (`outflow_sim::cluster_demo`), and beside them
//! a real agent (`outflow_tests::cluster_agent`): the kernel program counting real connections
//! between network namespaces, exporting to the ingest node that is killed. (`cargo xtask
//! cluster-demo` runs the same, `outflow-cluster-demo`.)
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
//! sent again; and no alert came as resolved (each attack runs to the day's end: an alert
//! resolved on the way was judged without parts its aggregator had not applied yet, as when
//! its consumers stopped one by one and the last ones ran on past the first).
//!
//! The simulated day starts at the last full hour and is sent in under a minute: the real agent
//! starts once the fleet's batch time is past the clock, so its batches (stamped with the wall
//! clock) are never ahead of the fleet's, and lie in the same 24 h window; the faults come after
//! it, over the rest of the day.
//!
//! Not here: the pool and the low-and-slow attacks, which need 5-minute batches and a week
//! (`cluster_week.rs` runs them).
use std::time::Duration;

use outflow_sim::cluster_demo::{DemoConfig, Fleet, default_collector_bin, run};
use outflow_tests::{cluster_agent::RealAgent, collector::TempDir, testpeer_bin};

#[test]
fn the_cluster_keeps_exact_totals_and_alerts_once_through_faults() {
    let dir = TempDir::new("cluster-fleet");
    let mut real = RealAgent::new("clfleet", testpeer_bin!().to_owned());
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
        let agent = real.stderr();
        panic!("the demo failed: {e:#}\nthe real agent's stderr:\n{agent}")
    });
    println!("{}", out.line());
    let agent = real.stderr();
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
    assert!(
        out.resolved_on_the_way.is_empty(),
        "{:?}",
        out.resolved_on_the_way
    );
    assert!(out.passed());
    assert!(
        out.line()
            .ends_with(&format!("totals exact, {} alerts", out.alerts)),
        "{}",
        out.line()
    );
}
