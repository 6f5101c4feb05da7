//! End to end: the real agent on this kernel streams to the real collector over gRPC; the
//! collector's totals per client must equal the ground truth of the transfers to the byte,
//! through crashes of either side.
//!
//! Needs root (CI runs it as root).

use std::{collections::BTreeMap, net::IpAddr, thread, time::Duration};

use outflow_tests::{
    agent::{Agent, PinDir, export_args},
    cgroup::TestCgroup,
    collector::{Collector, Metrics, TempDir, free_port, http_get},
    netns::NetnsPair,
    peer::{Client, Outcome, Server},
    testpeer_bin,
    wait::poll_until,
};

const PORT: u16 = 8000;
const WAIT: Duration = Duration::from_secs(90);

/// (response bytes, request bytes) per client address, from what the clients saw.
fn truth(outcomes: &[Outcome]) -> BTreeMap<IpAddr, (u64, u64)> {
    let mut t = BTreeMap::new();
    for o in outcomes {
        let e = t.entry(o.local_addr).or_insert((0, 0));
        e.0 += o.received;
        e.1 += o.sent;
    }
    t
}

/// The collector's (response, request) bytes for each client of `truth`.
fn observed(
    collector: &Collector,
    truth: &BTreeMap<IpAddr, (u64, u64)>,
) -> BTreeMap<IpAddr, (u64, u64)> {
    truth
        .keys()
        .map(|ip| (*ip, collector.day_bytes(&ip.to_string())))
        .collect()
}

/// Everything a test needs: namespaces, the server's cgroup, the server, a client, and the
/// directories the agent and the collector keep their state in.
struct Fleet {
    pair: NetnsPair,
    cgroup: TestCgroup,
    _server: Server,
    client: Client,
    pin: PinDir,
    agent_state: TempDir,
    collector_data: TempDir,
    port: u16,
    metrics_port: u16,
}

impl Fleet {
    fn new(tag: &str) -> Self {
        let pair = NetnsPair::new(tag);
        let cgroup = TestCgroup::new(tag);
        let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
        let client = Client::new(&pair);
        Self {
            pair,
            cgroup,
            _server: server,
            client,
            pin: PinDir::new(tag),
            agent_state: TempDir::new(&format!("{tag}-agent")),
            collector_data: TempDir::new(&format!("{tag}-collector")),
            port: free_port(),
            metrics_port: free_port(),
        }
    }

    fn collector(&self) -> Collector {
        let metrics = format!("127.0.0.1:{}", self.metrics_port);
        Collector::start(
            self.port,
            &[
                "--data-dir",
                self.collector_data.as_arg(),
                "--metrics-listen",
                &metrics,
            ],
        )
    }

    fn agent(&self, collector_url: &str) -> Agent {
        let spool = self.agent_state.path().join("spool");
        let agent = Agent::start(&export_args(
            self.cgroup.as_arg(),
            self.pin.as_arg(),
            collector_url,
            self.agent_state.as_arg(),
            spool.to_str().expect("utf-8"),
        ));
        agent.wait_started(WAIT);
        agent
    }
}

/// Waits until the collector's totals equal the truth for every client; panics with both if
/// they never do (more than the truth is a double count, and fails at once).
fn assert_collector_reaches(collector: &Collector, truth: &BTreeMap<IpAddr, (u64, u64)>) {
    let mut last = BTreeMap::new();
    let reached = poll_until(WAIT, || {
        last = observed(collector, truth);
        for (ip, (resp, req)) in &last {
            let (t_resp, t_req) = truth[ip];
            assert!(
                *resp <= t_resp && *req <= t_req,
                "counted twice for {ip}: collector ({resp}, {req}) > truth ({t_resp}, {t_req})"
            );
        }
        last == *truth
    });
    assert!(
        reached,
        "collector totals never reached the truth:\n observed {last:?}\n truth    {truth:?}\ncollector stderr:\n{}",
        collector.stderr()
    );
}

#[test]
fn collector_totals_per_client_equal_the_ground_truth() {
    let fleet = Fleet::new("e2e");
    let collector = fleet.collector();
    let agent = fleet.agent(&collector.url());
    let sizes = [
        (0, 0),
        (1, 1),
        (100_000, 1_000),
        (3_000_000, 20_000),
        (123_457, 77),
    ];
    let mut outcomes = fleet
        .client
        .request_many(fleet.pair.server_v4(PORT), 20, &sizes, 4);
    outcomes.extend(
        fleet
            .client
            .request_many(fleet.pair.server_v6(PORT), 20, &sizes, 4),
    );
    let truth = truth(&outcomes);
    assert_eq!(truth.len(), 2, "an IPv4 and an IPv6 client: {truth:?}");
    assert_collector_reaches(&collector, &truth);
    // The client's /24 and /64 prefixes hold the same bytes.
    for (prefix, ip) in [
        ("198.18.0.0/24", "198.18.0.2"),
        ("2001:db8::/64", "2001:db8::2"),
    ] {
        let ip: IpAddr = ip.parse().expect("ip");
        assert_eq!(collector.day_bytes(prefix), truth[&ip], "{prefix}");
    }
    assert_agent_metrics_show_everything_acknowledged(&agent);
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
    assert_eq!(
        observed(&collector, &truth),
        truth,
        "nothing more after the agent's final batch"
    );
}

/// The agent's /metrics, once the collector has everything: every batch spooled was
/// acknowledged, the spool is empty, the stream is up; /readyz says ready; promtool accepts
/// the exposition.
fn assert_agent_metrics_show_everything_acknowledged(agent: &Agent) {
    let addr = agent.metrics_addr(WAIT);
    assert_eq!(http_get(addr, "/readyz").expect("GET /readyz").0, 200);
    assert_eq!(http_get(addr, "/healthz").expect("GET /healthz").0, 200);
    let mut last = None;
    let settled = poll_until(WAIT, || {
        let m = Metrics::fetch(addr).expect("GET /metrics");
        let spooled = m.value("outflow_agent_batches_spooled_total");
        let done = spooled > 0.0
            && m.value("outflow_agent_batches_acknowledged_total") == spooled
            && m.value("outflow_agent_spool_bytes") == 0.0
            && m.value("outflow_agent_collector_connected") == 1.0
            && m.has("outflow_agent_last_ack_age_seconds");
        last = Some(m);
        done
    });
    let m = last.expect("scraped once");
    assert!(
        settled,
        "the agent's metrics never showed everything acknowledged:\n{}",
        m.text()
    );
    assert_eq!(m.value("outflow_agent_batches_lost_total"), 0.0);
    assert_eq!(m.value("outflow_agent_ready"), 1.0);
    assert!(
        m.value("outflow_agent_interval_seconds_count") > 0.0,
        "{}",
        m.text()
    );
    m.check_with_promtool();
}

#[test]
fn crashes_of_the_collector_and_the_agent_lose_and_repeat_nothing() {
    let fleet = Fleet::new("crash");
    let collector = fleet.collector();
    let agent = fleet.agent(&collector.url());
    let addr = fleet.pair.server_v4(PORT);
    // Its own client, so the stream does not hold up the other requests' workers.
    let streamer = Client::new(&fleet.pair);
    let outcomes = thread::scope(|s| {
        // A 6 s stream (1000 B every 2 ms) under everything that follows.
        let stream = s.spawn(|| streamer.request(addr, 3_000_000, 5_000, 1_000, 2));
        let mut outcomes = fleet.client.request_many(addr, 50, &[(50_000, 100)], 4);

        // The collector crashes; the agent spools and retries; the collector comes back on
        // the same data directory.
        assert!(!collector.kill().success());
        outcomes.extend(fleet.client.request_many(addr, 50, &[(60_000, 200)], 4));
        let collector = fleet.collector();

        // The agent crashes (SIGKILL, at whatever point of its interval); the kernel goes on
        // counting; a new agent adopts the pinned state and the spool.
        outcomes.extend(fleet.client.request_many(addr, 50, &[(70_000, 300)], 4));
        agent.kill();
        outcomes.extend(fleet.client.request_many(addr, 50, &[(80_000, 400)], 4));
        let agent = fleet.agent(&collector.url());

        outcomes.push(stream.join().expect("the stream thread"));
        (outcomes, collector, agent)
    });
    let (outcomes, collector, agent) = outcomes;
    let truth = truth(&outcomes);
    assert_collector_reaches(&collector, &truth);
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
    assert_eq!(
        observed(&collector, &truth),
        truth,
        "exact after everything is acknowledged"
    );
}
