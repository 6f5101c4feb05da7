//! **Cohort**: clients that share no prefix but behave as one — the same steady hourly
//! volume, the same response size per connection — together far above the
//! per-client limit while each is under it: a proxy pool of unrelated addresses, or a group
//! of accounts.
//!
//! Streaming, on batch time: each time a client (an address, or a client id) is judged, its
//! traits are read from its rollup. A client is a candidate when it was steady over the
//! `steady_minutes` before the judgement's 5-minute bucket (each 5 minutes at the rate of at
//! least `min_member_bytes_per_hour`, the largest at most `max_spread` times the smallest).
//! Its traits put it in a bin: log2 of its bytes per hour in half octaves, log2 of its
//! response bytes per closed connection over 24 h in octaves (a pool's connections live for
//! different times). A cohort is the candidates of a bin and its 8 neighbours (judged in the
//! last hour), named by its middle bin; so members whose rates differ by less than half an
//! octave and whose sizes by less than an octave always share one. Request sizes are not
//! keyed on: a prompt is anything from a few hundred bytes to tens of kilobytes, in a pool as
//! anywhere. Neighbouring cohorts overlap: only one whose bytes are the most among its
//! neighbours' raises an alert, and an open one keeps it while it holds, so one group gives one
//! alert, even as its members drift across the edge of a bin.
//!
//! Memory: one entry per candidate (a steady client), not per client; cost per judged client:
//! a few arithmetic operations over its 24 hourly buckets, and per judgement, for each bin a
//! candidate moved in or out of, its neighbourhood's members summed 9 times.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    HOUR_MS, MIB,
    finding::{DetectorKind, Finding, HourBytes, Severity, VIA_SHOWN, Verdict, Via, human},
    subject::{CohortKey, Subject},
};
use crate::{
    aggregate::Map,
    config_error::{ConfigError, invalid},
    keys::Prefix,
    window::{Totals, Window},
};

/// `[detect.cohort]`: groups of unrelated clients that behave as one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CohortConfig {
    pub enabled: bool,
    /// The cohort's 1 h total must be this many times `volume.client_per_hour`.
    pub factor: f64,
    /// Members judged in the last hour.
    pub min_members: u64,
    /// Distinct /24s (IPv4) or /64s (IPv6) among an address cohort's members: fewer, and the
    /// prefix detectors judge them.
    pub min_prefixes: u64,
    /// A candidate pulls at this rate or more in each 5 minutes...
    pub min_member_bytes_per_hour: u64,
    /// ...of this many minutes (a multiple of 5) before the current 5 minutes...
    pub steady_minutes: u32,
    /// ...with its largest 5 minutes at most this many times its smallest.
    pub max_spread: f64,
}

impl Default for CohortConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            factor: 4.0,
            min_members: 8,
            min_prefixes: 4,
            min_member_bytes_per_hour: 16 * MIB,
            steady_minutes: 30,
            max_spread: 2.0,
        }
    }
}

impl CohortConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.factor.is_finite() && self.factor > 0.0) {
            return Err(invalid(
                "detect.cohort.factor",
                format!("must be a positive number (got {})", self.factor),
            ));
        }
        if !(5..=55).contains(&self.steady_minutes) || !self.steady_minutes.is_multiple_of(5) {
            return Err(invalid(
                "detect.cohort.steady_minutes",
                format!(
                    "must be a multiple of 5 from 5 to 55 (got {})",
                    self.steady_minutes
                ),
            ));
        }
        if !(self.max_spread.is_finite() && self.max_spread >= 1.0) {
            return Err(invalid(
                "detect.cohort.max_spread",
                format!("must be a number ≥ 1 (got {})", self.max_spread),
            ));
        }
        if self.min_members < 2 {
            return Err(invalid("detect.cohort.min_members", "must be at least 2"));
        }
        Ok(())
    }
}

/// A candidate's traits, in log2 units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Traits {
    /// Response bytes per hour over its steady minutes.
    pub rate: f64,
    /// Response and request bytes per closed connection over 24 h (`None` without a closed
    /// connection: its connections outlive the window).
    pub per_conn: Option<(f64, f64)>,
}

/// The traits of a client whose 1 h window's 5-minute buckets are `buckets` (start, totals;
/// any order) and whose 24 h window is `day`, judged at `end_ms`; `None` if it is no
/// candidate.
pub fn traits(
    cfg: &CohortConfig,
    buckets: &[(u64, Totals)],
    day: &Totals,
    end_ms: u64,
) -> Option<Traits> {
    const FIVE_MIN: u64 = 300_000;
    let n = u64::from(cfg.steady_minutes / 5);
    let cur = end_ms / FIVE_MIN * FIVE_MIN;
    let min = cfg.min_member_bytes_per_hour / 12;
    let (mut lo, mut hi, mut sum) = (u64::MAX, 0u64, 0u64);
    for k in 1..=n {
        let start = cur.checked_sub(k * FIVE_MIN)?;
        let b = buckets
            .iter()
            .find(|x| x.0 == start)
            .map_or(0, |x| x.1.response_bytes);
        if b < min.max(1) {
            return None;
        }
        (lo, hi, sum) = (lo.min(b), hi.max(b), sum.saturating_add(b));
    }
    if hi as f64 > cfg.max_spread * lo as f64 {
        return None;
    }
    let per_conn = (day.connections_closed > 0).then(|| {
        let c = day.connections_closed as f64;
        (
            (day.response_bytes as f64 / c).max(1.0).log2(),
            (day.request_bytes as f64 / c).max(1.0).log2(),
        )
    });
    Some(Traits {
        rate: (sum as f64 * 12.0 / n as f64).log2(),
        per_conn,
    })
}

/// Rate bins per octave (sizes have one).
const RATE_BINS: f64 = 2.0;

/// The bin of `t`.
pub fn key_of(t: &Traits, ids: bool) -> CohortKey {
    // Without closed connections, the size bin is a value no log2 reaches.
    let bin = |x: f64| x.floor().clamp(-30_000.0, 30_000.0) as i16;
    CohortKey {
        ids,
        rate: bin(t.rate * RATE_BINS),
        size: t.per_conn.map_or(i16::MIN, |p| bin(p.0)),
        req: 0,
    }
}

/// `key` and its 8 neighbours (fewer at the edges of the bins: a client without closed
/// connections has no neighbours in size).
fn neighbourhood(key: &CohortKey) -> impl Iterator<Item = CohortKey> + '_ {
    (-1i16..=1).flat_map(move |dr| {
        (-1i16..=1).flat_map(move |ds| {
            (0i16..=0).filter_map(move |dq| {
                Some(CohortKey {
                    ids: key.ids,
                    rate: key.rate.checked_add(dr)?,
                    size: key.size.checked_add(ds)?,
                    req: key.req.checked_add(dq)?,
                })
            })
        })
    })
}

/// A client as one judgement saw it: the cohort its traits put it in (or none), and its 1 h
/// response bytes. What [`Cohorts::see`] takes, and what a cluster's aggregators hand the
/// second stage, which judges cohorts across every partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub member: Subject,
    pub key: Option<CohortKey>,
    pub h1: u64,
}

/// A member at its last judgement.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// Response bytes of its 1 h window.
    h1: u64,
    at_ms: u64,
}

/// Every cohort's members.
#[derive(Debug, Default)]
pub struct Cohorts {
    of: Map<Subject, CohortKey>,
    groups: Map<CohortKey, Map<Subject, Member>>,
    /// Cohorts whose members changed since the last [`Cohorts::take_touched`].
    touched: Vec<CohortKey>,
}

/// A cohort at one judgement.
#[derive(Debug, Clone, Default)]
pub struct CohortStats {
    /// Members judged in the last hour, their 1 h bytes, the largest member's.
    pub members: u64,
    pub bytes: u64,
    pub max_member: u64,
    /// Distinct /24s or /64s of an address cohort's members.
    pub prefixes: u64,
    /// The members with the most bytes, most first (at most [`VIA_SHOWN`]).
    pub top: Vec<Subject>,
}

/// One bin's members in the 1 h window.
#[derive(Debug, Clone, Default)]
struct BinSummary {
    members: u64,
    bytes: u64,
    max_member: u64,
    /// Distinct /24s or /64s of its address members.
    prefixes: u64,
    /// Its members with the most bytes (at most [`VIA_SHOWN`]), most first.
    top: Vec<(u64, Subject)>,
}

/// The cohorts as one judgement sees them: every bin is summarized once, and a cohort (nine
/// bins) adds up their summaries, so judging every cohort costs one pass over the candidates.
pub struct Judging<'a> {
    cohorts: &'a Cohorts,
    end_ms: u64,
    bins: Map<CohortKey, BinSummary>,
}

impl Judging<'_> {
    fn bin(&mut self, key: &CohortKey) -> &BinSummary {
        let (c, end) = (self.cohorts, self.end_ms);
        self.bins.entry(*key).or_insert_with(|| c.summary(key, end))
    }

    /// Cohort `key` (its bin and neighbours). Its prefixes are the sum of each bin's distinct
    /// ones (a prefix with members in two bins counts twice).
    pub fn stats(&mut self, key: &CohortKey) -> CohortStats {
        let mut s = CohortStats::default();
        let mut top: Vec<(bool, u64, Subject)> = Vec::new();
        for bin in neighbourhood(key) {
            let b = self.bin(&bin);
            s.members += b.members;
            s.bytes = s.bytes.saturating_add(b.bytes);
            s.max_member = s.max_member.max(b.max_member);
            s.prefixes += b.prefixes;
            top.extend(b.top.iter().map(|(h1, m)| (bin == *key, *h1, m.clone())));
        }
        // The middle bin's members first: they are what names the cohort.
        top.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        s.top = top.into_iter().take(VIA_SHOWN).map(|x| x.2).collect();
        s
    }

    /// What ranks cohorts: its own bin's bytes, then its neighbourhood's.
    pub fn score(&mut self, key: &CohortKey) -> (u64, u64) {
        let own = self.bin(key).bytes;
        let all = neighbourhood(key).map(|b| self.bin(&b).bytes).sum();
        (own, all)
    }
}

impl Cohorts {
    /// Records `member` judged at `at_ms` with `h1` bytes in its hour: in cohort `key`, or in
    /// none.
    pub fn see(&mut self, member: &Subject, key: Option<CohortKey>, h1: u64, at_ms: u64) {
        let old = self.of.get(member).copied();
        if old != key
            && let Some(old) = old
        {
            if let Some(g) = self.groups.get_mut(&old) {
                g.remove(member);
                if g.is_empty() {
                    self.groups.remove(&old);
                }
            }
            self.of.remove(member);
            self.touched.push(old);
        }
        if let Some(key) = key {
            self.of.insert(member.clone(), key);
            self.groups
                .entry(key)
                .or_default()
                .insert(member.clone(), Member { h1, at_ms });
            self.touched.push(key);
        }
    }

    /// The cohorts to judge: those whose neighbourhood holds a bin that changed since the
    /// last call, sorted.
    pub fn take_touched(&mut self) -> Vec<CohortKey> {
        let mut t = std::mem::take(&mut self.touched);
        t.sort_unstable();
        t.dedup();
        let mut out: Vec<CohortKey> = t.iter().flat_map(neighbourhood).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The cohorts to judge: [`Cohorts::take_touched`]'s and those of `open` (the open
    /// alerts' subjects, so that they resolve), sorted.
    pub fn take_to_judge(&mut self, open: &[Subject]) -> Vec<CohortKey> {
        let mut keys = self.take_touched();
        keys.extend(open.iter().filter_map(|s| match s {
            Subject::Cohort(k) => Some(*k),
            _ => None,
        }));
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The summary of bin `key` in the 1 h window ending at `end_ms`: one pass over its
    /// members.
    fn summary(&self, key: &CohortKey, end_ms: u64) -> BinSummary {
        let mut b = BinSummary::default();
        let Some(g) = self.groups.get(key) else {
            return b;
        };
        let start = Window::H1.start_ms(end_ms);
        let mut prefixes: Vec<Prefix> = Vec::new();
        for (m, v) in g {
            if v.at_ms < start {
                continue;
            }
            b.members += 1;
            b.bytes = b.bytes.saturating_add(v.h1);
            b.max_member = b.max_member.max(v.h1);
            if let Subject::Client(a) = m {
                prefixes.push(Prefix::of(*a));
            }
            b.top.push((v.h1, m.clone()));
        }
        prefixes.sort_unstable();
        prefixes.dedup();
        b.prefixes = prefixes.len() as u64;
        b.top
            .sort_unstable_by(|a, c| c.0.cmp(&a.0).then_with(|| a.1.cmp(&c.1)));
        b.top.truncate(VIA_SHOWN);
        b
    }

    /// A judgement's view of the cohorts at `end_ms`: each bin summarized once.
    pub fn judging(&self, end_ms: u64) -> Judging<'_> {
        Judging {
            cohorts: self,
            end_ms,
            bins: Map::default(),
        }
    }

    /// Whether cohort `key` ranks first among its neighbours by `score` (its own bin's bytes,
    /// then its neighbourhood's; ties: the smaller key), so that the overlapping cohorts of
    /// one group give one alert, centred on its densest bin.
    pub fn is_peak(key: &CohortKey, score: &mut impl FnMut(&CohortKey) -> (u64, u64)) -> bool {
        let own = score(key);
        neighbourhood(key).filter(|n| n != key).all(|n| {
            let s = score(&n);
            s < own || (s == own && *key < n)
        })
    }

    /// Drops members not judged in the last 24 hours before `end_ms`.
    pub fn prune(&mut self, end_ms: u64) {
        let start = Window::H24.start_ms(end_ms);
        let of = &mut self.of;
        self.groups.retain(|_, g| {
            g.retain(|m, v| {
                let keep = v.at_ms >= start;
                if !keep {
                    of.remove(m);
                }
                keep
            });
            !g.is_empty()
        });
    }

    /// Candidates held (for the cost per client).
    pub fn len(&self) -> usize {
        self.of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.of.is_empty()
    }
}

/// `~48.0 MiB/h each, ~12.0 MiB of responses per connection`.
fn describe(key: &CohortKey) -> String {
    let rate = human(((f64::from(key.rate) + 0.5) / RATE_BINS).exp2() as u64);
    if key.size == i16::MIN {
        format!("~{rate}/h each, over long-lived connections")
    } else {
        let size = human((f64::from(key.size) + 0.5).exp2() as u64);
        format!("~{rate}/h each, ~{size} of responses per connection")
    }
}

/// Judges the cohorts `keys` (sorted) of `cohorts` at `at_ms`: a finding only for a cohort that
/// holds and either has an alert open (in `open`, sorted: the open alerts' subjects; each has a
/// verdict, so that it resolves) or ranks first among its neighbours with no open cohort still
/// holding within two bins of it (their neighbourhoods overlap). So one group gives one alert
/// even while its members drift across the edge of a bin (a pool's response size per
/// connection settles as its first connections close), which moves its peak to a neighbour.
pub fn judge_all(
    cfg: &CohortConfig,
    client_per_hour: u64,
    cohorts: &Cohorts,
    keys: &[CohortKey],
    at_ms: u64,
    open: &[Subject],
    out: &mut Vec<Verdict>,
) {
    let mut judging = cohorts.judging(at_ms);
    let is_open = |k: &CohortKey| open.binary_search(&Subject::Cohort(*k)).is_ok();
    let mut holding = Vec::new();
    if cfg.enabled {
        for k in keys.iter().filter(|k| is_open(k)) {
            if judge(cfg, client_per_hour, k, &judging.stats(k)).is_some() {
                holding.push(*k);
            }
        }
    }
    for k in keys {
        let subject = Subject::Cohort(*k);
        let open_here = is_open(k);
        let finding = if cfg.enabled {
            judge(cfg, client_per_hour, k, &judging.stats(k)).filter(|_| {
                open_here
                    || (!holding.iter().any(|o| overlaps(o, k))
                        && Cohorts::is_peak(k, &mut |x: &CohortKey| judging.score(x)))
            })
        } else {
            None
        };
        if finding.is_none() && !open_here {
            continue;
        }
        out.push(Verdict {
            subject,
            detector: DetectorKind::Cohort,
            finding,
            // A cohort's bytes are its members'.
            hours: HourBytes {
                hour: at_ms / HOUR_MS,
                ..HourBytes::default()
            },
        });
    }
}

/// Whether cohorts `a` and `b` share bins: within two bins of each other on every trait.
fn overlaps(a: &CohortKey, b: &CohortKey) -> bool {
    let near = |x: i16, y: i16| (i32::from(x) - i32::from(y)).abs() <= 2;
    a.ids == b.ids && near(a.rate, b.rate) && near(a.size, b.size) && near(a.req, b.req)
}

/// The finding, if the cohort's 1 h total is `factor` × the per-client limit with no member
/// over it, with enough members (in enough prefixes).
pub fn judge(
    cfg: &CohortConfig,
    client_per_hour: u64,
    key: &CohortKey,
    s: &CohortStats,
) -> Option<Finding> {
    let thr = (cfg.factor * client_per_hour as f64) as u64;
    let holds = client_per_hour > 0
        && s.bytes >= thr
        && s.max_member < client_per_hour
        && s.members >= cfg.min_members
        && (key.ids || s.prefixes >= cfg.min_prefixes);
    if !holds {
        return None;
    }
    let addrs: Vec<IpAddr> = s
        .top
        .iter()
        .filter_map(|m| match m {
            Subject::Client(a) => Some(*a),
            _ => None,
        })
        .collect();
    let names: Vec<String> = s
        .top
        .iter()
        .map(|m| match m {
            Subject::Client(a) => a.to_string(),
            Subject::ClientId(id) => id.to_string(),
            _ => String::new(),
        })
        .collect();
    let more = s.members.saturating_sub(names.len() as u64);
    let (what, spread) = if key.ids {
        ("client ids".to_owned(), String::new())
    } else {
        (
            "addresses".to_owned(),
            format!(" in {} prefixes", s.prefixes),
        )
    };
    Some(Finding {
        severity: Severity::of_group(s.bytes, thr),
        window_seconds: 3600,
        observed_bytes: s.bytes,
        baseline_bytes: s.max_member,
        threshold_bytes: thr,
        request_bytes: 0,
        hosts: Vec::new(),
        members: s.members,
        summary: format!(
            "{key}: {} unrelated {what}{spread} ({}{}) pulled {} of responses in the last hour, none over the {} per-client limit (largest {}), all steady at {} — likely one client spread over a proxy pool or many accounts; review them together and rate-limit the group.",
            s.members,
            names.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            human(s.bytes),
            human(client_per_hour),
            human(s.max_member),
            describe(key),
        ),
        via: Via {
            addr_count: if key.ids { 0 } else { s.members },
            addrs,
            peers: Vec::new(),
            peer_count: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(resp: u64, req: u64, conns: u64) -> Totals {
        Totals {
            response_bytes: resp,
            request_bytes: req,
            connections_closed: conns,
        }
    }

    #[test]
    fn steady_clients_are_candidates_and_near_ones_share_a_cohort() {
        let cfg = CohortConfig::default();
        let end = 10 * 3_600_000 + 60_000;
        // The 6 buckets of 5 minutes before the current one, oldest first.
        let buckets = |b: [u64; 6]| -> Vec<(u64, Totals)> {
            (0..6u64)
                .map(|i| (10 * 3_600_000 - (6 - i) * 300_000, t(b[i as usize], 0, 0)))
                .collect()
        };
        let day = t(200 << 20, 1 << 20, 100);
        let m = 4 << 20;
        let tr = traits(&cfg, &buckets([m, m, m, m + m / 2, m, m]), &day, end).unwrap();
        assert!((tr.rate - ((6.5 * 12.0 / 6.0) * 4.0 * 1048576.0f64).log2()).abs() < 1e-9);
        // A gap, a quiet 5 minutes, or a spread over 2x: no candidate.
        assert!(traits(&cfg, &buckets([m, m, 0, m, m, m]), &day, end).is_none());
        assert!(traits(&cfg, &buckets([m, m, m / 4, m, m, m]), &day, end).is_none());
        assert!(traits(&cfg, &buckets([m, m, m, 3 * m, m, m]), &day, end).is_none());
        // Less than half an octave apart on every trait: both in the cohort of the bin in
        // the middle, wherever the bins fall.
        for base in [20.0, 20.1, 20.25, 20.4, 20.5, 20.6, 20.75, 20.9] {
            let a = Traits {
                rate: base + 5.0,
                per_conn: Some((base, base - 7.0)),
            };
            let b = Traits {
                rate: a.rate + 0.45,
                per_conn: Some((base + 0.45, base - 7.0 + 0.3)),
            };
            let (ka, kb) = (key_of(&a, false), key_of(&b, false));
            let shared = neighbourhood(&ka)
                .filter(|n| neighbourhood(&kb).any(|m| m == *n))
                .count();
            assert!(shared > 0, "{base}");
            assert!(
                neighbourhood(&ka)
                    .any(|c| neighbourhood(&c).any(|x| x == ka)
                        && neighbourhood(&c).any(|x| x == kb)),
                "{base}"
            );
        }
        let k = key_of(
            &Traits {
                rate: 25.3,
                per_conn: None,
            },
            true,
        );
        assert_eq!(CohortKey::parse(&k.to_string()), Some(k));
    }

    #[test]
    fn a_pool_over_many_prefixes_is_one_cohort_and_moves_out_when_it_changes() {
        let mut c = Cohorts::default();
        let key = key_of(
            &Traits {
                rate: 25.6,
                per_conn: Some((22.6, 10.6)),
            },
            false,
        );
        for i in 0..100u8 {
            let m = Subject::Client(IpAddr::from([10, i, 0, 1]));
            c.see(&m, Some(key), 50 << 20, 1_000_000);
        }
        let touched = c.take_touched();
        assert_eq!(touched.len(), 9);
        // Every cohort around the bin holds the pool; the bin's own is the one that alerts.
        let mut j = c.judging(1_000_000);
        let peaks: Vec<&CohortKey> = touched
            .iter()
            .filter(|k| Cohorts::is_peak(k, &mut |x: &CohortKey| j.score(x)))
            .collect();
        assert_eq!(peaks, [&key]);
        let s = c.judging(1_000_000).stats(&key);
        assert_eq!(
            (s.members, s.prefixes, s.bytes),
            (100, 100, 100 * (50 << 20))
        );
        let f = judge(&CohortConfig::default(), 1 << 30, &key, &s).expect("a cohort");
        assert_eq!(f.members, 100);
        assert!(
            f.summary
                .contains("100 unrelated addresses in 100 prefixes"),
            "{}",
            f.summary
        );
        // One leaves (its traits changed): it is in no cohort any more.
        c.see(
            &Subject::Client(IpAddr::from([10, 0, 0, 1])),
            None,
            0,
            1_100_000,
        );
        assert_eq!(c.judging(1_100_000).stats(&key).members, 99);
        assert_eq!(c.len(), 99);
        // An hour later, without being judged again, none counts; a day later none is held.
        assert_eq!(c.judging(1_000_000 + 2 * 3_600_000).stats(&key).members, 0);
        c.prune(1_000_000 + 26 * 3_600_000);
        assert!(c.is_empty());
    }

    #[test]
    fn a_pool_drifting_across_a_bin_edge_keeps_its_one_alert() {
        let cfg = CohortConfig::default();
        let size = |s: f64| {
            key_of(
                &Traits {
                    rate: 25.6,
                    per_conn: Some((s, 10.0)),
                },
                false,
            )
        };
        let (first, then) = (size(23.1), size(22.9));
        assert_ne!(first, then);
        let member = |i: u8| Subject::Client(IpAddr::from([10, i, 0, 1]));
        let mut c = Cohorts::default();
        let mut open: Vec<Subject> = Vec::new();
        let mut opened = Vec::new();
        // Each judgement a tenth more of the pool has settled in the next bin down.
        for step in 0..=10u8 {
            let at = 1_000_000 + u64::from(step) * 300_000;
            for i in 0..100u8 {
                let key = if i < step * 10 { then } else { first };
                c.see(&member(i), Some(key), 50 << 20, at);
            }
            let keys = c.take_to_judge(&open);
            let mut out = Vec::new();
            judge_all(&cfg, 1 << 30, &c, &keys, at, &open, &mut out);
            for v in out.iter().filter(|v| v.finding.is_some()) {
                if !open.contains(&v.subject) {
                    open.push(v.subject.clone());
                    open.sort_unstable();
                    opened.push((step, v.subject.clone()));
                }
            }
            // Every open alert is judged, and holds: the pool is still in its neighbourhood.
            for s in &open {
                assert!(
                    out.iter().any(|v| v.subject == *s && v.finding.is_some()),
                    "step {step}: {s:?} judged without a finding"
                );
            }
        }
        // Its peak moved to the next bin half way; its alert did not.
        assert_eq!(opened, [(0, Subject::Cohort(first))]);
    }
}
