//! Property tests over the decode + validate + apply path (the code behind the Ingest
//! service, with a real store): nothing an agent sends panics the collector, and valid batches
//! are applied exactly once.
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use outflow_collector::{
    aggregate::ClientQuery,
    codec::decode_agent_message,
    collector::{Collector, Session},
    error::ApiError,
    keys::Group,
    metrics::Metrics,
    window::Window,
    writer::Outcome,
};
use outflow_proto::v1::{self, AgentMessage, agent_message::Msg, collector_message};
use proptest::{collection::vec, option, prelude::*};
use prost::Message as _;

use crate::common::{config, hello_msg, now_ms};

/// A fresh collector in a temporary directory (fsync off: the data is thrown away).
fn collector() -> (tempfile::TempDir, Arc<Collector>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.store.fsync = false;
    let c = Collector::open(&cfg, Arc::new(Metrics::new())).unwrap();
    (dir, Arc::new(c))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn counters() -> impl Strategy<Value = Option<v1::Counters>> {
    option::of(
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(a, b, c, d, e, f)| v1::Counters {
                bytes_out: a,
                bytes_in: b,
                wire_bytes_out: c,
                wire_bytes_in: d,
                segments_out: e,
                segments_in: f,
            }),
    )
}

fn addr() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 4),
        vec(any::<u8>(), 16),
        vec(any::<u8>(), 0..20)
    ]
}

/// `client_addr`, `client_id`, `client_source`: mostly valid, sometimes not.
fn client_fields() -> impl Strategy<Value = (Vec<u8>, String, String)> {
    (
        prop_oneof![Just(Vec::new()), addr()],
        prop_oneof![Just(String::new()), "h:[0-9a-f]{24}", ".{0,260}"],
        prop_oneof![
            Just(String::new()),
            Just("peer".to_owned()),
            Just("proxy-v2".to_owned()),
            "header:[a-z-]{1,20}",
            ".{0,130}",
        ],
    )
}

fn any_delta() -> impl Strategy<Value = v1::ConnDelta> {
    (
        any::<u64>(),
        addr(),
        prop_oneof![0..70_000u32, any::<u32>()],
        addr(),
        prop_oneof![0..70_000u32, any::<u32>()],
        -1..4i32,
        counters(),
        any::<bool>(),
        ".{0,12}",
        any::<u32>(),
        ".{0,12}",
        any::<u64>(),
    )
        .prop_flat_map(|t| (Just(t), client_fields()))
        .prop_map(
            |((id, la, lp, ra, rp, role, c, closed, cgroup, pid, comm, fs), (ca, cid, cs))| {
                v1::ConnDelta {
                    conn_id: id,
                    local_addr: la,
                    local_port: lp,
                    remote_addr: ra,
                    remote_port: rp,
                    role,
                    counters: c,
                    closed,
                    cgroup,
                    pid,
                    comm,
                    first_seen_ms: fs,
                    client_addr: ca,
                    client_id: cid,
                    client_source: cs,
                    // An agent's (only a cluster's ingest nodes set it).
                    share: 0,
                }
            },
        )
}

fn time() -> impl Strategy<Value = u64> {
    let now = now_ms();
    prop_oneof![now - 100_000_000..now, any::<u64>(), 0..10u64]
}

fn any_batch() -> impl Strategy<Value = v1::Batch> {
    (
        prop_oneof![0..6u64, any::<u64>()],
        time(),
        time(),
        vec(any_delta(), 0..6),
        counters(),
        any::<u64>(),
        counters(),
    )
        .prop_map(
            |(seq, start_ms, end_ms, deltas, overflow, lost_batches, lost)| v1::Batch {
                seq,
                start_ms,
                end_ms,
                deltas,
                overflow,
                lost_batches,
                lost,
            },
        )
}

fn any_hello() -> impl Strategy<Value = v1::Hello> {
    (
        prop_oneof![Just("agent".to_owned()), ".{0,140}"],
        prop_oneof![0..3u64, any::<u64>()],
        ".{0,20}",
        ".{0,8}",
        ".{0,8}",
        proptest::collection::hash_map(".{0,4}", ".{0,140}", 0..40),
    )
        .prop_map(
            |(agent_id, epoch, hostname, boot_id, version, labels)| v1::Hello {
                agent_id,
                epoch,
                hostname,
                boot_id,
                version,
                labels,
            },
        )
}

fn any_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        1 => Just(AgentMessage { msg: None }),
        2 => any_hello().prop_map(|h| AgentMessage { msg: Some(Msg::Hello(h)) }),
        6 => any_batch().prop_map(|b| AgentMessage { msg: Some(Msg::Batch(b)) }),
    ]
}

/// Runs `msg` through the wire form and a session as the Ingest service does; returns the
/// answer. Errors must be refusals, never a failure of the collector itself.
async fn feed(session: &mut Session, msg: &AgentMessage) -> Result<v1::CollectorMessage, ApiError> {
    let m = decode_agent_message(&msg.encode_to_vec()[..], 100_000)?;
    let r = session.handle(m).await;
    if let Err(e) = &r {
        assert!(e.reject_reason().is_some(), "not a refusal: {e:?}");
    }
    r
}

/// The collector still works: a fresh agent's valid batch is applied.
async fn still_works(c: &Arc<Collector>) {
    let mut s = c.session();
    s.handle(hello_msg("probe", 1, "probe-host")).await.unwrap();
    let t = now_ms();
    let seq = c.watermark(&outflow_collector::model::AgentKey {
        agent_id: "probe".into(),
        epoch: 1,
    }) + 1;
    let b = crate::common::batch(seq, t, vec![]);
    let p = s.begin(crate::common::batch_msg(b)).await.unwrap();
    assert_eq!(p.outcome().await.unwrap(), Some(Outcome::Applied));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_messages_never_panic(msgs in vec(any_message(), 1..10), hello_first in any::<bool>()) {
        rt().block_on(async {
            let (_dir, c) = collector();
            let mut s = c.session();
            if hello_first {
                s.handle(hello_msg("a", 1, "h")).await.unwrap();
            }
            for m in &msgs {
                match feed(&mut s, m).await {
                    Ok(v1::CollectorMessage { msg: Some(collector_message::Msg::Ack(a)) }) => {
                        let Some(Msg::Batch(b)) = &m.msg else { panic!("Ack for {m:?}") };
                        assert_eq!(a.seq, b.seq);
                    }
                    Ok(v1::CollectorMessage { msg: Some(collector_message::Msg::Welcome(_)) }) => {
                        assert!(matches!(m.msg, Some(Msg::Hello(_))));
                    }
                    Ok(other) => panic!("{other:?}"),
                    Err(_) => {}
                }
            }
            still_works(&c).await;
            c.close().await;
        });
    }

    #[test]
    fn arbitrary_bytes_never_panic(chunks in vec(vec(any::<u8>(), 0..400), 1..6)) {
        rt().block_on(async {
            let (_dir, c) = collector();
            let mut s = c.session();
            s.handle(hello_msg("a", 1, "h")).await.unwrap();
            for bytes in &chunks {
                if let Ok(m) = decode_agent_message(&bytes[..], 100_000) {
                    let _ = s.handle(m).await;
                }
            }
            still_works(&c).await;
            c.close().await;
        });
    }

    /// Clients directly or through one of two gateways (then with a client id): every total
    /// of a client address, a client id and a peer is exact.
    #[test]
    fn valid_batches_apply_exactly_once(
        batches in vec(vec((0..6u8, any::<u64>(), 0..u64::from(u32::MAX), any::<bool>(), 0..3i32, any::<bool>(), 0..3u8), 0..8), 1..8),
        resend in vec(any::<prop::sample::Index>(), 0..6),
    ) {
        rt().block_on(async {
            let (_dir, c) = collector();
            let mut s = c.session();
            s.handle(hello_msg("a", 9, "h")).await.unwrap();
            let t = now_ms() - 10_000;
            let mut want: HashMap<IpAddr, (u64, u64, u64)> = HashMap::new();
            let mut want_id: HashMap<String, (u64, u64, u64)> = HashMap::new();
            let mut want_peer: HashMap<String, (u64, u64, u64)> = HashMap::new();
            let add = |w: &mut (u64, u64, u64), out: u64, inb: u64, closed: bool| {
                w.0 = w.0.saturating_add(out);
                w.1 = w.1.saturating_add(inb);
                w.2 += u64::from(closed);
            };
            let mut wire = Vec::new();
            for (i, deltas) in batches.iter().enumerate() {
                let mut ds = Vec::new();
                for (j, &(client, out, inb, closed, role, v6, gateway)) in deltas.iter().enumerate() {
                    let client_ip: IpAddr = if v6 {
                        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(client)])
                    } else {
                        IpAddr::from([203, 0, 113, client])
                    };
                    let bytes = |a: IpAddr| match a {
                        IpAddr::V4(a) => a.octets().to_vec(),
                        IpAddr::V6(a) => a.octets().to_vec(),
                    };
                    // Through a gateway (IPv4, whatever the client's family), with an id.
                    let (remote, client_addr, client_id) = if gateway == 0 {
                        (client_ip, Vec::new(), String::new())
                    } else {
                        let id = format!("h:{:024x}", client % 3);
                        (IpAddr::from([10, 9, 0, gateway]), bytes(client_ip), id)
                    };
                    let local = if remote.is_ipv4() { vec![10, 0, 0, 1] } else { vec![0xfd; 16] };
                    if role == v1::Role::Server as i32 {
                        add(want.entry(client_ip).or_default(), out, inb, closed);
                        add(want_peer.entry(remote.to_string()).or_default(), out, inb, closed);
                        if !client_id.is_empty() {
                            add(want_id.entry(client_id.clone()).or_default(), out, inb, closed);
                        }
                    }
                    ds.push(v1::ConnDelta {
                        conn_id: (i * 100 + j) as u64,
                        local_addr: local,
                        local_port: 443,
                        remote_addr: bytes(remote),
                        remote_port: 5000,
                        role,
                        counters: Some(v1::Counters { bytes_out: out, bytes_in: inb, ..Default::default() }),
                        closed,
                        client_addr,
                        client_source: if gateway == 0 { String::new() } else { "header:x-client-id".into() },
                        client_id,
                        ..Default::default()
                    });
                }
                wire.push(crate::common::batch(i as u64 + 1, t + i as u64, ds));
            }
            // Every batch once, with some of them resent after.
            let mut order: Vec<usize> = (0..wire.len()).collect();
            order.extend(resend.iter().map(|ix| ix.index(wire.len())));
            let mut applied = 0;
            for i in order {
                let p = s.begin(crate::common::batch_msg(wire[i].clone())).await.unwrap();
                match p.outcome().await.unwrap() {
                    Some(Outcome::Applied) => applied += 1,
                    Some(Outcome::Duplicate) => {}
                    None => panic!("no outcome"),
                }
            }
            assert_eq!(applied, wire.len());
            let check = |q: ClientQuery, want: &(u64, u64, u64)| {
                let stats = c.client_stats(&q).unwrap();
                let s = stats[Window::M1.index()];
                assert_eq!(
                    (s.totals.response_bytes, s.totals.request_bytes, s.totals.connections_closed, s.hosts),
                    (want.0, want.1, want.2, 1),
                    "{q}"
                );
            };
            for (client, w) in &want {
                check(ClientQuery::Address(*client), w);
            }
            for (id, w) in &want_id {
                check(ClientQuery::Id(id.clone()), w);
            }
            let peers = c.top_talkers(Group::Peer, Window::M1, 1000);
            assert_eq!(peers.talkers.len(), want_peer.len());
            for t in peers.talkers {
                let w = want_peer[&t.key];
                let s = t.stats;
                assert_eq!(
                    (s.totals.response_bytes, s.totals.request_bytes, s.totals.connections_closed),
                    w,
                    "peer {}",
                    t.key
                );
            }
            c.close().await;
        });
    }
}
