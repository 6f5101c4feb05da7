//! The store writer: one thread that applies batches of every agent with group commit.
//!
//! Stream tasks fold their batches into per-key totals ([`crate::aggregate::aggregate`]) and
//! send them here. The writer takes whatever is queued (up to `store.max_batches_per_commit`),
//! checks each batch against its agent's watermark (a batch at or below it is a duplicate),
//! sums the rest per key and 10-s granule ([`Staging`]: one rollup update per touched key per
//! commit, however many batches touched it), writes those sums as a journal entry
//! ([`crate::journal`]) with the new watermarks in ONE write transaction, commits, and only
//! then applies the same sums to memory and answers. So an Ack always means applied and
//! persisted, and a failed commit changes nothing anywhere. The rollups the journal touched
//! are written whole, from memory, at a checkpoint: once the journal holds
//! `store.journal_bytes`, at each `store.gc_interval` and at a clean stop.
//!
//! Detection is not on this path: the writer tells the detection thread what each commit
//! touched and when to judge ([`crate::detection`]), and waits for it only where a judgement
//! must read memory as it was at its batch time.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, PoisonError, RwLock, RwLockWriteGuard},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{debug, error, warn};
use tokio::sync::{mpsc, oneshot};

use crate::{
    aggregate::{BatchAggregate, Map, State},
    alerts::AlertHub,
    budget::{Folds, KeyBudget},
    config::{LimitsConfig, StoreConfig},
    detect::{DetectConfig, Detector, Subject},
    detection::{Detection, Exchange, Reading},
    feed::{Feed, FeedBatch},
    history::{MINUTE_MS, first_kept},
    journal,
    keys::{Group, HostId, Key, Prefix},
    links::LinkKind,
    metrics::Metrics,
    model::AgentKey,
    store::{Changes, SharedStore, Store, StoreError},
    window::{HOST_GRANULE_MS, Rollup, Totals},
};

/// Requests queued for the writer at most (senders wait beyond: backpressure).
const QUEUE: usize = 1024;
/// A group commit stops taking batches beyond this many deltas.
const MAX_GROUP_DELTAS: usize = 2_000_000;

/// The writer's answer to a Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloReply {
    /// Highest applied sequence number of the agent's epoch.
    pub applied_seq: u64,
    /// The host's id.
    pub host: HostId,
    /// The writer's number for the stream that said Hello: its batches carry it
    /// ([`BatchRequest::stream`]).
    pub stream: u64,
}

/// What happened to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied and persisted now.
    Applied,
    /// Already applied before: acknowledged, not applied again.
    Duplicate,
}

/// Why the writer (or, on an ingest node, JetStream) could not take a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error("JetStream: {0}")]
    Publish(Arc<crate::cluster::publish::PublishError>),
    #[error("the store writer has stopped")]
    Stopped,
}

/// A batch for the writer.
#[derive(Debug)]
pub struct BatchRequest {
    pub agent: AgentKey,
    /// The stream's number from its Hello ([`HelloReply::stream`]).
    pub stream: u64,
    pub seq: u64,
    /// Number of deltas (for metrics and group sizing).
    pub deltas: usize,
    /// What the agent reported it could not count per connection.
    pub gaps: Gaps,
    pub aggregate: BatchAggregate,
    /// What the feed shows of it once applied (none when the feed is off).
    pub feed: Option<FeedBatch>,
}

/// What a batch reports its agent could not count per connection: batches its spool dropped
/// before this one and their response bytes, and response bytes of connections its kernel
/// table had no slot for (counted, not attributed to a client). Metrics only: these are not in
/// any key's rollups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gaps {
    pub lost_batches: u64,
    pub lost_response_bytes: u64,
    pub unattributed_response_bytes: u64,
}

enum Request {
    Hello {
        agent: AgentKey,
        hostname: String,
        reply: oneshot::Sender<Result<HelloReply, WriteError>>,
    },
    Batch {
        batch: BatchRequest,
        reply: oneshot::Sender<Result<Outcome, WriteError>>,
    },
    /// Answered with the replies of the group commit it was taken in.
    Ping(oneshot::Sender<()>),
    /// Empties the store and memory (after everything queued before).
    Reset(oneshot::Sender<Result<(), WriteError>>),
    Stop,
}

/// Handle to the writer thread.
#[derive(Debug)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Hello { agent, .. } => write!(f, "Hello({agent})"),
            Request::Batch { batch, .. } => write!(f, "Batch({} #{})", batch.agent, batch.seq),
            Request::Ping(_) => write!(f, "Ping"),
            Request::Reset(_) => write!(f, "Reset"),
            Request::Stop => write!(f, "Stop"),
        }
    }
}

impl Writer {
    /// Starts the writer thread on `store`, installing what it commits into `state`, with a
    /// detection thread (if `detect.enabled`) judging what it commits into `alerts`, and
    /// publishing every applied batch to `feed` before its Ack. The detection thread shares the
    /// peers' ratios and, in a cluster's aggregator, its sightings through `exchange` (see
    /// [`Detection::start`]).
    #[allow(
        clippy::too_many_arguments,
        reason = "the writer's collaborators, each once"
    )]
    pub fn start(
        store: Store,
        state: Arc<RwLock<State>>,
        metrics: Arc<Metrics>,
        store_cfg: &StoreConfig,
        limits: &LimitsConfig,
        detect: &DetectConfig,
        alerts: Arc<AlertHub>,
        feed: Arc<Feed>,
        exchange: Exchange,
    ) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut budget = KeyBudget::new(limits.max_keys, limits.max_keys_per_agent_percent);
        metrics
            .key_budget
            .set(i64::try_from(limits.max_keys).unwrap_or(i64::MAX));
        let next_judgement_ms = {
            let st = state.read().unwrap_or_else(PoisonError::into_inner);
            budget.recount(&st);
            detect.next_judgement(st.end_ms())
        };
        let mut w = Worker {
            store: Arc::new(SharedStore::new(store)),
            state,
            metrics,
            max_batches: store_cfg.max_batches_per_commit.max(1),
            gc_interval: store_cfg.gc_interval,
            last_gc: Instant::now(),
            budget,
            detection: None,
            detect: detect.clone(),
            next_judgement_ms,
            reading: None,
            alerts,
            limits: limits.clone(),
            feed,
            staging: Staging::default(),
            staged: Vec::new(),
            exchange,
            entry: Vec::new(),
            dirty: Map::default(),
            journal_bytes: 0,
            max_journal_bytes: store_cfg.journal_bytes,
            next_stream: 1,
            fences: Map::default(),
        };
        w.start_detection()?;
        w.update_key_gauges();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run(rx))?;
        Ok(Writer {
            tx,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Registers an agent's Hello: interns its host name (committing it if new) and returns
    /// its epoch's watermark.
    pub async fn hello(&self, agent: AgentKey, hostname: String) -> Result<HelloReply, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Hello {
                agent,
                hostname,
                reply,
            })
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Queues a batch (waits while the queue is full); the receiver gets the outcome once the
    /// batch is committed.
    pub async fn submit(
        &self,
        batch: BatchRequest,
    ) -> Result<oneshot::Receiver<Result<Outcome, WriteError>>, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Batch { batch, reply })
            .await
            .map_err(|_| WriteError::Stopped)?;
        Ok(rx)
    }

    /// Waits until the writer thread has taken every request queued before this one and
    /// finished their group commit (failed or not): it is alive and keeping up. An error if
    /// it has stopped.
    pub async fn ping(&self) -> Result<(), WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Ping(reply))
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)
    }

    /// Applies everything queued before, then empties the store and memory: no rollup,
    /// watermark, host, alert, history or learnt state is left (detection starts afresh).
    pub async fn reset(&self) -> Result<(), WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Reset(reply))
            .await
            .map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?
    }

    /// Applies everything queued so far, then stops the thread and closes the store.
    pub async fn stop(&self) {
        let _ = self.tx.send(Request::Stop).await;
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

enum Reply {
    Hello(oneshot::Sender<Result<HelloReply, WriteError>>, HelloReply),
    Ping(oneshot::Sender<()>),
    /// A batch of a stream fenced after a failed commit (see [`Worker::fences`]).
    Fenced(
        oneshot::Sender<Result<Outcome, WriteError>>,
        Arc<StoreError>,
    ),
    Batch {
        reply: oneshot::Sender<Result<Outcome, WriteError>>,
        /// Its agent and stream, fenced if the commit fails.
        agent: AgentKey,
        stream: u64,
        outcome: Outcome,
        deltas: usize,
        gaps: Gaps,
        time_ms: u64,
        /// The feed's copy of an applied batch.
        feed: Option<FeedBatch>,
    },
}

/// A group's requests, staged: the changes to commit besides the rollups, and the answers.
struct Pending {
    ch: Changes,
    replies: Vec<Reply>,
    /// The batch time after the group.
    end_ms: u64,
    /// New keys past the key budget, folded.
    folds: Folds,
}

/// Granules and hosts of a key that [`Staged`] holds in place; more go to [`Spill`].
const INLINE_GRANULES: usize = 2;
const INLINE_HOSTS: usize = 8;

/// What a group commit adds to one key, before any rollup is touched: its totals summed per
/// 10-s granule (the same bucket in every window) and the latest granule of each host that
/// served it. Applying that to a rollup gives the same rollup as adding every batch's totals
/// one by one. Held in place (a group commit rarely spans more than two granules), so that
/// walking the keys reads memory in order.
#[derive(Default)]
struct Staged {
    /// (granule start, totals), in the order first seen.
    granules: [(u64, Totals); INLINE_GRANULES],
    /// (host, latest granule it served the key, in granules since the epoch).
    hosts: [(HostId, u32); INLINE_HOSTS],
    n_granules: u8,
    n_hosts: u8,
    /// Index in [`Staging::spill`] of the granules and hosts beyond those held here.
    spill: Option<u32>,
}

/// Granules and hosts of a key beyond those its [`Staged`] holds, and its links (few keys
/// have any).
#[derive(Default)]
struct Spill {
    granules: Vec<(u64, Totals)>,
    hosts: Vec<(HostId, u32)>,
    /// (kind, address, batch time), as the batches gave them.
    links: Vec<(LinkKind, IpAddr, u64)>,
}

/// The [`Staged`] changes of a group commit. Kept by the writer across commits, for its
/// capacity.
#[derive(Default)]
struct Staging {
    /// Key → its index in `staged` (a small entry: the map's probes stay in cache longer).
    keys: Map<Key, u32>,
    staged: Vec<Staged>,
    spill: Vec<Spill>,
}

impl Staging {
    /// The index in `staged` of `key`, staged now if it was not.
    fn index(&mut self, key: Key) -> usize {
        let next = self.staged.len();
        let i = *self
            .keys
            .entry(key)
            .or_insert_with(|| u32::try_from(next).unwrap_or(u32::MAX));
        if i as usize == next {
            self.staged.push(Staged::default());
        }
        i as usize
    }

    /// Whether `key` is staged.
    fn contains(&self, key: &Key) -> bool {
        self.keys.contains_key(key)
    }

    /// Records that `key` was seen with `addr` as `kind` in a batch at `time_ms`.
    fn link(&mut self, key: Key, time_ms: u64, kind: LinkKind, addr: IpAddr) {
        let i = self.index(key);
        let s = &mut self.staged[i];
        spill_of(&mut self.spill, &mut s.spill)
            .links
            .push((kind, addr, time_ms));
    }

    /// The index in `staged` of `key` if it is staged.
    fn find(&self, key: &Key) -> Option<usize> {
        self.keys.get(key).map(|i| *i as usize)
    }

    fn add(&mut self, key: Key, time_ms: u64, host: HostId, totals: &Totals) {
        let i = self.index(key);
        self.add_at(i, time_ms, host, totals);
    }

    /// Adds `totals` to the key staged at `i`.
    fn add_at(&mut self, i: usize, time_ms: u64, host: HostId, totals: &Totals) {
        let s = &mut self.staged[i];
        let granule = time_ms / HOST_GRANULE_MS * HOST_GRANULE_MS;
        // Batch times are at most the year 3000 (checked at the edge): 3.3e9 granules.
        let host_granule = u32::try_from(time_ms / HOST_GRANULE_MS).unwrap_or(u32::MAX);
        let n = usize::from(s.n_granules);
        match s.granules[..n].iter_mut().find(|g| g.0 == granule) {
            Some(g) => g.1.add(totals),
            None if n < INLINE_GRANULES => {
                s.granules[n] = (granule, *totals);
                s.n_granules += 1;
            }
            None => {
                let spill = spill_of(&mut self.spill, &mut s.spill);
                match spill.granules.iter_mut().find(|g| g.0 == granule) {
                    Some(g) => g.1.add(totals),
                    None => spill.granules.push((granule, *totals)),
                }
            }
        }
        let n = usize::from(s.n_hosts);
        match s.hosts[..n].iter_mut().find(|h| h.0 == host) {
            Some(h) => h.1 = h.1.max(host_granule),
            None if n < INLINE_HOSTS => {
                s.hosts[n] = (host, host_granule);
                s.n_hosts += 1;
            }
            None => {
                let spill = spill_of(&mut self.spill, &mut s.spill);
                match spill.hosts.iter_mut().find(|h| h.0 == host) {
                    Some(h) => h.1 = h.1.max(host_granule),
                    None => spill.hosts.push((host, host_granule)),
                }
            }
        }
    }

    /// Moves the staged keys to `out` (cleared first) in key order, each with its index in
    /// `staged` (what it adds stays in place): neighbouring writes touch the same B-tree pages.
    fn sorted(&mut self, out: &mut Vec<(Key, u32)>) {
        out.clear();
        out.extend(self.keys.drain());
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    }

    /// What the key at `i` (from [`Staging::sorted`]) adds.
    fn at(&self, i: u32) -> &Staged {
        &self.staged[i as usize]
    }

    /// Adds `s` to `rollup`, then drops the buckets that left their window at `end_ms`.
    fn apply(&self, s: &Staged, rollup: &mut Rollup, end_ms: u64) {
        journal::apply(rollup, &self.change(s), end_ms);
    }

    /// Appends what `s` adds to `key` to a journal entry.
    fn journal(&self, key: &Key, s: &Staged, entry: &mut Vec<u8>) {
        journal::push(entry, key, &self.change(s));
    }

    /// What `s` holds, its spill's included.
    fn change<'a>(&'a self, s: &'a Staged) -> journal::Change<'a> {
        let spill = s.spill.and_then(|i| self.spill.get(i as usize));
        journal::Change {
            granules: [
                &s.granules[..usize::from(s.n_granules)],
                spill.map_or(&[], |x| &x.granules),
            ],
            hosts: [
                &s.hosts[..usize::from(s.n_hosts)],
                spill.map_or(&[], |x| &x.hosts),
            ],
            links: spill.map_or(&[], |x| &x.links),
        }
    }

    /// Empties it, keeping the capacity.
    fn clear(&mut self) {
        self.keys.clear();
        self.staged.clear();
        self.spill.clear();
    }
}

/// What a group commit changes in the history: the fleet's bytes it adds per minute, and the
/// top keys of the minutes that settled, taken from what is committed (`st`).
fn history_changes(st: &State, fleet: BTreeMap<u64, u64>, end_ms: u64, ch: &mut Changes) {
    let h = st.history();
    for (m, bytes) in fleet.range(first_kept(end_ms)..) {
        let row = ch
            .minutes
            .entry(*m)
            .or_insert_with(|| h.get(*m).cloned().unwrap_or_default());
        row.response_bytes = row.response_bytes.saturating_add(*bytes);
    }
    let due = h.due(st.end_ms(), end_ms);
    if due.is_empty() {
        return;
    }
    let last = *due.end();
    for m in due {
        let top = Group::ALL.map(|g| st.minute_top(g, m));
        if top.iter().any(|t| !t.is_empty()) {
            ch.minutes
                .entry(m)
                .or_insert_with(|| h.get(m).cloned().unwrap_or_default())
                .top = top;
        }
    }
    ch.settled_through = Some(last);
}

/// The subjects of the keys a commit wrote (`staged`, in key order): an address with both a
/// `Direct` and a `Proxied` key is one subject.
fn subjects_of(staged: &[(Key, u32)]) -> Vec<Subject> {
    let has = |k: &Key| staged.binary_search_by(|(x, _)| x.cmp(k)).is_ok();
    staged
        .iter()
        .filter(|(k, _)| !matches!(k, Key::Proxied(a) if has(&Key::Direct(*a))))
        .filter_map(|(k, _)| Subject::of_key(k))
        .collect()
}

/// What a commit added to each /24 and /64 (`staged`, in key order), as rollups of their own:
/// the wider prefixes the detectors aggregate are sums of them.
fn prefix_changes(staging: &Staging, staged: &[(Key, u32)], end_ms: u64) -> Vec<(Prefix, Rollup)> {
    staged
        .iter()
        .filter_map(|(k, i)| match k {
            Key::Prefix(p) => {
                let mut r = Rollup::default();
                staging.apply(staging.at(*i), &mut r, end_ms);
                Some((*p, r))
            }
            _ => None,
        })
        .collect()
}

/// The spill of a key, made on first use.
fn spill_of<'a>(spill: &'a mut Vec<Spill>, at: &mut Option<u32>) -> &'a mut Spill {
    let i = match *at {
        Some(i) => i as usize,
        None => {
            spill.push(Spill::default());
            let i = spill.len() - 1;
            *at = u32::try_from(i).ok();
            i
        }
    };
    &mut spill[i]
}

/// `state` to change, once no judgement (`reading`) reads it.
fn state_mut<'a>(
    reading: &mut Option<Reading>,
    state: &'a RwLock<State>,
) -> RwLockWriteGuard<'a, State> {
    if let Some(r) = reading.take() {
        r.wait();
    }
    state.write().unwrap_or_else(PoisonError::into_inner)
}

struct Worker {
    /// Shared with the detection thread.
    store: Arc<SharedStore>,
    state: Arc<RwLock<State>>,
    metrics: Arc<Metrics>,
    max_batches: usize,
    gc_interval: Duration,
    last_gc: Instant,
    /// Decides which new keys are made.
    budget: KeyBudget,
    /// The detection thread (with detection on).
    detection: Option<Detection>,
    detect: DetectConfig,
    /// What the detection thread shares: the peers' ratios, and what it saw of the clients (a
    /// cluster's aggregator).
    exchange: Exchange,
    /// Batch time of the next judgement (with detection on).
    next_judgement_ms: u64,
    /// The judgement reading `state`: it does not change until it is over.
    reading: Option<Reading>,
    /// Where detection publishes (emptied by a reset).
    alerts: Arc<AlertHub>,
    limits: LimitsConfig,
    /// Applied batches are published here before their Acks.
    feed: Arc<Feed>,
    staging: Staging,
    /// The keys of `staging` in key order, with their index in it (kept for its capacity).
    staged: Vec<(Key, u32)>,
    /// The journal entry of the group being committed (kept for its capacity).
    entry: Vec<u8>,
    /// The keys the journal touched since the last checkpoint.
    dirty: Map<Key, ()>,
    /// The journal's bytes since the last checkpoint.
    journal_bytes: usize,
    /// `store.journal_bytes`.
    max_journal_bytes: usize,
    /// The number the next Hello's stream gets (from 1).
    next_stream: u64,
    /// Agents with a batch whose commit failed: the streams numbered up to this, and the
    /// failure. Their later batches are refused with the same error, though the store may
    /// have recovered: applied, they would raise the watermark above the failed batch, which
    /// the agent sends again after its next Hello and would then find a duplicate (lost). An
    /// agent's next Hello opens a stream with a higher number, which is not fenced. Only
    /// agents that saw a failure are held (emptied by a reset).
    fences: Map<AgentKey, (u64, Arc<StoreError>)>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Worker {
    /// Takes requests in arrival order, in groups of at most `max_batches` (one commit each).
    /// With detection on, a group never holds batches of two judgements: a batch later than
    /// the next judgement's batch time ends the group before it, and the subjects are judged
    /// on everything applied up to then; the batch then starts the next group. So what a
    /// judgement sees depends on the order batches arrived in, not on how they were grouped.
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut stop = false;
        let mut carried = None;
        while !stop {
            let mut reset = None;
            let Some(first) = carried.take().or_else(|| rx.blocking_recv()) else {
                break;
            };
            let mut group = Vec::new();
            let mut deltas = 0;
            let mut judge_at = None;
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Stop => {
                        stop = true;
                        break;
                    }
                    Request::Reset(reply) => {
                        reset = Some(reply);
                        break;
                    }
                    Request::Batch { ref batch, .. } => {
                        let time_ms = batch.aggregate.time_ms;
                        if self.detection.is_some() && time_ms > self.next_judgement_ms {
                            judge_at = Some(time_ms);
                            carried = Some(req);
                            break;
                        }
                        deltas += batch.deltas;
                    }
                    Request::Hello { .. } | Request::Ping(_) => {}
                }
                group.push(req);
                if group.len() < self.max_batches && deltas < MAX_GROUP_DELTAS {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.apply(group);
            }
            if let Some(time_ms) = judge_at {
                self.judge(time_ms);
            }
            if let Some(reply) = reset {
                let _ = reply.send(self.reset());
            }
            if self.last_gc.elapsed() >= self.gc_interval {
                self.gc();
            }
        }
        if let Some(d) = self.detection.take() {
            d.stop();
        }
        // The next start finds the rollups whole (it would replay the journal otherwise).
        if let Err(e) = self.checkpoint(&Map::default()) {
            self.checkpoint_failed(&e);
        }
        // Requests queued after Stop are answered with Stopped when `rx` drops.
        debug!("store writer stopped");
    }

    /// Empties the store and memory: detection stops (its last work done), the store is
    /// cleared in one transaction, memory and alerts start from it empty, detection starts
    /// again with nothing learnt (none is left in the store).
    fn reset(&mut self) -> Result<(), WriteError> {
        if let Some(r) = self.reading.take() {
            r.wait();
        }
        if let Some(d) = self.detection.take() {
            d.stop();
        }
        let fresh = self
            .store
            .write(Store::clear)
            .map_err(|e| WriteError::Store(Arc::new(e)));
        let fresh = match fresh {
            Ok(st) => st,
            Err(e) => {
                // Memory as it was: the store is as it was too, or reopened before the
                // next write; detection goes on from what it saved at its stop.
                self.restart_detection();
                return Err(e);
            }
        };
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        self.dirty.clear();
        self.journal_bytes = 0;
        self.fences.clear();
        self.alerts.clear(&self.metrics);
        self.budget = KeyBudget::new(self.limits.max_keys, self.limits.max_keys_per_agent_percent);
        self.next_judgement_ms = self.detect.next_judgement(0);
        self.restart_detection();
        self.update_key_gauges();
        Ok(())
    }

    /// [`Self::start_detection`] after a reset: a thread that does not start is logged (the
    /// writer goes on without detection).
    fn restart_detection(&mut self) {
        if let Err(e) = self.start_detection() {
            error!("detection thread not started again: {e}");
        }
    }

    /// Starts the detection thread (with detection on) on the state as it is, with what the
    /// store holds of what the detectors learnt.
    fn start_detection(&mut self) -> std::io::Result<()> {
        if !self.detect.enabled || self.detection.is_some() {
            return Ok(());
        }
        let mut d = {
            let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
            Detector::new(self.detect.clone(), &st)
        };
        d.set_max_tracks(self.limits.max_keys);
        match self.store.read(Store::load_detect_state) {
            Ok(rows) => match d.restore(rows) {
                (n, 0) => debug!("detection: {n} learnt rows restored"),
                (n, bad) => warn!(
                    "detection: {n} learnt rows restored, {bad} not understood (those subjects learn again)"
                ),
            },
            Err(e) => warn!("detection: learnt state not read ({e}); learning again"),
        }
        self.detection = Some(Detection::start(
            d,
            self.state.clone(),
            self.store.clone(),
            self.alerts.clone(),
            self.metrics.clone(),
            self.limits.max_keys,
            self.exchange.clone(),
        )?);
        Ok(())
    }

    /// Applies a group of requests: stages them, commits the changes in one transaction,
    /// installs them in memory, then answers; a failed commit changes nothing and refuses
    /// them all.
    fn apply(&mut self, group: Vec<Request>) {
        let batches = group.len();
        let mut staging = std::mem::take(&mut self.staging);
        let mut staged = std::mem::take(&mut self.staged);
        staging.clear();
        let state = self.state.clone();
        let st = state.read().unwrap_or_else(PoisonError::into_inner);
        let mut pending = self.stage(group, &st, &mut staging);
        staging.sorted(&mut staged);
        let result = self.commit(&st, &pending, &staging, &mut staged, batches);
        drop(st);
        match result {
            Ok(()) => {
                outflow_crashpoint::crash_point!("writer::after_commit");
                self.install(&mut pending, &staging, &mut staged);
                self.answer(pending.replies);
                outflow_crashpoint::crash_point!("writer::after_acks");
                if self.journal_bytes >= self.max_journal_bytes
                    && let Err(e) = self.checkpoint(&Map::default())
                {
                    self.checkpoint_failed(&e);
                }
            }
            Err(e) => self.refuse(pending.replies, e),
        }
        staged.clear();
        self.staged = staged;
        self.staging = staging;
    }

    /// Checks each request against what `st` and the group so far hold (a batch at or below
    /// its agent's watermark is a duplicate) and stages what the rest add: their per-key sums
    /// in `staging`, the watermarks, new hosts, batch time and history in the changes.
    fn stage(&mut self, group: Vec<Request>, st: &State, staging: &mut Staging) -> Pending {
        let mut ch = Changes::default();
        let mut replies = Vec::with_capacity(group.len());
        let mut end_ms = st.end_ms();
        let mut folds = Folds::default();
        // The fleet's response bytes per minute of batch time (the history's line).
        let mut fleet: BTreeMap<u64, u64> = BTreeMap::new();
        self.budget.start_group();
        for req in group {
            match req {
                Request::Hello {
                    agent,
                    hostname,
                    reply,
                } => {
                    let host = match st.host_id(&hostname).or_else(|| {
                        ch.hosts
                            .iter()
                            .find(|(_, n)| **n == *hostname)
                            .map(|(id, _)| *id)
                    }) {
                        Some(id) => id,
                        None => {
                            let id =
                                u32::try_from(st.host_count() + ch.hosts.len()).unwrap_or(u32::MAX);
                            ch.hosts.push((id, Arc::from(hostname)));
                            id
                        }
                    };
                    let applied_seq = ch
                        .watermarks
                        .get(&agent)
                        .copied()
                        .unwrap_or_else(|| st.watermark(&agent));
                    let stream = self.next_stream;
                    self.next_stream += 1;
                    replies.push(Reply::Hello(
                        reply,
                        HelloReply {
                            applied_seq,
                            host,
                            stream,
                        },
                    ));
                }
                Request::Batch { batch, reply } => {
                    if let Some((upto, e)) = self.fences.get(&batch.agent)
                        && batch.stream <= *upto
                    {
                        replies.push(Reply::Fenced(reply, e.clone()));
                        continue;
                    }
                    let (agent, stream) = (batch.agent.clone(), batch.stream);
                    let applied = ch
                        .watermarks
                        .get(&batch.agent)
                        .copied()
                        .unwrap_or_else(|| st.watermark(&batch.agent));
                    let agg = batch.aggregate;
                    let mut feed = batch.feed;
                    let outcome = if batch.seq <= applied {
                        feed = None;
                        Outcome::Duplicate
                    } else {
                        ch.watermarks.insert(batch.agent, batch.seq);
                        end_ms = end_ms.max(agg.time_ms);
                        // The host's total is the batch's (last, where `finish` puts it).
                        if let Some((_, t)) = agg
                            .entries
                            .iter()
                            .rev()
                            .find(|e| matches!(e.0, Key::Host(_)))
                        {
                            *fleet.entry(agg.time_ms / MINUTE_MS).or_default() += t.response_bytes;
                        }
                        let mut add = |key: Key, totals: &Totals| {
                            // A key staged already is not new: one probe.
                            if let Some(i) = staging.find(&key) {
                                staging.add_at(i, agg.time_ms, agg.host, totals);
                                return;
                            }
                            // New keys past the key budget are folded (or only counted in
                            // their prefix). Most keys are held already: that probe first.
                            let is_new = |k: &Key| st.get(k).is_none() && !staging.contains(k);
                            let routed = self
                                .budget
                                .route(st, key, agg.host, totals, is_new, &mut folds);
                            if let Some(key) = routed {
                                staging.add(key, agg.time_ms, agg.host, totals);
                            }
                        };
                        match feed.as_mut() {
                            // The feed keeps the entries (an address key's copy is cheap;
                            // moving the vector saves copying it).
                            Some(f) => {
                                for (key, totals) in &agg.entries {
                                    add(key.clone(), totals);
                                }
                                f.totals = agg.entries;
                            }
                            None => {
                                for (key, totals) in agg.entries {
                                    add(key, &totals);
                                }
                            }
                        }
                        for (key, kind, addr) in agg.links {
                            // The links of a key not made go with it.
                            if staging.contains(&key) {
                                staging.link(key, agg.time_ms, kind, addr);
                            }
                        }
                        Outcome::Applied
                    };
                    replies.push(Reply::Batch {
                        reply,
                        agent,
                        stream,
                        outcome,
                        deltas: batch.deltas,
                        gaps: batch.gaps,
                        time_ms: agg.time_ms,
                        feed,
                    });
                }
                Request::Ping(reply) => replies.push(Reply::Ping(reply)),
                Request::Stop | Request::Reset(_) => {}
            }
        }
        if end_ms != st.end_ms() {
            ch.end_ms = Some(end_ms);
        }
        history_changes(st, fleet, end_ms, &mut ch);
        Pending {
            ch,
            replies,
            end_ms,
            folds,
        }
    }

    /// Writes the staged changes in one transaction: what `staged` adds to each key, as a
    /// journal entry. Keeps in `staged` only the keys written (a new key from a batch older
    /// than every window is not kept at all).
    fn commit(
        &mut self,
        st: &State,
        pending: &Pending,
        staging: &Staging,
        staged: &mut Vec<(Key, u32)>,
        batches: usize,
    ) -> Result<(), StoreError> {
        let (ch, end_ms) = (&pending.ch, pending.end_ms);
        if ch.is_empty() && staged.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut kept = 0;
        let entry = &mut self.entry;
        journal::begin(entry, end_ms);
        for i in 0..staged.len() {
            let (key, k) = (&staged[i].0, staging.at(staged[i].1));
            if st.get(key).is_none() {
                // Buckets that left their window go: a new key left with none is not made.
                let mut scratch = Rollup::default();
                staging.apply(k, &mut scratch, end_ms);
                if scratch.slot_count() == 0 {
                    continue;
                }
            }
            staging.journal(key, k, entry);
            staged.swap(kept, i);
            kept += 1;
        }
        staged.truncate(kept);
        let entry = (kept > 0).then_some(entry.as_slice());
        let r = self.store.write(|store| store.append(ch, entry));
        if r.is_ok() {
            let n = entry.map_or(0, <[u8]>::len);
            self.journal_bytes += n;
            self.metrics.journal_bytes.inc_by(n as u64);
        }
        self.metrics
            .commit_seconds
            .observe(t0.elapsed().as_secs_f64());
        self.metrics.commit_batches.observe(batches as f64);
        r
    }

    /// Writes every rollup the journal touched whole, from memory, with `pruned` (rollups
    /// changed outside a group commit), and empties the journal, in one transaction. A failed
    /// checkpoint leaves the journal as it was (the next one writes it all).
    fn checkpoint(&mut self, pruned: &Map<Key, Rollup>) -> Result<(), StoreError> {
        if self.dirty.is_empty() && pruned.is_empty() && self.journal_bytes == 0 {
            return Ok(());
        }
        let t0 = Instant::now();
        let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let mut keys: Vec<&Key> = self.dirty.keys().chain(pruned.keys()).collect();
        keys.sort_unstable();
        keys.dedup();
        let empty = Rollup::default();
        let r = self.store.write(|store| {
            store.checkpoint_with(|w| {
                for key in &keys {
                    let rollup = pruned.get(*key).or_else(|| st.get(key)).unwrap_or(&empty);
                    w.put(key, rollup)?;
                }
                Ok(())
            })
        });
        let n = keys.len();
        drop(st);
        if r.is_ok() {
            self.dirty.clear();
            self.journal_bytes = 0;
            self.metrics.checkpoints.inc();
            debug!("checkpoint: {n} rollups written in {:?}", t0.elapsed());
        }
        self.metrics
            .checkpoint_seconds
            .observe(t0.elapsed().as_secs_f64());
        r
    }

    /// Installs what was committed in memory (once no judgement reads it), and hands the
    /// detection thread what the commit touched.
    fn install(&mut self, pending: &mut Pending, staging: &Staging, staged: &mut Vec<(Key, u32)>) {
        let end_ms = pending.end_ms;
        let touched = !staged.is_empty();
        let detect = self.detection.is_some() && touched;
        let (subjects, prefixes) = if detect {
            (subjects_of(staged), prefix_changes(staging, staged, end_ms))
        } else {
            (Vec::new(), Vec::new())
        };
        {
            let mut st = state_mut(&mut self.reading, &self.state);
            std::mem::take(&mut pending.ch).install(&mut st);
            // The same changes as written, now in place.
            for (key, i) in staged.drain(..) {
                self.dirty.entry(key.clone()).or_default();
                journal::install(&mut st, key, |r| staging.apply(staging.at(i), r, end_ms));
            }
        }
        if touched {
            self.update_key_gauges();
        }
        if !pending.folds.is_empty() {
            self.metrics.folded(&pending.folds);
            let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
            self.budget.note(&pending.folds, &st);
        }
        if let Some(d) = &self.detection
            && !subjects.is_empty()
        {
            d.observe(subjects, prefixes, self.next_judgement_ms);
        }
    }

    /// Publishes the applied batches to the feed, then answers every request of a committed
    /// group.
    fn answer(&self, mut replies: Vec<Reply>) {
        // In the feed before their Acks leave.
        let applied = replies.iter_mut().filter_map(|r| match r {
            Reply::Batch { feed, .. } => feed.take(),
            _ => None,
        });
        let dropped = self.feed.publish(applied);
        self.metrics.feed_dropped_batches.inc_by(dropped as u64);
        let now = now_ms();
        for r in replies {
            match r {
                Reply::Hello(tx, h) => {
                    let _ = tx.send(Ok(h));
                }
                Reply::Ping(tx) => self.ping(tx),
                Reply::Fenced(reply, e) => {
                    let _ = reply.send(Err(WriteError::Store(e)));
                }
                Reply::Batch {
                    reply,
                    outcome,
                    deltas,
                    gaps,
                    time_ms,
                    ..
                } => {
                    match outcome {
                        Outcome::Applied => {
                            self.metrics.batches.inc();
                            self.metrics.deltas.inc_by(deltas as u64);
                            self.metrics.lost_batches.inc_by(gaps.lost_batches);
                            self.metrics
                                .lost_response_bytes
                                .inc_by(gaps.lost_response_bytes);
                            self.metrics
                                .unattributed_response_bytes
                                .inc_by(gaps.unattributed_response_bytes);
                            self.metrics
                                .ingest_lag
                                .observe(now.saturating_sub(time_ms) as f64 / 1000.0);
                        }
                        Outcome::Duplicate => {
                            self.metrics.duplicates.inc();
                        }
                    }
                    let _ = reply.send(Ok(outcome));
                }
            }
        }
    }

    /// Refuses every request of a group whose commit failed (their agents send them again).
    fn refuse(&mut self, replies: Vec<Reply>, e: StoreError) {
        error!(
            "store commit failed, {} requests refused (their agents send them again): {e}",
            replies.len()
        );
        self.metrics.store_failures.inc();
        let e = Arc::new(e);
        for r in replies {
            match r {
                Reply::Hello(tx, _) => {
                    let _ = tx.send(Err(WriteError::Store(e.clone())));
                }
                Reply::Batch {
                    reply,
                    agent,
                    stream,
                    ..
                } => {
                    let fence = self.fences.entry(agent).or_insert((0, e.clone()));
                    *fence = (fence.0.max(stream), e.clone());
                    let _ = reply.send(Err(WriteError::Store(e.clone())));
                }
                Reply::Fenced(reply, e) => {
                    let _ = reply.send(Err(WriteError::Store(e)));
                }
                // The writer is alive: the store's failure shows in store_failures_total and
                // in the refused batches.
                Reply::Ping(tx) => self.ping(tx),
            }
        }
    }

    /// Has the detection thread judge at the next judgement's batch time, once a batch at
    /// `later_ms` (after it) arrived, on what is applied now. The judgement after it is the
    /// first at or after `later_ms`.
    fn judge(&mut self, later_ms: u64) {
        let Some(d) = &self.detection else {
            return;
        };
        let at_ms = self.next_judgement_ms;
        self.next_judgement_ms = self.detect.next_judgement(later_ms - 1);
        if let Some(r) = self.reading.take() {
            r.wait();
        }
        self.reading = Some(d.judge(at_ms, self.next_judgement_ms));
    }

    /// Answers `reply` once the detection thread (if any) is done with what came before.
    fn ping(&self, reply: oneshot::Sender<()>) {
        match &self.detection {
            Some(d) => d.ping(reply),
            None => {
                let _ = reply.send(());
            }
        }
    }

    /// Drops buckets and hosts that left every window, in memory and on disk.
    fn gc(&mut self) {
        self.last_gc = Instant::now();
        let mut ch = Changes::default();
        {
            let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
            let end = st.end_ms();
            for (key, rollup) in st.iter() {
                if !rollup.needs_prune(end) {
                    continue;
                }
                let mut r = rollup.clone();
                let slots_changed = r.prune_slots(end);
                let hosts_gone = r.prune_hosts(end);
                let links_changed = r.prune_links(end);
                if slots_changed || !hosts_gone.is_empty() || links_changed {
                    ch.rollups.insert(key, r);
                }
            }
        }
        let n = ch.rollups.len();
        let t0 = Instant::now();
        // The pruned rollups go to the store with a checkpoint: the journal's entries were
        // applied to them in memory.
        match self.checkpoint(&ch.rollups) {
            Ok(()) if ch.is_empty() => {
                let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
                self.budget.recount(&st);
            }
            Ok(()) => {
                let mut st = state_mut(&mut self.reading, &self.state);
                ch.install(&mut st);
                self.budget.recount(&st);
                drop(st);
                self.update_key_gauges();
                debug!("gc: pruned {n} keys in {:?}", t0.elapsed());
            }
            Err(e) => self.checkpoint_failed(&e),
        }
    }

    /// A checkpoint that failed: the journal stays (memory holds what it says), the next
    /// checkpoint writes it all.
    fn checkpoint_failed(&self, e: &StoreError) {
        error!("store checkpoint failed (the journal keeps every change; tried again later): {e}");
        self.metrics.store_failures.inc();
    }

    fn update_key_gauges(&self) {
        let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
        for g in Group::ALL {
            self.metrics.set_keys(g.name(), st.key_count(g));
        }
        self.metrics
            .budgeted_keys
            .set(i64::try_from(st.budgeted_keys()).unwrap_or(i64::MAX));
    }
}
