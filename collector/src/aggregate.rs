//! The in-memory aggregates: one [`Rollup`] per key, the host names, the dedup watermarks and
//! the newest batch time; how a batch is folded into per-key totals; and the queries on them.
//!
//! [`State`] is the collector's authoritative view for queries. Only the store writer changes
//! it, and only with what it has just committed to disk (see `writer`).
use std::{
    borrow::Cow,
    cmp::{Ordering, Reverse},
    collections::{BinaryHeap, HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::Arc,
};

use outflow_proto::limits::MAX_CLIENT_ID_LEN;

use crate::{
    history::{History, STACK_KEYS, Share},
    keys::{Group, HostId, Key, Net, Prefix, Workload},
    links::LinkKind,
    model::{AgentKey, Batch, Delta, Role, ValidationError},
    window::{Rollup, Series, Totals, Window, WindowStats},
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
    /// Addresses the keys were seen with, every link at most once; each key is in `entries`.
    pub links: Vec<(Key, LinkKind, IpAddr)>,
}

/// The key a link belongs to, borrowed from the batch while it is folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LinkOwner<'a> {
    Proxied(IpAddr),
    ClientId(&'a str),
}

/// The per-key sums of one batch while it is folded.
#[derive(Default)]
struct Fold<'a> {
    direct: Map<IpAddr, Totals>,
    proxied: Map<IpAddr, Totals>,
    relayed: Map<IpAddr, Totals>,
    prefixes: Map<Prefix, Totals>,
    workloads: Map<(&'a str, &'a str), Totals>,
    ids: Map<&'a str, Totals>,
    links: HashSet<(LinkOwner<'a>, LinkKind, IpAddr), foldhash::fast::RandomState>,
    host: Totals,
    any: bool,
}

impl<'a> Fold<'a> {
    /// Adds a server-role delta: to its client (and, through a gateway, to the gateway), its
    /// client's prefix, its client id, its workload and the host; a cluster's part's copy only
    /// to its share of them ([`crate::model::Share`]).
    fn add(&mut self, d: &'a Delta) {
        let t = Totals {
            response_bytes: d.counters.bytes_out,
            request_bytes: d.counters.bytes_in,
            connections_closed: u64::from(d.closed),
        };
        if d.share.address() {
            if d.client == d.remote {
                self.direct.entry(d.client).or_default().add(&t);
            } else {
                self.proxied.entry(d.client).or_default().add(&t);
                let owner = LinkOwner::Proxied(d.client);
                self.links.insert((owner, LinkKind::Peer, d.remote));
            }
            self.prefixes
                .entry(Prefix::of(d.client))
                .or_default()
                .add(&t);
        }
        if !d.share.rest() {
            return;
        }
        if d.client != d.remote {
            self.relayed.entry(d.remote).or_default().add(&t);
        }
        if let Some(id) = d.client_id.as_deref() {
            self.ids.entry(id).or_default().add(&t);
            let owner = LinkOwner::ClientId(id);
            self.links.insert((owner, LinkKind::Addr, d.client));
            if d.client != d.remote {
                self.links.insert((owner, LinkKind::Peer, d.remote));
            }
        }
        self.workloads
            .entry((d.cgroup.as_str(), d.comm.as_str()))
            .or_default()
            .add(&t);
        self.host.add(&t);
        self.any = true;
    }

    fn finish(self, time_ms: u64, host: HostId) -> BatchAggregate {
        let mut entries = Vec::with_capacity(
            self.direct.len()
                + self.proxied.len()
                + self.relayed.len()
                + self.prefixes.len()
                + self.workloads.len()
                + self.ids.len()
                + 1,
        );
        entries.extend(self.direct.into_iter().map(|(a, t)| (Key::Direct(a), t)));
        entries.extend(self.proxied.into_iter().map(|(a, t)| (Key::Proxied(a), t)));
        entries.extend(self.relayed.into_iter().map(|(a, t)| (Key::Relayed(a), t)));
        entries.extend(self.prefixes.into_iter().map(|(p, t)| (Key::Prefix(p), t)));
        entries.extend(self.workloads.into_iter().map(|((cgroup, comm), t)| {
            let w = Workload {
                host,
                cgroup: cgroup.into(),
                comm: comm.into(),
            };
            (Key::Workload(w), t)
        }));
        entries.extend(
            self.ids
                .into_iter()
                .map(|(id, t)| (Key::ClientId(id.into()), t)),
        );
        if self.any {
            entries.push((Key::Host(host), self.host));
        }
        let links = self
            .links
            .into_iter()
            .map(|(owner, kind, addr)| {
                let key = match owner {
                    LinkOwner::Proxied(a) => Key::Proxied(a),
                    LinkOwner::ClientId(id) => Key::ClientId(id.into()),
                };
                (key, kind, addr)
            })
            .collect();
        BatchAggregate {
            time_ms,
            host,
            entries,
            links,
        }
    }
}

/// Folds the server-role deltas of `batch`, sent by `host`, into totals per key: the client
/// address (`Direct`, or `Proxied` and the gateway's `Relayed`), the client's prefix, the
/// client id, the workload and the host. Client-role and unknown-role deltas are not
/// aggregated.
pub fn aggregate(batch: &Batch, host: HostId) -> BatchAggregate {
    let mut fold = Fold::default();
    // At most an address and a prefix per delta: sized once for the batch, not rehashed as
    // they grow (the maps live only while the batch is folded).
    fold.direct.reserve(batch.deltas.len());
    fold.prefixes.reserve(batch.deltas.len());
    for d in batch.deltas.iter().filter(|d| d.role == Role::Server) {
        fold.add(d);
    }
    fold.finish(batch.end_ms, host)
}

/// A client to look up: one address, one aggregated prefix, or a client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientQuery {
    Address(IpAddr),
    Prefix(Prefix),
    Id(String),
}

impl ClientQuery {
    /// Parses `203.0.113.7`, `2001:db8::7`, `203.0.113.0/24`, `2001:db8::/64` (and /32, /128
    /// as addresses); anything else is a client id (`h:0123...`), and so is what follows
    /// `id:` (for an id that looks like an address). Host bits of a prefix are ignored.
    /// Errors name the field `client`.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let s = s.trim();
        let bad = |m: String| ValidationError::new("client", m);
        if let Some(id) = s.strip_prefix("id:") {
            return Self::id(id);
        }
        if let Ok(a) = s.parse::<IpAddr>() {
            return Ok(Self::Address(a.to_canonical()));
        }
        let Ok(net) = s.parse::<ipnet::IpNet>() else {
            return Self::id(s);
        };
        match (net, net.prefix_len()) {
            (ipnet::IpNet::V4(n), 32) => Ok(Self::Address(IpAddr::V4(n.addr()))),
            (ipnet::IpNet::V6(n), 128) => Ok(Self::Address(IpAddr::V6(n.addr()).to_canonical())),
            (ipnet::IpNet::V4(n), 24) => Ok(Self::Prefix(Prefix::of(IpAddr::V4(n.addr())))),
            (ipnet::IpNet::V6(n), 64) => Ok(Self::Prefix(Prefix::of(IpAddr::V6(n.addr())))),
            (_, len) => Err(bad(format!(
                "/{len} is not aggregated: ask for an address, a /24 (IPv4), a /64 (IPv6) or a client id"
            ))),
        }
    }

    fn id(id: &str) -> Result<Self, ValidationError> {
        let bad = |m: String| ValidationError::new("client", m);
        if id.is_empty() {
            return Err(bad("empty: want an address, a prefix or a client id".into()));
        }
        if id.chars().nth(MAX_CLIENT_ID_LEN).is_some() {
            return Err(bad(format!(
                "more than {MAX_CLIENT_ID_LEN} characters: not a client id"
            )));
        }
        Ok(Self::Id(id.to_owned()))
    }

    /// What it is, for messages: `client 203.0.113.7`, `client id h:...`.
    pub fn describe(&self) -> String {
        match self {
            Self::Id(id) => format!("client id {id:?}"),
            q => format!("client {q}"),
        }
    }
}

impl std::fmt::Display for ClientQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Address(a) => a.fmt(f),
            Self::Prefix(p) => p.fmt(f),
            Self::Id(id) => f.write_str(id),
        }
    }
}

/// The rollups that together make one address of a group that spans two kinds of key: a
/// client address (`Direct` and `Proxied`) or a TCP peer (`Direct` and `Relayed`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Parts<'a> {
    pub direct: Option<&'a Rollup>,
    pub other: Option<&'a Rollup>,
}

impl<'a> Parts<'a> {
    /// The stats of both in window `w` ending at `end_ms` (hosts of both count once).
    pub fn window(&self, w: Window, end_ms: u64) -> WindowStats {
        match (self.direct, self.other) {
            (Some(a), Some(b)) => a.window_with(b, w, end_ms),
            (Some(a), None) | (None, Some(a)) => a.window(w, end_ms),
            (None, None) => WindowStats::default(),
        }
    }

    /// Both as one rollup (a copy only if there are two); `None` if there is none.
    pub fn merged(&self) -> Option<Cow<'a, Rollup>> {
        match (self.direct, self.other) {
            (Some(a), Some(b)) => {
                let mut m = a.clone();
                m.merge(b);
                Some(Cow::Owned(m))
            }
            (Some(a), None) | (None, Some(a)) => Some(Cow::Borrowed(a)),
            (None, None) => None,
        }
    }
}

/// The response bytes of `rollups` summed per bucket of window `w` ending at `end_ms`.
pub fn series<'a>(rollups: impl IntoIterator<Item = &'a Rollup>, w: Window, end_ms: u64) -> Series {
    let bucket_ms = w.bucket_ms();
    let start_ms = w.start_ms(end_ms);
    let n = usize::try_from((end_ms - start_ms) / bucket_ms + 1).unwrap_or(0);
    let mut bytes = vec![0; n];
    for r in rollups {
        for (t, totals) in r.buckets(w) {
            if let Some(b) = t
                .checked_sub(start_ms)
                .and_then(|d| usize::try_from(d / bucket_ms).ok())
                .and_then(|i| bytes.get_mut(i))
            {
                *b += totals.response_bytes;
            }
        }
    }
    Series {
        start_ms,
        bucket_ms,
        bytes,
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
    direct: Map<IpAddr, Rollup>,
    proxied: Map<IpAddr, Rollup>,
    relayed: Map<IpAddr, Rollup>,
    prefixes: Map<Prefix, Rollup>,
    hosts: Map<HostId, Rollup>,
    workloads: Map<Workload, Rollup>,
    ids: Map<Box<str>, Rollup>,
    /// Prefixes folded into wider networks when the key budget was full.
    folded: Map<Net, Rollup>,
    /// Addresses with both a `Direct` and a `Proxied` key, and with both a `Direct` and a
    /// `Relayed` key: what the key counts of the client-address and peer groups count twice.
    direct_and_proxied: usize,
    direct_and_relayed: usize,
    host_names: Vec<Arc<str>>,
    host_ids: Map<Arc<str>, HostId>,
    watermarks: Map<AgentKey, u64>,
    end_ms: u64,
    history: History,
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

/// The `limit` best of `candidates`, best first; those not seen in the window (no host) are
/// left out.
fn top_k<'a, K: Ord + 'a>(
    candidates: impl Iterator<Item = (&'a K, WindowStats)>,
    limit: usize,
) -> Vec<(&'a K, WindowStats)> {
    let mut heap: BinaryHeap<Reverse<Ranked<'a, K>>> = BinaryHeap::with_capacity(limit + 1);
    for (key, stats) in candidates.filter(|c| c.1.hosts > 0) {
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

/// The window stats of every key of `map`.
fn each<K>(
    map: &Map<K, Rollup>,
    w: Window,
    end_ms: u64,
) -> impl Iterator<Item = (&K, WindowStats)> {
    map.iter().map(move |(k, r)| (k, r.window(w, end_ms)))
}

/// The window stats of every address of `direct` and `other` together.
fn each_of_both<'a>(
    direct: &'a Map<IpAddr, Rollup>,
    other: &'a Map<IpAddr, Rollup>,
    w: Window,
    end_ms: u64,
) -> impl Iterator<Item = (&'a IpAddr, WindowStats)> {
    let both = direct.iter().map(move |(a, r)| {
        let parts = Parts {
            direct: Some(r),
            other: other.get(a),
        };
        (a, parts.window(w, end_ms))
    });
    let only_other = other
        .iter()
        .filter(|(a, _)| !direct.contains_key(*a))
        .map(move |(a, r)| (a, r.window(w, end_ms)));
    both.chain(only_other)
}

/// A key as the top-talkers answers (and the history's top keys) name it.
trait Named {
    fn name(&self, st: &State) -> String;
}

impl Named for IpAddr {
    fn name(&self, _: &State) -> String {
        self.to_string()
    }
}

impl Named for Prefix {
    fn name(&self, _: &State) -> String {
        self.to_string()
    }
}

impl Named for Net {
    fn name(&self, _: &State) -> String {
        self.to_string()
    }
}

impl Named for HostId {
    fn name(&self, st: &State) -> String {
        st.host_name(*self).to_owned()
    }
}

impl Named for Workload {
    fn name(&self, st: &State) -> String {
        Key::Workload(self.clone()).display(|h| st.host_name(h))
    }
}

impl Named for Box<str> {
    fn name(&self, _: &State) -> String {
        self.to_string()
    }
}

/// The [`STACK_KEYS`] candidates with the most bytes (none with 0), most first, named; ties
/// go to the smaller name.
fn top_bytes<'a>(st: &State, candidates: impl Iterator<Item = (&'a dyn Named, u64)>) -> Vec<Share> {
    let mut top: Vec<(String, u64)> = Vec::with_capacity(STACK_KEYS + 1);
    for (k, b) in candidates.filter(|c| c.1 > 0) {
        // Few keys have bytes in a given minute, and fewer beat the last: names are made
        // only for those.
        if top.len() == STACK_KEYS && top.last().is_some_and(|l| l.1 > b) {
            continue;
        }
        let name = k.name(st);
        let at = top
            .iter()
            .position(|t| t.1 < b || (t.1 == b && t.0 > name))
            .unwrap_or(top.len());
        top.insert(at, (name, b));
        top.truncate(STACK_KEYS);
    }
    top.into_iter().map(|(k, b)| (k.into(), b)).collect()
}

/// Top-talkers rows, the keys named as [`Named`] names them.
fn rows<K: Named>(st: &State, top: Vec<(&K, WindowStats)>) -> Vec<Talker> {
    top.into_iter()
        .map(|(k, stats)| Talker {
            key: k.name(st),
            stats,
        })
        .collect()
}

/// Replaces (or, if it is empty, removes) `k`'s rollup in `m`; (was there, is there).
fn put_in<K: Hash + Eq>(m: &mut Map<K, Rollup>, k: K, r: Rollup) -> (bool, bool) {
    if r.is_empty() {
        (m.remove(&k).is_some(), false)
    } else {
        (m.insert(k, r).is_some(), true)
    }
}

/// Adjusts a count of addresses held in two maps after one of them changed.
fn count_both(count: &mut usize, (was, is): (bool, bool), in_other: bool) {
    if in_other && was != is {
        if is {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
    }
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
            Key::Direct(a) => self.direct.get(a),
            Key::Proxied(a) => self.proxied.get(a),
            Key::Relayed(a) => self.relayed.get(a),
            Key::Prefix(p) => self.prefixes.get(p),
            Key::Host(h) => self.hosts.get(h),
            Key::Workload(w) => self.workloads.get(w),
            Key::ClientId(id) => self.ids.get(id),
            Key::Folded(n) => self.folded.get(n),
        }
    }

    /// The rollup of a key, to change in place.
    pub fn get_mut(&mut self, key: &Key) -> Option<&mut Rollup> {
        match key {
            Key::Direct(a) => self.direct.get_mut(a),
            Key::Proxied(a) => self.proxied.get_mut(a),
            Key::Relayed(a) => self.relayed.get_mut(a),
            Key::Prefix(p) => self.prefixes.get_mut(p),
            Key::Host(h) => self.hosts.get_mut(h),
            Key::Workload(w) => self.workloads.get_mut(w),
            Key::ClientId(id) => self.ids.get_mut(id),
            Key::Folded(n) => self.folded.get_mut(n),
        }
    }

    /// The rollups of a client address: as its own peer, and through gateways.
    pub fn client(&self, a: IpAddr) -> Parts<'_> {
        Parts {
            direct: self.direct.get(&a),
            other: self.proxied.get(&a),
        }
    }

    /// The rollups of a TCP peer: as its own client, and for other clients.
    pub fn peer(&self, a: IpAddr) -> Parts<'_> {
        Parts {
            direct: self.direct.get(&a),
            other: self.relayed.get(&a),
        }
    }

    /// The rollup of a client id.
    pub fn client_id(&self, id: &str) -> Option<&Rollup> {
        self.ids.get(id)
    }

    /// Number of keys of a group (an address of two kinds of key counts once).
    pub fn key_count(&self, group: Group) -> usize {
        match group {
            Group::ClientAddress => {
                self.direct.len() + self.proxied.len() - self.direct_and_proxied
            }
            Group::Peer => self.direct.len() + self.relayed.len() - self.direct_and_relayed,
            Group::ClientPrefix => self.prefixes.len() + self.folded.len(),
            Group::Host => self.hosts.len(),
            Group::Workload => self.workloads.len(),
            Group::ClientId => self.ids.len(),
        }
    }

    /// The keys the key budget bounds: client addresses, peers, client ids, prefixes and
    /// workloads (each address key once per kind).
    pub fn budgeted_keys(&self) -> usize {
        self.direct.len()
            + self.proxied.len()
            + self.relayed.len()
            + self.ids.len()
            + self.prefixes.len()
            + self.workloads.len()
    }

    /// The networks prefixes were folded into.
    pub fn folded_keys(&self) -> usize {
        self.folded.len()
    }

    /// Every key with its rollup.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &Rollup)> {
        let d = self.direct.iter().map(|(k, r)| (Key::Direct(*k), r));
        let x = self.proxied.iter().map(|(k, r)| (Key::Proxied(*k), r));
        let y = self.relayed.iter().map(|(k, r)| (Key::Relayed(*k), r));
        let p = self.prefixes.iter().map(|(k, r)| (Key::Prefix(*k), r));
        let h = self.hosts.iter().map(|(k, r)| (Key::Host(*k), r));
        let w = self
            .workloads
            .iter()
            .map(|(k, r)| (Key::Workload(k.clone()), r));
        let i = self.ids.iter().map(|(k, r)| (Key::ClientId(k.clone()), r));
        let f = self.folded.iter().map(|(k, r)| (Key::Folded(*k), r));
        d.chain(x)
            .chain(y)
            .chain(p)
            .chain(h)
            .chain(w)
            .chain(i)
            .chain(f)
    }

    /// Replaces (or, if it is empty, removes) the rollup of a key.
    pub fn put(&mut self, key: Key, rollup: Rollup) {
        match key {
            Key::Direct(a) => {
                let change = put_in(&mut self.direct, a, rollup);
                let (proxied, relayed) =
                    (self.proxied.contains_key(&a), self.relayed.contains_key(&a));
                count_both(&mut self.direct_and_proxied, change, proxied);
                count_both(&mut self.direct_and_relayed, change, relayed);
            }
            Key::Proxied(a) => {
                let change = put_in(&mut self.proxied, a, rollup);
                let direct = self.direct.contains_key(&a);
                count_both(&mut self.direct_and_proxied, change, direct);
            }
            Key::Relayed(a) => {
                let change = put_in(&mut self.relayed, a, rollup);
                let direct = self.direct.contains_key(&a);
                count_both(&mut self.direct_and_relayed, change, direct);
            }
            Key::Prefix(p) => drop(put_in(&mut self.prefixes, p, rollup)),
            Key::Host(h) => drop(put_in(&mut self.hosts, h, rollup)),
            Key::Workload(w) => drop(put_in(&mut self.workloads, w, rollup)),
            Key::ClientId(id) => drop(put_in(&mut self.ids, id, rollup)),
            Key::Folded(n) => drop(put_in(&mut self.folded, n, rollup)),
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
        self.top_at(group, window, self.end_ms, limit)
    }

    /// [`State::top`] of the window ending at `end_ms` (a cluster's windows end at the newest
    /// batch time of all its aggregators).
    pub fn top_at(&self, group: Group, window: Window, end_ms: u64, limit: usize) -> TopTalkers {
        let (w, end) = (window, end_ms);
        let talkers = match group {
            Group::ClientAddress => rows(
                self,
                top_k(each_of_both(&self.direct, &self.proxied, w, end), limit),
            ),
            Group::Peer => rows(
                self,
                top_k(each_of_both(&self.direct, &self.relayed, w, end), limit),
            ),
            Group::ClientPrefix => {
                // The /24s and /64s, and the networks some were folded into: together every
                // byte once.
                let mut r = rows(self, top_k(each(&self.prefixes, w, end), limit));
                if !self.folded.is_empty() {
                    r.extend(rows(self, top_k(each(&self.folded, w, end), limit)));
                    r.sort_by(|a, b| {
                        let rank = |t: &Talker| {
                            let t = t.stats.totals;
                            (t.response_bytes, t.request_bytes, t.connections_closed)
                        };
                        rank(b).cmp(&rank(a)).then_with(|| a.key.cmp(&b.key))
                    });
                    r.truncate(limit);
                }
                r
            }
            Group::Host => rows(self, top_k(each(&self.hosts, w, end), limit)),
            Group::Workload => rows(self, top_k(each(&self.workloads, w, end), limit)),
            Group::ClientId => rows(self, top_k(each(&self.ids, w, end), limit)),
        };
        TopTalkers {
            window_end_ms: end,
            talkers,
        }
    }

    /// Every key of `group` seen in `window` ending at `end_ms` with at least `min` response
    /// bytes in it, named as [`State::top`] names keys, with those bytes; in no order.
    pub fn at_least(
        &self,
        group: Group,
        window: Window,
        end_ms: u64,
        min: u64,
    ) -> Vec<(String, u64)> {
        fn keep<'a, K: Named + 'a>(
            st: &State,
            min: u64,
            it: impl Iterator<Item = (&'a K, WindowStats)>,
        ) -> Vec<(String, u64)> {
            it.filter(|(_, s)| s.hosts > 0 && s.totals.response_bytes >= min)
                .map(|(k, s)| (k.name(st), s.totals.response_bytes))
                .collect()
        }
        let (w, end) = (window, end_ms);
        match group {
            Group::ClientAddress => {
                keep(self, min, each_of_both(&self.direct, &self.proxied, w, end))
            }
            Group::Peer => keep(self, min, each_of_both(&self.direct, &self.relayed, w, end)),
            Group::ClientPrefix => {
                let mut v = keep(self, min, each(&self.prefixes, w, end));
                v.extend(keep(self, min, each(&self.folded, w, end)));
                v
            }
            Group::Host => keep(self, min, each(&self.hosts, w, end)),
            Group::Workload => keep(self, min, each(&self.workloads, w, end)),
            Group::ClientId => keep(self, min, each(&self.ids, w, end)),
        }
    }

    /// The rollup of `key` of `group`, as [`State::top`] names keys (an address, a prefix, a
    /// client id, a host name, `host/cgroup/comm`); `None` if it is not held.
    pub fn rollup_of(&self, group: Group, key: &str) -> Option<Cow<'_, Rollup>> {
        let addr = || key.parse::<IpAddr>().ok().map(|a| a.to_canonical());
        match group {
            Group::ClientAddress => self.client(addr()?).merged(),
            Group::Peer => self.peer(addr()?).merged(),
            Group::ClientPrefix => match ClientQuery::parse(key) {
                Ok(ClientQuery::Prefix(p)) => self.prefixes.get(&p).map(Cow::Borrowed),
                // A network prefixes were folded into (a /16, a /48, ...).
                _ => {
                    let n = key.parse::<ipnet::IpNet>().ok()?;
                    let net = Net::new(n.network(), n.prefix_len());
                    self.folded.get(&net).map(Cow::Borrowed)
                }
            },
            Group::ClientId => self.ids.get(key).map(Cow::Borrowed),
            Group::Host => self.hosts.get(&self.host_id(key)?).map(Cow::Borrowed),
            Group::Workload => {
                // host/cgroup/comm: host names and process names have no '/'.
                let (host, rest) = key.split_once('/')?;
                let (cgroup, comm) = rest.rsplit_once('/')?;
                let w = Workload {
                    host: self.host_id(host)?,
                    cgroup: cgroup.into(),
                    comm: comm.into(),
                };
                self.workloads.get(&w).map(Cow::Borrowed)
            }
        }
    }

    /// The fleet's minutes of the last week (see [`History`]).
    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn history_mut(&mut self) -> &mut History {
        &mut self.history
    }

    /// The [`STACK_KEYS`] keys of `group` with the most response bytes in minute number
    /// `minute`, most first (ties: the smaller name), named as [`State::top`] names them;
    /// only while the 10-minute window holds the minute.
    pub fn minute_top(&self, group: Group, minute: u64) -> Vec<Share> {
        let m = minute;
        match group {
            Group::ClientAddress | Group::Peer => {
                let other = if group == Group::Peer {
                    &self.relayed
                } else {
                    &self.proxied
                };
                let both = self.direct.iter().map(|(a, r)| {
                    let o = other.get(a).map_or(0, |o| o.minute_bytes(m));
                    (a as &dyn Named, r.minute_bytes(m) + o)
                });
                let only_other = other
                    .iter()
                    .filter(|(a, _)| !self.direct.contains_key(*a))
                    .map(|(a, r)| (a as &dyn Named, r.minute_bytes(m)));
                top_bytes(self, both.chain(only_other))
            }
            Group::ClientPrefix => {
                let p = self
                    .prefixes
                    .iter()
                    .map(|(k, r)| (k as &dyn Named, r.minute_bytes(m)));
                let f = self
                    .folded
                    .iter()
                    .map(|(k, r)| (k as &dyn Named, r.minute_bytes(m)));
                top_bytes(self, p.chain(f))
            }
            Group::Host => top_bytes(
                self,
                self.hosts
                    .iter()
                    .map(|(k, r)| (k as &dyn Named, r.minute_bytes(m))),
            ),
            Group::Workload => top_bytes(
                self,
                self.workloads
                    .iter()
                    .map(|(k, r)| (k as &dyn Named, r.minute_bytes(m))),
            ),
            Group::ClientId => top_bytes(
                self,
                self.ids
                    .iter()
                    .map(|(k, r)| (k as &dyn Named, r.minute_bytes(m))),
            ),
        }
    }

    /// Response bytes of `rollup` in each bucket of window `w` (see [`series`]).
    pub fn series(&self, rollup: &Rollup, w: Window) -> Series {
        series([rollup], w, self.end_ms)
    }

    /// Names of the hosts that served a rollup's key in window `w`.
    pub fn hosts_of(&self, rollup: &Rollup, w: Window) -> Vec<String> {
        let mut hosts: Vec<String> = rollup
            .hosts_since(w.start_ms(self.end_ms))
            .map(|h| self.host_name(h).to_owned())
            .collect();
        hosts.sort();
        hosts
    }

    /// A client's stats in every window ([`Window::ALL`] order), or `None` if it has no
    /// traffic in any of them (never seen, or only before the 24 h window).
    pub fn stats(&self, client: &ClientQuery) -> Option<[WindowStats; 4]> {
        let parts = match client {
            ClientQuery::Address(a) => self.client(*a),
            ClientQuery::Prefix(p) => Parts {
                direct: self.prefixes.get(p),
                other: None,
            },
            ClientQuery::Id(id) => Parts {
                direct: self.ids.get(id.as_str()),
                other: None,
            },
        };
        let stats = Window::ALL.map(|w| parts.window(w, self.end_ms));
        // Every batch that touched the key in the 24 h window counts its host there.
        (stats[Window::H24.index()].hosts > 0).then_some(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClientSource, Counters, Delta};

    fn delta(remote: &str, role: Role, out: u64, closed: bool, comm: &str) -> Delta {
        Delta {
            conn_id: 1,
            local: "10.0.0.1".parse().unwrap(),
            local_port: 8000,
            remote: remote.parse().unwrap(),
            remote_port: 5000,
            client: remote.parse().unwrap(),
            client_id: None,
            client_source: ClientSource::Peer,
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
            share: crate::model::Share::All,
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
            shifted_ms: 0,
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
            get(&Key::Direct("203.0.113.7".parse().unwrap())),
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
        assert!(agg.links.is_empty());
    }

    /// Through a gateway: `client` behind `gateway`, with an id.
    fn via(gateway: &str, client: &str, id: Option<&str>, out: u64) -> Delta {
        Delta {
            client: client.parse().unwrap(),
            client_id: id.map(str::to_owned),
            client_source: ClientSource::Header("x-client".into()),
            ..delta(gateway, Role::Server, out, false, "vllm")
        }
    }

    #[test]
    fn folds_gateway_traffic_by_client_and_peer() {
        let b = Batch {
            seq: 1,
            start_ms: 0,
            end_ms: 1000,
            deltas: vec![
                via("10.1.0.1", "203.0.113.7", Some("h:a"), 10),
                via("10.1.0.2", "203.0.113.7", Some("h:a"), 20),
                via("10.1.0.1", "198.51.100.9", Some("h:a"), 40),
                via("10.1.0.1", "198.51.100.8", None, 80),
                // The gateway's own request, and a direct client with an id.
                delta("10.1.0.1", Role::Server, 160, false, "vllm"),
                via("198.51.100.8", "198.51.100.8", Some("h:b"), 320),
            ],
            shifted_ms: 0,
            overflow: Counters::default(),
            lost_batches: 0,
            lost: Counters::default(),
        };
        let agg = aggregate(&b, 0);
        let get = |k: &Key| {
            agg.entries
                .iter()
                .find(|e| &e.0 == k)
                .map(|e| e.1.response_bytes)
        };
        let a = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(get(&Key::Proxied(a("203.0.113.7"))), Some(30));
        assert_eq!(get(&Key::Direct(a("203.0.113.7"))), None);
        assert_eq!(get(&Key::Proxied(a("198.51.100.8"))), Some(80));
        assert_eq!(get(&Key::Direct(a("198.51.100.8"))), Some(320));
        assert_eq!(get(&Key::Relayed(a("10.1.0.1"))), Some(130));
        assert_eq!(get(&Key::Relayed(a("10.1.0.2"))), Some(20));
        assert_eq!(get(&Key::Direct(a("10.1.0.1"))), Some(160));
        assert_eq!(get(&Key::ClientId("h:a".into())), Some(70));
        assert_eq!(get(&Key::ClientId("h:b".into())), Some(320));
        assert_eq!(get(&Key::Prefix(Prefix::of(a("198.51.100.0")))), Some(440));
        assert_eq!(get(&Key::Prefix(Prefix::of(a("10.1.0.0")))), Some(160));
        assert_eq!(get(&Key::Host(0)), Some(630));
        let mut links: Vec<String> = agg
            .links
            .iter()
            .map(|(k, kind, addr)| format!("{k:?} {kind:?} {addr}"))
            .collect();
        links.sort();
        assert_eq!(
            links,
            [
                "ClientId(\"h:a\") Addr 198.51.100.9",
                "ClientId(\"h:a\") Addr 203.0.113.7",
                "ClientId(\"h:a\") Peer 10.1.0.1",
                "ClientId(\"h:a\") Peer 10.1.0.2",
                "ClientId(\"h:b\") Addr 198.51.100.8",
                "Proxied(198.51.100.8) Peer 10.1.0.1",
                "Proxied(198.51.100.9) Peer 10.1.0.1",
                "Proxied(203.0.113.7) Peer 10.1.0.1",
                "Proxied(203.0.113.7) Peer 10.1.0.2",
            ]
        );
    }

    #[test]
    fn client_and_peer_groups_join_their_keys() {
        let mut s = State::default();
        s.add_host(0, "h0".into());
        s.add_host(1, "h1".into());
        let a: IpAddr = "198.51.100.8".parse().unwrap();
        let g: IpAddr = "10.1.0.1".parse().unwrap();
        let r = |host, resp| {
            let mut r = Rollup::default();
            let t = Totals {
                response_bytes: resp,
                ..Default::default()
            };
            r.add(1000, host, &t);
            r
        };
        s.put(Key::Direct(a), r(0, 1));
        s.put(Key::Proxied(a), r(1, 10));
        s.put(Key::Relayed(g), r(1, 10));
        s.put(Key::Direct(g), r(1, 100));
        s.set_end_ms(1000);
        let top = |g| {
            s.top(g, Window::M1, 10)
                .talkers
                .into_iter()
                .map(|t| (t.key, t.stats.totals.response_bytes, t.stats.hosts))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            top(Group::ClientAddress),
            [("10.1.0.1".into(), 100, 1), ("198.51.100.8".into(), 11, 2)]
        );
        assert_eq!(
            top(Group::Peer),
            [("10.1.0.1".into(), 110, 1), ("198.51.100.8".into(), 1, 1)]
        );
        let stats = s.stats(&ClientQuery::Address(a)).unwrap();
        assert_eq!(stats[Window::H24.index()].totals.response_bytes, 11);
        assert_eq!(s.key_count(Group::ClientAddress), 2);
        assert_eq!(s.key_count(Group::Peer), 2);
        // The gateway is no client of its own any more: still a peer.
        s.put(Key::Direct(g), Rollup::default());
        assert_eq!(s.key_count(Group::ClientAddress), 1);
        assert_eq!(s.key_count(Group::Peer), 2);
        s.put(Key::Proxied(a), Rollup::default());
        assert_eq!(s.key_count(Group::ClientAddress), 1);
        assert_eq!(s.key_count(Group::Peer), 2);
        s.put(Key::Direct(a), Rollup::default());
        assert_eq!(s.key_count(Group::ClientAddress), 0);
        assert_eq!(s.key_count(Group::Peer), 1);
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
        // Anything else is a client id; `id:` forces one.
        let id = "h:0123456789abcdef01234567";
        assert_eq!(ClientQuery::parse(id), Ok(ClientQuery::Id(id.into())));
        assert_eq!(
            ClientQuery::parse("id:10.0.0.1"),
            Ok(ClientQuery::Id("10.0.0.1".into()))
        );
        assert_eq!(
            ClientQuery::parse("alice/x").unwrap().describe(),
            "client id \"alice/x\""
        );
        assert!(q("").is_err());
        assert!(q("id:").is_err());
        assert!(q(&"x".repeat(257)).is_err());
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
            s.put(Key::Direct(IpAddr::from([10, 0, 0, i as u8])), r);
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
