//! `outflow.v1.Feed`: the Python consumer we ship (`clients/python/outflow_follow.py`, with
//! code generated from our protos by grpcio-tools) gets every applied batch once, in order,
//! also across its restarts from its saved position, and the bytes it sees are the ground
//! truth and what Query answers; a follower behind the buffer and one of a previous run are
//! told what they missed; filters; refusals.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use outflow_collector::{Config, Server};
use outflow_proto::v1::{self, feed_client::FeedClient, feed_event::Event};
use outflow_testbed::tools::{venv_python, workspace_root};
use serde_json::Value;
use tonic::Code;

use crate::common::*;

const T0: u64 = 1_750_000_000_000;

/// Agents, hosts and clients of the traffic: agent `i` on host `gpu-i`.
const AGENTS: [&str; 3] = ["feed-a", "feed-b", "feed-c"];
const CLIENTS: [[u8; 4]; 4] = [
    [203, 0, 113, 7],
    [203, 0, 113, 8],
    [198, 51, 100, 1],
    [192, 0, 2, 44],
];

/// Batch `seq` of agent `a`: a delta to each client, with bytes that differ per agent, client
/// and seq; the closing one in batch 10.
fn traffic_batch(a: usize, seq: u64) -> v1::Batch {
    let deltas = CLIENTS
        .iter()
        .enumerate()
        .map(|(c, addr)| {
            let out = 1000 * (a as u64 + 1) + 100 * c as u64 + seq;
            let mut d = delta(*addr, out, seq, seq == 10);
            d.conn_id = (a * 100 + c) as u64;
            d
        })
        .collect();
    batch(seq, T0 + seq * 10_000, deltas)
}

/// Response bytes per client address of batches `seqs` of every agent.
fn truth(seqs: std::ops::RangeInclusive<u64>) -> BTreeMap<String, u64> {
    let mut t = BTreeMap::new();
    for a in 0..AGENTS.len() {
        for seq in seqs.clone() {
            for d in traffic_batch(a, seq).deltas {
                let addr = std::net::Ipv4Addr::from(<[u8; 4]>::try_from(d.remote_addr).unwrap());
                *t.entry(addr.to_string()).or_default() += d.counters.unwrap().bytes_out;
            }
        }
    }
    t
}

/// Applies batches `seqs` of every agent, through the collector's session (the same path as
/// an Ingest stream).
async fn send(server: &Server, seqs: std::ops::RangeInclusive<u64>) {
    for (a, agent) in AGENTS.iter().enumerate() {
        let mut s = server.collector().session();
        s.handle(hello_msg(agent, 1, &format!("gpu-{a}")))
            .await
            .unwrap();
        for seq in seqs.clone() {
            s.handle(batch_msg(traffic_batch(a, seq))).await.unwrap();
        }
    }
}

fn feed_config(dir: &Path) -> Config {
    let mut c = replay_config(dir);
    c.feed.buffer_entries = 1_000_000;
    c.feed.deltas = true;
    c
}

/// Runs the consumer to its exit; its JSON lines.
fn consumer(server: &Server, args: &[&str]) -> Vec<Value> {
    let python = venv_python(&["grpc", "grpc_tools"]);
    let script = workspace_root().join("clients/python/outflow_follow.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(server.addr().to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} {args:?}: {}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("consumer printed {l:?}: {e}")))
        .collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_consumer_gets_every_applied_batch_once_across_its_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(feed_config(dir.path())).await;
    let state = dir.path().join("follow.json");
    let state = state.to_str().unwrap();
    let common = [
        "--state",
        state,
        "--start",
        "oldest",
        "--include-deltas",
        "--group",
        "client-address",
        "--group",
        "host",
    ];

    send(&server, 1..=5).await;
    let consumer_at = |max: &'static str| {
        let mut args = common.to_vec();
        args.extend(["--max-batches", max]);
        args
    };
    let first = tokio::task::block_in_place(|| consumer(&server, &consumer_at("15")));
    // Applied meanwhile: the rest, and batch 3 of feed-a again (a duplicate: not applied, not
    // in the feed).
    send(&server, 6..=10).await;
    let mut again = server.collector().session();
    again
        .handle(hello_msg(AGENTS[0], 1, "gpu-0"))
        .await
        .unwrap();
    again.handle(batch_msg(traffic_batch(0, 3))).await.unwrap();
    let second = tokio::task::block_in_place(|| consumer(&server, &consumer_at("15")));
    assert_eq!(
        server.collector().feed().newest(),
        30,
        "the duplicate is not in the feed"
    );

    let events: Vec<&Value> = first.iter().chain(&second).collect();
    assert!(
        events.iter().all(|e| e["type"] == "batch"),
        "no gap: {events:?}"
    );
    let positions: Vec<u64> = events.iter().map(|e| u(&e["position"])).collect();
    assert_eq!(
        positions,
        (1..=30).collect::<Vec<_>>(),
        "each position once, in order"
    );
    let run = u(&events[0]["run_id"]);
    assert_eq!(run, server.collector().feed().run_id());
    let batches: BTreeSet<(String, u64, u64)> = events
        .iter()
        .map(|e| {
            assert_eq!(u(&e["run_id"]), run);
            (
                e["agent_id"].as_str().unwrap().to_owned(),
                u(&e["epoch"]),
                u(&e["seq"]),
            )
        })
        .collect();
    let want: BTreeSet<_> = AGENTS
        .iter()
        .flat_map(|a| (1..=10).map(move |s| (a.to_string(), 1, s)))
        .collect();
    assert_eq!(batches, want, "every applied batch once");

    // The deltas as the agents sent them, and the totals per client, are the ground truth,
    // and what Query has.
    let mut by_deltas = BTreeMap::<String, u64>::new();
    let mut by_totals = BTreeMap::<String, u64>::new();
    let mut by_host = BTreeMap::<String, u64>::new();
    for e in &events {
        for d in e["deltas"].as_array().unwrap() {
            *by_deltas
                .entry(d["client"].as_str().unwrap().into())
                .or_default() += u(&d["bytes_out"]);
        }
        for t in e["totals"].as_array().unwrap() {
            let m = match t["group"].as_str().unwrap() {
                "client-address" => &mut by_totals,
                "host" => &mut by_host,
                g => panic!("group {g} not asked for"),
            };
            *m.entry(t["key"].as_str().unwrap().into()).or_default() += u(&t["response_bytes"]);
        }
    }
    let truth = truth(1..=10);
    assert_eq!(by_deltas, truth);
    assert_eq!(by_totals, truth);
    let u_ = url(&server);
    for (client, bytes) in &truth {
        let stats = client_stats(&u_, client).await.unwrap();
        let day = stats
            .windows
            .iter()
            .find(|w| w.window == v1::Window::Window24h as i32)
            .unwrap();
        assert_eq!(day.response_bytes, *bytes, "{client}: Query");
    }
    assert_eq!(by_host.len(), 3);
    assert_eq!(by_host.values().sum::<u64>(), truth.values().sum::<u64>());

    // Nothing more: a third run has nothing after its position.
    let rest = tokio::task::block_in_place(|| {
        let mut args = common.to_vec();
        args.extend(["--idle-exit", "1"]);
        consumer(&server, &args)
    });
    assert!(rest.is_empty(), "{rest:?}");
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "outflow_collector_feed_sent_batches_total "),
        30.0
    );
    assert_eq!(
        metric(&m, "outflow_collector_feed_gap_positions_total "),
        0.0
    );
    server.shutdown().await.unwrap();
}

async fn follow(server: &Server, r: v1::FollowRequest) -> tonic::Streaming<v1::FeedEvent> {
    FeedClient::new(channel(&url(server)).await)
        .follow(r)
        .await
        .unwrap_or_else(|e| panic!("follow: {e}"))
        .into_inner()
}

async fn next(s: &mut tonic::Streaming<v1::FeedEvent>) -> Event {
    tokio::time::timeout(Duration::from_secs(30), s.message())
        .await
        .expect("an event within 30 s")
        .unwrap()
        .expect("the stream goes on")
        .event
        .unwrap()
}

fn batch_of(e: Event) -> v1::AppliedBatch {
    match e {
        Event::Batch(b) => b,
        Event::Gap(g) => panic!("want a batch, got {g:?}"),
    }
}

#[tokio::test]
async fn followers_are_told_what_they_missed_filtered_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = replay_config(dir.path());
    // A batch of one agent is 1 + 4 clients + 3 prefixes + host + workload = 10 entries:
    // the buffer holds the newest two.
    cfg.feed.buffer_entries = 20;
    let server = start(cfg.clone()).await;
    let run = server.collector().feed().run_id();

    // Live: a follower from the newest gets what is applied after it came.
    let mut live = follow(&server, v1::FollowRequest::default()).await;
    let mut s = server.collector().session();
    s.handle(hello_msg(AGENTS[0], 1, "gpu-0")).await.unwrap();
    s.handle(batch_msg(traffic_batch(0, 1))).await.unwrap();
    let b = batch_of(next(&mut live).await);
    assert_eq!((b.run_id, b.position, b.seq), (run, 1, 1));
    drop(live);
    // Gone before more comes (it would see a gap of its own).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric(&metrics(&server).await, "outflow_collector_feed_followers ") != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower did not go"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // feed-a's batch 1 again is a duplicate: positions 2 to 6.
    send(&server, 1..=2).await;
    // 6 batches applied, 2 held: a follower from position 1 misses 2..=4.
    let mut behind = follow(
        &server,
        v1::FollowRequest {
            run_id: run,
            after: 1,
            ..Default::default()
        },
    )
    .await;
    match next(&mut behind).await {
        Event::Gap(g) => {
            assert_eq!((g.run_id, g.from_position, g.to_position), (run, 2, 4));
            assert!(g.reason.contains("feed.buffer_entries"), "{}", g.reason);
        }
        e => panic!("want a gap, got {e:?}"),
    }
    assert_eq!(batch_of(next(&mut behind).await).position, 5);
    assert_eq!(batch_of(next(&mut behind).await).position, 6);
    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "outflow_collector_feed_gap_positions_total "),
        3.0
    );
    assert!(metric(&m, "outflow_collector_feed_dropped_batches_total ") >= 4.0);

    // Filters: one host, host and workload totals, big totals only.
    send(&server, 3..=3).await;
    let mut filtered = follow(
        &server,
        v1::FollowRequest {
            start: v1::FollowStart::Oldest.into(),
            hosts: vec!["gpu-1".into()],
            groups: vec![v1::GroupBy::Host.into(), v1::GroupBy::Workload.into()],
            min_response_bytes: 1,
            ..Default::default()
        },
    )
    .await;
    let b = batch_of(next(&mut filtered).await);
    assert_eq!((b.host.as_str(), b.seq), ("gpu-1", 3));
    let keys: Vec<(i32, &str)> = b.totals.iter().map(|t| (t.group, t.key.as_str())).collect();
    assert_eq!(
        keys,
        [
            (v1::GroupBy::Host as i32, "gpu-1"),
            (
                v1::GroupBy::Workload as i32,
                "gpu-1//system.slice/vllm.service/vllm"
            ),
        ]
    );
    let sent: u64 = traffic_batch(1, 3)
        .deltas
        .iter()
        .map(|d| d.counters.unwrap().bytes_out)
        .sum();
    assert_eq!(b.totals[0].response_bytes, sent);
    assert!(b.deltas.is_empty());

    // Refusals, each naming what to do.
    let mut client = FeedClient::new(channel(&url(&server)).await);
    let refused = |r: v1::FollowRequest| {
        let mut client = client.clone();
        async move { client.follow(r).await.expect_err("refused") }
    };
    let e = refused(v1::FollowRequest {
        include_deltas: true,
        ..Default::default()
    })
    .await;
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("feed.deltas = true"),
        "{}",
        e.message()
    );
    let e = refused(v1::FollowRequest {
        run_id: run,
        after: 1000,
        ..Default::default()
    })
    .await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("beyond the newest"), "{}", e.message());
    let e = refused(v1::FollowRequest {
        groups: vec![42],
        ..Default::default()
    })
    .await;
    assert_eq!(e.code(), Code::InvalidArgument);
    let _ = client.follow(v1::FollowRequest::default()).await.unwrap();

    // After a restart, a follower of the old run hears so, then gets the new run from its
    // first position.
    server.shutdown().await.unwrap();
    let server = start(cfg).await;
    let new_run = server.collector().feed().run_id();
    assert_ne!(new_run, run);
    send(&server, 4..=4).await;
    let mut old = follow(
        &server,
        v1::FollowRequest {
            run_id: run,
            after: 9,
            ..Default::default()
        },
    )
    .await;
    match next(&mut old).await {
        Event::Gap(g) => {
            assert_eq!((g.run_id, g.from_position, g.to_position), (run, 0, 0));
            assert!(g.reason.contains("restarted"), "{}", g.reason);
        }
        e => panic!("want a gap, got {e:?}"),
    }
    // 3 batches applied, 2 held: position 1 is a gap of the new run.
    match next(&mut old).await {
        Event::Gap(g) => assert_eq!((g.run_id, g.from_position, g.to_position), (new_run, 1, 1)),
        e => panic!("want a gap, got {e:?}"),
    }
    let b = batch_of(next(&mut old).await);
    assert_eq!((b.run_id, b.position, b.seq), (new_run, 2, 4));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_consumer_reconnects_by_itself_across_a_collector_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = feed_config(dir.path());
    cfg.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = start(cfg.clone()).await;
    let state = dir.path().join("follow.json");
    let python = venv_python(&["grpc", "grpc_tools"]);
    let child = Command::new(python)
        .arg(workspace_root().join("clients/python/outflow_follow.py"))
        .arg(server.addr().to_string())
        .args(["--start", "oldest", "--max-batches", "6", "--state"])
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    send(&server, 1..=1).await;
    let position = || {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .map_or(0, |v| u(&v["position"]))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while position() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the consumer did not get 3 batches"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let old_run = server.collector().feed().run_id();
    server.shutdown().await.unwrap();
    let server = start(cfg).await;
    send(&server, 2..=2).await;
    let out = tokio::task::block_in_place(|| child.wait_with_output()).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    assert!(stderr.contains("reconnecting"), "{stderr}");
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seen: Vec<(String, u64, u64)> = events
        .iter()
        .map(|e| match e["type"].as_str().unwrap() {
            "batch" => ("batch".into(), u(&e["run_id"]), u(&e["seq"])),
            _ => ("gap".into(), u(&e["run_id"]), u(&e["from_position"])),
        })
        .collect();
    let new_run = server.collector().feed().run_id();
    let b = |run, seq| ("batch".to_owned(), run, seq);
    assert_eq!(
        seen,
        [
            b(old_run, 1),
            b(old_run, 1),
            b(old_run, 1),
            ("gap".into(), old_run, 0),
            b(new_run, 2),
            b(new_run, 2),
            b(new_run, 2),
        ],
        "{stderr}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_feed_the_consumer_says_in_one_line_how_to_turn_it_on() {
    let dir = tempfile::tempdir().unwrap();
    // The default: no feed.
    let server = start(replay_config(dir.path())).await;
    let python = venv_python(&["grpc", "grpc_tools"]);
    let out = tokio::task::block_in_place(|| {
        Command::new(python)
            .arg(workspace_root().join("clients/python/outflow_follow.py"))
            .arg(server.addr().to_string())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("FAILED_PRECONDITION") && stderr.contains("set it above 0"),
        "{stderr}"
    );
    server.shutdown().await.unwrap();
}
