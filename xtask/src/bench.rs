//! `cargo xtask bench`: outflow's benchmarks, measured on this machine, into BENCHMARKS.md.
//!
//! Builds the release binaries, then runs each benchmark of `outflow-bench` (one at a time:
//! the figures are times) and the demo's time to alert, prints each section as it comes and
//! writes BENCHMARKS.md: the machine, the commands, the figures and the issue's targets.
//! `outflow-bench` prints each section as one JSON object on stdout ([`Section`] mirrors it).

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::{cmd, demo, setup, test::cargo_command};

#[derive(clap::Args)]
pub struct Args {
    /// Run only these (comma-separated): packet, capture, traffic, requests, throughput,
    /// agent, ingest, detect, cluster, alert.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Fewer and shorter runs (minutes less), to check the benchmarks themselves; writes
    /// target/BENCHMARKS.quick.md unless --out is given.
    #[arg(long)]
    quick: bool,
    /// Where to write the report [default: BENCHMARKS.md at the workspace root].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The benchmarks, in the order they run: `outflow-bench` subcommands with their arguments
/// (full, quick), then the demo's time to alert.
const BENCHES: [(&str, &[&str], &[&str]); 9] = [
    (
        "packet",
        &[],
        &[
            "--conns",
            "1,1000,100000",
            "--rounds",
            "3",
            "--repeat",
            "200000",
        ],
    ),
    ("capture", &[], &["--rounds", "3", "--runs", "20000"]),
    ("traffic", &[], &["--seconds", "2", "--runs", "1"]),
    ("requests", &[], &["--seconds", "2", "--runs", "1"]),
    ("throughput", &[], &["--seconds", "2", "--runs", "1"]),
    (
        "agent",
        &[],
        &["--conns", "10000", "--windows", "1", "--window-secs", "3"],
    ),
    (
        "ingest",
        &["--max-keys", "1000000"],
        &[
            "--clients",
            "20000",
            "--batches",
            "10",
            "--runs",
            "1",
            "--max-keys",
            "1000000",
        ],
    ),
    (
        "detect",
        &[],
        &["--clients", "20000", "--steady-percent", "100"],
    ),
    (
        "cluster",
        &[],
        &[
            "--clients",
            "20000",
            "--agents",
            "4",
            "--batches",
            "10",
            "--deltas",
            "5000",
        ],
    ),
];
const ALERT_RUNS: (usize, usize) = (3, 1);

/// One section of the report, as `outflow-bench` prints it (`bench/src/report.rs`).
#[derive(Deserialize)]
struct Section {
    title: String,
    method: String,
    commands: Vec<String>,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    targets: Vec<Target>,
    notes: Vec<String>,
}

#[derive(Deserialize)]
struct Target {
    what: String,
    target: String,
    measured: String,
    met: bool,
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if !cmd::is_root()? {
        bail!("the benchmarks load BPF programs and create network namespaces: run as root");
    }
    let known = [
        "packet",
        "capture",
        "traffic",
        "requests",
        "throughput",
        "agent",
        "ingest",
        "detect",
        "cluster",
        "alert",
    ];
    if let Some(bad) = args.only.iter().find(|o| !known.contains(&o.as_str())) {
        bail!(
            "--only {bad}: not a benchmark (one of {})",
            known.join(", ")
        );
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let report = setup::run()?;
    let mut build = cargo_command(&report, "build");
    build.args(["--release", "--bins"]);
    for p in [
        "outflow-agent",
        "outflow-collector",
        "outflow-tests",
        "outflow-bench",
    ] {
        build.args(["-p", p]);
    }
    println!("bench: {}", cmd::display(&build));
    cmd::run(&mut build).context("building the release binaries")?;
    let bins = cmd::target_dir().join("release");

    let mut sections = Vec::new();
    for (name, full, quick) in BENCHES {
        if !wanted(name) {
            continue;
        }
        let extra = if args.quick { quick } else { full };
        let section = run_bench(&bins, name, extra)?;
        println!("{}", to_markdown(&section));
        sections.push(section);
    }
    if wanted("alert") {
        let runs = if args.quick {
            ALERT_RUNS.1
        } else {
            ALERT_RUNS.0
        };
        let section = time_to_alert(&bins, runs)?;
        println!("{}", to_markdown(&section));
        sections.push(section);
    }

    let out = args.out.clone().unwrap_or_else(|| {
        if args.quick {
            cmd::target_dir().join("BENCHMARKS.quick.md")
        } else {
            cmd::workspace_root().join("BENCHMARKS.md")
        }
    });
    fs::write(&out, document(&sections, args)?)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("bench: wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Runs `outflow-bench <name> --json <extra>` and reads its section.
fn run_bench(bins: &Path, name: &str, extra: &[&str]) -> Result<Section> {
    let mut c = Command::new(bins.join("outflow-bench"));
    c.arg(name)
        .arg("--json")
        .args(extra)
        .env("OUTFLOW_AGENT_BIN", bins.join("outflow-agent"))
        .env("OUTFLOW_COLLECTOR_BIN", bins.join("outflow-collector"))
        .env("OUTFLOW_TESTPEER_BIN", bins.join("outflow-testpeer"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    println!("bench: {}", cmd::display(&c));
    let out = cmd::output(&mut c).with_context(|| format!("benchmark {name}"))?;
    serde_json::from_str(out.trim()).with_context(|| format!("reading the {name} section"))
}

/// The demo's time from the extractor's start to its alert, median of `runs`.
fn time_to_alert(bins: &Path, runs: usize) -> Result<Section> {
    let mut times = Vec::new();
    for i in 0..runs {
        let t = demo::time_to_alert(bins).context("measuring the demo's time to alert")?;
        println!("bench: alert run {}: {:.1} s", i + 1, t.as_secs_f64());
        times.push(t);
    }
    times.sort();
    let median = times[times.len() / 2];
    Ok(Section {
        title: "Time from the start of a bulk extraction to its alert (demo setup)".into(),
        method: "`cargo xtask demo`'s setup with the release binaries: a collector, an agent \
                 (interval 1 s), a streaming inference server in a network namespace and eight \
                 chat-like clients; one client starts extracting in bulk. The time runs from \
                 the extractor's spawn to the moment the collector's alerts show the \
                 extractor's address."
            .into(),
        commands: vec!["sudo cargo xtask bench --only alert".into()],
        header: vec!["runs".into(), "median".into(), "each".into()],
        rows: vec![vec![
            runs.to_string(),
            secs(median),
            times
                .iter()
                .map(|t| secs(*t))
                .collect::<Vec<_>>()
                .join(" / "),
        ]],
        targets: Vec::new(),
        notes: vec![
            "What the time is made of: the agent's interval (1 s), the collector's batch \
             window and the detectors' thresholds (`outflow-collector print-config`), which \
             the demo leaves at their defaults."
                .into(),
        ],
    })
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn to_markdown(s: &Section) -> String {
    let mut md = format!("## {}\n\n{}\n\n", s.title, s.method);
    md.push_str("```sh\n");
    for c in &s.commands {
        md.push_str(c);
        md.push('\n');
    }
    md.push_str("```\n\n");
    md.push_str(&table(&s.header, &s.rows));
    if !s.targets.is_empty() {
        md.push('\n');
        md.push_str(&targets_table(s.targets.iter()));
    }
    for n in &s.notes {
        let _ = write!(md, "\n- {n}");
    }
    md.push('\n');
    md
}

fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut md = format!("| {} |\n|", header.join(" | "));
    md.push_str(&" --- |".repeat(header.len()));
    md.push('\n');
    for r in rows {
        let _ = writeln!(md, "| {} |", r.join(" | "));
    }
    md
}

fn targets_table<'a>(targets: impl Iterator<Item = &'a Target>) -> String {
    let header = ["target", "limit", "measured", ""].map(String::from);
    let rows: Vec<Vec<String>> = targets
        .map(|t| {
            vec![
                t.what.clone(),
                t.target.clone(),
                t.measured.clone(),
                if t.met { "met" } else { "**missed**" }.into(),
            ]
        })
        .collect();
    table(&header, &rows)
}

fn document(sections: &[Section], args: &Args) -> Result<String> {
    let mut md = String::from(
        "# Benchmarks\n\nWhat outflow costs, measured on one machine by `sudo cargo xtask bench` \
         (this file is its output; `--only <name>` reruns one part). Every figure is a median \
         of several runs or a ratio of things measured side by side in one run, because a \
         shared VM is noisy; no test asserts a time.\n\n",
    );
    if args.quick {
        md.push_str(
            "**Quick run (`--quick`): fewer, shorter runs; not the published figures.**\n\n",
        );
    }
    md.push_str("## Machine\n\n");
    md.push_str(&machine()?);
    md.push_str("\n## Targets\n\n");
    md.push_str(&targets_table(sections.iter().flat_map(|s| &s.targets)));
    md.push('\n');
    for s in sections {
        md.push_str(&to_markdown(s));
        md.push('\n');
    }
    Ok(md)
}

/// The machine, the kernel, the toolchains and the commit the figures come from.
fn machine() -> Result<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let virt = if cpuinfo.contains(" hypervisor") {
        "a virtual machine"
    } else {
        "bare metal"
    };
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib as f64 / 1048576.0),
        );
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let quiet = |c: &mut Command| {
        cmd::output(c)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let rustc = quiet(Command::new("rustc").arg("--version"));
    let nightly = quiet(Command::new("rustc").args(["+nightly", "--version"]));
    let commit = quiet(
        Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(cmd::workspace_root()),
    );
    let date = quiet(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    Ok(format!(
        "- CPU: {model}, {cores} cores ({virt}); memory {mem}\n- Linux {}\n- {rustc}; eBPF \
         built with {nightly}\n- commit {commit}, measured {date}\n",
        kernel.trim()
    ))
}
