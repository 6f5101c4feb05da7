//! The agent's start: the time from starting the release `outflow-agent` to its programs being
//! attached, and how much of its programs the kernel's verifier walks to load them (the
//! verifier's time grows with that count, and was most of the start while it walked the slot
//! search once per caller's state).
use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::loaded_programs;
use outflow_tests::{agent::PinDir, cgroup::TestCgroup};

use crate::{
    agent_load::start_agent,
    report::{Section, median, range, thousands},
};

#[derive(clap::Args)]
pub struct Args {
    /// Starts of the agent to measure; the time is their median.
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

/// The agent's programs, in the order the table lists them.
const PROGRAMS: [&str; 5] = [
    "count_egress",
    "count_ingress",
    "sock_ops",
    "annotate",
    "sock_close",
];

/// One program as loaded: instructions after the kernel's rewrite, and instructions the
/// verifier processed (it walks a path per state it cannot prune).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Loaded {
    instructions: u64,
    verified: u64,
}

pub fn run(args: &Args) -> Result<Section> {
    ensure!(args.runs > 0, "--runs must be positive");
    let mut times = Vec::new();
    let mut programs = BTreeMap::new();
    for run in 0..args.runs {
        let (time, loaded) = start_once()?;
        eprintln!("start: run {}: {:.3} s", run + 1, time.as_secs_f64());
        times.push(time.as_secs_f64());
        if programs.is_empty() {
            programs = loaded;
        } else {
            ensure!(
                programs == loaded,
                "the programs loaded differently from one start to the next"
            );
        }
    }
    Ok(section(args, &times, &programs))
}

/// Starts the agent on a fresh cgroup and pin directory (so it loads, not adopts, its
/// programs), and returns the time to attached and the programs it loaded.
fn start_once() -> Result<(Duration, BTreeMap<&'static str, Loaded>)> {
    let before: HashSet<u32> = loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect();
    let cgroup = TestCgroup::new("bench-start");
    let pin = PinDir::new("bench-start");
    let started = Instant::now();
    let agent = start_agent(&[
        "--cgroup",
        cgroup.as_arg(),
        "--pin-dir",
        pin.as_arg(),
        "--output",
        "none",
    ])?;
    let time = started.elapsed();
    let mut loaded = BTreeMap::new();
    for info in loaded_programs() {
        let info = info.context("listing the loaded BPF programs")?;
        if before.contains(&info.id()) {
            continue;
        }
        let Some(name) = info
            .name_as_str()
            .and_then(|n| PROGRAMS.iter().find(|p| **p == n))
        else {
            continue;
        };
        loaded.insert(
            *name,
            Loaded {
                instructions: u64::from(info.size_translated().unwrap_or(0) / 8),
                verified: u64::from(info.verified_instruction_count().unwrap_or(0)),
            },
        );
    }
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_timeout(Duration::from_secs(30));
    ensure!(
        loaded.len() == PROGRAMS.len(),
        "found {} of the agent's {} programs loaded: {:?}",
        loaded.len(),
        PROGRAMS.len(),
        loaded.keys().collect::<Vec<_>>()
    );
    Ok((time, loaded))
}

fn section(args: &Args, times: &[f64], programs: &BTreeMap<&'static str, Loaded>) -> Section {
    let mut s = Section::new("start", "Agent start and the verifier's work");
    s.method = format!(
        "The release `outflow-agent` starts {} times, each on a fresh test cgroup and pin \
         directory, so that it creates its maps and loads and attaches its programs every \
         time (`--output none`). *Start* runs from spawning the process to its log line \
         saying it attached; the table gives the median and the range. For each program: \
         its instructions as loaded (`bpf_prog_info.xlated_prog_len` / 8) and the \
         instructions the kernel's verifier processed to accept it \
         (`bpf_prog_info.verified_insns`, 5.16 and later): it walks every path it cannot \
         prune, loop iterations included, and its time grows with that count. The programs' \
         figures are the same in every run (checked).",
        args.runs
    );
    s.commands = vec![format!(
        "sudo target/release/outflow-bench start --runs {}",
        args.runs
    )];
    s.header = ["what", "figure"].map(String::from).to_vec();
    let (lo, hi) = range(times);
    s.row([
        "start, spawn to attached".to_string(),
        format!("{:.3} s ({lo:.3} to {hi:.3})", median(times)),
    ]);
    let mut total = 0;
    for name in PROGRAMS {
        if let Some(p) = programs.get(name) {
            total += p.verified;
            s.row([
                format!("`{name}`: instructions / walked by the verifier"),
                format!(
                    "{} / {}",
                    thousands(p.instructions as f64),
                    thousands(p.verified as f64)
                ),
            ]);
        }
    }
    s.row([
        "all programs: walked by the verifier".to_string(),
        thousands(total as f64),
    ]);
    s.notes.push(
        "The verifier's limit is 1,000,000 instructions walked per program on every kernel \
         of the matrix."
            .into(),
    );
    s
}
