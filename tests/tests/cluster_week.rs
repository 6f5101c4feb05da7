//! The collector's cluster mode under a week of a fleet and faults, on real processes: the
//! attacks the day of `cluster_fleet.rs` leaves out, a proxy pool (250 addresses in unrelated
//! networks, over every partition: only the second stage, fed by every aggregator's cohort
//! summaries, sees it whole) and a low-and-slow pull (under every daily limit, over the weekly
//! one), each need more than a day of 10-minute batches: a week of 5-minute batches
//! (`outflow_sim::cluster_demo::Fleet::Week`, what `cargo xtask cluster-demo --week` runs).
//!
//! A three-node NATS JetStream cluster, two ingest nodes and three aggregators; 20 simulated
//! agents; an aggregator, an ingest node and a NATS node SIGKILLed on the way and brought back,
//! and another NATS node cut off from the network for ten seconds. Once every part is applied,
//! every host's and every client's 24 h totals (the week's last day) equal what was sent, to
//! the byte, and each attack raised its alert once, every alert change POSTed to the webhook
//! once, and no alert (not a workload's own) came as resolved: both attacks run to the week's
//! end.
use std::time::Duration;

use outflow_sim::cluster_demo::{DemoConfig, Fleet, default_collector_bin, run};
use outflow_tests::collector::TempDir;

#[test]
fn a_week_through_the_cluster_catches_the_pool_and_the_low_and_slow_pull_once() {
    let dir = TempDir::new("cluster-week");
    let out = run(
        &DemoConfig {
            collector_bin: default_collector_bin(),
            dir: dir.path().join("nodes"),
            fleet: Fleet::Week,
            hosts: 20,
            clients: 500,
            seed: 1,
            verbose: true,
            faults: true,
            alert_wait: Duration::from_secs(60),
        },
        None,
    )
    .unwrap_or_else(|e| panic!("the demo failed: {e:#}"));
    println!("{}", out.line());
    assert_eq!(out.hosts, 20);
    let attacks: Vec<_> = out.report.attacks.iter().map(|a| a.scenario).collect();
    assert_eq!(attacks, Fleet::Week.attacks());
    assert!(
        out.resolved_on_the_way.is_empty(),
        "{:?}",
        out.resolved_on_the_way
    );
    // Every total exact, every attack alerted once, every alert change POSTed once: the line
    // says what differs.
    assert!(out.passed(), "{}", out.line());
}
