//! The decisions: who the client of each turn of a connection is. The rules are in the crate
//! documentation (`lib.rs`).
use std::net::IpAddr;

use crate::{
    config::{ConfigError, HeaderKind, HeaderRule, Settings, SourceKind},
    forwarded,
    hash::{IdHasher, KeyTooShort},
    http::{self, Head, Request},
    proxy::{self, ProxyParse},
    trust::{TrustedPeers, normalize, rightmost_untrusted},
};

/// Settings that cannot be used, or a key that does not fit them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttributionError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    KeyTooShort(#[from] KeyTooShort),
    #[error(
        "attribution.id_key_file: ids are hashed (hash_ids = true) and can occur, but no key was read"
    )]
    MissingKey,
}

/// Who a client is, as reported.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Client {
    /// Normalised: never an IPv4-mapped IPv6 address.
    pub addr: IpAddr,
    /// A hashed (or raw) id, when a trusted header or an annotation gave one.
    pub id: Option<String>,
    pub source: Source,
}

/// Where a [`Client`] came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The TCP peer.
    Peer,
    /// A PROXY v1 header from a trusted peer.
    ProxyV1,
    /// A PROXY v2 header from a trusted peer.
    ProxyV2,
    /// A configured header (lower-case name) from a trusted sender.
    Header(String),
    /// An annotation set on the socket by the serving application.
    Annotation,
}

impl Source {
    /// `peer`, `proxy-v1`, `proxy-v2`, `header:<name>`, `annotation`: at most 71 characters,
    /// within the protocol's 128 for `ConnDelta.client_source`.
    pub fn as_wire(&self) -> String {
        match self {
            Source::Peer => "peer".into(),
            Source::ProxyV1 => "proxy-v1".into(),
            Source::ProxyV2 => "proxy-v2".into(),
            Source::Header(name) => format!("header:{name}"),
            Source::Annotation => "annotation".into(),
        }
    }

    /// The kind that `precedence` ranks.
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::Peer => SourceKind::Peer,
            Source::ProxyV1 | Source::ProxyV2 => SourceKind::Proxy,
            Source::Header(_) => SourceKind::Header,
            Source::Annotation => SourceKind::Annotation,
        }
    }
}

/// Why a turn was given the connection's client rather than one of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unattributed {
    /// The connection is TLS: its requests cannot be read.
    Tls,
    /// The connection is HTTP/2 (prior knowledge): not parsed.
    Http2,
    /// The connection's first bytes are neither HTTP/1.x, TLS nor HTTP/2.
    NotHttp,
    /// Several requests in one turn: they may come from different clients.
    Pipelined,
    /// The turn ended before its request head did (or the head had too many header lines).
    HeadersTruncated,
    /// A PROXY header that is not valid.
    MalformedProxy,
}

impl Unattributed {
    pub fn as_str(self) -> &'static str {
        match self {
            Unattributed::Tls => "tls",
            Unattributed::Http2 => "http2",
            Unattributed::NotHttp => "not_http",
            Unattributed::Pipelined => "pipelined",
            Unattributed::HeadersTruncated => "headers_truncated",
            Unattributed::MalformedProxy => "malformed_proxy",
        }
    }
}

/// The outcome of [`ConnState::turn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The bytes so far do not decide: call again with more (or with `complete`).
    NeedMore,
    Done(Turn),
}

/// The client of a turn, from its bytes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    pub client: Client,
    /// Set when the turn could not be attributed on its own (the connection's client is used).
    pub unattributed: Option<Unattributed>,
    /// PROXY headers and configured headers that came from untrusted senders and were ignored.
    pub ignored_claims: u32,
}

/// The settings, ready to judge connections. One per agent, shared by all connections.
#[derive(Clone, Debug)]
pub struct Resolver {
    trusted: TrustedPeers,
    proxy_protocol: bool,
    annotations: bool,
    /// Names lower-case, in configured order.
    rules: Vec<HeaderRule>,
    /// Present when ids can occur (an id header, or annotations).
    hasher: Option<IdHasher>,
    /// Rank of each [`SourceKind`] (index by `rank_index`): 0 is the highest.
    ranks: [usize; 4],
}

fn rank_index(kind: SourceKind) -> usize {
    match kind {
        SourceKind::Annotation => 0,
        SourceKind::Header => 1,
        SourceKind::Proxy => 2,
        SourceKind::Peer => 3,
    }
}

impl Resolver {
    /// Checks `settings` and builds the id hasher from the key file's bytes (`id_key`, needed
    /// when ids are hashed and can occur; checked whenever given).
    pub fn new(settings: &Settings, id_key: Option<&[u8]>) -> Result<Self, AttributionError> {
        settings.validate()?;
        let keyed = match (settings.hash_ids, id_key) {
            (true, Some(key)) => Some(IdHasher::keyed(key)?),
            _ => None,
        };
        let hasher = if !settings.ids_possible() {
            None
        } else if !settings.hash_ids {
            Some(IdHasher::raw())
        } else {
            Some(keyed.ok_or(AttributionError::MissingKey)?)
        };
        let mut ranks = [usize::MAX; 4];
        for (rank, kind) in settings.precedence.iter().enumerate() {
            ranks[rank_index(*kind)] = rank;
        }
        let rules = settings
            .headers
            .iter()
            .map(|r| HeaderRule {
                name: r.name.to_ascii_lowercase(),
                kind: r.kind,
            })
            .collect();
        Ok(Self {
            trusted: TrustedPeers::new(&settings.trusted_peers),
            proxy_protocol: settings.proxy_protocol,
            annotations: settings.annotations,
            rules,
            hasher,
            ranks,
        })
    }

    /// The state of a new connection from `peer` (the TCP remote address).
    pub fn connection(&self, peer: IpAddr) -> ConnState {
        let peer = normalize(peer);
        let conn = Client {
            addr: peer,
            id: None,
            source: Source::Peer,
        };
        ConnState {
            peer,
            sender: peer,
            current: conn.clone(),
            conn,
            proto: Proto::Unknown,
            in_turn: false,
            pending_annotation: None,
        }
    }

    /// `a` ranks strictly above `b` in `precedence`.
    fn above(&self, a: &Source, b: &Source) -> bool {
        self.ranks[rank_index(a.kind())] < self.ranks[rank_index(b.kind())]
    }

    fn id(&self, value: &[u8]) -> Option<String> {
        self.hasher.as_ref()?.id(value)
    }
}

/// What the connection's bytes turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    /// No turn has been classified yet.
    Unknown,
    Http,
    /// TLS, HTTP/2, something else, or a bad PROXY header: no later turn is read.
    Opaque,
}

/// The attribution state of one live connection.
#[derive(Clone, Debug)]
pub struct ConnState {
    /// The TCP peer, normalised.
    peer: IpAddr,
    /// The connection's client: the peer, or the source of a trusted PROXY header.
    conn: Client,
    /// Who hands us the requests: the source of a trusted PROXY header, else the peer.
    sender: IpAddr,
    /// The client from now on.
    current: Client,
    proto: Proto,
    /// A turn has started and is not decided yet.
    in_turn: bool,
    /// An annotation that came during the undecided turn; applied when it is decided.
    pending_annotation: Option<String>,
}

/// A decided turn, before it is committed to the state.
struct Judged {
    conn: Client,
    sender: IpAddr,
    proto: Proto,
    client: Client,
    unattributed: Option<Unattributed>,
    ignored_claims: u32,
}

impl ConnState {
    /// `capture`: all bytes captured so far of this turn (the agent concatenates chunks).
    /// `first`: this is the connection's first turn (PROXY header possible only there).
    /// `complete`: no more bytes of this turn will come (capture budget used up, next turn
    /// started, connection closed, or the server already answered).
    ///
    /// Call it again with the longer capture after [`Progress::NeedMore`]; after
    /// [`Progress::Done`] the next call starts the next turn. With `complete` the answer is
    /// always `Done`.
    pub fn turn(&mut self, r: &Resolver, first: bool, capture: &[u8], complete: bool) -> Progress {
        if !self.in_turn {
            self.in_turn = true;
            self.pending_annotation = None;
        }
        let Some(mut judged) = self.judge(r, first, capture, complete) else {
            return Progress::NeedMore;
        };
        if let Some(id) = self.pending_annotation.take()
            && r.above(&Source::Annotation, &judged.client.source)
        {
            judged.client = Client {
                addr: judged.client.addr,
                id: Some(id),
                source: Source::Annotation,
            };
        }
        self.in_turn = false;
        self.conn = judged.conn;
        self.sender = judged.sender;
        self.proto = judged.proto;
        self.current = judged.client.clone();
        Progress::Done(Turn {
            client: judged.client,
            unattributed: judged.unattributed,
            ignored_claims: judged.ignored_claims,
        })
    }

    /// The serving application named the client (`value`, hashed like header ids). Returns the
    /// new client, or `None` if annotations are off, the value is empty, or annotation ranks
    /// below the current client's source. An annotation that comes while a turn is undecided
    /// also applies to that turn's client when it is decided (if it ranks above it).
    pub fn annotate(&mut self, r: &Resolver, value: &[u8]) -> Option<Client> {
        if !r.annotations {
            return None;
        }
        let id = r.id(value)?;
        if self.in_turn {
            self.pending_annotation = Some(id.clone());
        }
        if !r.above(&Source::Annotation, &self.current.source) {
            return None;
        }
        self.current = Client {
            addr: self.current.addr,
            id: Some(id),
            source: Source::Annotation,
        };
        Some(self.current.clone())
    }

    /// The client from now on: the last decided turn's (or the peer before any).
    pub fn current(&self) -> &Client {
        &self.current
    }

    /// Decides the turn, or `None` if more bytes are needed. Changes nothing.
    fn judge(&self, r: &Resolver, first: bool, capture: &[u8], complete: bool) -> Option<Judged> {
        let mut judged = Judged {
            conn: self.conn.clone(),
            sender: self.sender,
            proto: self.proto,
            client: self.conn.clone(),
            unattributed: None,
            ignored_claims: 0,
        };
        if self.proto == Proto::Opaque {
            // Counted once, in the turn that found it; the client stays what it was.
            judged.client = self.current.clone();
            return Some(judged);
        }
        let mut rest = capture;
        if first && r.proxy_protocol && !capture.is_empty() {
            let peer_trusted = r.trusted.contains(self.peer);
            match proxy::parse(capture) {
                ProxyParse::NotProxy => {}
                ProxyParse::Incomplete if !complete => return None,
                ProxyParse::Incomplete => {
                    judged.proto = Proto::Opaque;
                    judged.unattributed = Some(Unattributed::HeadersTruncated);
                    return Some(judged);
                }
                ProxyParse::Malformed(_) => {
                    judged.proto = Proto::Opaque;
                    judged.unattributed = Some(Unattributed::MalformedProxy);
                    judged.ignored_claims = u32::from(!peer_trusted);
                    return Some(judged);
                }
                ProxyParse::Header(h) => {
                    if !peer_trusted {
                        judged.ignored_claims += 1;
                    } else if let Some(src) = h.source {
                        let proxied = Client {
                            addr: normalize(src.ip()),
                            id: None,
                            source: if h.version == 1 {
                                Source::ProxyV1
                            } else {
                                Source::ProxyV2
                            },
                        };
                        judged.sender = proxied.addr;
                        if r.above(&proxied.source, &judged.conn.source) {
                            judged.conn = proxied;
                        }
                    }
                    rest = capture.get(h.len..).unwrap_or_default();
                }
            }
        }
        judged.client = judged.conn.clone();
        if rest.is_empty() {
            return complete.then_some(judged);
        }
        let was_http = self.proto == Proto::Http;
        let opaque = match http::classify(rest) {
            Head::Incomplete if !complete => return None,
            Head::Incomplete => {
                judged.unattributed = Some(Unattributed::HeadersTruncated);
                return Some(judged);
            }
            Head::TooManyHeaders => {
                judged.proto = Proto::Http;
                judged.unattributed = Some(Unattributed::HeadersTruncated);
                return Some(judged);
            }
            Head::Request(req) => {
                judged.proto = Proto::Http;
                if req.pipelined {
                    judged.unattributed = Some(Unattributed::Pipelined);
                } else {
                    let (client, ignored) = header_client(r, &judged.conn, judged.sender, &req);
                    judged.client = client;
                    judged.ignored_claims += ignored;
                }
                return Some(judged);
            }
            Head::Tls => Unattributed::Tls,
            Head::Http2 => Unattributed::Http2,
            Head::NotHttp => Unattributed::NotHttp,
        };
        if was_http {
            // More of a request (a body after `100 Continue`, an upgraded protocol): the
            // request's client goes on.
            judged.client = self.current.clone();
        } else {
            judged.proto = Proto::Opaque;
            judged.unattributed = Some(opaque);
        }
        Some(judged)
    }
}

/// The client a request's configured headers name, and the number of ignored claims (0 or 1).
fn header_client(r: &Resolver, conn: &Client, sender: IpAddr, req: &Request) -> (Client, u32) {
    if !r.rules.iter().any(|rule| req.has(&rule.name)) {
        return (conn.clone(), 0);
    }
    if !r.trusted.contains(sender) {
        return (conn.clone(), 1);
    }
    let mut client = Client {
        addr: conn.addr,
        id: None,
        source: conn.source.clone(),
    };
    let address_rule = r
        .rules
        .iter()
        .find(|rule| rule.kind == HeaderKind::Address && req.has(&rule.name));
    if let Some(rule) = address_rule {
        let hops = forwarded::hops(&rule.name, req.values(&rule.name));
        let walk = rightmost_untrusted(&hops, sender, &r.trusted);
        if walk.from_hops {
            client.addr = walk.addr;
            client.source = Source::Header(rule.name.clone());
        }
    }
    // Of several lines of one id header, the last (the one the nearest proxy added) counts.
    let id = r
        .rules
        .iter()
        .filter(|rule| rule.kind == HeaderKind::Id)
        .find_map(|rule| {
            let value = req
                .values(&rule.name)
                .filter(|v| !v.trim_ascii().is_empty())
                .last()?;
            Some((rule, r.id(value)?))
        });
    if let Some((rule, id)) = id {
        client.id = Some(id);
        client.source = Source::Header(rule.name.clone());
    }
    if client.source != conn.source && r.above(&client.source, &conn.source) {
        (client, 0)
    } else {
        (conn.clone(), 0)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        http::tests::{NGINX_UPSTREAM, TLS_CLIENT_HELLO, TWO_PIPELINED_GETS},
        proxy::tests::v2,
    };

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const GATEWAY: &str = "10.0.0.5";
    const OUTSIDER: &str = "198.51.100.7";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(name: &str, kind: HeaderKind) -> HeaderRule {
        HeaderRule {
            name: name.into(),
            kind,
        }
    }

    /// Trusts 10.0.0.0/8; x-forwarded-for, forwarded (addresses) and x-client-id (id), raw ids.
    fn settings() -> Settings {
        Settings {
            trusted_peers: vec!["10.0.0.0/8".parse().unwrap()],
            hash_ids: false,
            annotations: true,
            headers: vec![
                rule("x-forwarded-for", HeaderKind::Address),
                rule("forwarded", HeaderKind::Address),
                rule("x-client-id", HeaderKind::Id),
            ],
            ..Settings::default()
        }
    }

    fn resolver(s: &Settings) -> Resolver {
        Resolver::new(s, Some(KEY)).unwrap()
    }

    fn client(addr: &str, id: Option<&str>, source: Source) -> Client {
        Client {
            addr: ip(addr),
            id: id.map(Into::into),
            source,
        }
    }

    fn header(name: &str) -> Source {
        Source::Header(name.into())
    }

    fn done(client: Client, unattributed: Option<Unattributed>, ignored_claims: u32) -> Progress {
        Progress::Done(Turn {
            client,
            unattributed,
            ignored_claims,
        })
    }

    fn get(headers: &str) -> Vec<u8> {
        format!("GET /v1/models HTTP/1.1\r\nHost: h\r\n{headers}\r\n").into_bytes()
    }

    fn with_proxy(header: Vec<u8>, rest: &[u8]) -> Vec<u8> {
        [header, rest.to_vec()].concat()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// One complete first turn from `peer`.
    fn first_turn(r: &Resolver, peer: &str, capture: &[u8]) -> Progress {
        r.connection(ip(peer)).turn(r, true, capture, true)
    }

    #[test]
    fn first_turn_table() {
        let r = resolver(&settings());
        let haproxy = v2(
            sa("203.0.113.7:40000"),
            sa("10.1.2.3:8080"),
            &[(0x05, b"c1")],
        );
        let gw_proxy = v2(sa("10.9.9.9:40000"), sa("10.1.2.3:8080"), &[]);
        let forwarded =
            get("Forwarded: for=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.3\r\n");
        let cases: Vec<(&str, &str, Vec<u8>, Progress)> = vec![
            (
                "nginx upstream: right-most untrusted hop and the id",
                GATEWAY,
                NGINX_UPSTREAM.to_vec(),
                done(
                    client("198.51.100.23", Some("team-search"), header("x-client-id")),
                    None,
                    0,
                ),
            ),
            (
                "no configured header: the peer",
                GATEWAY,
                get(""),
                done(client(GATEWAY, None, Source::Peer), None, 0),
            ),
            (
                "address header only",
                GATEWAY,
                get("X-Forwarded-For: 203.0.113.9\r\n"),
                done(
                    client("203.0.113.9", None, header("x-forwarded-for")),
                    None,
                    0,
                ),
            ),
            (
                "id header only: the peer's address",
                GATEWAY,
                get("X-Client-Id: k-1\r\n"),
                done(client(GATEWAY, Some("k-1"), header("x-client-id")), None, 0),
            ),
            (
                "empty id: no id",
                GATEWAY,
                get("X-Client-Id:   \r\n"),
                done(client(GATEWAY, None, Source::Peer), None, 0),
            ),
            (
                "several id lines: the last non-empty one",
                GATEWAY,
                get("X-Client-Id: forged\r\nX-Client-Id: real\r\nX-Client-Id: \r\n"),
                done(
                    client(GATEWAY, Some("real"), header("x-client-id")),
                    None,
                    0,
                ),
            ),
            (
                "several lines of XFF are one list",
                GATEWAY,
                get("X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 10.0.0.8\r\n"),
                done(
                    client("203.0.113.9", None, header("x-forwarded-for")),
                    None,
                    0,
                ),
            ),
            (
                "all hops trusted: the left-most",
                GATEWAY,
                get("X-Forwarded-For: 10.0.0.8, 10.0.0.9\r\n"),
                done(client("10.0.0.8", None, header("x-forwarded-for")), None, 0),
            ),
            (
                "unparsable hop: the hop to its right",
                GATEWAY,
                get("X-Forwarded-For: 203.0.113.9, garbage, 10.0.0.9\r\n"),
                done(client("10.0.0.9", None, header("x-forwarded-for")), None, 0),
            ),
            (
                "unparsable last hop: the sender",
                GATEWAY,
                get("X-Forwarded-For: 203.0.113.9, garbage\r\n"),
                done(client(GATEWAY, None, Source::Peer), None, 0),
            ),
            (
                "the first configured address header wins",
                GATEWAY,
                get("Forwarded: for=203.0.113.1\r\nX-Forwarded-For: 203.0.113.2\r\n"),
                done(
                    client("203.0.113.2", None, header("x-forwarded-for")),
                    None,
                    0,
                ),
            ),
            (
                "Forwarded with a quoted IPv6",
                GATEWAY,
                forwarded.clone(),
                done(
                    client("2001:db8:cafe::17", None, header("forwarded")),
                    None,
                    0,
                ),
            ),
            (
                "forged XFF from an untrusted direct client",
                OUTSIDER,
                get("X-Forwarded-For: 10.0.0.1\r\nX-Client-Id: admin\r\n"),
                done(client(OUTSIDER, None, Source::Peer), None, 1),
            ),
            (
                "HAProxy PROXY v2 then a request",
                GATEWAY,
                with_proxy(haproxy.clone(), &get("")),
                done(client("203.0.113.7", None, Source::ProxyV2), None, 0),
            ),
            (
                "PROXY v2 then XFF: the PROXY source is the sender, not trusted",
                GATEWAY,
                with_proxy(haproxy.clone(), &get("X-Forwarded-For: 1.1.1.1\r\n")),
                done(client("203.0.113.7", None, Source::ProxyV2), None, 1),
            ),
            (
                "PROXY v2 from a trusted gateway then XFF: the walk starts at the PROXY source",
                GATEWAY,
                with_proxy(gw_proxy.clone(), &get("X-Forwarded-For: 203.0.113.9\r\n")),
                done(
                    client("203.0.113.9", None, header("x-forwarded-for")),
                    None,
                    0,
                ),
            ),
            (
                "PROXY v2 from an untrusted peer: ignored, the request still read",
                OUTSIDER,
                with_proxy(haproxy.clone(), &get("X-Forwarded-For: 1.1.1.1\r\n")),
                done(client(OUTSIDER, None, Source::Peer), None, 2),
            ),
            (
                "PROXY v1",
                GATEWAY,
                with_proxy(
                    b"PROXY TCP6 2001:db8::9 2001:db8::1 5000 80\r\n".to_vec(),
                    &get(""),
                ),
                done(client("2001:db8::9", None, Source::ProxyV1), None, 0),
            ),
            (
                "PROXY v1 UNKNOWN keeps the peer",
                GATEWAY,
                with_proxy(b"PROXY UNKNOWN\r\n".to_vec(), &get("")),
                done(client(GATEWAY, None, Source::Peer), None, 0),
            ),
            (
                "PROXY v2 LOCAL keeps the peer",
                GATEWAY,
                with_proxy(
                    [&proxy::V2_SIGNATURE[..], &[0x20, 0x00, 0, 0]].concat(),
                    &get(""),
                ),
                done(client(GATEWAY, None, Source::Peer), None, 0),
            ),
            (
                "malformed PROXY from a trusted peer",
                GATEWAY,
                b"PROXY TCP4 1.2.3.4\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
                done(
                    client(GATEWAY, None, Source::Peer),
                    Some(Unattributed::MalformedProxy),
                    0,
                ),
            ),
            (
                "malformed PROXY from an untrusted peer",
                OUTSIDER,
                b"PROXY TCP4 1.2.3.4\r\n".to_vec(),
                done(
                    client(OUTSIDER, None, Source::Peer),
                    Some(Unattributed::MalformedProxy),
                    1,
                ),
            ),
            (
                "PROXY cut short",
                GATEWAY,
                haproxy[..20].to_vec(),
                done(
                    client(GATEWAY, None, Source::Peer),
                    Some(Unattributed::HeadersTruncated),
                    0,
                ),
            ),
            (
                "PROXY v2 alone, turn over",
                GATEWAY,
                haproxy.clone(),
                done(client("203.0.113.7", None, Source::ProxyV2), None, 0),
            ),
            (
                "TLS ClientHello",
                GATEWAY,
                TLS_CLIENT_HELLO.to_vec(),
                done(
                    client(GATEWAY, None, Source::Peer),
                    Some(Unattributed::Tls),
                    0,
                ),
            ),
            (
                "PROXY v2 then TLS",
                GATEWAY,
                with_proxy(haproxy.clone(), TLS_CLIENT_HELLO),
                done(
                    client("203.0.113.7", None, Source::ProxyV2),
                    Some(Unattributed::Tls),
                    0,
                ),
            ),
            (
                "h2 preface",
                GATEWAY,
                http::H2_PREFACE.to_vec(),
                done(
                    client(GATEWAY, None, Source::Peer),
                    Some(Unattributed::Http2),
                    0,
                ),
            ),
            (
                "not HTTP",
                OUTSIDER,
                b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(),
                done(
                    client(OUTSIDER, None, Source::Peer),
                    Some(Unattributed::NotHttp),
                    0,
                ),
            ),
            (
                "two pipelined GETs",
                GATEWAY,
                TWO_PIPELINED_GETS.to_vec(),
                done(
                    client(GATEWAY, None, Source::Peer),
                    Some(Unattributed::Pipelined),
                    0,
                ),
            ),
            (
                "head cut short",
                GATEWAY,
                b"GET / HTTP/1.1\r\nX-Forwarded-For: 1.1".to_vec(),
                done(
                    client(GATEWAY, None, Source::Peer),
                    Some(Unattributed::HeadersTruncated),
                    0,
                ),
            ),
            (
                "IPv4-mapped peer and hop are normalised",
                "::ffff:10.0.0.5",
                get("X-Forwarded-For: ::ffff:203.0.113.9\r\n"),
                done(
                    client("203.0.113.9", None, header("x-forwarded-for")),
                    None,
                    0,
                ),
            ),
            (
                "IPv4-mapped untrusted peer",
                "::ffff:198.51.100.7",
                get(""),
                done(client(OUTSIDER, None, Source::Peer), None, 0),
            ),
        ];
        for (what, peer, capture, want) in cases {
            assert_eq!(first_turn(&r, peer, &capture), want, "{what}");
        }
    }

    #[test]
    fn proxy_protocol_off_reads_no_proxy_header() {
        let r = resolver(&Settings {
            proxy_protocol: false,
            ..settings()
        });
        let haproxy = v2(sa("203.0.113.7:40000"), sa("10.1.2.3:8080"), &[]);
        assert_eq!(
            first_turn(&r, GATEWAY, &with_proxy(haproxy, &get(""))),
            done(
                client(GATEWAY, None, Source::Peer),
                Some(Unattributed::NotHttp),
                0
            )
        );
    }

    #[test]
    fn bytes_arriving_one_by_one() {
        let r = resolver(&settings());
        let haproxy = v2(sa("10.9.9.9:40000"), sa("10.1.2.3:8080"), &[]);
        for capture in [
            NGINX_UPSTREAM.to_vec(),
            with_proxy(
                haproxy,
                &get("X-Forwarded-For: 203.0.113.9\r\nX-Client-Id: k\r\n"),
            ),
        ] {
            let want = first_turn(&r, GATEWAY, &capture);
            let mut state = r.connection(ip(GATEWAY));
            let mut got = Progress::NeedMore;
            for n in 0..=capture.len() {
                got = state.turn(&r, true, &capture[..n], false);
                if got != Progress::NeedMore {
                    break;
                }
            }
            assert_eq!(got, want);
        }
    }

    #[test]
    fn proxy_header_then_request_in_a_later_capture() {
        let r = resolver(&settings());
        let haproxy = v2(sa("203.0.113.7:40000"), sa("10.1.2.3:8080"), &[]);
        let mut state = r.connection(ip(GATEWAY));
        assert_eq!(state.turn(&r, true, &haproxy, false), Progress::NeedMore);
        assert_eq!(
            state.turn(
                &r,
                true,
                &with_proxy(haproxy, b"GET / HTTP/1.1\r\n\r\n"),
                false
            ),
            done(client("203.0.113.7", None, Source::ProxyV2), None, 0)
        );
    }

    #[test]
    fn each_turn_on_its_own() {
        let r = resolver(&settings());
        let mut state = r.connection(ip(GATEWAY));
        let turns: Vec<(Vec<u8>, Progress)> = vec![
            (
                get("X-Forwarded-For: 203.0.113.9\r\nX-Client-Id: k-1\r\n"),
                done(
                    client("203.0.113.9", Some("k-1"), header("x-client-id")),
                    None,
                    0,
                ),
            ),
            // The id of the previous request does not carry over.
            (get(""), done(client(GATEWAY, None, Source::Peer), None, 0)),
            (
                get("X-Client-Id: k-2\r\n"),
                done(client(GATEWAY, Some("k-2"), header("x-client-id")), None, 0),
            ),
            (
                TWO_PIPELINED_GETS.to_vec(),
                done(
                    client(GATEWAY, None, Source::Peer),
                    Some(Unattributed::Pipelined),
                    0,
                ),
            ),
        ];
        for (i, (capture, want)) in turns.into_iter().enumerate() {
            assert_eq!(state.turn(&r, i == 0, &capture, true), want, "turn {i}");
            let Progress::Done(t) = want else {
                unreachable!()
            };
            assert_eq!(state.current(), &t.client);
        }
    }

    #[test]
    fn body_after_100_continue_keeps_the_client() {
        let r = resolver(&settings());
        let mut state = r.connection(ip(GATEWAY));
        let head = b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\
Content-Length: 16\r\nX-Client-Id: k-9\r\n\r\n";
        let want = client(GATEWAY, Some("k-9"), header("x-client-id"));
        assert_eq!(
            state.turn(&r, true, head, true),
            done(want.clone(), None, 0)
        );
        assert_eq!(
            state.turn(&r, false, b"{\"prompt\": \"hi\"}", true),
            done(want.clone(), None, 0)
        );
        // And the next request is read again.
        assert_eq!(
            state.turn(&r, false, &get(""), true),
            done(client(GATEWAY, None, Source::Peer), None, 0)
        );
    }

    #[test]
    fn opaque_connections_are_counted_once() {
        let r = resolver(&settings());
        for (capture, why) in [
            (TLS_CLIENT_HELLO.to_vec(), Unattributed::Tls),
            (http::H2_PREFACE.to_vec(), Unattributed::Http2),
            (b"\x00\x01binary".to_vec(), Unattributed::NotHttp),
        ] {
            let mut state = r.connection(ip(GATEWAY));
            let peer = client(GATEWAY, None, Source::Peer);
            assert_eq!(
                state.turn(&r, true, &capture, false),
                done(peer.clone(), Some(why), 0)
            );
            // Later turns, even ones that look like HTTP, are not read.
            for later in [&capture[..], &get("X-Client-Id: k\r\n"), b""] {
                assert_eq!(
                    state.turn(&r, false, later, false),
                    done(peer.clone(), None, 0)
                );
            }
        }
    }

    #[test]
    fn precedence() {
        let gw_proxy = v2(sa("10.9.9.9:1"), sa("10.1.2.3:8080"), &[]);
        let capture = with_proxy(gw_proxy, &get("X-Forwarded-For: 203.0.113.9\r\n"));
        let order = |p: [SourceKind; 4]| Settings {
            precedence: p.to_vec(),
            ..settings()
        };
        use SourceKind::{Annotation as A, Header as H, Peer as Pe, Proxy as Pr};
        let cases = [
            (
                [A, H, Pr, Pe],
                client("203.0.113.9", None, header("x-forwarded-for")),
            ),
            // A header does not override a trusted PROXY address when it ranks below it.
            ([A, Pr, H, Pe], client("10.9.9.9", None, Source::ProxyV2)),
            // Headers below the peer: never used; the PROXY source still is.
            ([A, Pr, Pe, H], client("10.9.9.9", None, Source::ProxyV2)),
            // PROXY below the peer: the peer, and headers above it still apply.
            (
                [H, A, Pe, Pr],
                client("203.0.113.9", None, header("x-forwarded-for")),
            ),
            ([A, Pe, H, Pr], client(GATEWAY, None, Source::Peer)),
        ];
        for (p, want) in cases {
            let r = resolver(&order(p));
            assert_eq!(
                first_turn(&r, GATEWAY, &capture),
                done(want, None, 0),
                "{p:?}"
            );
        }
    }

    #[test]
    fn annotations() {
        let r = resolver(&settings());
        let mut state = r.connection(ip(GATEWAY));
        // Before any turn: on the peer.
        let a1 = client(GATEWAY, Some("app-1"), Source::Annotation);
        assert_eq!(state.annotate(&r, b"app-1"), Some(a1.clone()));
        assert_eq!(state.current(), &a1);
        assert_eq!(state.annotate(&r, b""), None);
        // Replaces a header client, keeping its address.
        state.turn(
            &r,
            true,
            &get("X-Forwarded-For: 203.0.113.9\r\nX-Client-Id: k\r\n"),
            true,
        );
        assert_eq!(
            state.annotate(&r, b"app-2"),
            Some(client("203.0.113.9", Some("app-2"), Source::Annotation))
        );
        // Does not carry over to the next turn.
        assert_eq!(
            state.turn(&r, false, &get(""), true),
            done(client(GATEWAY, None, Source::Peer), None, 0)
        );
        // Comes while a turn is undecided: applies now, and to the turn when decided.
        let head = get("X-Forwarded-For: 203.0.113.9\r\n");
        assert_eq!(
            state.turn(&r, false, &head[..10], false),
            Progress::NeedMore
        );
        assert_eq!(
            state.annotate(&r, b"app-3"),
            Some(client(GATEWAY, Some("app-3"), Source::Annotation))
        );
        assert_eq!(
            state.turn(&r, false, &head, false),
            done(
                client("203.0.113.9", Some("app-3"), Source::Annotation),
                None,
                0
            )
        );

        // Annotations ranking below headers: only over peer/proxy clients.
        let low = resolver(&Settings {
            precedence: vec![
                SourceKind::Header,
                SourceKind::Annotation,
                SourceKind::Proxy,
                SourceKind::Peer,
            ],
            ..settings()
        });
        let mut state = low.connection(ip(GATEWAY));
        state.turn(&low, true, &get("X-Client-Id: k\r\n"), true);
        assert_eq!(state.annotate(&low, b"app"), None);
        assert_eq!(
            state.current(),
            &client(GATEWAY, Some("k"), header("x-client-id"))
        );
        state.turn(&low, false, &get(""), true);
        assert_eq!(
            state.annotate(&low, b"app"),
            Some(client(GATEWAY, Some("app"), Source::Annotation))
        );

        // TLS: the annotation stays for the connection's later turns.
        let mut state = r.connection(ip(GATEWAY));
        state.turn(&r, true, TLS_CLIENT_HELLO, true);
        let a = state.annotate(&r, b"tenant").unwrap();
        assert_eq!(
            state.turn(&r, false, b"\x17\x03\x03", true),
            done(a, None, 0)
        );

        // Off: ignored.
        let off = resolver(&Settings {
            annotations: false,
            ..settings()
        });
        let mut state = off.connection(ip(GATEWAY));
        assert_eq!(state.annotate(&off, b"app"), None);
        assert_eq!(state.current(), &client(GATEWAY, None, Source::Peer));
    }

    #[test]
    fn ids_are_hashed_with_the_key() {
        let s = Settings {
            hash_ids: true,
            id_key_file: Some("/etc/outflow/id.key".into()),
            ..settings()
        };
        let r = resolver(&s);
        let Progress::Done(t) = first_turn(&r, GATEWAY, &get("X-Client-Id: team-search\r\n"))
        else {
            panic!()
        };
        let want = IdHasher::keyed(KEY).unwrap().id(b"team-search");
        assert_eq!(t.client.id, want);
        assert!(
            t.client
                .id
                .as_deref()
                .is_some_and(|id| id.starts_with("h:") && id.len() == 26)
        );
    }

    #[test]
    fn new_checks_settings_and_key() {
        let hashed = Settings {
            hash_ids: true,
            id_key_file: Some("/k".into()),
            ..settings()
        };
        assert_eq!(
            Resolver::new(&hashed, None).unwrap_err(),
            AttributionError::MissingKey
        );
        assert_eq!(
            Resolver::new(&hashed, Some(b"short")).unwrap_err(),
            AttributionError::KeyTooShort(KeyTooShort { len: 5 })
        );
        let bad = Settings {
            precedence: vec![],
            ..settings()
        };
        let err = Resolver::new(&bad, None).unwrap_err();
        assert!(matches!(err, AttributionError::Config(_)));
        assert!(
            err.to_string().starts_with("attribution.precedence:"),
            "{err}"
        );
        // No ids possible: no key needed.
        assert!(Resolver::new(&Settings::default(), None).is_ok());
        // Upper-case names (built in code, not from TOML) still match.
        let upper = Settings {
            headers: vec![rule("X-Forwarded-For", HeaderKind::Address)],
            ..settings()
        };
        let r = resolver(&upper);
        assert_eq!(
            first_turn(&r, GATEWAY, &get("x-forwarded-for: 203.0.113.9\r\n")),
            done(
                client("203.0.113.9", None, header("x-forwarded-for")),
                None,
                0
            )
        );
    }

    #[test]
    fn wire_names() {
        assert_eq!(Source::Peer.as_wire(), "peer");
        assert_eq!(Source::ProxyV1.as_wire(), "proxy-v1");
        assert_eq!(Source::ProxyV2.as_wire(), "proxy-v2");
        assert_eq!(
            header("x-forwarded-for").as_wire(),
            "header:x-forwarded-for"
        );
        assert_eq!(Source::Annotation.as_wire(), "annotation");
        let all = [
            (Unattributed::Tls, "tls"),
            (Unattributed::Http2, "http2"),
            (Unattributed::NotHttp, "not_http"),
            (Unattributed::Pipelined, "pipelined"),
            (Unattributed::HeadersTruncated, "headers_truncated"),
            (Unattributed::MalformedProxy, "malformed_proxy"),
        ];
        for (u, s) in all {
            assert_eq!(u.as_str(), s);
        }
    }

    /// Captures that are mostly near-misses of real traffic.
    fn arb_capture() -> impl Strategy<Value = Vec<u8>> {
        let pieces = prop_oneof![
            Just(b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n".to_vec()),
            Just(v2(sa("10.0.0.1:1"), sa("10.0.0.2:2"), &[(5, b"x")])),
            Just(b"GET / HTTP/1.1\r\n".to_vec()),
            Just(b"X-Forwarded-For: 10.0.0.3, ::ffff:1.2.3.4\r\n".to_vec()),
            Just(b"Forwarded: for=\"[2001:db8::1]\"\r\n".to_vec()),
            Just(b"X-Client-Id: k\r\n".to_vec()),
            Just(b"Content-Length: 2\r\n".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(TLS_CLIENT_HELLO.to_vec()),
            proptest::collection::vec(any::<u8>(), 0..20),
        ];
        proptest::collection::vec(pieces, 0..8).prop_map(|p| p.concat())
    }

    proptest! {
        #[test]
        fn turn_never_panics_and_decides_when_complete(
            peer in prop_oneof![Just(ip(GATEWAY)), Just(ip("::ffff:10.0.0.5")), Just(ip(OUTSIDER))],
            turns in proptest::collection::vec((arb_capture(), any::<bool>(), any::<u8>(), any::<bool>()), 1..6),
        ) {
            let r = resolver(&settings());
            let mut state = r.connection(peer);
            for (i, (capture, complete, cut, annotate)) in turns.iter().enumerate() {
                // Part of the turn first, then the rest.
                let cut = usize::from(*cut).min(capture.len());
                let _ = state.turn(&r, i == 0, &capture[..cut], false);
                if *annotate {
                    let _ = state.annotate(&r, &capture[..cut.min(8)]);
                }
                let p = state.turn(&r, i == 0, capture, *complete);
                if *complete {
                    prop_assert!(matches!(p, Progress::Done(_)));
                }
                if let Progress::Done(t) = p {
                    prop_assert_eq!(t.client.addr, t.client.addr.to_canonical());
                    prop_assert!(t.ignored_claims <= 2);
                    prop_assert_eq!(&t.client, state.current());
                    // A client from a header or PROXY needs a trusted peer.
                    if !matches!(t.client.source, Source::Peer | Source::Annotation) {
                        prop_assert!(r.trusted.contains(peer));
                    }
                }
            }
        }

        #[test]
        fn untrusted_peers_are_never_believed(capture in arb_capture()) {
            let r = resolver(&settings());
            let p = r.connection(ip(OUTSIDER)).turn(&r, true, &capture, true);
            let Progress::Done(t) = p else { panic!("complete turn not decided") };
            prop_assert_eq!(t.client, client(OUTSIDER, None, Source::Peer));
        }
    }
}
