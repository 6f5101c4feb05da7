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
    /// agent, start, ingest, detect, cluster, alert.
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
const BENCHES: [(&str, &[&str], &[&str]); 10] = [
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
    ("start", &[], &["--runs", "3"]),
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
            "--runs",
            "1",
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
        "start",
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
    // Into the published file, `--only` replaces its parts and keeps the rest; a whole run
    // replaces every part but keeps their subsections written by hand.
    let doc = match fs::read_to_string(&out) {
        Ok(old) if !args.quick && !args.only.is_empty() => merge(&old, &sections, &machine()?),
        Ok(old) if !args.quick => keep_subsections(&old, &document(&sections, args)?),
        _ => document(&sections, args)?,
    };
    fs::write(&out, doc).with_context(|| format!("writing {}", out.display()))?;
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
         (this file is its output; `--only <name>` reruns one part; the subsections under a \
         part are written by hand and kept). Every figure is a median \
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

/// `old` (a report) with `sections` in place of the parts of the same titles (added at the end
/// if it has none), each part's own subsections (`### `, written by hand) kept, their rows of
/// the targets table replaced or added, and the machine they were measured on noted in each.
fn merge(old: &str, sections: &[Section], machine: &str) -> String {
    let mut parts = split_parts(old);
    for s in sections {
        let heading = format!("## {}\n", s.title);
        let mut fresh = to_markdown(s);
        let _ = write!(
            fresh,
            "- Measured alone (`cargo xtask bench --only`), not with the rest of this report:\n{}",
            machine
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect::<String>()
        );
        match parts.iter_mut().find(|p| p.starts_with(&heading)) {
            Some(p) => *p = with_subsections(&fresh, subsections(p)),
            None => parts.push(format!("{fresh}\n")),
        }
        if let Some(t) = parts.iter_mut().find(|p| p.starts_with("## Targets\n")) {
            for row in targets_table(s.targets.iter()).lines().skip(2) {
                let name = row.split(" | ").next().unwrap_or(row);
                match t.lines().position(|l| l.split(" | ").next() == Some(name)) {
                    Some(i) => {
                        let mut lines: Vec<&str> = t.lines().collect();
                        lines[i] = row;
                        *t = format!("{}\n\n", lines.join("\n").trim_end());
                    }
                    None => {
                        let end = t.trim_end().len();
                        t.replace_range(end.., &format!("\n{row}\n\n"));
                    }
                }
            }
        }
    }
    parts.concat()
}

/// `doc` (a whole new report) with the subsections written by hand under each part of `old`
/// put back under the part of the same title.
fn keep_subsections(old: &str, doc: &str) -> String {
    let old = split_parts(old);
    split_parts(doc)
        .into_iter()
        .map(|p| {
            let heading = p.lines().next().unwrap_or_default();
            match old.iter().find(|o| o.lines().next() == Some(heading)) {
                Some(o) if p.starts_with("## ") => with_subsections(&p, subsections(o)),
                _ => p,
            }
        })
        .collect()
}

/// A report cut at each `## ` heading: the text before the first, then one part each.
fn split_parts(text: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    for line in text.split_inclusive('\n') {
        match parts.last_mut() {
            Some(p) if !line.starts_with("## ") => p.push_str(line),
            _ => parts.push(line.to_string()),
        }
    }
    parts
}

/// The subsections (`### `) of a part: from the first to its end.
fn subsections(part: &str) -> &str {
    part.find("\n### ").map_or("", |i| part[i + 1..].trim_end())
}

/// A part made of `fresh` (a section as `to_markdown` writes it) and `kept`, with one blank
/// line between and after.
fn with_subsections(fresh: &str, kept: &str) -> String {
    match kept {
        "" => format!("{}\n\n", fresh.trim_end()),
        _ => format!("{}\n\n{kept}\n\n", fresh.trim_end()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn section(title: &str, measured: &str) -> Section {
        Section {
            title: title.into(),
            method: "How.".into(),
            commands: vec!["run it".into()],
            header: vec!["a".into()],
            rows: vec![vec![measured.into()]],
            targets: vec![Target {
                what: format!("{title} speed"),
                target: ">= 1".into(),
                measured: measured.into(),
                met: true,
            }],
            notes: Vec::new(),
        }
    }

    #[test]
    fn only_replaces_its_parts_and_keeps_the_rest() {
        let old = format!(
            "# Benchmarks\n\n## Machine\n\n- old machine\n\n## Targets\n\n{}\n{}\n### By hand\n\nkept\n\n{}",
            targets_table(
                [section("A", "1"), section("B", "2")]
                    .iter()
                    .flat_map(|s| &s.targets)
            ),
            to_markdown(&section("A", "1")),
            to_markdown(&section("B", "2")),
        );
        let new = merge(
            &old,
            &[section("A", "9"), section("C", "3")],
            "- new machine\n",
        );
        // A replaced, its hand-written subsection kept; B untouched; C added.
        assert!(new.contains("| 9 |\n"), "{new}");
        assert!(!new.contains("| A speed | >= 1 | 1 |"), "{new}");
        assert!(new.contains("| A speed | >= 1 | 9 | met |\n| B speed | >= 1 | 2 | met |\n| C speed | >= 1 | 3 | met |\n\n## A\n"), "{new}");
        assert!(
            new.contains("  - new machine\n\n### By hand\n\nkept\n\n## B\n"),
            "{new}"
        );
        assert!(new.contains("- old machine"), "{new}");
        assert!(new.ends_with("  - new machine\n\n"), "{new}");
        assert_eq!(new.matches("## A\n").count(), 1);
        assert_eq!(new.matches("## C\n").count(), 1);
        // A row replaced in place, the blank line after the table as it was.
        let again = merge(&old, &[section("A", "8")], "- new machine\n");
        assert!(
            again.contains("| A speed | >= 1 | 8 | met |\n| B speed | >= 1 | 2 | met |\n\n## A\n"),
            "{again}"
        );
        // A whole run: every part new, the subsection written by hand kept.
        let whole = format!("# Benchmarks\n\n{}\n", to_markdown(&section("A", "7")));
        let whole = keep_subsections(&old, &whole);
        assert!(
            whole.contains("| A speed | >= 1 | 7 | met |\n\n### By hand\n\nkept\n\n"),
            "{whole}"
        );
        assert!(!whole.contains("\n## B"), "{whole}");
    }
}
