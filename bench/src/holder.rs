//! Many live TCP connections on loopback, held open by child processes.
//!
//! A process may hold only so many descriptors (RLIMIT_NOFILE; raising the hard limit needs
//! CAP_SYS_RESOURCE, which a container may not grant), so the connections are spread over
//! children (`outflow-bench hold`, hidden) of [`PER_CHILD`] connections each, both ends of each
//! kept open. The children inherit the caller's network namespace. Child `k` listens on
//! 127.0.0.1:`FIRST_SERVER_PORT + k`; connection `i` comes from [`client`]`(i)`, so the caller
//! knows every connection's tuple without asking.
use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use socket2::{Domain, Socket, Type};

/// Connections per child: both ends are descriptors, under a hard limit of 20,000.
pub const PER_CHILD: u32 = 9_000;
const FIRST_SERVER_PORT: u16 = 10_000;
/// Client source ports per source address (20000-59999).
const PORTS_PER_ADDR: u32 = 40_000;
const FIRST_CLIENT_PORT: u32 = 20_000;
/// Connections made between two drains of the accept queue, below the listen backlog.
const ACCEPT_EVERY: u32 = 512;
const BACKLOG: i32 = 4096;

/// One live connection, as a packet arriving at the server would name it.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
}

/// The client end of connection `i`: 127.1.0.0 onwards, 40,000 ports each.
pub fn client(i: u32) -> SocketAddrV4 {
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 0)) + i / PORTS_PER_ADDR);
    SocketAddrV4::new(addr, (FIRST_CLIENT_PORT + i % PORTS_PER_ADDR) as u16)
}

/// The server end of the connections of child `k`.
fn server(k: usize) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, FIRST_SERVER_PORT + k as u16)
}

#[derive(clap::Args)]
pub struct HoldArgs {
    /// Number of this child (its listening port is 10000 + this).
    #[arg(long)]
    child: usize,
    /// First connection number.
    #[arg(long)]
    first: u32,
    /// Connections to open.
    #[arg(long)]
    count: u32,
    /// Create the listening socket in this cgroup (the accepted sockets inherit it); the
    /// client sockets are created back in the cgroup the child started in.
    #[arg(long)]
    server_cgroup: Option<PathBuf>,
    /// Every second, send this many bytes on each of the first `--active` server sockets.
    #[arg(long, default_value_t = 0)]
    send_bytes: usize,
    /// How many server sockets send each second.
    #[arg(long, default_value_t = 0)]
    active: u32,
}

/// `outflow-bench hold`: opens the connections, prints `ready`, then holds them (sending, if
/// asked) until killed.
pub fn run_hold(args: &HoldArgs) -> Result<()> {
    ensure!(args.count <= PER_CHILD, "--count is above {PER_CHILD}");
    // Die with the benchmark, even if it is killed: nobody else would close the connections.
    // SAFETY: prctl with an integer argument.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error()).context("prctl(PR_SET_PDEATHSIG)");
    }
    let own_cgroup = std::fs::read_to_string("/proc/self/cgroup").context("reading own cgroup")?;
    if let Some(cg) = &args.server_cgroup {
        outflow_tests::cgroup::move_pid(cg, std::process::id())?;
    }
    let server = server(args.child);
    let listener = listen(server).with_context(|| format!("listening on {server}"))?;
    if args.server_cgroup.is_some() {
        // Back to where the child started: its client sockets must not be counted.
        let rel = own_cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup2 entry in /proc/self/cgroup")?;
        let dir = outflow_tests::cgroup::cgroup2_mount().join(rel.trim_start_matches('/'));
        outflow_tests::cgroup::move_pid(&dir, std::process::id())?;
    }
    let mut clients = Vec::with_capacity(args.count as usize);
    let mut servers = Vec::with_capacity(args.count as usize);
    for n in 0..args.count {
        let c = client(args.first + n);
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        sock.bind(&c.into())
            .with_context(|| format!("binding a client socket to {c}"))?;
        sock.connect(&server.into())
            .with_context(|| format!("connecting {c} to {server}"))?;
        clients.push(TcpStream::from(sock));
        if (n + 1) % ACCEPT_EVERY == 0 || n + 1 == args.count {
            accept_all(&listener, &mut servers)?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while servers.len() < clients.len() {
        ensure!(
            Instant::now() < deadline,
            "accepted {} of {} connections",
            servers.len(),
            clients.len()
        );
        thread::sleep(Duration::from_millis(5));
        accept_all(&listener, &mut servers)?;
    }
    println!("ready");
    io::stdout().flush()?;
    let payload = vec![b'x'; args.send_bytes];
    loop {
        thread::sleep(Duration::from_secs(1));
        if payload.is_empty() {
            continue;
        }
        for s in servers.iter_mut().take(args.active as usize) {
            s.write_all(&payload)
                .context("sending on a held connection")?;
        }
    }
}

fn listen(addr: SocketAddrV4) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    // The previous holders' connections on this port may still be in TIME_WAIT.
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

fn accept_all(listener: &TcpListener, into: &mut Vec<TcpStream>) -> Result<()> {
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                into.push(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e).context("accepting a connection"),
        }
    }
}

/// Options of the children, beyond how many connections they open.
#[derive(Clone, Debug, Default)]
pub struct HoldOptions {
    pub server_cgroup: Option<PathBuf>,
    pub send_bytes: usize,
    /// Fraction of the connections that send every second.
    pub active_fraction: f64,
}

/// The children holding connections `0..len()`. Dropping it kills them (and so closes the
/// connections).
#[derive(Default)]
pub struct Holders {
    children: Vec<(Child, ChildStdout)>,
    len: u32,
}

impl Holders {
    /// Starts children until `n` connections are held, and returns the new connections.
    /// Children start one after the other, each after the previous one said it was ready.
    pub fn grow_to(&mut self, n: u32, opts: &HoldOptions) -> Result<Vec<Conn>> {
        // This very binary, even if a rebuild has replaced the file since it started.
        let exe = "/proc/self/exe";
        let mut added = Vec::new();
        while self.len < n {
            let count = (n - self.len).min(PER_CHILD);
            let active = (f64::from(count) * opts.active_fraction).round() as u32;
            let k = self.children.len();
            let mut cmd = Command::new(exe);
            std::os::unix::process::CommandExt::arg0(&mut cmd, "outflow-bench");
            cmd.args(["hold", "--child", &k.to_string()])
                .args(["--first", &self.len.to_string()])
                .args(["--count", &count.to_string()])
                .args(["--send-bytes", &opts.send_bytes.to_string()])
                .args(["--active", &active.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            if let Some(cg) = &opts.server_cgroup {
                cmd.arg("--server-cgroup").arg(cg);
            }
            let mut child = cmd.spawn().context("starting a connection holder")?;
            let stdout = child.stdout.take().context("holder stdout")?;
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line.trim() != "ready" {
                let status = child.wait()?;
                bail!(
                    "a connection holder (connections {}..{}) failed: {status}",
                    self.len,
                    self.len + count
                );
            }
            self.children.push((child, reader.into_inner()));
            added.extend((self.len..self.len + count).map(|i| Conn {
                client: client(i),
                server: server(k),
            }));
            self.len += count;
            if self.len % 90_000 < PER_CHILD {
                eprintln!("holders: {} connections open", self.len);
            }
        }
        Ok(added)
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            let _ = child.kill();
        }
        for (child, _) in &mut self.children {
            let _ = child.wait();
        }
    }
}
