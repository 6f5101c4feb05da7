//! An aggregator's consumers kept in step by batch time, so that its detectors judge a replay
//! as they judged the live stream.
//!
//! The store writer judges when batch time crosses a judgement boundary (every
//! `detect.eval_interval`), on everything applied before it. One collector sees the fleet's
//! batches in the order they arrive. An aggregator's consumers each read their partition on
//! their own: one that runs ahead (a store rebuilt from the stream's start after a move, a
//! restart with a backlog, one partition's backlog) would cross a boundary while the others
//! still have parts of the period before it, whose keys would then be judged a period late
//! against windows that have moved on, or never if the fleet has stopped sending.
//!
//! So each consumer says where it is (its *head*: the period of the part it is about to queue,
//! the latest period granted when parts wait that it could not fetch, or nothing once
//! JetStream says no parts wait for it), and queues a part of a period beyond
//! the latest one granted only when every other consumer with parts is at that period or
//! beyond it. The consumer at the earliest period never waits, so they all go on.
//!
//! A consumer that joins while the others are under way (started again after its aggregator
//! stopped applying for want of its lease, with a backlog from its last acknowledged part)
//! holds them back from its first fetch until it has caught up: let them run ahead, and its
//! parts would be judged late, as the live stream never was (an alert resolved for a lack of
//! bytes that were only late, and raised again).
//!
//! When the aggregator stops its consumers (to rebuild, or because it could not renew its
//! membership), they stop one by one, each after the parts it fetched; a consumer that left
//! must not let the others run on past it. So from [`Aligner::stop`] until
//! [`Aligner::resume`] no consumer goes beyond the latest period granted: one with a part of a
//! later period stops there and leaves it unacknowledged (it comes again, in order, when its
//! consumer starts again from its first part not acknowledged).
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use log::debug;
use tokio::sync::watch;

/// The consumers of one aggregator.
#[derive(Debug)]
pub struct Aligner {
    /// The length of a judgement period, in ms (`detect.eval_interval`).
    every_ms: u64,
    inner: Mutex<Inner>,
    /// Bumped whenever a head moves on or leaves (what a waiting consumer waits for).
    moved: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each partition's head: the period of the part its consumer queues next (absent: no
    /// parts waiting, or no consumer).
    heads: BTreeMap<u32, u64>,
    /// The latest period any consumer was let into.
    granted: u64,
    /// The consumers are being stopped: none goes beyond `granted`.
    stopping: bool,
}

/// Whether a part may be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Now.
    Now,
    /// Once the consumers with parts of earlier periods have queued them.
    Wait,
    /// Not before the consumers start again: they are being stopped.
    Stopped,
}

impl Aligner {
    /// Consumers judged every `every_ms` of batch time.
    pub fn new(every_ms: u64) -> Arc<Aligner> {
        Arc::new(Aligner {
            every_ms: every_ms.max(1),
            inner: Mutex::new(Inner::default()),
            moved: watch::channel(0).0,
        })
    }

    /// The period a part ending at `time_ms` is judged in: the writer judges at the first
    /// boundary `b` with `time_ms <= b` (see `DetectConfig::next_judgement`).
    fn period(&self, time_ms: u64) -> u64 {
        time_ms.div_ceil(self.every_ms)
    }

    /// The consumers are about to be stopped: from now on none goes beyond the latest period
    /// granted, and one waiting to go beyond it is told to stop ([`Member::enter`] returns
    /// false), so that the ones still finishing their fetches do not run on past those that
    /// stopped first.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.bump();
    }

    /// Every consumer stopped: the next ones go on as before (joined, they hold each other
    /// until each has fetched).
    pub fn resume(&self) {
        self.lock().stopping = false;
    }

    /// Starts over from the first period (the store was emptied: its writer judges from the
    /// start again).
    pub fn reset(&self) {
        self.lock().granted = 0;
        self.bump();
    }

    /// A consumer of `partition` joins. Until its first fetch it holds the others back where
    /// they are (it may have parts of any period).
    pub fn join(self: &Arc<Self>, partition: u32) -> Member {
        self.lock().heads.insert(partition, 0);
        Member {
            aligner: self.clone(),
            partition,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.moved.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sets `partition`'s head to `period` and says whether it may queue a part of it now.
    fn try_enter(&self, partition: u32, period: u64) -> Entry {
        let (entry, moved_on) = {
            let mut inner = self.lock();
            let before = inner.heads.insert(partition, period);
            let granted = inner.granted;
            let entry = if period <= granted {
                Entry::Now
            } else if inner.stopping {
                Entry::Stopped
            } else if inner
                .heads
                .iter()
                .all(|(p, h)| *p == partition || *h >= period)
            {
                inner.granted = period;
                Entry::Now
            } else {
                Entry::Wait
            };
            (entry, before.is_none_or(|b| b < period))
        };
        if moved_on {
            self.bump();
        }
        entry
    }

    /// `partition` has parts waiting that it could not fetch (of a period not known): a
    /// consumer without a head holds the others at the latest period granted.
    fn hold(&self, partition: u32) {
        let mut inner = self.lock();
        let granted = inner.granted;
        inner.heads.entry(partition).or_insert(granted);
    }

    fn leave(&self, partition: u32) {
        if self.lock().heads.remove(&partition).is_some() {
            self.bump();
        }
    }
}

/// One consumer's place among its aggregator's consumers; it leaves when dropped.
#[derive(Debug)]
pub struct Member {
    aligner: Arc<Aligner>,
    partition: u32,
}

impl Member {
    /// Waits until a part ending at `time_ms` may be queued: returns true once no other
    /// consumer has parts of an earlier period still to queue; false if the consumers are
    /// being stopped first ([`Aligner::stop`]): the part is not to be queued.
    pub async fn enter(&self, time_ms: u64) -> bool {
        let period = self.aligner.period(time_ms);
        let mut moved = self.aligner.moved.subscribe();
        // Subscribed before each check: a move after it wakes the wait below.
        let mut waited = false;
        loop {
            match self.aligner.try_enter(self.partition, period) {
                Entry::Now => break,
                Entry::Stopped => {
                    debug!(
                        "partition {}: a part of period {period} left for the next start (the consumers are stopping)",
                        self.partition
                    );
                    return false;
                }
                Entry::Wait => {}
            }
            if !waited {
                waited = true;
                debug!(
                    "partition {}: a part of period {period} waits for the other consumers ({:?})",
                    self.partition,
                    self.aligner.lock()
                );
            }
            if moved.changed().await.is_err() {
                return true;
            }
        }
        if waited {
            debug!("partition {}: period {period} entered", self.partition);
        }
        true
    }

    /// Whether a part ending at `time_ms` may be queued now (if not, [`Self::enter`] says
    /// whether it may be later).
    pub fn try_enter(&self, time_ms: u64) -> bool {
        self.aligner
            .try_enter(self.partition, self.aligner.period(time_ms))
            == Entry::Now
    }

    /// This consumer has parts waiting and could not fetch them (its fetch failed or came
    /// back empty: its consumer's leader lost, the connection failing over): it holds the
    /// others where they are, as if it had a part of the latest period granted, until it
    /// fetches. (Were it idle before, the others would run ahead of parts only late.)
    pub fn hold(&self) {
        self.aligner.hold(self.partition);
    }

    /// This consumer found no parts waiting: it holds nobody back until it has one again.
    pub fn idle(&self) {
        self.aligner.leave(self.partition);
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.aligner.leave(self.partition);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MIN: u64 = 60_000;

    /// Whether `enter` lets the part in within a short while (it either returns at once or
    /// waits on another member).
    async fn enters(m: &Member, time_ms: u64) -> bool {
        tokio::time::timeout(Duration::from_millis(50), m.enter(time_ms))
            .await
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn consumers_being_stopped_go_no_further_than_the_period_granted() {
        let a = Aligner::new(MIN);
        let (p0, p1, p2) = (a.join(0), a.join(1), a.join(2));
        assert!(!enters(&p0, 10 * MIN).await, "p1 and p2 have not fetched");
        assert!(!enters(&p1, 10 * MIN).await, "p2 has not fetched");
        assert!(enters(&p2, 10 * MIN).await, "all are at minute 10");
        assert!(enters(&p1, 10 * MIN).await);
        assert!(enters(&p0, 10 * MIN).await);
        // p2 waits for p0 and p1 to reach minute 12.
        let waiting = tokio::spawn(async move { (p2.enter(12 * MIN).await, p2) });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // The aggregator stops its consumers: the waiting one is told to stop, ...
        a.stop();
        let (entered, p2) = waiting.await.unwrap();
        assert!(
            !entered,
            "a part beyond minute 10 is left for the next start"
        );
        // ... the ones that stop first let nobody past them, ...
        drop(p0);
        assert!(!enters(&p1, 11 * MIN).await, "p0 left while stopping");
        // ... and what was granted may still be queued.
        assert!(enters(&p1, 10 * MIN).await);
        drop((p1, p2));
        // Started again: joined, they hold each other until each has fetched, as at the start.
        a.resume();
        let (q0, q1) = (a.join(0), a.join(1));
        assert!(!enters(&q0, 11 * MIN).await, "q1 has not fetched");
        assert!(enters(&q1, 9 * MIN).await, "behind: it never waits");
        assert!(enters(&q1, 11 * MIN).await);
        assert!(enters(&q0, 11 * MIN).await);
    }

    #[tokio::test]
    async fn a_consumer_ahead_waits_for_the_others_until_they_catch_up_or_go_idle() {
        let a = Aligner::new(MIN);
        let (p0, p1, p2) = (a.join(0), a.join(1), a.join(2));
        // Everyone starts held at the first period: nobody goes into a later one before all
        // have said where they are.
        assert!(!enters(&p0, 10 * MIN).await);
        assert!(!enters(&p2, 5 * MIN).await, "p1 has not fetched");
        assert!(enters(&p1, 3 * MIN).await, "the earliest goes on");
        assert!(enters(&p1, 3 * MIN - 1).await, "within the granted period");
        // p2 waits (in another task) until p1 moves on to minute 5.
        let waiting = tokio::spawn(async move {
            p2.enter(5 * MIN).await;
            p2
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(enters(&p1, 5 * MIN).await);
        let p2 = waiting.await.unwrap();
        assert!(!enters(&p0, 10 * MIN).await, "p1 and p2 are in minute 5");
        // p1 and p2 find nothing more: p0 goes on alone.
        p1.idle();
        assert!(!enters(&p0, 10 * MIN).await, "p2 is still in minute 5");
        p2.idle();
        assert!(enters(&p0, 10 * MIN).await);
        // A part of an earlier period never waits.
        assert!(enters(&p1, 2 * MIN).await);
    }

    #[tokio::test]
    async fn a_consumer_joining_late_holds_the_others_back_until_it_catches_up() {
        let a = Aligner::new(MIN);
        let live = a.join(0);
        assert!(enters(&live, 100 * MIN).await);
        // Started again mid-run: its backlog starts at minute 90.
        let late = a.join(1);
        assert!(
            !enters(&live, 101 * MIN).await,
            "the new consumer has not fetched"
        );
        assert!(enters(&late, 90 * MIN).await, "behind: it never waits");
        assert!(!enters(&live, 101 * MIN).await, "it is still at minute 90");
        assert!(enters(&late, 100 * MIN).await);
        assert!(!enters(&live, 101 * MIN).await, "it is at minute 100");
        // Caught up, they go on in step.
        let waiting = tokio::spawn(async move {
            live.enter(101 * MIN).await;
            live
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(enters(&late, 101 * MIN).await);
        let live = waiting.await.unwrap();
        // Once the store is emptied, everyone starts together again.
        a.reset();
        let again = a.join(2);
        assert!(
            !enters(&live, 3 * MIN).await,
            "the new consumer has not fetched"
        );
        assert!(enters(&again, MIN).await);
        assert!(!enters(&live, 3 * MIN).await, "p2 is in minute 1");
        drop(late);
        assert!(!enters(&live, 3 * MIN).await, "p2 is still in minute 1");
        again.idle();
        assert!(enters(&live, 3 * MIN).await);
    }

    #[tokio::test]
    async fn an_idle_consumer_that_cannot_fetch_its_parts_holds_the_others() {
        let a = Aligner::new(MIN);
        let (p0, p1) = (a.join(0), a.join(1));
        assert!(!enters(&p0, 10 * MIN).await, "p1 has not fetched");
        assert!(enters(&p1, 10 * MIN).await);
        p1.idle();
        assert!(enters(&p0, 11 * MIN).await, "p1 is idle");
        // Parts wait for p1, and its fetch comes back without them.
        p1.hold();
        assert!(enters(&p0, 11 * MIN).await, "within the granted period");
        assert!(
            !enters(&p0, 12 * MIN).await,
            "p1's parts may be of minute 11"
        );
        p1.hold();
        assert!(!enters(&p0, 12 * MIN).await, "holding twice moves nothing");
        assert!(enters(&p1, 12 * MIN).await, "it fetched: minute 12");
        assert!(enters(&p0, 12 * MIN).await);
        // Holding keeps a head it has.
        assert!(!enters(&p0, 13 * MIN).await);
        p1.hold();
        assert!(!enters(&p0, 13 * MIN).await, "p1 is still in minute 12");
        assert!(enters(&p1, 13 * MIN).await);
    }

    #[test]
    fn a_part_is_in_a_later_period_exactly_when_it_ends_past_a_boundary() {
        // The writer judges at multiples of the interval, once a part ends past one.
        let d = crate::detect::DetectConfig::default();
        let every = d.eval_interval_ms();
        assert_eq!(d.next_judgement(5 * every + 3) % every, 0);
        let a = Aligner::new(every);
        for b in [every, 2 * every, 60 * every] {
            for t in [b - 1, b, b + 1] {
                assert_eq!(
                    a.period(t) > b / every,
                    t > b,
                    "part ending at {t}, boundary {b}"
                );
            }
        }
    }
}
