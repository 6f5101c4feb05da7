//! The collector without its network: the aggregates, the store writer, the per-agent limits,
//! and [`Session`], the protocol state machine of one agent stream.
//!
//! The gRPC services (`ingest`, `query`) are thin layers over this; tests and benchmarks can
//! drive a [`Session`] directly with wire messages.
use std::{
    path::Path,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use log::warn;
use outflow_proto::v1::{
    self, AgentMessage, CollectorMessage, agent_message::Msg, collector_message,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::{
    aggregate::{ClientQuery, Map, State, TopTalkers, aggregate},
    alerts::AlertHub,
    auth::BoundAgent,
    cluster::{
        config::NodeRole,
        ingest::{ClusterIngest, StreamPublisher},
    },
    config::{Config, LimitsConfig},
    detection::{Exchange, PeerExchange},
    error::ApiError,
    feed::{Feed, FeedBatch, FeedConfig},
    keys::{Group, HostId},
    metrics::Metrics,
    model::{AgentKey, Batch, BatchLimits, Hello, ValidationError},
    ratelimit::AgentLimiter,
    store::{Store, StoreError},
    window::{Window, WindowStats},
    writer::{BatchRequest, Gaps, HelloReply, Outcome, WriteError, Writer},
};

/// The collector could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the store writer thread: {0}")]
    Writer(std::io::Error),
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Store(e) => ApiError::Store(e),
            WriteError::Stopped => ApiError::ShuttingDown,
            WriteError::Publish(e) => ApiError::Publish(e),
        }
    }
}

/// Limiters kept for agents without a stream are dropped beyond this many.
const LIMITERS_KEPT: usize = 4096;
/// Deltas of all streams folded and waiting for their commit, at most: past it, streams wait
/// before taking their next batch (HTTP/2 flow control holds the agents back), so the memory
/// of queued batches is bounded however many agents send at once (about 80 bytes a delta).
pub const MAX_QUEUED_DELTAS: u32 = 2_000_000;

/// Where the batches of agent streams go.
#[derive(Debug)]
enum Sink {
    /// This process's store writer.
    Store(Writer),
    /// JetStream, split into their partitions' parts (an ingest node).
    Cluster(Box<ClusterIngest>),
}

/// The aggregates, their store and the ingest rules.
#[derive(Debug)]
pub struct Collector {
    alerts: Arc<AlertHub>,
    feed: Arc<Feed>,
    state: Arc<RwLock<State>>,
    sink: Sink,
    metrics: Arc<Metrics>,
    limits: LimitsConfig,
    limiters: Mutex<Map<Arc<str>, Arc<Mutex<AgentLimiter>>>>,
    /// [`MAX_QUEUED_DELTAS`] permits: a batch holds one per delta until it is answered.
    queued: Arc<Semaphore>,
    /// A cluster's aggregator: the detection thread's sightings, until the aggregator loop
    /// takes them.
    sightings: Mutex<Option<SightingsRx>>,
    /// The peers' ratios the detection thread learns, and a cluster's other aggregators'.
    peers: Arc<PeerExchange>,
}

/// What a [`Collector::take_sightings`] gives.
pub type SightingsRx = tokio::sync::mpsc::Receiver<crate::detection::Sightings>;

/// Judgements whose sightings wait for the aggregator's publisher, at most (the detection
/// thread waits beyond).
const SIGHTINGS_QUEUE: usize = 64;

impl Collector {
    /// Opens the store in `config.data_dir`, loads it and starts the writer.
    pub fn open(config: &Config, metrics: Arc<Metrics>) -> Result<Collector, OpenError> {
        Self::open_dir(&config.data_dir, config, metrics)
    }

    fn open_dir(
        dir: &Path,
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<Collector, OpenError> {
        let (store, state) = Store::open(dir, config.store.fsync, config.store.cache_bytes)?;
        let alerts = Arc::new(AlertHub::new());
        alerts.load(store.load_alerts()?, &state, &metrics);
        let state = Arc::new(RwLock::new(state));
        let feed = Arc::new(Feed::new(&config.feed));
        // A cluster's aggregator leaves cohorts to the second stage, which its aggregator
        // loop feeds from this channel.
        let (sightings_tx, sightings_rx) = if config.cluster.role == NodeRole::Aggregator {
            let (tx, rx) = tokio::sync::mpsc::channel(SIGHTINGS_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let peers = Arc::new(PeerExchange::new(metrics.clone()));
        let writer = Writer::start(
            store,
            state.clone(),
            metrics.clone(),
            &config.store,
            &config.limits,
            &config.detect,
            alerts.clone(),
            feed.clone(),
            Exchange {
                peers: peers.clone(),
                sightings: sightings_tx,
            },
        )
        .map_err(OpenError::Writer)?;
        Ok(Collector {
            alerts,
            feed,
            state,
            sink: Sink::Store(writer),
            metrics,
            limits: config.limits.clone(),
            limiters: Mutex::new(Map::default()),
            queued: Arc::new(Semaphore::new(MAX_QUEUED_DELTAS as usize)),
            sightings: Mutex::new(sightings_rx),
            peers,
        })
    }

    /// What the detection thread saw of the clients at each judgement (a cluster's
    /// aggregator, once: the aggregator loop publishes it for the second stage).
    pub fn take_sightings(&self) -> Option<SightingsRx> {
        self.sightings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The peers' ratios its detection thread learns, and what it judges against (a cluster's
    /// aggregator loop shares them with the other aggregators).
    pub fn peer_exchange(&self) -> &Arc<PeerExchange> {
        &self.peers
    }

    /// An ingest node's collector: agents' batches are validated, rate-limited and published
    /// to JetStream through `ingest`; it holds no store, no aggregates, no alerts.
    pub fn open_ingest(config: &Config, metrics: Arc<Metrics>, ingest: ClusterIngest) -> Collector {
        let peers = Arc::new(PeerExchange::new(metrics.clone()));
        Collector {
            alerts: Arc::new(AlertHub::new()),
            feed: Arc::new(Feed::new(&FeedConfig::default())),
            state: Arc::new(RwLock::new(State::default())),
            sink: Sink::Cluster(Box::new(ingest)),
            metrics,
            limits: config.limits.clone(),
            limiters: Mutex::new(Map::default()),
            queued: Arc::new(Semaphore::new(MAX_QUEUED_DELTAS as usize)),
            sightings: Mutex::new(None),
            peers,
        }
    }

    /// A new agent stream's protocol state.
    pub fn session(self: &Arc<Self>) -> Session {
        self.session_for(Vec::new())
    }

    /// A new agent stream's protocol state; its Hello must name an agent id that each of
    /// `bound` allows (its token's, its certificate's).
    pub fn session_for(self: &Arc<Self>, bound: Vec<BoundAgent>) -> Session {
        Session {
            collector: self.clone(),
            agent: None,
            shift_warned: false,
            bound,
            part: false,
        }
    }

    /// An aggregator's session applying one partition's parts of an agent: not an agent
    /// stream (not in `agents_connected`, its Hello logged at debug level only).
    pub fn part_session(self: &Arc<Self>) -> Session {
        Session {
            part: true,
            ..self.session()
        }
    }

    /// The alerts raised by the detectors.
    pub fn alerts(&self) -> &Arc<AlertHub> {
        &self.alerts
    }

    /// The applied batches held for Feed followers.
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The aggregates, read-locked (the writer waits while this is held: keep it short).
    pub fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.read()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `limit` keys of `group` with the most response bytes in `window`.
    pub fn top_talkers(&self, group: Group, window: Window, limit: usize) -> TopTalkers {
        self.read().top(group, window, limit)
    }

    /// A client's stats in every window ([`Window::ALL`] order); `None` if nothing of it is
    /// held.
    pub fn client_stats(&self, client: &ClientQuery) -> Option<[WindowStats; 4]> {
        self.read().stats(client)
    }

    /// The newest batch time applied.
    pub fn end_ms(&self) -> u64 {
        self.read().end_ms()
    }

    /// The highest applied sequence number of an agent's epoch (0 if none).
    pub fn watermark(&self, agent: &AgentKey) -> u64 {
        self.read().watermark(agent)
    }

    /// Waits until the store writer has applied (or refused) everything queued before, and
    /// detection has judged it: an error if it has stopped. What the systemd watchdog pings.
    /// (An ingest node has no writer: at once.)
    pub async fn ping_writer(&self) -> Result<(), WriteError> {
        match &self.sink {
            Sink::Store(w) => w.ping().await,
            Sink::Cluster(_) => Ok(()),
        }
    }

    /// Applies everything already queued, then empties the store and memory (an aggregator
    /// that gives partitions away rebuilds the ones it keeps). Nothing to do on an ingest node.
    pub async fn reset(&self) -> Result<(), WriteError> {
        match &self.sink {
            Sink::Store(w) => w.reset().await,
            Sink::Cluster(_) => Ok(()),
        }
    }

    /// Applies everything already queued, then stops the writer and closes the store. Later
    /// batches are refused with UNAVAILABLE. (On an ingest node each stream's publisher ends
    /// with its stream.)
    pub async fn close(&self) {
        if let Sink::Store(w) = &self.sink {
            w.stop().await;
        }
    }

    fn limiter(&self, agent_id: &Arc<str>) -> Arc<Mutex<AgentLimiter>> {
        let mut map = self.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = map.get(agent_id) {
            return l.clone();
        }
        if map.len() >= LIMITERS_KEPT {
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        let l = Arc::new(Mutex::new(AgentLimiter::new(&self.limits, Instant::now())));
        map.insert(agent_id.clone(), l.clone());
        l
    }

    /// The limits of an agent's batch, or of a cluster's part (`parts`).
    fn batch_limits(&self, parts: bool) -> BatchLimits {
        let skew = self.limits.max_clock_skew;
        BatchLimits {
            max_deltas: self.limits.max_deltas_per_batch,
            latest_end_ms: (!skew.is_zero()).then(|| {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                u64::try_from(now.saturating_add(skew.as_millis())).unwrap_or(u64::MAX)
            }),
            parts,
        }
    }
}

/// Counts a stream in `agents_connected` while it lives.
#[derive(Debug)]
struct Connected(Arc<Metrics>);

impl Connected {
    fn new(m: &Arc<Metrics>) -> Self {
        m.agents_connected.inc();
        Self(m.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.agents_connected.dec();
    }
}

#[derive(Debug)]
struct SessionAgent {
    key: AgentKey,
    host: HostId,
    /// The writer's number for this stream ([`HelloReply::stream`]).
    stream: u64,
    hostname: Arc<str>,
    limiter: Arc<Mutex<AgentLimiter>>,
    /// On an ingest node: the stream's publisher task.
    publisher: Option<StreamPublisher>,
    /// None for an aggregator's partition session.
    _connected: Option<Connected>,
}

/// One agent stream: a Hello, then Batches.
#[derive(Debug)]
pub struct Session {
    collector: Arc<Collector>,
    agent: Option<SessionAgent>,
    bound: Vec<BoundAgent>,
    /// A batch of this stream was moved back in time (its agent's clock is ahead).
    shift_warned: bool,
    /// An aggregator's partition session ([`Collector::part_session`]).
    part: bool,
}

/// The answer to a message, possibly still waiting for its commit.
#[derive(Debug)]
pub enum Pending {
    /// Known already (a Welcome).
    Ready(CollectorMessage),
    /// A batch queued for the writer; its Ack comes when it is committed.
    Batch {
        seq: u64,
        rx: oneshot::Receiver<Result<Outcome, WriteError>>,
        /// Its place among the queued deltas, given back with the answer.
        queued: OwnedSemaphorePermit,
    },
}

impl Pending {
    /// Waits for the answer.
    pub async fn finish(self) -> Result<CollectorMessage, ApiError> {
        match self {
            Pending::Ready(m) => Ok(m),
            Pending::Batch { seq, rx, .. } => {
                rx.await.map_err(|_| ApiError::ShuttingDown)??;
                Ok(CollectorMessage {
                    msg: Some(collector_message::Msg::Ack(v1::Ack { seq })),
                })
            }
        }
    }

    /// The outcome of a batch (`None` for a Welcome), waiting for it.
    pub async fn outcome(self) -> Result<Option<Outcome>, ApiError> {
        match self {
            Pending::Ready(_) => Ok(None),
            Pending::Batch { rx, .. } => Ok(Some(rx.await.map_err(|_| ApiError::ShuttingDown)??)),
        }
    }
}

impl Session {
    /// Checks and starts applying one message. A Hello is answered at once; a batch is
    /// validated, rate-limited, folded into per-key totals and queued for the writer (in the
    /// order of the calls, so Acks come in sequence order).
    pub async fn begin(&mut self, msg: AgentMessage) -> Result<Pending, ApiError> {
        match msg.msg {
            Some(Msg::Hello(h)) => self.hello(h).await,
            Some(Msg::Batch(b)) => self.batch(b).await,
            None => Err(
                ValidationError::new("msg", "empty AgentMessage: neither hello nor batch").into(),
            ),
        }
    }

    /// [`Session::begin`] and [`Pending::finish`]: the collector's answer to `msg`.
    pub async fn handle(&mut self, msg: AgentMessage) -> Result<CollectorMessage, ApiError> {
        self.begin(msg).await?.finish().await
    }

    /// The agent of the stream once it said Hello.
    pub fn agent(&self) -> Option<&AgentKey> {
        self.agent.as_ref().map(|a| &a.key)
    }

    async fn hello(&mut self, h: v1::Hello) -> Result<Pending, ApiError> {
        if self.agent.is_some() {
            return Err(ApiError::OutOfOrder("second Hello on the stream"));
        }
        let hello = Hello::try_from(h)?;
        let id = &hello.agent.agent_id;
        if let Some(b) = self.bound.iter().find(|b| !b.allows(id)) {
            return Err(ApiError::PermissionDenied(b.refusal(id)));
        }
        let c = &self.collector;
        let (reply, publisher) = match &c.sink {
            Sink::Store(w) => (
                w.hello(hello.agent.clone(), hello.hostname.clone()).await?,
                None,
            ),
            // JetStream dedups what the agent sends again (by message id), the aggregators
            // what is older than its duplicate window: the agent sends every batch it holds.
            Sink::Cluster(ci) => (
                HelloReply {
                    applied_seq: 0,
                    host: 0,
                    stream: 0,
                },
                Some(ci.stream()),
            ),
        };
        log::log!(
            if self.part {
                log::Level::Debug
            } else {
                log::Level::Info
            },
            "agent {} (host {}, version {:?}, {} labels): hello, applied seq {}",
            hello.agent,
            hello.hostname,
            hello.version,
            hello.labels.len(),
            reply.applied_seq
        );
        self.agent = Some(SessionAgent {
            limiter: c.limiter(&hello.agent.agent_id),
            key: hello.agent,
            host: reply.host,
            stream: reply.stream,
            hostname: hello.hostname.as_str().into(),
            publisher,
            _connected: (!self.part).then(|| Connected::new(&c.metrics)),
        });
        Ok(Pending::Ready(CollectorMessage {
            msg: Some(collector_message::Msg::Welcome(v1::Welcome {
                applied_seq: reply.applied_seq,
            })),
        }))
    }

    async fn batch(&mut self, b: v1::Batch) -> Result<Pending, ApiError> {
        let c = &self.collector;
        let Some(agent) = &self.agent else {
            return Err(ApiError::OutOfOrder(
                "Batch before Hello: a stream must start with a Hello",
            ));
        };
        // The deltas as sent, for the feed's followers that want them (a copy, only then).
        let raw = if c.feed.keeps_deltas() {
            b.deltas.clone()
        } else {
            Vec::new()
        };
        let batch = Batch::from_wire(b, &c.batch_limits(self.part))?;
        if batch.shifted_ms > 0 {
            c.metrics.shifted_batches.inc();
            if !self.shift_warned {
                self.shift_warned = true;
                warn!(
                    "agent {}: batch {} ends {} ms beyond this collector's clock plus limits.max_clock_skew: applied at the latest time allowed (is the agent's clock ahead?); outflow_collector_shifted_batches_total counts such batches",
                    agent.key.agent_id, batch.seq, batch.shifted_ms
                );
            }
        }
        agent
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(batch.deltas.len(), Instant::now())
            .map_err(|limit| ApiError::RateLimited {
                agent: agent.key.agent_id.to_string(),
                limit,
            })?;
        let seq = batch.seq;
        // Waits while the queue is full (at most a batch's worth: MAX_DELTAS_PER_BATCH is far
        // under MAX_QUEUED_DELTAS).
        let n = u32::try_from(batch.deltas.len()).unwrap_or(MAX_QUEUED_DELTAS);
        let queued = c
            .queued
            .clone()
            .acquire_many_owned(n.min(MAX_QUEUED_DELTAS))
            .await
            .map_err(|_| ApiError::ShuttingDown)?;
        if let (Sink::Cluster(ci), Some(p)) = (&c.sink, &agent.publisher) {
            let parts = ci.partitions().split(&agent.key, &agent.hostname, &batch);
            let rx = p.submit(parts, batch.deltas.len()).await?;
            return Ok(Pending::Batch { seq, rx, queued });
        }
        let aggregate = aggregate(&batch, agent.host);
        let feed = c.feed.enabled().then(|| FeedBatch {
            agent: agent.key.clone(),
            seq,
            host: agent.hostname.clone(),
            start_ms: batch.start_ms,
            end_ms: batch.end_ms,
            // The writer moves the aggregate's entries here once it has applied them.
            totals: Vec::new(),
            deltas: raw,
        });
        let request = BatchRequest {
            agent: agent.key.clone(),
            stream: agent.stream,
            seq,
            // A part's delta split over two partitions counts as one delta applied: with the
            // share that holds its host's bytes.
            deltas: batch.deltas.iter().filter(|d| d.share.rest()).count(),
            gaps: Gaps {
                lost_batches: batch.lost_batches,
                lost_response_bytes: batch.lost.bytes_out,
                unattributed_response_bytes: batch.overflow.bytes_out,
            },
            aggregate,
            feed,
        };
        let Sink::Store(w) = &c.sink else {
            return Err(ApiError::ShuttingDown);
        };
        let rx = w.submit(request).await?;
        Ok(Pending::Batch { seq, rx, queued })
    }
}
