//! A real agent (the kernel program counting real traffic between network namespaces) exporting
//! to a collector cluster: a three-node NATS JetStream cluster, an ingest node and two
//! aggregators, each an `outflow-collector` process. While the clients' requests run, the
//! ingest node is SIGKILLed and started again on its port (the agent spools and sends again),
//! and so is an aggregator (the other takes its partitions once its lease is out, and it gets
//! its share back). At the end the cluster's bytes per client address, asked of the ingest
//! node (which fans out to the aggregators), equal what the clients received, to the byte.
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use outflow_testbed::nats::NatsCluster;
use outflow_tests::{
    agent::{Agent, PinDir},
    cgroup::TestCgroup,
    collector::{Collector, Metrics, TempDir, free_port},
    netns::NetnsPair,
    peer::{Server, Traffic},
    testpeer_bin,
    wait::poll_until,
};

const PORT: u16 = 8000;
const PARTITIONS: u32 = 4;
/// How long the nodes and the agent get to start, and the cluster to drain at the end.
const TIMEOUT: Duration = Duration::from_secs(120);
/// Responses of a few sizes, small requests.
const SIZES: &[(u64, u64)] = &[(50_000, 100), (200_000, 300), (7, 1), (1_234_567, 50)];

/// A cluster node: an `outflow-collector` process with its config file, data directory and
/// metrics port, started again on the same ones.
struct Node {
    port: u16,
    metrics_port: u16,
    config: std::path::PathBuf,
    data: TempDir,
    process: Option<Collector>,
}

impl Node {
    fn new(dir: &Path, nats: &NatsCluster, role: &str, name: &str) -> Self {
        let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[cluster]\nrole = \"{role}\"\nnats_urls = [{}]\npartitions = {PARTITIONS}\nlease = \"2s\"\nnode_name = \"{name}\"\nnats_ping_interval = \"1s\"\n",
                urls.join(", ")
            ),
        )
        .expect("write the node's config");
        let mut node = Self {
            port: free_port(),
            metrics_port: free_port(),
            config,
            data: TempDir::new(&format!("cl-{name}")),
            process: None,
        };
        node.start();
        node
    }

    /// Starts the process (and waits until it accepts connections).
    fn start(&mut self) {
        let metrics = SocketAddr::from(([127, 0, 0, 1], self.metrics_port)).to_string();
        self.process = Some(Collector::start(
            self.port,
            &[
                "--config",
                self.config.to_str().expect("utf-8"),
                "--data-dir",
                self.data.as_arg(),
                "--metrics-listen",
                &metrics,
            ],
        ));
    }

    /// SIGKILLs the process and starts a new one on the same port, config and data.
    fn kill_and_start(&mut self) {
        self.process.take().expect("running").kill();
        self.start();
    }

    fn collector(&self) -> &Collector {
        self.process.as_ref().expect("running")
    }

    /// The value of metric `name`; 0 while its metrics endpoint does not answer (a node just
    /// started: the gRPC port it was waited on is bound before the metrics port).
    fn value(&self, name: &str) -> f64 {
        Metrics::fetch(SocketAddr::from(([127, 0, 0, 1], self.metrics_port)))
            .map_or(0.0, |m| m.value(name))
    }
}

#[test]
fn a_real_agent_through_the_cluster_counts_every_byte_once_through_kills() {
    let dir = TempDir::new("cluster");
    let nats = NatsCluster::start(3, &dir.path().join("nats"));
    let mut ingest = Node::new(dir.path(), &nats, "ingest", "ingest");
    let mut aggregators = [
        Node::new(dir.path(), &nats, "aggregator", "a0"),
        Node::new(dir.path(), &nats, "aggregator", "a1"),
    ];

    let pair = NetnsPair::new("cluster");
    let cgroup = TestCgroup::new("cluster");
    let _server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
    let pin = PinDir::new("cluster");
    let state = TempDir::new("cluster-agent");
    let spool = state.path().join("spool");
    let agent = Agent::start(&[
        "--cgroup",
        cgroup.as_arg(),
        "--pin-dir",
        pin.as_arg(),
        "--interval",
        "200ms",
        "--collector",
        &ingest.collector().url(),
        "--state-dir",
        state.as_arg(),
        "--spool-dir",
        spool.to_str().expect("utf-8"),
    ]);
    agent.wait_started(TIMEOUT);

    // Two clients (the client namespace's IPv4 and IPv6 addresses), requests in a loop.
    let traffic = Traffic::start(
        &pair,
        &[pair.server_v4(PORT), pair.server_v6(PORT)],
        SIZES,
        8,
        4,
    );
    // Batches applied by both aggregators, then the kills under traffic.
    let applied = |n: &Node| n.value("outflow_collector_cluster_applied_parts_total");
    let held = |n: &Node| n.value("outflow_collector_cluster_partitions_held");
    let both = poll_until(TIMEOUT, || aggregators.iter().all(|a| applied(a) > 0.0));
    assert!(
        both,
        "the aggregators never both applied parts; agent stderr:\n{}",
        agent.stderr()
    );
    // The agent's stream cut with batches in flight: it sends them again to the new process.
    ingest.kill_and_start();
    let published = poll_until(TIMEOUT, || {
        ingest.value("outflow_collector_cluster_published_parts_total") > 0.0
    });
    assert!(
        published,
        "the agent never sent to the ingest node again:\n{}",
        agent.stderr()
    );
    // a1 killed: a0 takes its partitions once its lease is out; a1 started again gets its
    // share back.
    aggregators[1].process.take().expect("running").kill();
    let took = poll_until(TIMEOUT, || held(&aggregators[0]) == f64::from(PARTITIONS));
    assert!(took, "a0 never took a1's partitions over");
    aggregators[1].start();
    // Back once each holds its share and has replayed it (until then the cluster's queries
    // are refused with UNAVAILABLE, not answered short).
    let replaying = |n: &Node| n.value("outflow_collector_cluster_partitions_replaying");
    let back = poll_until(TIMEOUT, || {
        applied(&aggregators[1]) > 0.0
            && aggregators
                .iter()
                .all(|a| held(a) == f64::from(PARTITIONS / 2) && replaying(a) == 0.0)
    });
    assert!(back, "a1 never got its share back");
    let outcomes = traffic.finish();

    let mut truth: std::collections::BTreeMap<IpAddr, u64> = Default::default();
    for o in &outcomes {
        *truth.entry(o.local_addr).or_default() += o.received;
    }
    assert_eq!(truth.len(), 2, "an IPv4 and an IPv6 client");
    let counted = || {
        truth
            .keys()
            .map(|c| (*c, ingest.collector().day_bytes(&c.to_string()).0))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let mut last = counted();
    let exact = poll_until(TIMEOUT, || {
        last = counted();
        last == truth
    });
    assert!(
        exact,
        "the cluster's response bytes per client differ from what the clients received:\n  counted {last:?}\n  truth   {truth:?}\nagent stderr:\n{}\ningest stderr:\n{}",
        agent.stderr(),
        ingest.collector().stderr()
    );
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
    for node in aggregators.iter().chain([&ingest]) {
        assert_eq!(node.collector().stop().code(), Some(0));
    }
}
