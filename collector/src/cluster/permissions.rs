//! The NATS subjects a node of each role publishes and subscribes to, for its `[cluster]`
//! settings: what an operator puts in the node's user (`permissions { ... }` in the servers'
//! authorization, or `nsc edit user --allow-pub ... --allow-sub ...` in operator mode), so that
//! the collectors' users reach their own stream, buckets and subjects and nothing else of a
//! shared account. `outflow-collector nats-permissions` prints them.
//!
//! Requests to JetStream are publishes to its API (`$JS.API.<verb>.<stream>...`), answered on
//! the client's inbox (`_INBOX.>`); a key-value bucket `B` is the stream `KV_B` and the
//! subjects `$KV.B.<key>`. Nothing here deletes a stream or purges one.
use super::config::{ClusterConfig, NodeRole};

/// The key-value buckets of the cluster: `<stream>-<suffix>`.
const BUCKETS: [&str; 4] = ["aggregators", "claims", "delivered", "peer-ratios"];

/// What one node's user may publish and subscribe to (NATS subjects, with `*` and `>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The permissions a node with the settings `cfg` needs (for its role, its stream and its
/// subject prefix); `None` for a standalone collector, which does not use NATS.
pub fn for_node(cfg: &ClusterConfig) -> Option<Permissions> {
    let stream = &cfg.stream;
    let prefix = &cfg.subject_prefix;
    let api = "$JS.API";
    let mut publish = vec![format!("{api}.INFO")];
    let create = |publish: &mut Vec<String>, stream: &str| {
        publish.push(format!("{api}.STREAM.INFO.{stream}"));
        publish.push(format!("{api}.STREAM.CREATE.{stream}"));
    };
    // Durable and ephemeral consumers on `stream`, pulled and acknowledged.
    let consume = |publish: &mut Vec<String>, stream: &str| {
        publish.push(format!("{api}.CONSUMER.CREATE.{stream}"));
        publish.push(format!("{api}.CONSUMER.CREATE.{stream}.>"));
        for verb in ["INFO", "DELETE", "MSG.NEXT"] {
            publish.push(format!("{api}.CONSUMER.{verb}.{stream}.*"));
        }
        publish.push(format!("$JS.ACK.{stream}.>"));
    };
    match cfg.role {
        NodeRole::Standalone => return None,
        NodeRole::Ingest => {
            // The batches' parts, into the stream it creates if missing.
            publish.push(format!("{prefix}.*"));
            create(&mut publish, stream);
            // The aggregators' directory, read to fan Query and Alerts out.
            let directory = format!("KV_{stream}-aggregators");
            publish.push(format!("{api}.STREAM.INFO.{directory}"));
            publish.push(format!("{api}.DIRECT.GET.{directory}.>"));
        }
        NodeRole::Aggregator => {
            // The parts, from a consumer per partition held.
            create(&mut publish, stream);
            consume(&mut publish, stream);
            // The second stage's cohort summaries: published, and read from every partition.
            let cohorts = format!("{stream}-cohorts");
            publish.push(format!("{prefix}.cohorts.*"));
            create(&mut publish, &cohorts);
            consume(&mut publish, &cohorts);
            // Membership, claims, alerts delivered, peers' ratios: read and written.
            for bucket in BUCKETS {
                let bucket = format!("{stream}-{bucket}");
                create(&mut publish, &format!("KV_{bucket}"));
                publish.push(format!("{api}.DIRECT.GET.KV_{bucket}.>"));
                publish.push(format!("$KV.{bucket}.>"));
            }
        }
    }
    Some(Permissions {
        publish,
        subscribe: vec!["_INBOX.>".into()],
    })
}

impl Permissions {
    /// The block for a user of the servers' `authorization { users = [ ... ] }`.
    pub fn server_config(&self) -> String {
        let list = |subjects: &[String]| {
            subjects
                .iter()
                .map(|s| format!("      \"{s}\"\n"))
                .collect::<String>()
        };
        format!(
            "permissions {{\n  publish: {{\n    allow: [\n{}    ]\n  }}\n  subscribe: {{\n    \
             allow: [\n{}    ]\n  }}\n}}\n",
            list(&self.publish),
            list(&self.subscribe)
        )
    }

    /// The same for a user in operator mode: `nsc edit user` with these flags.
    pub fn nsc_flags(&self) -> String {
        format!(
            "--allow-pub '{}' --allow-sub '{}'",
            self.publish.join(","),
            self.subscribe.join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subject_is_of_the_configured_stream_or_prefix() {
        let cfg = |role| ClusterConfig {
            role,
            stream: "S1".into(),
            subject_prefix: "p.q".into(),
            ..ClusterConfig::default()
        };
        assert_eq!(for_node(&cfg(NodeRole::Standalone)), None);
        for role in [NodeRole::Ingest, NodeRole::Aggregator] {
            let p = for_node(&cfg(role)).unwrap();
            for s in &p.publish {
                assert!(
                    s == "$JS.API.INFO" || s.contains("S1") || s.starts_with("p.q."),
                    "{role:?}: {s}"
                );
                assert!(!s.contains("DELETE.S1") || s.contains("CONSUMER"), "{s}");
            }
            assert_eq!(p.subscribe, ["_INBOX.>"]);
        }
        let ingest = for_node(&cfg(NodeRole::Ingest)).unwrap();
        assert!(ingest.publish.contains(&"p.q.*".to_string()));
        assert!(
            !ingest
                .publish
                .iter()
                .any(|s| s.contains("CONSUMER") || s.contains("$KV"))
        );
        assert!(ingest.server_config().contains("\"p.q.*\""));
        assert!(ingest.nsc_flags().starts_with("--allow-pub '$JS.API.INFO,"));
    }
}
