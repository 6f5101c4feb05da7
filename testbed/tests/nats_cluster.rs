//! The NATS cluster the collector's cluster mode will run on, as the harness starts it: three
//! real `nats-server` nodes form a JetStream cluster; a stream replicated on all three takes a
//! message once however often it is published with the same message id; it keeps taking
//! messages with one node killed, and the node catches up when it comes back.
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use outflow_testbed::nats::NatsCluster;

async fn messages(js: &jetstream::Context, name: &str) -> u64 {
    let mut s = js.get_stream(name).await.expect("stream");
    s.info().await.expect("stream info").state.messages
}

async fn publish(js: &jetstream::Context, id: &str) -> jetstream::publish::PublishAck {
    js.send_publish(
        "deltas.p0",
        PublishMessage::build()
            .message_id(id)
            .payload(id.to_owned().into()),
    )
    .await
    .expect("publish")
    .await
    .expect("publish ack")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_jetstream_cluster_dedups_and_survives_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(3, dir.path());
    let client = async_nats::connect(cluster.urls()).await.expect("connect");
    let js = jetstream::new(client);
    // Every node says it is healthy, but on a loaded machine placing the stream's first RAFT
    // group can outlast JetStream's 10 s request timeout (CI saw it): ask again, as an ingest
    // node does, for up to a minute.
    let config = stream::Config {
        name: "DELTAS".into(),
        subjects: vec!["deltas.>".into()],
        num_replicas: 3,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let mut last = None;
    let created = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match js.get_or_create_stream(config.clone()).await {
                Ok(_) => return,
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(created.is_ok(), "create an R=3 stream in 60 s: {last:?}");

    let first = publish(&js, "agent-a/1/1").await;
    let again = publish(&js, "agent-a/1/1").await;
    assert!(!first.duplicate && again.duplicate, "{first:?} {again:?}");
    assert_eq!(again.sequence, first.sequence);
    assert_eq!(messages(&js, "DELTAS").await, 1);

    // One node of three down: the other two are a quorum.
    cluster.kill(0);
    assert!(!cluster.is_running(0));
    let client = async_nats::connect(cluster.node_url(1))
        .await
        .expect("connect to n1");
    let js = jetstream::new(client);
    // Until the stream has a leader again, a publish can go unanswered: publishing again with
    // the same message id is safe (what an ingest node does until it has the ack).
    let ack = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let sent = js
                .send_publish(
                    "deltas.p0",
                    PublishMessage::build().message_id("agent-a/1/2"),
                )
                .await;
            if let Ok(ack) = sent
                && let Ok(ack) = ack.await
            {
                return ack;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a publish acknowledged by the two nodes left, in 30 s");
    assert_eq!(ack.sequence, 2);
    assert_eq!(messages(&js, "DELTAS").await, 2);

    // Back, it holds both (asked of it alone, once it has caught up).
    cluster.restart(0);
    let client = async_nats::connect(cluster.node_url(0))
        .await
        .expect("connect to n0");
    let js0 = jetstream::new(client);
    let caught_up = async {
        loop {
            if let Ok(mut s) = js0.get_stream("DELTAS").await
                && let Ok(info) = s.info().await
                && info.state.messages == 2
                && info
                    .cluster
                    .as_ref()
                    .is_some_and(|c| c.replicas.iter().all(|r| r.current))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), caught_up)
        .await
        .expect("the restarted node caught up with both messages in 30 s");
}
