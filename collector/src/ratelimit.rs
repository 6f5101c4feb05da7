//! Per-agent rate limits: token buckets on batches per second and deltas per second.
use std::time::Instant;

use crate::config::LimitsConfig;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }
}

/// An agent's limits.
#[derive(Debug, Clone)]
pub struct AgentLimiter {
    batches: Option<TokenBucket>,
    deltas: Option<TokenBucket>,
}

impl AgentLimiter {
    /// Limits from the config (a rate of 0 is no limit).
    pub fn new(limits: &LimitsConfig, now: Instant) -> Self {
        let bucket =
            |rate: f64, burst: u64| (rate > 0.0).then(|| TokenBucket::new(rate, burst as f64, now));
        Self {
            batches: bucket(limits.batches_per_second, limits.batch_burst),
            deltas: bucket(limits.deltas_per_second, limits.delta_burst),
        }
    }

    /// Takes one batch of `deltas` if both buckets allow it (takes nothing otherwise); the
    /// error says which limit was hit.
    pub fn check(&mut self, deltas: usize, now: Instant) -> Result<(), String> {
        let n = deltas as f64;
        if let Some(b) = &mut self.batches {
            b.refill(now);
            if b.tokens < 1.0 {
                return Err(format!(
                    "more than {} batches/s (burst {})",
                    b.rate, b.burst
                ));
            }
        }
        if let Some(d) = &mut self.deltas {
            d.refill(now);
            if d.tokens < n {
                return Err(format!("more than {} deltas/s (burst {})", d.rate, d.burst));
            }
            d.tokens -= n;
        }
        if let Some(b) = &mut self.batches {
            b.tokens -= 1.0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn buckets_refill_at_rate() {
        let t0 = Instant::now();
        let limits = LimitsConfig {
            batches_per_second: 2.0,
            batch_burst: 3,
            deltas_per_second: 100.0,
            delta_burst: 150,
            ..Default::default()
        };
        let mut l = AgentLimiter::new(&limits, t0);
        for _ in 0..3 {
            l.check(10, t0).unwrap();
        }
        assert!(l.check(10, t0).unwrap_err().contains("batches/s"));
        let t1 = t0 + Duration::from_millis(500);
        l.check(10, t1).unwrap();
        assert!(l.check(0, t1).is_err());
        let t2 = t1 + Duration::from_secs(10);
        assert!(l.check(151, t2).unwrap_err().contains("deltas/s"));
        l.check(150, t2).unwrap();
        let unlimited = LimitsConfig {
            batches_per_second: 0.0,
            deltas_per_second: 0.0,
            ..Default::default()
        };
        let mut u = AgentLimiter::new(&unlimited, t0);
        for _ in 0..10_000 {
            u.check(100_000, t0).unwrap();
        }
    }
}
