//! outflow's task runner, `cargo xtask <command>` (aliased in `.cargo/config.toml`).
//!
//! It does only what cargo can't: install the toolchain pieces and system tools a fresh
//! Debian machine lacks (`setup`), run the kernel tests as root (`test`) and show the main job
//! live (`demo`). Each command
//! lives in its own module; a new one is a module, a variant of [`Command`] and a match arm.

mod bench;
mod cluster_demo;
mod cmd;
mod demo;
mod faults;
mod fuzz;
mod image;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "outflow's development tasks",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure what outflow costs and write BENCHMARKS.md (about 15 minutes; needs root).
    ///
    /// Per-packet cost (BPF_PROG_TEST_RUN and real traffic), throughput with the agent
    /// attached versus detached, the agent's CPU and memory with 10k and 100k connections,
    /// collector ingest, and the demo's time to alert. Run nothing else meanwhile.
    Bench(bench::Args),
    /// Install what building and testing outflow needs and is missing.
    ///
    /// The nightly toolchain with rust-src, bpf-linker built against that nightly's LLVM, and
    /// the Debian packages the tests and benchmarks use (iproute2, util-linux, procps, iperf3,
    /// ethtool, linux-perf, nginx, haproxy, nftables, libfaketime), and for the VM kernel
    /// matrix QEMU, virtme-ng (PyPI) and Debian's 5.10, 6.1 and 6.12 kernels (unpacked in
    /// ~/.cache/outflow/vm, never installed). Takes about a second when all is present.
    Setup,
    /// Run `setup`, build the binaries, then `cargo test`, then `vm-test`; needs root.
    ///
    /// Arguments after `--` go to `cargo test`, e.g.
    /// `cargo xtask test -- -p outflow-tests counts -- --nocapture`.
    Test(test::Args),
    /// The main job, live on this machine (about a minute; needs root).
    ///
    /// Starts a collector, an agent, a streaming inference server and clients in network
    /// namespaces; one client starts extracting in bulk. Prints the collector's top talkers
    /// (and alerts) as it goes, then cleans up.
    Demo,
    /// The collector's cluster mode, live on this machine (about two minutes; needs root).
    ///
    /// Starts a three-node NATS JetStream cluster, two ingest nodes and three aggregators,
    /// streams a day of 200 simulated agents through them, and beside them a real agent counting
    /// real connections between network namespaces, while an aggregator, an ingest node (the
    /// real agent's: it spools meanwhile) and a NATS node are SIGKILLed and brought back and
    /// another NATS node is cut off from the network for ten seconds; then compares every
    /// host's and every client's totals (read through an ingest node) with what was sent (the
    /// real agent's: what its clients received and sent), to the byte, and lists the alerts.
    /// Ends with `cluster: <N> deltas, totals exact, <K> alerts`, or what differs.
    ///
    /// With --week: a week of 5-minute batches with the two attacks that need them (a proxy
    /// pool, judged by the cluster's second stage, and a low-and-slow pull); totals compared
    /// over the last day (a few minutes).
    ClusterDemo {
        /// A week of 5-minute batches with the pool and low-and-slow attacks.
        #[arg(long)]
        week: bool,
    },
    /// The fault suite at full size, and its table (about 20 minutes; needs root).
    ///
    /// The real agent and collector through packet loss, delay, stalls, resets, a one-minute
    /// partition, full disks on both sides, 50 SIGKILLs of each, clock steps of hours, a
    /// connection storm and 500 agents reconnecting at once; each run ends with the collector's
    /// totals compared with what the clients received, to the byte. Prints the table.
    Faults(faults::Args),
    /// Fuzz the parsers of untrusted input (PROXY, HTTP heads, forwarding headers, the
    /// resolver, the collector's ingest path) and both config files (collector, agent).
    ///
    /// Installs cargo-fuzz if missing; runs each target for --seconds with a fixed seed.
    Fuzz(fuzz::Args),
    /// The kernel test suites (counting, operating, export) on Debian's 5.10, 6.1 and 6.12
    /// kernels, each booted in a VM (about 20 minutes; needs root).
    ///
    /// virtme-ng boots each kernel on this machine's root file system under QEMU's software
    /// emulation; the already-built test binaries run inside, as root. One line per kernel;
    /// logs in target/vm-test/<series>/. `cargo xtask test` runs it after the host's tests.
    VmTest(vm::Args),
    /// An OCI image of the agent and the collector, built offline with buildah from scratch.
    ///
    /// Release binaries, exactly the shared libraries ldd lists, CA certificates and users;
    /// tagged localhost/outflow:<version>, also written to target/outflow-<version>.oci.tar.
    Image(image::Args),
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Setup => {
            setup::run()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Test(args) => test::run(&args),
        Command::Demo => demo::run(),
        Command::ClusterDemo { week } => cluster_demo::run(week),
        Command::Bench(args) => bench::run(&args),
        Command::Faults(args) => faults::run(&args),
        Command::VmTest(args) => vm::run(&args),
        Command::Image(args) => {
            image::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Fuzz(args) => {
            fuzz::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
