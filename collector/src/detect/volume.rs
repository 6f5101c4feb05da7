//! **Volume**: response bytes over a window at or above an absolute limit per subject kind.
use serde::{Deserialize, Serialize};

use super::{
    GIB,
    finding::{Finding, Severity, human},
    judged::Judged,
    subject::{Kind, Subject},
};
use crate::{
    config_error::{ConfigError, invalid},
    window::Window,
};

/// `[detect.volume]`: absolute thresholds on response bytes (0: that check is off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeConfig {
    pub enabled: bool,
    /// A client address, and a client id.
    pub client_per_hour: u64,
    pub client_per_day: u64,
    pub prefix_per_hour: u64,
    pub prefix_per_day: u64,
    /// An IPv6 /64 is normally one subscriber or site, so it gets per-client limits by default:
    /// a client rotating its address inside its /64 is caught like one address.
    pub ipv6_subnet_per_hour: u64,
    pub ipv6_subnet_per_day: u64,
    pub workload_per_hour: u64,
    pub workload_per_day: u64,
    /// Over the 7-day and the 30-day window (daily buckets): a client, a client id, an IPv6 /64
    /// (one subscriber), and a prefix. Workloads have none.
    pub client_per_week: u64,
    pub client_per_month: u64,
    pub ipv6_subnet_per_week: u64,
    pub ipv6_subnet_per_month: u64,
    pub prefix_per_week: u64,
    pub prefix_per_month: u64,
    /// Limits of their own for known clients (a big customer's client id or networks),
    /// instead of the limits of their kind: the first that matches applies.
    pub overrides: Vec<LimitOverride>,
}

/// `[[detect.volume.overrides]]`: a client id, or a network (its addresses and the prefixes
/// inside it), with its own limits (0: that window is not judged for it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cidr: Option<ipnet::IpNet>,
    pub per_hour: u64,
    pub per_day: u64,
    pub per_week: u64,
    pub per_month: u64,
}

impl LimitOverride {
    fn matches(&self, s: &Subject) -> bool {
        match (s, &self.client_id, &self.cidr) {
            (Subject::ClientId(id), Some(want), _) => **id == **want,
            (Subject::Client(a), _, Some(n)) => n.contains(a),
            (Subject::Prefix(p), _, Some(n)) => {
                n.prefix_len() <= p.prefix_len() && n.contains(&p.network())
            }
            _ => false,
        }
    }
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            client_per_hour: GIB,
            client_per_day: 10 * GIB,
            prefix_per_hour: 8 * GIB,
            prefix_per_day: 80 * GIB,
            ipv6_subnet_per_hour: GIB,
            ipv6_subnet_per_day: 10 * GIB,
            workload_per_hour: 0,
            workload_per_day: 0,
            client_per_week: 40 * GIB,
            client_per_month: 120 * GIB,
            ipv6_subnet_per_week: 40 * GIB,
            ipv6_subnet_per_month: 120 * GIB,
            prefix_per_week: 320 * GIB,
            prefix_per_month: 960 * GIB,
            overrides: Vec::new(),
        }
    }
}

/// The limits of one subject kind, per hour, day, week and month (0: no limit).
struct Limits([u64; 4]);

impl VolumeConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for o in &self.overrides {
            if o.client_id.is_some() == o.cidr.is_some() {
                return Err(invalid(
                    "detect.volume.overrides",
                    "each override names either a client_id or a cidr",
                ));
            }
        }
        Ok(())
    }

    /// The limits of `j`'s subject.
    fn limits(&self, j: &Judged<'_>) -> Limits {
        if let Some(o) = self.overrides.iter().find(|o| o.matches(j.subject)) {
            return Limits([o.per_hour, o.per_day, o.per_week, o.per_month]);
        }
        Limits(match j.subject.kind() {
            Kind::Client | Kind::ClientId => [
                self.client_per_hour,
                self.client_per_day,
                self.client_per_week,
                self.client_per_month,
            ],
            Kind::Prefix if j.subject.is_ipv6_subnet() => [
                self.ipv6_subnet_per_hour,
                self.ipv6_subnet_per_day,
                self.ipv6_subnet_per_week,
                self.ipv6_subnet_per_month,
            ],
            Kind::Prefix => [
                self.prefix_per_hour,
                self.prefix_per_day,
                self.prefix_per_week,
                self.prefix_per_month,
            ],
            Kind::Workload => [self.workload_per_hour, self.workload_per_day, 0, 0],
            Kind::Cohort => [0; 4],
        })
    }
}

/// The finding, if the 1 h, else the 24 h, else the 7-day, else the 30-day window is at or
/// over its limit. For the day windows a prefix counts every member (allowlisted ones too,
/// and one that makes most of its bytes).
pub fn judge(cfg: &VolumeConfig, j: &Judged<'_>) -> Option<Finding> {
    let Limits([ph, pd, pw, pm]) = cfg.limits(j);
    // (observed, limit, request bytes, window, its limit's name, seconds, the window of hosts
    // and addresses)
    let (obs, thr, req, last, per, secs, w) =
        if ph > 0 && j.h1_resp >= ph && !j.dominated(Window::H1) {
            let req = j.h1.totals.request_bytes;
            (j.h1_resp, ph, req, "hour", "per-hour", 3600, Window::H1)
        } else if pd > 0 && j.d1_resp >= pd && !j.dominated(Window::H24) {
            let req = j.d1.totals.request_bytes;
            (j.d1_resp, pd, req, "day", "per-day", 86_400, Window::H24)
        } else if pw > 0 && j.d7.response_bytes >= pw {
            let d = &j.d7;
            (
                d.response_bytes,
                pw,
                d.request_bytes,
                "7 days",
                "7-day",
                7 * 86_400,
                Window::H24,
            )
        } else if pm > 0 && j.d30.response_bytes >= pm {
            let d = &j.d30;
            let secs = 30 * 86_400;
            (
                d.response_bytes,
                pm,
                d.request_bytes,
                "30 days",
                "30-day",
                secs,
                Window::H24,
            )
        } else {
            return None;
        };
    let (hosts, via) = (j.hosts(w), j.via(w));
    Some(Finding {
        severity: Severity::by_ratio(obs, thr),
        window_seconds: secs,
        observed_bytes: obs,
        baseline_bytes: 0,
        threshold_bytes: thr,
        request_bytes: req,
        summary: format!(
            "{}: pulled {} of responses in the last {last} from {} host(s), over the {} {per} limit for {} ({} of requests) — check who owns it and rate-limit or block it unless it is a known bulk client.",
            j.title(&via),
            human(obs),
            hosts.len(),
            human(thr),
            j.subject.what(),
            human(req),
        ),
        hosts,
        members: j.members(),
        via,
    })
}
