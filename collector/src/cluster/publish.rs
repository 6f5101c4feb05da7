//! An ingest node's publisher: the parts of a batch into a replicated JetStream stream.
//!
//! Each part goes to the subject of its partition (`<prefix>.<partition>`) with the message id
//! of [`message_id`]: JetStream keeps the first message of an id within the stream's
//! duplicate window and acknowledges a later one as a duplicate, so publishing a part again
//! (after an unanswered publish, a lost leader, or an agent's resend) never stores it twice. A
//! batch is published once every part is acknowledged, which on a replicated stream means
//! stored by a majority of its replicas; only then may its agent be acknowledged.
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use outflow_proto::v1;
use prost::Message as _;

use super::{
    nats::{NatsConnect, NatsConnectError},
    partition::message_id,
};

/// Where and how the parts are published.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// The NATS servers, and how this node connects to them.
    pub nats: NatsConnect,
    /// The stream's name.
    pub stream: String,
    /// Subjects are `<subject_prefix>.<partition>`.
    pub subject_prefix: String,
    /// Copies JetStream keeps of every message (1, 3 or 5: a majority must store a message
    /// before it is acknowledged).
    pub replicas: usize,
    /// A part published again within this time is acknowledged as a duplicate, not stored.
    pub duplicate_window: Duration,
    /// Messages older than this are dropped from the stream.
    pub max_age: Duration,
}

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Connect(#[from] NatsConnectError),
    #[error("creating the JetStream stream {stream}: {message}")]
    Stream { stream: String, message: String },
    #[error(transparent)]
    Partitions(#[from] super::partition::BadCount),
    #[error("part {id} not acknowledged by JetStream in {after:?}: {last}")]
    Unacknowledged {
        id: String,
        after: Duration,
        last: String,
    },
}

/// What a publish did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Parts acknowledged.
    pub parts: usize,
    /// Of those, parts JetStream already held (published before with the same id).
    pub duplicates: usize,
    /// Publishes sent again after one failed or went unanswered.
    pub retries: usize,
}

/// Connects to the NATS servers of `cfg` (retrying until one answers) and opens its stream,
/// created with the settings of `cfg` if it is not there.
pub async fn open_stream(
    cfg: &PublishConfig,
) -> Result<(jetstream::Context, stream::Stream), PublishError> {
    let client = cfg.nats.connect().await?;
    let js = jetstream::new(client);
    let config = stream_config(cfg, cfg.stream.clone(), format!("{}.*", cfg.subject_prefix));
    let st = get_or_create_stream(&js, config).await?;
    Ok((js, st))
}

/// Binds to the stream of `config`, created if it is not there, trying again while JetStream's
/// requests time out: nodes starting together with a cluster that is still electing its leaders
/// see that for a few seconds.
pub(super) async fn get_or_create_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, PublishError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match js.get_or_create_stream(config.clone()).await {
            Ok(st) => return Ok(st),
            Err(e) if tries < OPEN_TRIES => {
                log::debug!("stream {}: {e}; trying again", config.name);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(PublishError::Stream {
                    stream: format!("{} ({tries} tries)", config.name),
                    message: e.to_string(),
                });
            }
        }
    }
}

/// A stream `name` of the messages on `subjects`, replicated and kept as `cfg` says.
pub(super) fn stream_config(cfg: &PublishConfig, name: String, subjects: String) -> stream::Config {
    stream::Config {
        name,
        subjects: vec![subjects],
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window,
        max_age: cfg.max_age,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// How many times opening the stream is tried.
const OPEN_TRIES: u32 = 10;

/// Publishes parts to the stream (see the module's doc).
#[derive(Debug, Clone)]
pub struct Publisher {
    js: jetstream::Context,
    prefix: String,
}

impl Publisher {
    /// Connects and creates the stream if it is not there (an existing stream is used as it
    /// is).
    pub async fn connect(cfg: &PublishConfig) -> Result<Publisher, PublishError> {
        let (js, _) = open_stream(cfg).await?;
        Ok(Publisher {
            js,
            prefix: cfg.subject_prefix.clone(),
        })
    }

    /// Publishes every part and returns once JetStream acknowledged each. A part whose publish
    /// failed or was not answered in `ack_timeout` is published again with its id, until
    /// `deadline` has passed.
    pub async fn publish(
        &self,
        parts: &[v1::PartBatch],
        ack_timeout: Duration,
        deadline: Duration,
    ) -> Result<Published, PublishError> {
        let start = Instant::now();
        let mut done = Published::default();
        let mut todo: Vec<Outgoing> = parts
            .iter()
            .map(|p| Outgoing {
                subject: format!("{}.{}", self.prefix, p.partition),
                id: message_id(p),
                body: bytes::Bytes::from(p.encode_to_vec()),
            })
            .collect();
        loop {
            let round = publish_round(&self.js, todo, ack_timeout).await;
            done.parts += round.acked;
            done.duplicates += round.duplicates;
            let (left, last) = (round.left, round.last_error);
            if left.is_empty() {
                return Ok(done);
            }
            if start.elapsed() >= deadline {
                return Err(PublishError::Unacknowledged {
                    id: left[0].id.clone(),
                    after: start.elapsed(),
                    last,
                });
            }
            done.retries += left.len();
            todo = left;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A message to publish with its id (publishing it again is a duplicate).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub id: String,
    pub body: bytes::Bytes,
}

/// What one [`publish_round`] did.
#[derive(Debug, Default)]
pub struct Round {
    /// Messages acknowledged, and of those, duplicates (JetStream held them already).
    pub acked: usize,
    pub duplicates: usize,
    /// The messages not acknowledged (to send again), and the last error seen.
    pub left: Vec<Outgoing>,
    pub last_error: String,
}

/// Publishes every message, all in flight at once, and waits up to `ack_timeout` for each
/// acknowledgement.
pub async fn publish_round(
    js: &jetstream::Context,
    todo: Vec<Outgoing>,
    ack_timeout: Duration,
) -> Round {
    let mut acks = Vec::with_capacity(todo.len());
    for m in &todo {
        let sent = js
            .send_publish(
                m.subject.clone(),
                PublishMessage::build()
                    .message_id(m.id.as_str())
                    .payload(m.body.clone()),
            )
            .await;
        acks.push(sent);
    }
    let mut round = Round::default();
    for (m, sent) in todo.into_iter().zip(acks) {
        let ack = match sent {
            Ok(f) => match tokio::time::timeout(ack_timeout, f).await {
                Ok(Ok(ack)) => Ok(ack),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer in {ack_timeout:?}")),
            },
            Err(e) => Err(e.to_string()),
        };
        match ack {
            Ok(a) => {
                round.acked += 1;
                round.duplicates += usize::from(a.duplicate);
            }
            Err(e) => {
                round.last_error = e;
                round.left.push(m);
            }
        }
    }
    round
}
