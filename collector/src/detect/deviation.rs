//! **Deviation**: an hour far above the subject's own baseline of active hours.
use serde::{Deserialize, Serialize};

use super::{
    MIB,
    baseline::Track,
    finding::{Finding, Severity, human},
    judged::Judged,
};
use crate::window::Window;

/// `[detect.deviation]`: far above the key's own hourly baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviationConfig {
    pub enabled: bool,
    pub sigmas: f64,
    /// EWMA span in active hours: α = 2 / (baseline_hours + 1).
    pub baseline_hours: f64,
    pub min_history_hours: u32,
    /// Lower bound of σ, in log2 units (0.5: a factor of 1.41).
    pub min_sigma: f64,
    /// Never alert below this many response bytes in the hour.
    pub floor_bytes_per_hour: u64,
}

impl Default for DeviationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sigmas: 3.0,
            baseline_hours: 24.0,
            min_history_hours: 24,
            min_sigma: 0.5,
            floor_bytes_per_hour: 256 * MIB,
        }
    }
}

/// The finding, if the 1 h window's bytes are over mean + `sigmas` × σ of the baseline (in
/// log2) and over the floor.
pub fn judge(cfg: &DeviationConfig, track: &Track, j: &Judged<'_>) -> Option<Finding> {
    let limit = track.mean + cfg.sigmas * track.sigma(cfg.min_sigma);
    let thr = (limit.exp2() as u64).max(cfg.floor_bytes_per_hour);
    let h1_resp = j.h1_resp;
    let holds = track.points >= cfg.min_history_hours
        && !j.dominated(Window::H1)
        && h1_resp >= cfg.floor_bytes_per_hour
        && (h1_resp as f64).log2() > limit;
    if !holds {
        return None;
    }
    let baseline = track.mean.exp2() as u64;
    let via = j.via(Window::H1);
    Some(Finding {
        severity: Severity::by_ratio(h1_resp, thr).min(Severity::High),
        window_seconds: 3600,
        observed_bytes: h1_resp,
        baseline_bytes: baseline,
        threshold_bytes: thr,
        request_bytes: j.h1.totals.request_bytes,
        hosts: j.hosts(Window::H1),
        members: j.members(),
        summary: format!(
            "{}: pulled {} of responses in the last hour, {:.0}× its usual {} per active hour (alert above {}) — check whether it started bulk extraction and rate-limit it if so.",
            j.title(&via),
            human(h1_resp),
            h1_resp as f64 / baseline.max(1) as f64,
            human(baseline),
            human(thr),
        ),
        via,
    })
}
