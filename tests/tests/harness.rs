//! Proves the test harness itself, without the agent: namespaces, cgroups, the test peer,
//! the client, and the agent driver (against a stand-in shell script).
//!
//! Needs root. Run with `cargo test -p outflow-tests --test harness`.

use std::path::Path;
use std::time::{Duration, Instant};

use outflow_tests::agent::{Agent, run_bin_to_completion};
use outflow_tests::cgroup::TestCgroup;
use outflow_tests::netns::NetnsPair;
use outflow_tests::peer::{Client, Outcome, Server};
use outflow_tests::protocol::ServerResult;
use outflow_tests::records::{Role, conn_records, totals_by_conn_id};
use outflow_tests::testpeer_bin;
use serde_json::Value;

const PORT: u16 = 8000;
const RESULTS_TIMEOUT: Duration = Duration::from_secs(30);

/// Asserts that the server's kernel counters agree with what the client saw.
fn assert_agrees(outcome: &Outcome, result: &ServerResult) {
    assert_eq!(
        result.bytes_acked, outcome.received,
        "server bytes_acked vs client received: {outcome:?} {result:?}"
    );
    assert_eq!(
        result.sent, outcome.received,
        "server sent vs client received: {outcome:?} {result:?}"
    );
    assert_eq!(
        result.bytes_received, outcome.sent,
        "server bytes_received vs client sent: {outcome:?} {result:?}"
    );
    assert_eq!(
        result.received, outcome.sent,
        "server received vs client sent: {outcome:?} {result:?}"
    );
}

#[test]
fn server_tcp_info_matches_what_the_client_saw() {
    let pair = NetnsPair::new("tcpinfo");
    let cgroup = TestCgroup::new("tcpinfo");
    let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
    assert!(
        cgroup.pids().contains(&server.pid()),
        "server pid {} not in {}/cgroup.procs: {:?}",
        server.pid(),
        cgroup.path().display(),
        cgroup.pids()
    );

    let client = Client::new(&pair);
    let sizes = [(0, 0), (1, 1), (100_000, 1_000), (5_000_000, 100_000)];
    let mut outcomes = Vec::new();
    for addr in [pair.server_v4(PORT), pair.server_v6(PORT)] {
        for (resp_len, req_len) in sizes {
            let outcome = client.request(addr, resp_len, req_len, 0, 0);
            assert_eq!(outcome.received, resp_len, "{outcome:?}");
            assert_eq!(outcome.sent, 24 + req_len + 1, "{outcome:?}");
            outcomes.push(outcome);
        }
    }

    let results = server.wait_results(outcomes.len(), RESULTS_TIMEOUT);
    println!(
        "{:<5} {:>9} {:>9} {:>14} {:>11} {:>10} {:>8} {:>8} {:>7}",
        "",
        "c.sent",
        "c.recv",
        "bytes_received",
        "bytes_acked",
        "s.sent",
        "segs_in",
        "segs_out",
        "retrans"
    );
    for outcome in &outcomes {
        let result = outcome.server_result(&results);
        println!(
            "{:<5} {:>9} {:>9} {:>14} {:>11} {:>10} {:>8} {:>8} {:>7}",
            if outcome.server.is_ipv4() { "v4" } else { "v6" },
            outcome.sent,
            outcome.received,
            result.bytes_received,
            result.bytes_acked,
            result.sent,
            result.segs_in,
            result.segs_out,
            result.total_retrans
        );
        assert_agrees(outcome, result);
    }
    assert!(
        server.stderr().is_empty(),
        "server errors: {}",
        server.stderr()
    );
}

#[test]
fn token_stream_arrives_in_chunks() {
    let pair = NetnsPair::new("stream");
    let cgroup = TestCgroup::new("stream");
    let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
    let client = Client::new(&pair);

    let started = Instant::now();
    // 40 chunks of 100 bytes, 5 ms apart.
    let outcome = client.request(pair.server_v6(PORT), 4_000, 10, 100, 5);
    let elapsed = started.elapsed();
    assert_eq!(outcome.received, 4_000);
    assert!(
        elapsed >= Duration::from_millis(39 * 5),
        "40 chunks 5 ms apart took only {elapsed:?}"
    );

    let results = server.wait_results(1, RESULTS_TIMEOUT);
    let result = outcome.server_result(&results);
    assert_agrees(&outcome, result);
    // TCP_NODELAY on the server: every chunk leaves in its own segment.
    assert!(
        result.segs_out >= 40,
        "40 chunks in only {} segments: {result:?}",
        result.segs_out
    );
}

#[test]
fn open_connections_finish_later() {
    let pair = NetnsPair::new("open");
    let cgroup = TestCgroup::new("open");
    let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT, PORT + 1]);
    let client = Client::new(&pair);

    let conns = [
        client.open(pair.server_v4(PORT), 50_000, 10),
        client.open(pair.server_v6(PORT + 1), 1, 200_000),
        client.open(pair.server_v4(PORT + 1), 2_000_000, 1),
    ];
    let ports: Vec<u16> = conns.iter().map(|c| c.local_port()).collect();
    // Nothing can finish before the bodies are sent: a request made now finishes alone.
    let probe = client.request(pair.server_v4(PORT), 1, 0, 0, 0);
    let results = server.wait_results(1, RESULTS_TIMEOUT);
    assert_eq!(
        results.len(),
        1,
        "open connections finished early: {results:?}"
    );
    assert_eq!(results[0].remote_port, probe.local_port);

    let outcomes: Vec<Outcome> = conns.into_iter().map(|c| c.finish()).collect();
    assert_eq!(
        outcomes.iter().map(|o| o.local_port).collect::<Vec<_>>(),
        ports
    );
    let results = server.wait_results(4, RESULTS_TIMEOUT);
    for outcome in &outcomes {
        assert_agrees(outcome, outcome.server_result(&results));
    }
}

#[test]
fn many_short_connections_are_fast() {
    let pair = NetnsPair::new("many");
    let cgroup = TestCgroup::new("many");
    let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
    let client = Client::new(&pair);

    let n = 2_000;
    let started = Instant::now();
    let outcomes =
        client.request_many(pair.server_v4(PORT), n, &[(100, 10), (1_000, 0), (0, 3)], 8);
    let elapsed = started.elapsed();
    println!("{n} connections in {elapsed:?}");
    assert_eq!(outcomes.len(), n);
    assert!(
        elapsed < Duration::from_secs(20),
        "{n} connections took {elapsed:?}"
    );

    let results = server.wait_results(n, RESULTS_TIMEOUT);
    for outcome in &outcomes {
        assert_agrees(outcome, outcome.server_result(&results));
    }
}

#[test]
fn guards_clean_up_when_dropped() {
    let pair = NetnsPair::new("cleanup");
    let cgroup = TestCgroup::new("cleanup");
    let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
    let netns_paths =
        [pair.server_ns(), pair.client_ns()].map(|ns| Path::new("/run/netns").join(ns));
    let cgroup_path = cgroup.path().to_owned();
    let server_pid = server.pid();
    // A second process in the cgroup, which nothing but the cgroup guard knows about.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("starting sleep");
    cgroup.add_pid(sleeper.id());
    assert!(netns_paths.iter().all(|p| p.exists()));

    drop(cgroup);
    assert!(
        !cgroup_path.exists(),
        "{} still exists",
        cgroup_path.display()
    );
    let status = sleeper.wait().expect("reaping sleep");
    assert!(!status.success(), "sleep was not killed: {status}");
    drop(server);
    assert!(
        !Path::new(&format!("/proc/{server_pid}")).exists(),
        "server {server_pid} still runs"
    );
    drop(pair);
    for path in &netns_paths {
        assert!(!path.exists(), "{} still exists", path.display());
    }
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    let mut names = None;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pair = NetnsPair::new("panic");
        let cgroup = TestCgroup::new("panic");
        let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
        let client = Client::new(&pair);
        let _open = client.open(pair.server_v4(PORT), 1_000_000, 0);
        names = Some((
            [pair.server_ns(), pair.client_ns()].map(|ns| Path::new("/run/netns").join(ns)),
            cgroup.path().to_owned(),
            server.pid(),
        ));
        panic!("a failing test");
    }));
    assert!(panicked.is_err());
    let (netns_paths, cgroup_path, server_pid) = names.expect("the guards were created");
    for path in &netns_paths {
        assert!(!path.exists(), "{} still exists", path.display());
    }
    assert!(
        !cgroup_path.exists(),
        "{} still exists",
        cgroup_path.display()
    );
    assert!(
        !Path::new(&format!("/proc/{server_pid}")).exists(),
        "server {server_pid} still runs"
    );
}

/// A stand-in for the agent that speaks its JSON protocol: started, one conn record, and on
/// SIGTERM a final closed record. `$3` is the `json` of the `--output json` the driver adds.
const STAND_IN: &str = r#"
[ "$3" = json ] || { echo "error: expected --output json, got $*" >&2; exit 2; }
conn() {
  echo "{\"type\":\"conn\",\"ts\":1,\"conn_id\":7,\"family\":\"ipv6\",\"local_addr\":\"2001:db8::1\",\"local_port\":8000,\"remote_addr\":\"2001:db8::2\",\"remote_port\":40000,\"role\":\"server\",\"bytes_out\":$1,\"bytes_in\":10,\"wire_bytes_out\":$(($1 + 72)),\"wire_bytes_in\":82,\"segments_out\":1,\"segments_in\":1,\"closed\":$2,\"cgroup\":\"/x\",\"cgroup_id\":3,\"pid\":null,\"comm\":null,\"first_seen\":1,\"last_seen\":1}"
}
trap 'conn 5 true; exit 0' TERM
echo '{"type":"started","cgroup":"/","pin_dir":"/sys/fs/bpf/x","adopted":false,"capacity":4}'
echo "log line on stderr" >&2
conn 100 false
while :; do sleep 1 </dev/null >/dev/null 2>&1 & wait $!; done
"#;

#[test]
fn agent_driver_collects_records_and_stops() {
    let agent = Agent::start_bin(
        Path::new("/bin/sh"),
        &["-c", STAND_IN, "outflow-agent-stand-in", "run"],
    );
    let started = agent.wait_started(Duration::from_secs(10));
    assert_eq!(started["capacity"], 4);
    agent.wait_until(Duration::from_secs(10), |records| {
        conn_records(records).len() == 1
    });

    let status = agent.stop();
    assert!(status.success(), "stand-in exited with {status}");
    let records = agent.records();
    let conns = conn_records(&records);
    let totals = totals_by_conn_id(conns.iter().filter(|c| c.role == Role::Server));
    assert_eq!(totals[&7].bytes_out, 105);
    assert_eq!(totals[&7].wire_bytes_out, 249);
    assert_eq!(totals[&7].closed, 1);
    assert!(
        agent.stderr().contains("log line on stderr"),
        "stderr: {:?}",
        agent.stderr()
    );
    assert!(
        records
            .iter()
            .all(|r| r.get("type").and_then(Value::as_str).is_some())
    );
}

#[test]
#[should_panic(expected = "closed stdout")]
fn agent_driver_reports_an_early_exit() {
    let agent = Agent::start_bin(
        Path::new("/bin/sh"),
        &["-c", "echo 'error: bad flag' >&2; exit 2"],
    );
    agent.wait_started(Duration::from_secs(10));
}

#[test]
fn run_to_completion_returns_status_and_output() {
    let (status, stdout, stderr) = run_bin_to_completion(
        Path::new("/bin/sh"),
        &["-c", "echo out; echo 'error: bad' >&2; exit 3"],
    );
    assert_eq!(status.code(), Some(3));
    assert_eq!(stdout, "out\n");
    assert_eq!(stderr, "error: bad\n");
}
