//! Clients behind gateways: two hosts serve 40 clients that all come through two L7 gateways
//! (the TCP peers), each request attributed by the agents to its client (`client_addr`,
//! `client_id`) on pooled keep-alive connections split at request boundaries, plus one client
//! that connects directly. One client id pulls in bulk from six addresses, each below the
//! per-address limit. Two hours of batch time through the in-process Session API; queries
//! over real gRPC and the CLI.
use std::{collections::HashMap, net::IpAddr};

use outflow_collector::collector::Session;
use outflow_proto::v1::{self, alerts_client::AlertsClient};

use crate::common::*;

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;
const MB: u64 = 1_000_000;
const T0: u64 = 1_750_000_000_000 / HOUR * HOUR;
const STEP: u64 = 5 * MIN;
const STEPS: u64 = 24;

const GATEWAYS: [[u8; 4]; 2] = [[10, 200, 0, 1], [10, 200, 0, 2]];
const DIRECT: [u8; 4] = [192, 0, 2, 50];
const BULK_ID: &str = "h:b0b0b0b0b0b0b0b0b0b0b0b0";

/// Benign client `i` (1..=40): its address, id and gateway.
fn benign(i: u8) -> ([u8; 4], String, usize) {
    (
        [198, 51, 100, i],
        format!("h:{i:024x}"),
        usize::from(i / 2 % 2),
    )
}

/// Bulk address `k` (1..=6) and its gateway.
fn bulk(k: u8) -> ([u8; 4], usize) {
    ([203, 0, 113, k], usize::from(k % 2))
}

/// What was sent, summed per client address, client id and peer: (response, request, closed).
#[derive(Default)]
struct Sent {
    clients: HashMap<IpAddr, (u64, u64, u64)>,
    ids: HashMap<String, (u64, u64, u64)>,
    peers: HashMap<IpAddr, (u64, u64, u64)>,
}

impl Sent {
    fn add(&mut self, d: &v1::ConnDelta) {
        let ip = |b: &[u8]| IpAddr::from(<[u8; 4]>::try_from(b).unwrap());
        let c = d.counters.unwrap();
        let add = |w: &mut (u64, u64, u64)| {
            w.0 += c.bytes_out;
            w.1 += c.bytes_in;
            w.2 += u64::from(d.closed);
        };
        let client = if d.client_addr.is_empty() {
            &d.remote_addr
        } else {
            &d.client_addr
        };
        add(self.clients.entry(ip(client)).or_default());
        add(self.peers.entry(ip(&d.remote_addr)).or_default());
        if !d.client_id.is_empty() {
            add(self.ids.entry(d.client_id.clone()).or_default());
        }
    }
}

/// One request's bytes on `gateway`'s pooled connection `conn_id`, attributed to `client`.
fn request(conn_id: u64, gateway: [u8; 4], client: [u8; 4], id: &str, out: u64) -> v1::ConnDelta {
    v1::ConnDelta {
        conn_id,
        client_addr: client.to_vec(),
        client_id: id.into(),
        client_source: "header:x-client-id".into(),
        ..delta(gateway, out, out / 20, false)
    }
}

/// The batch of host `host` (0 or 1) for the 5 minutes ending at step `step`: one pooled
/// connection per gateway, split at request boundaries (the last request closes it), and the
/// direct client's connection.
fn deltas(host: u8, step: u64) -> Vec<v1::ConnDelta> {
    let mut conns: [Vec<v1::ConnDelta>; 2] = Default::default();
    let conn_id = |g: usize| u64::from(host) << 32 | step << 8 | g as u64;
    for i in (1..=40u8).filter(|i| i % 2 == host) {
        let (addr, id, g) = benign(i);
        let out = MB + u64::from(i) * 10_000 + step;
        conns[g].push(request(conn_id(g), GATEWAYS[g], addr, &id, out));
    }
    // 6 × 250 MB an hour from both hosts: 1.5 GB/h for the id, 250 MB/h per address.
    for k in 1..=6u8 {
        let (addr, g) = bulk(k);
        conns[g].push(request(
            conn_id(g),
            GATEWAYS[g],
            addr,
            BULK_ID,
            250 * MB / 24,
        ));
    }
    for c in &mut conns {
        if let Some(last) = c.last_mut() {
            last.closed = true;
        }
    }
    let mut v: Vec<v1::ConnDelta> = conns.into_iter().flatten().collect();
    v.push(v1::ConnDelta {
        conn_id: conn_id(9),
        ..delta(DIRECT, 3 * MB, MB / 10, true)
    });
    v
}

async fn replay(server: &outflow_collector::Server) -> Sent {
    let mut sessions: Vec<Session> = Vec::new();
    for h in 0..2 {
        let mut s = server.collector().session();
        s.handle(hello_msg(&format!("agent-{h}"), 1, &format!("gpu-{h}")))
            .await
            .unwrap();
        sessions.push(s);
    }
    let mut sent = Sent::default();
    for step in 1..=STEPS {
        for (h, s) in sessions.iter_mut().enumerate() {
            let d = deltas(h as u8, step);
            d.iter().for_each(|d| sent.add(d));
            let b = batch(step, T0 + step * STEP, d);
            s.handle(batch_msg(b)).await.unwrap();
        }
    }
    sent
}

fn cli(args: Vec<String>) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outflow-collector"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_gateways_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(replay_config(dir.path())).await;
    let u = url(&server);
    let sent = replay(&server).await;
    let gateways: Vec<String> = GATEWAYS
        .iter()
        .map(|g| IpAddr::from(*g).to_string())
        .collect();

    // Client addresses are the real clients: 40 + 6 + the direct one, no gateway.
    let by_client = top(&u, v1::GroupBy::ClientAddress, v1::Window::Window24h, 1000).await;
    assert_eq!(by_client.talkers.len(), 47, "{by_client:#?}");
    assert!(
        by_client.talkers.iter().all(|t| !gateways.contains(&t.key)),
        "{by_client:#?}"
    );
    let mut first: Vec<&str> = by_client.talkers[..6]
        .iter()
        .map(|t| t.key.as_str())
        .collect();
    first.sort();
    let bulk: Vec<String> = (1..=6).map(|k| format!("203.0.113.{k}")).collect();
    assert_eq!(first, bulk, "{by_client:#?}");
    // The peers are the gateways, then the direct client (its own peer).
    let by_peer = top(&u, v1::GroupBy::Peer, v1::Window::Window24h, 10).await;
    let mut keys: Vec<&str> = by_peer.talkers.iter().map(|t| t.key.as_str()).collect();
    keys[..2].sort();
    assert_eq!(
        keys,
        ["10.200.0.1", "10.200.0.2", "192.0.2.50"],
        "{by_peer:#?}"
    );
    for t in &by_peer.talkers {
        let want = sent.peers[&t.key.parse::<IpAddr>().unwrap()];
        let got = (t.response_bytes, t.request_bytes, t.connections_closed);
        assert_eq!(got, want, "peer {}", t.key);
        assert_eq!(t.hosts, 2, "{t:?}");
    }
    // One id per benign client and the bulk id, which tops the list.
    let by_id = top(&u, v1::GroupBy::ClientId, v1::Window::Window1h, 1000).await;
    assert_eq!(by_id.talkers.len(), 41, "{by_id:#?}");
    assert_eq!(by_id.talkers[0].key, BULK_ID);

    // Per-client totals are exactly what was sent, pooled connections closed once each.
    for (client, want) in &sent.clients {
        let r = client_stats(&u, &client.to_string()).await.unwrap();
        let d = &r.windows[3];
        let got = (d.response_bytes, d.request_bytes, d.connections_closed);
        assert_eq!(got, *want, "client {client}");
    }
    for (id, want) in &sent.ids {
        let r = client_stats(&u, id).await.unwrap();
        assert_eq!(r.client, *id);
        let d = &r.windows[3];
        assert_eq!(
            (d.response_bytes, d.request_bytes, d.connections_closed),
            *want,
            "client id {id}"
        );
    }
    let closed: u64 = sent.clients.values().map(|c| c.2).sum();
    assert_eq!(closed, 3 * 2 * STEPS, "three connections per batch");

    // The bulk id is flagged: with its addresses, its gateways and its hosts. Its addresses
    // (250 MB/h each) and the gateways (not clients) are not.
    let alerts = AlertsClient::new(channel(&u).await)
        .list(v1::ListAlertsRequest {
            open_only: false,
            limit: 0,
            include_service: false,
        })
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = &alerts[0];
    eprintln!("{}", a.summary);
    assert_eq!(a.detector, v1::Detector::Volume as i32);
    assert_eq!((a.key.as_str(), a.client_id.as_str()), (BULK_ID, BULK_ID));
    assert_eq!(a.client_addr_count, 6, "{a:#?}");
    let mut addrs = a.client_addrs.clone();
    addrs.sort();
    assert_eq!(addrs, bulk);
    let mut peers = a.peers.clone();
    peers.sort();
    assert_eq!((peers, a.peer_count), (gateways.clone(), 2));
    let mut hosts = a.hosts.clone();
    hosts.sort();
    assert_eq!(hosts, ["gpu-0", "gpu-1"]);
    assert!(
        a.summary
            .starts_with(&format!("{BULK_ID} (from 6 address(es): 203.0.113."))
            && a.summary.contains("; through 2 gateway(s): 10.200.0.")
            && a.summary.contains("per-hour limit for a client id"),
        "{}",
        a.summary
    );

    // The CLI: top by peer, and a client id's windows.
    let top_peer = tokio::task::spawn_blocking({
        let u = u.clone();
        move || {
            cli([
                "top",
                "--server",
                &u,
                "--group-by",
                "peer",
                "--window",
                "24h",
                "--exact",
            ]
            .map(String::from)
            .to_vec())
        }
    })
    .await
    .unwrap();
    assert!(
        top_peer.starts_with("top peer by response bytes"),
        "{top_peer}"
    );
    for g in GATEWAYS {
        let want = sent.peers[&IpAddr::from(g)].0;
        let row = format!("{}  {want} B", IpAddr::from(g));
        assert!(
            top_peer.lines().any(|l| l.starts_with(&row)),
            "{row}\n{top_peer}"
        );
    }
    let client = tokio::task::spawn_blocking({
        let u = u.clone();
        move || {
            cli(["client", "--server", &u, BULK_ID]
                .map(String::from)
                .to_vec())
        }
    })
    .await
    .unwrap();
    assert!(
        client.starts_with(&format!("client {BULK_ID}\n")),
        "{client}"
    );
    server.shutdown().await.unwrap();
}
