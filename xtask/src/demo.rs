//! `cargo xtask demo`: outflow's main job on this machine, end to end, in about a minute.
//!
//! Builds what it needs, starts a collector on its embedded store, an agent attached to a demo
//! cgroup, a small streaming "inference server" in that cgroup inside a network namespace, an
//! nginx gateway in front of it (an upstream keep-alive pool: the requests of every client share
//! a few connections), and clients behind the gateway: eight chat users streaming token-sized
//! answers, and one account that starts extracting in bulk. The agent attributes each request to
//! its client from the gateway's `X-Forwarded-For` and `x-client-id`; the demo prints the
//! collector's live top talkers by client id and address every few seconds (and its alerts),
//! then cleans everything up. A run that was interrupted is cleaned up by the next one.
//!
//! [`time_to_alert`] runs the same setup quietly and times the extraction's alert, for
//! `cargo xtask bench`.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use outflow_testbed::{cgroup::TestCgroup, netns::NetnsPair};

use crate::{cmd, setup, test::cargo_command};

/// The inference server's address: the server end of the test harness's veth pair.
const SERVER: Ipv4Addr = outflow_testbed::netns::SERVER_V4;
const SERVER_PORT: u16 = 8000;
/// The gateway's address, the client end of the veth pair: it listens here for the clients
/// and connects from here to the server, so it is the agent's one trusted peer
/// (198.18.0.0/15 is reserved for benchmarks).
const GATEWAY: Ipv4Addr = outflow_testbed::netns::CLIENT_V4;
const GATEWAY_PORT: u16 = 8080;
/// Eight chat users behind the gateway (address, account id) and one extractor (documentation
/// ranges: they are only ever on the demo's own loopback).
const USERS: [(&str, &str); 8] = [
    ("198.51.100.10", "user-ana"),
    ("198.51.100.11", "user-ben"),
    ("198.51.100.12", "user-chloe"),
    ("198.51.100.13", "user-dev"),
    ("198.51.100.14", "user-eli"),
    ("198.51.100.15", "user-fay"),
    ("198.51.100.16", "user-gus"),
    ("198.51.100.17", "user-hana"),
];
const EXTRACTOR: &str = "203.0.113.66";
const EXTRACTOR_ID: &str = "acct-7731";
const PIN_DIR: &str = "/sys/fs/bpf/outflow-demo";
const WORK_DIR: &str = "/tmp/outflow-demo";
/// In the names of the demo's network namespaces and cgroup.
const TAG: &str = "demo";

const DURATION: Duration = Duration::from_secs(48);
const EXTRACTION_STARTS: Duration = Duration::from_secs(12);
const REPORT_EVERY: Duration = Duration::from_secs(6);
/// How long [`time_to_alert`] waits for the extractor's alert.
const ALERT_TIMEOUT: Duration = Duration::from_secs(120);
/// How often [`time_to_alert`] asks the collector for its open alerts.
const ALERT_POLL: Duration = Duration::from_millis(100);

pub fn run() -> Result<ExitCode> {
    if !cmd::is_root()? {
        bail!("the demo attaches BPF programs and creates network namespaces: run as root");
    }
    let bins = setup_and_build("demo")?;

    let mut demo = Demo::new(&bins, false)?;
    demo.start(DURATION)?;
    demo.watch()?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `setup`, then builds (debug) the binaries of the agent, the collector and the test
/// harness (the demos' inference server and `outflow-cluster-demo`), saying so as `tag`;
/// returns their directory.
pub fn setup_and_build(tag: &str) -> Result<PathBuf> {
    let report = setup::run()?;
    let mut build = cargo_command(&report, "build");
    build.args([
        "--bins",
        "-p",
        "outflow-agent",
        "-p",
        "outflow-collector",
        "-p",
        "outflow-tests",
    ]);
    println!("{tag}: {}", cmd::display(&build));
    cmd::run(&mut build).context("building the agent, the collector and the test harness")?;
    Ok(cmd::target_dir().join("debug"))
}

/// The time from the start of the demo's bulk extraction to its alert.
///
/// Runs the demo's setup (collector, agent, inference server, eight chat users) quietly with
/// the binaries in `bins` (`outflow-collector`, `outflow-agent`, `outflow-testpeer`, e.g.
/// `target/release`), with default configurations. As in the demo, the extractor starts
/// 12 s after the chat users. The time runs from the instant the extractor's process is spawned
/// to the instant `outflow-collector alerts --open` (asked every 100 ms) first lists an alert
/// whose key is the extractor's address. An error after 120 s without one. Needs root;
/// everything is stopped and removed before it returns.
pub fn time_to_alert(bins: &Path) -> Result<Duration> {
    if !cmd::is_root()? {
        bail!("the demo attaches BPF programs and creates network namespaces: run as root");
    }
    let mut demo = Demo::new(bins, true)?;
    demo.start(EXTRACTION_STARTS + ALERT_TIMEOUT)?;
    while demo.started.elapsed() < EXTRACTION_STARTS {
        demo.check_running()?;
        thread::sleep(Duration::from_millis(200));
    }
    let spawned = demo.start_extraction(ALERT_TIMEOUT)?;
    loop {
        if demo.alerted(EXTRACTOR)? {
            return Ok(spawned.elapsed());
        }
        if spawned.elapsed() > ALERT_TIMEOUT {
            bail!(
                "no alert for the extractor {EXTRACTOR} within {}s of its start",
                ALERT_TIMEOUT.as_secs()
            );
        }
        demo.check_running()?;
        thread::sleep(ALERT_POLL);
    }
}

/// Everything the demo started; dropping it stops and removes all of it.
struct Demo {
    bins: PathBuf,
    /// The collector's gRPC and metrics addresses, and the agent's metrics address (free
    /// ports on 127.0.0.1).
    collector: String,
    metrics: String,
    agent_metrics: String,
    /// The server and client namespaces (the server in one, the gateway and the clients in
    /// the other), deleted when dropped.
    net: NetnsPair,
    /// The server's cgroup, the agent's; emptied and removed when dropped.
    cgroup: TestCgroup,
    work: PathBuf,
    children: Vec<(&'static str, Child)>,
    started: Instant,
    /// Print nothing (for [`time_to_alert`]).
    quiet: bool,
}

impl Demo {
    fn new(bins: &Path, quiet: bool) -> Result<Self> {
        let demo = Self {
            bins: bins.to_owned(),
            collector: free_local_addr()?,
            metrics: free_local_addr()?,
            agent_metrics: free_local_addr()?,
            net: NetnsPair::try_new(TAG).context("creating the demo's network namespaces")?,
            cgroup: TestCgroup::try_new(TAG).context("creating the demo's cgroup")?,
            work: PathBuf::from(WORK_DIR),
            children: Vec::new(),
            started: Instant::now(),
            quiet,
        };
        demo.clean();
        Ok(demo)
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    /// Prints `line` unless quiet.
    fn say(&self, line: &str) {
        if !self.quiet {
            println!("{line}");
        }
    }

    /// Starts everything but the extractor; the chat users stream for `users_for`.
    fn start(&mut self, users_for: Duration) -> Result<()> {
        fs::create_dir_all(&self.work).context("creating the demo's work directory")?;
        self.client_addresses()?;

        self.say(&format!(
            "demo: collector on {} (embedded store in {WORK_DIR}/collector; keys judged every \
             second of batch time instead of every minute, for a demo of a minute)",
            self.collector
        ));
        let data = self.work.join("collector");
        // Judgements happen at every `eval_interval` of batch time (1 min by default), once a
        // later batch arrived: at the agent's interval (1 s), the extractor is judged within
        // two of its reports instead of after the demo.
        let config = self.work.join("collector.toml");
        fs::write(&config, "[detect]\neval_interval = \"1s\"\n")
            .context("writing the demo collector's config")?;
        let collector = self.spawn_logged(
            "collector",
            Command::new(self.bin("outflow-collector")).args([
                "--config",
                config.to_str().unwrap_or(WORK_DIR),
                "--listen",
                &self.collector,
                "--metrics-listen",
                &self.metrics,
                "--data-dir",
                data.to_str().unwrap_or(WORK_DIR),
            ]),
        )?;
        self.children.push(("collector", collector));
        self.wait_for_log("collector", "listening")?;

        self.say(&format!(
            "demo: agent attached to cgroup {} streaming to the collector; it trusts the gateway \
             {GATEWAY} for X-Forwarded-For and x-client-id (ids kept raw for the demo: in \
             production they are a keyed hash)",
            self.cgroup.path().display()
        ));
        let state = self.work.join("agent");
        let agent = self.spawn_logged(
            "agent",
            Command::new(self.bin("outflow-agent")).args([
                "--cgroup",
                self.cgroup.as_arg(),
                "--pin-dir",
                PIN_DIR,
                "--output",
                "none",
                "--collector",
                &format!("http://{}", self.collector),
                "--state-dir",
                state.to_str().unwrap_or(WORK_DIR),
                "--spool-dir",
                state.join("spool").to_str().unwrap_or(WORK_DIR),
                "--trusted-peer",
                &format!("{GATEWAY}/32"),
                "--header",
                "x-forwarded-for=address",
                "--header",
                "x-client-id=id",
                "--raw-ids",
                "--metrics-listen",
                &self.agent_metrics,
            ]),
        )?;
        self.children.push(("agent", agent));
        self.wait_for_log("agent", "attached to")?;
        self.say(&format!(
            "demo: agent metrics at http://{0}/metrics, readiness at http://{0}/readyz; the \
             collector's at http://{1}/metrics\ndemo: the dashboard: http://{1}/ (open it now: \
             it follows the traffic live)",
            self.agent_metrics, self.metrics
        ));

        self.say(&format!(
            "demo: inference server {SERVER}:{SERVER_PORT} in the cgroup, in namespace {}",
            self.net.server_ns()
        ));
        let server = self.spawn_logged(
            "server",
            Command::new(self.bin("outflow-testpeer")).args([
                "http-serve",
                "--netns",
                self.net.server_ns(),
                "--cgroup",
                self.cgroup.as_arg(),
                "--listen",
                &format!("{SERVER}:{SERVER_PORT}"),
            ]),
        )?;
        self.children.push(("server", server));
        self.wait_for_log("server", "ready")?;

        self.say(&format!(
            "demo: nginx gateway {GATEWAY}:{GATEWAY_PORT} in namespace {}, a keep-alive pool of 4 \
             upstream connections to the server",
            self.net.client_ns()
        ));
        let gateway = self.spawn_logged("gateway", &mut self.nginx()?)?;
        self.children.push(("gateway", gateway));
        self.wait_for_listen(GATEWAY_PORT)?;

        self.say(&format!(
            "demo: {} chat users behind the gateway stream 30 kB answers as 200-byte tokens every 10 ms",
            USERS.len()
        ));
        let mut users = self.load_command(users_for.as_secs(), "30000", "200", "10", "2");
        for (addr, id) in USERS {
            users.args(["--client", &format!("{addr}={id}")]);
        }
        let users = self.spawn_logged("users", &mut users)?;
        self.children.push(("users", users));
        self.started = Instant::now();
        Ok(())
    }

    fn load_command(
        &self,
        seconds: u64,
        resp: &str,
        chunk: &str,
        interval: &str,
        parallel: &str,
    ) -> Command {
        let mut c = Command::new(self.bin("outflow-testpeer"));
        c.args([
            "http-chat",
            "--netns",
            self.net.client_ns(),
            "--connect",
            &format!("{GATEWAY}:{GATEWAY_PORT}"),
        ])
        .args(["--bytes", resp, "--chunk", chunk, "--pace-ms", interval])
        .args(["--parallel", parallel, "--seconds", &seconds.to_string()]);
        c
    }

    /// nginx as the L7 gateway, its files in the work directory, run in the client namespace.
    fn nginx(&self) -> Result<Command> {
        let dir = self.work.join("nginx");
        fs::create_dir_all(&dir).context("creating the gateway's directory")?;
        let d = dir.display();
        let conf = format!(
            r#"# written by cargo xtask demo: nginx as an L7 gateway with a keep-alive upstream pool
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream inference {{
        server {SERVER}:{SERVER_PORT};
        keepalive 4;
    }}
    server {{
        listen {GATEWAY}:{GATEWAY_PORT};
        location / {{
            proxy_pass http://inference;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
        }}
    }}
}}
"#
        );
        let path = dir.join("nginx.conf");
        fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.net.client_ns(), "nginx", "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"));
        Ok(c)
    }

    /// Waits until something listens on `port` in the client namespace.
    fn wait_for_listen(&mut self, port: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let needle = format!(":{port:04X} ");
        let ns = self.net.client_ns().to_owned();
        loop {
            let out = cmd::output(Command::new("ip").args([
                "netns",
                "exec",
                &ns,
                "cat",
                "/proc/net/tcp",
            ]))?;
            // st 0A: LISTEN.
            if out
                .lines()
                .any(|l| l.contains(&needle) && l.split_whitespace().nth(3) == Some("0A"))
            {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!("nothing listens on port {port} in {ns} after 30 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reports every few seconds; starts the extraction on the way.
    fn watch(&mut self) -> Result<()> {
        let mut extracting = false;
        let mut next = REPORT_EVERY;
        while self.started.elapsed() < DURATION {
            if !extracting && self.started.elapsed() >= EXTRACTION_STARTS {
                extracting = true;
                self.start_extraction(DURATION.saturating_sub(self.started.elapsed()))?;
            }
            if self.started.elapsed() >= next {
                next += REPORT_EVERY;
                self.report()?;
            }
            thread::sleep(Duration::from_millis(200));
        }
        thread::sleep(Duration::from_secs(2));
        println!("\ndemo: final picture, by client id, last 10 minutes of batch time");
        self.top("client-id", "10m")?;
        println!("\ndemo: by client /24 prefix (the real clients', not the gateway's)");
        self.top("client-prefix", "10m")?;
        println!("\ndemo: by TCP peer: all of it came through the one gateway");
        self.top("peer", "10m")?;
        let on_top = self.dashboard_top("client-address")?;
        if on_top != EXTRACTOR {
            bail!(
                "the dashboard (http://{}/) shows {on_top:?} on top, not the extractor {EXTRACTOR}",
                self.metrics
            );
        }
        println!(
            "\ndemo: the dashboard (http://{}/) shows the extractor {EXTRACTOR} on top",
            self.metrics
        );
        println!("\ndemo: done (logs in {WORK_DIR}/*.log); cleaning up");
        Ok(())
    }

    /// Starts the extractor for `duration` (at least a second); returns when it was spawned.
    fn start_extraction(&mut self, duration: Duration) -> Result<Instant> {
        self.say(&format!(
            "\ndemo: t+{}s account {EXTRACTOR_ID} at {EXTRACTOR} starts extracting through the \
             gateway: 8 parallel connections pulling 20 MB answers",
            self.started.elapsed().as_secs()
        ));
        let mut extractor = self.load_command(duration.as_secs().max(1), "20000000", "0", "0", "8");
        extractor.args(["--client", &format!("{EXTRACTOR}={EXTRACTOR_ID}")]);
        let extractor = self.spawn_logged("extractor", &mut extractor)?;
        let spawned = Instant::now();
        self.children.push(("extractor", extractor));
        Ok(spawned)
    }

    /// Whether the collector has an open alert whose key is `key`.
    fn alerted(&self, key: &str) -> Result<bool> {
        let alerts = self.collector_cli(&["alerts", "--open"])?;
        // A line: state, severity, detector, key, observed bytes, summary.
        Ok(alerts
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some(key)))
    }

    /// Fails if something the demo started has exited.
    fn check_running(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    fs::read_to_string(self.work.join(format!("{name}.log"))).unwrap_or_default();
                bail!("the {name} exited ({status}): {}", log.trim());
            }
        }
        Ok(())
    }

    fn report(&self) -> Result<()> {
        println!(
            "\ndemo: t+{}s top talkers by client id and by client address (behind the gateway), \
             last minute of batch time",
            self.started.elapsed().as_secs()
        );
        self.top("client-id", "1m")?;
        self.top("client-address", "1m")?;
        if let Ok(alerts) = self.collector_cli(&["alerts", "--open"])
            && !alerts.trim().is_empty()
        {
            println!("demo: open alerts\n{alerts}");
        }
        Ok(())
    }

    fn top(&self, group_by: &str, window: &str) -> Result<()> {
        let out = self.collector_cli(&[
            "top",
            "--group-by",
            group_by,
            "--window",
            window,
            "--limit",
            "10",
        ])?;
        print!("{out}");
        Ok(())
    }

    /// The top key of `group` in the last 10 minutes, as the dashboard's API gives it.
    fn dashboard_top(&self, group: &str) -> Result<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&self.metrics)
            .with_context(|| format!("connect to the dashboard at {}", self.metrics))?;
        write!(
            s,
            "GET /api/top?group={group}&window=10m&limit=1 HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(body)
            .with_context(|| format!("the dashboard's /api/top answered {answer:?}"))?;
        Ok(v["talkers"][0]["key"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn collector_cli(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new(self.bin("outflow-collector"));
        c.args(&args[..1])
            .args(["--server", &format!("http://{}", self.collector)])
            .args(&args[1..]);
        cmd::output(&mut c)
    }

    /// Waits until `name`'s log says `needle`, or fails if the process exits first.
    fn wait_for_log(&mut self, name: &str, needle: &str) -> Result<()> {
        let log = self.work.join(format!("{name}.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| *n == name)
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("the {name} exited ({status}): {}", text.trim());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {name} did not say {needle:?} within a minute: {}",
                    text.trim()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn_logged(&self, name: &str, command: &mut Command) -> Result<Child> {
        let log = self.work.join(format!("{name}.log"));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = file.try_clone().context("log file handle")?;
        command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting the {name}: {}", cmd::display(command)))
    }

    /// The clients' addresses, on the client namespace's loopback: they reach the gateway
    /// there.
    fn client_addresses(&self) -> Result<()> {
        for a in USERS.iter().map(|(a, _)| a).chain([&EXTRACTOR]) {
            cmd::run(Command::new("ip").args([
                "-n",
                self.net.client_ns(),
                "addr",
                "add",
                &format!("{a}/32"),
                "dev",
                "lo",
            ]))?;
        }
        Ok(())
    }

    /// Removes the agent's pins and the work directory of this demo (or an interrupted earlier
    /// one); never fails. The namespaces and the cgroup go with their guards, and the first
    /// guards of a run remove those an interrupted one left.
    fn clean(&self) {
        let quiet = |c: &mut Command| {
            let _ = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(Command::new(self.bin("outflow-agent")).args(["detach", "--pin-dir", PIN_DIR]));
        let _ = fs::remove_dir_all(&self.work);
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            // SIGTERM first: the agent and the collector stop cleanly on it.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("demo: the {name} did not stop on SIGTERM; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.clean();
        // Then the fields: `net` deletes the namespaces, `cgroup` kills what is left in it.
    }
}

/// `127.0.0.1:<port>` with a port nothing listens on now.
fn free_local_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("finding a free port")?.to_string())
}
