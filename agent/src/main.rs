//! `outflow-agent`: counts the bytes of every TCP connection in a cgroup with eBPF and emits
//! per-connection deltas each interval.
use std::{
    io::{BufWriter, stdout},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use log::info;
use outflow_agent::{
    agent::Agent,
    config::{Config, DEFAULT_CONFIG_PATH, OutputFormat},
    kernel,
    record::{Discard, JsonLines, Sink, Text},
};
use tokio::signal::unix::{SignalKind, signal};

/// Counts the bytes of every TCP connection of a cgroup, exactly, with eBPF, and reports
/// per-connection deltas every interval.
///
/// The kernel programs are attached to a cgroup v2 directory (every socket in it and below is
/// counted) and pinned under bpffs, so counting goes on while the agent restarts and a new agent
/// continues where the last one stopped. `outflow-agent detach` removes them.
///
/// Settings come from a TOML file (--config, else /etc/outflow/agent.toml if it exists) and are
/// overridden by flags; `outflow-agent print-config` shows the result. Needs root.
#[derive(Parser, Debug)]
#[command(name = "outflow-agent", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// TOML config file [default: /etc/outflow/agent.toml, if it exists]
    #[arg(long, short = 'c', global = true, env = "OUTFLOW_AGENT_CONFIG")]
    config: Option<PathBuf>,

    /// cgroup v2 directory to count [default: the root of the cgroup2 mount]
    #[arg(long, global = true)]
    cgroup: Option<PathBuf>,

    /// How often deltas are emitted, e.g. 1s, 500ms [default: 1s]
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,

    /// Record format on stdout [default: text]
    #[arg(long, short = 'o', global = true, value_enum)]
    output: Option<OutputFormat>,

    /// bpffs directory for the pinned kernel state [default: /sys/fs/bpf/outflow]
    #[arg(long, global = true)]
    pin_dir: Option<PathBuf>,

    /// Connections tracked one by one; beyond, bytes go to the overflow counters [default: 65536]
    #[arg(long, global = true)]
    max_connections: Option<u32>,

    /// Report only connections on this local port (repeatable)
    #[arg(long = "local-port", global = true, value_name = "PORT")]
    local_ports: Vec<u16>,

    /// Report only connections whose remote address is in this network (repeatable)
    #[arg(long = "remote-cidr", global = true, value_name = "CIDR")]
    remote_cidrs: Vec<ipnet::IpNet>,

    /// Count and report loopback connections too (excluded by default)
    #[arg(long, global = true)]
    include_loopback: bool,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// Attach and report (the default)
    Run,
    /// Detach the programs and remove all pinned kernel state (counting stops; counts not yet
    /// reported are lost)
    Detach,
    /// Print the effective configuration as TOML and exit
    PrintConfig,
}

impl Cli {
    fn config(&self) -> Result<Config> {
        let (path, explicit) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut c = Config::load(&path, explicit)?;
        if let Some(v) = &self.cgroup {
            c.cgroup = Some(v.clone());
        }
        if let Some(v) = self.interval {
            c.interval = v;
        }
        if let Some(v) = self.output {
            c.output = v;
        }
        if let Some(v) = &self.pin_dir {
            c.pin_dir = v.clone();
        }
        if let Some(v) = self.max_connections {
            c.max_connections = v;
        }
        if !self.local_ports.is_empty() {
            c.filter.local_ports = self.local_ports.clone();
        }
        if !self.remote_cidrs.is_empty() {
            c.filter.remote_cidrs = self.remote_cidrs.clone();
        }
        if self.include_loopback {
            c.filter.include_loopback = true;
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    // A bug must still end in one line, not a trace.
    std::panic::set_hook(Box::new(|p| {
        eprintln!("error: internal error: {p} (please report this)");
    }));
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let cfg = cli.config()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintConfig => {
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Command::Detach => {
            let removed = kernel::detach(&cfg.pin_dir)?;
            info!(
                "removed {} pinned objects from {}",
                removed.len(),
                cfg.pin_dir.display()
            );
            Ok(())
        }
        Command::Run => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the async runtime")?;
            rt.block_on(run_agent(cfg))
        }
    }
}

async fn run_agent(cfg: Config) -> Result<()> {
    let sink: Box<dyn Sink + Send> = match cfg.output {
        OutputFormat::Json => Box::new(JsonLines(BufWriter::new(stdout()))),
        OutputFormat::Text => Box::new(Text(BufWriter::new(stdout()))),
        OutputFormat::None => Box::new(Discard),
    };
    let mut agent = Agent::start(&cfg, sink)?;
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => agent.poll()?,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Report what was counted up to now; the kernel goes on counting for the next agent.
    agent.poll()?;
    info!(
        "stopped; kernel state stays pinned in {} (outflow-agent detach removes it)",
        cfg.pin_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_override_the_file() {
        let cli = Cli::parse_from(["outflow-agent", "--config", "/nonexistent/definitely.toml"]);
        assert!(
            cli.config().is_err(),
            "an explicit missing file is an error"
        );
        let cli = Cli::parse_from([
            "outflow-agent",
            "print-config",
            "--interval",
            "250ms",
            "--local-port",
            "8000",
            "--remote-cidr",
            "198.18.0.0/15",
        ]);
        let c = cli.config().expect("valid");
        assert_eq!(c.interval, Duration::from_millis(250));
        assert_eq!(c.filter.local_ports, vec![8000]);
        assert!(c.filter.remote_cidrs[0].contains(&"198.18.0.9".parse::<IpAddr>().expect("ip")));
    }
}
