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
//! Entry: format (u8), the batch time after the group (`end_ms`, u64 big-endian), the number
//! of keys (u32 big-endian), then per key, in varints (LEB128, as protobuf writes them): its
//! encoded length and bytes ([`Key::encode`]), then granules (count; per granule its start as
//! `end_ms` minus it, response bytes, request bytes, connections closed), hosts (count; host,
//! its granule number as `end_ms`'s minus it) and links (count; kind u8, address family u8 and
//! 4 or 16 bytes, batch time as `end_ms` minus it). Differences wrap, so any value reads back
//! exactly; a group's times sit just below `end_ms`, so they take a byte or two. Format 1
//! (every number fixed-width big-endian, about three times the bytes) is still read: a store
//! may hold such entries from before an upgrade until its next checkpoint.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{
    aggregate::State,
    keys::{HostId, Key},
    links::LinkKind,
    window::{HOST_GRANULE_MS, Rollup, Totals},
};

/// The format written.
const FORMAT: u8 = 2;
/// The format of versions before, still read.
const FORMAT_FIXED: u8 = 1;
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
    fn granules(&self) -> impl Iterator<Item = &(u64, Totals)> + Clone {
        self.granules.iter().flat_map(|g| g.iter())
    }

    fn hosts(&self) -> impl Iterator<Item = &(HostId, u32)> + Clone {
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
    let end_ms = entry_end_ms(out);
    let end_granule = granule_number(end_ms);
    // The key's length, then the key, encoded in place: a byte holds the length of an address
    // key; a longer key (a client id, a workload) moves behind a longer length.
    let at = out.len();
    out.push(0);
    key.encode(out);
    let len = out.len() - at - 1;
    match u8::try_from(len) {
        Ok(b) if b < 0x80 => out[at] = b,
        _ => {
            let mut head = Vec::with_capacity(10);
            varint(&mut head, len as u64);
            out.splice(at..=at, head);
        }
    }
    counted(out, change.granules(), |out, &(t, v)| {
        varint(out, end_ms.wrapping_sub(t));
        for x in [v.response_bytes, v.request_bytes, v.connections_closed] {
            varint(out, x);
        }
    });
    counted(out, change.hosts(), |out, &(h, g)| {
        varint(out, u64::from(h));
        varint(out, u64::from(end_granule.wrapping_sub(g)));
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
        varint(out, end_ms.wrapping_sub(t));
    });
    let keys = key_count(out).saturating_add(1);
    out[COUNT_AT..COUNT_AT + 4].copy_from_slice(&keys.to_be_bytes());
}

/// The batch time after the group of an entry `begin` started.
fn entry_end_ms(entry: &[u8]) -> u64 {
    entry
        .get(1..COUNT_AT)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// The number of the host granule `time_ms` is in (wrapping past the year 3000, the same
/// way for every time of an entry).
#[expect(
    clippy::cast_possible_truncation,
    reason = "wraps alike when written and read"
)]
fn granule_number(time_ms: u64) -> u32 {
    (time_ms / HOST_GRANULE_MS) as u32
}

fn varint(out: &mut Vec<u8>, x: u64) {
    prost::encoding::encode_varint(x, out);
}

/// Writes a count, then each item with `put`. Items come from iterators that do not know
/// their length up front, so the count is counted first.
fn counted<T>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = T> + Clone,
    mut put: impl FnMut(&mut Vec<u8>, T),
) {
    varint(out, items.clone().count() as u64);
    for item in items {
        put(out, item);
    }
}

/// Why [`replay`] did not read an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadEntry {
    #[error(
        "of format {0}, which this collector does not read (it reads {FORMAT_FIXED} and {FORMAT}): \
         a newer collector wrote it; run that version and stop it with SIGTERM (a clean stop \
         empties the journal), then this one"
    )]
    Format(u8),
    #[error("cut short or malformed: the file is corrupt")]
    Malformed,
}

/// Applies an entry to `st` as the writer applied it to memory after its commit, and says how
/// many keys it held; an error if it is not an entry (nothing is applied then past the key
/// that is not one).
pub fn replay(entry: &[u8], st: &mut State) -> Result<u32, BadEntry> {
    let mut r = Reader(entry);
    let format = r.u8().ok_or(BadEntry::Malformed)?;
    if format != FORMAT && format != FORMAT_FIXED {
        return Err(BadEntry::Format(format));
    }
    let end_ms = r.u64().ok_or(BadEntry::Malformed)?;
    let form = match format {
        FORMAT => Form::Compact {
            end_ms,
            end_granule: granule_number(end_ms),
        },
        _ => Form::Fixed,
    };
    replay_keys(r, form, end_ms, st).ok_or(BadEntry::Malformed)
}

/// The keys of an entry [`replay`] read the head of, from `r` on, applied to `st`.
fn replay_keys(mut r: Reader<'_>, form: Form, end_ms: u64, st: &mut State) -> Option<u32> {
    let keys = r.u32()?;
    let (mut granules, mut hosts, mut links) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..keys {
        let len = usize::try_from(r.count(form)?).ok()?;
        let key = Key::decode(r.take(len)?)?;
        granules.clear();
        for _ in 0..r.count(form)? {
            let t = r.time(form)?;
            let totals = Totals {
                response_bytes: r.amount(form)?,
                request_bytes: r.amount(form)?,
                connections_closed: r.amount(form)?,
            };
            granules.push((t, totals));
        }
        hosts.clear();
        for _ in 0..r.count(form)? {
            hosts.push((r.host(form)?, r.granule(form)?));
        }
        links.clear();
        for _ in 0..r.count(form)? {
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
            links.push((kind, addr, r.time(form)?));
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

/// How an entry writes its numbers past its head.
#[derive(Clone, Copy)]
enum Form {
    /// Format 1: fixed-width, big-endian, times whole.
    Fixed,
    /// Format 2: varints, times below the entry's.
    Compact { end_ms: u64, end_granule: u32 },
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
    fn varint(&mut self) -> Option<u64> {
        prost::encoding::decode_varint(&mut self.0).ok()
    }
    /// A length or a count.
    fn count(&mut self, form: Form) -> Option<u32> {
        match form {
            Form::Fixed => self.u32(),
            Form::Compact { .. } => u32::try_from(self.varint()?).ok(),
        }
    }
    /// A time in ms.
    fn time(&mut self, form: Form) -> Option<u64> {
        match form {
            Form::Fixed => self.u64(),
            Form::Compact { end_ms, .. } => Some(end_ms.wrapping_sub(self.varint()?)),
        }
    }
    /// Bytes or connections.
    fn amount(&mut self, form: Form) -> Option<u64> {
        match form {
            Form::Fixed => self.u64(),
            Form::Compact { .. } => self.varint(),
        }
    }
    fn host(&mut self, form: Form) -> Option<HostId> {
        self.count(form)
    }
    /// A host granule's number.
    fn granule(&mut self, form: Form) -> Option<u32> {
        match form {
            Form::Fixed => self.u32(),
            Form::Compact { end_granule, .. } => {
                Some(end_granule.wrapping_sub(u32::try_from(self.varint()?).ok()?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Window;

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
        assert_eq!(replay(&out, &mut replayed), Ok(2));
        for k in [&key, &other] {
            assert_eq!(replayed.get(k), live.get(k));
            assert!(replayed.get(k).is_some());
        }
        // A cut entry is not one, wherever it is cut.
        for n in 0..out.len() {
            assert_eq!(
                replay(&out[..n], &mut State::default()),
                Err(BadEntry::Malformed),
                "cut at {n}"
            );
        }
    }

    #[test]
    fn the_fuzz_seed_is_an_entry() {
        // `collector/fuzz/seeds/journal/`: the fuzzer starts from an entry this reads whole.
        let seed = include_bytes!("../fuzz/seeds/journal/two-keys.bin");
        let mut st = State::default();
        assert_eq!(replay(seed, &mut st), Ok(2));
        let id = Key::ClientId("acct-42".into());
        let end_ms = 1_750_000_020_000;
        assert_eq!(
            st.get(&id)
                .map(|r| r.window(Window::H24, end_ms).totals.response_bytes),
            Some(123_456_789)
        );
    }

    #[test]
    fn times_on_either_side_of_the_entry_and_long_keys_read_back() {
        let t = 1_750_000_000_000u64;
        // A granule after the entry's time (not written so, but read back all the same), one
        // at the epoch, and a key longer than a one-byte length.
        let granules = [(t + 5000, Totals::default()), (0, Totals::default())];
        let hosts = [(u32::MAX, 0), (7, u32::MAX)];
        let links = [(LinkKind::Addr, "192.0.2.9".parse().unwrap(), u64::MAX)];
        let change = Change {
            granules: [&granules, &[]],
            hosts: [&hosts, &[]],
            links: &links,
        };
        let key = Key::ClientId("k".repeat(300).into());
        let mut out = Vec::new();
        begin(&mut out, t);
        push(&mut out, &key, &change);
        let mut live = State::default();
        install(&mut live, key.clone(), |r| apply(r, &change, t));
        let mut replayed = State::default();
        assert_eq!(replay(&out, &mut replayed), Ok(1));
        assert_eq!(replayed.get(&key), live.get(&key));
    }

    #[test]
    fn an_entry_of_format_1_is_still_read() {
        let t = 1_750_000_000_000u64;
        let key = Key::Direct("10.0.0.1".parse().unwrap());
        let totals = |i: u64| Totals {
            response_bytes: 1000 * (i + 1),
            request_bytes: 10,
            connections_closed: 1,
        };
        let granules = [(t, totals(0)), (t - HOST_GRANULE_MS, totals(1))];
        let hosts = [(0, granule_number(t)), (1, granule_number(t) - 1)];
        let links = [(LinkKind::Peer, "2001:db8::1".parse().unwrap(), t)];
        let change = Change {
            granules: [&granules, &[]],
            hosts: [&hosts, &[]],
            links: &links,
        };
        // Format 1, as versions before wrote it.
        let mut old = vec![FORMAT_FIXED];
        old.extend_from_slice(&t.to_be_bytes());
        old.extend_from_slice(&1u32.to_be_bytes());
        let mut k = Vec::new();
        key.encode(&mut k);
        old.extend_from_slice(&u32::try_from(k.len()).unwrap().to_be_bytes());
        old.extend_from_slice(&k);
        old.extend_from_slice(&2u32.to_be_bytes());
        for (g, v) in &granules {
            for x in [*g, v.response_bytes, v.request_bytes, v.connections_closed] {
                old.extend_from_slice(&x.to_be_bytes());
            }
        }
        old.extend_from_slice(&2u32.to_be_bytes());
        for (h, g) in &hosts {
            old.extend_from_slice(&h.to_be_bytes());
            old.extend_from_slice(&g.to_be_bytes());
        }
        old.extend_from_slice(&1u32.to_be_bytes());
        old.extend_from_slice(&[1, 6]);
        old.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        old.extend_from_slice(&t.to_be_bytes());
        let mut live = State::default();
        install(&mut live, key.clone(), |r| apply(r, &change, t));
        let mut replayed = State::default();
        assert_eq!(replay(&old, &mut replayed), Ok(1));
        assert_eq!(replayed.get(&key), live.get(&key));
        // The same change written now takes about a third of the bytes.
        let mut new = Vec::new();
        begin(&mut new, t);
        push(&mut new, &key, &change);
        assert!(
            new.len() * 2 < old.len(),
            "{} against {}",
            new.len(),
            old.len()
        );
        // A format from a newer collector is named as such.
        assert_eq!(
            replay(&[&[9], &new[1..]].concat(), &mut State::default()),
            Err(BadEntry::Format(9))
        );
    }
}
