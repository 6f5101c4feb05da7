//! **Sustained**: streaming most of the day at a response/request ratio far above the peers',
//! or a CUSUM of the active hours over the baseline: a low-and-slow rise.
use serde::{Deserialize, Serialize};

use super::{
    GIB, HOUR_MS, MIB,
    baseline::{Peers, Track},
    finding::{Finding, Severity, human},
    judged::Judged,
};
use crate::window::{Totals, Window};

/// `[detect.sustained]`: streaming most of the day, or rising slowly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SustainedConfig {
    pub enabled: bool,
    pub min_active_hours: u32,
    pub min_bytes_per_day: u64,
    /// Response/request ratio this many times the peers' (geometric mean).
    pub ratio_factor: f64,
    pub min_peer_samples: u32,
    pub cusum_slack: f64,
    pub cusum_threshold: f64,
    /// The week test: active (≥ `active_day_bytes`) on at least `min_active_days` of the
    /// 7-day window, with ≥ `min_bytes_per_week` in it and a response/request ratio
    /// ≥ `ratio_factor` × the peers'.
    pub min_active_days: u32,
    pub active_day_bytes: u64,
    pub min_bytes_per_week: u64,
}

impl Default for SustainedConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_active_hours: 18,
            min_bytes_per_day: 2 * GIB,
            ratio_factor: 8.0,
            min_peer_samples: 48,
            cusum_slack: 1.0,
            cusum_threshold: 12.0,
            min_active_days: 6,
            active_day_bytes: 256 * MIB,
            min_bytes_per_week: 8 * GIB,
        }
    }
}

/// The finding, if the 24 h window holds enough bytes and either the ratio test or the CUSUM
/// holds. `hours`: the subject's hourly totals; `active_hour_bytes`: what makes an hour active.
pub fn judge(
    cfg: &SustainedConfig,
    active_hour_bytes: u64,
    track: &Track,
    peers: &Peers,
    hours: &[(u64, Totals)],
    j: &Judged<'_>,
) -> Option<Finding> {
    let cur_hour = j.end_ms / HOUR_MS;
    let active = hours
        .iter()
        .filter(|(h, t)| {
            *h + 24 > cur_hour && *h <= cur_hour && t.response_bytes >= active_hour_bytes
        })
        .count() as u32;
    let d1_resp = j.d1_resp;
    let req = j.d1.totals.request_bytes;
    let ratio = d1_resp as f64 / req.max(1) as f64;
    let peer_ratio = peers.mean.exp2();
    let ratio_holds = peers.n >= cfg.min_peer_samples
        && active >= cfg.min_active_hours
        && ratio >= cfg.ratio_factor * peer_ratio;
    let cusum_holds = track.cusum >= cfg.cusum_threshold;
    let holds = d1_resp >= cfg.min_bytes_per_day
        && !j.dominated(Window::H24)
        && (ratio_holds || cusum_holds);
    if !holds {
        return week(cfg, peers, j);
    }
    let baseline = track.mean.exp2() as u64;
    let via = j.via(Window::H24);
    let name = j.title(&via);
    Some(Finding {
        severity: Severity::Medium,
        window_seconds: 86_400,
        observed_bytes: d1_resp,
        baseline_bytes: baseline,
        threshold_bytes: cfg.min_bytes_per_day,
        request_bytes: req,
        hosts: j.hosts(Window::H24),
        members: j.members(),
        summary: if ratio_holds {
            format!(
                "{name}: streamed {} of responses in {active} of the last 24 hours with a response/request ratio of {ratio:.0}:1, {:.0}× its peers' — looks like automated extraction; review the account and consider a daily quota.",
                human(d1_resp),
                ratio / peer_ratio.max(f64::MIN_POSITIVE),
            )
        } else {
            format!(
                "{name}: response volume has risen steadily hour over hour ({} in the last 24 hours, from a baseline of {} per active hour) — a low-and-slow pull; review the account and consider a daily quota.",
                human(d1_resp),
                human(baseline),
            )
        },
        via,
    })
}

/// The week test: steady on most days of the 7-day window, at a ratio far above the peers'.
fn week(cfg: &SustainedConfig, peers: &Peers, j: &Judged<'_>) -> Option<Finding> {
    let w = &j.d7;
    let ratio = w.response_bytes as f64 / w.request_bytes.max(1) as f64;
    let peer_ratio = peers.mean.exp2();
    let holds = cfg.min_bytes_per_week > 0
        && peers.n >= cfg.min_peer_samples
        && w.active_days >= cfg.min_active_days
        && w.response_bytes >= cfg.min_bytes_per_week
        && ratio >= cfg.ratio_factor * peer_ratio;
    if !holds {
        return None;
    }
    let via = j.via(Window::H24);
    Some(Finding {
        severity: Severity::Medium,
        window_seconds: 7 * 86_400,
        observed_bytes: w.response_bytes,
        baseline_bytes: 0,
        threshold_bytes: cfg.min_bytes_per_week,
        request_bytes: w.request_bytes,
        hosts: j.hosts(Window::H24),
        members: j.members(),
        summary: format!(
            "{}: pulled {} of responses on {} of the last 7 days with a response/request ratio of {ratio:.0}:1, {:.0}× its peers' — a steady low-and-slow pull under the daily limits; review the account and consider a weekly quota.",
            j.title(&via),
            human(w.response_bytes),
            w.active_days,
            ratio / peer_ratio.max(f64::MIN_POSITIVE),
        ),
        via,
    })
}
