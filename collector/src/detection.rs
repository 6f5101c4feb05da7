//! The detection thread: judges what the store writer committed, off the path of the Acks.
//!
//! The writer sends it, in commit order, what each commit touched ([`Detection::observe`]) and,
//! once a batch later than the next judgement's batch time arrives, that judgement
//! ([`Detection::judge`]). A judgement reads the shared [`State`] as the writer left it after
//! the last commit before that batch time: the writer goes on committing the next group to disk
//! meanwhile, but changes memory only once the judgement has read it and turned its verdicts
//! into alert changes (the [`Reading`] it waits on). So the same applied batches give the same
//! judgements however they were grouped into commits, and an Ack of a batch later than a
//! judgement means that judgement's alerts are listed.
//!
//! Off the Acks' path: the detectors' own bookkeeping for every commit, storing the alert changes
//! (a transaction of their own) and publishing them (webhook, metrics, logs), and saving what the
//! detectors learnt (once an hour of batch time, and at stop).
use std::{
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    thread::JoinHandle,
    time::Instant,
};

use log::{debug, error, warn};
use tokio::sync::oneshot;

use crate::{
    aggregate::State,
    alerts::AlertHub,
    detect::{Detector, HOUR_MS, PEER_KINDS, Peers, Sighting, Subject, combined},
    keys::Prefix,
    metrics::{Metrics, PeerKindLabel},
    store::SharedStore,
    window::Rollup,
};

/// Jobs queued for the detection thread at most: the writer waits beyond (backpressure, so a
/// detection thread that falls behind slows the Acks rather than holding ever more memory).
const QUEUE: usize = 256;

enum Job {
    /// What a commit touched, to be judged at `at_ms`.
    Observe {
        subjects: Vec<Subject>,
        prefixes: Vec<(Prefix, Rollup)>,
        at_ms: u64,
    },
    /// Judge at `at_ms` (the next judgement is at `next_ms`); say on `read` once the state
    /// is no longer read.
    Judge {
        at_ms: u64,
        next_ms: u64,
        read: SyncSender<()>,
    },
    /// Answered once every job before it is done.
    Ping(oneshot::Sender<()>),
}

/// What a cluster's aggregator saw of its clients at one judgement, for the second stage (see
/// `detect::fleet_cohorts`): sent on a [`SightingsTx`] after each judgement.
#[derive(Debug)]
pub struct Sightings {
    pub at_ms: u64,
    pub seen: Vec<Sighting>,
}

/// Where the detection thread of a cluster's aggregator sends its [`Sightings`] (it waits while
/// the channel is full: the aggregator's publisher holds its judgements back).
pub type SightingsTx = tokio::sync::mpsc::Sender<Sightings>;

/// The peers' ratios the detection thread shares with a cluster's aggregator loop: its own
/// (after each judgement), which the loop passes to the other aggregators, and theirs, which
/// the next judgement uses (see [`Detector::set_others_peers`]). A standalone collector's has
/// no others. Its gauges say what the sustained detector judges against.
#[derive(Debug)]
pub struct PeerExchange {
    own: Mutex<[Peers; 5]>,
    others: Mutex<Vec<[Peers; 5]>>,
    metrics: Arc<Metrics>,
}

impl PeerExchange {
    pub fn new(metrics: Arc<Metrics>) -> PeerExchange {
        PeerExchange {
            own: Mutex::new([Peers::default(); 5]),
            others: Mutex::new(Vec::new()),
            metrics,
        }
    }

    /// What this collector's detectors learnt of their peers, as of the last judgement.
    pub fn own(&self) -> [Peers; 5] {
        *self.own.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the other aggregators' peers, for the next judgement.
    pub fn set_others(&self, others: Vec<[Peers; 5]>) {
        self.metrics
            .cluster_peer_ratios_shared
            .set(i64::try_from(others.len() + 1).unwrap_or(i64::MAX));
        *self.others.lock().unwrap_or_else(PoisonError::into_inner) = others;
        self.show();
    }

    fn others(&self) -> Vec<[Peers; 5]> {
        self.others
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_own(&self, own: [Peers; 5]) {
        *self.own.lock().unwrap_or_else(PoisonError::into_inner) = own;
        self.show();
    }

    /// The gauges: each kind's ratio, its own and the others' together.
    fn show(&self) {
        let own = self.own();
        let others = self.others();
        for (k, kind) in PEER_KINDS.iter().enumerate() {
            let p = combined(&own[k], &others, k);
            let label = PeerKindLabel { kind };
            if p.n == 0 {
                // Nothing learnt: no ratio to show (the detector judges none).
                self.metrics.detect_peer_ratio.remove(&label);
            } else {
                self.metrics
                    .detect_peer_ratio
                    .get_or_create(&label)
                    .set(p.mean.exp2());
            }
            self.metrics
                .detect_peer_samples
                .get_or_create(&label)
                .set(i64::from(p.n));
        }
    }
}

/// What the detection thread shares beyond the store and the alerts.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The peers' ratios (every collector).
    pub peers: Arc<PeerExchange>,
    /// A cluster's aggregator: cohorts are left to the second stage, which gets what each
    /// judgement saw of the clients here.
    pub sightings: Option<SightingsTx>,
}

/// A judgement reading the shared state: the writer waits on it before changing the state.
#[derive(Debug)]
pub struct Reading(Receiver<()>);

impl Reading {
    /// Waits until the judgement no longer reads the state (returns at once if the detection
    /// thread has stopped).
    pub fn wait(self) {
        let _ = self.0.recv();
    }
}

/// Handle to the detection thread.
#[derive(Debug)]
pub struct Detection {
    tx: SyncSender<Job>,
    thread: JoinHandle<()>,
}

impl Detection {
    /// Starts the detection thread with `detector` (built and restored on `state`), judging on
    /// `state`, storing alert changes and what it learnt in `store`, publishing alerts to
    /// `alerts`. `max_keys` is named when learnt subjects are dropped to stay within it. What
    /// it learns of the peers it shares through `exchange`; with `exchange.sightings` (a
    /// cluster's aggregator), cohorts are left to the second stage: what each judgement saw
    /// of the clients goes there.
    pub fn start(
        mut detector: Detector,
        state: Arc<RwLock<State>>,
        store: Arc<SharedStore>,
        alerts: Arc<AlertHub>,
        metrics: Arc<Metrics>,
        max_keys: usize,
        exchange: Exchange,
    ) -> std::io::Result<Detection> {
        let (tx, rx) = sync_channel(QUEUE);
        let Exchange { peers, sightings } = exchange;
        if sightings.is_some() {
            detector.leave_cohorts_to_second_stage();
        }
        peers.set_own(detector.peers());
        let w = Judge {
            peers,
            detector,
            state,
            store,
            alerts,
            metrics,
            max_keys,
            sightings,
        };
        let thread = std::thread::Builder::new()
            .name("detection".into())
            .spawn(move || w.run(rx))?;
        Ok(Detection { tx, thread })
    }

    /// Records what a commit touched (`subjects`, and what it added to each /24 and /64), to
    /// be judged at `at_ms`.
    pub fn observe(&self, subjects: Vec<Subject>, prefixes: Vec<(Prefix, Rollup)>, at_ms: u64) {
        let _ = self.tx.send(Job::Observe {
            subjects,
            prefixes,
            at_ms,
        });
    }

    /// Judges at `at_ms` on the state as it is now; the next judgement is at `next_ms`. The
    /// state must not change until the returned [`Reading`] is over.
    pub fn judge(&self, at_ms: u64, next_ms: u64) -> Reading {
        let (read, rx) = sync_channel(1);
        let _ = self.tx.send(Job::Judge {
            at_ms,
            next_ms,
            read,
        });
        Reading(rx)
    }

    /// Answers `reply` once everything sent before is judged, stored and published.
    pub fn ping(&self, reply: oneshot::Sender<()>) {
        if let Err(e) = self.tx.send(Job::Ping(reply))
            && let Job::Ping(reply) = e.0
        {
            let _ = reply.send(());
        }
    }

    /// Finishes every job sent, saves what was learnt, and stops the thread.
    pub fn stop(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

/// The detection thread's own state.
struct Judge {
    detector: Detector,
    state: Arc<RwLock<State>>,
    store: Arc<SharedStore>,
    alerts: Arc<AlertHub>,
    metrics: Arc<Metrics>,
    max_keys: usize,
    peers: Arc<PeerExchange>,
    sightings: Option<SightingsTx>,
}

impl Judge {
    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Observe {
                    subjects,
                    prefixes,
                    at_ms,
                } => self.detector.observe(subjects, &prefixes, at_ms),
                Job::Judge {
                    at_ms,
                    next_ms,
                    read,
                } => self.judge(at_ms, next_ms, &read),
                Job::Ping(reply) => {
                    let _ = reply.send(());
                }
            }
        }
        self.save();
        debug!("detection stopped");
    }

    /// Judges at `at_ms`: verdicts into alert changes (on the state as the writer left it,
    /// then `read` lets it go on), stored, then published.
    fn judge(&mut self, at_ms: u64, next_ms: u64, read: &SyncSender<()>) {
        let t0 = Instant::now();
        let det = &mut self.detector;
        det.set_others_peers(self.peers.others());
        let changes = {
            let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
            // Only this thread opens and resolves alerts.
            let open = self.alerts.open_subjects();
            let verdicts = det.judge(&st, at_ms, &open);
            let resolve_after =
                u64::try_from(det.config().resolve_after.as_millis()).unwrap_or(u64::MAX);
            self.alerts.apply(verdicts, at_ms, resolve_after, &st)
        };
        let _ = read.send(());
        self.peers.set_own(det.peers());
        if let Some(tx) = &self.sightings {
            let seen = det.take_sightings();
            // Gone only when the aggregator stops.
            let _ = tx.blocking_send(Sightings { at_ms, seen });
        }
        // Where a test holds the thread to show that Acks do not wait for what follows.
        outflow_crashpoint::fail::fail_point!("detection::after_reading");
        let evicted = det.take_evicted();
        if evicted > 0 {
            self.metrics.tracks_evicted.inc_by(evicted);
            warn!(
                "detection: {evicted} learnt subjects dropped (least recently judged first) to keep at most limits.max_keys = {}; they learn again if they come back",
                self.max_keys
            );
        }
        if !changes.is_empty() {
            // On failure the alerts stay in memory and are written with their next change.
            if let Err(e) = self
                .store
                .write(|s| s.put_alerts(&changes.upserts, &changes.deletes))
            {
                error!("store alerts: {e}");
                self.metrics.store_failures.inc();
            }
            self.alerts.publish(&changes, &self.metrics);
        }
        self.metrics
            .detect_seconds
            .observe(t0.elapsed().as_secs_f64());
        // What was learnt is saved once an hour of batch time, and at stop.
        if at_ms / HOUR_MS != next_ms / HOUR_MS {
            self.save();
        }
    }

    /// Writes what the detectors learnt since the last save.
    fn save(&mut self) {
        let snap = self.detector.snapshot();
        if let Err(e) = self
            .store
            .write(|s| s.put_detect_state(&snap.puts, &snap.deletes))
        {
            // Learnt again after a restart; the next save writes what changed after this one.
            error!("store detection state: {e}");
            self.metrics.store_failures.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use outflow_proto::v1::{self, AgentMessage, agent_message::Msg};

    use crate::{Config, collector::Collector, metrics::Metrics};

    const MIN: u64 = 60_000;
    /// A judgement boundary (the default `eval_interval` is a minute).
    const T0: u64 = 1_750_000_000_000 / MIN * MIN;

    fn batch(seq: u64, end_ms: u64, out: u64) -> AgentMessage {
        let d = v1::ConnDelta {
            conn_id: seq,
            local_addr: vec![10, 0, 0, 1],
            local_port: 8000,
            remote_addr: vec![203, 0, 113, 7],
            remote_port: 40000,
            role: v1::Role::Server as i32,
            counters: Some(v1::Counters {
                bytes_out: out,
                bytes_in: 100,
                ..Default::default()
            }),
            closed: true,
            first_seen_ms: 1,
            ..Default::default()
        };
        AgentMessage {
            msg: Some(Msg::Batch(v1::Batch {
                seq,
                start_ms: end_ms - 1000,
                end_ms,
                deltas: vec![d],
                ..Default::default()
            })),
        }
    }

    /// A collector on `dir` (no fsync, no rate limits) whose volume detector alerts at 1 MB
    /// an hour.
    fn open(dir: &std::path::Path) -> (Config, std::sync::Arc<Metrics>, std::sync::Arc<Collector>) {
        let mut cfg = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        cfg.store.fsync = false;
        cfg.limits.batches_per_second = 0.0;
        cfg.limits.deltas_per_second = 0.0;
        cfg.detect.volume.client_per_hour = 1_000_000;
        let metrics = std::sync::Arc::new(Metrics::new());
        let c = std::sync::Arc::new(Collector::open(&cfg, metrics.clone()).unwrap());
        (cfg, metrics, c)
    }

    fn opened(m: &Metrics) -> String {
        m.encode()
            .lines()
            .filter(|l| l.starts_with("outflow_collector_alerts_opened_total"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// With the detection thread held right after a judgement read the state (before it stores
    /// and publishes the alert it opened), batches are still applied and acknowledged, the
    /// alert is listed, and a writer ping (the watchdog's) waits for the thread; let go, the
    /// alert is published and stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_do_not_wait_for_storing_and_publishing_alerts() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, metrics, c) = open(dir.path());
        let mut s = c.session();
        s.handle(AgentMessage {
            msg: Some(Msg::Hello(v1::Hello {
                agent_id: "a".into(),
                epoch: 1,
                hostname: "gpu-0".into(),
                boot_id: "b".into(),
                version: "0.1.0".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        // 50 MB in the minute before the boundary: over the hourly limit (its arrival runs
        // the first judgement, of an empty state).
        s.handle(batch(1, T0 - 1000, 50_000_000)).await.unwrap();
        c.ping_writer().await.unwrap();
        outflow_crashpoint::arm("detection::after_reading=pause").unwrap();
        // Past the boundary: the judgement at T0 runs; the thread stops after reading. The
        // next judgement is a minute later.
        for seq in 2..=10 {
            let acked = tokio::time::timeout(
                Duration::from_secs(20),
                s.handle(batch(seq, T0 + seq * 1000, 1000)),
            )
            .await;
            assert!(
                acked.is_ok(),
                "batch {seq} was not acknowledged while the detection thread was held"
            );
            acked.unwrap().unwrap();
        }
        assert!(
            c.alerts().open_count() >= 1,
            "{:#?}",
            c.alerts().list(false, 0, true)
        );
        assert!(
            !opened(&metrics).contains("volume"),
            "published while held: {}",
            opened(&metrics)
        );
        // A ping waits for the detection thread.
        let c2 = c.clone();
        let mut ping = tokio::spawn(async move { c2.ping_writer().await });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut ping)
                .await
                .is_err(),
            "a ping was answered while the detection thread was held"
        );
        outflow_crashpoint::arm("detection::after_reading=off").unwrap();
        ping.await.unwrap().unwrap();
        assert!(
            opened(&metrics).contains("detector=\"volume\"} 1"),
            "{}",
            opened(&metrics)
        );
        c.close().await;
        drop(s);
        drop(c);
        // Stored: a collector opened on the same directory lists it.
        let c = Collector::open(&cfg, std::sync::Arc::new(Metrics::new())).unwrap();
        assert!(c.alerts().open_count() >= 1);
        c.close().await;
    }

    /// Agent "a" over the volume limit (50 MB in the minute before T0) and past the judgement
    /// at T0; returns once applied and judged.
    async fn over_the_limit(c: &std::sync::Arc<Collector>) -> crate::collector::Session {
        let mut s = c.session();
        s.handle(AgentMessage {
            msg: Some(Msg::Hello(v1::Hello {
                agent_id: "a".into(),
                epoch: 1,
                hostname: "gpu-0".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        s.handle(batch(1, T0 - 1000, 50_000_000)).await.unwrap();
        s.handle(batch(2, T0 + 1000, 1000)).await.unwrap();
        c.ping_writer().await.unwrap();
        s
    }

    /// A reset (an aggregator giving partitions away) leaves nothing: no key, watermark,
    /// alert, in memory or in the store; detection starts afresh and opens alerts again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_empties_the_store_and_detection_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, metrics, c) = open(dir.path());
        let agent = crate::model::AgentKey {
            agent_id: "a".into(),
            epoch: 1,
        };
        let first = over_the_limit(&c).await;
        assert_eq!(c.alerts().open_count(), 1);
        assert_eq!(c.watermark(&agent), 2);

        c.reset().await.unwrap();
        assert_eq!(c.watermark(&agent), 0);
        assert_eq!(c.alerts().open_count(), 0);
        assert!(c.read_state().iter().next().is_none(), "keys left");
        assert!(!opened(&metrics).is_empty());
        let open_gauge = metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("outflow_collector_alerts_open{detector=\"volume\"}"))
            .map(str::to_owned);
        assert_eq!(
            open_gauge.as_deref(),
            Some("outflow_collector_alerts_open{detector=\"volume\"} 0")
        );

        // Applied again from the start (as a rebuild does): the same alert opens again.
        let s = over_the_limit(&c).await;
        assert_eq!(c.alerts().open_count(), 1);
        c.reset().await.unwrap();
        c.close().await;
        drop((first, s));
        drop(c);
        // Nothing on disk either.
        let c = Collector::open(&cfg, std::sync::Arc::new(Metrics::new())).unwrap();
        assert_eq!(c.alerts().open_count(), 0);
        assert_eq!(c.watermark(&agent), 0);
        assert!(c.read_state().iter().next().is_none(), "keys left on disk");
        c.close().await;
    }
}
