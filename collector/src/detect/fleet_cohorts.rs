//! A cluster's second stage for cohorts: clients of every partition judged as one fleet.
//!
//! A cohort's members are unrelated clients, so they are spread over every partition and every
//! aggregator. Each aggregator judges its clients as one collector does, but leaves cohorts
//! out ([`super::Detector::leave_cohorts_to_second_stage`]): at each judgement it hands over,
//! per partition it holds, what it saw of the clients of that partition ([`Sighting`]s),
//! tagged with the judgement's batch time. This stage takes those summaries from every
//! partition and judges cohorts on them at each judgement time once every partition has been
//! judged up to it, as one collector would have judged them.
//!
//! Deterministic, whatever the order the summaries arrive in and whoever sends them: a
//! partition's summaries at or before the last one taken of it are repeats (a replay after a
//! move, a rebuild, a publish sent again) and are dropped; a judgement at time `t` sees
//! exactly the summaries at or before `t`, added in time and then partition order.
use std::collections::BTreeMap;

use super::{
    DetectConfig, HOUR_MS, Subject, Verdict,
    cohort::{self, Cohorts, Sighting},
    subject::Kind,
};

/// What [`FleetCohorts::add`] did with a summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Kept, to be judged at its time.
    Taken,
    /// At or before the last summary taken of its partition: dropped.
    Repeated,
    /// Of a partition beyond the count: dropped.
    NoSuchPartition,
}

/// The second stage's cohorts.
#[derive(Debug)]
pub struct FleetCohorts {
    cfg: DetectConfig,
    /// Per partition, the time of the last summary taken.
    marks: Vec<Option<u64>>,
    /// Summaries taken and not judged yet, by time, then partition.
    pending: BTreeMap<u64, BTreeMap<u32, Vec<Sighting>>>,
    cohorts: Cohorts,
    /// The time of the last judgement.
    judged_ms: u64,
    last_prune_hour: u64,
}

impl FleetCohorts {
    /// A stage for `partitions` partitions, judging with `cfg`.
    pub fn new(cfg: DetectConfig, partitions: u32) -> FleetCohorts {
        FleetCohorts {
            cfg,
            marks: vec![None; partitions as usize],
            pending: BTreeMap::new(),
            cohorts: Cohorts::default(),
            judged_ms: 0,
            last_prune_hour: 0,
        }
    }

    /// Takes what the aggregator holding `partition` saw of its clients at its judgement at
    /// `at_ms` (nothing, if none was judged: the summary still says the partition got there).
    pub fn add(&mut self, partition: u32, at_ms: u64, seen: Vec<Sighting>) -> Added {
        let Some(mark) = self.marks.get_mut(partition as usize) else {
            return Added::NoSuchPartition;
        };
        // (Nothing is judged past any partition's mark, so this drops what was judged too.)
        if mark.is_some_and(|m| at_ms <= m) {
            return Added::Repeated;
        }
        *mark = Some(at_ms);
        self.pending
            .entry(at_ms)
            .or_default()
            .insert(partition, seen);
        Added::Taken
    }

    /// The time every partition has been judged up to (none until each sent a summary).
    pub fn complete_ms(&self) -> Option<u64> {
        self.marks.iter().copied().min().flatten()
    }

    /// The time of the last judgement (0 before the first).
    pub fn judged_ms(&self) -> u64 {
        self.judged_ms
    }

    /// Judgements not made yet for want of some partition's summary.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// Judges the next time every partition has got to, if any: its time and the verdicts
    /// (findings, and every verdict of a cohort in `open`, the subjects of the open alerts,
    /// sorted). Call again, with the alerts as the verdicts left them, until it gives none.
    pub fn judge_next(&mut self, open: &[Subject]) -> Option<(u64, Vec<Verdict>)> {
        let complete = self.complete_ms()?;
        let entry = self.pending.first_entry()?;
        let at_ms = *entry.key();
        if at_ms > complete {
            return None;
        }
        let open: Vec<Subject> = open
            .iter()
            .filter(|s| s.kind() == Kind::Cohort)
            .cloned()
            .collect();
        for (_, seen) in entry.remove() {
            for s in seen {
                self.cohorts.see(&s.member, s.key, s.h1, at_ms);
            }
        }
        let keys = self.cohorts.take_to_judge(&open);
        let mut verdicts = Vec::new();
        cohort::judge_all(
            &self.cfg.cohort,
            self.cfg.volume.client_per_hour,
            &self.cohorts,
            &keys,
            at_ms,
            &open,
            &mut verdicts,
        );
        self.judged_ms = at_ms;
        if at_ms / HOUR_MS != self.last_prune_hour {
            self.last_prune_hour = at_ms / HOUR_MS;
            self.cohorts.prune(at_ms);
        }
        Some((at_ms, verdicts))
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::detect::{CohortKey, DetectorKind};

    const T0: u64 = 1_750_000_000_000 / HOUR_MS * HOUR_MS;
    const MIN: u64 = 60_000;

    /// A proxy pool of 300 unrelated addresses, each 45 MB an hour (together 13.5 GB, over
    /// 4 × 1 GiB; each far under 1 GiB), in one cohort.
    fn pool() -> Vec<Sighting> {
        let key = CohortKey {
            ids: false,
            rate: 51,
            size: 23,
            req: 0,
        };
        (0..300u32)
            .map(|i| Sighting {
                member: Subject::Client(IpAddr::from([11 + (i % 90) as u8, (i / 90) as u8, 7, 1])),
                key: Some(key),
                h1: 45_000_000,
            })
            .collect()
    }

    /// The pool's members spread over `partitions` (round robin), as summaries at `at_ms`.
    fn spread(partitions: u32, at_ms: u64) -> Vec<(u32, u64, Vec<Sighting>)> {
        let mut parts: Vec<Vec<Sighting>> = vec![Vec::new(); partitions as usize];
        for (i, s) in pool().into_iter().enumerate() {
            parts[i % partitions as usize].push(s);
        }
        parts
            .into_iter()
            .enumerate()
            .map(|(p, seen)| (p as u32, at_ms, seen))
            .collect()
    }

    /// Every judgement ready, with no alert open.
    fn ready(stage: &mut FleetCohorts) -> Vec<(u64, Vec<Verdict>)> {
        std::iter::from_fn(|| stage.judge_next(&[])).collect()
    }

    fn findings(v: &[(u64, Vec<Verdict>)]) -> Vec<(u64, String, u64)> {
        v.iter()
            .flat_map(|(t, vs)| {
                vs.iter().filter_map(move |x| {
                    x.finding.as_ref().map(|f| {
                        assert_eq!(x.detector, DetectorKind::Cohort);
                        (*t, format!("{:?}", x.subject), f.members)
                    })
                })
            })
            .collect()
    }

    #[test]
    fn a_pool_spread_over_partitions_is_judged_once_every_partition_got_there() {
        let mut stage = FleetCohorts::new(DetectConfig::default(), 4);
        let t = T0 + 30 * MIN;
        let parts = spread(4, t);
        // Three of four: a share of the pool, not judged yet.
        for (p, at, seen) in parts[..3].iter().cloned() {
            assert_eq!(stage.add(p, at, seen), Added::Taken);
        }
        assert!(ready(&mut stage).is_empty());
        assert_eq!(stage.waiting(), 1);
        let (p, at, seen) = parts[3].clone();
        assert_eq!(stage.add(p, at, seen), Added::Taken);
        let v = ready(&mut stage);
        let f = findings(&v);
        assert_eq!(f.len(), 1, "{v:#?}");
        assert_eq!((f[0].0, f[0].2), (t, 300));
        // Each partition alone holds 75 members, 3.4 GB: under the cohort's 4 GiB.
        let mut alone = FleetCohorts::new(DetectConfig::default(), 1);
        alone.add(0, t, parts[0].2.clone());
        assert!(findings(&ready(&mut alone)).is_empty());
    }

    #[test]
    fn repeats_and_arrival_order_change_nothing() {
        let judge = |order: &[usize], repeat: bool| {
            let mut stage = FleetCohorts::new(DetectConfig::default(), 3);
            let mut all: Vec<(u32, u64, Vec<Sighting>)> = Vec::new();
            for step in 1..=4u64 {
                all.extend(spread(3, T0 + step * 10 * MIN));
            }
            let mut v = Vec::new();
            for i in order.iter().flat_map(|o| (*o..all.len()).step_by(3)) {
                let (p, at, seen) = all[i].clone();
                stage.add(p, at, seen);
                v.extend(ready(&mut stage));
                if repeat {
                    // A replay sends what was taken again: dropped.
                    let (p, at, seen) = all[i].clone();
                    assert_eq!(stage.add(p, at, seen), Added::Repeated);
                }
            }
            (findings(&v), stage.judged_ms())
        };
        let a = judge(&[0, 1, 2], false);
        assert_eq!(a.1, T0 + 40 * MIN);
        assert!(!a.0.is_empty());
        assert_eq!(judge(&[2, 1, 0], true), a);
        assert_eq!(judge(&[1, 0, 2], false), a);
        let mut stage = FleetCohorts::new(DetectConfig::default(), 3);
        assert_eq!(stage.add(3, T0, Vec::new()), Added::NoSuchPartition);
    }

    #[test]
    fn an_open_cohort_is_judged_until_it_resolves() {
        let mut stage = FleetCohorts::new(DetectConfig::default(), 1);
        let t = T0 + 30 * MIN;
        stage.add(0, t, pool());
        let v = ready(&mut stage);
        let subject = v[0].1[0].subject.clone();
        // The pool stops: nothing seen at the next judgements, but the open cohort's verdict
        // (no finding, once its members left the hour) comes each time.
        stage.add(0, t + 70 * MIN, Vec::new());
        let (at, v) = stage.judge_next(std::slice::from_ref(&subject)).unwrap();
        assert_eq!(at, t + 70 * MIN);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].subject, subject);
        assert!(v[0].finding.is_none());
        assert!(stage.judge_next(&[]).is_none());
    }
}
