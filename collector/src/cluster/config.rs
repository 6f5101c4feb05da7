//! `[cluster]`: the node's role, and the NATS JetStream cluster it works through.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{nats::NatsConnect, partition::MAX_PARTITIONS, publish::PublishConfig};
use crate::config_error::{ConfigError, invalid};

/// What this collector process does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// The whole collector in one process, with its own store (the default).
    #[default]
    Standalone,
    /// Takes agents' streams, validates them, and publishes each batch's parts to JetStream;
    /// acknowledges a batch once JetStream stored every part. Holds no store; answers Query
    /// and Alerts for the whole cluster by asking the aggregators.
    Ingest,
    /// Claims a fair share of the partitions (shared with the other live aggregators, taken
    /// over from one that is gone), applies their parts to its own store, detects on them and
    /// answers the other nodes' questions about them (`outflow.v1.AggregatorQuery`).
    Aggregator,
}

impl NodeRole {
    /// The role's name, as in the config file and `--role`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Standalone => "standalone",
            NodeRole::Ingest => "ingest",
            NodeRole::Aggregator => "aggregator",
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub role: NodeRole,
    /// NATS servers of the JetStream cluster (`nats://host:port`); any of them.
    pub nats_urls: Vec<String>,
    /// The stream the parts go to (created with the settings below if missing).
    pub stream: String,
    /// Parts are published to `<subject_prefix>.<partition>`.
    pub subject_prefix: String,
    /// How many partitions the clients are spread over: fixed for the life of the stream
    /// (stored progress is per partition).
    pub partitions: u32,
    /// Copies JetStream keeps of each part: 1, 3 or 5 (a majority stores a part before it is
    /// acknowledged).
    pub replicas: usize,
    /// A part published again within this time is acknowledged without being stored again.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Parts older than this leave the stream.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// A part unanswered this long is published again (with its id).
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// A batch whose parts are not all acknowledged in this time is refused with UNAVAILABLE
    /// (its agent sends it again).
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// This aggregator's name among the aggregators (its claims and consumers are named
    /// after it): unique and the same across restarts. Empty: the host name.
    pub node_name: String,
    /// An aggregator that has not renewed its membership for this long is gone: the others
    /// take its partitions over.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Where the other nodes reach this aggregator's gRPC (`host:port`), to fan a Query or
    /// Alerts call out. Empty: the bound `listen` address, or `<node name>:<port>` when
    /// `listen` is a wildcard address (0.0.0.0, [::]).
    pub advertise: String,
    /// PEM CA certificates that sign the aggregators' TLS certificates, trusted when a node
    /// fans a call out to them (with `tls.cert` set, fan-out uses TLS and presents `tls.cert`
    /// as its client certificate). Unset: the system's roots.
    pub peer_ca: Option<std::path::PathBuf>,
    /// How long a fanned-out call waits for each aggregator.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// How often the node pings its NATS server: after two pings unanswered it takes the
    /// connection as dead and connects to another server of `nats_urls`, so a server cut off
    /// from the network is left within about three intervals.
    #[serde(with = "humantime_serde")]
    pub nats_ping_interval: Duration,
    /// The NATS user this node authenticates as (with `nats_password_file`). Empty: none.
    pub nats_user: String,
    /// A file whose first line is `nats_user`'s password.
    pub nats_password_file: Option<std::path::PathBuf>,
    /// A file whose first line is the token this node authenticates with (instead of a user).
    pub nats_token_file: Option<std::path::PathBuf>,
    /// A file holding this node's NKey user seed (`SU...`, as `nk -gen user` writes it), for
    /// servers that list the user's public key (`authorization { users = [ { nkey: U... } ] }`)
    /// instead of a user and password or a token.
    pub nats_nkey_file: Option<std::path::PathBuf>,
    /// A NATS credentials file (`.creds`: a user's JWT and its NKey seed, as `nsc generate
    /// creds` writes it), for servers in operator mode (decentralized JWT authentication),
    /// where the user, its account and its permissions are JWTs signed by the operator.
    pub nats_creds_file: Option<std::path::PathBuf>,
    /// PEM CA certificates that sign the NATS servers' certificates. Set: TLS is required.
    /// Unset: TLS only with `tls://` URLs (or servers that require it), against the system's
    /// roots.
    pub nats_ca: Option<std::path::PathBuf>,
    /// This node's certificate chain and key (PEM), for NATS servers that verify their
    /// clients (`tls { verify: true }`). Set: TLS is required.
    pub nats_cert: Option<std::path::PathBuf>,
    pub nats_key: Option<std::path::PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            role: NodeRole::Standalone,
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            stream: "OUTFLOW_PARTS".into(),
            subject_prefix: "outflow.parts".into(),
            partitions: 64,
            replicas: 3,
            duplicate_window: Duration::from_secs(600),
            max_age: Duration::from_secs(7 * 24 * 3600),
            ack_timeout: Duration::from_secs(2),
            publish_timeout: Duration::from_secs(30),
            node_name: String::new(),
            lease: Duration::from_secs(10),
            advertise: String::new(),
            peer_ca: None,
            query_timeout: Duration::from_secs(10),
            nats_ping_interval: Duration::from_secs(10),
            nats_user: String::new(),
            nats_password_file: None,
            nats_token_file: None,
            nats_nkey_file: None,
            nats_creds_file: None,
            nats_ca: None,
            nats_cert: None,
            nats_key: None,
        }
    }
}

impl ClusterConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.role == NodeRole::Standalone {
            return Ok(());
        }
        if self.nats_urls.is_empty() || self.nats_urls.iter().any(|u| u.trim().is_empty()) {
            return Err(invalid(
                "cluster.nats_urls",
                "name at least one NATS server, e.g. [\"nats://10.0.0.5:4222\"]",
            ));
        }
        if self.stream.is_empty()
            || !self
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "cluster.stream",
                format!("{:?}: want letters, digits, '_' or '-'", self.stream),
            ));
        }
        if self.subject_prefix.is_empty()
            || self.subject_prefix.split('.').any(|t| {
                t.is_empty() || t.contains(['*', '>']) || t.chars().any(char::is_whitespace)
            })
        {
            return Err(invalid(
                "cluster.subject_prefix",
                format!(
                    "{:?}: want dot-separated tokens without wildcards or spaces, e.g. \"outflow.parts\"",
                    self.subject_prefix
                ),
            ));
        }
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(invalid(
                "cluster.partitions",
                format!("{}: want 1 to {MAX_PARTITIONS}", self.partitions),
            ));
        }
        if ![1, 3, 5].contains(&self.replicas) {
            return Err(invalid(
                "cluster.replicas",
                format!("{}: want 1, 3 or 5", self.replicas),
            ));
        }
        for (field, d) in [
            ("cluster.duplicate_window", self.duplicate_window),
            ("cluster.max_age", self.max_age),
            ("cluster.ack_timeout", self.ack_timeout),
            ("cluster.publish_timeout", self.publish_timeout),
            ("cluster.lease", self.lease),
            ("cluster.query_timeout", self.query_timeout),
            ("cluster.nats_ping_interval", self.nats_ping_interval),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be above 0"));
            }
        }
        if self.role == NodeRole::Aggregator
            && !self.node_name.is_empty()
            && !valid_node_name(&self.node_name)
        {
            return Err(invalid(
                "cluster.node_name",
                format!(
                    "{:?}: want at most 64 letters, digits, '_' or '-' (it names NATS consumers and keys)",
                    self.node_name
                ),
            ));
        }
        if !self.advertise.is_empty() && !valid_host_port(&self.advertise) {
            return Err(invalid(
                "cluster.advertise",
                format!(
                    "{:?}: want host:port (a name or an address the other nodes reach), e.g. \"agg-1.example:50051\"",
                    self.advertise
                ),
            ));
        }
        if self.nats_user.is_empty() != self.nats_password_file.is_none() {
            return Err(invalid(
                "cluster.nats_password_file",
                "set it with cluster.nats_user, or neither",
            ));
        }
        let ways: Vec<&str> = [
            (
                "cluster.nats_password_file",
                self.nats_password_file.is_some(),
            ),
            ("cluster.nats_token_file", self.nats_token_file.is_some()),
            ("cluster.nats_nkey_file", self.nats_nkey_file.is_some()),
            ("cluster.nats_creds_file", self.nats_creds_file.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, set)| set.then_some(field))
        .collect();
        if let [first, second, ..] = ways[..] {
            return Err(invalid(
                second,
                format!(
                    "a node authenticates to NATS one way (a user and password, a token, an \
                     NKey or a credentials file), and {first} is set too: keep one"
                ),
            ));
        }
        if self.nats_cert.is_some() != self.nats_key.is_some() {
            return Err(invalid(
                "cluster.nats_key",
                "set it with cluster.nats_cert (this node's certificate and its key), or neither",
            ));
        }
        if self.max_age < self.duplicate_window {
            return Err(invalid(
                "cluster.max_age",
                "must be at least cluster.duplicate_window",
            ));
        }
        Ok(())
    }

    /// This aggregator's name: `node_name`, else the host name made valid (other characters
    /// become '-').
    pub fn node(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        let name: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        if name.is_empty() {
            "aggregator".into()
        } else {
            name
        }
    }

    /// Where the other nodes reach this aggregator, bound at `bound` (see `advertise`).
    pub fn advertised(&self, bound: std::net::SocketAddr) -> String {
        if !self.advertise.is_empty() {
            self.advertise.clone()
        } else if bound.ip().is_unspecified() {
            format!("{}:{}", self.node(), bound.port())
        } else {
            bound.to_string()
        }
    }

    /// The publisher's settings.
    pub fn publish(&self) -> PublishConfig {
        PublishConfig {
            nats: self.nats(),
            stream: self.stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            max_age: self.max_age,
        }
    }

    /// How this node connects to NATS.
    pub fn nats(&self) -> NatsConnect {
        NatsConnect {
            role: self.role.as_str(),
            node: self.node(),
            urls: self.nats_urls.clone(),
            ping_interval: self.nats_ping_interval,
            user: self.nats_user.clone(),
            password_file: self.nats_password_file.clone(),
            token_file: self.nats_token_file.clone(),
            nkey_file: self.nats_nkey_file.clone(),
            creds_file: self.nats_creds_file.clone(),
            ca: self.nats_ca.clone(),
            cert: self.nats_cert.clone(),
            key: self.nats_key.clone(),
        }
    }
}

/// A name NATS takes in a consumer name and a key: letters, digits, '_', '-'; 1 to 64.
/// `host:port` with a port number and a host without spaces (`[v6]:port` too).
fn valid_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    })
}

fn valid_node_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readmes_cluster_config_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n[cluster]")
            .expect("the README's [cluster] block");
        let block = &readme[start + 8..];
        let block = &block[..block.find("```").unwrap()];
        #[derive(Deserialize)]
        struct File {
            cluster: ClusterConfig,
        }
        let c: File = toml::from_str(block).unwrap();
        c.cluster.validate().unwrap();
        assert_eq!(c.cluster.role, NodeRole::Ingest);
        assert_eq!(c.cluster.lease, ClusterConfig::default().lease);
        assert_eq!(c.cluster.max_age, ClusterConfig::default().max_age);
        assert_eq!(
            c.cluster.duplicate_window,
            ClusterConfig::default().duplicate_window
        );
    }

    #[test]
    fn bad_settings_name_their_field() {
        let ingest = ClusterConfig {
            role: NodeRole::Ingest,
            ..ClusterConfig::default()
        };
        assert!(ingest.validate().is_ok());
        // Standalone ignores the rest.
        let off = ClusterConfig {
            partitions: 0,
            ..ClusterConfig::default()
        };
        assert!(off.validate().is_ok());
        for (f, field) in [
            (
                (|c: &mut ClusterConfig| c.nats_urls.clear()) as fn(&mut ClusterConfig),
                "cluster.nats_urls",
            ),
            (|c| c.stream = "a b".into(), "cluster.stream"),
            (
                |c| c.subject_prefix = "a.*".into(),
                "cluster.subject_prefix",
            ),
            (
                |c| c.subject_prefix = "a..b".into(),
                "cluster.subject_prefix",
            ),
            (|c| c.partitions = 0, "cluster.partitions"),
            (|c| c.partitions = MAX_PARTITIONS + 1, "cluster.partitions"),
            (|c| c.replicas = 2, "cluster.replicas"),
            (|c| c.ack_timeout = Duration::ZERO, "cluster.ack_timeout"),
            (|c| c.max_age = Duration::from_secs(1), "cluster.max_age"),
            (
                |c| {
                    c.role = NodeRole::Aggregator;
                    c.node_name = "agg.1".into();
                },
                "cluster.node_name",
            ),
            (|c| c.lease = Duration::ZERO, "cluster.lease"),
            (
                |c| c.query_timeout = Duration::ZERO,
                "cluster.query_timeout",
            ),
            (|c| c.advertise = "agg-1".into(), "cluster.advertise"),
            (|c| c.advertise = "agg-1:http".into(), "cluster.advertise"),
            (|c| c.nats_user = "u".into(), "cluster.nats_password_file"),
            (
                |c| c.nats_password_file = Some("p".into()),
                "cluster.nats_password_file",
            ),
            (
                |c| {
                    c.nats_user = "u".into();
                    c.nats_password_file = Some("p".into());
                    c.nats_token_file = Some("t".into());
                },
                "cluster.nats_token_file",
            ),
            (
                |c| {
                    c.nats_token_file = Some("t".into());
                    c.nats_nkey_file = Some("n".into());
                },
                "cluster.nats_nkey_file",
            ),
            (
                |c| {
                    c.nats_nkey_file = Some("n".into());
                    c.nats_creds_file = Some("c".into());
                },
                "cluster.nats_creds_file",
            ),
            (|c| c.nats_cert = Some("c".into()), "cluster.nats_key"),
            (|c| c.nats_key = Some("k".into()), "cluster.nats_key"),
        ] {
            let mut c = ingest.clone();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn the_advertised_address() {
        let mut c = ClusterConfig {
            role: NodeRole::Aggregator,
            node_name: "agg-1".into(),
            ..ClusterConfig::default()
        };
        let bound = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(c.advertised(bound("10.0.0.5:50051")), "10.0.0.5:50051");
        assert_eq!(c.advertised(bound("0.0.0.0:50051")), "agg-1:50051");
        assert_eq!(c.advertised(bound("[::]:50051")), "agg-1:50051");
        c.advertise = "agg-1.outflow.svc:50051".into();
        assert_eq!(
            c.advertised(bound("0.0.0.0:50051")),
            "agg-1.outflow.svc:50051"
        );
        assert!(c.validate().is_ok());
        c.advertise = "[2001:db8::5]:50051".into();
        assert!(c.validate().is_ok());
    }
}
