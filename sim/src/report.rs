//! Scoring a run against the collector's alerts, and printing it.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, time::Duration};

use outflow_proto::v1;
use serde::Serialize;

use crate::{
    Scenario, SimConfig,
    model::{self, BenignStats, Generator, Params, StepTotals},
};

/// An alert as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AlertView {
    pub key: String,
    pub detector: String,
    pub severity: String,
    pub state: String,
    pub first_seen_ms: u64,
    pub observed_bytes: u64,
    pub threshold_bytes: u64,
    pub summary: String,
}

impl From<&v1::Alert> for AlertView {
    fn from(a: &v1::Alert) -> Self {
        let name = |n: Option<&str>, v: i32| n.map_or_else(|| v.to_string(), str::to_owned);
        AlertView {
            key: a.key.clone(),
            detector: name(
                v1::Detector::try_from(a.detector)
                    .ok()
                    .map(|d| d.as_str_name()),
                a.detector,
            ),
            severity: name(
                v1::Severity::try_from(a.severity)
                    .ok()
                    .map(|d| d.as_str_name()),
                a.severity,
            ),
            state: name(
                v1::AlertState::try_from(a.state)
                    .ok()
                    .map(|d| d.as_str_name()),
                a.state,
            ),
            first_seen_ms: a.first_seen_ms,
            observed_bytes: a.observed_bytes,
            threshold_bytes: a.threshold_bytes,
            summary: a.summary.clone(),
        }
    }
}

/// How one injected attack fared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttackReport {
    pub scenario: Scenario,
    /// Distinct attacker addresses, and the prefix they share (if any).
    pub addresses: usize,
    pub prefix: Option<String>,
    /// Batch time the attack began.
    pub start_ms: u64,
    /// Response bytes the attacker pulled from `start_ms` to the end of the run.
    pub bytes_total: u64,
    /// Whether an alert's key covers an attacker address (the address, or a prefix of it).
    pub detected: bool,
    /// The earliest such alert.
    pub alert: Option<AlertView>,
    /// Batch time from `start_ms` to the alert's `first_seen_ms` (0 if flagged before).
    pub time_to_detect_ms: Option<u64>,
    /// Response bytes pulled from `start_ms` up to the alert (batches ending at or before its
    /// `first_seen_ms`).
    pub bytes_before_alert: Option<u64>,
}

/// Bytes one host sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostTotals {
    pub host: String,
    pub response_bytes: u64,
    pub request_bytes: u64,
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub hosts: usize,
    pub clients: usize,
    pub days: u32,
    pub batch_secs: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Batches acknowledged (hosts × steps) and connection deltas sent.
    pub batches: u64,
    pub deltas: u64,
    pub response_bytes: u64,
    pub request_bytes: u64,
    /// Wall time from the first batch to the last Ack.
    pub ingest_wall_ms: u64,
    /// CIDRs of the heavy benign clients, for the collector's allowlist.
    pub allowlist: Vec<String>,
    pub benign: BenignStats,
    /// Why the alerts could not be read (e.g. `Unimplemented: ...`); `None` when they were.
    pub alerts_error: Option<String>,
    /// The gRPC code of `alerts_error`.
    #[serde(skip)]
    pub alerts_code: Option<tonic::Code>,
    /// Alerts listed (open and resolved).
    pub alerts_total: usize,
    pub attacks: Vec<AttackReport>,
    /// Alerts on a client address or prefix covering no attacker, and workload/host alerts
    /// that began before any attack did.
    pub false_alerts: Vec<AlertView>,
    /// Workload/host alerts (keys that are no client address) that began once an attack was
    /// under way: side effects of the attack, neither detections nor false alerts.
    pub collateral_alerts: Vec<AlertView>,
    pub host_totals: Vec<HostTotals>,
    /// Per step: its end and what it sent (for exactness checks).
    #[serde(skip)]
    pub steps: Vec<StepTotals>,
    /// Per client address: response and request bytes sent.
    #[serde(skip)]
    pub client_totals: BTreeMap<IpAddr, (u64, u64)>,
}

impl Report {
    /// Whether the alerts were read, every attack was detected and nothing else was flagged.
    pub fn passed(&self) -> bool {
        self.alerts_error.is_none()
            && self.attacks.iter().all(|a| a.detected)
            && self.false_alerts.is_empty()
    }

    /// A plain-text table of the run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "scenario {}: seed {}, {} hosts, {} benign clients, {} day(s) of {} s batches from {}",
            self.scenario,
            self.seed,
            self.hosts,
            self.clients,
            self.days,
            self.batch_secs,
            self.start_ms
        );
        let _ = writeln!(
            s,
            "sent {} batches, {} deltas, {} response / {} request bytes in {:.1} s",
            self.batches,
            self.deltas,
            self.response_bytes,
            self.request_bytes,
            self.ingest_wall_ms as f64 / 1000.0
        );
        let b = &self.benign;
        let _ = writeln!(
            s,
            "benign peaks: client {} B/h ({}), prefix {} B/h ({}), client {} B/day, prefix {} B/day; {} clients in {} prefixes",
            b.max_client_hour_bytes,
            b.max_client_hour_key,
            b.max_prefix_hour_bytes,
            b.max_prefix_hour_key,
            b.max_client_day_bytes,
            b.max_prefix_day_bytes,
            b.active_clients,
            b.active_prefixes
        );
        let _ = writeln!(
            s,
            "allowlist (heavy batch clients): {}",
            self.allowlist.join(", ")
        );
        if let Some(e) = &self.alerts_error {
            let _ = writeln!(s, "ALERTS NOT READ: {e}");
        }
        let _ = writeln!(
            s,
            "{:<9} {:<8} {:<22} {:<20} {:>10} {:>16} {:>16}",
            "attack", "detected", "alert key", "detector", "ttd", "bytes before", "bytes total"
        );
        for a in &self.attacks {
            let detected = match (&self.alerts_error, a.detected) {
                (Some(_), _) => "unknown",
                (None, true) => "yes",
                (None, false) => "NO",
            };
            let _ = writeln!(
                s,
                "{:<9} {:<8} {:<22} {:<20} {:>10} {:>16} {:>16}",
                a.scenario.name(),
                detected,
                a.alert.as_ref().map_or("-", |x| x.key.as_str()),
                a.alert.as_ref().map_or("-", |x| x.detector.as_str()),
                a.time_to_detect_ms
                    .map_or_else(|| "-".into(), |t| format!("{:.1} min", t as f64 / 60_000.0)),
                a.bytes_before_alert
                    .map_or_else(|| "-".into(), |b| b.to_string()),
                a.bytes_total
            );
        }
        let _ = writeln!(
            s,
            "alerts: {} listed, {} false, {} collateral (workload alerts during an attack)",
            self.alerts_total,
            self.false_alerts.len(),
            self.collateral_alerts.len()
        );
        for f in &self.collateral_alerts {
            let _ = writeln!(s, "  collateral: {} {} {}", f.key, f.detector, f.severity);
        }
        for f in &self.false_alerts {
            let _ = writeln!(
                s,
                "  false: {} {} {} observed {} threshold {}: {}",
                f.key, f.detector, f.severity, f.observed_bytes, f.threshold_bytes, f.summary
            );
        }
        s
    }
}

/// Scores the generated traffic against the alerts the collector listed.
pub(crate) fn score(
    name: &str,
    cfg: &SimConfig,
    params: &Params,
    generator: Generator,
    batches: u64,
    ingest_wall: Duration,
    alerts: Result<Vec<v1::Alert>, tonic::Status>,
) -> Report {
    let (alerts, alerts_error, alerts_code) = match alerts {
        Ok(a) => (a, None, None),
        Err(s) => (
            Vec::new(),
            Some(if s.code() == tonic::Code::Unimplemented {
                format!(
                    "outflow.v1.Alerts/List: UNIMPLEMENTED: the collector does not serve Alerts (no detectors) {}",
                    s.message()
                )
            } else {
                format!("outflow.v1.Alerts/List: {:?}: {}", s.code(), s.message())
            }),
            Some(s.code()),
        ),
    };
    let covers_any = |key: &str, addrs: &std::collections::HashSet<IpAddr>| {
        addrs.iter().any(|a| crate::key_covers(key, *a))
    };
    let attacks = generator
        .attacks
        .iter()
        .map(|atk| {
            let first = alerts
                .iter()
                .filter(|al| covers_any(&al.key, &atk.addrs))
                .min_by_key(|al| al.first_seen_ms);
            let ttd = first.map(|al| al.first_seen_ms.saturating_sub(atk.start_ms));
            let before = first.map(|al| {
                atk.cumulative
                    .iter()
                    .take_while(|(end, _)| *end <= al.first_seen_ms)
                    .last()
                    .map_or(0, |(_, b)| *b)
            });
            AttackReport {
                scenario: atk.scenario,
                addresses: atk.addrs.len(),
                prefix: atk.prefix.map(|p| p.to_string()),
                start_ms: atk.start_ms,
                bytes_total: atk.bytes,
                detected: first.is_some(),
                alert: first.map(AlertView::from),
                time_to_detect_ms: ttd,
                bytes_before_alert: before,
            }
        })
        .collect();
    let first_attack = generator.attacks.iter().map(|a| a.start_ms).min();
    let (collateral_alerts, false_alerts): (Vec<AlertView>, Vec<AlertView>) = alerts
        .iter()
        .filter(|al| {
            !generator
                .attacks
                .iter()
                .any(|a| covers_any(&al.key, &a.addrs))
        })
        .map(AlertView::from)
        .partition(|al| {
            let client_key =
                al.key.parse::<IpAddr>().is_ok() || al.key.parse::<ipnet::IpNet>().is_ok();
            !client_key && first_attack.is_some_and(|s| al.first_seen_ms >= s)
        });
    let host_totals = generator
        .host_totals
        .iter()
        .enumerate()
        .map(|(i, (r, q))| HostTotals {
            host: model::host_name(i),
            response_bytes: *r,
            request_bytes: *q,
        })
        .collect();
    Report {
        scenario: name.to_owned(),
        seed: cfg.seed,
        hosts: cfg.hosts,
        clients: cfg.clients,
        days: cfg.days,
        batch_secs: cfg.batch_secs,
        start_ms: params.start_ms,
        end_ms: params.end_ms(),
        batches,
        deltas: generator.deltas,
        response_bytes: generator.steps.iter().map(|s| s.response_bytes).sum(),
        request_bytes: generator.steps.iter().map(|s| s.request_bytes).sum(),
        ingest_wall_ms: ingest_wall.as_millis() as u64,
        allowlist: model::allowlist().iter().map(ToString::to_string).collect(),
        benign: generator.benign.clone(),
        alerts_error,
        alerts_code,
        alerts_total: alerts.len(),
        attacks,
        false_alerts,
        collateral_alerts,
        host_totals,
        client_totals: generator.client_totals_sorted(),
        steps: generator.steps,
    }
}
