//! `outflow-bench ingest`: connection deltas per second the collector applies over gRPC on
//! loopback, batched as the agent batches, with detection and fsync on; and the collector's CPU
//! and memory meanwhile.
//!
//! The collector is the real `outflow-collector` binary in a process of its own (its CPU time
//! and RSS are read from /proc), with a fresh data directory per run. The agents are tasks of
//! this process, one gRPC stream each, that send batches encoded before the clock starts, at
//! most [`WINDOW`] unacknowledged like the agent's sender.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use outflow_proto::v1::{self, AgentMessage, agent_message};
use outflow_sim::ingest::{IngestStream, Options};
use outflow_tests::{
    collector::{COLLECTOR_BIN_ENV, Metrics, TempDir, free_port},
    process::{CapturedText, ChildProcess},
};
use prost::{Message as _, bytes::Bytes};
use tonic::transport::{Channel, Endpoint};

use crate::{
    report::{Section, median, thousands},
    sys,
};

/// Batches a stream has sent and not yet seen acknowledged, at most: the agent's
/// `sender::WINDOW`.
const WINDOW: u64 = 32;
/// Batch time covered by one batch: the agent's default `interval`.
const INTERVAL_MS: u64 = 1_000;
/// How long the collector may leave a stream without an answer before the run fails.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// The protocol's limit on deltas per batch.
const MAX_DELTAS: u32 = 100_000;
/// Client /24 prefixes are spread over 11.0.0.0-42.255.255.255: at most this many.
const MAX_PREFIXES: u32 = 1 << 21;
/// The target.
const TARGET_DELTAS_PER_SECOND: f64 = 1_000_000.0;
/// Rate limits off; everything else (fsync, detection) at its default.
pub(crate) const COLLECTOR_CONFIG: &str = "\
[limits]
batches_per_second = 0.0
deltas_per_second = 0.0
";

#[derive(clap::Args)]
pub struct Args {
    /// Distinct client addresses the deltas come from.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) clients: u32,
    /// Clients per /24 prefix (1: every client in a /24 of its own, the most keys). The /24s
    /// are spread over 11.0.0.0-42.255.255.255.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub(crate) clients_per_prefix: u32,
    /// Agents: one gRPC stream each, sending its batches pipelined.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) agents: u32,
    /// Batches each agent sends per run, one per second of batch time as a live agent's
    /// 1 s intervals (90: every key is judged by detection again after its first minute).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) batches: u32,
    /// Deltas per batch: connections with traffic in the agent's interval.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_DELTAS)))]
    pub(crate) deltas: u32,
    /// Runs, each against a fresh collector; the figures are their median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) runs: u32,
    /// The collector's key budget (`[limits] max_keys`; default: the collector's default). The
    /// throughput runs set it above the keys they make, so that every key is kept.
    #[arg(long)]
    pub(crate) max_keys: Option<u64>,
    /// The collector's feed buffer (`[feed] buffer_entries`; default: the collector's default,
    /// 0: no feed), to measure what holding applied batches for Feed followers costs.
    #[arg(long)]
    pub(crate) feed_entries: Option<usize>,
}

impl Args {
    fn command(&self) -> String {
        format!(
            "sudo target/release/outflow-bench ingest --clients {} --clients-per-prefix {} --agents {} --batches {} --deltas {} --runs {}{}{}",
            self.clients,
            self.clients_per_prefix,
            self.agents,
            self.batches,
            self.deltas,
            self.runs,
            self.max_keys
                .map(|k| format!(" --max-keys {k}"))
                .unwrap_or_default(),
            self.feed_entries
                .map(|n| format!(" --feed-entries {n}"))
                .unwrap_or_default()
        )
    }

    fn prefixes(&self) -> u32 {
        self.clients.div_ceil(self.clients_per_prefix)
    }

    pub(crate) fn total_deltas(&self) -> u64 {
        u64::from(self.agents) * u64::from(self.batches) * u64::from(self.deltas)
    }
}

pub fn run(args: &Args) -> Result<Section> {
    ensure!(
        args.prefixes() <= MAX_PREFIXES,
        "{} clients at {} per /24 need {} prefixes, at most {MAX_PREFIXES} are available",
        args.clients,
        args.clients_per_prefix,
        args.prefixes()
    );
    let bin = collector_path()?;
    eprintln!(
        "ingest: encoding {} agents x {} batches x {} deltas over {} clients",
        args.agents, args.batches, args.deltas, args.clients
    );
    let load = encode(args);
    eprintln!(
        "ingest: {:.1} MiB of batches; collector {}",
        load.bytes as f64 / 1_048_576.0,
        bin.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut runs = Vec::new();
    // Each run twice: with detection (the default, the target) and without (its cost).
    for (i, detect) in (1..=args.runs).flat_map(|i| [(i, true), (i, false)]) {
        let r = one_run(&rt, &bin, &load, args, (i, detect))
            .with_context(|| format!("run {i}, detection {detect}"))?;
        eprintln!(
            "ingest: run {i}/{} (detection {detect}): {} deltas/s in {:.2} s, collector CPU {:.0}% of a core, RSS {}, peak {}; CPU per delta {:.0} ns (writer / workers / detection / other: {} ns); journal {:.1} bytes per delta",
            args.runs,
            thousands(r.deltas_per_second),
            r.seconds,
            r.cpu_percent,
            sys::mib(r.rss),
            sys::mib(r.peak_rss),
            r.cpu_per_delta.total(),
            r.cpu_per_delta,
            r.journal_bytes_per_delta,
        );
        runs.push(r);
    }
    Ok(section(args, &runs))
}

/// The collector binary: `$OUTFLOW_COLLECTOR_BIN`, else `outflow-collector` beside this one.
pub(crate) fn collector_path() -> Result<PathBuf> {
    let path = match std::env::var_os(COLLECTOR_BIN_ENV) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .context("locating outflow-bench")?
            .with_file_name("outflow-collector"),
    };
    ensure!(
        path.is_file(),
        "no collector binary at {}: build it (`cargo build --release -p outflow-collector`) or set {COLLECTOR_BIN_ENV}",
        path.display()
    );
    Ok(path)
}

/// Every agent's messages, encoded.
pub(crate) struct Load {
    agents: Vec<AgentLoad>,
    pub(crate) bytes: usize,
}

struct AgentLoad {
    hello: v1::Hello,
    batches: Vec<Bytes>,
}

/// Client number `c` as an address: `per_prefix` clients in each /24, the /24s spread over
/// 11.0.0.0-42.255.255.255 (a bijection of 21 bits) as clients on the internet are.
fn client_addr(c: u32, per_prefix: u32) -> [u8; 4] {
    let prefix = c / per_prefix;
    let spread = (u64::from(prefix) * 0x9_E377) as u32 & (MAX_PREFIXES - 1);
    (0x0B00_0000 + (spread << 8) + c % per_prefix).to_be_bytes()
}

/// Agent `agent`'s batch `seq`: one interval [end - 1 s, end) of `deltas` server connections.
/// The batches of all agents, in order, go round the clients, so that every client has
/// traffic every `clients / (agents * deltas)` seconds of batch time.
fn batch(args: &Args, agent: u32, seq: u32, end_ms: u64) -> v1::Batch {
    let slot = u64::from(seq - 1) * u64::from(args.agents) + u64::from(agent);
    let deltas = (0..u64::from(args.deltas))
        .map(|k| {
            let c = ((slot * u64::from(args.deltas) + k) % u64::from(args.clients)) as u32;
            // A cheap hash for plausible, varied counts.
            let h =
                (u64::from(c) ^ (u64::from(seq) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
            let bytes_out = 2_000 + h % 60_000;
            let bytes_in = 300 + h % 3_000;
            let segments_out = bytes_out / 1_448 + 1;
            let segments_in = segments_out / 2 + 1;
            v1::ConnDelta {
                conn_id: (u64::from(agent) << 40) | u64::from(c),
                local_addr: vec![10, 0, (agent >> 8) as u8, agent as u8],
                local_port: 8000,
                remote_addr: client_addr(c, args.clients_per_prefix).to_vec(),
                remote_port: 1024 + (c * 7) % 60_000,
                role: v1::Role::Server as i32,
                counters: Some(v1::Counters {
                    bytes_out,
                    bytes_in,
                    wire_bytes_out: bytes_out + 52 * segments_out,
                    wire_bytes_in: bytes_in + 52 * segments_in,
                    segments_out,
                    segments_in,
                }),
                closed: h % 20 == 0,
                cgroup: "/system.slice/vllm.service".into(),
                pid: 4242,
                comm: "vllm".into(),
                first_seen_ms: end_ms.saturating_sub(INTERVAL_MS * (1 + h % 600)),
                // No client attribution: the remote address is the client.
                ..Default::default()
            }
        })
        .collect();
    v1::Batch {
        seq: seq.into(),
        start_ms: end_ms - INTERVAL_MS,
        end_ms,
        deltas,
        ..v1::Batch::default()
    }
}

/// Encodes every message before any clock starts. Batch time ends now: the runs replay the
/// last `batches` seconds.
pub(crate) fn encode(args: &Args) -> Load {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let first_end = now_ms - u64::from(args.batches) * INTERVAL_MS;
    let mut bytes = 0;
    let agents = (0..args.agents)
        .map(|a| {
            let hello = v1::Hello {
                agent_id: format!("bench-{a}"),
                epoch: 1,
                hostname: format!("gpu-{a}"),
                boot_id: "00000000-0000-0000-0000-000000000000".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..v1::Hello::default()
            };
            let batches: Vec<Bytes> = (1..=args.batches)
                .map(|s| {
                    let end_ms = first_end + u64::from(s) * INTERVAL_MS;
                    let m = AgentMessage {
                        msg: Some(agent_message::Msg::Batch(batch(args, a, s, end_ms))),
                    };
                    Bytes::from(m.encode_to_vec())
                })
                .collect();
            bytes += batches.iter().map(Bytes::len).sum::<usize>();
            AgentLoad { hello, batches }
        })
        .collect();
    Load { agents, bytes }
}

/// What one run measured.
struct RunResult {
    /// Detection on (the default) or off.
    detect: bool,
    seconds: f64,
    deltas_per_second: f64,
    /// The collector's CPU time over the measured window, in % of one core.
    cpu_percent: f64,
    /// The collector's busiest thread over the window: its name and CPU in % of one core.
    busiest_thread: (String, f64),
    /// The collector's CPU time per delta applied, by what its threads do.
    cpu_per_delta: CpuPerDelta,
    /// This process's (the load generator's) CPU, the same way.
    load_cpu_percent: f64,
    rss: u64,
    peak_rss: u64,
    commits: f64,
    commit_seconds: f64,
    /// Bytes of journal entries the group commits wrote, per delta applied.
    journal_bytes_per_delta: f64,
    checkpoints: f64,
    checkpoint_seconds: f64,
    detect_runs: f64,
    detect_seconds: f64,
    client_keys: f64,
    prefix_keys: f64,
    alerts_opened: f64,
    /// Time from sending a batch to its Ack, ms: median and 99th percentile over every batch.
    ack_ms: (f64, f64),
}

/// The collector under test, stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct CollectorProcess {
    process: ChildProcess,
    pub(crate) stderr: CapturedText,
}

impl CollectorProcess {
    fn start(
        bin: &Path,
        dir: &Path,
        listen: SocketAddr,
        metrics: SocketAddr,
        detect: bool,
        max_keys: Option<u64>,
        feed_entries: Option<usize>,
    ) -> Result<Self> {
        let mut text = COLLECTOR_CONFIG.to_owned();
        if let Some(k) = max_keys {
            text += &format!("max_keys = {k}\n");
        }
        if !detect {
            text += "[detect]\nenabled = false\n";
        }
        if let Some(n) = feed_entries {
            text += &format!("[feed]\nbuffer_entries = {n}\n");
        }
        Self::start_with(bin, dir, listen, metrics, &text)
    }

    /// Starts the collector with the configuration file `text` (rate limits off are the
    /// caller's to say), its data in `dir/data`, and waits until it listens.
    pub(crate) fn start_with(
        bin: &Path,
        dir: &Path,
        listen: SocketAddr,
        metrics: SocketAddr,
        text: &str,
    ) -> Result<Self> {
        let config = dir.join("collector.toml");
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let mut command = Command::new(bin);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", &listen.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            // Its warnings and errors only (one line per agent would interleave with ours),
            // unless $OUTFLOW_BENCH_COLLECTOR_LOG says otherwise (a RUST_LOG filter).
            .env(
                "RUST_LOG",
                std::env::var("OUTFLOW_BENCH_COLLECTOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let process = ChildProcess::spawn("outflow-collector", &mut command);
        let stderr = CapturedText::capture(
            "outflow-collector",
            process.take_stderr().context("the collector's stderr")?,
        );
        let collector = Self { process, stderr };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(listen).is_err() {
            if let Some(status) = collector.process.try_status() {
                bail!(
                    "the collector exited ({status}):\n{}",
                    collector.stderr.tail(20)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "the collector did not listen on {listen} within a minute:\n{}",
                collector.stderr.tail(20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(collector)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        // SIGTERM: a clean stop, its database closed. The pid is ours until it is reaped.
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        if self.process.wait_timeout(Duration::from_secs(30)).is_none() {
            eprintln!("ingest: the collector did not stop on SIGTERM; killing it");
            self.process.kill();
        }
    }
}

fn one_run(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    load: &Load,
    args: &Args,
    (run, detect): (u32, bool),
) -> Result<RunResult> {
    let dir = TempDir::new(&format!("bench-ingest-{run}-{detect}"));
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    eprintln!(
        "ingest: run {run}/{}, detection {}: a fresh collector on {listen}",
        args.runs,
        if detect { "on" } else { "off" }
    );
    let collector = CollectorProcess::start(
        bin,
        dir.path(),
        listen,
        metrics,
        detect,
        args.max_keys,
        args.feed_entries,
    )?;
    let pid = collector.pid();
    let before =
        Metrics::fetch(metrics).with_context(|| format!("reading http://{metrics}/metrics"))?;

    let streams = rt
        .block_on(open_streams(&format!("http://{listen}"), load))
        .with_context(|| format!("collector stderr:\n{}", collector.stderr.tail(20)))?;
    let cpu0 = sys::cpu_time(pid)?;
    let threads0 = thread_cpu(pid)?;
    let own0 = sys::cpu_time(std::process::id())?;
    let t0 = Instant::now();
    let ack_ms = send_all(rt, streams)
        .with_context(|| format!("collector stderr:\n{}", collector.stderr.tail(20)))?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = sys::cpu_time(pid)? - cpu0;
    let threads = thread_cpu(pid)?;
    let own = sys::cpu_time(std::process::id())? - own0;
    let rss = sys::rss_bytes(pid)?;
    let peak_rss = sys::peak_rss_bytes(pid)?;

    let after =
        Metrics::fetch(metrics).with_context(|| format!("reading http://{metrics}/metrics"))?;
    let delta = |name: &str| after.value(name) - before.value(name);
    let applied = delta("outflow_collector_deltas_total");
    ensure!(
        applied == args.total_deltas() as f64,
        "the collector applied {applied} deltas, {} were sent",
        args.total_deltas()
    );
    Ok(RunResult {
        detect,
        seconds,
        deltas_per_second: args.total_deltas() as f64 / seconds.max(1e-9),
        cpu_percent: 100.0 * cpu.as_secs_f64() / seconds.max(1e-9),
        busiest_thread: busiest(&threads0, &threads, seconds),
        cpu_per_delta: CpuPerDelta::of(&threads0, &threads, applied),
        load_cpu_percent: 100.0 * own.as_secs_f64() / seconds.max(1e-9),
        rss,
        peak_rss,
        commits: delta("outflow_collector_store_commit_seconds_count"),
        commit_seconds: delta("outflow_collector_store_commit_seconds_sum"),
        journal_bytes_per_delta: delta("outflow_collector_store_journal_bytes_total")
            / applied.max(1.0),
        checkpoints: delta("outflow_collector_store_checkpoint_seconds_count"),
        checkpoint_seconds: delta("outflow_collector_store_checkpoint_seconds_sum"),
        detect_runs: delta("outflow_collector_detect_seconds_count"),
        detect_seconds: delta("outflow_collector_detect_seconds_sum"),
        client_keys: after.value("outflow_collector_keys{group=\"client-address\"}"),
        prefix_keys: after.value("outflow_collector_keys{group=\"client-prefix\"}"),
        alerts_opened: after.sum("outflow_collector_alerts_opened_total"),
        ack_ms,
    })
}

/// Each thread of process `pid`: its id, name and CPU time (user + system) so far.
pub(crate) fn thread_cpu(pid: u32) -> Result<Vec<(u32, String, f64)>> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // A thread that ended meanwhile is left out.
        let Ok(stat) = std::fs::read_to_string(format!("{dir}/{tid}/stat")) else {
            continue;
        };
        // utime and stime, fields 14 and 15 of stat(5), after the name in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        let ticks: u64 = fields
            .get(11..13)
            .unwrap_or_default()
            .iter()
            .filter_map(|f| f.parse::<u64>().ok())
            .sum();
        let name = std::fs::read_to_string(format!("{dir}/{tid}/comm")).unwrap_or_default();
        out.push((tid, name.trim().to_owned(), ticks as f64 / hz));
    }
    Ok(out)
}

/// The collector's CPU time per delta applied, ns, by thread: its store writer, its gRPC
/// workers (tokio's threads: decoding, validating and folding each batch), its detection thread,
/// and the rest. Unlike deltas/s, which the load generator's share of the machine moves from run
/// to run, these measure what a change to one of them costs or saves.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuPerDelta {
    pub(crate) writer: f64,
    pub(crate) workers: f64,
    pub(crate) detection: f64,
    pub(crate) other: f64,
}

impl CpuPerDelta {
    /// From two [`thread_cpu`] samples, `deltas` applied between them.
    pub(crate) fn of(
        before: &[(u32, String, f64)],
        after: &[(u32, String, f64)],
        deltas: f64,
    ) -> Self {
        let mut c = Self::default();
        for (name, cpu) in thread_use(before, after) {
            let ns = 1e9 * cpu / deltas.max(1.0);
            match name {
                "store-writer" => c.writer += ns,
                "detection" => c.detection += ns,
                n if n.starts_with("tokio") => c.workers += ns,
                _ => c.other += ns,
            }
        }
        c
    }

    fn total(&self) -> f64 {
        self.writer + self.workers + self.detection + self.other
    }

    /// `self` and `other` together (the CPU of two processes per delta of both).
    pub(crate) fn plus(self, other: Self) -> Self {
        Self {
            writer: self.writer + other.writer,
            workers: self.workers + other.workers,
            detection: self.detection + other.detection,
            other: self.other + other.other,
        }
    }
}

impl std::fmt::Display for CpuPerDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} / {:.0} / {:.0} / {:.0}",
            self.writer, self.workers, self.detection, self.other
        )
    }
}

/// Each thread's name and the CPU seconds it used between two [`thread_cpu`] samples (a
/// thread started meanwhile, all of its own).
fn thread_use<'a>(
    before: &'a [(u32, String, f64)],
    after: &'a [(u32, String, f64)],
) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    after.iter().map(|(tid, name, t)| {
        let t0 = before.iter().find(|b| b.0 == *tid).map_or(0.0, |b| b.2);
        (name.as_str(), t - t0)
    })
}

/// The thread that used the most CPU between two [`thread_cpu`] samples `seconds` apart.
fn busiest(
    before: &[(u32, String, f64)],
    after: &[(u32, String, f64)],
    seconds: f64,
) -> (String, f64) {
    thread_use(before, after)
        .map(|(name, cpu)| (name.to_owned(), 100.0 * cpu / seconds.max(1e-9)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default()
}

/// Sends every stream's batches at once; the median and 99th percentile of the time from
/// sending a batch to its Ack, ms.
pub(crate) fn send_all(
    rt: &tokio::runtime::Runtime,
    streams: Vec<AgentStream>,
) -> Result<(f64, f64)> {
    let mut ack_ms = rt.block_on(async {
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|s| tokio::spawn(s.send()))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        anyhow::Ok(all)
    })?;
    ack_ms.sort_unstable_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((ack_ms.len() as f64 * p).ceil() as usize).clamp(1, ack_ms.len().max(1)) - 1;
        ack_ms.get(i).copied().unwrap_or(0.0)
    };
    Ok((pct(0.5), pct(0.99)))
}

/// One agent's stream, past its Welcome, with its batches still to send.
pub(crate) struct AgentStream {
    stream: IngestStream,
    batches: Vec<Bytes>,
}

/// Connects every agent and exchanges Hello and Welcome (before the clock starts).
pub(crate) async fn open_streams(url: &str, load: &Load) -> Result<Vec<AgentStream>> {
    let mut streams = Vec::new();
    for agent in &load.agents {
        // As the agent's endpoint: plaintext here, no delay.
        let channel: Channel = Endpoint::from_shared(url.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let options = Options {
            queue: WINDOW as usize + 1,
            answer_timeout: ANSWER_TIMEOUT,
            ..Options::default()
        };
        let mut stream = IngestStream::open_with(channel, options)
            .await
            .context("opening outflow.v1.Ingest/Stream")?;
        stream
            .hello(agent.hello.clone())
            .await
            .context("waiting for the Welcome")?;
        streams.push(AgentStream {
            stream,
            batches: agent.batches.clone(),
        });
    }
    Ok(streams)
}

impl AgentStream {
    /// Sends every batch, at most [`WINDOW`] unacknowledged, until the last is acknowledged;
    /// returns the time from sending each batch to its Ack, ms.
    pub(crate) async fn send(mut self) -> Result<Vec<f64>> {
        let n = self.batches.len() as u64;
        let mut batches = self.batches.into_iter();
        let (mut sent, mut acked) = (0u64, 0u64);
        let mut sent_at = Vec::with_capacity(batches.len());
        let mut latency = Vec::with_capacity(batches.len());
        while acked < n {
            while sent < n && sent - acked < WINDOW {
                let b = batches.next().context("a batch to send")?;
                sent_at.push(Instant::now());
                self.stream
                    .send_encoded(b)
                    .await
                    .context("sending a batch")?;
                sent += 1;
            }
            let seq = self.stream.next_ack().await.context("waiting for Acks")?;
            ensure!(
                seq <= sent,
                "expected an Ack of at most seq {sent}, got one of {seq}"
            );
            // An Ack covers every batch up to its seq (seqs start at 1).
            for at in &sent_at[usize::try_from(acked)?..usize::try_from(seq.max(acked))?] {
                latency.push(at.elapsed().as_secs_f64() * 1000.0);
            }
            acked = acked.max(seq);
        }
        Ok(latency)
    }
}

fn section(args: &Args, all: &[RunResult]) -> Section {
    let mut s = Section::new("ingest", "Collector ingest");
    let (runs, without): (Vec<&RunResult>, Vec<&RunResult>) = all.iter().partition(|r| r.detect);
    let of = |set: &[&RunResult], f: &dyn Fn(&RunResult) -> f64| {
        median(&set.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let med = |f: &dyn Fn(&RunResult) -> f64| of(&runs, f);
    let med_off = |f: &dyn Fn(&RunResult) -> f64| of(&without, f);
    let shape = format!("{} x {} x {}", args.agents, args.batches, args.deltas);
    s.method = format!(
        "The real `outflow-collector` runs as its own process on loopback, with a fresh data \
         directory for each run ({runs} runs, each once with detection on, its default, and once \
         with `[detect] enabled = false`), its default configuration except for the per-agent \
         rate limits (off): fsync on (every group commit durable before its Acks). \
         {agents} agents, each one gRPC stream, send {batches} batches of {deltas} server-side \
         connection deltas, as the agent sends them: one batch per 1 s interval of batch time, \
         at most {WINDOW} unacknowledged. The batches of all agents go round {clients} distinct \
         client addresses, {per_prefix} per /24 ({prefixes} /24 prefixes spread over \
         11.0.0.0-42.255.255.255; the collector keeps both per address and per /24), so every \
         client has traffic every ~{every:.1} s of batch time and each run covers {minutes:.1} min \
         of it, long enough for detection to judge every key again after its first minute. \
         Everything is encoded before \
         the clock starts; the clock stops at the last Ack. The collector's CPU time (user + \
         system, /proc/PID/stat) over that window is given in % of one core; its RSS at the end \
         and its peak RSS (VmHWM) come from /proc/PID/status. Figures are the median of the runs.",
        runs = runs.len(),
        agents = args.agents,
        batches = args.batches,
        deltas = args.deltas,
        clients = thousands(args.clients.into()),
        per_prefix = args.clients_per_prefix,
        prefixes = thousands(args.prefixes().into()),
        every = f64::from(args.clients) / (f64::from(args.agents) * f64::from(args.deltas)),
        minutes = f64::from(args.batches) / 60.0,
    );
    s.commands = vec![
        "cargo build --release -p outflow-bench -p outflow-collector".into(),
        args.command(),
    ];
    s.header = [
        "run",
        "detection",
        "clients",
        "clients per /24",
        "agents x batches x deltas",
        "deltas/s",
        "collector CPU (% of a core)",
        "collector RSS at end",
        "collector peak RSS",
        "group commits/s",
        "send to Ack p50 / p99",
        "CPU per delta: writer / workers / detection / other (ns)",
    ]
    .map(String::from)
    .to_vec();
    for (i, r) in all.iter().enumerate() {
        s.row([
            (i / 2 + 1).to_string(),
            if r.detect { "on" } else { "off" }.to_string(),
            thousands(args.clients.into()),
            args.clients_per_prefix.to_string(),
            shape.clone(),
            thousands(r.deltas_per_second),
            format!("{:.0}%", r.cpu_percent),
            sys::mib(r.rss),
            sys::mib(r.peak_rss),
            format!("{:.1}", r.commits / r.seconds),
            format!("{:.0} / {:.0} ms", r.ack_ms.0, r.ack_ms.1),
            r.cpu_per_delta.to_string(),
        ]);
    }
    let median_deltas = med(&|r| r.deltas_per_second);
    let clients = if args.clients.is_multiple_of(1000) {
        format!("{}k", args.clients / 1000)
    } else {
        thousands(args.clients.into())
    };
    for (name, set) in [("on", &runs), ("off", &without)] {
        let m = |f: &dyn Fn(&RunResult) -> f64| of(set, f);
        s.row([
            "median".to_string(),
            name.to_string(),
            thousands(args.clients.into()),
            args.clients_per_prefix.to_string(),
            shape.clone(),
            thousands(m(&|r| r.deltas_per_second)),
            format!("{:.0}%", m(&|r| r.cpu_percent)),
            sys::mib(m(&|r| r.rss as f64) as u64),
            sys::mib(m(&|r| r.peak_rss as f64) as u64),
            format!("{:.1}", m(&|r| r.commits / r.seconds)),
            format!("{:.0} / {:.0} ms", m(&|r| r.ack_ms.0), m(&|r| r.ack_ms.1)),
            CpuPerDelta {
                writer: m(&|r| r.cpu_per_delta.writer),
                workers: m(&|r| r.cpu_per_delta.workers),
                detection: m(&|r| r.cpu_per_delta.detection),
                other: m(&|r| r.cpu_per_delta.other),
            }
            .to_string(),
        ]);
    }
    let median_off = med_off(&|r| r.deltas_per_second);
    s.target(
        &format!("deltas/s applied, detection on, {clients} clients"),
        ">= 1,000,000",
        format!("{} deltas/s", thousands(median_deltas)),
        median_deltas >= TARGET_DELTAS_PER_SECOND,
    );
    let total_batches = f64::from(args.agents) * f64::from(args.batches);
    s.notes = vec![
        format!(
            "Detection costs {:.0}% of the deltas/s at {} clients: {} deltas/s with it, {} \
             without (medians); its judgements took {:.1} ms each, {:.1} a second of wall time.",
            100.0 * (1.0 - median_deltas / median_off.max(1.0)),
            thousands(args.clients.into()),
            thousands(median_deltas),
            thousands(median_off),
            med(&|r| 1000.0 * r.detect_seconds / r.detect_runs.max(1.0)),
            med(&|r| r.detect_runs / r.seconds),
        ),
        format!(
            "Detection and fsync on, as by default. Group commits: {:.1} per second, {:.1} batches \
             each, {:.0} ms each, {:.1} journal bytes per delta; checkpoints (every key the \
             journal touched written whole): {:.1} per run, {:.0} ms each (medians over runs, \
             from the collector's /metrics).",
            med(&|r| r.commits / r.seconds),
            med(&|r| total_batches / r.commits.max(1.0)),
            med(&|r| 1000.0 * r.commit_seconds / r.commits.max(1.0)),
            med(&|r| r.journal_bytes_per_delta),
            med(&|r| r.checkpoints),
            med(&|r| 1000.0 * r.checkpoint_seconds / r.checkpoints.max(1.0)),
        ),
        format!(
            "Every delta sent was applied (`outflow_collector_deltas_total`); at the end the \
             collector held {} client-address keys and {} client /24 prefixes, and opened {} \
             alerts (the traffic is chat-like, not bulk).",
            thousands(med(&|r| r.client_keys)),
            thousands(med(&|r| r.prefix_keys)),
            med(&|r| r.alerts_opened),
        ),
        format!(
            "The collector's busiest thread, `{}`, used {:.0}% of a core (median).",
            {
                let mut names: Vec<&str> =
                    runs.iter().map(|r| r.busiest_thread.0.as_str()).collect();
                names.sort_unstable();
                names.dedup();
                names.join("`/`")
            },
            med(&|r| r.busiest_thread.1),
        ),
        format!(
            "The load generator shares the machine ({} CPUs) with the collector: it used {:.0}% \
             of a core, sending pre-encoded messages from one thread.",
            std::thread::available_parallelism().map_or(0, usize::from),
            med(&|r| r.load_cpu_percent),
        ),
    ];
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_distinct_addresses() {
        for (per_prefix, prefixes) in [(1, 100_000), (7, 14_286), (256, 391)] {
            let mut seen: Vec<[u8; 4]> = (0..100_000).map(|c| client_addr(c, per_prefix)).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 100_000);
            assert!(seen.iter().all(|a| (11..=42).contains(&a[0])));
            let mut p: Vec<[u8; 3]> = seen.iter().map(|a| [a[0], a[1], a[2]]).collect();
            p.dedup();
            assert_eq!(p.len(), prefixes);
        }
        let top = (0..MAX_PREFIXES).map(|p| client_addr(p, 1)).max();
        assert_eq!(top, Some([42, 255, 255, 0]));
    }

    #[test]
    fn batches_go_round_the_clients() {
        let args = Args {
            clients: 1_000,
            clients_per_prefix: 1,
            agents: 2,
            batches: 3,
            deltas: 300,
            runs: 1,
            max_keys: None,
            feed_entries: None,
        };
        let mut clients: Vec<Vec<u8>> = (1..=2)
            .flat_map(|s| (0..2).map(move |a| (a, s)))
            .flat_map(|(a, s)| batch(&args, a, s, 10_000).deltas)
            .map(|d| d.remote_addr)
            .collect();
        assert_eq!(clients.len(), 1_200);
        clients.sort_unstable();
        clients.dedup();
        assert_eq!(clients.len(), 1_000);
    }
}
