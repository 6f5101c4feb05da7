//! The fault suite's fleet run: a whole fleet of agents loses its collector (SIGKILL), spools
//! while it is down, and reconnects when it comes back on the same port and data directory.
//! Exponential backoff with full jitter must spread the reconnections (no stampede: each agent
//! reconnects once, the collector refuses nothing), no batch may be lost, and the collector's
//! totals per client must equal what the fleet sent, to the byte. The time until every agent
//! is back and has its backlog acknowledged is measured.
//!
//! The agents are `outflow-fleet`'s: the agent's own export pipeline (identity, disk spool,
//! sender) N times in one process on a tmpfs, each with one synthetic connection from a
//! client address of its own (see `outflow_tests::faults::fleet`). `cargo xtask test` runs
//! [`SHORT_AGENTS`] of them with the collector down 3 s; `cargo xtask faults`
//! (`OUTFLOW_FAULTS=full`) [`FULL_AGENTS`], down 10 s.
//!
//! Needs root (the tmpfs).

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outflow_tests::{
    collector::{Collector, Metrics, TempDir, free_port},
    faults::{
        Row, Scale,
        fleet::{FleetProcess, Progress, client_addr},
    },
    fleet_bin,
};

/// Agents of the short run: the full 500. They cost the fleet about a fifth of a core and the
/// collector less; the run takes 20 to 26 s, most of it the backoff's tail (after a 3 s
/// outage the last agent came back 12 to 18 s after the restart, the first after 0.1 s).
const SHORT_AGENTS: usize = 500;
const FULL_AGENTS: usize = 500;
/// Each agent's interval.
const INTERVAL: Duration = Duration::from_secs(1);
/// Batches each agent has acknowledged before the crash.
const BATCHES_BEFORE: u64 = 3;
const START: Duration = Duration::from_secs(90);
/// The agents' backoff reaches 30 s; with their backlog to send, twice that is generous.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Seconds from `since_ms` to `ms` (Unix milliseconds), for messages.
fn secs_after(ms: u64, since_ms: u64) -> f64 {
    ms.saturating_sub(since_ms) as f64 / 1000.0
}

fn metrics(addr: SocketAddr) -> Metrics {
    Metrics::fetch(addr).unwrap_or_else(|e| panic!("scrape {addr}: {e}"))
}

/// How many agents were connected, from the restart on: `+1.5s 120/500` ...
fn timeline(progress: &[Progress], since_ms: u64, until_ms: u64, n: usize) -> String {
    progress
        .iter()
        .filter(|p| p.ts_ms >= since_ms && p.ts_ms <= until_ms)
        .map(|p| {
            format!(
                "+{:.1}s {}/{n} ({} caught up)",
                secs_after(p.ts_ms, since_ms),
                p.connected,
                p.caught_up
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn a_fleet_reconnects_after_a_collector_crash_without_a_stampede_or_a_lost_batch() {
    let scale = Scale::from_env();
    let n = scale.pick(SHORT_AGENTS, FULL_AGENTS);
    let down = scale.pick(Duration::from_secs(3), Duration::from_secs(10));
    let data = TempDir::new("fleet-collector");
    let port = free_port();
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics_arg = metrics_addr.to_string();
    let start_collector = || {
        Collector::start(
            port,
            &[
                "--data-dir",
                data.as_arg(),
                "--metrics-listen",
                &metrics_arg,
            ],
        )
    };

    let collector = start_collector();
    let started = Instant::now();
    let fleet = FleetProcess::start(fleet_bin!(), &collector.url(), n, INTERVAL);
    let up = fleet.wait_progress(
        &format!("{n} agents connected, {BATCHES_BEFORE} batches each acknowledged"),
        START,
        |p| p.connected == n && p.acked_batches >= BATCHES_BEFORE * n as u64,
    );
    eprintln!(
        "{n} agents up in {:.1} s: {} batches acknowledged",
        started.elapsed().as_secs_f64(),
        up.acked_batches
    );
    let m = metrics(metrics_addr);
    assert_eq!(
        m.sum("outflow_collector_rejects_total"),
        0.0,
        "rejects before the crash"
    );
    assert_eq!(m.value("outflow_collector_agents_connected"), n as f64);

    // The crash: every agent loses its stream and spools meanwhile.
    let killed = Instant::now();
    assert!(!collector.kill().success(), "SIGKILL ends the collector");
    drop(collector);
    fleet.wait_progress("every agent to see its stream gone", RECOVERY_LIMIT, |p| {
        p.connected == 0
    });
    thread::sleep(down.saturating_sub(killed.elapsed()));

    // The restart, on the same port and data directory.
    let restart_ms = unix_ms_now();
    let restarted = Instant::now();
    let collector = start_collector();
    let startup = restarted.elapsed();
    let back = fleet.wait_progress(
        "every agent connected again with its backlog acknowledged",
        RECOVERY_LIMIT,
        |p| p.connected == n && p.caught_up == n,
    );
    let recovery = Duration::from_millis(back.caught_up_since_max_ms.saturating_sub(restart_ms));
    let after = metrics(metrics_addr);
    assert_eq!(after.value("outflow_collector_agents_connected"), n as f64);
    let progress = fleet.progress();
    eprintln!(
        "collector down {:.1} s, accepting again {:.1} s after its restart; agents back (connected) \
         from +{:.1} s to +{:.1} s, all caught up at +{:.1} s; {} batches resent that the crashed \
         collector had applied\nconnected after the restart: {}",
        (restarted - killed).as_secs_f64(),
        startup.as_secs_f64(),
        secs_after(back.connected_since_min_ms, restart_ms),
        secs_after(back.connected_since_max_ms, restart_ms),
        recovery.as_secs_f64(),
        after.value("outflow_collector_duplicate_batches_total"),
        timeline(&progress, restart_ms, back.ts_ms, n),
    );

    let done = fleet.finish();
    assert_eq!(done.agents, n);

    // The ground truth against the collector, client by client (a double count at one and a
    // loss at another must not cancel out).
    let mut collected = 0;
    let mut wrong = Vec::new();
    for i in 0..n {
        let client = client_addr(i).to_string();
        let held = collector.day_bytes(&client);
        let sent = (
            done.sent_bytes_out_by_agent[i],
            done.sent_bytes_in_by_agent[i],
        );
        collected += held.0;
        if held != sent {
            wrong.push(format!(
                "{client}: collector (response, request) {held:?}, sent {sent:?}"
            ));
        }
    }
    let row = Row {
        fault: format!(
            "{n} agents reconnect after a collector crash ({} s down)",
            down.as_secs()
        ),
        sent: done.sent_bytes_out,
        collected,
        unattributed: 0,
        lost_reported: done.lost_bytes_out,
        recovery,
    };
    if !wrong.is_empty() || row.lost_silent() != 0 || row.double_counted() != 0 {
        eprintln!("collector stderr:\n{}", collector.stderr());
    }
    row.report();
    assert!(
        wrong.is_empty(),
        "{} of {n} clients differ, e.g.:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(10)].join("\n")
    );
    assert_eq!(
        (done.lost_batches, done.deferred_intervals),
        (0, 0),
        "no batch lost, no interval deferred: {done:?}"
    );

    // No stampede: each agent came back once (the fleet polls each every 100 ms, so a stream
    // that failed and was reopened in between goes unseen, but a collector refusing streams
    // would show in its rejects), and the collector refused nothing.
    assert!(
        (n as u64..=n as u64 + n as u64 / 20).contains(&done.reconnects),
        "{} reconnections of {n} agents after one crash",
        done.reconnects
    );
    // Jitter spreads them: without it the agents, cut off at the same moment, would retry in
    // step and come back within one poll of each other. With full jitter over ceilings of
    // seconds, hundreds of agents come back over seconds.
    let spread = back
        .connected_since_max_ms
        .saturating_sub(back.connected_since_min_ms);
    assert!(
        n < 20 || spread >= 1000,
        "{n} agents came back within {spread} ms of each other: a stampede"
    );
    let m = metrics(metrics_addr);
    assert_eq!(
        m.sum("outflow_collector_rejects_total"),
        0.0,
        "streams or batches the restarted collector refused"
    );
    eprintln!(
        "time until all {n} agents were back with their backlog acknowledged: {:.1} s after the restart \
         ({} reconnections; {} response bytes sent = collected; spools empty {} ms after the stop)",
        recovery.as_secs_f64(),
        done.reconnects,
        done.sent_bytes_out,
        done.drain_ms
    );
}
