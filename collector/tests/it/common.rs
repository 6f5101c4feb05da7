//! Helpers: start a collector, speak the agent protocol (as `outflow_sim`'s fake agent), query.
use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use outflow_collector::{Config, Server};
use outflow_proto::v1::{self, AgentMessage, agent_message::Msg, query_client::QueryClient};
pub use outflow_sim::ingest::{IngestError, IngestStream};
use tonic::{
    Status,
    transport::{Channel, Endpoint},
};

/// A config for tests: loopback, ephemeral ports, `dir` for data.
pub fn config(dir: &Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    }
}

/// [`config`] for replays: no fsync, no rate limits (batches come faster than agents send).
pub fn replay_config(dir: &Path) -> Config {
    let mut c = config(dir);
    c.store.fsync = false;
    c.limits.batches_per_second = 0.0;
    c.limits.deltas_per_second = 0.0;
    c
}

pub async fn start(cfg: Config) -> Server {
    Server::start(cfg)
        .await
        .unwrap_or_else(|e| panic!("start the collector: {e}"))
}

pub fn url(server: &Server) -> String {
    format!("http://{}", server.addr())
}

/// A port free on 127.0.0.1 now, below the ephemeral range (for a server that must come back
/// on the same one).
pub use outflow_testbed::ports::free_port;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub async fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// A fake agent's stream to `url`, without token.
pub async fn agent_stream(url: &str) -> IngestStream {
    IngestStream::open(channel(url).await, None)
        .await
        .unwrap_or_else(|e| panic!("open an Ingest stream to {url}: {e}"))
}

/// The status a stream failed with; panics if it failed otherwise (a timeout, an answer out
/// of protocol, an end without a status).
pub fn status(e: IngestError) -> Status {
    match e {
        IngestError::Open(s) | IngestError::Status(s) => *s,
        e => panic!("want a status from the collector, got: {e}"),
    }
}

/// A Hello as the tests' agents send it.
pub fn hello(agent_id: &str, epoch: u64, hostname: &str) -> v1::Hello {
    v1::Hello {
        agent_id: agent_id.into(),
        epoch,
        hostname: hostname.into(),
        boot_id: "b".into(),
        version: "0.1.0".into(),
        labels: [("region".to_owned(), "test".to_owned())].into(),
    }
}

/// Says Hello on `a`: the last seq of the epoch the collector had applied (its Welcome).
pub async fn welcome_seq(a: &mut IngestStream, agent_id: &str, epoch: u64, hostname: &str) -> u64 {
    a.hello(hello(agent_id, epoch, hostname))
        .await
        .unwrap_or_else(|e| panic!("hello as {agent_id}: {e}"))
        .applied_seq
}

pub fn hello_msg(agent_id: &str, epoch: u64, hostname: &str) -> AgentMessage {
    AgentMessage {
        msg: Some(Msg::Hello(hello(agent_id, epoch, hostname))),
    }
}

pub fn batch_msg(b: v1::Batch) -> AgentMessage {
    AgentMessage {
        msg: Some(Msg::Batch(b)),
    }
}

/// A server-role delta from `remote` with `out` response and `inb` request bytes.
pub fn delta(remote: [u8; 4], out: u64, inb: u64, closed: bool) -> v1::ConnDelta {
    v1::ConnDelta {
        conn_id: u64::from(u32::from_be_bytes(remote)),
        local_addr: vec![10, 0, 0, 1],
        local_port: 8000,
        remote_addr: remote.to_vec(),
        remote_port: 40000,
        role: v1::Role::Server as i32,
        counters: Some(v1::Counters {
            bytes_out: out,
            bytes_in: inb,
            ..Default::default()
        }),
        closed,
        cgroup: "/system.slice/vllm.service".into(),
        pid: 42,
        comm: "vllm".into(),
        first_seen_ms: 1,
        ..Default::default()
    }
}

pub fn batch(seq: u64, end_ms: u64, deltas: Vec<v1::ConnDelta>) -> v1::Batch {
    v1::Batch {
        seq,
        start_ms: end_ms.saturating_sub(1000),
        end_ms,
        deltas,
        ..Default::default()
    }
}

pub async fn query(url: &str) -> QueryClient<Channel> {
    QueryClient::new(channel(url).await)
}

/// The client's stats in every window, or the status.
pub async fn client_stats(url: &str, client: &str) -> Result<v1::ClientStatsResponse, Status> {
    query(url)
        .await
        .client_stats(v1::ClientStatsRequest {
            client: client.into(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn top(
    url: &str,
    group: v1::GroupBy,
    window: v1::Window,
    limit: u32,
) -> v1::TopTalkersResponse {
    query(url)
        .await
        .top_talkers(v1::TopTalkersRequest {
            group_by: group as i32,
            window: window as i32,
            limit,
        })
        .await
        .unwrap_or_else(|e| panic!("TopTalkers: {e}"))
        .into_inner()
}

/// GET /metrics over plain HTTP/1.1.
pub async fn metrics(server: &Server) -> String {
    let (status, body) = http_get(server.metrics_addr(), "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// GET `path` over plain HTTP/1.1: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get_with(addr, path, "").await
}

/// GET `path` with `headers` (lines each ending in CRLF): the status code and the body.
pub async fn http_get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer from {addr}{path}:\n{out}"));
    let body = out
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

/// The value of a metric line that starts with `prefix` (`name{labels}`), 0 if absent.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The first body `hook` accepted, waited for up to `within`.
pub async fn first_body(hook: &outflow_testbed::webhook::Receiver, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(body) = hook.bodies().into_iter().next() {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no webhook call in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Held by a test while it arms an error point of the collector (`fail`'s points are the
/// process's: two tests arming the same one would undo each other's).
pub static ERROR_POINTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Arms the error point `name` of the stores whose path holds `dir` (see
/// `outflow_collector::crash`), until the guard returned drops.
pub struct Armed {
    name: &'static str,
    _held: tokio::sync::MutexGuard<'static, ()>,
}

impl Armed {
    pub async fn new(name: &'static str, dir: &Path) -> Armed {
        let held = ERROR_POINTS.lock().await;
        let dir = dir.to_str().expect("temp paths are UTF-8");
        outflow_crashpoint::arm(&format!("{name}=return({dir})")).unwrap();
        Armed { name, _held: held }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        outflow_crashpoint::fail::remove(self.name);
    }
}
