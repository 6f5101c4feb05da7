//! A subject's bytes per UTC day of batch time, for the 7-day and 30-day windows.
//!
//! The collector's rollups hold 24 hours; what a subject pulled over weeks is folded here, hour
//! by hour, from the hourly buckets of its 24 h window each time it is judged (and it is judged
//! at the next judgement after every batch that touched it). Kept in KiB (rounded per fold, so
//! a day's sum is within 1 KiB per judgement of the bytes), which is plenty for limits of GiB:
//! [`DAYS_HELD`] days of responses and 8 of requests, 160 bytes per subject.
use crate::window::Totals;

/// Days of response bytes held: the current day and the 31 before it.
pub const DAYS_HELD: usize = 32;
/// Days of request bytes held: the current day and the 7 before it.
const REQ_DAYS_HELD: usize = 8;
/// One day of batch time, ms.
pub const DAY_MS: u64 = 86_400_000;
const HOURS_PER_DAY: u64 = 24;

/// Response and request bytes per day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Days {
    /// The hour folded last and the subject's response and request bytes in it then; `None`
    /// before the first fold.
    seen: Option<(u64, u64, u64)>,
    /// The newest day with a slot (days since the epoch).
    last_day: u32,
    /// KiB of responses of day `d` at `d % DAYS_HELD`, of requests at `d % REQ_DAYS_HELD`.
    resp: [u32; DAYS_HELD],
    req: [u32; REQ_DAYS_HELD],
}

/// Sums over a day window, as the detectors read them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayWindow {
    pub response_bytes: u64,
    pub request_bytes: u64,
    /// Days of the window with at least the asked-for response bytes.
    pub active_days: u32,
}

fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.saturating_add(512) >> 10).unwrap_or(u32::MAX)
}

impl Days {
    /// Moves the newest day to `day`, clearing the slots of the days that start.
    fn advance(&mut self, day: u32) {
        if day <= self.last_day {
            return;
        }
        for d in (self.last_day + 1..=day).rev().take(DAYS_HELD) {
            self.resp[d as usize % DAYS_HELD] = 0;
        }
        for d in (self.last_day + 1..=day).rev().take(REQ_DAYS_HELD) {
            self.req[d as usize % REQ_DAYS_HELD] = 0;
        }
        self.last_day = day;
    }

    fn add(&mut self, hour: u64, resp: u64, req: u64) {
        if resp == 0 && req == 0 {
            return;
        }
        let day = u32::try_from(hour / HOURS_PER_DAY).unwrap_or(u32::MAX);
        self.advance(day);
        let age = (self.last_day - day) as usize;
        if age < DAYS_HELD {
            let r = &mut self.resp[day as usize % DAYS_HELD];
            *r = r.saturating_add(kib(resp));
        }
        if age < REQ_DAYS_HELD {
            let r = &mut self.req[day as usize % REQ_DAYS_HELD];
            *r = r.saturating_add(kib(req));
        }
    }

    /// Folds what the subject pulled since the last fold, from `hours` (its hourly totals held,
    /// in any order) at `cur_hour`: every hour after the one folded last, and what that one
    /// grew by. The first fold takes every hour held.
    pub fn fold(&mut self, hours: &[(u64, Totals)], cur_hour: u64) {
        let (last, seen_resp, seen_req) = self.seen.unwrap_or((0, 0, 0));
        let first = self.seen.is_none();
        let mut now = (cur_hour, 0, 0);
        for (h, t) in hours {
            if *h > cur_hour {
                continue;
            }
            if *h == cur_hour {
                now = (cur_hour, t.response_bytes, t.request_bytes);
            }
            if first || *h > last {
                self.add(*h, t.response_bytes, t.request_bytes);
            } else if *h == last {
                self.add(
                    *h,
                    t.response_bytes.saturating_sub(seen_resp),
                    t.request_bytes.saturating_sub(seen_req),
                );
            }
        }
        self.seen = Some(now);
    }

    /// The window of `n` days (1..=31) ending at `end_ms`: its current day and the `n` before
    /// it, as the rolling windows do (never less than `n` days). `active` is the response bytes
    /// that make a day active.
    pub fn window(&self, n: usize, end_ms: u64, active: u64) -> DayWindow {
        let day = end_ms / DAY_MS;
        let mut w = DayWindow::default();
        for back in 0..=n.min(DAYS_HELD - 1) as u64 {
            let Some(d) = day.checked_sub(back) else {
                break;
            };
            let age = u64::from(self.last_day).checked_sub(d);
            let Some(age) = age.map(|a| a as usize) else {
                // Later than any day folded.
                continue;
            };
            if age >= DAYS_HELD {
                break;
            }
            let resp = u64::from(self.resp[d as usize % DAYS_HELD]) << 10;
            w.response_bytes += resp;
            if resp >= active {
                w.active_days += 1;
            }
            if age < REQ_DAYS_HELD {
                w.request_bytes += u64::from(self.req[d as usize % REQ_DAYS_HELD]) << 10;
            }
        }
        w
    }

    /// Whether any byte is held in the last `DAYS_HELD` days before `end_ms`.
    pub fn is_empty_at(&self, end_ms: u64) -> bool {
        let day = end_ms / DAY_MS;
        day >= u64::from(self.last_day) + DAYS_HELD as u64 || self.resp.iter().all(|r| *r == 0)
    }

    /// The store form: seen (flag, hour, resp, req), last day, the slots; little-endian.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (flag, (h, r, q)) = match self.seen {
            Some(s) => (1u8, s),
            None => (0, (0, 0, 0)),
        };
        out.push(flag);
        for v in [h, r, q] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.last_day.to_le_bytes());
        for v in self.resp.iter().chain(&self.req) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Bytes of [`Days::encode`].
    pub const ENCODED_LEN: usize = 1 + 24 + 4 + 4 * (DAYS_HELD + REQ_DAYS_HELD);

    /// Parses [`Days::encode`]'s form from the start of `b`.
    pub fn decode(b: &[u8]) -> Option<Days> {
        let b = b.get(..Self::ENCODED_LEN)?;
        let u64_at = |i: usize| Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let seen = match b.first()? {
            0 => None,
            1 => Some((u64_at(1)?, u64_at(9)?, u64_at(17)?)),
            _ => return None,
        };
        let mut d = Days {
            seen,
            last_day: u32_at(25)?,
            ..Days::default()
        };
        for (i, v) in d.resp.iter_mut().chain(d.req.iter_mut()).enumerate() {
            *v = u32_at(29 + 4 * i)?;
        }
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H0: u64 = 20_000 * 24; // a UTC midnight, in hours

    fn t(resp: u64, req: u64) -> Totals {
        Totals {
            response_bytes: resp,
            request_bytes: req,
            connections_closed: 0,
        }
    }

    #[test]
    fn folds_every_byte_once_across_hours_and_days() {
        let mut d = Days::default();
        // 10 days, 3 judgements an hour, 1 MiB more each time: 3 MiB an hour.
        for h in H0..H0 + 240 {
            for k in 1..=3u64 {
                // The 24 h window: the current hour so far, and the 24 before it.
                let hours: Vec<(u64, Totals)> = (h.saturating_sub(24).max(H0)..h)
                    .map(|x| (x, t(3 << 20, 3 << 10)))
                    .chain([(h, t(k << 20, k << 10))])
                    .collect();
                d.fold(&hours, h);
            }
        }
        let end = (H0 + 239) * 3_600_000 + 1;
        let week = d.window(7, end, 1);
        // The current day and the 7 before it, 72 MiB each.
        assert_eq!(week.response_bytes, (8 * 72) << 20);
        assert_eq!(week.request_bytes, (8 * 72) << 10);
        assert_eq!(week.active_days, 8);
        assert_eq!(d.window(30, end, 1).response_bytes, (10 * 72) << 20);
        // A day with nothing ends the activity: 12 days later, the window is empty.
        let later = end + 12 * DAY_MS;
        assert_eq!(d.window(7, later, 1), DayWindow::default());
        assert_eq!(d.window(30, later, 1).response_bytes, (10 * 72) << 20);
        assert!(d.is_empty_at(end + 40 * DAY_MS));
        let back = Days::decode(&{
            let mut v = Vec::new();
            d.encode(&mut v);
            assert_eq!(v.len(), Days::ENCODED_LEN);
            v
        })
        .unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn a_subject_judged_once_a_day_loses_nothing_held() {
        let mut d = Days::default();
        for day in 0..3u64 {
            let h = H0 + day * 24 + 23;
            let hours: Vec<(u64, Totals)> = (h - 24..=h).map(|x| (x, t(1 << 20, 0))).collect();
            d.fold(&hours, h);
        }
        // The first fold took the 25 hours held; each later one the 24 new ones.
        let w = d.window(7, (H0 + 71) * 3_600_000, 1);
        assert_eq!(w.response_bytes, (25 + 24 + 24) << 20);
    }
}
