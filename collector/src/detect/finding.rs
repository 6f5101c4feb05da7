//! What the detectors say: a [`Verdict`] per (subject, detector), with a [`Finding`] while the
//! detector's condition holds.
use std::{fmt, net::IpAddr};

use super::subject::Subject;
use crate::{
    keys::HostId,
    links::{LinkKind, MAX_LINKS},
    window::Rollup,
};

/// The detectors (`outflow.v1.Detector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DetectorKind {
    Volume,
    Deviation,
    Coordinated,
    Sustained,
    Cohort,
}

impl DetectorKind {
    pub const ALL: [DetectorKind; 5] = [
        DetectorKind::Volume,
        DetectorKind::Deviation,
        DetectorKind::Coordinated,
        DetectorKind::Sustained,
        DetectorKind::Cohort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DetectorKind::Volume => "volume",
            DetectorKind::Deviation => "deviation",
            DetectorKind::Coordinated => "coordinated",
            DetectorKind::Sustained => "sustained",
            DetectorKind::Cohort => "cohort",
        }
    }
}

impl fmt::Display for DetectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// A group's: high over its threshold, critical at 4 times it.
    pub fn of_group(observed: u64, threshold: u64) -> Severity {
        if observed >= threshold.saturating_mul(4) {
            Severity::Critical
        } else {
            Severity::High
        }
    }

    /// By how far the observed value is over the threshold.
    pub fn by_ratio(observed: u64, threshold: u64) -> Severity {
        let r = observed as f64 / threshold.max(1) as f64;
        if r >= 4.0 {
            Severity::Critical
        } else if r >= 2.0 {
            Severity::High
        } else {
            Severity::Medium
        }
    }
}

/// A detector's condition holding for a subject.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub severity: Severity,
    pub window_seconds: u64,
    pub observed_bytes: u64,
    pub baseline_bytes: u64,
    pub threshold_bytes: u64,
    pub request_bytes: u64,
    pub hosts: Vec<HostId>,
    pub members: u64,
    /// The client addresses and gateways of the judged window.
    pub via: Via,
    pub summary: String,
}

/// Addresses shown per kind in a [`Via`].
pub const VIA_SHOWN: usize = 8;

/// Where a subject's bytes came from, besides the hosts that served them: a client id's
/// client addresses, and the gateways (TCP peers other than the client) the bytes of a client
/// id or a client address came through. Each list holds the most recently seen first, at most
/// [`VIA_SHOWN`]; the counts are of the addresses held for the window (at most
/// [`MAX_LINKS`], which means that many or more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Via {
    pub addrs: Vec<IpAddr>,
    pub addr_count: u64,
    pub peers: Vec<IpAddr>,
    pub peer_count: u64,
}

impl Via {
    /// The links of `rollup` seen at or after `start_ms`.
    pub fn of(rollup: &Rollup, start_ms: u64) -> Via {
        let (addrs, addr_count) = recent(rollup, LinkKind::Addr, start_ms);
        let (peers, peer_count) = recent(rollup, LinkKind::Peer, start_ms);
        Via {
            addrs,
            addr_count,
            peers,
            peer_count,
        }
    }
}

/// The most recently seen links of `kind` (at most [`VIA_SHOWN`]) and how many there are.
fn recent(rollup: &Rollup, kind: LinkKind, start_ms: u64) -> (Vec<IpAddr>, u64) {
    let mut v: Vec<(IpAddr, u64)> = rollup.links_since(kind, start_ms).collect();
    v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let n = v.len() as u64;
    (v.into_iter().take(VIA_SHOWN).map(|l| l.0).collect(), n)
}

/// ` (from 3 addresses: a, b, c; through 2 gateways: g, h)`, or nothing without links.
impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, what: &str, shown: &[IpAddr], n: u64| {
            let plus = if n as usize >= MAX_LINKS { "+" } else { "" };
            write!(f, "{what} {n}{plus} ")?;
            f.write_str(if what == "from" {
                "address(es): "
            } else {
                "gateway(s): "
            })?;
            for (i, a) in shown.iter().enumerate() {
                write!(f, "{}{a}", if i == 0 { "" } else { ", " })?;
            }
            match n.saturating_sub(shown.len() as u64) {
                0 => Ok(()),
                more => write!(f, " and {more}{plus} more"),
            }
        };
        match (self.addr_count, self.peer_count) {
            (0, 0) => Ok(()),
            (_, 0) => {
                f.write_str(" (")?;
                list(f, "from", &self.addrs, self.addr_count)?;
                f.write_str(")")
            }
            (0, _) => {
                f.write_str(" (")?;
                list(f, "through", &self.peers, self.peer_count)?;
                f.write_str(")")
            }
            _ => {
                f.write_str(" (")?;
                list(f, "from", &self.addrs, self.addr_count)?;
                f.write_str("; ")?;
                list(f, "through", &self.peers, self.peer_count)?;
                f.write_str(")")
            }
        }
    }
}

/// One subject judged by one detector: `Some` while the condition holds.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub subject: Subject,
    pub detector: DetectorKind,
    pub finding: Option<Finding>,
    /// The subject's response bytes by the hour, for the episode's total.
    pub hours: HourBytes,
}

/// A subject's response bytes in the hour of a judgement (so far) and in the hour before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HourBytes {
    /// Hours since the epoch (`time_ms / 3_600_000`).
    pub hour: u64,
    pub bytes: u64,
    pub prev: u64,
}

impl HourBytes {
    /// Of `rollup`, judged at `end_ms`: from its hourly buckets.
    pub fn of(rollup: &Rollup, end_ms: u64) -> HourBytes {
        let hour = end_ms / 3_600_000;
        let in_hour = |h: u64| {
            rollup
                .hourly()
                .find(|x| x.0 == h)
                .map_or(0, |x| x.1.response_bytes)
        };
        HourBytes {
            hour,
            bytes: in_hour(hour),
            prev: in_hour(hour.saturating_sub(1)),
        }
    }
}

/// Bytes as people read them: `14.2 GiB`.
pub fn human(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_750_000_000_000;
    const GIB: u64 = 1 << 30;

    #[test]
    fn via_names_addresses_and_gateways() {
        let a = |i: u8| IpAddr::from([198, 51, 100, i]);
        let mut r = Rollup::default();
        assert_eq!(Via::of(&r, 0).to_string(), "", "a direct client");
        r.see_link(LinkKind::Peer, "10.1.0.1".parse().unwrap(), T0);
        assert_eq!(
            Via::of(&r, 0).to_string(),
            " (through 1 gateway(s): 10.1.0.1)"
        );
        for i in 1..=10 {
            r.see_link(LinkKind::Addr, a(i), T0 + u64::from(i) * 10_000);
        }
        let v = Via::of(&r, 0);
        assert_eq!(
            (v.addr_count, v.addrs.len(), v.addrs[0]),
            (10, VIA_SHOWN, a(10))
        );
        assert_eq!(
            v.to_string(),
            " (from 10 address(es): 198.51.100.10, 198.51.100.9, 198.51.100.8, 198.51.100.7, \
             198.51.100.6, 198.51.100.5, 198.51.100.4, 198.51.100.3 and 2 more; through 1 \
             gateway(s): 10.1.0.1)"
        );
        // Only what was seen in the window.
        assert_eq!(Via::of(&r, T0 + 95_000).addr_count, 1);
        for i in 11..=40 {
            r.see_link(LinkKind::Addr, a(i), T0 + 1_000_000);
        }
        assert!(Via::of(&r, 0).to_string().contains("and 24+ more"));
    }

    #[test]
    fn human_bytes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(14 * GIB + GIB / 5), "14.2 GiB");
    }
}
