//! Cluster mode's ingest side against a real three-node NATS JetStream cluster (nats-server from
//! the tools venv): batches split into their partitions' parts and published to an R=3 stream
//! are stored once each, through the stream leader SIGKILLed (publishes unanswered until a new
//! leader is elected are published again with their ids) and an agent's resend, and the stream holds every
//! client's bytes exactly, each in the partition of its client.
use std::{collections::BTreeMap, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use outflow_collector::{
    cluster::{
        config::NodeRole,
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
            killed = Some(kill_leader(&mut nats, &watch).await);
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
                *truth.entry(who(d)).or_default() += d.counters.bytes_out;
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

    let (seen, got) = read_parts(&watch, &partitions, ids.len()).await;
    ids.sort();
    assert_eq!(seen, ids, "every part, once");
    assert_eq!(got, truth, "every client's bytes, exactly");
}

/// Every part the stream holds (it must hold `n`), read back: their message ids (sorted) and
/// the response bytes per client id or address. Checks each part is on its partition's subject
/// under its message id, and each delta in the partition of its client.
async fn read_parts(
    js: &jetstream::Context,
    partitions: &Partitions,
    n: usize,
) -> (Vec<String>, BTreeMap<String, u64>) {
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let held = stream.info().await.unwrap().state.messages;
    assert_eq!(held, n as u64, "the stream holds each part once");
    let consumer = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = Vec::new();
    let mut msgs = consumer
        .fetch()
        .max_messages(n)
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
            *got.entry(who(d)).or_default() += d.counters.bytes_out;
        }
    }
    seen.sort();
    (seen, got)
}

/// Whom a delta's bytes are counted for here: its client id, else its client address.
fn who(d: &outflow_collector::model::Delta) -> String {
    d.client_id.clone().unwrap_or_else(|| d.client.to_string())
}

/// Kills the node leading the stream; returns its index.
async fn kill_leader(nats: &mut NatsCluster, js: &jetstream::Context) -> usize {
    let mut st = js.get_stream(STREAM).await.unwrap();
    let info = st.info().await.unwrap();
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a stream leader");
    let i: usize = leader.trim_start_matches('n').parse().unwrap();
    nats.kill(i);
    i
}

/// A real ingest node (`[cluster] role = "ingest"`) with two agents over gRPC: every batch is
/// acknowledged once JetStream holds each of its parts, through the stream leader SIGKILLed;
/// batches an agent sends again are acknowledged and stored no second time; the node answers
/// no queries; with no NATS node left a batch is refused with UNAVAILABLE, not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_node_acknowledges_a_batch_once_jetstream_holds_every_part() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(3, &dir.path().join("nats"));
    let mut cfg = replay_config(&dir.path().join("data"));
    cfg.cluster.role = NodeRole::Ingest;
    cfg.cluster.nats_urls = nats.urls();
    cfg.cluster.partitions = 8;
    cfg.cluster.ack_timeout = Duration::from_secs(1);
    cfg.cluster.publish_timeout = Duration::from_secs(10);
    let server = start(cfg).await;
    let u = url(&server);
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    let partitions = Partitions::new(8).unwrap();

    let mut agents = Vec::new();
    for a in 0..2u8 {
        let mut s = agent_stream(&u).await;
        assert_eq!(
            welcome_seq(&mut s, &format!("agent-{a}"), 1, &format!("gpu-{a}")).await,
            0
        );
        agents.push(s);
    }
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    let mut killed = None;
    for seq in 1..=40u64 {
        if seq == 15 {
            killed = Some(kill_leader(&mut nats, &watch).await);
        }
        if seq == 30 {
            nats.restart(killed.unwrap());
        }
        for (a, s) in agents.iter_mut().enumerate() {
            let b = wire_batch(a as u8, seq);
            for d in &Batch::try_from(b.clone()).unwrap().deltas {
                *truth.entry(who(d)).or_default() += d.counters.bytes_out;
            }
            let acked = s
                .batch(b)
                .await
                .unwrap_or_else(|e| panic!("batch {seq} of agent {a}: {e}"));
            assert_eq!(acked, seq);
        }
    }
    // Agent 0 reconnects (its last Acks lost) and sends its last five batches again.
    let mut again = agent_stream(&u).await;
    assert_eq!(welcome_seq(&mut again, "agent-0", 1, "gpu-0").await, 0);
    for seq in 36..=40 {
        assert_eq!(again.batch(wire_batch(0, seq)).await.unwrap(), seq);
    }
    let m = metrics(&server).await;
    let parts = metric(&m, "outflow_collector_cluster_published_parts_total");
    let dups = metric(&m, "outflow_collector_cluster_duplicate_parts_total");
    assert!(dups >= 5.0, "{m}");
    assert_eq!(
        metric(&m, "outflow_collector_cluster_publish_failures_total"),
        0.0
    );
    let stored = (parts - dups) as usize;
    let (seen, got) = read_parts(&watch, &partitions, stored).await;
    assert_eq!(seen.len(), stored);
    assert_eq!(got, truth, "every client's bytes, exactly");

    // Nothing to query here.
    let e = client_stats(&u, "198.51.0.10").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");

    // No NATS node left: refused, not acknowledged.
    for i in 0..3 {
        nats.kill(i);
    }
    let e = again.batch(wire_batch(0, 41)).await.unwrap_err();
    assert_eq!(status(e).code(), tonic::Code::Unavailable);
    drop((agents, again));
    server.shutdown().await.unwrap();
}

/// Waits until every durable consumer of the stream has delivered and had acknowledged every
/// part (the aggregators applied all of it).
async fn wait_drained(js: &jetstream::Context, partitions: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut stream = js.get_stream(STREAM).await.unwrap();
    'wait: loop {
        let mut left = Vec::new();
        for p in 0..partitions {
            let name = format!("outflow-p{p}");
            let c: Result<jetstream::consumer::PullConsumer, _> = stream.get_consumer(&name).await;
            match c {
                Ok(mut c) => {
                    let i = c.info().await.unwrap();
                    if i.num_pending > 0 || i.num_ack_pending > 0 {
                        left.push((name, i.num_pending, i.num_ack_pending));
                    }
                }
                Err(e) => left.push((format!("{name}: {e}"), 0, 0)),
            }
        }
        if left.is_empty() {
            break 'wait;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "parts still not applied after 60 s: {left:?}"
        );
        let _ = stream.info().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes per key of `group` summed over the aggregators (24 h window).
async fn fleet_top(urls: &[String], group: v1::GroupBy) -> BTreeMap<String, u64> {
    let mut sum = BTreeMap::new();
    for u in urls {
        for t in top(u, group, v1::Window::Window24h, 1000).await.talkers {
            *sum.entry(t.key).or_default() += t.response_bytes;
        }
    }
    sum
}

/// An aggregator's config: owns every 2nd partition from `index`.
fn aggregator_config(
    dir: &std::path::Path,
    nats: &NatsCluster,
    index: u32,
) -> outflow_collector::Config {
    let mut cfg = replay_config(dir);
    cfg.cluster.role = NodeRole::Aggregator;
    cfg.cluster.nats_urls = nats.urls();
    cfg.cluster.partitions = 8;
    cfg.cluster.aggregators = 2;
    cfg.cluster.aggregator_index = index;
    cfg
}

/// Agents through an ingest node, two aggregators sharing the 8 partitions (one restarted
/// mid-run on its store): once the stream is drained, the aggregators' totals per client
/// address, client id and host, summed, equal what the agents sent, to the byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_aggregators_apply_their_partitions_once_and_together_hold_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let mut icfg = replay_config(&dir.path().join("ingest"));
    icfg.cluster.role = NodeRole::Ingest;
    icfg.cluster.nats_urls = nats.urls();
    icfg.cluster.partitions = 8;
    let ingest = start(icfg).await;
    let a0 = start(aggregator_config(&dir.path().join("a0"), &nats, 0)).await;
    let mut a1 = Some(start(aggregator_config(&dir.path().join("a1"), &nats, 1)).await);
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());

    let u = url(&ingest);
    let mut agents = Vec::new();
    for a in 0..2u8 {
        let mut s = agent_stream(&u).await;
        welcome_seq(&mut s, &format!("agent-{a}"), 1, &format!("gpu-{a}")).await;
        agents.push(s);
    }
    let (mut by_addr, mut by_id, mut by_host) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for seq in 1..=30u64 {
        if seq == 15 {
            // Stopped and started again on its store: its consumers go on where it stopped.
            a1.take().unwrap().shutdown().await.unwrap();
            a1 = Some(start(aggregator_config(&dir.path().join("a1"), &nats, 1)).await);
        }
        for (a, s) in agents.iter_mut().enumerate() {
            let b = wire_batch(a as u8, seq);
            for d in &Batch::try_from(b.clone()).unwrap().deltas {
                let bytes = d.counters.bytes_out;
                *by_addr.entry(d.client.to_string()).or_insert(0u64) += bytes;
                if let Some(id) = &d.client_id {
                    *by_id.entry(id.clone()).or_insert(0u64) += bytes;
                }
                *by_host.entry(format!("gpu-{a}")).or_insert(0u64) += bytes;
            }
            assert_eq!(s.batch(b).await.unwrap(), seq);
        }
    }
    wait_drained(&watch, 8).await;
    let a1 = a1.unwrap();
    let urls = [url(&a0), url(&a1)];
    assert_eq!(fleet_top(&urls, v1::GroupBy::ClientAddress).await, by_addr);
    assert_eq!(fleet_top(&urls, v1::GroupBy::ClientId).await, by_id);
    assert_eq!(fleet_top(&urls, v1::GroupBy::Host).await, by_host);
    // Each holds only its partitions' clients: a client address without an id is in one.
    let of0 = fleet_top(&urls[..1], v1::GroupBy::ClientPrefix).await;
    let of1 = fleet_top(&urls[1..], v1::GroupBy::ClientPrefix).await;
    assert!(!of0.is_empty() && !of1.is_empty(), "{of0:?} {of1:?}");
    drop(agents);
    for s in [ingest, a0, a1] {
        s.shutdown().await.unwrap();
    }
}
