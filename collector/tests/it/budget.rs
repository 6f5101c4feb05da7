//! The key budget: one agent sending far more distinct clients than the budget holds cannot
//! take it all, every byte still counts exactly at the host and prefix levels, and the folds
//! are counted in the metrics; a restart holds the same.
use outflow_proto::v1;

use crate::common::*;

/// `n` distinct clients from 11.0.0.0/8, each in a /24 of its own, starting at `first`.
fn spread(first: u32, n: u32, bytes: u64) -> Vec<v1::ConnDelta> {
    (first..first + n)
        .map(|i| {
            let a = (0x0b00_0007 + (i << 8)).to_be_bytes();
            delta(a, bytes, 1, false)
        })
        .collect()
}

/// Response bytes of every row of a group in the 24 h window.
async fn group_total(u: &str, group: v1::GroupBy) -> (u64, usize) {
    let top = top(u, group, v1::Window::Window24h, 1000).await;
    let sum = top.talkers.iter().map(|t| t.response_bytes).sum();
    (sum, top.talkers.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_cannot_take_the_key_budget_and_totals_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_keys = 1000;
    cfg.limits.max_keys_per_agent_percent = 50;
    cfg.detect.enabled = false;
    let server = start(cfg.clone()).await;
    let u = url(&server);
    let t = now_ms() - 10_000;

    // The hostile agent: 3000 distinct clients in 3000 /24s, 6 times what its share holds.
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-a", 1, "gpu-a")).await.unwrap();
    for seq in 1..=3u64 {
        let first = (seq as u32 - 1) * 1000;
        a.batch(batch(seq, t + seq, spread(first, 1000, 100)))
            .await
            .unwrap();
    }
    // A well-behaved agent after it: 100 clients in two /24s.
    let mut b = agent_stream(&u).await;
    b.hello(hello("agent-b", 1, "gpu-b")).await.unwrap();
    let clients: Vec<[u8; 4]> = (0..100u8)
        .map(|i| {
            if i < 50 {
                [203, 0, 113, i]
            } else {
                [198, 51, 100, i]
            }
        })
        .collect();
    let deltas = clients.iter().map(|c| delta(*c, 7, 1, true)).collect();
    b.batch(batch(1, t + 10, deltas)).await.unwrap();

    let check = |server_metrics: String| {
        let held = metric(&server_metrics, "outflow_collector_budgeted_keys ");
        assert!(held <= 1000.0, "{held} keys held past the budget");
        assert_eq!(
            metric(&server_metrics, "outflow_collector_key_budget "),
            1000.0
        );
        held
    };
    let text = metrics(&server).await;
    let held = check(text.clone());
    // The agent's share: 500 of its client addresses, then nothing new of its own.
    assert_eq!(
        metric(
            &text,
            "outflow_collector_folded_keys_total{kind=\"address\"} "
        ),
        2500.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "outflow_collector_folded_keys_total{kind=\"prefix\"} "
        ),
        3000.0
    );
    assert_eq!(
        metric(
            &text,
            "outflow_collector_folded_response_bytes_total{kind=\"address\"} "
        ),
        2500.0 * 100.0
    );

    let totals = |u: String| async move {
        (
            group_total(&u, v1::GroupBy::Host).await,
            group_total(&u, v1::GroupBy::ClientPrefix).await,
            group_total(&u, v1::GroupBy::ClientAddress).await,
        )
    };
    let (hosts, prefixes, addresses) = totals(u.clone()).await;
    let sent = 3000 * 100 + 100 * 7;
    assert_eq!(hosts, (sent, 2));
    // Every byte once in the prefix group: B's two /24s and the /16s A's /24s folded into.
    assert_eq!(prefixes.0, sent);
    assert!(prefixes.1 > 2, "{prefixes:?}");
    // A's 500 addresses and all of B's.
    assert_eq!(addresses, (500 * 100 + 100 * 7, 600));
    for c in &clients {
        let a = std::net::Ipv4Addr::from(*c).to_string();
        let s = client_stats(&u, &a).await.unwrap();
        assert_eq!(s.windows[3].response_bytes, 7, "{a}");
    }

    // A restart holds the same keys and totals, and keeps the budget.
    server.shutdown().await.unwrap();
    let server = start(cfg).await;
    let u = url(&server);
    let text = metrics(&server).await;
    assert_eq!(check(text), held);
    assert_eq!(totals(u.clone()).await, (hosts, prefixes, addresses));
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-a", 1, "gpu-a")).await.unwrap();
    a.batch(batch(4, t + 20, spread(3000, 1000, 100)))
        .await
        .unwrap();
    let text = metrics(&server).await;
    check(text.clone());
    assert_eq!(
        metric(
            &text,
            "outflow_collector_folded_keys_total{kind=\"address\"} "
        ),
        1000.0
    );
    assert_eq!(
        group_total(&u, v1::GroupBy::Host).await.0,
        sent + 1000 * 100
    );
    server.shutdown().await.unwrap();
}
