//! The agent's per-request attribution against ground truth: real gateways (nginx, HAProxy)
//! pool the requests of dozens of client hosts onto shared server connections, and the bytes
//! the agent attributes to each client address and each client id must be exactly the bytes
//! the server wrote for that client's requests (joined on each request's nonce).
//!
//! Needs root, nginx and haproxy (`cargo xtask setup`), and the agent built
//! (`cargo build -p outflow-agent`). Run with `cargo test -p outflow-tests --test attribution`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use outflow_tests::agent::{Agent, PinDir};
use outflow_tests::cgroup::TestCgroup;
use outflow_tests::collector::{Collector, TempDir, free_port};
use outflow_tests::gateway::{Haproxy, HaproxyConfig, Nginx, NginxConfig};
use outflow_tests::http::{
    HttpServer, HttpServerOptions, Ledger, LoadClient, LoadSpec, ProxyVersion, RequestResult,
    run_load,
};
use outflow_tests::netns::{CLIENT_V4, NetnsPair};
use outflow_tests::records::{AttributionStats, ConnRecord, Role, attribution_stats, conn_records};
use outflow_tests::testpeer_bin;
use outflow_tests::wait::poll_until;
use serde_json::Value;

const PORT: u16 = 8000;
const WAIT: Duration = Duration::from_secs(20);
const HOSTS_V4: u8 = 32;
const HOSTS_V6: u16 = 6;
/// Ids shared by the hosts: host `i` sends `tenant-{i % IDS}` and `tenant-{(i + 1) % IDS}`.
const IDS: usize = 5;
/// The gateways' address: the only trusted peer.
const TRUSTED: &str = "198.18.0.2/32";

/// The attribution options of every agent here, with ids left raw so they can be compared.
const ATTRIBUTION: [&str; 7] = [
    "--trusted-peer",
    TRUSTED,
    "--header",
    "x-forwarded-for=address",
    "--header",
    "x-client-id=id",
    "--raw-ids",
];

/// The server in its cgroup and namespace, the client hosts, a pin directory.
struct Bench {
    pair: NetnsPair,
    cgroup: TestCgroup,
    server: HttpServer,
    pin: PinDir,
    hosts: Vec<IpAddr>,
}

impl Bench {
    fn new(tag: &str, options: HttpServerOptions) -> Self {
        let pair = NetnsPair::new(tag);
        let hosts = pair.add_client_hosts(HOSTS_V4, HOSTS_V6);
        let cgroup = TestCgroup::new(tag);
        let server = HttpServer::start(testpeer_bin!(), &pair, &cgroup, &options);
        let pin = PinDir::new(tag);
        Self {
            pair,
            cgroup,
            server,
            pin,
            hosts,
        }
    }

    /// Starts an agent on the server's cgroup with `extra` options and waits until it attached.
    fn agent(&self, extra: &[&str]) -> Agent {
        let mut args = vec![
            "--cgroup",
            self.cgroup.as_arg(),
            "--pin-dir",
            self.pin.as_arg(),
            "--interval",
            "200ms",
        ];
        args.extend_from_slice(extra);
        let agent = Agent::start(&args);
        agent.wait_started(WAIT);
        agent
    }

    /// The hosts of one family, each with `ids` of the shared ids.
    fn clients(&self, v4: bool, ids: usize) -> Vec<LoadClient> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_ipv4() == v4)
            .map(|(i, &addr)| LoadClient {
                addr,
                ids: (0..ids)
                    .map(|k| format!("tenant-{}", (i + k) % IDS))
                    .collect(),
            })
            .collect()
    }

    /// A load from the IPv4 hosts to `v4` and one from the IPv6 hosts to `v6`, one after the
    /// other, joined with what the server answered.
    fn run_loads(&self, v4: LoadSpec, v6: LoadSpec) -> Ledger {
        let mut results = run_load(testpeer_bin!(), &self.pair, &v4);
        results.extend(run_load(testpeer_bin!(), &self.pair, &v6));
        self.join(&results)
    }

    fn join(&self, results: &[RequestResult]) -> Ledger {
        let served = self.server.wait_requests(results, WAIT);
        assert_eq!(
            served.len(),
            results.len(),
            "the server answered only the loads"
        );
        Ledger::join(results, &served)
    }
}

fn load(
    target: std::net::SocketAddr,
    clients: Vec<LoadClient>,
    requests: usize,
    seed: u64,
) -> LoadSpec {
    let mut spec = LoadSpec::new(target, clients, requests);
    spec.seed = seed;
    spec.max_bytes = 2_000_000;
    spec.parallel = 8;
    spec
}

/// A server connection as the agent names it: the peer's address and port, the server's port.
type ConnKey = (IpAddr, u16, u16);

fn key_of(c: &ConnRecord) -> ConnKey {
    (c.remote_addr, c.remote_port, c.local_port)
}

/// The server's connections in `ledger`, by the key the agent's records carry, with the
/// response bytes the server wrote on each.
fn server_conns(ledger: &Ledger) -> BTreeMap<ConnKey, u64> {
    let mut conns = BTreeMap::new();
    for (n, c) in &ledger.conns {
        let (peer, local) = (c.peer.expect("joined"), c.local.expect("joined"));
        let key = (peer.ip(), peer.port(), local.port());
        assert!(
            conns.insert(key, c.response_bytes).is_none(),
            "two server connections (one is {n}) share the 4-tuple {key:?}"
        );
    }
    conns
}

/// Waits until, for every server connection, the agent's records add up to at least what the
/// server wrote on it, and the last stats record counts at least `turns` turns (the agent
/// prints records only for intervals with something to report: no waiting for a later one).
fn wait_counted(agent: &Agent, ledger: &Ledger, turns: u64) -> Vec<Value> {
    let want = server_conns(ledger);
    agent.wait_until(WAIT, |records| {
        let mut got: BTreeMap<ConnKey, u64> = BTreeMap::new();
        for c in conn_records(records) {
            *got.entry(key_of(&c)).or_default() += c.bytes_out;
        }
        want.iter()
            .all(|(k, &bytes)| got.get(k).copied().unwrap_or(0) >= bytes)
            && attribution_stats(records).is_some_and(|s| s.turns >= turns)
    })
}

/// What the agent should report: bytes per client address and per client id, and the sources.
struct Expected {
    by_addr: BTreeMap<IpAddr, u64>,
    by_id: BTreeMap<Option<String>, u64>,
    sources: BTreeSet<&'static str>,
}

impl Expected {
    /// The ledger's own clients: the hosts' addresses and the ids they sent.
    fn clients(ledger: &Ledger, source: &'static str) -> Self {
        Self {
            by_addr: ledger.by_source.clone(),
            by_id: ledger.by_id.clone(),
            sources: BTreeSet::from([source]),
        }
    }

    /// The hosts' addresses, and no ids.
    fn addresses_only(ledger: &Ledger, source: &'static str) -> Self {
        Self {
            by_addr: ledger.by_source.clone(),
            by_id: BTreeMap::from([(None, ledger.total())]),
            sources: BTreeSet::from([source]),
        }
    }
}

/// Asserts the agent's records against the ledger: each connection's total, and the bytes of
/// each client address and id, exactly.
fn assert_attributed(records: &[Value], ledger: &Ledger, expected: &Expected) {
    let conns = conn_records(records);
    let want = server_conns(ledger);
    let mut by_key: BTreeMap<ConnKey, u64> = BTreeMap::new();
    let mut by_conn_id: BTreeMap<u64, (ConnKey, u64)> = BTreeMap::new();
    let mut by_addr: BTreeMap<IpAddr, u64> = BTreeMap::new();
    let mut by_id: BTreeMap<Option<String>, u64> = BTreeMap::new();
    let mut sources = BTreeSet::new();
    for c in &conns {
        assert_eq!(c.role, Role::Server, "{c:?}");
        assert!(
            want.contains_key(&key_of(c)),
            "a record of a connection the server did not report: {c:?}"
        );
        *by_key.entry(key_of(c)).or_default() += c.bytes_out;
        let entry = by_conn_id.entry(c.conn_id).or_insert((key_of(c), 0));
        assert_eq!(entry.0, key_of(c), "one conn_id, one connection: {c:?}");
        entry.1 += c.bytes_out;
        if c.bytes_out == 0 {
            continue;
        }
        let addr = c
            .client_addr
            .unwrap_or_else(|| panic!("a record with bytes and no client_addr: {c:?}"));
        let source = c
            .client_source
            .clone()
            .unwrap_or_else(|| panic!("a record with bytes and no client_source: {c:?}"));
        *by_addr.entry(addr).or_default() += c.bytes_out;
        *by_id.entry(c.client_id.clone()).or_default() += c.bytes_out;
        sources.insert(source);
    }
    assert_eq!(by_key, want, "bytes_out per server connection");
    for (conn_id, (key, bytes)) in &by_conn_id {
        assert_eq!(
            *bytes, want[key],
            "the records of conn_id {conn_id} ({key:?}) add up to the server's total"
        );
    }
    assert_eq!(by_addr, expected.by_addr, "bytes_out per client_addr");
    assert_eq!(by_id, expected.by_id, "bytes_out per client_id");
    let expected_sources: BTreeSet<String> =
        expected.sources.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(
        sources, expected_sources,
        "client_source of the records with bytes"
    );
}

fn stats(records: &[Value]) -> AttributionStats {
    attribution_stats(records).expect("a stats record")
}

/// Gateways that pool requests, with the clients named by headers: through each, the bytes of
/// each client host (X-Forwarded-For) and each id (x-client-id) are exact.
fn through_l7_gateway(bench: &Bench, v4: std::net::SocketAddr, v6: std::net::SocketAddr) {
    let agent = bench.agent(&ATTRIBUTION);
    let ledger = bench.run_loads(
        load(v4, bench.clients(true, 2), 160, 0xa4),
        load(v6, bench.clients(false, 2), 30, 0xa6),
    );
    assert!(
        !ledger.shared_conns().is_empty(),
        "the gateway pooled requests of several clients on a server connection"
    );
    let requests = ledger.pairs.len() as u64;
    let records = wait_counted(&agent, &ledger, requests);
    assert_attributed(
        &records,
        &ledger,
        &Expected::clients(&ledger, "header:x-client-id"),
    );
    let stats = stats(&records);
    assert_eq!(stats.turns, requests, "one turn per request: {stats:?}");
    assert_eq!(stats.ignored_claims, 0, "{stats:?}");
    assert_eq!(stats.unattributed, Default::default(), "{stats:?}");
    agent.stop();
}

#[test]
fn nginx_keepalive_pool_bytes_are_attributed_per_request() {
    let bench = Bench::new("attr-nginx", HttpServerOptions::new(PORT));
    let nginx = Nginx::start(
        &bench.pair,
        "attr-nginx",
        &NginxConfig::l7(bench.server.addr_v4()),
    );
    through_l7_gateway(&bench, nginx.addr_v4(), nginx.addr_v6());
    nginx.assert_running();
}

#[test]
fn haproxy_http_reuse_bytes_are_attributed_per_request() {
    let bench = Bench::new("attr-hahttp", HttpServerOptions::new(PORT));
    let haproxy = Haproxy::start(
        &bench.pair,
        "attr-hahttp",
        &HaproxyConfig::http_reuse(bench.server.addr_v4()),
    );
    through_l7_gateway(&bench, haproxy.addr_v4(), haproxy.addr_v6());
    haproxy.assert_running();
}

#[test]
fn haproxy_tcp_proxy_v2_bytes_are_attributed_per_connection() {
    let bench = Bench::new("attr-hatcp", HttpServerOptions::new(PORT));
    let haproxy = Haproxy::start(
        &bench.pair,
        "attr-hatcp",
        &HaproxyConfig::tcp(bench.server.addr_v4(), ProxyVersion::V2),
    );
    let agent = bench.agent(&ATTRIBUTION);
    // No ids: behind a PROXY header the sender is the client host, which is not trusted.
    let ledger = bench.run_loads(
        load(haproxy.addr_v4(), bench.clients(true, 0), 120, 0xb4),
        load(haproxy.addr_v6(), bench.clients(false, 0), 24, 0xb6),
    );
    let requests = ledger.pairs.len() as u64;
    let records = wait_counted(&agent, &ledger, requests);
    assert_attributed(
        &records,
        &ledger,
        &Expected::addresses_only(&ledger, "proxy-v2"),
    );
    let stats = stats(&records);
    assert_eq!(stats.turns, requests, "one turn per request: {stats:?}");
    assert_eq!(stats.ignored_claims, 0, "{stats:?}");
    assert_eq!(stats.unattributed, Default::default(), "{stats:?}");
    agent.stop();
    haproxy.assert_running();
}

#[test]
fn forged_claims_from_untrusted_clients_are_ignored() {
    let bench = Bench::new("attr-forged", HttpServerOptions::new(PORT));
    let agent = bench.agent(&ATTRIBUTION);
    let clients: Vec<LoadClient> = bench.clients(true, 2).into_iter().take(8).collect();
    let mut forged = load(bench.server.addr_v4(), clients, 40, 0xc4);
    forged.forge_xff = Some("203.0.113.9".to_owned());
    forged.forge_proxy = Some((ProxyVersion::V2, "203.0.113.10".parse().expect("ip")));
    let results = run_load(testpeer_bin!(), &bench.pair, &forged);
    let ledger = bench.join(&results);
    let requests = ledger.pairs.len() as u64;
    let connections = results
        .iter()
        .map(|r| (r.source, r.local_port))
        .collect::<BTreeSet<_>>()
        .len() as u64;
    let records = wait_counted(&agent, &ledger, requests);
    // Each client is its own address, whatever it claims.
    assert_attributed(
        &records,
        &ledger,
        &Expected::addresses_only(&ledger, "peer"),
    );
    let stats = stats(&records);
    // One claim per connection (its PROXY header) and one per request (its headers).
    assert_eq!(
        stats.ignored_claims,
        connections + requests,
        "{connections} PROXY headers and {requests} requests with headers: {stats:?}"
    );
    assert_eq!(stats.unattributed, Default::default(), "{stats:?}");
    agent.stop();
}

#[test]
fn pipelined_requests_are_the_peers() {
    let bench = Bench::new("attr-pipe", HttpServerOptions::new(PORT));
    let agent = bench.agent(&ATTRIBUTION);
    // From the trusted address itself, with headers it would be believed for one at a time.
    let gateway_like = vec![LoadClient {
        addr: CLIENT_V4.into(),
        ids: vec!["tenant-0".to_owned(), "tenant-1".to_owned()],
    }];
    let mut pipelined = load(bench.server.addr_v4(), gateway_like, 40, 0xd4);
    pipelined.pipeline = true;
    pipelined.forge_xff = Some("198.51.100.99".to_owned());
    let results = run_load(testpeer_bin!(), &bench.pair, &pipelined);
    assert!(results.iter().all(|r| r.pipelined), "all in pairs");
    let ledger = bench.join(&results);
    let requests = ledger.pairs.len() as u64;
    let records = wait_counted(&agent, &ledger, requests / 2);
    let expected = Expected {
        by_addr: BTreeMap::from([(IpAddr::from(CLIENT_V4), ledger.total())]),
        by_id: BTreeMap::from([(None, ledger.total())]),
        sources: BTreeSet::from(["peer"]),
    };
    assert_attributed(&records, &ledger, &expected);
    let stats = stats(&records);
    assert_eq!(
        stats.unattributed.pipelined,
        requests / 2,
        "one pipelined turn per pair: {stats:?}"
    );
    agent.stop();
}

#[test]
fn annotations_name_the_tenant_of_each_request() {
    let options = HttpServerOptions {
        annotate: Some("x-tenant".to_owned()),
        ..HttpServerOptions::new(PORT)
    };
    let bench = Bench::new("attr-annot", options);
    let agent = bench.agent(&["--annotations", "--raw-ids"]);
    // One host, one keep-alive connection, tenants in turn.
    let host = bench.hosts[0];
    let tenants = vec![LoadClient {
        addr: host,
        ids: vec![
            "tenant-a".to_owned(),
            "tenant-b".to_owned(),
            "tenant-c".to_owned(),
        ],
    }];
    let mut spec = load(bench.server.addr_v4(), tenants, 30, 0xe4);
    spec.id_header = "x-tenant".to_owned();
    spec.cycle_ids = true;
    let results = run_load(testpeer_bin!(), &bench.pair, &spec);
    let ledger = bench.join(&results);
    assert_eq!(ledger.conns.len(), 1, "one connection");
    for (_, s) in &ledger.pairs {
        let annotation = s.annotation.as_ref().expect("every request annotated");
        assert_eq!(
            annotation.errno, None,
            "the agent takes the annotation: {s:?}"
        );
    }
    // Turns are not waited for: what the agent reads of requests plays no part here.
    let records = wait_counted(&agent, &ledger, 0);
    assert_attributed(&records, &ledger, &Expected::clients(&ledger, "annotation"));
    agent.stop();
}

/// End to end through nginx: the agent streams to a real collector, whose totals per client
/// address and per client id equal what the server wrote for each client, to the byte; the
/// gateway's own address has no client bytes.
#[test]
fn collector_totals_per_client_address_and_id_are_exact() {
    let bench = Bench::new("attr-coll", HttpServerOptions::new(PORT));
    let nginx = Nginx::start(
        &bench.pair,
        "attr-coll",
        &NginxConfig::l7(bench.server.addr_v4()),
    );
    let (data, state) = (TempDir::new("attr-coll-c"), TempDir::new("attr-coll-a"));
    let collector = Collector::start(free_port(), &["--data-dir", data.as_arg()]);
    let spool = state.path().join("spool");
    let url = collector.url();
    let mut extra = ATTRIBUTION.to_vec();
    extra.extend_from_slice(&[
        "--output",
        "json",
        "--collector",
        &url,
        "--state-dir",
        state.as_arg(),
        "--spool-dir",
        spool.to_str().expect("utf-8 path"),
    ]);
    let agent = bench.agent(&extra);
    let ledger = bench.run_loads(
        load(nginx.addr_v4(), bench.clients(true, 2), 120, 0xc4),
        load(nginx.addr_v6(), bench.clients(false, 2), 20, 0xc6),
    );
    assert!(
        !ledger.shared_conns().is_empty(),
        "the gateway pooled requests of several clients on a server connection"
    );
    let want_addr: BTreeMap<String, u64> = ledger
        .by_source
        .iter()
        .map(|(a, b)| (a.to_string(), *b))
        .collect();
    let want_id: BTreeMap<String, u64> = ledger
        .by_id
        .iter()
        .map(|(id, b)| (id.clone().expect("every request has an id"), *b))
        .collect();
    let got = || {
        let addr: BTreeMap<String, u64> = want_addr
            .keys()
            .map(|k| (k.clone(), collector.day_bytes(k).0))
            .collect();
        let id: BTreeMap<String, u64> = want_id
            .keys()
            .map(|k| (k.clone(), collector.day_bytes(&format!("id:{k}")).0))
            .collect();
        (addr, id)
    };
    let reached = poll_until(Duration::from_secs(60), || {
        let (addr, id) = got();
        addr == want_addr && id == want_id
    });
    let (addr, id) = got();
    assert!(
        reached,
        "collector totals per client address:\n{addr:?}\nwant\n{want_addr:?}\nper id:\n{id:?}\nwant\n{want_id:?}"
    );
    // The gateway's address is the peer of every connection, the client of none.
    assert_eq!(
        collector.day_bytes("198.18.0.2").0,
        0,
        "the gateway is no client"
    );
    agent.stop();
    collector.stop();
    nginx.assert_running();
}
