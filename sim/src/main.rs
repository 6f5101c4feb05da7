//! `outflow-sim`: drive a collector with a simulated fleet and score its alerts.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use outflow_sim::{Scenario, SimConfig, run_scenario};

#[derive(Parser)]
#[command(
    version,
    about = "Scenario simulator for outflow's exfiltration detectors"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a simulated fleet's traffic to a collector, then score its alerts.
    Run(RunArgs),
    /// Start a collector cluster on this machine (3 NATS nodes, 2 ingest nodes, 3
    /// aggregators), stream a simulated fleet through it while a node of each kind is killed
    /// and brought back and a NATS node is cut off from the network for ten seconds (as root:
    /// it runs in a network namespace of its own), then check every host's and client's
    /// totals against what was sent and score the alerts (what `cargo xtask cluster-demo`
    /// runs). Needs `cargo xtask setup`'s nats-server.
    ClusterDemo(outflow_sim::cluster_demo::DemoArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The collector's gRPC URL (plaintext); or several, comma-separated (a cluster's ingest
    /// nodes): the agents are spread over them, and one whose stream fails opens it again on
    /// the next and sends its unacknowledged batch again.
    #[arg(
        long,
        env = "OUTFLOW_SIM_COLLECTOR",
        default_value = "http://127.0.0.1:7411"
    )]
    collector: String,
    /// File holding the bearer token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// benign, bulk, prefix, rotate6, slowrise, parallel, wide, pool, lowslow, or all (every
    /// attack at once).
    #[arg(long, default_value = "all")]
    scenario: Scenario,
    /// Synthetic hosts (agents).
    #[arg(long, default_value_t = 20)]
    hosts: usize,
    /// Benign client addresses.
    #[arg(long, default_value_t = 3000)]
    clients: usize,
    /// Simulated days (the attacks happen on the last one; lowslow from the first, and it needs
    /// 7 to be caught).
    #[arg(long, default_value_t = 7)]
    days: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Batch interval, seconds (must divide 3600).
    #[arg(long, default_value_t = 300)]
    batch_secs: u64,
    /// Hour of the last day (UTC) at which the attacks begin.
    #[arg(long, default_value_t = 9)]
    attack_hour: u32,
    /// Per agent, batches per second after a burst of 900 (0: unpaced). The collector's
    /// default limit is 100.
    #[arg(long, default_value_t = 95.0)]
    max_batch_rate: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let r = match Cli::parse().command {
        Command::Run(args) => tokio::runtime::Runtime::new()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(args))),
        Command::ClusterDemo(args) => cluster_demo(args),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cluster_demo(args: outflow_sim::cluster_demo::DemoArgs) -> anyhow::Result<ExitCode> {
    let outcome = outflow_sim::cluster_demo::run(&args.config(), None)?;
    println!("{}", outcome.line());
    Ok(outcome.exit_code())
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let token = args
        .token_file
        .as_deref()
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("read token file {}", p.display()))
                .map(|t| t.trim().to_owned())
        })
        .transpose()?;
    let cfg = SimConfig {
        collector: args.collector,
        token,
        hosts: args.hosts,
        clients: args.clients,
        days: args.days,
        seed: args.seed,
        batch_secs: args.batch_secs,
        start_ms: None,
        attack_start_hour: args.attack_hour,
        max_batches_per_second: args.max_batch_rate,
        ..SimConfig::default()
    };
    let report = run_scenario(&cfg, args.scenario)
        .await
        .context("simulation")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    // 0: every attack caught, nothing else flagged; 2: alerts read but wrong; 3: not read.
    Ok(if report.alerts_error.is_some() {
        ExitCode::from(3)
    } else if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
