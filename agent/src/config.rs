//! The agent's configuration: a TOML file whose every field has a default, overridden by flags.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

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
    /// bytes are still counted, in the overflow counters). Fixed when the state is first pinned.
    pub max_connections: u32,
    pub filter: FilterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cgroup: None,
            interval: Duration::from_secs(1),
            output: OutputFormat::Text,
            pin_dir: PathBuf::from("/sys/fs/bpf/outflow"),
            max_connections: 65_536,
            filter: FilterConfig::default(),
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
        Ok(())
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
}
