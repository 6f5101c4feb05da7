//! What the bytes of a turn are: an HTTP/1.x request head (parsed with `httparse`), TLS, the
//! HTTP/2 prior-knowledge preface, or something else.
/// At most this many header lines are read from one request head.
pub const MAX_HEADERS: usize = 100;
/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// This many bytes of the preface tell HTTP/2 from a request whose method starts with `P`.
const H2_DECIDES: usize = 4;

/// What the bytes of a turn are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    /// A prefix of a request head: more bytes are needed to tell.
    Incomplete,
    Request(Request),
    /// A request head with more than [`MAX_HEADERS`] header lines: its headers are not read.
    TooManyHeaders,
    /// A TLS record (handshake, `0x16 0x03`).
    Tls,
    /// The HTTP/2 preface, or a prefix of it long enough to tell.
    Http2,
    /// Anything else.
    NotHttp,
}

/// A complete HTTP/1.x request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Bytes of the head, the empty line included: the body starts here.
    pub header_len: usize,
    /// The header lines in order: lower-case name, value as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Body,
    /// The capture holds bytes beyond this request (its head and a `Content-Length` body): a
    /// second request in the same turn.
    pub pipelined: bool,
}

impl Request {
    /// The values of the header `name` (lower-case), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn has(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n == name)
    }
}

/// How the request's body is delimited (RFC 9112, section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// No `Content-Length`, no `Transfer-Encoding`: no body.
    None,
    ContentLength(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// A length that cannot be known from the head: a `Transfer-Encoding` other than chunked, an
    /// invalid `Content-Length`, or several that differ.
    Unknown,
}

/// Classifies the bytes of a turn.
pub fn classify(bytes: &[u8]) -> Head {
    match bytes {
        [] => return Head::Incomplete,
        [0x16] => return Head::Incomplete,
        [0x16, 0x03, ..] => return Head::Tls,
        [0x16, ..] => return Head::NotHttp,
        _ => {}
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] && n >= H2_DECIDES {
        return Head::Http2;
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let header_len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Incomplete,
        Err(httparse::Error::TooManyHeaders) => return Head::TooManyHeaders,
        Err(_) => return Head::NotHttp,
    };
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let body = body(&headers);
    let rest = &bytes[header_len..];
    let pipelined = match body {
        Body::None => rest.iter().any(|&b| b != b'\r' && b != b'\n'),
        Body::ContentLength(len) => {
            // Blank lines between requests are allowed (RFC 9112, section 2.2).
            let after = usize::try_from(len).ok().and_then(|len| rest.get(len..));
            after.is_some_and(|a| a.iter().any(|&b| b != b'\r' && b != b'\n'))
        }
        Body::Chunked | Body::Unknown => false,
    };
    Head::Request(Request {
        header_len,
        headers,
        body,
        pipelined,
    })
}

fn body(headers: &[(String, Vec<u8>)]) -> Body {
    let mut te = headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .peekable();
    if te.peek().is_some() {
        // The final coding decides; anything but chunked leaves the length unknown.
        let last = te
            .flat_map(|(_, v)| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|c| !c.is_empty());
        return match last {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => Body::Chunked,
            _ => Body::Unknown,
        };
    }
    let mut length = None;
    for (_, v) in headers.iter().filter(|(n, _)| n == "content-length") {
        // A list of equal values is allowed (RFC 9110, section 8.6).
        for part in v.split(|&b| b == b',') {
            let part = part.trim_ascii();
            let parsed =
                (!part.is_empty() && part.len() <= 20 && part.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
                    .flatten();
            match (parsed, length) {
                (None, _) => return Body::Unknown,
                (Some(p), Some(l)) if p != l => return Body::Unknown,
                (Some(p), _) => length = Some(p),
            }
        }
    }
    length.map_or(Body::None, Body::ContentLength)
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What nginx sends upstream with `proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for`.
    pub(crate) const NGINX_UPSTREAM: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\n\
Host: inference.internal:8000\r\n\
X-Real-IP: 198.51.100.23\r\n\
X-Forwarded-For: 203.0.113.50, 198.51.100.23\r\n\
X-Forwarded-Proto: https\r\n\
Connection: close\r\n\
Content-Length: 57\r\n\
content-type: application/json\r\n\
x-client-id: team-search\r\n\
\r\n\
{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";

    /// The start of a TLS 1.3 ClientHello record as curl sends it.
    pub(crate) const TLS_CLIENT_HELLO: &[u8] = &[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5b, 0x1e, 0x7e, 0x4a,
        0x9f, 0x2c, 0x11, 0x83,
    ];

    pub(crate) const TWO_PIPELINED_GETS: &[u8] =
        b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n";

    fn request(bytes: &[u8]) -> Request {
        match classify(bytes) {
            Head::Request(r) => r,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn nginx_upstream_request() {
        let r = request(NGINX_UPSTREAM);
        assert_eq!(r.body, Body::ContentLength(57));
        assert!(!r.pipelined);
        assert_eq!(r.header_len, NGINX_UPSTREAM.len() - 57);
        assert_eq!(
            r.values("x-forwarded-for").collect::<Vec<_>>(),
            [&b"203.0.113.50, 198.51.100.23"[..]]
        );
        assert_eq!(
            r.values("x-client-id").collect::<Vec<_>>(),
            [&b"team-search"[..]]
        );
        assert!(r.has("content-type") && !r.has("Content-Type"));
        assert_eq!(r.headers.len(), 8);
    }

    #[test]
    fn classify_table() {
        let cases: &[(&[u8], Head)] = &[
            (b"", Head::Incomplete),
            (b"G", Head::Incomplete),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", Head::Incomplete),
            (b"\x16", Head::Incomplete),
            (TLS_CLIENT_HELLO, Head::Tls),
            (b"\x16\x03", Head::Tls),
            (b"\x16\x01", Head::NotHttp),
            (H2_PREFACE, Head::Http2),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
                Head::Http2,
            ),
            (b"PRI ", Head::Http2),
            (b"P", Head::Incomplete),
            (b"PRI", Head::Incomplete),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Head::NotHttp),
            (b"\x00\x00\x00\x01", Head::NotHttp),
            (b"{\"prompt\": \"hi\"}", Head::NotHttp),
            (b"GET / HTTP/2.0\r\n\r\n", Head::NotHttp),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", Head::NotHttp),
        ];
        for (input, want) in cases {
            assert_eq!(
                &classify(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn body_and_pipelining() {
        // (request, body, pipelined)
        let cases: &[(&[u8], Body, bool)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", Body::None, false),
            (b"GET / HTTP/1.1\r\n\r\n\r\n", Body::None, false),
            (TWO_PIPELINED_GETS, Body::None, true),
            (b"GET / HTTP/1.1\r\n\r\nG", Body::None, true),
            (b"HEAD / HTTP/1.0\r\n\r\n", Body::None, false),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab", Body::ContentLength(3), false),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", Body::ContentLength(3), false),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\r\n", Body::ContentLength(3), false),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n", Body::ContentLength(3), true),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc", Body::ContentLength(3), false),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n", Body::ContentLength(3), false),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", Body::Unknown, false),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\nx", Body::Unknown, false),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\nx", Body::Unknown, false),
            (b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\nx", Body::ContentLength(u64::MAX), false),
            (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\nx", Body::Unknown, false),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n", Body::Chunked, false),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, Chunked\r\nContent-Length: 3\r\n\r\n", Body::Chunked, false),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", Body::Unknown, false),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", Body::Chunked, false),
        ];
        for (input, body, pipelined) in cases {
            let r = request(input);
            assert_eq!(
                (r.body, r.pipelined),
                (*body, *pipelined),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn header_count_is_bounded() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            req.extend(format!("h{i}: v\r\n").bytes());
        }
        let mut full = req.clone();
        full.extend(b"\r\n");
        assert_eq!(request(&full).headers.len(), MAX_HEADERS);
        req.extend(b"one-more: v\r\n\r\n");
        assert_eq!(classify(&req), Head::TooManyHeaders);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1000)) {
            if let Head::Request(r) = classify(&bytes) {
                prop_assert!(r.header_len <= bytes.len());
                prop_assert!(r.headers.len() <= MAX_HEADERS);
            }
        }

        #[test]
        fn prefixes_of_a_request_are_incomplete(cut in 0usize..200) {
            let cut = cut.min(NGINX_UPSTREAM.len() - 58);
            prop_assert_eq!(classify(&NGINX_UPSTREAM[..cut]), Head::Incomplete);
        }
    }
}
