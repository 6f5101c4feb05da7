//! The key budget: how many keys the collector holds, and what a new key becomes once the
//! budget (or its host's share of it) is used up.
//!
//! Every byte is counted at several levels at once (the client address, its /24 or /64, the
//! host, the workload), so a key that is not made loses no byte: it loses detail. Past the
//! budget:
//!
//! * a new client address, peer or client id is not made: its bytes are counted in its
//!   prefix (and host and workload) as before;
//! * a new /24 or /64 is folded into its /16 or /48, or, with too many of those, a wider one
//!   (down to /0, which always exists): the prefix group's total stays exact;
//! * a new workload is folded into its host's `(folded)` workload.
//!
//! A host's share counts the budgeted keys it serves (a key served by two hosts counts for
//! both), recounted at every garbage collection and raised with every key it makes between
//! them.
use std::time::{Duration, Instant};

use log::warn;

use crate::{
    aggregate::{Map, State},
    keys::{HostId, Key, Net, Workload},
    window::Totals,
};

/// The cgroup and process name of a host's folded workload.
pub const FOLDED_WORKLOAD: &str = "(folded)";

/// How often a full budget is logged, at most.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What became of new keys that were not made, by the kind of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FoldKind {
    /// A client address, a peer or a client id: counted in its prefix only.
    Address,
    /// A /24 or /64: counted in a wider network.
    Prefix,
    /// A workload: counted in its host's folded workload.
    Workload,
}

impl FoldKind {
    pub const ALL: [FoldKind; 3] = [FoldKind::Address, FoldKind::Prefix, FoldKind::Workload];

    pub fn name(self) -> &'static str {
        match self {
            FoldKind::Address => "address",
            FoldKind::Prefix => "prefix",
            FoldKind::Workload => "workload",
        }
    }

    pub fn index(self) -> usize {
        match self {
            FoldKind::Address => 0,
            FoldKind::Prefix => 1,
            FoldKind::Workload => 2,
        }
    }
}

/// Keys folded and the response bytes they carried, per [`FoldKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Folds {
    pub keys: [u64; 3],
    pub response_bytes: [u64; 3],
    /// Of the keys, those refused for their host's share (not the whole budget).
    pub by_share: u64,
}

impl Folds {
    fn add(&mut self, kind: FoldKind, totals: &Totals, by_share: bool) {
        let i = kind.index();
        self.keys[i] += 1;
        self.response_bytes[i] += totals.response_bytes;
        self.by_share += u64::from(by_share);
    }

    pub fn is_empty(&self) -> bool {
        self.keys.iter().all(|&k| k == 0)
    }

    fn merge(&mut self, o: &Folds) {
        for i in 0..3 {
            self.keys[i] += o.keys[i];
            self.response_bytes[i] += o.response_bytes[i];
        }
        self.by_share += o.by_share;
    }
}

/// The budget and what counts against it. Owned by the store writer, the only thread that
/// makes keys.
#[derive(Debug)]
pub struct KeyBudget {
    max_keys: usize,
    per_host: usize,
    /// Networks prefixes may be folded into before every fold goes to /0.
    max_folded: usize,
    /// Budgeted keys each host serves.
    held_by: Map<HostId, usize>,
    /// Keys made since the state was last read (by the group being staged).
    made: usize,
    folded_made: usize,
    /// Folds since the last log line, and when that was.
    unlogged: Folds,
    logged_at: Option<Instant>,
}

impl KeyBudget {
    /// A budget of `max_keys`, of which one host may hold `per_host_percent` percent.
    pub fn new(max_keys: usize, per_host_percent: u8) -> Self {
        let per_host = max_keys.saturating_mul(usize::from(per_host_percent)) / 100;
        KeyBudget {
            max_keys,
            per_host: per_host.max(1),
            max_folded: (max_keys / 64).max(256),
            held_by: Map::default(),
            made: 0,
            folded_made: 0,
            unlogged: Folds::default(),
            logged_at: None,
        }
    }

    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Counts again the keys each host serves (at start and at every garbage collection).
    pub fn recount(&mut self, st: &State) {
        self.held_by.clear();
        for (key, rollup) in st.iter() {
            if budgeted(&key) {
                for h in rollup.hosts_since(0) {
                    *self.held_by.entry(h).or_default() += 1;
                }
            }
        }
    }

    /// Starts a group: the keys it makes count from here (`st` holds the rest).
    pub fn start_group(&mut self) {
        self.made = 0;
        self.folded_made = 0;
    }

    /// What a batch's `key` with `totals` from `host` is staged as: itself, the key it folds
    /// into, or nothing (its bytes are in its prefix). `is_new` says whether the key is
    /// neither held in `st` nor staged yet. Folds are added to `folds`.
    pub fn route(
        &mut self,
        st: &State,
        key: Key,
        host: HostId,
        totals: &Totals,
        is_new: impl Fn(&Key) -> bool,
        folds: &mut Folds,
    ) -> Option<Key> {
        if !budgeted(&key) || !is_new(&key) {
            return Some(key);
        }
        let held = st.budgeted_keys() + self.made;
        let host_held = self.held_by.get(&host).copied().unwrap_or(0);
        if held < self.max_keys && host_held < self.per_host {
            self.made += 1;
            *self.held_by.entry(host).or_default() += 1;
            return Some(key);
        }
        let by_share = held < self.max_keys;
        match key {
            Key::Prefix(p) => {
                folds.add(FoldKind::Prefix, totals, by_share);
                let mut net = Net::fold_of(p);
                loop {
                    let folded = Key::Folded(net);
                    if !is_new(&folded) {
                        return Some(folded);
                    }
                    match net.wider() {
                        Some(w) if st.folded_keys() + self.folded_made >= self.max_folded => {
                            net = w;
                        }
                        _ => {
                            self.folded_made += 1;
                            return Some(folded);
                        }
                    }
                }
            }
            Key::Workload(w) => {
                folds.add(FoldKind::Workload, totals, by_share);
                // One per host: made whatever the budget.
                Some(Key::Workload(Workload {
                    host: w.host,
                    cgroup: FOLDED_WORKLOAD.into(),
                    comm: FOLDED_WORKLOAD.into(),
                }))
            }
            _ => {
                folds.add(FoldKind::Address, totals, by_share);
                None
            }
        }
    }

    /// Logs the folds of a committed group, at most once a minute (the first at once).
    pub fn note(&mut self, folds: &Folds, st: &State) {
        if folds.is_empty() {
            return;
        }
        self.unlogged.merge(folds);
        if self.logged_at.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        let f = std::mem::take(&mut self.unlogged);
        let since = match self.logged_at {
            Some(t) => format!("in the last {} s", t.elapsed().as_secs()),
            None => "since start".to_owned(),
        };
        self.logged_at = Some(Instant::now());
        warn!(
            "key budget: {} of limits.max_keys = {} keys held; {since} {} new client addresses, peers and ids were counted only in their prefix, {} prefixes in a wider network, {} workloads in their host's (folded) one ({} of them past a host's share, limits.max_keys_per_agent_percent); {} response bytes counted at the coarser level. Totals stay exact; raise limits.max_keys if memory allows",
            st.budgeted_keys(),
            self.max_keys,
            f.keys[0],
            f.keys[1],
            f.keys[2],
            f.by_share,
            f.response_bytes.iter().sum::<u64>(),
        );
    }
}

/// Whether `key` counts against the budget (hosts are bounded by the agents that may connect,
/// folded networks by their own limit).
fn budgeted(key: &Key) -> bool {
    !matches!(key, Key::Host(_) | Key::Folded(_))
        && !matches!(key, Key::Workload(w) if &*w.comm == FOLDED_WORKLOAD && &*w.cgroup == FOLDED_WORKLOAD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{keys::Prefix, window::Rollup};

    fn t(bytes: u64) -> Totals {
        Totals {
            response_bytes: bytes,
            ..Totals::default()
        }
    }

    /// A state holding `keys`, each served by `host`.
    fn state(keys: &[Key], host: HostId) -> State {
        let mut st = State::default();
        for k in keys {
            let mut r = Rollup::default();
            r.add(1_000_000, host, &t(1));
            st.put(k.clone(), r);
        }
        st
    }

    fn addr(i: u32) -> Key {
        Key::Direct(std::net::Ipv4Addr::from_bits(0x0b00_0000 + (i << 8)).into())
    }

    #[test]
    fn past_the_budget_addresses_go_prefixes_fold_and_workloads_fold() {
        let held: Vec<Key> = (0..1000).map(addr).collect();
        let st = state(&held, 1);
        let mut b = KeyBudget::new(1000, 100);
        b.recount(&st);
        b.start_group();
        let mut folds = Folds::default();
        let new = |_: &Key| true;
        // An address that is held is updated; a new one is not made.
        assert_eq!(
            b.route(&st, addr(5), 1, &t(7), |_| false, &mut folds),
            Some(addr(5))
        );
        assert_eq!(b.route(&st, addr(5000), 1, &t(7), new, &mut folds), None);
        // A prefix goes to its /16.
        let p = Key::Prefix(Prefix::of("198.51.100.9".parse().unwrap()));
        let got = b.route(&st, p, 1, &t(11), new, &mut folds);
        assert_eq!(
            got,
            Some(Key::Folded(Net::new("198.51.0.0".parse().unwrap(), 16)))
        );
        let w = Key::Workload(Workload {
            host: 1,
            cgroup: "/x".into(),
            comm: "y".into(),
        });
        let got = b.route(&st, w, 1, &t(13), new, &mut folds).unwrap();
        assert!(matches!(&got, Key::Workload(w) if &*w.comm == FOLDED_WORKLOAD));
        assert_eq!(folds.keys, [1, 1, 1]);
        assert_eq!(folds.response_bytes, [7, 11, 13]);
        // Hosts are not budgeted.
        assert_eq!(
            b.route(&st, Key::Host(9), 9, &t(1), new, &mut folds),
            Some(Key::Host(9))
        );
    }

    #[test]
    fn one_host_cannot_take_the_whole_budget() {
        let st = State::default();
        let mut b = KeyBudget::new(1000, 50);
        b.start_group();
        let mut folds = Folds::default();
        let made = (0..2000)
            .filter(|&i| {
                b.route(&st, addr(i), 1, &t(1), |_| true, &mut folds)
                    .is_some()
            })
            .count();
        assert_eq!(made, 500);
        assert_eq!(folds.by_share, 1500);
        // Another host still makes keys, up to the budget.
        let made = (2000..4000)
            .filter(|&i| {
                b.route(&st, addr(i), 2, &t(1), |_| true, &mut folds)
                    .is_some()
            })
            .count();
        assert_eq!(made, 500);
    }

    #[test]
    fn with_too_many_folded_networks_prefixes_fold_wider() {
        let st = State::default();
        let mut b = KeyBudget::new(1000, 100);
        b.max_keys = 0;
        b.start_group();
        let mut folds = Folds::default();
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000u32 {
            let p = Key::Prefix(Prefix::of(std::net::Ipv4Addr::from_bits(i << 16).into()));
            let k = b
                .route(&st, p, 1, &t(1), |k| !seen.contains(k), &mut folds)
                .unwrap();
            seen.insert(k);
        }
        // 256 /16s; past that cap every other prefix goes to /0 (its /8 would be new too).
        let lens = |l: u8| {
            seen.iter()
                .filter(|k| matches!(k, Key::Folded(n) if n.prefix_len() == l))
                .count()
        };
        assert_eq!(lens(16), 256);
        assert_eq!(lens(0), 1);
        assert_eq!(lens(16) + lens(8) + lens(0), seen.len());
    }
}
