//! What the detectors learnt, in the store's `detect_state` table, so that a restart does not
//! start a day of baselines and a month of daily totals over: one row per subject (its
//! [`Track`]) and one for the peers' ratios. Little-endian, with a format byte.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::{
    baseline::{Peers, Track},
    days::Days,
    subject::Subject,
};
use crate::keys::Key;

/// The row of the peers' ratios (no subject key starts with 0xff).
pub const PEERS_ROW: &[u8] = b"\xffpeers";
const SUBJECT_KEY: u8 = 0;
const SUBJECT_WIDE: u8 = 1;
const SUBJECT_COHORT: u8 = 2;
const TRACK_FORMAT: u8 = 1;
const PEERS_FORMAT: u8 = 1;
/// Bytes of an encoded track.
const TRACK_LEN: usize = 1 + 8 + 8 + 8 + 4 + 8 + 8 + Days::ENCODED_LEN;

/// The row key of a subject.
pub fn subject_row(s: &Subject) -> Vec<u8> {
    let mut v = Vec::with_capacity(24);
    match s {
        Subject::Wide(p) => {
            v.push(SUBJECT_WIDE);
            v.push(p.prefix_len());
            match p.network() {
                IpAddr::V4(a) => v.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => v.extend_from_slice(&a.octets()),
            }
        }
        Subject::Cohort(k) => {
            v.push(SUBJECT_COHORT);
            v.extend_from_slice(k.to_string().as_bytes());
        }
        s => {
            v.push(SUBJECT_KEY);
            let key = match s {
                Subject::Client(a) => Key::Direct(*a),
                Subject::Prefix(p) => Key::Prefix(*p),
                Subject::Workload(w) => Key::Workload(w.clone()),
                Subject::ClientId(id) => Key::ClientId(id.clone()),
                Subject::Wide(_) | Subject::Cohort(_) => unreachable!("matched above"),
            };
            key.encode(&mut v);
        }
    }
    v
}

/// The subject of a row key; `None` if it is not one.
pub fn subject_of_row(b: &[u8]) -> Option<Subject> {
    let (&tag, rest) = b.split_first()?;
    match tag {
        SUBJECT_WIDE => {
            let (&len, a) = rest.split_first()?;
            let addr = match a.len() {
                4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?)),
                16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?)),
                _ => return None,
            };
            Some(Subject::Wide(IpNet::new(addr, len).ok()?.trunc()))
        }
        SUBJECT_KEY => Subject::of_key(&Key::decode(rest)?),
        SUBJECT_COHORT => {
            super::subject::CohortKey::parse(std::str::from_utf8(rest).ok()?).map(Subject::Cohort)
        }
        _ => None,
    }
}

/// A track's row value.
pub fn track_value(t: &Track) -> Vec<u8> {
    let mut v = Vec::with_capacity(TRACK_LEN);
    v.push(TRACK_FORMAT);
    v.extend_from_slice(&t.next_hour.to_le_bytes());
    v.extend_from_slice(&t.mean.to_le_bytes());
    v.extend_from_slice(&t.var.to_le_bytes());
    v.extend_from_slice(&t.points.to_le_bytes());
    v.extend_from_slice(&t.cusum.to_le_bytes());
    v.extend_from_slice(&t.last_eval_ms.to_le_bytes());
    t.days.encode(&mut v);
    v
}

fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
}

fn f64_at(b: &[u8], i: usize) -> Option<f64> {
    let v = f64::from_bits(u64_at(b, i)?);
    v.is_finite().then_some(v)
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

/// Parses [`track_value`]'s form; `None` if it is not one.
pub fn track_of_value(b: &[u8]) -> Option<Track> {
    if b.len() != TRACK_LEN || b.first() != Some(&TRACK_FORMAT) {
        return None;
    }
    Some(Track {
        next_hour: u64_at(b, 1)?,
        mean: f64_at(b, 9)?,
        var: f64_at(b, 17)?,
        points: u32_at(b, 25)?,
        cusum: f64_at(b, 29)?,
        last_eval_ms: u64_at(b, 37)?,
        days: Days::decode(b.get(45..)?)?,
    })
}

/// The peers' row value.
pub fn peers_value(peers: &[Peers]) -> Vec<u8> {
    let mut v = vec![PEERS_FORMAT];
    for p in peers {
        v.extend_from_slice(&p.mean.to_le_bytes());
        v.extend_from_slice(&p.n.to_le_bytes());
    }
    v
}

/// Parses [`peers_value`]'s form into `out`; false if it is not one.
pub fn peers_of_value(b: &[u8], out: &mut [Peers]) -> bool {
    if b.len() != 1 + 12 * out.len() || b.first() != Some(&PEERS_FORMAT) {
        return false;
    }
    for (i, p) in out.iter_mut().enumerate() {
        let at = 1 + 12 * i;
        match (f64_at(b, at), u32_at(b, at + 8)) {
            (Some(mean), Some(n)) => *p = Peers { mean, n },
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Prefix, Workload};

    #[test]
    fn rows_round_trip_and_garbage_is_refused() {
        for s in [
            Subject::Client("203.0.113.7".parse().unwrap()),
            Subject::Client("2001:db8::7".parse().unwrap()),
            Subject::Prefix(Prefix::of("198.51.100.9".parse().unwrap())),
            Subject::Wide("2001:db8:7::/48".parse().unwrap()),
            Subject::Wide("198.51.0.0/16".parse().unwrap()),
            Subject::ClientId("h:0123456789abcdef01234567".into()),
            Subject::Workload(Workload {
                host: 3,
                cgroup: "/system.slice/vllm.service".into(),
                comm: "vllm".into(),
            }),
        ] {
            assert_eq!(subject_of_row(&subject_row(&s)), Some(s));
        }
        let t = Track {
            next_hour: 7,
            mean: 20.5,
            var: 0.25,
            points: 30,
            cusum: 1.5,
            last_eval_ms: 99,
            days: Days::default(),
        };
        let back = track_of_value(&track_value(&t)).unwrap();
        assert_eq!((back.next_hour, back.points, back.mean), (7, 30, 20.5));
        let mut v = track_value(&t);
        v[9..17].copy_from_slice(&f64::NAN.to_le_bytes());
        assert!(track_of_value(&v).is_none(), "a NaN baseline is refused");
        assert!(track_of_value(&v[..20]).is_none());
        assert!(subject_of_row(&[9, 1, 2]).is_none());
        let mut peers = [Peers::default(); 4];
        peers[2] = Peers { mean: 3.0, n: 50 };
        let mut back = [Peers::default(); 4];
        assert!(peers_of_value(&peers_value(&peers), &mut back));
        assert_eq!((back[2].mean, back[2].n), (3.0, 50));
        assert!(!peers_of_value(&[1, 2, 3], &mut back));
    }
}
