//! The store's journal: what each group commit added to each key it touched, in the compact
//! form the store writer stages it in (per-key sums per 10-s granule, the hosts and links
//! seen), instead of every touched rollup written whole.
//!
//! A group commit writes its journal entry with its watermarks in one transaction; the
//! rollups are written whole only at a checkpoint (when the journal has grown past
//! `store.journal_bytes`, at each `store.gc_interval`, at a clean stop), in the transaction
//! that empties the journal. What the store holds is its rollups with every journal entry
//! applied in order ([`replay`]): the same [`apply`] and [`install`] the writer runs on memory
//! after each commit, so memory and store agree to the byte after any crash.
//!
//! Entry (big-endian): format (u8), the batch time after the group (u64), the number of keys
//! (u32), then per key: its encoded length (u32) and bytes ([`Key::encode`]), then granules
//! (u32 count; granule start u64, response bytes u64, request bytes u64, connections closed
//! u64), hosts (u32 count; host u32, granule number u32) and links (u32 count; kind u8,
//! address family u8 and 4 or 16 bytes, batch time u64).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{
    aggregate::State,
    keys::{HostId, Key},
    links::LinkKind,
    window::{HOST_GRANULE_MS, Rollup, Totals},
};

const FORMAT: u8 = 1;
/// Where the key count sits in an entry.
const COUNT_AT: usize = 1 + 8;

/// What a group commit added to one key: totals per granule start, hosts with the latest
/// granule (number) they served it in, links with their batch time; each in up to two parts
/// (the writer holds a few in place and the rest apart).
#[derive(Clone, Copy, Default)]
pub struct Change<'a> {
    pub granules: [&'a [(u64, Totals)]; 2],
    pub hosts: [&'a [(HostId, u32)]; 2],
    pub links: &'a [(LinkKind, IpAddr, u64)],
}

impl Change<'_> {
    fn granules(&self) -> impl Iterator<Item = &(u64, Totals)> {
        self.granules.iter().flat_map(|g| g.iter())
    }

    fn hosts(&self) -> impl Iterator<Item = &(HostId, u32)> {
        self.hosts.iter().flat_map(|h| h.iter())
    }
}

/// Adds `change` to `rollup`, then drops the buckets that left their window at `end_ms`.
pub fn apply(rollup: &mut Rollup, change: &Change<'_>, end_ms: u64) {
    for (time_ms, totals) in change.granules() {
        rollup.add_totals(*time_ms, totals);
    }
    for &(host, granule) in change.hosts() {
        rollup.see_host(host, u64::from(granule) * HOST_GRANULE_MS);
    }
    for &(kind, addr, time_ms) in change.links {
        rollup.see_link(kind, addr, time_ms);
    }
    rollup.prune_slots(end_ms);
}

/// Runs `change` on `key`'s rollup in `st` (a new one if it has none) and keeps the result.
pub fn install(st: &mut State, key: Key, change: impl FnOnce(&mut Rollup)) {
    match st.get_mut(&key) {
        Some(r) => {
            change(r);
            if r.is_empty() {
                st.put(key, Rollup::default());
            }
        }
        None => {
            let mut r = Rollup::default();
            change(&mut r);
            st.put(key, r);
        }
    }
}

/// Starts an entry in `out` (cleared first) for a group whose batch time after it is `end_ms`.
pub fn begin(out: &mut Vec<u8>, end_ms: u64) {
    out.clear();
    out.push(FORMAT);
    out.extend_from_slice(&end_ms.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
}

/// The number of keys in an entry `begin` started.
pub fn key_count(entry: &[u8]) -> u32 {
    entry
        .get(COUNT_AT..COUNT_AT + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

/// Appends what the group added to `key` to an entry `begin` started.
pub fn push(out: &mut Vec<u8>, key: &Key, change: &Change<'_>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    key.encode(out);
    // Keys are at most a workload's cgroup path and command, bounded at the edge.
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    counted(out, change.granules(), |out, &(t, v)| {
        for x in [t, v.response_bytes, v.request_bytes, v.connections_closed] {
            out.extend_from_slice(&x.to_be_bytes());
        }
    });
    counted(out, change.hosts(), |out, &(h, g)| {
        out.extend_from_slice(&h.to_be_bytes());
        out.extend_from_slice(&g.to_be_bytes());
    });
    counted(out, change.links.iter(), |out, &(kind, addr, t)| {
        out.push(match kind {
            LinkKind::Addr => 0,
            LinkKind::Peer => 1,
        });
        match addr {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.extend_from_slice(&t.to_be_bytes());
    });
    let keys = key_count(out).saturating_add(1);
    out[COUNT_AT..COUNT_AT + 4].copy_from_slice(&keys.to_be_bytes());
}

/// Writes a u32 count, then each item with `put`, then the count in its place.
fn counted<T>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = T>,
    mut put: impl FnMut(&mut Vec<u8>, T),
) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut n = 0u32;
    for item in items {
        put(out, item);
        n += 1;
    }
    out[at..at + 4].copy_from_slice(&n.to_be_bytes());
}

/// Applies an entry to `st` as the writer applied it to memory after its commit; `None` if it
/// is not an entry (nothing is applied then past the key that is not one).
pub fn replay(entry: &[u8], st: &mut State) -> Option<u32> {
    let mut r = Reader(entry);
    if r.u8()? != FORMAT {
        return None;
    }
    let end_ms = r.u64()?;
    let keys = r.u32()?;
    let (mut granules, mut hosts, mut links) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..keys {
        let len = usize::try_from(r.u32()?).ok()?;
        let key = Key::decode(r.take(len)?)?;
        granules.clear();
        for _ in 0..r.u32()? {
            let t = r.u64()?;
            let totals = Totals {
                response_bytes: r.u64()?,
                request_bytes: r.u64()?,
                connections_closed: r.u64()?,
            };
            granules.push((t, totals));
        }
        hosts.clear();
        for _ in 0..r.u32()? {
            hosts.push((r.u32()?, r.u32()?));
        }
        links.clear();
        for _ in 0..r.u32()? {
            let kind = match r.u8()? {
                0 => LinkKind::Addr,
                1 => LinkKind::Peer,
                _ => return None,
            };
            let addr = match r.u8()? {
                4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(r.take(4)?).ok()?)),
                6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(r.take(16)?).ok()?)),
                _ => return None,
            };
            links.push((kind, addr, r.u64()?));
        }
        let change = Change {
            granules: [&granules, &[]],
            hosts: [&hosts, &[]],
            links: &links,
        };
        install(st, key, |rollup| apply(rollup, &change, end_ms));
    }
    r.0.is_empty().then_some(keys)
}

/// Reads an entry front to back, bounds checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_gives_what_apply_gave() {
        let key = Key::Direct("10.0.0.1".parse().unwrap());
        let other = Key::Host(3);
        let t = 1_750_000_000_000u64;
        let totals = Totals {
            response_bytes: 1000,
            request_bytes: 10,
            connections_closed: 1,
        };
        let granules = [(t, totals), (t + 10_000, totals)];
        let hosts = [(3u32, u32::try_from(t / HOST_GRANULE_MS).unwrap())];
        let links = [
            (LinkKind::Peer, "192.0.2.1".parse().unwrap(), t),
            (LinkKind::Addr, "2001:db8::1".parse().unwrap(), t),
        ];
        let mut live = State::default();
        let mut out = Vec::new();
        begin(&mut out, t + 20_000);
        // Split in two parts as the writer holds them.
        let change = Change {
            granules: [&granules[..1], &granules[1..]],
            hosts: [&[], &hosts],
            links: &links,
        };
        for k in [&key, &other] {
            push(&mut out, k, &change);
            install(&mut live, k.clone(), |r| apply(r, &change, t + 20_000));
        }
        assert_eq!(key_count(&out), 2);
        let mut replayed = State::default();
        assert_eq!(replay(&out, &mut replayed), Some(2));
        for k in [&key, &other] {
            assert_eq!(replayed.get(k), live.get(k));
            assert!(replayed.get(k).is_some());
        }
        // A cut entry is not one.
        assert_eq!(replay(&out[..out.len() - 1], &mut State::default()), None);
    }
}
