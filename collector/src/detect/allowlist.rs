//! Known bulk clients: subjects the detectors never flag.
use std::net::IpAddr;

use outflow_proto::limits::MAX_CLIENT_ID_LEN;
use serde::{Deserialize, Serialize};

use super::subject::Subject;
use crate::{
    aggregate::State,
    config_error::{ConfigError, invalid},
};

/// `[detect.allowlist]`: known bulk clients, never flagged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllowlistConfig {
    /// Client networks (`"198.51.100.0/24"`, `"2001:db8::/48"`, `"192.0.2.7/32"`).
    pub cidrs: Vec<ipnet::IpNet>,
    /// Workload name prefixes (`"gpu-1/system.slice/batch.service"`).
    pub workloads: Vec<String>,
    /// Client ids, exactly as agents send them (`"h:0123456789abcdef01234567"`).
    pub client_ids: Vec<String>,
}

impl AllowlistConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for id in &self.client_ids {
            if id.is_empty() || id.chars().nth(MAX_CLIENT_ID_LEN).is_some() {
                return Err(invalid(
                    "detect.allowlist.client_ids",
                    format!("{id:?}: a client id has 1 to {MAX_CLIENT_ID_LEN} characters"),
                ));
            }
        }
        Ok(())
    }

    /// Whether a client address is in an allowlisted network.
    pub fn covers(&self, addr: IpAddr) -> bool {
        self.cidrs.iter().any(|n| n.contains(&addr))
    }

    /// Whether `s` is allowlisted (`st` names workloads).
    pub fn contains(&self, s: &Subject, st: &State) -> bool {
        match s {
            Subject::Client(ip) => self.covers(*ip),
            Subject::Prefix(p) => self
                .cidrs
                .iter()
                .any(|n| n.prefix_len() <= p.prefix_len() && n.contains(&p.network())),
            Subject::Wide(p) => self
                .cidrs
                .iter()
                .any(|n| n.prefix_len() <= p.prefix_len() && n.contains(&p.network())),
            Subject::Workload(_) => {
                !self.workloads.is_empty() && {
                    let name = s.display(st);
                    self.workloads.iter().any(|w| name.starts_with(w.as_str()))
                }
            }
            Subject::ClientId(id) => self.client_ids.iter().any(|x| **x == **id),
            // Its members are each allowlisted or not.
            Subject::Cohort(_) => false,
        }
    }
}
