//! What each subject's detectors learn over time: an EWMA baseline of its active hours, a CUSUM
//! of how far above it they run, and, per subject kind, the peers' response/request ratio.
//!
//! Completed hours are folded lazily, when a subject is judged in a later hour: the hourly
//! buckets of its 24 h window hold them until then.
use super::days::Days;
use crate::window::Totals;

/// A subject's baseline (deviation) and slow-rise (sustained) state.
#[derive(Debug, Clone, Default)]
pub struct Track {
    /// Hours before this one are folded into the baseline.
    pub next_hour: u64,
    /// EWMA of log2(response bytes) of active hours, and of its variance.
    pub mean: f64,
    pub var: f64,
    /// Active hours folded (learnt or not).
    pub points: u32,
    /// CUSUM of the standardized log-bytes of active hours.
    pub cusum: f64,
    /// Batch time of the last evaluation (0: never).
    pub last_eval_ms: u64,
    /// What it pulled per day, for the 7-day and 30-day windows.
    pub days: Days,
}

/// Peers' response/request ratio of one subject kind: EWMA of log2 ratio of active hours.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peers {
    pub mean: f64,
    pub n: u32,
}

/// Weight of one active hour in the peers' ratio.
const PEER_ALPHA: f64 = 0.01;

/// The largest log2 ratio of two byte counts (a `u64` over at least 1): a peers' mean beyond it
/// was not learnt from bytes.
pub const MAX_LOG2_RATIO: f64 = 64.0;

impl Peers {
    /// The ratio of several learners' peers together (a cluster's aggregators, each learning
    /// from its own partitions' subjects): their means weighted by how many recent hours each
    /// stands for (its hours, at most the EWMA's span, 1 / its weight), the hours summed. A
    /// learner with no hours, or a mean that is not a number or beyond [`MAX_LOG2_RATIO`]
    /// either way (another aggregator's entry is bytes anyone who may write to the bucket
    /// chooses), counts for nothing.
    pub fn combine<'a>(all: impl IntoIterator<Item = &'a Peers>) -> Peers {
        let (mut sum, mut weights, mut n) = (0.0, 0.0, 0u32);
        for p in all {
            if p.n == 0 || !p.mean.is_finite() || p.mean.abs() > MAX_LOG2_RATIO {
                continue;
            }
            let w = f64::from(p.n).min(1.0 / PEER_ALPHA);
            sum += w * p.mean;
            weights += w;
            n = n.saturating_add(p.n);
        }
        if n == 0 {
            return Peers::default();
        }
        Peers {
            mean: sum / weights,
            n,
        }
    }
}

/// How [`fold`] learns (from `[detect]`, `[detect.deviation]` and `[detect.sustained]`).
#[derive(Debug, Clone, Copy)]
pub struct Learning {
    /// EWMA weight of a new active hour.
    pub alpha: f64,
    /// Hours with fewer response bytes are idle: not learnt.
    pub active_hour_bytes: u64,
    /// Points before the CUSUM runs.
    pub min_history_hours: u32,
    /// Lower bound of σ (log2 units).
    pub min_sigma: f64,
    pub cusum_slack: f64,
    pub cusum_threshold: f64,
}

impl Track {
    /// σ of the baseline, at least `min_sigma`.
    pub fn sigma(&self, min_sigma: f64) -> f64 {
        self.var.sqrt().max(min_sigma)
    }
}

/// Folds the completed hours before `cur_hour` not yet folded into the baseline, the CUSUM
/// and the peers' ratio.
pub fn fold(
    l: &Learning,
    t: &mut Track,
    peers: &mut Peers,
    hours: &[(u64, Totals)],
    cur_hour: u64,
) {
    for (h, tot) in hours {
        if *h < t.next_hour || *h >= cur_hour || tot.response_bytes < l.active_hour_bytes {
            continue;
        }
        let x = (tot.response_bytes as f64).log2();
        // The baseline is frozen while the CUSUM accumulates (so a slow rise is not learnt as
        // normal), until it has run to twice its threshold: then the new level is learnt.
        let mut learn = true;
        if t.points >= l.min_history_hours {
            let sigma = t.sigma(l.min_sigma);
            t.cusum = (t.cusum + (x - t.mean) / sigma - l.cusum_slack).max(0.0);
            learn = t.cusum == 0.0 || t.cusum > 2.0 * l.cusum_threshold;
        }
        if !learn {
            t.points = t.points.saturating_add(1);
            continue;
        }
        if t.points == 0 {
            t.mean = x;
            t.var = 0.0;
        } else {
            let d = x - t.mean;
            t.mean += l.alpha * d;
            t.var = (1.0 - l.alpha) * (t.var + l.alpha * d * d);
        }
        t.points = t.points.saturating_add(1);
        if tot.request_bytes > 0 {
            let r = (tot.response_bytes as f64 / tot.request_bytes as f64).log2();
            if peers.n == 0 {
                peers.mean = r;
            } else {
                peers.mean += PEER_ALPHA * (r - peers.mean);
            }
            peers.n = peers.n.saturating_add(1);
        }
    }
    t.next_hour = t.next_hour.max(cur_hour);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_combine_weighted_by_recent_hours() {
        let p = |mean, n| Peers { mean, n };
        // Equal spans: the mean of the means; the hours add up.
        let c = Peers::combine(&[p(2.0, 100), p(10.0, 300)]);
        assert_eq!((c.mean, c.n), (6.0, 400));
        // Fewer hours than the span weigh less.
        let c = Peers::combine(&[p(2.0, 10), p(10.0, 30)]);
        assert_eq!((c.mean, c.n), (8.0, 40));
        // Nothing learnt, or not a number: counts for nothing.
        let c = Peers::combine(&[p(0.0, 0), p(f64::NAN, 7), p(4.0, 5)]);
        assert_eq!((c.mean, c.n), (4.0, 5));
        let c = Peers::combine(&[p(f64::INFINITY, 3)]);
        assert_eq!((c.mean, c.n), (0.0, 0));
        // Beyond any ratio of two byte counts (a finite mean that would make the weighted sum
        // infinite): counts for nothing; the bounds themselves count.
        let c = Peers::combine(&[p(1e308, 100), p(2.0, 100)]);
        assert_eq!((c.mean, c.n), (2.0, 100));
        let c = Peers::combine(&[p(-MAX_LOG2_RATIO, 100), p(MAX_LOG2_RATIO, 100)]);
        assert_eq!((c.mean, c.n), (0.0, 200));
        // Hours beyond what a u32 holds saturate.
        let c = Peers::combine(&[p(1.0, u32::MAX), p(1.0, u32::MAX)]);
        assert_eq!((c.mean, c.n), (1.0, u32::MAX));
        // One learner alone is itself.
        let c = Peers::combine(&[p(3.5, 61)]);
        assert_eq!((c.mean, c.n), (3.5, 61));
    }
}
