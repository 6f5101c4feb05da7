//! The collector's configuration: a TOML file whose every field has a default, overridden by
//! flags (see `outflow-collector --help`), checked by [`Config::validate`].
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use outflow_proto::limits::MAX_DELTAS_PER_BATCH;
use serde::{Deserialize, Serialize};

/// Where the collector looks for its config file when `--config` is not given (used only if it
/// exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/outflow/collector.toml";
/// Default gRPC listen address: every interface, port 7411.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V6(Ipv6Addr::UNSPECIFIED), 7411);
/// Default Prometheus `/metrics` address: loopback only, port 9411.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9411);
/// Default data directory (holds `collector.redb`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/outflow-collector";

pub use crate::config_error::ConfigError;
use crate::{config_error::invalid, keys::Group, window::Window};

/// Everything the collector needs to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC address (Ingest, Query, health, reflection).
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint and of `/healthz` and `/readyz` (plain
    /// HTTP).
    pub metrics_listen: SocketAddr,
    /// Directory of the embedded database (`collector.redb`); created if missing.
    pub data_dir: PathBuf,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub metrics: MetricsConfig,
    /// Bulk-exfiltration detection (`[detect.*]`, see `detect`).
    pub detect: crate::detect::DetectConfig,
    /// Alert changes POSTed to a URL (`[webhook]`, see `sinks::webhook`).
    pub webhook: crate::sinks::webhook::WebhookConfig,
    /// Per-client aggregates and alert counts pushed as OTLP metrics (`[otlp]`, see
    /// `sinks::otlp`).
    pub otlp: OtlpConfig,
    /// The applied batches held for `outflow.v1.Feed` followers (`[feed]`, see `feed`).
    pub feed: crate::feed::FeedConfig,
    /// The node's role in a cluster on NATS JetStream (`[cluster]`, see `cluster::config`).
    pub cluster: crate::cluster::config::ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            metrics_listen: DEFAULT_METRICS_LISTEN,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            store: StoreConfig::default(),
            metrics: MetricsConfig::default(),
            detect: crate::detect::DetectConfig::default(),
            webhook: crate::sinks::webhook::WebhookConfig::default(),
            otlp: OtlpConfig::default(),
            feed: crate::feed::FeedConfig::default(),
            cluster: crate::cluster::config::ClusterConfig::default(),
        }
    }
}

/// Bearer-token authentication of agents and readers (see `auth`). Every file must be
/// readable by its owner only (mode 600 or 400).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// File of a line `AGENT_ID TOKEN` per agent: the token may ingest, only under that
    /// agent id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_tokens_file: Option<PathBuf>,
    /// File holding the read token (surrounding whitespace ignored): Query and Alerts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_token_file: Option<PathBuf>,
    /// File holding a shared token that may do everything, under any agent id (simple
    /// setups; prefer agent tokens and a read token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// TLS for the gRPC port, and client certificates (mTLS) when `client_ca` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the collector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s): Ingest and Query calls then need a client certificate signed by
    /// one of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: an Ingest stream may only send as an agent id that its client
    /// certificate names (the subject's common name or a DNS name of its subjectAltName).
    /// `false` lets any certificate of the CA send as any agent id (a fleet that shares one
    /// certificate).
    pub agent_id_from_cert: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            client_ca: None,
            agent_id_from_cert: true,
        }
    }
}

impl TlsConfig {
    /// Whether TLS is on (a certificate and key are configured).
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// Limits on what agents may send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted gRPC message, bytes.
    pub max_message_bytes: usize,
    /// Most deltas in one batch (at most the protocol's 100000).
    pub max_deltas_per_batch: usize,
    /// How far a batch's `end_ms` may be ahead of the collector's clock ("0s": no check); a
    /// batch further ahead is applied at the latest time allowed, and counted.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Per agent: sustained batches per second (0: unlimited).
    pub batches_per_second: f64,
    /// Per agent: batches that may arrive at once above the sustained rate.
    pub batch_burst: u64,
    /// Per agent: sustained deltas per second (0: unlimited).
    pub deltas_per_second: f64,
    /// Per agent: deltas that may arrive at once; at least `max_deltas_per_batch`.
    pub delta_burst: u64,
    /// Most keys held of client addresses, peers, client ids, /24 and /64 prefixes and
    /// workloads together: what bounds the collector's memory whatever the agents send. Past
    /// it a new key is folded, counted and logged: a new address is counted only in its
    /// prefix, a new prefix in a wider network (/16, /8, /0; /48, /32, /16, /0), a new
    /// workload in its host's `(folded)` one. Totals stay exact at the coarser level. The
    /// detectors learn at most as many subjects.
    pub max_keys: usize,
    /// The share of `max_keys`, in percent, that the keys one host serves may take: one agent
    /// cannot take the whole budget.
    pub max_keys_per_agent_percent: u8,
    /// Ingest streams open at once from one IP address, at most (an agent uses one).
    pub max_streams_per_peer: usize,
    /// How long a new Ingest stream may stay silent before its Hello.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
}

/// The default key budget: the collector's resident memory stays under 1 GiB whatever the
/// agents send (measured by `outflow-bench ingest` with 10 million distinct clients; see
/// BENCHMARKS.md).
pub const DEFAULT_MAX_KEYS: usize = 150_000;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            max_deltas_per_batch: MAX_DELTAS_PER_BATCH,
            max_clock_skew: Duration::from_secs(600),
            batches_per_second: 100.0,
            batch_burst: 1000,
            deltas_per_second: 1_000_000.0,
            delta_burst: 2_000_000,
            max_keys: DEFAULT_MAX_KEYS,
            max_keys_per_agent_percent: 50,
            max_streams_per_peer: 1024,
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// The embedded store and its group commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Make every commit durable (fsync) before acknowledging it. Off, commits reach the disk
    /// only at a clean stop: a crash of the collector or the machine loses acknowledged
    /// batches. For tests and benchmarks only.
    pub fsync: bool,
    /// Most batches (of all agents) applied in one write transaction.
    pub max_batches_per_commit: usize,
    /// How often rollups that left every window are dropped from memory and disk.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Memory the store caches its pages in, bytes. Queries read memory, not the store, so
    /// this only speeds up commits.
    pub cache_bytes: usize,
    /// A group commit writes what it added to each key to the store's journal; the rollups are
    /// written whole once the journal holds this many bytes (and at each `gc_interval`, and at
    /// a clean stop). More: fewer whole writes (each writes every key touched since the last),
    /// a longer replay when the collector starts after a crash.
    pub journal_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            fsync: true,
            max_batches_per_commit: 512,
            gc_interval: Duration::from_secs(60),
            cache_bytes: 64 << 20,
            journal_bytes: 256 << 20,
        }
    }
}

/// What `/metrics` shows beyond the collector's own counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// The client addresses with the most response bytes in `top_window`, as many as this
    /// (at most [`MAX_TOP_CLIENTS`]; 0: none), in
    /// `outflow_collector_top_client_response_bytes{rank, client}`: what `outflow-collector
    /// top -g client-address` shows, computed at each scrape.
    pub top_clients: usize,
    /// The window of those bytes: one the collector keeps (1m, 10m, 1h or 24h of batch time).
    #[serde(with = "humantime_serde")]
    pub top_window: Duration,
}

/// Most series of `outflow_collector_top_client_response_bytes`.
pub const MAX_TOP_CLIENTS: usize = 100;

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            top_clients: 10,
            top_window: Duration::from_secs(600),
        }
    }
}

impl MetricsConfig {
    /// The window `top_window` names.
    pub fn window(&self) -> Result<Window, ConfigError> {
        Window::of_length(self.top_window).ok_or_else(|| {
            invalid(
                "metrics.top_window",
                format!(
                    "must be a window the collector keeps: 1m, 10m, 1h or 24h (got {})",
                    humantime::format_duration(self.top_window)
                ),
            )
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.top_clients > MAX_TOP_CLIENTS {
            return Err(invalid(
                "metrics.top_clients",
                format!(
                    "must be between 0 and {MAX_TOP_CLIENTS} (got {})",
                    self.top_clients
                ),
            ));
        }
        self.window().map(|_| ())
    }
}

/// `[otlp]`: OpenTelemetry metrics pushed over OTLP/gRPC (to an OpenTelemetry Collector, or
/// any OTLP receiver) every `interval`: the biggest clients of each group in `groups` with
/// their bytes in `window`, and the alerts open and opened by detector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// The receiver's OTLP/gRPC address, `http://host:4317` or `https://...`; none: no export.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// File holding the `authorization` metadata value (`Bearer ...`, `Basic ...`), private to
    /// the collector's user (mode 600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_header_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify an https receiver with, instead of the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// How often to push (at least 100ms); a push that fails is counted and the next one
    /// carries the values of its time: gauges and cumulative sums lose nothing by a miss.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long one push may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Keys of each group with the most response bytes in `window` that are pushed (1 to
    /// [`MAX_OTLP_CLIENTS`]).
    pub top_clients: usize,
    /// The window of those bytes: 1m, 10m, 1h or 24h of batch time.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// The groups whose top keys are pushed: `client-address`, `client-prefix`, `client-id`,
    /// `peer`, `host`, `workload`.
    pub groups: Vec<String>,
}

/// Most keys per group an OTLP push carries.
pub const MAX_OTLP_CLIENTS: usize = 1000;

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            auth_header_file: None,
            tls_ca: None,
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            top_clients: 20,
            window: Duration::from_secs(600),
            groups: vec!["client-address".to_owned(), "client-id".to_owned()],
        }
    }
}

impl OtlpConfig {
    /// The window `window` names.
    pub fn window(&self) -> Result<Window, ConfigError> {
        Window::of_length(self.window).ok_or_else(|| {
            invalid(
                "otlp.window",
                format!(
                    "must be a window the collector keeps: 1m, 10m, 1h or 24h (got {})",
                    humantime::format_duration(self.window)
                ),
            )
        })
    }

    /// The groups `groups` names, in its order.
    pub fn groups(&self) -> Result<Vec<Group>, ConfigError> {
        self.groups
            .iter()
            .map(|name| {
                Group::ALL
                    .into_iter()
                    .find(|g| g.name() == name)
                    .ok_or_else(|| {
                        invalid(
                            "otlp.groups",
                            format!(
                                "unknown group {name:?}: want client-address, client-prefix, \
                                 client-id, peer, host or workload"
                            ),
                        )
                    })
            })
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(e) = &self.endpoint {
            parse_endpoint(e).map_err(|m| invalid("otlp.endpoint", m))?;
        }
        if self.interval < Duration::from_millis(100) {
            return Err(invalid(
                "otlp.interval",
                format!(
                    "must be at least 100ms (got {})",
                    humantime::format_duration(self.interval)
                ),
            ));
        }
        if self.timeout < Duration::from_millis(100) {
            return Err(invalid(
                "otlp.timeout",
                format!(
                    "must be at least 100ms (got {})",
                    humantime::format_duration(self.timeout)
                ),
            ));
        }
        if !(1..=MAX_OTLP_CLIENTS).contains(&self.top_clients) {
            return Err(invalid(
                "otlp.top_clients",
                format!(
                    "must be between 1 and {MAX_OTLP_CLIENTS} (got {})",
                    self.top_clients
                ),
            ));
        }
        self.window()?;
        self.groups().map(|_| ())
    }
}

/// Checks an OTLP endpoint: `http://` or `https://` with a host, and at most a `/` path
/// (OTLP/gRPC's path is the service's).
pub fn parse_endpoint(endpoint: &str) -> Result<tonic::codegen::http::Uri, String> {
    let uri: tonic::codegen::http::Uri =
        endpoint.parse().map_err(|e| format!("{endpoint:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "{endpoint:?}: want http://host:port or https://host:port (OTLP over gRPC)"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?}: no host"));
    }
    if !matches!(uri.path(), "" | "/") {
        return Err(format!(
            "{endpoint:?}: no path (OTLP/gRPC's is the service's; the HTTP receiver's /v1/metrics is not supported)"
        ));
    }
    Ok(uri)
}

impl Config {
    /// Reads `path`. A missing file is an error only if `explicit` (given with `--config`);
    /// otherwise the defaults are used.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(error) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                error,
            }),
        }
    }

    /// Parses TOML text (`path` only names the file in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }

    /// Checks the values together; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self.listen == self.metrics_listen && self.listen.port() != 0 {
            return Err(invalid(
                "metrics_listen",
                format!("same address as `listen` ({})", self.listen),
            ));
        }
        for (field, p) in [
            ("auth.token_file", &self.auth.token_file),
            ("auth.read_token_file", &self.auth.read_token_file),
            ("auth.agent_tokens_file", &self.auth.agent_tokens_file),
        ] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(invalid(field, "must not be empty"));
            }
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return Err(invalid("tls.key", "required with tls.cert")),
            (None, Some(_)) => return Err(invalid("tls.cert", "required with tls.key")),
            _ => {}
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return Err(invalid(
                "tls.client_ca",
                "client certificates need TLS: set tls.cert and tls.key too",
            ));
        }
        let l = &self.limits;
        if !(4096..=1 << 30).contains(&l.max_message_bytes) {
            return Err(invalid(
                "limits.max_message_bytes",
                format!(
                    "must be between 4096 and 1073741824 (got {})",
                    l.max_message_bytes
                ),
            ));
        }
        if !(1..=MAX_DELTAS_PER_BATCH).contains(&l.max_deltas_per_batch) {
            return Err(invalid(
                "limits.max_deltas_per_batch",
                format!(
                    "must be between 1 and {MAX_DELTAS_PER_BATCH} (got {})",
                    l.max_deltas_per_batch
                ),
            ));
        }
        for (field, rate) in [
            ("limits.batches_per_second", l.batches_per_second),
            ("limits.deltas_per_second", l.deltas_per_second),
        ] {
            if !rate.is_finite() || rate < 0.0 {
                return Err(invalid(
                    field,
                    format!("must be a number >= 0 (got {rate})"),
                ));
            }
        }
        if l.batches_per_second > 0.0 && l.batch_burst == 0 {
            return Err(invalid("limits.batch_burst", "must be at least 1"));
        }
        if l.deltas_per_second > 0.0 && l.delta_burst < l.max_deltas_per_batch as u64 {
            return Err(invalid(
                "limits.delta_burst",
                format!(
                    "must be at least limits.max_deltas_per_batch ({}), or no full batch could pass (got {})",
                    l.max_deltas_per_batch, l.delta_burst
                ),
            ));
        }
        if !(1_000..=1 << 32).contains(&l.max_keys) {
            return Err(invalid(
                "limits.max_keys",
                format!("must be between 1000 and 4294967296 (got {})", l.max_keys),
            ));
        }
        if !(1..=100).contains(&l.max_keys_per_agent_percent) {
            return Err(invalid(
                "limits.max_keys_per_agent_percent",
                format!(
                    "must be between 1 and 100 (got {})",
                    l.max_keys_per_agent_percent
                ),
            ));
        }
        if l.max_streams_per_peer == 0 {
            return Err(invalid("limits.max_streams_per_peer", "must be at least 1"));
        }
        if l.hello_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "limits.hello_timeout",
                format!("must be at least 100ms (got {:?})", l.hello_timeout),
            ));
        }
        if self.store.cache_bytes < 1 << 20 {
            return Err(invalid(
                "store.cache_bytes",
                format!("must be at least 1048576 (got {})", self.store.cache_bytes),
            ));
        }
        if self.store.max_batches_per_commit == 0 {
            return Err(invalid(
                "store.max_batches_per_commit",
                "must be at least 1",
            ));
        }
        self.metrics.validate()?;
        self.detect.validate()?;
        self.webhook.validate()?;
        self.otlp.validate()?;
        self.feed.validate()?;
        self.cluster.validate()?;
        self.validate_wide_in_partitions()?;
        if self.store.gc_interval < Duration::from_secs(1) {
            return Err(invalid(
                "store.gc_interval",
                format!(
                    "must be at least 1s (got {})",
                    humantime::format_duration(self.store.gc_interval)
                ),
            ));
        }
        Ok(())
    }

    /// An aggregator judges the wide prefixes of its partitions: none may be wider than what
    /// goes to one partition, or the cluster would judge a share of it.
    fn validate_wide_in_partitions(&self) -> Result<(), ConfigError> {
        use crate::cluster::{
            config::NodeRole,
            partition::{PARTITION_PREFIX_V4, PARTITION_PREFIX_V6},
        };
        if self.cluster.role != NodeRole::Aggregator {
            return Ok(());
        }
        let c = &self.detect.coordinated;
        for (field, list, widest) in [
            (
                "detect.coordinated.ipv4_wide",
                &c.ipv4_wide,
                PARTITION_PREFIX_V4,
            ),
            (
                "detect.coordinated.ipv6_wide",
                &c.ipv6_wide,
                PARTITION_PREFIX_V6,
            ),
        ] {
            if let Some(w) = list.iter().find(|w| w.prefix_len < widest) {
                return Err(invalid(
                    field,
                    format!(
                        "prefix_len {} is wider than the /{widest} a cluster partition holds: an aggregator would judge a share of it; use {widest} or more in cluster.role = \"aggregator\"",
                        w.prefix_len
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, as `outflow-collector print-config` shows it.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let back = Config::parse(Path::new("x"), &c.to_toml()).unwrap();
        assert_eq!(back, c);
        assert!(
            c.to_toml().contains("listen = \"[::]:7411\""),
            "{}",
            c.to_toml()
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = Config::parse(Path::new("c.toml"), "lissen = \"[::]:1\"").unwrap_err();
        assert!(e.to_string().contains("lissen"), "{e}");
        let e = Config::parse(Path::new("c.toml"), "[tls]\ncertificate = \"x\"").unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
    }

    #[test]
    fn the_readmes_config_is_valid_and_says_the_default_limits() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("```toml\nlisten = ")
            .expect("the config example")
            + 8;
        let len = readme[start..].find("```").expect("its end");
        let c = Config::parse(Path::new("README.md"), &readme[start..start + len]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.store, StoreConfig::default());
        assert_eq!(c.metrics, MetricsConfig::default());
    }

    #[test]
    fn the_readmes_detection_config_is_valid_and_says_the_defaults() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("```toml\n[detect]\n")
            .expect("the [detect] example")
            + 8;
        let len = readme[start..].find("```").expect("its end");
        let text = &readme[start..start + len];
        let c = Config::parse(Path::new("README.md"), text).unwrap();
        c.validate().unwrap();
        // Every default it states is the default (the example's own lists aside).
        let d = crate::detect::DetectConfig::default();
        let mut stated = c.detect.clone();
        stated.volume.overrides.clear();
        stated.allowlist = d.allowlist.clone();
        assert_eq!(stated, d);
    }

    #[test]
    fn the_old_webhook_section_says_where_it_moved() {
        let c = Config::parse(
            Path::new("c.toml"),
            "[detect.webhook]\nurl = \"http://x/\"\n",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("`detect.webhook`") && e.contains("[webhook]"),
            "{e}"
        );
        let c = Config::parse(Path::new("c.toml"), "[webhook]\nurl = \"http://x/\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.webhook.url.as_deref(), Some("http://x/"));
    }

    #[test]
    fn validate_names_the_field() {
        let check = |f: &dyn Fn(&mut Config), field: &str| {
            let mut c = Config::default();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{e}");
        };
        check(&|c| c.tls.cert = Some("c".into()), "tls.key");
        check(
            &|c| {
                c.cluster.role = crate::cluster::config::NodeRole::Aggregator;
                c.cluster.nats_urls = vec!["nats://127.0.0.1:4222".into()];
                c.detect.coordinated.ipv4_wide[1].prefix_len = 12;
            },
            "detect.coordinated.ipv4_wide",
        );
        check(&|c| c.tls.client_ca = Some("ca".into()), "tls.client_ca");
        check(
            &|c| c.limits.max_deltas_per_batch = 100_001,
            "limits.max_deltas_per_batch",
        );
        check(&|c| c.limits.delta_burst = 10, "limits.delta_burst");
        check(
            &|c| c.limits.deltas_per_second = f64::NAN,
            "limits.deltas_per_second",
        );
        check(
            &|c| c.limits.max_message_bytes = 10,
            "limits.max_message_bytes",
        );
        check(
            &|c| c.store.max_batches_per_commit = 0,
            "store.max_batches_per_commit",
        );
        check(&|c| c.metrics_listen = c.listen, "metrics_listen");
        check(&|c| c.metrics.top_clients = 101, "metrics.top_clients");
        check(
            &|c| c.metrics.top_window = Duration::from_secs(300),
            "metrics.top_window",
        );
        check(
            &|c| c.otlp.endpoint = Some("otel:4317".into()),
            "otlp.endpoint",
        );
        check(
            &|c| c.otlp.interval = Duration::from_millis(10),
            "otlp.interval",
        );
        check(&|c| c.otlp.top_clients = 0, "otlp.top_clients");
        check(&|c| c.otlp.groups = vec!["clients".into()], "otlp.groups");
        check(&|c| c.otlp.window = Duration::from_secs(120), "otlp.window");
    }

    #[test]
    fn the_otlp_section() {
        let c = Config::parse(
            Path::new("c.toml"),
            "[otlp]\nendpoint = \"https://otel.example:4317\"\ninterval = \"15s\"\ngroups = [\"peer\", \"client-prefix\"]\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.otlp.groups().unwrap(), [Group::Peer, Group::ClientPrefix]);
        assert_eq!(c.otlp.interval, Duration::from_secs(15));
        assert_eq!(c.otlp.window().unwrap(), Window::M10);
        // Off by default; print-config shows the settings an endpoint would use.
        let d = Config::default();
        assert_eq!(d.otlp.endpoint, None);
        assert!(d.to_toml().contains(
            "[otlp]\ninterval = \"1m\"\ntimeout = \"10s\"\ntop_clients = 20\nwindow = \"10m\"\ngroups = [\"client-address\", \"client-id\"]"
        ), "{}", d.to_toml());
    }

    #[test]
    fn the_metrics_section() {
        let c = Config::parse(
            Path::new("c.toml"),
            "[metrics]\ntop_clients = 0\ntop_window = \"1h\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.metrics.window().unwrap(), Window::H1);
        assert_eq!(c.metrics.top_clients, 0);
        assert!(
            Config::default()
                .to_toml()
                .contains("[metrics]\ntop_clients = 10\ntop_window = \"10m\"")
        );
        let e = Config::parse(Path::new("c.toml"), "[metrics]\ntop_window = \"5m\"\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("1m, 10m, 1h or 24h (got 5m)"), "{e}");
    }

    #[test]
    fn partial_file_keeps_defaults() {
        let c = Config::parse(
            Path::new("c.toml"),
            "listen = \"127.0.0.1:1\"\n[limits]\nbatches_per_second = 5\n",
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(c.limits.batches_per_second, 5.0);
        assert_eq!(c.limits.max_deltas_per_batch, MAX_DELTAS_PER_BATCH);
        assert_eq!(c.data_dir, Path::new(DEFAULT_DATA_DIR));
    }
}
