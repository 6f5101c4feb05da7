//! The bed the traffic benchmarks run on: a server and a client network namespace joined by a
//! veth pair (the integration-test harness), a test cgroup, and an iperf3 server that lives in
//! the server namespace *and* the test cgroup (it joins both before it execs, so its listening
//! socket, and so every socket it accepts, belongs to the cgroup). The iperf3 client runs in
//! the client namespace with `-R`: the server sends, so the bulk of the data is egress of the
//! cgroup, as on an inference host.
use std::{
    fs::{self, File},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::process::CommandExt as _,
    },
    panic::{self, AssertUnwindSafe},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, loaded_programs},
};
use outflow_tests::{
    agent::{Agent, PinDir},
    cgroup::{TestCgroup, attach},
    netns::{NetnsPair, SERVER_V4},
};
use serde_json::Value;

use crate::{
    throughput::ThroughputMode,
    traffic::{CostMode, CostRun, DirCost, Variant},
};

/// The iperf3 port inside the server namespace (private to it, so never taken).
pub(crate) const PORT: u16 = 5201;
/// Defaults of the options (also left out of the reproducing command line).
pub(crate) const DEFAULT_SECONDS: u32 = 5;

/// `--seconds`: 1 s to an hour.
pub(crate) fn seconds_range() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=3600)
}

/// `--runs`: 1 to 100.
pub(crate) fn runs_range() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=100)
}
/// How long the agent may take to attach and print its start record.
pub(crate) const AGENT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long programs may stay attached after they were detached.
pub(crate) const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the iperf3 server may take to listen.
pub(crate) const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The test bed

/// Namespaces, cgroup and iperf3 server. Fields drop in order: the server first.
pub(crate) struct Bed {
    pub(crate) server: Iperf3Server,
    pub(crate) cgroup: TestCgroup,
    pub(crate) pair: NetnsPair,
}

impl Bed {
    pub(crate) fn new(tag: &str) -> Result<Self> {
        let pair = harness("creating the network namespaces", || NetnsPair::new(tag))?;
        let cgroup = harness("creating the test cgroup", || TestCgroup::new(tag))?;
        let server = Iperf3Server::start(&pair, &cgroup)?;
        Ok(Self {
            server,
            cgroup,
            pair,
        })
    }

    /// Turns TSO and GSO off on both veth ends.
    pub(crate) fn offloads_off(&self) -> Result<()> {
        for (ns, dev) in [
            (self.pair.server_ns(), self.pair.server_if()),
            (self.pair.client_ns(), self.pair.client_if()),
        ] {
            let args = [
                "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off",
            ];
            let out = Command::new("ip")
                .args(args)
                .stdin(Stdio::null())
                .output()
                .context(
                    "running `ip netns exec ... ethtool`: is ethtool installed? \
                     (`cargo xtask setup`)",
                )?;
            if !out.status.success() {
                bail!(
                    "`ip {}` failed ({}): {}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// One cost run: attach `variant`, run iperf3, read the programs' statistics around it.
    /// With outflow, the reference flow-map programs are attached too, in the same runs (so
    /// both see the same skbs): before the agent when `reference_first`, after it otherwise
    /// (a cgroup runs its programs in the order they were attached).
    pub(crate) fn cost_run(
        &self,
        variant: Variant,
        mode: CostMode,
        seconds: u32,
        reference_first: bool,
    ) -> Result<CostRun> {
        let (names, attached): ([&str; 4], _) = match variant {
            Variant::Empty => (
                ["bench_empty", "bench_empty", "", ""],
                Attached::Empty(attach_empty(&self.cgroup)?),
            ),
            Variant::Outflow => {
                let (agent, reference) = if reference_first {
                    let reference = attach_reference(&self.cgroup)?;
                    (RunningAgent::start(&self.cgroup)?, reference)
                } else {
                    let agent = RunningAgent::start(&self.cgroup)?;
                    (agent, attach_reference(&self.cgroup)?)
                };
                (
                    [
                        "count_egress",
                        "count_ingress",
                        REFERENCE_PROGRAMS[0],
                        REFERENCE_PROGRAMS[1],
                    ],
                    Attached::Agent(agent, reference),
                )
            }
        };
        let attach_types = [
            BPF_CGROUP_INET_EGRESS,
            BPF_CGROUP_INET_INGRESS,
            BPF_CGROUP_INET_EGRESS,
            BPF_CGROUP_INET_INGRESS,
        ];
        let wanted = if variant == Variant::Empty { 2 } else { 4 };
        let mut ids = Vec::new();
        for (attach_type, direction) in DIRECTIONS {
            let found = attached_prog_ids(self.cgroup.path(), attach_type)?.len();
            ensure!(
                found == wanted / 2,
                "expected {} program(s) attached to the test cgroup for {direction}, found {found}",
                wanted / 2
            );
        }
        for i in 0..wanted {
            ids.push(attached_named(
                self.cgroup.path(),
                attach_types[i],
                names[i],
            )?);
        }
        let stats = || -> Result<Vec<DirCost>> {
            ids.iter()
                .zip(names)
                .map(|(&id, name)| prog_stats(id, name))
                .collect()
        };
        let before = stats()?;
        let iperf = self
            .server
            .client(&self.pair, seconds, mode.iperf3_args())?;
        let after = stats()?;
        attached.finish(self.cgroup.path())?;
        let delta: Vec<DirCost> = before
            .iter()
            .zip(&after)
            .map(|(&b, a)| a.minus(b))
            .collect();
        ensure!(
            delta.iter().all(|d| d.run_cnt > 0),
            "the programs attached to the cgroup did not run during iperf3 (run_cnt unchanged): \
             is the iperf3 server in the cgroup?"
        );
        Ok(CostRun {
            egress: delta[0],
            ingress: delta[1],
            reference: (wanted == 4).then(|| [delta[2], delta[3]]),
            iperf,
        })
    }

    /// One throughput run, with or without the agent.
    pub(crate) fn throughput_run(
        &self,
        with_agent: bool,
        mode: ThroughputMode,
        seconds: u32,
    ) -> Result<ThroughputRun> {
        let agent = if with_agent {
            Some(RunningAgent::start(&self.cgroup)?)
        } else {
            None
        };
        let want = usize::from(with_agent);
        for (attach_type, direction) in DIRECTIONS {
            let found = attached_prog_ids(self.cgroup.path(), attach_type)?.len();
            ensure!(
                found == want,
                "expected {want} program(s) attached to the test cgroup for {direction}, found \
                 {found}"
            );
        }
        let cpu_before = agent.as_ref().map(RunningAgent::cpu_time).transpose()?;
        let iperf = self
            .server
            .client(&self.pair, seconds, mode.iperf3_args())?;
        let agent_cpu = match (&agent, cpu_before) {
            (Some(agent), Some(before)) => Some(agent.cpu_time()?.saturating_sub(before)),
            _ => None,
        };
        if let Some(agent) = agent {
            agent.stop()?;
            wait_detached(self.cgroup.path())?;
        }
        Ok(ThroughputRun { iperf, agent_cpu })
    }
}

/// What one throughput run measured.
pub(crate) struct ThroughputRun {
    pub(crate) iperf: IperfResult,
    /// CPU time the agent process used during the run, when it ran.
    pub(crate) agent_cpu: Option<Duration>,
}

/// The command line that reproduces a section: `sub` with the options that differ from the
/// defaults.
pub(crate) fn command_line<M: clap::ValueEnum>(
    sub: &str,
    seconds: u32,
    (runs, default_runs): (u32, u32),
    modes: &[M],
) -> String {
    let mut line = format!("sudo target/release/outflow-bench {sub}");
    if seconds != DEFAULT_SECONDS {
        line.push_str(&format!(" --seconds {seconds}"));
    }
    if runs != default_runs {
        line.push_str(&format!(" --runs {runs}"));
    }
    for mode in modes {
        if let Some(value) = mode.to_possible_value() {
            line.push_str(&format!(" --mode {}", value.get_name()));
        }
    }
    line
}

/// Whatever is attached for a cost run, until [`Attached::finish`].
pub(crate) enum Attached {
    Empty(Vec<Ebpf>),
    /// The agent, and the reference flow-map programs beside it.
    Agent(RunningAgent, Ebpf),
}

impl Attached {
    /// Detaches what is attached to `cgroup` and waits until the kernel has let go of it.
    pub(crate) fn finish(self, cgroup: &Path) -> Result<()> {
        match self {
            Self::Empty(objects) => drop(objects),
            Self::Agent(agent, reference) => {
                drop(reference);
                agent.stop()?;
            }
        }
        wait_detached(cgroup)
    }
}

/// Waits until no cgroup_skb program is attached to the cgroup at `dir` any more: a link
/// whose pin is removed is released a moment later, after an RCU grace period.
pub(crate) fn wait_detached(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        let mut found = Vec::new();
        for (attach_type, direction) in DIRECTIONS {
            let n = attached_prog_ids(dir, attach_type)?.len();
            if n > 0 {
                found.push(format!("{n} for {direction}"));
            }
        }
        if found.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "programs still attached to {} {DETACH_TIMEOUT:?} after detaching: {}",
                dir.display(),
                found.join(", ")
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Loads the benchmark object's empty cgroup_skb program twice (one copy per direction, so
/// each has its own statistics) and attaches the copies to the cgroup. Dropping the objects
/// detaches them.
pub(crate) fn attach_empty(cgroup: &TestCgroup) -> Result<Vec<Ebpf>> {
    [CgroupSkbAttachType::Egress, CgroupSkbAttachType::Ingress]
        .into_iter()
        .map(|attach_type| {
            let mut ebpf = crate::object::load(1)?;
            let program: &mut CgroupSkb = ebpf
                .program_mut("bench_empty")
                .context("the benchmark object has no program bench_empty")?
                .try_into()
                .context("bench_empty is not a cgroup_skb program")?;
            program.load().context("loading bench_empty")?;
            let dir = File::open(cgroup.path())
                .with_context(|| format!("opening {}", cgroup.path().display()))?;
            program
                .attach(dir.as_fd(), attach_type, CgroupAttachMode::default())
                .with_context(|| format!("attaching bench_empty to {}", cgroup.path().display()))?;
            Ok(ebpf)
        })
        .collect()
}

/// The reference programs (per-flow counters in a hash map, `agent-ebpf/src/reference.rs`),
/// egress then ingress.
pub(crate) const REFERENCE_PROGRAMS: [&str; 2] = ["flowhash_egress", "flowhash_ingress"];
/// Flows the reference's map holds in the traffic runs: the agent's default table size.
pub(crate) const REFERENCE_FLOWS: u32 = 65_536;

/// Loads the reference's two programs from one benchmark object (so they share one flow map)
/// and attaches them to the cgroup beside whatever else is attached (a cgroup link never
/// replaces another). Dropping the object detaches them.
pub(crate) fn attach_reference(cgroup: &TestCgroup) -> Result<Ebpf> {
    let mut ebpf = crate::object::load(REFERENCE_FLOWS)?;
    crate::object::load_programs(&mut ebpf, &REFERENCE_PROGRAMS)?;
    for (name, attach_type) in REFERENCE_PROGRAMS
        .into_iter()
        .zip([CgroupSkbAttachType::Egress, CgroupSkbAttachType::Ingress])
    {
        let program: &mut CgroupSkb = ebpf
            .program_mut(name)
            .with_context(|| format!("the benchmark object has no program {name}"))?
            .try_into()
            .with_context(|| format!("{name} is not a cgroup_skb program"))?;
        let dir = File::open(cgroup.path())
            .with_context(|| format!("opening {}", cgroup.path().display()))?;
        program
            .attach(dir.as_fd(), attach_type, CgroupAttachMode::default())
            .with_context(|| format!("attaching {name} to {}", cgroup.path().display()))?;
    }
    Ok(ebpf)
}

/// `outflow-agent` attached to the cgroup with its defaults, in its own pin directory.
/// Fields drop in order: the agent is killed (if still running), then `detach` runs.
pub(crate) struct RunningAgent {
    pub(crate) agent: Agent,
    pub(crate) _pin: PinDir,
}

impl RunningAgent {
    pub(crate) fn start(cgroup: &TestCgroup) -> Result<Self> {
        Self::start_with(cgroup, &[])
    }

    /// Like [`RunningAgent::start`], with `extra` options after the defaults.
    pub(crate) fn start_with(cgroup: &TestCgroup, extra: &[&str]) -> Result<Self> {
        let pin = PinDir::new("bench");
        let agent = harness("starting outflow-agent", || {
            let mut args = vec!["--cgroup", cgroup.as_arg(), "--pin-dir", pin.as_arg()];
            args.extend_from_slice(extra);
            let agent = Agent::start(&args);
            agent.wait_started(AGENT_START_TIMEOUT);
            agent
        })?;
        Ok(Self { agent, _pin: pin })
    }

    /// CPU time the agent process has used so far.
    pub(crate) fn cpu_time(&self) -> Result<Duration> {
        crate::sys::cpu_time(self.agent.pid())
    }

    /// Stops the agent (SIGTERM) and removes its programs (`outflow-agent detach`).
    pub(crate) fn stop(self) -> Result<()> {
        let status = harness("stopping outflow-agent", || self.agent.stop())?;
        ensure!(
            status.success(),
            "outflow-agent exited with {status}: {}",
            self.agent.stderr().trim()
        );
        drop(self);
        Ok(())
    }
}

/// An iperf3 server in the server namespace and the test cgroup, serving test after test.
pub(crate) struct Iperf3Server {
    pub(crate) child: Child,
}

impl Iperf3Server {
    pub(crate) fn start(pair: &NetnsPair, cgroup: &TestCgroup) -> Result<Self> {
        let procs = cgroup.path().join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .with_context(|| format!("opening {}", procs.display()))?;
        let mut command = Command::new("iperf3");
        command
            .args(["-s", "-B", &SERVER_V4.to_string(), "-p", &PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        in_netns(&mut command, pair.server_ns(), Some(&procs))?;
        let child = command
            .spawn()
            .context("starting the iperf3 server: is iperf3 installed? (`cargo xtask setup`)")?;
        let mut server = Self { child };
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        while !server.listening()? {
            if Instant::now() >= deadline {
                bail!("the iperf3 server did not listen within {SERVER_START_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// Whether the server listens on [`PORT`] yet (from its network namespace's /proc/net/tcp).
    pub(crate) fn listening(&mut self) -> Result<bool> {
        if let Some(status) = self.child.try_wait().context("waiting for iperf3")? {
            bail!("the iperf3 server exited ({status})");
        }
        let pid = self.child.id();
        let tcp = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
        let port = format!(":{PORT:04X} ");
        // Fields: sl local_address rem_address st ...; st 0A = LISTEN.
        Ok(tcp.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && format!("{} ", f[1]).ends_with(&port) && f[3] == "0A"
        }))
    }

    /// Runs the iperf3 client in the client namespace against this server, reversed (the
    /// server sends), for `seconds`, with `extra` options.
    pub(crate) fn client(
        &self,
        pair: &NetnsPair,
        seconds: u32,
        extra: &[&str],
    ) -> Result<IperfResult> {
        let mut command = Command::new("iperf3");
        command
            .args(["-c", &SERVER_V4.to_string(), "-p", &PORT.to_string()])
            .args([
                "-R",
                "-J",
                "--connect-timeout",
                "5000",
                "-t",
                &seconds.to_string(),
            ])
            .args(extra)
            .stdin(Stdio::null());
        in_netns(&mut command, pair.client_ns(), None)?;
        let tx_before = self.veth_tx_packets(pair)?;
        let out = command.output().context("running the iperf3 client")?;
        let tx_packets = self.veth_tx_packets(pair)? - tx_before;
        let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "iperf3 client ({}) printed no JSON: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        if let Some(error) = json.get("error").and_then(Value::as_str) {
            bail!("iperf3 client: {error}");
        }
        let end = &json["end"];
        let number = |v: &Value, what: &str| {
            v.as_f64()
                .with_context(|| format!("no {what} in iperf3's JSON output"))
        };
        Ok(IperfResult {
            bits_per_second: number(
                &end["sum_received"]["bits_per_second"],
                "end.sum_received.bits_per_second",
            )?,
            bytes: number(&end["sum_sent"]["bytes"], "end.sum_sent.bytes")?,
            tx_packets,
        })
    }
}

impl Iperf3Server {
    /// Packets sent so far by the server's veth end (`/proc/<server>/net/dev` shows the
    /// server namespace's interfaces).
    pub(crate) fn veth_tx_packets(&self, pair: &NetnsPair) -> Result<u64> {
        let path = format!("/proc/{}/net/dev", self.child.id());
        let dev = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        dev.lines()
            .find_map(|line| {
                let (name, counters) = line.split_once(':')?;
                if name.trim() != pair.server_if() {
                    return None;
                }
                // rx: bytes packets errs drop fifo frame compressed multicast,
                // then tx: bytes packets ...
                counters.split_whitespace().nth(9)?.parse().ok()
            })
            .with_context(|| format!("no {} in {path}", pair.server_if()))
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one iperf3 run reported.
pub(crate) struct IperfResult {
    /// Received by the client.
    pub(crate) bits_per_second: f64,
    /// Sent by the server.
    pub(crate) bytes: f64,
    /// Packets the server's veth end sent during the run (a GSO skb that crosses the veth
    /// whole counts once).
    pub(crate) tx_packets: u64,
}

/// Makes `command` enter the network namespace `ns` (and, with `cgroup_procs`, the cgroup
/// whose `cgroup.procs` that is) between fork and exec, so that every socket it makes is there.
pub(crate) fn in_netns(command: &mut Command, ns: &str, cgroup_procs: Option<&File>) -> Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let netns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let netns_fd = netns.as_raw_fd();
    let procs_fd = cgroup_procs.map(|f| f.as_raw_fd());
    // SAFETY: the hook only makes async-signal-safe system calls (write, setns) on file
    // descriptors that stay open until the command is spawned: `netns` is moved into the
    // closure, and `cgroup_procs` is borrowed by the caller, which spawns before dropping it.
    unsafe {
        command.pre_exec(move || {
            let _keep = &netns;
            if let Some(fd) = procs_fd {
                // "0" moves the writing process into the cgroup.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Programs attached to a cgroup and their statistics

pub(crate) const BPF_CGROUP_INET_INGRESS: u32 = attach::INET_INGRESS;
pub(crate) const BPF_CGROUP_INET_EGRESS: u32 = attach::INET_EGRESS;
pub(crate) const DIRECTIONS: [(u32, &str); 2] = [
    (BPF_CGROUP_INET_INGRESS, "ingress"),
    (BPF_CGROUP_INET_EGRESS, "egress"),
];

/// Ids of the programs attached to the cgroup at `dir` for `attach_type`.
pub(crate) fn attached_prog_ids(dir: &Path, attach_type: u32) -> Result<Vec<u32>> {
    Ok(outflow_tests::cgroup::attached_programs(dir, attach_type)?)
}

/// The program named `name` among those attached to the cgroup at `dir` for `attach_type`
/// (the kernel keeps the first 15 bytes of a name).
pub(crate) fn attached_named(dir: &Path, attach_type: u32, name: &str) -> Result<u32> {
    let ids = attached_prog_ids(dir, attach_type)?;
    let mut names = Vec::new();
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if !ids.contains(&info.id()) {
            continue;
        }
        let kernel_name = String::from_utf8_lossy(info.name()).into_owned();
        if !kernel_name.is_empty() && name.starts_with(&kernel_name) {
            return Ok(info.id());
        }
        names.push(kernel_name);
    }
    bail!(
        "no program {name} attached to {} (attached: {})",
        dir.display(),
        names.join(", ")
    )
}

/// The statistics of the loaded program `id`, which must be named `name` (the kernel keeps
/// the first 15 bytes of a name).
pub(crate) fn prog_stats(id: u32, name: &str) -> Result<DirCost> {
    for info in loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if info.id() != id {
            continue;
        }
        let kernel_name = String::from_utf8_lossy(info.name()).into_owned();
        ensure!(
            name.starts_with(&kernel_name) && !kernel_name.is_empty(),
            "program {id} attached to the test cgroup is {kernel_name:?}, expected {name:?}"
        );
        return Ok(DirCost {
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            run_cnt: info.run_count(),
        });
    }
    bail!("BPF program {id} ({name}) is no longer loaded")
}

/// Runs a piece of the test harness (which panics on failure) and turns a panic into an error
/// that says what failed, without the default panic report.
pub(crate) fn harness<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    panic::set_hook(hook);
    result.map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("panicked");
        anyhow::anyhow!("{what}: {message}")
    })
}
