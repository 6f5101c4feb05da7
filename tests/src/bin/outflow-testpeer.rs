//! `outflow-testpeer`: the "inference server" of the integration tests and the demo, and the
//! load its clients make.
//!
//! ```text
//! outflow-testpeer serve --netns NAME --cgroup DIR --listen ADDR:PORT [--listen ADDR:PORT ...]
//! outflow-testpeer load --netns NAME [--cgroup DIR] --connect ADDR:PORT --from IP [--from IP ...]
//!                       --resp BYTES [--chunk BYTES --interval-ms MS] [--parallel N] --seconds S
//! ```
//!
//! `serve` joins the cgroup DIR, enters the network namespace /run/netns/NAME, listens, prints
//! `ready`, then serves each connection on its own thread with the protocol of
//! `outflow_tests::protocol`, printing one JSON `ServerResult` line per finished connection.
//!
//! `load` joins the cgroup DIR if given, enters the namespace and, from each source address, keeps `parallel` requests going
//! one after another for `seconds`: each asks for `resp` bytes (in `chunk`-byte pieces every
//! `interval-ms`, like a token stream, when `chunk` is set). At the end it prints one line per
//! source address: requests made and bytes received.
//!
//! ```text
//! outflow-testpeer http-serve --netns NAME --cgroup DIR --listen ADDR:PORT [--listen ...]
//!                             [--proxy-protocol] [--annotate HEADER]
//! outflow-testpeer http-load --netns NAME --connect ADDR:PORT --client IP[=ID,ID...] [...]
//!                            --requests N [--max-bytes B] [--seed S] [--parallel P]
//!                            [--id-header NAME] [--cycle-ids] [--forge-xff ADDR]
//!                            [--forge-proxy v1|v2 --forge-src ADDR] [--pipeline]
//! ```
//!
//! `http-serve` is the HTTP/1.1 inference server of the attribution tests: like `serve` it
//! joins the cgroup and the namespace and prints `ready`, then serves keep-alive connections,
//! a thread each, streaming each response in chunks (`outflow_tests::http::serve`); it prints
//! one JSON line per request answered and per connection closed. `http-load` plays many client
//! hosts with ids making such requests (`outflow_tests::http::load`), printing one JSON line per
//! request; it fails if any response is not exactly what was asked for.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};
use outflow_tests::http::{
    self, LoadSpec, ServeOptions,
    load::print_result,
    serve::{print_event, serve_connection},
};
use outflow_tests::protocol::{
    DONE_BYTE, HEADER_LEN, RequestHeader, ServerResult, tcp_info, write_payload,
};
use outflow_tests::{cgroup, netns};

const USAGE: &str = "usage: outflow-testpeer serve --netns NAME --cgroup DIR --listen ADDR:PORT [--listen ADDR:PORT ...]\n       outflow-testpeer load --netns NAME [--cgroup DIR] --connect ADDR:PORT --from IP [--from IP ...] --resp BYTES [--chunk BYTES --interval-ms MS] [--parallel N] --seconds S\n       outflow-testpeer http-serve --netns NAME --cgroup DIR --listen ADDR:PORT [...] [--proxy-protocol] [--annotate HEADER]\n       outflow-testpeer http-load --netns NAME --connect ADDR:PORT --client IP[=ID,...] [...] --requests N [--max-bytes B] [--seed S] [--parallel P] [--id-header NAME] [--cycle-ids] [--forge-xff ADDR] [--forge-proxy v1|v2 --forge-src ADDR] [--pipeline]\n       outflow-testpeer http-chat --netns NAME --connect ADDR:PORT --client IP=ID [...] --bytes N --chunk C --pace-ms MS [--parallel P] [--id-header NAME] --seconds S";

struct Args {
    netns: String,
    cgroup: PathBuf,
    listen: Vec<SocketAddr>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut argv = std::env::args().skip(1).peekable();
    match argv.peek().map(String::as_str) {
        Some("load") => return load(&parse_load_args(argv.skip(1))?),
        Some("http-serve") => return http_serve(argv.skip(1)),
        Some("http-load") => return http_load(argv.skip(1)),
        Some("http-chat") => return http_chat(argv.skip(1)),
        _ => {}
    }
    let args = parse_args(argv)?;
    let listeners = listen_in(&args)?;
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|listener| thread::spawn(move || accept_loop(&listener)))
        .collect();
    join_acceptors(acceptors)
}

/// Joins the cgroup and the namespace of `args`, listens on its addresses and prints `ready`.
fn listen_in(args: &Args) -> Result<Vec<TcpListener>> {
    // Join the cgroup first so every socket created below belongs to it.
    cgroup::move_pid(&args.cgroup, std::process::id()).context("joining the cgroup")?;
    // Still single-threaded: every thread spawned from here on starts in this namespace.
    netns::enter(&args.netns)?;

    let listeners = args
        .listen
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("listening on {addr}")))
        .collect::<Result<Vec<_>>>()?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready")
        .and_then(|()| out.flush())
        .context("writing `ready`")?;
    Ok(listeners)
}

fn join_acceptors(acceptors: Vec<thread::JoinHandle<()>>) -> Result<()> {
    for acceptor in acceptors {
        acceptor
            .join()
            .map_err(|_| anyhow::anyhow!("an accept thread panicked"))?;
    }
    Ok(())
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args> {
    match args.next().as_deref() {
        Some("serve") => {}
        Some(other) => bail!("unknown command `{other}`\n{USAGE}"),
        None => bail!("missing command\n{USAGE}"),
    }
    let (mut netns, mut cgroup, mut listen) = (None, None, Vec::new());
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--netns" => netns = Some(value),
            "--cgroup" => cgroup = Some(PathBuf::from(value)),
            "--listen" => listen.push(
                value
                    .parse()
                    .with_context(|| format!("--listen {value}: not ADDR:PORT"))?,
            ),
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    ensure!(
        !listen.is_empty(),
        "at least one --listen is needed\n{USAGE}"
    );
    Ok(Args {
        netns: netns.with_context(|| format!("--netns is required\n{USAGE}"))?,
        cgroup: cgroup.with_context(|| format!("--cgroup is required\n{USAGE}"))?,
        listen,
    })
}

fn accept_loop(listener: &TcpListener) {
    let local = listener
        .local_addr()
        .map_or_else(|e| format!("? ({e})"), |a| a.to_string());
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let spawned = thread::Builder::new().spawn(move || {
                    let peer = stream
                        .peer_addr()
                        .map_or_else(|e| format!("? ({e})"), |a| a.to_string());
                    if let Err(e) = serve(stream) {
                        eprintln!("connection from {peer}: {e:#}");
                    }
                });
                if let Err(e) = spawned {
                    eprintln!("accepting on {local}: no thread for the connection: {e}");
                }
            }
            Err(e) => eprintln!("accepting on {local}: {e}"),
        }
    }
}

fn serve(mut stream: TcpStream) -> Result<()> {
    let local = stream.local_addr().context("local address")?;
    let remote = stream.peer_addr().context("peer address")?;
    // Like a token-streaming server: each chunk leaves at once.
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;

    let mut header = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut header)
        .context("reading the request header")?;
    let header = RequestHeader::decode(&header);
    let body = io::copy(&mut (&mut stream).take(header.req_len), &mut io::sink())
        .context("reading the request body")?;
    ensure!(
        body == header.req_len,
        "request body ended after {body} of {} bytes",
        header.req_len
    );

    let seed = (u64::from(remote.port()) << 16) | u64::from(local.port());
    write_payload(
        &mut stream,
        seed,
        header.resp_len,
        header.chunk,
        Duration::from_millis(header.interval_ms.into()),
    )
    .context("writing the response")?;

    let mut done = [0u8; 1];
    stream
        .read_exact(&mut done)
        .context("reading the done byte")?;
    ensure!(
        done[0] == DONE_BYTE,
        "expected the done byte, got {:#04x}",
        done[0]
    );

    let info = tcp_info(&stream).context("getsockopt(TCP_INFO)")?;
    let result = ServerResult {
        local_port: local.port(),
        remote_addr: remote.ip(),
        remote_port: remote.port(),
        sent: header.resp_len,
        received: header.client_bytes(),
        bytes_acked: info.bytes_acked,
        bytes_received: info.bytes_received,
        segs_out: info.segs_out,
        segs_in: info.segs_in,
        total_retrans: info.total_retrans,
    };
    let line = serde_json::to_string(&result).context("encoding the result")?;
    // One locked write per line, so lines from concurrent connections never interleave.
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing the result")?;
    Ok(())
}

/// What `load` does.
struct LoadArgs {
    netns: String,
    /// A cgroup to join first (the load is then the counted host's own outbound traffic).
    cgroup: Option<PathBuf>,
    connect: SocketAddr,
    from: Vec<std::net::IpAddr>,
    resp: u64,
    chunk: u32,
    interval_ms: u32,
    parallel: usize,
    seconds: u64,
}

fn parse_load_args(mut args: impl Iterator<Item = String>) -> Result<LoadArgs> {
    let mut a = LoadArgs {
        netns: String::new(),
        cgroup: None,
        connect: SocketAddr::from(([0, 0, 0, 0], 0)),
        from: Vec::new(),
        resp: 0,
        chunk: 0,
        interval_ms: 0,
        parallel: 1,
        seconds: 0,
    };
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = || format!("{flag} {value}: not a valid value\n{USAGE}");
        match flag.as_str() {
            "--netns" => a.netns = value,
            "--cgroup" => a.cgroup = Some(PathBuf::from(value)),
            "--connect" => a.connect = value.parse().with_context(bad)?,
            "--from" => a.from.push(value.parse().with_context(bad)?),
            "--resp" => a.resp = value.parse().with_context(bad)?,
            "--chunk" => a.chunk = value.parse().with_context(bad)?,
            "--interval-ms" => a.interval_ms = value.parse().with_context(bad)?,
            "--parallel" => a.parallel = value.parse().with_context(bad)?,
            "--seconds" => a.seconds = value.parse().with_context(bad)?,
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    ensure!(!a.netns.is_empty(), "--netns is required\n{USAGE}");
    ensure!(a.connect.port() != 0, "--connect is required\n{USAGE}");
    ensure!(!a.from.is_empty(), "at least one --from is needed\n{USAGE}");
    ensure!(a.seconds > 0, "--seconds is required\n{USAGE}");
    Ok(a)
}

fn load(a: &LoadArgs) -> Result<()> {
    if let Some(dir) = &a.cgroup {
        cgroup::move_pid(dir, std::process::id()).context("joining the cgroup")?;
    }
    netns::enter(&a.netns)?;
    let until = std::time::Instant::now() + Duration::from_secs(a.seconds);
    let header = RequestHeader {
        resp_len: a.resp,
        req_len: 200,
        chunk: a.chunk,
        interval_ms: a.interval_ms,
    };
    let results: Vec<(std::net::IpAddr, u64, u64)> = thread::scope(|s| {
        let workers: Vec<_> = a
            .from
            .iter()
            .flat_map(|&ip| (0..a.parallel.max(1)).map(move |_| ip))
            .map(|ip| {
                s.spawn(move || {
                    let (mut requests, mut bytes) = (0u64, 0u64);
                    while std::time::Instant::now() < until {
                        match request_from(ip, a.connect, header) {
                            Ok(got) => {
                                requests += 1;
                                bytes += got;
                            }
                            Err(e) => {
                                eprintln!("request from {ip}: {e:#}");
                                thread::sleep(Duration::from_millis(200));
                            }
                        }
                    }
                    (ip, requests, bytes)
                })
            })
            .collect();
        workers.into_iter().filter_map(|w| w.join().ok()).collect()
    });
    let mut out = io::stdout().lock();
    for ip in &a.from {
        let (requests, bytes) = results
            .iter()
            .filter(|(i, _, _)| i == ip)
            .fold((0, 0), |(r, b), (_, rr, bb)| (r + rr, b + bb));
        writeln!(out, "{ip} requests={requests} bytes={bytes}").context("writing the summary")?;
    }
    Ok(())
}

/// One whole exchange from source address `ip`; returns the response bytes received.
fn request_from(ip: std::net::IpAddr, to: SocketAddr, header: RequestHeader) -> Result<u64> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .context("socket")?;
    socket
        .bind(&SocketAddr::new(ip, 0).into())
        .with_context(|| format!("bind {ip}"))?;
    socket
        .connect(&to.into())
        .with_context(|| format!("connect {to}"))?;
    let mut stream: TcpStream = socket.into();
    stream.write_all(&header.encode()).context("header")?;
    stream
        .write_all(&vec![b'p'; header.req_len as usize])
        .context("prompt")?;
    let got =
        io::copy(&mut (&mut stream).take(header.resp_len), &mut io::sink()).context("response")?;
    stream.write_all(&[DONE_BYTE]).context("done byte")?;
    io::copy(&mut stream, &mut io::sink()).context("reading to EOF")?;
    Ok(got)
}

fn http_serve(mut args: impl Iterator<Item = String>) -> Result<()> {
    let (mut netns, mut cgroup, mut listen) = (None, None, Vec::<SocketAddr>::new());
    let mut options = ServeOptions::default();
    while let Some(flag) = args.next() {
        if flag == "--proxy-protocol" {
            options.proxy_protocol = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--netns" => netns = Some(value),
            "--cgroup" => cgroup = Some(PathBuf::from(value)),
            "--listen" => listen.push(
                value
                    .parse()
                    .with_context(|| format!("--listen {value}: not ADDR:PORT"))?,
            ),
            "--annotate" => options.annotate = Some(value.to_ascii_lowercase()),
            _ => bail!("unknown option `{flag}`\n{USAGE}"),
        }
    }
    ensure!(
        !listen.is_empty(),
        "at least one --listen is needed\n{USAGE}"
    );
    let listeners = listen_in(&Args {
        netns: netns.with_context(|| format!("--netns is required\n{USAGE}"))?,
        cgroup: cgroup.with_context(|| format!("--cgroup is required\n{USAGE}"))?,
        listen,
    })?;

    let options = Arc::new(options);
    // Connections are numbered across listeners, in accept order.
    let next_conn = Arc::new(AtomicU64::new(0));
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let (options, next_conn) = (Arc::clone(&options), Arc::clone(&next_conn));
            thread::spawn(move || {
                for stream in listener.incoming() {
                    let stream = match stream {
                        Ok(stream) => stream,
                        Err(e) => {
                            eprintln!("accepting: {e}");
                            continue;
                        }
                    };
                    let conn = next_conn.fetch_add(1, Ordering::Relaxed);
                    let options = Arc::clone(&options);
                    let spawned = thread::Builder::new().spawn(move || {
                        serve_connection(stream, conn, &options, &print_event);
                    });
                    if let Err(e) = spawned {
                        eprintln!("no thread for connection {conn}: {e}");
                    }
                }
            })
        })
        .collect();
    join_acceptors(acceptors)
}

fn http_load(args: impl Iterator<Item = String>) -> Result<()> {
    let (spec, netns) = LoadSpec::parse(args).map_err(|e| anyhow::anyhow!("{e}\n{USAGE}"))?;
    let netns = netns.with_context(|| format!("--netns is required\n{USAGE}"))?;
    netns::enter(&netns)?;
    http::load::run(&spec, &print_result).context("the load failed")
}

fn http_chat(mut args: impl Iterator<Item = String>) -> Result<()> {
    let mut netns = None;
    let mut spec = http::chat::ChatSpec {
        target: SocketAddr::from(([127, 0, 0, 1], 0)),
        clients: Vec::new(),
        id_header: "x-client-id".into(),
        bytes: 0,
        chunk: 0,
        pace_ms: 0,
        parallel: 1,
        seconds: 0,
    };
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || -> Result<u64> {
            value
                .parse()
                .with_context(|| format!("{flag} {value}: not a number"))
        };
        match flag.as_str() {
            "--netns" => netns = Some(value.clone()),
            "--connect" => spec.target = value.parse().context("--connect")?,
            "--client" => {
                let (ip, id) = value
                    .split_once('=')
                    .with_context(|| format!("--client {value}: want IP=ID"))?;
                spec.clients
                    .push((ip.parse().context("--client")?, id.to_owned()));
            }
            "--bytes" => spec.bytes = number()?,
            "--chunk" => spec.chunk = number()?,
            "--pace-ms" => spec.pace_ms = number()?,
            "--parallel" => spec.parallel = usize::try_from(number()?)?,
            "--seconds" => spec.seconds = number()?,
            "--id-header" => spec.id_header = value.clone(),
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    let netns = netns.with_context(|| format!("--netns is required\n{USAGE}"))?;
    ensure!(!spec.clients.is_empty(), "at least one --client\n{USAGE}");
    netns::enter(&netns)?;
    for total in http::chat::run(&spec) {
        println!("{}", serde_json::to_string(&total)?);
    }
    Ok(())
}
