//! Rolling windows on batch time, and the per-key rollup that answers them with bounded memory.
//!
//! # Windows
//!
//! Every window ends at the newest batch time (`end_ms`) the collector has applied, `E`. A
//! window of length `L` is kept in buckets of width `g` (coarser for longer windows):
//!
//! | window | bucket `g` | buckets kept |
//! |--------|-----------|--------------|
//! | 1 m    | 10 s      | 7            |
//! | 10 m   | 1 min     | 11           |
//! | 1 h    | 5 min     | 13           |
//! | 24 h   | 1 h       | 25           |
//!
//! A batch counts at its `end_ms`, `t`. The window holds every batch with
//! `floor(E / g) * g - L <= t <= E`: the current (partial) bucket and the `L / g` buckets before
//! it, so it spans between `L` and `L + g` of batch time, never less than `L`. Distinct hosts
//! use the same rule on the last time each host served the key.
//!
//! # Cost per key
//!
//! A [`Rollup`] keeps only buckets that saw traffic and are still in their window: at most
//! 7 + 11 + 13 + 25 = 56 slots of 32 bytes (1.75 KiB), typically 4 (128 B) for a key seen in
//! one interval, plus 16 bytes per distinct host that served the key in the last 24 h, plus,
//! for a client id or a client that came through gateways, its [`Links`] (at most
//! 2 × [`MAX_LINKS`](crate::links::MAX_LINKS) addresses of 32 bytes).
use std::net::IpAddr;

use crate::{
    keys::HostId,
    links::{LinkKind, Links},
};

/// A rolling window (`outflow.v1.Window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    M1,
    M10,
    H1,
    H24,
}

impl Window {
    /// Every window, shortest first.
    pub const ALL: [Window; 4] = [Window::M1, Window::M10, Window::H1, Window::H24];

    /// Index of the window in [`Window::ALL`] (the tier of its buckets).
    pub fn index(self) -> usize {
        match self {
            Window::M1 => 0,
            Window::M10 => 1,
            Window::H1 => 2,
            Window::H24 => 3,
        }
    }

    fn from_index(i: u8) -> Option<Window> {
        Window::ALL.get(usize::from(i)).copied()
    }

    /// The window's length, ms.
    pub fn length_ms(self) -> u64 {
        match self {
            Window::M1 => 60_000,
            Window::M10 => 600_000,
            Window::H1 => 3_600_000,
            Window::H24 => 86_400_000,
        }
    }

    /// The window of `length`, if the collector keeps one that long.
    pub fn of_length(length: std::time::Duration) -> Option<Window> {
        Window::ALL
            .into_iter()
            .find(|w| u128::from(w.length_ms()) == length.as_millis())
    }

    /// The width of its buckets, ms.
    pub const fn bucket_ms(self) -> u64 {
        match self {
            Window::M1 => 10_000,
            Window::M10 => 60_000,
            Window::H1 => 300_000,
            Window::H24 => 3_600_000,
        }
    }

    /// Full buckets in the window besides the current one.
    fn full_buckets(self) -> u64 {
        self.length_ms() / self.bucket_ms()
    }

    fn bucket(self, time_ms: u64) -> u32 {
        // Batch times are at most the year 3000 (checked at the edge): 3.3e9 buckets of 10 s.
        u32::try_from(time_ms / self.bucket_ms()).unwrap_or(u32::MAX)
    }

    /// The oldest bucket still in the window that ends at `end_ms`.
    fn first_bucket(self, end_ms: u64) -> u32 {
        self.bucket(end_ms)
            .saturating_sub(u32::try_from(self.full_buckets()).unwrap_or(u32::MAX))
    }

    /// The earliest batch time in the window that ends at `end_ms`.
    pub fn start_ms(self, end_ms: u64) -> u64 {
        (end_ms / self.bucket_ms() * self.bucket_ms()).saturating_sub(self.length_ms())
    }

    /// Whether a batch at `time_ms` is in the window that ends at `end_ms` (`time_ms <= end_ms`).
    pub fn contains(self, end_ms: u64, time_ms: u64) -> bool {
        time_ms >= self.start_ms(end_ms) && time_ms <= end_ms
    }

    /// `1m`, `10m`, `1h`, `24h`.
    pub fn name(self) -> &'static str {
        match self {
            Window::M1 => "1m",
            Window::M10 => "10m",
            Window::H1 => "1h",
            Window::H24 => "24h",
        }
    }
}

/// Response bytes per bucket of a window, oldest first, every bucket of the window (zeros
/// included) up to the one holding the window's end.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Series {
    /// Start of the first bucket, Unix ms.
    pub start_ms: u64,
    /// Width of each bucket, ms.
    pub bucket_ms: u64,
    pub bytes: Vec<u64>,
}

/// Sums of a key over some interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Totals {
    /// Payload bytes sent by servers to the client(s): what was pulled out.
    pub response_bytes: u64,
    /// Payload bytes the client(s) sent to servers.
    pub request_bytes: u64,
    /// Server connections that closed.
    pub connections_closed: u64,
}

impl Totals {
    /// Adds `other`, saturating.
    pub fn add(&mut self, other: &Totals) {
        self.response_bytes = self.response_bytes.saturating_add(other.response_bytes);
        self.request_bytes = self.request_bytes.saturating_add(other.request_bytes);
        self.connections_closed = self
            .connections_closed
            .saturating_add(other.connections_closed);
    }
}

/// A key's totals in one window and the distinct hosts that served it there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowStats {
    pub totals: Totals,
    pub hosts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    bucket: u32,
    tier: u8,
    totals: Totals,
}

const _: () = assert!(size_of::<Slot>() == 32);

/// Hosts' last-seen times are kept rounded down to this. Every window starts on a multiple of
/// it, so "seen at or after the start" stays exact, and a host's entry changes (and is
/// written) at most once per granule instead of with every batch.
pub const HOST_GRANULE_MS: u64 = 10_000;
const _: () = assert!(
    Window::M1.bucket_ms().is_multiple_of(HOST_GRANULE_MS)
        && Window::M10.bucket_ms().is_multiple_of(HOST_GRANULE_MS)
        && Window::H1.bucket_ms().is_multiple_of(HOST_GRANULE_MS)
        && Window::H24.bucket_ms().is_multiple_of(HOST_GRANULE_MS)
);
const SLOT_BYTES: usize = 1 + 4 + 3 * 8;
const HOST_BYTES: usize = 4 + 8;
/// 3: the links follow the hosts (2 had none).
const FORMAT: u8 = 3;

/// What the collector keeps per key: the buckets of each window that saw traffic, when each
/// host last served the key, and the addresses it was seen with (only for some keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rollup {
    slots: Vec<Slot>,
    /// Sorted by host id: (host, last batch time it served the key).
    hosts: Vec<(HostId, u64)>,
    /// Boxed: most keys have none, and pay 8 bytes for it.
    links: Option<Box<Links>>,
}

impl Rollup {
    /// Adds `totals` served by `host` in a batch at `time_ms`; true if the host's last-seen
    /// time changed (and so must be written).
    pub fn add(&mut self, time_ms: u64, host: HostId, totals: &Totals) -> bool {
        self.add_totals(time_ms, totals);
        self.see_host(host, time_ms)
    }

    /// Adds `totals` of a batch at `time_ms` to the buckets of every window (no host).
    pub fn add_totals(&mut self, time_ms: u64, totals: &Totals) {
        for w in Window::ALL {
            let (bucket, tier) = (w.bucket(time_ms), w.index() as u8);
            // From the back: the current buckets are usually the newest slots.
            match self
                .slots
                .iter_mut()
                .rev()
                .find(|s| s.bucket == bucket && s.tier == tier)
            {
                Some(s) => s.totals.add(totals),
                None => self.slots.push(Slot {
                    bucket,
                    tier,
                    totals: *totals,
                }),
            }
        }
    }

    /// Records that `host` served the key at `time_ms` (keeps the latest time, in granules of
    /// [`HOST_GRANULE_MS`]); true if that changed what is kept.
    pub fn see_host(&mut self, host: HostId, time_ms: u64) -> bool {
        let t = time_ms / HOST_GRANULE_MS * HOST_GRANULE_MS;
        match self.hosts.binary_search_by_key(&host, |h| h.0) {
            Ok(i) => match self.hosts.get_mut(i) {
                Some(h) if h.1 < t => {
                    h.1 = t;
                    true
                }
                _ => false,
            },
            Err(i) => {
                self.hosts.insert(i, (host, t));
                true
            }
        }
    }

    /// Records that the key was seen with `addr` as `kind` at `time_ms` (in granules of
    /// [`HOST_GRANULE_MS`], like hosts); true if that changed what is kept.
    pub fn see_link(&mut self, kind: LinkKind, addr: IpAddr, time_ms: u64) -> bool {
        let t = time_ms / HOST_GRANULE_MS * HOST_GRANULE_MS;
        self.links.get_or_insert_default().see(kind, addr, t)
    }

    /// The addresses linked as `kind` seen at or after `start_ms`, with when they were last
    /// seen (in no particular order).
    pub fn links_since(
        &self,
        kind: LinkKind,
        start_ms: u64,
    ) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        self.links.iter().flat_map(move |l| l.since(kind, start_ms))
    }

    /// When `host` last served the key, if it ever did (and was not pruned).
    pub fn host_last_seen(&self, host: HostId) -> Option<u64> {
        self.hosts
            .binary_search_by_key(&host, |h| h.0)
            .ok()
            .and_then(|i| self.hosts.get(i))
            .map(|h| h.1)
    }

    /// The key's stats in window `w` ending at `end_ms`.
    pub fn window(&self, w: Window, end_ms: u64) -> WindowStats {
        let (first, last, tier) = (w.first_bucket(end_ms), w.bucket(end_ms), w.index() as u8);
        let mut totals = Totals::default();
        for s in &self.slots {
            if s.tier == tier && (first..=last).contains(&s.bucket) {
                totals.add(&s.totals);
            }
        }
        let start = w.start_ms(end_ms);
        let hosts = self.hosts.iter().filter(|h| h.1 >= start).count();
        WindowStats {
            totals,
            hosts: u32::try_from(hosts).unwrap_or(u32::MAX),
        }
    }

    /// The hourly buckets of the 24 h window that are held: (hour number since the epoch, i.e.
    /// `time_ms / 3_600_000`, and the hour's totals), in no particular order.
    pub fn hourly(&self) -> impl Iterator<Item = (u64, Totals)> + '_ {
        let tier = Window::H24.index() as u8;
        self.slots
            .iter()
            .filter(move |s| s.tier == tier)
            .map(|s| (u64::from(s.bucket), s.totals))
    }

    /// The buckets of window `w` that are held: (start of the bucket, ms, and its totals), in
    /// no particular order.
    pub fn buckets(&self, w: Window) -> impl Iterator<Item = (u64, Totals)> + '_ {
        let tier = w.index() as u8;
        self.slots
            .iter()
            .filter(move |s| s.tier == tier)
            .map(move |s| (u64::from(s.bucket) * w.bucket_ms(), s.totals))
    }

    /// Response bytes in minute number `minute` (`time_ms / 60 000`), while the 10-minute
    /// window holds it per minute; 0 otherwise.
    pub fn minute_bytes(&self, minute: u64) -> u64 {
        const _: () = assert!(Window::M10.bucket_ms() == 60_000);
        let tier = Window::M10.index() as u8;
        self.slots
            .iter()
            .find(|s| s.tier == tier && u64::from(s.bucket) == minute)
            .map_or(0, |s| s.totals.response_bytes)
    }

    /// Hosts that served the key at or after `start_ms`.
    pub fn hosts_since(&self, start_ms: u64) -> impl Iterator<Item = HostId> + '_ {
        self.hosts
            .iter()
            .filter(move |h| h.1 >= start_ms)
            .map(|h| h.0)
    }

    /// The stats in window `w` ending at `end_ms` of this key and `other` together (hosts
    /// that served both count once).
    pub fn window_with(&self, other: &Rollup, w: Window, end_ms: u64) -> WindowStats {
        let mut s = self.window(w, end_ms);
        let o = other.window(w, end_ms);
        s.totals.add(&o.totals);
        let start = w.start_ms(end_ms);
        let both = self
            .hosts_since(start)
            .filter(|h| other.host_last_seen(*h).is_some_and(|t| t >= start))
            .count();
        let both = u32::try_from(both).unwrap_or(u32::MAX);
        s.hosts = s.hosts.saturating_add(o.hosts).saturating_sub(both);
        s
    }

    /// Adds every bucket, host and link of `other` (sums buckets, keeps the later times).
    pub fn merge(&mut self, other: &Rollup) {
        for o in &other.slots {
            // From the back: the newest slots are the likeliest to match.
            match self
                .slots
                .iter_mut()
                .rev()
                .find(|s| s.bucket == o.bucket && s.tier == o.tier)
            {
                Some(s) => s.totals.add(&o.totals),
                None => self.slots.push(*o),
            }
        }
        for &(h, t) in &other.hosts {
            self.see_host(h, t);
        }
        if let Some(l) = &other.links {
            self.links.get_or_insert_default().merge(l);
        }
    }

    /// Drops buckets that left their window (ending at `end_ms`); true if any was dropped.
    pub fn prune_slots(&mut self, end_ms: u64) -> bool {
        let before = self.slots.len();
        let first = Window::ALL.map(|w| w.first_bucket(end_ms));
        self.slots.retain(|s| {
            first
                .get(usize::from(s.tier))
                .is_some_and(|f| s.bucket >= *f)
        });
        self.slots.len() != before
    }

    /// Drops hosts that have not served the key within 24 h of `end_ms`; returns them.
    pub fn prune_hosts(&mut self, end_ms: u64) -> Vec<HostId> {
        let start = Window::H24.start_ms(end_ms);
        let gone = self
            .hosts
            .iter()
            .filter(|h| h.1 < start)
            .map(|h| h.0)
            .collect();
        self.hosts.retain(|h| h.1 >= start);
        gone
    }

    /// Drops links not seen within 24 h of `end_ms`; true if any was dropped.
    pub fn prune_links(&mut self, end_ms: u64) -> bool {
        let Some(l) = &mut self.links else {
            return false;
        };
        let dropped = l.prune(Window::H24.start_ms(end_ms));
        if l.is_empty() {
            self.links = None;
        }
        dropped
    }

    /// Whether [`Rollup::prune_slots`], [`Rollup::prune_hosts`] or [`Rollup::prune_links`]
    /// would drop anything.
    pub fn needs_prune(&self, end_ms: u64) -> bool {
        let start = Window::H24.start_ms(end_ms);
        let first = Window::ALL.map(|w| w.first_bucket(end_ms));
        self.hosts.iter().any(|h| h.1 < start)
            || self.links.as_ref().is_some_and(|l| l.needs_prune(start))
            || self
                .slots
                .iter()
                .any(|s| first.get(usize::from(s.tier)).is_none_or(|f| s.bucket < *f))
    }

    /// Whether anything of this key is still in some window (after pruning).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.hosts.is_empty() && self.links.is_none()
    }

    /// Number of bucket slots held.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Number of hosts held.
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// Appends the store form: a format byte, a big-endian u16 count of buckets, then per
    /// bucket its tier (u8), bucket number (u32) and the three totals (u64); then a u32 count
    /// of hosts, and per host its id (u32) and last-seen time (u64), by id; then the links
    /// ([`Links::encode`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(7 + self.slots.len() * SLOT_BYTES + self.hosts.len() * HOST_BYTES);
        out.push(FORMAT);
        // At most 56 slots (one per live bucket).
        let n = u16::try_from(self.slots.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        for s in self.slots.iter().take(usize::from(n)) {
            out.push(s.tier);
            out.extend_from_slice(&s.bucket.to_be_bytes());
            for v in [
                s.totals.response_bytes,
                s.totals.request_bytes,
                s.totals.connections_closed,
            ] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        // At most one per host id (u32).
        let n = u32::try_from(self.hosts.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        for (h, t) in self.hosts.iter().take(n as usize) {
            out.extend_from_slice(&h.to_be_bytes());
            out.extend_from_slice(&t.to_be_bytes());
        }
        match &self.links {
            Some(l) => l.encode(out),
            None => Links::default().encode(out),
        }
    }

    /// Parses the store form; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Rollup> {
        let (&format, rest) = bytes.split_first()?;
        if format != FORMAT {
            return None;
        }
        let u16_at = |c: &[u8], at: usize| -> Option<usize> {
            Some(usize::from(u16::from_be_bytes(
                c.get(at..at + 2)?.try_into().ok()?,
            )))
        };
        let u64_at = |c: &[u8], at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(c.get(at..at + 8)?.try_into().ok()?))
        };
        let n = u16_at(rest, 0)?;
        let (body, rest) = rest
            .get(2..)?
            .split_at_checked(n.checked_mul(SLOT_BYTES)?)?;
        let mut slots = Vec::with_capacity(n);
        for c in body.chunks_exact(SLOT_BYTES) {
            let tier = *c.first()?;
            Window::from_index(tier)?;
            slots.push(Slot {
                tier,
                bucket: u32::from_be_bytes(c.get(1..5)?.try_into().ok()?),
                totals: Totals {
                    response_bytes: u64_at(c, 5)?,
                    request_bytes: u64_at(c, 13)?,
                    connections_closed: u64_at(c, 21)?,
                },
            });
        }
        let n = usize::try_from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)).ok()?;
        let (body, rest) = rest
            .get(4..)?
            .split_at_checked(n.checked_mul(HOST_BYTES)?)?;
        let (links, rest) = Links::decode(rest)?;
        if !rest.is_empty() {
            return None;
        }
        let mut hosts: Vec<(HostId, u64)> = Vec::with_capacity(n);
        for c in body.chunks_exact(HOST_BYTES) {
            let h = u32::from_be_bytes(c.get(..4)?.try_into().ok()?);
            // Sorted by id, each once.
            if hosts.last().is_some_and(|l| l.0 >= h) {
                return None;
            }
            hosts.push((h, u64_at(c, 4)?));
        }
        Some(Rollup {
            slots,
            hosts,
            links: (!links.is_empty()).then(|| Box::new(links)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIN: u64 = 60_000;
    const HOUR: u64 = 60 * MIN;
    const T0: u64 = 1_750_000_000_000 / HOUR * HOUR; // on an hour boundary

    fn t(resp: u64) -> Totals {
        Totals {
            response_bytes: resp,
            request_bytes: 1,
            connections_closed: 0,
        }
    }

    #[test]
    fn window_bounds() {
        // End on a bucket boundary: exactly L back.
        assert_eq!(Window::M1.start_ms(T0), T0 - MIN);
        // Mid-bucket: back to the bucket's start, then L.
        assert_eq!(Window::M1.start_ms(T0 + 15_000), T0 + 10_000 - MIN);
        assert_eq!(Window::H24.start_ms(T0 + 30 * MIN), T0 - 24 * HOUR);
        assert!(Window::H1.contains(T0, T0 - HOUR));
        assert!(!Window::H1.contains(T0, T0 - HOUR - 1));
        assert_eq!(Window::M1.start_ms(5), 0);
        assert_eq!(
            Window::of_length(Duration::from_secs(600)),
            Some(Window::M10)
        );
        assert_eq!(
            Window::of_length(Duration::from_secs(86_400)),
            Some(Window::H24)
        );
        assert_eq!(Window::of_length(Duration::from_secs(300)), None);
    }

    #[test]
    fn rollup_sums_by_window_and_counts_hosts() {
        let mut r = Rollup::default();
        let end = T0 + 2 * HOUR;
        r.add(end, 1, &t(1)); // every window
        r.add(end - 5 * MIN, 2, &t(10)); // 10m, 1h, 24h
        r.add(end - 30 * MIN, 1, &t(100)); // 1h, 24h
        r.add(end - 2 * HOUR, 3, &t(1000)); // 24h
        r.add(end - 25 * HOUR, 4, &t(10_000)); // none
        let stats: Vec<_> = Window::ALL.iter().map(|w| r.window(*w, end)).collect();
        let resp: Vec<_> = stats.iter().map(|s| s.totals.response_bytes).collect();
        assert_eq!(resp, [1, 11, 111, 1111]);
        let hosts: Vec<_> = stats.iter().map(|s| s.hosts).collect();
        assert_eq!(hosts, [1, 2, 2, 3]);
        assert_eq!(stats[3].totals.request_bytes, 4);

        assert!(r.prune_slots(end));
        assert_eq!(r.prune_hosts(end), vec![4]);
        let after: Vec<_> = Window::ALL.iter().map(|w| r.window(*w, end)).collect();
        assert_eq!(after, stats, "pruning keeps every window's answer");
        assert!(r.slot_count() <= 56);
    }

    #[test]
    fn store_form_round_trips() {
        let mut r = Rollup::default();
        r.add(T0, 1, &t(u64::MAX));
        r.add(T0, 1, &t(5)); // saturates
        r.add(T0 + HOUR, 1, &t(7));
        r.add(T0 + HOUR, 3, &t(7));
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        assert_eq!(Rollup::decode(&bytes).unwrap(), r);
        r.see_link(LinkKind::Peer, "10.1.0.1".parse().unwrap(), T0 + 5);
        r.see_link(LinkKind::Addr, "2001:db8::4".parse().unwrap(), T0);
        bytes.clear();
        r.encode(&mut bytes);
        let back = Rollup::decode(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            back.window(Window::H24, T0 + HOUR).totals.response_bytes,
            u64::MAX
        );
        assert!(Rollup::decode(&bytes[..bytes.len() - 1]).is_none());
        assert!(Rollup::decode(&[]).is_none());
        assert!(
            Rollup::decode(&[3, 0, 0, 0, 0, 0, 0, 0, 0])
                .unwrap()
                .is_empty()
        );
        // The format of schema 2 (no links) is not read.
        assert!(Rollup::decode(&[2, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(Rollup::decode(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 9]).is_none());
        let bad_tier = [
            3, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert!(Rollup::decode(&bad_tier).is_none());
        let unsorted_hosts = [
            3, 0, 0, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0,
        ];
        assert!(Rollup::decode(&unsorted_hosts).is_none());
    }

    #[test]
    fn two_rollups_together_and_links_in_windows() {
        let end = T0 + 2 * HOUR;
        let mut a = Rollup::default();
        a.add(end, 1, &t(10));
        a.add(end - 3 * HOUR, 2, &t(100));
        let mut b = Rollup::default();
        b.add(end, 1, &t(1));
        b.add(end, 3, &t(1));
        let h1 = a.window_with(&b, Window::H1, end);
        assert_eq!((h1.totals.response_bytes, h1.hosts), (12, 2));
        let d1 = a.window_with(&b, Window::H24, end);
        assert_eq!((d1.totals.response_bytes, d1.hosts), (112, 3));
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.window(Window::H24, end), d1);

        let peer: IpAddr = "10.1.0.1".parse().unwrap();
        assert!(a.see_link(LinkKind::Peer, peer, end - 25 * HOUR));
        assert!(
            !a.see_link(LinkKind::Peer, peer, end - 25 * HOUR + 1),
            "same granule"
        );
        assert!(a.needs_prune(end));
        assert!(a.prune_links(end));
        assert!(a.links.is_none());
        a.see_link(LinkKind::Peer, peer, end);
        assert_eq!(
            a.links_since(LinkKind::Peer, Window::H1.start_ms(end))
                .collect::<Vec<_>>(),
            [(peer, end)]
        );
        assert_eq!(a.links_since(LinkKind::Addr, 0).count(), 0);
    }
}
