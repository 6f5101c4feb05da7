//! The task that streams the spool to the collector (`outflow.v1.Ingest/Stream`): a Hello, the
//! Welcome's `applied_seq` forgets what the collector already has, then every spooled batch in
//! order, a bounded number unacknowledged at a time, each forgotten when acknowledged. On any
//! error it reconnects with exponential backoff and full jitter and resends from the first
//! unacknowledged batch (the collector drops duplicates by `(agent_id, epoch, seq)`).
use std::{
    collections::VecDeque,
    convert::Infallible,
    error::Error as StdError,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use log::{debug, info, warn};
use outflow_proto::v1::{
    self, AgentMessage, CollectorMessage, agent_message, collector_message,
    ingest_client::IngestClient,
};
use tokio::{
    sync::{Notify, mpsc},
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request,
    metadata::{Ascii, MetadataValue},
    transport::Endpoint,
};

use crate::spool::{BatchFileError, Spool, SpoolError, read_batch_file};

/// First reconnection delay ceiling; doubles per failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Batches sent and not yet acknowledged, at most.
pub const WINDOW: usize = 32;
/// How long the collector may take to answer the Hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the collector may leave sent batches unacknowledged before the stream is
/// considered stuck and reopened.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// What the read loop and the sender share.
pub struct Shared {
    pub spool: Mutex<Spool>,
    /// A batch was appended.
    pub spooled: Notify,
    /// Batches were acknowledged.
    pub acked: Notify,
    /// A stream is open (Welcome received).
    pub connected: AtomicBool,
    /// Batches written to the spool since this agent started.
    pub batches_spooled: AtomicU64,
    /// Batches the collector acknowledged (by an Ack, or by a Welcome that says it has them)
    /// since this agent started.
    pub batches_acked: AtomicU64,
    /// When the collector last acknowledged something (an Ack or a Welcome).
    last_ack: Mutex<Option<Instant>>,
}

impl Shared {
    pub fn new(spool: Spool) -> Self {
        Self {
            spool: Mutex::new(spool),
            spooled: Notify::new(),
            acked: Notify::new(),
            connected: AtomicBool::new(false),
            batches_spooled: AtomicU64::new(0),
            batches_acked: AtomicU64::new(0),
            last_ack: Mutex::new(None),
        }
    }

    /// The collector acknowledged `batches` batches (possibly none: a Welcome or an Ack of
    /// what it had already acknowledged still says it is there).
    fn acknowledged(&self, batches: usize) {
        self.batches_acked
            .fetch_add(batches as u64, Ordering::Relaxed);
        *self.last_ack.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Time since the collector last acknowledged something, if it ever did.
    pub fn since_last_ack(&self) -> Option<Duration> {
        self.last_ack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|t| t.elapsed())
    }

    pub fn spool(&self) -> MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(max, base * 2^n)]`, so that a fleet of agents does not reconnect in step.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max)
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_nanos(fastrand::u64(0..=cap.as_nanos() as u64))
    }

    /// The connection works again: start over from `base`.
    pub const fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// How to reach the collector and what to tell it.
#[derive(Clone, Debug)]
pub struct Link {
    /// The URL, for messages.
    pub collector: String,
    pub endpoint: Endpoint,
    /// `Bearer <token>`.
    pub authorization: Option<MetadataValue<Ascii>>,
    pub hello: v1::Hello,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Connect(String),
    #[error("{}", status_text(.0))]
    Status(tonic::Status),
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

fn status_text(s: &tonic::Status) -> String {
    let mut t = format!("collector answered {:?}", s.code());
    if !s.message().is_empty() {
        t.push_str(": ");
        t.push_str(s.message());
    }
    if let Some(src) = s.source() {
        t.push_str(&format!(" ({})", chain(src)));
    }
    t
}

/// An error and its sources on one line (tonic's transport errors say little at the top).
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Streams the spool to the collector until the task is aborted.
pub async fn run(shared: Arc<Shared>, link: Link) {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    let mut last_error: Option<String> = None;
    loop {
        let Err(e) = stream(&shared, &link, &mut backoff, &mut last_error).await;
        let msg = e.to_string();
        if shared.connected.swap(false, Ordering::Relaxed) {
            warn!(
                "lost the stream to collector {}: {msg}; reconnecting (batches are spooled meanwhile)",
                link.collector
            );
        } else if last_error.as_deref() != Some(msg.as_str()) {
            warn!(
                "cannot stream to collector {}: {msg}; retrying with backoff up to {}s (batches are spooled meanwhile)",
                link.collector,
                BACKOFF_MAX.as_secs()
            );
        } else {
            debug!("collector {} still unreachable: {msg}", link.collector);
        }
        last_error = Some(msg);
        sleep(backoff.next_delay()).await;
    }
}

fn protocol(m: impl Into<String>) -> SessionError {
    SessionError::Protocol(m.into())
}

/// One stream, from connecting to its first error.
async fn stream(
    shared: &Shared,
    link: &Link,
    backoff: &mut Backoff,
    last_error: &mut Option<String>,
) -> Result<Infallible, SessionError> {
    let channel = link
        .endpoint
        .connect()
        .await
        .map_err(|e| SessionError::Connect(chain(&e)))?;
    let mut client = IngestClient::new(channel);
    let (tx, rx) = mpsc::channel::<AgentMessage>(WINDOW + 1);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(link.hello.clone())),
    })
    .await
    .map_err(|_| protocol("the request stream closed"))?;
    let mut request = Request::new(ReceiverStream::new(rx));
    if let Some(auth) = &link.authorization {
        request.metadata_mut().insert("authorization", auth.clone());
    }

    let opening = async {
        let mut inbound = client
            .stream(request)
            .await
            .map_err(SessionError::Status)?
            .into_inner();
        let first = inbound.message().await.map_err(SessionError::Status)?;
        match first {
            Some(CollectorMessage {
                msg: Some(collector_message::Msg::Welcome(w)),
            }) => Ok((inbound, w.applied_seq)),
            Some(_) => Err(protocol("the collector's first message is not a Welcome")),
            None => Err(protocol(
                "the collector closed the stream before its Welcome",
            )),
        }
    };
    let (mut inbound, applied) = timeout(WELCOME_TIMEOUT, opening)
        .await
        .map_err(|_| protocol("no Welcome from the collector within 30s"))??;

    let mut sent = {
        let mut spool = shared.spool();
        let before = spool.len();
        spool.welcome(applied)?;
        shared.acknowledged(before.saturating_sub(spool.len()));
        shared.connected.store(true, Ordering::Relaxed);
        info!(
            "streaming to collector {} (agent {} epoch {}): it has applied up to seq {applied}; {} batches spooled to send",
            link.collector,
            link.hello.agent_id,
            link.hello.epoch,
            spool.len()
        );
        spool.acked_seq()
    };
    *last_error = None;
    shared.acked.notify_one();

    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let mut waiting_since = Instant::now();
    loop {
        while in_flight.len() < WINDOW {
            // Marked as sent before it is read and sent, under the spool's lock: from here on
            // making room may not drop it (it may reach the collector).
            let next = {
                let mut spool = shared.spool();
                let next = spool.next_after(sent);
                if let Some((seq, _)) = &next {
                    spool.sent(*seq);
                }
                next
            };
            let Some((seq, path)) = next else {
                break;
            };
            sent = seq;
            let batch = match read_batch_file(&path) {
                Ok((_, b)) => b,
                // Acknowledged or dropped (and counted) meanwhile.
                Err(BatchFileError::Gone) => continue,
                Err(e) => {
                    shared.spool().discard(seq, &e.to_string())?;
                    continue;
                }
            };
            if in_flight.is_empty() {
                waiting_since = Instant::now();
            }
            tx.send(AgentMessage {
                msg: Some(agent_message::Msg::Batch(batch)),
            })
            .await
            .map_err(|_| protocol("the request stream closed"))?;
            outflow_crashpoint::crash_point!("sender::after_send");
            in_flight.push_back(seq);
        }
        tokio::select! {
            m = inbound.message() => match m.map_err(SessionError::Status)? {
                Some(CollectorMessage { msg: Some(collector_message::Msg::Ack(a)) }) => {
                    if a.seq > sent {
                        return Err(protocol(format!(
                            "the collector acknowledged seq {} but only {sent} was sent",
                            a.seq
                        )));
                    }
                    let acked = shared.spool().ack(a.seq)?;
                    shared.acknowledged(acked);
                    while in_flight.front().is_some_and(|&s| s <= a.seq) {
                        in_flight.pop_front();
                    }
                    waiting_since = Instant::now();
                    backoff.reset();
                    shared.acked.notify_one();
                }
                Some(CollectorMessage { msg: Some(collector_message::Msg::Welcome(_)) }) => {
                    return Err(protocol("the collector sent a second Welcome"));
                }
                // A message of a newer protocol revision: not for this agent.
                Some(CollectorMessage { msg: None }) => {}
                None => return Err(protocol("the collector ended the stream")),
            },
            () = shared.spooled.notified(), if in_flight.len() < WINDOW => {}
            () = sleep_until(waiting_since + ACK_TIMEOUT), if !in_flight.is_empty() => {
                return Err(protocol(format!(
                    "no acknowledgement from the collector for {}s",
                    ACK_TIMEOUT.as_secs()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_with_full_jitter() {
        let mut b = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let cap = b.ceiling();
            ceilings.push(cap);
            let d = b.next_delay();
            assert!(d <= cap, "{d:?} <= {cap:?}");
        }
        assert_eq!(ceilings[0], Duration::from_millis(200));
        assert_eq!(ceilings[1], Duration::from_millis(400));
        assert_eq!(ceilings[2], Duration::from_millis(800));
        assert_eq!(ceilings[7], Duration::from_millis(25_600));
        assert_eq!(ceilings[8], BACKOFF_MAX);
        assert_eq!(ceilings[11], BACKOFF_MAX);
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), BACKOFF_MAX, "no overflow after many attempts");
        b.reset();
        assert_eq!(b.ceiling(), BACKOFF_BASE);
    }

    #[test]
    fn backoff_jitter_spans_the_whole_range() {
        let samples: Vec<Duration> = (0..2000)
            .map(|_| Backoff::new(Duration::from_secs(1), BACKOFF_MAX).next_delay())
            .collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(1)));
        let low = samples
            .iter()
            .filter(|d| **d < Duration::from_millis(250))
            .count();
        let high = samples
            .iter()
            .filter(|d| **d > Duration::from_millis(750))
            .count();
        // Uniform: about 500 each; far from 0 (no jitter) or 2000.
        assert!((300..700).contains(&low), "{low}");
        assert!((300..700).contains(&high), "{high}");
    }
}
