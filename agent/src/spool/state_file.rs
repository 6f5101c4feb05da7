//! The sequence state, `spool_dir/state`: `key value` lines, `epoch`, `acked` (highest
//! acknowledged seq), `acked_end_ms`, and the loss not yet reported in a batch
//! (`pending_lost_batches`, `pending_lost`: six counters). And the epoch's own file,
//! `state_dir/epoch` (the number and a newline), which is valid only together with it.
use std::path::Path;

use outflow_proto::v1;

use super::SpoolError;
use crate::{durable_file::write_durably, wire::Loss};

/// Name of the epoch's file in the state directory.
pub const EPOCH_FILE: &str = "epoch";
/// Name of the sequence state's file in the spool directory.
pub const STATE_FILE: &str = "state";

/// The persisted sequence state (`spool_dir/state`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct SeqState {
    pub(super) epoch: u64,
    pub(super) acked: u64,
    pub(super) acked_end_ms: u64,
    pub(super) pending: Loss,
}

impl SeqState {
    pub(super) fn render(&self) -> String {
        let c = &self.pending.counters;
        format!(
            "epoch {}\nacked {}\nacked_end_ms {}\npending_lost_batches {}\npending_lost {} {} {} {} {} {}\n",
            self.epoch,
            self.acked,
            self.acked_end_ms,
            self.pending.batches,
            c.bytes_out,
            c.bytes_in,
            c.wire_bytes_out,
            c.wire_bytes_in,
            c.segments_out,
            c.segments_in
        )
    }

    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut s = Self::default();
        let (mut epoch, mut acked) = (false, false);
        for line in text.lines() {
            let mut words = line.split_ascii_whitespace();
            let key = words.next()?;
            let nums: Vec<u64> = words.map(str::parse).collect::<Result<_, _>>().ok()?;
            match (key, nums.as_slice()) {
                ("epoch", &[v]) if v != 0 => {
                    s.epoch = v;
                    epoch = true;
                }
                ("acked", &[v]) => {
                    s.acked = v;
                    acked = true;
                }
                ("acked_end_ms", &[v]) => s.acked_end_ms = v,
                ("pending_lost_batches", &[v]) => s.pending.batches = v,
                ("pending_lost", &[a, b, c, d, e, f]) => {
                    s.pending.counters = v1::Counters {
                        bytes_out: a,
                        bytes_in: b,
                        wire_bytes_out: c,
                        wire_bytes_in: d,
                        segments_out: e,
                        segments_in: f,
                    };
                }
                _ => return None,
            }
        }
        (epoch && acked).then_some(s)
    }
}

/// Replaces `dir/state` atomically (temp file, fsync, rename, dir fsync).
pub(super) fn write_state(dir: &Path, state: &SeqState) -> Result<(), SpoolError> {
    let path = dir.join(STATE_FILE);
    write_durably(&path, state.render().as_bytes())
        .map_err(|source| SpoolError::Write { path, source })
}

/// The epoch file's content.
pub(super) fn render_epoch(epoch: u64) -> String {
    format!("{epoch}\n")
}

/// The epoch in the epoch file's content, if it holds one.
pub(super) fn parse_epoch(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_round_trips() {
        let s = SeqState {
            epoch: 9,
            acked: 4,
            acked_end_ms: 123,
            pending: Loss {
                batches: 2,
                counters: v1::Counters {
                    bytes_out: 1,
                    bytes_in: 2,
                    wire_bytes_out: 3,
                    wire_bytes_in: 4,
                    segments_out: 5,
                    segments_in: 6,
                },
            },
        };
        assert_eq!(SeqState::parse(&s.render()), Some(s));
        assert_eq!(SeqState::parse("epoch 0\nacked 1\n"), None);
        assert_eq!(SeqState::parse("acked 1\n"), None);
        assert_eq!(SeqState::parse("epoch 1\nacked x\n"), None);
    }
}
