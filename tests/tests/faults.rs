//! The fault suite: the real agent on this kernel streams to the real collector through
//! network faults, full disks, crashes, clock steps and a connection storm; every run ends with
//! the collector's totals compared with what the clients received, to the byte, as a row of
//! the table `cargo xtask faults` prints (lost silently and counted twice must both be 0).
//!
//! `cargo xtask test` runs each fault briefly; `cargo xtask faults` (`OUTFLOW_FAULTS=full`) at
//! the sizes: a one-minute partition, 50 kills of each side, and so on. The agent
//! reaches the collector through a [`FaultProxy`] whose port nftables can also cut.
//!
//! Needs root (CI runs it as root), nftables and libfaketime (`cargo xtask setup`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use outflow_tests::{
    agent::{Agent, PinDir, export_args},
    cgroup::TestCgroup,
    collector::{Collector, Metrics, TempDir, free_port},
    faults::{
        Row, Scale,
        fleet::{Done, FleetProcess, client_addr},
        nft::{NetFault, Nft},
        proxy::{FaultProxy, ProxyFault},
        tmpfs::Tmpfs,
    },
    fleet_bin,
    netns::NetnsPair,
    peer::{Client, Outcome, Server, Traffic},
    testpeer_bin,
    wait::poll_until,
};
use serde_json::Value;

const PORT: u16 = 8000;
/// How long a fault's effects may take to clear: the agent's backoff reaches 30 s, and a
/// stalled stream is given up after HTTP/2 keepalive (30 s ping + 20 s timeout).
const RECOVERY_LIMIT: Duration = Duration::from_secs(180);
const START: Duration = Duration::from_secs(90);
/// libfaketime, which `cargo xtask setup` installs (Debian `libfaketime`).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// A server in a cgroup the agent counts, its clients, a collector behind a fault proxy.
struct Rig {
    pair: NetnsPair,
    cgroup: TestCgroup,
    _server: Server,
    pin: PinDir,
    agent_state: TempDir,
    /// The collector's config file.
    collector_config: TempDir,
    collector_data: TempDir,
    collector_port: u16,
    metrics_port: u16,
}

impl Rig {
    fn new(tag: &str) -> Self {
        let pair = NetnsPair::new(tag);
        let cgroup = TestCgroup::new(tag);
        let server = Server::start(testpeer_bin!(), &pair, &cgroup, &[PORT]);
        Self {
            pair,
            cgroup,
            _server: server,
            pin: PinDir::new(tag),
            agent_state: TempDir::new(&format!("{tag}-agent")),
            collector_config: TempDir::new(&format!("{tag}-config")),
            collector_data: TempDir::new(&format!("{tag}-collector")),
            collector_port: free_port(),
            metrics_port: free_port(),
        }
    }

    fn collector_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.collector_port))
    }

    fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics_port))
    }

    /// A collector on the rig's port, with its data in `data` (the rig's directory if None)
    /// and `env` added to its environment.
    fn collector_env(&self, data: Option<&Path>, env: &[(&str, &str)]) -> Collector {
        let metrics = self.metrics_addr().to_string();
        let data = data.unwrap_or_else(|| self.collector_data.path());
        // A journal of a few group commits: checkpoints (rollups written whole, the journal
        // emptied) come every few commits, so that the kills fall around them too.
        let config = self.collector_config.path().join("collector.toml");
        std::fs::write(&config, "[store]\njournal_bytes = 1024\n").expect("collector config");
        Collector::start_env(
            self.collector_port,
            &[
                "--config",
                config.to_str().expect("utf-8"),
                "--data-dir",
                data.to_str().expect("utf-8"),
                "--metrics-listen",
                &metrics,
            ],
            env,
        )
    }

    fn collector_in(&self, data: Option<&Path>) -> Collector {
        self.collector_env(data, &[])
    }

    fn collector(&self) -> Collector {
        self.collector_in(None)
    }

    /// A collector with the crash points of `failpoints` armed (`OUTFLOW_FAILPOINTS`).
    fn collector_armed(&self, failpoints: &str) -> Collector {
        self.collector_env(None, &[("OUTFLOW_FAILPOINTS", failpoints)])
    }

    /// An agent streaming to `url`, its spool in `spool` (under its state directory if None).
    fn agent_with(
        &self,
        url: &str,
        spool: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let default_spool = self.agent_state.path().join("spool");
        let spool = spool.unwrap_or(&default_spool);
        let mut args = export_args(
            self.cgroup.as_arg(),
            self.pin.as_arg(),
            url,
            self.agent_state.as_arg(),
            spool.to_str().expect("utf-8"),
        );
        args.extend_from_slice(extra);
        let agent = Agent::start_env(&args, env);
        agent.wait_started(START);
        agent
    }

    fn agent(&self, url: &str) -> Agent {
        self.agent_with(url, None, &[], &[])
    }

    /// The fault is over: stops the traffic, waits until the collector holds every byte the
    /// clients received, reports the row, and stops the agent.
    fn healed(&self, fault: String, traffic: Traffic, collector: &Collector, agent: &Agent) -> Row {
        self.healed_with(fault, traffic, None, collector, agent)
    }

    /// [`Rig::healed`], with what a fleet of `outflow-fleet` agents sent counted in the truth.
    fn healed_with_fleet(
        &self,
        fault: String,
        traffic: Traffic,
        fleet: FleetProcess,
        collector: &Collector,
        agent: &Agent,
    ) -> Row {
        self.healed_with(fault, traffic, Some(fleet), collector, agent)
    }

    fn healed_with(
        &self,
        fault: String,
        traffic: Traffic,
        fleet: Option<FleetProcess>,
        collector: &Collector,
        agent: &Agent,
    ) -> Row {
        let healed = Instant::now();
        let mut truth = Truth::of(&traffic.finish());
        if let Some(fleet) = fleet {
            truth = truth.with_fleet(&fleet.finish());
        }
        let row = settle(fault, collector, self.metrics_addr(), &truth, healed);
        assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
        row
    }

    /// Waits until the collector's store has failed at least `n` group commits; false if it
    /// has not within `limit`.
    fn store_failures_at_least(&self, n: usize, limit: Duration) -> bool {
        poll_until(limit, || {
            Metrics::fetch(self.metrics_addr())
                .expect("scrape")
                .value("outflow_collector_store_failures_total")
                >= n as f64
        })
    }

    /// Requests from the client namespace, in a loop, until [`Traffic::finish`].
    fn traffic(&self, sizes: &'static [(u64, u64)]) -> Traffic {
        Traffic::start(&self.pair, &[self.pair.server_v4(PORT)], sizes, 20, 4)
    }
}

/// Responses of a few sizes, small requests.
const MIXED: &[(u64, u64)] = &[(50_000, 100), (200_000, 300), (7, 1), (1_234_567, 50)];

/// What the clients received: response bytes in all, and the client addresses.
struct Truth {
    sent: u64,
    clients: Vec<IpAddr>,
}

impl Truth {
    fn of(outcomes: &[Outcome]) -> Self {
        let mut clients: Vec<IpAddr> = outcomes.iter().map(|o| o.local_addr).collect();
        clients.sort();
        clients.dedup();
        Self {
            sent: outcomes.iter().map(|o| o.received).sum(),
            clients,
        }
    }

    /// With what a fleet of `outflow-fleet` agents sent.
    fn with_fleet(mut self, done: &Done) -> Self {
        self.sent += done.sent_bytes_out;
        self.clients
            .extend((0..done.agents).map(|i| IpAddr::V4(client_addr(i))));
        self
    }
}

/// The collector's response bytes of `clients` (24 h window) and its gap counters.
struct Held {
    per_client: u64,
    unattributed: u64,
    lost: u64,
}

fn held(collector: &Collector, metrics: SocketAddr, clients: &[IpAddr]) -> Held {
    let per_client = clients
        .iter()
        .map(|ip| collector.day_bytes(&ip.to_string()).0)
        .sum();
    let m = Metrics::fetch(metrics).unwrap_or_else(|e| panic!("scrape {metrics}: {e}"));
    Held {
        per_client,
        unattributed: m.value("outflow_collector_unattributed_response_bytes_total") as u64,
        lost: m.value("outflow_collector_lost_response_bytes_total") as u64,
    }
}

/// After the fault ended at `healed` and the traffic stopped: waits until the collector holds
/// every byte the clients received (or more, which fails at once), and reports the row.
fn settle(
    fault: String,
    collector: &Collector,
    metrics: SocketAddr,
    truth: &Truth,
    healed: Instant,
) -> Row {
    let Truth { sent, clients } = truth;
    let (sent, clients) = (*sent, clients.as_slice());
    assert!(sent > 0, "{fault}: no traffic");
    let mut last = Held {
        per_client: 0,
        unattributed: 0,
        lost: 0,
    };
    poll_until(RECOVERY_LIMIT, || {
        last = held(collector, metrics, clients);
        last.per_client + last.unattributed + last.lost >= sent
    });
    let recovery = healed.elapsed();
    let row = Row {
        fault,
        sent,
        collected: last.per_client + last.unattributed,
        unattributed: last.unattributed,
        lost_reported: last.lost,
        recovery,
    };
    if row.lost_silent() != 0 || row.double_counted() != 0 {
        eprintln!("collector stderr:\n{}", collector.stderr());
    }
    row.report();
    row
}

/// A small deterministic generator (xorshift64*) for the points at which things are killed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// One network fault on the agent's path to the collector, under traffic, then healed.
fn network_fault(tag: &str, fault: &str, apply: impl FnOnce(&FaultProxy, &Nft)) {
    let rig = Rig::new(tag);
    let collector = rig.collector();
    let proxy = FaultProxy::start(rig.collector_addr());
    let nft = Nft::new(proxy.port());
    let agent = rig.agent(&proxy.url());
    let traffic = rig.traffic(MIXED);
    thread::sleep(Duration::from_secs(1));
    apply(&proxy, &nft);
    nft.set(NetFault::Heal);
    proxy.set(ProxyFault::Pass);
    rig.healed(fault.to_owned(), traffic, &collector, &agent);
}

#[test]
fn packet_loss() {
    let (pct, secs) = Scale::from_env().pick((30, 5), (30, 30));
    network_fault(
        "f-loss",
        &format!("{pct}% packet loss for {secs} s"),
        |_, nft| {
            nft.set(NetFault::Loss(pct));
            thread::sleep(Duration::from_secs(secs));
        },
    );
}

#[test]
fn delay() {
    let (ms, secs) = Scale::from_env().pick((300, 5), (1_000, 30));
    network_fault(
        "f-delay",
        &format!("{ms} ms delay each way for {secs} s"),
        |proxy, _| {
            proxy.set(ProxyFault::Delay(Duration::from_millis(ms)));
            thread::sleep(Duration::from_secs(secs));
        },
    );
}

#[test]
fn stall() {
    let secs = Scale::from_env().pick(5, 60);
    network_fault(
        "f-stall",
        &format!("stalled connection (half-open) for {secs} s"),
        |proxy, _| {
            proxy.set(ProxyFault::Stall);
            thread::sleep(Duration::from_secs(secs));
        },
    );
}

#[test]
fn resets() {
    let secs = Scale::from_env().pick(5, 30);
    network_fault(
        "f-reset",
        &format!("TCP resets every second for {secs} s"),
        |_, nft| {
            for _ in 0..secs {
                nft.set(NetFault::Reset);
                thread::sleep(Duration::from_millis(300));
                nft.set(NetFault::Heal);
                thread::sleep(Duration::from_millis(700));
            }
        },
    );
}

#[test]
fn partition() {
    let secs = Scale::from_env().pick(10, 60);
    network_fault(
        "f-part",
        &format!("full partition for {secs} s"),
        |_, nft| {
            nft.set(NetFault::Partition);
            thread::sleep(Duration::from_secs(secs));
        },
    );
}

#[test]
fn spool_bound_reached_while_partitioned() {
    let secs = Scale::from_env().pick(3, 30);
    let rig = Rig::new("f-bound");
    let collector = rig.collector();
    let proxy = FaultProxy::start(rig.collector_addr());
    let nft = Nft::new(proxy.port());
    // The smallest spool (1 MiB) and many short connections: a few seconds of batches fill
    // it. Past it the oldest are dropped, and what they held is reported to the collector
    // with the next batch.
    let agent = rig.agent_with(&proxy.url(), None, &["--spool-max-bytes", "1048576"], &[]);
    let traffic = Traffic::start(
        &rig.pair,
        &[rig.pair.server_v4(PORT)],
        &[(1_000, 10), (3, 1)],
        200,
        16,
    );
    thread::sleep(Duration::from_secs(1));
    nft.set(NetFault::Partition);
    let cut = Instant::now();
    // Until the spool has dropped batches (its warning; its records on stdout can lag behind
    // under this much traffic), and then some more.
    let dropped = poll_until(START, || agent.stderr().contains("dropped the oldest"));
    assert!(
        dropped,
        "the spool never dropped a batch:\n{}",
        agent.stderr()
    );
    thread::sleep(Duration::from_secs(secs));
    nft.set(NetFault::Heal);
    let healed = Instant::now();
    let outcomes = traffic.finish();
    let row = settle(
        format!(
            "partition of {:.0} s, 1 MiB spool (its bound)",
            cut.elapsed().as_secs_f64()
        ),
        &collector,
        rig.metrics_addr(),
        &Truth::of(&outcomes),
        healed,
    );
    assert!(
        row.lost_reported > 0,
        "the spool never dropped a batch: the fault was not applied"
    );
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn agent_spool_disk_full() {
    let secs = Scale::from_env().pick(5, 30);
    let rig = Rig::new("f-spool");
    let collector = rig.collector();
    // Room, once the filler goes, for the interval that waited (up to the table's capacity
    // of connections: about 10 MB at 65 536 slots).
    let disk = Tmpfs::new("spool", 64 << 20);
    let spool = disk.path().join("spool");
    let agent = rig.agent_with(&collector.url(), Some(&spool), &[], &[]);
    let traffic = rig.traffic(MIXED);
    thread::sleep(Duration::from_secs(1));
    let filler = disk.fill("filler");
    // The spool refuses a write (its warning): from then on, the fault is on. Until then the
    // filler takes back what the spool frees (the files of acknowledged batches), or the spool
    // could go on writing into those pages.
    let refused = poll_until(START, || {
        disk.top_up(&filler);
        agent.stderr().contains("stays counted in the kernel table")
    });
    assert!(
        refused,
        "the spool never refused a write:\n{}",
        agent.stderr()
    );
    thread::sleep(Duration::from_secs(secs));
    std::fs::remove_file(&filler).expect("remove the filler");
    rig.healed(
        format!("agent's spool disk full for {secs} s"),
        traffic,
        &collector,
        &agent,
    );
}

#[test]
fn collector_disk_full() {
    let (secs, fleet_agents) = Scale::from_env().pick((5, 100), (30, 300));
    let rig = Rig::new("f-cdisk");
    let disk = Tmpfs::new("cdata", 48 << 20);
    let collector = rig.collector_in(Some(disk.path()));
    let agent = rig.agent(&collector.url());
    let traffic = rig.traffic(MIXED);
    thread::sleep(Duration::from_secs(1));
    let filler = disk.fill("filler");
    // New agents and clients arrive while it is full: their keys need pages the store does
    // not have, so commits fail (the one client of the rig's traffic needs none).
    let fleet = FleetProcess::start(
        fleet_bin!(),
        &collector.url(),
        fleet_agents,
        Duration::from_millis(500),
    );
    // A commit fails: from then on, the fault is on.
    assert!(
        rig.store_failures_at_least(1, START),
        "no commit failed: the fault was not applied"
    );
    thread::sleep(Duration::from_secs(secs));
    std::fs::remove_file(&filler).expect("remove the filler");
    rig.healed_with_fleet(
        format!("collector's data disk full for {secs} s ({fleet_agents} agents arriving)"),
        traffic,
        fleet,
        &collector,
        &agent,
    );
}

/// The collector's store fails every other group commit for a while (the error point
/// `store::append_fails`: the transaction is not committed, as on a failing disk), with a
/// fleet of agents sending at once: refused batches come again, the batches their streams
/// sent after them wait for them (applied first, they would make the refused ones
/// duplicates), and every byte is counted once.
#[test]
fn collector_commits_failing_now_and_then() {
    let (fails, fleet_agents) = Scale::from_env().pick((12, 100), (50, 300));
    let rig = Rig::new("f-cfail");
    // Every other commit fails, and each takes 150 ms: agents send their next batches while
    // one fails, and those are committed in the next group, which does not.
    let pattern = vec!["1*off->1*return"; fails].join("->");
    let collector = rig.collector_armed(&format!(
        "store::before_commit=sleep(150);store::append_fails={pattern}->off"
    ));
    let agent = rig.agent(&collector.url());
    let traffic = rig.traffic(MIXED);
    let fleet = FleetProcess::start(
        fleet_bin!(),
        &collector.url(),
        fleet_agents,
        Duration::from_millis(200),
    );
    assert!(
        rig.store_failures_at_least(fails, RECOVERY_LIMIT),
        "fewer than {fails} commits failed: the fault was not applied"
    );
    rig.healed_with_fleet(
        format!("collector's commits failing, 1 in 2, {fails} times ({fleet_agents} agents)"),
        traffic,
        fleet,
        &collector,
        &agent,
    );
}

#[test]
fn agent_killed_again_and_again() {
    let kills = Scale::from_env().pick(10, 50);
    let rig = Rig::new("f-akill");
    let collector = rig.collector();
    let mut agent = rig.agent(&collector.url());
    let traffic = rig.traffic(MIXED);
    let mut rng = Rng(0x5eed_0001);
    let polled = |records: &[Value]| {
        records
            .iter()
            .any(|r| r.get("type").and_then(Value::as_str) == Some("stats"))
    };
    for _ in 0..kills {
        // Once it has read the table (a first interval), anywhere in or between intervals
        // (200 ms) and spool commits.
        agent.wait_until(START, polled);
        thread::sleep(Duration::from_millis(rng.below(700)));
        agent.kill();
        agent = rig.agent(&collector.url());
    }
    let healed = Instant::now();
    let outcomes = traffic.finish();
    settle(
        format!("agent SIGKILLed {kills} times under traffic"),
        &collector,
        rig.metrics_addr(),
        &Truth::of(&outcomes),
        healed,
    );
    if let Some(stats) = agent
        .records()
        .iter()
        .rev()
        .find(|r| r.get("type").and_then(Value::as_str) == Some("stats"))
    {
        eprintln!("the last agent's table: {stats}");
    }
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}

#[test]
fn collector_killed_again_and_again() {
    let kills = Scale::from_env().pick(10, 50);
    let rig = Rig::new("f-ckill");
    let mut collector = rig.collector();
    let agent = rig.agent(&collector.url());
    let traffic = rig.traffic(MIXED);
    let mut rng = Rng(0x5eed_0002);
    for _ in 0..kills {
        thread::sleep(Duration::from_millis(rng.below(1_500)));
        collector.kill();
        collector = rig.collector();
    }
    rig.healed(
        format!("collector SIGKILLed {kills} times under traffic"),
        traffic,
        &collector,
        &agent,
    );
}

/// The collector's crash points (`collector/src/crash.rs`).
const COLLECTOR_POINTS: &[&str] = &[
    "store::before_commit",
    "writer::after_commit",
    "writer::after_acks",
    "store::before_checkpoint",
];

/// `OUTFLOW_FAILPOINTS` that kills the process at `point` after passing it `skip` times.
fn kill_at(point: &str, skip: u32) -> String {
    match skip {
        0 => format!("{point}=return"),
        n => format!("{point}={n}*off->return"),
    }
}

/// A process ended by its own crash point: killed by SIGKILL.
fn assert_killed(status: std::process::ExitStatus, point: &str, stderr: &str) {
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{point}: not killed there ({status}):\n{stderr}"
    );
}

#[test]
fn collector_killed_at_each_point_of_its_group_commit() {
    let rig = Rig::new("f-cpoint");
    let mut collector = rig.collector();
    let agent = rig.agent(&collector.url());
    let traffic = rig.traffic(MIXED);
    let mut kills = 0;
    for point in COLLECTOR_POINTS {
        // At its first pass there and at a later one (other agents' batches in the group).
        for skip in [0, 3] {
            assert_eq!(collector.stop().code(), Some(0), "{}", collector.stderr());
            collector = rig.collector_armed(&kill_at(point, skip));
            let status = collector.wait_exit(START);
            assert_killed(status, point, &collector.stderr());
            kills += 1;
            collector = rig.collector();
        }
    }
    rig.healed(
        format!(
            "collector SIGKILLed at each of {} points of its group commit ({kills} kills)",
            COLLECTOR_POINTS.len()
        ),
        traffic,
        &collector,
        &agent,
    );
}

/// The agent's crash points (`agent/src/crash.rs`), in the order an interval passes them.
const AGENT_POINTS: &[&str] = &[
    "spool::files_written",
    "spool::journal_in_place",
    "spool::before_dir_sync",
    "agent::before_kernel_commit",
    "agent::after_kernel_commit",
    "sender::after_send",
    "spool::acked_before_removal",
];

#[test]
fn agent_killed_at_each_point_of_its_spool_and_commit_window() {
    let rig = Rig::new("f-apoint");
    let collector = rig.collector();
    let mut agent = rig.agent(&collector.url());
    let traffic = rig.traffic(MIXED);
    let mut kills = 0;
    // At its first pass there, and (full run) at a later one.
    let skips: &[u32] = Scale::from_env().pick(&[0], &[0, 3]);
    for point in AGENT_POINTS {
        for &skip in skips {
            assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
            let armed = kill_at(point, skip);
            agent = rig.agent_with(
                &collector.url(),
                None,
                &[],
                &[("OUTFLOW_FAILPOINTS", armed.as_str())],
            );
            let status = agent.wait_exit(START);
            assert_killed(status, point, &agent.stderr());
            kills += 1;
            agent = rig.agent(&collector.url());
        }
    }
    rig.healed(
        format!(
            "agent SIGKILLed at each of {} points of its spool and commit window ({kills} kills)",
            AGENT_POINTS.len()
        ),
        traffic,
        &collector,
        &agent,
    );
}

#[test]
fn agent_clock_stepped() {
    let (hours, secs) = Scale::from_env().pick((3, 2), (6, 10));
    let rig = Rig::new("f-clock");
    let collector = rig.collector();
    assert!(
        Path::new(LIBFAKETIME).is_file(),
        "{LIBFAKETIME} is missing: run `cargo xtask setup` (Debian package libfaketime)"
    );
    // The agent's wall clock only (CLOCK_REALTIME), stepped by rewriting this file; the
    // monotonic clocks, which the kernel's timestamps use, are left alone.
    let offset = rig.agent_state.path().join("faketime");
    std::fs::write(&offset, "+0").expect("write the faketime file");
    let offset_arg = offset.to_str().expect("utf-8").to_owned();
    let env = [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME_TIMESTAMP_FILE", offset_arg.as_str()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let agent = rig.agent_with(&collector.url(), None, &[], &env);
    let traffic = rig.traffic(MIXED);
    for step in [format!("+{hours}h"), format!("-{hours}h"), "+0".to_owned()] {
        thread::sleep(Duration::from_secs(secs));
        std::fs::write(&offset, step).expect("step the agent's clock");
    }
    thread::sleep(Duration::from_secs(secs));
    rig.healed(
        format!("agent's wall clock stepped +{hours} h, -{hours} h, back"),
        traffic,
        &collector,
        &agent,
    );
}

#[test]
fn connection_storm_fills_and_drains_the_kernel_table() {
    let conns = Scale::from_env().pick(6_000, 60_000);
    let rig = Rig::new("f-storm");
    let collector = rig.collector();
    // A small table, so that the storm fills it: what has no slot counts in the overflow.
    let agent = rig.agent_with(&collector.url(), None, &["--max-connections", "256"], &[]);
    let client = Client::new(&rig.pair);
    let started = Instant::now();
    let outcomes = client.request_many(rig.pair.server_v4(PORT), conns, &[(1_000, 10), (3, 1)], 16);
    let elapsed = started.elapsed();
    let healed = Instant::now();
    eprintln!(
        "{conns} connections in {:.1} s: {:.0} a second",
        elapsed.as_secs_f64(),
        conns as f64 / elapsed.as_secs_f64()
    );
    let row = settle(
        format!(
            "connection storm: {conns} connections at {:.0}/s, table of 256",
            conns as f64 / elapsed.as_secs_f64()
        ),
        &collector,
        rig.metrics_addr(),
        &Truth::of(&outcomes),
        healed,
    );
    assert!(
        row.unattributed > 0,
        "the table never overflowed: the fault was not applied"
    );
    // Drained: once the storm is over, closed connections leave their slots.
    let live = |r: &Value| r.get("live").and_then(Value::as_u64);
    let drained = poll_until(Duration::from_secs(30), || {
        agent
            .records()
            .iter()
            .rev()
            .find(|r| r.get("type").and_then(Value::as_str) == Some("stats"))
            .and_then(live)
            == Some(0)
    });
    assert!(drained, "the table did not drain after the storm");
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
}
