//! The addresses a key was seen with, besides its bytes: a client id's client addresses and
//! the gateways (TCP peers other than the client) its bytes came through, and the gateways of
//! a client address that came through some.
//!
//! At most [`MAX_LINKS`] addresses of each [`LinkKind`] are kept per key, the most recently
//! seen, each with the last batch time it was seen (rounded down by the caller). A key seen
//! with more addresses shows [`MAX_LINKS`] of them: the count means "at least" then.
use std::net::{IpAddr, Ipv6Addr};

/// Addresses kept per key and kind.
pub const MAX_LINKS: usize = 32;
/// Store form of one link: kind, address (16 bytes, IPv4 mapped), last seen.
const LINK_BYTES: usize = 1 + 16 + 8;

/// What an address is to the key it is linked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkKind {
    /// A client address of a client id.
    Addr,
    /// A TCP peer that was not the client: a gateway.
    Peer,
}

impl LinkKind {
    fn tag(self) -> u8 {
        match self {
            LinkKind::Addr => 0,
            LinkKind::Peer => 1,
        }
    }
}

/// The linked addresses of one key, each list sorted by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    addrs: Vec<(IpAddr, u64)>,
    peers: Vec<(IpAddr, u64)>,
}

impl Links {
    fn list(&self, kind: LinkKind) -> &Vec<(IpAddr, u64)> {
        match kind {
            LinkKind::Addr => &self.addrs,
            LinkKind::Peer => &self.peers,
        }
    }

    fn list_mut(&mut self, kind: LinkKind) -> &mut Vec<(IpAddr, u64)> {
        match kind {
            LinkKind::Addr => &mut self.addrs,
            LinkKind::Peer => &mut self.peers,
        }
    }

    /// Records `addr` seen at `time_ms`; true if what is kept changed. When the list is full,
    /// the least recently seen address makes room (unless it was seen after `time_ms`).
    pub fn see(&mut self, kind: LinkKind, addr: IpAddr, time_ms: u64) -> bool {
        let v = self.list_mut(kind);
        match v.binary_search_by_key(&addr, |l| l.0) {
            Ok(i) => match v.get_mut(i) {
                Some(l) if l.1 < time_ms => {
                    l.1 = time_ms;
                    true
                }
                _ => false,
            },
            Err(i) if v.len() < MAX_LINKS => {
                // Most keys have one or two: no room for four at the first.
                if v.capacity() == v.len() && v.len() < 2 {
                    v.reserve_exact(1);
                }
                v.insert(i, (addr, time_ms));
                true
            }
            Err(_) => {
                let Some((j, _)) = v
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.1 <= time_ms)
                    .min_by_key(|(_, l)| l.1)
                else {
                    return false;
                };
                v.remove(j);
                let i = v.partition_point(|l| l.0 < addr);
                v.insert(i, (addr, time_ms));
                true
            }
        }
    }

    /// The addresses of `kind` seen at or after `start_ms`, with when they were last seen.
    pub fn since(&self, kind: LinkKind, start_ms: u64) -> impl Iterator<Item = (IpAddr, u64)> {
        self.list(kind)
            .iter()
            .filter(move |l| l.1 >= start_ms)
            .copied()
    }

    /// Adds every link of `other` (keeping the later time of an address in both).
    pub fn merge(&mut self, other: &Links) {
        for kind in [LinkKind::Addr, LinkKind::Peer] {
            for &(a, t) in other.list(kind) {
                self.see(kind, a, t);
            }
        }
    }

    /// Drops the links last seen before `start_ms`; true if any was dropped.
    pub fn prune(&mut self, start_ms: u64) -> bool {
        let before = self.len();
        self.addrs.retain(|l| l.1 >= start_ms);
        self.peers.retain(|l| l.1 >= start_ms);
        self.len() != before
    }

    /// Whether [`Links::prune`] would drop anything.
    pub fn needs_prune(&self, start_ms: u64) -> bool {
        self.addrs.iter().chain(&self.peers).any(|l| l.1 < start_ms)
    }

    /// Links held, of both kinds.
    pub fn len(&self) -> usize {
        self.addrs.len() + self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the store form: a big-endian u16 count, then per link its kind (u8), its
    /// address (16 bytes, IPv4 as IPv4-mapped) and when it was last seen (u64); addresses
    /// first, each kind by address.
    pub fn encode(&self, out: &mut Vec<u8>) {
        // At most 2 * MAX_LINKS.
        let n = u16::try_from(self.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        for kind in [LinkKind::Addr, LinkKind::Peer] {
            for (a, t) in self.list(kind) {
                out.push(kind.tag());
                let v6 = match a {
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                    IpAddr::V6(a) => *a,
                };
                out.extend_from_slice(&v6.octets());
                out.extend_from_slice(&t.to_be_bytes());
            }
        }
    }

    /// Parses the store form at the start of `bytes`; returns it and what follows it.
    pub fn decode(bytes: &[u8]) -> Option<(Links, &[u8])> {
        let n = usize::from(u16::from_be_bytes(bytes.get(..2)?.try_into().ok()?));
        let (body, rest) = bytes
            .get(2..)?
            .split_at_checked(n.checked_mul(LINK_BYTES)?)?;
        let mut links = Links::default();
        for c in body.chunks_exact(LINK_BYTES) {
            let kind = match c.first()? {
                0 => LinkKind::Addr,
                1 => LinkKind::Peer,
                _ => return None,
            };
            let a = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(c.get(1..17)?).ok()?))
                .to_canonical();
            let t = u64::from_be_bytes(c.get(17..25)?.try_into().ok()?);
            // Addresses before peers, each sorted and once, at most MAX_LINKS.
            if kind == LinkKind::Addr && !links.peers.is_empty() {
                return None;
            }
            let v = links.list_mut(kind);
            if v.len() >= MAX_LINKS || v.last().is_some_and(|l| l.0 >= a) {
                return None;
            }
            v.push((a, t));
        }
        Some((links, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(i: u32) -> IpAddr {
        IpAddr::from((0x0a00_0000 + i).to_be_bytes())
    }

    #[test]
    fn keeps_the_most_recent_within_the_bound() {
        let mut l = Links::default();
        for i in 0..MAX_LINKS as u32 {
            assert!(l.see(LinkKind::Addr, a(i), u64::from(i)));
        }
        assert!(
            !l.see(LinkKind::Addr, a(3), 1),
            "an older time changes nothing"
        );
        assert!(l.see(LinkKind::Addr, a(0), 100), "a newer one is kept");
        // Full: a new address replaces the least recently seen (a(1), seen at 1).
        assert!(l.see(LinkKind::Addr, a(99), 50));
        assert_eq!(l.since(LinkKind::Addr, 0).count(), MAX_LINKS);
        assert!(!l.since(LinkKind::Addr, 0).any(|x| x.0 == a(1)));
        // ...but not one seen later than the new one.
        assert!(!l.see(LinkKind::Addr, a(98), 0));
        assert_eq!(l.since(LinkKind::Peer, 0).count(), 0);
        assert_eq!(l.since(LinkKind::Addr, 50).count(), 2);
        assert!(l.prune(40));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn store_form_round_trips() {
        let mut l = Links::default();
        l.see(LinkKind::Addr, "2001:db8::1".parse().unwrap(), 7);
        l.see(LinkKind::Addr, "198.51.100.4".parse().unwrap(), 9);
        l.see(LinkKind::Peer, "10.1.0.1".parse().unwrap(), u64::MAX);
        let mut bytes = Vec::new();
        l.encode(&mut bytes);
        bytes.push(0xee);
        let (back, rest) = Links::decode(&bytes).unwrap();
        assert_eq!(back, l);
        assert_eq!(rest, [0xee]);
        assert!(Links::decode(&bytes[..bytes.len() - 2]).is_none());
        // Out of order: a peer before an address.
        let mut swapped = vec![0, 2];
        swapped.extend_from_slice(&bytes[2 + 2 * LINK_BYTES..2 + 3 * LINK_BYTES]);
        swapped.extend_from_slice(&bytes[2..2 + LINK_BYTES]);
        assert!(Links::decode(&swapped).is_none());
    }
}
