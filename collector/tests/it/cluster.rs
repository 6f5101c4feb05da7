//! Cluster mode's ingest side against a real three-node NATS JetStream cluster (nats-server from
//! the tools venv): batches split into their partitions' parts and published to an R=3 stream
//! are stored once each, through the stream leader SIGKILLed (publishes unanswered until a new
//! leader is elected are published again with their ids) and an agent's resend, and the stream holds every
//! client's bytes exactly, each in the partition of its client.
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use async_nats::jetstream::{self, consumer::pull};
use outflow_collector::{
    Server,
    cluster::{
        config::NodeRole,
        nats::NatsConnect,
        partition::{Partitions, Placement, message_id},
        publish::{PublishConfig, Publisher},
    },
    model::{AgentKey, Batch, BatchLimits, Share},
};
use outflow_proto::v1;
use outflow_testbed::nats::NatsCluster;
use prost::Message as _;
use tokio_stream::StreamExt as _;

use crate::common::*;

const STREAM: &str = "OUTFLOW_PARTS";

/// Batch `seq` of agent `a`: 30 clients over 6 /24s (each in a /16 of its own, so in partitions
/// of their own), every third with a client id.
fn wire_batch(a: u8, seq: u64) -> v1::Batch {
    let deltas = (0..30u8)
        .map(|c| {
            let mut d = delta(
                [198, 51 + c % 6, c % 6, 10 + c],
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

/// Sends agent 0's batch `seq` ([`wire_batch`]) on `s`, its bytes added per client address to
/// `by_addr`, and checks that it is acknowledged.
async fn send_counted(s: &mut IngestStream, by_addr: &mut BTreeMap<String, u64>, seq: u64) {
    let b = wire_batch(0, seq);
    for d in &Batch::try_from(b.clone()).unwrap().deltas {
        *by_addr.entry(d.client.to_string()).or_insert(0u64) += d.counters.bytes_out;
    }
    assert_eq!(s.batch(b).await.unwrap(), seq);
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_are_stored_once_each_through_a_killed_nats_node_and_a_republish() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(3, dir.path());
    let cfg = PublishConfig {
        nats: NatsConnect {
            urls: nats.urls(),
            ping_interval: Duration::from_secs(10),
            ..NatsConnect::default()
        },
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
                for k in who(d) {
                    *truth.entry(k).or_default() += d.counters.bytes_out;
                }
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
    // Fetched until all are in (a fetch may end early: its consumer's leader moved after a
    // node was killed), for at most a minute.
    // Each stored message once (one delivered again after a lost ack is skipped).
    let mut sequences = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < n && tokio::time::Instant::now() < deadline {
        let mut msgs = consumer
            .fetch()
            .max_messages(n - seen.len())
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        while let Some(m) = msgs.next().await {
            let Ok(m) = m else { break };
            m.ack().await.unwrap();
            if !sequences.insert(m.info().unwrap().stream_sequence) {
                continue;
            }
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
            let limits = BatchLimits {
                parts: true,
                ..BatchLimits::default()
            };
            let b = Batch::from_wire(part.batch.unwrap(), &limits).unwrap();
            for d in &b.deltas {
                let placed = match (partitions.of_delta(d, host), d.share) {
                    (Placement::Whole(p), Share::All)
                    | (Placement::Shared { addr: p, .. }, Share::ClientAddress)
                    | (Placement::Shared { id: p, .. }, Share::Rest) => p,
                    (p, s) => panic!("{s:?} of a delta placed {p:?}: {d:?}"),
                };
                assert_eq!(placed, part.partition, "{d:?}");
                for k in who(d) {
                    *got.entry(k).or_default() += d.counters.bytes_out;
                }
            }
        }
    }
    seen.sort();
    (seen, got)
}

/// Whom a delta's bytes are counted for here: its client address and its client id (a part's
/// delta: its share of them).
fn who(d: &outflow_collector::model::Delta) -> Vec<String> {
    let mut keys = Vec::new();
    if d.share.address() {
        keys.push(format!("address {}", d.client));
    }
    if d.share.rest()
        && let Some(id) = &d.client_id
    {
        keys.push(format!("id {id}"));
    }
    keys
}

/// The node leading the parts' stream (`n0`, `n1`, ...), if it has a leader that answers.
async fn stream_leader(js: &jetstream::Context) -> Option<String> {
    let mut st = js.get_stream(STREAM).await.ok()?;
    let info = st.info().await.ok()?;
    info.cluster.as_ref()?.leader.clone()
}

/// Waits until the parts' stream has a leader again, after NATS nodes were restarted: until
/// then a publish is answered "no stream found for given subject". Panics after `within`.
async fn wait_stream_leader(js: &jetstream::Context, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while stream_leader(js).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream {STREAM} has no leader {within:?} after its NATS nodes came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills the node leading the stream; returns its index.
async fn kill_leader(nats: &mut NatsCluster, js: &jetstream::Context) -> usize {
    let leader = stream_leader(js).await.expect("a stream leader");
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
    let mut cfg = node_config(&dir.path().join("data"), &nats, NodeRole::Ingest);
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
                for k in who(d) {
                    *truth.entry(k).or_default() += d.counters.bytes_out;
                }
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
    // What the partitions held over the aggregators must add up to (an alert rule's operand).
    assert_eq!(
        metric(&m, "outflow_collector_cluster_partitions "),
        8.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "outflow_collector_cluster_publish_failures_total"),
        0.0
    );
    let stored = (parts - dups) as usize;
    let (seen, got) = read_parts(&watch, &partitions, stored).await;
    assert_eq!(seen.len(), stored);
    assert_eq!(got, truth, "every client's bytes, exactly");

    // No aggregator yet: nothing holds the totals, and the node says so.
    let e = client_stats(&u, "198.51.0.10").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no aggregator"), "{e:?}");

    // No NATS node left: refused, not acknowledged.
    for i in 0..3 {
        nats.kill(i);
    }
    let e = again.batch(wire_batch(0, 41)).await.unwrap_err();
    assert_eq!(status(e).code(), tonic::Code::Unavailable);
    drop((agents, again));
    server.shutdown().await.unwrap();
}

/// Every partition's claim: the aggregator holding it. A read that fails (JetStream slow to
/// answer on a loaded machine) is tried again, for 30 s.
async fn claims(js: &jetstream::Context) -> BTreeMap<u32, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match read_claims(js).await {
            Ok(c) => return c,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("reading the claims: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("reading the claims: {e}"),
        }
    }
}

async fn read_claims(js: &jetstream::Context) -> Result<BTreeMap<u32, String>, async_nats::Error> {
    let kv = js.get_key_value(format!("{STREAM}-claims")).await?;
    let mut keys = kv.keys().await?;
    let mut out = BTreeMap::new();
    while let Some(k) = keys.next().await {
        let k = k?;
        if let Some(v) = kv.get(k.as_str()).await? {
            out.insert(
                k.trim_start_matches('p').parse()?,
                String::from_utf8(v.to_vec())?,
            );
        }
    }
    Ok(out)
}

/// Waits until `cond` holds of the claims (60 s at most).
async fn wait_claims(
    js: &jetstream::Context,
    what: &str,
    cond: impl Fn(&BTreeMap<u32, String>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let c = claims(js).await;
        if cond(&c) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not after 60 s; claims {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many partitions each aggregator claims.
fn counts(c: &BTreeMap<u32, String>) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for node in c.values() {
        *n.entry(node.clone()).or_default() += 1;
    }
    n
}

/// True if every one of the `partitions` is claimed and the claiming aggregator's consumer
/// has delivered and had acknowledged every part of it.
async fn drained(js: &jetstream::Context, partitions: u32) -> bool {
    let c = claims(js).await;
    if c.len() != partitions as usize {
        return false;
    }
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let _ = stream.info().await;
    for (p, node) in &c {
        let name = format!("{node}-p{p}");
        let info = match stream.get_consumer::<pull::Config>(&name).await {
            Ok(mut c) => c.info().await.cloned(),
            Err(_) => return false,
        };
        match info {
            Ok(i) if i.num_pending == 0 && i.num_ack_pending == 0 => {}
            _ => return false,
        }
    }
    true
}

/// Waits until [`drained`]; panics saying `what` failed after `within`.
async fn wait_drained(js: &jetstream::Context, partitions: u32, within: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + within;
    while !drained(js, partitions).await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes per key of `group` in the 24 h window, as the node at `url` answers for the whole
/// cluster (an error while partitions move or are held by none).
async fn fleet_top(
    url: &str,
    group: v1::GroupBy,
    token: Option<&str>,
) -> Result<BTreeMap<String, u64>, tonic::Status> {
    let mut req = tonic::Request::new(v1::TopTalkersRequest {
        group_by: group as i32,
        window: v1::Window::Window24h as i32,
        limit: 1000,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let top = query(url).await.top_talkers(req).await?.into_inner();
    Ok(top
        .talkers
        .into_iter()
        .map(|t| (t.key, t.response_bytes))
        .collect())
}

/// The config of a node of `role` on `nats` (8 partitions) with its data in `data`.
fn node_config(
    data: &std::path::Path,
    nats: &NatsCluster,
    role: NodeRole,
) -> outflow_collector::Config {
    let mut cfg = replay_config(data);
    cfg.cluster.role = role;
    cfg.cluster.nats_urls = nats.urls();
    cfg.cluster.partitions = 8;
    cfg
}

/// Aggregator `name`'s config (a lease of 2 s, so that one gone is noticed soon).
fn aggregator_config(
    dir: &std::path::Path,
    nats: &NatsCluster,
    name: &str,
) -> outflow_collector::Config {
    let mut cfg = node_config(&dir.join(name), nats, NodeRole::Aggregator);
    cfg.cluster.node_name = name.into();
    cfg.cluster.lease = Duration::from_secs(2);
    cfg
}

/// `c` with 2 partitions.
fn two(mut c: outflow_collector::Config) -> outflow_collector::Config {
    c.cluster.partitions = 2;
    c
}

/// An ingest node with the default node config, its data under `dir/ingest`.
async fn start_ingest(dir: &std::path::Path, nats: &NatsCluster) -> Server {
    start(node_config(&dir.join("ingest"), nats, NodeRole::Ingest)).await
}

/// Aggregators a0 and a1 with the configs `aggregator` gives, once they share the 8
/// partitions evenly; and a JetStream context to watch the cluster with.
async fn start_two(
    nats: &NatsCluster,
    aggregator: impl Fn(&str) -> outflow_collector::Config,
) -> (Server, Server, jetstream::Context) {
    let a0 = start(aggregator("a0")).await;
    let a1 = start(aggregator("a1")).await;
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    wait_claims(&watch, "a0 and a1 share the partitions", |c| {
        counts(c) == BTreeMap::from([("a0".into(), 4), ("a1".into(), 4)])
    })
    .await;
    (a0, a1, watch)
}

/// The alerts Alerts.List gives on node `url` for `req`.
async fn list_alerts(url: &str, req: tonic::Request<v1::ListAlertsRequest>) -> Vec<v1::Alert> {
    v1::alerts_client::AlertsClient::new(channel(url).await)
        .list(req)
        .await
        .unwrap()
        .into_inner()
        .alerts
}

/// Sends agent-0's batches 1 to `last`, a minute of batch time apart, each with `deltas(seq)`,
/// through the node at `u`; the last one two minutes on, once the rest is applied in all 8
/// partitions, so that the judgements before it are made.
async fn send_a_batch_a_minute(
    u: &str,
    watch: &jetstream::Context,
    last: u64,
    deltas: impl Fn(u64) -> Vec<v1::ConnDelta>,
) {
    let t0 = 1_750_000_000_000 / 3_600_000 * 3_600_000;
    let mut s = agent_stream(u).await;
    welcome_seq(&mut s, "agent-0", 1, "gpu-0").await;
    for seq in 1..=last {
        let mut b = batch(seq, t0 + seq * 60_000, deltas(seq));
        if seq == last {
            wait_drained(watch, 8, Duration::from_secs(60), "never drained").await;
            b.start_ms += 120_000;
            b.end_ms += 120_000;
        }
        assert_eq!(s.batch(b).await.unwrap(), seq);
    }
    s.close().await;
}

/// Agents through an ingest node; aggregators share the 8 partitions and move them while the
/// batches flow: a0 and a1 share them, a2 joins and takes its share (a0 and a1 give partitions
/// up and rebuild theirs), a1 stops and a0 and a2 take its partitions over once its lease is
/// out, a1 comes back on its store (rebuilds: its claims are taken) and gets its share again.
/// Once the claims settle and every holder's consumer is drained, the three aggregators'
/// totals per client address, client id and host, summed, equal what the agents sent, to the
/// byte: no part lost in a move, none counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_between_aggregators_and_the_totals_stay_exact() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start_ingest(dir.path(), &nats).await;
    let a0 = start(aggregator_config(dir.path(), &nats, "a0")).await;
    let mut a1 = Some(start(aggregator_config(dir.path(), &nats, "a1")).await);
    let mut a2 = None;
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());

    let u = url(&ingest);
    let mut agents = Vec::new();
    for a in 0..2u8 {
        let mut s = agent_stream(&u).await;
        welcome_seq(&mut s, &format!("agent-{a}"), 1, &format!("gpu-{a}")).await;
        agents.push(s);
    }
    let (mut by_addr, mut by_id, mut by_host) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for seq in 1..=40u64 {
        match seq {
            5 => {
                wait_claims(&watch, "a0 and a1 share the partitions", |c| {
                    counts(c) == BTreeMap::from([("a0".into(), 4), ("a1".into(), 4)])
                })
                .await;
            }
            10 => {
                a2 = Some(start(aggregator_config(dir.path(), &nats, "a2")).await);
                wait_claims(&watch, "a2 takes its share", |c| {
                    counts(c).get("a2") == Some(&2)
                })
                .await;
            }
            20 => {
                a1.take().unwrap().shutdown().await.unwrap();
                wait_claims(&watch, "a0 and a2 take a1's partitions", |c| {
                    c.len() == 8 && !c.values().any(|n| n == "a1")
                })
                .await;
            }
            30 => {
                a1 = Some(start(aggregator_config(dir.path(), &nats, "a1")).await);
            }
            _ => {}
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
    let (a1, a2) = (a1.unwrap(), a2.unwrap());
    let fair = BTreeMap::from([("a0".into(), 3), ("a1".into(), 3), ("a2".into(), 2)]);
    // Settled and drained, the cluster's answer is the truth (an aggregator still rebuilding
    // holds less).
    let u = url(&ingest);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let settled = counts(&claims(&watch).await) == fair && drained(&watch, 8).await;
        let got = (
            fleet_top(&u, v1::GroupBy::ClientAddress, None).await,
            fleet_top(&u, v1::GroupBy::ClientId, None).await,
            fleet_top(&u, v1::GroupBy::Host, None).await,
        );
        if settled
            && matches!(&got, (Ok(a), Ok(i), Ok(h)) if (a, i, h) == (&by_addr, &by_id, &by_host))
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            assert!(settled, "claims never settled: {:?}", claims(&watch).await);
            let text = |r: Result<_, tonic::Status>| r.map_err(|e| e.to_string());
            assert_eq!(text(got.0), Ok(by_addr.clone()), "bytes per client address");
            assert_eq!(text(got.1), Ok(by_id.clone()), "bytes per client id");
            assert_eq!(text(got.2), Ok(by_host.clone()), "bytes per host");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = metrics(&a1).await;
    assert!(
        metric(&m, "outflow_collector_cluster_rebuilds_total") >= 1.0,
        "a1 came back to claims taken: it rebuilt\n{m}"
    );
    assert_eq!(metric(&m, "outflow_collector_cluster_partitions_held"), 3.0);
    assert_eq!(
        metric(&m, "outflow_collector_cluster_partitions "),
        8.0,
        "{m}"
    );
    // Its partition sessions are no agent streams.
    assert_eq!(metric(&m, "outflow_collector_agents_connected"), 0.0, "{m}");
    drop(agents);
    for s in [ingest, a0, a1, a2] {
        s.shutdown().await.unwrap();
    }
}

/// Two aggregators given the same name (two machines with one host name): the second one
/// finds the name's membership held by another instance, says so, and claims and applies
/// nothing (two stores under one name would split its partitions' parts between them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_aggregator_under_a_taken_name_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    // A lease long enough that the first never misses a renewal on a loaded machine (the
    // name would then be free, and taken by the second).
    let config = |dir: &std::path::Path| {
        let mut cfg = aggregator_config(dir, &nats, "a0");
        cfg.cluster.lease = Duration::from_secs(10);
        cfg
    };
    let first = start(config(dir.path())).await;
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    wait_claims(&watch, "a0 holds every partition", |c| {
        counts(c) == BTreeMap::from([("a0".into(), 8)])
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric(
        &metrics(&first).await,
        "outflow_collector_cluster_partitions_held",
    ) != 8.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a0 never applied its 8 partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = start(config(&dir.path().join("other"))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics(&second).await;
        if metric(&m, "outflow_collector_cluster_membership_failures_total") >= 2.0 {
            assert_eq!(metric(&m, "outflow_collector_cluster_partitions_held"), 0.0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(
            &metrics(&first).await,
            "outflow_collector_cluster_partitions_held"
        ),
        8.0
    );
    assert_eq!(
        counts(&claims(&watch).await),
        BTreeMap::from([("a0".into(), 8)])
    );
    for s in [first, second] {
        s.shutdown().await.unwrap();
    }
}

/// Query and Alerts answered by any node, ingest or aggregator, for the whole cluster: two
/// aggregators hold 4 partitions each, and a host's, an address's, a prefix's bytes are in
/// both; the answers are merged exactly (the top host with limit 1, every client's totals, a
/// client's stats, the alerts of both aggregators), with the caller's read token passed on
/// to the aggregators, which check it as their own callers'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_query_and_alerts_for_the_whole_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let read = crate::auth::write(dir.path(), "read", "tok-read\n");
    let mut icfg = node_config(&dir.path().join("ingest"), &nats, NodeRole::Ingest);
    icfg.auth.read_token_file = Some(read.clone());
    icfg.auth.agent_tokens_file = Some(crate::auth::write(
        dir.path(),
        "agents",
        "agent-0 tok-0\nagent-1 tok-1\n",
    ));
    let ingest = start(icfg).await;
    let aggregator = |name: &str| {
        let mut c = aggregator_config(dir.path(), &nats, name);
        c.cluster.lease = Duration::from_secs(10);
        c.auth.read_token_file = Some(read.clone());
        // Clients above 1 MB an hour are flagged.
        c.detect.volume.client_per_hour = 1_000_000;
        c
    };
    let (a0, a1, watch) = start_two(&nats, aggregator).await;

    let u = url(&ingest);
    let (mut by_addr, mut by_host) = (BTreeMap::new(), BTreeMap::new());
    // Addresses whose bytes came without a client id (the volume detector flags them by
    // address; the others by id).
    let mut anonymous = BTreeMap::new();
    for a in 0..2u8 {
        let token = format!("tok-{a}");
        let mut s = IngestStream::open(channel(&u).await, Some(&token))
            .await
            .unwrap();
        welcome_seq(&mut s, &format!("agent-{a}"), 1, &format!("gpu-{a}")).await;
        // gpu-1 serves more than gpu-0.
        for seq in 1..=(20 + 11 * u64::from(a)) {
            let mut b = wire_batch(a, seq);
            if seq == 31 {
                // The last batch two minutes of batch time later, once everything before it
                // is applied: each aggregator judges what it holds (detection judges when batch
                // time crosses a minute; a partition's consumer can run ahead of another's).
                wait_drained(&watch, 8, Duration::from_secs(60), "never drained").await;
                b.start_ms += 120_000;
                b.end_ms += 120_000;
            }
            for d in &Batch::try_from(b.clone()).unwrap().deltas {
                *by_addr.entry(d.client.to_string()).or_insert(0u64) += d.counters.bytes_out;
                *by_host.entry(format!("gpu-{a}")).or_insert(0u64) += d.counters.bytes_out;
                if d.client_id.is_none() {
                    *anonymous.entry(d.client.to_string()).or_insert(0u64) += d.counters.bytes_out;
                }
            }
            assert_eq!(s.batch(b).await.unwrap(), seq);
        }
        s.close().await;
    }
    let nodes = [url(&ingest), url(&a0), url(&a1)];
    wait_drained(&watch, 8, Duration::from_secs(60), "never drained").await;
    for n in &nodes {
        let got = fleet_top(n, v1::GroupBy::ClientAddress, Some("tok-read")).await;
        assert_eq!(got.map_err(|e| e.to_string()), Ok(by_addr.clone()), "{n}");
        // The biggest host, its bytes spread over both aggregators.
        let top = query(n)
            .await
            .top_talkers(authed(v1::TopTalkersRequest {
                group_by: v1::GroupBy::Host as i32,
                window: v1::Window::Window1h as i32,
                limit: 1,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(top.talkers.len(), 1);
        assert_eq!(
            (top.talkers[0].key.as_str(), top.talkers[0].response_bytes),
            ("gpu-1", by_host["gpu-1"]),
            "{n}"
        );
        assert_eq!(top.talkers[0].hosts, 1);
        // One client's stats: both hosts served it.
        let stats = query(n)
            .await
            .client_stats(authed(v1::ClientStatsRequest {
                client: "198.56.5.39".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let day = &stats.windows[3];
        assert_eq!(
            (day.response_bytes, day.hosts),
            (by_addr["198.56.5.39"], 2),
            "{n}"
        );
    }
    // Without the token the node refuses; with it, the aggregators (which check it too)
    // answer.
    let e = fleet_top(&u, v1::GroupBy::Host, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

    // The alerts of both aggregators, through any node.
    let list = |n: String| async move { list_alerts(&n, authed(OPEN_CLIENT_ALERTS)).await };
    // The biggest client (no client id: flagged by address) is over the limit.
    let biggest = anonymous.iter().max_by_key(|(_, b)| **b).unwrap();
    assert!(*biggest.1 > 1_000_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let alerts = loop {
        let alerts = list(u.clone()).await;
        if alerts
            .iter()
            .any(|a| a.detector == v1::Detector::Volume as i32 && a.key == *biggest.0)
        {
            break alerts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no volume alert on {} through the ingest node: {alerts:?}",
            biggest.0
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The cluster's list is each aggregator's own, together.
    let mut own = Vec::new();
    for a in [&a0, &a1] {
        let mine = v1::aggregator_query_client::AggregatorQueryClient::new(channel(&url(a)).await)
            .list_alerts(authed(OPEN_CLIENT_ALERTS))
            .await
            .unwrap()
            .into_inner()
            .alerts;
        assert!(!mine.is_empty(), "both aggregators raised alerts");
        own.extend(mine.into_iter().map(|a| a.id));
    }
    own.sort();
    let ids: std::collections::BTreeSet<&str> = alerts.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids.len(), alerts.len(), "each alert once");
    assert_eq!(
        ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        own,
        "the aggregators' alerts, each once"
    );
    let ids_of = |alerts: &[v1::Alert]| -> std::collections::BTreeSet<String> {
        alerts.iter().map(|a| a.id.clone()).collect()
    };
    assert_eq!(
        ids_of(&list(url(&a0)).await),
        ids_of(&alerts),
        "an aggregator answers the same"
    );
    // Watch through the ingest node starts with every open alert of both.
    let mut stream = v1::alerts_client::AlertsClient::new(channel(&u).await)
        .watch(authed(v1::WatchAlertsRequest {
            include_service: false,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::BTreeSet::new();
    while !ids.iter().all(|i| seen.contains(*i)) {
        let a = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a watched alert")
            .unwrap()
            .unwrap();
        seen.insert(a.id);
    }
    drop(stream);
    for s in [ingest, a0, a1] {
        s.shutdown().await.unwrap();
    }
}

/// `msg` with the read token of the test above.
fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", "Bearer tok-read".parse().unwrap());
    r
}

/// Alerts.List of the open client alerts.
const OPEN_CLIENT_ALERTS: v1::ListAlertsRequest = v1::ListAlertsRequest {
    open_only: true,
    limit: 0,
    include_service: false,
};

/// One aggregator holding every partition: stopped cleanly (it leaves `stopped-cleanly` in
/// its data directory) it goes on from its store without a rebuild; started after a crash (no
/// such file: what its detectors learnt is only as recent as their last save) it rebuilds its
/// store from the stream, its consumers in step, and raises the same alerts, under the same
/// ids, with the same totals. Its webhook receiver gets each alert change once: the changes
/// the replay raises again are found in the cluster's delivery records and not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_started_after_a_crash_rebuilds_and_raises_the_same_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start_ingest(dir.path(), &nats).await;
    let hook = outflow_testbed::webhook::Receiver::start();
    let config = || {
        let mut c = aggregator_config(dir.path(), &nats, "a0");
        c.cluster.lease = Duration::from_secs(10);
        c.detect.volume.client_per_hour = 1_000_000;
        c.webhook.url = Some(hook.url());
        c
    };
    let clean = config().data_dir.join("stopped-cleanly");
    let mut a0 = start(config()).await;
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    wait_claims(&watch, "a0 holds every partition", |c| c.len() == 8).await;

    let u = url(&ingest);
    let mut by_addr = BTreeMap::new();
    let mut s = agent_stream(&u).await;
    welcome_seq(&mut s, "agent-0", 1, "gpu-0").await;
    for seq in 1..=21u64 {
        let mut b = wire_batch(0, seq);
        if seq == 21 {
            // Two minutes of batch time later: the judgement of what came before.
            wait_drained(&watch, 8, Duration::from_secs(60), "never drained").await;
            b.start_ms += 120_000;
            b.end_ms += 120_000;
        }
        for d in &Batch::try_from(b.clone()).unwrap().deltas {
            *by_addr.entry(d.client.to_string()).or_insert(0u64) += d.counters.bytes_out;
        }
        assert_eq!(s.batch(b).await.unwrap(), seq);
    }
    wait_drained(&watch, 8, Duration::from_secs(60), "never drained").await;
    let alerts = settled(&a0, &u, &by_addr, 0.0).await;
    // Every change of them POSTed once (the sink counts a change once the receiver answered).
    let mut changes: std::collections::BTreeSet<(String, String, u64)> = Default::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut read = 0;
    loop {
        let bodies = hook.bodies();
        for body in &bodies[read..] {
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            let change = (
                v["id"].as_str().unwrap().to_owned(),
                v["state"].as_str().unwrap().to_owned(),
                v["last_seen_ms"].as_u64().unwrap(),
            );
            assert!(changes.insert(change.clone()), "{change:?} POSTed twice");
        }
        read = bodies.len();
        let covered = alerts
            .iter()
            .all(|id| changes.iter().any(|(i, ..)| i == id));
        if covered && changes.len() as f64 == metric(&metrics(&a0).await, SENT) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the webhook got {changes:?} of the alerts {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    a0.shutdown().await.unwrap();
    assert!(clean.exists(), "a clean stop leaves {}", clean.display());
    a0 = start(config()).await;
    assert!(!clean.exists(), "removed at start");
    wait_drained(&watch, 8, Duration::from_secs(60), "never drained").await;
    assert_eq!(
        settled(&a0, &u, &by_addr, 0.0).await,
        alerts,
        "goes on without a rebuild"
    );

    a0.shutdown().await.unwrap();
    // As a crash leaves it.
    std::fs::remove_file(&clean).unwrap();
    a0 = start(config()).await;
    // Nothing more is sent: until its partitions are replayed, the cluster refuses (saying
    // why) rather than answer short; its first answer is the truth.
    let refused = answers_once_replayed(&u, &by_addr).await;
    assert!(
        refused.keys().any(|why| why.contains("being replayed")),
        "a store not yet caught up with the stream is refused as such: {refused:?}"
    );
    assert_eq!(
        metric(
            &metrics(&a0).await,
            "outflow_collector_cluster_partitions_replaying"
        ),
        0.0
    );
    wait_drained(&watch, 8, Duration::from_secs(60), "never drained").await;
    assert_eq!(
        settled(&a0, &u, &by_addr, 1.0).await,
        alerts,
        "rebuilt from the stream: the same alerts, the same ids"
    );
    // The replay judged every change again, and sent none of them again.
    let skipped = poll_metric(
        &a0,
        "outflow_collector_webhook_already_delivered_total",
        changes.len() as f64,
    )
    .await;
    if let Some(body) = hook.bodies().get(read) {
        panic!("a change POSTed again after the rebuild: {body}");
    }
    assert_eq!(metric(&metrics(&a0).await, SENT), 0.0);
    assert_eq!(
        skipped,
        changes.len() as f64,
        "each change the replay raised again was found delivered"
    );
    drop(s);
    for n in [ingest, a0] {
        n.shutdown().await.unwrap();
    }
}

/// Asks the cluster through `node` for every client's bytes until it answers: each refusal
/// must be UNAVAILABLE, and the answer `by_addr` exactly. Returns the refusals, by their
/// message up to its first colon.
async fn answers_once_replayed(
    node: &str,
    by_addr: &BTreeMap<String, u64>,
) -> BTreeMap<String, usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut refused = BTreeMap::new();
    loop {
        match fleet_top(node, v1::GroupBy::ClientAddress, None).await {
            Ok(top) => {
                assert_eq!(
                    &top, by_addr,
                    "answered short (after the refusals {refused:?})"
                );
                return refused;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                let why = s.message().split(':').next().unwrap_or_default().to_owned();
                *refused.entry(why).or_insert(0usize) += 1;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still refused after 60 s: {refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Alert changes an aggregator's webhook receiver accepted.
const SENT: &str = "outflow_collector_webhook_sent_total";

/// Waits (at most 30 s) until metric `name` of `server` reaches `want`; returns its value.
async fn poll_metric(server: &Server, name: &str, want: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(&metrics(server).await, name);
        if v >= want || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `aggregator` has rebuilt `rebuilds` times, the cluster's bytes per client
/// address through `ingest` are `by_addr` and alerts are listed (judged on a thread of their
/// own): returns the alerts' ids.
async fn settled(
    aggregator: &Server,
    ingest: &str,
    by_addr: &BTreeMap<String, u64>,
    rebuilds: f64,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = metrics(aggregator).await;
        let top = fleet_top(ingest, v1::GroupBy::ClientAddress, None).await;
        let mut ids: Vec<String> = v1::alerts_client::AlertsClient::new(channel(ingest).await)
            .list(tonic::Request::new(v1::ListAlertsRequest {
                open_only: false,
                limit: 0,
                include_service: false,
            }))
            .await
            .map(|r| r.into_inner().alerts.into_iter().map(|a| a.id).collect())
            .unwrap_or_default();
        ids.sort();
        if metric(&m, "outflow_collector_cluster_rebuilds_total") == rebuilds
            && top.as_ref().ok() == Some(by_addr)
            && !ids.is_empty()
        {
            return ids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: {:?}, alerts {ids:?}\n{m}",
            top.map(|t| t.len())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the consumers of all `partitions` are drained and the cluster's bytes per
/// client address, asked of the node at `u`, are `by_addr`; panics at `deadline`.
async fn drained_to(
    u: &str,
    watch: &jetstream::Context,
    partitions: u32,
    by_addr: &BTreeMap<String, u64>,
    deadline: tokio::time::Instant,
) {
    loop {
        let top = fleet_top(u, v1::GroupBy::ClientAddress, None).await;
        if drained(watch, partitions).await && top.as_ref().ok() == Some(by_addr) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never drained to the truth (drained: {}): {top:?}\nwant {by_addr:?}",
            drained(watch, partitions).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A consumer held back by another (paused in JetStream, so its head stays at the first
/// period) for longer than the client keeps a fetch (expires + 5 s), with more than one
/// fetch of parts waiting: it reads its whole fetch before it waits, so no part delivered to
/// it is left unread to come again after ack_wait, behind later parts of the same agent (a
/// duplicate below the watermark by then: lost). The totals are exact once both drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_held_back_longer_than_a_fetch_lives_loses_none_of_it() {
    const BATCHES: u64 = 300;
    const HELD: Duration = Duration::from_secs(8);
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start(two(node_config(
        &dir.path().join("ingest"),
        &nats,
        NodeRole::Ingest,
    )))
    .await;
    let config = || two(aggregator_config(dir.path(), &nats, "a0"));
    // a0 makes its consumers, and stops cleanly (it goes on from them when it starts again).
    let a0 = start(config()).await;
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    wait_claims(&watch, "a0 holds both partitions", |c| c.len() == 2).await;
    wait_drained(&watch, 2, Duration::from_secs(30), "no consumers made").await;
    a0.shutdown().await.unwrap();

    let u = url(&ingest);
    let mut by_addr = BTreeMap::new();
    let mut s = agent_stream(&u).await;
    welcome_seq(&mut s, "agent-0", 1, "gpu-0").await;
    for seq in 1..=BATCHES {
        let b = wire_batch(0, seq);
        for d in &Batch::try_from(b.clone()).unwrap().deltas {
            *by_addr.entry(d.client.to_string()).or_insert(0u64) += d.counters.bytes_out;
        }
        assert_eq!(s.batch(b).await.unwrap(), seq);
    }
    let stream = watch.get_stream(STREAM).await.unwrap();
    let mut parts = 0;
    for p in 0..2 {
        let mut c = stream
            .get_consumer::<pull::Config>(&format!("a0-p{p}"))
            .await
            .unwrap();
        let waiting = c.info().await.unwrap().num_pending;
        parts += waiting;
        assert!(
            waiting > 256,
            "partition {p} has {waiting} parts: not more than one fetch"
        );
    }
    // Partition 1's consumer paused: it fetches nothing, and holds partition 0's back.
    stream
        .pause_consumer("a0-p1", time::OffsetDateTime::now_utc() + HELD)
        .await
        .unwrap();
    let held = tokio::time::Instant::now();
    let a0 = start(config()).await;
    // Held: partition 0's first fetch delivered and not acknowledged.
    let mut p0 = stream.get_consumer::<pull::Config>("a0-p0").await.unwrap();
    let deadline = held + Duration::from_secs(5);
    while p0.info().await.unwrap().num_ack_pending == 0 {
        assert!(tokio::time::Instant::now() < deadline, "a0 never fetched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        p0.info().await.unwrap().num_ack_pending,
        256,
        "partition 0 is held back with its first fetch"
    );

    drained_to(
        &u,
        &watch,
        2,
        &by_addr,
        held + HELD + Duration::from_secs(30),
    )
    .await;
    assert!(held.elapsed() >= HELD, "held back for less than {HELD:?}");
    let m = metrics(&a0).await;
    assert_eq!(
        metric(&m, "outflow_collector_cluster_applied_parts_total"),
        parts as f64,
        "each part applied once\n{m}"
    );
    drop(s);
    for n in [ingest, a0] {
        n.shutdown().await.unwrap();
    }
}

/// A proxy pool of 24 unrelated addresses (each in a /16 of its own, so in every partition),
/// each pulling a steady 30 MB an hour: together 720 MB, over the cohort limit of 4 × 100 MB,
/// while each aggregator holds about half of them. The aggregators leave cohorts to the second
/// stage: each publishes what it saw of its partitions' clients at each judgement, the holder
/// of partition 0 judges them together, and the cluster raises one cohort alert with all 24
/// members, as one collector would. After a kill and restart of that holder, the stage moves
/// with partition 0 and the same alert comes back under the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cohort_spread_over_both_aggregators_is_judged_whole_by_the_second_stage() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start_ingest(dir.path(), &nats).await;
    let aggregator = |name: &str| {
        let mut c = aggregator_config(dir.path(), &nats, name);
        c.cluster.lease = Duration::from_secs(4);
        c.detect.volume.client_per_hour = 100_000_000;
        c
    };
    let (a0, a1, watch) = start_two(&nats, aggregator).await;
    let pool: Vec<[u8; 4]> = (0..24u8).map(|i| [11 + 7 * i, 3 * i, 7, 1]).collect();
    let partitions = Partitions::new(8).unwrap();
    let of: std::collections::BTreeSet<u32> = pool
        .iter()
        .map(|a| partitions.of_addr(IpAddr::from(*a)))
        .collect();
    assert!(of.len() >= 6, "the pool is in most partitions: {of:?}");

    // A batch a minute for 50 minutes: each member 500 KB a minute (30 MB an hour) over one
    // long-lived connection.
    let u = url(&ingest);
    send_a_batch_a_minute(&u, &watch, 50, |_| {
        pool.iter()
            .map(|a| delta(*a, 500_000, 300, false))
            .collect()
    })
    .await;

    let list =
        |n: String| async move { list_alerts(&n, tonic::Request::new(OPEN_CLIENT_ALERTS)).await };
    let cohort = |alerts: &[v1::Alert]| {
        alerts
            .iter()
            .find(|a| a.detector == v1::Detector::Cohort as i32)
            .cloned()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (alerts, found) = loop {
        let alerts = list(u.clone()).await;
        if let Some(a) = cohort(&alerts) {
            break (alerts, a);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cohort alert through the ingest node: {alerts:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alerts.len(), 1, "one alert, the cohort's: {alerts:#?}");
    assert_eq!(found.members, 24, "{found:#?}");
    assert!(found.summary.contains("unrelated addresses"), "{found:#?}");
    for a in [&a0, &a1] {
        let m = metrics(a).await;
        assert!(
            metric(&m, "outflow_collector_cluster_cohort_summaries_total") > 0.0,
            "every aggregator publishes its summaries"
        );
        assert_eq!(
            metric(&m, "outflow_collector_cluster_invalid_summaries_total"),
            0.0
        );
    }

    // The stage's holder (partition 0's) stopped as a crash leaves it and started again: it
    // rebuilds, the stage starts over from the summaries, and the same alert comes back.
    let holder = claims(&watch).await[&0].clone();
    let (gone, other) = if holder == "a0" { (a0, a1) } else { (a1, a0) };
    gone.shutdown().await.unwrap();
    std::fs::remove_file(aggregator(&holder).data_dir.join("stopped-cleanly")).unwrap();
    let back = start(aggregator(&holder)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = list(u.clone()).await;
        if cohort(&alerts).is_some_and(|a| a.id == found.id) && alerts.len() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cohort alert did not come back under its id after the stage moved: {alerts:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in [back, other, ingest] {
        s.shutdown().await.unwrap();
    }
}

/// Each aggregator learns the peers' ratio from its own partitions' clients; the sustained
/// detector of each judges against all of them together, as one collector over the fleet would.
/// Here a0's clients pull at 10:1 and a1's at 1000:1: alone each would judge against its own
/// (10 or 1000); both judge against the same ratio between, learnt from every client's hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_aggregator_judges_against_the_peers_ratio_of_the_whole_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start_ingest(dir.path(), &nats).await;
    let (a0, a1, watch) = start_two(&nats, |n| aggregator_config(dir.path(), &nats, n)).await;
    let held = claims(&watch).await;
    let partitions = Partitions::new(8).unwrap();
    let pool: Vec<[u8; 4]> = (0..24u8).map(|i| [11 + 7 * i, 3 * i, 7, 1]).collect();
    let on_a0 = |a: &[u8; 4]| held[&partitions.of_addr(IpAddr::from(*a))] == "a0";
    let n0 = pool.iter().filter(|a| on_a0(a)).count();
    assert!(
        (1..pool.len()).contains(&n0),
        "clients on both aggregators: {n0} of {} on a0",
        pool.len()
    );

    // A batch a minute for 70 minutes, each client 500 KB a minute (30 MB an hour, an active
    // hour): the first hour is learnt at the judgements of the second.
    let u = url(&ingest);
    send_a_batch_a_minute(&u, &watch, 70, |_| {
        pool.iter()
            .map(|a| {
                let ratio = if on_a0(a) { 10 } else { 1000 };
                delta(*a, 500_000, 500_000 / ratio, false)
            })
            .collect()
    })
    .await;

    let ratio = r#"outflow_collector_detect_peer_ratio{kind="client"}"#;
    let samples = r#"outflow_collector_detect_peer_samples{kind="client"}"#;
    let shared = "outflow_collector_cluster_peer_ratios_shared";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (m0, m1) = loop {
        let (m0, m1) = (metrics(&a0).await, metrics(&a1).await);
        let same = |name: &str| {
            let (x, y) = (metric(&m0, name), metric(&m1, name));
            x > 0.0 && (x - y).abs() <= 1e-9 * x
        };
        // Every client's first hour learnt, on both, from both.
        if same(ratio) && metric(&m0, samples) >= pool.len() as f64 && same(samples) {
            break (m0, m1);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the aggregators never judged against the same peers' ratio: a0 {} ({} samples), a1 {} ({} samples)",
            metric(&m0, ratio),
            metric(&m0, samples),
            metric(&m1, ratio),
            metric(&m1, samples)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let r = metric(&m0, ratio);
    assert!(
        r > 15.0 && r < 700.0,
        "between a0's 10:1 and a1's 1000:1, not either: {r}"
    );
    for m in [&m0, &m1] {
        assert_eq!(metric(m, shared), 2.0, "each judges against both");
    }
    for s in [a0, a1, ingest] {
        s.shutdown().await.unwrap();
    }
}

/// A client address whose bytes all come under client ids of other partitions (eight accounts
/// behind one address, each under the per-client limit, the address far over it) is judged on
/// all of its bytes, as one collector judges it: the ingest node sends each delta to the
/// partition of its address (for the address's keys) and to that of its id (for the rest), so
/// the address's aggregator raises its volume alert, the ids raise none, and the cluster's
/// totals count every byte once for the address, once for each id and once for the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_whose_bytes_come_under_other_partitions_ids_is_judged_on_all_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start_ingest(dir.path(), &nats).await;
    let aggregator = |name: &str| {
        let mut c = aggregator_config(dir.path(), &nats, name);
        c.detect.volume.client_per_hour = 100_000_000;
        c
    };
    let (a0, a1, watch) = start_two(&nats, aggregator).await;
    let addr = [198, 51, 100, 7];
    let partitions = Partitions::new(8).unwrap();
    let home = partitions.of_addr(IpAddr::from(addr));
    let ids: Vec<String> = (0..64u64)
        .map(|i| format!("h:{i:024x}"))
        .filter(|id| partitions.of_name(id) != home)
        .take(8)
        .collect();
    assert_eq!(ids.len(), 8);

    // A batch a minute for 11 minutes: each id 5 MB a minute from the one address (300 MB an
    // hour per id, under the limit; 440 MB in 11 minutes for the address, over it).
    let u = url(&ingest);
    send_a_batch_a_minute(&u, &watch, 11, |seq| {
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                let mut d = delta(addr, 5_000_000, 100, false);
                d.conn_id = seq << 8 | i as u64;
                d.client_id = id.clone();
                d.client_source = "header:x-client-id".into();
                d
            })
            .collect()
    })
    .await;

    let key = IpAddr::from(addr).to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let alerts = loop {
        let alerts = list_alerts(&u, tonic::Request::new(OPEN_CLIENT_ALERTS)).await;
        if alerts.iter().any(|a| a.key == key) {
            break alerts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no alert on {key}, whose bytes all came with ids of other partitions: {alerts:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        alerts.len(),
        1,
        "the address's alert, none of an id: {alerts:#?}"
    );
    assert_eq!(
        alerts[0].detector,
        v1::Detector::Volume as i32,
        "{alerts:#?}"
    );
    assert!(alerts[0].observed_bytes > 100_000_000, "{alerts:#?}");

    // Every byte once for the address, for each id and for the host, through the ingest node.
    let mut q = query(&u).await;
    let day = |w: Vec<v1::WindowStats>| {
        w.into_iter()
            .find(|w| w.window == v1::Window::Window24h as i32)
            .map_or(0, |w| w.response_bytes)
    };
    let stats = |client: String| v1::ClientStatsRequest { client };
    let got = day(q
        .client_stats(stats(key.clone()))
        .await
        .unwrap()
        .into_inner()
        .windows);
    assert_eq!(got, 11 * 8 * 5_000_000, "the address's bytes");
    for id in &ids {
        let got = day(q
            .client_stats(stats(id.clone()))
            .await
            .unwrap()
            .into_inner()
            .windows);
        assert_eq!(got, 11 * 5_000_000, "{id}'s bytes");
    }
    let hosts = q
        .top_talkers(v1::TopTalkersRequest {
            group_by: v1::GroupBy::Host as i32,
            window: v1::Window::Window24h as i32,
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .talkers;
    assert_eq!(hosts.len(), 1, "{hosts:#?}");
    assert_eq!(
        hosts[0].response_bytes,
        11 * 8 * 5_000_000,
        "the host's bytes"
    );
    for s in [a0, a1, ingest] {
        s.shutdown().await.unwrap();
    }
}

/// An aggregator whose store fails to commit a part applies it again before the parts after
/// it: the consumer starts again from its first part not acknowledged, and the writer refuses
/// the later parts of the failed part's agent until it says Hello again. (Acknowledged as not
/// taken, the part would come again a second later, behind parts of the same agent applied
/// meanwhile, and be taken for a duplicate below their watermark: lost.) The totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_whose_commit_failed_is_applied_before_the_parts_after_it() {
    const BATCHES: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start(two(node_config(
        &dir.path().join("ingest"),
        &nats,
        NodeRole::Ingest,
    )))
    .await;
    let a0 = start(two(aggregator_config(dir.path(), &nats, "a0"))).await;
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    wait_claims(&watch, "a0 holds both partitions", |c| c.len() == 2).await;
    wait_drained(&watch, 2, Duration::from_secs(30), "no consumers made").await;

    let u = url(&ingest);
    let mut by_addr = BTreeMap::new();
    let mut s = agent_stream(&u).await;
    welcome_seq(&mut s, "agent-0", 1, "gpu-0").await;
    let mut send = async |seq: u64| send_counted(&mut s, &mut by_addr, seq).await;
    // a0's commits fail while the first batch's parts come.
    let armed = Armed::new("store::append_fails", &dir.path().join("a0")).await;
    send(1).await;
    let failed = poll_metric(&a0, "outflow_collector_store_failures_total", 1.0).await;
    assert!(failed >= 1.0, "no commit of a0 failed");
    drop(armed);
    // Its store commits again: the later batches' parts come at once.
    for seq in 2..=BATCHES {
        send(seq).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    drained_to(&u, &watch, 2, &by_addr, deadline).await;
    drop(s);
    for n in [ingest, a0] {
        n.shutdown().await.unwrap();
    }
}

/// An ingest node that could not publish a batch (JetStream lost its quorum for longer than
/// `cluster.publish_timeout`) publishes nothing more of that agent stream, though JetStream is
/// back: the stream's later batches are refused, unpublished, until the agent opens a new
/// stream and sends again from the refused one. (Published, they would raise the aggregators'
/// watermarks above the refused batch's parts, which would then be taken for duplicates.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_node_publishes_nothing_of_a_stream_after_a_batch_it_could_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(3, &dir.path().join("nats"));
    let mut cfg = node_config(&dir.path().join("ingest"), &nats, NodeRole::Ingest);
    cfg.cluster.ack_timeout = Duration::from_millis(500);
    cfg.cluster.publish_timeout = Duration::from_secs(2);
    let ingest = start(cfg).await;
    let c = ingest.collector();
    let mut s = c.session();
    s.handle(hello_msg("agent-0", 1, "gpu-0")).await.unwrap();
    s.handle(batch_msg(wire_batch(0, 1))).await.unwrap();

    // Two of the three NATS nodes gone: no majority stores a part.
    nats.kill(0);
    nats.kill(1);
    let e = s
        .handle(batch_msg(wire_batch(0, 2)))
        .await
        .expect_err("published without a majority of JetStream's nodes");
    assert!(e.to_string().contains("not acknowledged"), "{e}");
    nats.restart(0);
    nats.restart(1);

    // JetStream is back; the stream's next batch is refused with the same failure, at once.
    let e = s
        .handle(batch_msg(wire_batch(0, 3)))
        .await
        .expect_err("a batch after the refused one was published before it");
    assert!(e.to_string().contains("not acknowledged"), "{e}");

    // The agent's next stream sends 2 and 3 again, once the stream has a leader again (the
    // restarted nodes may take longer than the publish timeout to elect one): both published.
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    wait_stream_leader(&watch, Duration::from_secs(60)).await;
    let mut s = c.session();
    s.handle(hello_msg("agent-0", 1, "gpu-0")).await.unwrap();
    for seq in [2, 3] {
        s.handle(batch_msg(wire_batch(0, seq))).await.unwrap();
    }
    ingest.shutdown().await.unwrap();
}

/// NATS servers that want TLS, verify their clients' certificates and want a user's password:
/// an ingest node and an aggregator given the CA, their certificate and the password (in files
/// only their owner may read) carry an agent's batches to exact totals as they do without. A
/// node with a wrong password, or without the CA that signed the servers' certificates, fails
/// at start with an error that names the settings to check, instead of waiting on NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_nats_over_tls_with_a_password_and_name_what_is_refused() {
    use crate::auth::{ca, leaf, write};
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    let authority = ca("nats-ca");
    let (server_cert, server_key) = leaf(&authority, "localhost", true);
    let (node_cert, node_key) = leaf(&authority, "outflow-node", false);
    let ca_file = write(pki, "ca.pem", &authority.cert_pem);
    let server_cert = write(pki, "nats.pem", &server_cert);
    let server_key = write(pki, "nats.key", &server_key);
    let node_cert = write(pki, "node.pem", &node_cert);
    let node_key = write(pki, "node.key", &node_key);
    let password = write(pki, "password", "s3cret-pass\n");
    let wrong = write(pki, "wrong-password", "not-it\n");
    let nats = NatsCluster::start_with(
        3,
        &dir.path().join("nats"),
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}\n\
             authorization {{ users = [ {{ user: outflow, password: \"s3cret-pass\" }} ] }}\n",
            server_cert.display(),
            server_key.display(),
            ca_file.display()
        ),
    );
    let secure = |mut cfg: outflow_collector::Config| {
        cfg.cluster.nats_user = "outflow".into();
        cfg.cluster.nats_password_file = Some(password.clone());
        cfg.cluster.nats_ca = Some(ca_file.clone());
        cfg.cluster.nats_cert = Some(node_cert.clone());
        cfg.cluster.nats_key = Some(node_key.clone());
        cfg
    };

    let mut cfg = secure(node_config(&dir.path().join("w"), &nats, NodeRole::Ingest));
    cfg.cluster.nats_password_file = Some(wrong);
    let e = refused(cfg).await;
    assert!(
        e.contains("refused this node's credentials") && e.contains("cluster.nats_password_file"),
        "{e}"
    );
    let mut cfg = secure(node_config(&dir.path().join("c"), &nats, NodeRole::Ingest));
    cfg.cluster.nats_ca = None;
    let e = refused(cfg).await;
    assert!(
        e.contains("TLS with NATS") && e.contains("cluster.nats_ca"),
        "{e}"
    );

    carry_batches_to_exact_totals(
        secure(node_config(
            &dir.path().join("ingest"),
            &nats,
            NodeRole::Ingest,
        )),
        secure(aggregator_config(dir.path(), &nats, "a0")),
    )
    .await;
}

/// NATS servers that want a token, then servers that list an NKey user's public key: nodes
/// given the token's file, or the user's seed's, carry an agent's batches to exact totals as
/// they do without. A wrong token or another user's seed fails at start naming the setting to
/// check; a file holding the seed of a key that is not a user's is named before NATS is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_nats_with_a_token_or_an_nkey_and_name_what_is_refused() {
    use crate::auth::write;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let token = write(d, "token", "t0ken-for-outflow\n");
    let wrong = write(d, "wrong-token", "not-it\n");
    let nats = NatsCluster::start_with(
        3,
        &d.join("nats-token"),
        "authorization { token: \"t0ken-for-outflow\" }\n",
    );
    let with_token = |mut cfg: outflow_collector::Config, file: &std::path::Path| {
        cfg.cluster.nats_token_file = Some(file.to_owned());
        cfg
    };
    let e = refused(with_token(
        node_config(&d.join("token-w"), &nats, NodeRole::Ingest),
        &wrong,
    ))
    .await;
    assert!(
        e.contains("refused this node's credentials") && e.contains("cluster.nats_token_file"),
        "{e}"
    );
    carry_batches_to_exact_totals(
        with_token(
            node_config(&d.join("token-ingest"), &nats, NodeRole::Ingest),
            &token,
        ),
        with_token(aggregator_config(&d.join("token-agg"), &nats, "a0"), &token),
    )
    .await;
    drop(nats);

    let user = nkeys::KeyPair::new_user();
    let seed = write(d, "seed", &format!("{}\n", user.seed().unwrap()));
    let other = write(d, "other-seed", &nkeys::KeyPair::new_user().seed().unwrap());
    let account_seed = nkeys::KeyPair::new_account().seed().unwrap();
    let account = write(d, "account-seed", &account_seed);
    let nats = NatsCluster::start_with(
        3,
        &d.join("nats-nkey"),
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    );
    let with_seed = |mut cfg: outflow_collector::Config, file: &std::path::Path| {
        cfg.cluster.nats_nkey_file = Some(file.to_owned());
        cfg
    };
    let e = refused(with_seed(
        node_config(&d.join("nkey-w"), &nats, NodeRole::Ingest),
        &other,
    ))
    .await;
    assert!(
        e.contains("refused this node's credentials") && e.contains("cluster.nats_nkey_file"),
        "{e}"
    );
    let e = refused(with_seed(
        node_config(&d.join("nkey-a"), &nats, NodeRole::Ingest),
        &account,
    ))
    .await;
    assert!(
        e.contains("cluster.nats_nkey_file") && e.contains("not of a user"),
        "{e}"
    );
    assert!(!e.contains(&account_seed), "the error shows the seed: {e}");
    carry_batches_to_exact_totals(
        with_seed(
            node_config(&d.join("nkey-ingest"), &nats, NodeRole::Ingest),
            &seed,
        ),
        with_seed(aggregator_config(&d.join("nkey-agg"), &nats, "a0"), &seed),
    )
    .await;
}

/// The error of a node that must not start with `cfg` (within 60 s, not waiting on NATS).
async fn refused(cfg: outflow_collector::Config) -> String {
    match tokio::time::timeout(Duration::from_secs(60), Server::start(cfg)).await {
        Ok(Ok(_)) => panic!("started"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("still waiting on NATS after 60 s instead of refusing"),
    }
}

/// Starts an ingest node and an aggregator with these configs, sends an agent's 10 batches
/// through the ingest node, and waits until the fleet's totals per client address are the
/// batches' to the byte; then stops both.
async fn carry_batches_to_exact_totals(
    ingest: outflow_collector::Config,
    aggregator: outflow_collector::Config,
) {
    let ingest = start(ingest).await;
    let a0 = start(aggregator).await;
    let u = url(&ingest);
    let mut agent = agent_stream(&u).await;
    welcome_seq(&mut agent, "agent-0", 1, "gpu-0").await;
    let mut by_addr = BTreeMap::new();
    for seq in 1..=10u64 {
        let b = wire_batch(0, seq);
        for d in &Batch::try_from(b.clone()).unwrap().deltas {
            *by_addr.entry(d.client.to_string()).or_insert(0u64) += d.counters.bytes_out;
        }
        assert_eq!(agent.batch(b).await.unwrap(), seq);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let top = fleet_top(&u, v1::GroupBy::ClientAddress, None).await;
        if top.as_ref().ok() == Some(&by_addr) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{top:?}\nwant {by_addr:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(agent);
    for s in [ingest, a0] {
        s.shutdown().await.unwrap();
    }
}

/// NATS servers in operator mode (decentralized JWT authentication: they trust an operator and
/// know its accounts; a user is a JWT its account signed): an ingest node and an aggregator,
/// each given the `.creds` file of a user of its own that may use only the subjects
/// `nats-permissions` prints for its role, carry an agent's batches to exact totals (and
/// answer Query) as they do with a password. A user of an account the servers do not know
/// fails at start naming the setting to check; a file that is not a credentials file is named
/// before NATS is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_nats_in_operator_mode_with_a_creds_file() {
    use crate::auth::write;
    use crate::nats_operator::Operator;
    use outflow_collector::cluster::permissions;
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let operator = Operator::new(&["outflow"]);
    let account = operator.account("outflow");
    let stranger = write(
        d,
        "stranger.creds",
        &Operator::new(&["other"])
            .account("other")
            .user_creds("stranger", None),
    );
    let garbled = write(
        d,
        "garbled.creds",
        "-----BEGIN NATS USER JWT-----\nnot-a-jwt\n",
    );
    let nats = NatsCluster::start_with(3, &d.join("nats"), &operator.server_config());
    let with_creds = |mut cfg: outflow_collector::Config, file: &std::path::Path| {
        cfg.cluster.nats_creds_file = Some(file.to_owned());
        cfg
    };
    // A user of its own for a node with `cfg`, allowed only what its settings need.
    let as_its_user = |cfg: outflow_collector::Config, name: &str| {
        let p = permissions::for_node(&cfg.cluster).unwrap();
        let creds = write(d, name, &account.user_creds(name, Some(&p)));
        with_creds(cfg, &creds)
    };

    let e = refused(with_creds(
        node_config(&d.join("stranger"), &nats, NodeRole::Ingest),
        &stranger,
    ))
    .await;
    assert!(
        e.contains("refused this node's credentials") && e.contains("cluster.nats_creds_file"),
        "{e}"
    );
    let e = refused(with_creds(
        node_config(&d.join("garbled"), &nats, NodeRole::Ingest),
        &garbled,
    ))
    .await;
    assert!(
        e.contains("cluster.nats_creds_file") && e.contains("not a NATS credentials file"),
        "{e}"
    );
    carry_batches_to_exact_totals(
        as_its_user(
            node_config(&d.join("ingest"), &nats, NodeRole::Ingest),
            "ingest.creds",
        ),
        as_its_user(
            aggregator_config(&d.join("agg"), &nats, "a0"),
            "aggregator.creds",
        ),
    )
    .await;
}

/// Aggregator config `cfg` run as an `outflow-collector` process of its own, with the crash
/// points `failpoints` armed (`OUTFLOW_FAILPOINTS`): one armed in this process would hold
/// every collector the suite runs beside it.
struct AggregatorProcess {
    child: std::process::Child,
    metrics: std::net::SocketAddr,
}

impl AggregatorProcess {
    /// Starts it and waits until it serves its metrics (30 s at most); its log goes to
    /// `<data_dir>.log`.
    async fn start(mut cfg: outflow_collector::Config, failpoints: &str) -> Self {
        cfg.listen = ([127, 0, 0, 1], free_port()).into();
        cfg.metrics_listen = ([127, 0, 0, 1], free_port()).into();
        let file = cfg.data_dir.with_extension("toml");
        std::fs::write(&file, cfg.to_toml()).unwrap();
        let log = std::fs::File::create(cfg.data_dir.with_extension("log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_outflow-collector"))
            .arg("--config")
            .arg(&file)
            .env(outflow_collector::crash::ENV, failpoints)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let p = AggregatorProcess {
            child,
            metrics: cfg.metrics_listen,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(p.metrics).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the aggregator process never served its metrics: see {}",
                cfg.data_dir.with_extension("log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    async fn metrics(&self) -> String {
        let (status, body) = http_get(self.metrics, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Stops it as a service manager would (SIGTERM) and waits for it to end.
    fn stop(mut self) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: signals the child this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the aggregator ended with {status}");
    }
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An aggregator whose writer is held (its first commit slowed by 12 s, as a slow disk
/// would) while its consumers' first fetches hold twice the parts its writer's queue takes
/// (8 partitions of 256 parts, a queue of 1,024): the consumers that wait for room in the
/// queue wait longer than the client keeps a fetch (expires + 5 s). They read their whole
/// fetch before they begin its parts, so none of it is dropped unread to come again after
/// ack_wait: no delivery gap, every part applied once, the totals exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_waiting_on_a_held_writer_longer_than_a_fetch_lives_lose_none_of_it() {
    const BATCHES: u64 = 300;
    const HELD_MS: u64 = 12_000;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start_ingest(dir.path(), &nats).await;
    let config = || aggregator_config(dir.path(), &nats, "a0");
    // a0 makes its consumers, and stops cleanly (it goes on from them when it starts again).
    let a0 = start(config()).await;
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    wait_claims(&watch, "a0 holds every partition", |c| c.len() == 8).await;
    wait_drained(&watch, 8, Duration::from_secs(30), "no consumers made").await;
    a0.shutdown().await.unwrap();

    // One client in each of the 8 partitions: every batch has a part for each.
    let partitions = Partitions::new(8).unwrap();
    let mut clients = BTreeMap::new();
    for b in 0..=255u8 {
        let addr = [203, b, 7, 9];
        clients
            .entry(partitions.of_addr(IpAddr::from(addr)))
            .or_insert(addr);
    }
    assert_eq!(clients.len(), 8, "no client for some partition");
    let u = url(&ingest);
    let mut by_addr = BTreeMap::new();
    let mut s = agent_stream(&u).await;
    welcome_seq(&mut s, "agent-0", 1, "gpu-0").await;
    for seq in 1..=BATCHES {
        let deltas = clients
            .values()
            .map(|&addr| {
                let mut d = delta(addr, 1000 + seq, 10, false);
                d.conn_id = seq << 8 | u64::from(addr[1]);
                *by_addr.entry(IpAddr::from(addr).to_string()).or_insert(0) += 1000 + seq;
                d
            })
            .collect();
        let b = batch(seq, 1_750_000_000_000 + seq * 1000, deltas);
        assert_eq!(s.batch(b).await.unwrap(), seq);
    }
    let stream = watch.get_stream(STREAM).await.unwrap();
    for p in 0..8 {
        let mut c = stream
            .get_consumer::<pull::Config>(&format!("a0-p{p}"))
            .await
            .unwrap();
        assert_eq!(
            c.info().await.unwrap().num_pending,
            BATCHES,
            "partition {p}"
        );
    }

    let held = tokio::time::Instant::now();
    let a0 = AggregatorProcess::start(
        config(),
        &format!("writer::after_commit=1*sleep({HELD_MS})"),
    )
    .await;
    // Held: every consumer's first fetch delivered, none acknowledged (2,048 parts begun or
    // waiting for room among 1,024).
    let deadline = held + Duration::from_millis(HELD_MS / 2);
    loop {
        let mut pending = 0;
        for p in 0..8 {
            let mut c = stream
                .get_consumer::<pull::Config>(&format!("a0-p{p}"))
                .await
                .unwrap();
            pending += c.info().await.unwrap().num_ack_pending;
        }
        if pending == 8 * 256 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the consumers' first fetches are not all held: {pending} parts delivered and not acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(
            &a0.metrics().await,
            "outflow_collector_cluster_applied_parts_total"
        ),
        0.0,
        "a part applied while the writer is held"
    );

    let deadline = held + Duration::from_millis(HELD_MS) + Duration::from_secs(60);
    drained_to(&u, &watch, 8, &by_addr, deadline).await;
    assert!(
        held.elapsed() >= Duration::from_millis(HELD_MS),
        "the writer was not held"
    );
    let m = a0.metrics().await;
    assert_eq!(
        metric(&m, "outflow_collector_cluster_delivery_gaps_total"),
        0.0,
        "parts of a fetch dropped unread\n{m}"
    );
    assert_eq!(
        metric(&m, "outflow_collector_cluster_applied_parts_total"),
        (8 * BATCHES) as f64,
        "each part applied once\n{m}"
    );
    drop(s);
    a0.stop();
    ingest.shutdown().await.unwrap();
}

/// An aggregator whose round is slow (held 3 leases after it claimed its share and before it
/// starts their consumers, as a loaded JetStream slows a round's API calls) still renews its
/// membership meanwhile: the other does not see it gone, claims none of its partitions and
/// rebuilds only the once it gave them up; the totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_in_a_slow_round_stays_a_member_and_keeps_its_partitions() {
    const HELD_MS: u64 = 6_000;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let ingest = start_ingest(dir.path(), &nats).await;
    let a0 = start(aggregator_config(dir.path(), &nats, "a0")).await;
    let watch = jetstream::new(async_nats::connect(nats.urls()).await.unwrap());
    wait_claims(&watch, "a0 holds every partition", |c| c.len() == 8).await;

    let u = url(&ingest);
    let mut by_addr = BTreeMap::new();
    let mut s = agent_stream(&u).await;
    welcome_seq(&mut s, "agent-0", 1, "gpu-0").await;
    let mut send = async |seq: u64| send_counted(&mut s, &mut by_addr, seq).await;
    for seq in 1..=10 {
        send(seq).await;
    }

    let a1 = AggregatorProcess::start(
        aggregator_config(dir.path(), &nats, "a1"),
        &format!("aggregator::before_consumers=1*return({HELD_MS})"),
    )
    .await;
    let even = BTreeMap::from([("a0".into(), 4), ("a1".into(), 4)]);
    wait_claims(&watch, "a1 claims a partition", |c| {
        c.values().any(|n| n == "a1")
    })
    .await;
    // The round that made a1's first claim is held (it may take the rest of its share in the
    // next, as a0 gives them up one by one). Until a1's consumers start, past the hold, no
    // claim of a1's is taken.
    let held = tokio::time::Instant::now();
    let deadline = held + Duration::from_millis(HELD_MS) + Duration::from_secs(30);
    let mut of_a1 = std::collections::BTreeSet::new();
    loop {
        let c = claims(&watch).await;
        for p in &of_a1 {
            assert_eq!(
                c.get(p).map(String::as_str),
                Some("a1"),
                "a1's partition {p} taken while its round was slow: {c:?}"
            );
        }
        of_a1.extend(c.iter().filter(|(_, n)| *n == "a1").map(|(p, _)| *p));
        let m = a1.metrics().await;
        if counts(&c) == even && metric(&m, "outflow_collector_cluster_partitions_held") == 4.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a1 never started its consumers: claims {c:?}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        held.elapsed() >= Duration::from_millis(HELD_MS) - Duration::from_millis(500),
        "a1's round was not held"
    );
    for seq in 11..=20 {
        send(seq).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    drained_to(&u, &watch, 8, &by_addr, deadline).await;
    assert_eq!(counts(&claims(&watch).await), even);
    let m = metrics(&a0).await;
    assert_eq!(
        metric(&m, "outflow_collector_cluster_rebuilds_total"),
        1.0,
        "a0 rebuilt once, giving a1 its share\n{m}"
    );
    // (a1 may have rebuilt once: a partition it claimed after its first ones joins them from
    // the stream's first part.)
    let m = a1.metrics().await;
    assert_eq!(
        metric(&m, "outflow_collector_cluster_membership_failures_total"),
        0.0,
        "{m}"
    );
    drop(s);
    a1.stop();
    for n in [ingest, a0] {
        n.shutdown().await.unwrap();
    }
}
