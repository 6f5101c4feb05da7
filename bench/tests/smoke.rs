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

#[test]
fn packet_cost_runs_the_counting_path_on_live_connections() {
    let s = bench(&[
        "packet",
        "--conns",
        "1,300",
        "--rounds",
        "1",
        "--repeat",
        "2000",
        "--profile",
        "false",
    ]);
    assert_eq!(rows(&s), 2, "{s}");
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
    let reported = s["rows"][1][2].as_str().unwrap_or_default().replace(',', "");
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
fn traffic_cost_reads_the_programs_run_times() {
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
