//! What the collector aggregates by: client address, client prefix, host, workload, client id
//! and TCP peer, and the compact byte form of each key in the store.
//!
//! The client of a delta is the address the agent attributed its bytes to (`client_addr`), or
//! the TCP peer (`remote_addr`) if it attributed none. Most clients are their own peer, so the
//! address keys are split three ways to keep one key per address in that common case:
//!
//! * [`Key::Direct`]: bytes whose client is its own TCP peer;
//! * [`Key::Proxied`]: bytes of a client that came through another peer (a gateway);
//! * [`Key::Relayed`]: bytes a peer carried for other clients (a gateway's).
//!
//! The client-address group of an address is its `Direct` and `Proxied` keys, the peer group
//! its `Direct` and `Relayed` keys.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// A host (agent hostname), interned: the store and the rollups refer to hosts by this number.
pub type HostId = u32;

/// How response bytes are grouped (`outflow.v1.GroupBy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// The client's address, /32 or /128.
    ClientAddress,
    /// The client's /24 (IPv4) or /64 (IPv6).
    ClientPrefix,
    /// The host that served the bytes.
    Host,
    /// Host, cgroup and process name of the server.
    Workload,
    /// The client id the agent sent (deltas without one are not in this group).
    ClientId,
    /// The TCP peer (the remote address): a gateway's total, whoever its clients are.
    Peer,
}

impl Group {
    /// Every group, in the order of the protocol's enum.
    pub const ALL: [Group; 6] = [
        Group::ClientAddress,
        Group::ClientPrefix,
        Group::Host,
        Group::Workload,
        Group::ClientId,
        Group::Peer,
    ];

    /// The name used on the command line and in messages (`client-prefix`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Group::ClientAddress => "client-address",
            Group::ClientPrefix => "client-prefix",
            Group::Host => "host",
            Group::Workload => "workload",
            Group::ClientId => "client-id",
            Group::Peer => "peer",
        }
    }
}

/// A client network as aggregated: the /24 of an IPv4 address or the /64 of an IPv6 one,
/// stored as its network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix(IpAddr);

impl Prefix {
    /// The aggregated prefix an address falls in.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(a) => Prefix(IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() & !0xff))),
            IpAddr::V6(a) => Prefix(IpAddr::V6(Ipv6Addr::from_bits(
                a.to_bits() & !u128::from(u64::MAX),
            ))),
        }
    }

    /// The network address.
    pub fn network(self) -> IpAddr {
        self.0
    }

    /// The prefix length: 24 or 64.
    pub fn prefix_len(self) -> u8 {
        if self.0.is_ipv4() { 24 } else { 64 }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, self.prefix_len())
    }
}

/// A network that stands for the /24s and /64s folded into it when the key budget was full
/// (see `budget`): an IPv4 /16, /8 or /0, an IPv6 /48, /32, /16 or /0, stored as its network
/// address and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Net {
    addr: IpAddr,
    len: u8,
}

/// The lengths a prefix folds into, narrowest first.
const V4_FOLDS: [u8; 3] = [16, 8, 0];
const V6_FOLDS: [u8; 4] = [48, 32, 16, 0];

impl Net {
    /// The network of `addr` with `len` bits (at most the address's), host bits cleared.
    pub fn new(addr: IpAddr, len: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let len = len.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from_bits(a.to_bits() & mask))
            }
            IpAddr::V6(a) => {
                let len = len.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from_bits(a.to_bits() & mask))
            }
        };
        let len = len.min(if addr.is_ipv4() { 32 } else { 128 });
        Net { addr, len }
    }

    /// The first network a /24 or /64 folds into: its /16 or /48.
    pub fn fold_of(p: Prefix) -> Self {
        let folds: &[u8] = if p.0.is_ipv4() { &V4_FOLDS } else { &V6_FOLDS };
        Net::new(p.0, folds[0])
    }

    /// The next wider network a fold goes to, `None` at /0.
    pub fn wider(self) -> Option<Self> {
        let folds: &[u8] = if self.addr.is_ipv4() {
            &V4_FOLDS
        } else {
            &V6_FOLDS
        };
        folds
            .iter()
            .find(|&&l| l < self.len)
            .map(|&l| Net::new(self.addr, l))
    }

    /// The network address.
    pub fn network(self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(self) -> u8 {
        self.len
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A serving workload: the host, the socket's cgroup and the server's process name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    pub host: HostId,
    pub cgroup: Box<str>,
    pub comm: Box<str>,
}

/// One aggregation key (see the module's documentation for the three address keys).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A client that was its own TCP peer.
    Direct(IpAddr),
    /// A client that came through another TCP peer.
    Proxied(IpAddr),
    /// A TCP peer, for the bytes of other clients it carried.
    Relayed(IpAddr),
    Prefix(Prefix),
    Host(HostId),
    Workload(Workload),
    /// A client id as the agent sent it (at most `MAX_CLIENT_ID_LEN` characters).
    ClientId(Box<str>),
    /// The /24s and /64s folded into a wider network when the key budget was full.
    Folded(Net),
}

impl std::hash::Hash for Key {
    /// One write for an address key (the writer hashes millions of them per second).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let ip = |tag: u8, a: IpAddr| match a {
            IpAddr::V4(a) => u128::from(tag) << 64 | 1 << 32 | u128::from(a.to_bits()),
            IpAddr::V6(a) => a.to_bits() ^ u128::from(tag) << 120,
        };
        match self {
            Key::Direct(a) => state.write_u128(ip(TAG_DIRECT, *a)),
            Key::Proxied(a) => state.write_u128(ip(TAG_PROXIED, *a)),
            Key::Relayed(a) => state.write_u128(ip(TAG_RELAYED, *a)),
            Key::Prefix(p) => state.write_u128(ip(TAG_PREFIX, p.0)),
            Key::Host(h) => state.write_u128(u128::from(TAG_HOST) << 64 | u128::from(*h)),
            Key::Workload(w) => {
                state.write_u128(u128::from(TAG_WORKLOAD) << 64);
                w.hash(state);
            }
            Key::ClientId(id) => {
                state.write_u128(u128::from(TAG_CLIENT_ID) << 64);
                id.hash(state);
            }
            Key::Folded(n) => {
                state.write_u128(ip(TAG_FOLDED, n.addr));
                state.write_u8(n.len);
            }
        }
    }
}

/// Store tags. 1 to 4 are those of schema 2 (where 1 was every client address).
const TAG_DIRECT: u8 = 1;
const TAG_PREFIX: u8 = 2;
const TAG_HOST: u8 = 3;
const TAG_WORKLOAD: u8 = 4;
const TAG_PROXIED: u8 = 5;
const TAG_RELAYED: u8 = 6;
const TAG_CLIENT_ID: u8 = 7;
const TAG_FOLDED: u8 = 8;

fn ip_bytes(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(b) = <[u8; 4]>::try_from(bytes) {
        Some(IpAddr::from(b))
    } else {
        <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

impl Key {
    /// Appends the store form: a tag byte, then the address bytes (4 or 16), the host id
    /// (big-endian u32), host id, cgroup length (u32), cgroup and comm, or the client id.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Key::Direct(a) | Key::Proxied(a) | Key::Relayed(a) => {
                out.push(match self {
                    Key::Direct(_) => TAG_DIRECT,
                    Key::Proxied(_) => TAG_PROXIED,
                    _ => TAG_RELAYED,
                });
                ip_bytes(out, *a);
            }
            Key::Prefix(p) => {
                out.push(TAG_PREFIX);
                ip_bytes(out, p.0);
            }
            Key::Host(h) => {
                out.push(TAG_HOST);
                out.extend_from_slice(&h.to_be_bytes());
            }
            Key::Workload(w) => {
                out.push(TAG_WORKLOAD);
                out.extend_from_slice(&w.host.to_be_bytes());
                // Cgroup paths are at most 4096 bytes (checked at the edge).
                let len = u32::try_from(w.cgroup.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(w.cgroup.as_bytes());
                out.extend_from_slice(w.comm.as_bytes());
            }
            Key::ClientId(id) => {
                out.push(TAG_CLIENT_ID);
                out.extend_from_slice(id.as_bytes());
            }
            Key::Folded(n) => {
                out.push(TAG_FOLDED);
                out.push(n.len);
                ip_bytes(out, n.addr);
            }
        }
    }

    /// The store form as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        self.encode(&mut v);
        v
    }

    /// Parses the store form; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Key> {
        let (&tag, rest) = bytes.split_first()?;
        match tag {
            TAG_DIRECT => ip_from(rest).map(Key::Direct),
            TAG_PROXIED => ip_from(rest).map(Key::Proxied),
            TAG_RELAYED => ip_from(rest).map(Key::Relayed),
            TAG_PREFIX => ip_from(rest).map(|a| Key::Prefix(Prefix::of(a))),
            TAG_HOST if rest.len() == 4 => u32_at(rest, 0).map(Key::Host),
            TAG_WORKLOAD => {
                let host = u32_at(rest, 0)?;
                let len = usize::try_from(u32_at(rest, 4)?).ok()?;
                let cgroup = rest.get(8..8usize.checked_add(len)?)?;
                let comm = rest.get(8 + len..)?;
                Some(Key::Workload(Workload {
                    host,
                    cgroup: std::str::from_utf8(cgroup).ok()?.into(),
                    comm: std::str::from_utf8(comm).ok()?.into(),
                }))
            }
            TAG_CLIENT_ID if !rest.is_empty() => std::str::from_utf8(rest)
                .ok()
                .map(|id| Key::ClientId(id.into())),
            TAG_FOLDED => {
                let (&len, addr) = rest.split_first()?;
                let addr = ip_from(addr)?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                (len <= max).then(|| Key::Folded(Net::new(addr, len)))
            }
            _ => None,
        }
    }

    /// The key as the Query API shows it: `203.0.113.7`, `203.0.113.0/24`, a host name,
    /// `host/cgroup/comm`, or the client id. `host_name` resolves host ids.
    pub fn display<'a>(&self, host_name: impl Fn(HostId) -> &'a str) -> String {
        match self {
            Key::Direct(a) | Key::Proxied(a) | Key::Relayed(a) => a.to_string(),
            Key::ClientId(id) => id.to_string(),
            Key::Prefix(p) => p.to_string(),
            Key::Folded(n) => n.to_string(),
            Key::Host(h) => host_name(*h).to_owned(),
            Key::Workload(w) => format!("{}/{}/{}", host_name(w.host), w.cgroup, w.comm),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let p = Prefix::of("203.0.113.77".parse().unwrap());
        assert_eq!(p.to_string(), "203.0.113.0/24");
        let p = Prefix::of("2001:db8:1:2:3:4:5:6".parse().unwrap());
        assert_eq!(p.to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn store_form_round_trips() {
        let keys = [
            Key::Direct("203.0.113.7".parse().unwrap()),
            Key::Direct("2001:db8::7".parse().unwrap()),
            Key::Proxied("203.0.113.7".parse().unwrap()),
            Key::Relayed("2001:db8::7".parse().unwrap()),
            Key::ClientId("h:0123456789abcdef01234567".into()),
            Key::ClientId("é/x y".into()),
            Key::Prefix(Prefix::of("198.51.100.1".parse().unwrap())),
            Key::Prefix(Prefix::of("2001:db8::1".parse().unwrap())),
            Key::Folded(Net::new("198.51.0.0".parse().unwrap(), 16)),
            Key::Folded(Net::new("::".parse().unwrap(), 0)),
            Key::Host(7),
            Key::Workload(Workload {
                host: 3,
                cgroup: "/system.slice/vllm.service".into(),
                comm: "vllm".into(),
            }),
            Key::Workload(Workload {
                host: 0,
                cgroup: "".into(),
                comm: "".into(),
            }),
        ];
        for k in keys {
            assert_eq!(Key::decode(&k.to_bytes()), Some(k.clone()), "{k:?}");
        }
        for bad in [
            &[][..],
            &[9, 1],
            &[1, 1, 2],
            &[3, 0, 0],
            &[4, 0, 0, 0, 1, 0, 0, 0, 9, b'a'],
            &[7],
            &[7, 0xff],
            &[8, 33, 1, 2, 3, 4],
            &[8, 16, 1, 2, 3],
        ] {
            assert_eq!(Key::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn prefixes_fold_wider_and_wider() {
        let chain = |p: Prefix| {
            let mut n = Some(Net::fold_of(p));
            std::iter::from_fn(move || {
                let cur = n?;
                n = cur.wider();
                Some(cur.to_string())
            })
            .collect::<Vec<_>>()
        };
        assert_eq!(
            chain(Prefix::of("198.51.100.7".parse().unwrap())),
            ["198.51.0.0/16", "198.0.0.0/8", "0.0.0.0/0"]
        );
        assert_eq!(
            chain(Prefix::of("2001:db8:1:2::9".parse().unwrap())),
            ["2001:db8:1::/48", "2001:db8::/32", "2001::/16", "::/0"]
        );
    }

    #[test]
    fn display() {
        let names = |_| "gpu-1";
        let w = Key::Workload(Workload {
            host: 1,
            cgroup: "/system.slice/vllm.service".into(),
            comm: "vllm".into(),
        });
        assert_eq!(w.display(names), "gpu-1//system.slice/vllm.service/vllm");
        assert_eq!(Key::Host(1).display(names), "gpu-1");
        assert_eq!(Key::ClientId("h:ab".into()).display(names), "h:ab");
        assert_eq!(
            Key::Proxied("2001:db8::1".parse().unwrap()).display(names),
            "2001:db8::1"
        );
    }
}
