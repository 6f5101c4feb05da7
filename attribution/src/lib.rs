//! Who is the client? Attribution of a served TCP connection's traffic, turn by turn.
//!
//! The agent captures, in the kernel, the first bytes of each *turn* of a server-side TCP
//! connection: a turn starts at the connection's first incoming payload, and again each time the
//! client sends payload after the server has sent some. For HTTP/1.x on a keep-alive connection a
//! turn is one request. The agent hands the bytes of a turn (concatenated as they arrive, a few
//! KiB at most) to [`ConnState::turn`], which decides who the client is from that turn on.
//!
//! Pure logic: no I/O, every loop and buffer bounded, no panic on any input (the bytes come from
//! anyone who can connect). Fuzz targets live in `attribution/fuzz/`.
//!
//! # Rules
//!
//! 1. **Connection.** The connection's client is the TCP peer (source `peer`). In the first turn,
//!    with `proxy_protocol = true`, a PROXY v1 or v2 header at the start of the capture is read:
//!    from a trusted peer, its source address becomes the connection's client (`proxy-v1`,
//!    `proxy-v2`; a `LOCAL` or `UNKNOWN` header keeps the peer); from an untrusted peer it is
//!    ignored and counted as an ignored claim. Either way the request is read after the header,
//!    in the same capture or a later, longer one.
//! 2. **Sender.** The sender of a request is the source of a trusted PROXY header if there was
//!    one, else the TCP peer. Headers are believed only from a trusted sender. A request from an
//!    untrusted sender that carries any configured header counts one ignored claim, and its client
//!    is the connection's client.
//! 3. **Headers.** Of the configured address headers, the first present (in configuration order)
//!    gives the address: the right-most hop that is not trusted, walking its hops and then the
//!    sender (all trusted: the left-most; a hop that is not an address stops the walk at the hop
//!    to its right). Of the configured id headers, the first present with a non-empty value gives
//!    the id (of several lines of it, the last non-empty one: the one the nearest proxy added),
//!    hashed (`h:` + 24 hex digits) unless `hash_ids = false`. The source is
//!    `header:<id header>` if an id came from a header, else `header:<address header>` if the
//!    address did, else the connection's.
//! 4. **Each turn on its own.** A request without configured headers gets the connection's
//!    client: the id of a previous request does not carry over.
//! 5. **Not readable.** If the first turn is TLS, HTTP/2 (prior knowledge) or not HTTP, the
//!    connection's client holds for this and every later turn, and only that turn reports why
//!    (`tls`, `http2`, `not_http`). A turn that is not HTTP in a connection that was (the body
//!    after `100 Continue`, an upgraded protocol) keeps the current client. Two requests in one
//!    turn (`pipelined`), a head cut short (`headers_truncated`) or a bad PROXY header
//!    (`malformed_proxy`; from an untrusted peer also an ignored claim; after it nothing more of
//!    the connection is read) give the connection's client.
//! 6. **Precedence.** `precedence` ranks annotation, header, proxy and peer (default in that
//!    order). A source never replaces a client of a higher rank: a header ranked below proxy does
//!    not override a trusted PROXY address, a PROXY header ranked below peer leaves the peer.
//!    [`ConnState::annotate`] (the serving application naming the client, `annotations = true`)
//!    replaces the current client's id and source, keeping its address, when annotation ranks
//!    above its source; one that comes while a turn is undecided also applies to that turn. On a
//!    TLS or other unreadable connection an annotation holds for the rest of the connection; on
//!    HTTP, until the next request.
//! 7. **Addresses.** IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`) are IPv4 in every output,
//!    and in `trusted_peers`.
//!
//! # Modules
//! [`config`] the settings, [`proxy`] PROXY headers, [`http`] request heads, [`forwarded`] hop
//! lists, [`trust`] trusted peers and the walk, [`hash`] ids, [`resolve`] the rules above.
// The fuzz targets run without AddressSanitizer (xtask/src/fuzz.rs): that holds while this
// crate has no unsafe code.
#![forbid(unsafe_code)]
pub mod config;
pub mod forwarded;
pub mod hash;
pub mod http;
pub mod proxy;
pub mod resolve;
pub mod trust;

pub use config::{ConfigError, HeaderKind, HeaderRule, Settings, SourceKind};
pub use hash::{IdHasher, KeyTooShort};
pub use resolve::{
    AttributionError, Client, ConnState, Progress, Resolver, Source, Turn, Unattributed,
};
pub use trust::TrustedPeers;
