//! The server side: one keep-alive connection served request after request, and the JSON line
//! it prints for each request and for the connection's end.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};

use serde::{Deserialize, Serialize};

use super::wire::{
    ProxyHeader, Reader, RequestHead, STREAM_PATH, annotate_client_id, read_proxy_header,
    read_request_head, write_response_paced,
};

/// The header whose value the server reports as `client_id` (the load sends it by default).
pub const CLIENT_ID_HEADER: &str = "x-client-id";
/// The forwarding header the server reports as `forwarded_for`.
pub const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";

/// How `http-serve` treats each connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// Strip a PROXY v1/v2 header at the start of a connection, if there is one.
    pub proxy_protocol: bool,
    /// Before answering a request that has this header (lower case), name its value as the
    /// connection's client with `setsockopt(SOL_OUTFLOW, OUTFLOW_CLIENT_ID)`.
    pub annotate: Option<String>,
}

/// One line of `http-serve`'s output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    /// A request was answered (printed once its whole response is written).
    Request(ServedRequest),
    /// A connection ended.
    Closed(ServedConn),
}

/// What the server saw and wrote for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedRequest {
    /// The nonce of the request (`req=` in the query).
    pub req: String,
    /// The connection, numbered by the server in accept order from 0.
    pub conn: u64,
    /// Position of the request on its connection, from 0.
    pub index: u64,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The server's own address.
    pub local: SocketAddr,
    /// The PROXY header the connection started with.
    pub proxy: Option<ProxyHeader>,
    /// `GET`, `POST`.
    pub method: String,
    /// Body bytes asked for (`bytes=`).
    pub bytes: u64,
    /// Chunk size asked for (`chunk=`, 0: one chunk).
    pub chunk: u64,
    /// `X-Forwarded-For` as received (lines joined with ", ").
    pub forwarded_for: Option<String>,
    /// `x-client-id` as received.
    pub client_id: Option<String>,
    /// The annotation made for this request, with `--annotate`.
    pub annotation: Option<Annotation>,
    /// Bytes read for the request: head and body (not the PROXY header).
    pub request_bytes: u64,
    /// Bytes written for the response, exactly.
    pub response_bytes: u64,
}

/// An annotation the server made on its socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    /// The client id set.
    pub value: String,
    /// The errno of `setsockopt`, if it failed (`ENOPROTOOPT` without an agent handling it).
    pub errno: Option<i32>,
}

/// What the server read and wrote on one connection, from accept to close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedConn {
    /// The connection, as in [`ServedRequest::conn`].
    pub conn: u64,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The server's own address.
    pub local: SocketAddr,
    /// The PROXY header the connection started with.
    pub proxy: Option<ProxyHeader>,
    /// Requests answered.
    pub requests: u64,
    /// Every byte read: PROXY header and requests.
    pub bytes_read: u64,
    /// Every byte written.
    pub bytes_written: u64,
    /// Why the connection ended early, if it did.
    pub error: Option<String>,
}

/// A request the server refuses (and closes the connection after).
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Serves `stream` (connection number `conn`) until the peer closes it, calling `emit` for each
/// request answered and once at the end.
pub fn serve_connection(
    stream: TcpStream,
    conn: u64,
    options: &ServeOptions,
    emit: &(dyn Fn(&ServerEvent) + Sync),
) {
    let (peer, local) = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(local)) => (peer, local),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("connection {conn}: its addresses: {e}");
            return;
        }
    };
    let mut state = ServedConn {
        conn,
        peer,
        local,
        proxy: None,
        requests: 0,
        bytes_read: 0,
        bytes_written: 0,
        error: None,
    };
    let mut reader = Reader::new(&stream);
    if let Err(e) = serve_requests(&mut reader, &stream, options, &mut state, emit) {
        eprintln!("connection {conn} from {peer}: {e}");
        state.error = Some(e.to_string());
    }
    state.bytes_read = reader.consumed();
    emit(&ServerEvent::Closed(state));
}

fn serve_requests(
    reader: &mut Reader<&TcpStream>,
    stream: &TcpStream,
    options: &ServeOptions,
    state: &mut ServedConn,
    emit: &(dyn Fn(&ServerEvent) + Sync),
) -> io::Result<()> {
    // Like a token-streaming server: each chunk leaves at once.
    stream.set_nodelay(true)?;
    if options.proxy_protocol {
        state.proxy = read_proxy_header(reader)?;
    }
    let mut out = stream;
    loop {
        let start = reader.consumed();
        let Some(head) = read_request_head(reader)? else {
            return Ok(());
        };
        let request = match parse_stream_request(&head) {
            Ok(request) => request,
            Err(e) => {
                out.write_all(BAD_REQUEST)?;
                state.bytes_written += BAD_REQUEST.len() as u64;
                return Err(e);
            }
        };
        reader.skip(head.content_length()?)?;
        let request_bytes = reader.consumed() - start;

        let annotation = options.annotate.as_deref().and_then(|name| {
            let value = head.joined(name)?;
            let errno = annotate_client_id(stream, value.as_bytes())
                .err()
                .map(|e| e.raw_os_error().unwrap_or(-1));
            Some(Annotation { value, errno })
        });
        let response_bytes = write_response_paced(
            &mut out,
            request.bytes,
            request.chunk,
            std::time::Duration::from_millis(request.pace_ms),
        )?;
        state.bytes_written += response_bytes;
        emit(&ServerEvent::Request(ServedRequest {
            req: request.nonce,
            conn: state.conn,
            index: state.requests,
            peer: state.peer,
            local: state.local,
            proxy: state.proxy,
            method: head.method.clone(),
            bytes: request.bytes,
            chunk: request.chunk,
            forwarded_for: head.joined(FORWARDED_FOR_HEADER),
            client_id: head.joined(CLIENT_ID_HEADER),
            annotation,
            request_bytes,
            response_bytes,
        }));
        state.requests += 1;
        if head.wants_close() {
            return Ok(());
        }
    }
}

struct StreamRequest {
    nonce: String,
    bytes: u64,
    chunk: u64,
    /// `pace=`: milliseconds between chunks (0: as fast as possible).
    pace_ms: u64,
}

fn parse_stream_request(head: &RequestHead) -> io::Result<StreamRequest> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let path = head.target.split('?').next().unwrap_or_default();
    if path != STREAM_PATH || !matches!(head.method.as_str(), "GET" | "POST") {
        return Err(bad(format!(
            "no such endpoint: {} {}",
            head.method, head.target
        )));
    }
    let number = |name: &str, default: Option<u64>| -> io::Result<u64> {
        match (head.query(name), default) {
            (Some(v), _) => v
                .parse()
                .map_err(|e| bad(format!("{name}={v} in {}: {e}", head.target))),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(bad(format!("no {name}= in {}", head.target))),
        }
    };
    Ok(StreamRequest {
        nonce: head
            .query("req")
            .ok_or_else(|| bad(format!("no req= in {}", head.target)))?
            .to_owned(),
        bytes: number("bytes", None)?,
        chunk: number("chunk", Some(0))?,
        pace_ms: number("pace", Some(0))?.min(10_000),
    })
}

/// Writes `event` as one JSON line on stdout, in one locked write so that the lines of
/// concurrent connections never interleave.
pub fn print_event(event: &ServerEvent) {
    let line = serde_json::to_string(event).expect("server events serialize");
    let mut out = io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        eprintln!("writing an event to stdout: {e}");
    }
}
