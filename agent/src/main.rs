//! `outflow-agent`: counts the bytes of every TCP connection in a cgroup with eBPF and emits
//! per-connection deltas each interval.
use std::{
    io::{BufWriter, Write, stdout},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use log::{info, warn};
use outflow_agent::{
    agent::Agent,
    config::{Config, DEFAULT_CONFIG_PATH, OutputFormat},
    durability::Durability,
    export::{self, Exporter, SHUTDOWN_GRACE},
    kernel,
    metrics::{self, Metrics},
    probe::{self, Need, Outcome, Report, Verdict},
    record::{Discard, JsonLines, Sink, Text},
};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};

/// Counts the bytes of every TCP connection of a cgroup, exactly, with eBPF, and reports
/// per-connection deltas every interval.
///
/// The kernel programs are attached to a cgroup v2 directory (every socket in it and below is
/// counted) and pinned under bpffs, so counting goes on while the agent restarts and a new agent
/// continues where the last one stopped. `outflow-agent detach` removes them.
///
/// With --collector, the deltas are also streamed to an outflow collector over gRPC, through a
/// bounded disk spool (nothing is lost while the collector is away, unless the spool fills up:
/// then the oldest batches go, and the loss is reported).
///
/// Prometheus metrics, liveness (/healthz) and readiness (/readyz: ready once the programs are
/// attached) are served over HTTP on --metrics-listen (127.0.0.1:9410). Under systemd
/// (Type=notify), the agent tells it when it is ready, pings its watchdog from the read loop,
/// and says when it stops.
///
/// Settings come from a TOML file (--config, else /etc/outflow/agent.toml if it exists) and are
/// overridden by flags; `outflow-agent print-config` shows the result. Needs root, or the
/// capabilities `outflow-agent check` lists; that command also shows whether this kernel has
/// what the agent needs (Linux 5.10 or later).
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

    /// Connections tracked one by one (about twice the peak of live ones; a multiple of 8);
    /// beyond, bytes go to the overflow counters [default: 65536]
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

    /// Address of the HTTP endpoint: Prometheus metrics at /metrics, liveness at /healthz,
    /// readiness at /readyz (ready once the programs are attached); port 0 picks a free one
    /// [default: 127.0.0.1:9410]
    #[arg(long, global = true, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,

    /// Stream the deltas to this collector: http://HOST:PORT or https://HOST:PORT [default: no export]
    #[arg(long, global = true, value_name = "URL", help_heading = "Export")]
    collector: Option<String>,

    /// File holding the bearer token for the collector
    #[arg(long, global = true, value_name = "FILE", help_heading = "Export")]
    token_file: Option<PathBuf>,

    /// PEM CA certificate(s) to verify the collector with [default: the system's roots]
    #[arg(long, global = true, value_name = "FILE", help_heading = "Export")]
    tls_ca: Option<PathBuf>,

    /// PEM client certificate, for mutual TLS (with --tls-key)
    #[arg(long, global = true, value_name = "FILE", help_heading = "Export")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of the client certificate
    #[arg(long, global = true, value_name = "FILE", help_heading = "Export")]
    tls_key: Option<PathBuf>,

    /// Name to verify the collector's certificate against, and to send as SNI [default: the URL's host]
    #[arg(long, global = true, value_name = "NAME", help_heading = "Export")]
    tls_domain: Option<String>,

    /// Directory of the batches not yet acknowledged [default: /var/lib/outflow/spool]
    #[arg(long, global = true, value_name = "DIR", help_heading = "Export")]
    spool_dir: Option<PathBuf>,

    /// Spool bound in bytes; when full, the oldest batches are dropped and reported [default: 268435456]
    #[arg(long, global = true, value_name = "BYTES", help_heading = "Export")]
    spool_max_bytes: Option<u64>,

    /// Directory of the agent's id and epoch [default: /var/lib/outflow]
    #[arg(long, global = true, value_name = "DIR", help_heading = "Export")]
    state_dir: Option<PathBuf>,

    /// Label sent to the collector (repeatable; replaces the file's label of the same key)
    #[arg(long = "label", global = true, value_name = "KEY=VALUE", value_parser = parse_label, help_heading = "Export")]
    labels: Vec<(String, String)>,

    /// Balancer or gateway network whose PROXY headers and forwarding headers are believed
    /// (repeatable; replaces the file's list) [default: none]
    #[arg(
        long = "trusted-peer",
        global = true,
        value_name = "CIDR",
        help_heading = "Attribution"
    )]
    trusted_peers: Vec<ipnet::IpNet>,

    /// Request header naming the client: NAME=address (X-Forwarded-For, Forwarded, X-Real-IP,
    /// ...) or NAME=id (an API key id, a tenant) (repeatable, tried in order; replaces the
    /// file's list)
    #[arg(long = "header", global = true, value_name = "NAME=KIND", value_parser = parse_header, help_heading = "Attribution")]
    headers: Vec<outflow_attribution::HeaderRule>,

    /// Secret of the keyed hash that replaces client ids (the same file on every host)
    #[arg(long, global = true, value_name = "FILE", help_heading = "Attribution")]
    id_key_file: Option<PathBuf>,

    /// Report client ids as they are, not hashed (ids that are not secret, tests)
    #[arg(long, global = true, help_heading = "Attribution")]
    raw_ids: bool,

    /// Accept client ids that the serving application sets on its sockets
    /// (setsockopt SOL_OUTFLOW; see the README)
    #[arg(long, global = true, help_heading = "Attribution")]
    annotations: bool,

    /// Do not look for PROXY protocol headers at the start of connections
    #[arg(long, global = true, help_heading = "Attribution")]
    no_proxy_protocol: bool,
}

/// The agent's ring buffer fd, borrowed for readiness (the agent owns and reads it).
struct EventsFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for EventsFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

fn parse_header(s: &str) -> Result<outflow_attribution::HeaderRule, String> {
    let (name, kind) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=address or NAME=id (got {s:?})"))?;
    let kind = match kind {
        "address" => outflow_attribution::HeaderKind::Address,
        "id" => outflow_attribution::HeaderKind::Id,
        _ => return Err(format!("kind must be `address` or `id` (got {kind:?})")),
    };
    Ok(outflow_attribution::HeaderRule {
        name: name.to_ascii_lowercase(),
        kind,
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE (got {s:?})")),
    }
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
    /// Show whether this kernel and this process have what the agent needs, and exit
    ///
    /// Probes every kernel feature the agent uses (program types, map types, the helpers each
    /// program calls, BPF links, the close tracepoint) and the capabilities it needs, the way
    /// the agent does at every start, and prints a table: the feature, what it is needed for,
    /// the first Linux release that has it, and the result: ok, missing, not probed (without
    /// the capabilities the kernel cannot be probed) or absent (not needed). Loads and attaches
    /// nothing. The last line is the verdict: `ready`; `ready, degraded: ...` (the agent runs
    /// without a part, and says what that costs); or `refused: ...` with the reason, the line
    /// the agent would fail with. Exits 0 when the agent would start, 1 when it would refuse.
    /// With --output json, prints one JSON object instead (`rows` and `verdict`).
    Check,
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
        if let Some(v) = self.metrics_listen {
            c.metrics_listen = v;
        }
        let e = &mut c.export;
        if let Some(v) = &self.collector {
            e.collector = Some(v.clone());
        }
        if let Some(v) = &self.token_file {
            e.token_file = Some(v.clone());
        }
        if let Some(v) = &self.tls_ca {
            e.tls.ca = Some(v.clone());
        }
        if let Some(v) = &self.tls_cert {
            e.tls.cert = Some(v.clone());
        }
        if let Some(v) = &self.tls_key {
            e.tls.key = Some(v.clone());
        }
        if let Some(v) = &self.tls_domain {
            e.tls.domain = Some(v.clone());
        }
        if let Some(v) = &self.spool_dir {
            e.spool_dir = v.clone();
        }
        if let Some(v) = self.spool_max_bytes {
            e.spool_max_bytes = v;
        }
        if let Some(v) = &self.state_dir {
            e.state_dir = v.clone();
        }
        for (k, v) in &self.labels {
            e.labels.insert(k.clone(), v.clone());
        }
        let a = &mut c.attribution;
        if !self.trusted_peers.is_empty() {
            a.trusted_peers = self.trusted_peers.clone();
        }
        if !self.headers.is_empty() {
            a.headers = self.headers.clone();
        }
        if let Some(v) = &self.id_key_file {
            a.id_key_file = Some(v.clone());
        }
        if self.raw_ids {
            a.hash_ids = false;
        }
        if self.annotations {
            a.annotations = true;
        }
        if self.no_proxy_protocol {
            a.proxy_protocol = false;
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
    if let Err(e) = outflow_agent::crash::arm_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once (typed errors often already show
/// their source in their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

fn run(cli: &Cli) -> Result<ExitCode> {
    let cfg = cli.config()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintConfig => {
            print!("{}", cfg.to_toml());
        }
        Command::Check => {
            let report = probe::probe(&cfg.pin_dir);
            let json = cli.output == Some(OutputFormat::Json);
            match print_check(&report, json) {
                // A reader that stopped early (`| head`) is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => r.context("write the report")?,
            }
            if matches!(report.verdict(), Verdict::Refused(_)) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Detach => {
            let removed = kernel::detach(&cfg.pin_dir)?;
            info!(
                "removed {} pinned objects from {}",
                removed.len(),
                cfg.pin_dir.display()
            );
        }
        Command::Run => {
            // The read loop runs on this thread; the export's sender on the one worker.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("start the async runtime")?;
            rt.block_on(run_agent(cfg))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The verdict in a word (`ready`, `degraded` or `refused`), and the line `check` ends with:
/// `kernel <release>: ready`, `...: ready, degraded: <what the agent runs without, and what
/// that costs>` or `...: refused: <why>`.
fn verdict_line(report: &Report) -> (&'static str, String) {
    let (status, text) = match report.verdict() {
        Verdict::Ready => ("ready", "ready".to_string()),
        Verdict::Degraded(missing) => {
            let what: Vec<String> = missing
                .iter()
                .map(|r| match r.need {
                    Need::Degrade { cost } => format!("{} missing: {cost}", r.feature),
                    _ => format!("{} missing", r.feature),
                })
                .collect();
            ("degraded", format!("ready, degraded: {}", what.join("; ")))
        }
        Verdict::Refused(refusal) => ("refused", format!("refused: {refusal}")),
    };
    (status, format!("kernel {}: {text}", report.release))
}

/// What `check` shows as a probe's result: the outcome, and why a feature was not probed.
fn result_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::NotProbed(why) => format!("not probed ({why})"),
        o => o.label().to_string(),
    }
}

/// The report on stdout, as a table or as one JSON object.
fn print_check(report: &Report, json: bool) -> std::io::Result<()> {
    let mut out = stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &check_json(report))?;
        writeln!(out)?;
    } else {
        write_check_table(&mut out, report)?;
    }
    out.flush()
}

/// The report as a table, one row per requirement, then the verdict.
fn write_check_table(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    let mut rows = vec![["feature", "needed for", "since", "result"].map(String::from)];
    rows.extend(report.findings.iter().map(|f| {
        let r = f.requirement;
        [
            r.feature.to_string(),
            r.needed_for.to_string(),
            r.since.to_string(),
            result_text(&f.outcome),
        ]
    }));
    let mut widths = [0; 3];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for [feature, needed_for, since, result] in &rows {
        let [w0, w1, w2] = widths;
        writeln!(
            out,
            "{feature:w0$}  {needed_for:w1$}  {since:w2$}  {result}"
        )?;
    }
    writeln!(out, "{}", verdict_line(report).1)
}

/// The report as one JSON object: the kernel release, a row per requirement, the verdict.
fn check_json(report: &Report) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = report
        .findings
        .iter()
        .map(|f| {
            let r = f.requirement;
            let (need, without) = match r.need {
                Need::Refuse => ("refuse", None),
                Need::Degrade { cost } => ("degrade", Some(cost)),
                Need::Info { without } => ("info", Some(without)),
            };
            let why = match &f.outcome {
                Outcome::NotProbed(why) => Some(why.as_str()),
                _ => None,
            };
            serde_json::json!({
                "feature": r.feature,
                "needed_for": r.needed_for,
                "since": r.since,
                "need": need,
                "without": without,
                "result": f.outcome.label(),
                "not_probed_because": why,
            })
        })
        .collect();
    let (status, line) = verdict_line(report);
    serde_json::json!({
        "kernel": report.release,
        "rows": rows,
        "verdict": { "status": status, "line": line },
    })
}

/// Tells systemd (a `Type=notify` unit) how the agent is doing; nothing without NOTIFY_SOCKET.
fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
}

async fn run_agent(mut cfg: Config) -> Result<()> {
    // First, so that a stop requested while starting still ends in the final report.
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    // Before anything is loaded: /healthz answers and /readyz says "not yet" while starting,
    // and an address in use stops the agent before it attaches anything.
    let metrics = Arc::new(Metrics::new());
    let listener = metrics::bind(cfg.metrics_listen).await?;
    cfg.metrics_listen = listener.local_addr().context("read the metrics address")?;
    tokio::spawn(metrics::serve(listener, Arc::clone(&metrics)));
    let sink: Box<dyn Sink + Send> = match cfg.output {
        OutputFormat::Json => Box::new(JsonLines(BufWriter::new(stdout()))),
        OutputFormat::Text => Box::new(Text(BufWriter::new(stdout()))),
        OutputFormat::None => Box::new(Discard),
    };
    // Everything about the collector that can be wrong is checked before anything starts.
    let exporter = match export::prepare(&cfg.export)? {
        Some(prepared) => {
            kernel::require_capabilities(probe::Operation::Run {
                pin_dir: &cfg.pin_dir,
            })?;
            let exporter = Exporter::start(prepared, &cfg.export)?;
            metrics.set_export(exporter.status_source(cfg.export.spool_max_bytes));
            Some(exporter)
        }
        None => None,
    };
    let durability = exporter
        .as_ref()
        .map(|e| Box::new(e.spooler()) as Box<dyn Durability + Send>);
    let mut agent = Agent::start(&cfg, sink, durability)?;
    metrics.set_ready(true);
    info!(
        "attached; metrics at http://{}/metrics, readiness at /readyz",
        cfg.metrics_listen
    );
    notify(&[NotifyState::Ready, NotifyState::Status("counting")]);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // With WatchdogSec= in the unit: pinged from this loop, so a stuck read loop is restarted.
    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| {
            (d / 2).max(Duration::from_millis(10))
        }));
    let bpf_stats = kernel::bpf_stats_enabled;
    let poll = |agent: &mut Agent| -> Result<()> {
        let t0 = Instant::now();
        agent.poll()?;
        let stats_on = bpf_stats();
        metrics.interval_done(
            t0.elapsed(),
            agent.stats(),
            agent.overflow_total(),
            stats_on,
            if stats_on {
                agent.program_runs()
            } else {
                Vec::new()
            },
        );
        Ok(())
    };
    // Turn events are read as they come, so that the ring buffer does not fill between reads.
    // SAFETY: the fd is the agent's ring buffer, open for as long as `agent` lives, which is
    // longer than `events` (declared after it, dropped before it).
    let events = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            EventsFd(agent.events_fd()),
            tokio::io::Interest::READABLE,
        )
    }
    .context("watch the kernel's event ring buffer")?;
    loop {
        tokio::select! {
            _ = tick.tick() => poll(&mut agent)?,
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify(&[NotifyState::Watchdog]),
            ready = events.readable() => {
                let mut guard = ready.context("wait for kernel events")?;
                agent.drain_events();
                guard.clear_ready();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: final report"),
    ]);
    metrics.set_ready(false);
    // Report what was counted up to now; the kernel goes on counting for the next agent.
    poll(&mut agent)?;
    if let Some(e) = exporter {
        e.shutdown(SHUTDOWN_GRACE).await;
    }
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
    fn errors_show_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(outflow_agent::config::ConfigError::Read {
            path: "/x.toml".into(),
            source: io,
        })
        .context("load the config");
        assert_eq!(
            one_line(&e),
            "load the config: cannot read config file /x.toml: gone"
        );
    }

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
        assert!(c.export.collector.is_none());
    }

    #[test]
    fn export_flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "[export]\ncollector = \"http://10.0.0.1:4317\"\nspool_max_bytes = 2000000\n[export.labels]\nregion = \"eu\"\nrack = \"r1\"\n",
        )
        .expect("write");
        let cli = Cli::parse_from([
            "outflow-agent",
            "print-config",
            "--config",
            file.to_str().expect("utf-8"),
            "--collector",
            "https://collector.internal:4317",
            "--tls-ca",
            "/etc/outflow/ca.pem",
            "--tls-cert",
            "/etc/outflow/agent.pem",
            "--tls-key",
            "/etc/outflow/agent.key",
            "--token-file",
            "/etc/outflow/token",
            "--spool-dir",
            "/srv/spool",
            "--state-dir",
            "/srv/state",
            "--label",
            "region=us",
            "--label",
            "cluster=a=b",
        ]);
        let c = cli.config().expect("valid");
        let e = &c.export;
        assert_eq!(
            e.collector.as_deref(),
            Some("https://collector.internal:4317")
        );
        assert_eq!(e.spool_max_bytes, 2_000_000);
        assert_eq!(e.spool_dir, PathBuf::from("/srv/spool"));
        assert_eq!(e.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(e.tls.key, Some(PathBuf::from("/etc/outflow/agent.key")));
        assert_eq!(e.labels["region"], "us");
        assert_eq!(e.labels["rack"], "r1");
        assert_eq!(e.labels["cluster"], "a=b");
        // print-config shows it, and reads back.
        assert_eq!(Config::parse(&c.to_toml()).expect("round trip"), c);

        let cli = Cli::parse_from(["outflow-agent", "--collector", "ftp://x"]);
        let e = format!("{:#}", cli.config().expect_err("bad scheme"));
        assert!(e.contains("`export.collector`"), "{e}");
        assert!(Cli::try_parse_from(["outflow-agent", "--label", "novalue"]).is_err());
    }
}
