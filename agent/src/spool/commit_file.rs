//! The commit journal, `spool_dir/commit`: the kernel commit (slots, generations, watermarks
//! before and after) of the newest interval and its seqs. Little endian: `OFLWCMT1`, the epoch,
//! the first and last seq (u64 each), the number of slots (u32), the overflow (a flag byte, then
//! the counters before and after), then per slot its index and generation (u32 each), a closed
//! flag byte, and the counters before and at the snapshot. Counters are six u64s.
use agent_common::Counters;

use crate::table::{CommitPlan, OverflowCommit, SlotCommit};

/// Name of the last interval's kernel commit in the spool directory.
pub const COMMIT_FILE: &str = "commit";
const COMMIT_MAGIC: [u8; 8] = *b"OFLWCMT1";

/// The kernel commit of the newest interval (`spool_dir/commit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Journal {
    pub(super) epoch: u64,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) plan: CommitPlan,
}

fn put_counters(out: &mut Vec<u8>, c: &Counters) {
    for v in [
        c.bytes_out,
        c.bytes_in,
        c.wire_bytes_out,
        c.wire_bytes_in,
        c.segments_out,
        c.segments_in,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Reads little-endian fields off a byte slice.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    fn counters(&mut self) -> Option<Counters> {
        Some(Counters {
            bytes_out: self.u64()?,
            bytes_in: self.u64()?,
            wire_bytes_out: self.u64()?,
            wire_bytes_in: self.u64()?,
            segments_out: self.u64()?,
            segments_in: self.u64()?,
        })
    }
}

impl Journal {
    pub(super) fn encode(&self) -> Vec<u8> {
        let p = &self.plan;
        let mut out = Vec::with_capacity(64 + p.slots.len() * 105);
        out.extend_from_slice(&COMMIT_MAGIC);
        for v in [self.epoch, self.first_seq, self.last_seq] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(p.slots.len() as u32).to_le_bytes());
        match &p.overflow {
            Some(o) => {
                out.push(1);
                put_counters(&mut out, &o.before);
                put_counters(&mut out, &o.after);
            }
            None => out.push(0),
        }
        for c in &p.slots {
            out.extend_from_slice(&c.index.to_le_bytes());
            out.extend_from_slice(&c.generation.to_le_bytes());
            out.push(u8::from(c.closed));
            put_counters(&mut out, &c.before);
            put_counters(&mut out, &c.snapshot);
        }
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Self> {
        let mut c = Cursor(bytes);
        if c.take::<8>()? != COMMIT_MAGIC {
            return None;
        }
        let (epoch, first_seq, last_seq) = (c.u64()?, c.u64()?, c.u64()?);
        let n = c.u32()? as usize;
        let overflow = match c.u8()? {
            0 => None,
            1 => Some(OverflowCommit {
                before: c.counters()?,
                after: c.counters()?,
            }),
            _ => return None,
        };
        let mut slots = Vec::with_capacity(n.min(bytes.len() / 105));
        for _ in 0..n {
            slots.push(SlotCommit {
                index: c.u32()?,
                generation: c.u32()?,
                closed: c.u8()? != 0,
                before: c.counters()?,
                snapshot: c.counters()?,
            });
        }
        c.0.is_empty().then_some(Self {
            epoch,
            first_seq,
            last_seq,
            plan: CommitPlan { slots, overflow },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::plan;
    use super::*;

    #[test]
    fn the_commit_file_round_trips() {
        for p in [plan(0), plan(3), CommitPlan::default()] {
            let j = Journal {
                epoch: 42,
                first_seq: 3,
                last_seq: 4,
                plan: p,
            };
            assert_eq!(Journal::decode(&j.encode()), Some(j.clone()));
            let bytes = j.encode();
            assert_eq!(
                Journal::decode(&bytes[..bytes.len() - 1]),
                None,
                "truncated"
            );
        }
    }
}
