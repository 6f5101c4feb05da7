//! `outflow-sim cluster-demo` (and `outflow-cluster-demo` of the test harness, what
//! `cargo xtask cluster-demo` runs, with a real agent beside the fleet): the collector's cluster
//! mode on this machine, with a fleet through it and a node of each kind killed on the way.
//!
//! Starts a three-node NATS JetStream cluster (`nats-server` of the tools venv), two ingest
//! nodes and three aggregators (`outflow-collector` processes on loopback), and streams a day
//! of a simulated fleet (every agent a gRPC stream, spread over both ingest nodes, with attacks
//! bulk, prefix, rotate6, slowrise, parallel, wide) from the last full hour, most of it ahead
//! of the clock. A caller may run traffic of its own beside the fleet ([`Beside`]: the test
//! harness's real agent), from the step where the fleet's batch time is past the clock. On the way it
//! SIGKILLs an aggregator, an ingest node (its agents open their streams again on the other one
//! and send their unacknowledged batch again) and a NATS node, and brings them back, and cuts
//! another NATS node off from the network for a while (it runs in a network namespace of its
//! own: its packets are dropped, nobody's connection to it is closed). Once
//! every part is applied it compares, through an ingest node (which asks every aggregator and
//! merges), every host's and every client's totals with what the fleet sent, to the byte, and
//! lists the alerts, scoring each attack. [`Fleet::Week`] sends a week of 5-minute batches
//! instead, with the attacks that need them (pool, lowslow). The last line says it:
//! `cluster: <N> deltas, totals exact, <K> alerts`, or what differs.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use outflow_proto::v1::{self, query_client::QueryClient};
use outflow_testbed::{nats::NatsCluster, ports::free_port};

use crate::{
    Report, Scenario, SimConfig, Truth,
    model::{DAY_MS, HOUR_MS},
};

/// Partitions of the demo's stream.
const PARTITIONS: u32 = 12;
/// How long a NATS node stays cut off (the nodes connected to it ping every second, so they
/// move to another server within about three seconds).
const CUT_FOR: Duration = Duration::from_secs(10);
/// The attacks of a day's fleet ([`Fleet::Day`]; wide: a /16 is in one partition; rotate6: an
/// IPv6 address's partition is its /32's, so its /64 is whole on one aggregator). Not lowslow,
/// which needs a week, nor pool: the cohort detector (the cluster's second stage) finds a
/// candidate only in a client steady in each 5 minutes of its last half hour, which needs
/// 5-minute batches; with them the slow rise's day ratio, next to its limit, was missed once in
/// CI. [`Fleet::Week`] runs those two.
pub const ATTACKS: [Scenario; 6] = [
    Scenario::Bulk,
    Scenario::Prefix,
    Scenario::Rotate6,
    Scenario::SlowRise,
    Scenario::Parallel,
    Scenario::Wide,
];

/// The attacks of a week's fleet ([`Fleet::Week`]): the proxy pool (its 250 addresses over
/// every partition, judged by the second stage) and the low-and-slow pull.
pub const WEEK_ATTACKS: [Scenario; 2] = [Scenario::Pool, Scenario::LowSlow];

/// What the simulated fleet sends. Either way every host's and client's 24 h totals (Query's
/// longest window) are compared with what the fleet sent in its last day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fleet {
    /// A day (today's, from the last full hour) of 10-minute batches with [`ATTACKS`].
    Day,
    /// Seven days (the last one today's, from the last full hour) of 5-minute batches with
    /// [`WEEK_ATTACKS`].
    Week,
}

impl Fleet {
    /// The attacks it runs, in the order they are scored.
    pub fn attacks(self) -> &'static [Scenario] {
        match self {
            Fleet::Day => &ATTACKS,
            Fleet::Week => &WEEK_ATTACKS,
        }
    }

    fn days(self) -> u32 {
        match self {
            Fleet::Day => 1,
            Fleet::Week => 7,
        }
    }

    fn batch_secs(self) -> u64 {
        match self {
            Fleet::Day => 600,
            Fleet::Week => 300,
        }
    }
}

/// How long the fleet's steps from the one where traffic beside it starts (or from the first)
/// take at least: the time the faults need.
const TAIL: Duration = Duration::from_secs(40);

/// Traffic of its own through the same cluster beside the simulated fleet, stamped with the
/// wall clock: a real agent counting real connections (`outflow_tests::cluster_agent`).
pub trait Beside {
    /// Starts sending to the ingest nodes at `ingest` (the second is killed on the way and
    /// started again on its port). Called once the fleet's batch time is past the clock.
    fn start(&mut self, ingest: &[String]) -> Result<()>;
    /// Called once the fleet is done: stops starting new traffic and says what was sent, per
    /// host and per client address (response, request bytes).
    fn finish(&mut self) -> Result<Truth>;
    /// Called once its totals were compared, before the nodes stop.
    fn stop(&mut self) -> Result<()>;
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The `outflow-collector` binary.
    pub collector_bin: PathBuf,
    /// Where the nodes keep their data (emptied first).
    pub dir: PathBuf,
    /// What the simulated fleet sends.
    pub fleet: Fleet,
    /// Synthetic agents.
    pub hosts: usize,
    /// Benign client addresses.
    pub clients: usize,
    pub seed: u64,
    /// Print progress (the demo) or not (a test that prints the outcome itself).
    pub verbose: bool,
    /// Kill a node of each kind on the way (and bring it back), cut a NATS node off for a
    /// while.
    pub faults: bool,
    /// How long to wait for an alert on each attack once everything is applied.
    pub alert_wait: Duration,
}

/// The cluster demo's flags (`outflow-sim cluster-demo`, `outflow-cluster-demo`).
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The `outflow-collector` binary (default: the one beside this program).
    #[arg(long)]
    pub collector_bin: Option<PathBuf>,
    /// Where the nodes keep their data and logs (emptied first).
    #[arg(long, default_value = "/tmp/outflow-cluster-demo")]
    pub dir: PathBuf,
    /// Synthetic agents (default: 200; with --week, 20).
    #[arg(long)]
    pub hosts: Option<usize>,
    /// Benign client addresses.
    #[arg(long, default_value_t = 500)]
    pub clients: usize,
    /// The simulation's random seed (the same seed, the same fleet).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Kill no node on the way, cut none off.
    #[arg(long)]
    pub no_faults: bool,
    /// Send a week of 5-minute batches with the attacks that need them (a proxy pool, judged
    /// by the cluster's second stage, and a low-and-slow pull), instead of a day of 10-minute
    /// batches with the others (totals are compared over the last day: Query's longest window
    /// is 24 h).
    #[arg(long)]
    pub week: bool,
}

impl DemoArgs {
    /// What to run, printing progress.
    pub fn config(self) -> DemoConfig {
        DemoConfig {
            collector_bin: self.collector_bin.unwrap_or_else(default_collector_bin),
            dir: self.dir,
            fleet: if self.week { Fleet::Week } else { Fleet::Day },
            hosts: self.hosts.unwrap_or(if self.week { 20 } else { 200 }),
            clients: self.clients,
            seed: self.seed,
            verbose: true,
            faults: !self.no_faults,
            // The listing ends as soon as every attack shows; a detection thread still judging
            // a long replay gets up to a minute, as in the tests.
            alert_wait: Duration::from_secs(60),
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    /// Hosts and clients whose totals differ from what was sent: (key, sent, the cluster's).
    pub differences: Differences,
    pub hosts: usize,
    pub clients: usize,
    /// Alerts listed through an ingest node.
    pub alerts: usize,
    /// Keys (not a service's) with more than one alert by one detector.
    pub repeated: Vec<String>,
    /// Alert changes the aggregators' webhook receiver got (each once, whatever was replayed).
    pub posted: usize,
    /// Changes it got more than once.
    pub posted_twice: Vec<String>,
    /// Listed alerts whose latest change it never got.
    pub not_posted: Vec<String>,
    /// Alerts (not a service's) it got as resolved: every attack runs to the fleet's end, so
    /// an alert of theirs resolved on the way was judged on parts it had not applied yet
    /// (raised again afterwards, or not).
    pub resolved_on_the_way: Vec<String>,
}

impl Outcome {
    /// True when every total is exact and every attack was caught, once.
    pub fn passed(&self) -> bool {
        self.differences.is_empty()
            && self.repeated.is_empty()
            && self.posted_twice.is_empty()
            && self.not_posted.is_empty()
            && self.resolved_on_the_way.is_empty()
            && self.report.alerts_error.is_none()
            && self.report.attacks.iter().all(|a| a.detected)
    }

    /// The demo's exit status: 0 if it [`passed`](Self::passed), 2 if not.
    pub fn exit_code(&self) -> std::process::ExitCode {
        if self.passed() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::from(2)
        }
    }

    /// The closing line.
    pub fn line(&self) -> String {
        let totals = if self.differences.is_empty() {
            "totals exact".to_owned()
        } else {
            format!("{} totals differ", self.differences.len())
        };
        let missed: Vec<String> = self
            .report
            .attacks
            .iter()
            .filter(|a| !a.detected)
            .map(|a| a.scenario.to_string())
            .collect();
        let mut line = format!(
            "cluster: {} deltas, {totals}, {} alerts",
            self.report.deltas, self.alerts
        );
        if !missed.is_empty() {
            line.push_str(&format!(" (no alert for: {})", missed.join(", ")));
        }
        if !self.repeated.is_empty() {
            line.push_str(&format!(
                " (raised more than once: {})",
                self.repeated.join(", ")
            ));
        }
        if !self.posted_twice.is_empty() {
            line.push_str(&format!(
                " (POSTed to the webhook more than once: {})",
                self.posted_twice.join(", ")
            ));
        }
        if !self.not_posted.is_empty() {
            line.push_str(&format!(
                " (never POSTed to the webhook: {})",
                self.not_posted.join(", ")
            ));
        }
        if !self.resolved_on_the_way.is_empty() {
            line.push_str(&format!(
                " (resolved while the attack went on: {})",
                self.resolved_on_the_way.join(", ")
            ));
        }
        line
    }
}

/// An `outflow-collector` process of the demo.
struct Node {
    name: String,
    dir: PathBuf,
    config: PathBuf,
    bin: PathBuf,
    listen: SocketAddr,
    metrics: SocketAddr,
    child: Option<Child>,
}

/// GET `path` over HTTP/1.1: the status and the body.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or("", |b| b.1).to_owned();
    Some((status, body))
}

/// The sum of a metric's samples in a `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Node {
    fn new(bin: &Path, dir: &Path, name: &str, body: &str) -> Result<Node> {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Below the ephemeral range: nodes are killed and started again on their ports.
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let config = dir.join("collector.toml");
        let text = format!(
            "listen = \"{listen}\"\nmetrics_listen = \"{metrics}\"\ndata_dir = \"{}\"\n{body}",
            dir.join("data").display()
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        Ok(Node {
            name: name.to_owned(),
            dir,
            config,
            bin: bin.to_owned(),
            listen,
            metrics,
            child: None,
        })
    }

    /// Starts it and waits until it is ready.
    fn start(&mut self) -> Result<()> {
        // Appended to: a node started again (killed on the way) keeps its first run's lines.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("collector.log"))?;
        let mut command = Command::new(&self.bin);
        // The demo stopped halfway (Ctrl-C) leaves no node behind: nodes are started from the
        // demo's own thread, which lives as long as they should.
        outflow_testbed::die_with_parent(&mut command);
        let child = command
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                "warn,outflow_collector::cluster=info,outflow_collector::alerts=info",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if matches!(http_get(self.metrics, "/readyz"), Some((200, _))) {
                return Ok(());
            }
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait()?
            {
                bail!("{} exited ({status}): {}", self.name, self.log_tail());
            }
            ensure!(
                Instant::now() < deadline,
                "{} not ready within 60 s: {}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("collector.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The configuration of a node of `role` (rate limits off: the fleet sends a day in seconds;
/// the clock skew check off: most of the fleet's day is ahead of the clock).
/// An aggregator's store commits durably (the default): it acknowledges a part to JetStream
/// once it is committed, so an aggregator killed with commits not on disk would lose parts
/// JetStream will not send again.
/// Each node connects as its role's NATS user ([`NatsUsers`]).
fn node_config(nats: &NatsCluster, users: &NatsUsers, role: &str, name: &str) -> String {
    let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[limits]\nbatches_per_second = 0.0\ndeltas_per_second = 0.0\nmax_clock_skew = \"0s\"\n[cluster]\nrole = \"{role}\"\nnats_urls = [{}]\npartitions = {PARTITIONS}\nlease = \"4s\"\nnode_name = \"{name}\"\nnats_ping_interval = \"1s\"\nnats_user = \"{role}\"\nnats_password_file = {:?}\n",
        urls.join(", "),
        users.password_file.display().to_string()
    )
}

/// The NATS users the nodes connect as, as the runbook has an operator set them up: one per
/// role, allowed only the subjects `outflow-collector nats-permissions --role <role>` prints,
/// so that every step of the demo (kills, the cut-off server, moves, the second stage, the
/// webhook's delivery records) runs with the least the nodes need. The demo's own clients
/// connect without credentials, as `admin` (`no_auth_user`).
struct NatsUsers {
    /// The servers' `authorization` (and `no_auth_user`).
    server_config: String,
    /// The roles' password (mode 600, as the collector wants its secret files).
    password_file: PathBuf,
}

impl NatsUsers {
    fn new(bin: &Path, dir: &Path) -> Result<NatsUsers> {
        // Unguessable enough for servers on loopback that live as long as the demo.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let password = format!("demo-{nanos:x}-{:x}", std::process::id());
        let password_file = dir.join("nats-password");
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&password_file)
                .with_context(|| format!("creating {}", password_file.display()))?;
            writeln!(f, "{password}")?;
        }
        let mut users = String::new();
        for role in ["ingest", "aggregator"] {
            let out = Command::new(bin)
                .args(["nats-permissions", "--role", role])
                .env_remove("OUTFLOW_COLLECTOR_CONFIG")
                .output()
                .with_context(|| format!("running {} nats-permissions", bin.display()))?;
            ensure!(
                out.status.success(),
                "{} nats-permissions --role {role}: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let block: String = String::from_utf8(out.stdout)?
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("      {l}\n"))
                .collect();
            users.push_str(&format!(
                "    {{\n      user: {role}\n      password: \"{password}\"\n{block}    }}\n"
            ));
        }
        let admin = format!("{password}-admin");
        Ok(NatsUsers {
            server_config: format!(
                "authorization {{\n  users = [\n{users}    {{ user: admin, password: \"{admin}\" }}\n  ]\n}}\nno_auth_user: admin\n"
            ),
            password_file,
        })
    }
}

/// Runs the demo (see the module's documentation).
pub fn run(cfg: &DemoConfig, mut beside: Option<&mut dyn Beside>) -> Result<Outcome> {
    let t0 = Instant::now();
    let say = |s: &str| {
        if cfg.verbose {
            println!("cluster-demo: [{:5.1} s] {s}", t0.elapsed().as_secs_f64());
        }
    };
    ensure!(
        cfg.collector_bin.is_file(),
        "no collector at {}: build it (cargo build -p outflow-collector)",
        cfg.collector_bin.display()
    );
    let _ = std::fs::remove_dir_all(&cfg.dir);
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("creating {}", cfg.dir.display()))?;
    let users = NatsUsers::new(&cfg.collector_bin, &cfg.dir)?;
    // The last NATS node in a network namespace of its own, to be cut off.
    let mut nats = if cfg.faults {
        NatsCluster::start_with_island(3, &cfg.dir.join("nats"), &users.server_config)
    } else {
        NatsCluster::start_with(3, &cfg.dir.join("nats"), &users.server_config)
    };
    let bin = &cfg.collector_bin;
    // The aggregators' webhook receiver (every alert, service ones too, as List has them).
    let hook = outflow_testbed::webhook::Receiver::try_start(false)
        .context("starting the webhook receiver")?;
    let hook_section = format!(
        "[webhook]\nurl = \"{}\"\ninclude_service = true\n",
        hook.url()
    );
    let mut ingest = Vec::new();
    for i in 0..2 {
        let name = format!("i{i}");
        let mut n = Node::new(
            bin,
            &cfg.dir,
            &name,
            &node_config(&nats, &users, "ingest", &name),
        )?;
        n.start()?;
        ingest.push(n);
    }
    let mut aggregators = Vec::new();
    for i in 0..3 {
        let name = format!("a{i}");
        let mut n = Node::new(
            bin,
            &cfg.dir,
            &name,
            &(node_config(&nats, &users, "aggregator", &name) + &hook_section),
        )?;
        n.start()?;
        aggregators.push(n);
    }
    say(&format!(
        "NATS JetStream on 3 nodes ({}), ingest nodes {} and {}, aggregators {}, {} and {} sharing {PARTITIONS} partitions; logs in {}",
        nats.urls().join(" "),
        ingest[0].listen,
        ingest[1].listen,
        aggregators[0].listen,
        aggregators[1].listen,
        aggregators[2].listen,
        cfg.dir.display()
    ));
    wait_held(&aggregators, Duration::from_secs(60))?;

    let progress = Arc::new(AtomicU64::new(0));
    // The fleet's day starts at the last full hour: up to now in its first steps, the rest
    // ahead of the clock (the nodes do not check how far ahead), so that traffic beside it,
    // stamped with the wall clock, is never ahead of the fleet's batch time once the fleet has
    // passed now (the aggregators apply in step by batch time: a part ahead would hold its
    // partition's fleet parts back), and lies in the same 24 h window. The model's day is
    // today's, from midnight, sent that many hours later (`offset_ms`): the same traffic
    // whatever the hour. A week's fleet sends the six days before it first, behind the clock.
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis() as u64;
    let today_ms = now_ms / DAY_MS * DAY_MS;
    let offset_ms = now_ms / HOUR_MS * HOUR_MS - today_ms;
    let days = cfg.fleet.days();
    let start_ms = today_ms - u64::from(days - 1) * DAY_MS;
    let mut sim = SimConfig {
        collector: format!("{},{}", ingest[0].url(), ingest[1].url()),
        hosts: cfg.hosts,
        clients: cfg.clients,
        days,
        seed: cfg.seed,
        batch_secs: cfg.fleet.batch_secs(),
        start_ms: Some(start_ms),
        offset_ms,
        weekends: false,
        max_batches_per_second: 0.0,
        progress: Some(progress.clone()),
        ..SimConfig::default()
    };
    let steps = sim.steps();
    // The step from which the fleet's batch time is past the wall clock (of the run's first
    // minutes) and traffic beside it starts (with none, the first); the faults come after it,
    // over the rest of the fleet's steps, which take at least `TAIL` (even when few steps of
    // the day are left), so that they all fall while the fleet sends.
    let join = if beside.is_some() {
        ((now_ms - start_ms - offset_ms) / (sim.batch_secs * 1000) + 2).min(steps)
    } else {
        1
    };
    sim.tail = Some((join, TAIL));
    let attacks = cfg.fleet.attacks();
    let names: Vec<String> = attacks.iter().map(ToString::to_string).collect();
    say(&format!(
        "{} agents send {} of traffic ({steps} batches each, {} benign clients, attacks: {}) through both ingest nodes",
        cfg.hosts,
        if days == 1 {
            "a day".to_owned()
        } else {
            format!("{days} days")
        },
        cfg.clients,
        names.join(", ")
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let fleet = rt.spawn({
        let sim = sim.clone();
        async move { crate::send(&sim, attacks).await }
    });

    if let Some(b) = beside.as_deref_mut() {
        while progress.load(Ordering::Relaxed) < join && !fleet.is_finished() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let urls: Vec<String> = ingest.iter().map(Node::url).collect();
        b.start(&urls)
            .context("starting the traffic beside the fleet")?;
        say(&format!(
            "step {}/{steps}: the fleet's batch time is past the clock; the traffic beside it started",
            progress.load(Ordering::Relaxed)
        ));
    }
    // A node of each kind killed part way (of the steps from `join`), and brought back.
    let at = |share: u64| {
        let step = join + (steps - join) * share / 100;
        while progress.load(Ordering::Relaxed) < step && !fleet.is_finished() {
            std::thread::sleep(Duration::from_millis(20));
        }
        progress.load(Ordering::Relaxed)
    };
    if cfg.faults {
        let step = at(15);
        aggregators[2].kill();
        say(&format!("step {step}/{steps}: SIGKILL aggregator a2"));
        let step = at(30);
        ingest[1].kill();
        say(&format!(
            "step {step}/{steps}: SIGKILL ingest node i1 (its agents go on through i0)"
        ));
        let step = at(45);
        nats.kill(1);
        say(&format!("step {step}/{steps}: SIGKILL NATS node 1"));
        let step = at(60);
        nats.restart(1);
        aggregators[2].start()?;
        say(&format!(
            "step {step}/{steps}: NATS node 1 and aggregator a2 back (a2 on its own store: it takes its share again)"
        ));
        let step = at(70);
        ingest[1].start()?;
        say(&format!("step {step}/{steps}: ingest node i1 back"));
        let step = at(80);
        nats.cut();
        say(&format!(
            "step {step}/{steps}: NATS node 2 cut off from the network for {CUT_FOR:?} (its packets dropped: the nodes connected to it find out by their pings)"
        ));
        std::thread::sleep(CUT_FOR);
        nats.mend();
        say(&format!(
            "step {}/{steps}: NATS node 2 joined again (it catches up)",
            progress.load(Ordering::Relaxed)
        ));
    }
    let sent = rt
        .block_on(fleet)
        .context("the fleet's task")?
        .context("the fleet")?;
    // What the nodes' 24 h window holds: the fleet's last day.
    let mut truth = sent.last_day();
    let mut beside_clients = Vec::new();
    if let Some(b) = beside.as_deref_mut() {
        let more = b.finish().context("the traffic beside the fleet")?;
        beside_clients.extend(more.clients.keys().copied());
        say(&format!(
            "the traffic beside the fleet stopped: {} host(s), {} client(s)",
            more.hosts.len(),
            more.clients.len()
        ));
        truth.hosts.extend(more.hosts);
        truth.clients.extend(more.clients);
    }
    say(&format!(
        "every batch acknowledged: {} deltas, {} streams opened again (their batch sent again); waiting for the aggregators to apply every part",
        truth.deltas,
        sent.reconnects()
    ));

    // Compared through an ingest node (it asks every aggregator).
    let differences = compare_settled(&rt, &ingest[0].url(), &truth, &beside_clients, &say)?;
    let sum = |name: &str| -> f64 {
        aggregators
            .iter()
            .filter_map(|a| http_get(a.metrics, "/metrics"))
            .map(|(_, m)| metric(&m, name))
            .sum()
    };
    say(&format!(
        "aggregators: {} rebuilds, {} consumers read again past deliveries that never arrived, {} parts taken for duplicates",
        sum("outflow_collector_cluster_rebuilds_total"),
        sum("outflow_collector_cluster_delivery_gaps_total"),
        sum("outflow_collector_duplicate_batches_total"),
    ));
    for (key, want, got) in differences.iter().take(10) {
        say(&format!(
            "  {key}: sent {} response / {} request bytes, the cluster has {} / {}",
            want.0, want.1, got.0, got.1
        ));
    }

    // The alerts: listed until each attack's shows (the aggregators judge what they applied
    // on a thread of their own, after it), for at most `alert_wait`.
    let deadline = Instant::now() + cfg.alert_wait;
    let alerts = loop {
        let alerts = rt.block_on(sent.list_alerts());
        let done = alerts.as_ref().is_ok_and(|a| sent.every_attack_detected(a));
        if done || Instant::now() > deadline {
            break alerts;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let listed = alerts.as_ref().map_or(0, Vec::len);
    let mut repeated = Vec::new();
    if let Ok(list) = &alerts {
        // Each key and detector's alerts: when each was first seen (its episode), and its state.
        let mut seen: BTreeMap<(&str, i32), Vec<String>> = BTreeMap::new();
        // Not the service alerts (a workload's own volume changed): over a week a workload's
        // volume changes in several episodes, each its own alert.
        for a in list.iter().filter(|a| a.scope != v1::Scope::Service as i32) {
            seen.entry((a.key.as_str(), a.detector))
                .or_default()
                .push(format!(
                    "first seen at {} s, state {}",
                    a.first_seen_ms / 1000,
                    a.state
                ));
        }
        repeated.extend(
            seen.into_iter()
                .filter(|(_, v)| v.len() > 1)
                .map(|((k, d), v)| {
                    format!("{k} (detector {d}, {} times: {})", v.len(), v.join("; "))
                }),
        );
    }
    // The webhook: every listed alert POSTed (its resolution too, if resolved), and no change
    // twice, though aggregators were killed and rebuilt their stores from the stream (a replay
    // judges every change again: the cluster's delivery records keep it from being sent again).
    let resolved = v1::AlertState::Resolved.as_str_name();
    let wanted: Vec<(String, bool)> = alerts
        .as_ref()
        .map(|list| {
            list.iter()
                .map(|a| (a.id.clone(), a.state == v1::AlertState::Resolved as i32))
                .collect()
        })
        .unwrap_or_default();
    let missing = |got: &BTreeMap<Change, u32>| -> Vec<String> {
        wanted
            .iter()
            .filter(|(id, is_resolved)| {
                !got.keys()
                    .any(|(i, state, _)| i == id && (!is_resolved || state == resolved))
            })
            .map(|(id, _)| id.clone())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (posted, records) = loop {
        let records = posted_alerts(&hook.bodies());
        let got = changes(&records);
        if missing(&got).is_empty() || Instant::now() > deadline {
            break (got, records);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let not_posted = missing(&posted);
    let resolved_on_the_way = resolved_changes(&records);
    let posted_twice: Vec<String> = posted
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|((id, state, at), n)| format!("{id} {state} at {} s ({n} times)", at / 1000))
        .collect();
    say(&format!(
        "webhook: {} alert changes POSTed{}",
        posted.len(),
        if posted_twice.is_empty() {
            ", each once (what a rebuilt aggregator judged again was not sent again)"
        } else {
            ", some more than once"
        }
    ));
    let report = sent.score("cluster-demo", alerts);
    for a in &report.attacks {
        say(&format!(
            "attack {}: {}",
            a.scenario,
            match &a.alert {
                Some(al) => format!("{} alert on {} ({})", al.detector, al.key, al.severity),
                None => "no alert".into(),
            }
        ));
    }
    if let Some(b) = beside {
        b.stop().context("stopping the traffic beside the fleet")?;
    }
    // The nodes stop before the runtime their clients were on.
    drop(ingest);
    drop(aggregators);
    drop(rt);
    Ok(Outcome {
        hosts: truth.hosts.len(),
        clients: truth.clients.len(),
        alerts: listed,
        repeated,
        posted: posted.len(),
        posted_twice,
        not_posted,
        resolved_on_the_way,
        differences,
        report,
    })
}

/// An alert change as the webhook carries it: (id, state, `last_seen_ms`).
type Change = (String, String, u64);

/// One webhook body: its change, and what says whose alert it is.
struct Posted {
    change: Change,
    key: String,
    detector: String,
    /// A service's alert (a workload's own volume changed).
    service: bool,
}

/// The alerts in webhook `bodies`, in the order they came (a body that is not one is left out).
fn posted_alerts(bodies: &[String]) -> Vec<Posted> {
    let mut out = Vec::new();
    for body in bodies {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
            continue;
        };
        let (Some(id), Some(state), Some(at)) = (
            v["id"].as_str(),
            v["state"].as_str(),
            v["last_seen_ms"].as_u64(),
        ) else {
            continue;
        };
        out.push(Posted {
            change: (id.to_owned(), state.to_owned(), at),
            key: v["key"].as_str().unwrap_or("?").to_owned(),
            detector: v["detector"].as_str().unwrap_or("?").to_owned(),
            service: v["scope"].as_str() == Some(v1::Scope::Service.as_str_name()),
        });
    }
    out
}

/// The alert changes POSTed, and how many times each came.
fn changes(posted: &[Posted]) -> BTreeMap<Change, u32> {
    let mut out = BTreeMap::new();
    for p in posted {
        *out.entry(p.change.clone()).or_insert(0) += 1;
    }
    out
}

/// The alerts (not a service's) POSTed as resolved: key, detector and when, each once.
fn resolved_changes(posted: &[Posted]) -> Vec<String> {
    let resolved = v1::AlertState::Resolved.as_str_name();
    let out: BTreeSet<String> = posted
        .iter()
        .filter(|p| p.change.1 == resolved && !p.service)
        .map(|p| {
            format!(
                "{} ({}, last seen at {} s)",
                p.key,
                p.detector,
                p.change.2 / 1000
            )
        })
        .collect();
    out.into_iter().collect()
}

/// Every host's and client's totals through the node at `url` against `truth`, again while
/// the cluster settles (a partition held by none, by two, or still being replayed answers
/// UNAVAILABLE; a caught-up one may lag by the parts in flight), until every total is exact
/// or five minutes have passed: the differences.
fn compare_settled(
    rt: &tokio::runtime::Runtime,
    url: &str,
    truth: &Truth,
    beside: &[IpAddr],
    say: &dyn Fn(&str),
) -> Result<Differences> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut passes, mut replaying) = (0, 0);
    let (differences, host_diffs, client_diffs, clients) = loop {
        passes += 1;
        let compared = rt.block_on(compare(url, truth));
        match compared {
            Ok((d, h, c, t)) if d.is_empty() || Instant::now() > deadline => break (d, h, c, t),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(e) if format!("{e:#}").contains("being replayed") => replaying += 1,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    say(&format!(
        "{} hosts: {}; {} clients: {} (compared {passes} time(s) while the cluster settled, {replaying} refused while partitions were being replayed)",
        truth.hosts.len(),
        if host_diffs == 0 {
            "every host's totals exact (summed over the three aggregators)".to_owned()
        } else {
            format!("{host_diffs} differ")
        },
        truth.clients.len(),
        if client_diffs == 0 {
            "every client's totals exact".to_owned()
        } else {
            format!("{client_diffs} differ")
        }
    ));
    // The clients that sent the most, and those of the traffic beside the fleet: the cluster's
    // totals against what was sent.
    let mut shown: Vec<IpAddr> = truth.clients.keys().copied().collect();
    shown.sort_by_key(|c| std::cmp::Reverse(truth.clients[c].0));
    shown.truncate(SHOWN_CLIENTS);
    for c in beside {
        if !shown.contains(c) {
            shown.push(*c);
        }
    }
    for c in shown {
        let want = truth.clients.get(&c).copied().unwrap_or_default();
        let got = clients.get(&c).copied().unwrap_or_default();
        say(&format!(
            "  client {c:<22} response bytes {:>15} (sent {:>15}), request bytes {:>13} (sent {:>13}){}{}",
            got.0,
            want.0,
            got.1,
            want.1,
            if got == want { ": exact" } else { ": DIFFERS" },
            if beside.contains(&c) {
                " (traffic beside the fleet)"
            } else {
                ""
            }
        ));
    }
    Ok(differences)
}

/// How many of the clients that sent the most [`compare_settled`] shows.
const SHOWN_CLIENTS: usize = 5;

/// Every host's and client's totals through the node at `url` against `truth`: the
/// differences (key, sent, the cluster's), how many of hosts and of clients, and the cluster's
/// totals of every client of `truth`.
type Differences = Vec<(String, (u64, u64), (u64, u64))>;

async fn compare(
    url: &str,
    truth: &Truth,
) -> Result<(Differences, usize, usize, BTreeMap<IpAddr, (u64, u64)>)> {
    let mut hosts = top_hosts(url).await?;
    let mut differences = Vec::new();
    for (host, want) in &truth.hosts {
        let got = hosts.remove(host).unwrap_or_default();
        if got != *want {
            differences.push((format!("host {host}"), *want, got));
        }
    }
    for (host, got) in hosts.into_iter().filter(|(_, got)| *got != (0, 0)) {
        differences.push((format!("host {host}"), (0, 0), got));
    }
    let host_diffs = differences.len();
    let clients = client_totals(url, truth.clients.keys().copied()).await?;
    for (addr, want) in &truth.clients {
        let got = clients.get(addr).copied().unwrap_or_default();
        if got != *want {
            differences.push((format!("client {addr}"), *want, got));
        }
    }
    let client_diffs = differences.len() - host_diffs;
    Ok((differences, host_diffs, client_diffs, clients))
}

/// Waits until the aggregators hold every partition between them.
fn wait_held(aggregators: &[Node], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let held: f64 = aggregators
            .iter()
            .filter_map(|a| http_get(a.metrics, "/metrics"))
            .map(|(_, m)| metric(&m, "outflow_collector_cluster_partitions_held"))
            .sum();
        if held == f64::from(PARTITIONS) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the aggregators hold {held} of {PARTITIONS} partitions after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every host's 24 h totals, as the node at `url` answers for the cluster.
async fn top_hosts(url: &str) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut q = QueryClient::connect(url.to_owned()).await?;
    let top = q
        .top_talkers(v1::TopTalkersRequest {
            group_by: v1::GroupBy::Host as i32,
            window: v1::Window::Window24h as i32,
            limit: 1000,
        })
        .await?
        .into_inner();
    Ok(top
        .talkers
        .into_iter()
        .map(|t| (t.key, (t.response_bytes, t.request_bytes)))
        .collect())
}

/// Every client's 24 h totals (ClientStats, one client at a time).
async fn client_totals(
    url: &str,
    clients: impl Iterator<Item = IpAddr>,
) -> Result<BTreeMap<IpAddr, (u64, u64)>> {
    let mut q = QueryClient::connect(url.to_owned()).await?;
    let mut out = BTreeMap::new();
    for c in clients {
        let r = q
            .client_stats(v1::ClientStatsRequest {
                client: c.to_string(),
            })
            .await;
        match r {
            Ok(r) => {
                let day = r
                    .into_inner()
                    .windows
                    .into_iter()
                    .find(|w| w.window == v1::Window::Window24h as i32)
                    .unwrap_or_default();
                out.insert(c, (day.response_bytes, day.request_bytes));
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(anyhow::anyhow!("ClientStats {c}: {s}")),
        }
    }
    Ok(out)
}

/// `outflow-collector` beside this executable (or one directory up, for a test binary in
/// `target/debug/deps`).
pub fn default_collector_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let here = dir.join("outflow-collector");
    if here.is_file() {
        return here;
    }
    dir.parent()
        .map(|d| d.join("outflow-collector"))
        .unwrap_or(here)
}
