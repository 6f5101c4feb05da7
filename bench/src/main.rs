//! `outflow-bench`: outflow's benchmarks, one subcommand each. `cargo xtask bench` builds
//! everything in release, runs them as root one after the other (never two at once: the
//! figures are times) and writes BENCHMARKS.md from the sections they print as JSON.
//!
//! Every figure is a median of several runs or a ratio of two things measured side by side in
//! one run, because a shared VM is noisy. Nothing here asserts a time.

mod agent_load;
mod capture;
mod cluster;
mod detect;
mod holder;
mod ingest;
mod object;
mod packet;
mod report;
mod requests;
mod start;
mod sys;
mod testbed;
mod throughput;
mod traffic;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "outflow-bench",
    version,
    about = "outflow's benchmarks (run as root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print the section as JSON on stdout (for `cargo xtask bench`) instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Per-packet cost of the counting program with BPF_PROG_TEST_RUN, at 1 to 1M live
    /// connections picked at random, beside an empty program and a per-flow hash map.
    Packet(packet::Args),
    /// Per-request cost of capturing a turn with BPF_PROG_TEST_RUN: the ingress path on a
    /// packet that starts a request versus one that does not, the ring buffer drained.
    Capture(capture::Args),
    /// Per-packet cost under real traffic: the programs' run_time_ns / run_cnt
    /// (kernel.bpf_stats_enabled) during iperf3 across a veth pair.
    Traffic(traffic::CostArgs),
    /// Request rate of an HTTP/1.1 keep-alive client and server over veth with the agent
    /// detached, attached with request capture off, and with capture on.
    Requests(requests::Args),
    /// Throughput with the agent attached versus detached (iperf3 over veth, three modes).
    Throughput(throughput::ThroughputArgs),
    /// The agent's CPU and memory with many live connections.
    Agent(agent_load::Args),
    /// The agent's start: time to attached, and the instructions the verifier walks per
    /// program.
    Start(start::Args),
    /// Collector ingest: connection deltas applied per second over gRPC, with detection on
    /// and off.
    Ingest(ingest::Args),
    /// Collector cluster mode: deltas applied per second with 1, 2 and 3 aggregators behind
    /// an ingest node on a real NATS JetStream cluster, and the send-to-Ack time.
    Cluster(cluster::Args),
    /// The detectors' cost per judgement at 100k and 1M active clients, cohorts included.
    Detect(detect::Args),
    /// (internal) Hold live connections open for the other benchmarks.
    #[command(hide = true)]
    Hold(holder::HoldArgs),
    /// (internal) The HTTP server of `requests`.
    #[command(hide = true)]
    HttpServe(requests::ServeArgs),
    /// (internal) The HTTP client of `requests`.
    #[command(hide = true)]
    HttpLoad(requests::LoadArgs),
}

/// Points the harness at the agent, collector and test peer beside this binary (the same
/// cargo profile directory), unless the environment names others.
fn default_binaries() {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    for (var, file) in [
        ("OUTFLOW_AGENT_BIN", "outflow-agent"),
        ("OUTFLOW_COLLECTOR_BIN", "outflow-collector"),
        ("OUTFLOW_TESTPEER_BIN", "outflow-testpeer"),
    ] {
        let path = exe.with_file_name(file);
        if std::env::var_os(var).is_none() && path.is_file() {
            // SAFETY: called first thing in main, before any thread exists.
            unsafe { std::env::set_var(var, path) };
        }
    }
}

/// The exit of an internal helper subcommand.
fn helper(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outflow-bench {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    default_binaries();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Packet(a) => packet::run(a),
        Command::Capture(a) => capture::run(a),
        Command::Traffic(a) => traffic::run_cost(a),
        Command::Throughput(a) => throughput::run_throughput(a),
        Command::Agent(a) => agent_load::run(a),
        Command::Start(a) => start::run(a),
        Command::Ingest(a) => ingest::run(a),
        Command::Detect(a) => detect::run(a),
        Command::Cluster(a) => cluster::run(a),
        Command::Requests(a) => requests::run(a),
        Command::Hold(a) => return helper("hold", holder::run_hold(a)),
        Command::HttpServe(a) => return helper("http-serve", requests::run_serve(a)),
        Command::HttpLoad(a) => return helper("http-load", requests::run_load(a)),
    };
    match result {
        Ok(section) => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string(&section).expect("a section serializes")
                );
            } else {
                print!("{}", section.to_text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outflow-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
