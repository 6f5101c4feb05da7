//! An aggregator's consumers: the parts of a partition, applied to its own store.
//!
//! One durable pull consumer per partition an aggregator holds (`<node>-p<partition>`, on the
//! subject `<prefix>.<partition>`, from the stream's first part) and one task per consumer.
//! Each part is applied through the same path as an agent's batch ([`Session`]), as the
//! batches of the agent `<agent_id>#<partition>`: the writer's watermark per agent and epoch,
//! committed in the same transaction as the rollups, makes a part at or below it a duplicate.
//! A part is acknowledged to JetStream only once it is committed (or known applied before), so
//! a part redelivered after a crash is applied once. A part that breaks the protocol is
//! counted, logged and acknowledged (never retried for ever); a part the store could not
//! commit is not acknowledged, and comes again.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    self, AckKind, ErrorCode,
    consumer::{DeliverPolicy, pull},
    context::ConsumerInfoErrorKind,
    stream::Stream,
};
use bytes::Bytes;
use log::{debug, error, info, warn};
use outflow_proto::limits::MAX_DELTAS_PER_BATCH;
use outflow_proto::v1::{self, AgentMessage, agent_message::Msg};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::{align::Member, holdings::Holdings, partition::fnv1a};
use crate::{
    codec::decode_part_batch,
    collector::{Collector, Session},
    error::ApiError,
    model::MAX_AGENT_ID_CHARS,
};

/// Parts taken from a consumer at once, at most (applied in one go, so they can share group
/// commits).
const FETCH: usize = 256;
/// Bytes of parts an aggregator's consumers ask for together, about: each fetch asks for its
/// consumer's share (this over the partitions held), in parts of the size its last fetch's
/// had. The client drops what a fetch has not delivered 5 s after it expires (see
/// `Partition::run`), and every consumer of an aggregator fetches over one connection, on the
/// same threads that decode the parts. Measured while one aggregator replayed 12 partitions,
/// fetching 256 parts of 80 KB each (250 MB together): 4 to 7 fetches a run cut short; with
/// the consumers opened together, every partition's, from 21 parts on, and a partition whose
/// last fetch was cut (no later delivery shows the gap) waited for ack_wait: 62 s instead of
/// 5. (NATS's own `max_bytes` ends a fetch with a status when the next part does not fit;
/// measured worse: see BENCHMARKS.md.)
const FETCH_BYTES: usize = 64 << 20;
/// The size of a part a consumer assumes before its first fetch when the stream cannot say
/// (empty, or not answering): NATS's default `max_payload`, the largest a part can be unless
/// the servers allow more.
const FIRST_PART_BYTES: usize = 1 << 20;
/// How long a fetch waits for parts when there are none.
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// A consumer nobody has fetched from for this long is removed by the server (the ones of an
/// aggregator that is gone for good).
const INACTIVE: Duration = Duration::from_secs(24 * 3600);

/// The durable consumer of aggregator `node` for `partition`.
pub fn consumer_name(node: &str, partition: u32) -> String {
    format!("{node}-p{partition}")
}

/// Where a partition's consumer reads: what [`open`] needs to open it again.
#[derive(Clone)]
pub struct Source {
    pub stream: Stream,
    pub subject_prefix: String,
    /// The aggregator's node name.
    pub node: String,
}

/// The durable consumer of aggregator `node` for `partition` on `stream` (created if missing:
/// from the stream's first part). `fresh`: the store holds nothing of the partition, so the
/// consumer must start at the stream's first part: any consumer left from before is deleted,
/// and one found still there (a deletion the cluster lost while it changed leaders) is an
/// error, not a consumer to go on from (the parts it was past would be lost).
pub async fn open(
    source: &Source,
    partition: u32,
    fresh: bool,
) -> Result<jetstream::consumer::PullConsumer, String> {
    let (stream, subject_prefix, node) = (&source.stream, &source.subject_prefix, &source.node);
    let name = consumer_name(node, partition);
    if fresh {
        delete(stream, &name).await?;
    }
    let config = |deliver_policy| pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: format!("{subject_prefix}.{partition}"),
        deliver_policy,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        max_ack_pending: i64::try_from(FETCH * 4).unwrap_or(1024),
        inactive_threshold: INACTIVE,
        ..Default::default()
    };
    let deliver = match stream.consumer_info(&name).await {
        // Parts delivered to the last run and not acknowledged (it stopped between a fetch
        // and its acknowledgements: killed, or cut off) would come again only after
        // ack_wait, and after later parts of the same agents, which would make them
        // duplicates below the watermark: lost. So the consumer starts again from its first
        // part not acknowledged, in order (the ones applied before are duplicates).
        Ok(info) if info.num_ack_pending > 0 => {
            let start_sequence = info.ack_floor.stream_sequence + 1;
            debug!(
                "partition {partition}: {} parts delivered and not acknowledged: applying again from stream sequence {start_sequence}",
                info.num_ack_pending
            );
            stream
                .delete_consumer(&name)
                .await
                .map_err(|e| format!("consumer {name}: deleting it to start again: {e}"))?;
            Some(DeliverPolicy::ByStartSequence { start_sequence })
        }
        Ok(_) => None,
        Err(e)
            if matches!(e.kind(), ConsumerInfoErrorKind::NotFound)
                || matches!(
                    e.kind(),
                    ConsumerInfoErrorKind::JetStream(j)
                        if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND
                ) =>
        {
            Some(DeliverPolicy::All)
        }
        Err(e) => return Err(format!("consumer {name}: {e}")),
    };
    let consumer = match deliver {
        Some(policy) => stream.create_consumer(config(policy)).await,
        None => {
            stream
                .get_or_create_consumer(&name, config(DeliverPolicy::All))
                .await
        }
    }
    .map_err(|e| format!("consumer {name}: {e}"))?;
    let info = consumer.cached_info();
    if fresh && (info.delivered.stream_sequence > 0 || info.ack_floor.stream_sequence > 0) {
        return Err(format!(
            "consumer {name}: still there after it was deleted (delivered up to stream sequence {}): deleting it again",
            info.delivered.stream_sequence
        ));
    }
    Ok(consumer)
}

/// Deletes the consumer `name` (one that is not there is deleted).
pub async fn delete(stream: &Stream, name: &str) -> Result<(), String> {
    match stream.delete_consumer(name).await {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("deleting the consumer {name}: {e}")),
    }
}

/// Starts applying `partition` to `collector` from `consumer` ([`open`]), in step with the
/// aggregator's other consumers through `member`, until `stop`; marks it caught up in
/// `holdings` once it has applied every part the stream had for it, and behind when it stops.
/// Its first fetch takes parts of `part_bytes` ([`mean_part_bytes`]).
#[allow(
    clippy::too_many_arguments,
    reason = "the consumer task's collaborators and its first fetch's size, each once"
)]
pub fn spawn(
    collector: Arc<Collector>,
    source: Source,
    consumer: jetstream::consumer::PullConsumer,
    partition: u32,
    member: Member,
    holdings: Holdings,
    part_bytes: usize,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        Partition {
            collector,
            source,
            partition,
            member,
            sessions: HashMap::new(),
            next: 0,
            holdings,
            replay: Some((Instant::now(), 0)),
            part_bytes,
        }
        .run(consumer, stop)
        .await;
    })
}

/// The agent id a part is applied under: its agent's and its partition's, so that each
/// partition has its own watermark (an agent's batches are split over many). An id too long
/// for the protocol with the suffix is replaced by its hash.
fn partition_agent(agent_id: &str, partition: u32) -> String {
    let id = format!("{agent_id}#{partition}");
    if id.chars().count() <= MAX_AGENT_ID_CHARS {
        id
    } else {
        format!("h{:016x}#{partition}", fnv1a(agent_id.as_bytes()))
    }
}

/// The mean size of the stream's parts (all partitions'), or [`FIRST_PART_BYTES`] when it
/// holds none or does not answer: what a consumer sizes its first fetch by.
pub async fn mean_part_bytes(mut stream: Stream) -> usize {
    match stream.info().await {
        Ok(i) if i.state.messages > 0 => {
            usize::try_from(i.state.bytes / i.state.messages).map_or(FIRST_PART_BYTES, |b| b.max(1))
        }
        _ => FIRST_PART_BYTES,
    }
}

/// One owned partition's consumer task.
struct Partition {
    collector: Arc<Collector>,
    /// To open its consumer again.
    source: Source,
    partition: u32,
    /// The consumer sequence of the next delivery: JetStream numbers every delivery of a
    /// consumer (again ones too) one after the other, so one beyond it means deliveries that
    /// never arrived (a fetch's reply lost while the cluster changed leaders or a server was
    /// cut off). They would come again only after `ack_wait`, behind the parts after them,
    /// duplicates below the watermark by then: lost.
    next: u64,
    /// Its place among the aggregator's consumers (parts are queued in step by batch time).
    member: Member,
    /// The applying session of each agent (and epoch) seen in this partition.
    sessions: HashMap<(String, u64), Session>,
    /// Where it is marked caught up ([`Holdings`]).
    holdings: Holdings,
    /// Until it has caught up: when it started and how many parts it has applied since.
    replay: Option<(Instant, u64)>,
    /// The mean size of the parts of its last fetch that had some (before the first: the
    /// stream's, [`mean_part_bytes`], as its aggregator read it).
    part_bytes: usize,
}

/// What became of one part.
enum Done {
    /// Applied (or applied before): acknowledge it.
    Applied,
    /// Breaks the protocol: acknowledge it (it would never apply), counted and logged.
    Invalid(String),
    /// Not applied now (the store failed, the collector is stopping): left unacknowledged,
    /// and the consumer is opened again from its first part not acknowledged, so that it
    /// comes again before the parts after it. (Acknowledged as not taken, it would come again
    /// only after a delay, behind later parts of the same agent; applied first, they would
    /// make it a duplicate below the watermark: lost.)
    Later(String),
    /// Not begun: a part before it in the fetch came back [`Done::Later`]. Left
    /// unacknowledged; it comes again with that one.
    Skipped,
}

impl Partition {
    async fn run(
        mut self,
        mut consumer: jetstream::consumer::PullConsumer,
        stop: CancellationToken,
    ) {
        self.holdings.behind(self.partition);
        let info = consumer.cached_info();
        self.next = info.delivered.consumer_sequence + 1;
        if drained(info) {
            self.caught_up();
        }
        while !stop.is_cancelled() {
            let batch = tokio::select! {
                () = stop.cancelled() => break,
                b = consumer.fetch().max_messages(self.fetch_size()).expires(FETCH_WAIT).messages() => b,
            };
            let messages = match batch {
                Ok(m) => m,
                Err(e) => {
                    // Whether parts wait is not known: it holds the others (see below).
                    warn!("partition {}: fetching parts: {e}", self.partition);
                    self.member.hold();
                    tokio::time::sleep(FETCH_WAIT).await;
                    continue;
                }
            };
            // Every part of the fetch begun (queued to the writer) before any is awaited, so
            // that they share group commits; answered and acknowledged in order. A part of a
            // later judgement period waits until the other consumers have queued theirs of the
            // earlier ones. Before it waits, the parts begun are finished and acknowledged:
            // a begun part holds room in the writer's queue, which the consumer it waits for
            // may need to go on. (Consumers finish their fetches even when stopped, up to the
            // latest period granted, and the one furthest behind never waits, so none waits
            // for ever.)
            //
            // The whole fetch is read before any part is begun: the client ends a fetch 5 s
            // after it expires and drops what the server delivered and nobody read. Those
            // parts come again only after ack_wait (a minute), unless a later delivery shows
            // the gap first (see `next`). Beginning the parts of a fetch can take that long:
            // each waits for room in the writer's queue, which every consumer fills while the
            // writer commits (measured: one aggregator replaying 12 partitions of 720 parts
            // each stalled a minute on such gaps, 70 s instead of 10 s), or for the other
            // consumers at a period's end. Parts read hold no more memory than unread ones:
            // the server has sent them to this client either way.
            let mut fetch: VecDeque<_> = messages.collect().await;
            self.measure(&fetch);
            let mut begun = Vec::new();
            let mut fetched = false;
            let mut failed = false;
            let mut gap = None;
            // A part came back Later: none after it is begun.
            let mut later = false;
            // The aggregator is stopping its consumers, and a part is beyond the period they
            // may go to (see `align`): neither it nor any after it is begun or acknowledged;
            // they come again when the consumer starts again from its first part not
            // acknowledged.
            let mut left = false;
            loop {
                let Some(m) = fetch.pop_front() else { break };
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        // async-nats ends a fetch at its first error status (async-nats 0.51,
                        // `Batch::poll_next`): nothing delivered after it is left unread.
                        debug!("partition {}: {e}", self.partition);
                        failed = true;
                        break;
                    }
                };
                let seq = m.info().map_or(0, |i| i.consumer_sequence);
                if seq > self.next {
                    // Neither this part nor any after it is applied before the missing ones.
                    gap = Some((self.next, seq));
                    break;
                }
                self.next = self.next.max(seq + 1);
                fetched = true;
                let decoded = if later || left {
                    Err(Done::Skipped)
                } else {
                    self.decode(m.payload.clone())
                };
                if let Ok(part) = &decoded
                    && !self.member.try_enter(part.time_ms())
                {
                    later |= self.finish(std::mem::take(&mut begun)).await;
                    if !later && !self.member.enter(part.time_ms()).await {
                        left = true;
                    }
                }
                let pending = match decoded {
                    Ok(_) if later || left => Err(Done::Skipped),
                    Ok(part) => self.begin(part).await,
                    Err(d) => Err(d),
                };
                later |= matches!(pending, Err(Done::Later(_)));
                begun.push((m, pending));
            }
            if !fetched {
                if !failed && nothing_pending(&consumer).await {
                    // Nothing waiting: the other consumers need not wait for this one.
                    self.member.idle();
                    self.caught_up();
                } else {
                    // A fetch that found nothing is not enough to say nothing waits: one
                    // nobody answered (its consumer's leader gone, the connection failing
                    // over) ends the same way. The others going on without this partition's
                    // parts would judge its keys without them: an alert resolved, and raised
                    // again later.
                    self.member.hold();
                }
            }
            later |= self.finish(begun).await;
            if left {
                // Not fetched from again: what it would deliver next is after the parts left.
                break;
            }
            if let Some((want, got)) = gap {
                self.collector.metrics().cluster_delivery_gaps.inc();
                warn!(
                    "partition {}: deliveries {want} to {} of its consumer never arrived: reading again from its first part not acknowledged",
                    self.partition,
                    got - 1
                );
            }
            if gap.is_some() || later {
                self.member.hold();
                if later {
                    // The writer refuses the later batches of a stream whose batch failed
                    // until its agent says Hello again: each agent's stream starts afresh.
                    self.sessions.clear();
                    // Not at once: the store that failed may need a moment.
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(FETCH_WAIT) => {}
                    }
                }
                match self.reopen(&stop).await {
                    Some(c) => consumer = c,
                    None => break,
                }
                continue;
            }
            if failed && !fetched {
                // The consumer is unavailable for now (its leader lost, no responders): not
                // asked again at once.
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(FETCH_WAIT) => {}
                }
            }
        }
        self.holdings.behind(self.partition);
        debug!("partition {}: stopped", self.partition);
    }

    /// Parts to ask the next fetch for: about this consumer's share of [`FETCH_BYTES`], 1 to
    /// [`FETCH`].
    fn fetch_size(&self) -> usize {
        let share = FETCH_BYTES / self.holdings.count().max(1);
        (share / self.part_bytes.max(1)).clamp(1, FETCH)
    }

    /// Keeps the mean size of the parts of `fetch`, if it has any.
    fn measure<E>(&mut self, fetch: &VecDeque<Result<jetstream::Message, E>>) {
        let (parts, bytes) = fetch
            .iter()
            .filter_map(|m| m.as_ref().ok())
            .fold((0, 0), |(n, b), m| (n + 1, b + m.payload.len()));
        if let Some(mean) = bytes.checked_div(parts) {
            self.part_bytes = mean.max(1);
        }
    }

    /// Every part the stream had for the partition is applied: marked caught up (once).
    fn caught_up(&mut self) {
        let Some((since, parts)) = self.replay.take() else {
            return;
        };
        self.holdings.caught_up(self.partition);
        let msg = format!(
            "partition {}: caught up with the stream ({parts} parts applied in {:.1} s; {} bytes a part in the last fetch)",
            self.partition,
            since.elapsed().as_secs_f64(),
            self.part_bytes
        );
        if parts > 0 {
            info!("{msg}")
        } else {
            debug!("{msg}")
        }
    }

    /// Opens the consumer again from its first part not acknowledged (see [`open`]), trying
    /// until it opens or `stop`.
    async fn reopen(
        &mut self,
        stop: &CancellationToken,
    ) -> Option<jetstream::consumer::PullConsumer> {
        loop {
            match open(&self.source, self.partition, false).await {
                Ok(c) => {
                    self.next = c.cached_info().delivered.consumer_sequence + 1;
                    return Some(c);
                }
                Err(e) => warn!("partition {}: {e}", self.partition),
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(FETCH_WAIT) => {}
            }
        }
    }

    /// Waits for the parts begun to be answered and acknowledges each to JetStream, in order;
    /// true if one was not applied now and comes again ([`Done::Later`]). A part delivered
    /// with none after it, done with every part before it, makes the partition caught up
    /// (before it is acknowledged: whoever sees the consumer drained sees it caught up).
    async fn finish(
        &mut self,
        begun: Vec<(jetstream::Message, Result<crate::collector::Pending, Done>)>,
    ) -> bool {
        let mut later = false;
        for (m, pending) in begun {
            let done = match pending {
                Ok(p) => match p.finish().await {
                    Ok(_) => Done::Applied,
                    Err(e) => Self::classify(e),
                },
                Err(d) => d,
            };
            let metrics = self.collector.metrics();
            let ack = match done {
                Done::Applied => {
                    metrics.cluster_applied_parts.inc();
                    AckKind::Ack
                }
                Done::Invalid(why) => {
                    metrics.cluster_invalid_parts.inc();
                    warn!(
                        "partition {}: part at stream sequence {} dropped: {why}",
                        self.partition,
                        m.info().map_or(0, |i| i.stream_sequence)
                    );
                    AckKind::Term
                }
                Done::Later(why) => {
                    error!(
                        "partition {}: part at stream sequence {} not applied, taken again with the parts after it: {why}",
                        self.partition,
                        m.info().map_or(0, |i| i.stream_sequence)
                    );
                    later = true;
                    continue;
                }
                Done::Skipped => continue,
            };
            if let Some((_, parts)) = &mut self.replay {
                *parts += 1;
                if !later && m.info().is_ok_and(|i| i.pending == 0) {
                    self.caught_up();
                }
            }
            if let Err(e) = m.ack_with(ack).await {
                // Unacknowledged, it comes again after ack_wait: a duplicate then.
                warn!("partition {}: acknowledging a part: {e}", self.partition);
            }
        }
        later
    }

    fn classify(e: ApiError) -> Done {
        match e {
            ApiError::Invalid(_) | ApiError::Malformed(_) | ApiError::OutOfOrder(_) => {
                Done::Invalid(e.to_string())
            }
            _ => Done::Later(e.to_string()),
        }
    }

    /// Decodes and checks a part.
    fn decode(&self, payload: Bytes) -> Result<Part, Done> {
        let part = decode_part_batch(payload, MAX_DELTAS_PER_BATCH).map_err(Self::classify)?;
        if part.partition != self.partition {
            return Err(Done::Invalid(format!(
                "part of partition {} on the subject of partition {}",
                part.partition, self.partition
            )));
        }
        let Some(batch) = part.batch else {
            return Err(Done::Invalid("no batch".into()));
        };
        Ok(Part {
            agent_id: part.agent_id,
            epoch: part.epoch,
            hostname: part.hostname,
            batch,
        })
    }

    /// Queues a part for the writer (its agent's session opened first).
    async fn begin(&mut self, part: Part) -> Result<crate::collector::Pending, Done> {
        let key = (part.agent_id, part.epoch);
        if !self.sessions.contains_key(&key) {
            let mut s = self.collector.part_session();
            s.handle(AgentMessage {
                msg: Some(Msg::Hello(v1::Hello {
                    agent_id: partition_agent(&key.0, self.partition),
                    epoch: part.epoch,
                    hostname: part.hostname,
                    ..Default::default()
                })),
            })
            .await
            .map_err(Self::classify)?;
            self.sessions.insert(key.clone(), s);
        }
        let s = self
            .sessions
            .get_mut(&key)
            .ok_or_else(|| Done::Later("no session".into()))?;
        s.begin(AgentMessage {
            msg: Some(Msg::Batch(part.batch)),
        })
        .await
        .map_err(Self::classify)
    }
}

/// Whether JetStream says `consumer` has no parts waiting (none not yet delivered, none
/// delivered and not acknowledged); not when it cannot be asked.
async fn nothing_pending(consumer: &jetstream::consumer::PullConsumer) -> bool {
    match consumer.get_info().await {
        Ok(info) => drained(&info),
        Err(e) => {
            debug!("consumer {}: {e}", consumer.cached_info().name);
            false
        }
    }
}

/// Whether `info` says the consumer has no parts waiting: none not yet delivered, none
/// delivered and not acknowledged.
fn drained(info: &jetstream::consumer::Info) -> bool {
    info.num_pending == 0 && info.num_ack_pending == 0
}

/// A decoded part: the batch of one agent's that falls in this partition.
struct Part {
    agent_id: String,
    epoch: u64,
    hostname: String,
    batch: v1::Batch,
}

impl Part {
    /// The batch time it is judged at (as the writer takes it: the batch's end).
    fn time_ms(&self) -> u64 {
        self.batch.end_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_stay_valid() {
        assert_eq!(partition_agent("gpu-0", 7), "gpu-0#7");
        let long = "x".repeat(MAX_AGENT_ID_CHARS);
        let id = partition_agent(&long, 4095);
        assert!(
            id.len() <= MAX_AGENT_ID_CHARS && id.ends_with("#4095"),
            "{id}"
        );
        assert_ne!(id, partition_agent(&"y".repeat(MAX_AGENT_ID_CHARS), 4095));
    }
}
