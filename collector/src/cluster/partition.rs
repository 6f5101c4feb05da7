//! Partitions of the fleet's clients: which share of the cluster a delta belongs to.
//!
//! A delta goes to the partition of its client address's /16 (IPv4) or /32 (IPv6): the widest
//! prefixes the detectors judge as one group ([`PARTITION_PREFIX_V4`],
//! [`PARTITION_PREFIX_V6`]). So an address, its /24 or /64, the wider prefixes around it and
//! what was proxied for it are in one place, and an aggregator judges a group spread over many
//! /24s of a /16 as one collector does. A delta with a client id whose partition (a hash of the
//! id) is another goes to both ([`Placement::Shared`]): to the address's for the address's keys
//! ([`Share::ClientAddress`]), to the id's for the rest ([`Share::Rest`]: the id, the gateway's
//! relayed bytes, the workload, the host). So every key has all of its bytes in one partition,
//! each counted once. Deltas the collector does not aggregate (client role, unknown role) and
//! the batch's own counts go to the partition of the host. The function is fixed (SplitMix64
//! of the prefix's bits, FNV-1a of a name, modulo the count): every node and every version
//! computes the same, since progress is stored per partition.
use std::net::IpAddr;

use outflow_proto::v1;

use crate::model::{AgentKey, Batch, Counters, Delta, Role, Share};

/// Most partitions: a partition is a JetStream subject and a durable consumer.
pub const MAX_PARTITIONS: u32 = 4096;

/// The IPv4 prefix that goes to one partition: no wide prefix the detectors judge
/// (`detect.coordinated.ipv4_wide`) may be wider in a cluster.
pub const PARTITION_PREFIX_V4: u8 = 16;
/// The IPv6 prefix that goes to one partition (`detect.coordinated.ipv6_wide`: none wider).
pub const PARTITION_PREFIX_V6: u8 = 32;

/// The partitions of a cluster (how many there are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions(u32);

/// A partition count out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} partitions: want 1 to {MAX_PARTITIONS}")]
pub struct BadCount(pub u32);

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a, 64 bits: a fixed hash of names.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Partitions {
    pub fn new(count: u32) -> Result<Partitions, BadCount> {
        if (1..=MAX_PARTITIONS).contains(&count) {
            Ok(Partitions(count))
        } else {
            Err(BadCount(count))
        }
    }

    pub fn count(self) -> u32 {
        self.0
    }

    fn of_hash(self, h: u64) -> u32 {
        // Below `count`, which is a u32.
        u32::try_from(h % u64::from(self.0)).unwrap_or(0)
    }

    /// The partition of a client address: that of its /16 or /32.
    pub fn of_addr(self, addr: IpAddr) -> u32 {
        let bits = match addr {
            IpAddr::V4(a) => u64::from(a.to_bits() >> (32 - PARTITION_PREFIX_V4)),
            // The /32's bits, told apart from IPv4's by the top bit.
            IpAddr::V6(a) => (a.to_bits() >> (128 - PARTITION_PREFIX_V6)) as u64 ^ (1 << 63),
        };
        self.of_hash(splitmix64(bits))
    }

    /// The partition of a client id (and of a host name: [`Partitions::of_host`]).
    pub fn of_name(self, name: &str) -> u32 {
        self.of_hash(splitmix64(fnv1a(name.as_bytes())))
    }

    /// The partition of a host: its host-wide counts go there.
    pub fn of_host(self, hostname: &str) -> u32 {
        self.of_name(hostname)
    }

    /// The partitions of a delta (see the module's doc), given its host's: one that it counts
    /// for whole, or the partition of its client address and that of its client id, which
    /// count one share each.
    pub fn of_delta(self, d: &Delta, host: u32) -> Placement {
        if d.role != Role::Server {
            return Placement::Whole(host);
        }
        let addr = self.of_addr(d.client);
        match d.client_id.as_deref().map(|id| self.of_name(id)) {
            Some(id) if id != addr => Placement::Shared { addr, id },
            _ => Placement::Whole(addr),
        }
    }

    /// Splits `batch` of `agent` on `hostname` into the parts of its partitions, in partition
    /// order: each delta in one part; the batch's own counts in the host's part, which is
    /// always there (so every batch has at least one part, and an empty batch is still seen).
    pub fn split(self, agent: &AgentKey, hostname: &str, batch: &Batch) -> Vec<v1::PartBatch> {
        let host = self.of_host(hostname);
        let mut of: Vec<(u32, &Delta, Share)> = Vec::with_capacity(batch.deltas.len());
        for d in &batch.deltas {
            match self.of_delta(d, host) {
                Placement::Whole(p) => of.push((p, d, Share::All)),
                Placement::Shared { addr, id } => {
                    of.push((addr, d, Share::ClientAddress));
                    of.push((id, d, Share::Rest));
                }
            }
        }
        // Stable: a connection's deltas keep their order (the last one closes it).
        of.sort_by_key(|(p, _, _)| *p);
        let mut parts = Vec::new();
        let mut rest = &of[..];
        let mut host_done = false;
        loop {
            let next = rest.first().map(|(p, _, _)| *p);
            // The host's part comes in its place in partition order, deltas or not.
            let p = match next {
                Some(p) if host_done || p <= host => p,
                _ if !host_done => host,
                _ => break,
            };
            let n = rest.iter().take_while(|(q, _, _)| *q == p).count();
            let (these, after) = rest.split_at(n);
            rest = after;
            let mut b = batch.to_wire_with(these.iter().map(|(_, d, _)| *d));
            for (w, (_, _, share)) in b.deltas.iter_mut().zip(these) {
                w.share = v1::DeltaShare::from(*share).into();
            }
            if p == host {
                host_done = true;
            } else {
                b.overflow = Some(Counters::default().into());
                b.lost_batches = 0;
                b.lost = Some(Counters::default().into());
            }
            parts.push(v1::PartBatch {
                agent_id: agent.agent_id.to_string(),
                epoch: agent.epoch,
                hostname: hostname.to_owned(),
                partition: p,
                partitions: self.0,
                batch: Some(b),
            });
        }
        parts
    }
}

/// Where a delta goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// To one partition, which counts it for every key.
    Whole(u32),
    /// Its client address and its client id are in different partitions: to both, each
    /// counting its share ([`Share::ClientAddress`], [`Share::Rest`]).
    Shared { addr: u32, id: u32 },
}

/// The JetStream message id of a part: publishing the same part again is a duplicate.
pub fn message_id(part: &v1::PartBatch) -> String {
    let seq = part.batch.as_ref().map_or(0, |b| b.seq);
    format!(
        "{:016x}.{seq:x}.{:x}.{}",
        part.epoch, part.partition, part.agent_id
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{BatchLimits, ClientSource};

    fn delta(i: u64, client: IpAddr, id: Option<&str>, role: Role, out: u64) -> Delta {
        Delta {
            conn_id: i,
            local: if client.is_ipv4() {
                "10.0.0.1".parse().unwrap()
            } else {
                "2001:db8::10".parse().unwrap()
            },
            local_port: 8000,
            remote: if client.is_ipv4() {
                "192.0.2.1".parse().unwrap()
            } else {
                "2001:db8::1".parse().unwrap()
            },
            remote_port: 40000,
            client,
            client_id: id.map(str::to_owned),
            client_source: ClientSource::ProxyV2,
            role,
            counters: Counters {
                bytes_out: out,
                bytes_in: 7,
                ..Counters::default()
            },
            closed: i.is_multiple_of(3),
            cgroup: "/vllm".into(),
            pid: 1,
            comm: "vllm".into(),
            first_seen_ms: 5,
            share: Share::All,
        }
    }

    fn batch(deltas: Vec<Delta>) -> Batch {
        Batch {
            seq: 9,
            start_ms: 1000,
            end_ms: 2000,
            shifted_ms: 0,
            deltas,
            overflow: Counters {
                bytes_out: 11,
                ..Counters::default()
            },
            lost_batches: 2,
            lost: Counters {
                bytes_out: 13,
                ..Counters::default()
            },
        }
    }

    fn agent() -> AgentKey {
        AgentKey {
            agent_id: "a/b".into(),
            epoch: 3,
        }
    }

    #[test]
    fn the_function_is_fixed() {
        // Stored progress is per partition: these must never change.
        let p = Partitions::new(64).unwrap();
        // A /16 (IPv4) or /32 (IPv6) is in one partition: the widest groups judged.
        assert_eq!(
            p.of_addr("203.0.113.7".parse().unwrap()),
            p.of_addr("203.0.0.200".parse().unwrap())
        );
        assert_ne!(
            p.of_addr("203.0.113.7".parse().unwrap()),
            p.of_addr("203.1.113.7".parse().unwrap())
        );
        assert_eq!(
            [
                p.of_addr("203.0.113.7".parse().unwrap()),
                p.of_addr("2001:db8:1:2::7".parse().unwrap()),
                p.of_name("h:0123456789abcdef01234567"),
                p.of_host("gpu-0"),
            ],
            [
                p.of_addr("203.0.255.0".parse().unwrap()),
                p.of_addr("2001:db8:ffff:2:ffff::".parse().unwrap()),
                p.of_name("h:0123456789abcdef01234567"),
                p.of_name("gpu-0"),
            ]
        );
        let v: Vec<u32> = ["198.51.100.1", "203.0.113.7", "10.1.2.3", "2001:db8::1"]
            .iter()
            .map(|a| p.of_addr(a.parse().unwrap()))
            .chain([p.of_name("h:0123456789abcdef01234567"), p.of_host("gpu-0")])
            .collect();
        assert_eq!(v, [47, 56, 31, 46, 26, 57]);
        assert!(Partitions::new(0).is_err());
        assert!(Partitions::new(MAX_PARTITIONS + 1).is_err());
        assert_eq!(
            Partitions::new(0).unwrap_err().to_string(),
            "0 partitions: want 1 to 4096"
        );
    }

    #[test]
    fn an_empty_batch_is_one_part_of_the_host() {
        let p = Partitions::new(8).unwrap();
        let parts = p.split(&agent(), "gpu-0", &batch(Vec::new()));
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].partition, p.of_host("gpu-0"));
        assert_eq!(parts[0].batch.as_ref().unwrap().lost_batches, 2);
        assert_eq!(
            message_id(&parts[0]),
            format!("0000000000000003.9.{:x}.a/b", parts[0].partition)
        );
    }

    proptest! {
        /// Every delta counts once for each of its keys, in the partition of its client address
        /// (for the address's keys) and of its client id (for the rest): in one part whole, or
        /// in two, a share each; validating the parts again gives the deltas back; the batch's
        /// own counts are in the host's part only.
        #[test]
        fn a_split_counts_every_delta_once_for_each_key_in_its_keys_partition(
            count in 1u32..40,
            raw in prop::collection::vec((0u8..6, 0u8..4, 0u8..3, 0u8..3, 1u64..1_000_000), 0..60),
        ) {
            let p = Partitions::new(count).unwrap();
            let deltas: Vec<Delta> = raw
                .iter()
                .enumerate()
                .map(|(i, &(net, host, id, role, out))| {
                    let client: IpAddr = if net == 5 {
                        format!("2001:{host}::{net}").parse().unwrap()
                    } else {
                        format!("198.{net}.{host}.9").parse().unwrap()
                    };
                    let id = ["h:aaaaaaaaaaaaaaaaaaaaaaaa", "h:bbbbbbbbbbbbbbbbbbbbbbbb"].get(usize::from(id)).copied();
                    let role = [Role::Server, Role::Server, Role::Client][usize::from(role)];
                    delta(i as u64, client, id, role, out)
                })
                .collect();
            let b = batch(deltas.clone());
            let parts = p.split(&agent(), "gpu-0", &b);
            let host = p.of_host("gpu-0");
            let limits = BatchLimits { parts: true, ..BatchLimits::default() };
            // What counts for the client addresses' keys, and for the rest: each delta once.
            let (mut addr_side, mut rest_side) = (Vec::new(), Vec::new());
            let mut lost = 0;
            let mut last = None;
            for part in parts {
                prop_assert!(last < Some(part.partition), "parts in partition order, once each");
                last = Some(part.partition);
                prop_assert_eq!(part.partitions, count);
                let wire = part.batch.unwrap();
                let back = Batch::from_wire(wire, &limits).unwrap();
                prop_assert!(!back.deltas.is_empty() || part.partition == host);
                lost += back.lost_batches;
                for d in back.deltas {
                    let placed = p.of_delta(&d, host);
                    match d.share {
                        Share::All => prop_assert_eq!(placed, Placement::Whole(part.partition)),
                        Share::ClientAddress => {
                            let ok = matches!(placed, Placement::Shared { addr, .. } if addr == part.partition);
                            prop_assert!(ok, "an address's share in the address's partition");
                        }
                        Share::Rest => {
                            let ok = matches!(placed, Placement::Shared { id, .. } if id == part.partition);
                            prop_assert!(ok, "the rest in the id's partition");
                        }
                    }
                    // The address's partition, and the id's, hold every byte of theirs.
                    if d.share.address() && d.role == Role::Server {
                        prop_assert_eq!(p.of_addr(d.client), part.partition);
                    }
                    if d.share.rest() && d.role == Role::Server && let Some(id) = &d.client_id {
                        prop_assert_eq!(p.of_name(id), part.partition);
                    }
                    let whole = Delta { share: Share::All, ..d };
                    if d.share.address() {
                        addr_side.push(whole.clone());
                    }
                    if d.share.rest() {
                        rest_side.push(whole);
                    }
                }
            }
            prop_assert_eq!(lost, 2);
            let key = |d: &Delta| d.conn_id;
            addr_side.sort_by_key(key);
            rest_side.sort_by_key(key);
            prop_assert_eq!(&addr_side, &deltas);
            prop_assert_eq!(&rest_side, &deltas);
        }
    }
}
