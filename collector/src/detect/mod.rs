//! Bulk-exfiltration detection on batch time.
//!
//! Everything here runs on the store writer thread, on BATCH time, never the wall clock: a
//! week of traffic replays in seconds. The writer calls [`Detector::observe`] after each group
//! commit and [`Detector::judge`] at every multiple of `eval_interval` [1 min] of batch time,
//! once the first later batch arrived (and before it is applied): the same batches in the same
//! order give the same verdicts, however they were grouped into commits.
//!
//! # Subjects
//!
//! A [`Subject`] is what may be flagged: a client address (/32, /128), a client prefix (/24
//! IPv4, /64 IPv6, both aggregated by the collector), a wider prefix (IPv4 /20 and /16, IPv6
//! /48, /40 and /32 [configurable], summed here from what each commit added to the /24s and
//! /64s), a client id, a cohort (clients in no shared prefix that behave as one), or a
//! workload (host/cgroup/comm: its findings are service alerts, not client alerts). Client
//! addresses are the clients the agents attributed the bytes to, not the gateways they came
//! through; gateways (TCP peers) are not subjects: their bytes are their clients'. Its
//! windows come from its [`Rollup`] (the 1 h window in 5-min buckets, the 24 h window in
//! hourly buckets) and from its daily totals ([`days`], 7 and 30 days). A finding of a client
//! id names its addresses and gateways, one of a client address the gateways it came through
//! ([`Via`]).
//!
//! # Detectors
//!
//! Each in its module, with its config and defaults: [`volume`] (1 h, 24 h, 7-day and 30-day
//! limits per kind, and per known client), [`coordinated`] (a prefix far over the per-client
//! limit with no member over it, members in step), [`cohort`] (the same across unrelated
//! networks: steady clients alike in rate and response size), [`deviation`] (an hour far over
//! the subject's own baseline), [`sustained`] (streaming most of the day or most of the week at
//! a ratio far over the peers', or a slow rise by CUSUM). collector/README.md gives every
//! default and why.
//!
//! A prefix whose bytes in the judged window come for ≥ `dominant_member_share` [0.8] from one
//! member is not flagged by volume, deviation or sustained: that member is judged on its own.
//!
//! An allowlisted subject (`allowlist.cidrs` contains it, it is one of `allowlist.client_ids`,
//! or its workload name starts with one of `allowlist.workloads`) is never flagged.
//!
//! # Modules
//!
//! The detectors read one [`judged::Judged`] per subject and judgement, and the learnt state
//! of [`baseline`] and [`days`], stored by [`persist`]. [`subject`] says what may be flagged,
//! [`finding`] what a detector says, [`allowlist`] what is never flagged, and [`config`]
//! gathers `[detect]`. [`fleet_cohorts`] judges cohorts over every partition of a cluster (its
//! second stage: an aggregator's detector leaves cohorts out and hands over what it saw of its
//! clients). This module is the engine: which subjects are judged when, and the state kept
//! between judgements.
//!
//! # Cost
//!
//! A judgement judges each subject touched since the last one once, and the subjects of open
//! alerts (so that alerts of keys that went quiet resolve): a few window sums over its ≤ 56
//! buckets and a fold of its new hours, plus, for a prefix, one lookup per member seen in the
//! last hour, and one pass over the cohort candidates. BENCHMARKS.md has the figures at 100k
//! and 1M active clients.
pub mod allowlist;
pub mod baseline;
pub mod cohort;
pub mod config;
pub mod coordinated;
pub mod days;
pub mod deviation;
pub mod finding;
pub mod fleet_cohorts;
pub mod judged;
pub mod persist;
pub mod subject;
pub mod sustained;
pub mod volume;

use std::{borrow::Cow, collections::HashSet, net::IpAddr};

use ipnet::IpNet;

pub use self::cohort::Sighting;
pub use self::{
    baseline::Peers,
    config::DetectConfig,
    finding::{DetectorKind, Finding, HourBytes, Severity, VIA_SHOWN, Verdict, Via, human},
    subject::{CohortKey, Subject, wide_of},
};
use self::{
    baseline::{Learning, Track},
    coordinated::Members,
    judged::Judged,
    subject::Kind,
};
use crate::{
    aggregate::{Map, State},
    keys::{Key, Prefix},
    window::{Rollup, Totals, Window},
};

pub(crate) const HOUR_MS: u64 = 3_600_000;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// The detection engine (owned by the store writer).
#[derive(Debug)]
pub struct Detector {
    cfg: DetectConfig,
    tracks: Map<Subject, Track>,
    /// The wider prefixes' totals, from the client addresses of each applied batch.
    wide: Map<IpNet, Rollup>,
    members: Map<Subject, Members>,
    peers: [Peers; 5],
    /// In a cluster's aggregator: what the other aggregators learnt of their peers (see
    /// [`Detector::set_others_peers`]); the sustained detector judges against all of it.
    others: Vec<[Peers; 5]>,
    /// Subjects touched since the last judgement: each once, however many commits touched it.
    pending: HashSet<Subject, foldhash::fast::RandomState>,
    last_prune_hour: u64,
    /// Batch time up to which the tracks were saved, and the tracks dropped since.
    saved_ms: u64,
    dropped: Vec<Subject>,
    /// Steady clients by their traits.
    cohorts: cohort::Cohorts,
    /// Most tracks kept (the key budget): past it, the least recently judged go first.
    max_tracks: usize,
    /// Tracks dropped for `max_tracks` since the last [`Detector::take_evicted`].
    evicted: u64,
    /// In a cluster's aggregator: the clients judged since the last
    /// [`Detector::take_sightings`], for the second stage to judge cohorts on (this detector
    /// judges none).
    sightings: Option<Vec<Sighting>>,
}

/// What to write to the store's `detect_state` table.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
    pub deletes: Vec<Vec<u8>>,
}

/// The subject kinds whose peers are learnt, named as in metrics, by their index in
/// [`Detector::peers`] (client addresses, their prefixes, workloads, client ids).
pub const PEER_KINDS: [&str; 4] = ["client", "prefix", "workload", "client-id"];

/// `own` peers of kind index `k` together with `others`' (itself when there are none): what
/// the sustained detector judges that kind against.
pub fn combined(own: &Peers, others: &[[Peers; 5]], k: usize) -> Peers {
    if others.is_empty() {
        return *own;
    }
    Peers::combine(std::iter::once(own).chain(others.iter().map(|o| &o[k])))
}

fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Client => 0,
        Kind::Prefix => 1,
        Kind::Workload => 2,
        Kind::ClientId => 3,
        // Never learnt: cohorts are judged on their members.
        Kind::Cohort => 4,
    }
}

impl Detector {
    /// A detector; `st` seeds the wide prefixes' totals and member lists from the held
    /// rollups.
    pub fn new(cfg: DetectConfig, st: &State) -> Detector {
        let mut d = Detector {
            cfg,
            tracks: Map::default(),
            wide: Map::default(),
            members: Map::default(),
            peers: [Peers::default(); 5],
            others: Vec::new(),
            pending: HashSet::default(),
            last_prune_hour: 0,
            saved_ms: 0,
            dropped: Vec::new(),
            cohorts: cohort::Cohorts::default(),
            max_tracks: usize::MAX,
            evicted: 0,
            sightings: None,
        };
        let end = st.end_ms();
        for (key, rollup) in st.iter() {
            if let Key::Prefix(p) = key {
                let wide: Vec<IpNet> = d.cfg.coordinated.wide_of(p.network()).collect();
                for w in wide {
                    d.wide.entry(w).or_default().merge(rollup);
                }
                continue;
            }
            // A client's two keys: both are members, the later time counts.
            let (Key::Direct(a) | Key::Proxied(a)) = key else {
                continue;
            };
            let last = rollup
                .hosts_since(0)
                .filter_map(|h| rollup.host_last_seen(h))
                .max();
            let last = last.unwrap_or(end);
            d.member(Subject::Prefix(Prefix::of(a)), a, last);
            let wide: Vec<IpNet> = d.cfg.coordinated.wide_of(a).collect();
            for w in wide {
                d.member(Subject::Wide(w), a, last);
            }
        }
        d
    }

    /// Records `addr` as a member of `group` seen at `time_ms` (keeps the later time).
    fn member(&mut self, group: Subject, addr: IpAddr, time_ms: u64) {
        let t = self
            .members
            .entry(group)
            .or_default()
            .entry(addr)
            .or_default();
        *t = (*t).max(time_ms);
    }

    /// Installs what [`Detector::snapshot`] saved (rows of the `detect_state` table); returns
    /// the rows installed and the rows not understood (skipped: those subjects learn again).
    pub fn restore(&mut self, rows: Vec<(Vec<u8>, Vec<u8>)>) -> (usize, usize) {
        let (mut ok, mut bad) = (0, 0);
        for (k, v) in rows {
            if k == persist::PEERS_ROW {
                if persist::peers_of_value(&v, &mut self.peers) {
                    ok += 1;
                } else {
                    bad += 1;
                }
                continue;
            }
            match (persist::subject_of_row(&k), persist::track_of_value(&v)) {
                (Some(s), Some(t)) => {
                    self.saved_ms = self.saved_ms.max(t.last_eval_ms);
                    self.tracks.insert(s, t);
                    ok += 1;
                }
                _ => bad += 1,
            }
        }
        (ok, bad)
    }

    /// The rows to write so that the store holds what was learnt up to now: the tracks judged
    /// since the last snapshot, the peers, and deletes of the tracks dropped since.
    pub fn snapshot(&mut self) -> Snapshot {
        let since = self.saved_ms;
        let mut snap = Snapshot::default();
        for (s, t) in &self.tracks {
            if t.last_eval_ms > since {
                snap.puts
                    .push((persist::subject_row(s), persist::track_value(t)));
                self.saved_ms = self.saved_ms.max(t.last_eval_ms);
            }
        }
        snap.puts.push((
            persist::PEERS_ROW.to_vec(),
            persist::peers_value(&self.peers),
        ));
        snap.deletes = self
            .dropped
            .drain(..)
            .map(|s| persist::subject_row(&s))
            .collect();
        snap
    }

    /// What this detector learnt of each subject kind's peers (indexed as [`PEER_KINDS`]).
    pub fn peers(&self) -> [Peers; 5] {
        self.peers
    }

    /// What other detectors learnt of their peers (a cluster's other aggregators, each from
    /// its own partitions): from now on the sustained detector judges against the peers of
    /// all of them and this one ([`Peers::combine`]), as one collector over the whole fleet
    /// would. This detector goes on learning from its own subjects only.
    pub fn set_others_peers(&mut self, others: Vec<[Peers; 5]>) {
        self.others = others;
    }

    /// The peers' ratio of each subject kind that the sustained detector judges against.
    pub fn judged_peers(&self) -> [Peers; 5] {
        std::array::from_fn(|k| combined(&self.peers[k], &self.others, k))
    }

    /// The configuration.
    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// Records what a commit applied, to be judged at `at_ms` (the next judgement): `subjects`
    /// (the keys it touched) are judged then, and make their client addresses members of
    /// their prefixes, seen at `at_ms`; `prefixes` (what it added to each /24 and /64) feed
    /// the wide prefixes' totals, which are judged then too.
    pub fn observe(&mut self, subjects: Vec<Subject>, prefixes: &[(Prefix, Rollup)], at_ms: u64) {
        let mut wide = Vec::new();
        for s in &subjects {
            let Subject::Client(addr) = s else { continue };
            self.member(Subject::Prefix(Prefix::of(*addr)), *addr, at_ms);
            wide.clear();
            wide.extend(self.cfg.coordinated.wide_of(*addr));
            for w in &wide {
                self.member(Subject::Wide(*w), *addr, at_ms);
            }
        }
        self.pending.extend(subjects);
        for (p, added) in prefixes {
            for w in self.cfg.coordinated.wide_of(p.network()) {
                self.wide.entry(w).or_default().merge(added);
                self.pending.insert(Subject::Wide(w));
            }
        }
    }

    /// Judges, at batch time `at_ms`, every subject touched since the last judgement and
    /// every subject of `open` (the open alerts, so that quiet keys resolve), on what has
    /// been applied so far. The verdicts with a finding, and every verdict of a subject in
    /// `open`, in subject order: the same applied batches give the same verdicts, however
    /// they were grouped into commits. `open` is sorted.
    pub fn judge(&mut self, st: &State, at_ms: u64, open: &[Subject]) -> Vec<Verdict> {
        let mut subjects: Vec<Subject> = self.pending.drain().collect();
        subjects.extend(open.iter().cloned());
        subjects.sort_unstable();
        subjects.dedup();
        let mut verdicts = Vec::new();
        let mut judged = Vec::new();
        let mut cohorts = Vec::new();
        for s in &subjects {
            if let Subject::Cohort(k) = s {
                cohorts.push(*k);
                continue;
            }
            self.evaluate(st, s, at_ms, &mut judged);
            let keep_all = open.binary_search(s).is_ok();
            verdicts.extend(judged.drain(..).filter(|v| keep_all || v.finding.is_some()));
        }
        // Cohorts last: their members were judged above. In a cluster's aggregator they are
        // the second stage's, which sees every partition's members.
        if self.sightings.is_none() {
            cohorts.extend(self.cohorts.take_touched());
            cohorts.sort_unstable();
            cohorts.dedup();
            let cfg = &self.cfg;
            cohort::judge_all(
                &cfg.cohort,
                cfg.volume.client_per_hour,
                &self.cohorts,
                &cohorts,
                at_ms,
                open,
                &mut verdicts,
            );
        }
        self.prune(at_ms, open);
        verdicts
    }

    /// Leaves cohorts to a second stage (a cluster's aggregator holds a share of the clients):
    /// the clients judged are kept for [`Detector::take_sightings`] instead.
    pub fn leave_cohorts_to_second_stage(&mut self) {
        self.sightings.get_or_insert_with(Vec::new);
    }

    /// The clients judged since the last call, in the order judged (with
    /// [`Detector::leave_cohorts_to_second_stage`]; else none).
    pub fn take_sightings(&mut self) -> Vec<Sighting> {
        self.sightings
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Keeps at most `n` learnt subjects (checked once an hour of batch time).
    pub fn set_max_tracks(&mut self, n: usize) {
        self.max_tracks = n;
    }

    /// Learnt subjects dropped to stay within the most kept, since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Drops members, wide prefixes' buckets and tracks that left their windows, and the
    /// least recently judged tracks beyond the most kept (not those with an alert `open`);
    /// once per hour.
    fn prune(&mut self, end_ms: u64, open: &[Subject]) {
        let hour = end_ms / HOUR_MS;
        if hour == self.last_prune_hour {
            return;
        }
        self.last_prune_hour = hour;
        let start = Window::H24.start_ms(end_ms);
        for m in self.members.values_mut() {
            m.retain(|_, t| *t >= start);
        }
        self.members.retain(|_, m| !m.is_empty());
        for r in self.wide.values_mut() {
            r.prune_slots(end_ms);
            r.prune_hosts(end_ms);
        }
        self.wide.retain(|_, r| !r.is_empty());
        self.cohorts.prune(end_ms);
        // A baseline is kept a week past the key's last evaluation, its days as long as they
        // are in the 30-day window.
        let keep = end_ms.saturating_sub(7 * 24 * HOUR_MS);
        let dropped = &mut self.dropped;
        self.tracks.retain(|s, t| {
            let kept = t.last_eval_ms >= keep || !t.days.is_empty_at(end_ms);
            if !kept && t.last_eval_ms <= self.saved_ms {
                dropped.push(s.clone());
            }
            kept
        });
        if self.tracks.len() > self.max_tracks {
            let over = self.tracks.len() - self.max_tracks;
            let mut times: Vec<u64> = self.tracks.values().map(|t| t.last_eval_ms).collect();
            let (_, &mut cut, _) = times.select_nth_unstable(over - 1);
            let mut left = over;
            let saved_ms = self.saved_ms;
            self.tracks.retain(|s, t| {
                if left == 0 || t.last_eval_ms > cut || open.binary_search(s).is_ok() {
                    return true;
                }
                left -= 1;
                if t.last_eval_ms <= saved_ms {
                    dropped.push(s.clone());
                }
                false
            });
            self.evicted += (over - left) as u64;
        }
    }

    /// Judges `subject` at batch time `end_ms`: verdicts for every detector that applies.
    pub fn evaluate(&mut self, st: &State, subject: &Subject, end_ms: u64, out: &mut Vec<Verdict>) {
        if let Subject::Wide(_) = subject {
            self.evaluate_wide(st, subject, end_ms, out);
            return;
        }
        let track = self.tracks.entry(subject.clone()).or_default();
        track.last_eval_ms = end_ms;
        let cfg = &self.cfg;
        let allowed = cfg.allowlist.contains(subject, st);
        let rollup = rollup_of(&self.wide, st, subject).unwrap_or_default();
        let peers = &mut self.peers[kind_index(subject.kind())];
        // Hourly totals of the 24 h window (a bucket that left it may still be held, until
        // the next prune).
        let first_hour = Window::H24.start_ms(end_ms) / HOUR_MS;
        let mut hours: Vec<(u64, Totals)> = rollup.hourly().filter(|h| h.0 >= first_hour).collect();
        hours.sort_unstable_by_key(|h| h.0);
        baseline::fold(&learning(cfg), track, peers, &hours, end_ms / HOUR_MS);
        let peers = combined(peers, &self.others, kind_index(subject.kind()));
        track.days.fold(&hours, end_ms / HOUR_MS);
        let active_day = cfg.sustained.active_day_bytes;
        let long = (
            track.days.window(7, end_ms, active_day),
            track.days.window(30, end_ms, active_day),
        );

        // Prefix members: active count, the largest, allowlisted bytes, synchrony.
        let group = match subject.kind() {
            Kind::Prefix => Some(coordinated::member_stats(
                &cfg.allowlist,
                st,
                self.members.get(subject),
                end_ms,
            )),
            _ => None,
        };
        let j = Judged::new(
            st,
            subject,
            &rollup,
            end_ms,
            group,
            cfg.dominant_member_share,
            long,
        );
        if matches!(subject, Subject::Client(_) | Subject::ClientId(_)) {
            let key = (cfg.cohort.enabled && !allowed)
                .then(|| {
                    let buckets: Vec<(u64, Totals)> = rollup.buckets(Window::H1).collect();
                    cohort::traits(&cfg.cohort, &buckets, &j.d1.totals, end_ms)
                })
                .flatten()
                .map(|t| cohort::key_of(&t, matches!(subject, Subject::ClientId(_))));
            match &mut self.sightings {
                Some(out) => out.push(Sighting {
                    member: subject.clone(),
                    key,
                    h1: j.h1_resp,
                }),
                None => self.cohorts.see(subject, key, j.h1_resp, end_ms),
            }
        }
        let hour_bytes = HourBytes::of(&rollup, end_ms);
        let mut push = |d: DetectorKind, f: Option<Finding>| {
            out.push(Verdict {
                subject: subject.clone(),
                detector: d,
                finding: if allowed { None } else { f },
                hours: hour_bytes,
            });
        };
        if cfg.volume.enabled {
            push(DetectorKind::Volume, volume::judge(&cfg.volume, &j));
        }
        if cfg.coordinated.enabled && j.group.is_some() {
            push(
                DetectorKind::Coordinated,
                coordinated::judge(&cfg.coordinated, cfg.volume.client_per_hour, &j),
            );
        }
        if cfg.deviation.enabled {
            push(
                DetectorKind::Deviation,
                deviation::judge(&cfg.deviation, track, &j),
            );
        }
        if cfg.sustained.enabled {
            push(
                DetectorKind::Sustained,
                sustained::judge(
                    &cfg.sustained,
                    cfg.active_hour_bytes,
                    track,
                    &peers,
                    &hours,
                    &j,
                ),
            );
        }
    }
}

impl Detector {
    /// A wide prefix is judged by the coordinated detector only: it exists for the group.
    fn evaluate_wide(
        &mut self,
        st: &State,
        subject: &Subject,
        end_ms: u64,
        out: &mut Vec<Verdict>,
    ) {
        let cfg = &self.cfg;
        if !cfg.coordinated.enabled {
            return;
        }
        let allowed = cfg.allowlist.contains(subject, st);
        let rollup = rollup_of(&self.wide, st, subject).unwrap_or_default();
        let group =
            coordinated::member_stats(&cfg.allowlist, st, self.members.get(subject), end_ms);
        let no_days = Default::default();
        let j = Judged::new(
            st,
            subject,
            &rollup,
            end_ms,
            Some(group),
            cfg.dominant_member_share,
            no_days,
        );
        let finding = coordinated::judge(&cfg.coordinated, cfg.volume.client_per_hour, &j);
        out.push(Verdict {
            subject: subject.clone(),
            detector: DetectorKind::Coordinated,
            finding: if allowed { None } else { finding },
            hours: HourBytes::of(&rollup, end_ms),
        });
    }
}

/// How the baselines learn, from the config.
fn learning(cfg: &DetectConfig) -> Learning {
    Learning {
        alpha: 2.0 / (cfg.deviation.baseline_hours + 1.0),
        active_hour_bytes: cfg.active_hour_bytes,
        min_history_hours: cfg.deviation.min_history_hours,
        min_sigma: cfg.deviation.min_sigma,
        cusum_slack: cfg.sustained.cusum_slack,
        cusum_threshold: cfg.sustained.cusum_threshold,
    }
}

/// The rollup `subject` is judged on: a client's two keys together, a wide prefix's of `wide`.
fn rollup_of<'a>(
    wide: &'a Map<IpNet, Rollup>,
    st: &'a State,
    subject: &Subject,
) -> Option<Cow<'a, Rollup>> {
    match subject {
        Subject::Client(a) => st.client(*a).merged(),
        Subject::Prefix(p) => st.get(&Key::Prefix(*p)).map(Cow::Borrowed),
        Subject::Workload(w) => st.get(&Key::Workload(w.clone())).map(Cow::Borrowed),
        Subject::ClientId(id) => st.client_id(id).map(Cow::Borrowed),
        Subject::Wide(p) => wide.get(p).map(Cow::Borrowed),
        Subject::Cohort(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_750_000_000_000 / HOUR_MS * HOUR_MS;

    fn tot(resp: u64, req: u64) -> Totals {
        Totals {
            response_bytes: resp,
            request_bytes: req,
            connections_closed: 0,
        }
    }

    fn fired(v: &[Verdict], d: DetectorKind) -> Option<&Finding> {
        v.iter()
            .find(|x| x.detector == d)
            .and_then(|x| x.finding.as_ref())
    }

    /// Adds `t` of `addr` at `time_ms` to its key and its prefix's in `st`, and to what the
    /// commit added to its prefix (`added`).
    fn put(
        st: &mut State,
        added: &mut Map<Prefix, Rollup>,
        addr: IpAddr,
        time_ms: u64,
        t: &Totals,
    ) {
        for key in [Key::Direct(addr), Key::Prefix(Prefix::of(addr))] {
            let mut r = st.get(&key).cloned().unwrap_or_default();
            r.add(time_ms, 0, t);
            st.put(key, r);
        }
        added
            .entry(Prefix::of(addr))
            .or_default()
            .add(time_ms, 0, t);
    }

    #[test]
    fn learnt_subjects_stay_within_the_most_kept() {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let mut det = Detector::new(DetectConfig::default(), &st);
        det.set_max_tracks(10);
        let mut added = Map::default();
        // 50 clients, one judged per hour; the prune at each new hour keeps the 10 newest.
        for i in 0..50u64 {
            let a = IpAddr::from([203, 0, 113, i as u8]);
            let at = T0 + i * HOUR_MS;
            put(&mut st, &mut added, a, at, &tot(1000, 10));
            st.set_end_ms(at);
            let mut v = Vec::new();
            det.evaluate(&st, &Subject::Client(a), at, &mut v);
            det.prune(at, &[]);
        }
        assert_eq!(det.tracks.len(), 10);
        assert_eq!(det.take_evicted(), 40);
        assert_eq!(det.take_evicted(), 0);
        let newest = IpAddr::from([203, 0, 113, 49]);
        assert!(det.tracks.contains_key(&Subject::Client(newest)));
    }

    #[test]
    fn cusum_flags_a_slow_rise_that_never_jumps() {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let a: IpAddr = "203.0.113.9".parse().unwrap();
        let mut det = Detector::new(DetectConfig::default(), &st);
        let mut rollup = Rollup::default();
        let mut first = None;
        let mut first_deviation = None;
        for h in 0..90u64 {
            // 60 MB/h, ±5 %, for 40 hours; then +6 % an hour: never 3 sigma in one hour.
            let base = 60e6
                * if h < 40 {
                    1.0
                } else {
                    1.06f64.powi((h - 40) as i32)
                };
            let wobble = if h % 2 == 0 { 1.05 } else { 0.95 };
            let at = T0 + h * HOUR_MS + 10 * 60_000;
            rollup.add(at, 0, &tot((base * wobble) as u64, (base / 2.0) as u64));
            st.put(Key::Direct(a), rollup.clone());
            // Judged 30 min later: the 1 h window holds this hour's bytes only.
            let t = at + 30 * 60_000;
            st.set_end_ms(t);
            let mut v = Vec::new();
            det.evaluate(&st, &Subject::Client(a), t, &mut v);
            if fired(&v, DetectorKind::Deviation).is_some() {
                first_deviation.get_or_insert(h);
            }
            if let Some(f) = fired(&v, DetectorKind::Sustained) {
                assert!(f.summary.contains("risen steadily"), "{}", f.summary);
                first.get_or_insert(h);
            }
        }
        let h = first.expect("CUSUM never fired");
        // Before the hourly bytes reached the deviation floor (256 MiB, hour 65).
        assert!((45..65).contains(&h), "fired at hour {h}");
        assert!(first_deviation.is_none_or(|d| d > h), "{first_deviation:?}");
    }

    /// Judges clients that pull the same bytes every hour for `days` days; returns the hour
    /// of the first finding of `detector` for each, if any.
    fn steady(
        clients: &[(IpAddr, u64, u64)],
        days: u64,
        detector: DetectorKind,
    ) -> Vec<Option<u64>> {
        steady_with(DetectConfig::default(), clients, days, detector)
    }

    fn steady_with(
        cfg: DetectConfig,
        clients: &[(IpAddr, u64, u64)],
        days: u64,
        detector: DetectorKind,
    ) -> Vec<Option<u64>> {
        let mut det = Detector::new(cfg, &State::default());
        run_steady(&mut det, clients, days, detector)
    }

    /// [`steady_with`] on `det`.
    fn run_steady(
        det: &mut Detector,
        clients: &[(IpAddr, u64, u64)],
        days: u64,
        detector: DetectorKind,
    ) -> Vec<Option<u64>> {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let mut rollups = vec![Rollup::default(); clients.len()];
        let mut first = vec![None; clients.len()];
        for h in 0..days * 24 {
            let at = T0 + h * HOUR_MS + 30 * 60_000;
            for (i, (a, resp, req)) in clients.iter().enumerate() {
                rollups[i].add(at, 0, &tot(*resp, *req));
                rollups[i].prune_slots(at);
                st.put(Key::Direct(*a), rollups[i].clone());
            }
            st.set_end_ms(at);
            det.observe(
                clients.iter().map(|c| Subject::Client(c.0)).collect(),
                &[],
                at,
            );
            for v in det.judge(&st, at, &[]) {
                let Subject::Client(a) = v.subject else {
                    continue;
                };
                let i = clients.iter().position(|c| c.0 == a).unwrap();
                if v.detector == detector && v.finding.is_some() {
                    first[i].get_or_insert(h);
                }
                assert!(
                    !matches!(v.finding, Some(ref f) if f.window_seconds <= 86_400 && v.detector == DetectorKind::Volume),
                    "under the hourly and daily limits: {v:?}"
                );
            }
        }
        first
    }

    #[test]
    fn a_week_over_the_weekly_limit_is_caught_within_the_week() {
        // 6 GiB a day (a quarter of a GiB an hour) is 42 GiB a week: over the 40 GiB weekly
        // limit on the 7th day. 5 GiB a day (35 a week, 150 a month) stays under the week and
        // crosses the 120 GiB month on day 24.
        let a: IpAddr = "203.0.113.20".parse().unwrap();
        let b: IpAddr = "203.0.113.21".parse().unwrap();
        let first = steady(
            &[(a, 6 * GIB / 24, MIB), (b, 5 * GIB / 24, MIB)],
            26,
            DetectorKind::Volume,
        );
        let h = first[0].expect("the 6 GiB/day client");
        assert!((6 * 24..7 * 24).contains(&h), "hour {h}");
        let h = first[1].expect("the 5 GiB/day client, on the month");
        assert!((23 * 24..25 * 24).contains(&h), "hour {h}");
    }

    #[test]
    fn a_known_customer_gets_its_own_limits() {
        let a: IpAddr = "203.0.113.20".parse().unwrap();
        let mut cfg = DetectConfig::default();
        cfg.volume.overrides = vec![volume::LimitOverride {
            cidr: Some("203.0.113.16/28".parse().unwrap()),
            per_hour: 4 << 30,
            per_day: 40 << 30,
            per_week: 200 << 30,
            ..Default::default()
        }];
        cfg.validate().unwrap();
        let first = steady_with(cfg, &[(a, 6 * GIB / 24, MIB)], 9, DetectorKind::Volume);
        assert_eq!(first, [None], "42 GiB a week is under its own 200 GiB");
        let mut bad = DetectConfig::default();
        bad.volume.overrides = vec![volume::LimitOverride::default()];
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("detect.volume.overrides"), "{e}");
    }

    #[test]
    fn a_steady_week_at_a_high_ratio_is_sustained() {
        // 1.5 GiB a day at 4000:1, beside peers at 20:1: the week test, on the 6th day; the
        // peer (2 GiB a day, the same every day) is not flagged.
        let a: IpAddr = "203.0.113.30".parse().unwrap();
        let peer: IpAddr = "198.51.100.30".parse().unwrap();
        let hour = 3 * GIB / 48;
        let first = steady(
            &[(a, hour, hour / 4000), (peer, 4 * hour / 3, hour / 15)],
            8,
            DetectorKind::Sustained,
        );
        let h = first[0].expect("the steady client");
        assert!((5 * 24..7 * 24).contains(&h), "hour {h}");
        assert_eq!(first[1], None);
    }

    #[test]
    fn a_detector_judges_against_the_peers_others_learnt() {
        // A cluster: the steady client of the test above is in one aggregator's partitions,
        // its peer in another's. Alone, the first learns its peers' ratio from the client
        // itself (4000:1) and never finds it far above; judging against what the other
        // learnt too (the peer's 20:1), it finds it on the 6th day, as one collector does.
        let a: IpAddr = "203.0.113.30".parse().unwrap();
        let peer: IpAddr = "198.51.100.30".parse().unwrap();
        let hour = 3 * GIB / 48;
        let client = [(a, hour, hour / 4000)];
        let alone = steady(&client, 8, DetectorKind::Sustained);
        assert_eq!(alone, [None]);

        let mut other = Detector::new(DetectConfig::default(), &State::default());
        let peers = [(peer, 4 * hour / 3, hour / 15)];
        assert_eq!(
            run_steady(&mut other, &peers, 8, DetectorKind::Sustained),
            [None]
        );
        let learnt = other.peers();
        assert!(learnt[0].n >= 48, "{learnt:?}");
        assert!((learnt[0].mean.exp2() - 20.0).abs() < 0.5, "{learnt:?}");

        let mut det = Detector::new(DetectConfig::default(), &State::default());
        det.set_others_peers(vec![learnt]);
        let first = run_steady(&mut det, &client, 8, DetectorKind::Sustained);
        let h = first[0].expect("the steady client, against both aggregators' peers");
        assert!((5 * 24..7 * 24).contains(&h), "hour {h}");
        // What it learnt itself is its own subjects' only; what it judges against is both.
        assert!((det.peers()[0].mean.exp2() - 4000.0).abs() < 100.0);
        let judged = det.judged_peers()[0];
        assert!(judged.n > learnt[0].n, "{judged:?}");
        let ratio = judged.mean.exp2();
        assert!(ratio > 20.0 && ratio < 4000.0, "{ratio}");
    }

    #[test]
    fn a_group_spread_over_the_24s_of_a_16_is_coordinated_as_the_16() {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let mut det = Detector::new(DetectConfig::default(), &st);
        let t = T0 + 10 * HOUR_MS;
        let (mut added, mut clients) = (Map::default(), Vec::new());
        // 200 addresses, 2 in each of 100 /24s of 10.20.0.0/16, 100 MB each in the hour: 20 GB,
        // over 16 × 1 GiB; each /24 (2 members) and each /20 (32 members, 3.2 GB) is not.
        for i in 0..200u32 {
            let addr = IpAddr::from([10, 20, (i / 2) as u8, 1 + (i % 2) as u8]);
            for k in 0..12u64 {
                let totals = tot(100_000_000 / 12, 100_000);
                put(&mut st, &mut added, addr, t - k * 5 * 60_000, &totals);
            }
            clients.push(Subject::Client(addr));
        }
        st.set_end_ms(t);
        let added: Vec<(Prefix, Rollup)> = added.into_iter().collect();
        det.observe(clients, &added, t);
        let v = det.judge(&st, t, &[]);
        let wide = Subject::Wide("10.20.0.0/16".parse().unwrap());
        // (Steady members in 100 prefixes are a cohort too.)
        assert!(
            v.iter()
                .all(|x| x.subject == wide || x.detector == DetectorKind::Cohort),
            "{v:?}"
        );
        let f = fired(&v, DetectorKind::Coordinated).expect("coordinated");
        assert_eq!((f.members, f.threshold_bytes), (200, 16 << 30));
        assert!(
            f.summary.starts_with("10.20.0.0/16: 200 addresses"),
            "{}",
            f.summary
        );
    }

    #[test]
    fn a_proxy_pool_of_unrelated_addresses_is_one_cohort_and_benign_clients_are_none() {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let mut det = Detector::new(DetectConfig::default(), &st);
        // 300 addresses in 300 unrelated /24s, each 40 to 49 MB an hour in 3 connections an
        // hour of 2 KB of requests; 500 benign clients with 0 to 30 MB an hour, at random.
        let pool: Vec<IpAddr> = (0..300u32)
            .map(|i| IpAddr::from([11 + (i % 90) as u8, (i * 37 % 251) as u8, (i / 90) as u8, 9]))
            .collect();
        let benign: Vec<IpAddr> = (0..500u32)
            .map(|i| IpAddr::from([100, 64 + (i / 250) as u8, (i % 250) as u8, 1]))
            .collect();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut first = None;
        // Every 5 minutes for 4 hours.
        for step in 1..=48u64 {
            let at = T0 + step * 300_000;
            let mut subjects = Vec::new();
            for (i, a) in pool.iter().enumerate() {
                let resp = (40_000_000 + (i as u64 % 10) * 1_000_000) / 12;
                let t = Totals {
                    response_bytes: resp,
                    request_bytes: 500,
                    connections_closed: u64::from(step % 4 == 0),
                };
                let mut r = st.get(&Key::Direct(*a)).cloned().unwrap_or_default();
                r.add(at, 0, &t);
                st.put(Key::Direct(*a), r);
                subjects.push(Subject::Client(*a));
            }
            for a in &benign {
                let resp = next() % 30_000_000 / 12;
                if next() % 3 > 0 {
                    continue;
                }
                let t = Totals {
                    response_bytes: resp,
                    request_bytes: next() % 50_000,
                    connections_closed: 1 + next() % 5,
                };
                let mut r = st.get(&Key::Direct(*a)).cloned().unwrap_or_default();
                r.add(at, 0, &t);
                st.put(Key::Direct(*a), r);
                subjects.push(Subject::Client(*a));
            }
            st.set_end_ms(at);
            det.observe(subjects, &[], at);
            let v = det.judge(&st, at, &[]);
            let cohorts: Vec<&Verdict> = v
                .iter()
                .filter(|x| x.detector == DetectorKind::Cohort)
                .collect();
            assert!(cohorts.len() <= 1, "one group, one alert: {cohorts:#?}");
            for x in &v {
                if let Some(f) = &x.finding {
                    assert_eq!(x.detector, DetectorKind::Cohort, "{x:#?}");
                    assert!(f.members >= 250, "{f:#?}");
                    assert!(f.via.addrs.iter().all(|a| pool.contains(a)), "{f:#?}");
                    assert!(f.summary.contains("unrelated addresses"), "{}", f.summary);
                    first.get_or_insert(step * 5);
                }
            }
        }
        // Steady for 30 minutes, and over 4 GiB in the hour from 35 minutes on.
        let m = first.expect("the pool is a cohort");
        assert!((35..=45).contains(&m), "at minute {m}");
    }

    #[test]
    fn ipv6_group_spread_over_a_48_is_coordinated() {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let mut det = Detector::new(DetectConfig::default(), &st);
        let t = T0 + 10 * HOUR_MS;
        let mut added = Map::default();
        // 20 addresses, each in its own /64 of 2001:db8:7::/48, 300 MB each in the hour.
        for i in 0..20u16 {
            let addr: IpAddr = format!("2001:db8:7:{i:x}::1").parse().unwrap();
            for k in 0..12u64 {
                let totals = tot(25_000_000, 100_000);
                put(&mut st, &mut added, addr, t - k * 5 * 60_000, &totals);
            }
        }
        st.set_end_ms(t);
        let added: Vec<(Prefix, Rollup)> = added.into_iter().collect();
        let clients: Vec<Subject> = (0..20u16)
            .map(|i| Subject::Client(format!("2001:db8:7:{i:x}::1").parse().unwrap()))
            .collect();
        det.observe(clients.clone(), &added, t);
        let v = det.judge(&st, t, &[]);
        let p48 = Subject::Wide("2001:db8:7::/48".parse().unwrap());
        // The addresses are each far under every limit: only the /48 is flagged (and, steady
        // in 20 /64s, their cohort).
        assert!(
            v.iter()
                .all(|x| x.subject == p48 || x.detector == DetectorKind::Cohort),
            "{v:?}"
        );
        let f = fired(&v, DetectorKind::Coordinated).expect("coordinated");
        assert_eq!(f.members, 20);
        assert!(
            f.summary.starts_with("2001:db8:7::/48: 20 addresses"),
            "{}",
            f.summary
        );
        // With the /48 allowlisted: nothing.
        let mut cfg = DetectConfig::default();
        cfg.allowlist.cidrs = vec!["2001:db8:7::/48".parse().unwrap()];
        let mut det = Detector::new(cfg, &st);
        det.observe(clients, &[], t);
        let v = det.judge(&st, t, &[]);
        assert!(v.is_empty(), "{v:?}");
    }
}
