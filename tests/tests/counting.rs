//! The agent against ground truth, on this kernel: real programs attached to a real cgroup,
//! traffic between two network namespaces. Every count is compared to the byte with what the
//! client sent and received and with the server socket's own `tcp_info`.
//!
//! Needs root (CI runs it as root): nothing here skips itself.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use outflow_tests::{
    agent::{Agent, PinDir},
    cgroup::TestCgroup,
    collector::Metrics,
    faults::nft::{NetFault, Nft},
    netns::{self, CLIENT_V4, CLIENT_V6, NetnsPair, SERVER_V4, SERVER_V6},
    peer::{Client, Outcome, Server},
    protocol::{DONE_BYTE, HEADER_LEN, RequestHeader, ServerResult},
    records::{ConnRecord, ConnTotals, Role, conn_records, of_type},
    testpeer_bin,
    wait::poll_until,
};
use serde_json::Value;

const PORT: u16 = 8000;
const WAIT: Duration = Duration::from_secs(90);

/// A server in its own cgroup and network namespace, a client in another, and a pin directory.
struct Bench {
    pair: NetnsPair,
    cgroup: TestCgroup,
    server: Server,
    client: Client,
    pin: PinDir,
}

impl Bench {
    fn new(tag: &str) -> Self {
        Self::with_ports(tag, &[PORT])
    }

    /// A bench whose server listens at each of `ports`.
    fn with_ports(tag: &str, ports: &[u16]) -> Self {
        let pair = NetnsPair::new(tag);
        let cgroup = TestCgroup::new(tag);
        let server = Server::start(testpeer_bin!(), &pair, &cgroup, ports);
        let client = Client::new(&pair);
        let pin = PinDir::new(tag);
        Self {
            pair,
            cgroup,
            server,
            client,
            pin,
        }
    }

    /// Starts an agent on this bench's cgroup and pin directory and waits until it has attached.
    fn agent(&self, extra: &[&str]) -> (Agent, Value) {
        let mut args = vec![
            "--cgroup",
            self.cgroup.as_arg(),
            "--pin-dir",
            self.pin.as_arg(),
        ];
        if !extra.contains(&"--interval") {
            args.extend(["--interval", "200ms"]);
        }
        args.extend_from_slice(extra);
        let agent = Agent::start(&args);
        let started = agent.wait_started(WAIT);
        (agent, started)
    }
}

/// Server-side records of the connection the client made as `o`.
fn of_outcome<'a>(conns: &'a [ConnRecord], o: &Outcome) -> Vec<&'a ConnRecord> {
    conns
        .iter()
        .filter(|c| c.remote_addr == o.local_addr && c.remote_port == o.local_port)
        .collect()
}

fn totals(records: &[&ConnRecord]) -> ConnTotals {
    let mut t = ConnTotals::default();
    for r in records {
        t.add(r);
    }
    t
}

/// True once every outcome's connection has its closed record.
fn all_closed(records: &[Value], outcomes: &[Outcome]) -> bool {
    let conns = conn_records(records);
    outcomes
        .iter()
        .all(|o| of_outcome(&conns, o).iter().any(|c| c.closed))
}

/// Asserts one connection's records against the client's view and the server's tcp_info.
fn assert_exact(conns: &[ConnRecord], o: &Outcome, result: &ServerResult, bench: &Bench) {
    let recs = of_outcome(conns, o);
    let t = totals(&recs);
    assert_eq!(t.closed, 1, "closed exactly once: {o:?} {recs:#?}");
    assert!(
        recs.last().is_some_and(|r| r.closed),
        "the closed record is the last: {recs:#?}"
    );
    assert_eq!(
        t.bytes_out, o.received,
        "bytes_out vs what the client received: {o:?}"
    );
    assert_eq!(
        t.bytes_in, o.sent,
        "bytes_in vs what the client sent: {o:?}"
    );
    assert_eq!(
        t.bytes_out, result.bytes_acked,
        "bytes_out vs tcp_info bytes_acked: {result:?}"
    );
    assert_eq!(
        t.bytes_in, result.bytes_received,
        "bytes_in vs tcp_info bytes_received: {result:?}"
    );
    // Every segment carries at least an IP and a TCP header.
    let hdr = if o.local_addr.is_ipv4() { 40 } else { 60 };
    assert!(t.segments_out >= 1 && t.segments_in >= 1, "{t:?}");
    assert!(
        t.wire_bytes_out >= t.bytes_out + hdr * t.segments_out,
        "wire out {t:?}"
    );
    // Segments that arrive while the server's connection is being established carry payload
    // that is counted (by sequence, from where the connection starts) but not their wire bytes
    // or segments: the one that completes the handshake when its last ACK was lost is
    // processed on the listener, and others that another CPU takes meanwhile meet a socket
    // still in SYN_RECV (the child is findable before sock_ops gives it its state). The
    // server acknowledges no data before it is established, so they hold at most the
    // client's initial window: 10 segments. Seen under loss: one segment in a quiet VM, about
    // five on 2 busy vCPUs (CI, suites in parallel), as Linux 5.10 showed in segments below.
    const INITIAL_WINDOW: u64 = 10 * 1460;
    assert!(
        t.wire_bytes_in + INITIAL_WINDOW >= t.bytes_in + hdr * t.segments_in,
        "wire in {t:?}"
    );
    for r in &recs {
        assert_eq!(r.role, Role::Server, "{r:?}");
        assert_eq!(r.cgroup, bench.cgroup.relative_path(), "{r:?}");
        assert_eq!(r.cgroup_id, bench.cgroup.id(), "{r:?}");
        assert_eq!(r.local_port, PORT, "{r:?}");
        assert!(r.first_seen <= r.last_seen, "{r:?}");
    }
}

/// Deterministic pseudo-random numbers (splitmix64), so a failure can be replayed.
struct Sizes(u64);

impl Sizes {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Log-uniform in [0, max]: as many small responses as large ones.
    fn size(&mut self, max: u64) -> u64 {
        let bits = self.next() % (64 - u64::from(max.leading_zeros()) + 1);
        if bits == 0 {
            0
        } else {
            (self.next() % (1 << bits)).min(max)
        }
    }
}

#[test]
fn counts_every_connection_exactly_over_ipv4_and_ipv6() {
    let bench = Bench::new("exact");
    let (agent, started) = bench.agent(&[]);
    assert_eq!(started["adopted"], false, "{started}");
    assert_eq!(started["cgroup"], bench.cgroup.relative_path(), "{started}");

    let mut rng = Sizes(0x0f10_c0de);
    let mut sizes: Vec<(u64, u64)> = vec![
        (0, 0),
        (1, 1),
        (1447, 1448),
        (65_536, 65_535),
        (50_000_000, 1_000),
    ];
    sizes.extend((0..11).map(|_| (rng.size(50_000_000), rng.size(2_000_000))));
    let mut outcomes =
        bench
            .client
            .request_many(bench.pair.server_v4(PORT), sizes.len(), &sizes, 4);
    outcomes.extend(
        bench
            .client
            .request_many(bench.pair.server_v6(PORT), sizes.len(), &sizes, 4),
    );

    let results = bench.server.wait_results(outcomes.len(), WAIT);
    let records = agent.wait_until(WAIT, |r| all_closed(r, &outcomes));
    let conns = conn_records(&records);
    for o in &outcomes {
        assert_exact(&conns, o, o.server_result(&results), &bench);
        let recs = of_outcome(&conns, o);
        assert!(
            recs.iter().all(|r| r.pid == Some(bench.server.pid())
                && r.comm.as_deref() == Some("outflow-testpee")),
            "pid/comm of the listening socket's owner: {recs:#?}"
        );
    }
    assert!(
        of_type(&records, "overflow").next().is_none(),
        "nothing overflowed"
    );
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn a_retransmitted_byte_is_counted_once_under_packet_loss() {
    let bench = Bench::new("loss");
    // 10% of the packets to and from the server's port dropped in the client's namespace,
    // after the server sent them: segments are sent again, and acknowledged late.
    let nft = Nft::in_netns_to(bench.pair.client_ns(), PORT);
    nft.set(NetFault::Loss(10));
    let (agent, _) = bench.agent(&[]);
    let sizes = [(3_000_000, 20_000), (500_000, 1_000), (1, 1)];
    let outcomes = bench
        .client
        .request_many(bench.pair.server_v4(PORT), 9, &sizes, 3);
    let results = bench.server.wait_results(outcomes.len(), WAIT);
    let records = agent.wait_until(WAIT, |r| all_closed(r, &outcomes));
    let conns = conn_records(&records);
    let mut retransmitted = 0;
    for o in &outcomes {
        let result = o.server_result(&results);
        // Payload once, whatever was sent again: the client's view and tcp_info's.
        assert_exact(&conns, o, result, &bench);
        let t = totals(&of_outcome(&conns, o));
        // Segments, retransmissions included, as TCP counts them: tcp_info is read before the
        // close, so the agent has the FIN exchange on top (a few segments, more if one of them
        // is lost and sent again), and it counts from establishment, without the handshake
        // (under loss the handshake's segments can be several: a lost SYN-ACK or last ACK is
        // sent again; Linux 5.10 counted 5 more segments in than the agent, bytes still exact).
        let (out, inb) = (u64::from(result.segs_out), u64::from(result.segs_in));
        assert!(
            (out..=out + 8).contains(&t.segments_out),
            "segments_out {} vs tcp_info segs_out {out}: {result:?}",
            t.segments_out
        );
        assert!(
            (inb.saturating_sub(8)..=inb + 3).contains(&t.segments_in),
            "segments_in {} vs tcp_info segs_in {inb}: {result:?}",
            t.segments_in
        );
        retransmitted += result.total_retrans;
    }
    assert!(
        retransmitted > 0,
        "nothing was retransmitted: the loss was not applied"
    );
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn two_thousand_connections_in_one_interval_each_closed_once() {
    let bench = Bench::new("many");
    let (agent, _) = bench.agent(&["--interval", "5s"]);
    let sizes: Vec<(u64, u64)> = (0..2000u64)
        .map(|i| ((i * 7919) % 20_000, (i * 31) % 700))
        .collect();
    let outcomes = bench
        .client
        .request_many(bench.pair.server_v4(PORT), sizes.len(), &sizes, 8);
    let results = bench.server.wait_results(outcomes.len(), WAIT);
    let records = agent.wait_until(WAIT, |r| all_closed(r, &outcomes));
    let conns = conn_records(&records);
    for o in &outcomes {
        assert_exact(&conns, o, o.server_result(&results), &bench);
    }
    // Every slot went back to the kernel.
    let records = agent.wait_until(WAIT, |r| {
        of_type(r, "stats").last().is_some_and(|s| s["live"] == 0)
    });
    let stats = of_type(&records, "stats")
        .last()
        .cloned()
        .unwrap_or_default();
    assert_eq!(stats["conns_overflowed"], 0, "{stats}");
    agent.stop();
}

#[test]
fn a_token_stream_is_reported_every_interval_and_sums_exactly() {
    let bench = Bench::new("stream");
    let (agent, _) = bench.agent(&["--interval", "1s"]);
    // 200-byte tokens every 5 ms for 10 s.
    let tokens = 2000u64;
    let o = bench
        .client
        .request(bench.pair.server_v6(PORT), 200 * tokens, 300, 200, 5);
    assert_eq!(o.received, 200 * tokens);
    let results = bench.server.wait_results(1, WAIT);
    let records = agent.wait_until(WAIT, |r| all_closed(r, std::slice::from_ref(&o)));
    let conns = conn_records(&records);
    assert_exact(&conns, &o, o.server_result(&results), &bench);
    let recs = of_outcome(&conns, &o);
    let with_bytes = recs.iter().filter(|r| r.bytes_out > 0).count();
    assert!(
        with_bytes >= 5,
        "deltas arrive while the stream goes on, not at its end: {recs:#?}"
    );
    let largest = recs.iter().map(|r| r.bytes_out).max().unwrap_or(0);
    assert!(
        largest * 2 < o.received,
        "no single delta holds most of the stream: {recs:#?}"
    );
    agent.stop();
}

#[test]
fn a_full_table_still_counts_every_byte_in_overflow() {
    let _stats = BpfStats::enable();
    let bench = Bench::new("small");
    let (agent, started) = bench.agent(&["--max-connections", "16"]);
    assert_eq!(started["capacity"], 16, "{started}");
    // 40 connections open at once: 16 get slots, 24 find the table full.
    let open: Vec<_> = (0..40u64)
        .map(|i| {
            bench
                .client
                .open(bench.pair.server_v4(PORT), 100_000 + i * 1_001, 10 + i)
        })
        .collect();
    let outcomes: Vec<Outcome> = open.into_iter().map(|c| c.finish()).collect();
    bench.server.wait_results(outcomes.len(), WAIT);
    let truth_out: u64 = outcomes.iter().map(|o| o.received).sum();
    let truth_in: u64 = outcomes.iter().map(|o| o.sent).sum();
    // Every close seen, and every byte reported: a byte counted in overflow just before its
    // connection's close can come in the next interval's overflow record (the agent reads the
    // overflow counters before the close counts; seen on 5.10 under QEMU, where the last
    // connection's whole response came one interval after its close). Bytes that never add up
    // fail here, after WAIT, with the records.
    let records = agent.wait_until(WAIT, |r| {
        let conns = conn_records(r);
        let tracked: Vec<&ConnRecord> = outcomes
            .iter()
            .flat_map(|o| of_outcome(&conns, o))
            .collect();
        let t = totals(&tracked);
        let (out, inb) = of_type(r, "overflow").fold((0, 0), |(o, i), v| {
            (
                o + v["bytes_out"].as_u64().unwrap_or(0),
                i + v["bytes_in"].as_u64().unwrap_or(0),
            )
        });
        of_type(r, "stats")
            .last()
            .is_some_and(|s| s["overflow_closed"] == 24 && s["live"] == 0)
            && t.bytes_out + out == truth_out
            && t.bytes_in + inb == truth_in
    });
    let conns = conn_records(&records);
    let tracked: Vec<&ConnRecord> = outcomes
        .iter()
        .flat_map(|o| of_outcome(&conns, o))
        .collect();
    let closed = tracked.iter().filter(|r| r.closed).count();
    assert_eq!(closed, 16, "16 connections tracked one by one");
    let mut overflow = (0u64, 0u64);
    for r in of_type(&records, "overflow") {
        overflow.0 += r["bytes_out"].as_u64().unwrap_or(0);
        overflow.1 += r["bytes_in"].as_u64().unwrap_or(0);
    }
    let t = totals(&tracked);
    assert!(overflow.0 > 0, "some bytes overflowed");
    assert_eq!(
        t.bytes_out + overflow.0,
        truth_out,
        "tracked + overflow = what clients received"
    );
    assert_eq!(
        t.bytes_in + overflow.1,
        truth_in,
        "tracked + overflow = what clients sent"
    );
    let stats = of_type(&records, "stats")
        .last()
        .cloned()
        .unwrap_or_default();
    assert_eq!(stats["conns_overflowed"], 24, "{stats}");
    // The metrics endpoint says the same, to the byte, and how often the programs ran.
    let addr = agent.metrics_addr(WAIT);
    let mut last = None;
    let same = poll_until(WAIT, || {
        let m = Metrics::fetch(addr).expect("GET /metrics");
        let same = m.value("outflow_agent_overflow_bytes_total{direction=\"out\"}")
            == overflow.0 as f64
            && m.value("outflow_agent_overflow_bytes_total{direction=\"in\"}") == overflow.1 as f64
            && m.sum("outflow_agent_program_runs_total") > 0.0;
        last = Some(m);
        same
    });
    let m = last.expect("scraped once");
    assert!(
        same,
        "overflow {overflow:?} in the records; the metrics:\n{}",
        m.text()
    );
    assert_eq!(m.value("outflow_agent_connections_overflowed_total"), 24.0);
    assert_eq!(m.value("outflow_agent_overflow_closed_total"), 24.0);
    assert_eq!(m.value("outflow_agent_connection_table_capacity"), 16.0);
    assert_eq!(m.value("outflow_agent_connections_tracked"), 0.0);
    assert_eq!(m.value("outflow_agent_bpf_stats_enabled"), 1.0);
    assert!(
        m.sum("outflow_agent_program_run_seconds_total") > 0.0,
        "{}",
        m.text()
    );
    m.check_with_promtool();
    agent.stop();
}

/// Turns `kernel.bpf_stats_enabled` on (the kernel counts program runs) and back to what it
/// was when dropped.
struct BpfStats(String);

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Self {
        let was = std::fs::read_to_string(BPF_STATS_SYSCTL).expect("read kernel.bpf_stats_enabled");
        std::fs::write(BPF_STATS_SYSCTL, "1").expect("turn kernel.bpf_stats_enabled on");
        Self(was)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS_SYSCTL, self.0.trim());
    }
}

#[test]
fn an_agent_restarted_mid_transfer_loses_and_repeats_nothing() {
    let bench = Bench::new("restart");
    let (first, _) = bench.agent(&[]);
    // 1000-byte chunks every 2 ms for about 6 s, on a thread while the agents come and go.
    let addr = bench.pair.server_v4(PORT);
    let stream = thread::scope(|s| {
        let transfer = s.spawn(|| bench.client.request(addr, 3_000_000, 5_000, 1_000, 2));
        // The first agent has reported part of the stream...
        first.wait_until(WAIT, |r| {
            conn_records(r)
                .iter()
                .filter(|c| c.local_port == PORT && c.bytes_out > 0)
                .count()
                >= 2
        });
        assert_eq!(first.stop().code(), Some(0), "{}", first.stderr());
        // ...then, with the kernel counting alone for a while, a second one takes over.
        thread::sleep(Duration::from_millis(500));
        let (second, started) = bench.agent(&[]);
        assert_eq!(
            started["adopted"], true,
            "the second agent adopts the pinned state: {started}"
        );
        let o = transfer.join().expect("the transfer thread");
        (second, o)
    });
    let (second, o) = stream;
    let results = bench.server.wait_results(1, WAIT);
    let later = second.wait_until(WAIT, |r| all_closed(r, std::slice::from_ref(&o)));
    let mut both = first.records();
    both.extend(later);
    let conns = conn_records(&both);
    assert!(!of_outcome(&conns, &o).is_empty());
    assert_exact(&conns, &o, o.server_result(&results), &bench);
    second.stop();
}

#[test]
fn connections_open_before_the_agent_are_counted_from_their_first_packet() {
    let bench = Bench::new("legacy");
    // Connected, header sent; the request body and the whole response come after the agent.
    let conn = bench
        .client
        .open(bench.pair.server_v4(PORT), 2_000_000, 40_000);
    let (agent, _) = bench.agent(&[]);
    let o = conn.finish();
    let records = agent.wait_until(WAIT, |r| all_closed(r, std::slice::from_ref(&o)));
    let conns = conn_records(&records);
    let recs = of_outcome(&conns, &o);
    let t = totals(&recs);
    assert!(recs.iter().all(|r| r.role == Role::Unknown), "{recs:#?}");
    assert_eq!(t.closed, 1, "its close is seen too (tracepoint): {recs:#?}");
    assert_eq!(
        t.bytes_out, o.received,
        "the whole response came after the agent"
    );
    let header = HEADER_LEN as u64;
    assert_eq!(
        t.bytes_in,
        o.sent - header,
        "all but the header, sent before the agent"
    );
    agent.stop();
}

/// One exchange of the test protocol with `addr`; returns (sent, received).
fn exchange(addr: SocketAddr, resp_len: u64, req_len: u64) -> (u64, u64) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    exchange_on(&mut s, resp_len, req_len)
}

/// One exchange of the test protocol over the connected `s`; returns (sent, received).
fn exchange_on(s: &mut TcpStream, resp_len: u64, req_len: u64) -> (u64, u64) {
    let header = RequestHeader {
        resp_len,
        req_len,
        chunk: 0,
        interval_ms: 0,
    };
    s.write_all(&header.encode()).expect("write header");
    s.write_all(&vec![7u8; req_len as usize])
        .expect("write body");
    let mut got = vec![0u8; resp_len as usize];
    s.read_exact(&mut got).expect("read response");
    s.write_all(&[DONE_BYTE]).expect("write done byte");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("read to EOF");
    (header.client_bytes(), resp_len + rest.len() as u64)
}

#[test]
fn loopback_is_excluded_by_default_and_included_on_request() {
    let pair = NetnsPair::new("lo");
    let cgroup = TestCgroup::new("lo");
    let lo4 = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), PORT);
    let lo6: SocketAddr = SocketAddr::new("::1".parse().expect("ip"), PORT);
    let listen = [lo4, lo6, pair.server_v4(PORT)];
    let _server = Server::start_listening(testpeer_bin!(), &pair, &cgroup, &listen);
    let client = Client::new(&pair);
    let pin = PinDir::new("lo");
    let base = [
        "--cgroup",
        cgroup.as_arg(),
        "--pin-dir",
        pin.as_arg(),
        "--interval",
        "200ms",
    ];

    let agent = Agent::start(&base);
    agent.wait_started(WAIT);
    netns::run_in(pair.server_ns(), || {
        exchange(lo4, 10_000, 10);
        exchange(lo6, 10_000, 10);
    });
    // A connection that is reported, made after the loopback ones: once its close is out, the
    // loopback ones would have been too.
    let marker = client.request(pair.server_v4(PORT), 1_000, 1, 0, 0);
    let records = agent.wait_until(WAIT, |r| all_closed(r, std::slice::from_ref(&marker)));
    let conns = conn_records(&records);
    assert!(
        conns.iter().all(|c| !c.remote_addr.is_loopback()),
        "loopback excluded: {conns:#?}"
    );
    agent.stop();

    let agent = Agent::start(&[&base[..], &["--include-loopback"]].concat());
    agent.wait_started(WAIT);
    let (sent, received) = netns::run_in(pair.server_ns(), || exchange(lo4, 12_345, 67));
    let records = agent.wait_until(WAIT, |r| {
        conn_records(r)
            .iter()
            .any(|c| c.remote_addr.is_loopback() && c.closed)
    });
    let conns = conn_records(&records);
    let lo: BTreeMap<u16, ConnTotals> = outflow_tests::records::totals_by(
        conns.iter().filter(|c| c.remote_addr.is_loopback()),
        |c| c.remote_port,
    );
    assert_eq!(lo.len(), 1, "{lo:?}");
    let t = lo.values().next().copied().unwrap_or_default();
    assert_eq!(
        (t.bytes_out, t.bytes_in),
        (received, sent),
        "loopback counted exactly"
    );
    agent.stop();
}

/// The stats record of the agent's newest interval.
fn last_stats(records: &[Value]) -> Value {
    of_type(records, "stats")
        .last()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn connections_the_host_makes_are_counted_as_client_exactly() {
    let bench = Bench::new("role");
    // The remote end: a server in the client's namespace, in a cgroup of its own (not counted).
    let remote_cgroup = TestCgroup::new("role-remote");
    const REMOTE_PORT: u16 = 9000;
    let remote = Server::start_in(
        testpeer_bin!(),
        bench.pair.client_ns(),
        &remote_cgroup,
        &[
            SocketAddr::new(IpAddr::V4(CLIENT_V4), REMOTE_PORT),
            SocketAddr::new(IpAddr::V6(CLIENT_V6), REMOTE_PORT),
        ],
    );
    let (agent, _) = bench.agent(&[]);
    // The counted host's own outbound requests: a process in its cgroup and namespace.
    let mut requests = 0;
    for (from, to) in [
        (IpAddr::V4(SERVER_V4), IpAddr::V4(CLIENT_V4)),
        (IpAddr::V6(SERVER_V6), IpAddr::V6(CLIENT_V6)),
    ] {
        let out = Command::new(testpeer_bin!())
            .args(["load", "--netns", bench.pair.server_ns(), "--cgroup"])
            .arg(bench.cgroup.path())
            .args(["--connect", &SocketAddr::new(to, REMOTE_PORT).to_string()])
            .args(["--from", &from.to_string()])
            .args(["--resp", "300000", "--parallel", "2", "--seconds", "1"])
            .output()
            .expect("running outflow-testpeer load");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "load: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let n: usize = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("requests="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("load's summary: {text}"));
        assert!(n > 0, "{text}");
        requests += n;
    }
    let results = remote.wait_results(requests, WAIT);
    // The host's side of them (the kernel reuses the client ports of bind-before-connect, so
    // the connections are told apart by their close, not their port).
    let ours = |conns: &[ConnRecord]| -> Vec<ConnRecord> {
        conns
            .iter()
            .filter(|c| c.remote_port == REMOTE_PORT)
            .cloned()
            .collect()
    };
    let records = agent.wait_until(WAIT, |recs| {
        ours(&conn_records(recs))
            .iter()
            .filter(|c| c.closed)
            .count()
            >= requests
    });
    let recs = ours(&conn_records(&records));
    let t = totals(&recs.iter().collect::<Vec<_>>());
    assert_eq!(t.closed, requests, "each closed once");
    assert!(recs.iter().all(|c| c.role == Role::Client), "{recs:#?}");
    assert!(
        recs.iter()
            .all(|c| c.cgroup == bench.cgroup.relative_path()),
        "{recs:#?}"
    );
    // What the host sent is what the remote read; what it received, what the remote sent
    // and had acknowledged (tcp_info of the remote's sockets).
    let sum = |f: fn(&ServerResult) -> u64| results.iter().map(f).sum::<u64>();
    assert_eq!(t.bytes_out, sum(|r| r.bytes_received), "{t:?}");
    assert_eq!(t.bytes_out, sum(|r| r.received), "{t:?}");
    assert_eq!(t.bytes_in, sum(|r| r.bytes_acked), "{t:?}");
    assert_eq!(t.bytes_in, sum(|r| r.sent), "{t:?}");
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn the_filter_reports_only_its_ports_and_networks() {
    let bench = Bench::with_ports("filter", &[PORT, PORT + 1]);
    let (agent, _) = bench.agent(&[
        "--local-port",
        &PORT.to_string(),
        "--remote-cidr",
        "198.18.0.0/24",
    ]);
    let other_port = bench
        .client
        .request(bench.pair.server_v4(PORT + 1), 20_000, 10, 0, 0);
    let other_net = bench
        .client
        .request(bench.pair.server_v6(PORT), 30_000, 20, 0, 0);
    // Made last: once its close is out, the others would have been.
    let admitted = bench
        .client
        .request(bench.pair.server_v4(PORT), 40_000, 30, 0, 0);
    let results = bench.server.wait_results(3, WAIT);
    let records = agent.wait_until(WAIT, |r| {
        all_closed(r, std::slice::from_ref(&admitted)) && last_stats(r)["live"] == 0
    });
    let conns = conn_records(&records);
    assert_exact(&conns, &admitted, admitted.server_result(&results), &bench);
    for o in [&other_port, &other_net] {
        assert!(
            of_outcome(&conns, o).is_empty(),
            "{o:?} reported: {conns:#?}"
        );
    }
    assert!(
        conns
            .iter()
            .all(|c| c.local_port == PORT && c.remote_addr.is_ipv4()),
        "{conns:#?}"
    );
    // Filtered connections are still tracked, and their slots given back.
    assert_eq!(last_stats(&records)["conns_overflowed"], 0);
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn packets_whose_headers_are_not_read_are_counted_as_unparsed() {
    let bench = Bench::new("unparsed");
    let (agent, _) = bench.agent(&[]);
    // An IPv6 client whose every packet carries a Destination Options header (8 bytes, a PadN
    // option): the programs read no header chain but Hop-by-Hop, so the server's side sees
    // these packets as unparsed (their wire bytes count, their payload does not).
    let addr = bench.pair.server_v6(PORT);
    let (sent, received, port) = bench.client.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)
            .expect("socket");
        let opts: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        // SAFETY: a valid socket and an 8-byte buffer for IPV6_DSTOPTS.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IPV6,
                libc::IPV6_DSTOPTS,
                opts.as_ptr().cast(),
                opts.len() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
        s.connect(&addr.into()).expect("connect");
        let mut s: TcpStream = s.into();
        let port = s.local_addr().expect("local address").port();
        let (sent, received) = exchange_on(&mut s, 50_000, 100);
        (sent, received, port)
    });
    // An interval's stats follow its connection records: wait for the stats written after the
    // close, which the agent read after the connection's last packet.
    let records = agent.wait_until(WAIT, |r| {
        r.iter()
            .position(|v| v["type"] == "conn" && v["remote_port"] == port && v["closed"] == true)
            .is_some_and(|closed| of_type(&r[closed..], "stats").next().is_some())
    });
    let conns = conn_records(&records);
    let recs: Vec<&ConnRecord> = conns.iter().filter(|c| c.remote_port == port).collect();
    let t = totals(&recs);
    // The server's own packets are plain: counted exactly.
    assert_eq!(t.bytes_out, received, "{recs:#?}");
    // The client's carry the extension header: every one of them is unparsed, its payload
    // not counted, and the stat says how many.
    assert_eq!(t.bytes_in, 0, "{recs:#?} (sent {sent})");
    assert!(t.wire_bytes_in > sent, "{t:?}");
    let unparsed = last_stats(&records)["unparsed_packets"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        unparsed >= t.segments_in && t.segments_in > 0,
        "unparsed {unparsed}, segments in {}",
        t.segments_in
    );
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn a_connection_older_than_the_agent_without_room_to_track_its_close_is_counted_and_reported() {
    let bench = Bench::new("untracked");
    // Open before the agent, idle until after it: a legacy connection (no sock_ops events).
    let conn = bench
        .client
        .open(bench.pair.server_v4(PORT), 200_000, 5_000);
    let (agent, started) = bench.agent(&["--max-connections", "16"]);
    let capacity = started["capacity"].as_u64().expect("capacity");
    // The map of legacy connections whose close the state tracepoint finds by socket address
    // holds as many as the table: fill it, as a host with that many older connections would.
    let pinned = bench.pin.path().join("maps").join("LEGACY");
    let map = aya::maps::Map::HashMap(
        aya::maps::MapData::from_pin(&pinned).expect("open the pinned LEGACY map"),
    );
    let mut legacy: aya::maps::HashMap<_, u64, agent_common::SlotRef> =
        aya::maps::HashMap::try_from(map).expect("LEGACY is a hash map");
    for i in 0..capacity {
        // Addresses no socket has: odd ones (sockets are aligned).
        legacy
            .insert(2 * i + 1, agent_common::SlotRef::default(), 0)
            .expect("fill LEGACY");
    }
    let o = conn.finish();
    // No close can be seen to wait for: wait for both directions' bytes (the client's last
    // byte, sent after the whole response, may be reported an interval after the response).
    let records = agent.wait_until(WAIT, |r| {
        let t = totals(&of_outcome(&conn_records(r), &o));
        last_stats(r)["legacy_untracked"] == 1
            && t.bytes_out == o.received
            && t.bytes_in == o.sent - HEADER_LEN as u64
    });
    let conns = conn_records(&records);
    let t = totals(&of_outcome(&conns, &o));
    // Its bytes are counted (all of the response came after the agent)...
    assert_eq!(t.bytes_out, o.received, "{t:?}");
    assert_eq!(t.bytes_in, o.sent - HEADER_LEN as u64, "{t:?}");
    // ...its close is what cannot be seen, and the stat says so.
    assert_eq!(t.closed, 0, "{t:?}");
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn a_connection_whose_home_group_is_full_is_placed_away_and_counted_exactly() {
    for round in 0..20 {
        // A fresh table of two groups of 8 slots each round (slots are given back only after
        // the interval that reported their close).
        let bench = Bench::new(&format!("away{round}"));
        let (agent, started) = bench.agent(&["--max-connections", "16"]);
        assert_eq!(started["capacity"], 16, "{started}");
        // 16 connections at once: unless they split 8 and 8 between the groups' homes (about
        // one time in five), a home group fills first and the rest go to the other group.
        let open: Vec<_> = (0..16u64)
            .map(|i| {
                bench
                    .client
                    .open(bench.pair.server_v4(PORT), 20_000 + i * 1_001, 10 + i)
            })
            .collect();
        let outcomes: Vec<Outcome> = open.into_iter().map(|c| c.finish()).collect();
        let records = agent.wait_until(WAIT, |r| {
            all_closed(r, &outcomes) && last_stats(r)["live"] == 0
        });
        let stats = last_stats(&records);
        assert_eq!(stats["conns_overflowed"], 0, "{stats}");
        if stats["placed_away"].as_u64() > Some(0) {
            let results = bench.server.wait_results(outcomes.len(), WAIT);
            let conns = conn_records(&records);
            for o in &outcomes {
                assert_exact(&conns, o, o.server_result(&results), &bench);
            }
            eprintln!("placed away in round {round}: {stats}");
            assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
            return;
        }
        assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
    }
    panic!("20 rounds of 16 connections and none was placed away");
}
