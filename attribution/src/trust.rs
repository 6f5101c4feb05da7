//! Trusted peers and the right-most-untrusted walk over a hop list.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`) are normalised to IPv4 everywhere: in the
//! configured networks, in the addresses looked up and in the addresses returned.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// `::ffff:0:0/96`, the IPv4-mapped block.
const MAPPED: Ipv6Net = match Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
    Ok(net) => net,
    Err(_) => panic!("::ffff:0:0/96 is a valid network"),
};

/// An IPv4-mapped IPv6 address as IPv4; every other address unchanged.
pub fn normalize(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

/// The networks whose PROXY headers and forwarding headers are believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedPeers {
    nets: Vec<IpNet>,
}

impl TrustedPeers {
    /// The networks as configured; IPv6 networks inside `::ffff:0:0/96` become IPv4 networks, and
    /// an IPv6 network that holds all of that block (`::/0`) also trusts all of IPv4.
    pub fn new(nets: &[IpNet]) -> Self {
        let mut out = Vec::with_capacity(nets.len());
        for net in nets {
            match net {
                IpNet::V6(v6) if v6.prefix_len() >= 96 && MAPPED.contains(&v6.network()) => {
                    let v4 = v6
                        .network()
                        .to_ipv4_mapped()
                        .unwrap_or(Ipv4Addr::UNSPECIFIED);
                    // prefix_len - 96 is in 0..=32: always a valid IPv4 prefix.
                    if let Ok(v4net) = Ipv4Net::new(v4, v6.prefix_len() - 96) {
                        out.push(IpNet::V4(v4net.trunc()));
                    }
                }
                IpNet::V6(v6) if v6.contains(&MAPPED) => {
                    out.push(*net);
                    out.push(IpNet::V4(Ipv4Net::default()));
                }
                _ => out.push(net.trunc()),
            }
        }
        Self { nets: out }
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `addr` (normalised first) is in one of the networks.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = normalize(addr);
        self.nets.iter().any(|net| net.contains(&addr))
    }
}

/// Where [`rightmost_untrusted`] found the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The client's address, normalised.
    pub addr: IpAddr,
    /// True if it is one of the hops, false if it is the sender itself.
    pub from_hops: bool,
}

/// The client of a request that reached us through `hops` (oldest first, `None` for a hop that is
/// not an address) and then `sender` (the one that connected to us): the right-most address that
/// is not trusted; if all are trusted, the left-most; a hop that is not an address stops the walk,
/// and the client is the hop to its right (nothing left of it can be believed).
pub fn rightmost_untrusted(
    hops: &[Option<IpAddr>],
    sender: IpAddr,
    trusted: &TrustedPeers,
) -> Walk {
    let mut client = Walk {
        addr: normalize(sender),
        from_hops: false,
    };
    if !trusted.contains(client.addr) {
        return client;
    }
    for hop in hops.iter().rev() {
        let Some(addr) = hop else {
            return client;
        };
        client = Walk {
            addr: normalize(*addr),
            from_hops: true,
        };
        if !trusted.contains(client.addr) {
            return client;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn peers(nets: &[&str]) -> TrustedPeers {
        let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        TrustedPeers::new(&nets)
    }

    #[test]
    fn contains_normalises_mapped_addresses_and_networks() {
        let t = peers(&["10.0.0.0/8", "::ffff:192.168.0.0/112", "2001:db8::/32"]);
        let cases = [
            ("10.1.2.3", true),
            ("::ffff:10.1.2.3", true),
            ("192.168.7.7", true),
            ("::ffff:192.168.7.7", true),
            ("192.169.0.1", false),
            ("11.0.0.1", false),
            ("2001:db8::1", true),
            ("2001:db9::1", false),
            ("::a01:203", false), // IPv4-compatible, not mapped: stays IPv6
        ];
        for (addr, want) in cases {
            assert_eq!(t.contains(ip(addr)), want, "{addr}");
        }
        assert!(!TrustedPeers::default().contains(ip("10.0.0.1")));
        assert!(TrustedPeers::default().is_empty());
    }

    #[test]
    fn all_of_ipv6_trusts_all_of_ipv4_too() {
        let t = peers(&["::/0"]);
        assert!(t.contains(ip("1.2.3.4")));
        assert!(t.contains(ip("2001:db8::1")));
        let t = peers(&["::ffff:0:0/96"]);
        assert!(t.contains(ip("1.2.3.4")));
        assert!(!t.contains(ip("2001:db8::1")));
    }

    #[test]
    fn walk_table() {
        let t = peers(&["10.0.0.0/8"]);
        let h = |s: &str| if s == "?" { None } else { Some(ip(s)) };
        // (hops, sender, want, from_hops)
        let cases: &[(&[&str], &str, &str, bool)] = &[
            (&[], "10.0.0.1", "10.0.0.1", false),
            (&["1.1.1.1"], "10.0.0.1", "1.1.1.1", true),
            (&["6.6.6.6", "1.1.1.1"], "10.0.0.1", "1.1.1.1", true),
            (
                &["6.6.6.6", "1.1.1.1", "10.0.0.2"],
                "10.0.0.1",
                "1.1.1.1",
                true,
            ),
            (&["10.0.0.3", "10.0.0.2"], "10.0.0.1", "10.0.0.3", true),
            (&["6.6.6.6"], "1.1.1.1", "1.1.1.1", false), // sender not trusted
            (&["1.1.1.1", "?"], "10.0.0.1", "10.0.0.1", false),
            (&["1.1.1.1", "?", "10.0.0.2"], "10.0.0.1", "10.0.0.2", true),
            (&["?", "2.2.2.2"], "10.0.0.1", "2.2.2.2", true),
            (&["::ffff:1.1.1.1"], "::ffff:10.0.0.1", "1.1.1.1", true),
        ];
        for (hops, sender, want, from_hops) in cases {
            let hops: Vec<_> = hops.iter().map(|s| h(s)).collect();
            let got = rightmost_untrusted(&hops, ip(sender), &t);
            assert_eq!(
                got,
                Walk {
                    addr: ip(want),
                    from_hops: *from_hops
                },
                "{hops:?} via {sender}"
            );
        }
    }

    fn arb_hop() -> impl Strategy<Value = Option<IpAddr>> {
        prop_oneof![
            1 => Just(None),
            3 => (0u8..4, any::<u8>()).prop_map(|(a, b)| Some(IpAddr::from([10, a, 0, b]))),
            3 => (0u8..4, any::<u8>()).prop_map(|(a, b)| Some(IpAddr::from([1, a, 0, b]))),
            1 => any::<u128>().prop_map(|x| Some(IpAddr::from(Ipv6Addr::from(x)))),
        ]
    }

    proptest! {
        #[test]
        fn walk_invariants(hops in proptest::collection::vec(arb_hop(), 0..70), sender in arb_hop()) {
            let sender = sender.unwrap_or(ip("10.9.9.9"));
            let t = peers(&["10.0.0.0/8"]);
            let w = rightmost_untrusted(&hops, sender, &t);
            let mut chain: Vec<Option<IpAddr>> = hops.clone();
            chain.push(Some(sender));
            // A reference walk by index over the chain.
            let mut i = chain.len() - 1;
            while chain[i].is_some_and(|a| t.contains(a)) && i > 0 && chain[i - 1].is_some() {
                i -= 1;
            }
            let want = chain[i].map(normalize);
            prop_assert_eq!(Some(w.addr), want);
            prop_assert_eq!(w.from_hops, i < hops.len());
            // Everything to its right is a trusted address.
            for h in &chain[i + 1..] {
                prop_assert!(h.is_some_and(|a| t.contains(a)));
            }
            // Hops left of an unparsable one never matter.
            if let Some(cut) = hops.iter().rposition(Option::is_none) {
                let w2 = rightmost_untrusted(&hops[cut..], sender, &t);
                prop_assert_eq!(w2, w);
            }
            // An untrusted sender is the client, whatever the hops say.
            if !t.contains(sender) {
                prop_assert_eq!(w.addr, normalize(sender));
            }
        }
    }
}
