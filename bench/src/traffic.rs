//! Per-packet cost under real traffic: the counting programs' run_time_ns / run_cnt
//! (`BPF_ENABLE_STATS`, as kernel.bpf_stats_enabled) during iperf3 across the test bed's veth
//! pair, beside an empty cgroup_skb program attached in their place, and beside the reference
//! flow-map programs attached with them (same runs, same skbs).

use anyhow::{Context as _, Result};
use aya::sys::{Stats, enable_stats};

use crate::report::{Section, median, thousands};

use crate::testbed::{
    Bed, DEFAULT_SECONDS, IperfResult, REFERENCE_FLOWS, command_line, runs_range, seconds_range,
};

const DEFAULT_COST_RUNS: u32 = 3;

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

// ---------------------------------------------------------------------------------------------
// Per-packet cost

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CostMode {
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

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Gso => "bulk TCP, GSO/TSO on",
            Self::NoOffload => "bulk TCP, GSO/TSO off",
            Self::Small => "256-byte writes, TCP_NODELAY, 100 Mbit/s",
        }
    }

    pub(crate) fn iperf3_args(self) -> &'static [&'static str] {
        match self {
            Self::Gso | Self::NoOffload => &[],
            Self::Small => SMALL_MESSAGES,
        }
    }
}

/// iperf3 options of the small-packet cost runs: 256-byte writes with TCP_NODELAY at
/// 100 Mbit/s (about 49,000 writes a second), slow enough that the sender never falls behind
/// and coalesces writes: one write, one segment, one skb (bytes/packet in the table checks it).
pub(crate) const SMALL_MESSAGES: &[&str] = &["-l", "256", "-N", "-b", "100M"];

/// Which cgroup_skb programs are attached during a cost run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Empty,
    Outflow,
}

impl Variant {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Outflow => "outflow",
        }
    }
}

/// What one cost run measured, for one direction.
#[derive(Clone, Copy, Default)]
pub(crate) struct DirCost {
    pub(crate) run_time_ns: u64,
    pub(crate) run_cnt: u64,
}

impl DirCost {
    /// What happened between `earlier` and `self` (cumulative statistics).
    pub(crate) fn minus(self, earlier: Self) -> Self {
        Self {
            run_time_ns: self.run_time_ns - earlier.run_time_ns,
            run_cnt: self.run_cnt - earlier.run_cnt,
        }
    }

    pub(crate) fn ns_per_packet(self) -> f64 {
        if self.run_cnt == 0 {
            f64::NAN
        } else {
            self.run_time_ns as f64 / self.run_cnt as f64
        }
    }
}

pub(crate) struct CostRun {
    pub(crate) egress: DirCost,
    pub(crate) ingress: DirCost,
    /// The reference's programs (egress, ingress), attached in the same run as outflow's.
    pub(crate) reference: Option<[DirCost; 2]>,
    pub(crate) iperf: IperfResult,
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
        "flow hash",
        "outflow − empty",
        "flow hash − empty",
        "outflow ÷ empty",
        "(outflow − empty) ÷ (flow hash − empty)",
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
                // Which of outflow and the reference runs first alternates too.
                let run = bed.cost_run(variant, mode, args.seconds, r % 2 == 1)?;
                let reference = run.reference.map_or_else(String::new, |[e, i]| {
                    format!(
                        "; flow hash egress {:.0} ns x {}, ingress {:.0} ns x {}",
                        e.ns_per_packet(),
                        e.run_cnt,
                        i.ns_per_packet(),
                        i.run_cnt
                    )
                });
                eprintln!(
                    "traffic: {} run {}/{} {:<7}: egress {:.0} ns x {}, ingress {:.0} ns x {}{}, \
                     {:.2} Gbit/s",
                    mode.name(),
                    r + 1,
                    args.runs,
                    variant.name(),
                    run.egress.ns_per_packet(),
                    run.egress.run_cnt,
                    run.ingress.ns_per_packet(),
                    run.ingress.run_cnt,
                    reference,
                    run.iperf.bits_per_second / 1e9
                );
                runs[variant as usize].push(run);
            }
        }
        let [empty, outflow] = &runs;
        let secs = f64::from(args.seconds);
        let bytes = median(&outflow.iter().map(|r| r.iperf.bytes).collect::<Vec<_>>());
        type Pick = fn(&CostRun) -> DirCost;
        // A run without the reference gives NaN, which the median leaves out.
        let directions: [(&str, Pick, Pick); 2] = [
            (
                "egress",
                |r| r.egress,
                |r| r.reference.map_or_else(DirCost::default, |d| d[0]),
            ),
            (
                "ingress",
                |r| r.ingress,
                |r| r.reference.map_or_else(DirCost::default, |d| d[1]),
            ),
        ];
        for (dir, pick, pick_reference) in directions {
            let ns = |v: &[CostRun], pick: Pick| {
                median(
                    &v.iter()
                        .map(|r| pick(r).ns_per_packet())
                        .collect::<Vec<_>>(),
                )
            };
            let (e, o, f) = (
                ns(empty, pick),
                ns(outflow, pick),
                ns(outflow, pick_reference),
            );
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
                format!("{f:.0} ns"),
                format!("{:.0} ns", o - e),
                format!("{:.0} ns", f - e),
                format!("{:.2}×", o / e),
                format!("{:.2}", (o - e) / (f - e)),
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
         in the figures). *flow hash*: the reference of the per-packet section (per-flow \
         counters in a preallocated BPF hash map keyed by the packet's tuple, atomic adds, as \
         flow-monitoring agents count), its map sized for {flows} flows (the agent's default \
         table size), its `flowhash_egress` and `flowhash_ingress` attached to the same cgroup \
         in the same runs as outflow, so both run on the same skbs; which of the two the cgroup \
         runs first alternates from run to run. *Empty*: a cgroup_skb program that only returns \
         \"allow\", attached in their place, one copy per direction: the floor any cgroup_skb \
         program pays. Median of {runs} runs of each, empty and outflow runs alternating \
         (ABBA). Traffic: *bulk TCP, \
         GSO/TSO on* is iperf3's default (128 KiB writes) with the veth defaults, so the egress \
         hook sees large GSO skbs of many segments; *GSO/TSO off* is the same after `ethtool -K \
         <veth> tso off gso off` on both veth ends; *256-byte writes* is `iperf3 -R {small}`: \
         slower than the path, so each write leaves as its own segment and the egress hook sees \
         one 256-byte packet per write. Packets/s and Bytes/packet are from the outflow runs \
         (iperf3's payload bytes sent / the egress program's `run_cnt`).",
        secs = args.seconds,
        runs = args.runs,
        flows = thousands(f64::from(REFERENCE_FLOWS)),
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
        "*(outflow − empty) ÷ (flow hash − empty)*: what outflow adds per skb over what the \
         flow map adds, measured on the same skbs; below 1, outflow costs less. The agent runs \
         with its defaults, request capture included; iperf3's client sends almost nothing on \
         the data connection, so captures are rare here (see the capture sections for their \
         cost)."
            .to_owned(),
        "Two-core VM shared by the iperf3 client and server and the softirqs of both ends: the \
         figures are medians, and the difference of two programs measured side by side is \
         steadier than either figure alone."
            .to_owned(),
    ];
    Ok(section)
}
