//! What may be flagged: client addresses, client prefixes, client ids and workloads.
use std::{fmt, net::IpAddr};

use ipnet::IpNet;

use crate::{
    aggregate::State,
    keys::{Key, Prefix, Workload},
};

/// What may be flagged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Client(IpAddr),
    /// A /24 or /64, as the collector aggregates them.
    Prefix(Prefix),
    /// A wider prefix the detector aggregates itself (IPv4 /16 to /23, IPv6 /32 to /63), so
    /// that a group spread over its /24s or /64s is judged as one. Its network address.
    Wide(IpNet),
    Workload(Workload),
    /// A client id as the agents sent it.
    ClientId(Box<str>),
    /// Clients that share no prefix but behave as one (see `detect::cohort`).
    Cohort(CohortKey),
}

/// The traits a cohort's members share, quantized: what makes them one cohort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CohortKey {
    /// Members are client ids (else client addresses).
    pub ids: bool,
    /// log2 of the members' response bytes per hour in half octaves (×2, rounded down), and
    /// of their response bytes per connection in octaves; `req` is reserved (0).
    pub rate: i16,
    pub size: i16,
    pub req: i16,
}

impl fmt::Display for CohortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cohort:{}:r{}:s{}:q{}",
            if self.ids { "id" } else { "addr" },
            self.rate,
            self.size,
            self.req
        )
    }
}

impl CohortKey {
    /// Parses what `Display` gives.
    pub fn parse(s: &str) -> Option<CohortKey> {
        let rest = s.strip_prefix("cohort:")?;
        let mut it = rest.split(':');
        let ids = match it.next()? {
            "id" => true,
            "addr" => false,
            _ => return None,
        };
        let mut num = |p: char| it.next()?.strip_prefix(p)?.parse::<i16>().ok();
        let key = CohortKey {
            ids,
            rate: num('r')?,
            size: num('s')?,
            req: num('q')?,
        };
        it.next().is_none().then_some(key)
    }
}

/// A subject as [`Subject::display`] gives it, written when formatted.
pub struct Named<'a>(pub &'a Subject, pub &'a State);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Subject::Client(a) => a.fmt(f),
            Subject::Prefix(p) => p.fmt(f),
            Subject::Wide(n) => n.fmt(f),
            Subject::Workload(w) => {
                write!(f, "{}/{}/{}", self.1.host_name(w.host), w.cgroup, w.comm)
            }
            Subject::ClientId(id) => f.write_str(id),
            Subject::Cohort(k) => k.fmt(f),
        }
    }
}

/// The prefix of length `len` that `a` falls in (`None` if `len` is longer than the address).
pub fn wide_of(a: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(a, len).ok().map(|n| n.trunc())
}

/// What kind of thing a subject is: each kind has its own limits and its own peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Client,
    Prefix,
    Workload,
    ClientId,
    Cohort,
}

impl Subject {
    /// Whether findings about it are about the service (a workload's own volume), not a client.
    pub fn is_service(&self) -> bool {
        matches!(self, Subject::Workload(_))
    }

    /// An IPv6 /64 (one subscriber or site, usually).
    pub fn is_ipv6_subnet(&self) -> bool {
        matches!(self, Subject::Prefix(p) if p.network().is_ipv6())
    }

    pub fn kind(&self) -> Kind {
        match self {
            Subject::Client(_) => Kind::Client,
            Subject::Prefix(_) | Subject::Wide(_) => Kind::Prefix,
            Subject::Workload(_) => Kind::Workload,
            Subject::ClientId(_) => Kind::ClientId,
            Subject::Cohort(_) => Kind::Cohort,
        }
    }

    /// The subject of a collector key (hosts and gateways are not subjects).
    pub fn of_key(key: &Key) -> Option<Subject> {
        match key {
            Key::Direct(a) | Key::Proxied(a) => Some(Subject::Client(*a)),
            Key::Prefix(p) => Some(Subject::Prefix(*p)),
            Key::Workload(w) => Some(Subject::Workload(w.clone())),
            Key::ClientId(id) => Some(Subject::ClientId(id.clone())),
            Key::Host(_) | Key::Relayed(_) | Key::Folded(_) => None,
        }
    }

    /// The subject of a stored alert: its client id if it has one, else its key parsed.
    pub fn of_alert(key: &str, client_id: &str, st: &State) -> Option<Subject> {
        if client_id.is_empty() {
            Subject::parse(key, st)
        } else {
            Some(Subject::ClientId(client_id.into()))
        }
    }

    /// As alerts show it: `203.0.113.7`, `203.0.113.0/24`, `2001:db8::/48`, `host/cgroup/comm`,
    /// or the client id.
    pub fn display(&self, st: &State) -> String {
        Named(self, st).to_string()
    }

    /// Parses what [`Subject::display`] gives, but for client ids (workload hosts must be known
    /// to `st`).
    pub fn parse(s: &str, st: &State) -> Option<Subject> {
        if let Some(k) = CohortKey::parse(s) {
            return Some(Subject::Cohort(k));
        }
        if let Ok(a) = s.parse::<IpAddr>() {
            return Some(Subject::Client(a));
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Some(match net {
                IpNet::V4(n) if n.prefix_len() == 24 => Subject::Prefix(Prefix::of(net.network())),
                IpNet::V6(n) if n.prefix_len() == 64 => Subject::Prefix(Prefix::of(net.network())),
                n => Subject::Wide(n.trunc()),
            });
        }
        let (host, rest) = s.split_once('/')?;
        let (cgroup, comm) = rest.rsplit_once('/')?;
        Some(Subject::Workload(Workload {
            host: st.host_id(host)?,
            cgroup: cgroup.into(),
            comm: comm.into(),
        }))
    }

    /// `an address`, `a prefix`, ...: as summaries name the kind.
    pub fn what(&self) -> &'static str {
        match self.kind() {
            Kind::Client => "an address",
            Kind::Prefix => "a prefix",
            Kind::Workload => "a workload",
            Kind::ClientId => "a client id",
            Kind::Cohort => "a cohort",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_parse_back() {
        let st = State::default();
        for s in [
            "203.0.113.7",
            "203.0.113.0/24",
            "2001:db8::/64",
            "2001:db8::/48",
            "198.51.0.0/16",
            "cohort:addr:r101:s-3:q53",
        ] {
            let sub = Subject::parse(s, &st).unwrap();
            assert_eq!(sub.display(&st), s);
        }
        assert_eq!(
            Subject::Wide(wide_of("2001:db8:1:2::5".parse().unwrap(), 48).unwrap()).display(&st),
            "2001:db8:1::/48"
        );
    }
}
