//! The fleet's response bytes per minute for a week, and the top keys of every group in each
//! minute: what the dashboard's chart draws over the last 10 minutes, hour, day or week.
//!
//! The rollups keep a key's buckets per minute only for 10 minutes (then per 5 minutes for the
//! hour, per hour for the day), and no key for more than 24 hours. A week per minute for every
//! key would be most of the collector's memory; the chart needs only the fleet's total and the
//! few keys that stand out. So each minute keeps:
//!
//! - the fleet's response bytes: every applied batch adds its host's total to the minute of
//!   its batch time, so the line is exact, late batches included;
//! - once the minute has settled ([`SETTLE_MINUTES`] after its end, in batch time, while the
//!   rollups still hold it per minute), the [`STACK_KEYS`] keys of each group that pulled the
//!   most in it, with their bytes. Bytes of a batch that arrives after that (an agent that
//!   spooled through an outage) are in the fleet line and in no key's share.
//!
//! At most [`KEEP_MINUTES`] minutes are kept (10 080 rows of up to 60 keys: about 25 MiB when
//! every minute of the week had traffic), in the store's `history` table.
use std::collections::BTreeMap;

use crate::{keys::Group, window::Series};

/// One minute, ms.
pub const MINUTE_MS: u64 = 60_000;
/// Minutes kept: a week.
pub const KEEP_MINUTES: u64 = 7 * 24 * 60;
/// Keys of each group kept per minute.
pub const STACK_KEYS: usize = 10;
/// Whole minutes of batch time after a minute's end before its top keys are taken.
pub const SETTLE_MINUTES: u64 = 1;

/// The first minute kept when batch time is at `end_ms`.
pub fn first_kept(end_ms: u64) -> u64 {
    (end_ms / MINUTE_MS).saturating_sub(KEEP_MINUTES - 1)
}

/// The chart's time ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    M10,
    H1,
    H24,
    D7,
}

impl Range {
    pub const ALL: [Range; 4] = [Range::M10, Range::H1, Range::H24, Range::D7];

    /// Minutes in the range, the current one included.
    pub fn minutes(self) -> u64 {
        match self {
            Range::M10 => 10,
            Range::H1 => 60,
            Range::H24 => 24 * 60,
            Range::D7 => KEEP_MINUTES,
        }
    }

    /// `10m`, `1h`, `24h`, `7d`.
    pub fn name(self) -> &'static str {
        match self {
            Range::M10 => "10m",
            Range::H1 => "1h",
            Range::H24 => "24h",
            Range::D7 => "7d",
        }
    }

    pub fn parse(s: &str) -> Option<Range> {
        Range::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The first and the last minute number (`time_ms / MINUTE_MS`) of the range ending at
    /// `end_ms`.
    pub fn span(self, end_ms: u64) -> (u64, u64) {
        let last = end_ms / MINUTE_MS;
        (last.saturating_sub(self.minutes() - 1), last)
    }
}

/// A key of a group and its response bytes in one minute.
pub type Share = (Box<str>, u64);

/// What one minute holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Minute {
    /// The fleet's response bytes in the minute.
    pub response_bytes: u64,
    /// Per group ([`Group::ALL`] order), the keys with the most response bytes in the minute,
    /// most first; empty until the minute settled.
    pub top: [Vec<Share>; 6],
}

/// A row's format version (its first byte).
const FORMAT: u8 = 1;

impl Minute {
    /// `FORMAT`, response bytes (u64), then per group a count (u8) and that many
    /// (key length u16, key, bytes u64); big-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(FORMAT);
        out.extend_from_slice(&self.response_bytes.to_be_bytes());
        for keys in &self.top {
            let keys = &keys[..keys.len().min(usize::from(u8::MAX))];
            out.push(u8::try_from(keys.len()).unwrap_or(u8::MAX));
            for (k, b) in keys {
                let k = &k.as_bytes()[..k.len().min(usize::from(u16::MAX))];
                out.extend_from_slice(&u16::try_from(k.len()).unwrap_or(u16::MAX).to_be_bytes());
                out.extend_from_slice(k);
                out.extend_from_slice(&b.to_be_bytes());
            }
        }
    }

    /// The minute `encode` wrote; `None` for anything else.
    pub fn decode(mut b: &[u8]) -> Option<Minute> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = b.split_at_checked(n)?;
            *b = rest;
            Some(head)
        }
        let u64_of = |b: &[u8]| b.try_into().ok().map(u64::from_be_bytes);
        if take(&mut b, 1)? != [FORMAT] {
            return None;
        }
        let mut m = Minute {
            response_bytes: u64_of(take(&mut b, 8)?)?,
            ..Minute::default()
        };
        for keys in &mut m.top {
            let n = take(&mut b, 1)?[0];
            for _ in 0..n {
                let len = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
                let key = std::str::from_utf8(take(&mut b, usize::from(len))?).ok()?;
                keys.push((key.into(), u64_of(take(&mut b, 8)?)?));
            }
        }
        b.is_empty().then_some(m)
    }
}

/// The minutes of the last week that had traffic, by minute number.
#[derive(Debug, Default)]
pub struct History {
    minutes: BTreeMap<u64, Minute>,
    /// Every minute up to this one (a minute number) has had its top keys taken; 0 before
    /// the first.
    settled_through: u64,
}

impl History {
    pub fn get(&self, minute: u64) -> Option<&Minute> {
        self.minutes.get(&minute)
    }

    /// Replaces a minute (removes it if it holds nothing).
    pub fn put(&mut self, minute: u64, m: Minute) {
        if m == Minute::default() {
            self.minutes.remove(&minute);
        } else {
            self.minutes.insert(minute, m);
        }
    }

    pub fn settled_through(&self) -> u64 {
        self.settled_through
    }

    pub fn set_settled_through(&mut self, minute: u64) {
        self.settled_through = minute;
    }

    /// Drops the minutes before `first`.
    pub fn prune_before(&mut self, first: u64) {
        if self
            .minutes
            .first_key_value()
            .is_some_and(|(m, _)| *m < first)
        {
            self.minutes = self.minutes.split_off(&first);
        }
    }

    pub fn len(&self) -> usize {
        self.minutes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
    }

    /// The fleet's response bytes per minute of `range` ending at `end_ms`.
    pub fn fleet(&self, range: Range, end_ms: u64) -> Series {
        let (first, last) = range.span(end_ms);
        let mut bytes = vec![0; usize::try_from(last - first + 1).unwrap_or(0)];
        for (m, row) in self.minutes.range(first..=last) {
            if let Some(b) = usize::try_from(m - first)
                .ok()
                .and_then(|i| bytes.get_mut(i))
            {
                *b = row.response_bytes;
            }
        }
        Series {
            start_ms: first * MINUTE_MS,
            bucket_ms: MINUTE_MS,
            bytes,
        }
    }

    /// The settled minutes of `range` ending at `end_ms` and the top keys of `group` in each.
    pub fn shares(
        &self,
        group: Group,
        range: Range,
        end_ms: u64,
    ) -> impl Iterator<Item = (u64, &[Share])> {
        let (first, last) = range.span(end_ms);
        let last = last.min(self.settled_through);
        let g = group_index(group);
        (first <= last)
            .then(|| self.minutes.range(first..=last))
            .into_iter()
            .flatten()
            .map(move |(m, row)| (*m, &row.top[g][..]))
    }

    /// Minutes due to settle when batch time moves from `held_end_ms` (what the rollups
    /// hold) to `end_ms`: after `settled_through`, ended [`SETTLE_MINUTES`] before `end_ms`,
    /// and still held per minute by the rollups (the 10-minute window's buckets at
    /// `held_end_ms`). When batch time jumps ahead (the fleet was idle), the minutes before
    /// the jump settle on what they hold.
    pub fn due(&self, held_end_ms: u64, end_ms: u64) -> std::ops::RangeInclusive<u64> {
        let held = held_end_ms / MINUTE_MS;
        let last = (end_ms / MINUTE_MS)
            .saturating_sub(SETTLE_MINUTES + 1)
            .min(held);
        let first = (self.settled_through + 1).max(held.saturating_sub(9));
        first..=last
    }
}

/// A group's index in [`Minute::top`].
pub fn group_index(group: Group) -> usize {
    Group::ALL.iter().position(|g| *g == group).unwrap_or(0)
}

/// The `n` keys with the most bytes over `minutes` of top lists (each a minute number and its
/// list), most first; and each one's bytes per minute from `first` to `last`.
pub fn stack<'a>(
    minutes: impl IntoIterator<Item = (u64, &'a [Share])>,
    first: u64,
    last: u64,
    n: usize,
) -> Vec<(Box<str>, Vec<u64>)> {
    let minutes: Vec<(u64, &[Share])> = minutes.into_iter().collect();
    let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, shares) in &minutes {
        for (k, b) in *shares {
            *sums.entry(k).or_default() += b;
        }
    }
    let mut ranked: Vec<(&str, u64)> = sums.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    ranked.truncate(n);
    let width = usize::try_from(last.saturating_sub(first) + 1).unwrap_or(0);
    ranked
        .into_iter()
        .map(|(key, _)| {
            let mut bytes = vec![0; width];
            for (m, shares) in &minutes {
                let slot = m
                    .checked_sub(first)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| bytes.get_mut(i));
                if let (Some(slot), Some((_, b))) = (slot, shares.iter().find(|s| *s.0 == *key)) {
                    *slot = *b;
                }
            }
            (key.into(), bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minute(bytes: u64, keys: &[(&str, u64)]) -> Minute {
        let mut m = Minute {
            response_bytes: bytes,
            ..Minute::default()
        };
        m.top[0] = keys.iter().map(|(k, b)| ((*k).into(), *b)).collect();
        m
    }

    #[test]
    fn a_minute_round_trips_and_bad_rows_are_refused() {
        let mut m = minute(900, &[("203.0.113.7", 600), ("2001:db8::1", 300)]);
        m.top[4] = vec![("tenant-a".into(), 5)];
        let mut b = Vec::new();
        m.encode(&mut b);
        assert_eq!(Minute::decode(&b), Some(m));
        for cut in 0..b.len() {
            assert_eq!(Minute::decode(&b[..cut]), None, "cut at {cut}");
        }
        b.push(0);
        assert_eq!(Minute::decode(&b), None);
        assert_eq!(Minute::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn fleet_covers_every_minute_of_the_range() {
        let mut h = History::default();
        let t = 20_000;
        let end = t * MINUTE_MS + 5_000;
        h.put(t, minute(7, &[]));
        h.put(t - 5, minute(3, &[]));
        h.put(t - 10, minute(1, &[])); // outside the 10 minutes
        let s = h.fleet(Range::M10, end);
        assert_eq!(s.start_ms, (t - 9) * MINUTE_MS);
        assert_eq!(s.bucket_ms, MINUTE_MS);
        assert_eq!(s.bytes, vec![0, 0, 0, 0, 3, 0, 0, 0, 0, 7]);
        let week = h.fleet(Range::D7, end);
        assert_eq!(week.bytes.len(), 10_080);
        assert_eq!(week.bytes.iter().sum::<u64>(), 11);
        h.prune_before(t - 4);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn the_stack_is_the_keys_with_most_bytes_over_the_range() {
        let mut h = History::default();
        h.put(10, minute(100, &[("a", 50), ("b", 40)]));
        h.put(11, minute(100, &[("b", 70), ("c", 20)]));
        h.put(12, minute(100, &[("a", 90)])); // not settled: not in the shares
        h.set_settled_through(11);
        let end = 12 * MINUTE_MS;
        let shares: Vec<_> = h.shares(Group::ClientAddress, Range::M10, end).collect();
        assert_eq!(shares.len(), 2);
        let s = stack(shares, 3, 12, 2);
        assert_eq!(
            s,
            vec![
                ("b".into(), vec![0, 0, 0, 0, 0, 0, 0, 40, 70, 0]),
                ("a".into(), vec![0, 0, 0, 0, 0, 0, 0, 50, 0, 0]),
            ]
        );
        assert!(
            h.shares(Group::Host, Range::M10, end)
                .all(|(_, s)| s.is_empty())
        );
    }

    #[test]
    fn minutes_settle_one_minute_after_they_end_while_held_per_minute() {
        let mut h = History::default();
        // Batch time 12:05:30: 12:03 ended more than a minute ago; 12:04 has not.
        let now = 12 * 60 + 5;
        let end = now * MINUTE_MS + 30_000;
        assert_eq!(h.due(end, end), now - 9..=now - 2);
        h.set_settled_through(now - 3);
        assert_eq!(h.due(end, end), now - 2..=now - 2);
        h.set_settled_through(now - 2);
        assert!(h.due(end, end).is_empty());
        // Batch time jumps 3 hours: the minutes up to the old end settle on what they hold.
        let later = end + 3 * 3_600_000;
        assert_eq!(h.due(end, later), now - 1..=now);
        h.set_settled_through(now);
        // The minutes of the gap the rollups no longer hold are skipped.
        let l = later / MINUTE_MS;
        assert_eq!(h.due(later, later + MINUTE_MS), l - 9..=l - 1);
    }
}
