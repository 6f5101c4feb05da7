//! Both ends of the test traffic: [`Server`] runs `outflow-testpeer` in the server namespace
//! and the test cgroup; [`Client`] makes requests from inside the client namespace.
//! The exchange itself is described in [`crate::protocol`].

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::cgroup::TestCgroup;
use crate::lines::JsonLines;
use crate::netns::{self, NetnsPair, SERVER_V4, SERVER_V6};
use crate::process::{CapturedText, ChildProcess};
use crate::protocol::{DONE_BYTE, RequestHeader, ServerResult, write_payload};

/// How long the server may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout of the client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout of client sockets: a stuck exchange fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Most worker threads a [`Client`] runs.
const MAX_WORKERS: usize = 64;
/// Local ports a [`Client`] binds, in turn: below the kernel's ephemeral range (32768-60999),
/// so they never meet a port the kernel picks.
const CLIENT_PORTS: std::ops::RangeInclusive<u16> = 10_000..=32_767;

/// `outflow-testpeer` serving in the server namespace of a [`NetnsPair`], as a member of a
/// [`TestCgroup`]. Killed when dropped.
pub struct Server {
    process: ChildProcess,
    output: Arc<JsonLines<ServerResult>>,
    stderr: CapturedText,
    ports: Vec<u16>,
}

impl Server {
    /// Starts `outflow-testpeer` (pass [`crate::testpeer_bin!()`]) listening on
    /// 198.18.0.1 and \[2001:db8::1\] at each of `ports`, and waits for it to be ready.
    pub fn start(bin: &Path, pair: &NetnsPair, cgroup: &TestCgroup, ports: &[u16]) -> Self {
        assert!(!ports.is_empty(), "Server::start needs at least one port");
        let listen: Vec<SocketAddr> = ports
            .iter()
            .flat_map(|&port| {
                [
                    SocketAddr::new(IpAddr::V4(SERVER_V4), port),
                    SocketAddr::new(IpAddr::V6(SERVER_V6), port),
                ]
            })
            .collect();
        Self::start_listening(bin, pair, cgroup, &listen)
    }

    /// Like [`Server::start`], listening on exactly `listen` (e.g. a loopback address).
    pub fn start_listening(
        bin: &Path,
        pair: &NetnsPair,
        cgroup: &TestCgroup,
        listen: &[SocketAddr],
    ) -> Self {
        Self::start_in(bin, pair.server_ns(), cgroup, listen)
    }

    /// Like [`Server::start_listening`], in the network namespace `netns` (for example the
    /// client namespace, as the remote end of the counted host's outbound connections).
    pub fn start_in(bin: &Path, netns: &str, cgroup: &TestCgroup, listen: &[SocketAddr]) -> Self {
        assert!(
            !listen.is_empty(),
            "Server::start_listening needs at least one address"
        );
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .args(["--netns", netns])
            .arg("--cgroup")
            .arg(cgroup.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for addr in listen {
            command.args(["--listen", &addr.to_string()]);
        }
        let process = ChildProcess::spawn("outflow-testpeer", &mut command);
        let stderr = CapturedText::capture(
            "outflow-testpeer",
            process
                .take_stderr()
                .expect("stderr of outflow-testpeer is piped"),
        );
        let output = JsonLines::spawn(
            "testpeer-stdout",
            process
                .take_stdout()
                .expect("stdout of outflow-testpeer is piped"),
            Some("ready"),
        );

        let server = Self {
            process,
            output,
            stderr,
            ports: {
                let mut ports: Vec<u16> = listen.iter().map(SocketAddr::port).collect();
                ports.dedup();
                ports
            },
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        if let Err(closed) = self.output.wait_ready(READY_TIMEOUT) {
            let why = if closed {
                format!(
                    "it exited ({:?})",
                    self.process.wait_timeout(Duration::from_secs(5))
                )
            } else {
                format!("it did not print `ready` within {READY_TIMEOUT:?}")
            };
            panic!(
                "outflow-testpeer did not start: {why}; stderr:\n{}",
                self.stderr.text()
            );
        }
    }

    /// Pid of the server process.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The ports it listens on (each on IPv4 and IPv6).
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// What it wrote on stderr so far (errors of single connections).
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Results of the connections finished so far, in the order they finished.
    pub fn results(&self) -> Vec<ServerResult> {
        self.output.items()
    }

    /// Waits until at least `n` connections have finished and returns all results.
    /// Panics on timeout, if the server died, or if it printed a line that is not a result.
    pub fn wait_results(&self, n: usize, timeout: Duration) -> Vec<ServerResult> {
        self.output
            .wait_until(timeout, |results| results.len() >= n)
            .unwrap_or_else(|e| {
                panic!(
                    "waiting for {n} outflow-testpeer results: {e}; stderr:\n{}",
                    self.stderr.tail(50)
                )
            })
    }
}

/// What the client saw of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The client's address.
    pub local_addr: IpAddr,
    /// The client's port: the `remote_port` of the server's side of the connection.
    pub local_port: u16,
    /// The server's address and port.
    pub server: SocketAddr,
    /// Payload bytes the client sent: header, body and done byte (`24 + req_len + 1`).
    pub sent: u64,
    /// Payload bytes the client read.
    pub received: u64,
}

impl Outcome {
    /// The server's result for this connection. Panics unless exactly one result matches.
    pub fn server_result<'a>(&self, results: &'a [ServerResult]) -> &'a ServerResult {
        let matching: Vec<&ServerResult> = results
            .iter()
            .filter(|r| {
                r.remote_addr == self.local_addr
                    && r.remote_port == self.local_port
                    && r.local_port == self.server.port()
            })
            .collect();
        match matching[..] {
            [result] => result,
            _ => panic!(
                "{} of {} server results match {self:?}: {matching:?}",
                matching.len(),
                results.len()
            ),
        }
    }
}

/// A connection that has sent its request header and nothing else (see [`Client::open`]).
///
/// If its `req_len` is 0, the server starts responding right away; with `req_len > 0` the
/// connection stays idle until [`OpenConn::finish`].
pub struct OpenConn {
    stream: TcpStream,
    header: RequestHeader,
    outcome: Outcome,
}

impl OpenConn {
    /// The client's port.
    pub fn local_port(&self) -> u16 {
        self.outcome.local_port
    }

    /// Sends the body, reads the response, sends the done byte and reads EOF.
    /// Runs on the calling thread: the socket already belongs to the client namespace.
    pub fn finish(self) -> Outcome {
        let Self {
            mut stream,
            header,
            outcome,
        } = self;
        finish_exchange(&mut stream, header, outcome).unwrap_or_else(|e| {
            panic!(
                "finishing the exchange {header:?} with {}: {e}",
                outcome.server
            )
        })
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Makes requests from inside the client namespace of a [`NetnsPair`].
///
/// Sockets are created by worker threads that entered the namespace once; a worker is
/// started on first use and more when [`Client::request_many`] asks for parallelism.
///
/// Each connection binds the next local port of 10000-32767 in turn, so the connections of
/// one client have distinct 4-tuples (until 22,768 connections wrap the range): the kernel
/// would pick ports at random and may reuse one whose server side is still in TIME_WAIT.
pub struct Client {
    netns: String,
    ports: LocalPorts,
    jobs: Option<mpsc::Sender<Job>>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Client {
    /// A client in the client namespace of `pair`.
    pub fn new(pair: &NetnsPair) -> Self {
        let (jobs, queue) = mpsc::channel();
        Self {
            netns: pair.client_ns().to_owned(),
            ports: LocalPorts::default(),
            jobs: Some(jobs),
            queue: Arc::new(Mutex::new(queue)),
            workers: Mutex::new(Vec::new()),
        }
    }

    /// One whole exchange with the server at `addr`: a request with `req_len` bytes of body,
    /// a response of `resp_len` bytes (in chunks of `chunk` bytes `interval_ms` apart if
    /// `chunk > 0`). Panics if anything fails.
    pub fn request(
        &self,
        addr: SocketAddr,
        resp_len: u64,
        req_len: u64,
        chunk: u32,
        interval_ms: u32,
    ) -> Outcome {
        let header = RequestHeader {
            resp_len,
            req_len,
            chunk,
            interval_ms,
        };
        let ports = self.ports.clone();
        self.run(move || exchange(addr, header, &ports))
            .unwrap_or_else(|e| panic!("request {header:?} to {addr}: {e}"))
    }

    /// Connects to `addr` and sends only the request header; finish with [`OpenConn::finish`].
    pub fn open(&self, addr: SocketAddr, resp_len: u64, req_len: u64) -> OpenConn {
        let header = RequestHeader {
            resp_len,
            req_len,
            chunk: 0,
            interval_ms: 0,
        };
        let ports = self.ports.clone();
        self.run(move || open_conn(addr, header, &ports))
            .unwrap_or_else(|e| panic!("opening a connection to {addr} for {header:?}: {e}"))
    }

    /// `n` whole exchanges with `addr`, `parallelism` at a time. Request `i` uses
    /// `sizes[i % sizes.len()]` as `(resp_len, req_len)`, unchunked. Returns the outcomes
    /// in request order; panics if any exchange fails.
    pub fn request_many(
        &self,
        addr: SocketAddr,
        n: usize,
        sizes: &[(u64, u64)],
        parallelism: usize,
    ) -> Vec<Outcome> {
        assert!(!sizes.is_empty(), "request_many needs at least one size");
        let parallelism = parallelism.clamp(1, n.max(1)).min(MAX_WORKERS);
        self.ensure_workers(parallelism);

        let sizes: Arc<[(u64, u64)]> = sizes.into();
        let next = Arc::new(AtomicUsize::new(0));
        let outcomes = Arc::new(Mutex::new(vec![None; n]));
        let (done_tx, done_rx) = mpsc::channel::<Result<(), String>>();
        for _ in 0..parallelism {
            let (sizes, next, outcomes, done_tx) = (
                sizes.clone(),
                next.clone(),
                outcomes.clone(),
                done_tx.clone(),
            );
            let ports = self.ports.clone();
            self.submit(Box::new(move || {
                let result = loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break Ok(());
                    }
                    let (resp_len, req_len) = sizes[i % sizes.len()];
                    let header = RequestHeader {
                        resp_len,
                        req_len,
                        chunk: 0,
                        interval_ms: 0,
                    };
                    match exchange(addr, header, &ports) {
                        Ok(outcome) => {
                            outcomes.lock().unwrap_or_else(PoisonError::into_inner)[i] =
                                Some(outcome)
                        }
                        Err(e) => break Err(format!("request {i} ({header:?}) to {addr}: {e}")),
                    }
                };
                // The receiver only goes away if the caller panicked already.
                let _ = done_tx.send(result);
            }));
        }
        drop(done_tx);
        for _ in 0..parallelism {
            match done_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("request_many: {e}"),
                Err(_) => panic!("request_many: a client worker panicked"),
            }
        }
        let outcomes =
            std::mem::take(&mut *outcomes.lock().unwrap_or_else(PoisonError::into_inner));
        outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| o.unwrap_or_else(|| panic!("request_many: request {i} has no outcome")))
            .collect()
    }

    /// Runs `f` on a worker thread inside the client namespace and returns its result.
    /// Sockets `f` creates belong to the client namespace and can be used from any thread.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.ensure_workers(1);
        let (reply_tx, reply_rx) = mpsc::channel();
        self.submit(Box::new(move || {
            let _ = reply_tx.send(f());
        }));
        reply_rx
            .recv()
            .expect("a client worker panicked running a job")
    }

    fn submit(&self, job: Job) {
        self.jobs
            .as_ref()
            .expect("the job queue lives as long as the client")
            .send(job)
            .expect("client workers are running");
    }

    /// Starts workers until there are at least `n`; each enters the namespace first.
    fn ensure_workers(&self, n: usize) {
        let mut workers = self.workers.lock().unwrap_or_else(PoisonError::into_inner);
        while workers.len() < n.min(MAX_WORKERS) {
            let (netns, queue) = (self.netns.clone(), Arc::clone(&self.queue));
            let (entered_tx, entered_rx) = mpsc::channel();
            let worker = thread::Builder::new()
                .name(format!("client-{}", workers.len()))
                .spawn(move || {
                    let entered = netns::enter(&netns);
                    let ok = entered.is_ok();
                    let _ = entered_tx.send(entered);
                    if ok {
                        worker_loop(&queue);
                    }
                })
                .expect("spawning a client worker thread");
            match entered_rx.recv() {
                Ok(Ok(())) => workers.push(worker),
                Ok(Err(e)) => panic!(
                    "client worker cannot enter network namespace {}: {e}",
                    self.netns
                ),
                Err(_) => panic!(
                    "client worker for {} died before entering the namespace",
                    self.netns
                ),
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Closing the queue ends every worker once it finishes its job.
        self.jobs = None;
        let workers = std::mem::take(
            self.workers
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for worker in workers {
            let _ = worker.join();
        }
    }
}

fn worker_loop(queue: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(job) = job else { return };
        // A panicking job drops its reply sender, which the caller reports; the worker lives on.
        let _ = catch_unwind(AssertUnwindSafe(job));
    }
}

/// The local ports a [`Client`] hands out, shared by its workers.
#[derive(Clone, Default)]
struct LocalPorts(Arc<AtomicU32>);

impl LocalPorts {
    fn next(&self) -> u16 {
        let (first, last) = (
            u32::from(*CLIENT_PORTS.start()),
            u32::from(*CLIENT_PORTS.end()),
        );
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        u16::try_from(first + n % (last - first + 1)).expect("the port range is within u16")
    }
}

/// Connects from the next free port of `ports`.
fn connect(addr: SocketAddr, ports: &LocalPorts) -> io::Result<TcpStream> {
    let unspecified: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let mut tries = 0;
    let socket = loop {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        let local = SocketAddr::new(unspecified, ports.next());
        match socket.bind(&local.into()) {
            Ok(()) => break socket,
            // Still held by a socket of this client that is closing, or by the test's own.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 100 => tries += 1,
            Err(e) => return Err(io::Error::new(e.kind(), format!("binding {local}: {e}"))),
        }
    };
    socket.connect_timeout(&addr.into(), CONNECT_TIMEOUT)?;
    Ok(socket.into())
}

fn open_conn(addr: SocketAddr, header: RequestHeader, ports: &LocalPorts) -> io::Result<OpenConn> {
    let mut stream = connect(addr, ports)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // Every write goes out at once: no Nagle delay between header, body and done byte.
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    stream.write_all(&header.encode())?;
    let outcome = Outcome {
        local_addr: local.ip(),
        local_port: local.port(),
        server: addr,
        sent: header.client_bytes(),
        received: 0,
    };
    Ok(OpenConn {
        stream,
        header,
        outcome,
    })
}

fn exchange(addr: SocketAddr, header: RequestHeader, ports: &LocalPorts) -> io::Result<Outcome> {
    let OpenConn {
        mut stream,
        header,
        outcome,
    } = open_conn(addr, header, ports)?;
    finish_exchange(&mut stream, header, outcome)
}

fn finish_exchange(
    stream: &mut TcpStream,
    header: RequestHeader,
    mut outcome: Outcome,
) -> io::Result<Outcome> {
    write_payload(
        stream,
        u64::from(outcome.local_port),
        header.req_len,
        0,
        Duration::ZERO,
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    while received < header.resp_len {
        let want = usize::try_from(header.resp_len - received)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        match stream.read(&mut buf[..want])? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "response ended after {received} of {} bytes",
                        header.resp_len
                    ),
                ));
            }
            n => received += n as u64,
        }
    }
    stream.write_all(&[DONE_BYTE])?;
    // The server closes after the done byte; anything more it sends is counted too.
    loop {
        match stream.read(&mut buf)? {
            0 => break,
            n => received += n as u64,
        }
    }
    outcome.received = received;
    Ok(outcome)
}

/// Requests from a client in the client namespace, in a loop on a thread of their own, until
/// [`Traffic::finish`]; what the client received is the ground truth.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Outcome>>,
}

impl Traffic {
    /// Rounds of `per_round` requests to each of `addrs` in turn, `parallelism` at a time, of
    /// `sizes` as in [`Client::request_many`].
    pub fn start(
        pair: &NetnsPair,
        addrs: &[SocketAddr],
        sizes: &'static [(u64, u64)],
        per_round: usize,
        parallelism: usize,
    ) -> Self {
        Self::start_paced(pair, addrs, sizes, per_round, parallelism, Duration::ZERO)
    }

    /// Like [`Traffic::start`], with `pause` between rounds (traffic that leaves the machine's
    /// cores to others).
    pub fn start_paced(
        pair: &NetnsPair,
        addrs: &[SocketAddr],
        sizes: &'static [(u64, u64)],
        per_round: usize,
        parallelism: usize,
        pause: Duration,
    ) -> Self {
        let client = Client::new(pair);
        let addrs = addrs.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut outcomes = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for addr in &addrs {
                    outcomes.extend(client.request_many(*addr, per_round, sizes, parallelism));
                }
                thread::sleep(pause);
            }
            outcomes
        });
        Self { stop, thread }
    }

    /// Stops after the round under way; the outcomes of every request.
    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the traffic thread")
    }
}
