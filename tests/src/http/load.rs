//! The client side: many client hosts, each with one keep-alive connection and one or more
//! ids, making streaming requests of random sizes in a random order, planned from a seed.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use super::serve::{CLIENT_ID_HEADER, FORWARDED_FOR_HEADER};
use super::wire::{ProxyVersion, Reader, STREAM_PATH, encode_proxy, read_response, response_bytes};

/// Connect timeout of the load's connections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout: a stuck exchange fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Most writes a planned response takes: larger bodies get larger chunks.
const MAX_CHUNKS: u64 = 2048;
/// Chunk sizes the plan picks from (0: the whole body in one chunk).
const CHUNKS: [u64; 7] = [0, 1, 16, 100, 1000, 4096, 16_384];

/// One client host of a load: its source address and the ids it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadClient {
    /// Source address of its connection.
    pub addr: IpAddr,
    /// Ids its requests carry, one per request (none: no id header).
    pub ids: Vec<String>,
}

/// A whole load; [`LoadSpec::to_args`] and [`LoadSpec::parse`] give and take the command line
/// of `outflow-testpeer http-load`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadSpec {
    /// Where the requests go: a gateway or the server.
    pub target: SocketAddr,
    /// The client hosts; request `i` of the plan belongs to host `i % clients.len()`.
    pub clients: Vec<LoadClient>,
    /// Requests in all.
    pub requests: usize,
    /// Largest response body asked for; requests 1 and 3 of the plan ask for it and one less,
    /// request 0 for nothing, request 2 for one byte, the others log-uniformly up to it.
    pub max_bytes: u64,
    /// Seed of the plan.
    pub seed: u64,
    /// Requests in flight at once (each worker owns some client hosts).
    pub parallel: usize,
    /// Header carrying the id (lower case).
    pub id_header: String,
    /// Ids of a host in turn instead of at random.
    pub cycle_ids: bool,
    /// Send `X-Forwarded-For: ADDR` with every request (a forged claim).
    pub forge_xff: Option<String>,
    /// Start every connection with a PROXY header claiming this source.
    pub forge_proxy: Option<(ProxyVersion, IpAddr)>,
    /// Two requests of a host in one write (the second waits for the first's response), with
    /// short prompts so that the pair fits in one segment.
    pub pipeline: bool,
}

impl LoadSpec {
    /// A load of `requests` requests from `clients` to `target`, with the defaults: responses
    /// up to 1 MB, 8 in flight, `x-client-id`, ids at random, nothing forged, no pipelining.
    pub fn new(target: SocketAddr, clients: Vec<LoadClient>, requests: usize) -> Self {
        Self {
            target,
            clients,
            requests,
            max_bytes: 1_000_000,
            seed: 1,
            parallel: 8,
            id_header: CLIENT_ID_HEADER.to_owned(),
            cycle_ids: false,
            forge_xff: None,
            forge_proxy: None,
            pipeline: false,
        }
    }

    /// The options of `outflow-testpeer http-load` that describe this load.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--connect".to_owned(),
            self.target.to_string(),
            "--requests".to_owned(),
            self.requests.to_string(),
            "--max-bytes".to_owned(),
            self.max_bytes.to_string(),
            "--seed".to_owned(),
            self.seed.to_string(),
            "--parallel".to_owned(),
            self.parallel.to_string(),
            "--id-header".to_owned(),
            self.id_header.clone(),
        ];
        for client in &self.clients {
            args.push("--client".to_owned());
            args.push(if client.ids.is_empty() {
                client.addr.to_string()
            } else {
                format!("{}={}", client.addr, client.ids.join(","))
            });
        }
        if self.cycle_ids {
            args.push("--cycle-ids".to_owned());
        }
        if let Some(xff) = &self.forge_xff {
            args.extend(["--forge-xff".to_owned(), xff.clone()]);
        }
        if let Some((version, src)) = self.forge_proxy {
            args.extend([
                "--forge-proxy".to_owned(),
                version.as_str().to_owned(),
                "--forge-src".to_owned(),
                src.to_string(),
            ]);
        }
        if self.pipeline {
            args.push("--pipeline".to_owned());
        }
        args
    }

    /// Parses the options [`LoadSpec::to_args`] gives (plus `--netns NAME`, returned apart).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<(Self, Option<String>), String> {
        let mut spec = Self::new(SocketAddr::from(([0, 0, 0, 0], 0)), Vec::new(), 0);
        let (mut netns, mut forge_version, mut forge_src) = (None, None, None);
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "--cycle-ids" => {
                    spec.cycle_ids = true;
                    continue;
                }
                "--pipeline" => {
                    spec.pipeline = true;
                    continue;
                }
                _ => {}
            }
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
            match flag.as_str() {
                "--netns" => netns = Some(value),
                "--connect" => spec.target = value.parse().map_err(|e| bad(&e))?,
                "--requests" => spec.requests = value.parse().map_err(|e| bad(&e))?,
                "--max-bytes" => spec.max_bytes = value.parse().map_err(|e| bad(&e))?,
                "--seed" => spec.seed = value.parse().map_err(|e| bad(&e))?,
                "--parallel" => spec.parallel = value.parse().map_err(|e| bad(&e))?,
                "--id-header" => spec.id_header = value.to_ascii_lowercase(),
                "--client" => {
                    let (addr, ids) = value.split_once('=').unwrap_or((&value, ""));
                    spec.clients.push(LoadClient {
                        addr: addr.parse().map_err(|e| bad(&e))?,
                        ids: ids
                            .split(',')
                            .filter(|id| !id.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    });
                }
                "--forge-xff" => spec.forge_xff = Some(value),
                "--forge-proxy" => {
                    forge_version = Some(value.parse::<ProxyVersion>().map_err(|e| bad(&e))?);
                }
                "--forge-src" => forge_src = Some(value.parse::<IpAddr>().map_err(|e| bad(&e))?),
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        spec.forge_proxy = match (forge_version, forge_src) {
            (Some(version), Some(src)) => Some((version, src)),
            (None, None) => None,
            _ => return Err("--forge-proxy and --forge-src go together".to_owned()),
        };
        if spec.target.port() == 0 {
            return Err("--connect ADDR:PORT is required".to_owned());
        }
        if spec.clients.is_empty() {
            return Err("at least one --client IP[=ID,...] is required".to_owned());
        }
        if spec.parallel == 0 {
            return Err("--parallel must be at least 1".to_owned());
        }
        Ok((spec, netns))
    }
}

/// Deterministic pseudo-random numbers (splitmix64), so a failing plan can be replayed.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Log-uniform in `[0, max]`: as many small values as large ones.
    pub fn log_uniform(&mut self, max: u64) -> u64 {
        let bits = self.below(u64::from(64 - max.leading_zeros()) + 1);
        if bits == 0 {
            0
        } else {
            (self.next_u64() % (1 << bits)).min(max)
        }
    }
}

/// One planned request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Position in the plan before shuffling (the nonce's suffix).
    pub index: usize,
    /// Unique within the load: `<seed hex>-<index>`.
    pub nonce: String,
    /// The client host (index into [`LoadSpec::clients`]).
    pub client: usize,
    /// The id it carries.
    pub id: Option<String>,
    /// Body bytes asked for.
    pub bytes: u64,
    /// Chunk size asked for.
    pub chunk: u64,
    /// GET (no body) or POST (a JSON body).
    pub post: bool,
    /// Bytes of padding in the prompt of a POST.
    pub prompt: usize,
}

/// What goes out in one write: one request, or two of one host when pipelining.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The client host.
    pub client: usize,
    /// Its requests.
    pub requests: Vec<Planned>,
}

/// The steps of `spec` in the order they are started, from its seed alone.
pub fn plan(spec: &LoadSpec) -> Vec<Step> {
    let mut rng = SplitMix64(spec.seed);
    let hosts = spec.clients.len().max(1);
    // A pipelined pair stays well within one segment (MSS 1448 on the veth): both requests
    // reach the server before it answers the first.
    let prompt_max = if spec.pipeline { 64 } else { 600 };
    let mut requests: Vec<Planned> = (0..spec.requests)
        .map(|index| {
            let bytes = match index {
                0 => 0,
                1 => spec.max_bytes,
                2 => spec.max_bytes.min(1),
                3 => spec.max_bytes.saturating_sub(1),
                _ => rng.log_uniform(spec.max_bytes),
            };
            let mut chunk = CHUNKS[rng.below(CHUNKS.len() as u64) as usize];
            if chunk != 0 && bytes / chunk > MAX_CHUNKS {
                chunk = bytes.div_ceil(MAX_CHUNKS);
            }
            Planned {
                index,
                nonce: format!("{:x}-{index}", spec.seed),
                client: index % hosts,
                id: None,
                bytes,
                chunk,
                post: rng.below(4) != 0,
                prompt: rng.below(prompt_max) as usize,
            }
        })
        .collect();
    // Fisher-Yates: every host's requests spread over the whole run.
    for i in (1..requests.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        requests.swap(i, j);
    }
    let mut made = vec![0usize; hosts];
    for request in &mut requests {
        let ids = &spec.clients[request.client].ids;
        let k = made[request.client];
        made[request.client] += 1;
        if !ids.is_empty() {
            let pick = if spec.cycle_ids {
                k % ids.len()
            } else {
                rng.below(ids.len() as u64) as usize
            };
            request.id = Some(ids[pick].clone());
        }
    }
    if !spec.pipeline {
        return requests
            .into_iter()
            .map(|r| Step {
                client: r.client,
                requests: vec![r],
            })
            .collect();
    }
    // A host's requests in pairs, each pair where its first request was.
    let mut steps: Vec<Step> = Vec::new();
    let mut open: Vec<Option<usize>> = vec![None; hosts];
    for request in requests {
        let client = request.client;
        match open[client].take() {
            Some(step) => steps[step].requests.push(request),
            None => {
                open[client] = Some(steps.len());
                steps.push(Step {
                    client,
                    requests: vec![request],
                });
            }
        }
    }
    steps
}

/// The bytes of `request` as the load sends it.
pub fn encode_request(spec: &LoadSpec, request: &Planned) -> Vec<u8> {
    let target = format!(
        "{STREAM_PATH}?bytes={}&chunk={}&req={}",
        request.bytes, request.chunk, request.nonce
    );
    let mut out = Vec::new();
    let method = if request.post { "POST" } else { "GET" };
    write!(out, "{method} {target} HTTP/1.1\r\nHost: outflow-test\r\n").expect("a Vec");
    if let Some(id) = &request.id {
        write!(out, "{}: {id}\r\n", spec.id_header).expect("a Vec");
    }
    if let Some(xff) = &spec.forge_xff {
        write!(out, "{FORWARDED_FOR_HEADER}: {xff}\r\n").expect("a Vec");
    }
    let body = if request.post {
        format!(
            "{{\"model\":\"outflow-test\",\"max_tokens\":{},\"prompt\":\"{}\"}}",
            request.bytes,
            "p".repeat(request.prompt)
        )
    } else {
        String::new()
    };
    if request.post {
        write!(
            out,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
        .expect("a Vec");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

/// What the load did for one request; `http-load` prints one JSON line of it per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestResult {
    /// The nonce, as the server reports it.
    pub req: String,
    /// The client host's address: the real client.
    pub source: IpAddr,
    /// The local port of its connection.
    pub local_port: u16,
    /// Where it went.
    pub target: SocketAddr,
    /// The id it carried.
    pub id: Option<String>,
    /// `GET` or `POST`.
    pub method: String,
    /// Body bytes asked for.
    pub bytes: u64,
    /// Chunk size asked for.
    pub chunk: u64,
    /// Bytes written for the request (head and body).
    pub request_bytes: u64,
    /// Bytes of the forged PROXY header written before it (its connection's first request).
    pub proxy_bytes: u64,
    /// Sent in one write with another request.
    pub pipelined: bool,
    /// Position of the request on its connection, from 0.
    pub index_on_conn: u64,
    /// Body bytes received (always `bytes`: anything else fails the load).
    pub body_received: u64,
    /// Bytes of the response as received, head and framing included.
    pub response_bytes_received: u64,
    /// Bytes the server writes for this request: [`response_bytes`]`(bytes, chunk)`.
    pub expected_server_bytes: u64,
}

/// Runs the load of `spec` from the calling process's network namespace, calling `emit` for
/// each request once its response has been read whole. Stops at the first failure.
pub fn run(spec: &LoadSpec, emit: &(dyn Fn(&RequestResult) + Sync)) -> io::Result<()> {
    let steps = plan(spec);
    let workers = spec.parallel.min(spec.clients.len()).max(1);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None::<io::Error>);
    thread::scope(|scope| {
        for worker in 0..workers {
            let (steps, failed, first_error) = (&steps, &failed, &first_error);
            scope.spawn(move || {
                let mine = steps.iter().filter(|s| s.client % workers == worker);
                if let Err(e) = run_worker(spec, mine, failed, emit) {
                    failed.store(true, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert(e);
                }
            });
        }
    });
    match first_error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A host's open keep-alive connection.
struct Conn {
    stream: TcpStream,
    reader: Reader<TcpStream>,
    local_port: u16,
    requests: u64,
}

fn run_worker<'a>(
    spec: &LoadSpec,
    steps: impl Iterator<Item = &'a Step>,
    failed: &AtomicBool,
    emit: &(dyn Fn(&RequestResult) + Sync),
) -> io::Result<()> {
    let mut conns: Vec<Option<Conn>> = (0..spec.clients.len()).map(|_| None).collect();
    for step in steps {
        if failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let source = spec.clients[step.client].addr;
        let context = |e: io::Error, what: &str| {
            let nonces: Vec<&str> = step.requests.iter().map(|r| r.nonce.as_str()).collect();
            io::Error::new(
                e.kind(),
                format!(
                    "{what} for {nonces:?} from {source} to {}: {e}",
                    spec.target
                ),
            )
        };
        let mut proxy_bytes = 0;
        let conn = match &mut conns[step.client] {
            Some(conn) => conn,
            slot => {
                let (conn, sent) = open(spec, source).map_err(|e| context(e, "connecting"))?;
                proxy_bytes = sent;
                slot.insert(conn)
            }
        };
        let encoded: Vec<Vec<u8>> = step
            .requests
            .iter()
            .map(|r| encode_request(spec, r))
            .collect();
        conn.stream
            .write_all(&encoded.concat())
            .map_err(|e| context(e, "sending"))?;
        for (request, bytes) in step.requests.iter().zip(&encoded) {
            let read = read_response(&mut conn.reader).map_err(|e| context(e, "reading"))?;
            if read.status != 200 || read.body != request.bytes {
                return Err(context(
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "status {} with {} body bytes, {} asked for",
                            read.status, read.body, request.bytes
                        ),
                    ),
                    "checking the response",
                ));
            }
            emit(&RequestResult {
                req: request.nonce.clone(),
                source,
                local_port: conn.local_port,
                target: spec.target,
                id: request.id.clone(),
                method: if request.post { "POST" } else { "GET" }.to_owned(),
                bytes: request.bytes,
                chunk: request.chunk,
                request_bytes: bytes.len() as u64,
                proxy_bytes: std::mem::take(&mut proxy_bytes),
                pipelined: step.requests.len() > 1,
                index_on_conn: conn.requests,
                body_received: read.body,
                response_bytes_received: read.wire,
                expected_server_bytes: response_bytes(request.bytes, request.chunk),
            });
            conn.requests += 1;
        }
    }
    // Close every connection: the server (or gateway) reads end of file after the last request.
    for conn in conns.into_iter().flatten() {
        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        let mut reader = conn.reader;
        if !reader.at_eof().unwrap_or(true) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "bytes after the last response on the connection from port {}",
                    conn.local_port
                ),
            ));
        }
    }
    Ok(())
}

/// A connection from client host `source` to `target`, with the load's timeouts; each write
/// leaves at once (no Nagle), so each request leaves in one segment.
pub fn connect_from(source: IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&target.into(), CONNECT_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects from `source` to the target; with a forged PROXY header, sends it. Returns the
/// connection and the bytes of the header.
fn open(spec: &LoadSpec, source: IpAddr) -> io::Result<(Conn, u64)> {
    let mut stream = connect_from(source, spec.target)?;
    let local = stream.local_addr()?;
    let mut sent = 0;
    if let Some((version, claimed)) = spec.forge_proxy {
        let header = encode_proxy(version, SocketAddr::new(claimed, local.port()), spec.target);
        stream.write_all(&header)?;
        sent = header.len() as u64;
    }
    let reader = Reader::new(stream.try_clone()?);
    Ok((
        Conn {
            stream,
            reader,
            local_port: local.port(),
            requests: 0,
        },
        sent,
    ))
}

/// Writes `result` as one JSON line on stdout, in one locked write.
pub fn print_result(result: &RequestResult) {
    let line = serde_json::to_string(result).expect("request results serialize");
    let mut out = io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        eprintln!("writing a result to stdout: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoadSpec {
        let clients = (1..=5)
            .map(|i| LoadClient {
                addr: IpAddr::from([198, 51, 100, i]),
                ids: (0..i).map(|k| format!("tenant-{k}")).collect(),
            })
            .collect();
        let mut spec = LoadSpec::new("198.18.0.2:8080".parse().expect("addr"), clients, 40);
        spec.forge_proxy = Some((ProxyVersion::V2, IpAddr::from([203, 0, 113, 9])));
        spec.forge_xff = Some("203.0.113.10".to_owned());
        spec
    }

    #[test]
    fn the_command_line_round_trips() {
        let spec = spec();
        let mut args = vec!["--netns".to_owned(), "ns".to_owned()];
        args.extend(spec.to_args());
        let (parsed, netns) = LoadSpec::parse(args).expect("parses");
        assert_eq!(parsed, spec);
        assert_eq!(netns.as_deref(), Some("ns"));
    }

    #[test]
    fn the_plan_is_a_function_of_the_seed() {
        let spec = spec();
        let steps = plan(&spec);
        assert_eq!(steps, plan(&spec));
        let mut indexes: Vec<usize> = steps
            .iter()
            .flat_map(|s| s.requests.iter().map(|r| r.index))
            .collect();
        indexes.sort_unstable();
        assert_eq!(indexes, (0..40).collect::<Vec<_>>());
        let sizes: Vec<u64> = steps
            .iter()
            .flat_map(|s| s.requests.iter().map(|r| r.bytes))
            .collect();
        assert!(sizes.contains(&0) && sizes.contains(&spec.max_bytes));
        for step in &steps {
            for r in &step.requests {
                assert!(r.chunk == 0 || r.bytes / r.chunk <= MAX_CHUNKS, "{r:?}");
                let ids = &spec.clients[r.client].ids;
                assert!(r.id.as_ref().is_some_and(|id| ids.contains(id)), "{r:?}");
            }
        }
        let other = LoadSpec { seed: 2, ..spec };
        assert_ne!(steps, plan(&other));
    }

    #[test]
    fn pipelining_pairs_the_requests_of_one_host() {
        let spec = LoadSpec {
            pipeline: true,
            ..spec()
        };
        let steps = plan(&spec);
        let requests: usize = steps.iter().map(|s| s.requests.len()).sum();
        assert_eq!(requests, 40);
        for step in &steps {
            assert!(step.requests.iter().all(|r| r.client == step.client));
        }
        // 8 requests per host: all in pairs.
        assert!(steps.iter().all(|s| s.requests.len() == 2), "{steps:?}");
    }

    #[test]
    fn ids_in_turn() {
        let spec = LoadSpec {
            cycle_ids: true,
            ..spec()
        };
        let steps = plan(&spec);
        let of_host: Vec<String> = steps
            .iter()
            .filter(|s| s.client == 2)
            .filter_map(|s| s.requests[0].id.clone())
            .collect();
        assert_eq!(of_host[..3], ["tenant-0", "tenant-1", "tenant-2"]);
        assert_eq!(of_host[3], "tenant-0");
    }
}
