//! Malformed and hostile input is refused with the right status, and the collector goes on
//! serving.
use outflow_proto::v1::{self, AgentMessage};
use tonic::Code;

use crate::common::*;

/// A batch from an agent whose clock is a day ahead is applied at the collector's time (not
/// refused, which would stop that agent for good), and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_from_a_clock_far_ahead_is_applied_at_the_latest_time_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let u = url(&server);
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-ahead", 1, "gpu-a")).await.unwrap();
    let ahead = now_ms() + 86_400_000;
    let b = batch(1, ahead, vec![delta([203, 0, 113, 44], 4_321, 1, false)]);
    assert_eq!(a.batch(b).await.unwrap(), 1);
    a.close().await;
    let stats = client_stats(&u, "203.0.113.44").await.unwrap();
    let minute = stats
        .windows
        .iter()
        .find(|w| w.window == v1::Window::Window1m as i32)
        .expect("a 1m window");
    assert_eq!(minute.response_bytes, 4_321, "in the current minute");
    let m = metrics(&server).await;
    assert_eq!(metric(&m, "outflow_collector_shifted_batches_total"), 1.0);
    server.shutdown().await.unwrap();
}

/// Opens a stream, says Hello (if `hello`), sends `msg`, returns the status that ends it.
async fn refused(u: &str, hello_first: bool, msg: AgentMessage) -> tonic::Status {
    let mut a = agent_stream(u).await;
    if hello_first {
        a.hello(hello("agent-h", 1, "gpu-h")).await.unwrap();
    }
    if let Err(e) = a.send(msg).await {
        return status(e);
    }
    match a.next().await {
        Ok(m) => panic!("accepted: {m:?}"),
        Err(e) => status(e),
    }
}

fn check(s: &tonic::Status, code: Code, message: &str) {
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(message),
        "{:?} does not contain {message:?}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_message_bytes = 1 << 20;
    let server = start(cfg).await;
    let u = url(&server);
    let t = now_ms() - 1000;
    let good = || delta([203, 0, 113, 9], 100, 1, false);

    let s = refused(&u, false, batch_msg(batch(1, t, vec![good()]))).await;
    check(&s, Code::FailedPrecondition, "Batch before Hello");

    let mut bad = good();
    bad.remote_addr = vec![1, 2, 3, 4, 5];
    let s = refused(
        &u,
        true,
        batch_msg(batch(1, t, vec![good(), good(), good(), bad])),
    )
    .await;
    check(
        &s,
        Code::InvalidArgument,
        "deltas[3].remote_addr: 5 bytes, want 4 or 16",
    );

    let mut bad = good();
    bad.remote_port = 70_000;
    let s = refused(&u, true, batch_msg(batch(1, t, vec![bad]))).await;
    check(&s, Code::InvalidArgument, "deltas[0].remote_port: 70000");

    let s = refused(&u, true, batch_msg(batch(0, t, vec![good()]))).await;
    check(&s, Code::InvalidArgument, "seq: must be at least 1");

    let mut b = batch(1, t, vec![good()]);
    b.start_ms = t + 1;
    let s = refused(&u, true, batch_msg(b)).await;
    check(&s, Code::InvalidArgument, "end_ms:");

    let s = refused(
        &u,
        true,
        batch_msg(batch(1, t, vec![v1::ConnDelta::default(); 100_001])),
    )
    .await;
    check(
        &s,
        Code::InvalidArgument,
        "deltas: 100001 deltas, at most 100000",
    );

    let mut big = good();
    big.cgroup = "x".repeat(2 << 20);
    let s = refused(&u, true, batch_msg(batch(1, t, vec![big]))).await;
    check(&s, Code::ResourceExhausted, "too large");

    let s = refused(&u, true, AgentMessage { msg: None }).await;
    check(&s, Code::InvalidArgument, "msg: empty AgentMessage");

    let s = refused(&u, true, hello_msg("agent-h", 1, "gpu-h")).await;
    check(&s, Code::FailedPrecondition, "second Hello");

    let s = refused(&u, false, hello_msg("agent-h", 0, "gpu-h")).await;
    check(&s, Code::InvalidArgument, "epoch: must not be 0");

    let s = refused(&u, false, hello_msg(&"x".repeat(200), 1, "gpu-h")).await;
    check(
        &s,
        Code::InvalidArgument,
        "agent_id: more than 128 characters",
    );

    // Acks of what came before an error are sent before the error.
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-h", 1, "gpu-h")).await.unwrap();
    a.send_batch(batch(1, t, vec![good()])).await.unwrap();
    a.send_batch(batch(2, t, vec![v1::ConnDelta::default()]))
        .await
        .unwrap();
    assert_eq!(a.next_ack().await.unwrap(), 1);
    check(
        &status(a.next().await.unwrap_err()),
        Code::InvalidArgument,
        "deltas[0].local_addr",
    );

    // Still serving: a well-behaved agent and a query work.
    let mut a = agent_stream(&u).await;
    assert_eq!(welcome_seq(&mut a, "agent-h", 1, "gpu-h").await, 1);
    assert_eq!(a.batch(batch(2, t, vec![good()])).await.unwrap(), 2);
    a.close().await;
    let r = client_stats(&u, "203.0.113.9").await.unwrap();
    assert_eq!(r.windows[0].response_bytes, 200);

    // Query input is checked too.
    let e = client_stats(&u, "10.0.0.0/16").await.unwrap_err();
    check(&e, Code::InvalidArgument, "client: /16 is not aggregated");
    let e = client_stats(&u, "192.0.2.77").await.unwrap_err();
    check(&e, Code::NotFound, "192.0.2.77");
    let e = query(&u)
        .await
        .top_talkers(v1::TopTalkersRequest {
            group_by: 0,
            window: 1,
            limit: 0,
        })
        .await
        .unwrap_err();
    check(&e, Code::InvalidArgument, "group_by: unspecified");
    let e = query(&u)
        .await
        .top_talkers(v1::TopTalkersRequest {
            group_by: 1,
            window: 1,
            limit: 1001,
        })
        .await
        .unwrap_err();
    check(&e, Code::InvalidArgument, "limit: 1001, at most 1000");

    let m = metrics(&server).await;
    assert_eq!(
        metric(
            &m,
            "outflow_collector_rejects_total{reason=\"invalid_argument\"}"
        ),
        9.0
    );
    assert_eq!(
        metric(
            &m,
            "outflow_collector_rejects_total{reason=\"failed_precondition\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(&m, "outflow_collector_rejects_total{reason=\"too_large\"}"),
        1.0
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_gives_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.batches_per_second = 0.5;
    cfg.limits.batch_burst = 3;
    let server = start(cfg).await;
    let u = url(&server);
    let t = now_ms() - 1000;
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-r", 1, "gpu-r")).await.unwrap();
    for seq in 1..=3 {
        assert_eq!(a.batch(batch(seq, t, vec![])).await.unwrap(), seq);
    }
    let s = status(a.batch(batch(4, t, vec![])).await.unwrap_err());
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("agent-r: rate limit"), "{s:?}");
    // The limit is per agent, across streams; other agents are not affected.
    let mut a = agent_stream(&u).await;
    assert_eq!(welcome_seq(&mut a, "agent-r", 1, "gpu-r").await, 3);
    assert_eq!(
        status(a.batch(batch(4, t, vec![])).await.unwrap_err()).code(),
        Code::ResourceExhausted
    );
    let mut b = agent_stream(&u).await;
    b.hello(hello("agent-other", 1, "gpu-o")).await.unwrap();
    assert_eq!(b.batch(batch(1, t, vec![])).await.unwrap(), 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_hold_more_streams_than_allowed_nor_a_silent_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_streams_per_peer = 2;
    cfg.limits.hello_timeout = std::time::Duration::from_millis(300);
    let server = start(cfg).await;
    let u = url(&server);

    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-1", 1, "gpu-1")).await.unwrap();
    let mut b = agent_stream(&u).await;
    b.hello(hello("agent-2", 1, "gpu-2")).await.unwrap();
    let e = status(
        IngestStream::open(channel(&u).await, None)
            .await
            .err()
            .unwrap(),
    );
    check(&e, Code::ResourceExhausted, "limits.max_streams_per_peer");
    // A stream that ends frees its place.
    b.close().await;
    let mut c = agent_stream(&u).await;
    c.hello(hello("agent-3", 1, "gpu-3")).await.unwrap();
    c.close().await;

    // A stream that never says Hello is ended, and frees its place too.
    let mut silent = agent_stream(&u).await;
    let s = status(silent.next().await.unwrap_err());
    check(
        &s,
        Code::FailedPrecondition,
        "no Hello within limits.hello_timeout",
    );
    let mut d = agent_stream(&u).await;
    d.hello(hello("agent-4", 1, "gpu-4")).await.unwrap();
    let text = metrics(&server).await;
    assert_eq!(
        metric(
            &text,
            "outflow_collector_rejects_total{reason=\"too_many_streams\"} "
        ),
        1.0
    );
    // The first stream, idle after its Hello all along, still works.
    let t = now_ms() - 1000;
    assert_eq!(
        a.batch(batch(1, t, vec![delta([203, 0, 113, 9], 5, 1, false)]))
            .await
            .unwrap(),
        1
    );
    server.shutdown().await.unwrap();
}
