//! Per-packet cost under real traffic and throughput attached versus detached (iperf3 over veth).
//!
//! Both benchmarks use the integration-test harness: a server and a client network namespace
//! joined by a veth pair, a test cgroup, and an iperf3 server that lives in the server namespace
//! *and* the test cgroup (it joins both before it execs, so its listening socket, and so every
//! socket it accepts, belongs to the cgroup). The iperf3 client runs in the client namespace with
//! `-R`: the server sends, so the bulk of the data is egress of the cgroup, as on an inference
//! host.
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
    sys::{Stats, enable_stats},
};
use outflow_tests::{
    agent::{Agent, PinDir},
    cgroup::{TestCgroup, attach},
    netns::{NetnsPair, SERVER_V4},
};
use serde_json::Value;

use crate::report::{Section, median, thousands};

/// The iperf3 port inside the server namespace (private to it, so never taken).
const PORT: u16 = 5201;
/// Defaults of the options (also left out of the reproducing command line).
const DEFAULT_SECONDS: u32 = 5;
const DEFAULT_COST_RUNS: u32 = 3;
const DEFAULT_THROUGHPUT_RUNS: u32 = 5;

/// `--seconds`: 1 s to an hour.
fn seconds_range() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=3600)
}

/// `--runs`: 1 to 100.
fn runs_range() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=100)
}
/// How long the agent may take to attach and print its start record.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long programs may stay attached after they were detached.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the iperf3 server may take to listen.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct CostArgs {
    /// Seconds of iperf3 traffic per run.
    #[arg(long, default_value_t = DEFAULT_SECONDS, value_parser = seconds_range())]
    seconds: u32,
    /// Runs of each program per mode; the median is reported. The empty program's and
    /// outflow's runs alternate (ABBA) to cancel drift.
    #[arg(long, default_value_t = DEFAULT_COST_RUNS, value_parser = runs_range())]
    runs: u32,
    /// Only these modes (repeat the flag; default: all).
    #[arg(long = "mode", value_enum)]
    modes: Vec<CostMode>,
}

#[derive(clap::Args)]
pub struct ThroughputArgs {
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = DEFAULT_SECONDS, value_parser = seconds_range())]
    seconds: u32,
    /// (detached, attached) pairs per mode; the median of each side is reported. The order
    /// within a pair alternates (ABBA) to cancel drift.
    #[arg(long, default_value_t = DEFAULT_THROUGHPUT_RUNS, value_parser = runs_range())]
    runs: u32,
    /// Only these modes (repeat the flag; default: all).
    #[arg(long = "mode", value_enum)]
    modes: Vec<ThroughputMode>,
}

// ---------------------------------------------------------------------------------------------
// Per-packet cost

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CostMode {
    /// Bulk TCP with the veth defaults (GSO/TSO on): the stack hands the hook large skbs.
    Gso,
    /// Bulk TCP with TSO and GSO off on both veth ends: the hooks still see large skbs (TCP
    /// always builds GSO skbs; software segmentation comes after the egress hook).
    NoOffload,
    /// Small packets: 256-byte writes with TCP_NODELAY, paced at 100 Mbit/s, so that each
    /// write leaves as its own segment and every skb the hooks see is one small packet.
    Small,
}

impl CostMode {
    const ALL: [Self; 3] = [Self::Gso, Self::NoOffload, Self::Small];

    fn name(self) -> &'static str {
        match self {
            Self::Gso => "bulk TCP, GSO/TSO on",
            Self::NoOffload => "bulk TCP, GSO/TSO off",
            Self::Small => "256-byte writes, TCP_NODELAY, 100 Mbit/s",
        }
    }

    fn iperf3_args(self) -> &'static [&'static str] {
        match self {
            Self::Gso | Self::NoOffload => &[],
            Self::Small => SMALL_MESSAGES,
        }
    }
}

/// iperf3 options of the small-packet cost runs: 256-byte writes with TCP_NODELAY at
/// 100 Mbit/s (about 49,000 writes a second), slow enough that the sender never falls behind
/// and coalesces writes: one write, one segment, one skb (bytes/packet in the table checks it).
const SMALL_MESSAGES: &[&str] = &["-l", "256", "-N", "-b", "100M"];

/// Which cgroup_skb programs are attached during a cost run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Empty,
    Outflow,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Outflow => "outflow",
        }
    }
}

/// What one cost run measured, for one direction.
#[derive(Clone, Copy, Default)]
struct DirCost {
    run_time_ns: u64,
    run_cnt: u64,
}

impl DirCost {
    fn ns_per_packet(self) -> f64 {
        if self.run_cnt == 0 {
            f64::NAN
        } else {
            self.run_time_ns as f64 / self.run_cnt as f64
        }
    }
}

struct CostRun {
    egress: DirCost,
    ingress: DirCost,
    iperf: IperfResult,
}

pub fn run_cost(args: &CostArgs) -> Result<Section> {
    let modes = if args.modes.is_empty() {
        CostMode::ALL.to_vec()
    } else {
        args.modes.clone()
    };
    // The run-time statistics are on while this file descriptor is open (BPF_ENABLE_STATS,
    // the switch behind kernel.bpf_stats_enabled): also released if we are killed.
    let _stats = enable_stats(Stats::RunTime)
        .context("enabling BPF run-time statistics (BPF_ENABLE_STATS, Linux 5.8+)")?;

    let mut section = Section::new(
        "traffic",
        "Per-packet cost under real traffic (iperf3 over veth)",
    );
    section.header = [
        "Traffic",
        "Direction",
        "Empty program",
        "outflow",
        "outflow − empty",
        "Ratio",
        "Packets/s",
        "Bytes/packet",
    ]
    .map(String::from)
    .to_vec();

    for &mode in &modes {
        // A fresh namespace pair per mode: the offload settings stay within it.
        let bed = Bed::new("bench-traffic")?;
        if mode == CostMode::NoOffload {
            bed.offloads_off()?;
        }
        let mut runs: [Vec<CostRun>; 2] = [Vec::new(), Vec::new()];
        for r in 0..args.runs {
            let order = if r % 2 == 0 {
                [Variant::Empty, Variant::Outflow]
            } else {
                [Variant::Outflow, Variant::Empty]
            };
            for variant in order {
                let run = bed.cost_run(variant, mode, args.seconds)?;
                eprintln!(
                    "traffic: {} run {}/{} {:<7}: egress {:.0} ns x {}, ingress {:.0} ns x {}, \
                     {:.2} Gbit/s",
                    mode.name(),
                    r + 1,
                    args.runs,
                    variant.name(),
                    run.egress.ns_per_packet(),
                    run.egress.run_cnt,
                    run.ingress.ns_per_packet(),
                    run.ingress.run_cnt,
                    run.iperf.bits_per_second / 1e9
                );
                runs[variant as usize].push(run);
            }
        }
        let [empty, outflow] = &runs;
        let secs = f64::from(args.seconds);
        let bytes = median(&outflow.iter().map(|r| r.iperf.bytes).collect::<Vec<_>>());
        for (dir, pick) in [
            (
                "egress",
                (|r: &CostRun| r.egress) as fn(&CostRun) -> DirCost,
            ),
            ("ingress", |r: &CostRun| r.ingress),
        ] {
            let ns = |v: &[CostRun]| {
                median(
                    &v.iter()
                        .map(|r| pick(r).ns_per_packet())
                        .collect::<Vec<_>>(),
                )
            };
            let (e, o) = (ns(empty), ns(outflow));
            let packets = median(
                &outflow
                    .iter()
                    .map(|r| pick(r).run_cnt as f64)
                    .collect::<Vec<_>>(),
            );
            section.row([
                mode.name().to_owned(),
                dir.to_owned(),
                format!("{e:.0} ns"),
                format!("{o:.0} ns"),
                format!("{:.0} ns", o - e),
                format!("{:.2}×", o / e),
                thousands(packets / secs),
                if dir == "egress" {
                    thousands(bytes / packets)
                } else {
                    "(ACKs)".to_owned()
                },
            ]);
        }
    }

    section.method = format!(
        "An iperf3 server runs in a network namespace and in a test cgroup; an iperf3 client in \
         a second namespace, joined by a veth pair, makes it send for {secs} s (`-R`, so the \
         data is the cgroup's egress and its ingress is mostly ACKs). The kernel's BPF run-time \
         statistics are on for the whole benchmark (the switch behind \
         `kernel.bpf_stats_enabled`, taken with BPF_ENABLE_STATS, so it is released even if the \
         benchmark is killed); each figure is the change of `run_time_ns` over the change of \
         `run_cnt` during one iperf3 run, of the cgroup_skb program attached to the cgroup for \
         that direction (found with BPF_PROG_QUERY on the cgroup). *outflow*: `outflow-agent` \
         with its defaults attached to the cgroup (its `count_egress` and `count_ingress`; its \
         sock_ops and tracepoint programs run per connection event, not per packet, and are not \
         in the figures). *Empty*: a cgroup_skb program that only returns \"allow\", attached \
         in its place, one copy per direction: the floor any cgroup_skb program pays. Median of \
         {runs} runs of each, empty and outflow runs alternating (ABBA). Traffic: *bulk TCP, \
         GSO/TSO on* is iperf3's default (128 KiB writes) with the veth defaults, so the egress \
         hook sees large GSO skbs of many segments; *GSO/TSO off* is the same after `ethtool -K \
         <veth> tso off gso off` on both veth ends; *256-byte writes* is `iperf3 -R {small}`: \
         slower than the path, so each write leaves as its own segment and the egress hook sees \
         one 256-byte packet per write. Packets/s and Bytes/packet are from the outflow runs \
         (iperf3's payload bytes sent / the egress program's `run_cnt`).",
        secs = args.seconds,
        runs = args.runs,
        small = SMALL_MESSAGES.join(" "),
    );
    section.commands = vec![command_line(
        "traffic",
        args.seconds,
        (args.runs, DEFAULT_COST_RUNS),
        &args.modes,
    )];
    section.notes = vec![
        "With statistics on, the kernel reads the clock before and after every program run and \
         `run_time_ns` is the time between the two reads: the empty program's figure is almost \
         all that clock reading (its own two instructions take a nanosecond or two). *outflow − \
         empty* is therefore what outflow's counting adds per packet; the hook's dispatch, the \
         same for any program, is outside both figures."
            .to_owned(),
        "The cost is per skb, not per byte: with GSO one egress skb carries tens of kilobytes, \
         so per byte counting costs far less in bulk transfers than with small writes. Turning \
         GSO/TSO off on the device does not change what the hooks see (Bytes/packet stays in \
         the tens of kilobytes): TCP always builds GSO skbs, and the software segmentation for \
         a device without offloads runs after the egress hook."
            .to_owned(),
        "Two-core VM shared by the iperf3 client and server and the softirqs of both ends: the \
         figures are medians, and the difference of two programs measured side by side is \
         steadier than either figure alone."
            .to_owned(),
    ];
    Ok(section)
}

// ---------------------------------------------------------------------------------------------
// Throughput

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ThroughputMode {
    /// Bulk TCP with the veth defaults (GSO/TSO on).
    Gso,
    /// Bulk TCP with TSO and GSO off on both veth ends (GRO is off on veth by default).
    NoOffload,
    /// Many small messages: 128-byte writes with TCP_NODELAY on 4 connections, as fast as they
    /// go (one segment per write; a single connection falls into coalescing writes).
    Small,
}

impl ThroughputMode {
    const ALL: [Self; 3] = [Self::Gso, Self::NoOffload, Self::Small];

    fn name(self) -> &'static str {
        match self {
            Self::Gso => "TCP, GSO/TSO on",
            Self::NoOffload => "TCP, GSO/TSO off",
            Self::Small => "128-byte messages, TCP_NODELAY, 4 connections",
        }
    }

    /// The target: the largest acceptable throughput loss, in percent.
    fn target_pct(self) -> f64 {
        match self {
            Self::Gso => 1.0,
            Self::NoOffload => 3.0,
            Self::Small => 5.0,
        }
    }

    fn iperf3_args(self) -> &'static [&'static str] {
        match self {
            Self::Gso | Self::NoOffload => &[],
            Self::Small => &["-l", "128", "-N", "-P", "4"],
        }
    }
}

pub fn run_throughput(args: &ThroughputArgs) -> Result<Section> {
    let modes = if args.modes.is_empty() {
        ThroughputMode::ALL.to_vec()
    } else {
        args.modes.clone()
    };
    let mut section = Section::new(
        "throughput",
        "Throughput with the agent attached versus detached (iperf3 over veth)",
    );
    section.header = [
        "Traffic",
        "Detached",
        "Attached",
        "Loss",
        "Detached min–max",
        "Attached min–max",
        "Bytes/packet",
        "Agent process CPU",
    ]
    .map(String::from)
    .to_vec();

    let mut missed = Vec::new();
    for mode in modes {
        // A fresh namespace pair per mode: the offload settings stay within it.
        let bed = Bed::new("bench-throughput")?;
        if mode == ThroughputMode::NoOffload {
            bed.offloads_off()?;
        }
        let (mut detached, mut attached) = (Vec::new(), Vec::new());
        let (mut agent_cpu, mut bytes_per_packet) = (Vec::new(), Vec::new());
        for r in 0..args.runs {
            let order = if r % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for with_agent in order {
                let run = bed.throughput_run(with_agent, mode, args.seconds)?;
                let gbps = run.iperf.bits_per_second / 1e9;
                let per_packet = run.iperf.bytes / run.iperf.tx_packets.max(1) as f64;
                bytes_per_packet.push(per_packet);
                let cpu = run.agent_cpu.map(|cpu| {
                    let pct = cpu.as_secs_f64() / f64::from(args.seconds) * 100.0;
                    agent_cpu.push(pct);
                    format!(", agent process {pct:.1} % of a core")
                });
                eprintln!(
                    "throughput: {} pair {}/{} {}: {gbps:.3} Gbit/s, {per_packet:.0} \
                     bytes/packet{}",
                    mode.name(),
                    r + 1,
                    args.runs,
                    if with_agent { "attached" } else { "detached" },
                    cpu.unwrap_or_default(),
                );
                if with_agent {
                    attached.push(gbps);
                } else {
                    detached.push(gbps);
                }
            }
        }
        let (d, a) = (median(&detached), median(&attached));
        let loss = (d - a) / d * 100.0;
        let range = |v: &[f64]| {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (min, max)
        };
        let spread = |v: &[f64]| {
            let (min, max) = range(v);
            format!("{min:.2}–{max:.2}")
        };
        let rel_spread = |v: &[f64]| {
            let (min, max) = range(v);
            (max - min) / median(v) * 100.0
        };
        section.row([
            mode.name().to_owned(),
            format!("{d:.2} Gbit/s"),
            format!("{a:.2} Gbit/s"),
            format!("{loss:.1} %"),
            spread(&detached),
            spread(&attached),
            thousands(median(&bytes_per_packet)),
            format!("{:.1} %", median(&agent_cpu)),
        ]);
        let met = loss <= mode.target_pct();
        section.target(
            &format!("throughput loss, {}", mode.name()),
            &format!("at most {:.0} %", mode.target_pct()),
            format!("{loss:.1} %"),
            met,
        );
        if !met {
            let (spread_d, spread_a) = (rel_spread(&detached), rel_spread(&attached));
            // Each pair's own loss: slow drift of the machine cancels within a pair.
            let paired: Vec<f64> = detached
                .iter()
                .zip(&attached)
                .map(|(d, a)| (d - a) / d * 100.0)
                .collect();
            let (paired_min, paired_max) = range(&paired);
            let verdict = if loss <= spread_d.max(spread_a) {
                "within the run-to-run spread: noise cannot be told apart from cost here \
                 (rerun with more pairs, `--runs`, on an otherwise idle machine)"
            } else {
                "larger than the run-to-run spread: a real cost"
            };
            missed.push(format!(
                "{}: the medians differ by {loss:.1} %, above the target of {:.0} %. The \
                 detached runs alone spread over {spread_d:.1} % of their median and the \
                 attached runs over {spread_a:.1} %; the loss within each pair ranges from \
                 {paired_min:.1} % to {paired_max:.1} % (median {:.1} %). The loss is {verdict}.",
                mode.name(),
                mode.target_pct(),
                median(&paired),
            ));
        }
    }

    section.method = format!(
        "An iperf3 server runs in a network namespace and in a test cgroup; an iperf3 client in \
         a second namespace, joined by a veth pair, makes it send for {secs} s (`-R`, so the \
         traffic is the cgroup's egress) and reports what it received (`-J`, \
         `end.sum_received.bits_per_second`). *Attached*: `outflow-agent` with its defaults \
         (1 s interval; its JSON records read and discarded) runs attached to the cgroup, \
         started before the run and stopped after it; *detached*: nothing is attached to the \
         cgroup (the agent is stopped and `outflow-agent detach` has removed its programs; \
         both checked with BPF_PROG_QUERY before each run). {runs} (detached, attached) pairs \
         per mode, the order within a pair alternating (ABBA); the table gives the medians and \
         the range of each side, in Gbit/s. Loss = (detached − attached) / detached of the \
         medians. Modes: *GSO/TSO on* is iperf3's default (128 KiB writes) with the veth \
         defaults; *GSO/TSO off* is the same after `ethtool -K <veth> tso off gso off` on both \
         veth ends (GRO is off on veth by default and stays off), so the stack cuts every skb \
         into MSS-sized segments in software before the veth and the receiver handles one \
         packet per segment; *128-byte messages* is `iperf3 -R {small}`, as fast as it goes: \
         iperf3 serves the four connections in turn from one thread, so writes leave one or a \
         few to a segment (see Bytes/packet), where a single connection's writes often pile up \
         into large segments, flipping between the two regimes from run to run. \
         Bytes/packet: payload bytes sent / packets the server's veth sent (median of all runs \
         of the mode; a GSO skb that crosses the veth whole counts once). Agent process CPU: \
         the agent's user and system time during the attached runs (median), in % of one \
         core; the programs' own cost is not in it (they run in the sending and receiving \
         threads and softirqs).",
        secs = args.seconds,
        runs = args.runs,
        small = ThroughputMode::Small.iperf3_args().join(" "),
    );
    section.commands = vec![command_line(
        "throughput",
        args.seconds,
        (args.runs, DEFAULT_THROUGHPUT_RUNS),
        &args.modes,
    )];
    section.notes = vec![
        "iperf3 over veth is CPU-bound: the client, the server, the softirq processing of both \
         ends and the agent share the VM's two cores, so any CPU the programs take shows up as \
         throughput lost, and so does any other load on the machine. Run-to-run noise of a few \
         percent is normal here: read the loss beside the min–max ranges."
            .to_owned(),
        "Turning GSO/TSO off on the veth does not change what the cgroup hooks see: TCP always \
         builds GSO skbs and the device's software segmentation runs after the egress hook, so \
         the programs run about as often as with offloads on (see `outflow-bench traffic`, mode \
         GSO/TSO off); the mode makes the stack, not the programs, work harder per byte."
            .to_owned(),
    ];
    section.notes.extend(missed);
    Ok(section)
}

// ---------------------------------------------------------------------------------------------
// The test bed

/// Namespaces, cgroup and iperf3 server. Fields drop in order: the server first.
struct Bed {
    server: Iperf3Server,
    cgroup: TestCgroup,
    pair: NetnsPair,
}

impl Bed {
    fn new(tag: &str) -> Result<Self> {
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
    fn offloads_off(&self) -> Result<()> {
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
    fn cost_run(&self, variant: Variant, mode: CostMode, seconds: u32) -> Result<CostRun> {
        let (egress_name, ingress_name, attached) = match variant {
            Variant::Empty => (
                "bench_empty",
                "bench_empty",
                Attached::Empty(attach_empty(&self.cgroup)?),
            ),
            Variant::Outflow => (
                "count_egress",
                "count_ingress",
                Attached::Agent(RunningAgent::start(&self.cgroup)?),
            ),
        };
        let egress_id = only_one(self.cgroup.path(), BPF_CGROUP_INET_EGRESS, "egress")?;
        let ingress_id = only_one(self.cgroup.path(), BPF_CGROUP_INET_INGRESS, "ingress")?;
        let before = [
            prog_stats(egress_id, egress_name)?,
            prog_stats(ingress_id, ingress_name)?,
        ];
        let iperf = self
            .server
            .client(&self.pair, seconds, mode.iperf3_args())?;
        let after = [
            prog_stats(egress_id, egress_name)?,
            prog_stats(ingress_id, ingress_name)?,
        ];
        attached.finish(self.cgroup.path())?;
        let delta = |i: usize| DirCost {
            run_time_ns: after[i].run_time_ns - before[i].run_time_ns,
            run_cnt: after[i].run_cnt - before[i].run_cnt,
        };
        ensure!(
            delta(0).run_cnt > 0 && delta(1).run_cnt > 0,
            "the programs attached to the cgroup did not run during iperf3 (run_cnt unchanged): \
             is the iperf3 server in the cgroup?"
        );
        Ok(CostRun {
            egress: delta(0),
            ingress: delta(1),
            iperf,
        })
    }

    /// One throughput run, with or without the agent.
    fn throughput_run(
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
struct ThroughputRun {
    iperf: IperfResult,
    /// CPU time the agent process used during the run, when it ran.
    agent_cpu: Option<Duration>,
}

/// The command line that reproduces a section: `sub` with the options that differ from the
/// defaults.
fn command_line<M: clap::ValueEnum>(
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
enum Attached {
    Empty(Vec<Ebpf>),
    Agent(RunningAgent),
}

impl Attached {
    /// Detaches what is attached to `cgroup` and waits until the kernel has let go of it.
    fn finish(self, cgroup: &Path) -> Result<()> {
        match self {
            Self::Empty(objects) => drop(objects),
            Self::Agent(agent) => agent.stop()?,
        }
        wait_detached(cgroup)
    }
}

/// Waits until no cgroup_skb program is attached to the cgroup at `dir` any more: a link
/// whose pin is removed is released a moment later, after an RCU grace period.
fn wait_detached(dir: &Path) -> Result<()> {
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
fn attach_empty(cgroup: &TestCgroup) -> Result<Vec<Ebpf>> {
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

/// `outflow-agent` attached to the cgroup with its defaults, in its own pin directory.
/// Fields drop in order: the agent is killed (if still running), then `detach` runs.
struct RunningAgent {
    agent: Agent,
    _pin: PinDir,
}

impl RunningAgent {
    fn start(cgroup: &TestCgroup) -> Result<Self> {
        let pin = PinDir::new("bench");
        let agent = harness("starting outflow-agent", || {
            let agent = Agent::start(&["--cgroup", cgroup.as_arg(), "--pin-dir", pin.as_arg()]);
            agent.wait_started(AGENT_START_TIMEOUT);
            agent
        })?;
        Ok(Self { agent, _pin: pin })
    }

    /// CPU time the agent process has used so far.
    fn cpu_time(&self) -> Result<Duration> {
        crate::sys::cpu_time(self.agent.pid())
    }

    /// Stops the agent (SIGTERM) and removes its programs (`outflow-agent detach`).
    fn stop(self) -> Result<()> {
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
struct Iperf3Server {
    child: Child,
}

impl Iperf3Server {
    fn start(pair: &NetnsPair, cgroup: &TestCgroup) -> Result<Self> {
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
    fn listening(&mut self) -> Result<bool> {
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
    fn client(&self, pair: &NetnsPair, seconds: u32, extra: &[&str]) -> Result<IperfResult> {
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
    fn veth_tx_packets(&self, pair: &NetnsPair) -> Result<u64> {
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
struct IperfResult {
    /// Received by the client.
    bits_per_second: f64,
    /// Sent by the server.
    bytes: f64,
    /// Packets the server's veth end sent during the run (a GSO skb that crosses the veth
    /// whole counts once).
    tx_packets: u64,
}

/// Makes `command` enter the network namespace `ns` (and, with `cgroup_procs`, the cgroup
/// whose `cgroup.procs` that is) between fork and exec, so that every socket it makes is there.
fn in_netns(command: &mut Command, ns: &str, cgroup_procs: Option<&File>) -> Result<()> {
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

const BPF_CGROUP_INET_INGRESS: u32 = attach::INET_INGRESS;
const BPF_CGROUP_INET_EGRESS: u32 = attach::INET_EGRESS;
const DIRECTIONS: [(u32, &str); 2] = [
    (BPF_CGROUP_INET_INGRESS, "ingress"),
    (BPF_CGROUP_INET_EGRESS, "egress"),
];

/// Ids of the programs attached to the cgroup at `dir` for `attach_type`.
fn attached_prog_ids(dir: &Path, attach_type: u32) -> Result<Vec<u32>> {
    Ok(outflow_tests::cgroup::attached_programs(dir, attach_type)?)
}

/// The one program attached to the cgroup at `dir` for `attach_type`.
fn only_one(dir: &Path, attach_type: u32, direction: &str) -> Result<u32> {
    let ids = attached_prog_ids(dir, attach_type)?;
    match ids[..] {
        [id] => Ok(id),
        _ => bail!(
            "expected one program attached to the test cgroup for {direction}, found {}",
            ids.len()
        ),
    }
}

/// The statistics of the loaded program `id`, which must be named `name` (the kernel keeps
/// the first 15 bytes of a name).
fn prog_stats(id: u32, name: &str) -> Result<DirCost> {
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
fn harness<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
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
