//! Prometheus metrics (at `/metrics` on the metrics address: OpenMetrics text to a scraper that
//! asks for it, else the Prometheus text format; served by `outflow-metrics-http`), and the
//! health endpoints beside them: `/healthz` answers 200 while the process serves HTTP,
//! `/readyz` 200 once the store is open and gRPC serves, 503 before that and again while
//! stopping.
//!
//! | metric | type | meaning |
//! |--------|------|---------|
//! | `outflow_collector_agents_connected` | gauge | streams past their Hello |
//! | `outflow_collector_batches_total` | counter | batches applied |
//! | `outflow_collector_deltas_total` | counter | deltas (records) of applied batches |
//! | `outflow_collector_duplicate_batches_total` | counter | batches acknowledged without applying (already applied) |
//! | `outflow_collector_rejects_total{reason}` | counter | calls refused: `unauthenticated`, `permission_denied`, `invalid_argument`, `failed_precondition`, `rate_limited`, `too_large`, `too_many_streams` |
//! | `outflow_collector_lost_batches_total` | counter | batches agents reported lost (spool full) |
//! | `outflow_collector_shifted_batches_total` | counter | batches whose `end_ms` was beyond the collector's clock plus `limits.max_clock_skew`: applied at the latest time allowed |
//! | `outflow_collector_lost_response_bytes_total` | counter | response bytes of those batches |
//! | `outflow_collector_unattributed_response_bytes_total` | counter | response bytes agents counted for connections their kernel table had no slot for (in no client's totals) |
//! | `outflow_collector_ingest_lag_seconds` | histogram | collector clock minus batch `end_ms`, at apply |
//! | `outflow_collector_store_commit_seconds` | histogram | one write transaction (group commit), commit included |
//! | `outflow_collector_store_journal_bytes_total` | counter | bytes of journal entries committed (what each group commit adds to each key, before the rollups are written whole) |
//! | `outflow_collector_store_checkpoints_total` | counter | checkpoints: the rollups the journal touched written whole, the journal emptied |
//! | `outflow_collector_store_checkpoint_seconds` | histogram | one checkpoint's write transaction, commit included |
//! | `outflow_collector_store_failures_total` | counter | writes the store could not make (full disk, I/O error): their batches were refused with UNAVAILABLE, not applied; the store is reopened before the next |
//! | `outflow_collector_commit_batches` | histogram | batches per write transaction |
//! | `outflow_collector_keys{group}` | gauge | keys held per group (`client-address`, `client-prefix`, `host`, `workload`, `client-id`, `peer`) |
//! | `outflow_collector_key_budget` | gauge | `limits.max_keys`: the most budgeted keys held |
//! | `outflow_collector_budgeted_keys` | gauge | keys held that count against it (addresses, peers, ids, prefixes, workloads) |
//! | `outflow_collector_folded_keys_total{kind}` | counter | new keys not made past the budget: `address` (counted in its prefix), `prefix` (in a wider network), `workload` (in its host's `(folded)` one) |
//! | `outflow_collector_folded_response_bytes_total{kind}` | counter | response bytes those keys carried, counted at the coarser level only |
//! | `outflow_collector_detect_tracks_evicted_total` | counter | learnt subjects dropped (least recently judged first) to keep the detectors within the key budget |
//! | `outflow_collector_webhook_sent_total` | counter | alert changes the webhook receiver accepted |
//! | `outflow_collector_webhook_dropped_total` | counter | alert changes given up (every attempt failed) or skipped (the receiver too slow) |
//! | `outflow_collector_webhook_already_delivered_total` | counter | cluster aggregator: alert changes not sent because the receiver accepted them before (judged again in a replay) |
//! | `outflow_collector_webhook_delivery_log_failures_total` | counter | cluster aggregator: alert changes whose delivery record could not be read (sent anyway) or written (a replay sends them again) |
//! | `outflow_collector_otlp_exports_total` | counter | OTLP pushes the receiver accepted (`[otlp]`) |
//! | `outflow_collector_otlp_export_failures_total` | counter | OTLP pushes that failed (receiver away, refused, timed out); the next push carries the values of its time |
//! | `outflow_collector_otlp_rejected_points_total` | counter | data points a receiver accepted the push of but said it rejected (OTLP partial success) |
//! | `outflow_collector_feed_followers` | gauge | `outflow.v1.Feed` Follow streams open |
//! | `outflow_collector_feed_sent_batches_total` | counter | applied batches sent to Feed followers |
//! | `outflow_collector_feed_dropped_batches_total` | counter | applied batches the feed's buffer let go (`feed.buffer_entries`); only a follower further behind misses them |
//! | `outflow_collector_feed_gap_positions_total` | counter | positions followers asked for that were no longer held (each told with a FeedGap) |
//! | `outflow_collector_cluster_published_parts_total` | counter | ingest node: batch parts JetStream acknowledged (duplicates included) |
//! | `outflow_collector_cluster_duplicate_parts_total` | counter | ingest node: parts JetStream already held (a batch sent again) |
//! | `outflow_collector_cluster_publish_retries_total` | counter | ingest node: parts published again after a failed or unanswered publish |
//! | `outflow_collector_cluster_applied_parts_total` | counter | aggregator: parts of its partitions applied (or found applied before) and acknowledged to JetStream |
//! | `outflow_collector_cluster_invalid_parts_total` | counter | aggregator: parts that break the protocol, dropped (acknowledged, logged) |
//! | `outflow_collector_cluster_partitions` | gauge | ingest node and aggregator: the partitions the clients are spread over (`cluster.partitions`; 0 on a standalone collector): the sum of `..._partitions_held` over the aggregators must equal it |
//! | `outflow_collector_cluster_partitions_held` | gauge | aggregator: partitions it holds (claims and applies) |
//! | `outflow_collector_cluster_partitions_replaying` | gauge | aggregator: partitions it holds whose consumer has not yet applied every part the stream had for them (a rebuild, a partition taken over, a restart): the cluster's Query refuses with UNAVAILABLE until none is |
//! | `outflow_collector_cluster_delivery_gaps_total` | counter | aggregator: times a consumer found deliveries of its partition that never arrived (a fetch's reply lost): it read again from its first part not acknowledged, so none was taken for a duplicate |
//! | `outflow_collector_cluster_rebuilds_total` | counter | aggregator: times it emptied its store and applied its partitions again from the stream's start (it gave partitions away, or found its claims taken while it was gone) |
//! | `outflow_collector_cluster_membership_failures_total` | counter | aggregator: renewals of its membership that failed (each quarter of a lease), and rounds in which reading or changing the claims failed |
//! | `outflow_collector_cluster_cohort_summaries_total` | counter | aggregator: cohort summaries (a partition's clients at one judgement) JetStream acknowledged, for the second stage |
//! | `outflow_collector_cluster_cohort_summaries_retried_total` | counter | aggregator: cohort summaries published again after a failed or unanswered publish (its judgements wait meanwhile) |
//! | `outflow_collector_cluster_invalid_summaries_total` | counter | aggregator holding the second stage: cohort summaries that break the protocol, dropped (logged) |
//! | `outflow_collector_cluster_second_stage_waiting` | gauge | aggregator holding the second stage: judgement times with summaries waiting for some partition's (0 when it keeps up) |
//! | `outflow_collector_cluster_publish_failures_total` | counter | ingest node: batches refused with UNAVAILABLE because JetStream did not acknowledge every part in `cluster.publish_timeout` (their agents send them again) |
//! | `outflow_collector_alerts_opened_total{detector}` | counter | alerts opened |
//! | `outflow_collector_alerts_resolved_total{detector}` | counter | alerts resolved |
//! | `outflow_collector_alerts_open{detector}` | gauge | alerts open now |
//! | `outflow_collector_detect_peer_ratio{kind}` | gauge | the peers' response/request ratio the sustained detector judges each subject kind against (`client`, `prefix`, `workload`, `client-id`): learnt over their active hours; in a cluster, the aggregators' together |
//! | `outflow_collector_detect_peer_samples{kind}` | gauge | active hours that ratio was learnt from (summed over a cluster's aggregators): the sustained detector judges a ratio once it is at least `detect.sustained.min_peer_samples` |
//! | `outflow_collector_cluster_peer_ratios_shared` | gauge | aggregator: aggregators whose peers' ratios its sustained detector judges against, itself included (the live aggregators, once they have shared theirs) |
//! | `outflow_collector_detect_seconds` | histogram | one judgement (every `detect.eval_interval` of batch time) |
//! | `outflow_collector_ready` | gauge | 1 once the store is open and gRPC serves; 0 while starting and while stopping (as `/readyz`) |
//! | `outflow_collector_top_client_response_bytes{rank,client}` | gauge | response bytes of the `metrics.top_clients` client addresses with the most in `metrics.top_window` (batch time), `rank` 1 the biggest; one series per rank held, computed at each scrape (see `top_clients`) |
use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tokio_util::sync::CancellationToken;

/// Label of `rejects_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Label of `keys`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: &'static str,
}

/// Label of the fold metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FoldLabel {
    pub kind: &'static str,
}

/// Label of the peers' ratio metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerKindLabel {
    pub kind: &'static str,
}

/// Label of the alert metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectorLabel {
    pub detector: &'static str,
}

/// The collector's metrics; cheap to clone (every metric is shared).
#[derive(Debug)]
pub struct Metrics {
    pub agents_connected: Gauge,
    pub batches: Counter,
    pub deltas: Counter,
    pub duplicates: Counter,
    pub rejects: Family<ReasonLabel, Counter>,
    pub lost_batches: Counter,
    pub lost_response_bytes: Counter,
    pub shifted_batches: Counter,
    pub webhook_sent: Counter,
    pub webhook_dropped: Counter,
    pub webhook_already_delivered: Counter,
    pub webhook_delivery_log_failures: Counter,
    pub otlp_exports: Counter,
    pub otlp_export_failures: Counter,
    pub otlp_rejected_points: Counter,
    pub feed_followers: Gauge,
    pub feed_sent_batches: Counter,
    pub feed_dropped_batches: Counter,
    pub feed_gap_positions: Counter,
    pub cluster_published_parts: Counter,
    pub cluster_duplicate_parts: Counter,
    pub cluster_publish_retries: Counter,
    pub cluster_publish_failures: Counter,
    pub cluster_applied_parts: Counter,
    pub cluster_invalid_parts: Counter,
    pub cluster_partitions: Gauge,
    pub cluster_partitions_held: Gauge,
    pub cluster_partitions_replaying: Gauge,
    pub cluster_rebuilds: Counter,
    pub cluster_delivery_gaps: Counter,
    pub cluster_membership_failures: Counter,
    pub cluster_cohort_summaries: Counter,
    pub cluster_cohort_summaries_retried: Counter,
    pub cluster_invalid_summaries: Counter,
    pub cluster_second_stage_waiting: Gauge,
    pub unattributed_response_bytes: Counter,
    pub ingest_lag: Histogram,
    pub commit_seconds: Histogram,
    pub commit_batches: Histogram,
    pub journal_bytes: Counter,
    pub checkpoints: Counter,
    pub checkpoint_seconds: Histogram,
    pub store_failures: Counter,
    pub keys: Family<GroupLabel, Gauge>,
    pub key_budget: Gauge,
    pub budgeted_keys: Gauge,
    pub folded_keys: Family<FoldLabel, Counter>,
    pub folded_bytes: Family<FoldLabel, Counter>,
    pub tracks_evicted: Counter,
    pub alerts_opened: Family<DetectorLabel, Counter>,
    pub alerts_resolved: Family<DetectorLabel, Counter>,
    pub alerts_open: Family<DetectorLabel, Gauge>,
    pub detect_seconds: Histogram,
    pub detect_peer_ratio: Family<PeerKindLabel, Gauge<f64, AtomicU64>>,
    pub detect_peer_samples: Family<PeerKindLabel, Gauge>,
    pub cluster_peer_ratios_shared: Gauge,
    /// 1 while the collector serves (see [`Metrics::set_ready`]).
    ready: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outflow_collector");
        let m = Self {
            agents_connected: Gauge::default(),
            batches: Counter::default(),
            deltas: Counter::default(),
            duplicates: Counter::default(),
            rejects: Family::default(),
            lost_batches: Counter::default(),
            lost_response_bytes: Counter::default(),
            shifted_batches: Counter::default(),
            webhook_sent: Counter::default(),
            webhook_dropped: Counter::default(),
            webhook_already_delivered: Counter::default(),
            webhook_delivery_log_failures: Counter::default(),
            otlp_exports: Counter::default(),
            otlp_export_failures: Counter::default(),
            otlp_rejected_points: Counter::default(),
            feed_followers: Gauge::default(),
            feed_sent_batches: Counter::default(),
            feed_dropped_batches: Counter::default(),
            feed_gap_positions: Counter::default(),
            cluster_published_parts: Counter::default(),
            cluster_duplicate_parts: Counter::default(),
            cluster_publish_retries: Counter::default(),
            cluster_publish_failures: Counter::default(),
            cluster_applied_parts: Counter::default(),
            cluster_invalid_parts: Counter::default(),
            cluster_partitions: Gauge::default(),
            cluster_partitions_held: Gauge::default(),
            cluster_partitions_replaying: Gauge::default(),
            cluster_rebuilds: Counter::default(),
            cluster_delivery_gaps: Counter::default(),
            cluster_membership_failures: Counter::default(),
            cluster_cohort_summaries: Counter::default(),
            cluster_cohort_summaries_retried: Counter::default(),
            cluster_invalid_summaries: Counter::default(),
            cluster_second_stage_waiting: Gauge::default(),
            unattributed_response_bytes: Counter::default(),
            ingest_lag: Histogram::new(exponential_buckets(0.25, 2.0, 16)),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            commit_batches: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            journal_bytes: Counter::default(),
            checkpoints: Counter::default(),
            checkpoint_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            store_failures: Counter::default(),
            keys: Family::default(),
            key_budget: Gauge::default(),
            budgeted_keys: Gauge::default(),
            folded_keys: Family::default(),
            folded_bytes: Family::default(),
            tracks_evicted: Counter::default(),
            alerts_opened: Family::default(),
            alerts_resolved: Family::default(),
            alerts_open: Family::default(),
            detect_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 20)),
            detect_peer_ratio: Family::default(),
            detect_peer_samples: Family::default(),
            cluster_peer_ratios_shared: Gauge::default(),
            ready: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "agents_connected",
            "Agent streams past their Hello",
            m.agents_connected.clone(),
        );
        registry.register("batches", "Batches applied", m.batches.clone());
        registry.register("deltas", "Deltas of applied batches", m.deltas.clone());
        registry.register(
            "duplicate_batches",
            "Batches acknowledged without applying them again",
            m.duplicates.clone(),
        );
        registry.register("rejects", "Calls refused, by reason", m.rejects.clone());
        registry.register(
            "lost_batches",
            "Batches agents reported lost",
            m.lost_batches.clone(),
        );
        registry.register(
            "lost_response_bytes",
            "Response bytes of the batches agents reported lost",
            m.lost_response_bytes.clone(),
        );
        registry.register(
            "webhook_sent",
            "Alert changes the webhook receiver accepted",
            m.webhook_sent.clone(),
        );
        registry.register(
            "webhook_dropped",
            "Alert changes the webhook gave up (every attempt failed) or skipped (receiver too slow)",
            m.webhook_dropped.clone(),
        );
        registry.register(
            "webhook_already_delivered",
            "Alert changes not sent because the receiver accepted them before (judged again in a replay)",
            m.webhook_already_delivered.clone(),
        );
        registry.register(
            "webhook_delivery_log_failures",
            "Alert changes whose delivery record could not be read (sent anyway) or written",
            m.webhook_delivery_log_failures.clone(),
        );
        registry.register(
            "otlp_exports",
            "OTLP metric pushes the receiver accepted",
            m.otlp_exports.clone(),
        );
        registry.register(
            "otlp_export_failures",
            "OTLP metric pushes that failed (receiver away, refused, timed out)",
            m.otlp_export_failures.clone(),
        );
        registry.register(
            "otlp_rejected_points",
            "Data points an OTLP receiver said it rejected (partial success)",
            m.otlp_rejected_points.clone(),
        );
        registry.register(
            "feed_followers",
            "Feed Follow streams open",
            m.feed_followers.clone(),
        );
        registry.register(
            "feed_sent_batches",
            "Applied batches sent to Feed followers",
            m.feed_sent_batches.clone(),
        );
        registry.register(
            "feed_dropped_batches",
            "Applied batches the feed buffer let go (feed.buffer_entries)",
            m.feed_dropped_batches.clone(),
        );
        registry.register(
            "feed_gap_positions",
            "Feed positions followers asked for that were no longer held",
            m.feed_gap_positions.clone(),
        );
        registry.register(
            "cluster_published_parts",
            "Ingest node: batch parts JetStream acknowledged (duplicates included)",
            m.cluster_published_parts.clone(),
        );
        registry.register(
            "cluster_duplicate_parts",
            "Ingest node: batch parts JetStream already held",
            m.cluster_duplicate_parts.clone(),
        );
        registry.register(
            "cluster_publish_retries",
            "Ingest node: parts published again after a failed or unanswered publish",
            m.cluster_publish_retries.clone(),
        );
        registry.register(
            "cluster_publish_failures",
            "Ingest node: batches refused because JetStream did not acknowledge every part in time",
            m.cluster_publish_failures.clone(),
        );
        registry.register(
            "cluster_applied_parts",
            "Aggregator: parts of its partitions applied (or found applied before) and acknowledged",
            m.cluster_applied_parts.clone(),
        );
        registry.register(
            "cluster_invalid_parts",
            "Aggregator: parts that break the protocol, dropped",
            m.cluster_invalid_parts.clone(),
        );
        registry.register(
            "cluster_partitions",
            "Cluster node: the partitions the clients are spread over (cluster.partitions)",
            m.cluster_partitions.clone(),
        );
        registry.register(
            "cluster_partitions_held",
            "Aggregator: partitions it holds",
            m.cluster_partitions_held.clone(),
        );
        registry.register(
            "cluster_partitions_replaying",
            "Aggregator: partitions it holds that its consumers have not yet caught up with the stream",
            m.cluster_partitions_replaying.clone(),
        );
        registry.register(
            "cluster_rebuilds",
            "Aggregator: times it emptied its store and applied its partitions again from the stream's start",
            m.cluster_rebuilds.clone(),
        );
        registry.register(
            "cluster_delivery_gaps",
            "Aggregator: times a consumer found deliveries that never arrived and read again from its first part not acknowledged",
            m.cluster_delivery_gaps.clone(),
        );
        registry.register(
            "cluster_membership_failures",
            "Aggregator: renewals of its membership that failed, and rounds in which reading or changing the claims failed",
            m.cluster_membership_failures.clone(),
        );
        registry.register(
            "cluster_cohort_summaries",
            "Aggregator: cohort summaries (a partition's clients at one judgement) JetStream acknowledged",
            m.cluster_cohort_summaries.clone(),
        );
        registry.register(
            "cluster_cohort_summaries_retried",
            "Aggregator: cohort summaries published again after a failed or unanswered publish",
            m.cluster_cohort_summaries_retried.clone(),
        );
        registry.register(
            "cluster_invalid_summaries",
            "Aggregator holding the second stage: cohort summaries that break the protocol, dropped",
            m.cluster_invalid_summaries.clone(),
        );
        registry.register(
            "cluster_second_stage_waiting",
            "Aggregator holding the second stage: judgement times waiting for some partition's summary",
            m.cluster_second_stage_waiting.clone(),
        );
        registry.register(
            "shifted_batches",
            "Batches ahead of the collector's clock by more than the allowed skew, applied at the latest time allowed",
            m.shifted_batches.clone(),
        );
        registry.register(
            "unattributed_response_bytes",
            "Response bytes agents counted without a connection slot, in no client's totals",
            m.unattributed_response_bytes.clone(),
        );
        registry.register_with_unit(
            "ingest_lag",
            "Collector clock minus batch end_ms when the batch is applied",
            Unit::Seconds,
            m.ingest_lag.clone(),
        );
        registry.register_with_unit(
            "store_commit",
            "Duration of one write transaction of the store",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        registry.register(
            "commit_batches",
            "Batches per write transaction",
            m.commit_batches.clone(),
        );
        registry.register(
            "store_journal_bytes",
            "Bytes of journal entries committed (what each group commit adds to each key)",
            m.journal_bytes.clone(),
        );
        registry.register(
            "store_checkpoints",
            "Checkpoints: the rollups the journal touched written whole, the journal emptied",
            m.checkpoints.clone(),
        );
        registry.register_with_unit(
            "store_checkpoint",
            "Duration of one checkpoint's write transaction",
            Unit::Seconds,
            m.checkpoint_seconds.clone(),
        );
        registry.register(
            "store_failures",
            "Writes the store could not make (their batches refused, not applied)",
            m.store_failures.clone(),
        );
        registry.register("keys", "Keys held, by group", m.keys.clone());
        registry.register(
            "key_budget",
            "limits.max_keys: the most keys of addresses, peers, ids, prefixes and workloads held",
            m.key_budget.clone(),
        );
        registry.register(
            "budgeted_keys",
            "Keys held that count against limits.max_keys",
            m.budgeted_keys.clone(),
        );
        registry.register(
            "folded_keys",
            "New keys not made past the key budget, by kind (counted at a coarser level)",
            m.folded_keys.clone(),
        );
        registry.register(
            "folded_response_bytes",
            "Response bytes of folded keys, counted at the coarser level only, by kind",
            m.folded_bytes.clone(),
        );
        registry.register(
            "detect_tracks_evicted",
            "Learnt subjects dropped to keep the detectors within the key budget",
            m.tracks_evicted.clone(),
        );
        registry.register(
            "alerts_opened",
            "Alerts opened, by detector",
            m.alerts_opened.clone(),
        );
        registry.register(
            "alerts_resolved",
            "Alerts resolved, by detector",
            m.alerts_resolved.clone(),
        );
        registry.register(
            "alerts_open",
            "Alerts open now, by detector",
            m.alerts_open.clone(),
        );
        registry.register_with_unit(
            "detect",
            "One judgement of the detectors (every detect.eval_interval of batch time)",
            Unit::Seconds,
            m.detect_seconds.clone(),
        );
        registry.register(
            "detect_peer_ratio",
            "Peers' response/request ratio the sustained detector judges each subject kind against",
            m.detect_peer_ratio.clone(),
        );
        registry.register(
            "detect_peer_samples",
            "Active hours the peers' ratio of each subject kind was learnt from",
            m.detect_peer_samples.clone(),
        );
        registry.register(
            "cluster_peer_ratios_shared",
            "Aggregators whose peers' ratios this one judges against, itself included",
            m.cluster_peer_ratios_shared.clone(),
        );
        registry.register(
            "ready",
            "1 once the store is open and gRPC serves, 0 while starting and while stopping",
            m.ready.clone(),
        );
        Self { registry, ..m }
    }

    /// Adds metrics that are computed at each scrape (before the metrics are shared).
    pub fn register_collector(&mut self, c: Box<dyn prometheus_client::collector::Collector>) {
        self.registry.register_collector(c);
    }

    /// Marks the collector ready (the store open, gRPC serving) or not (starting, stopping):
    /// `/readyz` and `outflow_collector_ready`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Whether the collector is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// Counts a refused call.
    pub fn reject(&self, reason: &'static str) {
        self.rejects.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Sets the key gauges.
    pub fn set_keys(&self, group: &'static str, n: usize) {
        self.keys
            .get_or_create(&GroupLabel { group })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts keys folded past the key budget.
    pub fn folded(&self, folds: &crate::budget::Folds) {
        for kind in crate::budget::FoldKind::ALL {
            let i = kind.index();
            if folds.keys[i] > 0 {
                let l = FoldLabel { kind: kind.name() };
                self.folded_keys.get_or_create(&l).inc_by(folds.keys[i]);
                self.folded_bytes
                    .get_or_create(&l)
                    .inc_by(folds.response_bytes[i]);
            }
        }
    }

    /// Counts an opened alert.
    pub fn alerts_opened(&self, detector: &'static str) {
        self.alerts_opened
            .get_or_create(&DetectorLabel { detector })
            .inc();
    }

    /// Counts a resolved alert.
    pub fn alerts_resolved(&self, detector: &'static str) {
        self.alerts_resolved
            .get_or_create(&DetectorLabel { detector })
            .inc();
    }

    /// Moves the open-alerts gauge of a detector by `by`.
    pub fn alert_open_gauge(&self, detector: &'static str, by: i64) {
        self.alerts_open
            .get_or_create(&DetectorLabel { detector })
            .inc_by(by);
    }

    /// The metrics in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(4096);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            s = format!("# cannot encode metrics: {e}\n");
        }
        s
    }
}

impl outflow_metrics_http::Exposition for Metrics {
    fn openmetrics(&self) -> String {
        self.encode()
    }

    /// Ready once the store is open and gRPC serves; not before, and not while stopping.
    fn readiness(&self) -> Result<(), String> {
        if self.is_ready() {
            Ok(())
        } else {
            Err("the store is not open or gRPC is not serving (starting or stopping)".to_string())
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    more: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, outflow_metrics_http::router(metrics).merge(more))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let m = Metrics::new();
        m.reject("too_large");
        m.batches.inc();
        m.ingest_lag.observe(1.0);
        let text = m.encode();
        for name in [
            "outflow_collector_agents_connected ",
            "outflow_collector_batches_total 1",
            "outflow_collector_rejects_total{reason=\"too_large\"} 1",
            "outflow_collector_ingest_lag_seconds_count 1",
            "outflow_collector_store_commit_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} not in\n{text}");
        }
    }

    async fn status(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn readyz_follows_readiness_and_healthz_does_not() {
        let m = Arc::new(Metrics::new());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            m.clone(),
            axum::Router::new(),
            stop.clone(),
        ));
        assert_eq!(
            status(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        assert!(m.encode().contains("outflow_collector_ready 0"));
        m.set_ready(true);
        assert_eq!(status(addr, "/readyz").await, "HTTP/1.1 200 OK");
        assert!(m.encode().contains("outflow_collector_ready 1"));
        m.set_ready(false);
        assert_eq!(
            status(addr, "/readyz").await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert_eq!(status(addr, "/healthz").await, "HTTP/1.1 200 OK");
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
