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
    /// `SCOPE_CLIENT` or `SCOPE_SERVICE`.
    pub scope: String,
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
            scope: name(
                v1::Scope::try_from(a.scope).ok().map(|d| d.as_str_name()),
                a.scope,
            ),
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
    /// Whether a client alert opened at or after `start_ms` has a key that covers an attacker
    /// address (the address, or a prefix of it). An alert that opened before the attack began
    /// is not a detection of it.
    pub detected: bool,
    /// The earliest such alert.
    pub alert: Option<AlertView>,
    /// Batch time from `start_ms` to the alert's `first_seen_ms`.
    pub time_to_detect_ms: Option<u64>,
    /// Response bytes pulled from `start_ms` up to the alert (batches ending at or before its
    /// `first_seen_ms`).
    pub bytes_before_alert: Option<u64>,
    /// The time to detect it must be within: a bulk client 2 batch intervals after its last
    /// hour crossed 1 GiB; a group (prefix, wide, pool) 1 hour; the slow rise 24 hours; the
    /// week-long pull 7 days.
    pub ttd_bound_ms: u64,
    /// Detected within that bound.
    pub in_time: bool,
}

/// The default per-client hourly limit (`detect.volume.client_per_hour`).
pub const CLIENT_PER_HOUR: u64 = 1 << 30;

/// See [`AttackReport::ttd_bound_ms`].
fn ttd_bound(atk: &model::Attack, params: &Params) -> u64 {
    const HOUR: u64 = model::HOUR_MS;
    match atk.scenario {
        Scenario::Bulk | Scenario::Rotate6 | Scenario::Parallel => {
            // The first batch end at which the last hour holds the limit.
            let at = |t: u64| {
                atk.cumulative
                    .iter()
                    .take_while(|(end, _)| *end <= t)
                    .last()
                    .map_or(0, |(_, b)| *b)
            };
            let crossed = atk
                .cumulative
                .iter()
                .find(|(end, b)| b - at(end.saturating_sub(HOUR)) >= CLIENT_PER_HOUR)
                .map_or(u64::MAX, |(end, _)| *end);
            crossed
                .saturating_add(2 * params.batch_ms)
                .saturating_sub(atk.start_ms)
        }
        Scenario::Prefix | Scenario::Wide | Scenario::Pool => HOUR,
        Scenario::SlowRise => 24 * HOUR,
        Scenario::LowSlow => 7 * model::DAY_MS,
        Scenario::Benign | Scenario::All => u64::MAX,
    }
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
    /// Streams opened again after one failed (each time its unacknowledged batch was sent
    /// again).
    pub reconnects: u64,
    /// The benign heavy clients (not allowlisted): name and addresses.
    pub lookalikes: Vec<(String, Vec<String>)>,
    pub benign: BenignStats,
    /// Why the alerts could not be read (e.g. `Unimplemented: ...`); `None` when they were.
    pub alerts_error: Option<String>,
    /// The gRPC code of `alerts_error`.
    #[serde(skip)]
    pub alerts_code: Option<tonic::Code>,
    /// Alerts listed (open and resolved).
    pub alerts_total: usize,
    pub attacks: Vec<AttackReport>,
    /// Client alerts whose key covers no attacker address (or that opened before the attack
    /// on the attacker's key began).
    pub false_alerts: Vec<AlertView>,
    /// Service alerts (a workload's own volume changed): listed apart, neither detections nor
    /// false alerts.
    pub service_alerts: Vec<AlertView>,
    pub host_totals: Vec<HostTotals>,
    /// Per step: its end and what it sent (for exactness checks).
    #[serde(skip)]
    pub steps: Vec<StepTotals>,
    /// Per client address: response and request bytes sent.
    #[serde(skip)]
    pub client_totals: BTreeMap<IpAddr, (u64, u64)>,
}

impl Report {
    /// Whether the alerts were read, every attack was detected in time and nothing else was
    /// flagged.
    pub fn passed(&self) -> bool {
        self.alerts_error.is_none()
            && self.attacks.iter().all(|a| a.in_time)
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
            "sent {} batches, {} deltas, {} response / {} request bytes in {:.1} s{}",
            self.batches,
            self.deltas,
            self.response_bytes,
            self.request_bytes,
            self.ingest_wall_ms as f64 / 1000.0,
            match self.reconnects {
                0 => String::new(),
                n => format!(" ({n} streams opened again, their batch sent again)"),
            }
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
            "benign look-alikes (not allowlisted): {}",
            self.lookalikes
                .iter()
                .map(|(n, a)| format!("{n} ({} address(es), first {})", a.len(), a[0]))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(e) = &self.alerts_error {
            let _ = writeln!(s, "ALERTS NOT READ: {e}");
        }
        let _ = writeln!(
            s,
            "{:<9} {:<8} {:<30} {:<20} {:>11} {:>11} {:>16} {:>16}",
            "attack",
            "detected",
            "alert key",
            "detector",
            "ttd",
            "ttd bound",
            "bytes before",
            "bytes total"
        );
        let time = |ms: u64| {
            if ms == u64::MAX {
                "-".to_owned()
            } else if ms >= 2 * model::DAY_MS {
                format!("{:.2} d", ms as f64 / model::DAY_MS as f64)
            } else {
                format!("{:.1} min", ms as f64 / 60_000.0)
            }
        };
        for a in &self.attacks {
            let detected = match (&self.alerts_error, a.detected, a.in_time) {
                (Some(_), _, _) => "unknown",
                (None, true, true) => "yes",
                (None, true, false) => "LATE",
                (None, false, _) => "NO",
            };
            let _ = writeln!(
                s,
                "{:<9} {:<8} {:<30} {:<20} {:>11} {:>11} {:>16} {:>16}",
                a.scenario.name(),
                detected,
                a.alert.as_ref().map_or("-", |x| x.key.as_str()),
                a.alert
                    .as_ref()
                    .map_or("-", |x| { x.detector.trim_start_matches("DETECTOR_") }),
                a.time_to_detect_ms.map_or_else(|| "-".into(), time),
                time(a.ttd_bound_ms),
                a.bytes_before_alert
                    .map_or_else(|| "-".into(), |b| b.to_string()),
                a.bytes_total
            );
        }
        let _ = writeln!(
            s,
            "alerts: {} listed, {} false, {} service (workload volume changes)",
            self.alerts_total,
            self.false_alerts.len(),
            self.service_alerts.len()
        );
        // Service alerts are not the client list an operator reads: a count per detector.
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &self.service_alerts {
            *per.entry(f.detector.trim_start_matches("DETECTOR_"))
                .or_default() += 1;
        }
        if !per.is_empty() {
            let list: Vec<String> = per.iter().map(|(d, n)| format!("{d} {n}")).collect();
            let _ = writeln!(s, "  service: {} (with --json: each)", list.join(", "));
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

/// `a` with its times back in the model's (`SimConfig::offset_ms` taken off).
pub(crate) fn in_model_time(mut a: v1::Alert, offset_ms: u64) -> v1::Alert {
    a.first_seen_ms = a.first_seen_ms.saturating_sub(offset_ms);
    a.last_seen_ms = a.last_seen_ms.saturating_sub(offset_ms);
    a
}

/// Whether `al` (its times the model's: [`in_model_time`]) detects `atk`: a client alert on
/// an attacker's key, opened once the attack was under way. (A cohort's key names its traits;
/// its members are in `client_addrs`.)
pub(crate) fn detects(al: &v1::Alert, atk: &model::Attack) -> bool {
    let members = || {
        al.client_addrs
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .any(|a| atk.addrs.contains(&a))
    };
    al.scope != v1::Scope::Service as i32
        && al.first_seen_ms >= atk.start_ms
        && (atk.addrs.iter().any(|a| crate::key_covers(&al.key, *a)) || members())
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
    let alerts = alerts.map(|list| {
        list.into_iter()
            .map(|a| in_model_time(a, cfg.offset_ms))
            .collect::<Vec<_>>()
    });
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
    let service = |al: &v1::Alert| al.scope == v1::Scope::Service as i32;
    let attacks = generator
        .attacks
        .iter()
        .map(|atk| {
            let first = alerts
                .iter()
                .filter(|al| detects(al, atk))
                .min_by_key(|al| al.first_seen_ms);
            let ttd = first.map(|al| al.first_seen_ms.saturating_sub(atk.start_ms));
            let before = first.map(|al| {
                atk.cumulative
                    .iter()
                    .take_while(|(end, _)| *end <= al.first_seen_ms)
                    .last()
                    .map_or(0, |(_, b)| *b)
            });
            let bound = ttd_bound(atk, params);
            AttackReport {
                ttd_bound_ms: bound,
                in_time: ttd.is_some_and(|t| t <= bound),
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
    let (service_alerts, false_alerts): (Vec<&v1::Alert>, Vec<&v1::Alert>) = alerts
        .iter()
        .filter(|al| !generator.attacks.iter().any(|a| detects(al, a)))
        .partition(|al| service(al));
    let service_alerts = service_alerts.into_iter().map(AlertView::from).collect();
    let false_alerts = false_alerts.into_iter().map(AlertView::from).collect();
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
        reconnects: 0,
        lookalikes: model::lookalikes()
            .into_iter()
            .map(|l| {
                (
                    l.name.to_owned(),
                    l.addrs.iter().map(ToString::to_string).collect(),
                )
            })
            .collect(),
        benign: generator.benign.clone(),
        alerts_error,
        alerts_code,
        alerts_total: alerts.len(),
        attacks,
        false_alerts,
        service_alerts,
        host_totals,
        client_totals: generator.client_totals_sorted(),
        steps: generator.steps,
    }
}
