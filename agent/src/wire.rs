//! The edge between the agent's records and the `outflow.v1` wire types.
use std::net::IpAddr;

use outflow_proto::v1;

use crate::record::{ConnRecord, CountersOut, Role};

/// An address as the protocol wants it: 4 bytes for IPv4 (v4-mapped IPv6 included), else 16.
pub fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or_else(|| v6.octets().to_vec(), |v4| v4.octets().to_vec()),
    }
}

impl From<Role> for v1::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Server => Self::Server,
            Role::Client => Self::Client,
            Role::Unknown => Self::Unspecified,
        }
    }
}

impl From<&CountersOut> for v1::Counters {
    fn from(c: &CountersOut) -> Self {
        Self {
            bytes_out: c.bytes_out,
            bytes_in: c.bytes_in,
            wire_bytes_out: c.wire_bytes_out,
            wire_bytes_in: c.wire_bytes_in,
            segments_out: c.segments_out,
            segments_in: c.segments_in,
        }
    }
}

impl From<&ConnRecord> for v1::ConnDelta {
    fn from(r: &ConnRecord) -> Self {
        Self {
            conn_id: r.conn_id,
            local_addr: addr_bytes(r.local_addr),
            local_port: r.local_port.into(),
            remote_addr: addr_bytes(r.remote_addr),
            remote_port: r.remote_port.into(),
            role: v1::Role::from(r.role).into(),
            counters: Some(v1::Counters {
                bytes_out: r.bytes_out,
                bytes_in: r.bytes_in,
                wire_bytes_out: r.wire_bytes_out,
                wire_bytes_in: r.wire_bytes_in,
                segments_out: r.segments_out,
                segments_in: r.segments_in,
            }),
            closed: r.closed,
            cgroup: r.cgroup.clone().unwrap_or_default(),
            pid: r.pid.unwrap_or(0),
            comm: r.comm.clone().unwrap_or_default(),
            first_seen_ms: r.first_seen,
            client_addr: if r.client_source == "peer" {
                Vec::new()
            } else {
                addr_bytes(r.client_addr)
            },
            client_id: r.client_id.clone().unwrap_or_default(),
            client_source: r.client_source.clone(),
            // An agent's deltas count for every key (only a cluster's ingest nodes split them).
            share: v1::DeltaShare::All.into(),
        }
    }
}

/// `total += c`, field by field (saturating: these are sums for reports).
pub fn add_counters(total: &mut v1::Counters, c: &v1::Counters) {
    total.bytes_out = total.bytes_out.saturating_add(c.bytes_out);
    total.bytes_in = total.bytes_in.saturating_add(c.bytes_in);
    total.wire_bytes_out = total.wire_bytes_out.saturating_add(c.wire_bytes_out);
    total.wire_bytes_in = total.wire_bytes_in.saturating_add(c.wire_bytes_in);
    total.segments_out = total.segments_out.saturating_add(c.segments_out);
    total.segments_in = total.segments_in.saturating_add(c.segments_in);
}

/// Batches that did not reach the collector and what they counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loss {
    pub batches: u64,
    pub counters: v1::Counters,
}

impl Loss {
    pub const fn is_zero(&self) -> bool {
        self.batches == 0
    }

    pub fn add(&mut self, other: &Self) {
        self.batches = self.batches.saturating_add(other.batches);
        add_counters(&mut self.counters, &other.counters);
    }

    /// The batch `b` itself and its counts (deltas and overflow).
    pub fn own(b: &v1::Batch) -> Self {
        let mut counters = v1::Counters::default();
        for d in &b.deltas {
            if let Some(c) = &d.counters {
                add_counters(&mut counters, c);
            }
        }
        if let Some(c) = &b.overflow {
            add_counters(&mut counters, c);
        }
        Self {
            batches: 1,
            counters,
        }
    }

    /// What is lost if `b` is dropped: itself and everything it carries, including the losses
    /// it was to report.
    pub fn of_batch(b: &v1::Batch) -> Self {
        let mut l = Self::own(b);
        l.batches = l.batches.saturating_add(b.lost_batches);
        if let Some(c) = &b.lost {
            add_counters(&mut l.counters, c);
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn record(local: IpAddr, remote: IpAddr, role: Role) -> ConnRecord {
        ConnRecord {
            ts: 2000,
            conn_id: 77,
            family: "ipv6",
            local_addr: local,
            local_port: 8000,
            remote_addr: remote,
            remote_port: 40000,
            client_addr: remote,
            client_id: None,
            client_source: "peer".into(),
            role,
            bytes_out: 1,
            bytes_in: 2,
            wire_bytes_out: 3,
            wire_bytes_in: 4,
            segments_out: 5,
            segments_in: 6,
            closed: true,
            cgroup: None,
            cgroup_id: 9,
            pid: None,
            comm: None,
            first_seen: 1000,
            last_seen: 2000,
        }
    }

    #[test]
    fn v4_mapped_addresses_are_sent_as_ipv4() {
        let mapped: Ipv6Addr = "::ffff:198.18.0.2".parse().expect("ip");
        assert_eq!(addr_bytes(IpAddr::V6(mapped)), vec![198, 18, 0, 2]);
        assert_eq!(
            addr_bytes(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            vec![10, 0, 0, 1]
        );
        let v6: Ipv6Addr = "2001:db8::2".parse().expect("ip");
        assert_eq!(addr_bytes(IpAddr::V6(v6)), v6.octets().to_vec());
        assert_eq!(addr_bytes(IpAddr::V6(Ipv6Addr::LOCALHOST)).len(), 16);
    }

    #[test]
    fn records_convert_field_by_field() {
        let d = v1::ConnDelta::from(&record(
            IpAddr::V6("::ffff:10.0.0.5".parse().expect("ip")),
            IpAddr::V6("2001:db8::9".parse().expect("ip")),
            Role::Server,
        ));
        assert_eq!(d.conn_id, 77);
        assert_eq!(d.local_addr, vec![10, 0, 0, 5]);
        assert_eq!(d.remote_addr.len(), 16);
        assert_eq!((d.local_port, d.remote_port), (8000, 40000));
        assert_eq!(d.role(), v1::Role::Server);
        let c = d.counters.expect("counters");
        assert_eq!(
            (
                c.bytes_out,
                c.bytes_in,
                c.wire_bytes_out,
                c.wire_bytes_in,
                c.segments_out,
                c.segments_in
            ),
            (1, 2, 3, 4, 5, 6)
        );
        assert!(d.closed);
        assert_eq!((d.pid, d.comm.as_str(), d.cgroup.as_str()), (0, "", ""));
        assert_eq!(d.first_seen_ms, 1000);
    }

    #[test]
    fn roles_map_to_the_wire_enum() {
        assert_eq!(v1::Role::from(Role::Server), v1::Role::Server);
        assert_eq!(v1::Role::from(Role::Client), v1::Role::Client);
        assert_eq!(v1::Role::from(Role::Unknown), v1::Role::Unspecified);
        let mut r = record(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            Role::Client,
        );
        r.pid = Some(42);
        r.comm = Some("vllm".into());
        r.cgroup = Some("/x.service".into());
        let d = v1::ConnDelta::from(&r);
        assert_eq!(d.role, v1::Role::Client as i32);
        assert_eq!(
            (d.pid, d.comm.as_str(), d.cgroup.as_str()),
            (42, "vllm", "/x.service")
        );
    }

    #[test]
    fn a_dropped_batch_loses_what_it_carries() {
        let c = |n| v1::Counters {
            bytes_out: n,
            ..v1::Counters::default()
        };
        let b = v1::Batch {
            seq: 3,
            deltas: vec![
                v1::ConnDelta {
                    counters: Some(c(10)),
                    ..Default::default()
                },
                v1::ConnDelta {
                    counters: Some(c(5)),
                    ..Default::default()
                },
            ],
            overflow: Some(c(100)),
            lost_batches: 2,
            lost: Some(c(1000)),
            ..Default::default()
        };
        let l = Loss::of_batch(&b);
        assert_eq!(l.batches, 3);
        assert_eq!(l.counters.bytes_out, 1115);
        let l = Loss::own(&b);
        assert_eq!(l.batches, 1);
        assert_eq!(l.counters.bytes_out, 115);
    }
}
