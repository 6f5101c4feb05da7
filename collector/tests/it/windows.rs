//! Batches spread over more than 24 h of batch time land in the right windows.
//!
//! The rule (see the `window` module): a window of length L kept in buckets of width g that
//! ends at E, the newest batch time, holds the batches with floor(E / g) * g - L <= t <= E.
use std::collections::{BTreeMap, BTreeSet};

use outflow_proto::v1;
use tonic::Code;

use crate::common::*;

const S: u64 = 1000;
const M: u64 = 60 * S;
const H: u64 = 60 * M;

/// (window, L, g), independent of the collector's own code.
const WINDOWS: [(v1::Window, u64, u64); 4] = [
    (v1::Window::Window1m, M, 10 * S),
    (v1::Window::Window10m, 10 * M, M),
    (v1::Window::Window1h, H, 5 * M),
    (v1::Window::Window24h, 24 * H, H),
];

fn in_window(end: u64, l: u64, g: u64, t: u64) -> bool {
    t >= end / g * g - l && t <= end
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_land_in_windows_by_batch_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let u = url(&server);
    // E: not on any bucket boundary (25 min 37 s past an hour), three hours ago.
    let end = (now_ms() - 3 * H) / H * H + 25 * M + 37 * S;
    // Ages around every window's start: 1m starts at E-67s, 10m at E-637s, 1h at E-3637s,
    // 24h at E-24h-25m37s.
    let ages = [
        0,
        20 * S,
        60 * S,
        66 * S,
        68 * S,
        5 * M,
        10 * M + 30 * S,
        10 * M + 40 * S,
        30 * M,
        60 * M + 30 * S,
        60 * M + 40 * S,
        23 * H,
        24 * H + 20 * M,
        24 * H + 30 * M,
        30 * H,
    ];
    // Send oldest first, except a late one (5 min old) after the newest, and the 30 h old
    // one at the very end (older than every window: not kept at all).
    let mut order: Vec<usize> = (0..ages.len())
        .rev()
        .filter(|&i| i != 5 && i != 14)
        .collect();
    order.extend([5, 14]);
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-w", 1, "gpu-w")).await.unwrap();
    for (seq, &i) in order.iter().enumerate() {
        let client = [203, 0, 113, i as u8];
        let b = batch(
            seq as u64 + 1,
            end - ages[i],
            vec![delta(client, 1 << i, 1, true)],
        );
        assert_eq!(a.batch(b).await.unwrap(), seq as u64 + 1);
    }
    a.close().await;

    check(&u, end, &ages, false).await;
    server.shutdown().await.unwrap();
    let server = start(config(dir.path())).await;
    check(&url(&server), end, &ages, true).await;
    server.shutdown().await.unwrap();
}

async fn check(u: &str, end: u64, ages: &[u64], restart: bool) {
    for (w, l, g) in WINDOWS {
        let want: BTreeSet<usize> = (0..ages.len())
            .filter(|&i| in_window(end, l, g, end - ages[i]))
            .collect();
        let r = top(u, v1::GroupBy::ClientAddress, w, 1000).await;
        assert_eq!(r.window_end_ms, end);
        let got: BTreeMap<String, u64> = r
            .talkers
            .iter()
            .map(|t| (t.key.clone(), t.response_bytes))
            .collect();
        let want_map: BTreeMap<String, u64> = want
            .iter()
            .map(|&i| (format!("203.0.113.{i}"), 1 << i))
            .collect();
        assert_eq!(got, want_map, "{w:?} (restart: {restart})");
        let host = top(u, v1::GroupBy::Host, w, 10).await;
        let sum: u64 = want.iter().map(|&i| 1u64 << i).sum();
        assert_eq!(host.talkers.len(), 1);
        assert_eq!(host.talkers[0].response_bytes, sum, "{w:?}");
        assert_eq!(
            host.talkers[0].connections_closed,
            want.len() as u64,
            "{w:?}"
        );
        let prefix = top(u, v1::GroupBy::ClientPrefix, w, 10).await;
        assert_eq!(prefix.talkers[0].key, "203.0.113.0/24");
        assert_eq!(prefix.talkers[0].response_bytes, sum, "{w:?}");
        assert_eq!(prefix.talkers[0].hosts, 1);
    }
    for (i, age) in ages.iter().enumerate() {
        let r = client_stats(u, &format!("203.0.113.{i}")).await;
        if !in_window(end, 24 * H, H, end - age) {
            assert_eq!(r.unwrap_err().code(), Code::NotFound, "age {age}");
            continue;
        }
        let r = r.unwrap();
        assert_eq!(r.windows.len(), 4);
        for (stats, (w, l, g)) in r.windows.iter().zip(WINDOWS) {
            assert_eq!(stats.window, w as i32);
            let inside = in_window(end, l, g, end - age);
            assert_eq!(
                stats.response_bytes,
                if inside { 1 << i } else { 0 },
                "{i} {w:?}"
            );
            assert_eq!(stats.hosts, u32::from(inside), "{i} {w:?}");
        }
    }
}
