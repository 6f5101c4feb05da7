//! outflow-sim: proves the collector's exfiltration detectors work.
//!
//! It speaks `outflow.v1.Ingest` as many synthetic agents (inference hosts) against a real
//! collector, entirely in batch time: a day of 60 s batches goes out as fast as the collector
//! acknowledges it, every host in lockstep (batch `seq` of every host before `seq + 1`), so the
//! collector's windows advance exactly as they would live. Then it reads `outflow.v1.Alerts/List`
//! and scores each injected attack: detected, time to detect (batch time from the attack's
//! start to its alert's `first_seen_ms`), bytes pulled before the alert, and false alerts.
//!
//! The traffic model and its parameters are in [`model`]; [`Scenario`] lists the attacks.
//! Everything is drawn from one seeded RNG: the same seed gives the same bytes.
pub mod cluster_demo;
pub mod ingest;
pub mod model;
pub mod net;
mod report;

use std::{
    fmt,
    net::IpAddr,
    str::FromStr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use outflow_proto::v1;
use serde::Serialize;
use tonic::Code;

pub use model::{BenignStats, LookAlike, StepTotals, lookalike_clients, lookalikes};
pub use report::{AlertView, AttackReport, HostTotals, Report};

use crate::{
    ingest::Bearer,
    model::{DAY_MS, Generator, Params},
    net::AgentStream,
};

/// A traffic scenario: benign traffic alone, or benign traffic with one injected attack. Each
/// attack sits 1.1 to 1.3 times above the default limit it must cross.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Benign traffic only: every alert is a false alert.
    Benign,
    /// One address (203.0.113.7) pulling 16 × 22 KB/s (1.27 GB an hour) from the attack start
    /// on.
    Bulk,
    /// 50 addresses of 198.51.100.0/24, each one stream of 30 KB/s (108 MB/h, a tenth of a 1 GiB/h
    /// per-client threshold), together 1.5 MB/s.
    Prefix,
    /// One client inside 2001:db8:bad:1::/64 taking a new address every 5 minutes, 16 × 22 KB/s.
    Rotate6,
    /// One address (100.64.77.77) at 2 KB/s rising linearly to 200 KB/s over the last day.
    SlowRise,
    /// One address (100.64.99.99) with 64 parallel connections of 5.4 KB/s each.
    Parallel,
    /// 240 addresses, 2 in each of 120 /24s of 100.96.0.0/16, each one stream of 22.2 KB/s:
    /// together 19.2 GB an hour, 1.12 times the /16's limit (16 × 1 GiB); each /24 and /20 far
    /// under theirs.
    Wide,
    /// A proxy pool: 250 addresses in 250 unrelated /24s, each one stream of 5.56 KB/s (20 MB
    /// an hour): together 5 GB an hour, 1.16 times 4 × 1 GiB.
    Pool,
    /// One address (100.64.88.88) pulling 6.5 GiB a day (0.27 GiB an hour) from the first
    /// simulated day on, with a benign response/request ratio: 45.5 GiB a week, 1.14 times the
    /// weekly limit; far under the hourly and daily ones.
    LowSlow,
    /// Every attack at once (each scored on its own).
    All,
}

impl Scenario {
    /// The attacks, in the order they are scored.
    pub const ATTACKS: [Scenario; 8] = [
        Scenario::Bulk,
        Scenario::Prefix,
        Scenario::Rotate6,
        Scenario::SlowRise,
        Scenario::Parallel,
        Scenario::Wide,
        Scenario::Pool,
        Scenario::LowSlow,
    ];

    /// `self` as a list of single attacks (`All` expands, `Benign` is none).
    pub fn attacks(self) -> Vec<Scenario> {
        match self {
            Scenario::Benign => Vec::new(),
            Scenario::All => Self::ATTACKS.to_vec(),
            s => vec![s],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Benign => "benign",
            Scenario::Bulk => "bulk",
            Scenario::Prefix => "prefix",
            Scenario::Rotate6 => "rotate6",
            Scenario::SlowRise => "slowrise",
            Scenario::Parallel => "parallel",
            Scenario::Wide => "wide",
            Scenario::Pool => "pool",
            Scenario::LowSlow => "lowslow",
            Scenario::All => "all",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Scenario::Benign, Scenario::All]
            .into_iter()
            .chain(Self::ATTACKS)
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                format!("unknown scenario `{s}`: want benign, bulk, prefix, rotate6, slowrise, parallel, wide, pool, lowslow or all")
            })
    }
}

/// How to run a simulation.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The collector's gRPC URL, e.g. `http://127.0.0.1:7411` (plaintext only); or several,
    /// comma-separated (a cluster's ingest nodes): the agents are spread over them, and one
    /// whose stream fails opens it again on the next and sends its unacknowledged batch again.
    pub collector: String,
    /// How long an agent whose stream failed keeps trying to open it again.
    pub reconnect_for: Duration,
    /// Set to the step being sent (1 to [`SimConfig::steps`]), for a caller that acts part
    /// way through.
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Bearer token for Ingest and Alerts.
    pub token: Option<String>,
    /// Synthetic hosts (one agent stream each), 1 to 10000.
    pub hosts: usize,
    /// Benign client addresses, at least 1.
    pub clients: usize,
    /// Simulated days, at least 1. The attacks happen on the last day.
    pub days: u32,
    pub seed: u64,
    /// Batch interval, seconds; must divide an hour.
    pub batch_secs: u64,
    /// Batch time of the first batch (Unix ms, a multiple of 24 h). Default: the run ends at the
    /// last UTC midnight, so no batch is in the collector's future.
    pub start_ms: Option<u64>,
    /// How much later than the model's time the batches are sent: the model's days start at a
    /// UTC midnight ([`SimConfig::start_ms`]; its hours of work and sleep are UTC's), its
    /// batches' and connections' times are sent this much later (a whole number of hours keeps
    /// every window's buckets where they were). Alerts are scored back in the model's time.
    pub offset_ms: u64,
    /// Saturdays and Sundays (UTC) quieter, with no office hours (else every day is a
    /// weekday: a run of one day whose traffic does not depend on the day it runs).
    pub weekends: bool,
    /// Hour of the last day (UTC) at which the attacks begin (the slow rise starts at 0).
    pub attack_start_hour: u32,
    /// Per agent, batches per second after a burst of 900 (0: as fast as acknowledged). The
    /// collector's default limit is 100.
    pub max_batches_per_second: f64,
    /// From step `k` on (see [`SimConfig::progress`]), the remaining steps spread over at
    /// least this long: `(k, d)`. For a caller that acts on the wall clock past step `k`.
    pub tail: Option<(u64, Duration)>,
    /// Wait between the last Ack and reading the alerts.
    pub settle: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            collector: "http://127.0.0.1:7411".into(),
            reconnect_for: Duration::from_secs(60),
            progress: None,
            token: None,
            hosts: 20,
            clients: 3000,
            days: 7,
            seed: 1,
            batch_secs: 300,
            start_ms: None,
            offset_ms: 0,
            weekends: true,
            attack_start_hour: 9,
            max_batches_per_second: 0.0,
            tail: None,
            settle: Duration::from_millis(200),
        }
    }
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("`{field}`: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("collector URL `{0}` is not valid")]
    Url(String),
    #[error("connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the token is not a valid header value")]
    Token,
    /// A synthetic agent's stream failed.
    #[error("{host}: {error}")]
    Ingest {
        host: String,
        error: ingest::IngestError,
    },
    #[error("{0}")]
    Protocol(String),
}

impl SimConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |field, message: &str| {
            Err(SimError::Config {
                field,
                message: message.to_owned(),
            })
        };
        if !(1..=10_000).contains(&self.hosts) {
            return bad("hosts", "must be 1 to 10000");
        }
        if self.clients == 0 {
            return bad("clients", "must be at least 1");
        }
        if self.days == 0 {
            return bad("days", "must be at least 1");
        }
        if self.batch_secs == 0 || 3600 % self.batch_secs != 0 {
            return bad("batch_secs", "must divide 3600");
        }
        if self.start_ms.is_some_and(|s| s % DAY_MS != 0) {
            return bad(
                "start_ms",
                "must be a UTC midnight (a multiple of 86400000)",
            );
        }
        if self.attack_start_hour >= 24 {
            return bad("attack_start_hour", "must be 0 to 23");
        }
        if self.max_batches_per_second.is_nan() || self.max_batches_per_second < 0.0 {
            return bad("max_batches_per_second", "must be 0 or more");
        }
        if self.urls().is_empty() {
            return bad("collector", "name at least one URL");
        }
        Ok(())
    }

    /// How many steps (batches per agent) a run sends.
    pub fn steps(&self) -> u64 {
        self.params().steps()
    }

    /// The collectors' URLs.
    pub fn urls(&self) -> Vec<&str> {
        self.collector
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    fn params(&self) -> Params {
        let start_ms = self.start_ms.unwrap_or_else(|| {
            let now = now_ms();
            now / DAY_MS * DAY_MS - u64::from(self.days) * DAY_MS
        });
        Params {
            hosts: self.hosts,
            clients: self.clients,
            days: self.days,
            seed: self.seed,
            batch_ms: self.batch_secs * 1000,
            start_ms,
            attack_offset_ms: u64::from(self.attack_start_hour) * model::HOUR_MS,
            weekends: self.weekends,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs one scenario (`All`: every attack at once) against the collector and scores it.
pub async fn run_scenario(cfg: &SimConfig, scenario: Scenario) -> Result<Report, SimError> {
    run_scenarios(cfg, &scenario.attacks(), scenario.name()).await
}

/// Runs benign traffic with every attack of `attacks` injected, and scores each attack.
pub async fn run_scenarios(
    cfg: &SimConfig,
    attacks: &[Scenario],
    name: &str,
) -> Result<Report, SimError> {
    let sent = send(cfg, attacks).await?;
    tokio::time::sleep(cfg.settle).await;
    let alerts = sent.list_alerts().await;
    Ok(sent.score(name, alerts))
}

/// A fleet's traffic, sent and acknowledged: to be scored against the alerts read when the
/// caller says (e.g. once a cluster has applied everything).
pub struct Sent {
    cfg: SimConfig,
    params: Params,
    generator: Generator,
    batches: u64,
    ingest_wall: Duration,
    reconnects: u64,
    channels: Vec<Vec<tonic::transport::Channel>>,
    bearer: Bearer,
}

/// Agents that share one connection to each collector (below the collector's 64 streams).
const AGENTS_PER_CONNECTION: usize = 50;

/// What a fleet sent: per host and per client address (response, request bytes), and the
/// connection deltas.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    pub hosts: std::collections::BTreeMap<String, (u64, u64)>,
    pub clients: std::collections::BTreeMap<IpAddr, (u64, u64)>,
    pub deltas: u64,
}

impl Sent {
    /// What was sent.
    pub fn truth(&self) -> Truth {
        Truth {
            hosts: self
                .generator
                .host_totals
                .iter()
                .enumerate()
                .filter(|(_, t)| **t != (0, 0))
                .map(|(i, t)| (model::host_name(i), *t))
                .collect(),
            clients: self
                .generator
                .client_totals
                .iter()
                .map(|(a, t)| (*a, *t))
                .collect(),
            deltas: self.generator.deltas,
        }
    }

    /// What a collector's 24 h window holds once the last batch is in: the batches that end
    /// in the last simulated day, at its start too (a window holds both ends; in a run of one
    /// day, [`Sent::truth`]). Clients that sent nothing in it are left out.
    pub fn last_day(&self) -> Truth {
        let mut truth = self.truth();
        let Some((hosts, clients)) = &self.generator.before_last_day else {
            return truth;
        };
        let minus = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0, a.1 - b.1);
        truth.hosts = self
            .generator
            .host_totals
            .iter()
            .zip(hosts)
            .enumerate()
            .map(|(i, (t, b))| (model::host_name(i), minus(*t, *b)))
            .filter(|(_, t)| *t != (0, 0))
            .collect();
        truth.clients = self
            .generator
            .client_totals
            .iter()
            .map(|(a, t)| (*a, minus(*t, clients.get(a).copied().unwrap_or_default())))
            .filter(|(_, t)| *t != (0, 0))
            .collect();
        truth
    }

    /// Streams opened again after one failed.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Every alert, from the first collector that answers (one may be gone).
    pub async fn list_alerts(&self) -> Result<Vec<v1::Alert>, tonic::Status> {
        let mut alerts = Err(tonic::Status::unavailable("no collector"));
        for c in self.channels.iter().flatten() {
            alerts = net::list_alerts(c.clone(), self.bearer.clone()).await;
            if alerts.is_ok() {
                break;
            }
        }
        alerts
    }

    /// Whether each attack has an alert among `alerts` (as listed, in the collector's time)
    /// that [`Sent::score`] takes for its detection.
    pub fn every_attack_detected(&self, alerts: &[v1::Alert]) -> bool {
        let alerts: Vec<v1::Alert> = alerts
            .iter()
            .map(|a| report::in_model_time(a.clone(), self.cfg.offset_ms))
            .collect();
        self.generator
            .attacks
            .iter()
            .all(|atk| alerts.iter().any(|al| report::detects(al, atk)))
    }

    /// Scores the attacks against `alerts`.
    pub fn score(self, name: &str, alerts: Result<Vec<v1::Alert>, tonic::Status>) -> Report {
        let mut report = report::score(
            name,
            &self.cfg,
            &self.params,
            self.generator,
            self.batches,
            self.ingest_wall,
            alerts,
        );
        report.reconnects = self.reconnects;
        report
    }
}

/// Streams benign traffic with every attack of `attacks` injected until every batch is
/// acknowledged.
pub async fn send(cfg: &SimConfig, attacks: &[Scenario]) -> Result<Sent, SimError> {
    cfg.validate()?;
    let params = cfg.params();
    let mut attack_list: Vec<Scenario> = attacks.iter().flat_map(|s| s.attacks()).collect();
    attack_list.dedup();
    let mut generator = Generator::new(params.clone(), &attack_list);

    let bearer = Bearer::new(cfg.token.as_deref()).map_err(|_| SimError::Token)?;
    // A connection holds at most 64 streams (the collector's limit): agents go in groups of
    // AGENTS_PER_CONNECTION, each group with a connection to every collector.
    let groups = cfg.hosts.div_ceil(AGENTS_PER_CONNECTION);
    let mut channels: Vec<Vec<tonic::transport::Channel>> = Vec::with_capacity(groups);
    for _ in 0..groups {
        let mut g = Vec::new();
        for url in cfg.urls() {
            g.push(net::connect(url).await?);
        }
        channels.push(g);
    }
    // A fresh epoch per run, so a rerun against the same collector is not deduplicated away
    // (it does not influence the traffic).
    let epoch = (now_ms() << 16) ^ u64::from(std::process::id()) | 1;
    let mut agents = Vec::with_capacity(cfg.hosts);
    for i in 0..cfg.hosts {
        let host = model::host_name(i);
        agents.push(
            AgentStream::open_on(
                &channels[i / AGENTS_PER_CONNECTION],
                i,
                bearer.clone(),
                &format!("outflow-sim/{host}"),
                epoch,
                &host,
            )
            .await?,
        );
    }

    let wall = Instant::now();
    let steps = params.steps();
    let mut seq = 0u64;
    let mut batches = 0u64;
    let mut reconnects = 0u64;
    // When step `k` of `cfg.tail` began.
    let mut tail_from = None;
    while !generator.done() {
        let (start_ms, end_ms, mut per_host) = generator.step();
        let (start_ms, end_ms) = (start_ms + cfg.offset_ms, end_ms + cfg.offset_ms);
        for d in per_host.iter_mut().flatten() {
            d.first_seen_ms += cfg.offset_ms;
        }
        seq += 1;
        if let Some(p) = &cfg.progress {
            p.store(seq, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some((k, d)) = cfg.tail {
            if seq == k {
                tail_from = Some(Instant::now());
            } else if let Some(from) = tail_from {
                let due = d.mul_f64((seq - k) as f64 / (steps - k) as f64);
                tokio::time::sleep_until((from + due).into()).await;
            }
        }
        // Each agent's batch of this step, sent; acknowledged below (or sent again on a
        // stream opened again).
        let mut sent = Vec::with_capacity(agents.len());
        for (agent_no, (agent, deltas)) in agents.iter_mut().zip(per_host).enumerate() {
            let b = v1::Batch {
                seq,
                start_ms,
                end_ms,
                deltas,
                overflow: None,
                lost_batches: 0,
                lost: None,
            };
            let acked = match agent.send_batch(b.clone()).await {
                Ok(()) => false,
                Err(e) => {
                    let group = &channels[agent_no / AGENTS_PER_CONNECTION];
                    agent.recover(group, &b, e, cfg.reconnect_for).await?;
                    reconnects += 1;
                    true
                }
            };
            sent.push((b, acked));
            batches += 1;
        }
        for (agent_no, (agent, (b, acked))) in agents.iter_mut().zip(&sent).enumerate() {
            if *acked {
                continue;
            }
            if let Err(e) = agent.ack(seq).await {
                let group = &channels[agent_no / AGENTS_PER_CONNECTION];
                agent.recover(group, b, e, cfg.reconnect_for).await?;
                reconnects += 1;
            }
        }
        if cfg.max_batches_per_second > 0.0 {
            let due = (seq as f64 - 900.0).max(0.0) / cfg.max_batches_per_second;
            let due = wall + Duration::from_secs_f64(due);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    let ingest_wall = wall.elapsed();
    for a in agents {
        a.close().await;
    }
    Ok(Sent {
        cfg: cfg.clone(),
        params,
        generator,
        batches,
        ingest_wall,
        reconnects,
        channels,
        bearer,
    })
}

/// Whether an alert key (an address, or a prefix) covers `addr`. Workload keys cover nothing.
pub fn key_covers(key: &str, addr: IpAddr) -> bool {
    if let Ok(a) = key.parse::<IpAddr>() {
        return a == addr;
    }
    key.parse::<IpNet>().is_ok_and(|n| n.contains(&addr))
}

/// Whether the Alerts status means "not served (yet)".
pub fn alerts_unimplemented(code: Code) -> bool {
    code == Code::Unimplemented
}
