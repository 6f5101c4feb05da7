//! PROXY protocol v1 and v2 headers (HAProxy's `proxy-protocol.txt`), as a balancer puts them in
//! front of a connection's first bytes.
//!
//! Hand-written rather than the `ppp` crate (2.3): `ppp` parses both versions well, but it pulls
//! `thiserror` 1 beside the workspace's 2, declares no `rust-version`, hands back every TLV as a
//! borrowed view (we keep four kinds, bounded, owned) and has its own partial/complete error
//! split that would need mapping to [`ProxyParse`] anyway. What is needed here is about 170 lines
//! of parsing code that decide `NotProxy` from the first byte that cannot start a header and read
//! at most [`V1_MAX_LEN`] bytes (v1) or `16 + u16::MAX` (v2) of the input.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::trust::normalize;

/// The longest v1 header, `\r\n` included.
pub const V1_MAX_LEN: usize = 107;
/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";

/// `PP2_TYPE_AUTHORITY`: the host name the client asked for (SNI).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// `PP2_TYPE_UNIQUE_ID`: the balancer's id of the connection.
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
/// AWS (NLB): VPC endpoint id, in a value whose first byte is subtype 0x01.
pub const PP2_TYPE_AWS: u8 = 0xEA;
pub const PP2_SUBTYPE_AWS_VPCE_ID: u8 = 0x01;
/// GCP: Private Service Connect connection id (8 bytes, big-endian).
pub const PP2_TYPE_GCP_PSC: u8 = 0xE0;
/// At most this many TLVs are kept from one header.
pub const MAX_KEPT_TLVS: usize = 8;
/// A TLV value longer than this is not kept (an authority is at most 255 bytes, a unique id 128).
pub const MAX_TLV_VALUE_LEN: usize = 255;

/// What the start of a capture is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyParse {
    /// Not a PROXY header: the bytes are the application's.
    NotProxy,
    /// A prefix of a header: more bytes are needed to tell.
    Incomplete,
    Header(ProxyHeader),
    /// Starts like a header, but is not a valid one.
    Malformed(&'static str),
}

/// A parsed PROXY header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// The client as the balancer saw it; `None` for v1 `UNKNOWN`, v2 `LOCAL`, or a v2 family
    /// that carries no IP address (UNSPEC, UNIX). IPv4-mapped addresses are normalised to IPv4.
    pub source: Option<SocketAddr>,
    /// The address the client connected to, when `source` is known.
    pub dest: Option<SocketAddr>,
    /// The kept TLVs (v2 only): type and value as on the wire, in order, at most
    /// [`MAX_KEPT_TLVS`], each value at most [`MAX_TLV_VALUE_LEN`] bytes.
    pub tlvs: Vec<(u8, Vec<u8>)>,
    /// Bytes the header takes: the application's bytes start here.
    pub len: usize,
}

impl ProxyHeader {
    fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(t, _)| *t == kind)
            .map(|(_, v)| v.as_slice())
    }

    /// `PP2_TYPE_AUTHORITY`.
    pub fn authority(&self) -> Option<&[u8]> {
        self.tlv(PP2_TYPE_AUTHORITY)
    }

    /// `PP2_TYPE_UNIQUE_ID`.
    pub fn unique_id(&self) -> Option<&[u8]> {
        self.tlv(PP2_TYPE_UNIQUE_ID)
    }

    /// The AWS VPC endpoint id (`vpce-...`), without its subtype byte.
    pub fn aws_vpce_id(&self) -> Option<&[u8]> {
        self.tlv(PP2_TYPE_AWS).and_then(|v| v.get(1..))
    }

    /// The GCP Private Service Connect connection id.
    pub fn gcp_psc_connection_id(&self) -> Option<u64> {
        let v: [u8; 8] = self.tlv(PP2_TYPE_GCP_PSC)?.try_into().ok()?;
        Some(u64::from_be_bytes(v))
    }
}

/// Reads a PROXY header (v1 or v2) at the start of `buf`.
pub fn parse(buf: &[u8]) -> ProxyParse {
    if starts_like(buf, V1_PREFIX) {
        if buf.len() < V1_PREFIX.len() {
            return ProxyParse::Incomplete;
        }
        return parse_v1(buf);
    }
    if starts_like(buf, &V2_SIGNATURE) {
        if buf.len() < V2_SIGNATURE.len() {
            return ProxyParse::Incomplete;
        }
        return parse_v2(buf);
    }
    ProxyParse::NotProxy
}

/// `buf` and `prefix` agree on their common length (an empty `buf` agrees with anything).
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

fn parse_v1(buf: &[u8]) -> ProxyParse {
    // Find the CRLF within the first V1_MAX_LEN bytes, rejecting early what cannot be a header.
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let mut end = None;
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\n' => {
                if i > 0 && window[i - 1] == b'\r' {
                    end = Some(i - 1);
                    break;
                }
                return ProxyParse::Malformed("v1: LF without CR");
            }
            b'\r' => {
                if window.get(i + 1).is_some_and(|&n| n != b'\n') {
                    return ProxyParse::Malformed("v1: CR without LF");
                }
            }
            0x20..=0x7e => {}
            _ => return ProxyParse::Malformed("v1: not printable ASCII"),
        }
    }
    let Some(end) = end else {
        return if buf.len() >= V1_MAX_LEN {
            ProxyParse::Malformed("v1: longer than 107 bytes")
        } else {
            ProxyParse::Incomplete
        };
    };
    // Printable ASCII, so UTF-8.
    let Ok(line) = std::str::from_utf8(&buf[V1_PREFIX.len()..end]) else {
        return ProxyParse::Malformed("v1: not ASCII");
    };
    let len = end + 2;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or_default();
    if family == "UNKNOWN" {
        // The receiver must ignore whatever follows UNKNOWN.
        return header(1, None, None, Vec::new(), len);
    }
    let [Some(src), Some(dst), Some(sport), Some(dport), None] = [
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ] else {
        return ProxyParse::Malformed("v1: needs 4 fields after the protocol");
    };
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => match (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) {
            (Ok(s), Ok(d)) => (s.into(), d.into()),
            _ => return ProxyParse::Malformed("v1: bad IPv4 address"),
        },
        "TCP6" => match (src.parse::<Ipv6Addr>(), dst.parse::<Ipv6Addr>()) {
            (Ok(s), Ok(d)) => (s.into(), d.into()),
            _ => return ProxyParse::Malformed("v1: bad IPv6 address"),
        },
        _ => return ProxyParse::Malformed("v1: protocol is not TCP4, TCP6 or UNKNOWN"),
    };
    let (Some(sport), Some(dport)) = (port(sport), port(dport)) else {
        return ProxyParse::Malformed("v1: bad port");
    };
    header(
        1,
        Some(socket(src, sport)),
        Some(socket(dst, dport)),
        Vec::new(),
        len,
    )
}

fn port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn socket(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(normalize(ip), port)
}

fn header(
    version: u8,
    source: Option<SocketAddr>,
    dest: Option<SocketAddr>,
    tlvs: Vec<(u8, Vec<u8>)>,
    len: usize,
) -> ProxyParse {
    ProxyParse::Header(ProxyHeader {
        version,
        source,
        dest,
        tlvs,
        len,
    })
}

fn parse_v2(buf: &[u8]) -> ProxyParse {
    // Signature (12), version and command (1), family and transport (1), length (2).
    let Some(&[ver_cmd, fam, hi, lo]) = buf.get(12..16) else {
        // The version byte alone can already be wrong.
        return match buf.get(12) {
            Some(v) if v >> 4 != 2 => ProxyParse::Malformed("v2: version is not 2"),
            _ => ProxyParse::Incomplete,
        };
    };
    if ver_cmd >> 4 != 2 {
        return ProxyParse::Malformed("v2: version is not 2");
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return ProxyParse::Malformed("v2: command is not LOCAL or PROXY"),
    };
    let len = 16 + usize::from(u16::from_be_bytes([hi, lo]));
    let Some(block) = buf.get(16..len) else {
        return ProxyParse::Incomplete;
    };
    if local {
        // LOCAL: the balancer's own connection (a health check); the family, the addresses and
        // the TLVs are ignored.
        return header(2, None, None, Vec::new(), len);
    }
    let addr_len = match fam >> 4 {
        0 => 0,   // AF_UNSPEC
        1 => 12,  // AF_INET
        2 => 36,  // AF_INET6
        3 => 216, // AF_UNIX
        _ => return ProxyParse::Malformed("v2: unknown address family"),
    };
    if fam & 0x0f > 2 {
        return ProxyParse::Malformed("v2: unknown transport");
    }
    let Some(addrs) = block.get(..addr_len) else {
        return ProxyParse::Malformed("v2: address block shorter than its family needs");
    };
    let (source, dest) = match fam >> 4 {
        1 => {
            let ip = |o: usize| IpAddr::from([addrs[o], addrs[o + 1], addrs[o + 2], addrs[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([addrs[o], addrs[o + 1]]);
            (Some(socket(ip(0), port(8))), Some(socket(ip(4), port(10))))
        }
        2 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&addrs[o..o + 16]);
                IpAddr::from(a)
            };
            let port = |o: usize| u16::from_be_bytes([addrs[o], addrs[o + 1]]);
            (
                Some(socket(ip(0), port(32))),
                Some(socket(ip(16), port(34))),
            )
        }
        _ => (None, None),
    };
    let tlvs = match kept_tlvs(&block[addr_len..]) {
        Ok(tlvs) => tlvs,
        Err(why) => return ProxyParse::Malformed(why),
    };
    header(2, source, dest, tlvs, len)
}

fn kept_tlvs(mut rest: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, &'static str> {
    let mut kept = Vec::new();
    while !rest.is_empty() {
        let Some(&[kind, hi, lo]) = rest.get(..3) else {
            return Err("v2: truncated TLV");
        };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        let Some(value) = rest.get(3..end) else {
            return Err("v2: TLV overruns the header");
        };
        let keep = match kind {
            PP2_TYPE_AUTHORITY | PP2_TYPE_UNIQUE_ID | PP2_TYPE_GCP_PSC => true,
            PP2_TYPE_AWS => value.first() == Some(&PP2_SUBTYPE_AWS_VPCE_ID),
            _ => false,
        };
        if keep && kept.len() < MAX_KEPT_TLVS && value.len() <= MAX_TLV_VALUE_LEN {
            kept.push((kind, value.to_vec()));
        }
        rest = &rest[end..];
    }
    Ok(kept)
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A v2 header (PROXY command, TCP) for `src` -> `dst` with `tlvs`.
    pub(crate) fn v2(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        let fam = match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                body.extend(s.ip().octets());
                body.extend(d.ip().octets());
                0x11
            }
            _ => {
                let v6 = |a: SocketAddr| match a.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                };
                body.extend(v6(src));
                body.extend(v6(dst));
                0x21
            }
        };
        body.extend(src.port().to_be_bytes());
        body.extend(dst.port().to_be_bytes());
        for (t, v) in tlvs {
            body.push(*t);
            body.extend((v.len() as u16).to_be_bytes());
            body.extend(*v);
        }
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x21);
        out.push(fam);
        out.extend((body.len() as u16).to_be_bytes());
        out.extend(body);
        out
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn hdr(version: u8, src: Option<&str>, dst: Option<&str>, len: usize) -> ProxyParse {
        header(version, src.map(sa), dst.map(sa), Vec::new(), len)
    }

    #[test]
    fn v1_table() {
        let ok4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        let cases: &[(&[u8], ProxyParse)] = &[
            (b"", ProxyParse::Incomplete),
            (b"P", ProxyParse::Incomplete),
            (b"PROX", ProxyParse::Incomplete),
            (b"PROXY TCP4 192.0.2.1", ProxyParse::Incomplete),
            (b"GET / HTTP/1.1\r\n", ProxyParse::NotProxy),
            (b"POST", ProxyParse::NotProxy),
            (b"PRI * HTTP/2.0", ProxyParse::NotProxy),
            (b"PROXYTCP4", ProxyParse::NotProxy),
            (b"\x16\x03\x01", ProxyParse::NotProxy),
            (
                ok4,
                hdr(1, Some("192.0.2.1:56324"), Some("198.51.100.2:443"), 45),
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n",
                hdr(1, Some("[2001:db8::1]:1"), Some("[2001:db8::2]:65535"), 44),
            ),
            (
                b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:192.0.2.2 1 2\r\n",
                hdr(1, Some("192.0.2.1:1"), Some("192.0.2.2:2"), 50),
            ),
            (b"PROXY UNKNOWN\r\n", hdr(1, None, None, 15)),
            (
                b"PROXY UNKNOWN ffff:f...f:ffff 1 2\r\nxyz",
                hdr(1, None, None, 35),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
                ProxyParse::Malformed("v1: needs 4 fields after the protocol"),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
                ProxyParse::Malformed("v1: needs 4 fields after the protocol"),
            ),
            (
                b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
                ProxyParse::Malformed("v1: needs 4 fields after the protocol"),
            ),
            (
                b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
                ProxyParse::Malformed("v1: bad IPv4 address"),
            ),
            (
                b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",
                ProxyParse::Malformed("v1: bad IPv4 address"),
            ),
            (
                b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
                ProxyParse::Malformed("v1: bad IPv6 address"),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
                ProxyParse::Malformed("v1: bad port"),
            ),
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
                ProxyParse::Malformed("v1: bad port"),
            ),
            (
                b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
                ProxyParse::Malformed("v1: protocol is not TCP4, TCP6 or UNKNOWN"),
            ),
            (
                b"PROXY TCP4 192.0.2.1\n",
                ProxyParse::Malformed("v1: LF without CR"),
            ),
            (
                b"PROXY TCP4 192.0.2.1\rx",
                ProxyParse::Malformed("v1: CR without LF"),
            ),
            (
                b"PROXY TCP4 \x00",
                ProxyParse::Malformed("v1: not printable ASCII"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&parse(input), want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn v1_length_limit() {
        // The longest valid header is 107 bytes; one without CRLF in 107 bytes is malformed.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(105, b'x');
        long.extend(b"\r\n");
        assert_eq!(parse(&long), hdr(1, None, None, 107));
        let mut too_long = b"PROXY UNKNOWN ".to_vec();
        too_long.resize(106, b'x');
        assert_eq!(parse(&too_long), ProxyParse::Incomplete);
        too_long.extend(b"\r\n");
        assert_eq!(
            parse(&too_long),
            ProxyParse::Malformed("v1: longer than 107 bytes")
        );
    }

    #[test]
    fn v2_haproxy_with_tlvs() {
        let tlvs: &[(u8, &[u8])] = &[
            (0x04, b"noop"), // PP2_TYPE_NOOP: dropped
            (PP2_TYPE_AUTHORITY, b"api.example.com"),
            (0x20, b"\x01\0\0\0\0"), // PP2_TYPE_SSL: dropped
            (PP2_TYPE_UNIQUE_ID, b"conn-7"),
            (PP2_TYPE_AWS, b"\x01vpce-08d2bf15fac5001c9"),
            (PP2_TYPE_AWS, b"\x02other-subtype"), // dropped
            (PP2_TYPE_GCP_PSC, &0x1234_5678_9abc_def0u64.to_be_bytes()),
        ];
        let mut bytes = v2(sa("203.0.113.7:40000"), sa("10.1.2.3:8080"), tlvs);
        let header_len = bytes.len();
        bytes.extend(b"GET / HTTP/1.1\r\n\r\n");
        let ProxyParse::Header(h) = parse(&bytes) else {
            panic!("{:?}", parse(&bytes))
        };
        assert_eq!(h.version, 2);
        assert_eq!(h.len, header_len);
        assert_eq!(h.source, Some(sa("203.0.113.7:40000")));
        assert_eq!(h.dest, Some(sa("10.1.2.3:8080")));
        assert_eq!(h.tlvs.len(), 4);
        assert_eq!(h.authority(), Some(&b"api.example.com"[..]));
        assert_eq!(h.unique_id(), Some(&b"conn-7"[..]));
        assert_eq!(h.aws_vpce_id(), Some(&b"vpce-08d2bf15fac5001c9"[..]));
        assert_eq!(h.gcp_psc_connection_id(), Some(0x1234_5678_9abc_def0));
        // Every strict prefix is incomplete.
        for n in 0..header_len {
            assert_eq!(parse(&bytes[..n]), ProxyParse::Incomplete, "prefix of {n}");
        }
    }

    #[test]
    fn v2_table() {
        let with = |ver_cmd: u8, fam: u8, body: &[u8]| {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend([ver_cmd, fam]);
            out.extend((body.len() as u16).to_be_bytes());
            out.extend(body);
            out
        };
        let v6body = {
            let mut b = Vec::new();
            b.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
            b.extend("::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets());
            b.extend([0, 80, 1, 187]);
            b
        };
        let cases: Vec<(Vec<u8>, ProxyParse)> = vec![
            (with(0x20, 0x11, &[1; 12]), hdr(2, None, None, 28)),
            (with(0x20, 0x00, &[]), hdr(2, None, None, 16)),
            (with(0x21, 0x00, &[]), hdr(2, None, None, 16)),
            (with(0x21, 0x31, &[0; 216]), hdr(2, None, None, 232)),
            (
                with(0x21, 0x21, &v6body),
                hdr(2, Some("[2001:db8::1]:80"), Some("10.0.0.1:443"), 52),
            ),
            (
                with(0x21, 0x12, &[192, 0, 2, 1, 192, 0, 2, 2, 0, 1, 0, 2]),
                hdr(2, Some("192.0.2.1:1"), Some("192.0.2.2:2"), 28),
            ),
            (
                with(0x11, 0x11, &[0; 12]),
                ProxyParse::Malformed("v2: version is not 2"),
            ),
            (
                with(0x22, 0x11, &[0; 12]),
                ProxyParse::Malformed("v2: command is not LOCAL or PROXY"),
            ),
            (
                with(0x21, 0x41, &[0; 12]),
                ProxyParse::Malformed("v2: unknown address family"),
            ),
            (
                with(0x21, 0x13, &[0; 12]),
                ProxyParse::Malformed("v2: unknown transport"),
            ),
            (
                with(0x21, 0x11, &[0; 11]),
                ProxyParse::Malformed("v2: address block shorter than its family needs"),
            ),
            (
                with(0x21, 0x11, &[0; 14]),
                ProxyParse::Malformed("v2: truncated TLV"),
            ),
            (
                with(
                    0x21,
                    0x11,
                    &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 9, b'x'],
                ),
                ProxyParse::Malformed("v2: TLV overruns the header"),
            ),
            (V2_SIGNATURE[..5].to_vec(), ProxyParse::Incomplete),
            (
                [&V2_SIGNATURE[..], &[0x21, 0x11, 0, 12, 1, 2]].concat(),
                ProxyParse::Incomplete,
            ),
            (
                [&V2_SIGNATURE[..], &[0x31]].concat(),
                ProxyParse::Malformed("v2: version is not 2"),
            ),
            (b"\r\n\r\nX".to_vec(), ProxyParse::NotProxy),
            (b"\r\nGET".to_vec(), ProxyParse::NotProxy),
        ];
        for (input, want) in cases {
            assert_eq!(parse(&input), want, "{input:?}");
        }
    }

    #[test]
    fn v2_keeps_a_bounded_number_of_tlvs() {
        let big = [b'a'; 300];
        let mut tlvs: Vec<(u8, &[u8])> = vec![(PP2_TYPE_AUTHORITY, &big)];
        tlvs.extend(std::iter::repeat_n((PP2_TYPE_UNIQUE_ID, &b"id"[..]), 20));
        let bytes = v2(sa("192.0.2.1:1"), sa("192.0.2.2:2"), &tlvs);
        let ProxyParse::Header(h) = parse(&bytes) else {
            panic!()
        };
        assert_eq!(h.tlvs.len(), MAX_KEPT_TLVS);
        assert!(h.tlvs.iter().all(|(t, _)| *t == PP2_TYPE_UNIQUE_ID));
    }

    fn arb_socket() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
        ]
    }

    fn canonical(a: SocketAddr) -> SocketAddr {
        SocketAddr::new(a.ip().to_canonical(), a.port())
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
            let mut v1 = b"PROXY ".to_vec();
            v1.extend(&bytes);
            let _ = parse(&v1);
            let mut v2 = V2_SIGNATURE.to_vec();
            v2.extend(&bytes);
            if let ProxyParse::Header(h) = parse(&v2) {
                prop_assert!(h.len <= v2.len());
                prop_assert!(h.tlvs.len() <= MAX_KEPT_TLVS);
            }
        }

        #[test]
        fn v1_round_trips(src in arb_socket(), dst in arb_socket(), tail in proptest::collection::vec(any::<u8>(), 0..20)) {
            // v1 needs both addresses of one family.
            let (src, dst) = match (src, dst) {
                (SocketAddr::V4(_), SocketAddr::V6(d)) => (src, SocketAddr::new(IpAddr::from([1, 2, 3, 4]), d.port())),
                (SocketAddr::V6(_), SocketAddr::V4(d)) => (src, SocketAddr::new(IpAddr::from([0u8; 16]), d.port())),
                _ => (src, dst),
            };
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            let line = format!("PROXY {family} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port());
            let mut bytes = line.clone().into_bytes();
            bytes.extend(&tail);
            prop_assert_eq!(
                parse(&bytes),
                header(1, Some(canonical(src)), Some(canonical(dst)), Vec::new(), line.len())
            );
        }

        #[test]
        fn v2_round_trips(src in arb_socket(), dst in arb_socket(), id in proptest::collection::vec(any::<u8>(), 0..40), tail in proptest::collection::vec(any::<u8>(), 0..20)) {
            let mut bytes = v2(src, dst, &[(PP2_TYPE_UNIQUE_ID, &id)]);
            let len = bytes.len();
            bytes.extend(&tail);
            prop_assert_eq!(
                parse(&bytes),
                header(2, Some(canonical(src)), Some(canonical(dst)), vec![(PP2_TYPE_UNIQUE_ID, id)], len)
            );
        }
    }
}
