//! The benchmarks still run: each on a tiny scale, as root, against the real kernel and
//! binaries. No figure is checked (times are for `cargo xtask bench`); what is checked is
//! what the benchmarks check of themselves (e.g. that every test run reached the counters)
//! and that they print a section.
use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_outflow-bench"))
        .args(args)
        .arg("--json")
        .output()
        .expect("running outflow-bench");
    assert!(
        out.status.success(),
        "outflow-bench {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("outflow-bench prints a JSON section")
}

fn rows(section: &Value) -> usize {
    section["rows"].as_array().map_or(0, Vec::len)
}

/// The cell of `row` under the column named `column`.
fn cell<'a>(section: &'a Value, row: usize, column: &str) -> &'a str {
    let col = section["header"]
        .as_array()
        .and_then(|h| h.iter().position(|c| c.as_str() == Some(column)))
        .unwrap_or_else(|| panic!("no column {column:?}: {section}"));
    section["rows"][row][col].as_str().unwrap_or_default()
}

/// A figure in nanoseconds ("12.3 ns"), not "NaN ns".
fn is_ns(cell: &str) -> bool {
    cell.strip_suffix(" ns")
        .and_then(|v| v.parse::<f64>().ok())
        .is_some_and(f64::is_finite)
}

#[test]
fn packet_cost_runs_the_counting_path_and_the_flow_map_on_live_connections() {
    // The benchmark itself fails unless every connection has a live slot and a flow in the
    // reference's map after the first pass, and both counted every run.
    let s = bench(&[
        "packet",
        "--conns",
        "1,300",
        "--rounds",
        "1",
        "--repeat",
        "2000",
        "--pick",
        "random",
        "--pick",
        "sequential",
        "--profile",
        "false",
    ]);
    assert_eq!(rows(&s), 4, "{s}");
    for row in 0..4 {
        assert!(is_ns(cell(&s, row, "flow hash per packet")), "{s}");
    }
}

#[test]
fn capture_cost_reads_one_event_per_request_start() {
    // The benchmark itself fails unless its reader got one event per request-start run, with
    // the request's bytes, and the kernel lost none.
    let s = bench(&[
        "capture",
        "--conns",
        "50",
        "--request-bytes",
        "200,1024",
        "--rounds",
        "1",
        "--runs",
        "1000",
    ]);
    assert_eq!(rows(&s), 2, "{s}");
}

#[test]
fn request_rate_accounts_for_every_request_with_capture_on() {
    // The benchmark itself fails unless, with capture on, the agent's turns read plus events
    // lost equal the requests completed, and with capture off there are none.
    let s = bench(&["requests", "--seconds", "1", "--runs", "1", "--conns", "2"]);
    assert_eq!(rows(&s), 3, "{s}");
    let turns = cell(&s, 2, "Turns read / lost").replace(',', "");
    let total: u64 = turns
        .split(" / ")
        .map(|n| n.parse::<u64>().expect("a count"))
        .sum();
    assert!(total > 0, "no turns with capture on: {s}");
}

#[test]
fn agent_load_reports_the_active_connections() {
    // Two cases, so that the second reuses the ports the first one's connections held.
    let s = bench(&[
        "agent",
        "--conns",
        "200",
        "--active",
        "0,0.5",
        "--windows",
        "1",
        "--window-secs",
        "2",
    ]);
    assert_eq!(rows(&s), 2, "{s}");
    // 100 connections send every second: the collector applied deltas.
    let reported = s["rows"][1][2]
        .as_str()
        .unwrap_or_default()
        .replace(',', "");
    assert!(
        reported.parse::<f64>().is_ok_and(|d| d > 0.0),
        "no deltas reported: {s}"
    );
}

#[test]
fn collector_ingest_applies_every_delta() {
    let s = bench(&[
        "ingest",
        "--clients",
        "500",
        "--agents",
        "2",
        "--batches",
        "3",
        "--deltas",
        "200",
        "--runs",
        "1",
    ]);
    assert!(rows(&s) >= 1, "{s}");
}

#[test]
fn cluster_aggregators_apply_every_delta() {
    let s = bench(&[
        "cluster",
        "--aggregators",
        "1,2",
        "--partitions",
        "4",
        "--clients",
        "500",
        "--agents",
        "2",
        "--batches",
        "3",
        "--deltas",
        "200",
        "--extractions",
        "1",
    ]);
    assert_eq!(rows(&s), 2, "{s}");
    assert_eq!(cell(&s, 1, "aggregators"), "2");
    assert!(
        s["notes"]
            .to_string()
            .contains("Extraction to alert across the cluster"),
        "{s}"
    );
}

#[test]
fn traffic_cost_reads_the_programs_run_times() {
    // The benchmark itself fails unless outflow's and the reference's programs both ran.
    let s = bench(&[
        "traffic",
        "--seconds",
        "1",
        "--runs",
        "1",
        "--mode",
        "small",
    ]);
    assert!(rows(&s) >= 1, "{s}");
    assert!(is_ns(cell(&s, 0, "flow hash")), "{s}");
}

#[test]
fn throughput_runs_attached_and_detached() {
    let s = bench(&[
        "throughput",
        "--seconds",
        "1",
        "--runs",
        "1",
        "--mode",
        "gso",
    ]);
    assert!(rows(&s) >= 1, "{s}");
}
