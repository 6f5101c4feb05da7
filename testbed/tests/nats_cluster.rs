//! The NATS cluster the collector's cluster mode will run on, as the harness starts it: three
//! real `nats-server` nodes form a JetStream cluster; a stream replicated on all three takes a
//! message once however often it is published with the same message id; it keeps taking
//! messages with one node killed, and the node catches up when it comes back; one cut off from
//! the network (its own namespace, its packets dropped) catches up when joined again.
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use outflow_testbed::nats::NatsCluster;

async fn messages(js: &jetstream::Context, name: &str) -> u64 {
    let mut s = js.get_stream(name).await.expect("stream");
    s.info().await.expect("stream info").state.messages
}

/// Publishes `id` once, sent again only while nothing answers it (no responders: the stream's
/// leader not yet listening on a node just after it was elected; nothing was stored, so the
/// first answer still says whether it was a duplicate), for up to 30 s.
async fn publish(js: &jetstream::Context, id: &str) -> jetstream::publish::PublishAck {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ack = js
            .send_publish(
                "deltas.p0",
                PublishMessage::build()
                    .message_id(id)
                    .payload(id.to_owned().into()),
            )
            .await
            .expect("publish")
            .await;
        match ack {
            Err(e)
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ack => return ack.expect("publish ack"),
        }
    }
}

/// The R=3 stream `DELTAS`, with a leader. Every node says it is healthy, but on a loaded
/// machine placing the stream's first RAFT group can outlast JetStream's 10 s request timeout
/// (CI saw it): asked again, as an ingest node does, for up to a minute. Created, it answers
/// publishes only once its group has elected a leader (CI saw the first publish refused as
/// "stream not found" just after the create): waited for, for the same minute.
async fn create_stream(js: &jetstream::Context) {
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
                Ok(mut stream) => match stream.info().await {
                    Ok(info) if info.cluster.as_ref().is_some_and(|c| c.leader.is_some()) => {
                        return;
                    }
                    Ok(_) => last = Some("created, no leader yet".to_owned()),
                    Err(e) => last = Some(e.to_string()),
                },
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(
        created.is_ok(),
        "create an R=3 stream with a leader in 60 s: {last:?}"
    );
}

/// Publishes `id` until it is acknowledged (30 s at most). Until the stream has a leader
/// again, a publish can go unanswered: publishing again with the same message id is safe
/// (what an ingest node does until it has the ack).
async fn publish_until_acked(js: &jetstream::Context, id: &str) -> jetstream::publish::PublishAck {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(sent) = js
                .send_publish("deltas.p0", PublishMessage::build().message_id(id))
                .await
                && let Ok(ack) = sent.await
            {
                return ack;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a publish acknowledged by the nodes left, in 30 s")
}

/// Waits (60 s at most) until the node `js` is connected to (alone) holds `n` messages of
/// `DELTAS` and says every replica is current.
async fn caught_up(js: &jetstream::Context, n: u64) {
    let caught_up = async {
        loop {
            if let Ok(mut s) = js.get_stream("DELTAS").await
                && let Ok(info) = s.info().await
                && info.state.messages == n
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
    tokio::time::timeout(Duration::from_secs(60), caught_up)
        .await
        .expect("the node caught up, in 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_jetstream_cluster_dedups_and_survives_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(3, dir.path());
    let client = async_nats::connect(cluster.urls()).await.expect("connect");
    let js = jetstream::new(client);
    create_stream(&js).await;

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
    let ack = publish_until_acked(&js, "agent-a/1/2").await;
    assert_eq!(ack.sequence, 2);
    assert_eq!(messages(&js, "DELTAS").await, 2);

    // Back, it holds both (asked of it alone, once it has caught up).
    cluster.restart(0);
    let client = async_nats::connect(cluster.node_url(0))
        .await
        .expect("connect to n0");
    caught_up(&jetstream::new(client), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_by_its_namespace_misses_messages_and_catches_up_when_joined() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start_with_island(3, dir.path(), "");
    let js = jetstream::new(
        async_nats::connect(cluster.node_url(0))
            .await
            .expect("connect"),
    );
    create_stream(&js).await;
    publish(&js, "agent-a/1/1").await;

    // Cut off, node 2 takes nothing (a client of its own waits), the two others go on.
    cluster.cut();
    let island = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(cluster.node_url(2))
        .await;
    assert!(island.is_err(), "connected to the node cut off");
    let ack = publish_until_acked(&js, "agent-a/1/2").await;
    assert_eq!(ack.sequence, 2);

    // Joined again, it holds both (asked of it alone).
    cluster.mend();
    let js2 = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(c) = async_nats::connect(cluster.node_url(2)).await {
                return jetstream::new(c);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("node 2 answers once joined, in 30 s");
    caught_up(&js2, 2).await;
}
