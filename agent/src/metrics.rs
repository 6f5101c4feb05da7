//! The agent's HTTP endpoint on `metrics_listen` (served by `outflow-metrics-http`): Prometheus
//! metrics at `/metrics`, liveness at `/healthz` (200 while the process serves) and readiness at
//! `/readyz` (503 until the kernel programs are attached, 200 from then on, 503 again once the
//! agent is stopping).
//!
//! The values are those of the last interval (the read loop hands them over after each one),
//! except the export's, which are read from the sender's state at each scrape. Counts of the
//! kernel programs are cumulative since the pinned state was created, so they go on across
//! agent restarts; counts of the export are since this agent started.
//!
//! | metric | type | meaning |
//! |--------|------|---------|
//! | `outflow_agent_build_info{version}` | gauge | 1, labelled with the agent's version |
//! | `outflow_agent_ready` | gauge | 1 once the programs are attached, 0 while starting or stopping |
//! | `outflow_agent_connections_tracked` | gauge | connections holding a slot of the kernel table |
//! | `outflow_agent_connection_table_capacity` | gauge | slots of the kernel table (`max_connections`) |
//! | `outflow_agent_connections_overflowed_total` | counter | connections that found the table full: counted in the overflow counters, not one by one |
//! | `outflow_agent_overflow_closed_total` | counter | closes of those connections |
//! | `outflow_agent_overflow_bytes_total{direction}` | counter | payload bytes counted in overflow (`out`: sent by this host, `in`: received) |
//! | `outflow_agent_closes_untracked_total` | counter | connections older than the agent whose close cannot be seen (no room left to track it) |
//! | `outflow_agent_unparsed_packets_total` | counter | packets whose headers the programs do not read: their wire bytes count, their payload does not |
//! | `outflow_agent_stale_slot_packets_total` | counter | packets of a socket whose slot was already given back |
//! | `outflow_agent_placed_away_total` | counter | connections placed outside their home group of the table (it was full): raise `max_connections` if this grows |
//! | `outflow_agent_stale_owners_total` | counter | slots of sockets whose close was not seen, cleared when another socket took their address |
//! | `outflow_agent_attribution_turns_total` | counter | requests (turns) whose start was captured |
//! | `outflow_agent_attribution_annotations_total` | counter | client ids set by the serving application, applied |
//! | `outflow_agent_attribution_ignored_claims_total` | counter | PROXY and forwarding headers from untrusted senders, ignored |
//! | `outflow_agent_attribution_unattributed_total{cause}` | counter | turns or connections whose bytes went to the TCP peer because the client could not be known |
//! | `outflow_agent_attribution_events_lost_total{kind}` | counter | events the kernel's ring buffer had no room for (`turn`, `annotation`) |
//! | `outflow_agent_attribution_annotations_untracked_total` | counter | annotations on sockets the agent does not track |
//! | `outflow_agent_interval_seconds` | histogram | one interval: read the table, emit, spool, commit |
//! | `outflow_agent_bpf_stats_enabled` | gauge | 1 when `kernel.bpf_stats_enabled` is on (the kernel then counts program runs) |
//! | `outflow_agent_program_runs_total{program}` | counter | runs of each kernel program (while `kernel.bpf_stats_enabled` is on) |
//! | `outflow_agent_program_run_seconds_total{program}` | counter | time spent in each kernel program (same) |
//! | `outflow_agent_collector_connected` | gauge | 1 while a stream to the collector is open (export only) |
//! | `outflow_agent_batches_spooled_total` | counter | batches written to the spool (export only) |
//! | `outflow_agent_batches_acknowledged_total` | counter | batches the collector acknowledged (export only) |
//! | `outflow_agent_batches_lost_total` | counter | batches dropped unsent: spool full or unreadable (export only) |
//! | `outflow_agent_spool_bytes` | gauge | bytes in the spool (export only) |
//! | `outflow_agent_spool_batches` | gauge | batches in the spool (export only) |
//! | `outflow_agent_spool_max_bytes` | gauge | the spool's bound, `export.spool_max_bytes` (export only) |
//! | `outflow_agent_last_ack_age_seconds` | gauge | seconds since the collector last acknowledged (export only; absent before the first) |
use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use agent_common::Counters;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{export::ExportStatusSource, kernel::ProgramRuns, record::StatsRecord};

/// What the read loop hands over after each interval.
#[derive(Debug, Default)]
struct Snapshot {
    stats: Option<StatsRecord>,
    overflow: Counters,
    bpf_stats_enabled: bool,
    programs: Vec<ProgramRuns>,
}

/// The values encoded at each scrape.
#[derive(Debug, Default)]
struct Live {
    ready: AtomicBool,
    snapshot: Mutex<Snapshot>,
    export: OnceLock<ExportStatusSource>,
}

/// The agent's metrics and readiness; shared between the read loop and the HTTP server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    live: Arc<Live>,
    interval: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outflow_agent");
        let live = Arc::new(Live::default());
        // 1 ms to about 16 s.
        let interval = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register_with_unit(
            "interval",
            "One interval: read the kernel table, emit, spool, commit",
            Unit::Seconds,
            interval.clone(),
        );
        registry.register_collector(Box::new(Arc::clone(&live)));
        Self {
            registry,
            live,
            interval,
        }
    }

    /// The programs are attached (or, with `false`, the agent is stopping).
    pub fn set_ready(&self, ready: bool) {
        self.live.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.live.ready.load(Ordering::Relaxed)
    }

    /// Where the export's metrics are read from (once, when export is configured).
    pub fn set_export(&self, source: ExportStatusSource) {
        let _ = self.live.export.set(source);
    }

    /// An interval ended, after `took`: its stats, the overflow totals and the programs' runs.
    pub fn interval_done(
        &self,
        took: Duration,
        stats: Option<&StatsRecord>,
        overflow: &Counters,
        bpf_stats_enabled: bool,
        programs: Vec<ProgramRuns>,
    ) {
        self.interval.observe(took.as_secs_f64());
        let mut s = self
            .live
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(stats) = stats {
            s.stats = Some(stats.clone());
        }
        s.overflow = *overflow;
        s.bpf_stats_enabled = bpf_stats_enabled;
        s.programs = programs;
    }

    /// The metrics in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            s = format!("# cannot encode metrics: {e}\n");
        }
        s
    }
}

/// Encodes one unlabelled metric.
fn one(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

/// Encodes a metric with one label, one sample per `(label value, metric)`.
fn labelled<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    label: &'static str,
    samples: impl IntoIterator<Item = (String, M)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
    for (value, metric) in samples {
        let labels = [(label, value)];
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: i64) -> ConstGauge<i64> {
    ConstGauge::new(v)
}

fn flag(b: bool) -> ConstGauge<i64> {
    ConstGauge::new(i64::from(b))
}

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let e = &mut enc;
        // A gauge, not an OpenMetrics `info` (which Prometheus' text parser does not take).
        labelled(
            e,
            "build_info",
            "1, labelled with the agent's version",
            MetricType::Gauge,
            "version",
            [(env!("CARGO_PKG_VERSION").to_string(), gauge(1))],
        )?;
        one(
            e,
            "ready",
            "1 once the kernel programs are attached, 0 while starting or stopping",
            &flag(self.ready.load(Ordering::Relaxed)),
        )?;
        let s = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(st) = &s.stats {
            encode_stats(e, st)?;
        }
        labelled(
            e,
            "overflow_bytes",
            "Payload bytes of connections that found the table full, counted in overflow",
            MetricType::Counter,
            "direction",
            [
                ("out".to_string(), counter(s.overflow.bytes_out)),
                ("in".to_string(), counter(s.overflow.bytes_in)),
            ],
        )?;
        one(
            e,
            "bpf_stats_enabled",
            "1 when kernel.bpf_stats_enabled is on and the kernel counts program runs",
            &flag(s.bpf_stats_enabled),
        )?;
        if s.bpf_stats_enabled {
            labelled(
                e,
                "program_runs",
                "Runs of each kernel program",
                MetricType::Counter,
                "program",
                s.programs
                    .iter()
                    .map(|p| (p.program.clone(), counter(p.runs))),
            )?;
            labelled(
                e,
                "program_run_seconds",
                "Time spent in each kernel program",
                MetricType::Counter,
                "program",
                s.programs
                    .iter()
                    .map(|p| (p.program.clone(), ConstCounter::new(p.time.as_secs_f64()))),
            )?;
        }
        drop(s);
        if let Some(source) = self.export.get() {
            encode_export(e, source)?;
        }
        Ok(())
    }
}

fn encode_stats(e: &mut DescriptorEncoder<'_>, st: &StatsRecord) -> fmt::Result {
    one(
        e,
        "connections_tracked",
        "Connections holding a slot of the kernel table",
        &gauge(i64::from(st.live)),
    )?;
    one(
        e,
        "connection_table_capacity",
        "Slots of the kernel table (max_connections)",
        &gauge(i64::from(st.capacity)),
    )?;
    for (name, help, v) in [
        (
            "connections_overflowed",
            "Connections that found the table full (counted in overflow, not one by one)",
            st.conns_overflowed,
        ),
        (
            "overflow_closed",
            "Closes of connections counted in overflow",
            st.overflow_closed,
        ),
        (
            "closes_untracked",
            "Connections older than the agent whose close cannot be seen",
            st.legacy_untracked,
        ),
        (
            "unparsed_packets",
            "Packets whose headers are not read: wire bytes counted, payload not",
            st.unparsed_packets,
        ),
        (
            "stale_slot_packets",
            "Packets of a socket whose slot was already given back",
            st.stale_slot,
        ),
        (
            "placed_away",
            "Connections placed outside their home group of the table",
            st.placed_away,
        ),
        (
            "stale_owners",
            "Slots of sockets whose close was not seen, cleared when their address was reused",
            st.stale_owners,
        ),
    ] {
        one(e, name, help, &counter(v))?;
    }
    let a = &st.attribution;
    for (name, help, v) in [
        (
            "attribution_turns",
            "Requests (turns) whose start was captured",
            a.agent.turns,
        ),
        (
            "attribution_annotations",
            "Client ids set by the serving application, applied",
            a.agent.annotations,
        ),
        (
            "attribution_ignored_claims",
            "PROXY and forwarding headers from untrusted senders, ignored",
            a.agent.ignored_claims,
        ),
        (
            "attribution_annotations_untracked",
            "Annotations on sockets the agent does not track",
            a.annotations_untracked,
        ),
    ] {
        one(e, name, help, &counter(v))?;
    }
    labelled(
        e,
        "attribution_unattributed",
        "Turns or connections whose bytes went to the TCP peer: the client could not be known",
        MetricType::Counter,
        "cause",
        a.agent
            .unattributed
            .iter()
            .map(|(cause, n)| ((*cause).to_string(), counter(*n))),
    )?;
    labelled(
        e,
        "attribution_events_lost",
        "Events the kernel's ring buffer had no room for",
        MetricType::Counter,
        "kind",
        [
            ("turn".to_string(), counter(a.turn_events_lost)),
            ("annotation".to_string(), counter(a.annotations_lost)),
        ],
    )
}

fn encode_export(e: &mut DescriptorEncoder<'_>, source: &ExportStatusSource) -> fmt::Result {
    let x = source.read();
    one(
        e,
        "collector_connected",
        "1 while a stream to the collector is open",
        &flag(x.connected),
    )?;
    for (name, help, v) in [
        (
            "batches_spooled",
            "Batches written to the spool",
            x.batches_spooled,
        ),
        (
            "batches_acknowledged",
            "Batches the collector acknowledged",
            x.batches_acked,
        ),
        (
            "batches_lost",
            "Batches dropped unsent (spool full or unreadable)",
            x.batches_lost,
        ),
    ] {
        one(e, name, help, &counter(v))?;
    }
    for (name, help, v) in [
        ("spool_bytes", "Bytes in the spool", x.spool_bytes),
        ("spool_batches", "Batches in the spool", x.spool_batches),
        (
            "spool_max_bytes",
            "The spool's bound (export.spool_max_bytes)",
            x.spool_max_bytes,
        ),
    ] {
        one(e, name, help, &gauge(i64::try_from(v).unwrap_or(i64::MAX)))?;
    }
    if let Some(age) = x.since_last_ack {
        one(
            e,
            "last_ack_age_seconds",
            "Seconds since the collector last acknowledged",
            &ConstGauge::new(age.as_secs_f64()),
        )?;
    }
    Ok(())
}

impl outflow_metrics_http::Exposition for Metrics {
    fn openmetrics(&self) -> String {
        self.encode()
    }

    fn readiness(&self) -> Result<(), String> {
        if self.is_ready() {
            Ok(())
        } else {
            Err("the kernel programs are not attached (starting or stopping)".to_string())
        }
    }
}

/// Binds `addr`; the error names the setting to change.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, std::io::Error> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen on {addr} for metrics and health ({e}): set metrics_listen (or --metrics-listen) to a free address"
            ),
        )
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the runtime ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    axum::serve(listener, outflow_metrics_http::router(metrics)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_of_the_table_is_encoded_once() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(text.contains("outflow_agent_ready 0"), "{text}");
        assert!(
            text.contains("outflow_agent_build_info{version=\""),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        // Without an interval read, only what is known is there.
        assert!(!text.contains("connections_tracked"), "{text}");
    }

    #[test]
    fn the_doc_table_lists_what_is_encoded() {
        let m = Metrics::new();
        let stats = StatsRecord {
            conns_overflowed: 1,
            overflow_closed: 2,
            legacy_untracked: 3,
            unparsed_packets: 4,
            stale_slot: 5,
            placed_away: 6,
            stale_owners: 7,
            capacity: 64,
            live: 9,
            attribution: crate::record::AttributionStatsRecord {
                agent: crate::attribution::AttributionStats::default(),
                turn_events_lost: 10,
                annotations_lost: 11,
                annotations_untracked: 12,
            },
        };
        let overflow = Counters {
            bytes_out: 1000,
            ..Counters::default()
        };
        m.set_ready(true);
        m.interval_done(
            Duration::from_millis(3),
            Some(&stats),
            &overflow,
            true,
            vec![ProgramRuns {
                program: "count_egress".into(),
                runs: 5,
                time: Duration::from_micros(20),
            }],
        );
        let text = m.encode();
        for line in [
            "outflow_agent_ready 1",
            "outflow_agent_connections_tracked 9",
            "outflow_agent_connection_table_capacity 64",
            "outflow_agent_connections_overflowed_total 1",
            "outflow_agent_unparsed_packets_total 4",
            "outflow_agent_overflow_bytes_total{direction=\"out\"} 1000",
            "outflow_agent_attribution_events_lost_total{kind=\"annotation\"} 11",
            "outflow_agent_program_runs_total{program=\"count_egress\"} 5",
            "outflow_agent_interval_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // Every name in the doc table at the top of this file is one the agent can encode.
        let doc = include_str!("metrics.rs");
        for name in doc
            .lines()
            .filter_map(|l| l.strip_prefix("//! | `outflow_agent_"))
            .map(|l| l.split(['`', '{']).next().unwrap_or_default())
        {
            let base = name.trim_end_matches("_total").trim_end_matches("_info");
            assert!(
                text.contains(&format!("outflow_agent_{base}"))
                    || name.contains("spool")
                    || name.contains("batches")
                    || name.contains("collector")
                    || name.contains("last_ack")
                    || name.contains("unattributed"),
                "{name} of the doc table is not encoded:\n{text}"
            );
        }
    }
}
