//! The cluster's second stage: cohorts judged over every partition.
//!
//! A cohort's members are unrelated clients, so they are in every partition. Each aggregator
//! leaves cohorts out of its own judgements and, at each one, publishes for every partition it
//! holds what it saw of that partition's clients ([`spawn_publisher`]): an
//! `outflow.v1.CohortSummary` to the stream `<stream>-cohorts`, subject
//! `<prefix>.cohorts.<partition>`, message id `<partition>.<at_ms>`, and its judgements wait
//! while JetStream has not acknowledged them. The aggregator that holds partition 0 also
//! runs the stage ([`spawn_stage`]): it reads the summaries from the stream's first one, in
//! order, and judges cohorts with `detect::fleet_cohorts` at each judgement time once every
//! partition got there. Its alerts go to that aggregator's alerts (listed, watched, sent to
//! its webhook with the delivery records) and are not stored: the stage starts over from the
//! stream with partition 0's consumer (a rebuild, partition 0 taken over), raising the same
//! alerts under the same ids, and the delivery records keep the webhook from sending them
//! again.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull::OrderedConfig},
    stream::Stream,
};
use futures_util::StreamExt;
use log::{debug, info, warn};
use outflow_proto::{limits::MAX_CLIENT_ID_LEN, v1};
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    holdings::Holdings,
    partition::Partitions,
    publish::{
        Outgoing, PublishConfig, PublishError, get_or_create_stream, publish_round, stream_config,
    },
};
use crate::{
    aggregate::State,
    alerts::AlertHub,
    collector::SightingsRx,
    detect::{
        CohortKey, DetectConfig, Sighting, Subject,
        fleet_cohorts::{Added, FleetCohorts},
    },
    metrics::Metrics,
};

/// How long a summary's publish waits for JetStream's acknowledgement before it is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The stream of cohort summaries beside the parts' stream `cfg.stream`: created with the same
/// replicas, retention and duplicate window if missing.
pub async fn open_stream(
    js: &jetstream::Context,
    cfg: &PublishConfig,
) -> Result<Stream, PublishError> {
    let name = format!("{}-cohorts", cfg.stream);
    let subjects = format!("{}.cohorts.*", cfg.subject_prefix);
    get_or_create_stream(js, stream_config(cfg, name, subjects)).await
}

/// A summary that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSummary {
    #[error("not an outflow.v1.CohortSummary: {0}")]
    Decode(String),
    #[error("partition {partition} of {partitions}, this cluster has {ours}")]
    Partition {
        partition: u32,
        partitions: u32,
        ours: u32,
    },
    #[error("a sighting with neither a client address (4 or 16 bytes) nor a client id")]
    NoClient,
    #[error("a client id of {0} bytes (at most {MAX_CLIENT_ID_LEN})")]
    LongClientId(usize),
    #[error("a cohort bin out of range")]
    Bin,
}

/// The wire form of what `partition` saw at `at_ms`.
pub fn encode(partition: u32, partitions: u32, at_ms: u64, seen: &[Sighting]) -> v1::CohortSummary {
    let sightings = seen
        .iter()
        .filter_map(|s| {
            let mut w = v1::CohortSighting {
                h1_response_bytes: s.h1,
                ..Default::default()
            };
            match &s.member {
                Subject::Client(IpAddr::V4(a)) => w.client_addr = a.octets().to_vec(),
                Subject::Client(IpAddr::V6(a)) => w.client_addr = a.octets().to_vec(),
                Subject::ClientId(id) => w.client_id = id.to_string(),
                _ => return None,
            }
            if let Some(k) = s.key {
                w.in_cohort = true;
                w.ids = k.ids;
                w.rate = i32::from(k.rate);
                w.size = i32::from(k.size);
                w.req = i32::from(k.req);
            }
            Some(w)
        })
        .collect();
    v1::CohortSummary {
        partition,
        partitions,
        at_ms,
        sightings,
    }
}

/// [`encode`], as the bytes published.
pub fn encode_to_bytes(partition: u32, partitions: u32, at_ms: u64, seen: &[Sighting]) -> Vec<u8> {
    encode(partition, partitions, at_ms, seen).encode_to_vec()
}

/// A summary's partition, time and sightings, checked against a cluster of `partitions`.
pub fn decode(bytes: &[u8], partitions: u32) -> Result<(u32, u64, Vec<Sighting>), BadSummary> {
    let s = v1::CohortSummary::decode(bytes).map_err(|e| BadSummary::Decode(e.to_string()))?;
    if s.partitions != partitions || s.partition >= partitions {
        return Err(BadSummary::Partition {
            partition: s.partition,
            partitions: s.partitions,
            ours: partitions,
        });
    }
    let seen = s
        .sightings
        .into_iter()
        .map(|w| {
            let member = match (w.client_addr.len(), w.client_id.is_empty()) {
                (4, true) => {
                    let a: [u8; 4] = w.client_addr[..]
                        .try_into()
                        .map_err(|_| BadSummary::NoClient)?;
                    Subject::Client(IpAddr::from(a))
                }
                (16, true) => {
                    let a: [u8; 16] = w.client_addr[..]
                        .try_into()
                        .map_err(|_| BadSummary::NoClient)?;
                    Subject::Client(IpAddr::from(a))
                }
                (0, false) if w.client_id.len() > MAX_CLIENT_ID_LEN => {
                    return Err(BadSummary::LongClientId(w.client_id.len()));
                }
                (0, false) => Subject::ClientId(w.client_id.into()),
                _ => return Err(BadSummary::NoClient),
            };
            let bin = |v: i32| i16::try_from(v).map_err(|_| BadSummary::Bin);
            let key = if w.in_cohort {
                Some(CohortKey {
                    ids: w.ids,
                    rate: bin(w.rate)?,
                    size: bin(w.size)?,
                    req: bin(w.req)?,
                })
            } else {
                None
            };
            Ok(Sighting {
                member,
                key,
                h1: w.h1_response_bytes,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((s.partition, s.at_ms, seen))
}

/// The partition a member's bytes go to (see [`Partitions::of_delta`]).
fn partition_of(parts: Partitions, member: &Subject) -> Option<u32> {
    match member {
        Subject::Client(a) => Some(parts.of_addr(*a)),
        Subject::ClientId(id) => Some(parts.of_name(id)),
        _ => None,
    }
}

/// Publishes what the aggregator's detection thread saw at each judgement (`rx`): one summary
/// per partition it holds (`held`), until `stop`. A client of a partition it does not hold
/// (an address seen here only through a client id of another partition) is left to that
/// partition's holder.
pub fn spawn_publisher(
    js: jetstream::Context,
    prefix: String,
    parts: Partitions,
    mut rx: SightingsRx,
    held: Holdings,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                () = stop.cancelled() => break,
                s = rx.recv() => match s {
                    Some(s) => s,
                    None => break,
                },
            };
            let held = held.held();
            let mut by: BTreeMap<u32, Vec<Sighting>> =
                held.iter().map(|p| (*p, Vec::new())).collect();
            for x in s.seen {
                if let Some(v) = partition_of(parts, &x.member).and_then(|p| by.get_mut(&p)) {
                    v.push(x);
                }
            }
            let todo: Vec<Outgoing> = by
                .into_iter()
                .map(|(p, seen)| Outgoing {
                    subject: format!("{prefix}.cohorts.{p}"),
                    id: format!("{p}.{}", s.at_ms),
                    body: encode_to_bytes(p, parts.count(), s.at_ms, &seen).into(),
                })
                .collect();
            if !publish_all(&js, todo, &metrics, &stop).await {
                break;
            }
        }
        debug!("cohort summaries: publisher stopped");
    })
}

/// Publishes every message again until each is acknowledged; false if `stop` came first.
async fn publish_all(
    js: &jetstream::Context,
    mut todo: Vec<Outgoing>,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> bool {
    let mut warned = false;
    loop {
        let round = publish_round(js, todo, ACK_TIMEOUT).await;
        metrics.cluster_cohort_summaries.inc_by(round.acked as u64);
        if round.left.is_empty() {
            if warned {
                info!("cohort summaries: published again");
            }
            return true;
        }
        metrics
            .cluster_cohort_summaries_retried
            .inc_by(round.left.len() as u64);
        if !warned {
            warn!(
                "cohort summaries: {} not acknowledged ({}); sending them again (this aggregator's judgements wait)",
                round.left.len(),
                round.last_error
            );
            warned = true;
        }
        todo = round.left;
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Runs the second stage on `stream` (the summaries of a cluster of `partitions`) from its
/// first summary, judging with `cfg` into `alerts`, until `stop`.
pub fn spawn_stage(
    stream: Stream,
    prefix: String,
    partitions: u32,
    cfg: DetectConfig,
    alerts: Arc<AlertHub>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let resolve_after = u64::try_from(cfg.resolve_after.as_millis()).unwrap_or(u64::MAX);
        let mut stage = FleetCohorts::new(cfg, partitions);
        // No workload is judged here: nothing to name from a store.
        let st = State::default();
        let mut next_seq = 1;
        info!("second stage: judging cohorts over the {partitions} partitions");
        'consumers: while !stop.is_cancelled() {
            let consumer = stream
                .create_consumer(OrderedConfig {
                    filter_subject: format!("{prefix}.cohorts.*"),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: next_seq,
                    },
                    ..Default::default()
                })
                .await;
            let messages = match consumer {
                Ok(c) => c.messages().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    debug!("second stage: reading the summaries: {e}; trying again");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let m = tokio::select! {
                    () = stop.cancelled() => break 'consumers,
                    m = messages.next() => m,
                };
                let m = match m {
                    None => continue 'consumers,
                    Some(Err(e)) => {
                        debug!("second stage: {e}");
                        continue;
                    }
                    Some(Ok(m)) => m,
                };
                if let Ok(info) = m.info() {
                    next_seq = info.stream_sequence + 1;
                }
                match decode(&m.payload, partitions) {
                    Ok((p, at_ms, seen)) => {
                        if stage.add(p, at_ms, seen) == Added::Taken {
                            judge(&mut stage, &alerts, resolve_after, &st, &metrics);
                        }
                    }
                    Err(e) => {
                        metrics.cluster_invalid_summaries.inc();
                        warn!("second stage: a summary on {} dropped: {e}", m.subject);
                    }
                }
                metrics
                    .cluster_second_stage_waiting
                    .set(i64::try_from(stage.waiting()).unwrap_or(i64::MAX));
            }
        }
        debug!("second stage: stopped");
    })
}

/// Every judgement `stage` is ready for, into `alerts`.
fn judge(
    stage: &mut FleetCohorts,
    alerts: &AlertHub,
    resolve_after: u64,
    st: &State,
    metrics: &Metrics,
) {
    while let Some((at_ms, verdicts)) = stage.judge_next(&alerts.open_subjects()) {
        let changes = alerts.apply(verdicts, at_ms, resolve_after, st);
        if !changes.is_empty() {
            alerts.publish(&changes, metrics);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_reads_back_and_bad_ones_are_refused() {
        let key = CohortKey {
            ids: false,
            rate: -3,
            size: i16::MIN,
            req: 0,
        };
        let seen = vec![
            Sighting {
                member: Subject::Client("203.0.113.7".parse().unwrap()),
                key: Some(key),
                h1: 7,
            },
            Sighting {
                member: Subject::Client("2001:db8::7".parse().unwrap()),
                key: None,
                h1: 0,
            },
            Sighting {
                member: Subject::ClientId("h:0123".into()),
                key: Some(CohortKey { ids: true, ..key }),
                h1: u64::MAX,
            },
        ];
        let bytes = encode(3, 8, 60_000, &seen).encode_to_vec();
        assert_eq!(decode(&bytes, 8), Ok((3, 60_000, seen.clone())));
        assert!(matches!(
            decode(&bytes, 4),
            Err(BadSummary::Partition { partition: 3, .. })
        ));
        assert!(matches!(decode(b"\xff\xff", 8), Err(BadSummary::Decode(_))));
        let mut w = encode(3, 8, 60_000, &seen);
        w.sightings[0].client_addr = vec![1, 2, 3];
        assert_eq!(decode(&w.encode_to_vec(), 8), Err(BadSummary::NoClient));
        let mut w = encode(3, 8, 60_000, &seen);
        w.sightings[2].client_id = "x".repeat(MAX_CLIENT_ID_LEN + 1);
        assert!(matches!(
            decode(&w.encode_to_vec(), 8),
            Err(BadSummary::LongClientId(_))
        ));
        let mut w = encode(3, 8, 60_000, &seen);
        w.sightings[0].rate = 1 << 20;
        assert_eq!(decode(&w.encode_to_vec(), 8), Err(BadSummary::Bin));
        // The fuzz target's seed is a valid summary.
        let seed = include_bytes!("../../fuzz/seeds/summary/summary.bin");
        let (p, at_ms, s) = decode(seed, 8).unwrap();
        assert_eq!((p, at_ms, s.len()), (3, 1_750_000_060_000, 3));
        assert_eq!(
            s[2].member,
            Subject::ClientId("h:0123456789abcdef01234567".into())
        );
        let mut w = encode(3, 8, 60_000, &seen);
        w.sightings[0].client_id = "both".into();
        assert_eq!(decode(&w.encode_to_vec(), 8), Err(BadSummary::NoClient));
    }
}
