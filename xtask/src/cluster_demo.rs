//! `cargo xtask cluster-demo`: the collector's cluster mode on this machine, with a simulated
//! fleet and a real agent through it, and a node of each kind killed on the way
//! (`outflow-cluster-demo`, see `tests/src/bin/outflow-cluster-demo.rs`: the simulator's
//! cluster demo, `sim/src/cluster_demo.rs`, with the test harness's real agent beside it).
//!
//! Runs `setup` (the tools venv's nats-server and the eBPF toolchain among the rest), builds
//! the agent, the collector and the demo, and runs the demo with this build's binaries; its
//! exit status is ours. `--week` is passed on (a week's fleet, see `Fleet::Week`).
use std::process::{Command, ExitCode};

use anyhow::{Result, bail};

use crate::{cmd, demo};

pub fn run(week: bool) -> Result<ExitCode> {
    if !cmd::is_root()? {
        bail!(
            "the cluster demo attaches the agent's BPF programs and creates network namespaces: \
             run as root"
        );
    }
    let bins = demo::setup_and_build("cluster-demo")?;
    let mut demo = Command::new(bins.join("outflow-cluster-demo"));
    if week {
        demo.arg("--week");
    }
    println!("cluster-demo: {}", cmd::display(&demo));
    let status = cmd::status(&mut demo)?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}
