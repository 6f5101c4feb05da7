//! Driving the `outflow-collector` binary under test and asking it for its aggregates.

use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use outflow_proto::v1::{
    ClientStatsRequest, ClientStatsResponse, Window, query_client::QueryClient,
};

use crate::agent::find_bin;
use crate::process::{CapturedText, ChildProcess};
use crate::wait::wait_for;

/// Environment variable that overrides where the collector binary is.
pub const COLLECTOR_BIN_ENV: &str = "OUTFLOW_COLLECTOR_BIN";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the collector binary (see [`crate::agent::agent_bin`] for the rules).
pub fn collector_bin() -> PathBuf {
    find_bin("outflow-collector", COLLECTOR_BIN_ENV, "outflow-collector")
        .unwrap_or_else(|e| panic!("{e}"))
}

pub use outflow_testbed::ports::free_port;

/// A running collector listening on 127.0.0.1. Killed (SIGKILL) when dropped if still running.
pub struct Collector {
    process: ChildProcess,
    stderr: CapturedText,
    listen: SocketAddr,
}

impl Collector {
    /// Starts the collector with `--listen 127.0.0.1:<port>` and `extra` arguments, and waits
    /// until it accepts connections.
    pub fn start(port: u16, extra: &[&str]) -> Self {
        Self::start_env(port, extra, &[])
    }

    /// Like [`Collector::start`] with environment variables added (e.g. crash points).
    pub fn start_env(port: u16, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut command = Command::new(collector_bin());
        command
            .args(["--listen", &listen.to_string()])
            .args(extra)
            .envs(env.iter().copied())
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let process = ChildProcess::spawn("outflow-collector", &mut command);
        let stderr = CapturedText::capture(
            "outflow-collector",
            process
                .take_stderr()
                .expect("stderr of outflow-collector is piped"),
        );
        let collector = Self {
            process,
            stderr,
            listen,
        };
        wait_for(START_TIMEOUT, "the collector to accept connections", || {
            if let Some(status) = collector.process.try_status() {
                // One with crash points armed may have reached one already.
                assert!(
                    !env.is_empty() && status.signal() == Some(libc::SIGKILL),
                    "the collector exited early ({status}); stderr:\n{}",
                    collector.stderr.tail(30)
                );
                return true;
            }
            TcpStream::connect(listen).is_ok()
        });
        collector
    }

    /// `http://127.0.0.1:<port>`, what agents and queries connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// What it logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Pid of the collector process.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL: a crash, nothing flushed on the way out.
    pub fn kill(&self) -> ExitStatus {
        self.process.kill()
    }

    /// Waits until it exits by itself (e.g. at a crash point); panics after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        self.process.wait_timeout(timeout).unwrap_or_else(|| {
            panic!(
                "the collector did not exit within {timeout:?}:\n{}",
                self.stderr.tail(30)
            )
        })
    }

    /// SIGTERM and wait.
    pub fn stop(&self) -> ExitStatus {
        self.process.signal(Signal::SIGTERM);
        self.process.wait_timeout(STOP_TIMEOUT).unwrap_or_else(|| {
            self.process.kill();
            panic!(
                "the collector did not stop within {STOP_TIMEOUT:?}:\n{}",
                self.stderr.tail(30)
            )
        })
    }

    /// `(response, request)` bytes of `client` (an address, a prefix or a client id) in the
    /// 24 h window; `(0, 0)` if the collector has none.
    pub fn day_bytes(&self, client: &str) -> (u64, u64) {
        self.client_stats(client)
            .windows
            .iter()
            .find(|w| w.window == Window::Window24h as i32)
            .map_or((0, 0), |w| (w.response_bytes, w.request_bytes))
    }

    /// `outflow.v1.Query/ClientStats` for an address or prefix; a client the collector has no
    /// traffic of (NotFound) comes back with no windows.
    pub fn client_stats(&self, client: &str) -> ClientStatsResponse {
        let url = self.url();
        let client = client.to_string();
        runtime().block_on(async move {
            let mut q = QueryClient::connect(url.clone()).await.unwrap_or_else(|e| {
                panic!(
                    "connect to the collector at {url}: {e}; its stderr:\n{}",
                    self.stderr.tail(30)
                )
            });
            match q
                .client_stats(ClientStatsRequest {
                    client: client.clone(),
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => ClientStatsResponse {
                    client,
                    windows: Vec::new(),
                },
                Err(s) => panic!(
                    "ClientStats({client}): {s}; collector stderr:\n{}",
                    self.stderr.tail(30)
                ),
            }
        })
    }
}

/// A small runtime for the blocking tests to make gRPC calls with.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for gRPC calls")
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `/tmp/outflow-test-<pid>-<tag>`, created empty.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("outflow-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        Self(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The directory, for a command-line argument.
    pub fn as_arg(&self) -> &str {
        self.0.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `GET path` on `addr` (plain HTTP/1.1): the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP response: {out:?}"),
        )
    };
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = out.split_once("\r\n\r\n").ok_or_else(bad)?.1.to_string();
    Ok((status, body))
}

/// Prometheus metrics of the agent or the collector (`GET /metrics` on its metrics address),
/// as text.
pub struct Metrics(String);

impl Metrics {
    /// Scrapes the metrics endpoint at `addr`.
    pub fn fetch(addr: SocketAddr) -> io::Result<Self> {
        Ok(Self(http_get(addr, "/metrics")?.1))
    }

    /// The text as scraped.
    pub fn text(&self) -> &str {
        &self.0
    }

    /// Whether a sample of `name` (any labels) is there.
    pub fn has(&self, name: &str) -> bool {
        self.samples()
            .any(|(n, _)| n.split('{').next() == Some(name))
    }

    /// Runs `promtool check metrics` (Debian's `prometheus` package, installed by
    /// `cargo xtask setup`) on the text; panics with its complaints if it finds any.
    pub fn check_with_promtool(&self) {
        crate::tools::promtool_check(&self.0);
    }

    /// The sample named exactly `name` (labels included); 0 if absent.
    pub fn value(&self, name: &str) -> f64 {
        self.samples()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, v)| v)
    }

    /// The sum of `name`'s samples over all its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples()
            .filter(|(n, _)| n.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .fold(0.0, |a, b| a + b)
    }

    fn samples(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.lines().filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name, value.trim().parse().ok()?))
        })
    }
}
