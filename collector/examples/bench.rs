//! Ingest throughput: a collector in-process on loopback, agents streaming pipelined batches
//! over real gRPC connections, every batch applied and committed (fsync on) before its Ack.
//!
//! ```sh
//! cargo run --release -p outflow-collector --example bench -- [AGENTS] [BATCHES] [DELTAS] [CLIENTS] [fsync|nofsync] [detect|nodetect] [live|replay]
//! ```
//! defaults: 8 agents x 40 batches x 10000 deltas, 20000 distinct clients, fsync, detection on
//! (its time per group commit is printed from `outflow_collector_detect_seconds`).
use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use outflow_collector::{Config, Server};
use outflow_proto::v1;
use outflow_sim::ingest::{IngestStream, Options};

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn batch(agent: u64, seq: u64, deltas: u64, clients: u64, end_ms: u64) -> v1::Batch {
    let deltas = (0..deltas)
        .map(|k| {
            let c = (agent * 7919 + seq * 104_729 + k * 31) % clients;
            v1::ConnDelta {
                conn_id: agent << 32 | k,
                local_addr: vec![10, 0, (agent >> 8) as u8, agent as u8],
                local_port: 8000,
                remote_addr: vec![100, (c >> 16) as u8, (c >> 8) as u8, c as u8],
                remote_port: 40000 + (k % 20000) as u32,
                role: v1::Role::Server as i32,
                counters: Some(v1::Counters {
                    bytes_out: 1000 + k,
                    bytes_in: 100,
                    wire_bytes_out: 1100 + k,
                    wire_bytes_in: 160,
                    segments_out: 3,
                    segments_in: 2,
                }),
                closed: k % 10 == 0,
                cgroup: "/system.slice/vllm.service".into(),
                pid: 1234,
                comm: "vllm".into(),
                first_seen_ms: end_ms - 5000,
                // No client attribution: the remote address is the client.
                ..Default::default()
            }
        })
        .collect();
    v1::Batch {
        seq,
        start_ms: end_ms - 1000,
        end_ms,
        deltas,
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (agents, batches, deltas, clients) =
        (arg(1, 8), arg(2, 40), arg(3, 10_000), arg(4, 20_000));
    let fsync = std::env::args().nth(5).is_none_or(|a| a != "nofsync");
    let dir = tempfile::tempdir()?;
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    cfg.limits.batches_per_second = 0.0;
    cfg.limits.deltas_per_second = 0.0;
    cfg.store.fsync = fsync;
    cfg.detect.enabled = std::env::args().nth(6).is_none_or(|a| a != "nodetect");
    let server = Server::start(cfg).await?;
    let url = format!("http://{}", server.addr());
    // `replay` (7th argument): batch time advances 1 min per batch, from a day ago, so that
    // every key is judged again at every commit (detection's worst case).
    let replay = std::env::args().nth(7).is_some_and(|a| a == "replay");
    let step = if replay { 60_000 } else { 100 };
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64
        - if replay { 86_400_000 } else { 60_000 };

    // Encode everything first: the clock measures the collector, not the load generator.
    let mut work = Vec::new();
    for a in 0..agents {
        let batches: Vec<v1::Batch> = (1..=batches)
            .map(|s| batch(a, s, deltas, clients, now + s * step))
            .collect();
        let channel = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await?;
        work.push((a, batches, channel));
    }
    let start = Arc::new(tokio::sync::Barrier::new(work.len() + 1));
    let mut tasks = Vec::new();
    for (a, batches, channel) in work {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let options = Options {
                queue: 8,
                ..Options::default()
            };
            let mut stream = IngestStream::open_with(channel, options).await?;
            stream
                .hello(v1::Hello {
                    agent_id: format!("bench-{a}"),
                    epoch: 1,
                    hostname: format!("gpu-{a}"),
                    ..Default::default()
                })
                .await?;
            start.wait().await;
            let n = batches.len();
            // Pipelined: one task sends every batch, this one counts the Acks.
            let (sender, mut answers) = stream.split();
            let sending = tokio::spawn(async move {
                for b in batches {
                    if sender.send_batch(b).await.is_err() {
                        break;
                    }
                }
                sender
            });
            for _ in 0..n {
                answers.next_ack().await?;
            }
            drop(sending.await?);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    for t in tasks {
        t.await?.map_err(|e| e.to_string())?;
    }
    let dt = t0.elapsed();
    let total = agents * batches * deltas;
    let metrics = {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(server.metrics_addr()).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        out
    };
    let get = |name: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let commits = get("outflow_collector_store_commit_seconds_count");
    println!(
        "{agents} agents x {batches} batches x {deltas} deltas ({clients} clients, fsync {}): {total} deltas in {:.2} s = {:.0} deltas/s",
        if fsync { "on" } else { "off" },
        dt.as_secs_f64(),
        total as f64 / dt.as_secs_f64().max(1e-9)
    );
    println!(
        "{commits} commits, {:.1} batches/commit, mean commit {:.1} ms, keys held {}",
        (agents * batches) as f64 / commits.max(1.0),
        1000.0 * get("outflow_collector_store_commit_seconds_sum") / commits.max(1.0),
        get("outflow_collector_keys{group=\"client-address\"}")
    );
    let runs = get("outflow_collector_detect_seconds_count");
    println!(
        "detection: {runs} runs, mean {:.2} ms per group commit, {} alerts opened",
        1000.0 * get("outflow_collector_detect_seconds_sum") / runs.max(1.0),
        metrics
            .lines()
            .filter(|l| l.starts_with("outflow_collector_alerts_opened_total{"))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>()
            .max(0.0)
    );
    let db = std::fs::metadata(dir.path().join("collector.redb"))?.len();
    println!("database file: {:.1} MiB", db as f64 / 1048576.0);
    tokio::time::timeout(Duration::from_secs(30), server.shutdown()).await??;
    Ok(())
}
