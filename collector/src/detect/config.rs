//! `[detect]`: what applies to every detector, and each detector's section (defined beside
//! its detector).
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    MIB, allowlist::AllowlistConfig, cohort::CohortConfig, coordinated::CoordinatedConfig,
    deviation::DeviationConfig, sustained::SustainedConfig, volume::VolumeConfig,
};
use crate::config_error::{ConfigError, invalid};

/// `[detect]`: bulk-exfiltration detection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// Run the detectors at all.
    pub enabled: bool,
    /// Batch time between two judgements: subjects are judged at every multiple of it, on
    /// what was applied up to it.
    #[serde(with = "humantime_serde")]
    pub eval_interval: Duration,
    /// An alert resolves once its condition has been false for this long (batch time).
    #[serde(with = "humantime_serde")]
    pub resolve_after: Duration,
    /// An hour with at least this many response bytes counts as an active hour.
    pub active_hour_bytes: u64,
    /// A prefix whose bytes in the judged window come this much (0..=1) from one member is
    /// not flagged by volume, deviation or sustained: that member is judged on its own.
    pub dominant_member_share: f64,
    pub volume: VolumeConfig,
    pub coordinated: CoordinatedConfig,
    pub deviation: DeviationConfig,
    pub sustained: SustainedConfig,
    pub cohort: CohortConfig,
    pub allowlist: AllowlistConfig,
    /// The webhook moved to the top-level `[webhook]` section: a config that still has
    /// `[detect.webhook]` is refused with a message that says so.
    #[serde(skip_serializing)]
    pub webhook: Option<serde::de::IgnoredAny>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            eval_interval: Duration::from_secs(60),
            resolve_after: Duration::from_secs(15 * 60),
            active_hour_bytes: MIB,
            dominant_member_share: 0.8,
            volume: VolumeConfig::default(),
            coordinated: CoordinatedConfig::default(),
            deviation: DeviationConfig::default(),
            sustained: SustainedConfig::default(),
            cohort: CohortConfig::default(),
            allowlist: AllowlistConfig::default(),
            webhook: None,
        }
    }
}

impl DetectConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.webhook.is_some() {
            return Err(invalid(
                "detect.webhook",
                "moved to the top-level [webhook] section (same fields): rename [detect.webhook] to [webhook]",
            ));
        }
        if self.eval_interval < Duration::from_secs(1) {
            return Err(invalid("detect.eval_interval", "must be at least 1s"));
        }
        let pos = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    field,
                    format!("must be a positive number (got {v})"),
                ))
            }
        };
        pos("detect.coordinated.factor", self.coordinated.factor)?;
        pos("detect.deviation.sigmas", self.deviation.sigmas)?;
        pos(
            "detect.deviation.baseline_hours",
            self.deviation.baseline_hours,
        )?;
        pos("detect.deviation.min_sigma", self.deviation.min_sigma)?;
        pos("detect.sustained.ratio_factor", self.sustained.ratio_factor)?;
        pos(
            "detect.sustained.cusum_threshold",
            self.sustained.cusum_threshold,
        )?;
        if !(self.sustained.cusum_slack.is_finite() && self.sustained.cusum_slack >= 0.0) {
            return Err(invalid(
                "detect.sustained.cusum_slack",
                "must be a number ≥ 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.dominant_member_share) {
            return Err(invalid(
                "detect.dominant_member_share",
                format!("must be in 0..=1 (got {})", self.dominant_member_share),
            ));
        }
        if !(0.0..=1.0).contains(&self.coordinated.min_synchrony) {
            return Err(invalid(
                "detect.coordinated.min_synchrony",
                format!("must be in 0..=1 (got {})", self.coordinated.min_synchrony),
            ));
        }
        if self.sustained.min_active_hours > 24 {
            return Err(invalid(
                "detect.sustained.min_active_hours",
                format!(
                    "must be at most 24 (got {})",
                    self.sustained.min_active_hours
                ),
            ));
        }
        if self.active_hour_bytes == 0 {
            return Err(invalid("detect.active_hour_bytes", "must be at least 1"));
        }
        self.volume.validate()?;
        self.coordinated.validate()?;
        self.cohort.validate()?;
        self.allowlist.validate()
    }

    /// Batch time between two judgements, ms.
    pub fn eval_interval_ms(&self) -> u64 {
        u64::try_from(self.eval_interval.as_millis()).unwrap_or(u64::MAX)
    }

    /// The batch time of the first judgement after `end_ms`: the next multiple of
    /// `eval_interval`.
    pub fn next_judgement(&self, end_ms: u64) -> u64 {
        let every = self.eval_interval_ms().max(1);
        (end_ms / every).saturating_add(1).saturating_mul(every)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_fields_are_named() {
        DetectConfig::default().validate().unwrap();
        let mut c = DetectConfig::default();
        c.coordinated.min_synchrony = 2.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("detect.coordinated.min_synchrony"), "{e}");
    }
}
