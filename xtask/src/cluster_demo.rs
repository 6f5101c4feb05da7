//! `cargo xtask cluster-demo`: the collector's cluster mode on this machine, with a fleet
//! through it and a node of each kind killed on the way (`outflow-sim cluster-demo`, see
//! `sim/src/cluster_demo.rs`).
//!
//! Runs `setup` (the tools venv's nats-server among the rest), builds the collector and the
//! simulator, and runs the simulator's cluster demo with this build's collector; its exit
//! status is ours. `--week` is passed on (a week's fleet, see `Fleet::Week`).
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result};

use crate::{cmd, setup, test::cargo_command};

pub fn run(week: bool) -> Result<ExitCode> {
    let report = setup::run()?;
    let mut build = cargo_command(&report, "build");
    build.args(["--bins", "-p", "outflow-collector", "-p", "outflow-sim"]);
    println!("cluster-demo: {}", cmd::display(&build));
    cmd::run(&mut build).context("building the collector and the simulator")?;
    let bins = cmd::target_dir().join("debug");
    let mut demo = Command::new(bins.join("outflow-sim"));
    demo.arg("cluster-demo")
        .arg("--collector-bin")
        .arg(bins.join("outflow-collector"));
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
