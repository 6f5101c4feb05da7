//! `cargo xtask faults`: the fault suite at full size, and its table.
//!
//! Runs the `faults` and `faults_fleet` test targets of `outflow-tests` with
//! `OUTFLOW_FAULTS=full` (a one-minute partition, 50 SIGKILLs of each side, 500 agents
//! reconnecting, ...), one fault at a time so that the faults do not disturb each other, and
//! prints the table their rows make: bytes sent, bytes in the collector, lost (reported), lost
//! (silent) and double-counted, which must both be 0, and the time to recover. `cargo xtask
//! test` runs the same faults briefly.

use std::{fs, process::ExitCode};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup, test};

/// The header of the rows the tests write (`outflow_tests::faults::TABLE_HEADER`).
const TABLE_HEADER: &str = "| fault | bytes sent | bytes in the collector | of which unattributed | lost (reported) | lost (silent) | double-counted | recovery |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

#[derive(clap::Args)]
pub struct Args {
    /// Only the faults whose test names contain this (e.g. `partition`, `killed`).
    #[arg(long)]
    only: Option<String>,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if !cmd::is_root()? {
        bail!(
            "the fault suite loads BPF programs, mounts file systems and sets nftables rules: run as root"
        );
    }
    let report = setup::run()?;
    let mut build = test::cargo_command(&report, "build");
    build.arg("--bins");
    println!("xtask: {}", cmd::display(&build));
    cmd::run(&mut build).context("building the binaries the fault suite starts")?;

    let table = cmd::workspace_root().join("target").join("faults.md");
    let _ = fs::remove_file(&table);
    let mut run = test::cargo_command(&report, "test");
    run.args([
        "-p",
        "outflow-tests",
        "--test",
        "faults",
        "--test",
        "faults_fleet",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ]);
    if let Some(only) = &args.only {
        run.arg(only);
    }
    run.env("OUTFLOW_FAULTS", "full")
        .env("OUTFLOW_FAULTS_TABLE", &table);
    println!("xtask: {}", cmd::display(&run));
    let status = cmd::status(&mut run)?;

    let rows = fs::read_to_string(&table).unwrap_or_default();
    println!("\n{TABLE_HEADER}\n{}", rows.trim_end());
    println!("\n(also in {})", table.display());
    if !status.success() {
        bail!("a fault run failed ({status}): its output is above");
    }
    Ok(ExitCode::SUCCESS)
}
