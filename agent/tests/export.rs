//! The export path without the kernel: records go through the export's durability step (the
//! spooler, driven as the read loop drives it) into the spool and
//! are streamed to a small in-process `Ingest` server that stands in for the collector (it
//! applies each (agent_id, epoch, seq) at most once, and can drop a stream or answer with a
//! chosen Welcome). The lead's end-to-end tests use the real collector.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use outflow_agent::{
    config::ExportConfig,
    durability::{Durability, Interval},
    export::{self, Exporter, Spooler},
    record::{ConnRecord, ExportRecord, Role},
    spool::Spool,
    table::CommitPlan,
};
use outflow_proto::v1::{
    self, AgentMessage, CollectorMessage, agent_message, collector_message,
    ingest_server::{Ingest, IngestServer},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(20);

/// What the stand-in collector saw.
#[derive(Default)]
struct Seen {
    hellos: Vec<v1::Hello>,
    authorization: Vec<Option<String>>,
    /// Every batch received, with the number of the stream it came on (from 1).
    received: Vec<(usize, v1::Batch)>,
    /// Batches applied, each (agent_id, epoch, seq) once.
    applied: Vec<v1::Batch>,
    applied_seq: BTreeMap<(String, u64), u64>,
    streams: usize,
}

#[derive(Clone, Copy, Default)]
struct Behavior {
    /// On the first stream: after this many batches, end the stream with an error, without
    /// applying or acknowledging the last one.
    fail_first_stream_after: Option<usize>,
    /// Answer every Hello with this Welcome instead of the applied seq.
    welcome: Option<u64>,
    /// Require `authorization: Bearer <token>`.
    token: Option<&'static str>,
}

#[derive(Clone, Default)]
struct Collector {
    seen: Arc<Mutex<Seen>>,
    behavior: Behavior,
}

impl Collector {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn applied_seqs(&self) -> Vec<u64> {
        self.seen().applied.iter().map(|b| b.seq).collect()
    }
}

#[tonic::async_trait]
impl Ingest for Collector {
    type StreamStream = ReceiverStream<Result<CollectorMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let stream_no = {
            let mut s = self.seen();
            s.authorization.push(auth.clone());
            s.streams += 1;
            s.streams
        };
        if let Some(t) = self.behavior.token
            && auth != Some(format!("Bearer {t}"))
        {
            return Err(Status::unauthenticated("bad token"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let hello = match inbound.message().await {
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::Hello(h)),
                })) => h,
                _ => {
                    let _ = tx
                        .send(Err(Status::failed_precondition("Hello first")))
                        .await;
                    return;
                }
            };
            let key = (hello.agent_id.clone(), hello.epoch);
            let applied = {
                let mut s = this.seen();
                s.hellos.push(hello);
                this.behavior
                    .welcome
                    .unwrap_or_else(|| s.applied_seq.get(&key).copied().unwrap_or(0))
            };
            let msg = |m| Ok(CollectorMessage { msg: Some(m) });
            let _ = tx
                .send(msg(collector_message::Msg::Welcome(v1::Welcome {
                    applied_seq: applied,
                })))
                .await;
            let mut n = 0;
            while let Ok(Some(m)) = inbound.message().await {
                let Some(agent_message::Msg::Batch(b)) = m.msg else {
                    let _ = tx
                        .send(Err(Status::invalid_argument("a second Hello")))
                        .await;
                    return;
                };
                n += 1;
                let seq = b.seq;
                let fail = stream_no == 1 && this.behavior.fail_first_stream_after == Some(n);
                {
                    let mut s = this.seen();
                    s.received.push((stream_no, b.clone()));
                    let a = s.applied_seq.entry(key.clone()).or_insert(0);
                    if !fail && seq > *a {
                        *a = seq;
                        s.applied.push(b);
                    }
                }
                if fail {
                    let _ = tx.send(Err(Status::unavailable("going away"))).await;
                    return;
                }
                let _ = tx
                    .send(msg(collector_message::Msg::Ack(v1::Ack { seq })))
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn serve(c: Collector) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IngestServer::new(c))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// An address nothing listens on.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The export's durability step, driven as the read loop drives it, with the export records it
/// reports.
struct Step {
    spooler: Spooler,
    records: Vec<ExportRecord>,
}

impl Step {
    fn new(exporter: &Exporter) -> Self {
        Self {
            spooler: exporter.spooler(),
            records: Vec::new(),
        }
    }

    /// One interval read at time `ts`: made durable, its export record, its commit.
    fn interval(&mut self, ts: u64, conns: &[ConnRecord]) {
        self.spooler
            .make_durable(&Interval {
                ts,
                conns,
                overflow: None,
                plan: &CommitPlan::default(),
            })
            .expect("make_durable");
        if let Some(r) = self.spooler.report() {
            self.records.push(r);
        }
        self.spooler.committed().expect("committed");
    }
}

fn config(dir: &Path, addr: SocketAddr) -> ExportConfig {
    ExportConfig {
        collector: Some(format!("http://{addr}")),
        spool_dir: dir.join("spool"),
        state_dir: dir.join("state"),
        labels: [("region".to_string(), "test".to_string())].into(),
        ..ExportConfig::default()
    }
}

fn start(cfg: &ExportConfig) -> Exporter {
    let p = export::prepare(cfg).expect("prepare").expect("a collector");
    Exporter::start(p, cfg).expect("start")
}

fn conn(conn_id: u64, bytes_out: u64, padding: usize) -> ConnRecord {
    ConnRecord {
        ts: 0,
        conn_id,
        family: "ipv6",
        local_addr: IpAddr::V6(Ipv4Addr::new(10, 0, 0, 5).to_ipv6_mapped()),
        local_port: 8000,
        remote_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 9, 7)),
        remote_port: 38842,
        client_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 9, 7)),
        client_id: None,
        client_source: "peer".into(),
        role: Role::Server,
        bytes_out,
        bytes_in: 1,
        wire_bytes_out: bytes_out + 52,
        wire_bytes_in: 53,
        segments_out: 1,
        segments_in: 1,
        closed: false,
        cgroup: Some(format!("/inference.service{}", "x".repeat(padding))),
        cgroup_id: 25,
        pid: Some(1187),
        comm: Some("vllm".into()),
        first_seen: 1_000,
        last_seen: 2_000,
    }
}

/// One interval through the step: `bytes_out` on connection 1 at time `ts`.
fn interval(step: &mut Step, ts: u64, bytes_out: u64, padding: usize) {
    step.interval(ts, &[conn(1, bytes_out, padding)]);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_streamed_in_order_and_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = now_ms() + 1000;
    let c = Collector {
        behavior: Behavior {
            token: Some("s3cret"),
            ..Behavior::default()
        },
        ..Collector::default()
    };
    let addr = serve(c.clone()).await;
    let mut cfg = config(dir.path(), addr);
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    cfg.token_file = Some(token);
    let exporter = start(&cfg);
    let mut step = Step::new(&exporter);
    for i in 1..=5 {
        interval(&mut step, t0 + i * 1000, i * 100, 0);
    }
    // An empty interval makes no batch.
    step.interval(t0 + 6000, &[]);
    wait_for("5 batches applied", || c.applied_seqs().len() == 5).await;
    assert_eq!(c.applied_seqs(), vec![1, 2, 3, 4, 5]);

    {
        let s = c.seen();
        let h = &s.hellos[0];
        assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(h.labels["region"], "test");
        assert_ne!(h.epoch, 0);
        let id = std::fs::read_to_string(dir.path().join("state/agent-id")).expect("agent-id");
        assert_eq!(h.agent_id, id.trim());
        let epoch = std::fs::read_to_string(dir.path().join("state/epoch")).expect("epoch");
        assert_eq!(h.epoch.to_string(), epoch.trim());
        assert_eq!(s.authorization[0].as_deref(), Some("Bearer s3cret"));

        let b = &s.applied[1];
        assert_eq!(
            (b.start_ms, b.end_ms),
            (t0 + 1000, t0 + 2000),
            "batches tile time"
        );
        assert_eq!(b.deltas.len(), 1);
        let d = &b.deltas[0];
        assert_eq!(d.local_addr, vec![10, 0, 0, 5], "v4-mapped sent as IPv4");
        assert_eq!(d.remote_addr, vec![10, 0, 9, 7]);
        assert_eq!(d.role(), v1::Role::Server);
        assert_eq!(d.counters.as_ref().expect("counters").bytes_out, 200);
        assert_eq!((d.pid, d.comm.as_str()), (1187, "vllm"));
    }
    wait_for("the spool to empty", || {
        step.interval(t0 + 7000, &[]);
        step.records
            .last()
            .is_some_and(|r| r.spooled_batches == 0 && r.connected)
    })
    .await;
    let last = step.records.last().cloned().expect("a record");
    assert_eq!(
        (last.last_seq, last.acked_seq, last.lost_batches),
        (5, 5, 0)
    );
    drop(step);
    let t = Instant::now();
    exporter.shutdown(Duration::from_secs(2)).await;
    assert!(t.elapsed() < Duration::from_secs(1), "nothing to wait for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_resumes_from_the_first_unacknowledged_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = now_ms() + 1000;
    let c = Collector {
        behavior: Behavior {
            fail_first_stream_after: Some(3),
            ..Behavior::default()
        },
        ..Collector::default()
    };
    let addr = serve(c.clone()).await;
    let cfg = config(dir.path(), addr);
    let exporter = start(&cfg);
    let mut step = Step::new(&exporter);
    for i in 1..=6 {
        interval(&mut step, t0 + i * 1000, i, 0);
    }
    wait_for("6 batches applied", || c.applied_seqs().len() == 6).await;
    assert_eq!(
        c.applied_seqs(),
        vec![1, 2, 3, 4, 5, 6],
        "each once, in order"
    );
    {
        let s = c.seen();
        assert!(s.streams >= 2, "reconnected");
        let resent: Vec<u64> = s
            .received
            .iter()
            .filter(|(n, _)| *n > 1)
            .map(|(_, b)| b.seq)
            .collect();
        assert_eq!(
            resent.first(),
            Some(&3),
            "resent from the first unacknowledged: {resent:?}"
        );
        assert!(
            resent.windows(2).all(|w| w[0] < w[1]),
            "in order: {resent:?}"
        );
    }
    drop(step);
    exporter.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_welcome_skips_what_the_collector_has_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = now_ms() + 1000;
    // Spooled while the collector is away.
    let away = config(dir.path(), closed_port());
    let exporter = start(&away);
    let mut step = Step::new(&exporter);
    for i in 1..=5 {
        interval(&mut step, t0 + i * 1000, i, 0);
    }
    drop(step);
    exporter.shutdown(Duration::from_millis(100)).await;

    let c = Collector {
        behavior: Behavior {
            welcome: Some(3),
            ..Behavior::default()
        },
        ..Collector::default()
    };
    let addr = serve(c.clone()).await;
    let exporter = start(&config(dir.path(), addr));
    wait_for("2 batches applied", || c.applied_seqs().len() == 2).await;
    let sent: Vec<u64> = c.seen().received.iter().map(|(_, b)| b.seq).collect();
    assert_eq!(sent, vec![4, 5]);
    exporter.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_sends_its_spool_first_and_continues_the_numbering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = now_ms() + 1000;
    let away = config(dir.path(), closed_port());
    let exporter = start(&away);
    let mut step = Step::new(&exporter);
    for i in 1..=3 {
        interval(&mut step, t0 + i * 1000, i, 0);
    }
    drop(step);
    let t = Instant::now();
    exporter.shutdown(Duration::from_millis(500)).await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the grace period is bounded"
    );

    let c = Collector::default();
    let addr = serve(c.clone()).await;
    let exporter = start(&config(dir.path(), addr));
    let mut step = Step::new(&exporter);
    interval(&mut step, t0 + 10_000, 4, 0);
    wait_for("4 batches applied", || c.applied_seqs().len() == 4).await;
    assert_eq!(c.applied_seqs(), vec![1, 2, 3, 4]);
    {
        let s = c.seen();
        let b = &s.applied;
        assert_eq!(
            b.iter()
                .map(|b| b.deltas[0].counters.as_ref().expect("c").bytes_out)
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(
            b[3].start_ms,
            t0 + 3000,
            "the new run starts where the spool ended"
        );
        assert_eq!(s.hellos.len(), 1);
    }
    drop(step);
    exporter.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_loses_the_oldest_batches_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = now_ms() + 1000;
    let mut away = config(dir.path(), closed_port());
    away.spool_max_bytes = 1 << 20;
    let exporter = start(&away);
    let mut step = Step::new(&exporter);
    // About 200 kB per batch: the 1 MiB spool holds 5.
    let n = 12;
    for i in 1..=n {
        interval(&mut step, t0 + i * 1000, i, 200_000);
    }
    let r = step.records.last().cloned().expect("record");
    assert!(r.lost_batches > 0 && r.spooled_batches <= 5, "{r:?}");
    assert_eq!(r.lost_batches + r.spooled_batches, n);
    assert_eq!(r.last_seq, n);
    drop(step);
    exporter.shutdown(Duration::from_millis(100)).await;

    let c = Collector::default();
    let addr = serve(c.clone()).await;
    let mut cfg = config(dir.path(), addr);
    cfg.spool_max_bytes = 1 << 20;
    let exporter = start(&cfg);
    wait_for("the rest applied", || c.applied_seqs().last() == Some(&n)).await;
    {
        let s = c.seen();
        let applied: u64 = s.applied.len() as u64;
        let lost: u64 = s.applied.iter().map(|b| b.lost_batches).sum();
        assert_eq!(applied + lost, n, "every batch is applied or reported lost");
        let lost_bytes: u64 = s
            .applied
            .iter()
            .filter_map(|b| b.lost.as_ref())
            .map(|c| c.bytes_out)
            .sum();
        let applied_bytes: u64 = s
            .applied
            .iter()
            .map(|b| b.deltas[0].counters.as_ref().expect("c").bytes_out)
            .sum();
        assert_eq!(
            lost_bytes + applied_bytes,
            (1..=n).sum::<u64>(),
            "and their bytes"
        );
    }
    exporter.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_retried_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = now_ms() + 1000;
    let c = Collector {
        behavior: Behavior {
            token: Some("right"),
            ..Behavior::default()
        },
        ..Collector::default()
    };
    let addr = serve(c.clone()).await;
    let mut cfg = config(dir.path(), addr);
    let token = dir.path().join("token");
    std::fs::write(&token, "wrong").expect("token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    cfg.token_file = Some(token);
    let exporter = start(&cfg);
    let mut step = Step::new(&exporter);
    interval(&mut step, t0 + 1000, 1, 0);
    wait_for("two attempts", || c.seen().streams >= 2).await;
    assert!(c.applied_seqs().is_empty());
    drop(step);
    exporter.shutdown(Duration::from_millis(100)).await;
    // Kept for the next start.
    let s = Spool::open(
        &dir.path().join("spool"),
        1 << 20,
        &dir.path().join("state"),
        false,
    )
    .expect("reopen");
    assert_eq!(s.len(), 1);
}
