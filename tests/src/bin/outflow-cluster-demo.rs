//! `outflow-cluster-demo` (what `cargo xtask cluster-demo` runs): the collector's cluster mode
//! on this machine, with a simulated fleet and a real agent through it, and a node of each kind
//! killed on the way.
//!
//! `outflow-sim cluster-demo` (`outflow_sim::cluster_demo`: three NATS nodes, two ingest nodes,
//! three aggregators, the simulated fleet, the faults, the comparison of every host's and
//! client's totals with what was sent, to the byte, and the alerts), with a real agent beside
//! the fleet ([`outflow_tests::cluster_agent::RealAgent`]): the kernel program counting real
//! connections between two network namespaces, exporting to the ingest node that is killed (it
//! spools until the node is back). Its clients count what they received and sent; that is
//! compared too. The last line is
//! `cluster: <N> deltas, totals exact, <K> alerts`, or what differs; the exit status is 0 if the
//! totals are exact and every attack raised its alert once, 2 if not, 1 on an error.
//!
//! Needs root (the agent's kernel programs, network namespaces, a cgroup) and, beside this
//! program, `outflow-collector`, `outflow-agent` and `outflow-testpeer` of the same build.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use outflow_sim::cluster_demo::{DemoArgs, run};
use outflow_tests::cluster_agent::RealAgent;

#[derive(Parser)]
#[command(
    version,
    about = "The collector's cluster mode on this machine (3 NATS nodes, 2 ingest nodes, 3 \
             aggregators) with a simulated fleet and a real agent through it, a node of each kind \
             killed and brought back on the way; then every host's and client's totals against \
             what was sent, and the alerts (as root; needs `cargo xtask setup`'s nats-server)"
)]
struct Cli {
    #[command(flatten)]
    demo: DemoArgs,
}

fn main() -> ExitCode {
    // The harness reports what failed by panicking (it is test code): one line, not a trace.
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        eprintln!("error: {msg}");
    }));
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| demo(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

fn demo(cli: Cli) -> Result<ExitCode> {
    if !outflow_tests::is_root().context("reading /proc/self/status")? {
        bail!(
            "the cluster demo attaches the agent's BPF programs and creates network namespaces: \
             run it as root"
        );
    }
    let dir = std::env::current_exe()
        .context("locating this program")?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let bin = |name: &str, package: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        if !path.is_file() {
            bail!(
                "no {name} beside this program ({}): build it (cargo build -p {package}), or run \
                 `cargo xtask cluster-demo`",
                path.display()
            );
        }
        Ok(path)
    };
    bin("outflow-agent", "outflow-agent")?;
    let testpeer = bin("outflow-testpeer", "outflow-tests")?;
    let default_collector = cli.demo.collector_bin.is_none();
    let mut cfg = cli.demo.config();
    if default_collector {
        cfg.collector_bin = bin("outflow-collector", "outflow-collector")?;
    }
    let mut real = RealAgent::new("cluster-demo", testpeer);
    let outcome = match run(&cfg, Some(&mut real)) {
        Ok(outcome) => outcome,
        Err(e) => match real.stderr() {
            agent if agent.is_empty() => return Err(e),
            agent => bail!("{e:#}\nthe real agent's stderr:\n{agent}"),
        },
    };
    println!("{}", outcome.line());
    Ok(outcome.exit_code())
}
