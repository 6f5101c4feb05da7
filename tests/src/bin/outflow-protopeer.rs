//! `outflow-protopeer`: servers and clients speaking what the agent cannot attribute per request
//! (TLS, HTTP/2 with prior knowledge, pipelined HTTP/1.1, request heads longer than the
//! capture), so the attribution tests can check that those bytes are still counted exactly.
//!
//! ```text
//! outflow-protopeer serve --proto tls|h2c|http1 --netns NAME --cgroup DIR --listen ADDR:PORT
//!                         [--cert-out FILE]
//! outflow-protopeer request --proto tls|h2c|http1 --netns NAME --connect ADDR:PORT --sizes N,N,...
//!                           [--id ID] [--ca FILE] [--pipeline K] [--cookie-bytes B]
//!                           [--pause-ms MS]
//! ```
//!
//! `serve` joins the cgroup DIR, enters the network namespace /run/netns/NAME, listens, prints
//! `ready`, then serves each connection on its own thread and prints one JSON [`ServeReport`]
//! line per finished connection. Every request is `GET /bytes/N` and gets a response with a body
//! of N bytes. With `--proto tls` (HTTP/1.1 inside TLS) it makes a self-signed certificate for
//! [`SERVER_NAME`] and writes it (DER) to `--cert-out` before printing `ready`.
//!
//! `request` enters the namespace, opens one connection and makes one request per size, each
//! with the header `x-client-id: ID-<index>`, then prints one JSON [`RequestReport`] line.
//! HTTP/1.1 requests go in *batches*: each batch is written with one write and its responses
//! read before the next batch; with `--pipeline K` the first batch holds the first K requests,
//! every other batch one. `--cookie-bytes B` puts a `cookie` header of B bytes before
//! `x-client-id` in the first request. HTTP/2 requests are all sent at once, on concurrent
//! streams. `--pause-ms` waits that long before each batch (HTTP/2: each request) but the first,
//! so that one connection spans several of the agent's intervals. TLS is checked against the
//! certificate in `--ca`.
//!
//! Both ends finish the same way, so that the client's `TCP_INFO` is the ground truth of the
//! connection: the client ends its protocol (TLS `close_notify`, HTTP/2 `GOAWAY`) and shuts down
//! its sending side; the server reads to end of file, ends its own protocol and closes; the
//! client reads to end of file. The server's FIN then acknowledges every byte the client sent,
//! and every byte the server sent has arrived before it, so the client's `TCP_INFO` counts all
//! the server received (`tcpi_bytes_acked`) and all it sent (`tcpi_bytes_received`). Both count
//! sequence space, not only payload: `tcpi_bytes_acked` also has the client's SYN and FIN, and
//! `tcpi_bytes_received` the server's FIN (the report gives them as the kernel does, with
//! `tcpi_state`, which is then `TCP_CLOSE`).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use outflow_tests::protocol::{tcp_info, write_payload};
use outflow_tests::{cgroup, netns};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const USAGE: &str = "usage: outflow-protopeer serve --proto tls|h2c|http1 --netns NAME --cgroup DIR --listen ADDR:PORT [--cert-out FILE]\n       outflow-protopeer request --proto tls|h2c|http1 --netns NAME --connect ADDR:PORT --sizes N,N,... [--id ID] [--ca FILE] [--pipeline K] [--cookie-bytes B] [--pause-ms MS]";

/// The name in the server's certificate and the client's SNI.
const SERVER_NAME: &str = "outflow.test";
/// The request header carrying the client id.
const ID_HEADER: &str = "x-client-id";
/// Largest HTTP/1.1 request or response head either end accepts.
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines either end parses.
const MAX_HEADERS: usize = 64;
/// Read and write timeout of every socket: a stuck exchange fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The protocol spoken on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Proto {
    /// HTTP/1.1 inside TLS (rustls, ring).
    Tls,
    /// HTTP/2 over cleartext TCP with prior knowledge (h2).
    H2c,
    /// HTTP/1.1 over cleartext TCP.
    Http1,
}

impl std::str::FromStr for Proto {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tls" => Ok(Self::Tls),
            "h2c" => Ok(Self::H2c),
            "http1" => Ok(Self::Http1),
            _ => bail!("unknown protocol `{s}`: tls, h2c or http1"),
        }
    }
}

/// One request a server answered.
#[derive(Debug, Serialize)]
struct Served {
    /// Body length of the response.
    body: u64,
    /// The request's `x-client-id`, if it had one.
    client_id: Option<String>,
}

/// The JSON line `serve` prints for each finished connection.
#[derive(Debug, Serialize)]
struct ServeReport {
    proto: Proto,
    local_port: u16,
    remote_addr: IpAddr,
    remote_port: u16,
    /// The requests answered, in order.
    requests: Vec<Served>,
    /// Bytes the server read from the TCP socket (TLS records and HTTP/2 frames included).
    tcp_read: u64,
    /// Bytes the server wrote to the TCP socket.
    tcp_written: u64,
}

/// TCP payload bytes of one HTTP/1.1 batch, as the client wrote and read them.
#[derive(Debug, Serialize)]
struct Batch {
    /// Requests in the batch.
    requests: usize,
    /// Bytes written: the requests.
    sent: u64,
    /// Bytes read: the responses.
    received: u64,
}

/// The JSON line `request` prints.
#[derive(Debug, Serialize)]
struct RequestReport {
    proto: Proto,
    local_addr: IpAddr,
    local_port: u16,
    /// Bytes the client wrote to the TCP socket (TLS records and HTTP/2 frames included).
    tcp_written: u64,
    /// Bytes the client read from the TCP socket.
    tcp_read: u64,
    /// `tcpi_state` once the server closed.
    tcp_state: u8,
    /// `tcpi_bytes_acked` once the server closed: every byte the server received, and the
    /// client's SYN and FIN.
    bytes_acked: u64,
    /// `tcpi_bytes_received` once the server closed: every byte the server sent, and its FIN.
    bytes_received: u64,
    /// Cleartext HTTP/1.1 only: the TCP payload of each batch, in order.
    batches: Vec<Batch>,
    /// Body length of each response, in request order.
    bodies: Vec<u64>,
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
    let mut argv = std::env::args().skip(1);
    match argv.next().as_deref() {
        Some("serve") => serve(&ServeArgs::parse(argv)?),
        Some("request") => request(&RequestArgs::parse(argv)?),
        Some(other) => bail!("unknown command `{other}`\n{USAGE}"),
        None => bail!("missing command\n{USAGE}"),
    }
}

/// Pairs of `--flag value` from `args`.
fn flag_values(mut args: impl Iterator<Item = String>) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        pairs.push((flag, value));
    }
    Ok(pairs)
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| anyhow::anyhow!("{flag} {value}: {e}\n{USAGE}"))
}

// ---------------------------------------------------------------------------------------------
// serve

struct ServeArgs {
    proto: Proto,
    netns: String,
    cgroup: PathBuf,
    listen: SocketAddr,
    cert_out: Option<PathBuf>,
}

impl ServeArgs {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let (mut proto, mut netns, mut cgroup, mut listen, mut cert_out) =
            (None, None, None, None, None);
        for (flag, value) in flag_values(args)? {
            match flag.as_str() {
                "--proto" => proto = Some(parse(&flag, &value)?),
                "--netns" => netns = Some(value),
                "--cgroup" => cgroup = Some(PathBuf::from(value)),
                "--listen" => listen = Some(parse(&flag, &value)?),
                "--cert-out" => cert_out = Some(PathBuf::from(value)),
                _ => bail!("unknown option `{flag}`\n{USAGE}"),
            }
        }
        let args = Self {
            proto: proto.with_context(|| format!("--proto is required\n{USAGE}"))?,
            netns: netns.with_context(|| format!("--netns is required\n{USAGE}"))?,
            cgroup: cgroup.with_context(|| format!("--cgroup is required\n{USAGE}"))?,
            listen: listen.with_context(|| format!("--listen is required\n{USAGE}"))?,
            cert_out,
        };
        ensure!(
            (args.proto == Proto::Tls) == args.cert_out.is_some(),
            "--cert-out is required with --proto tls, and only then\n{USAGE}"
        );
        Ok(args)
    }
}

fn serve(args: &ServeArgs) -> Result<()> {
    // Join the cgroup first so every socket created below belongs to it.
    cgroup::move_pid(&args.cgroup, std::process::id()).context("joining the cgroup")?;
    // Still single-threaded: every thread spawned from here on starts in this namespace.
    netns::enter(&args.netns)?;

    let tls = match &args.cert_out {
        Some(path) => Some(server_tls_config(path)?),
        None => None,
    };
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    print_line("ready")?;

    let proto = args.proto;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("accepting on {}: {e}", args.listen);
                continue;
            }
        };
        let tls = tls.clone();
        let spawned = thread::Builder::new().spawn(move || {
            let peer = stream
                .peer_addr()
                .map_or_else(|e| format!("? ({e})"), |a| a.to_string());
            let report = serve_connection(proto, stream, tls).and_then(|report| {
                print_line(&serde_json::to_string(&report).context("encoding the report")?)
            });
            if let Err(e) = report {
                eprintln!("connection from {peer}: {e:#}");
            }
        });
        if let Err(e) = spawned {
            eprintln!("no thread for a connection: {e}");
        }
    }
    Ok(())
}

/// Makes a self-signed certificate for [`SERVER_NAME`], writes it (DER) to `cert_out` and
/// returns a server configuration using it.
fn server_tls_config(cert_out: &std::path::Path) -> Result<Arc<ServerConfig>> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .context("generating a self-signed certificate")?;
    let cert = certified.cert.der().clone();
    std::fs::write(cert_out, &cert)
        .with_context(|| format!("writing the certificate to {}", cert_out.display()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .context("the server certificate")?;
    Ok(Arc::new(config))
}

fn serve_connection(
    proto: Proto,
    stream: TcpStream,
    tls: Option<Arc<ServerConfig>>,
) -> Result<ServeReport> {
    let local = stream.local_addr().context("local address")?;
    let remote = stream.peer_addr().context("peer address")?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let seed = (u64::from(remote.port()) << 16) | u64::from(local.port());
    let (requests, tcp_read, tcp_written) = match proto {
        Proto::Http1 => {
            let mut sock = Counted::new(stream);
            let requests = serve_http1(&mut sock, seed)?;
            // The client shut down its side (end of file above): close ours.
            (requests, sock.read, sock.written)
        }
        Proto::Tls => {
            let tls = tls.context("no TLS configuration")?;
            let conn = ServerConnection::new(tls).context("a TLS server connection")?;
            let mut stream = rustls::StreamOwned::new(conn, Counted::new(stream));
            // Ends at the client's close_notify.
            let requests = serve_http1(&mut stream, seed)?;
            stream.conn.send_close_notify();
            while stream.conn.wants_write() {
                stream
                    .conn
                    .write_tls(&mut stream.sock)
                    .context("sending close_notify")?;
            }
            drain(&mut stream.sock).context("reading to end of file after close_notify")?;
            (requests, stream.sock.read, stream.sock.written)
        }
        Proto::H2c => {
            let counts = Arc::new(Counts::default());
            // A second descriptor of the socket: it stays open after h2 drops its stream.
            let mut rest = stream.try_clone().context("dup of the socket")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a tokio runtime")?;
            let requests = runtime.block_on(async {
                stream.set_nonblocking(true)?;
                let io = AsyncCounted {
                    inner: tokio::net::TcpStream::from_std(stream)?,
                    counts: Arc::clone(&counts),
                };
                serve_h2(io, seed).await
            })?;
            // O_NONBLOCK belongs to the open file, which `rest` shares.
            rest.set_nonblocking(false)?;
            let mut sock = Counted::new(&mut rest);
            drain(&mut sock).context("reading to end of file after HTTP/2")?;
            let (read, written) = (sock.read, sock.written);
            (
                requests,
                counts.read.load(Ordering::Relaxed) + read,
                counts.written.load(Ordering::Relaxed) + written,
            )
        }
    };
    Ok(ServeReport {
        proto,
        local_port: local.port(),
        remote_addr: remote.ip(),
        remote_port: remote.port(),
        requests,
        tcp_read,
        tcp_written,
    })
}

/// Answers HTTP/1.1 requests `GET /bytes/N` on `stream`, pipelined ones in order, until the
/// client closes (end of file between requests).
fn serve_http1(stream: &mut (impl Read + Write), seed: u64) -> Result<Vec<Served>> {
    let mut buf = Vec::new();
    let mut served = Vec::new();
    loop {
        let head = loop {
            if let Some(head) = parse_request(&buf)? {
                break head;
            }
            ensure!(buf.len() <= MAX_HEAD, "request head longer than {MAX_HEAD}");
            if fill(stream, &mut buf).context("reading a request")? == 0 {
                ensure!(
                    buf.is_empty(),
                    "connection closed in a request head: {} bytes",
                    buf.len()
                );
                return Ok(served);
            }
        };
        let whole = head.head_len + usize::try_from(head.content_length)?;
        while buf.len() < whole {
            ensure!(
                fill(stream, &mut buf).context("reading a request body")? > 0,
                "connection closed in a request body"
            );
        }
        buf.drain(..whole);
        let body = body_len(&head.path)?;
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {body}\r\n\r\n"
        );
        stream
            .write_all(response.as_bytes())
            .context("writing a response head")?;
        write_payload(stream, seed ^ body, body, 0, Duration::ZERO)
            .context("writing a response body")?;
        served.push(Served {
            body,
            client_id: head.client_id,
        });
    }
}

/// What the server needs of a request head.
struct RequestHead {
    head_len: usize,
    path: String,
    content_length: u64,
    client_id: Option<String>,
}

/// The request head at the start of `buf`, or `None` if it is not complete yet.
fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf).context("parsing a request head")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    ensure!(
        req.method == Some("GET"),
        "unexpected method {:?}",
        req.method
    );
    let path = req.path.context("no request path")?.to_owned();
    let mut content_length = 0;
    let mut client_id = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(h.value)?
                .trim()
                .parse()
                .context("content-length")?;
        } else if h.name.eq_ignore_ascii_case(ID_HEADER) {
            client_id = Some(String::from_utf8_lossy(h.value).into_owned());
        }
    }
    Ok(Some(RequestHead {
        head_len,
        path,
        content_length,
        client_id,
    }))
}

/// N of the path `/bytes/N`.
fn body_len(path: &str) -> Result<u64> {
    path.strip_prefix("/bytes/")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("path {path:?} is not /bytes/N"))
}

async fn serve_h2(io: AsyncCounted, seed: u64) -> Result<Vec<Served>> {
    let mut conn = h2::server::handshake(io)
        .await
        .context("HTTP/2 handshake")?;
    let mut served = Vec::new();
    // `accept` also drives the connection: it sends the responses queued below. It ends once
    // the client has gone away and every stream is done.
    while let Some(next) = conn.accept().await {
        let (request, mut respond) = next.context("accepting an HTTP/2 stream")?;
        let body = body_len(request.uri().path())?;
        let client_id = request
            .headers()
            .get(ID_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let response = http::Response::builder()
            .status(200)
            .header("content-length", body)
            .body(())
            .context("building a response")?;
        let mut send = respond
            .send_response(response, body == 0)
            .context("sending a response head")?;
        if body > 0 {
            let mut data = Vec::new();
            write_payload(&mut data, seed ^ body, body, 0, Duration::ZERO)?;
            // Queued: h2 sends it as the client's flow-control windows allow.
            send.send_data(Bytes::from(data), true)
                .context("sending a response body")?;
        }
        served.push(Served { body, client_id });
    }
    Ok(served)
}

// ---------------------------------------------------------------------------------------------
// request

struct RequestArgs {
    proto: Proto,
    netns: String,
    connect: SocketAddr,
    sizes: Vec<u64>,
    id: String,
    ca: Option<PathBuf>,
    pipeline: usize,
    cookie_bytes: usize,
    pause: Duration,
}

impl RequestArgs {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let (mut proto, mut netns, mut connect, mut sizes) = (None, None, None, None);
        let mut args_out = Self {
            proto: Proto::Http1,
            netns: String::new(),
            connect: SocketAddr::from(([0, 0, 0, 0], 0)),
            sizes: Vec::new(),
            id: "client".into(),
            ca: None,
            pipeline: 1,
            cookie_bytes: 0,
            pause: Duration::ZERO,
        };
        for (flag, value) in flag_values(args)? {
            match flag.as_str() {
                "--proto" => proto = Some(parse(&flag, &value)?),
                "--netns" => netns = Some(value),
                "--connect" => connect = Some(parse(&flag, &value)?),
                "--sizes" => {
                    sizes = Some(
                        value
                            .split(',')
                            .map(|n| parse(&flag, n))
                            .collect::<Result<Vec<u64>>>()?,
                    );
                }
                "--id" => args_out.id = value,
                "--ca" => args_out.ca = Some(PathBuf::from(value)),
                "--pipeline" => args_out.pipeline = parse(&flag, &value)?,
                "--cookie-bytes" => args_out.cookie_bytes = parse(&flag, &value)?,
                "--pause-ms" => args_out.pause = Duration::from_millis(parse(&flag, &value)?),
                _ => bail!("unknown option `{flag}`\n{USAGE}"),
            }
        }
        args_out.proto = proto.with_context(|| format!("--proto is required\n{USAGE}"))?;
        args_out.netns = netns.with_context(|| format!("--netns is required\n{USAGE}"))?;
        args_out.connect = connect.with_context(|| format!("--connect is required\n{USAGE}"))?;
        args_out.sizes = sizes.with_context(|| format!("--sizes is required\n{USAGE}"))?;
        ensure!(!args_out.sizes.is_empty(), "--sizes is empty\n{USAGE}");
        ensure!(
            (1..=args_out.sizes.len()).contains(&args_out.pipeline),
            "--pipeline must be 1..=number of sizes\n{USAGE}"
        );
        ensure!(
            (args_out.proto == Proto::Tls) == args_out.ca.is_some(),
            "--ca is required with --proto tls, and only then\n{USAGE}"
        );
        Ok(args_out)
    }

    /// The id header value of request `i`.
    fn id_of(&self, i: usize) -> String {
        format!("{}-{i}", self.id)
    }

    /// HTTP/1.1 request `i`.
    fn http1_request(&self, i: usize) -> Vec<u8> {
        let cookie = if i == 0 && self.cookie_bytes > 0 {
            format!("cookie: session={}\r\n", "c".repeat(self.cookie_bytes))
        } else {
            String::new()
        };
        format!(
            "GET /bytes/{} HTTP/1.1\r\nhost: {SERVER_NAME}\r\n{cookie}{ID_HEADER}: {}\r\ncontent-length: 0\r\n\r\n",
            self.sizes[i],
            self.id_of(i)
        )
        .into_bytes()
    }

    /// The HTTP/1.1 batches: request indices written together.
    fn batches(&self) -> Vec<std::ops::Range<usize>> {
        let n = self.sizes.len();
        std::iter::once(0..self.pipeline)
            .chain((self.pipeline..n).map(|i| i..i + 1))
            .collect()
    }
}

fn request(args: &RequestArgs) -> Result<()> {
    netns::enter(&args.netns)?;
    let stream = TcpStream::connect_timeout(&args.connect, IO_TIMEOUT)
        .with_context(|| format!("connecting to {}", args.connect))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // Each batch leaves in one segment when it fits, whatever is still unacknowledged.
    stream.set_nodelay(true)?;
    let local = stream.local_addr().context("local address")?;
    // Kept to read TCP_INFO once the protocol is over and its stream dropped.
    let info_fd = stream.try_clone().context("dup of the socket")?;

    let mut batches = Vec::new();
    let mut bodies = Vec::new();
    let (tcp_written, tcp_read) = match args.proto {
        Proto::Http1 => {
            let mut sock = Counted::new(stream);
            let mut buf = Vec::new();
            for batch in args.batches() {
                let (sent, received) = (sock.written, sock.read);
                bodies.extend(http1_batch(&mut sock, args, batch.clone(), &mut buf)?);
                batches.push(Batch {
                    requests: batch.len(),
                    sent: sock.written - sent,
                    received: sock.read - received,
                });
            }
            sock.inner.shutdown(Shutdown::Write).context("shutdown")?;
            drain(&mut sock).context("reading to end of file")?;
            (sock.written, sock.read)
        }
        Proto::Tls => {
            let ca = args.ca.as_ref().context("no --ca")?;
            let mut stream = rustls::StreamOwned::new(
                ClientConnection::new(client_tls_config(ca)?, ServerName::try_from(SERVER_NAME)?)
                    .context("a TLS client connection")?,
                Counted::new(stream),
            );
            let mut buf = Vec::new();
            for batch in args.batches() {
                bodies.extend(http1_batch(&mut stream, args, batch, &mut buf)?);
            }
            stream.conn.send_close_notify();
            while stream.conn.wants_write() {
                stream
                    .conn
                    .write_tls(&mut stream.sock)
                    .context("sending close_notify")?;
            }
            stream
                .sock
                .inner
                .shutdown(Shutdown::Write)
                .context("shutdown")?;
            // The server's close_notify, then end of file.
            drain(&mut stream.sock).context("reading to end of file")?;
            (stream.sock.written, stream.sock.read)
        }
        Proto::H2c => {
            let counts = Arc::new(Counts::default());
            let mut rest = stream.try_clone().context("dup of the socket")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a tokio runtime")?;
            bodies = runtime.block_on(async {
                stream.set_nonblocking(true)?;
                let io = AsyncCounted {
                    inner: tokio::net::TcpStream::from_std(stream)?,
                    counts: Arc::clone(&counts),
                };
                request_h2(io, args).await
            })?;
            // O_NONBLOCK belongs to the open file, which `rest` shares.
            rest.set_nonblocking(false)?;
            // h2 shut the sending side down after its GOAWAY already; again is harmless.
            if let Err(e) = rest.shutdown(Shutdown::Write)
                && e.kind() != io::ErrorKind::NotConnected
            {
                return Err(e).context("shutdown");
            }
            let mut sock = Counted::new(&mut rest);
            drain(&mut sock).context("reading to end of file")?;
            (
                counts.written.load(Ordering::Relaxed) + sock.written,
                counts.read.load(Ordering::Relaxed) + sock.read,
            )
        }
    };
    ensure!(
        bodies == args.sizes,
        "response bodies {bodies:?}, asked for {:?}",
        args.sizes
    );
    let info = tcp_info(&info_fd).context("getsockopt(TCP_INFO)")?;
    let report = RequestReport {
        proto: args.proto,
        local_addr: local.ip(),
        local_port: local.port(),
        tcp_written,
        tcp_read,
        tcp_state: info.small[0],
        bytes_acked: info.bytes_acked,
        bytes_received: info.bytes_received,
        batches,
        bodies,
    };
    print_line(&serde_json::to_string(&report).context("encoding the report")?)
}

fn client_tls_config(ca: &std::path::Path) -> Result<Arc<ClientConfig>> {
    let der = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(der))
        .context("the CA certificate")?;
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Writes the requests of `batch` with one write, then reads their responses; returns their
/// body lengths. `buf` holds bytes read and not used yet (none between batches: the server
/// only answers).
fn http1_batch(
    stream: &mut (impl Read + Write),
    args: &RequestArgs,
    batch: std::ops::Range<usize>,
    buf: &mut Vec<u8>,
) -> Result<Vec<u64>> {
    if batch.start > 0 {
        thread::sleep(args.pause);
    }
    let requests: Vec<u8> = batch.clone().flat_map(|i| args.http1_request(i)).collect();
    stream.write_all(&requests).context("writing requests")?;
    stream.flush().context("writing requests")?;
    let mut bodies = Vec::new();
    for i in batch {
        let (head_len, body) = loop {
            if let Some(head) = parse_response(buf)? {
                break head;
            }
            ensure!(
                buf.len() <= MAX_HEAD,
                "response head longer than {MAX_HEAD}"
            );
            ensure!(
                fill(stream, buf).context("reading a response head")? > 0,
                "connection closed before response {i}"
            );
        };
        let whole = head_len + usize::try_from(body)?;
        while buf.len() < whole {
            ensure!(
                fill(stream, buf).context("reading a response body")? > 0,
                "connection closed in response {i}"
            );
        }
        buf.drain(..whole);
        bodies.push(body);
    }
    ensure!(
        buf.is_empty(),
        "{} bytes beyond the responses of the batch",
        buf.len()
    );
    Ok(bodies)
}

/// Head length and content-length of the response at the start of `buf`, once complete.
fn parse_response(buf: &[u8]) -> Result<Option<(usize, u64)>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf).context("parsing a response head")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    ensure!(resp.code == Some(200), "response status {:?}", resp.code);
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .context("response without content-length")?;
    let length = std::str::from_utf8(length.value)?
        .trim()
        .parse()
        .context("content-length")?;
    Ok(Some((head_len, length)))
}

async fn request_h2(io: AsyncCounted, args: &RequestArgs) -> Result<Vec<u64>> {
    let (client, connection) = h2::client::handshake(io)
        .await
        .context("HTTP/2 handshake")?;
    // Ends after the last stream is done and every handle is dropped: it then sends GOAWAY
    // and shuts the sending side down.
    let driver = tokio::spawn(connection);
    let mut streams = Vec::new();
    for (i, size) in args.sizes.iter().enumerate() {
        if i > 0 {
            // The streams sent so far go on meanwhile.
            tokio::time::sleep(args.pause).await;
        }
        let mut ready = client.clone().ready().await.context("HTTP/2 stream slot")?;
        let request = http::Request::get(format!("http://{SERVER_NAME}/bytes/{size}"))
            .header(ID_HEADER, args.id_of(i))
            .body(())
            .context("building a request")?;
        let (response, _) = ready
            .send_request(request, true)
            .context("sending a request")?;
        streams.push(tokio::spawn(async move {
            let response = response.await.context("reading a response head")?;
            ensure!(
                response.status() == 200,
                "response status {}",
                response.status()
            );
            let mut body = response.into_body();
            let mut len = 0u64;
            while let Some(data) = body.data().await {
                let data = data.context("reading a response body")?;
                len += data.len() as u64;
                body.flow_control()
                    .release_capacity(data.len())
                    .context("releasing flow-control capacity")?;
            }
            anyhow::Ok(len)
        }));
    }
    drop(client);
    let mut bodies = Vec::new();
    for stream in streams {
        bodies.push(stream.await.context("a stream task panicked")??);
    }
    driver
        .await
        .context("the HTTP/2 connection task panicked")?
        .context("HTTP/2 connection")?;
    Ok(bodies)
}

// ---------------------------------------------------------------------------------------------
// byte counting and closing

/// A stream that counts the bytes read from and written to it.
struct Counted<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<S: Read> Read for Counted<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl<S: Write> Write for Counted<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Byte counts shared with a stream that h2 owns.
#[derive(Default)]
struct Counts {
    read: AtomicU64,
    written: AtomicU64,
}

/// A tokio TCP stream that counts the bytes read from and written to it.
struct AsyncCounted {
    inner: tokio::net::TcpStream,
    counts: Arc<Counts>,
}

impl AsyncRead for AsyncCounted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let n = (buf.filled().len() - before) as u64;
            self.counts.read.fetch_add(n, Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncWrite for AsyncCounted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.counts.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads once into the end of `buf`; returns the bytes read (0 at end of file).
fn fill(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 64 * 1024];
    let n = loop {
        match stream.read(&mut chunk) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other?,
        }
    };
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Reads and drops everything up to end of file.
fn drain(stream: &mut impl Read) -> io::Result<u64> {
    io::copy(stream, &mut io::sink())
}

/// Prints `line` with one locked write, so lines of concurrent connections never interleave.
fn print_line(line: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}
