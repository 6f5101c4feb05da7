//! Bytes on the wire: the streamed response (whose size is a function of the request alone),
//! request heads, chunked bodies, and PROXY protocol v1/v2 headers.
//!
//! Hand-written on top of `httparse` rather than with an HTTP library, because the tests need
//! to know every byte each side wrote and read, and a forged or pipelined request is exactly
//! what a library would not send.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Path of the streaming endpoint: `/v1/stream?bytes=N&chunk=C&req=NONCE[&pace=MS]`.
pub const STREAM_PATH: &str = "/v1/stream";

/// The head of every successful response: no date, no length, nothing that varies, so that the
/// bytes a response takes depend on `bytes` and `chunk` alone ([`response_bytes`]).
pub const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: text/event-stream\r\n\
Cache-Control: no-cache\r\n\
Transfer-Encoding: chunked\r\n\
\r\n";

/// The last chunk of a chunked body, without trailers.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Largest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;

/// Byte `offset` of every response body: a repeating alphabet, so a byte out of place shows.
pub fn body_byte(offset: u64) -> u8 {
    b'a' + (offset % 26) as u8
}

/// The chunk size the server uses for `bytes` asked in chunks of `chunk`: `chunk`, or the
/// whole body in one chunk when `chunk` is 0.
pub fn effective_chunk(bytes: u64, chunk: u64) -> u64 {
    if chunk == 0 { bytes.max(1) } else { chunk }
}

/// Bytes of one chunk of `len` body bytes: hex size, CRLF, data, CRLF.
fn chunk_frame_len(len: u64) -> u64 {
    let hex_digits = u64::from((64 - len.leading_zeros()).div_ceil(4).max(1));
    hex_digits + 2 + len + 2
}

/// Exactly the bytes the server writes for a request of `bytes` in chunks of `chunk`:
/// [`RESPONSE_HEAD`], the chunks, and the last chunk.
pub fn response_bytes(bytes: u64, chunk: u64) -> u64 {
    let chunk = effective_chunk(bytes, chunk);
    let (full, rest) = (bytes / chunk, bytes % chunk);
    let mut total = RESPONSE_HEAD.len() as u64 + full * chunk_frame_len(chunk);
    if rest > 0 {
        total += chunk_frame_len(rest);
    }
    total + LAST_CHUNK.len() as u64
}

/// Writes the response to a request of `bytes` in chunks of `chunk`, one `write` a chunk (like
/// a token stream), and returns the bytes written: [`response_bytes`]`(bytes, chunk)`.
pub fn write_response(out: &mut impl Write, bytes: u64, chunk: u64) -> io::Result<u64> {
    write_response_paced(out, bytes, chunk, std::time::Duration::ZERO)
}

/// [`write_response`] with a pause of `pace` before each chunk after the first, like a model
/// producing tokens (the bytes are the same).
pub fn write_response_paced(
    out: &mut impl Write,
    bytes: u64,
    chunk: u64,
    pace: std::time::Duration,
) -> io::Result<u64> {
    out.write_all(RESPONSE_HEAD)?;
    let mut written = RESPONSE_HEAD.len() as u64;
    let chunk = effective_chunk(bytes, chunk);
    let mut frame = Vec::new();
    let mut offset = 0;
    while offset < bytes {
        let len = chunk.min(bytes - offset);
        frame.clear();
        write!(frame, "{len:x}\r\n")?;
        frame.extend((offset..offset + len).map(body_byte));
        frame.extend_from_slice(b"\r\n");
        if offset > 0 && !pace.is_zero() {
            std::thread::sleep(pace);
        }
        out.write_all(&frame)?;
        written += frame.len() as u64;
        offset += len;
    }
    out.write_all(LAST_CHUNK)?;
    Ok(written + LAST_CHUNK.len() as u64)
}

/// A reader with its own buffer, so that a request's end can be found without reading into
/// the next, and every byte consumed is counted.
pub struct Reader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    consumed: u64,
}

impl<R: Read> Reader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            consumed: 0,
        }
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Bytes read from the wire but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Bytes consumed since the start.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Reads more from the wire into the buffer; returns how many bytes came (0: end of file).
    /// Fails if the buffer is full of unconsumed bytes.
    pub fn fill(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {} bytes without an end", self.buf.len()),
            ));
        }
        let n = loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        self.end += n;
        Ok(n)
    }

    /// Marks `n` buffered bytes consumed.
    pub fn consume(&mut self, n: usize) {
        assert!(
            n <= self.end - self.start,
            "consuming more than is buffered"
        );
        self.start += n;
        self.consumed += n as u64;
    }

    /// Fills until at least `n` bytes are buffered; fails at end of file.
    pub fn fill_to(&mut self, n: usize) -> io::Result<()> {
        while self.buffered().len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("end of file with {} of {n} bytes", self.buffered().len()),
                ));
            }
        }
        Ok(())
    }

    /// Consumes the next `n` bytes, passing each buffered piece to `each` with its offset.
    pub fn consume_with(&mut self, n: u64, mut each: impl FnMut(u64, &[u8])) -> io::Result<()> {
        let mut done = 0;
        while done < n {
            if self.buffered().is_empty() && self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("end of file after {done} of {n} bytes"),
                ));
            }
            let take = usize::try_from(n - done)
                .unwrap_or(usize::MAX)
                .min(self.buffered().len());
            each(done, &self.buffered()[..take]);
            self.consume(take);
            done += take as u64;
        }
        Ok(())
    }

    /// Consumes the next `n` bytes.
    pub fn skip(&mut self, n: u64) -> io::Result<()> {
        self.consume_with(n, |_, _| {})
    }

    /// Whether the peer closed the connection before sending anything more: buffer empty and
    /// a read returns end of file.
    pub fn at_eof(&mut self) -> io::Result<bool> {
        Ok(self.buffered().is_empty() && self.fill()? == 0)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target, query included.
    pub target: String,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, up to and including the blank line.
    pub len: u64,
}

impl RequestHead {
    /// Values of header `name` (lower case), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The values of header `name` joined with ", " (as a list header's lines combine), or
    /// `None` if absent.
    pub fn joined(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self.values(name).collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// `Content-Length`, 0 if absent. Chunked request bodies are refused.
    pub fn content_length(&self) -> io::Result<u64> {
        if self.values("transfer-encoding").next().is_some() {
            return Err(invalid("chunked request bodies are not supported".into()));
        }
        match self.values("content-length").next() {
            None => Ok(0),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|e| invalid(format!("Content-Length {v:?}: {e}"))),
        }
    }

    /// Whether the client asked to close the connection after this request.
    pub fn wants_close(&self) -> bool {
        self.values("connection")
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// The value of query parameter `name` of the target, if present.
    pub fn query(&self, name: &str) -> Option<&str> {
        let (_, query) = self.target.split_once('?')?;
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// Reads the next request head. `Ok(None)` if the connection ends cleanly before its first byte.
pub fn read_request_head<R: Read>(reader: &mut Reader<R>) -> io::Result<Option<RequestHead>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(reader.buffered()) {
            Ok(httparse::Status::Complete(len)) => {
                let head = RequestHead {
                    method: request.method.unwrap_or_default().to_owned(),
                    target: request.path.unwrap_or_default().to_owned(),
                    headers: request
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    len: len as u64,
                };
                reader.consume(len);
                return Ok(Some(head));
            }
            Ok(httparse::Status::Partial) => {
                if reader.buffered().len() >= MAX_HEAD {
                    return Err(invalid(format!(
                        "request head longer than {MAX_HEAD} bytes"
                    )));
                }
                let had = reader.buffered().len();
                if reader.fill()? == 0 {
                    return if had == 0 {
                        Ok(None)
                    } else {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("connection ended inside a request head ({had} bytes)"),
                        ))
                    };
                }
            }
            Err(e) => {
                let start = &reader.buffered()[..reader.buffered().len().min(80)];
                return Err(invalid(format!(
                    "bad request head ({e}): {:?}",
                    String::from_utf8_lossy(start)
                )));
            }
        }
    }
}

/// What the client read of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseRead {
    /// The status code.
    pub status: u16,
    /// Body bytes after decoding.
    pub body: u64,
    /// Bytes read from the wire for this response: head, framing and body.
    pub wire: u64,
}

/// Reads one response with a chunked or `Content-Length` body, checking that the body of a
/// `200 OK` is the [`body_byte`] pattern.
pub fn read_response<R: Read>(reader: &mut Reader<R>) -> io::Result<ResponseRead> {
    let before = reader.consumed();
    let (status, chunked, length) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(reader.buffered()) {
            Ok(httparse::Status::Complete(len)) => {
                let value = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                };
                let chunked = value("transfer-encoding").is_some_and(|v| v.ends_with("chunked"));
                let length = value("content-length")
                    .map(|v| {
                        v.parse::<u64>()
                            .map_err(|e| invalid(format!("Content-Length {v:?}: {e}")))
                    })
                    .transpose()?;
                let status = response.code.unwrap_or_default();
                reader.consume(len);
                break (status, chunked, length);
            }
            Ok(httparse::Status::Partial) => {
                if reader.fill()? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection ended before a whole response head ({} bytes)",
                            reader.buffered().len()
                        ),
                    ));
                }
            }
            Err(e) => {
                let start = &reader.buffered()[..reader.buffered().len().min(80)];
                return Err(invalid(format!(
                    "bad response head ({e}): {:?}",
                    String::from_utf8_lossy(start)
                )));
            }
        }
    };
    let mut body = 0u64;
    let mut bad: Option<u64> = None;
    // An error page is not the pattern: its status says what went wrong.
    let verify = status == 200;
    let mut check = |base: u64, offset: u64, bytes: &[u8]| {
        if verify
            && bad.is_none()
            && let Some(i) = bytes
                .iter()
                .zip(base + offset..)
                .position(|(&b, at)| b != body_byte(at))
        {
            bad = Some(base + offset + i as u64);
        }
    };
    if chunked {
        loop {
            let (line, size) = loop {
                match httparse::parse_chunk_size(reader.buffered()) {
                    Ok(httparse::Status::Complete(found)) => break found,
                    Ok(httparse::Status::Partial) => reader.fill_to(reader.buffered().len() + 1)?,
                    Err(_) => {
                        let start = &reader.buffered()[..reader.buffered().len().min(40)];
                        return Err(invalid(format!(
                            "bad chunk size line after {body} body bytes: {:?}",
                            String::from_utf8_lossy(start)
                        )));
                    }
                }
            };
            reader.consume(line);
            if size == 0 {
                // Trailers (none expected), then the blank line.
                loop {
                    reader.fill_to(2)?;
                    let Some(eol) = reader.buffered().windows(2).position(|w| w == b"\r\n") else {
                        reader.fill_to(reader.buffered().len() + 1)?;
                        continue;
                    };
                    reader.consume(eol + 2);
                    if eol == 0 {
                        break;
                    }
                }
                break;
            }
            let base = body;
            reader.consume_with(size, |offset, bytes| check(base, offset, bytes))?;
            body += size;
            reader.fill_to(2)?;
            if &reader.buffered()[..2] != b"\r\n" {
                return Err(invalid(format!("no CRLF after a chunk ending at {body}")));
            }
            reader.consume(2);
        }
    } else if let Some(length) = length {
        reader.consume_with(length, |offset, bytes| check(0, offset, bytes))?;
        body = length;
    } else {
        return Err(invalid(format!(
            "status {status}: a response with neither chunked encoding nor a length"
        )));
    }
    if let Some(at) = bad {
        return Err(invalid(format!(
            "body byte {at} is not the expected pattern"
        )));
    }
    Ok(ResponseRead {
        status,
        body,
        wire: reader.consumed() - before,
    })
}

/// PROXY protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header, `PROXY TCP4 ...\r\n`.
    V1,
    /// The binary header.
    V2,
}

impl ProxyVersion {
    /// `v1` or `v2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

impl std::str::FromStr for ProxyVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" | "1" => Ok(Self::V1),
            "v2" | "2" => Ok(Self::V2),
            _ => Err(format!("PROXY protocol version {s:?}: expected v1 or v2")),
        }
    }
}

/// The 12-byte signature that starts a PROXY v2 header.
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The start of a PROXY v1 header.
const PROXY_V1_PREFIX: &[u8] = b"PROXY ";
/// Longest PROXY v1 header, CRLF included.
const PROXY_V1_MAX: usize = 107;

/// A PROXY header read at the start of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHeader {
    /// Which version.
    pub version: ProxyVersion,
    /// The source it claims: `None` for `LOCAL` (v2), `UNKNOWN` (v1) or an unsupported family.
    pub src: Option<SocketAddr>,
    /// The destination it claims.
    pub dst: Option<SocketAddr>,
    /// Bytes of the header.
    pub len: u64,
}

/// The PROXY header claiming a connection from `src` to `dst`. When the families differ, the
/// destination becomes the unspecified address of the source's family (v1 has no mixed form).
pub fn encode_proxy(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let dst = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V6(_)) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), dst.port()),
        (IpAddr::V6(_), IpAddr::V4(_)) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), dst.port()),
        _ => dst,
    };
    match version {
        ProxyVersion::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = PROXY_V2_SIGNATURE.to_vec();
            // Version 2, command PROXY.
            out.push(0x21);
            let mut addrs = Vec::new();
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    // AF_INET, STREAM.
                    out.push(0x11);
                    addrs.extend(s.octets());
                    addrs.extend(d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    // AF_INET6, STREAM.
                    out.push(0x21);
                    addrs.extend(s.octets());
                    addrs.extend(d.octets());
                }
                _ => unreachable!("the families were made equal above"),
            }
            addrs.extend(src.port().to_be_bytes());
            addrs.extend(dst.port().to_be_bytes());
            let len = u16::try_from(addrs.len()).expect("addresses fit in a v2 header");
            out.extend(len.to_be_bytes());
            out.extend(addrs);
            out
        }
    }
}

/// Reads a PROXY v1 or v2 header at the start of a connection, if there is one; leaves the
/// reader untouched otherwise. A header that starts right but is malformed is an error.
pub fn read_proxy_header<R: Read>(reader: &mut Reader<R>) -> io::Result<Option<ProxyHeader>> {
    // Read until the bytes so far cannot be the start of either signature, or are a whole one.
    loop {
        let buffered = reader.buffered();
        let n = buffered.len();
        let v1 = PROXY_V1_PREFIX.starts_with(&buffered[..n.min(PROXY_V1_PREFIX.len())]);
        let v2 = PROXY_V2_SIGNATURE.starts_with(&buffered[..n.min(PROXY_V2_SIGNATURE.len())]);
        if n > 0 && !v1 && !v2 {
            return Ok(None);
        }
        if v1 && n >= PROXY_V1_PREFIX.len() {
            return read_proxy_v1(reader).map(Some);
        }
        if v2 && n >= PROXY_V2_SIGNATURE.len() {
            return read_proxy_v2(reader).map(Some);
        }
        if reader.fill()? == 0 {
            // Too short to tell: whatever it is, it is not a PROXY header.
            return Ok(None);
        }
    }
}

fn read_proxy_v1<R: Read>(reader: &mut Reader<R>) -> io::Result<ProxyHeader> {
    let end = loop {
        let buffered = reader.buffered();
        if let Some(eol) = buffered.windows(2).position(|w| w == b"\r\n") {
            break eol + 2;
        }
        if buffered.len() >= PROXY_V1_MAX {
            return Err(invalid("PROXY v1 header without CRLF".into()));
        }
        reader.fill_to(buffered.len() + 1)?;
    };
    let line = String::from_utf8_lossy(&reader.buffered()[..end - 2]).into_owned();
    let fields: Vec<&str> = line.split(' ').collect();
    let (src, dst) = match fields[..] {
        ["PROXY", "UNKNOWN", ..] => (None, None),
        ["PROXY", "TCP4" | "TCP6", src, dst, sport, dport] => {
            let addr = |ip: &str, port: &str| -> io::Result<SocketAddr> {
                let ip: IpAddr = ip
                    .parse()
                    .map_err(|e| invalid(format!("PROXY v1 address {ip:?}: {e}")))?;
                let port: u16 = port
                    .parse()
                    .map_err(|e| invalid(format!("PROXY v1 port {port:?}: {e}")))?;
                Ok(SocketAddr::new(ip, port))
            };
            (Some(addr(src, sport)?), Some(addr(dst, dport)?))
        }
        _ => return Err(invalid(format!("bad PROXY v1 header {line:?}"))),
    };
    reader.consume(end);
    Ok(ProxyHeader {
        version: ProxyVersion::V1,
        src,
        dst,
        len: end as u64,
    })
}

fn read_proxy_v2<R: Read>(reader: &mut Reader<R>) -> io::Result<ProxyHeader> {
    reader.fill_to(16)?;
    let head = &reader.buffered()[..16];
    let (ver_cmd, family) = (head[12], head[13]);
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(invalid(format!(
            "PROXY v2 version/command byte {ver_cmd:#04x}"
        )));
    }
    reader.fill_to(16 + len)?;
    let body = &reader.buffered()[16..16 + len];
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let (src, dst) = match (ver_cmd & 0x0f, family) {
        // PROXY over TCP/IPv4.
        (1, 0x11) if len >= 12 => {
            let ip =
                |at: usize| IpAddr::from(<[u8; 4]>::try_from(&body[at..at + 4]).expect("4 bytes"));
            (
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            )
        }
        // PROXY over TCP/IPv6.
        (1, 0x21) if len >= 36 => {
            let ip = |at: usize| {
                IpAddr::from(<[u8; 16]>::try_from(&body[at..at + 16]).expect("16 bytes"))
            };
            (
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            )
        }
        // LOCAL, or a family the tests never send.
        (0, _) | (1, _) => (None, None),
        (cmd, _) => return Err(invalid(format!("PROXY v2 command {cmd}"))),
    };
    reader.consume(16 + len);
    Ok(ProxyHeader {
        version: ProxyVersion::V2,
        src,
        dst,
        len: (16 + len) as u64,
    })
}

/// `SOL_OUTFLOW`: the socket option level of the agent's annotation API.
pub const SOL_OUTFLOW: libc::c_int = 0x4f46;
/// `OUTFLOW_CLIENT_ID`: the option naming the connection's client from now on.
pub const OUTFLOW_CLIENT_ID: libc::c_int = 1;

/// `setsockopt(fd, SOL_OUTFLOW, OUTFLOW_CLIENT_ID, id)`: names the client of the connection for
/// the agent. Without an agent that handles it, the kernel answers `ENOPROTOOPT`.
pub fn annotate_client_id(socket: &impl std::os::fd::AsRawFd, id: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(id.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid socket, and a pointer and length that describe `id`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            SOL_OUTFLOW,
            OUTFLOW_CLIENT_ID,
            id.as_ptr().cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_bytes_is_what_write_response_writes() {
        for bytes in [0u64, 1, 15, 16, 17, 255, 256, 4095, 4096, 100_000, 1 << 20] {
            for chunk in [0u64, 1, 7, 16, 100, 4096, 65_536] {
                if chunk != 0 && bytes / chunk > 20_000 {
                    continue;
                }
                let mut out = Vec::new();
                let written = write_response(&mut out, bytes, chunk).expect("write to a Vec");
                assert_eq!(written, out.len() as u64, "{bytes} in {chunk}");
                assert_eq!(written, response_bytes(bytes, chunk), "{bytes} in {chunk}");
                let mut reader = Reader::new(&out[..]);
                let read = read_response(&mut reader).expect("a well-formed response");
                assert_eq!(
                    read,
                    ResponseRead {
                        status: 200,
                        body: bytes,
                        wire: written
                    }
                );
            }
        }
    }

    #[test]
    fn a_wrong_body_byte_is_an_error() {
        let mut out = Vec::new();
        write_response(&mut out, 100, 10).expect("write to a Vec");
        // The last body byte: before its CRLF and the last chunk (7 bytes).
        let at = out.len() - 8;
        out[at] = b'!';
        let err = read_response(&mut Reader::new(&out[..])).expect_err("a corrupted body");
        assert!(
            err.to_string().contains("not the expected pattern"),
            "{err}"
        );
    }

    #[test]
    fn requests_are_read_one_at_a_time() {
        let two = b"POST /v1/stream?bytes=5&chunk=2&req=a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-Client-Id: t1\r\n\r\nabcGET /v1/stream?bytes=0&req=b HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut reader = Reader::new(&two[..]);
        let first = read_request_head(&mut reader)
            .expect("read")
            .expect("a request");
        assert_eq!(first.method, "POST");
        assert_eq!(first.query("bytes"), Some("5"));
        assert_eq!(first.query("req"), Some("a"));
        assert_eq!(first.joined("x-client-id").as_deref(), Some("t1"));
        assert_eq!(first.content_length().expect("a length"), 3);
        reader.skip(3).expect("the body");
        assert_eq!(reader.consumed(), first.len + 3);
        let second = read_request_head(&mut reader)
            .expect("read")
            .expect("a request");
        assert_eq!(second.query("req"), Some("b"));
        assert!(second.wants_close());
        assert!(read_request_head(&mut reader).expect("read").is_none());
    }

    #[test]
    fn proxy_headers_round_trip() {
        let cases = [
            ("198.51.100.7:40000", "198.18.0.1:8000"),
            ("[2001:db8:100::7]:40000", "[2001:db8::1]:8000"),
            ("[2001:db8:100::7]:40000", "198.18.0.1:8000"),
        ];
        for (src, dst) in cases {
            let (src, dst): (SocketAddr, SocketAddr) =
                (src.parse().expect("addr"), dst.parse().expect("addr"));
            for version in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut bytes = encode_proxy(version, src, dst);
                let len = bytes.len() as u64;
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
                let mut reader = Reader::new(&bytes[..]);
                let header = read_proxy_header(&mut reader)
                    .expect("read")
                    .expect("a header");
                assert_eq!(header.version, version);
                assert_eq!(header.src, Some(src));
                assert_eq!(header.len, len);
                assert_eq!(reader.consumed(), len);
                assert!(read_request_head(&mut reader).expect("read").is_some());
            }
        }
    }

    #[test]
    fn no_proxy_header_leaves_the_request_alone() {
        let request = b"GET / HTTP/1.1\r\n\r\n";
        let mut reader = Reader::new(&request[..]);
        assert!(read_proxy_header(&mut reader).expect("read").is_none());
        assert_eq!(reader.consumed(), 0);
        assert!(read_request_head(&mut reader).expect("read").is_some());
    }
}
