//! Per-packet cost of the counting program with BPF_PROG_TEST_RUN, at 1 to 1M live connections.
//!
//! The benchmark object (`agent-ebpf/src/bench.rs`) carries outflow's own per-packet path and
//! four cgroup_skb drivers. A test run hands a program a dummy socket, so the drivers pick a
//! live connection and look its socket up (`bpf_sk_lookup_tcp`), as the stack would have found
//! it; that lookup is measured on its own and subtracted:
//!
//! - counting = `bench_count` − `bench_lookup`;
//! - outflow per packet = `bench_empty` + counting, beside `bench_empty` alone.
//!
//! The connections are real: N TCP connections on loopback in a network namespace of this
//! process's own, each with its socket storage and its slot in the connection table, created by
//! the product's own code on a first pass that touches every connection once (the path of a
//! connection that predates the agent). Each run then picks one of the N at random.
//!
//! Times are the thread's CPU time around the syscall divided by the repeat count (the
//! kernel's own figure is whole nanoseconds, too coarse for a floor of a few ns).
use std::{io, net::Ipv4Addr};

use crate::{
    holder::{Conn, HoldOptions, Holders},
    object,
    report::{Section, median, thousands},
};
use agent_common::{
    ConnSlot, SLOT_LIVE,
    bench::{BenchConfig, LookupTuple, PICK_RANDOM, PICK_SEQUENTIAL},
    names,
};
use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, MapData, Stack},
    programs::{CgroupSkb, TestRun as _, TestRunOptions},
};

#[derive(clap::Args)]
pub struct Args {
    /// Live connection counts to measure at (ascending), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,100000,1000000")]
    conns: Vec<u32>,
    /// Rounds per connection count; each round runs every program once, side by side. The
    /// figures are the medians of the rounds.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Runs per program per round (BPF_PROG_TEST_RUN's repeat).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// At 100,000 connections, also profile the counting driver with `perf record` (cpu-clock
    /// sampling: this VM has no hardware counters) and report where its time goes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    profile: bool,
}

/// The drivers, in the order they run within a round.
const PROGRAMS: [&str; 4] = ["bench_empty", "bench_lookup", "bench_state", "bench_count"];
const EMPTY: usize = 0;
const LOOKUP: usize = 1;
const STATE: usize = 2;
const COUNT: usize = 3;

/// Target of the issue: at 100k live connections, at most this times the empty program.
const TARGET_RATIO: f64 = 1.5;
const TARGET_CONNS: u32 = 100_000;

pub fn run(args: &Args) -> Result<Section> {
    let mut conns = args.conns.clone();
    conns.sort_unstable();
    conns.dedup();
    let max = *conns.last().context("--conns is empty")?;
    ensure!(
        args.repeat > 0 && args.rounds > 0,
        "--repeat and --rounds must be positive"
    );
    enter_private_netns()?;

    let mut ebpf = object::load(max)?;
    for name in PROGRAMS {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} not in the benchmark object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading {name} (see the verifier log with RUST_LOG)"))?;
    }
    fill_free_slots(&mut ebpf, max)?;

    let mut held = Holders::default();
    let packet = test_packet();
    let mut results = Vec::new();
    let mut counted_runs = 0u64;
    let mut profile = None;

    for &n in &conns {
        eprintln!("packet: opening connections up to {n}");
        let added = held.grow_to(n, &HoldOptions::default())?;
        add_tuples(&mut ebpf, n - added.len() as u32, &added)?;
        // First pass: every connection once, in order. The product's code gives each its
        // socket storage and its slot, as for a connection that predates the agent.
        configure(&mut ebpf, n, PICK_SEQUENTIAL)?;
        run_program(&mut ebpf, PROGRAMS[COUNT], &packet, n)?;
        counted_runs += u64::from(n);

        configure(&mut ebpf, n, PICK_RANDOM)?;
        let mut per_run: [Vec<f64>; 4] = Default::default();
        for round in 0..args.rounds {
            for (i, name) in PROGRAMS.iter().enumerate() {
                per_run[i].push(run_program(&mut ebpf, name, &packet, args.repeat)?);
            }
            counted_runs += u64::from(args.repeat);
            eprintln!(
                "packet: {n} connections, round {}: {}",
                round + 1,
                PROGRAMS
                    .iter()
                    .zip(&per_run)
                    .map(|(p, v)| format!("{p} {:.1} ns", v[round]))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let (live, segments) = table_totals(&ebpf, max)?;
        ensure!(
            live == u64::from(n),
            "{live} connections have a live slot, expected {n}"
        );
        ensure!(
            segments == counted_runs,
            "the counters saw {segments} packets, expected {counted_runs}: some runs did not \
             reach the counting path"
        );
        results.push(Measured {
            conns: n,
            ns: per_run.map(|v| median(&v)),
        });
        if n == TARGET_CONNS && args.profile {
            profile = Some(profile_count(&mut ebpf, &packet)?);
            counted_runs += u64::from(PROFILE_RUNS) * u64::from(PROFILE_REPEAT);
        }
    }
    let mut s = section(args, &results);
    if let Some(p) = profile {
        s.notes.push(p);
    }
    Ok(s)
}

struct Measured {
    conns: u32,
    /// Median ns per run of each program of [`PROGRAMS`].
    ns: [f64; 4],
}

impl Measured {
    fn counting(&self) -> f64 {
        self.ns[COUNT] - self.ns[LOOKUP]
    }
    fn outflow(&self) -> f64 {
        self.ns[EMPTY] + self.counting()
    }
    fn ratio(&self) -> f64 {
        self.outflow() / self.ns[EMPTY]
    }
}

fn section(args: &Args, results: &[Measured]) -> Section {
    let mut s = Section::new(
        "packet",
        "Per-packet cost with BPF_PROG_TEST_RUN, by live connections",
    );
    s.method = format!(
        "outflow's per-packet path (`programs::count`, the code `count_egress` runs) is driven \
         by BPF_PROG_TEST_RUN on a 98-byte IPv4 TCP packet, beside an empty cgroup_skb program. \
         A test run hands the program a dummy socket, so the drivers pick one of N live \
         connections at random (`bpf_get_prandom_u32`) and find its socket with \
         `bpf_sk_lookup_tcp`, as the stack would have; that pick and lookup is measured alone \
         (`bench_lookup`) and subtracted. The N connections are real loopback TCP connections \
         in a private network namespace, each with its socket storage and its slot in the \
         connection table, made by the product's code on a first pass over all of them; the \
         run checks that N slots are live and that the counters saw every run. Each figure is \
         the median of {} rounds of {} runs per program, the programs taking turns within a \
         round; ns per run is the thread's CPU time over the syscall divided by the runs.",
        args.rounds,
        thousands(f64::from(args.repeat)),
    );
    s.commands = vec![format!(
        "sudo target/release/outflow-bench packet --conns {} --rounds {} --repeat {}",
        args.conns
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.rounds,
        args.repeat
    )];
    s.header = [
        "live connections",
        "empty",
        "pick + lookup",
        "+ socket storage",
        "+ counting",
        "counting cost",
        "of which storage",
        "outflow per packet",
        "x empty",
    ]
    .map(String::from)
    .to_vec();
    for m in results {
        s.row([
            thousands(f64::from(m.conns)),
            format!("{:.1} ns", m.ns[EMPTY]),
            format!("{:.1} ns", m.ns[LOOKUP]),
            format!("{:.1} ns", m.ns[STATE]),
            format!("{:.1} ns", m.ns[COUNT]),
            format!("{:.1} ns", m.counting()),
            format!("{:.1} ns", m.ns[STATE] - m.ns[LOOKUP]),
            format!("{:.1} ns", m.outflow()),
            format!("{:.2}x", m.ratio()),
        ]);
    }
    if let Some(m) = results.iter().find(|m| m.conns == TARGET_CONNS) {
        s.target(
            "outflow per packet at 100,000 live connections, random access",
            &format!("<= {TARGET_RATIO}x the empty program"),
            format!(
                "{:.2}x ({:.1} ns vs {:.1} ns)",
                m.ratio(),
                m.outflow(),
                m.ns[EMPTY]
            ),
            m.ratio() <= TARGET_RATIO,
        );
    }
    s.notes.push(
        "\"counting cost\" = (+ counting) − (pick + lookup): everything outflow adds to a \
         packet the stack has already matched to its socket. \"of which storage\" = \
         (+ socket storage) − (pick + lookup): the socket-storage lookup that finds the \
         connection's slot. The rest is header parsing, the sequence \
         watermark and the counter update in the slot's first cache line."
            .into(),
    );
    s.notes.push(
        "No lookup is keyed by connection: the socket's own storage holds its slot, so the \
         cost grows with the number of connections only through cache misses on that storage \
         and on the slot (192 bytes per connection) as the working set outgrows the caches."
            .into(),
    );
    s
}

/// Moves this (still single-threaded) process into a network namespace of its own, with
/// loopback up: the connections and the socket lookups happen there, and go with the process.
pub(crate) fn enter_private_netns() -> Result<()> {
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error())
            .context("creating a network namespace (unshare CLONE_NEWNET): run as root");
    }
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("running `ip link set lo up` (iproute2; `cargo xtask setup` installs it)")?;
    ensure!(status.success(), "`ip link set lo up` failed: {status}");
    Ok(())
}

/// Test runs of the counting driver while perf samples: `PROFILE_RUNS` x `PROFILE_REPEAT`.
const PROFILE_RUNS: u32 = 5;
const PROFILE_REPEAT: u32 = 1_000_000;

/// Samples this process with `perf record` while `bench_count` runs, and says
/// which functions the samples fall in.
fn profile_count(ebpf: &mut Ebpf, packet: &[u8]) -> Result<String> {
    let data = std::env::temp_dir().join(format!("outflow-bench-{}.perf", std::process::id()));
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "4999", "-p"])
        .arg(std::process::id().to_string())
        .arg("-o")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("running perf (`cargo xtask setup` installs it; --profile false skips this)")?;
    // perf needs a moment to attach; the proportions do not depend on the first runs.
    std::thread::sleep(std::time::Duration::from_millis(500));
    for _ in 0..PROFILE_RUNS {
        run_program(ebpf, PROGRAMS[COUNT], packet, PROFILE_REPEAT)?;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
    let status = perf.wait()?;
    // perf record re-raises the SIGINT it stopped on.
    let stopped = std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGINT);
    ensure!(status.success() || stopped, "perf record failed: {status}");
    let report = std::process::Command::new("perf")
        .args([
            "report",
            "--no-children",
            "--sort",
            "symbol",
            "--stdio",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("running perf report")?;
    let _ = std::fs::remove_file(&data);
    let text = String::from_utf8_lossy(&report.stdout);
    let samples = text
        .lines()
        .find_map(|l| l.strip_prefix("# Samples: "))
        .map_or_else(String::new, |v| format!(", {}", v.trim()));
    let top: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let pct = it.next()?.strip_suffix('%')?;
            let _kind = it.next()?;
            let sym = it.next()?;
            Some(format!("`{sym}` {pct}%"))
        })
        .take(8)
        .collect();
    ensure!(!top.is_empty(), "perf report found no samples");
    Ok(format!(
        "Profile of `bench_count` at 100,000 connections (`perf record -e cpu-clock`{samples}), \
         share of samples by function: {}. `__inet_lookup_established` and `sk_lookup` are the \
         driver's socket lookup (the stack's own work, subtracted above); \
         `bpf_sk_storage_get` is outflow's socket-storage lookup; `bpf_prog_*_bench_count` is \
         the program's own instructions (parsing, the slot's counters).",
        top.join(", ")
    ))
}

/// Puts `conns` into the tuple map from index `first` on.
fn add_tuples(ebpf: &mut Ebpf, first: u32, conns: &[Conn]) -> Result<()> {
    let mut tuples: Array<&mut MapData, LookupTuple> = Array::try_from(
        ebpf.map_mut(agent_common::bench::TUPLES)
            .context("tuple map missing")?,
    )?;
    for (i, c) in (first..).zip(conns) {
        let t = LookupTuple {
            saddr: u32::from(*c.client.ip()).to_be(),
            daddr: u32::from(*c.server.ip()).to_be(),
            sport: c.client.port().to_be(),
            dport: c.server.port().to_be(),
        };
        tuples.set(i, t, 0)?;
    }
    Ok(())
}

/// Gives the kernel `n` free slots, as the agent does at start.
fn fill_free_slots(ebpf: &mut Ebpf, n: u32) -> Result<()> {
    let mut free: Stack<&mut MapData, u32> = Stack::try_from(
        ebpf.map_mut(names::FREE_SLOTS)
            .context("free-slot map missing")?,
    )?;
    for slot in (0..n).rev() {
        free.push(slot, 0)?;
    }
    Ok(())
}

fn configure(ebpf: &mut Ebpf, conns: u32, pick: u32) -> Result<()> {
    let mut cfg: Array<&mut MapData, BenchConfig> = Array::try_from(
        ebpf.map_mut(agent_common::bench::CONFIG)
            .context("config map missing")?,
    )?;
    cfg.set(0, BenchConfig { conns, pick }, 0)?;
    let mut cursor: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut("BENCH_CURSOR").context("cursor map missing")?)?;
    cursor.set(0, 0, 0)?;
    Ok(())
}

/// Runs `name` `repeat` times on `packet`; returns ns per run (thread CPU time).
fn run_program(ebpf: &mut Ebpf, name: &str, packet: &[u8], repeat: u32) -> Result<f64> {
    let prog: &mut CgroupSkb = ebpf
        .program_mut(name)
        .context("program missing")?
        .try_into()?;
    let opts = TestRunOptions {
        data_in: Some(packet),
        repeat,
        ..TestRunOptions::default()
    };
    let before = thread_cpu_ns();
    let result = prog
        .test_run(opts)
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
    let spent = thread_cpu_ns() - before;
    if result.return_value != 1 {
        bail!("{name} returned {} instead of 1", result.return_value);
    }
    Ok(spent as f64 / f64::from(repeat))
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Over the first `max` slots of the connection table: how many are live, and the segments
/// counted out (one per run of the counting driver).
fn table_totals(ebpf: &Ebpf, max: u32) -> Result<(u64, u64)> {
    let table: Array<&MapData, ConnSlot> =
        Array::try_from(ebpf.map(names::CONNS).context("connection table missing")?)?;
    let (mut live, mut segments) = (0, 0);
    for i in 0..max {
        let slot = table.get(&i, 0)?;
        live += u64::from(slot.state == SLOT_LIVE);
        segments += slot.counters.segments_out;
    }
    Ok((live, segments))
}

/// Ethernet + IPv4 + TCP (ACK|PSH) + 44 payload bytes, as a server sends them to a client.
/// BPF_PROG_TEST_RUN wants the Ethernet header; a cgroup_skb program sees from the IP header.
fn test_packet() -> Vec<u8> {
    const PAYLOAD: usize = 44;
    let mut p = Vec::with_capacity(14 + 20 + 20 + PAYLOAD);
    p.extend_from_slice(&[0u8; 12]); // MAC addresses
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 20 + PAYLOAD) as u16;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]); // id, DF, ttl, tcp, checksum
    p.extend_from_slice(&Ipv4Addr::LOCALHOST.octets());
    p.extend_from_slice(&Ipv4Addr::new(127, 1, 0, 0).octets());
    p.extend_from_slice(&10_000u16.to_be_bytes());
    p.extend_from_slice(&20_000u16.to_be_bytes());
    p.extend_from_slice(&1_000_000u32.to_be_bytes()); // seq
    p.extend_from_slice(&1u32.to_be_bytes()); // ack
    p.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]); // doff 5, ACK|PSH, window
    p.extend_from_slice(&[b'x'; PAYLOAD]);
    p
}
