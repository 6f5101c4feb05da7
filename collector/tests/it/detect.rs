//! Bulk-exfiltration detection: three days of batch time replayed in a few seconds through the
//! in-process Session API of a real server, with a restart in the middle, List and Watch over
//! real gRPC.
//!
//! Benign traffic is shaped like LLM streaming: sessions of a few hundred to a few thousand
//! token events of ~200 bytes, a daily cycle, requests about half the responses; plus one
//! allowlisted batch client pulling 3 GiB an hour all day. Attacks, by hour of the replay:
//!
//! * volume: 203.0.113.7, 2 GiB/h, hours 30..32 (a restart at hour 31);
//! * coordinated: 60 addresses of 198.18.5.0/24, 150 MB/h each, hours 40..43;
//! * deviation: 100.64.200.5, ~40 MB per active hour for two days, 700 MB in hour 58;
//! * sustained: 100.64.201.9, 110 MB every hour from hour 24 on, 500:1 response/request.
use std::time::Duration;

use outflow_collector::{Config, Server, collector::Session};
use outflow_proto::v1::{self, alerts_client::AlertsClient};

use crate::common::*;

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const MB: u64 = 1_000_000;
const T0: u64 = 1_750_000_000_000 / HOUR * HOUR;
const STEP: u64 = 5 * MIN;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn d(remote: [u8; 4], out: u64, inb: u64) -> v1::ConnDelta {
    delta(remote, out, inb, true)
}

/// The deltas of the 5 minutes ending at `t` (hour `h` of the replay).
fn traffic(rng: &mut Rng, t: u64) -> Vec<v1::ConnDelta> {
    let h = (t - T0 - 1) / HOUR;
    let hod = h % 24;
    let mut v = Vec::new();
    // 32 benign clients, 4 per /24, each active ~10 hours a day.
    for i in 0..32u8 {
        let start = 8 + u64::from(i % 5);
        if hod < start || hod >= start + 10 || rng.below(10) < 4 {
            continue;
        }
        for _ in 0..1 + rng.below(4) {
            let tokens = 100 + rng.below(2900);
            let out = tokens * 200;
            v.push(d(
                [100, 64, i / 4, i % 4 + 1],
                out,
                out / 2 + rng.below(4000),
            ));
        }
    }
    // The allowlisted batch client.
    v.push(d([192, 0, 2, 10], 3 * 1024 * MB / 12, 50 * MB));
    // Deviation: a steady client with a daily cycle, then a burst.
    if (8..22).contains(&hod) {
        let out = if h == 58 {
            700 * MB / 12
        } else {
            3 * MB + rng.below(MB)
        };
        v.push(d([100, 64, 200, 5], out, out / 2));
    }
    // Sustained: around the clock, tiny requests.
    if h >= 24 {
        v.push(d([100, 64, 201, 9], 110 * MB / 12, 110 * MB / 12 / 500));
    }
    // Volume.
    if (30..32).contains(&h) {
        for _ in 0..8 {
            v.push(d([203, 0, 113, 7], 2048 * MB / 12 / 8, MB / 8));
        }
    }
    // Coordinated.
    if (40..43).contains(&h) {
        for a in 1..=60u8 {
            v.push(d([198, 18, 5, a], 150 * MB / 12, MB / 12));
        }
    }
    v
}

fn cfg(dir: &std::path::Path) -> Config {
    let mut c = replay_config(dir);
    c.detect.allowlist.cidrs = vec!["192.0.2.0/28".parse().unwrap()];
    c
}

struct Agents {
    sessions: Vec<Session>,
    seq: u64,
}

impl Agents {
    async fn connect(server: &Server, seq: u64) -> Agents {
        let mut sessions = Vec::new();
        for i in 0..2 {
            let mut s = server.collector().session();
            s.handle(hello_msg(&format!("agent-{i}"), 1, &format!("gpu-{i}")))
                .await
                .unwrap();
            sessions.push(s);
        }
        Agents { sessions, seq }
    }

    /// Replays [from, to) of batch time, alternating hosts.
    async fn replay(&mut self, rng: &mut Rng, from_h: u64, to_h: u64) {
        let mut t = T0 + from_h * HOUR + STEP;
        while t <= T0 + to_h * HOUR {
            let n = usize::try_from(t / STEP % 2).unwrap();
            // Both sessions share one sequence counter: each agent only needs increasing seqs.
            self.seq += 1;
            let b = batch(self.seq, t, traffic(rng, t));
            self.sessions[n].handle(batch_msg(b)).await.unwrap();
            t += STEP;
        }
    }
}

async fn list(server: &Server, open_only: bool) -> Vec<v1::Alert> {
    list_scoped(server, open_only, false).await
}

async fn list_scoped(server: &Server, open_only: bool, include_service: bool) -> Vec<v1::Alert> {
    AlertsClient::new(channel(&url(server)).await)
        .list(v1::ListAlertsRequest {
            open_only,
            limit: 0,
            include_service,
        })
        .await
        .unwrap()
        .into_inner()
        .alerts
}

fn find<'a>(alerts: &'a [v1::Alert], key: &str, det: v1::Detector) -> Vec<&'a v1::Alert> {
    alerts
        .iter()
        .filter(|a| a.key == key && a.detector == det as i32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detects_exfiltration_over_three_days_and_not_benign_traffic() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let server = start(cfg(dir.path())).await;
    let mut agents = Agents::connect(&server, 0).await;
    agents.replay(&mut rng, 0, 31).await;

    // Mid-attack: the volume alert is open, with its numbers and a sentence.
    let open = list(&server, true).await;
    let vol = find(&open, "203.0.113.7", v1::Detector::Volume);
    assert_eq!(vol.len(), 1, "{open:#?}");
    let vol = vol[0].clone();
    assert_eq!(vol.state, v1::AlertState::Open as i32);
    assert_eq!(vol.threshold_bytes, 1 << 30);
    assert!(vol.observed_bytes >= 1 << 30, "{vol:?}");
    assert_eq!(vol.window_seconds, 3600);
    assert!(
        vol.summary.starts_with("203.0.113.7: pulled"),
        "{}",
        vol.summary
    );
    assert!(vol.request_bytes > 0 && !vol.hosts.is_empty(), "{vol:?}");

    // Restart: the alert survives, and Watch replays it first.
    let seq = agents.seq;
    drop(agents);
    server.shutdown().await.unwrap();
    let server = start(cfg(dir.path())).await;
    let reopened = list(&server, true).await;
    assert!(reopened.iter().any(|a| a.id == vol.id), "{reopened:#?}");
    let mut watch = AlertsClient::new(channel(&url(&server)).await)
        .watch(v1::WatchAlertsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.state, v1::AlertState::Open as i32);
    let replayed = reopened.len();

    let mut agents = Agents::connect(&server, seq).await;
    agents.replay(&mut rng, 31, 72).await;
    let all = list(&server, false).await;
    for a in &all {
        eprintln!(
            "{} {:?} {:?} {} first h{:.2} last h{:.2}",
            a.key,
            v1::Detector::try_from(a.detector).unwrap(),
            v1::AlertState::try_from(a.state).unwrap(),
            a.summary,
            (a.first_seen_ms - T0) as f64 / HOUR as f64,
            (a.last_seen_ms - T0) as f64 / HOUR as f64,
        );
    }

    // Volume: one episode (updated, not repeated), same id, resolved once it stopped.
    let v = find(&all, "203.0.113.7", v1::Detector::Volume);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0].id, vol.id);
    assert_eq!(v[0].state, v1::AlertState::Resolved as i32);
    assert!(v[0].observed_bytes >= 1 << 30, "{:?}", v[0]);
    assert!(
        v[0].last_seen_ms > T0 + 32 * HOUR && v[0].last_seen_ms <= T0 + 33 * HOUR,
        "updated after the restart, until the window emptied: {:?}",
        v[0]
    );

    // Coordinated: the /24, many members, none over the per-address limit.
    let c = find(&all, "198.18.5.0/24", v1::Detector::Coordinated);
    assert_eq!(c.len(), 1, "{all:#?}");
    assert!(c[0].members >= 50, "{:?}", c[0]);
    assert!(
        c[0].summary.contains("addresses pulled"),
        "{}",
        c[0].summary
    );
    assert_eq!(c[0].state, v1::AlertState::Resolved as i32);
    // ...and no address of it is flagged for volume.
    assert!(
        !all.iter()
            .any(|a| a.key.starts_with("198.18.5.") && !a.key.contains('/')),
        "{all:#?}"
    );

    // Deviation: the steady client's burst, below the volume threshold.
    let dv = find(&all, "100.64.200.5", v1::Detector::Deviation);
    assert_eq!(dv.len(), 1, "{all:#?}");
    assert!(
        dv[0].baseline_bytes < 100 * MB && dv[0].baseline_bytes > 10 * MB,
        "{:?}",
        dv[0]
    );
    assert!(find(&all, "100.64.200.5", v1::Detector::Volume).is_empty());

    // Sustained: around the clock at 500:1, still open.
    let s = find(&all, "100.64.201.9", v1::Detector::Sustained);
    assert_eq!(s.len(), 1, "{all:#?}");
    assert_eq!(s[0].state, v1::AlertState::Open as i32);
    assert!(s[0].summary.contains("ratio"), "{}", s[0].summary);

    // Every listed alert names a client; the workloads' own volume changes (the serving
    // workload got busier during the attacks) are service alerts, listed when asked for.
    let with_service = list_scoped(&server, false, true).await;
    for a in &all {
        assert_eq!(a.scope, v1::Scope::Client as i32, "{a:#?}");
        assert!(!a.key.starts_with("gpu-"), "{a:#?}");
    }
    assert!(
        with_service
            .iter()
            .any(|a| a.scope == v1::Scope::Service as i32 && a.key.starts_with("gpu-")),
        "{with_service:#?}"
    );

    // Nothing about benign clients, their prefixes, or the allowlisted one.
    let benign = |k: &str| {
        k.starts_with("192.0.2.")
            || (0..8).any(|i| k.starts_with(&format!("100.64.{i}.")))
            || k.starts_with("100.64.200.0/")
            || k.starts_with("100.64.201.0/")
    };
    for a in &all {
        assert!(!benign(&a.key), "benign traffic flagged: {a:#?}");
    }

    // Watch streamed the changes after the replay: the volume alert resolving.
    let mut seen_resolved = false;
    for _ in 0..replayed + 200 {
        match tokio::time::timeout(Duration::from_secs(2), watch.message()).await {
            Ok(Ok(Some(a))) => {
                if a.id == vol.id && a.state == v1::AlertState::Resolved as i32 {
                    seen_resolved = true;
                    break;
                }
            }
            _ => break,
        }
    }
    assert!(seen_resolved, "Watch did not stream the resolution");

    let m = metrics(&server).await;
    assert!(
        metric(
            &m,
            "outflow_collector_alerts_opened_total{detector=\"volume\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "outflow_collector_alerts_open{detector=\"sustained\"}") >= 1.0,
        "{m}"
    );
    drop(agents);
    server.shutdown().await.unwrap();
    eprintln!("three days replayed in {:?}", started.elapsed());
}

/// 1.5 GiB in 30 minutes from `addr`: a volume alert.
async fn bulk_from_one_address(server: &Server, addr: [u8; 4]) {
    let mut s = server.collector().session();
    s.handle(hello_msg("a", 1, "gpu-0")).await.unwrap();
    for i in 1..=6u64 {
        let b = batch(i, T0 + i * STEP, vec![d(addr, 256 << 20, 1 << 20)]);
        s.handle(batch_msg(b)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_alerts_with_retries() {
    let dir = tempfile::tempdir().unwrap();
    let hook = outflow_testbed::webhook::Receiver::failing_first();
    let mut c = cfg(dir.path());
    c.webhook.url = Some(hook.url());
    c.webhook.initial_backoff = Duration::from_millis(20);
    let server = start(c).await;
    bulk_from_one_address(&server, [203, 0, 113, 99]).await;
    let body = first_body(&hook, Duration::from_secs(10)).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["key"], "203.0.113.99", "{body}");
    assert_eq!(v["detector"], "DETECTOR_VOLUME", "{body}");
    assert_eq!(v["state"], "ALERT_STATE_OPEN", "{body}");
    assert!(
        v["summary"].as_str().unwrap().contains("per-hour limit"),
        "{body}"
    );
    server.shutdown().await.unwrap();
}

/// An https webhook receiver with a certificate of `ca` for 127.0.0.1: answers 200 and sends
/// on the Authorization header and the body of each request.
async fn tls_receiver(
    ca: &crate::auth::Ca,
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(Option<String>, String)>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    };
    let (cert, key) = crate::auth::leaf(ca, "localhost", true);
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/hook", l.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let Ok(mut s) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (auth, body) = loop {
                let m = s.read(&mut chunk).await.unwrap_or(0);
                if m == 0 {
                    break (None, String::new());
                }
                buf.extend_from_slice(&chunk[..m]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let header = |name: &str| {
                        text[..i].lines().find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                        })
                    };
                    let len: usize = header("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        break (header("authorization"), text[i + 4..].to_owned());
                    }
                }
            };
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            let _ = s.shutdown().await;
            let _ = tx.send((auth, body));
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_over_https_carries_the_auth_header() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::auth::ca("hooks CA");
    let (hook, mut calls) = tls_receiver(&ca).await;
    let mut c = cfg(dir.path());
    // The receiver's certificate names localhost and 127.0.0.1.
    c.webhook.url = Some(hook);
    c.webhook.tls_ca = Some(crate::auth::write(dir.path(), "ca.pem", &ca.cert_pem));
    c.webhook.auth_header_file = Some(crate::auth::write(
        dir.path(),
        "auth",
        "Bearer hook-secret\n",
    ));
    let server = start(c).await;
    bulk_from_one_address(&server, [203, 0, 113, 98]).await;
    let (auth, body) = tokio::time::timeout(Duration::from_secs(10), calls.recv())
        .await
        .expect("no webhook call in 10 s")
        .unwrap();
    assert_eq!(auth.as_deref(), Some("Bearer hook-secret"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["key"], "203.0.113.98", "{body}");
    // Counted once the collector has read the answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&server).await;
        if metric(&m, "outflow_collector_webhook_sent_total") >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not counted: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_of_another_ca_is_refused_and_the_change_counted_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, mut calls) = tls_receiver(&crate::auth::ca("someone else")).await;
    let mut c = cfg(dir.path());
    c.webhook.url = Some(hook);
    c.webhook.tls_ca = Some(crate::auth::write(
        dir.path(),
        "ca.pem",
        &crate::auth::ca("hooks CA").cert_pem,
    ));
    c.webhook.max_attempts = 2;
    c.webhook.initial_backoff = Duration::from_millis(10);
    let server = start(c).await;
    bulk_from_one_address(&server, [203, 0, 113, 97]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&server).await;
        if metric(&m, "outflow_collector_webhook_dropped_total") >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing dropped: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(calls.try_recv().is_err(), "the receiver got a request");
    server.shutdown().await.unwrap();
}

/// What makes two alerts the same judgements: id, key, detector, state, first and last
/// seen, observed, peak and episode bytes, severity.
type Judgement = (String, String, i32, i32, [u64; 5], i32);

fn judgements(alerts: &[v1::Alert]) -> Vec<Judgement> {
    let mut v: Vec<_> = alerts
        .iter()
        .map(|a| {
            (
                a.id.clone(),
                a.key.clone(),
                a.detector,
                a.state,
                [
                    a.first_seen_ms,
                    a.last_seen_ms,
                    a.observed_bytes,
                    a.peak_bytes,
                    a.episode_bytes,
                ],
                a.severity,
            )
        })
        .collect();
    v.sort();
    v
}

/// Replays 60 hours of the traffic above from 4 agents, each step's 4 batches sent one after
/// the other (`together` false: one commit each, as `max_batches_per_commit = 1` forces) or
/// all at once (grouped into commits as they happen to arrive), and lists the alerts.
async fn replay_grouped(together: bool) -> Vec<v1::Alert> {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    c.store.max_batches_per_commit = if together { 1000 } else { 1 };
    let server = start(c).await;
    let mut sessions = Vec::new();
    for i in 0..4 {
        let mut s = server.collector().session();
        s.handle(hello_msg(&format!("agent-{i}"), 1, &format!("gpu-{i}")))
            .await
            .unwrap();
        sessions.push(s);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut t = T0 + STEP;
    let mut seq = 0;
    while t <= T0 + 60 * HOUR {
        seq += 1;
        let mut parts: Vec<Vec<v1::ConnDelta>> = vec![Vec::new(); 4];
        for (i, d) in traffic(&mut rng, t).into_iter().enumerate() {
            parts[i % 4].push(d);
        }
        let mut msgs = parts.into_iter().map(|p| batch_msg(batch(seq, t, p)));
        let [a, b, c, d] = &mut sessions[..] else {
            unreachable!()
        };
        let mut m = || msgs.next().unwrap();
        if together {
            let (ra, rb, rc, rd) =
                tokio::join!(a.handle(m()), b.handle(m()), c.handle(m()), d.handle(m()));
            for r in [ra, rb, rc, rd] {
                r.unwrap();
            }
        } else {
            for s in [a, b, c, d] {
                s.handle(m()).await.unwrap();
            }
        }
        t += STEP;
    }
    let alerts = list_scoped(&server, false, true).await;
    drop(sessions);
    server.shutdown().await.unwrap();
    alerts
}

/// The same batches, in the same order per agent, give the same alerts whatever the group
/// commits held: judgements happen on batch-time boundaries, on what was applied before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_batches_same_alerts_whatever_the_commits_held() {
    let one_by_one = replay_grouped(false).await;
    let grouped = replay_grouped(true).await;
    assert!(
        one_by_one.len() >= 3,
        "the replay raises alerts: {one_by_one:#?}"
    );
    assert_eq!(judgements(&one_by_one), judgements(&grouped));
}

/// A client far under the hourly and daily limits but over the weekly one is caught within
/// the week, though the collector restarted in the middle of it: what the detectors learnt
/// (the daily totals) is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_week_long_pull_is_caught_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let per_step = 6 * 1024 * MB / 288; // 6 GiB a day
    let mut seq = 0;
    let mut replay = async |server: &Server, from_step: u64, to_step: u64| {
        let mut s = server.collector().session();
        s.handle(hello_msg("agent-0", 1, "gpu-0")).await.unwrap();
        for step in from_step..to_step {
            seq += 1;
            let b = batch(
                seq,
                T0 + (step + 1) * STEP,
                vec![d([203, 0, 113, 40], per_step, 20_000)],
            );
            s.handle(batch_msg(b)).await.unwrap();
        }
    };
    let server = start(cfg(dir.path())).await;
    replay(&server, 0, 288 * 7 / 2).await;
    assert!(list(&server, false).await.is_empty());
    server.shutdown().await.unwrap();
    let server = start(cfg(dir.path())).await;
    replay(&server, 288 * 7 / 2, 288 * 8).await;
    let all = list(&server, false).await;
    let v = find(&all, "203.0.113.40", v1::Detector::Volume);
    assert_eq!(v.len(), 1, "{all:#?}");
    assert_eq!(v[0].window_seconds, 7 * 86_400, "{:?}", v[0]);
    let day = (v[0].first_seen_ms - T0) as f64 / (24 * HOUR) as f64;
    // 40 GiB at 6 GiB a day: in the 7th day (the window holds the current day and 7 before).
    assert!((6.0..7.0).contains(&day), "opened on day {day:.2}");
    assert!(v[0].summary.contains("7-day limit"), "{}", v[0].summary);
    server.shutdown().await.unwrap();
}
