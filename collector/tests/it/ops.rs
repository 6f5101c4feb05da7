//! The operator interface: `/healthz` and `/readyz`, metrics `promtool check metrics` accepts,
//! the bounded top-N of clients (systemd's notifications: `tests/tests/systemd.rs`).
use std::time::Duration;

use outflow_proto::v1;
use outflow_testbed::tools::promtool_check;

use crate::common::*;

const TOP: &str = "outflow_collector_top_client_response_bytes";

/// The `(rank, client, bytes)` of every top-client series in `text`, by rank.
fn top_series(text: &str) -> Vec<(u32, String, u64)> {
    let mut v: Vec<(u32, String, u64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(TOP)?.strip_prefix('{'))
        .map(|l| {
            let (labels, value) = l.split_once("} ").unwrap_or_else(|| panic!("{l}"));
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("no {name} in {l}"))
                    .to_owned()
            };
            (
                label("rank").parse().unwrap(),
                label("client"),
                value.trim().parse().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn client(last: u8) -> [u8; 4] {
    [203, 0, 113, last]
}

#[tokio::test]
async fn health_promtool_and_a_bounded_top_of_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics.top_clients = 3;
    cfg.metrics.top_window = Duration::from_secs(600);
    let server = start(cfg).await;
    let u = url(&server);

    // (a) Serving: healthy and ready.
    assert_eq!(
        http_get(server.metrics_addr(), "/healthz").await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        http_get(server.metrics_addr(), "/readyz").await,
        (200, "ready\n".to_owned())
    );
    assert_eq!(http_get(server.metrics_addr(), "/nothing").await.0, 404);

    // No traffic yet: no top series at all.
    let text = metrics(&server).await;
    assert!(top_series(&text).is_empty(), "{text}");
    assert_eq!(metric(&text, "outflow_collector_ready "), 1.0, "{text}");

    // Five clients from two agents; client .1 in two batches. Sent (response bytes):
    // .1: 1000 + 7000 = 8000, .2: 5000, .3: 3000, .4: 9000, .5: 2000.
    let t = now_ms() - 5000;
    let mut a = agent_stream(&u).await;
    welcome_seq(&mut a, "agent-ops-a", 1, "gpu-a").await;
    a.batch(batch(
        1,
        t,
        vec![
            delta(client(1), 1000, 10, false),
            delta(client(2), 5000, 10, true),
        ],
    ))
    .await
    .unwrap();
    a.batch(batch(2, t + 1000, vec![delta(client(1), 7000, 10, true)]))
        .await
        .unwrap();
    let mut b = agent_stream(&u).await;
    welcome_seq(&mut b, "agent-ops-b", 1, "gpu-b").await;
    b.batch(batch(
        1,
        t,
        vec![
            delta(client(3), 3000, 10, true),
            delta(client(4), 9000, 10, true),
            delta(client(5), 2000, 10, true),
        ],
    ))
    .await
    .unwrap();

    // (c) Exactly three series: the three biggest, with the bytes sent.
    let text = metrics(&server).await;
    assert_eq!(
        top_series(&text),
        [
            (1, "203.0.113.4".to_owned(), 9000),
            (2, "203.0.113.1".to_owned(), 8000),
            (3, "203.0.113.2".to_owned(), 5000),
        ],
        "{text}"
    );
    // The same answer as `outflow-collector top -g client-address -w 10m -n 3`.
    let q = top(&u, v1::GroupBy::ClientAddress, v1::Window::Window10m, 3).await;
    let from_query: Vec<(String, u64)> = q
        .talkers
        .iter()
        .map(|t| (t.key.clone(), t.response_bytes))
        .collect();
    let from_metrics: Vec<(String, u64)> = top_series(&text)
        .into_iter()
        .map(|(_, c, b)| (c, b))
        .collect();
    assert_eq!(from_metrics, from_query);

    // (b) promtool accepts every metric (with labelled families and histograms filled).
    promtool_check(&text);
    // A scraper that asks for OpenMetrics (as Prometheus does) gets it, with the same series.
    let (status, om) = http_get_with(
        server.metrics_addr(),
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    )
    .await;
    assert_eq!(status, 200, "{om}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# TYPE outflow_collector_batches counter\n"),
        "{om}"
    );
    assert!(
        text.contains("# TYPE outflow_collector_batches_total counter\n"),
        "{text}"
    );
    assert_eq!(top_series(&om), top_series(&text));

    // Client .5 climbs to the top (2000 + 10000): .2 leaves, and its series with it.
    b.batch(batch(2, t + 1000, vec![delta(client(5), 10_000, 10, true)]))
        .await
        .unwrap();
    let text = metrics(&server).await;
    assert_eq!(
        top_series(&text),
        [
            (1, "203.0.113.5".to_owned(), 12_000),
            (2, "203.0.113.4".to_owned(), 9000),
            (3, "203.0.113.1".to_owned(), 8000),
        ],
        "{text}"
    );
    assert!(!text.contains("203.0.113.2"), "{text}");
    promtool_check(&text);

    a.close().await;
    b.close().await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn top_clients_zero_writes_no_series() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics.top_clients = 0;
    let server = start(cfg).await;
    let mut a = agent_stream(&url(&server)).await;
    welcome_seq(&mut a, "agent-ops-0", 1, "gpu-0").await;
    a.batch(batch(
        1,
        now_ms() - 5000,
        vec![delta(client(9), 100, 1, true)],
    ))
    .await
    .unwrap();
    let text = metrics(&server).await;
    assert!(!text.contains(TOP), "{text}");
    promtool_check(&text);
    a.close().await;
    server.shutdown().await.unwrap();
}
