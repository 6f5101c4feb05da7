//! 200 agents streaming at once: the totals per client, prefix and host equal what was sent.
use std::collections::{BTreeSet, HashMap};

use outflow_proto::v1;
use tokio::task::JoinSet;

use crate::common::*;

const AGENTS: usize = 200;
const BATCHES: u64 = 5;
const DELTAS: usize = 40;
const CLIENTS: usize = 300;

#[derive(Default, Clone, Debug, PartialEq)]
struct Sum {
    out: u64,
    inb: u64,
    closed: u64,
    hosts: BTreeSet<usize>,
}

fn client(i: usize) -> [u8; 4] {
    [198, 51, (i / 100) as u8, (i % 100) as u8]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_agents_sum_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let u = url(&server);
    let t0 = now_ms() - 30_000;
    let mut tasks = JoinSet::new();
    for agent in 0..AGENTS {
        let u = u.clone();
        tasks.spawn(async move {
            let mut a = agent_stream(&u).await;
            let applied = a
                .hello(hello(
                    &format!("agent-{agent}"),
                    1 + agent as u64,
                    &format!("host-{agent:03}"),
                ))
                .await
                .unwrap()
                .applied_seq;
            assert_eq!(applied, 0);
            let mut sent: HashMap<usize, Sum> = HashMap::new();
            // Pipelined: all batches, then all acks.
            for seq in 1..=BATCHES {
                let mut deltas = Vec::new();
                for k in 0..DELTAS {
                    let c = (agent * 7 + seq as usize * 13 + k * 31) % CLIENTS;
                    let out =
                        ((agent * 1_000_003 + seq as usize * 1009 + k * 7) % 100_000 + 1) as u64;
                    let closed = k % 5 == 0;
                    let s = sent.entry(c).or_default();
                    s.out += out;
                    s.inb += 3;
                    s.closed += u64::from(closed);
                    s.hosts.insert(agent);
                    deltas.push(delta(client(c), out, 3, closed));
                }
                a.send_batch(batch(seq, t0 + seq * 1000, deltas))
                    .await
                    .unwrap();
            }
            for seq in 1..=BATCHES {
                assert_eq!(a.next_ack().await.unwrap(), seq);
            }
            a.close().await;
            (agent, sent)
        });
    }
    let mut want: HashMap<usize, Sum> = HashMap::new();
    let mut per_host: HashMap<usize, u64> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (agent, sent) = r.unwrap();
        for (c, s) in sent {
            *per_host.entry(agent).or_default() += s.out;
            let w = want.entry(c).or_default();
            w.out += s.out;
            w.inb += s.inb;
            w.closed += s.closed;
            w.hosts.extend(s.hosts);
        }
    }

    let top = top(&u, v1::GroupBy::ClientAddress, v1::Window::Window1m, 1000).await;
    assert_eq!(top.talkers.len(), want.len());
    let got: HashMap<String, &v1::Talker> =
        top.talkers.iter().map(|t| (t.key.clone(), t)).collect();
    for (c, w) in &want {
        let [a, b, x, y] = client(*c);
        let key = format!("{a}.{b}.{x}.{y}");
        let t = got.get(&key).unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(
            (
                t.response_bytes,
                t.request_bytes,
                t.connections_closed,
                t.hosts as usize
            ),
            (w.out, w.inb, w.closed, w.hosts.len()),
            "{key}"
        );
    }
    // Sorted by response bytes.
    assert!(
        top.talkers
            .windows(2)
            .all(|p| p[0].response_bytes >= p[1].response_bytes)
    );

    // Prefixes and hosts add up too.
    let prefixes =
        crate::common::top(&u, v1::GroupBy::ClientPrefix, v1::Window::Window24h, 10).await;
    let mut want_prefix: HashMap<String, u64> = HashMap::new();
    for (c, w) in &want {
        let [a, b, x, _] = client(*c);
        *want_prefix.entry(format!("{a}.{b}.{x}.0/24")).or_default() += w.out;
    }
    assert_eq!(prefixes.talkers.len(), want_prefix.len());
    for t in &prefixes.talkers {
        assert_eq!(
            Some(&t.response_bytes),
            want_prefix.get(&t.key),
            "{}",
            t.key
        );
    }
    let hosts = crate::common::top(&u, v1::GroupBy::Host, v1::Window::Window10m, 1000).await;
    assert_eq!(hosts.talkers.len(), AGENTS);
    for t in &hosts.talkers {
        let agent: usize = t.key.strip_prefix("host-").unwrap().parse().unwrap();
        assert_eq!(t.response_bytes, per_host[&agent], "{}", t.key);
        assert_eq!(t.hosts, 1);
    }
    let workloads = crate::common::top(&u, v1::GroupBy::Workload, v1::Window::Window1h, 1).await;
    assert!(
        workloads.talkers[0]
            .key
            .ends_with("//system.slice/vllm.service/vllm")
    );

    let m = metrics(&server).await;
    assert_eq!(
        metric(&m, "outflow_collector_batches_total"),
        (AGENTS as u64 * BATCHES) as f64
    );
    assert_eq!(
        metric(&m, "outflow_collector_deltas_total"),
        (AGENTS as u64 * BATCHES * DELTAS as u64) as f64
    );
    server.shutdown().await.unwrap();
}
