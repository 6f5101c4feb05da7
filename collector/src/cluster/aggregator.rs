//! An aggregator's share of the partitions, kept in step with the other aggregators.
//!
//! A task of its own renews the aggregator's membership ([`super::renewal`]). Every quarter
//! of the lease a round reads the claims and follows [`membership::plan`]: claims free
//! partitions up to its fair share, gives up what is beyond it. Its store holds exactly the
//! partitions it holds, and the data directory lists them (`partitions-held`), so that the
//! sum of the aggregators' answers is the fleet's:
//!
//! - A partition it gives up is taken out by a rebuild: every consumer stops and is deleted,
//!   the store is emptied ([`Collector::reset`]), the claims given up are dropped, and the
//!   partitions it keeps are applied again from the stream's first part. A part's bytes can be
//!   in a key with other partitions' (an address seen with several client ids), so taking one
//!   partition out of a store means building the store again.
//! - A partition it held that another aggregator claimed meanwhile (it was gone past the
//!   lease, or cut off from NATS) is taken out the same way, before anything else.
//! - A partition it claims is applied from the stream's first part through a fresh consumer;
//!   if the store holds others, it is rebuilt first, so that all are applied together.
//! - After a crash (no `stopped-cleanly` file in the data directory) the store is rebuilt
//!   before anything is applied.
//!
//! So a store is always its partitions applied from the stream's first part, by consumers in
//! step ([`super::align`]): its detectors judge them as one collector would have judged them
//! live, and an alert has the same id whichever aggregator raises it. (Without the last two
//! rules, a partition taken on late, or a store whose detectors restored what they learnt
//! from an hour back, would be judged otherwise: an attack alerted twice, or missed.)
//!
//! The order of the steps makes a crash anywhere safe: a consumer only ever goes on from
//! where it is when the store holds what it acknowledged (the list is written before a
//! consumer of a new partition starts, and the consumers are deleted before the store is
//! emptied), and any part applied twice is a duplicate below its watermark.
//!
//! An aggregator whose membership was not renewed for half a lease claims nothing and stops
//! applying (its claims may be taken a lease after its last renewal); it goes on once it is
//! renewed again, rebuilding first if a claim of its was taken.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream::{consumer::PullConsumer, stream::Stream};
use futures_util::StreamExt as _;
use log::{debug, info, warn};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    align::{Aligner, Member},
    config::ClusterConfig,
    consume,
    holdings::Holdings,
    membership::{self, Membership, MembershipError},
    partition::Partitions,
    peer_ratios::PeerRatios,
    publish::{PublishError, open_stream},
    renewal::Renewal,
    second_stage,
};
use crate::{collector::Collector, detect::DetectConfig};

/// The file in the data directory listing the partitions the store holds.
const HELD_FILE: &str = "partitions-held";
/// Consumers a round opens at once, at most.
const OPEN_AT_ONCE: usize = 16;
/// Times a round plans its claims, at most, when others claimed what it planned to.
const CLAIM_TRIES: u32 = 3;
/// The file in the data directory that says the last run stopped cleanly (written once the
/// store is closed, removed at start).
pub const CLEAN_STOP_FILE: &str = "stopped-cleanly";
/// The file in the data directory naming this aggregator's instance (made once): what tells
/// its membership entry from another aggregator's under the same name.
const INSTANCE_FILE: &str = "aggregator-instance";

/// Why an aggregator could not start.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Stream(#[from] PublishError),
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("{path}: {error}")]
    File {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A round that did not finish (the next one tries again).
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("{0}")]
    Other(String),
}

/// Connects to the stream and the membership buckets of `cfg` and starts the aggregator's
/// loop, applying to `collector` (whose store is in `data_dir`) until `stop`, and publishing
/// what its judgements saw for the second stage, which it runs while it holds partition 0
/// (judging with `detect`); the returned task ends once every consumer has stopped.
pub async fn start(
    collector: Arc<Collector>,
    cfg: &ClusterConfig,
    data_dir: &Path,
    advertise: String,
    shared: Holdings,
    detect: DetectConfig,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, AggregatorError> {
    let p = cfg.publish();
    let (js, stream) = open_stream(&p).await?;
    let cohorts = second_stage::open_stream(&js, &p).await?;
    let judge_every_ms = detect.eval_interval_ms();
    let me = cfg.node();
    let members = Membership::open(&js, &p.stream, p.replicas, cfg.lease, &me).await?;
    let ratios = PeerRatios::open(&js, &p.stream, p.replicas, cfg.lease, &me).await?;
    let instance_path = data_dir.join(INSTANCE_FILE);
    let instance = instance_id(&instance_path).map_err(|error| AggregatorError::File {
        path: instance_path,
        error,
    })?;
    let held_path = data_dir.join(HELD_FILE);
    let held = read_held(&held_path).map_err(|error| AggregatorError::File {
        path: held_path.clone(),
        error,
    })?;
    // After a crash the store holds every committed part, but what the detectors learnt is
    // only as recent as their last save (hourly in batch time): judged on from there, the
    // partitions would be judged otherwise than live. The stream has it all: rebuild.
    let clean_path = data_dir.join(CLEAN_STOP_FILE);
    let crashed = !held.is_empty() && !clean_path.exists();
    match std::fs::remove_file(&clean_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(AggregatorError::File {
                path: clean_path,
                error,
            });
        }
    }
    if crashed {
        warn!(
            "aggregator {me}: the last run did not stop cleanly (what the detectors learnt since their last save is lost): its store is rebuilt from the stream"
        );
    }
    info!(
        "aggregator {me}: {} partitions of the stream {} at {}; the store holds {held:?}",
        cfg.partitions,
        p.stream,
        p.nats.urls.join(",")
    );
    shared.set_held(held.clone());
    if let Some(rx) = collector.take_sightings() {
        let parts = Partitions::new(cfg.partitions).map_err(PublishError::from)?;
        second_stage::spawn_publisher(
            js.clone(),
            p.subject_prefix.clone(),
            parts,
            rx,
            shared.clone(),
            collector.metrics().clone(),
            stop.clone(),
        );
    }
    let (renewal, renewing) = Renewal::spawn(
        members.clone(),
        instance,
        advertise,
        cfg.lease,
        collector.metrics().clone(),
        stop.clone(),
    );
    let a = Aggregator {
        collector,
        stream,
        members,
        ratios,
        partitions: cfg.partitions,
        subject_prefix: p.subject_prefix,
        lease: cfg.lease,
        held_path,
        held,
        renewal,
        renewing,
        shared,
        aligner: Aligner::new(judge_every_ms),
        crashed,
        running: BTreeMap::new(),
        joined: BTreeMap::new(),
        claiming: false,
        cohorts,
        detect,
        stage: None,
    };
    Ok(tokio::spawn(a.run(stop)))
}

struct Aggregator {
    collector: Arc<Collector>,
    stream: Stream,
    members: Membership,
    /// The peers' ratios shared with the other aggregators.
    ratios: PeerRatios,
    partitions: u32,
    subject_prefix: String,
    lease: Duration,
    held_path: PathBuf,
    /// The partitions the store holds (as listed in `held_path`).
    held: BTreeSet<u32>,
    /// When its membership was last renewed, and the task renewing it.
    renewal: Renewal,
    renewing: JoinHandle<()>,
    /// `held`, and which of it is replayed, for the queries and the consumers.
    shared: Holdings,
    /// Keeps the consumers in step by batch time (judgement periods).
    aligner: Arc<Aligner>,
    /// The last run did not stop cleanly: the store is rebuilt before anything is applied.
    crashed: bool,
    /// A consumer task per partition being applied.
    running: BTreeMap<u32, (JoinHandle<()>, CancellationToken)>,
    /// The places among the consumers of partitions held whose consumer has not started
    /// (its creation failed: NATS unavailable): the running ones wait for them.
    joined: BTreeMap<u32, Member>,
    /// A round has seen this aggregator a member (the rounds from the next one on claim).
    claiming: bool,
    /// The cohort summaries' stream, and how the second stage judges.
    cohorts: Stream,
    detect: DetectConfig,
    /// The second stage, while partition 0's consumer runs here.
    stage: Option<(JoinHandle<()>, CancellationToken)>,
}

impl Aggregator {
    async fn run(mut self, stop: CancellationToken) {
        // The first round as soon as the membership is first renewed (a round before it would
        // do nothing, and put the first claims off by a round).
        tokio::select! {
            () = stop.cancelled() => {}
            () = self.renewal.renewed_once() => self.rounds(&stop).await,
        }
        // Claims stay: restarted within the lease, this aggregator goes on with them.
        self.stop_all().await;
        let _ = (&mut self.renewing).await;
        debug!("aggregator {}: stopped", self.members.me());
    }

    /// A round every quarter of the lease until `stop`.
    async fn rounds(&mut self, stop: &CancellationToken) {
        let every = membership::quarter_lease(self.lease);
        loop {
            if let Err(e) = self.round().await {
                self.collector.metrics().cluster_membership_failures.inc();
                warn!("aggregator {}: {e}", self.members.me());
            }
            if !self.renewal.current() && !self.running.is_empty() {
                warn!(
                    "aggregator {}: membership not renewed for half a lease: applying stops until it is",
                    self.members.me()
                );
                self.stop_all().await;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One round, while the membership is renewed: read the claims, take out what is no
    /// longer ours, give up and claim toward the fair share, apply every partition held.
    async fn round(&mut self) -> Result<(), RoundError> {
        if !self.renewal.current() {
            // Not renewed yet, or not lately (the renewing task says why).
            return Ok(());
        }
        if !self.claiming {
            // Aggregators started together see each other before anyone claims: fewer
            // partitions claimed only to be given up at once.
            self.claiming = true;
            return Ok(());
        }
        let live = self.members.live().await?;
        self.share_peer_ratios(&live).await;
        let mut claims = self.members.claims(self.partitions).await?;
        let me = self.members.me().to_owned();
        let mine = |claims: &BTreeMap<u32, membership::Claim>| -> BTreeSet<u32> {
            claims
                .iter()
                .filter(|(_, c)| c.node == me)
                .map(|(p, _)| *p)
                .collect()
        };
        let lost: Vec<u32> = self.held.difference(&mine(&claims)).copied().collect();
        if !lost.is_empty() {
            warn!(
                "aggregator {me}: partitions {lost:?} were claimed by others while this one was away: rebuilding"
            );
            self.rebuild().await?;
        } else if self.crashed {
            self.rebuild().await?;
        }
        self.crashed = false;
        let plan = membership::plan(&me, self.partitions, &live, &claims);
        if !plan.release.is_empty() {
            info!(
                "aggregator {me}: giving partitions {:?} up to the {} live aggregators: rebuilding",
                plan.release,
                live.len()
            );
            self.rebuild().await?;
            for p in &plan.release {
                if let Some(c) = claims.remove(p) {
                    self.members.release(*p, c.revision).await?;
                }
            }
        }
        let mut claimed = false;
        let mut to_claim = plan.claim;
        for tries in 1.. {
            let mut raced = false;
            for p in to_claim {
                if self.members.claim(p, claims.get(&p)).await? {
                    claimed = true;
                    info!(
                        "aggregator {me}: claimed partition {p}{}",
                        claims
                            .get(&p)
                            .map(|c| format!(" from {} (gone)", c.node))
                            .unwrap_or_default()
                    );
                    claims.insert(
                        p,
                        membership::Claim {
                            node: me.clone(),
                            revision: 0,
                        },
                    );
                } else {
                    raced = true;
                }
            }
            if !raced || tries == CLAIM_TRIES {
                break;
            }
            // Another aggregator claimed a partition planned here at the same moment (started
            // together): planned again on the claims as they are now, this round takes the
            // rest of its share. Taken a round later, it would have the store rebuilt (see
            // below): measured, 2 of 6 starts of 3 aggregators together rebuilt one.
            claims = self.members.claims(self.partitions).await?;
            to_claim = membership::plan(&me, self.partitions, &live, &claims).claim;
        }
        if claimed && !self.held.is_empty() {
            // A partition taken on joins the others from the stream's first part, all in
            // step: applied on its own into a store whose judgements are past its parts'
            // batch times, its keys would be judged late, against windows that moved on.
            info!("aggregator {me}: partitions claimed: rebuilding, to judge them with the rest");
            self.rebuild().await?;
        }
        // Every consumer to start joins the others before any starts, and stays joined if
        // it cannot start this round: the ones running must not run ahead of it.
        let mine = mine(&claims);
        self.joined.retain(|p, _| mine.contains(p));
        let starting: Vec<u32> = mine.into_iter().filter(|p| !self.is_running(*p)).collect();
        for p in &starting {
            self.joined
                .entry(*p)
                .or_insert_with(|| self.aligner.join(*p));
        }
        if !starting.is_empty() {
            if let Some(d) = outflow_crashpoint::delay_point!("aggregator::before_consumers") {
                // A round held here stands for one slowed by a loaded JetStream (each consumer
                // opened is a few API calls) or a long rebuild.
                tokio::time::sleep(d).await;
            }
            // Read once for every consumer the round starts: each sizes its first fetch by it.
            let part_bytes = consume::mean_part_bytes(self.stream.clone()).await;
            // Opened together: each is a few JetStream API calls, and no consumer applies a
            // part before the ones joined have started. Measured (`outflow-bench cluster`, 12
            // partitions): start to first part applied 2.2 to 2.35 s opened one after the
            // other, 1.75 s together. Started in order; a consumer that could not be opened
            // stays joined, and the round fails once the others have started.
            let source = self.source();
            let opened: Vec<_> = futures_util::stream::iter(starting)
                .map(|p| {
                    let (source, fresh) = (&source, !self.held.contains(&p));
                    async move { (p, fresh, consume::open(source, p, fresh).await) }
                })
                .buffered(OPEN_AT_ONCE)
                .collect()
                .await;
            let mut failed = None;
            for (p, fresh, consumer) in opened {
                match consumer {
                    Ok(c) => self.apply(p, fresh, c, part_bytes)?,
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(RoundError::Other(e));
            }
        }
        Ok(())
    }

    /// Shares what the detection thread learnt of the peers' ratios, and hands it the other
    /// live aggregators' (see [`PeerRatios`]). A failure leaves the ratios it judges against as
    /// they were until a later round; the claims go on.
    async fn share_peer_ratios(&mut self, live: &BTreeSet<String>) {
        let exchange = self.collector.peer_exchange();
        let read = match self.ratios.share(&exchange.own()).await {
            Ok(()) => self.ratios.others(live).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(others) => exchange.set_others(others),
            Err(e) => warn!(
                "aggregator {}: {e}; judging against the peers' ratios read before",
                self.members.me()
            ),
        }
    }

    /// Lists `held` as what the store holds: durably in the data directory, then here and in
    /// the shared [`Holdings`].
    fn set_held(&mut self, held: BTreeSet<u32>) -> Result<(), RoundError> {
        write_held(&self.held_path, &held)
            .map_err(|e| RoundError::Other(format!("{}: {e}", self.held_path.display())))?;
        self.shared.set_held(held.clone());
        self.held = held;
        Ok(())
    }

    /// Starts applying `partition` from `consumer` ([`consume::open`]ed, `fresh` if the store
    /// holds nothing of it: then it starts at the stream's first part, and the partition is
    /// listed first). Its consumer takes its place among the others from `joined`, and sizes
    /// its first fetch by `part_bytes` ([`consume::mean_part_bytes`]).
    fn apply(
        &mut self,
        partition: u32,
        fresh: bool,
        consumer: PullConsumer,
        part_bytes: usize,
    ) -> Result<(), RoundError> {
        if fresh {
            // Listed once its consumer is known to start at the stream's first part (listed
            // before, a failed start would go on next round from a consumer left from before).
            let mut held = self.held.clone();
            held.insert(partition);
            self.set_held(held)?;
        }
        let member = self
            .joined
            .remove(&partition)
            .unwrap_or_else(|| self.aligner.join(partition));
        let stop = CancellationToken::new();
        let task = consume::spawn(
            self.collector.clone(),
            self.source(),
            consumer,
            partition,
            member,
            self.shared.clone(),
            part_bytes,
            stop.clone(),
        );
        self.running.insert(partition, (task, stop));
        if partition == 0 && self.stage.as_ref().is_none_or(|(t, _)| t.is_finished()) {
            // From the stream's first summary: the same judgements, the same alert ids.
            let stop = CancellationToken::new();
            let task = second_stage::spawn_stage(
                self.cohorts.clone(),
                self.subject_prefix.clone(),
                self.partitions,
                self.detect.clone(),
                self.collector.alerts().clone(),
                self.collector.metrics().clone(),
                stop.clone(),
            );
            self.stage = Some((task, stop));
        }
        Ok(())
    }

    /// Where this aggregator's consumers read.
    fn source(&self) -> consume::Source {
        consume::Source {
            stream: self.stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            node: self.members.me().to_owned(),
        }
    }

    fn is_running(&self, partition: u32) -> bool {
        self.running
            .get(&partition)
            .is_some_and(|(t, _)| !t.is_finished())
    }

    /// Empties the store of every partition: consumers stopped and deleted, store emptied,
    /// nothing listed. (The caller's round applies the partitions kept again.)
    async fn rebuild(&mut self) -> Result<(), RoundError> {
        self.stop_all().await;
        for p in self.held.clone() {
            consume::delete(&self.stream, &consume::consumer_name(self.members.me(), p))
                .await
                .map_err(RoundError::Other)?;
        }
        self.collector
            .reset()
            .await
            .map_err(|e| RoundError::Other(format!("emptying the store: {e}")))?;
        self.set_held(BTreeSet::new())?;
        // The writer judges from the first period again: so do the consumers.
        self.aligner.reset();
        self.collector.metrics().cluster_rebuilds.inc();
        Ok(())
    }

    /// Stops every consumer task (each finishes the parts it fetched, up to the latest period
    /// granted: see [`Aligner::stop`]) and the second stage; none waits to start.
    async fn stop_all(&mut self) {
        self.aligner.stop();
        if let Some((task, stop)) = self.stage.take() {
            stop.cancel();
            let _ = task.await;
        }
        self.joined.clear();
        for (_, (_, stop)) in self.running.iter() {
            stop.cancel();
        }
        for (_, (task, _)) in std::mem::take(&mut self.running) {
            let _ = task.await;
        }
        self.aligner.resume();
    }
}

/// This data directory's instance id: read, or made (random) and written the first time.
fn instance_id(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))?;
    let id = format!("{:016x}", u64::from_le_bytes(bytes));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, format!("{id}\n"))?;
    Ok(id)
}

fn read_held(path: &Path) -> std::io::Result<BTreeSet<u32>> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .split_whitespace()
            .map(|n| {
                n.parse()
                    .map_err(|_| std::io::Error::other(format!("{n:?} is no partition number")))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

/// Writes the list durably (a new file renamed over the old one).
fn write_held(path: &Path, held: &BTreeSet<u32>) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp)?;
    let text: Vec<String> = held.iter().map(u32::to_string).collect();
    writeln!(f, "{}", text.join(" "))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_list_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HELD_FILE);
        assert!(read_held(&path).unwrap().is_empty());
        let held = BTreeSet::from([0, 3, 17]);
        write_held(&path, &held).unwrap();
        assert_eq!(read_held(&path).unwrap(), held);
        write_held(&path, &BTreeSet::new()).unwrap();
        assert!(read_held(&path).unwrap().is_empty());
        std::fs::write(&path, "1 x").unwrap();
        assert!(read_held(&path).is_err());
    }
}
