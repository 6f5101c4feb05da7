//! `outflow-fleet`: a fleet of agents' export pipelines in one process, for the fault runs that
//! hit many agents at once (hundreds of real agents, each loading the kernel programs, are too
//! many for one test machine).
//!
//! ```text
//! outflow-fleet --collector URL --agents N --base-dir DIR [--interval 1s] [--spool-max-bytes B]
//! ```
//!
//! Agent `i` is the agent's own export (`outflow_agent::export`: identity, disk spool, sender
//! with exponential backoff and full jitter) with its state in `DIR/agent-<i>/state` and its
//! spool in `DIR/agent-<i>/spool`. It is polled every 100 ms as the agent's read loop drives its
//! durability step (`make_durable` with the connection's record if it has bytes, `report` for
//! the export record, and `committed` unless the interval was deferred). Its one connection,
//! the server side of
//! one from `outflow_tests::faults::fleet::client_addr(i)`, carries `1000 + i` response bytes
//! and `100 + i % 100` request bytes every interval, the agents' intervals spread evenly over
//! it. Bytes not yet flushed stay pending, as the kernel table keeps them, and go with a later
//! poll.
//!
//! On stdout, JSON lines (`outflow_tests::faults::fleet::FleetLine`): progress every 500 ms;
//! after SIGTERM, SIGINT or the end of stdin no more traffic, and once every spool is empty
//! (all acknowledged) a `done` line and exit 0; an `error` line and exit 1 if something fails,
//! or if the spools do not empty within 120 s (a second SIGTERM or SIGINT gives up at once, with
//! an error line). `RUST_LOG` sets what the agents log on stderr
//! (default: errors only; `warn` shows every disconnection).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use outflow_agent::{
    config::{Config, ExportConfig},
    durability::{Durability, Flushed, Interval},
    export::{Exporter, Spooler, prepare},
    record::{ConnRecord, ExportRecord, Role},
    table::CommitPlan,
};
use outflow_tests::faults::fleet::{Done, FleetLine, MAX_AGENTS, Progress, client_addr};
use tokio::signal::unix::{SignalKind, signal};

/// How often every agent is polled (its export record refreshed, pending bytes spooled).
const POLL: Duration = Duration::from_millis(100);
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How long a stopping fleet waits for its spools to empty.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// The local end of every agent's connection.
const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const SERVER_PORT: u16 = 8443;
/// Descriptors each agent holds (its spool's lock, its TCP connection) and a margin for the
/// rest of the process.
const FDS_PER_AGENT: u64 = 2;
const FDS_MARGIN: u64 = 256;

#[derive(Parser, Debug)]
#[command(
    name = "outflow-fleet",
    about = "Runs many agents' export pipelines in one process against a collector, with synthetic traffic"
)]
struct Args {
    /// gRPC URL of the collector: http://host:port.
    #[arg(long)]
    collector: String,
    /// Agents to run.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_AGENTS as i64))]
    agents: u32,
    /// Directory of the agents' state and spools (agent-<i>/state, agent-<i>/spool).
    #[arg(long)]
    base_dir: PathBuf,
    /// How often each agent's connection carries another interval of traffic (100ms to 1h).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Bound of each agent's spool, bytes (default: the agent's).
    #[arg(long)]
    spool_max_bytes: Option<u64>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}");
            // Best effort: stdout may be what failed.
            let _ = emit(&FleetLine::Error {
                message: message.clone(),
            });
            eprintln!("outflow-fleet: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let n = args.agents as usize;
    let base = std::path::absolute(&args.base_dir)
        .with_context(|| format!("--base-dir {}", args.base_dir.display()))?;
    let configs: Vec<ExportConfig> = (0..n).map(|i| export_config(args, &base, i)).collect();
    // The agent's own checks, with the names of its config fields.
    Config {
        interval: args.interval,
        export: configs[0].clone(),
        ..Config::default()
    }
    .validate()
    .context("bad --collector, --interval or --spool-max-bytes")?;
    raise_fd_limit(n)?;
    std::fs::create_dir_all(&base)
        .with_context(|| format!("create --base-dir {}", base.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let result = rt.block_on(fleet(configs, args.interval));
    // The stdin reader may still be blocked in read(2): don't wait for it.
    rt.shutdown_background();
    result
}

fn export_config(args: &Args, base: &Path, i: usize) -> ExportConfig {
    let dir = base.join(format!("agent-{i}"));
    let defaults = ExportConfig::default();
    ExportConfig {
        collector: Some(args.collector.clone()),
        spool_dir: dir.join("spool"),
        spool_max_bytes: args.spool_max_bytes.unwrap_or(defaults.spool_max_bytes),
        state_dir: dir.join("state"),
        labels: BTreeMap::from([("fleet-agent".to_string(), i.to_string())]),
        ..defaults
    }
}

/// Raises the soft limit of open files as far as the agents need (the hard limit allowing).
fn raise_fd_limit(agents: usize) -> Result<()> {
    let need = agents as u64 * FDS_PER_AGENT + FDS_MARGIN;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        bail!(
            "{agents} agents need about {need} open files, and the hard limit is {} (ulimit -Hn)",
            lim.rlim_max
        );
    }
    lim.rlim_cur = need;
    // SAFETY: a valid rlimit, its soft limit within its hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("raise the open files limit to {need}"));
    }
    Ok(())
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn emit(line: &FleetLine) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, line).context("write to stdout")?;
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .context("write to stdout")
}

/// Set by SIGTERM, SIGINT and the end of stdin: stop making traffic and drain.
#[derive(Default)]
struct Stop(AtomicBool);

impl Stop {
    fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

fn watch_for_stop(stop: &Arc<Stop>) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let s = Arc::clone(stop);
    tokio::spawn(async move {
        for _ in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if s.is_set() {
                // Told again while draining: give up at once.
                let message = "stopped again before every spool was empty";
                let _ = emit(&FleetLine::Error {
                    message: message.into(),
                });
                eprintln!("outflow-fleet: error: {message}");
                std::process::exit(1);
            }
            s.set();
        }
    });
    // A plain thread: a read of stdin cannot be cancelled, and the runtime must not wait for it.
    let s = Arc::clone(stop);
    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            s.set();
        })
        .context("start the stdin reader")?;
    Ok(())
}

async fn fleet(configs: Vec<ExportConfig>, interval: Duration) -> Result<()> {
    let stop = Arc::new(Stop::default());
    watch_for_stop(&stop)?;
    let n = configs.len();
    let state = Arc::new(FleetState::new(n));
    let mut exporters = Vec::with_capacity(n);
    let mut spoolers = Vec::with_capacity(n);
    for (i, cfg) in configs.iter().enumerate() {
        let prepared = prepare(cfg)
            .with_context(|| format!("agent {i}: the export settings"))?
            .context("no collector configured")?;
        let exporter = Exporter::start(prepared, cfg).with_context(|| {
            format!(
                "agent {i}: start the export (state {}, spool {})",
                cfg.state_dir.display(),
                cfg.spool_dir.display()
            )
        })?;
        spoolers.push(exporter.spooler());
        exporters.push(exporter);
    }

    let driver = {
        let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
        tokio::task::spawn_blocking(move || drive(spoolers, &state, &stop, interval))
    };
    tokio::pin!(driver);
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    let drained = loop {
        tokio::select! {
            _ = progress.tick() => emit(&FleetLine::Progress(state.progress(stop.is_set())))?,
            r = &mut driver => break r.context("the poll loop")?,
        }
    };
    let drained = drained?;
    for e in exporters {
        e.shutdown(Duration::ZERO).await;
    }
    emit(&FleetLine::Progress(state.progress(true)))?;
    emit(&FleetLine::Done(state.done(drained)))
}

/// Polls every agent every [`POLL`], giving each connection another interval of traffic when
/// its turn comes, until told to stop; then polls on until every spool is empty. Returns how
/// long that took.
fn drive(
    mut spoolers: Vec<Spooler>,
    state: &FleetState,
    stop: &Stop,
    interval: Duration,
) -> Result<Duration> {
    let n = spoolers.len();
    let start = Instant::now();
    let first_seen = unix_ms_now();
    let mut conns: Vec<Conn> = (0..n)
        .map(|i| Conn {
            index: i,
            due: start + interval.mul_f64(i as f64 / n as f64),
            first_seen,
            pending_out: 0,
            pending_in: 0,
        })
        .collect();
    for (i, spooler) in spoolers.iter_mut().enumerate() {
        // As the agent starts: a commit a previous run made durable but did not finish.
        if spooler
            .recover()
            .with_context(|| format!("agent {i}: recover"))?
            .is_some()
        {
            spooler
                .committed()
                .with_context(|| format!("agent {i}: committed"))?;
        }
    }
    let mut next_poll = start;
    let mut draining: Option<Instant> = None;
    loop {
        if draining.is_none() && stop.is_set() {
            draining = Some(Instant::now());
        }
        for (spooler, conn) in spoolers.iter_mut().zip(&mut conns) {
            let now = Instant::now();
            if draining.is_none() && now >= conn.due {
                let (out, inn) = conn.traffic();
                state.sent(conn.index, out, inn);
                conn.due += interval;
                if conn.due < now {
                    conn.due = now + interval;
                }
            }
            conn.poll(spooler, state)
                .with_context(|| format!("agent {}", conn.index))?;
        }
        if let Some(since) = draining {
            if conns.iter().all(Conn::flushed) && state.spools_empty() {
                return Ok(since.elapsed());
            }
            if since.elapsed() >= DRAIN_TIMEOUT {
                let p = state.progress(true);
                bail!(
                    "the spools did not empty within {DRAIN_TIMEOUT:?} of the stop: {} batches in them, {} of {} agents connected",
                    p.spooled_batches,
                    p.connected,
                    p.agents
                );
            }
        }
        next_poll += POLL;
        let now = Instant::now();
        match next_poll.checked_duration_since(now) {
            Some(wait) => thread::sleep(wait),
            // Behind: poll again at once, and keep the pace from here.
            None => next_poll = now,
        }
    }
}

/// One agent's synthetic connection, and what of its bytes the spool has not kept yet (what a
/// kernel table would still hold).
struct Conn {
    index: usize,
    /// When its next interval of traffic is due.
    due: Instant,
    first_seen: u64,
    pending_out: u64,
    pending_in: u64,
}

impl Conn {
    /// One interval's traffic: added to what is pending, and returned.
    fn traffic(&mut self) -> (u64, u64) {
        let out = 1000 + self.index as u64;
        let inn = 100 + (self.index % 100) as u64;
        self.pending_out += out;
        self.pending_in += inn;
        (out, inn)
    }

    fn flushed(&self) -> bool {
        self.pending_out == 0 && self.pending_in == 0
    }

    /// One poll, as the agent's read loop makes it; the export record goes to `state`.
    fn poll(&mut self, spooler: &mut Spooler, state: &FleetState) -> Result<()> {
        let ts = unix_ms_now();
        let conns = if self.flushed() {
            Vec::new()
        } else {
            vec![self.record(ts)]
        };
        let flushed = spooler
            .make_durable(&Interval {
                ts,
                conns: &conns,
                overflow: None,
                plan: &CommitPlan::default(),
            })
            .context("make_durable")?;
        if let Some(r) = spooler.report() {
            state.export(self.index, ts, &r);
        }
        match flushed {
            Flushed::Kept => {
                self.pending_out = 0;
                self.pending_in = 0;
                spooler.committed().context("committed")?;
            }
            // The spool could not take it: it stays pending, for the next poll.
            Flushed::Deferred => {}
        }
        Ok(())
    }

    fn record(&self, ts: u64) -> ConnRecord {
        let client = IpAddr::V4(client_addr(self.index));
        let segments = |bytes: u64| bytes.div_ceil(1448);
        ConnRecord {
            ts,
            conn_id: self.index as u64 + 1,
            family: "ipv4",
            local_addr: IpAddr::V4(SERVER_ADDR),
            local_port: SERVER_PORT,
            remote_addr: client,
            remote_port: 40_000 + (self.index % 20_000) as u16,
            client_addr: client,
            client_id: None,
            client_source: "peer".into(),
            role: Role::Server,
            bytes_out: self.pending_out,
            bytes_in: self.pending_in,
            wire_bytes_out: self.pending_out + 52 * segments(self.pending_out),
            wire_bytes_in: self.pending_in + 52 * segments(self.pending_in),
            segments_out: segments(self.pending_out),
            segments_in: segments(self.pending_in),
            closed: false,
            cgroup: Some("/outflow-fleet".into()),
            cgroup_id: 1,
            pid: None,
            comm: None,
            first_seen: self.first_seen,
            last_seen: ts,
        }
    }
}

/// What the fleet knows of each agent: its last export record and its traffic.
struct FleetState {
    agents: Vec<Mutex<AgentState>>,
}

#[derive(Default)]
struct AgentState {
    record: Option<ExportRecord>,
    ever_connected: bool,
    reconnects: u64,
    /// Unix ms of its last connection (of the export record that first said connected).
    connected_since_ms: u64,
    /// Unix ms at which it last caught up.
    caught_up_since_ms: u64,
    sent_out: u64,
    sent_in: u64,
}

/// Connected, with at most the newest interval's batch not yet acknowledged.
fn caught_up(r: &ExportRecord) -> bool {
    r.connected && r.spooled_batches <= 1
}

impl FleetState {
    fn new(n: usize) -> Self {
        Self {
            agents: (0..n).map(|_| Mutex::default()).collect(),
        }
    }

    fn agent(&self, i: usize) -> MutexGuard<'_, AgentState> {
        self.agents[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn export(&self, i: usize, ts: u64, r: &ExportRecord) {
        let mut a = self.agent(i);
        let (was_connected, was_caught_up) = a
            .record
            .as_ref()
            .map_or((false, false), |p| (p.connected, caught_up(p)));
        if r.connected && !was_connected {
            if a.ever_connected {
                a.reconnects += 1;
            }
            a.ever_connected = true;
            a.connected_since_ms = ts;
        }
        if caught_up(r) && !was_caught_up {
            a.caught_up_since_ms = ts;
        }
        a.record = Some(r.clone());
    }

    fn sent(&self, i: usize, out: u64, inn: u64) {
        let mut a = self.agent(i);
        a.sent_out += out;
        a.sent_in += inn;
    }

    fn spools_empty(&self) -> bool {
        (0..self.agents.len()).all(|i| {
            self.agent(i)
                .record
                .as_ref()
                .is_some_and(|r| r.spooled_batches == 0)
        })
    }

    fn progress(&self, stopping: bool) -> Progress {
        let mut p = Progress {
            ts_ms: unix_ms_now(),
            agents: self.agents.len(),
            stopping,
            ..Progress::default()
        };
        for i in 0..self.agents.len() {
            let a = self.agent(i);
            p.sent_bytes_out += a.sent_out;
            p.sent_bytes_in += a.sent_in;
            p.reconnects += a.reconnects;
            let Some(r) = &a.record else { continue };
            p.spooled_batches += r.spooled_batches;
            p.acked_batches += r.acked_seq;
            p.lost_batches += r.lost_batches;
            p.lost_bytes_out += r.lost_bytes_out;
            p.deferred_intervals += r.deferred_intervals;
            if r.connected {
                p.connected += 1;
                let t = a.connected_since_ms;
                p.connected_since_min_ms = match p.connected_since_min_ms {
                    0 => t,
                    m => m.min(t),
                };
                p.connected_since_max_ms = p.connected_since_max_ms.max(t);
            }
            if caught_up(r) {
                p.caught_up += 1;
                p.caught_up_since_max_ms = p.caught_up_since_max_ms.max(a.caught_up_since_ms);
            }
        }
        p
    }

    fn done(&self, drained: Duration) -> Done {
        let p = self.progress(true);
        let (out, inn): (Vec<u64>, Vec<u64>) = (0..self.agents.len())
            .map(|i| {
                let a = self.agent(i);
                (a.sent_out, a.sent_in)
            })
            .unzip();
        Done {
            agents: p.agents,
            sent_bytes_out: p.sent_bytes_out,
            sent_bytes_in: p.sent_bytes_in,
            sent_bytes_out_by_agent: out,
            sent_bytes_in_by_agent: inn,
            lost_batches: p.lost_batches,
            lost_bytes_out: p.lost_bytes_out,
            deferred_intervals: p.deferred_intervals,
            reconnects: p.reconnects,
            drain_ms: drained.as_millis() as u64,
        }
    }
}
