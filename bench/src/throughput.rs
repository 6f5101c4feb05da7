//! Throughput with the agent attached versus detached: iperf3 across the test bed's veth pair,
//! in pairs of runs, in three modes.

use anyhow::Result;

use crate::report::{Section, median, range, thousands};

use crate::testbed::{Bed, DEFAULT_SECONDS, command_line, runs_range, seconds_range};

const DEFAULT_THROUGHPUT_RUNS: u32 = 5;

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
// Throughput

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ThroughputMode {
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

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Gso => "TCP, GSO/TSO on",
            Self::NoOffload => "TCP, GSO/TSO off",
            Self::Small => "128-byte messages, TCP_NODELAY, 4 connections",
        }
    }

    /// The target: the largest acceptable throughput loss, in percent.
    pub(crate) fn target_pct(self) -> f64 {
        match self {
            Self::Gso => 1.0,
            Self::NoOffload => 3.0,
            Self::Small => 5.0,
        }
    }

    pub(crate) fn iperf3_args(self) -> &'static [&'static str] {
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
