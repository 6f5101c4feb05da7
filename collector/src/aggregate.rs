//! The in-memory aggregates: one [`Rollup`] per key, the host names, the dedup watermarks and
//! the newest batch time; how a batch is folded into per-key totals; and the queries on them.
//!
//! [`State`] is the collector's authoritative view for queries. Only the store writer changes
//! it, and only with what it has just committed to disk (see `writer`).
use std::{
    cmp::{Ordering, Reverse},
    collections::{BinaryHeap, HashMap},
    hash::Hash,
    net::IpAddr,
    sync::Arc,
};

use crate::{
    keys::{Group, HostId, Key, Prefix, Workload},
    model::{AgentKey, Batch, Role, ValidationError},
    window::{Rollup, Totals, Window, WindowStats},
};

/// Hash maps keyed by data that agents send: a fast hasher with a random seed per map.
pub type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One batch folded into per-key totals (done by the agent's stream task, off the writer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchAggregate {
    /// The batch time (`end_ms`) every total counts at.
    pub time_ms: u64,
    /// The host that sent it.
    pub host: HostId,
    /// Totals per key, every key at most once.
    pub entries: Vec<(Key, Totals)>,
}

/// Folds the server-role deltas of `batch`, sent by `host`, into totals per client address,
/// client prefix, host and workload. Client-role and unknown-role deltas are not aggregated.
pub fn aggregate(batch: &Batch, host: HostId) -> BatchAggregate {
    let mut clients: Map<IpAddr, Totals> = Map::default();
    let mut prefixes: Map<Prefix, Totals> = Map::default();
    let mut workloads: Map<(&str, &str), Totals> = Map::default();
    let mut host_total = Totals::default();
    let mut any = false;
    for d in batch.deltas.iter().filter(|d| d.role == Role::Server) {
        let t = Totals {
            response_bytes: d.counters.bytes_out,
            request_bytes: d.counters.bytes_in,
            connections_closed: u64::from(d.closed),
        };
        clients.entry(d.remote).or_default().add(&t);
        prefixes.entry(Prefix::of(d.remote)).or_default().add(&t);
        workloads
            .entry((d.cgroup.as_str(), d.comm.as_str()))
            .or_default()
            .add(&t);
        host_total.add(&t);
        any = true;
    }
    let mut entries = Vec::with_capacity(clients.len() + prefixes.len() + workloads.len() + 1);
    entries.extend(clients.into_iter().map(|(a, t)| (Key::Client(a), t)));
    entries.extend(prefixes.into_iter().map(|(p, t)| (Key::Prefix(p), t)));
    entries.extend(workloads.into_iter().map(|((cgroup, comm), t)| {
        let w = Workload {
            host,
            cgroup: cgroup.into(),
            comm: comm.into(),
        };
        (Key::Workload(w), t)
    }));
    if any {
        entries.push((Key::Host(host), host_total));
    }
    BatchAggregate {
        time_ms: batch.end_ms,
        host,
        entries,
    }
}

/// A client to look up: one address, or one aggregated prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientQuery {
    Address(IpAddr),
    Prefix(Prefix),
}

impl ClientQuery {
    /// Parses `203.0.113.7`, `2001:db8::7`, `203.0.113.0/24`, `2001:db8::/64` (and /32, /128
    /// as addresses). Host bits of a prefix are ignored. Errors name the field `client`.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let s = s.trim();
        let bad = |m: String| ValidationError::new("client", m);
        if s.contains('/') {
            let net: ipnet::IpNet = s
                .parse()
                .map_err(|_| bad(format!("{s:?} is not an address or prefix")))?;
            match (net, net.prefix_len()) {
                (ipnet::IpNet::V4(n), 32) => Ok(Self::Address(IpAddr::V4(n.addr()))),
                (ipnet::IpNet::V6(n), 128) => {
                    Ok(Self::Address(IpAddr::V6(n.addr()).to_canonical()))
                }
                (ipnet::IpNet::V4(n), 24) => Ok(Self::Prefix(Prefix::of(IpAddr::V4(n.addr())))),
                (ipnet::IpNet::V6(n), 64) => Ok(Self::Prefix(Prefix::of(IpAddr::V6(n.addr())))),
                (_, len) => Err(bad(format!(
                    "/{len} is not aggregated: ask for an address, a /24 (IPv4) or a /64 (IPv6)"
                ))),
            }
        } else {
            let a: IpAddr = s
                .parse()
                .map_err(|_| bad(format!("{s:?} is not an address or prefix")))?;
            Ok(Self::Address(a.to_canonical()))
        }
    }

    /// The key it looks up.
    pub fn key(self) -> Key {
        match self {
            Self::Address(a) => Key::Client(a),
            Self::Prefix(p) => Key::Prefix(p),
        }
    }
}

impl std::fmt::Display for ClientQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address(a) => a.fmt(f),
            Self::Prefix(p) => p.fmt(f),
        }
    }
}

/// One row of a top-talkers answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Talker {
    /// The key as text (see [`Key::display`]).
    pub key: String,
    pub stats: WindowStats,
}

/// The answer to a top-talkers query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopTalkers {
    /// The window's end: the newest batch time applied (0 before any).
    pub window_end_ms: u64,
    pub talkers: Vec<Talker>,
}

/// Every aggregate the collector holds.
#[derive(Debug, Default)]
pub struct State {
    clients: Map<IpAddr, Rollup>,
    prefixes: Map<Prefix, Rollup>,
    hosts: Map<HostId, Rollup>,
    workloads: Map<Workload, Rollup>,
    host_names: Vec<Arc<str>>,
    host_ids: Map<Arc<str>, HostId>,
    watermarks: Map<AgentKey, u64>,
    end_ms: u64,
}

/// Candidates for the top-k heap: more response bytes first, then more request bytes, more
/// closes, then the smaller key.
struct Ranked<'a, K> {
    key: &'a K,
    stats: WindowStats,
}

impl<K: Ord> Ranked<'_, K> {
    fn rank(&self) -> (u64, u64, u64) {
        let t = &self.stats.totals;
        (t.response_bytes, t.request_bytes, t.connections_closed)
    }
}

impl<K: Ord> PartialEq for Ranked<'_, K> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl<K: Ord> Eq for Ranked<'_, K> {}
impl<K: Ord> PartialOrd for Ranked<'_, K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Ord> Ord for Ranked<'_, K> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank()
            .cmp(&other.rank())
            .then_with(|| other.key.cmp(self.key))
    }
}

fn top_of<K: Ord + Hash>(
    map: &Map<K, Rollup>,
    window: Window,
    end_ms: u64,
    limit: usize,
) -> Vec<(&K, WindowStats)> {
    let mut heap: BinaryHeap<Reverse<Ranked<'_, K>>> = BinaryHeap::with_capacity(limit + 1);
    for (key, rollup) in map {
        let stats = rollup.window(window, end_ms);
        if stats.hosts == 0 {
            continue; // not seen in this window
        }
        heap.push(Reverse(Ranked { key, stats }));
        if heap.len() > limit {
            heap.pop();
        }
    }
    heap.into_sorted_vec()
        .into_iter()
        .map(|Reverse(r)| (r.key, r.stats))
        .collect()
}

impl State {
    /// The newest batch time applied (0 before any).
    pub fn end_ms(&self) -> u64 {
        self.end_ms
    }

    /// The highest applied sequence number of an agent's epoch (0 if none).
    pub fn watermark(&self, agent: &AgentKey) -> u64 {
        self.watermarks.get(agent).copied().unwrap_or(0)
    }

    /// The id of a host name, if known.
    pub fn host_id(&self, name: &str) -> Option<HostId> {
        self.host_ids.get(name).copied()
    }

    /// The name of a host id (`?` for an unknown id, which the store never produces).
    pub fn host_name(&self, id: HostId) -> &str {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.host_names.get(i))
            .map_or("?", |s| s)
    }

    /// Number of known host names; the next new host gets this id.
    pub fn host_count(&self) -> usize {
        self.host_names.len()
    }

    /// The rollup of a key.
    pub fn get(&self, key: &Key) -> Option<&Rollup> {
        match key {
            Key::Client(a) => self.clients.get(a),
            Key::Prefix(p) => self.prefixes.get(p),
            Key::Host(h) => self.hosts.get(h),
            Key::Workload(w) => self.workloads.get(w),
        }
    }

    /// The rollup of a key, to change in place.
    pub fn get_mut(&mut self, key: &Key) -> Option<&mut Rollup> {
        match key {
            Key::Client(a) => self.clients.get_mut(a),
            Key::Prefix(p) => self.prefixes.get_mut(p),
            Key::Host(h) => self.hosts.get_mut(h),
            Key::Workload(w) => self.workloads.get_mut(w),
        }
    }

    /// Number of keys of a group.
    pub fn key_count(&self, group: Group) -> usize {
        match group {
            Group::ClientAddress => self.clients.len(),
            Group::ClientPrefix => self.prefixes.len(),
            Group::Host => self.hosts.len(),
            Group::Workload => self.workloads.len(),
        }
    }

    /// Every key with its rollup.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &Rollup)> {
        let c = self.clients.iter().map(|(k, r)| (Key::Client(*k), r));
        let p = self.prefixes.iter().map(|(k, r)| (Key::Prefix(*k), r));
        let h = self.hosts.iter().map(|(k, r)| (Key::Host(*k), r));
        let w = self
            .workloads
            .iter()
            .map(|(k, r)| (Key::Workload(k.clone()), r));
        c.chain(p).chain(h).chain(w)
    }

    /// Replaces (or, if it is empty, removes) the rollup of a key.
    pub fn put(&mut self, key: Key, rollup: Rollup) {
        fn put<K: Hash + Eq>(m: &mut Map<K, Rollup>, k: K, r: Rollup) {
            if r.is_empty() {
                m.remove(&k);
            } else {
                m.insert(k, r);
            }
        }
        match key {
            Key::Client(a) => put(&mut self.clients, a, rollup),
            Key::Prefix(p) => put(&mut self.prefixes, p, rollup),
            Key::Host(h) => put(&mut self.hosts, h, rollup),
            Key::Workload(w) => put(&mut self.workloads, w, rollup),
        }
    }

    /// Records a host name under the next id (the caller makes sure `id` is that).
    pub fn add_host(&mut self, id: HostId, name: Arc<str>) {
        if usize::try_from(id).is_ok_and(|i| i == self.host_names.len()) {
            self.host_ids.insert(name.clone(), id);
            self.host_names.push(name);
        }
    }

    /// Sets an agent epoch's watermark.
    pub fn set_watermark(&mut self, agent: AgentKey, seq: u64) {
        self.watermarks.insert(agent, seq);
    }

    /// Sets the newest batch time.
    pub fn set_end_ms(&mut self, end_ms: u64) {
        self.end_ms = end_ms;
    }

    /// The `limit` keys of `group` with the most response bytes in `window` (keys not seen in
    /// the window are left out; ties go to the smaller key).
    pub fn top(&self, group: Group, window: Window, limit: usize) -> TopTalkers {
        let end = self.end_ms;
        let talker = |key: Key, stats| Talker {
            key: key.display(|h| self.host_name(h)),
            stats,
        };
        let talkers = match group {
            Group::ClientAddress => top_of(&self.clients, window, end, limit)
                .into_iter()
                .map(|(k, s)| talker(Key::Client(*k), s))
                .collect(),
            Group::ClientPrefix => top_of(&self.prefixes, window, end, limit)
                .into_iter()
                .map(|(k, s)| talker(Key::Prefix(*k), s))
                .collect(),
            Group::Host => top_of(&self.hosts, window, end, limit)
                .into_iter()
                .map(|(k, s)| talker(Key::Host(*k), s))
                .collect(),
            Group::Workload => top_of(&self.workloads, window, end, limit)
                .into_iter()
                .map(|(k, s)| talker(Key::Workload(k.clone()), s))
                .collect(),
        };
        TopTalkers {
            window_end_ms: end,
            talkers,
        }
    }

    /// A key's stats in every window ([`Window::ALL`] order), or `None` if it has no traffic
    /// in any of them (never seen, or only before the 24 h window).
    pub fn stats(&self, key: &Key) -> Option<[WindowStats; 4]> {
        let r = self.get(key)?;
        let stats = Window::ALL.map(|w| r.window(w, self.end_ms));
        // Every batch that touched the key in the 24 h window counts its host there.
        (stats[Window::H24.index()].hosts > 0).then_some(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Counters, Delta};

    fn delta(remote: &str, role: Role, out: u64, closed: bool, comm: &str) -> Delta {
        Delta {
            conn_id: 1,
            local: "10.0.0.1".parse().unwrap(),
            local_port: 8000,
            remote: remote.parse().unwrap(),
            remote_port: 5000,
            role,
            counters: Counters {
                bytes_out: out,
                bytes_in: 1,
                ..Default::default()
            },
            closed,
            cgroup: "/svc".into(),
            pid: 1,
            comm: comm.into(),
            first_seen_ms: 0,
        }
    }

    #[test]
    fn folds_server_deltas_per_key() {
        let b = Batch {
            seq: 1,
            start_ms: 0,
            end_ms: 1000,
            deltas: vec![
                delta("203.0.113.7", Role::Server, 10, true, "vllm"),
                delta("203.0.113.7", Role::Server, 5, false, "vllm"),
                delta("203.0.113.8", Role::Server, 1, false, "sglang"),
                delta("198.51.100.1", Role::Client, 1000, true, "curl"),
                delta("198.51.100.2", Role::Unknown, 1000, true, "vllm"),
            ],
            overflow: Counters::default(),
            lost_batches: 0,
            lost: Counters::default(),
        };
        let agg = aggregate(&b, 4);
        let get = |k: &Key| agg.entries.iter().find(|e| &e.0 == k).map(|e| e.1);
        let tot = |r, q, c| {
            Some(Totals {
                response_bytes: r,
                request_bytes: q,
                connections_closed: c,
            })
        };
        assert_eq!(
            get(&Key::Client("203.0.113.7".parse().unwrap())),
            tot(15, 2, 1)
        );
        assert_eq!(
            get(&Key::Prefix(Prefix::of("203.0.113.0".parse().unwrap()))),
            tot(16, 3, 1)
        );
        assert_eq!(get(&Key::Host(4)), tot(16, 3, 1));
        let w = Key::Workload(Workload {
            host: 4,
            cgroup: "/svc".into(),
            comm: "sglang".into(),
        });
        assert_eq!(get(&w), tot(1, 1, 0));
        assert_eq!(agg.entries.len(), 2 + 1 + 1 + 2);
    }

    #[test]
    fn client_queries() {
        let q = |s| ClientQuery::parse(s).map(|q| q.to_string());
        assert_eq!(q("203.0.113.7").unwrap(), "203.0.113.7");
        assert_eq!(q("203.0.113.7/24").unwrap(), "203.0.113.0/24");
        assert_eq!(q("203.0.113.7/32").unwrap(), "203.0.113.7");
        assert_eq!(q("2001:db8::1:2/64").unwrap(), "2001:db8::/64");
        assert_eq!(q("::ffff:1.2.3.4").unwrap(), "1.2.3.4");
        let e = q("10.0.0.0/16").unwrap_err();
        assert_eq!(e.field, "client");
        assert!(q("nope").is_err());
    }

    #[test]
    fn top_orders_and_limits() {
        let mut s = State::default();
        s.add_host(0, "h".into());
        for (i, bytes) in [5u64, 50, 7, 50].iter().enumerate() {
            let mut r = Rollup::default();
            r.add(
                1000,
                0,
                &Totals {
                    response_bytes: *bytes,
                    ..Default::default()
                },
            );
            s.put(Key::Client(IpAddr::from([10, 0, 0, i as u8])), r);
        }
        s.set_end_ms(1000);
        let top = s.top(Group::ClientAddress, Window::M1, 3);
        let keys: Vec<_> = top.talkers.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys, ["10.0.0.1", "10.0.0.3", "10.0.0.2"]);
        assert_eq!(top.window_end_ms, 1000);
        // Out of the 1 m window after time moves on, still in 24 h.
        s.set_end_ms(1000 + 3_600_000);
        assert!(
            s.top(Group::ClientAddress, Window::M1, 3)
                .talkers
                .is_empty()
        );
        assert_eq!(
            s.top(Group::ClientAddress, Window::H24, 10).talkers.len(),
            4
        );
    }
}
