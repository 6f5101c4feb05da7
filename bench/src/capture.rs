//! Per-request cost of capturing a turn, with BPF_PROG_TEST_RUN.
//!
//! On an accepted connection with capture on, the first new incoming payload after the server
//! has sent starts a *turn* (on HTTP/1.x keep-alive: a request): the ingress path reserves a
//! `TurnEvent` (4,160 bytes) in the `EVENTS` ring buffer, copies up to `capture_bytes` of the
//! payload into it with `bpf_skb_load_bytes` and submits it. Every other packet only tests a
//! flag. The drivers of the benchmark object (`agent-ebpf/src/bench.rs`) run the product's
//! ingress path (`programs::count::<false>`, as `count_ingress` runs it) on a live connection
//! picked at random, after setting its socket state as a new payload would find it:
//!
//! - `bench_rx_prep`: pick + socket lookup + setting the state (what both others also do);
//! - `bench_rx`: + the ingress path on a packet that starts no turn (the fast path);
//! - `bench_rx_turn`: + the ingress path on a packet that starts a turn and is captured.
//!
//! A thread of this process drains the ring buffer (aya `RingBuf`, woken by poll) as the agent
//! does, counting and checking the events; the runs go in batches smaller than half the ring,
//! and each batch waits for the reader to catch up, so the ring never fills.
//!
//! The kernel programs wake the reader only once an eighth of the ring waits (a wake-up is an
//! irq_work that costs microseconds here, more than the capture itself); the agent also drains
//! at each interval, and this reader after each batch. The request-start driver runs twice:
//! once with the reader asleep in poll, once with it parked until the batch is done.
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use agent_common::{
    CAPTURE_MAX, ConnHot, EVENT_TURN, bench::PICK_RANDOM, bench::PICK_SEQUENTIAL, names, stat,
};
use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, RingBuf},
};

use crate::{
    holder::{HoldOptions, Holders},
    object,
    packet::{add_tuples, configure, enter_private_netns, run_program, tcp_packet},
    report::{Section, median, thousands},
};

#[derive(clap::Args)]
pub struct Args {
    /// Live connections the runs pick from at random.
    #[arg(long, default_value_t = 1000)]
    conns: u32,
    /// Payload bytes of the packet that starts a turn (an HTTP request of that size),
    /// comma-separated. A test run takes at most one page minus the skb's overhead, so the
    /// largest that fits is about 3.6 KiB.
    #[arg(long, value_delimiter = ',', default_value = "200,1024,3584")]
    request_bytes: Vec<usize>,
    /// Bytes captured at the start of each turn (the agent's `attribution.capture_bytes`).
    #[arg(long, default_value_t = 4096)]
    capture_bytes: u32,
    /// Rounds per request size; each round runs every driver once, side by side. The figures
    /// are the medians of the rounds.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Runs per driver per round.
    #[arg(long, default_value_t = 200_000)]
    runs: u32,
}

/// The steps of a round, in order: a driver, and whether the reader sleeps in poll (awake to
/// every event) or is parked until the batch is done.
const STEPS: [(&str, ReaderMode); 5] = [
    ("bench_empty", ReaderMode::Polling),
    ("bench_rx_prep", ReaderMode::Polling),
    ("bench_rx", ReaderMode::Polling),
    ("bench_rx_turn", ReaderMode::Polling),
    ("bench_rx_turn", ReaderMode::Parked),
];
const EMPTY: usize = 0;
const PREP: usize = 1;
const RX: usize = 2;
/// Request start, the reader woken by each event.
const TURN: usize = 3;
/// Request start, the reader parked.
const TURN_BUSY: usize = 4;
/// The programs the benchmark loads: the drivers and the first pass's.
const PROGRAMS: [&str; 5] = [
    "bench_empty",
    "bench_rx_prep",
    "bench_rx",
    "bench_rx_turn",
    "bench_count",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ReaderMode {
    /// Waits in poll and drains as events come.
    Polling,
    /// Reads nothing until told (the batch runs without it).
    Parked,
}

/// Runs per test-run call: well under half of what the ring holds (8 MiB of 4,168-byte
/// records: about 2,000), so a batch never finds it full.
const BATCH: u32 = 500;
/// How long the reader may take to catch up with a batch.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The test packets' ends: a client sending to the server (the drivers look the connection up
/// by the picked tuple, not by these).
const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(127, 1, 0, 0), 20_000);
const SERVER: (Ipv4Addr, u16) = (Ipv4Addr::new(127, 0, 0, 1), 10_000);

pub fn run(args: &Args) -> Result<Section> {
    ensure!(
        args.runs > 0 && args.rounds > 0 && args.conns > 0,
        "--runs, --rounds and --conns must be positive"
    );
    ensure!(
        (1..=CAPTURE_MAX as u32).contains(&args.capture_bytes),
        "--capture-bytes must be 1 to {CAPTURE_MAX}"
    );
    ensure!(
        args.request_bytes.iter().all(|&b| b > 0),
        "--request-bytes must be positive"
    );
    enter_private_netns()?;
    let n = args.conns;
    let mut ebpf = object::load(n)?;
    object::load_programs(&mut ebpf, &PROGRAMS)?;
    object::configure_kernel(&mut ebpf, n, args.capture_bytes)?;
    let reader = Reader::start(&mut ebpf)?;

    let mut held = Holders::default();
    eprintln!("capture: opening {n} connections");
    let conns = held.grow_to(n, &HoldOptions::default())?;
    add_tuples(&mut ebpf, 0, &conns)?;
    // First pass: every connection once (an outgoing packet), so that each has its socket
    // storage and its slot, as a connection that predates the agent.
    configure(&mut ebpf, n, PICK_SEQUENTIAL)?;
    let first = tcp_packet(SERVER, CLIENT, &[b'x'; 44]);
    run_program(&mut ebpf, "bench_count", &first, n)?;
    configure(&mut ebpf, n, PICK_RANDOM)?;

    let runs = args.runs.div_ceil(BATCH) * BATCH;
    let mut results = Vec::new();
    let mut expected = Expected::default();
    for &size in &args.request_bytes {
        let payload = http_request(size);
        let packet = tcp_packet(CLIENT, SERVER, &payload);
        let captured = size.min(args.capture_bytes as usize);
        reader.expect(payload[..captured].to_vec());
        let mut per_run: [Vec<f64>; STEPS.len()] = Default::default();
        let mut reader_ns: [Vec<f64>; 2] = Default::default();
        for round in 0..args.rounds {
            for (i, &(name, mode)) in STEPS.iter().enumerate() {
                let (events_before, cpu_before) = reader.progress();
                let mut spent = 0.0;
                for _ in 0..runs / BATCH {
                    if mode == ReaderMode::Parked {
                        reader.park()?;
                    }
                    spent += run_program(&mut ebpf, name, &packet, BATCH)
                        .with_context(|| format!("{name} on a {size}-byte request"))?
                        * f64::from(BATCH);
                    reader.unpark();
                    if i == TURN || i == TURN_BUSY {
                        expected.turns += u64::from(BATCH);
                        reader.wait_for(expected.turns)?;
                    }
                }
                per_run[i].push(spent / f64::from(runs));
                if i >= RX {
                    expected.segments += u64::from(runs);
                    expected.bytes += u64::from(runs) * size as u64;
                }
                if i == TURN || i == TURN_BUSY {
                    let (events, cpu) = reader.progress();
                    reader_ns[i - TURN]
                        .push((cpu - cpu_before) as f64 / (events - events_before) as f64);
                }
            }
            eprintln!(
                "capture: {size}-byte requests, round {}: {}",
                round + 1,
                STEPS
                    .iter()
                    .zip(&per_run)
                    .map(|((p, mode), v)| format!("{p} ({mode:?} reader) {:.1} ns", v[round]))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        reader.check()?;
        results.push(Measured {
            size,
            captured,
            ns: per_run.map(|v| median(&v)),
            reader_ns: reader_ns.map(|v| median(&v)),
        });
    }
    let seen = reader.stop()?;
    check_kernel(&ebpf, n, &expected, seen)?;
    Ok(section(args, &results, seen))
}

/// What the runs should have left behind.
#[derive(Default)]
struct Expected {
    /// Turns started (one event each).
    turns: u64,
    /// Packets through the ingress path, and their payload bytes.
    segments: u64,
    bytes: u64,
}

struct Measured {
    size: usize,
    captured: usize,
    /// Median ns per run of each of [`STEPS`].
    ns: [f64; STEPS.len()],
    /// The reader's CPU time per event, polling and parked.
    reader_ns: [f64; 2],
}

impl Measured {
    /// The ingress path on a packet that starts no turn, on top of the empty program.
    fn fast(&self) -> f64 {
        self.ns[EMPTY] + self.ns[RX] - self.ns[PREP]
    }
    /// The ingress path on a packet that starts a turn, on top of the empty program
    /// (`TURN` or `TURN_BUSY`).
    fn turn(&self, which: usize) -> f64 {
        self.ns[EMPTY] + self.ns[which] - self.ns[PREP]
    }
    fn capture(&self, which: usize) -> f64 {
        self.ns[which] - self.ns[RX]
    }
}

fn section(args: &Args, results: &[Measured], events: u64) -> Section {
    let mut s = Section::new(
        "capture",
        "Per-request cost of capturing, with BPF_PROG_TEST_RUN",
    );
    s.method = format!(
        "On an accepted connection with capture on, the first new payload the client sends \
         after the server has sent starts a turn (on HTTP/1.1 keep-alive, a request): \
         outflow's ingress path reserves a 4,160-byte event in the ring buffer, copies up to \
         `capture_bytes` ({capture}) bytes of the payload into it with `bpf_skb_load_bytes` and \
         submits it; every other packet only tests a flag. BPF_PROG_TEST_RUN drives the \
         product's ingress path (`programs::count::<false>`, the code `count_ingress` runs) on \
         an IPv4 TCP packet carrying an HTTP/1.1 request of the given size, on one of {conns} \
         live loopback connections picked at random and found with `bpf_sk_lookup_tcp` (as in \
         the per-packet section), after setting the connection's socket state as a new payload \
         finds it: capture on and the receive watermark unset, with the server's response just \
         sent (*request start*: the packet starts a turn) or the request's capture done (*fast \
         path*: a later segment). The pick, lookup and that setting are measured alone \
         (`bench_rx_prep`) and subtracted, and the empty program's figure added back, as in \
         the per-packet section. A thread of the benchmark drains the ring buffer (aya \
         `RingBuf`, woken by poll, as the agent reads it), counting the events and checking \
         their kind, length and bytes; the runs go in batches of {batch}, each waiting for the \
         reader to catch up, so the ring (the product's 8 MiB) never fills: the run checks \
         that every request start produced its event ({events} in all), that the kernel lost \
         none, and that the counters saw every packet and byte. Each figure is the median of \
         {rounds} rounds of {runs} runs per driver, the drivers taking turns within a round; \
         ns per run is the thread's CPU time over the syscalls divided by the runs.",
        capture = args.capture_bytes,
        conns = thousands(f64::from(args.conns)),
        batch = BATCH,
        events = thousands(events as f64),
        rounds = args.rounds,
        runs = thousands(f64::from(args.runs.div_ceil(BATCH) * BATCH)),
    );
    s.commands = vec![format!(
        "sudo target/release/outflow-bench capture --conns {} --request-bytes {} \
         --capture-bytes {} --rounds {} --runs {}",
        args.conns,
        args.request_bytes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.capture_bytes,
        args.rounds,
        args.runs
    )];
    s.header = [
        "request",
        "captured",
        "empty",
        "fast path",
        "request start, reader asleep",
        "request start, reader busy",
        "capture adds, asleep / busy",
        "captures/s per core, asleep / busy",
        "reader per event, asleep / busy",
    ]
    .map(String::from)
    .to_vec();
    for m in results {
        s.row([
            format!("{} B", thousands(m.size as f64)),
            format!("{} B", thousands(m.captured as f64)),
            format!("{:.1} ns", m.ns[EMPTY]),
            format!("{:.1} ns", m.fast()),
            format!("{:.1} ns", m.turn(TURN)),
            format!("{:.1} ns", m.turn(TURN_BUSY)),
            format!("{:.0} / {:.0} ns", m.capture(TURN), m.capture(TURN_BUSY)),
            format!(
                "{} / {}",
                thousands(1e9 / m.capture(TURN)),
                thousands(1e9 / m.capture(TURN_BUSY))
            ),
            format!("{:.0} / {:.0} ns", m.reader_ns[0], m.reader_ns[1]),
        ]);
    }
    s.notes = vec![
        "*fast path* and *request start*: the ingress program's whole cost for that packet \
         (empty program + outflow's ingress path), comparable with *outflow per packet* of \
         the per-packet section. *capture adds* = request start − fast path: what starting \
         a turn costs (the event's reservation, header, copy and submit, and, with the reader \
         asleep, the wake-up). *captures/s per core* = 1 s ÷ capture adds: the request rate \
         at which capturing alone would take a whole core (at R requests/s it takes R × \
         capture adds of CPU)."
            .to_owned(),
        "*reader asleep*: the reader waits in poll and has read every event before this one, \
         so each submit queues an irq_work that wakes it (a self-interrupt, and a wake-up of \
         a thread on the other core: both exits to the hypervisor on a virtual machine); \
         that is the agent's case while requests are rarer than its reads. *reader busy*: \
         the reader is parked until the batch is done, so only the batch's first event wakes \
         anything: the case of an agent that is behind, which the rate of a busy server \
         pushes it to. A real agent sits between the two."
            .to_owned(),
        "*reader per event*: the CPU time of the benchmark's reading thread per event (poll, \
         aya `RingBuf::next`, reading the header and comparing the bytes), a floor for the \
         agent, which also parses each request head (see the request-rate section for the \
         agent's own CPU per request). The connection's socket state was looked up by the \
         preparing step just before, so the ingress path finds it in cache; the figures are \
         for a warm connection."
            .to_owned(),
    ];
    if results.iter().any(|m| m.size > m.captured) {
        s.notes.push(format!(
            "Requests larger than `capture_bytes` ({}) are captured up to it.",
            args.capture_bytes
        ));
    }
    s
}

/// The counters and the kernel's own statistics agree with the runs: no event lost, every
/// packet and byte of the ingress runs counted, every connection's slot live.
fn check_kernel(ebpf: &Ebpf, n: u32, expected: &Expected, seen: u64) -> Result<()> {
    ensure!(
        seen == expected.turns,
        "the reader saw {seen} turn events, expected {}",
        expected.turns
    );
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(names::STATS).context("stats map missing")?)?;
    let lost: u64 = stats.get(&stat::TURN_EVENTS_LOST, 0)?.iter().sum();
    ensure!(
        lost == 0,
        "the kernel lost {lost} turn events (ring buffer full)"
    );
    let hot: Array<&MapData, ConnHot> = Array::try_from(
        ebpf.map(names::CONN_HOT)
            .context("hot lines' table missing")?,
    )?;
    let (mut segments, mut bytes) = (0, 0);
    for i in 0..object::table_slots(n) {
        let line = hot.get(&i, 0)?;
        segments += line.counters.segments_in;
        bytes += line.counters.bytes_in;
    }
    ensure!(
        segments == expected.segments && bytes == expected.bytes,
        "the counters saw {segments} packets and {bytes} bytes in, expected {} and {}",
        expected.segments,
        expected.bytes
    );
    Ok(())
}

/// An HTTP/1.1 request of exactly `size` bytes (a chat completion with a JSON body), or the
/// first `size` bytes of its head when the head alone is longer.
pub(crate) fn http_request(size: usize) -> Vec<u8> {
    let head_for = |body: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: inference.internal\r\n\
             Content-Type: application/json\r\nX-Forwarded-For: 203.0.113.7\r\n\
             Content-Length: {body}\r\n\r\n"
        )
    };
    // The head's length depends on the body's through Content-Length: settle it.
    let mut body = 0;
    for _ in 0..3 {
        body = size.saturating_sub(head_for(body).len());
    }
    let mut req = head_for(body).into_bytes();
    let start = br#"{"model":"m","messages":[{"role":"user","content":""#;
    let end = br#""}]}"#;
    if body >= start.len() + end.len() {
        req.extend_from_slice(start);
        req.resize(req.len() + body - start.len() - end.len(), b'a');
        req.extend_from_slice(end);
    } else {
        req.resize(req.len() + body, b' ');
    }
    req.truncate(size);
    req
}

/// The thread that drains the ring buffer.
struct Reader {
    shared: Arc<Shared>,
    thread: JoinHandle<Result<()>>,
}

struct Shared {
    /// Written to interrupt the reader's poll.
    wake: OwnedFd,
    control: Mutex<Control>,
    changed: Condvar,
    /// Turn events read.
    events: AtomicU64,
    /// The reader thread's CPU time so far, in ns (updated after each drain).
    cpu_ns: AtomicU64,
    /// What each event must carry, and what went wrong so far.
    expect: Mutex<Expectation>,
}

#[derive(Default)]
struct Control {
    /// The reader is to park (read nothing, wait on `changed`).
    park: bool,
    /// The reader is parked (not in poll).
    parked: bool,
    stop: bool,
}

#[derive(Default)]
struct Expectation {
    data: Vec<u8>,
    wrong: Vec<String>,
}

impl Reader {
    fn start(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf
            .take_map(names::EVENTS)
            .context("the benchmark object has no ring buffer")?;
        let ring = RingBuf::try_from(map).context("opening the ring buffer")?;
        // SAFETY: eventfd has no memory-safety preconditions.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error()).context("eventfd");
        }
        let shared = Arc::new(Shared {
            // SAFETY: a new descriptor that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(wake) },
            control: Mutex::default(),
            changed: Condvar::new(),
            events: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            expect: Mutex::default(),
        });
        let mine = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("ring-reader".into())
            .spawn(move || read(ring, &mine))
            .context("starting the ring buffer reader")?;
        Ok(Self { shared, thread })
    }

    /// The bytes every event from now on must carry.
    fn expect(&self, data: Vec<u8>) {
        self.shared.expect.lock().expect("reader lock").data = data;
    }

    /// (events read, reader CPU ns) so far.
    fn progress(&self) -> (u64, u64) {
        (
            self.shared.events.load(Ordering::Acquire),
            self.shared.cpu_ns.load(Ordering::Acquire),
        )
    }

    /// Parks the reader: returns once it has left poll and waits to be unparked.
    fn park(&self) -> Result<()> {
        let mut c = self.shared.control.lock().expect("reader lock");
        c.park = true;
        self.shared.interrupt();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !c.parked {
            ensure!(!self.thread.is_finished(), "the ring buffer reader stopped");
            ensure!(
                Instant::now() < deadline,
                "the ring buffer reader did not park"
            );
            c = self
                .shared
                .changed
                .wait_timeout(c, Duration::from_millis(10))
                .expect("reader lock")
                .0;
        }
        Ok(())
    }

    /// Lets the reader poll again.
    fn unpark(&self) {
        let mut c = self.shared.control.lock().expect("reader lock");
        if c.park {
            c.park = false;
            self.shared.changed.notify_all();
        }
    }

    /// Waits until the reader has read `events` events.
    fn wait_for(&self, events: u64) -> Result<()> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        // The kernel wakes the reader only once an eighth of the ring waits (as the agent, which
        // also drains at each interval): tell it to drain now.
        self.shared.interrupt();
        while self.shared.events.load(Ordering::Acquire) < events {
            ensure!(!self.thread.is_finished(), "the ring buffer reader stopped");
            ensure!(
                Instant::now() < deadline,
                "the ring buffer reader read {} of {events} events in {DRAIN_TIMEOUT:?}",
                self.shared.events.load(Ordering::Acquire)
            );
            thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    /// Every event so far carried what it should.
    fn check(&self) -> Result<()> {
        self.shared.check()
    }

    /// Stops the reader; returns the events it read.
    fn stop(self) -> Result<u64> {
        let Self { shared, thread } = self;
        {
            let mut c = shared.control.lock().expect("reader lock");
            c.stop = true;
            c.park = false;
            shared.changed.notify_all();
        }
        shared.interrupt();
        match thread.join() {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("the ring buffer reader panicked"),
        }
        shared.check()?;
        Ok(shared.events.load(Ordering::Acquire))
    }
}

impl Shared {
    fn check(&self) -> Result<()> {
        let e = self.expect.lock().expect("reader lock");
        ensure!(
            e.wrong.is_empty(),
            "unexpected turn events: {}",
            e.wrong.join("; ")
        );
        Ok(())
    }

    /// Makes the reader's poll return.
    fn interrupt(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Waits while parked; false once told to stop.
    fn wait_unparked(&self) -> bool {
        let mut c = self.control.lock().expect("reader lock");
        while c.park && !c.stop {
            if !c.parked {
                c.parked = true;
                self.changed.notify_all();
            }
            c = self.changed.wait(c).expect("reader lock");
        }
        c.parked = false;
        !c.stop
    }
}

/// The reader thread: waits for the ring buffer to be readable, drains it, checks each event.
fn read(mut ring: RingBuf<MapData>, shared: &Shared) -> Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while shared.wait_unparked() {
        // SAFETY: two valid pollfds; both descriptors stay open while this runs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("polling the ring buffer");
        }
        if fds[1].revents != 0 {
            let mut buf = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live buffer from our eventfd.
            unsafe { libc::read(shared.wake.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        }
        let mut read = 0u64;
        while let Some(item) = ring.next() {
            if let Some(bad) = check_event(&item, shared) {
                let mut e = shared.expect.lock().expect("reader lock");
                if e.wrong.len() < 5 {
                    e.wrong.push(bad);
                }
            }
            read += 1;
        }
        shared
            .cpu_ns
            .store(crate::packet::thread_cpu_ns(), Ordering::Release);
        if read > 0 {
            shared.events.fetch_add(read, Ordering::AcqRel);
        }
    }
    Ok(())
}

/// What is wrong with an event (`agent_common::TurnEvent`: slot, generation, turn, kind, len,
/// the counters, then the data), if anything.
fn check_event(item: &[u8], shared: &Shared) -> Option<String> {
    if item.len() < 64 {
        return Some(format!("an event of {} bytes", item.len()));
    }
    let kind = u16::from_ne_bytes([item[12], item[13]]);
    let len = usize::from(u16::from_ne_bytes([item[14], item[15]]));
    if kind != EVENT_TURN {
        return Some(format!("an event of kind {kind}"));
    }
    let e = shared.expect.lock().expect("reader lock");
    if len != e.data.len() || item.get(64..64 + len) != Some(&e.data[..]) {
        return Some(format!(
            "a turn of {len} bytes that differ from the {} bytes sent",
            e.data.len()
        ));
    }
    None
}
