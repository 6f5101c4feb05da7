//! Request rate with capture: an HTTP/1.1 keep-alive client and server over the test bed's
//! veth pair, small requests and small responses as fast as they go, with the agent detached,
//! attached with request capture off, and attached with capture on (each request then starts
//! a turn: an event in the ring buffer that the agent reads and parses).
//!
//! The server (`outflow-bench http-serve`, hidden) runs in the server namespace and the test
//! cgroup; the client (`outflow-bench http-load`, hidden) in the client namespace, one thread
//! per connection, each sending its next request when the previous response is in.
use std::{
    fs,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::sys::{Stats, enable_stats};
use outflow_tests::{
    cgroup::TestCgroup,
    netns::{CLIENT_V4, NetnsPair, SERVER_V4},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    capture::http_request,
    report::{Section, median, range, thousands},
    testbed::{
        BPF_CGROUP_INET_EGRESS, BPF_CGROUP_INET_INGRESS, DIRECTIONS, RunningAgent, attached_named,
        attached_prog_ids, harness, in_netns, prog_stats, runs_range, seconds_range, wait_detached,
    },
    traffic::DirCost,
};

const PORT: u16 = 8080;
const DEFAULT_SECONDS: u32 = 5;
const DEFAULT_RUNS: u32 = 3;
const DEFAULT_CONNS: u32 = 8;
const DEFAULT_REQUEST_BYTES: usize = 300;
const DEFAULT_RESPONSE_BYTES: usize = 200;
/// How long the agent may take to report a run's turns.
const STATS_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of load per run.
    #[arg(long, default_value_t = DEFAULT_SECONDS, value_parser = seconds_range())]
    seconds: u32,
    /// Runs of each mode; the medians are reported. The order of the modes alternates from
    /// run to run.
    #[arg(long, default_value_t = DEFAULT_RUNS, value_parser = runs_range())]
    runs: u32,
    /// Keep-alive connections of the client, each one request at a time.
    #[arg(long, default_value_t = DEFAULT_CONNS)]
    conns: u32,
    /// Bytes of each request (head and body).
    #[arg(long, default_value_t = DEFAULT_REQUEST_BYTES)]
    request_bytes: usize,
    /// Bytes of each response's body.
    #[arg(long, default_value_t = DEFAULT_RESPONSE_BYTES)]
    response_bytes: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Detached,
    CaptureOff,
    CaptureOn,
}

impl Mode {
    const ALL: [Self; 3] = [Self::Detached, Self::CaptureOff, Self::CaptureOn];

    fn name(self) -> &'static str {
        match self {
            Self::Detached => "detached",
            Self::CaptureOff => "attached, capture off",
            Self::CaptureOn => "attached, capture on",
        }
    }
}

/// The agent's options in each attached mode: capture off is what an agent that looks for
/// neither PROXY headers nor request headers runs with; capture on looks for both, the
/// client's address in X-Forwarded-For believed from the client namespace.
fn agent_options(mode: Mode, trusted: &str) -> Vec<&str> {
    match mode {
        Mode::Detached => Vec::new(),
        Mode::CaptureOff => vec!["--no-proxy-protocol"],
        Mode::CaptureOn => vec![
            "--header",
            "x-forwarded-for=address",
            "--trusted-peer",
            trusted,
        ],
    }
}

/// What one run measured.
struct Run {
    load: LoadResult,
    /// Agent process CPU time during the load.
    agent_cpu: Option<Duration>,
    /// The counting programs during the load (egress, ingress).
    programs: Option<[DirCost; 2]>,
    /// Turns the agent reported, and turn events the kernel lost, for this run.
    turns: Option<(u64, u64)>,
}

pub fn run(args: &Args) -> Result<Section> {
    ensure!(args.conns > 0, "--conns must be positive");
    let _stats = enable_stats(Stats::RunTime)
        .context("enabling BPF run-time statistics (BPF_ENABLE_STATS, Linux 5.8+)")?;
    let pair = harness("creating the network namespaces", || {
        NetnsPair::new("bench-requests")
    })?;
    let cgroup = harness("creating the test cgroup", || {
        TestCgroup::new("bench-requests")
    })?;
    let _server = HttpServer::start(&pair, &cgroup, args.response_bytes)?;
    let trusted = format!("{CLIENT_V4}/32");

    let mut runs: [Vec<Run>; 3] = Default::default();
    for r in 0..args.runs {
        let mut order = Mode::ALL;
        if r % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            let run = one_run(args, &pair, &cgroup, mode, &trusted)?;
            eprintln!(
                "requests: run {}/{} {:<21}: {:.0} requests/s{}{}",
                r + 1,
                args.runs,
                mode.name(),
                run.load.rate(),
                run.agent_cpu.map_or_else(String::new, |c| format!(
                    ", agent process {:.1} % of a core",
                    c.as_secs_f64() / run.load.seconds * 100.0
                )),
                run.turns
                    .map_or_else(String::new, |(t, l)| format!(", {t} turns, {l} lost")),
            );
            runs[mode as usize].push(run);
        }
    }
    Ok(section(args, &runs))
}

fn one_run(
    args: &Args,
    pair: &NetnsPair,
    cgroup: &TestCgroup,
    mode: Mode,
    trusted: &str,
) -> Result<Run> {
    let agent = if mode == Mode::Detached {
        None
    } else {
        Some(RunningAgent::start_with(
            cgroup,
            &agent_options(mode, trusted),
        )?)
    };
    let want = usize::from(agent.is_some());
    for (attach_type, direction) in DIRECTIONS {
        let found = attached_prog_ids(cgroup.path(), attach_type)?.len();
        ensure!(
            found == want,
            "expected {want} program(s) attached to the test cgroup for {direction}, found \
             {found}"
        );
    }
    let ids = if agent.is_some() {
        Some([
            attached_named(cgroup.path(), BPF_CGROUP_INET_EGRESS, "count_egress")?,
            attached_named(cgroup.path(), BPF_CGROUP_INET_INGRESS, "count_ingress")?,
        ])
    } else {
        None
    };
    let stats = |ids: &[u32; 2]| -> Result<[DirCost; 2]> {
        Ok([
            prog_stats(ids[0], "count_egress")?,
            prog_stats(ids[1], "count_ingress")?,
        ])
    };
    let before = ids.as_ref().map(stats).transpose()?;
    let cpu_before = agent.as_ref().map(RunningAgent::cpu_time).transpose()?;
    let load = run_client(pair, args)?;
    let agent_cpu = match (&agent, cpu_before) {
        (Some(a), Some(b)) => Some(a.cpu_time()?.saturating_sub(b)),
        _ => None,
    };
    let programs = match (&ids, before) {
        (Some(ids), Some(before)) => {
            let after = stats(ids)?;
            Some([0, 1].map(|i| after[i].minus(before[i])))
        }
        _ => None,
    };
    ensure!(
        load.requests > 0,
        "the client completed no request: {}",
        load.error.as_deref().unwrap_or("no error reported")
    );
    let turns = match &agent {
        Some(a) if mode == Mode::CaptureOn => Some(wait_turns(a, load.requests)?),
        Some(a) => {
            let (t, l) = last_turns(&a.agent.records());
            ensure!(
                t == 0 && l == 0,
                "with capture off the agent reported {t} turns and {l} lost events"
            );
            None
        }
        None => None,
    };
    if let Some(agent) = agent {
        agent.stop()?;
        wait_detached(cgroup.path())?;
    }
    Ok(Run {
        load,
        agent_cpu,
        programs,
        turns,
    })
}

/// Waits until the agent's stats account for every request of the run: each one started a
/// turn, whose event the agent read or the kernel counted as lost. Returns (turns, lost).
fn wait_turns(agent: &RunningAgent, requests: u64) -> Result<(u64, u64)> {
    let records = harness("waiting for the agent's stats", || {
        agent.agent.wait_until(STATS_TIMEOUT, |records| {
            let (t, l) = last_turns(records);
            t + l >= requests
        })
    })?;
    let (turns, lost) = last_turns(&records);
    ensure!(
        turns + lost == requests,
        "the agent reported {turns} turns and {lost} lost events for {requests} requests"
    );
    Ok((turns, lost))
}

/// (turns, turn events lost) of the agent's latest stats record.
fn last_turns(records: &[Value]) -> (u64, u64) {
    records
        .iter()
        .rev()
        .find(|r| r.get("type").and_then(Value::as_str) == Some("stats"))
        .map_or((0, 0), |r| {
            let a = &r["attribution"];
            (
                a["turns"].as_u64().unwrap_or(0),
                a["turn_events_lost"].as_u64().unwrap_or(0),
            )
        })
}

fn section(args: &Args, runs: &[Vec<Run>; 3]) -> Section {
    let mut s = Section::new(
        "requests",
        "Request rate with request capture (HTTP/1.1 keep-alive over veth)",
    );
    s.method = format!(
        "A small HTTP/1.1 server (`outflow-bench http-serve`, a thread per connection) runs in a network namespace and in a test cgroup; a client \
         (`outflow-bench http-load`) in a second namespace, joined by a veth pair, keeps {conns} \
         keep-alive connections busy for {secs} s, each sending its next {req}-byte request \
         (a chat-completion POST with an `X-Forwarded-For` header) as soon as the previous \
         {resp}-byte response (body) is in; requests/s is what the client completed over the \
         time it ran. Three modes: *detached* (nothing attached to the cgroup, checked with \
         BPF_PROG_QUERY); *capture off*: `outflow-agent --no-proxy-protocol` (no PROXY header \
         and no request header looked for, so the kernel captures nothing); *capture on*: \
         `outflow-agent --header x-forwarded-for=address --trusted-peer {trusted}`, so every \
         request starts a turn: an event in the ring buffer with the request's first bytes, \
         which the agent reads as it comes and parses for the client's address. {runs} runs of \
         each mode, the order of the modes reversed every other run; medians, and the range of \
         requests/s. *Program ns/skb*: `run_time_ns` / `run_cnt` of the agent's `count_ingress` \
         and `count_egress` during the load (BPF run-time statistics on, as in the traffic \
         section). *Agent CPU*: the agent's user and system time during the load (/proc), per \
         second and per request. The run checks, with capture on, that the agent's stats \
         account for every request (turns read + events lost = requests completed) and, with \
         capture off, that there were none.",
        conns = args.conns,
        secs = args.seconds,
        req = args.request_bytes,
        resp = args.response_bytes,
        trusted = format_args!("{CLIENT_V4}/32"),
        runs = args.runs,
    );
    let mut command = "sudo target/release/outflow-bench requests".to_owned();
    for (flag, value, default) in [
        ("--seconds", args.seconds as usize, DEFAULT_SECONDS as usize),
        ("--runs", args.runs as usize, DEFAULT_RUNS as usize),
        ("--conns", args.conns as usize, DEFAULT_CONNS as usize),
        ("--request-bytes", args.request_bytes, DEFAULT_REQUEST_BYTES),
        (
            "--response-bytes",
            args.response_bytes,
            DEFAULT_RESPONSE_BYTES,
        ),
    ] {
        if value != default {
            command.push_str(&format!(" {flag} {value}"));
        }
    }
    s.commands = vec![command];
    s.header = [
        "Agent",
        "Requests/s",
        "min–max",
        "vs detached",
        "count_ingress ns/skb",
        "count_ingress per request",
        "count_egress ns/skb",
        "Agent CPU (% of a core)",
        "Agent CPU per request",
        "Requests/s per agent core",
        "Turns read / lost",
    ]
    .map(String::from)
    .to_vec();
    let detached = median(&rates(&runs[Mode::Detached as usize]));
    for mode in Mode::ALL {
        let v = &runs[mode as usize];
        let r = rates(v);
        let rate = median(&r);
        let (lo, hi) = range(&r);
        let prog = |i: usize| {
            let ns = median(
                &v.iter()
                    .filter_map(|run| run.programs.map(|p| p[i].ns_per_packet()))
                    .collect::<Vec<_>>(),
            );
            if ns.is_nan() {
                "–".to_owned()
            } else {
                format!("{ns:.0} ns")
            }
        };
        let ingress_per_request = median(
            &v.iter()
                .filter_map(|run| {
                    run.programs
                        .map(|p| p[1].run_time_ns as f64 / run.load.requests as f64)
                })
                .collect::<Vec<_>>(),
        );
        let cpu_share = median(
            &v.iter()
                .filter_map(|run| run.agent_cpu.map(|c| c.as_secs_f64() / run.load.seconds))
                .collect::<Vec<_>>(),
        );
        let cpu_per_request = median(
            &v.iter()
                .filter_map(|run| {
                    run.agent_cpu
                        .map(|c| c.as_secs_f64() / run.load.requests as f64)
                })
                .collect::<Vec<_>>(),
        );
        let turns: (u64, u64) = v
            .iter()
            .filter_map(|run| run.turns)
            .fold((0, 0), |(t, l), (a, b)| (t + a, l + b));
        let dash = || "–".to_owned();
        s.row([
            mode.name().to_owned(),
            thousands(rate),
            format!("{}–{}", thousands(lo), thousands(hi)),
            if mode == Mode::Detached {
                dash()
            } else {
                format!("{:+.1} %", (rate - detached) / detached * 100.0)
            },
            prog(1),
            if ingress_per_request.is_nan() {
                dash()
            } else {
                format!("{ingress_per_request:.0} ns")
            },
            prog(0),
            if cpu_share.is_nan() {
                dash()
            } else {
                format!("{:.1} %", cpu_share * 100.0)
            },
            if cpu_per_request.is_nan() {
                dash()
            } else {
                format!("{:.1} µs", cpu_per_request * 1e6)
            },
            if mode == Mode::CaptureOn && cpu_share > 0.0 {
                thousands(rate / cpu_share)
            } else {
                dash()
            },
            if mode == Mode::CaptureOn {
                format!(
                    "{} / {}",
                    thousands(turns.0 as f64),
                    thousands(turns.1 as f64)
                )
            } else {
                dash()
            },
        ]);
    }
    s.notes = vec![
        "*vs detached*: the change of the median request rate against the detached runs. \
         *count_ingress ns/skb* is over every skb the server receives (requests and ACKs); \
         *count_ingress per request* is the program's whole run time during the load divided \
         by the requests: the difference between capture on and capture off in that column \
         is what capturing costs per request in the kernel on real traffic (compare the \
         capture section). *Requests/s per agent core* = requests/s ÷ the agent's CPU share \
         with capture on: the request rate one core of the agent would keep up with at that \
         cost per request (its interval work included). The programs' own cost is not in \
         the agent's CPU: it runs in the client's and server's threads and softirqs, and \
         shows in the rate and the ns/skb."
            .to_owned(),
        "*Turns read / lost*: over all capture-on runs, the turn events the agent read and \
         those the kernel found no room for in the ring buffer (the product's 8 MiB: about \
         2,000 events of 4,160 bytes, whatever the request's size). A lost event leaves that \
         request's bytes to the TCP peer; losses mean the agent fell more than that many \
         requests behind."
            .to_owned(),
        "The agent's CPU is read from /proc in clock ticks (10 ms): short runs give coarse \
         figures. Two-core VM shared by the client, the server, their softirqs and the agent: \
         the request rate is CPU-bound, so any CPU taken anywhere shows as requests lost; read \
         the change beside the min–max range."
            .to_owned(),
    ];
    s
}

fn rates(runs: &[Run]) -> Vec<f64> {
    runs.iter().map(|r| r.load.rate()).collect()
}

// ---------------------------------------------------------------------------------------------
// The server and the client

/// The HTTP server, in the server namespace and the test cgroup. Killed when dropped.
struct HttpServer {
    child: Child,
}

impl HttpServer {
    fn start(pair: &NetnsPair, cgroup: &TestCgroup, response_bytes: usize) -> Result<Self> {
        let procs = cgroup.path().join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .with_context(|| format!("opening {}", procs.display()))?;
        let mut command = Command::new("/proc/self/exe");
        std::os::unix::process::CommandExt::arg0(&mut command, "outflow-bench");
        command
            .args(["http-serve", "--listen"])
            .arg(SocketAddr::from((SERVER_V4, PORT)).to_string())
            .args(["--response-bytes", &response_bytes.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        in_netns(&mut command, pair.server_ns(), Some(&procs))?;
        let mut child = command.spawn().context("starting the HTTP server")?;
        let stdout = child.stdout.take().context("HTTP server stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let status = child.wait()?;
            bail!("the HTTP server did not start: {status}");
        }
        Ok(Self { child })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the client in the client namespace for the run's seconds and reads its result.
fn run_client(pair: &NetnsPair, args: &Args) -> Result<LoadResult> {
    let mut command = Command::new("/proc/self/exe");
    std::os::unix::process::CommandExt::arg0(&mut command, "outflow-bench");
    command
        .args(["http-load", "--target"])
        .arg(SocketAddr::from((SERVER_V4, PORT)).to_string())
        .args(["--conns", &args.conns.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--request-bytes", &args.request_bytes.to_string()])
        .stdin(Stdio::null());
    in_netns(&mut command, pair.client_ns(), None)?;
    let out = command.output().context("running the HTTP client")?;
    ensure!(
        out.status.success(),
        "the HTTP client failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("reading the HTTP client's result")
}

/// What the client reports (one JSON line on stdout).
#[derive(Debug, Serialize, Deserialize)]
struct LoadResult {
    /// Requests completed (response read).
    requests: u64,
    /// From the moment every connection was open to the last one's end.
    seconds: f64,
    /// The first error of a connection that stopped early, if any.
    error: Option<String>,
}

impl LoadResult {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Bytes of each response's body.
    #[arg(long, default_value_t = DEFAULT_RESPONSE_BYTES)]
    response_bytes: usize,
}

/// `outflow-bench http-serve`: answers every request on every connection with the same
/// small response, until killed. Prints `ready` once it listens.
pub fn run_serve(args: &ServeArgs) -> Result<()> {
    die_with_parent()?;
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    println!("ready");
    io::stdout().flush()?;
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        args.response_bytes
    )
    .into_bytes();
    response.resize(response.len() + args.response_bytes, b'x');
    let response = Arc::new(response);
    for stream in listener.incoming() {
        let stream = stream.context("accepting a connection")?;
        let response = Arc::clone(&response);
        thread::spawn(move || {
            // A connection that breaks ends its thread; the client reports the error.
            let _ = serve(stream, &response);
        });
    }
    Ok(())
}

/// Reads request after request (head, then the body its Content-Length gives) and answers each.
fn serve(mut stream: TcpStream, response: &[u8]) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut have = 0;
    loop {
        while let Some(used) = message_len(&buf[..have], Kind::Request)? {
            stream.write_all(response)?;
            buf.copy_within(used..have, 0);
            have -= used;
        }
        if have == buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request too large",
            ));
        }
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            return Ok(());
        }
        have += n;
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Request,
    Response,
}

/// Length of the complete message (head and Content-Length body) at the start of `buf`, or
/// `None` if more bytes are needed. Only what this benchmark's own client and server send is
/// understood: an HTTP/1.1 request or response line, headers, a body of Content-Length bytes.
fn message_len(buf: &[u8], kind: Kind) -> io::Result<Option<usize>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("a head that is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let http11 = match kind {
        Kind::Request => first.ends_with(" HTTP/1.1"),
        Kind::Response => first.starts_with("HTTP/1.1 "),
    };
    if !http11 {
        return Err(bad("not an HTTP/1.1 message"));
    }
    let mut body = 0;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("a header without ':'"))?;
        if name.eq_ignore_ascii_case("content-length") {
            body = value
                .trim()
                .parse::<usize>()
                .map_err(|_| bad("bad Content-Length"))?;
        }
    }
    let len = end + 4 + body;
    Ok((buf.len() >= len).then_some(len))
}

#[derive(clap::Args)]
pub struct LoadArgs {
    /// The server.
    #[arg(long)]
    target: SocketAddr,
    /// Keep-alive connections, one thread each.
    #[arg(long, default_value_t = DEFAULT_CONNS)]
    conns: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = DEFAULT_SECONDS)]
    seconds: u32,
    /// Bytes of each request.
    #[arg(long, default_value_t = DEFAULT_REQUEST_BYTES)]
    request_bytes: usize,
}

/// `outflow-bench http-load`: `--conns` connections each send a request, read its response,
/// and again, for `--seconds`; prints a [`LoadResult`] as JSON.
pub fn run_load(args: &LoadArgs) -> Result<()> {
    die_with_parent()?;
    let request = Arc::new(http_request(args.request_bytes));
    let conns = usize::try_from(args.conns).context("--conns")?;
    let start = Arc::new(Barrier::new(conns + 1));
    let seconds = Duration::from_secs(u64::from(args.seconds));
    let mut threads = Vec::with_capacity(conns);
    for _ in 0..conns {
        let stream = TcpStream::connect(args.target)
            .with_context(|| format!("connecting to {}", args.target))?;
        stream.set_nodelay(true)?;
        let (request, start) = (Arc::clone(&request), Arc::clone(&start));
        threads.push(thread::spawn(move || {
            start.wait();
            load(stream, &request, Instant::now() + seconds)
        }));
    }
    start.wait();
    let began = Instant::now();
    let mut result = LoadResult {
        requests: 0,
        seconds: 0.0,
        error: None,
    };
    for t in threads {
        let (n, error) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        result.requests += n;
        if result.error.is_none() {
            result.error = error.map(|e| e.to_string());
        }
    }
    result.seconds = began.elapsed().as_secs_f64();
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// One connection's loop: request, response, until `deadline`. Returns the requests completed
/// and the error that stopped it early, if any.
fn load(mut stream: TcpStream, request: &[u8], deadline: Instant) -> (u64, Option<io::Error>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut done = 0;
    while Instant::now() < deadline {
        if let Err(e) = stream.write_all(request) {
            return (done, Some(e));
        }
        let mut have = 0;
        loop {
            match message_len(&buf[..have], Kind::Response) {
                Ok(Some(n)) if n == have => break,
                Ok(Some(_)) => {
                    return (
                        done,
                        Some(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "more than one response",
                        )),
                    );
                }
                Ok(None) => {}
                Err(e) => return (done, Some(e)),
            }
            if have == buf.len() {
                return (
                    done,
                    Some(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "response too large",
                    )),
                );
            }
            match stream.read(&mut buf[have..]) {
                Ok(0) => {
                    return (
                        done,
                        Some(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the connection",
                        )),
                    );
                }
                Ok(n) => have += n,
                Err(e) => return (done, Some(e)),
            }
        }
        done += 1;
    }
    (done, None)
}

/// Dies with the benchmark, even if it is killed.
fn die_with_parent() -> Result<()> {
    // SAFETY: prctl with an integer argument.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error()).context("prctl(PR_SET_PDEATHSIG)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_delimited_by_their_content_length() {
        let req = http_request(300);
        assert_eq!(req.len(), 300);
        assert_eq!(message_len(&req, Kind::Request).unwrap(), Some(300));
        assert_eq!(message_len(&req[..299], Kind::Request).unwrap(), None);
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(message_len(resp, Kind::Response).unwrap(), Some(resp.len()));
        assert!(message_len(b"NOT HTTP\r\n\r\n", Kind::Request).is_err());
    }

    #[test]
    fn requests_have_the_asked_size() {
        for size in [1, 100, 200, 1024, 3584] {
            assert_eq!(http_request(size).len(), size, "size {size}");
        }
        let big = http_request(1024);
        assert_eq!(message_len(&big, Kind::Request).unwrap(), Some(1024));
    }
}
