//! What the agent cannot attribute per request it still counts exactly, at connection level, and
//! reports by cause: TLS, HTTP/2 with prior knowledge, two HTTP/1.1 requests in one turn, and a
//! request head longer than the kernel's capture.
//!
//! Real kernel, real agent: `outflow-protopeer serve` in the test cgroup and the server
//! namespace, `outflow-protopeer request` in the client namespace, whose address (198.18.0.2)
//! the agent trusts, so that a readable request would be attributed to its `x-client-id`. Each
//! case compares the agent's records of the connection, after its closed record, to the
//! client's `TCP_INFO` (see `outflow-protopeer`'s doc for why that is the ground truth), to the
//! byte, and checks the cause the agent's stats give.
//!
//! `TCP_INFO` counts sequence space. Read once both FINs are through (`tcpi_state` is
//! `TCP_CLOSE`), the client's `tcpi_bytes_acked` is the payload the server received plus the
//! client's SYN (an active open advances `snd_una` over it through the ACK path, which counts)
//! and its FIN; `tcpi_bytes_received` is the payload the server sent plus the server's FIN. The
//! tests take those 3 bytes off and check the result against what each end's program wrote and
//! read, so a kernel that counted otherwise would fail loudly there, not in the agent's sums.
//!
//! Needs root (CI runs it as root): nothing here skips itself.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use outflow_tests::{
    agent::{Agent, PinDir, run_bin_to_completion},
    cgroup::TestCgroup,
    netns::{CLIENT_V4, NetnsPair},
    process::{CapturedText, ChildProcess},
    records::{ConnRecord, ConnTotals, Role, conn_records, of_type},
};
use serde::Deserialize;
use serde_json::{Value, json};

const PORT: u16 = 8443;
/// Client options that pause between requests for more than two of the agent's 200 ms
/// intervals, so that the connection is reported in several records.
const SLOW: &[&str] = &["--pause-ms", "500"];
/// `TCP_CLOSE` of the kernel's `enum tcp_state` (include/net/tcp_states.h).
const TCP_CLOSE: u8 = 7;
/// Every wait of these tests: each case takes a few seconds.
const WAIT: Duration = Duration::from_secs(20);
/// The trusted peer is the client itself: its headers would be believed if they were readable.
const AGENT_ARGS: &[&str] = &[
    "--output",
    "json",
    "--interval",
    "200ms",
    "--trusted-peer",
    "198.18.0.2/32",
    "--header",
    "x-forwarded-for=address",
    "--header",
    "x-client-id=id",
    "--raw-ids",
];

fn protopeer_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_outflow-protopeer"))
}

/// What `outflow-protopeer serve` prints per connection.
#[derive(Debug, Clone, Deserialize)]
struct ServeReport {
    remote_addr: IpAddr,
    remote_port: u16,
    requests: Vec<Served>,
    tcp_read: u64,
    tcp_written: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct Served {
    body: u64,
    client_id: Option<String>,
}

/// What `outflow-protopeer request` prints.
#[derive(Debug, Clone, Deserialize)]
struct RequestReport {
    local_addr: IpAddr,
    local_port: u16,
    tcp_written: u64,
    tcp_read: u64,
    tcp_state: u8,
    bytes_acked: u64,
    bytes_received: u64,
    batches: Vec<Batch>,
    bodies: Vec<u64>,
}

impl RequestReport {
    /// Payload bytes the client received and the server acknowledged, from `TCP_INFO` (see the
    /// module doc): `tcpi_bytes_received` less the server's FIN, `tcpi_bytes_acked` less the
    /// client's SYN and FIN.
    fn payload(&self) -> (u64, u64) {
        assert_eq!(
            self.tcp_state, TCP_CLOSE,
            "TCP_INFO is read once both FINs are through: {self:?}"
        );
        (self.bytes_received - 1, self.bytes_acked - 2)
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct Batch {
    requests: usize,
    sent: u64,
    received: u64,
}

/// `outflow-protopeer serve` in the server namespace and the test cgroup; killed when dropped.
struct ProtoServer {
    process: ChildProcess,
    stderr: CapturedText,
    output: Arc<(Mutex<ServerOutput>, Condvar)>,
}

#[derive(Default)]
struct ServerOutput {
    ready: bool,
    reports: Vec<ServeReport>,
    bad_lines: Vec<String>,
    closed: bool,
}

impl ProtoServer {
    fn start(proto: &str, pair: &NetnsPair, cgroup: &TestCgroup, cert: Option<&Path>) -> Self {
        let mut command = Command::new(protopeer_bin());
        command
            .args(["serve", "--proto", proto, "--netns", pair.server_ns()])
            .arg("--cgroup")
            .arg(cgroup.path())
            .args(["--listen", &pair.server_v4(PORT).to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cert) = cert {
            command.arg("--cert-out").arg(cert);
        }
        let process = ChildProcess::spawn("outflow-protopeer", &mut command);
        let stderr = CapturedText::capture(
            "outflow-protopeer",
            process.take_stderr().expect("stderr is piped"),
        );
        let stdout = process.take_stdout().expect("stdout is piped");
        let output = Arc::new((Mutex::new(ServerOutput::default()), Condvar::new()));
        let sink = Arc::clone(&output);
        thread::Builder::new()
            .name("protopeer-stdout".into())
            .spawn(move || {
                let (state, changed) = &*sink;
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    let line = lines.next();
                    let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
                    match line {
                        Some(Ok(line)) if line == "ready" && !s.ready => s.ready = true,
                        Some(Ok(line)) => match serde_json::from_str(&line) {
                            Ok(report) => s.reports.push(report),
                            Err(e) => s.bad_lines.push(format!("{line} ({e})")),
                        },
                        Some(Err(_)) | None => s.closed = true,
                    }
                    let closed = s.closed;
                    drop(s);
                    changed.notify_all();
                    if closed {
                        return;
                    }
                }
            })
            .expect("spawning the protopeer stdout reader");
        let server = Self {
            process,
            stderr,
            output,
        };
        server.wait(|s| s.ready.then_some(()), "to print `ready`");
        server
    }

    /// Waits until `done` holds for the output; panics on timeout, exit or a bad line.
    fn wait<T>(&self, mut done: impl FnMut(&ServerOutput) -> Option<T>, what: &str) -> T {
        let (state, changed) = &*self.output;
        let deadline = Instant::now() + WAIT;
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(t) = done(&s) {
                return t;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if s.closed || !s.bad_lines.is_empty() || left.is_zero() {
                let (closed, bad) = (s.closed, s.bad_lines.clone());
                drop(s);
                panic!(
                    "waiting for outflow-protopeer (pid {}) {what}: closed {closed}, bad lines \
                     {bad:?}; stderr:\n{}",
                    self.process.pid(),
                    self.stderr.text()
                );
            }
            s = changed
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The report of the connection from `client`.
    fn report_of(&self, client: &RequestReport) -> ServeReport {
        self.wait(
            |s| {
                s.reports
                    .iter()
                    .find(|r| {
                        r.remote_addr == client.local_addr && r.remote_port == client.local_port
                    })
                    .cloned()
            },
            &format!("to report the connection from port {}", client.local_port),
        )
    }
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A protocol server in its own cgroup and namespace pair, and an agent on that cgroup.
struct Bench {
    pair: NetnsPair,
    cgroup: TestCgroup,
    server: ProtoServer,
    agent: Agent,
    cert: Option<TempFile>,
    _pin: PinDir,
}

impl Bench {
    fn new(tag: &str, proto: &str) -> Self {
        let pair = NetnsPair::new(tag);
        let cgroup = TestCgroup::new(tag);
        let cert = (proto == "tls").then(|| {
            TempFile(std::env::temp_dir().join(format!(
                "outflow-protopeer-{}-{tag}.der",
                std::process::id()
            )))
        });
        let server = ProtoServer::start(proto, &pair, &cgroup, cert.as_ref().map(|c| &*c.0));
        let pin = PinDir::new(tag);
        let mut args = vec!["--cgroup", cgroup.as_arg(), "--pin-dir", pin.as_arg()];
        args.extend_from_slice(AGENT_ARGS);
        let agent = Agent::start(&args);
        agent.wait_started(WAIT);
        Self {
            pair,
            cgroup,
            server,
            agent,
            cert,
            _pin: pin,
        }
    }

    /// Runs `outflow-protopeer request --proto PROTO ... EXTRA` in the client namespace.
    fn request(&self, proto: &str, sizes: &[u64], id: &str, extra: &[&str]) -> RequestReport {
        let sizes: Vec<String> = sizes.iter().map(u64::to_string).collect();
        let (server, sizes) = (self.pair.server_v4(PORT).to_string(), sizes.join(","));
        let mut args = vec![
            "request",
            "--proto",
            proto,
            "--netns",
            self.pair.client_ns(),
            "--connect",
            &server,
            "--sizes",
            &sizes,
            "--id",
            id,
        ];
        let cert;
        if let Some(TempFile(path)) = &self.cert {
            cert = path.to_str().expect("temp paths are UTF-8").to_owned();
            args.extend(["--ca", &cert]);
        }
        args.extend_from_slice(extra);
        let (status, stdout, stderr) = run_bin_to_completion(protopeer_bin(), &args);
        assert!(
            status.success(),
            "outflow-protopeer {args:?}: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver \
             stderr:\n{}",
            self.server.stderr.text()
        );
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("request report {line:?}: {e}; stderr:\n{stderr}"))
    }

    /// Waits for the closed record of `client`'s connection and a stats record after it;
    /// returns the connection's records (with their clients) and that stats record.
    fn closed(&self, client: &RequestReport) -> (Vec<Attributed>, Value) {
        let is_ours = |r: &Value| {
            r["type"] == "conn"
                && r["remote_port"] == client.local_port
                && r["remote_addr"] == client.local_addr.to_string()
        };
        let records = self.agent.wait_until(WAIT, |records| {
            records
                .iter()
                .position(|r| is_ours(r) && r["closed"] == true)
                .is_some_and(|at| of_type(&records[at..], "stats").next().is_some())
        });
        let closed_at = records
            .iter()
            .position(|r| is_ours(r) && r["closed"] == true)
            .expect("wait_until saw the closed record");
        let stats = of_type(&records[closed_at..], "stats")
            .next()
            .cloned()
            .expect("wait_until saw a stats record after it");
        let ours: Vec<Value> = records.iter().filter(|r| is_ours(r)).cloned().collect();
        let attributed = conn_records(&ours)
            .into_iter()
            .zip(&ours)
            .map(|(record, raw)| Attributed::new(record, raw))
            .collect();
        (attributed, stats)
    }
}

/// A `conn` record with its client.
#[derive(Debug, Clone)]
struct Attributed {
    record: ConnRecord,
    client_addr: String,
    client_id: Option<String>,
    client_source: String,
}

impl Attributed {
    fn new(record: ConnRecord, raw: &Value) -> Self {
        let client_addr = raw["client_addr"]
            .as_str()
            .unwrap_or_else(|| panic!("client_addr is not a string: {raw}"))
            .to_owned();
        let client_id = match &raw["client_id"] {
            Value::Null => None,
            Value::String(id) => Some(id.clone()),
            other => panic!("client_id is neither null nor a string ({other}): {raw}"),
        };
        let client_source = raw["client_source"]
            .as_str()
            .unwrap_or_else(|| panic!("client_source is not a string: {raw}"))
            .to_owned();
        Self {
            record,
            client_addr,
            client_id,
            client_source,
        }
    }

    fn client(&self) -> (&str, Option<&str>, &str) {
        (
            &self.client_addr,
            self.client_id.as_deref(),
            &self.client_source,
        )
    }
}

fn totals<'a>(records: impl IntoIterator<Item = &'a Attributed>) -> ConnTotals {
    let mut t = ConnTotals::default();
    for r in records {
        t.add(&r.record);
    }
    t
}

/// Asserts the connection's records add up to the ground truth, to the byte, and are whole:
/// one closed record, the last, all of the server side of this bench's cgroup.
fn assert_counted_exactly(
    recs: &[Attributed],
    client: &RequestReport,
    server: &ServeReport,
    bench: &Bench,
) {
    let (received, acked) = client.payload();
    // The ground truth agrees with itself: what each end wrote, the other received.
    assert_eq!(received, client.tcp_read, "{client:?}");
    assert_eq!(received, server.tcp_written, "{client:?} {server:?}");
    assert_eq!(acked, client.tcp_written, "{client:?}");
    assert_eq!(acked, server.tcp_read, "{client:?} {server:?}");

    let t = totals(recs);
    assert_eq!(t.closed, 1, "closed exactly once: {recs:#?}");
    assert!(
        recs.last().is_some_and(|r| r.record.closed),
        "the closed record is the last: {recs:#?}"
    );
    assert_eq!(
        t.bytes_out, received,
        "bytes_out vs the client's tcpi_bytes_received less the FIN: {client:?} {recs:#?}"
    );
    assert_eq!(
        t.bytes_in, acked,
        "bytes_in vs the client's tcpi_bytes_acked less SYN and FIN: {client:?} {recs:#?}"
    );
    for r in recs {
        assert_eq!(r.record.role, Role::Server, "{r:?}");
        assert_eq!(r.record.cgroup, bench.cgroup.relative_path(), "{r:?}");
        assert_eq!(r.record.local_port, PORT, "{r:?}");
    }
}

/// Asserts the connection was reported in more than one interval: the client paused
/// between requests for [`SLOW`].
fn assert_several_records(recs: &[Attributed]) {
    let stamps: std::collections::BTreeSet<u64> = recs.iter().map(|r| r.record.ts).collect();
    assert!(
        stamps.len() >= 2,
        "records of at least two intervals: {recs:#?}"
    );
}

/// Asserts every record of the connection is the TCP peer's.
fn assert_all_peer(recs: &[Attributed]) {
    let peer = CLIENT_V4.to_string();
    for r in recs {
        assert_eq!(
            r.client(),
            (peer.as_str(), None, "peer"),
            "every record is the TCP peer's: {recs:#?}"
        );
    }
}

/// Asserts the attribution stats: exactly `cause` once among the unattributed, nothing ignored
/// or lost.
fn assert_one_unattributed(stats: &Value, cause: &str) {
    let a = &stats["attribution"];
    assert_eq!(
        a["unattributed"],
        json!({ cause: 1 }),
        "one connection, one {cause}, nothing else: {stats}"
    );
    assert_eq!(a["ignored_claims"], 0, "{stats}");
    assert_eq!(a["turn_events_lost"], 0, "{stats}");
    assert!(
        a["turns"].as_u64().is_some_and(|t| t >= 1),
        "the first turn was captured: {stats}"
    );
}

/// Asserts the server read each request's `x-client-id`: the header was there to be read.
fn assert_ids_sent(server: &ServeReport, client: &RequestReport, id: &str) {
    let ids: Vec<Option<String>> = server
        .requests
        .iter()
        .map(|r| r.client_id.clone())
        .collect();
    let want: Vec<Option<String>> = (0..client.bodies.len())
        .map(|i| Some(format!("{id}-{i}")))
        .collect();
    assert_eq!(ids, want, "{server:?}");
    let bodies: Vec<u64> = server.requests.iter().map(|r| r.body).collect();
    assert_eq!(bodies, client.bodies, "{server:?}");
}

/// Sums of the records per client.
fn by_client(recs: &[Attributed]) -> BTreeMap<(String, Option<String>, String), ConnTotals> {
    let mut m = BTreeMap::<_, ConnTotals>::new();
    for r in recs {
        m.entry((
            r.client_addr.clone(),
            r.client_id.clone(),
            r.client_source.clone(),
        ))
        .or_default()
        .add(&r.record);
    }
    m
}

/// Asserts the connection's bytes split between the peer (the first batch) and the id of the
/// last request (the second batch), to the byte.
fn assert_first_batch_peer_second_by_id(recs: &[Attributed], client: &RequestReport, id: &str) {
    let [first, second] = client.batches[..] else {
        panic!("two batches: {client:?}");
    };
    let peer = CLIENT_V4.to_string();
    let by = by_client(recs);
    let summary: BTreeMap<_, (u64, u64)> = by
        .iter()
        .map(|(k, t)| (k.clone(), (t.bytes_in, t.bytes_out)))
        .collect();
    let last = client.bodies.len() - 1;
    let want = BTreeMap::from([
        (
            (peer.clone(), None, "peer".to_owned()),
            (first.sent, first.received),
        ),
        (
            (
                peer,
                Some(format!("{id}-{last}")),
                "header:x-client-id".to_owned(),
            ),
            (second.sent, second.received),
        ),
    ]);
    assert_eq!(
        summary, want,
        "(bytes_in, bytes_out) per client: the first batch is the peer's, the second its \
         header id's; batches {:?}; records {recs:#?}",
        client.batches
    );
}

#[test]
fn tls_is_counted_exactly_for_the_peer() {
    let bench = Bench::new("proto-tls", "tls");
    let sizes = [1_000, 300_000, 2_000_000];
    let client = bench.request("tls", &sizes, "tls-tenant", SLOW);
    let server = bench.server.report_of(&client);
    assert_ids_sent(&server, &client, "tls-tenant");
    let (recs, stats) = bench.closed(&client);
    assert_counted_exactly(&recs, &client, &server, &bench);
    assert_several_records(&recs);
    assert!(
        client.bytes_received > sizes.iter().sum::<u64>(),
        "TLS adds bytes: {client:?}"
    );
    assert_all_peer(&recs);
    assert_one_unattributed(&stats, "tls");
    assert_eq!(
        bench.agent.stop().code(),
        Some(0),
        "{}",
        bench.agent.stderr()
    );
}

#[test]
fn http2_prior_knowledge_is_counted_exactly_for_the_peer() {
    let bench = Bench::new("proto-h2c", "h2c");
    let sizes = [1_000, 300_000, 2_000_000, 0, 70_000];
    let client = bench.request("h2c", &sizes, "h2-tenant", SLOW);
    let server = bench.server.report_of(&client);
    let mut ids: Vec<_> = server
        .requests
        .iter()
        .map(|r| r.client_id.clone())
        .collect();
    // Streams are answered in the order they arrive, which need not be the order sent.
    ids.sort();
    let mut want: Vec<_> = (0..sizes.len())
        .map(|i| Some(format!("h2-tenant-{i}")))
        .collect();
    want.sort();
    assert_eq!(ids, want, "{server:?}");
    let (recs, stats) = bench.closed(&client);
    assert_counted_exactly(&recs, &client, &server, &bench);
    assert_several_records(&recs);
    assert_all_peer(&recs);
    assert_one_unattributed(&stats, "http2");
    assert_eq!(
        bench.agent.stop().code(),
        Some(0),
        "{}",
        bench.agent.stderr()
    );
}

#[test]
fn pipelined_requests_are_the_peers_and_the_next_request_its_ids() {
    let bench = Bench::new("proto-pipe", "http1");
    // Requests 0 and 1 in one write (one turn), then request 2 on its own, all quickly: the two
    // clients' parts are split within an interval (the other cases split across intervals).
    let sizes = [1_000, 300_000, 50_000];
    let client = bench.request("http1", &sizes, "pipe-tenant", &["--pipeline", "2"]);
    assert_eq!(
        client
            .batches
            .iter()
            .map(|b| b.requests)
            .collect::<Vec<_>>(),
        [2, 1],
        "{client:?}"
    );
    let server = bench.server.report_of(&client);
    assert_ids_sent(&server, &client, "pipe-tenant");
    let (recs, stats) = bench.closed(&client);
    assert_counted_exactly(&recs, &client, &server, &bench);
    assert_first_batch_peer_second_by_id(&recs, &client, "pipe-tenant");
    assert_one_unattributed(&stats, "pipelined");
    assert_eq!(
        bench.agent.stop().code(),
        Some(0),
        "{}",
        bench.agent.stderr()
    );
}

#[test]
fn a_request_head_longer_than_the_capture_is_the_peers() {
    let bench = Bench::new("proto-long", "http1");
    // Request 0: a 6 KB cookie before x-client-id, beyond the 4096 bytes captured. Request 1,
    // a normal one in a later interval, shows that the connection is still read.
    let sizes = [20_000, 1_000];
    let client = bench.request(
        "http1",
        &sizes,
        "long-tenant",
        &[SLOW, &["--cookie-bytes", "6000"]].concat(),
    );
    let [first, _] = client.batches[..] else {
        panic!("two batches: {client:?}");
    };
    assert!(
        first.sent > 6_000,
        "the first head is over 6 KB: {client:?}"
    );
    let server = bench.server.report_of(&client);
    assert_ids_sent(&server, &client, "long-tenant");
    let (recs, stats) = bench.closed(&client);
    assert_counted_exactly(&recs, &client, &server, &bench);
    assert_several_records(&recs);
    assert_first_batch_peer_second_by_id(&recs, &client, "long-tenant");
    assert_one_unattributed(&stats, "headers_truncated");
    assert_eq!(
        bench.agent.stop().code(),
        Some(0),
        "{}",
        bench.agent.stderr()
    );
}
