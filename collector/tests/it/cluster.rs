//! Cluster mode's ingest side against a real three-node NATS JetStream cluster (nats-server from
//! the tools venv): batches split into their partitions' parts and published to an R=3 stream
//! are stored once each, through the stream leader SIGKILLed (publishes unanswered until a new
//! leader is elected are published again with their ids) and an agent's resend, and the stream holds every
//! client's bytes exactly, each in the partition of its client.
use std::{collections::BTreeMap, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use outflow_collector::{
    cluster::{
        partition::{Partitions, message_id},
        publish::{PublishConfig, Publisher},
    },
    model::{AgentKey, Batch},
};
use outflow_proto::v1;
use outflow_testbed::nats::NatsCluster;
use prost::Message as _;
use tokio_stream::StreamExt as _;

use crate::common::*;

const STREAM: &str = "OUTFLOW_PARTS";

/// Batch `seq` of agent `a`: 30 clients over 6 /24s, every third with a client id.
fn wire_batch(a: u8, seq: u64) -> v1::Batch {
    let deltas = (0..30u8)
        .map(|c| {
            let mut d = delta(
                [198, 51, c % 6, 10 + c],
                1000 * u64::from(c + 1) + seq,
                10,
                c % 4 == 0,
            );
            d.conn_id = u64::from(a) << 32 | seq << 8 | u64::from(c);
            if c % 3 == 0 {
                d.client_id = format!("h:{:024x}", u64::from(c % 2));
            }
            d
        })
        .collect();
    batch(seq, 1_750_000_000_000 + seq * 1000, deltas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_are_stored_once_each_through_a_killed_nats_node_and_a_republish() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(3, dir.path());
    let cfg = PublishConfig {
        urls: nats.urls(),
        stream: STREAM.into(),
        subject_prefix: "outflow.parts".into(),
        replicas: 3,
        duplicate_window: Duration::from_secs(120),
        max_age: Duration::from_secs(3600),
    };
    let publisher = Publisher::connect(&cfg)
        .await
        .expect("connect and make the stream");
    let partitions = Partitions::new(16).unwrap();
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let mut killed = None;
    // Truth: response bytes per (client id or address), and the parts published.
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    let mut ids = Vec::new();
    let (mut dups, mut retries) = (0, 0);
    for seq in 1..=60u64 {
        // The node that leads the stream (takes its publishes) dies; it comes back later.
        if seq == 20 {
            let mut st = watch.get_stream(STREAM).await.unwrap();
            let info = st.info().await.unwrap();
            let leader = info
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
                .expect("a stream leader");
            let i: usize = leader.trim_start_matches('n').parse().unwrap();
            nats.kill(i);
            killed = Some(i);
        }
        if seq == 40 {
            nats.restart(killed.unwrap());
        }
        for a in 0..2u8 {
            let agent = AgentKey {
                agent_id: format!("agent-{a}").into(),
                epoch: 1,
            };
            let b = Batch::try_from(wire_batch(a, seq)).unwrap();
            for d in &b.deltas {
                let who = d.client_id.clone().unwrap_or_else(|| d.client.to_string());
                *truth.entry(who).or_default() += d.counters.bytes_out;
            }
            let parts = partitions.split(&agent, &format!("gpu-{a}"), &b);
            let p = publisher
                .publish(&parts, Duration::from_secs(2), Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("batch {seq} of agent {a}: {e}"));
            assert_eq!(p.parts, parts.len());
            dups += p.duplicates;
            retries += p.retries;
            ids.extend(parts.iter().map(message_id));
            // An agent's resend (its Ack lost): every part a duplicate.
            if seq == 10 || seq == 30 {
                let again = publisher
                    .publish(&parts, Duration::from_secs(2), Duration::from_secs(60))
                    .await
                    .unwrap();
                assert_eq!(again.duplicates, parts.len(), "{again:?}");
            }
        }
    }
    eprintln!(
        "published {} parts, {dups} duplicates acknowledged first time, {retries} retries",
        ids.len()
    );

    // Read the whole stream back.
    let mut stream = watch.get_stream(STREAM).await.unwrap();
    let held = stream.info().await.unwrap().state.messages;
    assert_eq!(held, ids.len() as u64, "the stream holds each part once");
    let consumer = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = Vec::new();
    let mut msgs = consumer
        .fetch()
        .max_messages(ids.len())
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .unwrap();
    while let Some(m) = msgs.next().await {
        let m = m.unwrap();
        let part = v1::PartBatch::decode(&*m.payload).expect("a PartBatch");
        assert_eq!(
            m.subject.as_str(),
            format!("outflow.parts.{}", part.partition)
        );
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned());
        assert_eq!(id.as_deref(), Some(message_id(&part).as_str()));
        seen.push(message_id(&part));
        let host = partitions.of_host(&part.hostname);
        let b = Batch::try_from(part.batch.unwrap()).unwrap();
        for d in &b.deltas {
            assert_eq!(partitions.of_delta(d, host), part.partition, "{d:?}");
            let who = d.client_id.clone().unwrap_or_else(|| d.client.to_string());
            *got.entry(who).or_default() += d.counters.bytes_out;
        }
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every part, once");
    assert_eq!(got, truth, "every client's bytes, exactly");
}
