//! Health, reflection, garbage collection of old keys, and a stop with agents connected.
use std::time::{Duration, Instant};

use outflow_proto::v1;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let ch = channel(&url(&server)).await;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["outflow.v1.Ingest", "outflow.v1.Query"] {
        let s = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            s.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    let mut r = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "outflow.v1.Ingest",
        "outflow.v1.Query",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_agent_streams_with_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let u = url(&server);
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-s", 1, "gpu-s")).await.unwrap();
    assert_eq!(
        a.batch(batch(1, now_ms(), vec![delta([192, 0, 2, 3], 1, 1, false)]))
            .await
            .unwrap(),
        1
    );
    let t0 = Instant::now();
    let stop = tokio::spawn(server.shutdown());
    let e = status(a.next().await.unwrap_err());
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    stop.await.unwrap().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t0.elapsed()
    );
    // What was acknowledged is there after the stop.
    let server = start(config(dir.path())).await;
    let r = client_stats(&url(&server), "192.0.2.3").await.unwrap();
    assert_eq!(r.windows[3].response_bytes, 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_older_than_every_window_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.store.gc_interval = Duration::from_secs(1);
    let server = start(cfg.clone()).await;
    let u = url(&server);
    let t = now_ms() - 30 * 3_600_000;
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-g", 1, "gpu-g")).await.unwrap();
    a.batch(batch(1, t, vec![delta([198, 51, 100, 1], 1, 1, false)]))
        .await
        .unwrap();
    // 25 h later: 198.51.100.1 has left every window.
    a.batch(batch(
        2,
        t + 25 * 3_600_000,
        vec![delta([198, 51, 100, 2], 2, 2, false)],
    ))
    .await
    .unwrap();
    assert_eq!(
        client_stats(&u, "198.51.100.1").await.unwrap_err().code(),
        Code::NotFound
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The writer collects after its next commit (and after that commit's Ack).
    a.batch(batch(3, t + 25 * 3_600_000, vec![])).await.unwrap();
    a.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(&server).await;
        if metric(&m, "outflow_collector_keys{group=\"client-address\"}") == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no collection:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await.unwrap();
    let server = start(cfg).await;
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "outflow_collector_keys{group=\"client-address\"}"),
        1.0,
        "{m}"
    );
    let top = top(
        &url(&server),
        v1::GroupBy::ClientAddress,
        v1::Window::Window24h,
        10,
    )
    .await;
    assert_eq!(top.talkers.len(), 1);
    assert_eq!(top.talkers[0].key, "198.51.100.2");
    server.shutdown().await.unwrap();
}
