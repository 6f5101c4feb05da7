//! The feed: the newest applied batches, held in memory in commit order with their positions,
//! for the followers of `outflow.v1.Feed` (see `feed_service`, and `feed.proto` for the
//! contract).
//!
//! The store writer publishes each group commit's applied batches after the commit and before
//! it sends their Acks, so a batch is in the feed exactly once if it was applied, and never if
//! it was a duplicate. Stream tasks build the [`FeedBatch`] (off the writer thread). Followers
//! read by position; the buffer drops its oldest batches beyond `[feed] buffer_entries`, and a
//! follower that asks for a dropped position is told which positions it cannot have.
use std::{
    collections::VecDeque,
    hash::{BuildHasher as _, RandomState},
    sync::{Arc, Mutex, PoisonError},
};

use outflow_proto::v1;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{config_error::ConfigError, keys::Key, model::AgentKey, window::Totals};

/// `[feed]`: what the collector holds for Feed followers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// The most entries held: each batch counts 1, plus 1 per key total, plus 1 per delta
    /// (with `deltas`). The oldest batches go first beyond it; the newest batch is always
    /// held. 0, the default, turns the feed off (Follow fails with FAILED_PRECONDITION): it
    /// costs ingest throughput (see BENCHMARKS.md), so only collectors with followers pay.
    pub buffer_entries: usize,
    /// Hold each batch's deltas as the agent sent them, for followers that ask for them
    /// (`include_deltas`). Costs a copy of every batch in memory.
    pub deltas: bool,
}

impl FeedConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.deltas && self.buffer_entries == 0 {
            return Err(crate::config_error::invalid(
                "feed.deltas",
                "needs a feed: set feed.buffer_entries above 0",
            ));
        }
        Ok(())
    }
}

/// One applied batch as the feed holds it: its per-key totals (as the batch gave them, before
/// the key budget folds any; the writer moves them in once applied) and, if the feed keeps
/// them, its deltas.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedBatch {
    pub agent: AgentKey,
    pub seq: u64,
    pub host: Arc<str>,
    pub start_ms: u64,
    pub end_ms: u64,
    pub totals: Vec<(Key, Totals)>,
    pub deltas: Vec<v1::ConnDelta>,
}

impl FeedBatch {
    /// Entries it counts against `buffer_entries`.
    fn cost(&self) -> usize {
        1 + self.totals.len() + self.deltas.len()
    }
}

/// A held batch and its position.
#[derive(Debug, Clone)]
pub struct Held {
    pub position: u64,
    pub batch: Arc<FeedBatch>,
}

/// What a read after a position finds.
#[derive(Debug)]
pub enum Read {
    /// The next held batches, in position order (none: nothing newer yet).
    Batches(Vec<Held>),
    /// Positions `from..=to` are not held any more; the next read may start after `to`.
    Gap { from: u64, to: u64 },
    /// The position is beyond the newest: not one this run gave.
    Beyond { newest: u64 },
}

#[derive(Debug, Default)]
struct Ring {
    held: VecDeque<Held>,
    entries: usize,
    /// The newest position given (0: none yet).
    newest: u64,
}

/// The buffer of applied batches (see the module's documentation).
#[derive(Debug)]
pub struct Feed {
    run_id: u64,
    capacity: usize,
    keep_deltas: bool,
    ring: Mutex<Ring>,
    /// The newest position, for followers waiting for more.
    newest: watch::Sender<u64>,
}

impl Feed {
    /// An empty feed of a new run (a random run id).
    pub fn new(config: &FeedConfig) -> Self {
        // RandomState's keys are random per process: a hash of nothing is a random number.
        let run_id = RandomState::new().hash_one(0u8).max(1);
        Self {
            run_id,
            capacity: config.buffer_entries,
            keep_deltas: config.deltas && config.buffer_entries > 0,
            ring: Mutex::new(Ring::default()),
            newest: watch::Sender::new(0),
        }
    }

    /// Whether batches are held at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Whether batches are held with their deltas.
    pub fn keeps_deltas(&self) -> bool {
        self.keep_deltas
    }

    /// This run's id: positions of another run mean nothing here.
    pub fn run_id(&self) -> u64 {
        self.run_id
    }

    /// Appends `batches` in order, each at the next position, and drops the oldest beyond
    /// the capacity (never the newest). Returns how many batches were dropped.
    pub fn publish(&self, batches: impl IntoIterator<Item = FeedBatch>) -> usize {
        if !self.enabled() {
            return 0;
        }
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let before = ring.newest;
        for b in batches {
            ring.newest += 1;
            ring.entries += b.cost();
            let position = ring.newest;
            ring.held.push_back(Held {
                position,
                batch: Arc::new(b),
            });
        }
        let mut dropped = 0;
        while ring.entries > self.capacity && ring.held.len() > 1 {
            if let Some(h) = ring.held.pop_front() {
                ring.entries -= h.batch.cost();
                dropped += 1;
            }
        }
        let newest = ring.newest;
        drop(ring);
        if newest != before {
            self.newest.send_replace(newest);
        }
        dropped
    }

    /// At most `max` batches after position `after`.
    pub fn read(&self, after: u64, max: usize) -> Read {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        if after > ring.newest {
            return Read::Beyond {
                newest: ring.newest,
            };
        }
        let Some(oldest) = ring.held.front().map(|h| h.position) else {
            return Read::Batches(Vec::new());
        };
        if after + 1 < oldest {
            return Read::Gap {
                from: after + 1,
                to: oldest - 1,
            };
        }
        // Positions are consecutive: the one after `after` is at this index.
        let first = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        Read::Batches(ring.held.iter().skip(first).take(max).cloned().collect())
    }

    /// The oldest position held (the next one to be given if none is held).
    pub fn oldest(&self) -> u64 {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.held.front().map_or(ring.newest + 1, |h| h.position)
    }

    /// The newest position given (0 if none).
    pub fn newest(&self) -> u64 {
        *self.newest.borrow()
    }

    /// Batches and entries held now.
    pub fn held(&self) -> (usize, usize) {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        (ring.held.len(), ring.entries)
    }

    /// A receiver of the newest position, to wait for more.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, keys: usize) -> FeedBatch {
        FeedBatch {
            agent: AgentKey {
                agent_id: "a".into(),
                epoch: 1,
            },
            seq,
            host: "h".into(),
            start_ms: 0,
            end_ms: 1,
            totals: (0..keys)
                .map(|i| (Key::ClientId(format!("c{i}").into()), Totals::default()))
                .collect(),
            deltas: Vec::new(),
        }
    }

    fn positions(r: Read) -> Vec<u64> {
        match r {
            Read::Batches(v) => v.iter().map(|h| h.position).collect(),
            other => panic!("expected batches, got {other:?}"),
        }
    }

    #[test]
    fn positions_are_consecutive_and_reads_resume() {
        let f = Feed::new(&FeedConfig {
            buffer_entries: 1000,
            deltas: false,
        });
        assert!(positions(f.read(0, 10)).is_empty());
        f.publish([batch(1, 2), batch(2, 0)]);
        f.publish([batch(3, 1)]);
        assert_eq!(f.newest(), 3);
        assert_eq!(positions(f.read(0, 2)), [1, 2]);
        assert_eq!(positions(f.read(2, 10)), [3]);
        assert!(positions(f.read(3, 10)).is_empty());
        assert!(matches!(f.read(4, 10), Read::Beyond { newest: 3 }));
    }

    #[test]
    fn the_oldest_go_beyond_capacity_and_a_read_of_them_is_a_gap() {
        let f = Feed::new(&FeedConfig {
            buffer_entries: 10,
            deltas: false,
        });
        // 4 entries each: two fit, the third pushes the first out.
        assert_eq!(f.publish([batch(1, 3), batch(2, 3)]), 0);
        assert_eq!(f.publish([batch(3, 3)]), 1);
        assert_eq!(f.held(), (2, 8));
        assert_eq!(f.oldest(), 2);
        assert!(matches!(f.read(0, 10), Read::Gap { from: 1, to: 1 }));
        assert_eq!(positions(f.read(1, 10)), [2, 3]);
        // A batch bigger than the buffer is still held, alone.
        f.publish([batch(4, 20)]);
        assert_eq!(f.held(), (1, 21));
        assert!(matches!(f.read(1, 10), Read::Gap { from: 2, to: 3 }));
        assert_eq!(positions(f.read(3, 10)), [4]);
    }

    #[test]
    fn off_holds_nothing() {
        let f = Feed::new(&FeedConfig {
            buffer_entries: 0,
            deltas: true,
        });
        assert!(!f.enabled() && !f.keeps_deltas());
        f.publish([batch(1, 1)]);
        assert_eq!(f.newest(), 0);
        assert_eq!(f.held(), (0, 0));
    }

    #[test]
    fn runs_differ() {
        let c = FeedConfig::default();
        assert_ne!(Feed::new(&c).run_id(), Feed::new(&c).run_id());
    }
}
