//! The agent's configuration: a TOML file whose every field has a default, overridden by flags.
//!
//! The agent re-exports this crate as `outflow_agent::config`. It is a crate of its own, without
//! the agent's eBPF build and gRPC stack, so that its fuzz target (`agent-config/fuzz/`) builds
//! in seconds: [`Config::parse`] and [`Config::validate`] read text the operator writes.
// The fuzz targets run without AddressSanitizer (xtask/src/fuzz.rs): that holds while this
// crate has no unsafe code.
#![forbid(unsafe_code)]
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Default address of the metrics and health endpoint: loopback only, port 9410 (the
/// collector's is 9411).
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9410));

/// Where the agent looks for its config file when `--config` is not given (used only if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/outflow/agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("config field {0}")]
    Attribution(#[from] outflow_attribution::ConfigError),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// One JSON object per line on stdout.
    Json,
    /// One human-readable line per record on stdout.
    #[default]
    Text,
    /// Nothing on stdout (logs only).
    None,
}

/// Which connections are reported. Connections filtered out are still tracked (and freed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    /// Report only connections whose local port is one of these (empty: all).
    pub local_ports: Vec<u16>,
    /// Report only connections whose remote address is in one of these networks (empty: all).
    pub remote_cidrs: Vec<IpNet>,
    /// Count and report connections whose remote address is loopback (off by default).
    pub include_loopback: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// cgroup v2 directory to attach to; all sockets in it and below are counted.
    /// Default: the root of the cgroup2 mount.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// How often the connection table is read and deltas emitted.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Format of the records on stdout.
    pub output: OutputFormat,
    /// bpffs directory where kernel state is pinned so that a restarted agent adopts it.
    pub pin_dir: PathBuf,
    /// Capacity of the kernel connection table (live connections tracked one by one; beyond it,
    /// bytes are still counted, in the overflow counters), rounded up to a multiple of 8. Keep
    /// it at about twice the peak of live connections: a slot is placed in a group chosen by a
    /// hash of the socket's address, and a connection whose group is full takes the slower way
    /// (`placed_away` in the stats record). Fixed when the state is first pinned.
    pub max_connections: u32,
    /// Address of the HTTP endpoint: Prometheus metrics at `/metrics`, liveness at `/healthz`,
    /// readiness at `/readyz` (ready once the kernel programs are attached). Port 0 picks a
    /// free port (the `started` record says which).
    pub metrics_listen: SocketAddr,
    pub filter: FilterConfig,
    pub export: ExportConfig,
    /// Who the client is behind balancers and gateways (PROXY protocol, request headers,
    /// annotations).
    pub attribution: outflow_attribution::Settings,
}

/// TLS towards the collector (only with an `https://` collector).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) that signed the collector's certificate
    /// (default: the system's trusted roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// PEM file of the agent's client certificate (mutual TLS; needs `key`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// Name to send as SNI and to verify the collector's certificate against
    /// (default: the host of the collector URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

impl TlsConfig {
    pub const fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some()
    }
}

/// Streaming the deltas to a collector over gRPC, through a disk spool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// gRPC URL of the collector, `http://host:port` or `https://host:port` (unset: no export).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collector: Option<String>,
    /// File holding the bearer token sent as `authorization: Bearer <token>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Directory of the batches not yet acknowledged by the collector.
    pub spool_dir: PathBuf,
    /// Bound of the spool; when full, the oldest batches are dropped (and reported as lost).
    pub spool_max_bytes: u64,
    /// Directory of the agent's identity (`agent-id`) and sequence epoch (`epoch`).
    pub state_dir: PathBuf,
    pub tls: TlsConfig,
    /// Operator-defined labels sent to the collector (region, cluster, ...).
    pub labels: BTreeMap<String, String>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            collector: None,
            token_file: None,
            spool_dir: PathBuf::from("/var/lib/outflow/spool"),
            spool_max_bytes: 256 << 20,
            state_dir: PathBuf::from("/var/lib/outflow"),
            tls: TlsConfig::default(),
            labels: BTreeMap::new(),
        }
    }
}

pub const MIN_SPOOL_BYTES: u64 = 1 << 20;
/// Limits of the protocol's `Hello.labels`.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_LEN: usize = 128;

/// Parses and checks a collector URL: `http` or `https`, a host, nothing after the authority
/// but an optional `/`.
pub fn parse_collector_url(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}): {url:?}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "scheme must be http or https (got {other:?} in {url:?})"
            ));
        }
        None => return Err(format!("needs http:// or https:// (got {url:?})")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("has no host: {url:?}"));
    }
    let authority = uri.authority().map_or("", |a| a.as_str());
    let after_host = authority.rsplit_once(']').map_or(authority, |(_, r)| r);
    if let Some((_, port)) = after_host.rsplit_once(':')
        && port.parse::<u16>().is_err()
    {
        return Err(format!("bad port {port:?} in {url:?}"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!(
            "must not have a path (got {url:?}; give scheme://host:port)"
        ));
    }
    Ok(uri)
}

impl ExportConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        let https = match &self.collector {
            Some(url) => {
                parse_collector_url(url)
                    .map_err(|m| invalid("export.collector", m))?
                    .scheme_str()
                    == Some("https")
            }
            None => false,
        };
        for (field, dir) in [
            ("export.spool_dir", &self.spool_dir),
            ("export.state_dir", &self.state_dir),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(
                    field,
                    format!("must be an absolute path (got {})", dir.display()),
                ));
            }
        }
        if self.spool_max_bytes < MIN_SPOOL_BYTES {
            return Err(invalid(
                "export.spool_max_bytes",
                format!(
                    "must be at least {MIN_SPOOL_BYTES} (1 MiB) (got {})",
                    self.spool_max_bytes
                ),
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            let field = if self.tls.cert.is_some() {
                "export.tls.key"
            } else {
                "export.tls.cert"
            };
            return Err(invalid(
                field,
                "a client certificate needs both `cert` and `key`".into(),
            ));
        }
        if self.tls.domain.as_deref() == Some("") {
            return Err(invalid("export.tls.domain", "must not be empty".into()));
        }
        if self.tls.is_set() && !https {
            return Err(invalid(
                "export.tls",
                "TLS settings need an https:// collector URL".into(),
            ));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(invalid(
                "export.labels",
                format!("at most {MAX_LABELS} labels (got {})", self.labels.len()),
            ));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.chars().count() > MAX_LABEL_LEN {
                return Err(invalid(
                    "export.labels",
                    format!("a key must have 1 to {MAX_LABEL_LEN} characters (got {k:?})"),
                ));
            }
            if v.chars().count() > MAX_LABEL_LEN {
                return Err(invalid(
                    "export.labels",
                    format!("the value of {k:?} has more than {MAX_LABEL_LEN} characters"),
                ));
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cgroup: None,
            interval: Duration::from_secs(1),
            output: OutputFormat::Text,
            pin_dir: PathBuf::from("/sys/fs/bpf/outflow"),
            max_connections: 65_536,
            metrics_listen: DEFAULT_METRICS_LISTEN,
            filter: FilterConfig::default(),
            export: ExportConfig::default(),
            attribution: outflow_attribution::Settings::default(),
        }
    }
}

/// The line number of byte `pos` of a TOML text and the dotted name of the key set on it.
fn field_at(text: &str, pos: usize) -> (usize, Option<String>) {
    let before = &text[..pos.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.is_empty());
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let field = match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        _ => None,
    };
    (line_no, field)
}

pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
pub const MIN_CONNECTIONS: u32 = 16;
pub const MAX_CONNECTIONS: u32 = 1 << 24;

impl Config {
    /// Reads `path`; with `explicit` false a missing file means the defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })
    }

    /// Parses TOML text; the error is one line that names the field and its line.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let msg = e.message().trim().replace('\n', " ");
            match e.span().map(|s| field_at(text, s.start)) {
                Some((line, Some(field))) => format!("field `{field}` (line {line}): {msg}"),
                Some((line, None)) => format!("line {line}: {msg}"),
                None => msg,
            }
        })
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval < MIN_INTERVAL || self.interval > MAX_INTERVAL {
            return Err(ConfigError::Invalid {
                field: "interval",
                message: format!(
                    "must be between {} and {} (got {})",
                    humantime::format_duration(MIN_INTERVAL),
                    humantime::format_duration(MAX_INTERVAL),
                    humantime::format_duration(self.interval)
                ),
            });
        }
        if !(MIN_CONNECTIONS..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(ConfigError::Invalid {
                field: "max_connections",
                message: format!(
                    "must be between {MIN_CONNECTIONS} and {MAX_CONNECTIONS} (got {})",
                    self.max_connections
                ),
            });
        }
        if !self.pin_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "pin_dir",
                message: format!("must be an absolute path (got {})", self.pin_dir.display()),
            });
        }
        if let Some(cg) = &self.cgroup
            && !cg.is_absolute()
        {
            return Err(ConfigError::Invalid {
                field: "cgroup",
                message: format!("must be an absolute path (got {})", cg.display()),
            });
        }
        if self.filter.local_ports.contains(&0) {
            return Err(ConfigError::Invalid {
                field: "filter.local_ports",
                message: "port 0 is not a port".into(),
            });
        }
        self.attribution.validate()?;
        self.export.validate()
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().expect("defaults valid");
        let back = Config::parse(&c.to_toml()).expect("round trip");
        assert_eq!(back, c);
    }

    #[test]
    fn a_full_file_parses() {
        let c = Config::parse(
            r#"
            cgroup = "/sys/fs/cgroup/inference"
            interval = "500ms"
            output = "json"
            max_connections = 1024
            [filter]
            local_ports = [8000, 443]
            remote_cidrs = ["10.0.0.0/8", "2001:db8::/32"]
            include_loopback = true
            "#,
        )
        .expect("parses");
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(c.output, OutputFormat::Json);
        assert_eq!(c.filter.local_ports, vec![8000, 443]);
        assert_eq!(c.filter.remote_cidrs.len(), 2);
        c.validate().expect("valid");
    }

    #[test]
    fn bad_fields_are_named() {
        let e = Config::parse("max_connections = \"many\"").expect_err("bad type");
        assert!(e.contains("`max_connections` (line 1)"), "{e}");
        let e = Config::parse("intreval = \"1s\"").expect_err("unknown field");
        assert!(e.contains("intreval"), "{e}");
        let e = Config::parse("[filter]\nremote_cidrs = [\"10.0.0.0/33\"]").expect_err("bad cidr");
        assert!(e.contains("`filter.remote_cidrs` (line 2)"), "{e}");
        let c = Config {
            interval: Duration::from_millis(1),
            ..Config::default()
        };
        let e = c.validate().expect_err("too short").to_string();
        assert!(e.contains("`interval`"), "{e}");
        let c = Config {
            max_connections: 1,
            ..Config::default()
        };
        assert!(
            c.validate()
                .expect_err("too small")
                .to_string()
                .contains("`max_connections`")
        );
    }

    #[test]
    fn an_export_section_parses() {
        let c = Config::parse(
            r#"
            [export]
            collector = "https://collector.internal:4317"
            token_file = "/etc/outflow/token"
            spool_dir = "/srv/outflow/spool"
            spool_max_bytes = 67108864
            state_dir = "/srv/outflow"
            [export.tls]
            ca = "/etc/outflow/ca.pem"
            cert = "/etc/outflow/agent.pem"
            key = "/etc/outflow/agent.key"
            domain = "collector.internal"
            [export.labels]
            region = "eu-west"
            cluster = "inference-a"
            "#,
        )
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.export.spool_max_bytes, 64 << 20);
        assert_eq!(c.export.labels.len(), 2);
        assert_eq!(c.export.tls.domain.as_deref(), Some("collector.internal"));
        assert_eq!(Config::parse(&c.to_toml()).expect("round trip"), c);
        let e = Config::parse("[export]\ncolector = \"http://x:1\"").expect_err("typo");
        assert!(e.contains("colector"), "{e}");
        let e = Config::parse("[export.tls]\nkey = 3").expect_err("bad type");
        assert!(e.contains("`export.tls.key`"), "{e}");
    }

    /// The fuzz target's seeds (the README's examples among them) are valid configs, so that
    /// fuzzing starts deep inside the parser and the validation.
    #[test]
    fn the_fuzz_seeds_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/agent-config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("seeds folder") {
            let path = entry.expect("seed").path();
            let text = std::fs::read_to_string(&path).expect("seed text");
            let c = Config::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            c.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert!(n >= 4, "{n} seeds in {}", dir.display());
    }

    fn export_error(f: impl FnOnce(&mut ExportConfig)) -> String {
        let mut c = Config::default();
        c.export.collector = Some("https://collector:4317".into());
        f(&mut c.export);
        c.validate().expect_err("invalid").to_string()
    }

    #[test]
    fn bad_export_fields_are_named() {
        for (url, why) in [
            ("collector:4317", "http"),
            ("ftp://collector:4317", "scheme"),
            ("http://", "URL"),
            ("http://collector:4317/ingest", "path"),
            ("http://collector:notaport", "port"),
            ("http://collector:99999", "port"),
        ] {
            let e = export_error(|e| e.collector = Some(url.into()));
            assert!(
                e.contains("`export.collector`") && e.contains(why),
                "{url}: {e}"
            );
        }
        assert!(parse_collector_url("http://[::1]:4317").is_ok());
        assert!(parse_collector_url("https://collector.internal:4317/").is_ok());

        let e = export_error(|e| e.spool_max_bytes = 1000);
        assert!(e.contains("`export.spool_max_bytes`"), "{e}");
        let e = export_error(|e| e.spool_dir = "spool".into());
        assert!(e.contains("`export.spool_dir`"), "{e}");
        let e = export_error(|e| e.state_dir = "state".into());
        assert!(e.contains("`export.state_dir`"), "{e}");
        let e = export_error(|e| e.tls.cert = Some("/c.pem".into()));
        assert!(e.contains("`export.tls.key`"), "{e}");
        let e = export_error(|e| e.tls.key = Some("/k.pem".into()));
        assert!(e.contains("`export.tls.cert`"), "{e}");
        let e = export_error(|e| {
            e.collector = Some("http://collector:4317".into());
            e.tls.ca = Some("/ca.pem".into());
        });
        assert!(e.contains("`export.tls`") && e.contains("https"), "{e}");
        let e = export_error(|e| {
            e.labels.insert(String::new(), "v".into());
        });
        assert!(e.contains("`export.labels`"), "{e}");
        let e = export_error(|e| {
            e.labels.insert("k".into(), "v".repeat(129));
        });
        assert!(e.contains("`export.labels`"), "{e}");
        let e = export_error(|e| {
            for i in 0..33 {
                e.labels.insert(format!("k{i}"), "v".into());
            }
        });
        assert!(e.contains("at most 32"), "{e}");
    }
}
