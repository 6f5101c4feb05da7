//! `outflow-testpeer http-chat`: users of an inference API for a while, for the demo. Each
//! client host keeps `parallel` keep-alive connections to the target (a gateway or the server),
//! each making one streamed request after another (`bytes` per answer, `chunk` bytes per token
//! every `pace_ms`) with its client id header, until `seconds` have passed.

use std::{
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use super::load::connect_from;
use super::wire::{Reader, STREAM_PATH, read_response};

/// What the users do.
#[derive(Clone, Debug)]
pub struct ChatSpec {
    /// Where the requests go: a gateway or the server.
    pub target: SocketAddr,
    /// Client hosts and the id each sends.
    pub clients: Vec<(IpAddr, String)>,
    /// Header carrying the id.
    pub id_header: String,
    /// Body bytes per answer.
    pub bytes: u64,
    /// Bytes per token (0: the answer in one piece).
    pub chunk: u64,
    /// Milliseconds between tokens.
    pub pace_ms: u64,
    /// Connections per client host.
    pub parallel: usize,
    /// How long the users go on.
    pub seconds: u64,
}

/// One client's totals at the end.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatTotal {
    /// The client host.
    pub source: IpAddr,
    /// Its id.
    pub id: String,
    /// Requests answered whole.
    pub requests: u64,
    /// Body bytes of those answers.
    pub body_bytes: u64,
}

/// Runs the users; a connection that fails is opened again (the demo goes on).
pub fn run(spec: &ChatSpec) -> Vec<ChatTotal> {
    let deadline = Instant::now() + Duration::from_secs(spec.seconds);
    let totals: Mutex<Vec<ChatTotal>> = Mutex::new(
        spec.clients
            .iter()
            .map(|(source, id)| ChatTotal {
                source: *source,
                id: id.clone(),
                requests: 0,
                body_bytes: 0,
            })
            .collect(),
    );
    thread::scope(|scope| {
        for (i, (source, id)) in spec.clients.iter().enumerate() {
            for lane in 0..spec.parallel.max(1) {
                let totals = &totals;
                scope.spawn(move || {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        match converse(spec, *source, id, deadline, &mut n) {
                            Ok(()) => {}
                            Err(e) => {
                                eprintln!("http-chat: {source} lane {lane}: {e}");
                                thread::sleep(Duration::from_millis(200));
                            }
                        }
                        let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                        t[i].requests += n;
                        t[i].body_bytes += n * spec.bytes;
                        n = 0;
                    }
                });
            }
        }
    });
    totals.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// One keep-alive connection, requests until the deadline; `done` counts answered requests.
fn converse(
    spec: &ChatSpec,
    source: IpAddr,
    id: &str,
    deadline: Instant,
    done: &mut u64,
) -> io::Result<()> {
    let mut stream = connect_from(source, spec.target)?;
    let mut reader = Reader::new(stream.try_clone()?);
    let mut seq = 0u64;
    while Instant::now() < deadline {
        seq += 1;
        let request = format!(
            "POST {STREAM_PATH}?bytes={}&chunk={}&pace={}&req={source}-{seq} HTTP/1.1\r\nHost: outflow-demo\r\n{}: {id}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}",
            spec.bytes, spec.chunk, spec.pace_ms, spec.id_header
        );
        stream.write_all(request.as_bytes())?;
        let got = read_response(&mut reader)?;
        if got.status != 200 || got.body != spec.bytes {
            return Err(io::Error::other(format!(
                "status {} with {} body bytes, asked for {}",
                got.status, got.body, spec.bytes
            )));
        }
        *done += 1;
    }
    Ok(())
}
