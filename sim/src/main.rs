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
}

#[derive(clap::Args)]
struct RunArgs {
    /// The collector's gRPC URL (plaintext).
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

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Command::Run(args) = cli.command;
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
