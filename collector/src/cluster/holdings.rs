//! What an aggregator's store holds, as its queries report it (`outflow.v1.AggregatorQuery.End`):
//! the partitions it holds, and which of them are still being replayed.
//!
//! A partition is held from the moment its consumer is set to start at the stream's first
//! part (or, after a restart, from the list in the data directory), so that no two aggregators
//! answer for it. It is *caught up* once its consumer, started in this process, has applied
//! every part the stream had for it at some moment since: a delivery that JetStream said had
//! none after it, applied, or a consumer with nothing waiting. Until then the store lacks parts
//! of it (a rebuild, a partition taken over, a restart with parts published meanwhile), and
//! the node answering for the cluster refuses rather than answer short. A partition stays
//! caught up while its consumer runs (its parts then lag by what is in flight), and is behind
//! again once it stops.
use std::{
    collections::BTreeSet,
    sync::{Arc, PoisonError, RwLock},
};

use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::Metrics;

#[derive(Debug, Default)]
struct State {
    held: BTreeSet<u32>,
    caught_up: BTreeSet<u32>,
}

impl State {
    /// The partitions held that are not caught up.
    fn replaying(&self) -> impl Iterator<Item = u32> + '_ {
        self.held.difference(&self.caught_up).copied()
    }
}

/// An aggregator's partitions, shared between its round, its consumers and its queries, and
/// shown in `outflow_collector_cluster_partitions_held` and
/// `outflow_collector_cluster_partitions_replaying`.
#[derive(Debug, Clone)]
pub struct Holdings {
    state: Arc<RwLock<State>>,
    held_gauge: Gauge,
    replaying_gauge: Gauge,
}

impl Holdings {
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            state: Arc::default(),
            held_gauge: metrics.cluster_partitions_held.clone(),
            replaying_gauge: metrics.cluster_partitions_replaying.clone(),
        }
    }

    /// The partitions the store holds.
    pub fn held(&self) -> BTreeSet<u32> {
        self.read(|s| s.held.clone())
    }

    /// How many partitions are held.
    pub fn count(&self) -> usize {
        self.read(|s| s.held.len())
    }

    /// The partitions held that are not caught up.
    pub fn replaying(&self) -> BTreeSet<u32> {
        self.read(|s| s.replaying().collect())
    }

    /// Lists `held` as what the store holds.
    pub fn set_held(&self, held: BTreeSet<u32>) {
        self.write(|s| s.held = held);
    }

    /// `partition`'s consumer has applied every part the stream had for it.
    pub fn caught_up(&self, partition: u32) {
        self.write(|s| {
            s.caught_up.insert(partition);
        });
    }

    /// `partition`'s consumer stopped (or starts): what it has not applied yet is unknown.
    pub fn behind(&self, partition: u32) {
        self.write(|s| {
            s.caught_up.remove(&partition);
        });
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn write(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
        f(&mut s);
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.held_gauge.set(count(s.held.len()));
        self.replaying_gauge.set(count(s.replaying().count()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_replays_until_its_consumer_caught_up_and_again_once_it_stops() {
        let metrics = Metrics::default();
        let h = Holdings::new(&metrics);
        h.set_held(BTreeSet::from([0, 1, 2]));
        assert_eq!(h.replaying(), BTreeSet::from([0, 1, 2]));
        h.caught_up(1);
        h.caught_up(2);
        assert_eq!(h.replaying(), BTreeSet::from([0]));
        assert_eq!(metrics.cluster_partitions_replaying.get(), 1);
        assert_eq!(metrics.cluster_partitions_held.get(), 3);
        h.behind(2);
        assert_eq!(h.replaying(), BTreeSet::from([0, 2]));
        // Caught up but no longer held (a rebuild gave it up): not reported.
        h.set_held(BTreeSet::from([0, 2]));
        h.caught_up(0);
        h.caught_up(2);
        assert!(h.replaying().is_empty());
        assert_eq!(metrics.cluster_partitions_replaying.get(), 0);
        assert_eq!(metrics.cluster_partitions_held.get(), 2);
    }
}
