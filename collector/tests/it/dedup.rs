//! Each batch is applied once: resent on the same stream, on a new stream, and after a restart
//! of the collector on the same data directory; totals survive the restart.
use outflow_proto::v1;

use crate::common::*;

async fn totals(u: &str, client: &str) -> (u64, u64, u64, u32) {
    let r = client_stats(u, client).await.unwrap();
    let w = r
        .windows
        .iter()
        .find(|w| w.window == v1::Window::Window24h as i32)
        .unwrap();
    (
        w.response_bytes,
        w.request_bytes,
        w.connections_closed,
        w.hosts,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_apply_once_across_streams_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let t = now_ms() - 60_000;
    let c = [203, 0, 113, 7];
    let b1 = batch(1, t, vec![delta(c, 1000, 10, false)]);
    let b2 = batch(2, t + 1000, vec![delta(c, 500, 5, true)]);

    let server = start(config(dir.path())).await;
    let u = url(&server);
    let mut a = agent_stream(&u).await;
    assert_eq!(welcome_seq(&mut a, "agent-1", 7, "gpu-1").await, 0);
    assert_eq!(a.batch(b1.clone()).await.unwrap(), 1);
    assert_eq!(a.batch(b2.clone()).await.unwrap(), 2);
    // Resent on the same stream: acknowledged, not applied.
    assert_eq!(a.batch(b1.clone()).await.unwrap(), 1);
    a.close().await;
    // Resent on a new stream, after the Welcome told the agent it was applied.
    let mut a = agent_stream(&u).await;
    assert_eq!(welcome_seq(&mut a, "agent-1", 7, "gpu-1").await, 2);
    assert_eq!(a.batch(b2.clone()).await.unwrap(), 2);
    a.close().await;
    assert_eq!(totals(&u, "203.0.113.7").await, (1500, 15, 1, 1));
    let m = metrics(&server).await;
    assert_eq!(metric(&m, "outflow_collector_batches_total"), 2.0);
    assert_eq!(metric(&m, "outflow_collector_deltas_total"), 2.0);
    assert_eq!(metric(&m, "outflow_collector_duplicate_batches_total"), 2.0);
    server.shutdown().await.unwrap();

    // Restart on the same data directory.
    let server = start(config(dir.path())).await;
    let u = url(&server);
    assert_eq!(totals(&u, "203.0.113.7").await, (1500, 15, 1, 1));
    assert_eq!(totals(&u, "203.0.113.0/24").await, (1500, 15, 1, 1));
    let mut a = agent_stream(&u).await;
    assert_eq!(welcome_seq(&mut a, "agent-1", 7, "gpu-1").await, 2);
    assert_eq!(a.batch(b1.clone()).await.unwrap(), 1);
    assert_eq!(a.batch(b2.clone()).await.unwrap(), 2);
    // A gap (the agent lost batches 3 and 4, and says so) is accepted ...
    let mut b5 = batch(5, t + 2000, vec![delta(c, 1, 1, false)]);
    b5.lost_batches = 2;
    b5.lost = Some(v1::Counters {
        bytes_out: 4_000,
        ..Default::default()
    });
    // Bytes of connections the agent's table had no slot for: counted, in no client.
    b5.overflow = Some(v1::Counters {
        bytes_out: 700,
        ..Default::default()
    });
    assert_eq!(a.batch(b5).await.unwrap(), 5);
    // ... and a late batch 3 is then a duplicate.
    assert_eq!(
        a.batch(batch(3, t + 1500, vec![delta(c, 99, 99, false)]))
            .await
            .unwrap(),
        3
    );
    a.close().await;
    // A new epoch starts its numbering over.
    let mut a = agent_stream(&u).await;
    assert_eq!(welcome_seq(&mut a, "agent-1", 8, "gpu-1").await, 0);
    assert_eq!(
        a.batch(batch(1, t + 3000, vec![delta(c, 10, 0, false)]))
            .await
            .unwrap(),
        1
    );
    a.close().await;
    assert_eq!(totals(&u, "203.0.113.7").await, (1511, 16, 1, 1));
    let m = metrics(&server).await;
    assert_eq!(metric(&m, "outflow_collector_lost_batches_total"), 2.0);
    assert_eq!(
        metric(&m, "outflow_collector_lost_response_bytes_total"),
        4000.0
    );
    assert_eq!(
        metric(&m, "outflow_collector_unattributed_response_bytes_total"),
        700.0
    );
    assert_eq!(metric(&m, "outflow_collector_duplicate_batches_total"), 3.0);
    assert_eq!(metric(&m, "outflow_collector_agents_connected"), 0.0);
    server.shutdown().await.unwrap();

    // Once more: everything acknowledged is still there.
    let server = start(config(dir.path())).await;
    assert_eq!(totals(&url(&server), "203.0.113.7").await, (1511, 16, 1, 1));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_batches_are_acked_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let u = url(&server);
    let t = now_ms() - 60_000;
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-p", 1, "gpu-p")).await.unwrap();
    for seq in 1..=40u64 {
        a.send_batch(batch(
            seq,
            t + seq,
            vec![delta([192, 0, 2, 1], seq, 0, false)],
        ))
        .await
        .unwrap();
    }
    for seq in 1..=40u64 {
        assert_eq!(a.next_ack().await.unwrap(), seq);
    }
    a.close().await;
    let top = top(&u, v1::GroupBy::Host, v1::Window::Window1m, 0).await;
    assert_eq!(top.talkers.len(), 1);
    assert_eq!(top.talkers[0].key, "gpu-p");
    assert_eq!(top.talkers[0].response_bytes, (1..=40).sum::<u64>());
    server.shutdown().await.unwrap();
}
