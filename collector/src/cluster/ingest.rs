//! An ingest node's side of an agent stream: its batches' parts published in order.
//!
//! One task per agent stream publishes the parts of its batches one batch after the other, so
//! every part of batch N is stored before any part of batch N+1 is published: an aggregator
//! that keeps a watermark per agent and partition can take any part at or below it as a
//! duplicate. A batch is answered Applied once JetStream acknowledged all its parts, or refused
//! (UNAVAILABLE: its agent sends it again) if that took longer than `publish_timeout`; then
//! every later batch of the stream is refused too, unpublished: published, its parts would
//! raise the aggregators' watermarks above the refused batch's, which its agent sends again on
//! its next stream and which would then be taken for a duplicate (lost).
use std::{sync::Arc, time::Duration};

use log::warn;
use outflow_proto::v1;
use tokio::sync::{mpsc, oneshot};

use super::{
    config::ClusterConfig,
    partition::{Partitions, message_id},
    publish::Publisher,
};
use crate::{
    metrics::Metrics,
    writer::{Outcome, WriteError},
};

/// Batches of one stream queued for its publisher task at most (the stream's Acks are in flight
/// meanwhile; past it the stream waits).
const QUEUE: usize = 64;

type Job = (
    Vec<v1::PartBatch>,
    usize,
    oneshot::Sender<Result<Outcome, WriteError>>,
);

/// What every stream of an ingest node publishes with.
#[derive(Debug, Clone)]
pub struct ClusterIngest {
    publisher: Publisher,
    partitions: Partitions,
    ack_timeout: Duration,
    publish_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl ClusterIngest {
    /// Connects to the JetStream cluster of `cfg` (creating its stream if missing).
    pub async fn connect(
        cfg: &ClusterConfig,
        metrics: Arc<Metrics>,
    ) -> Result<ClusterIngest, super::publish::PublishError> {
        let partitions = Partitions::new(cfg.partitions)?;
        Ok(ClusterIngest {
            publisher: Publisher::connect(&cfg.publish()).await?,
            partitions,
            ack_timeout: cfg.ack_timeout,
            publish_timeout: cfg.publish_timeout,
            metrics,
        })
    }

    pub fn partitions(&self) -> Partitions {
        self.partitions
    }

    /// The publisher of a new agent stream (a task that ends with it).
    pub fn stream(&self) -> StreamPublisher {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let this = self.clone();
        tokio::spawn(async move {
            let mut failed: Option<Arc<super::publish::PublishError>> = None;
            while let Some((parts, deltas, reply)) = rx.recv().await {
                if let Some(e) = &failed {
                    let _ = reply.send(Err(WriteError::Publish(e.clone())));
                    continue;
                }
                let r = this
                    .publisher
                    .publish(&parts, this.ack_timeout, this.publish_timeout)
                    .await;
                let m = &this.metrics;
                let answer = match r {
                    Ok(p) => {
                        m.cluster_published_parts.inc_by(p.parts as u64);
                        m.cluster_duplicate_parts.inc_by(p.duplicates as u64);
                        m.cluster_publish_retries.inc_by(p.retries as u64);
                        m.batches.inc();
                        m.deltas.inc_by(deltas as u64);
                        Ok(Outcome::Applied)
                    }
                    Err(e) => {
                        m.cluster_publish_failures.inc();
                        warn!(
                            "batch {} refused (its agent sends it again): {e}",
                            parts.first().map(message_id).unwrap_or_default()
                        );
                        let e = Arc::new(e);
                        failed = Some(e.clone());
                        Err(WriteError::Publish(e))
                    }
                };
                let _ = reply.send(answer);
            }
        });
        StreamPublisher { tx }
    }
}

/// One agent stream's way to its publisher task.
#[derive(Debug)]
pub struct StreamPublisher {
    tx: mpsc::Sender<Job>,
}

impl StreamPublisher {
    /// Queues a batch's parts (`deltas` deltas in all); the receiver gets the outcome once
    /// every part is acknowledged.
    pub async fn submit(
        &self,
        parts: Vec<v1::PartBatch>,
        deltas: usize,
    ) -> Result<oneshot::Receiver<Result<Outcome, WriteError>>, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((parts, deltas, reply))
            .await
            .map_err(|_| WriteError::Stopped)?;
        Ok(rx)
    }
}
