//! Driving both ends from a test: [`HttpServer`] runs `outflow-testpeer http-serve` in the
//! server namespace and the test cgroup, [`run_load`] runs `outflow-testpeer http-load` in the
//! client namespace, and [`Ledger`] joins what both reported, request by request.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::load::{LoadSpec, RequestResult};
use super::serve::{ServedConn, ServedRequest, ServerEvent};
use crate::cgroup::TestCgroup;
use crate::lines::JsonLines;
use crate::netns::{NetnsPair, SERVER_V4, SERVER_V6};
use crate::process::{CapturedText, ChildProcess};

/// How long the server may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a load may run.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// How to run the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpServerOptions {
    /// Port it listens on, at 198.18.0.1 and \[2001:db8::1\].
    pub port: u16,
    /// Strip a PROXY header at the start of each connection, if there is one.
    pub proxy_protocol: bool,
    /// Annotate each request that has this header with its value (see `--annotate`).
    pub annotate: Option<String>,
}

impl HttpServerOptions {
    /// Listening on `port`, PROXY headers stripped, no annotations.
    pub fn new(port: u16) -> Self {
        Self {
            port,
            proxy_protocol: true,
            annotate: None,
        }
    }
}

/// `outflow-testpeer http-serve` in the server namespace of a [`NetnsPair`], as a member of a
/// [`TestCgroup`]: the inference server whose bytes the agent attributes. Killed when dropped.
pub struct HttpServer {
    process: ChildProcess,
    events: Arc<JsonLines<ServerEvent>>,
    stderr: CapturedText,
    port: u16,
}

impl HttpServer {
    /// Starts the server (pass [`crate::testpeer_bin!()`]) and waits until it listens.
    pub fn start(
        bin: &Path,
        pair: &NetnsPair,
        cgroup: &TestCgroup,
        options: &HttpServerOptions,
    ) -> Self {
        let mut command = Command::new(bin);
        command
            .arg("http-serve")
            .args(["--netns", pair.server_ns()])
            .arg("--cgroup")
            .arg(cgroup.path())
            .args([
                "--listen",
                &SocketAddr::new(SERVER_V4.into(), options.port).to_string(),
            ])
            .args([
                "--listen",
                &SocketAddr::new(SERVER_V6.into(), options.port).to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if options.proxy_protocol {
            command.arg("--proxy-protocol");
        }
        if let Some(header) = &options.annotate {
            command.args(["--annotate", header]);
        }
        let process = ChildProcess::spawn("http-serve", &mut command);
        let stderr = CapturedText::capture(
            "http-serve",
            process
                .take_stderr()
                .expect("stderr of http-serve is piped"),
        );
        let events = JsonLines::spawn(
            "http-serve-stdout",
            process
                .take_stdout()
                .expect("stdout of http-serve is piped"),
            Some("ready"),
        );
        let server = Self {
            process,
            events,
            stderr,
            port: options.port,
        };
        if let Err(closed) = server.events.wait_ready(READY_TIMEOUT) {
            let why = if closed {
                format!(
                    "it exited ({:?})",
                    server.process.wait_timeout(Duration::from_secs(5))
                )
            } else {
                format!("it did not print `ready` within {READY_TIMEOUT:?}")
            };
            panic!(
                "outflow-testpeer http-serve did not start: {why}; stderr:\n{}",
                server.stderr.text()
            );
        }
        server
    }

    /// Pid of the server process.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its IPv4 address and port.
    pub fn addr_v4(&self) -> SocketAddr {
        SocketAddr::new(SERVER_V4.into(), self.port)
    }

    /// Its IPv6 address and port.
    pub fn addr_v6(&self) -> SocketAddr {
        SocketAddr::new(SERVER_V6.into(), self.port)
    }

    /// What it wrote on stderr so far (errors of single connections).
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<ServerEvent> {
        self.events.items()
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<ServedRequest> {
        requests_of(&self.events())
    }

    /// The connections that ended so far.
    pub fn closed_conns(&self) -> Vec<ServedConn> {
        closed_of(&self.events())
    }

    /// Waits until the server has reported every request of `results` (it prints a request
    /// after writing its response, so possibly after the client has read it) and returns all
    /// the requests it answered. Panics on timeout or if the server died.
    pub fn wait_requests(
        &self,
        results: &[RequestResult],
        timeout: Duration,
    ) -> Vec<ServedRequest> {
        let wanted: BTreeSet<&str> = results.iter().map(|r| r.req.as_str()).collect();
        let events = self.wait_events(timeout, "every request of the load", |events| {
            let seen: BTreeSet<&str> = events
                .iter()
                .filter_map(|e| match e {
                    ServerEvent::Request(r) => Some(r.req.as_str()),
                    ServerEvent::Closed(_) => None,
                })
                .collect();
            wanted.is_subset(&seen)
        });
        requests_of(&events)
    }

    /// Waits until at least `n` connections have ended and returns them.
    pub fn wait_closed(&self, n: usize, timeout: Duration) -> Vec<ServedConn> {
        let events = self.wait_events(timeout, &format!("{n} closed connections"), |events| {
            closed_of(events).len() >= n
        });
        closed_of(&events)
    }

    fn wait_events(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl FnMut(&[ServerEvent]) -> bool,
    ) -> Vec<ServerEvent> {
        self.events
            .wait_until(timeout, condition)
            .unwrap_or_else(|e| {
                panic!(
                    "waiting for http-serve to report {what}: {e}; stderr:\n{}",
                    self.stderr.tail(50)
                )
            })
    }
}

fn requests_of(events: &[ServerEvent]) -> Vec<ServedRequest> {
    events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Request(r) => Some(r.clone()),
            ServerEvent::Closed(_) => None,
        })
        .collect()
}

fn closed_of(events: &[ServerEvent]) -> Vec<ServedConn> {
    events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Closed(c) => Some(c.clone()),
            ServerEvent::Request(_) => None,
        })
        .collect()
}

/// Runs the load of `spec` with `outflow-testpeer http-load` (pass [`crate::testpeer_bin!()`])
/// in the client namespace of `pair` and returns a result per request. Panics, with the load's
/// stderr, if it fails or does not end within two minutes.
pub fn run_load(bin: &Path, pair: &NetnsPair, spec: &LoadSpec) -> Vec<RequestResult> {
    let mut command = Command::new(bin);
    command
        .arg("http-load")
        .args(["--netns", pair.client_ns()])
        .args(spec.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let process = ChildProcess::spawn("http-load", &mut command);
    let stderr = CapturedText::capture(
        "http-load",
        process.take_stderr().expect("stderr of http-load is piped"),
    );
    let lines: Arc<JsonLines<RequestResult>> = JsonLines::spawn(
        "http-load-stdout",
        process.take_stdout().expect("stdout of http-load is piped"),
        None,
    );
    let Some(status) = process.wait_timeout(LOAD_TIMEOUT) else {
        process.kill();
        panic!(
            "http-load did not end within {LOAD_TIMEOUT:?}; stderr:\n{}",
            stderr.tail(50)
        );
    };
    let results = lines
        .wait_closed(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("reading the output of http-load: {e}"));
    stderr.wait_closed(Duration::from_secs(10));
    if !status.success() {
        panic!(
            "http-load failed ({status}) after {} of {} requests; stderr:\n{}",
            results.len(),
            spec.requests,
            stderr.tail(50)
        );
    }
    assert_eq!(
        results.len(),
        spec.requests,
        "http-load reported {} of {} requests; stderr:\n{}",
        results.len(),
        spec.requests,
        stderr.tail(50)
    );
    results
}

/// A client as the ground truth knows it: the load's source address and the id it sent.
pub type ClientKey = (IpAddr, Option<String>);

/// What the server wrote on one of its connections, for the requests of the loads joined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnLedger {
    /// The connection's TCP peer (a gateway, or the client itself).
    pub peer: Option<SocketAddr>,
    /// The server's address.
    pub local: Option<SocketAddr>,
    /// Requests answered.
    pub requests: u64,
    /// Bytes of those requests (heads and bodies; PROXY headers not included).
    pub request_bytes: u64,
    /// Bytes of their responses.
    pub response_bytes: u64,
    /// The real clients whose requests it carried.
    pub sources: BTreeSet<IpAddr>,
    /// The ids its requests carried.
    pub ids: BTreeSet<Option<String>>,
}

/// The server's bytes attributed to the real clients: the loads' results joined with the
/// server's requests on the nonce.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Every request: what the load saw and what the server saw.
    pub pairs: Vec<(RequestResult, ServedRequest)>,
    /// Response bytes the server wrote per (source address, id).
    pub by_client: BTreeMap<ClientKey, u64>,
    /// Response bytes the server wrote per source address.
    pub by_source: BTreeMap<IpAddr, u64>,
    /// Response bytes the server wrote per id.
    pub by_id: BTreeMap<Option<String>, u64>,
    /// Per server connection (the server's connection number).
    pub conns: BTreeMap<u64, ConnLedger>,
}

impl Ledger {
    /// Joins `results` (of one or more loads) with the server's `served` requests. Panics if a
    /// result has no server request or several, or if the server wrote other than the bytes
    /// the result expects. Server requests of other loads are left out.
    pub fn join(results: &[RequestResult], served: &[ServedRequest]) -> Self {
        let mut by_nonce: BTreeMap<&str, &ServedRequest> = BTreeMap::new();
        for s in served {
            if let Some(other) = by_nonce.insert(s.req.as_str(), s) {
                panic!(
                    "the server answered nonce {} twice: {other:?} and {s:?}",
                    s.req
                );
            }
        }
        let mut ledger = Self::default();
        let mut seen = BTreeSet::new();
        for r in results {
            assert!(
                seen.insert(r.req.as_str()),
                "two results for nonce {}",
                r.req
            );
            let s = by_nonce
                .get(r.req.as_str())
                .unwrap_or_else(|| panic!("the server has no request with nonce {}: {r:?}", r.req));
            assert_eq!(
                (s.bytes, s.chunk, s.response_bytes),
                (r.bytes, r.chunk, r.expected_server_bytes),
                "the server wrote other than the load expected: {r:?} vs {s:?}"
            );
            let key = (r.source, r.id.clone());
            *ledger.by_client.entry(key).or_default() += s.response_bytes;
            *ledger.by_source.entry(r.source).or_default() += s.response_bytes;
            *ledger.by_id.entry(r.id.clone()).or_default() += s.response_bytes;
            let conn = ledger.conns.entry(s.conn).or_default();
            conn.peer = Some(s.peer);
            conn.local = Some(s.local);
            conn.requests += 1;
            conn.request_bytes += s.request_bytes;
            conn.response_bytes += s.response_bytes;
            conn.sources.insert(r.source);
            conn.ids.insert(r.id.clone());
            ledger.pairs.push((r.clone(), (*s).clone()));
        }
        ledger
    }

    /// Server connections that carried requests of more than one client host.
    pub fn shared_conns(&self) -> Vec<(u64, &ConnLedger)> {
        self.conns
            .iter()
            .filter(|(_, c)| c.sources.len() > 1)
            .map(|(&n, c)| (n, c))
            .collect()
    }

    /// Response bytes the server wrote in all.
    pub fn total(&self) -> u64 {
        self.by_source.values().sum()
    }
}
