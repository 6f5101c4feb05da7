//! The agent's CPU and memory with many live connections (interval 1 s), as deployed: the
//! real `outflow-agent` streaming to a real `outflow-collector`, both in a network namespace of
//! this process's own where child processes hold the connections (see `holder`). The server
//! end of each connection is in the agent's cgroup, the client end is not: one slot per
//! connection, as on an inference host.
use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use outflow_tests::{
    agent::{PinDir, agent_bin},
    cgroup::TestCgroup,
    collector::{Collector, Metrics, TempDir, free_port},
    process::ChildProcess,
};

use crate::{
    holder::{HoldOptions, Holders},
    report::{Section, median, thousands},
    sys,
};

#[derive(clap::Args)]
pub struct Args {
    /// Live connection counts to measure at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    conns: Vec<u32>,
    /// Fraction of the connections that send every second (100 bytes each), so that the
    /// agent reports that many deltas per interval; 0 measures idle connections only.
    #[arg(long, value_delimiter = ',', default_value = "0,0.1")]
    active: Vec<f64>,
    /// Measurement windows per case; the CPU figure is their median.
    #[arg(long, default_value_t = 3)]
    windows: usize,
    /// Length of one window, in seconds.
    #[arg(long, default_value_t = 10)]
    window_secs: u64,
}

const SEND_BYTES: usize = 100;
/// Target of the issue at 100k connections.
const TARGET_CPU_PERCENT: f64 = 2.0;
const TARGET_RSS: u64 = 100 * 1024 * 1024;

struct Case {
    conns: u32,
    active: f64,
    /// CPU, % of one core, per window.
    cpu: Vec<f64>,
    /// Deltas the collector applied per second over the windows: what the agent reported.
    deltas_per_sec: f64,
    rss: u64,
    peak_rss: u64,
}

pub fn run(args: &Args) -> Result<Section> {
    ensure!(
        args.windows > 0 && args.window_secs > 0,
        "--windows and --window-secs must be positive"
    );
    crate::packet::enter_private_netns()?;
    let mut cases = Vec::new();
    for &conns in &args.conns {
        for &active in &args.active {
            cases.push(measure(args, conns, active)?);
        }
    }
    Ok(section(args, &cases))
}

fn measure(args: &Args, conns: u32, active: f64) -> Result<Case> {
    eprintln!("agent: {conns} connections, {:.0}% active", active * 100.0);
    let cgroup = TestCgroup::new("bench-agent");
    let pin = PinDir::new("bench-agent");
    let data = TempDir::new("bench-agent-collector");
    let state = TempDir::new("bench-agent-state");
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let collector = Collector::start(
        free_port(),
        &[
            "--data-dir",
            data.as_arg(),
            "--metrics-listen",
            &metrics.to_string(),
        ],
    );
    let capacity = (conns + conns / 4).max(1024).to_string();
    let agent = start_agent(&[
        "--cgroup",
        cgroup.as_arg(),
        "--pin-dir",
        pin.as_arg(),
        "--interval",
        "1s",
        "--include-loopback",
        "--max-connections",
        &capacity,
        "--output",
        "none",
        "--collector",
        &collector.url(),
        "--state-dir",
        state.as_arg(),
        "--spool-dir",
        &format!("{}/spool", state.as_arg()),
    ])?;
    let mut holders = Holders::default();
    holders.grow_to(
        conns,
        &HoldOptions {
            server_cgroup: Some(cgroup.path().to_path_buf()),
            send_bytes: SEND_BYTES,
            active_fraction: active,
        },
    )?;
    // Let the agent report the new connections once before measuring.
    thread::sleep(Duration::from_secs(3));
    let pid = agent.pid();
    let mut cpu = Vec::new();
    let (d0, t0) = (deltas_applied(metrics)?, Instant::now());
    for w in 0..args.windows {
        let (c0, t0) = (sys::cpu_time(pid)?, Instant::now());
        thread::sleep(Duration::from_secs(args.window_secs));
        let (c1, t1) = (sys::cpu_time(pid)?, Instant::now());
        ensure!(
            agent.try_status().is_none(),
            "the agent exited during the benchmark"
        );
        let pct = 100.0 * (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64();
        eprintln!("agent: window {}: {pct:.2}% of one core", w + 1);
        cpu.push(pct);
    }
    let deltas_per_sec = (deltas_applied(metrics)? - d0) / t0.elapsed().as_secs_f64();
    let case = Case {
        conns,
        active,
        cpu,
        deltas_per_sec,
        rss: sys::rss_bytes(pid)?,
        peak_rss: sys::peak_rss_bytes(pid)?,
    };
    drop(holders);
    // A clean stop; the pin directory's guard then detaches what it pinned.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_timeout(Duration::from_secs(30));
    Ok(case)
}

/// `outflow_collector_deltas_total` from the collector's metrics endpoint.
fn deltas_applied(metrics: SocketAddr) -> Result<f64> {
    let m = Metrics::fetch(metrics).with_context(|| format!("reading http://{metrics}/metrics"))?;
    Ok(m.value("outflow_collector_deltas_total"))
}

/// Starts the agent and waits for its "attached" log line.
pub(crate) fn start_agent(args: &[&str]) -> Result<ChildProcess> {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("run")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let agent = ChildProcess::spawn("outflow-agent", &mut cmd);
    let stderr = agent.take_stderr().context("agent stderr")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("attached to") {
                let _ = tx.send(Ok(()));
            } else if line.contains("ERROR") || line.contains("error") {
                let _ = tx.send(Err(line));
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => Ok(agent),
        Ok(Err(line)) => bail!("the agent failed to start: {line}"),
        Err(_) => bail!("the agent did not attach within 60 s"),
    }
}

fn section(args: &Args, cases: &[Case]) -> Section {
    let mut s = Section::new("agent", "Agent CPU and memory with live connections");
    s.method = format!(
        "The release `outflow-agent` (interval 1 s, exporting to an `outflow-collector` over \
         gRPC, no stdout output) counts a cgroup in which child processes hold N live loopback \
         TCP connections (server ends in the cgroup, client ends outside it). A fraction of the \
         connections sends {SEND_BYTES} bytes every second, so the agent reports that many \
         deltas each interval (\"deltas reported/s\" is what the collector applied, which \
         checks that). CPU is the agent's user+system time (/proc/<pid>/stat) over {} \
         windows of {} s, median; memory is its resident set (VmRSS, and the peak VmHWM), \
         which includes the pages of the memory-mapped connection table it has read.",
        args.windows, args.window_secs
    );
    s.commands = vec![format!(
        "sudo target/release/outflow-bench agent --conns {} --active {} --windows {} --window-secs {}",
        args.conns
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.active
            .iter()
            .map(f64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.windows,
        args.window_secs
    )];
    s.header = [
        "live connections",
        "sending each second",
        "deltas reported/s",
        "agent CPU (% of one core)",
        "windows",
        "RSS",
        "peak RSS",
    ]
    .map(String::from)
    .to_vec();
    for c in cases {
        s.row([
            thousands(f64::from(c.conns)),
            thousands(f64::from(c.conns) * c.active),
            thousands(c.deltas_per_sec),
            format!("{:.2}%", median(&c.cpu)),
            c.cpu
                .iter()
                .map(|p| format!("{p:.2}"))
                .collect::<Vec<_>>()
                .join(" / "),
            sys::mib(c.rss),
            sys::mib(c.peak_rss),
        ]);
    }
    let at_target: Vec<&Case> = cases.iter().filter(|c| c.conns == 100_000).collect();
    if let Some(worst) = at_target
        .iter()
        .max_by(|a, b| median(&a.cpu).total_cmp(&median(&b.cpu)))
    {
        let cpu = median(&worst.cpu);
        s.target(
            &format!(
                "agent CPU at 100,000 live connections ({} sending)",
                thousands(f64::from(worst.conns) * worst.active)
            ),
            &format!("< {TARGET_CPU_PERCENT}% of one core"),
            format!("{cpu:.2}%"),
            cpu < TARGET_CPU_PERCENT,
        );
        let peak = at_target.iter().map(|c| c.peak_rss).max().unwrap_or(0);
        s.target(
            "agent memory (peak RSS) at 100,000 live connections",
            "< 100 MiB",
            sys::mib(peak),
            peak < TARGET_RSS,
        );
    }
    s
}
