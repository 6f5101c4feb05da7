//! Proves the gateway harness without the agent: real nginx and HAProxy between dozens of
//! client hosts and the HTTP server, every request's bytes known on both ends, and requests of
//! different clients sharing server connections (the case the agent's per-request attribution
//! is for).
//!
//! Needs root, nginx and haproxy (`cargo xtask setup`). Run with
//! `cargo test -p outflow-tests --test gateway_harness`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::Duration;

use outflow_tests::cgroup::TestCgroup;
use outflow_tests::gateway::{Haproxy, HaproxyConfig, Nginx, NginxConfig};
use outflow_tests::http::{
    HttpServer, HttpServerOptions, Ledger, LoadClient, LoadSpec, ProxyVersion, RequestResult,
    ServedRequest, run_load,
};
use outflow_tests::netns::{CLIENT_V4, NetnsPair};
use outflow_tests::testpeer_bin;

const PORT: u16 = 8000;
const WAIT: Duration = Duration::from_secs(20);
/// IPv4 and IPv6 client hosts per test.
const HOSTS_V4: u8 = 40;
const HOSTS_V6: u16 = 8;
/// Ids shared by the hosts: host `i` sends `tenant-{i % IDS}` and `tenant-{(i + 1) % IDS}`.
const IDS: usize = 5;

/// A server in its cgroup and namespace, and the client hosts in the client namespace.
struct Bed {
    pair: NetnsPair,
    _cgroup: TestCgroup,
    server: HttpServer,
    hosts: Vec<IpAddr>,
}

impl Bed {
    fn new(tag: &str, options: HttpServerOptions) -> Self {
        let pair = NetnsPair::new(tag);
        let hosts = pair.add_client_hosts(HOSTS_V4, HOSTS_V6);
        let cgroup = TestCgroup::new(tag);
        let server = HttpServer::start(testpeer_bin!(), &pair, &cgroup, &options);
        Self {
            pair,
            _cgroup: cgroup,
            server,
            hosts,
        }
    }

    /// The hosts of one family, each with two of the shared ids.
    fn clients(&self, v4: bool) -> Vec<LoadClient> {
        self.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_ipv4() == v4)
            .map(|(i, &addr)| LoadClient {
                addr,
                ids: vec![
                    format!("tenant-{}", i % IDS),
                    format!("tenant-{}", (i + 1) % IDS),
                ],
            })
            .collect()
    }

    /// Runs a load from the IPv4 hosts to `v4` and one from the IPv6 hosts to `v6` at the same
    /// time, and joins their results with the server's.
    fn run_both(&self, v4: SocketAddr, v6: SocketAddr, parallel: usize) -> Ledger {
        let mut spec4 = LoadSpec::new(v4, self.clients(true), 200);
        spec4.seed = 0x4444;
        spec4.max_bytes = 2_000_000;
        spec4.parallel = parallel;
        let mut spec6 = LoadSpec::new(v6, self.clients(false), 40);
        spec6.seed = 0x6666;
        spec6.max_bytes = 1_000_000;
        spec6.parallel = parallel.min(4);
        let results: Vec<RequestResult> = thread::scope(|s| {
            let six = s.spawn(|| run_load(testpeer_bin!(), &self.pair, &spec6));
            let mut results = run_load(testpeer_bin!(), &self.pair, &spec4);
            results.extend(six.join().expect("the IPv6 load"));
            results
        });
        let served = self.server.wait_requests(&results, WAIT);
        assert_eq!(
            served.len(),
            results.len(),
            "the server answered only the loads' requests"
        );
        let ledger = Ledger::join(&results, &served);
        for (r, _) in &ledger.pairs {
            assert_eq!(r.body_received, r.bytes, "{r:?}");
        }
        assert!(
            ledger.pairs.iter().any(|(r, _)| r.bytes == 0)
                && ledger.pairs.iter().any(|(r, _)| r.bytes == 2_000_000),
            "the loads include empty and large responses"
        );
        ledger
    }
}

fn summary(ledger: &Ledger) -> String {
    let shared = ledger.shared_conns();
    let most = ledger
        .conns
        .values()
        .map(|c| c.sources.len())
        .max()
        .unwrap_or(0);
    format!(
        "{} requests, {} bytes, {} server connections, {} of them carrying several clients \
         (up to {most})",
        ledger.pairs.len(),
        ledger.total(),
        ledger.conns.len(),
        shared.len()
    )
}

/// Behind an L7 gateway: the server's peer is the gateway, the headers name the client.
fn assert_headers_name_the_client(ledger: &Ledger) {
    for (r, s) in &ledger.pairs {
        assert_eq!(s.peer.ip(), IpAddr::from(CLIENT_V4), "{s:?}");
        assert_eq!(
            s.forwarded_for.as_deref(),
            Some(r.source.to_string().as_str()),
            "X-Forwarded-For names the client host: {r:?} {s:?}"
        );
        assert_eq!(s.client_id, r.id, "x-client-id passed through: {r:?} {s:?}");
        assert_eq!(s.proxy, None, "{s:?}");
    }
}

#[test]
fn nginx_pools_requests_of_many_clients_on_few_upstream_connections() {
    let bed = Bed::new("gw-nginx", HttpServerOptions::new(PORT));
    let nginx = Nginx::start(
        &bed.pair,
        "gw-nginx",
        &NginxConfig::l7(bed.server.addr_v4()),
    );
    let ledger = bed.run_both(nginx.addr_v4(), nginx.addr_v6(), 8);
    nginx.assert_running();
    eprintln!("nginx: {}", summary(&ledger));
    assert_headers_name_the_client(&ledger);
    assert!(
        !ledger.shared_conns().is_empty(),
        "an upstream connection carried requests of several clients: {}",
        summary(&ledger)
    );
    // `keepalive 4` keeps at most 4 idle: upstream connections serve many requests each.
    assert!(
        ledger.conns.len() * 2 < ledger.pairs.len(),
        "{}; access log tail:\n{}",
        summary(&ledger),
        nginx
            .access_log()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn haproxy_http_reuse_shares_server_connections_between_clients() {
    let bed = Bed::new("gw-hahttp", HttpServerOptions::new(PORT));
    let haproxy = Haproxy::start(
        &bed.pair,
        "gw-hahttp",
        &HaproxyConfig::http_reuse(bed.server.addr_v4()),
    );
    let ledger = bed.run_both(haproxy.addr_v4(), haproxy.addr_v6(), 8);
    haproxy.assert_running();
    eprintln!("haproxy http: {}", summary(&ledger));
    assert_headers_name_the_client(&ledger);
    assert!(
        !ledger.shared_conns().is_empty(),
        "a server connection carried requests of several clients: {}",
        summary(&ledger)
    );
}

fn assert_proxy_names_the_client(ledger: &Ledger, version: ProxyVersion) {
    for (r, s) in &ledger.pairs {
        assert_eq!(s.peer.ip(), IpAddr::from(CLIENT_V4), "{s:?}");
        let proxy = s.proxy.unwrap_or_else(|| panic!("no PROXY header: {s:?}"));
        assert_eq!(proxy.version, version, "{s:?}");
        assert_eq!(
            proxy.src,
            Some(SocketAddr::new(r.source, r.local_port)),
            "the PROXY header names the client's connection: {r:?} {s:?}"
        );
        assert_eq!(s.client_id, r.id, "{r:?} {s:?}");
        assert_eq!(s.forwarded_for, None, "{s:?}");
    }
    // In TCP mode, one server connection per client connection.
    for (n, conn) in &ledger.conns {
        assert_eq!(conn.sources.len(), 1, "server connection {n}: {conn:?}");
    }
    let client_conns: BTreeSet<(IpAddr, u16)> = ledger
        .pairs
        .iter()
        .map(|(r, _)| (r.source, r.local_port))
        .collect();
    assert_eq!(
        ledger.conns.len(),
        client_conns.len(),
        "{}",
        summary(ledger)
    );
}

#[test]
fn haproxy_tcp_sends_each_clients_address_in_a_proxy_v2_header() {
    let bed = Bed::new("gw-hatcp2", HttpServerOptions::new(PORT));
    let haproxy = Haproxy::start(
        &bed.pair,
        "gw-hatcp2",
        &HaproxyConfig::tcp(bed.server.addr_v4(), ProxyVersion::V2),
    );
    let ledger = bed.run_both(haproxy.addr_v4(), haproxy.addr_v6(), 8);
    haproxy.assert_running();
    eprintln!("haproxy tcp v2: {}", summary(&ledger));
    assert_proxy_names_the_client(&ledger, ProxyVersion::V2);
}

#[test]
fn haproxy_tcp_sends_each_clients_address_in_a_proxy_v1_header() {
    let bed = Bed::new("gw-hatcp1", HttpServerOptions::new(PORT));
    let haproxy = Haproxy::start(
        &bed.pair,
        "gw-hatcp1",
        &HaproxyConfig::tcp(bed.server.addr_v4(), ProxyVersion::V1),
    );
    let ledger = bed.run_both(haproxy.addr_v4(), haproxy.addr_v6(), 8);
    eprintln!("haproxy tcp v1: {}", summary(&ledger));
    assert_proxy_names_the_client(&ledger, ProxyVersion::V1);
}

/// Clients straight to the server: forged claims arrive as sent, pipelined pairs are answered
/// in order, and without an agent the annotation `setsockopt` fails with `ENOPROTOOPT`.
#[test]
fn direct_clients_forge_pipeline_and_annotate() {
    let options = HttpServerOptions {
        annotate: Some("x-tenant".to_owned()),
        ..HttpServerOptions::new(PORT)
    };
    let bed = Bed::new("gw-direct", options);
    let v4: Vec<LoadClient> = bed.clients(true).into_iter().take(6).collect();

    let mut forged = LoadSpec::new(bed.server.addr_v4(), v4.clone(), 30);
    forged.seed = 0xf0f0;
    forged.forge_xff = Some("203.0.113.9".to_owned());
    forged.forge_proxy = Some((ProxyVersion::V2, "203.0.113.10".parse().expect("ip")));
    let forged_results = run_load(testpeer_bin!(), &bed.pair, &forged);

    let mut pipelined = LoadSpec::new(bed.server.addr_v6(), bed.clients(false), 32);
    pipelined.seed = 0xf1f1;
    pipelined.pipeline = true;
    let pipelined_results = run_load(testpeer_bin!(), &bed.pair, &pipelined);
    assert!(pipelined_results.iter().all(|r| r.pipelined));

    let tenants = vec![LoadClient {
        addr: v4[0].addr,
        ids: vec!["tenant-a".to_owned(), "tenant-b".to_owned()],
    }];
    let mut annotated = LoadSpec::new(bed.server.addr_v4(), tenants, 10);
    annotated.seed = 0xf2f2;
    annotated.id_header = "x-tenant".to_owned();
    annotated.cycle_ids = true;
    let annotated_results = run_load(testpeer_bin!(), &bed.pair, &annotated);

    let all: Vec<RequestResult> = [&forged_results, &pipelined_results, &annotated_results]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let served = bed.server.wait_requests(&all, WAIT);
    let ledger = Ledger::join(&all, &served);
    let of = |r: &RequestResult| -> &ServedRequest {
        &ledger
            .pairs
            .iter()
            .find(|(q, _)| q.req == r.req)
            .expect("joined")
            .1
    };
    for r in &forged_results {
        let s = of(r);
        assert_eq!(s.peer.ip(), r.source, "{s:?}");
        assert_eq!(s.forwarded_for.as_deref(), Some("203.0.113.9"), "{s:?}");
        let proxy = s.proxy.unwrap_or_else(|| panic!("no PROXY header: {s:?}"));
        assert_eq!(
            proxy.src,
            Some(SocketAddr::new(
                "203.0.113.10".parse().expect("ip"),
                r.local_port
            ))
        );
        assert_eq!(r.proxy_bytes > 0, r.index_on_conn == 0, "{r:?}");
    }
    for r in &pipelined_results {
        let s = of(r);
        assert_eq!(s.peer.ip(), r.source, "{s:?}");
        assert_eq!(s.index, r.index_on_conn, "answered in order: {r:?} {s:?}");
    }
    let mut last = None;
    for r in &annotated_results {
        let s = of(r);
        let annotation = s
            .annotation
            .as_ref()
            .unwrap_or_else(|| panic!("annotated: {s:?}"));
        assert_eq!(Some(&annotation.value), r.id.as_ref(), "{s:?}");
        assert_eq!(annotation.errno, Some(libc::ENOPROTOOPT), "{s:?}");
        assert_ne!(last, r.id, "tenants alternate on the connection");
        last = r.id.clone();
    }
    let conns: BTreeSet<u64> = annotated_results.iter().map(|r| of(r).conn).collect();
    assert_eq!(conns.len(), 1, "one keep-alive connection");
    // Every connection ended: the load closes them, the server reports each.
    let closed = bed.server.wait_closed(ledger.conns.len(), WAIT);
    for c in &closed {
        assert_eq!(c.error, None, "{c:?}");
        let joined = &ledger.conns[&c.conn];
        assert_eq!(c.bytes_written, joined.response_bytes, "{c:?}");
        let proxy = c.proxy.map_or(0, |p| p.len);
        assert_eq!(c.bytes_read, joined.request_bytes + proxy, "{c:?}");
    }
}
