//! Bulk-exfiltration detection on batch time.
//!
//! Everything here runs on the store writer thread, after a group commit, on BATCH time (the
//! newest applied `end_ms`), never the wall clock: a day of traffic replays in seconds.
//!
//! # Subjects
//!
//! A [`Subject`] is what may be flagged: a client address (/32, /128), a client prefix (/24
//! IPv4, /64 IPv6, both aggregated by the collector), an IPv6 /48 (aggregated here, from the
//! client addresses of each applied batch), a client id, or a workload (host/cgroup/comm).
//! Client addresses are the clients the agents attributed the bytes to, not the gateways they
//! came through; gateways (TCP peers) are not subjects: their bytes are their clients'. Its
//! windows come from its [`Rollup`]: the 1 h window (5-min buckets) and the 24 h window
//! (hourly buckets). A finding of a client id names its addresses and gateways, one of a
//! client address the gateways it came through ([`Via`]).
//!
//! # Detectors (defaults in brackets)
//!
//! * **Volume**: response bytes over the 1 h window ≥ `volume.*_per_hour`, else over the 24 h
//!   window ≥ `volume.*_per_day` [address and client id 1 GiB/h, 10 GiB/day; prefix 8 GiB/h,
//!   80 GiB/day; workload off]. For a prefix, allowlisted members' bytes are left out.
//! * **Coordinated** (prefixes): 1 h total (without allowlisted members) ≥ `coordinated.factor`
//!   × `volume.client_per_hour` [4 × 1 GiB], while no member is over `volume.client_per_hour`,
//!   with ≥ `coordinated.min_members` [8] members active in the 1 h window, and a synchrony ≥
//!   `coordinated.min_synchrony` [0.5]: the mean Jaccard similarity of each active member's
//!   active hours (last 24 h) with the hours in which at least half of them were active.
//! * **Deviation**: an EWMA (α = 2 / (`deviation.baseline_hours` + 1) [24]) of the mean and
//!   variance of log2(bytes) of the key's ACTIVE hours (≥ `active_hour_bytes` [1 MiB]; idle
//!   hours are not traffic to learn from). Fires when, with ≥ `deviation.min_history_hours`
//!   [24] points, log2(1 h bytes) > mean + `deviation.sigmas` [3] × max(σ,
//!   `deviation.min_sigma` [0.5]) and 1 h bytes ≥ `deviation.floor_bytes_per_hour` [256 MiB].
//! * **Sustained**: with 24 h bytes ≥ `sustained.min_bytes_per_day` [2 GiB], either (a) active
//!   in ≥ `sustained.min_active_hours` [18] of the last 24 hours with a 24 h response/request
//!   ratio ≥ `sustained.ratio_factor` [8] × its peers' (the EWMA of log2 ratio of every active
//!   hour of keys of the same kind, once ≥ `sustained.min_peer_samples` [48] hours were seen),
//!   or (b) a CUSUM of the standardized log-bytes of active hours, S = max(0, S + z −
//!   `sustained.cusum_slack` [1]), ≥ `sustained.cusum_threshold` [12]: a low-and-slow rise.
//!   z is against the deviation baseline, which is frozen while S > 0 (up to 2 × the
//!   threshold, then the new level is learnt and the alert resolves as S falls back).
//!
//! A prefix whose bytes in the judged window come for ≥ `dominant_member_share` [0.8] from one
//! member is not flagged by volume, deviation or sustained: that member is judged on its own.
//!
//! An allowlisted subject (`allowlist.cidrs` contains it, it is one of `allowlist.client_ids`,
//! or its workload name starts with one of `allowlist.workloads`) is not evaluated at all.
//!
//! # Cost
//!
//! A key touched by a commit is evaluated at most once per `eval_interval` [1 min] of batch
//! time: a few window sums over its ≤ 56 buckets, plus, for a prefix, one lookup per member
//! seen in the last hour. Hourly baselines fold lazily when a key is evaluated in a later hour.
//! Every `eval_interval` of batch time, the subjects of open alerts are evaluated again so that
//! alerts of keys that went quiet resolve.
use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use outflow_proto::limits::MAX_CLIENT_ID_LEN;
use serde::{Deserialize, Serialize};

use crate::{
    aggregate::{Map, State},
    config::{ConfigError, invalid},
    keys::{HostId, Key, Prefix, Workload},
    links::{LinkKind, MAX_LINKS},
    window::{Rollup, Totals, Window, WindowStats},
};

const HOUR_MS: u64 = 3_600_000;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// `[detect]`: bulk-exfiltration detection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// Run the detectors at all.
    pub enabled: bool,
    /// Batch time between two evaluations of one key (and between sweeps of open alerts).
    #[serde(with = "humantime_serde")]
    pub eval_interval: Duration,
    /// An alert resolves once its condition has been false for this long (batch time).
    #[serde(with = "humantime_serde")]
    pub resolve_after: Duration,
    /// An hour with at least this many response bytes counts as an active hour.
    pub active_hour_bytes: u64,
    /// A prefix whose bytes in the judged window come this much (0..=1) from one member is
    /// not flagged by volume, deviation or sustained: that member is judged on its own.
    pub dominant_member_share: f64,
    pub volume: VolumeConfig,
    pub coordinated: CoordinatedConfig,
    pub deviation: DeviationConfig,
    pub sustained: SustainedConfig,
    pub allowlist: AllowlistConfig,
    pub webhook: crate::webhook::WebhookConfig,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            eval_interval: Duration::from_secs(60),
            resolve_after: Duration::from_secs(15 * 60),
            active_hour_bytes: MIB,
            dominant_member_share: 0.8,
            volume: VolumeConfig::default(),
            coordinated: CoordinatedConfig::default(),
            deviation: DeviationConfig::default(),
            sustained: SustainedConfig::default(),
            allowlist: AllowlistConfig::default(),
            webhook: crate::webhook::WebhookConfig::default(),
        }
    }
}

/// `[detect.volume]`: absolute thresholds on response bytes (0: that check is off).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VolumeConfig {
    pub enabled: bool,
    /// A client address, and a client id.
    pub client_per_hour: u64,
    pub client_per_day: u64,
    pub prefix_per_hour: u64,
    pub prefix_per_day: u64,
    /// An IPv6 /64 is normally one subscriber or site, so it gets per-client limits by default:
    /// a client rotating its address inside its /64 is caught like one address.
    pub ipv6_subnet_per_hour: u64,
    pub ipv6_subnet_per_day: u64,
    pub workload_per_hour: u64,
    pub workload_per_day: u64,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            client_per_hour: GIB,
            client_per_day: 10 * GIB,
            prefix_per_hour: 8 * GIB,
            prefix_per_day: 80 * GIB,
            ipv6_subnet_per_hour: GIB,
            ipv6_subnet_per_day: 10 * GIB,
            workload_per_hour: 0,
            workload_per_day: 0,
        }
    }
}

/// `[detect.coordinated]`: a prefix spread over many addresses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatedConfig {
    pub enabled: bool,
    /// The prefix's 1 h total must be this many times `volume.client_per_hour`.
    pub factor: f64,
    /// Distinct member addresses active in the last hour.
    pub min_members: u64,
    /// Mean Jaccard similarity of members' active hours with the group's (0..=1).
    pub min_synchrony: f64,
}

impl Default for CoordinatedConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            factor: 4.0,
            min_members: 8,
            min_synchrony: 0.5,
        }
    }
}

/// `[detect.deviation]`: far above the key's own hourly baseline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviationConfig {
    pub enabled: bool,
    pub sigmas: f64,
    /// EWMA span in active hours: α = 2 / (baseline_hours + 1).
    pub baseline_hours: f64,
    pub min_history_hours: u32,
    /// Lower bound of σ, in log2 units (0.5: a factor of 1.41).
    pub min_sigma: f64,
    /// Never alert below this many response bytes in the hour.
    pub floor_bytes_per_hour: u64,
}

impl Default for DeviationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sigmas: 3.0,
            baseline_hours: 24.0,
            min_history_hours: 24,
            min_sigma: 0.5,
            floor_bytes_per_hour: 256 * MIB,
        }
    }
}

/// `[detect.sustained]`: streaming most of the day, or rising slowly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SustainedConfig {
    pub enabled: bool,
    pub min_active_hours: u32,
    pub min_bytes_per_day: u64,
    /// Response/request ratio this many times the peers' (geometric mean).
    pub ratio_factor: f64,
    pub min_peer_samples: u32,
    pub cusum_slack: f64,
    pub cusum_threshold: f64,
}

impl Default for SustainedConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_active_hours: 18,
            min_bytes_per_day: 2 * GIB,
            ratio_factor: 8.0,
            min_peer_samples: 48,
            cusum_slack: 1.0,
            cusum_threshold: 12.0,
        }
    }
}

/// `[detect.allowlist]`: known bulk clients, never flagged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllowlistConfig {
    /// Client networks (`"198.51.100.0/24"`, `"2001:db8::/48"`, `"192.0.2.7/32"`).
    pub cidrs: Vec<ipnet::IpNet>,
    /// Workload name prefixes (`"gpu-1/system.slice/batch.service"`).
    pub workloads: Vec<String>,
    /// Client ids, exactly as agents send them (`"h:0123456789abcdef01234567"`).
    pub client_ids: Vec<String>,
}

impl DetectConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.eval_interval < Duration::from_secs(1) {
            return Err(invalid("detect.eval_interval", "must be at least 1s"));
        }
        let pos = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    field,
                    format!("must be a positive number (got {v})"),
                ))
            }
        };
        pos("detect.coordinated.factor", self.coordinated.factor)?;
        pos("detect.deviation.sigmas", self.deviation.sigmas)?;
        pos(
            "detect.deviation.baseline_hours",
            self.deviation.baseline_hours,
        )?;
        pos("detect.deviation.min_sigma", self.deviation.min_sigma)?;
        pos("detect.sustained.ratio_factor", self.sustained.ratio_factor)?;
        pos(
            "detect.sustained.cusum_threshold",
            self.sustained.cusum_threshold,
        )?;
        if !(self.sustained.cusum_slack.is_finite() && self.sustained.cusum_slack >= 0.0) {
            return Err(invalid(
                "detect.sustained.cusum_slack",
                "must be a number ≥ 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.dominant_member_share) {
            return Err(invalid(
                "detect.dominant_member_share",
                format!("must be in 0..=1 (got {})", self.dominant_member_share),
            ));
        }
        if !(0.0..=1.0).contains(&self.coordinated.min_synchrony) {
            return Err(invalid(
                "detect.coordinated.min_synchrony",
                format!("must be in 0..=1 (got {})", self.coordinated.min_synchrony),
            ));
        }
        if self.sustained.min_active_hours > 24 {
            return Err(invalid(
                "detect.sustained.min_active_hours",
                format!(
                    "must be at most 24 (got {})",
                    self.sustained.min_active_hours
                ),
            ));
        }
        if let Some(url) = &self.webhook.url {
            crate::webhook::Target::parse(url).map_err(|m| invalid("detect.webhook.url", m))?;
        }
        if self.webhook.max_attempts == 0 {
            return Err(invalid("detect.webhook.max_attempts", "must be at least 1"));
        }
        if self.active_hour_bytes == 0 {
            return Err(invalid("detect.active_hour_bytes", "must be at least 1"));
        }
        for id in &self.allowlist.client_ids {
            if id.is_empty() || id.chars().nth(MAX_CLIENT_ID_LEN).is_some() {
                return Err(invalid(
                    "detect.allowlist.client_ids",
                    format!("{id:?}: a client id has 1 to {MAX_CLIENT_ID_LEN} characters"),
                ));
            }
        }
        Ok(())
    }
}

/// What may be flagged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Client(IpAddr),
    /// A /24 or /64, as the collector aggregates them.
    Prefix(Prefix),
    /// An IPv6 /48 (network address).
    Prefix48(Ipv6Addr),
    Workload(Workload),
    /// A client id as the agents sent it.
    ClientId(Box<str>),
}

/// A subject as [`Subject::display`] gives it, written when formatted.
struct Named<'a>(&'a Subject, &'a State);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Subject::Client(a) => a.fmt(f),
            Subject::Prefix(p) => p.fmt(f),
            Subject::Prefix48(n) => write!(f, "{n}/48"),
            Subject::Workload(w) => {
                write!(f, "{}/{}/{}", self.1.host_name(w.host), w.cgroup, w.comm)
            }
            Subject::ClientId(id) => f.write_str(id),
        }
    }
}

/// The /48 an IPv6 address falls in.
pub fn prefix48(a: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from_bits(a.to_bits() & !((1u128 << 80) - 1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Client,
    Prefix,
    Workload,
    ClientId,
}

impl Subject {
    /// An IPv6 /64 (one subscriber or site, usually).
    fn is_ipv6_subnet(&self) -> bool {
        matches!(self, Subject::Prefix(p) if p.network().is_ipv6())
    }

    fn kind(&self) -> Kind {
        match self {
            Subject::Client(_) => Kind::Client,
            Subject::Prefix(_) | Subject::Prefix48(_) => Kind::Prefix,
            Subject::Workload(_) => Kind::Workload,
            Subject::ClientId(_) => Kind::ClientId,
        }
    }

    /// The subject of a collector key (hosts and gateways are not subjects).
    pub fn of_key(key: &Key) -> Option<Subject> {
        match key {
            Key::Direct(a) | Key::Proxied(a) => Some(Subject::Client(*a)),
            Key::Prefix(p) => Some(Subject::Prefix(*p)),
            Key::Workload(w) => Some(Subject::Workload(w.clone())),
            Key::ClientId(id) => Some(Subject::ClientId(id.clone())),
            Key::Host(_) | Key::Relayed(_) => None,
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
        if let Ok(a) = s.parse::<IpAddr>() {
            return Some(Subject::Client(a));
        }
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return match (net, net.prefix_len()) {
                (ipnet::IpNet::V6(n), 48) => Some(Subject::Prefix48(n.network())),
                (n, 24 | 64) => Some(Subject::Prefix(Prefix::of(n.network()))),
                _ => None,
            };
        }
        let (host, rest) = s.split_once('/')?;
        let (cgroup, comm) = rest.rsplit_once('/')?;
        Some(Subject::Workload(Workload {
            host: st.host_id(host)?,
            cgroup: cgroup.into(),
            comm: comm.into(),
        }))
    }

    fn what(&self) -> &'static str {
        match self.kind() {
            Kind::Client => "an address",
            Kind::Prefix => "a prefix",
            Kind::Workload => "a workload",
            Kind::ClientId => "a client id",
        }
    }
}

/// The four detectors (`outflow.v1.Detector`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DetectorKind {
    Volume,
    Deviation,
    Coordinated,
    Sustained,
}

impl DetectorKind {
    pub const ALL: [DetectorKind; 4] = [
        DetectorKind::Volume,
        DetectorKind::Deviation,
        DetectorKind::Coordinated,
        DetectorKind::Sustained,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DetectorKind::Volume => "volume",
            DetectorKind::Deviation => "deviation",
            DetectorKind::Coordinated => "coordinated",
            DetectorKind::Sustained => "sustained",
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
    /// By how far the observed value is over the threshold.
    fn by_ratio(observed: u64, threshold: u64) -> Severity {
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

/// Per-subject learning state.
#[derive(Debug, Clone, Default)]
struct Track {
    /// Hours before this one are folded into the baseline.
    next_hour: u64,
    mean: f64,
    var: f64,
    points: u32,
    cusum: f64,
    /// Batch time of the last evaluation (0: never).
    last_eval_ms: u64,
}

/// Peers' response/request ratio per kind: EWMA of log2 ratio of active hours.
#[derive(Debug, Clone, Copy, Default)]
struct Peers {
    mean: f64,
    n: u32,
}

const PEER_ALPHA: f64 = 0.01;

/// Members of one prefix: address → last batch time seen.
type Members = Map<IpAddr, u64>;

/// The detection engine (owned by the store writer).
#[derive(Debug)]
pub struct Detector {
    cfg: DetectConfig,
    tracks: Map<Subject, Track>,
    p48: Map<Ipv6Addr, Rollup>,
    members: Map<Subject, Members>,
    peers: [Peers; 4],
    last_sweep_ms: u64,
    last_prune_hour: u64,
}

/// An IPv6 client address's totals in an applied batch (for the /48 aggregates).
#[derive(Debug, Clone, Copy)]
pub struct ClientObs {
    pub addr: IpAddr,
    pub time_ms: u64,
    pub host: HostId,
    pub totals: Totals,
}

fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Client => 0,
        Kind::Prefix => 1,
        Kind::Workload => 2,
        Kind::ClientId => 3,
    }
}

impl Detector {
    /// A detector; `st` seeds the /48 aggregates and member lists from the held rollups.
    pub fn new(cfg: DetectConfig, st: &State) -> Detector {
        let mut d = Detector {
            cfg,
            tracks: Map::default(),
            p48: Map::default(),
            members: Map::default(),
            peers: [Peers::default(); 4],
            last_sweep_ms: 0,
            last_prune_hour: 0,
        };
        let end = st.end_ms();
        for (key, rollup) in st.iter() {
            // A client's two keys: both add to its /48, the later time counts.
            let (Key::Direct(a) | Key::Proxied(a)) = key else {
                continue;
            };
            let last = rollup
                .hosts_since(0)
                .filter_map(|h| rollup.host_last_seen(h))
                .max();
            let last = last.unwrap_or(end);
            d.member(Subject::Prefix(Prefix::of(a)), a, last);
            if let IpAddr::V6(v6) = a {
                let p = prefix48(v6);
                d.p48.entry(p).or_default().merge(rollup);
                d.member(Subject::Prefix48(p), a, last);
            }
        }
        d
    }

    /// Records `addr` as a member of `group` seen at `time_ms` (keeps the later time).
    fn member(&mut self, group: Subject, addr: IpAddr, time_ms: u64) {
        let t = self
            .members
            .entry(group)
            .or_default()
            .entry(addr)
            .or_default();
        *t = (*t).max(time_ms);
    }

    /// The configuration.
    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// Records what a commit applied: `subjects` (the keys it touched) make their client
    /// addresses members of their prefixes, seen at `end_ms`; `v6` (the IPv6 client totals of
    /// each applied batch) feed the /48 aggregates. Returns the /48s touched.
    pub fn observe(&mut self, subjects: &[Subject], v6: &[ClientObs], end_ms: u64) -> Vec<Subject> {
        for s in subjects {
            let Subject::Client(addr) = s else { continue };
            let m = self
                .members
                .entry(Subject::Prefix(Prefix::of(*addr)))
                .or_default();
            m.insert(*addr, end_ms);
            if let IpAddr::V6(v) = addr {
                self.members
                    .entry(Subject::Prefix48(prefix48(*v)))
                    .or_default()
                    .insert(*addr, end_ms);
            }
        }
        let mut touched = Vec::new();
        for o in v6 {
            let IpAddr::V6(v) = o.addr else { continue };
            let p = prefix48(v);
            self.p48
                .entry(p)
                .or_default()
                .add(o.time_ms, o.host, &o.totals);
            if touched.last() != Some(&Subject::Prefix48(p)) {
                touched.push(Subject::Prefix48(p));
            }
        }
        touched.sort();
        touched.dedup();
        touched
    }

    /// Whether the sweep of open alerts is due at batch time `end_ms`; marks it done.
    pub fn sweep_due(&mut self, end_ms: u64) -> bool {
        let every = u64::try_from(self.cfg.eval_interval.as_millis()).unwrap_or(u64::MAX);
        if end_ms >= self.last_sweep_ms.saturating_add(every) {
            self.last_sweep_ms = end_ms;
            self.prune(end_ms);
            true
        } else {
            false
        }
    }

    /// Drops members, /48 buckets and tracks that left the 24 h window (once per hour).
    fn prune(&mut self, end_ms: u64) {
        let hour = end_ms / HOUR_MS;
        if hour == self.last_prune_hour {
            return;
        }
        self.last_prune_hour = hour;
        let start = Window::H24.start_ms(end_ms);
        for m in self.members.values_mut() {
            m.retain(|_, t| *t >= start);
        }
        self.members.retain(|_, m| !m.is_empty());
        for r in self.p48.values_mut() {
            r.prune_slots(end_ms);
            r.prune_hosts(end_ms);
        }
        self.p48.retain(|_, r| !r.is_empty());
        // A baseline is kept a week past the key's last evaluation.
        let keep = end_ms.saturating_sub(7 * 24 * HOUR_MS);
        self.tracks.retain(|_, t| t.last_eval_ms >= keep);
    }

    fn allowlisted(cfg: &DetectConfig, s: &Subject, st: &State) -> bool {
        let a = &cfg.allowlist;
        match s {
            Subject::Client(ip) => a.cidrs.iter().any(|n| n.contains(ip)),
            Subject::Prefix(p) => a
                .cidrs
                .iter()
                .any(|n| n.prefix_len() <= p.prefix_len() && n.contains(&p.network())),
            Subject::Prefix48(p) => a
                .cidrs
                .iter()
                .any(|n| n.prefix_len() <= 48 && n.contains(&IpAddr::V6(*p))),
            Subject::Workload(_) => {
                !a.workloads.is_empty() && {
                    let name = s.display(st);
                    a.workloads.iter().any(|w| name.starts_with(w.as_str()))
                }
            }
            Subject::ClientId(id) => a.client_ids.iter().any(|x| **x == **id),
        }
    }

    /// Evaluates `subject` at batch time `end_ms` unless it was evaluated less than
    /// `eval_interval` ago (and `force` is false). Verdicts for every detector that applies.
    pub fn evaluate(
        &mut self,
        st: &State,
        subject: &Subject,
        end_ms: u64,
        force: bool,
        out: &mut Vec<Verdict>,
    ) {
        let every = u64::try_from(self.cfg.eval_interval.as_millis()).unwrap_or(u64::MAX);
        let track = self.tracks.entry(subject.clone()).or_default();
        if !force && track.last_eval_ms != 0 && end_ms < track.last_eval_ms.saturating_add(every) {
            return;
        }
        track.last_eval_ms = end_ms;
        let allowed = Self::allowlisted(&self.cfg, subject, st);
        let rollup = rollup_of(&self.p48, st, subject).unwrap_or_default();
        let cfg = &self.cfg;
        let peers = &mut self.peers[kind_index(subject.kind())];
        // Hourly totals held (the last 25 hours).
        let mut hours: Vec<(u64, Totals)> = rollup.hourly().collect();
        hours.sort_unstable_by_key(|h| h.0);
        fold(cfg, track, peers, &hours, end_ms / HOUR_MS);

        // Prefix members: active count, the largest, allowlisted bytes, synchrony.
        let group = match subject.kind() {
            Kind::Prefix => Some(member_stats(cfg, st, self.members.get(subject), end_ms)),
            _ => None,
        };
        let j = Judged::new(cfg, st, subject, &rollup, end_ms, group);
        let mut push = |d: DetectorKind, f: Option<Finding>| {
            out.push(Verdict {
                subject: subject.clone(),
                detector: d,
                finding: if allowed { None } else { f },
            });
        };
        if cfg.volume.enabled {
            push(DetectorKind::Volume, j.volume());
        }
        if cfg.coordinated.enabled && j.group.is_some() {
            push(DetectorKind::Coordinated, j.coordinated());
        }
        if cfg.deviation.enabled {
            push(DetectorKind::Deviation, j.deviation(track));
        }
        if cfg.sustained.enabled {
            push(DetectorKind::Sustained, j.sustained(track, peers, &hours));
        }
    }
}

/// One subject at one batch time: what every detector reads.
struct Judged<'a> {
    cfg: &'a DetectConfig,
    st: &'a State,
    subject: &'a Subject,
    rollup: &'a Rollup,
    end_ms: u64,
    h1: WindowStats,
    d1: WindowStats,
    /// Response bytes in the 1 h and 24 h windows (a prefix's without allowlisted members).
    h1_resp: u64,
    d1_resp: u64,
    /// For a prefix, its members.
    group: Option<GroupStats>,
}

impl<'a> Judged<'a> {
    fn new(
        cfg: &'a DetectConfig,
        st: &'a State,
        subject: &'a Subject,
        rollup: &'a Rollup,
        end_ms: u64,
        group: Option<GroupStats>,
    ) -> Self {
        let h1 = rollup.window(Window::H1, end_ms);
        let d1 = rollup.window(Window::H24, end_ms);
        let (h1_resp, d1_resp) = match &group {
            Some(g) => (
                h1.totals.response_bytes.saturating_sub(g.allowed_h1),
                d1.totals.response_bytes.saturating_sub(g.allowed_d1),
            ),
            None => (h1.totals.response_bytes, d1.totals.response_bytes),
        };
        Judged {
            cfg,
            st,
            subject,
            rollup,
            end_ms,
            h1,
            d1,
            h1_resp,
            d1_resp,
            group,
        }
    }

    fn hosts(&self, w: Window) -> Vec<HostId> {
        self.rollup.hosts_since(w.start_ms(self.end_ms)).collect()
    }

    fn via(&self, w: Window) -> Via {
        Via::of(self.rollup, w.start_ms(self.end_ms))
    }

    /// How summaries name the subject: `203.0.113.7`, `h:... (from 3 addresses: ...)`.
    fn title(&self, via: &Via) -> String {
        format!("{}{via}", Named(self.subject, self.st))
    }

    /// Distinct active member addresses of a prefix (0 for other subjects).
    fn members(&self) -> u64 {
        self.group.as_ref().map_or(0, |g| g.active)
    }

    /// Whether one member makes the prefix's bytes in `w`: its own alert covers the prefix.
    fn dominated(&self, w: Window) -> bool {
        let share = self.cfg.dominant_member_share;
        self.group.as_ref().is_some_and(|g| {
            let (max, total) = match w {
                Window::H24 => (g.max_member_d1, self.d1_resp),
                _ => (g.max_member, self.h1_resp),
            };
            total > 0 && max as f64 >= share * total as f64
        })
    }

    /// The per-hour and per-day volume limits of the subject's kind.
    fn volume_limits(&self) -> (u64, u64) {
        let v = &self.cfg.volume;
        match self.subject.kind() {
            Kind::Client | Kind::ClientId => (v.client_per_hour, v.client_per_day),
            Kind::Prefix if self.subject.is_ipv6_subnet() => {
                (v.ipv6_subnet_per_hour, v.ipv6_subnet_per_day)
            }
            Kind::Prefix => (v.prefix_per_hour, v.prefix_per_day),
            Kind::Workload => (v.workload_per_hour, v.workload_per_day),
        }
    }

    fn volume(&self) -> Option<Finding> {
        let (ph, pd) = self.volume_limits();
        let (w, obs, thr, req, per) = if ph > 0 && self.h1_resp >= ph && !self.dominated(Window::H1)
        {
            (
                Window::H1,
                self.h1_resp,
                ph,
                self.h1.totals.request_bytes,
                "hour",
            )
        } else if pd > 0 && self.d1_resp >= pd && !self.dominated(Window::H24) {
            (
                Window::H24,
                self.d1_resp,
                pd,
                self.d1.totals.request_bytes,
                "day",
            )
        } else {
            return None;
        };
        let (hosts, via) = (self.hosts(w), self.via(w));
        Some(Finding {
            severity: Severity::by_ratio(obs, thr),
            window_seconds: w.length_ms() / 1000,
            observed_bytes: obs,
            baseline_bytes: 0,
            threshold_bytes: thr,
            request_bytes: req,
            summary: format!(
                "{}: pulled {} of responses in the last {per} from {} host(s), over the {} per-{per} limit for {} ({} of requests) — check who owns it and rate-limit or block it unless it is a known bulk client.",
                self.title(&via),
                human(obs),
                hosts.len(),
                human(thr),
                self.subject.what(),
                human(req),
            ),
            hosts,
            members: self.members(),
            via,
        })
    }

    fn coordinated(&self) -> Option<Finding> {
        let g = self.group.as_ref()?;
        let c = &self.cfg.coordinated;
        let per_client = self.cfg.volume.client_per_hour;
        let thr = (c.factor * per_client as f64) as u64;
        let holds = per_client > 0
            && self.h1_resp >= thr
            && g.max_member < per_client
            && g.active >= c.min_members
            && g.synchrony >= c.min_synchrony;
        if !holds {
            return None;
        }
        let via = self.via(Window::H1);
        Some(Finding {
            severity: if self.h1_resp >= thr.saturating_mul(4) {
                Severity::Critical
            } else {
                Severity::High
            },
            window_seconds: 3600,
            observed_bytes: self.h1_resp,
            baseline_bytes: g.max_member,
            threshold_bytes: thr,
            request_bytes: self.h1.totals.request_bytes,
            hosts: self.hosts(Window::H1),
            members: g.active,
            summary: format!(
                "{}: {} addresses pulled {} of responses in the last hour, none over the {} per-address limit (largest {}), active in the same hours — likely one client spread over many addresses; consider rate-limiting the prefix.",
                self.title(&via),
                g.active,
                human(self.h1_resp),
                human(per_client),
                human(g.max_member),
            ),
            via,
        })
    }

    fn deviation(&self, track: &Track) -> Option<Finding> {
        let dv = &self.cfg.deviation;
        let sigma = track.var.sqrt().max(dv.min_sigma);
        let limit = track.mean + dv.sigmas * sigma;
        let thr = (limit.exp2() as u64).max(dv.floor_bytes_per_hour);
        let h1_resp = self.h1_resp;
        let holds = track.points >= dv.min_history_hours
            && !self.dominated(Window::H1)
            && h1_resp >= dv.floor_bytes_per_hour
            && (h1_resp as f64).log2() > limit;
        if !holds {
            return None;
        }
        let baseline = track.mean.exp2() as u64;
        let via = self.via(Window::H1);
        Some(Finding {
            severity: Severity::by_ratio(h1_resp, thr).min(Severity::High),
            window_seconds: 3600,
            observed_bytes: h1_resp,
            baseline_bytes: baseline,
            threshold_bytes: thr,
            request_bytes: self.h1.totals.request_bytes,
            hosts: self.hosts(Window::H1),
            members: self.members(),
            summary: format!(
                "{}: pulled {} of responses in the last hour, {:.0}× its usual {} per active hour (alert above {}) — check whether it started bulk extraction and rate-limit it if so.",
                self.title(&via),
                human(h1_resp),
                h1_resp as f64 / baseline.max(1) as f64,
                human(baseline),
                human(thr),
            ),
            via,
        })
    }

    fn sustained(&self, track: &Track, peers: &Peers, hours: &[(u64, Totals)]) -> Option<Finding> {
        let s = &self.cfg.sustained;
        let cur_hour = self.end_ms / HOUR_MS;
        let active = hours
            .iter()
            .filter(|(h, t)| {
                *h + 24 > cur_hour
                    && *h <= cur_hour
                    && t.response_bytes >= self.cfg.active_hour_bytes
            })
            .count() as u32;
        let d1_resp = self.d1_resp;
        let req = self.d1.totals.request_bytes;
        let ratio = d1_resp as f64 / req.max(1) as f64;
        let peer_ratio = peers.mean.exp2();
        let ratio_holds = peers.n >= s.min_peer_samples
            && active >= s.min_active_hours
            && ratio >= s.ratio_factor * peer_ratio;
        let cusum_holds = track.cusum >= s.cusum_threshold;
        let holds = d1_resp >= s.min_bytes_per_day
            && !self.dominated(Window::H24)
            && (ratio_holds || cusum_holds);
        if !holds {
            return None;
        }
        let baseline = track.mean.exp2() as u64;
        let via = self.via(Window::H24);
        let name = self.title(&via);
        Some(Finding {
            severity: Severity::Medium,
            window_seconds: 86_400,
            observed_bytes: d1_resp,
            baseline_bytes: baseline,
            threshold_bytes: s.min_bytes_per_day,
            request_bytes: req,
            hosts: self.hosts(Window::H24),
            members: self.members(),
            summary: if ratio_holds {
                format!(
                    "{name}: streamed {} of responses in {active} of the last 24 hours with a response/request ratio of {ratio:.0}:1, {:.0}× its peers' — looks like automated extraction; review the account and consider a daily quota.",
                    human(d1_resp),
                    ratio / peer_ratio.max(f64::MIN_POSITIVE),
                )
            } else {
                format!(
                    "{name}: response volume has risen steadily hour over hour ({} in the last 24 hours, from a baseline of {} per active hour) — a low-and-slow pull; review the account and consider a daily quota.",
                    human(d1_resp),
                    human(baseline),
                )
            },
            via,
        })
    }
}

/// The rollup `subject` is judged on: a client's two keys together, a /48 of `p48`.
fn rollup_of<'a>(
    p48: &'a Map<Ipv6Addr, Rollup>,
    st: &'a State,
    subject: &Subject,
) -> Option<Cow<'a, Rollup>> {
    match subject {
        Subject::Client(a) => st.client(*a).merged(),
        Subject::Prefix(p) => st.get(&Key::Prefix(*p)).map(Cow::Borrowed),
        Subject::Workload(w) => st.get(&Key::Workload(w.clone())).map(Cow::Borrowed),
        Subject::ClientId(id) => st.client_id(id).map(Cow::Borrowed),
        Subject::Prefix48(p) => p48.get(p).map(Cow::Borrowed),
    }
}

/// Folds the completed hours before `cur_hour` not yet folded into the baseline, the CUSUM
/// and the peers' ratio.
fn fold(
    cfg: &DetectConfig,
    t: &mut Track,
    peers: &mut Peers,
    hours: &[(u64, Totals)],
    cur_hour: u64,
) {
    let alpha = 2.0 / (cfg.deviation.baseline_hours + 1.0);
    for (h, tot) in hours {
        if *h < t.next_hour || *h >= cur_hour || tot.response_bytes < cfg.active_hour_bytes {
            continue;
        }
        let x = (tot.response_bytes as f64).log2();
        // The baseline is frozen while the CUSUM accumulates (so a slow rise is not learnt as
        // normal), until it has run to twice its threshold: then the new level is learnt.
        let mut learn = true;
        if t.points >= cfg.deviation.min_history_hours {
            let sigma = t.var.sqrt().max(cfg.deviation.min_sigma);
            t.cusum = (t.cusum + (x - t.mean) / sigma - cfg.sustained.cusum_slack).max(0.0);
            learn = t.cusum == 0.0 || t.cusum > 2.0 * cfg.sustained.cusum_threshold;
        }
        if !learn {
            t.points = t.points.saturating_add(1);
            continue;
        }
        if t.points == 0 {
            t.mean = x;
            t.var = 0.0;
        } else {
            let d = x - t.mean;
            t.mean += alpha * d;
            t.var = (1.0 - alpha) * (t.var + alpha * d * d);
        }
        t.points = t.points.saturating_add(1);
        if tot.request_bytes > 0 {
            let r = (tot.response_bytes as f64 / tot.request_bytes as f64).log2();
            if peers.n == 0 {
                peers.mean = r;
            } else {
                peers.mean += PEER_ALPHA * (r - peers.mean);
            }
            peers.n = peers.n.saturating_add(1);
        }
    }
    t.next_hour = t.next_hour.max(cur_hour);
}

struct GroupStats {
    active: u64,
    max_member: u64,
    max_member_d1: u64,
    allowed_h1: u64,
    allowed_d1: u64,
    synchrony: f64,
}

fn member_stats(
    cfg: &DetectConfig,
    st: &State,
    members: Option<&Members>,
    end_ms: u64,
) -> GroupStats {
    let mut g = GroupStats {
        active: 0,
        max_member: 0,
        max_member_d1: 0,
        allowed_h1: 0,
        allowed_d1: 0,
        synchrony: 0.0,
    };
    let Some(members) = members else { return g };
    let h1_start = Window::H1.start_ms(end_ms);
    let cur_hour = end_ms / HOUR_MS;
    let mut masks: Vec<u32> = Vec::new();
    for (addr, last) in members {
        let Some(r) = st.client(*addr).merged() else {
            continue;
        };
        if cfg.allowlist.cidrs.iter().any(|n| n.contains(addr)) {
            g.allowed_h1 += r.window(Window::H1, end_ms).totals.response_bytes;
            g.allowed_d1 += r.window(Window::H24, end_ms).totals.response_bytes;
            continue;
        }
        let d1 = r.window(Window::H24, end_ms).totals.response_bytes;
        g.max_member_d1 = g.max_member_d1.max(d1);
        if *last < h1_start {
            continue;
        }
        let resp = r.window(Window::H1, end_ms).totals.response_bytes;
        if resp == 0 {
            continue;
        }
        g.active += 1;
        g.max_member = g.max_member.max(resp);
        let mut mask = 0u32;
        for (h, t) in r.hourly() {
            if h <= cur_hour && h + 24 > cur_hour && t.response_bytes > 0 {
                mask |= 1 << (cur_hour - h);
            }
        }
        masks.push(mask);
    }
    if !masks.is_empty() {
        let mut group = 0u32;
        for bit in 0..24 {
            let n = masks.iter().filter(|m| *m & (1 << bit) != 0).count();
            if n * 2 >= masks.len() {
                group |= 1 << bit;
            }
        }
        let sum: f64 = masks
            .iter()
            .map(|m| {
                let union = (m | group).count_ones();
                if union == 0 {
                    0.0
                } else {
                    f64::from((m & group).count_ones()) / f64::from(union)
                }
            })
            .sum();
        g.synchrony = sum / masks.len() as f64;
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_750_000_000_000 / HOUR_MS * HOUR_MS;

    fn tot(resp: u64, req: u64) -> Totals {
        Totals {
            response_bytes: resp,
            request_bytes: req,
            connections_closed: 0,
        }
    }

    fn fired(v: &[Verdict], d: DetectorKind) -> Option<&Finding> {
        v.iter()
            .find(|x| x.detector == d)
            .and_then(|x| x.finding.as_ref())
    }

    #[test]
    fn cusum_flags_a_slow_rise_that_never_jumps() {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let a: IpAddr = "203.0.113.9".parse().unwrap();
        let mut det = Detector::new(DetectConfig::default(), &st);
        let mut rollup = Rollup::default();
        let mut first = None;
        let mut first_deviation = None;
        for h in 0..90u64 {
            // 60 MB/h, ±5 %, for 40 hours; then +6 % an hour: never 3 sigma in one hour.
            let base = 60e6
                * if h < 40 {
                    1.0
                } else {
                    1.06f64.powi((h - 40) as i32)
                };
            let wobble = if h % 2 == 0 { 1.05 } else { 0.95 };
            let at = T0 + h * HOUR_MS + 10 * 60_000;
            rollup.add(at, 0, &tot((base * wobble) as u64, (base / 2.0) as u64));
            st.put(Key::Direct(a), rollup.clone());
            // Judged 30 min later: the 1 h window holds this hour's bytes only.
            let t = at + 30 * 60_000;
            st.set_end_ms(t);
            let mut v = Vec::new();
            det.evaluate(&st, &Subject::Client(a), t, true, &mut v);
            if fired(&v, DetectorKind::Deviation).is_some() {
                first_deviation.get_or_insert(h);
            }
            if let Some(f) = fired(&v, DetectorKind::Sustained) {
                assert!(f.summary.contains("risen steadily"), "{}", f.summary);
                first.get_or_insert(h);
            }
        }
        let h = first.expect("CUSUM never fired");
        // Before the hourly bytes reached the deviation floor (256 MiB, hour 65).
        assert!((45..65).contains(&h), "fired at hour {h}");
        assert!(first_deviation.is_none_or(|d| d > h), "{first_deviation:?}");
    }

    #[test]
    fn ipv6_group_spread_over_a_48_is_coordinated() {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let mut det = Detector::new(DetectConfig::default(), &st);
        let t = T0 + 10 * HOUR_MS;
        let mut obs = Vec::new();
        // 20 addresses, each in its own /64 of 2001:db8:7::/48, 300 MB each in the hour.
        for i in 0..20u16 {
            let addr: IpAddr = format!("2001:db8:7:{i:x}::1").parse().unwrap();
            for k in 0..12u64 {
                let time_ms = t - k * 5 * 60_000;
                let o = ClientObs {
                    addr,
                    time_ms,
                    host: 0,
                    totals: tot(25_000_000, 100_000),
                };
                let mut r = st.get(&Key::Direct(addr)).cloned().unwrap_or_default();
                r.add(time_ms, 0, &o.totals);
                st.put(Key::Direct(addr), r);
                obs.push(o);
            }
        }
        st.set_end_ms(t);
        let clients: Vec<Subject> = (0..20u16)
            .map(|i| Subject::Client(format!("2001:db8:7:{i:x}::1").parse().unwrap()))
            .collect();
        let touched = det.observe(&clients, &obs, t);
        assert_eq!(
            touched,
            vec![Subject::Prefix48("2001:db8:7::".parse().unwrap())]
        );
        let mut v = Vec::new();
        det.evaluate(&st, &touched[0], t, true, &mut v);
        let f = fired(&v, DetectorKind::Coordinated).expect("coordinated");
        assert_eq!(f.members, 20);
        assert!(
            f.summary.starts_with("2001:db8:7::/48: 20 addresses"),
            "{}",
            f.summary
        );
        // With the /48 allowlisted: nothing.
        let mut cfg = DetectConfig::default();
        cfg.allowlist.cidrs = vec!["2001:db8:7::/48".parse().unwrap()];
        let mut det = Detector::new(cfg, &st);
        det.observe(&clients, &obs, t);
        let mut v = Vec::new();
        det.evaluate(&st, &touched[0], t, true, &mut v);
        assert!(v.iter().all(|x| x.finding.is_none()), "{v:?}");
    }

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

    #[test]
    fn subjects_parse_back() {
        let st = State::default();
        for s in [
            "203.0.113.7",
            "203.0.113.0/24",
            "2001:db8::/64",
            "2001:db8::/48",
        ] {
            let sub = Subject::parse(s, &st).unwrap();
            assert_eq!(sub.display(&st), s);
        }
        assert_eq!(
            Subject::Prefix48(prefix48("2001:db8:1:2::5".parse().unwrap())).display(&st),
            "2001:db8:1::/48"
        );
    }

    #[test]
    fn defaults_validate_and_bad_fields_are_named() {
        DetectConfig::default().validate().unwrap();
        let mut c = DetectConfig::default();
        c.coordinated.min_synchrony = 2.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("detect.coordinated.min_synchrony"), "{e}");
    }
}
