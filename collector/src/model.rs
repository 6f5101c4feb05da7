//! Domain types of what agents send, and their conversion from the wire types at the edge.
//!
//! Everything an agent sends passes through a `TryFrom` here before the collector uses it; the
//! error names the offending field the way the protocol spells it, e.g.
//! `deltas[3].remote_addr: 5 bytes, want 4 or 16`.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use outflow_proto::{
    limits::{MAX_CLIENT_ID_LEN, MAX_CLIENT_SOURCE_LEN, MAX_DELTAS_PER_BATCH},
    v1,
};

/// At most this many labels in a Hello (`ingest.proto`).
pub const MAX_LABELS: usize = 32;
/// Label keys and values: at most this many characters (`ingest.proto`).
pub const MAX_LABEL_CHARS: usize = 128;
/// `agent_id`: 1 to this many characters (`ingest.proto`).
pub const MAX_AGENT_ID_CHARS: usize = 128;
/// Host names: at most this many characters.
pub const MAX_HOSTNAME_CHARS: usize = 255;
/// `boot_id`, `version`: at most this many characters.
pub const MAX_SHORT_TEXT_CHARS: usize = 128;
/// `cgroup`: at most this many bytes (PATH_MAX).
pub const MAX_CGROUP_BYTES: usize = 4096;
/// `comm`: at most this many bytes (the kernel's is 15).
pub const MAX_COMM_BYTES: usize = 64;
/// Batch times after this (the year 3000, Unix ms) are refused.
pub const MAX_TIME_MS: u64 = 32_503_680_000_000;

/// A field of an agent's message that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field's path as the protocol names it, e.g. `deltas[3].remote_addr`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ValidationError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Identity of a sequence of batches: sequence numbers are per (agent_id, epoch).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey {
    pub agent_id: Arc<str>,
    pub epoch: u64,
}

impl std::fmt::Display for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{:016x}", self.agent_id, self.epoch)
    }
}

/// A validated Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub agent: AgentKey,
    /// The host name; `agent:<agent_id>` if the agent sent none.
    pub hostname: String,
    pub boot_id: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
}

/// The side of a connection the agent's socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepted: the remote side is a client of the host. Only these are aggregated.
    Server,
    /// Connected: the host is the client.
    Client,
    /// Unknown (open before the agent started, or a role this collector does not know).
    Unknown,
}

/// Byte and segment counts of an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub wire_bytes_out: u64,
    pub wire_bytes_in: u64,
    pub segments_out: u64,
    pub segments_in: u64,
}

impl From<v1::Counters> for Counters {
    fn from(c: v1::Counters) -> Self {
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

/// Where an agent learnt the client of a delta (`client_source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSource {
    /// The TCP peer is the client (or nothing better was attributed).
    Peer,
    /// A PROXY protocol v1 header of a trusted balancer.
    ProxyV1,
    /// A PROXY protocol v2 header of a trusted balancer.
    ProxyV2,
    /// A request header of a trusted gateway: its lower-case name.
    Header(Box<str>),
    /// The serving application tagged its socket.
    Annotation,
    /// A source a newer agent knows and this collector does not (`outflow.v1` grows
    /// compatibly): kept as sent.
    Other(Box<str>),
}

/// One connection's counts in a batch: all of them, or (when the agent split the interval at
/// request boundaries) those of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub conn_id: u64,
    pub local: IpAddr,
    pub local_port: u16,
    /// The TCP peer: for a connection through a gateway, the gateway.
    pub remote: IpAddr,
    pub remote_port: u16,
    /// The client the bytes belong to: `client_addr`, or `remote` if the agent sent none.
    pub client: IpAddr,
    /// The client's id as sent (normally a keyed hash, `h:` and 24 hex digits), if any.
    pub client_id: Option<String>,
    pub client_source: ClientSource,
    pub role: Role,
    pub counters: Counters,
    pub closed: bool,
    pub cgroup: String,
    pub pid: u32,
    pub comm: String,
    pub first_seen_ms: u64,
    /// What it counts for: every key, except in a cluster's parts (see [`Share`]).
    pub share: Share,
}

/// What a delta counts for. A cluster's ingest node sends a delta whose client id and client
/// address belong to different partitions to both, so that each partition holds all of its
/// clients' bytes: each copy counts for its own keys, and every key counts it once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Share {
    /// Every key.
    #[default]
    All,
    /// Its client address's keys only: the address (direct or proxied), its prefix, the link
    /// to the gateway it came through.
    ClientAddress,
    /// Every key but those: its client id (and its links), the gateway's relayed bytes, the
    /// workload, the host.
    Rest,
}

impl Share {
    /// Whether it counts for the client address's keys.
    pub fn address(self) -> bool {
        self != Share::Rest
    }

    /// Whether it counts for the other keys (and as a delta applied: the other copy does not).
    pub fn rest(self) -> bool {
        self != Share::ClientAddress
    }
}

impl From<Share> for v1::DeltaShare {
    fn from(s: Share) -> Self {
        match s {
            Share::All => v1::DeltaShare::All,
            Share::ClientAddress => v1::DeltaShare::ClientAddress,
            Share::Rest => v1::DeltaShare::Rest,
        }
    }
}

impl Delta {
    /// Whether the agent attributed these bytes to a client other than the bare TCP peer.
    pub fn attributed(&self) -> bool {
        self.client != self.remote
            || self.client_id.is_some()
            || self.client_source != ClientSource::Peer
    }
}

/// A validated Batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub seq: u64,
    pub start_ms: u64,
    pub end_ms: u64,
    /// How far back its times were moved: its `end_ms` was this far beyond the latest allowed
    /// ([`BatchLimits::latest_end_ms`]).
    pub shifted_ms: u64,
    pub deltas: Vec<Delta>,
    pub overflow: Counters,
    pub lost_batches: u64,
    pub lost: Counters,
}

/// Limits a batch is checked against besides the protocol's own rules.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most deltas per batch.
    pub max_deltas: usize,
    /// Latest accepted `end_ms` (the collector's clock plus the allowed skew), if checked.
    pub latest_end_ms: Option<u64>,
    /// A cluster's part (its deltas may have a [`Share`]), not an agent's batch.
    pub parts: bool,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_deltas: MAX_DELTAS_PER_BATCH,
            latest_end_ms: None,
            parts: false,
        }
    }
}

fn check_chars(field: &str, value: &str, min: usize, max: usize) -> Result<(), ValidationError> {
    // Count at most max+1 characters: the length of a hostile string is not worth walking.
    let n = value.chars().take(max.saturating_add(1)).count();
    if n < min {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if n > max {
        return Err(ValidationError::new(
            field,
            format!("more than {max} characters"),
        ));
    }
    Ok(())
}

impl TryFrom<v1::Hello> for Hello {
    type Error = ValidationError;

    fn try_from(h: v1::Hello) -> Result<Self, Self::Error> {
        check_chars("agent_id", &h.agent_id, 1, MAX_AGENT_ID_CHARS)?;
        if h.epoch == 0 {
            return Err(ValidationError::new("epoch", "must not be 0"));
        }
        check_chars("hostname", &h.hostname, 0, MAX_HOSTNAME_CHARS)?;
        check_chars("boot_id", &h.boot_id, 0, MAX_SHORT_TEXT_CHARS)?;
        check_chars("version", &h.version, 0, MAX_SHORT_TEXT_CHARS)?;
        if h.labels.len() > MAX_LABELS {
            return Err(ValidationError::new(
                "labels",
                format!("{} labels, at most {MAX_LABELS}", h.labels.len()),
            ));
        }
        for (k, v) in &h.labels {
            check_chars("labels (key)", k, 0, MAX_LABEL_CHARS)?;
            check_chars(&format!("labels[{k:?}]"), v, 0, MAX_LABEL_CHARS)?;
        }
        Ok(Self {
            agent: AgentKey {
                agent_id: Arc::from(h.agent_id.as_str()),
                epoch: h.epoch,
            },
            // An agent that cannot read its host name sends "": it is then known by its id.
            hostname: if h.hostname.is_empty() {
                format!("agent:{}", h.agent_id)
            } else {
                h.hostname
            },
            boot_id: h.boot_id,
            version: h.version,
            labels: h.labels.into_iter().collect(),
        })
    }
}

/// An address of 4 or 16 bytes; an IPv4-mapped IPv6 address becomes IPv4.
fn ip(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(b) = <[u8; 4]>::try_from(bytes) {
        Some(IpAddr::V4(Ipv4Addr::from(b)))
    } else {
        <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| IpAddr::V6(Ipv6Addr::from(b)).to_canonical())
    }
}

fn addr(field: impl FnOnce() -> String, bytes: &[u8]) -> Result<IpAddr, ValidationError> {
    ip(bytes).ok_or_else(|| {
        ValidationError::new(field(), format!("{} bytes, want 4 or 16", bytes.len()))
    })
}

/// `client_addr`: empty means the TCP peer (`remote`) is the client.
fn client_addr(
    field: impl FnOnce() -> String,
    bytes: &[u8],
    remote: IpAddr,
) -> Result<IpAddr, ValidationError> {
    if bytes.is_empty() {
        return Ok(remote);
    }
    ip(bytes).ok_or_else(|| {
        ValidationError::new(field(), format!("{} bytes, want 0, 4 or 16", bytes.len()))
    })
}

/// `client_id`: at most [`MAX_CLIENT_ID_LEN`] characters (protobuf strings are UTF-8 already);
/// empty means none.
fn client_id(
    field: impl FnOnce() -> String,
    id: String,
) -> Result<Option<String>, ValidationError> {
    if id.chars().nth(MAX_CLIENT_ID_LEN).is_some() {
        return Err(ValidationError::new(
            field(),
            format!("more than {MAX_CLIENT_ID_LEN} characters"),
        ));
    }
    Ok((!id.is_empty()).then_some(id))
}

/// An HTTP header name (RFC 9110 `token`).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `client_source`: `peer` (or empty), `proxy-v1`, `proxy-v2`, `annotation` or `header:<name>`.
fn client_source(field: impl FnOnce() -> String, s: &str) -> Result<ClientSource, ValidationError> {
    // Most deltas leave it empty: answered before the match, which compares with `bcmp`.
    if s.is_empty() {
        return Ok(ClientSource::Peer);
    }
    if s.chars().nth(MAX_CLIENT_SOURCE_LEN).is_some() {
        return Err(ValidationError::new(
            field(),
            format!("more than {MAX_CLIENT_SOURCE_LEN} characters"),
        ));
    }
    match s {
        "" | "peer" => Ok(ClientSource::Peer),
        "proxy-v1" => Ok(ClientSource::ProxyV1),
        "proxy-v2" => Ok(ClientSource::ProxyV2),
        "annotation" => Ok(ClientSource::Annotation),
        _ => match s.strip_prefix("header:") {
            Some(name) if is_token(name) => Ok(ClientSource::Header(
                name.to_ascii_lowercase().into_boxed_str(),
            )),
            None if is_token(s) => Ok(ClientSource::Other(s.into())),
            _ => Err(ValidationError::new(
                field(),
                format!(
                    "{s:?}: want peer, proxy-v1, proxy-v2, annotation, header:<header name> or another source name (a token)"
                ),
            )),
        },
    }
}

fn port(field: impl FnOnce() -> String, p: u32) -> Result<u16, ValidationError> {
    u16::try_from(p)
        .map_err(|_| ValidationError::new(field(), format!("{p} is not a port (> 65535)")))
}

fn delta(i: usize, d: v1::ConnDelta, parts: bool) -> Result<Delta, ValidationError> {
    let f = |name: &str| format!("deltas[{i}].{name}");
    let local = addr(|| f("local_addr"), &d.local_addr)?;
    let remote = addr(|| f("remote_addr"), &d.remote_addr)?;
    if local.is_ipv4() != remote.is_ipv4() {
        return Err(ValidationError::new(
            f("remote_addr"),
            format!("{remote} and local_addr {local} are of different families"),
        ));
    }
    let local_port = port(|| f("local_port"), d.local_port)?;
    let remote_port = port(|| f("remote_port"), d.remote_port)?;
    let client = client_addr(|| f("client_addr"), &d.client_addr, remote)?;
    let client_id = client_id(|| f("client_id"), d.client_id)?;
    let client_source = client_source(|| f("client_source"), &d.client_source)?;
    let role = match v1::Role::try_from(d.role) {
        Ok(v1::Role::Server) => Role::Server,
        Ok(v1::Role::Client) => Role::Client,
        // New roles of a later agent are treated as unknown, as the protocol asks.
        Ok(v1::Role::Unspecified) | Err(_) => Role::Unknown,
    };
    if d.cgroup.len() > MAX_CGROUP_BYTES {
        return Err(ValidationError::new(
            f("cgroup"),
            format!("{} bytes, at most {MAX_CGROUP_BYTES}", d.cgroup.len()),
        ));
    }
    if d.comm.len() > MAX_COMM_BYTES {
        return Err(ValidationError::new(
            f("comm"),
            format!("{} bytes, at most {MAX_COMM_BYTES}", d.comm.len()),
        ));
    }
    Ok(Delta {
        conn_id: d.conn_id,
        local,
        local_port,
        remote,
        remote_port,
        client,
        client_id,
        client_source,
        role,
        counters: d.counters.map(Counters::from).unwrap_or_default(),
        closed: d.closed,
        cgroup: d.cgroup,
        pid: d.pid,
        comm: d.comm,
        first_seen_ms: d.first_seen_ms,
        share: share(|| f("share"), d.share, parts)?,
    })
}

/// A delta's share: set only in a cluster's parts (`parts`).
fn share(field: impl Fn() -> String, raw: i32, parts: bool) -> Result<Share, ValidationError> {
    let share = match v1::DeltaShare::try_from(raw) {
        Ok(v1::DeltaShare::All) => return Ok(Share::All),
        Ok(v1::DeltaShare::ClientAddress) => Share::ClientAddress,
        Ok(v1::DeltaShare::Rest) => Share::Rest,
        Err(_) => {
            return Err(ValidationError::new(
                field(),
                format!("{raw} is not an outflow.v1.DeltaShare"),
            ));
        }
    };
    if !parts {
        return Err(ValidationError::new(
            field(),
            "set only by a cluster's ingest nodes in their parts; an agent leaves it unset",
        ));
    }
    Ok(share)
}

/// Keeps `closed` on the last delta of each connection only. The agent may split one
/// connection's interval into several deltas (one per client); only the last of them may close
/// it, so that the connection is counted closed once. (Only batches with attributed deltas can
/// hold a split connection: the clients of its parts differ.)
fn keep_last_close(deltas: &mut [Delta]) {
    // Connection → the index of its last delta, for the connections that close.
    let mut last: HashMap<u64, usize, foldhash::fast::RandomState> = deltas
        .iter()
        .enumerate()
        .filter(|(_, d)| d.closed)
        .map(|(i, d)| (d.conn_id, i))
        .collect();
    if last.is_empty() {
        return;
    }
    for (i, d) in deltas.iter().enumerate() {
        if let Some(l) = last.get_mut(&d.conn_id) {
            *l = i;
        }
    }
    for (i, d) in deltas.iter_mut().enumerate() {
        if d.closed && last.get(&d.conn_id) != Some(&i) {
            d.closed = false;
        }
    }
}

impl Batch {
    /// Validates a wire batch against the protocol and `limits`.
    pub fn from_wire(b: v1::Batch, limits: &BatchLimits) -> Result<Self, ValidationError> {
        if b.seq == 0 {
            return Err(ValidationError::new("seq", "must be at least 1 (got 0)"));
        }
        if b.end_ms < b.start_ms {
            return Err(ValidationError::new(
                "end_ms",
                format!("{} is before start_ms {}", b.end_ms, b.start_ms),
            ));
        }
        if b.end_ms > MAX_TIME_MS {
            return Err(ValidationError::new(
                "end_ms",
                format!("{} is after the year 3000", b.end_ms),
            ));
        }
        // A batch from a clock ahead of ours by more than the allowed skew is applied at the
        // latest time allowed, not refused: refusing it would stop its agent for good (every
        // later batch waits behind it), and its bytes are real. A hostile agent gains nothing:
        // its times can still not run ahead.
        let shifted_ms = limits
            .latest_end_ms
            .map_or(0, |latest| b.end_ms.saturating_sub(latest));
        let (start_ms, end_ms) = (b.start_ms.saturating_sub(shifted_ms), b.end_ms - shifted_ms);
        if b.deltas.len() > limits.max_deltas {
            return Err(ValidationError::new(
                "deltas",
                format!("{} deltas, at most {}", b.deltas.len(), limits.max_deltas),
            ));
        }
        let mut deltas = b
            .deltas
            .into_iter()
            .enumerate()
            .map(|(i, d)| delta(i, d, limits.parts))
            .collect::<Result<Vec<_>, _>>()?;
        if deltas.iter().any(Delta::attributed) {
            keep_last_close(&mut deltas);
        }
        Ok(Self {
            seq: b.seq,
            start_ms,
            end_ms,
            shifted_ms,
            deltas,
            overflow: b.overflow.map(Counters::from).unwrap_or_default(),
            lost_batches: b.lost_batches,
            lost: b.lost.map(Counters::from).unwrap_or_default(),
        })
    }
}

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl From<Counters> for v1::Counters {
    fn from(c: Counters) -> Self {
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

impl ClientSource {
    /// Its `client_source` on the wire.
    pub fn wire(&self) -> String {
        match self {
            ClientSource::Peer => "peer".into(),
            ClientSource::ProxyV1 => "proxy-v1".into(),
            ClientSource::ProxyV2 => "proxy-v2".into(),
            ClientSource::Header(h) => format!("header:{h}"),
            ClientSource::Annotation => "annotation".into(),
            ClientSource::Other(s) => s.to_string(),
        }
    }
}

/// A validated delta back on the wire (for passing it on): validating it again gives it back.
impl From<&Delta> for v1::ConnDelta {
    fn from(d: &Delta) -> Self {
        Self {
            conn_id: d.conn_id,
            local_addr: ip_bytes(d.local),
            local_port: d.local_port.into(),
            remote_addr: ip_bytes(d.remote),
            remote_port: d.remote_port.into(),
            role: match d.role {
                Role::Server => v1::Role::Server,
                Role::Client => v1::Role::Client,
                Role::Unknown => v1::Role::Unspecified,
            } as i32,
            counters: Some(d.counters.into()),
            closed: d.closed,
            cgroup: d.cgroup.clone(),
            pid: d.pid,
            comm: d.comm.clone(),
            first_seen_ms: d.first_seen_ms,
            client_addr: if d.client == d.remote {
                Vec::new()
            } else {
                ip_bytes(d.client)
            },
            client_id: d.client_id.clone().unwrap_or_default(),
            client_source: d.client_source.wire(),
            share: v1::DeltaShare::from(d.share).into(),
        }
    }
}

impl Batch {
    /// The batch on the wire with `deltas` (some of its own) in place of its deltas, at its
    /// (possibly shifted) times: validating it again gives those back.
    pub fn to_wire_with<'a>(&self, deltas: impl IntoIterator<Item = &'a Delta>) -> v1::Batch {
        v1::Batch {
            seq: self.seq,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            deltas: deltas.into_iter().map(v1::ConnDelta::from).collect(),
            overflow: Some(self.overflow.into()),
            lost_batches: self.lost_batches,
            lost: Some(self.lost.into()),
        }
    }
}

impl TryFrom<v1::Batch> for Batch {
    type Error = ValidationError;

    /// Validates against the protocol's limits only (no clock check).
    fn try_from(b: v1::Batch) -> Result<Self, Self::Error> {
        Self::from_wire(b, &BatchLimits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> v1::Hello {
        v1::Hello {
            agent_id: "a".into(),
            epoch: 7,
            hostname: "h".into(),
            ..Default::default()
        }
    }

    fn good_delta() -> v1::ConnDelta {
        v1::ConnDelta {
            local_addr: vec![10, 0, 0, 1],
            local_port: 8000,
            remote_addr: vec![203, 0, 113, 7],
            remote_port: 40000,
            role: v1::Role::Server as i32,
            ..Default::default()
        }
    }

    fn batch(deltas: Vec<v1::ConnDelta>) -> v1::Batch {
        v1::Batch {
            seq: 1,
            start_ms: 1000,
            end_ms: 2000,
            deltas,
            ..Default::default()
        }
    }

    fn err(b: v1::Batch) -> String {
        Batch::try_from(b).unwrap_err().to_string()
    }

    #[test]
    fn hello_rules() {
        assert!(Hello::try_from(hello()).is_ok());
        let e = |f: fn(&mut v1::Hello)| {
            let mut h = hello();
            f(&mut h);
            Hello::try_from(h).unwrap_err().to_string()
        };
        assert_eq!(e(|h| h.agent_id.clear()), "agent_id: must not be empty");
        assert_eq!(
            e(|h| h.agent_id = "x".repeat(129)),
            "agent_id: more than 128 characters"
        );
        assert_eq!(e(|h| h.epoch = 0), "epoch: must not be 0");
        let mut h = hello();
        h.hostname.clear();
        assert_eq!(Hello::try_from(h).unwrap().hostname, "agent:a");
        let long = e(|h| {
            h.labels.insert("k".into(), "v".repeat(129));
        });
        assert_eq!(long, "labels[\"k\"]: more than 128 characters");
        let many = e(|h| {
            for i in 0..33 {
                h.labels.insert(i.to_string(), String::new());
            }
        });
        assert_eq!(many, "labels: 33 labels, at most 32");
        // 128 multi-byte characters are fine.
        let mut h = hello();
        h.agent_id = "é".repeat(128);
        assert!(Hello::try_from(h).is_ok());
    }

    #[test]
    fn batch_rules() {
        let mut d = good_delta();
        d.remote_addr = vec![1, 2, 3, 4, 5];
        assert_eq!(
            err(batch(vec![good_delta(), good_delta(), good_delta(), d])),
            "deltas[3].remote_addr: 5 bytes, want 4 or 16"
        );
        let mut d = good_delta();
        d.local_port = 65536;
        assert_eq!(
            err(batch(vec![d])),
            "deltas[0].local_port: 65536 is not a port (> 65535)"
        );
        let mut b = batch(vec![]);
        b.seq = 0;
        assert_eq!(err(b), "seq: must be at least 1 (got 0)");
        let mut b = batch(vec![]);
        b.end_ms = 999;
        assert_eq!(err(b), "end_ms: 999 is before start_ms 1000");
        let e = Batch::from_wire(
            batch(vec![good_delta(); 3]),
            &BatchLimits {
                max_deltas: 2,
                latest_end_ms: None,
                parts: false,
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "deltas: 3 deltas, at most 2");
        // Ahead of the collector's clock: moved back, not refused.
        let mut b = batch(vec![]);
        (b.start_ms, b.end_ms) = (1900, 2000);
        let b = Batch::from_wire(
            b,
            &BatchLimits {
                max_deltas: 2,
                latest_end_ms: Some(1500),
                parts: false,
            },
        )
        .unwrap();
        assert_eq!((b.start_ms, b.end_ms, b.shifted_ms), (1400, 1500, 500));
        let mut d = good_delta();
        d.remote_addr = vec![0; 16];
        assert!(err(batch(vec![d])).starts_with("deltas[0].remote_addr: :: and local_addr"));
        // A share is a cluster part's: refused from an agent, taken from a part.
        let mut d = good_delta();
        d.share = v1::DeltaShare::Rest.into();
        assert_eq!(
            err(batch(vec![d.clone()])),
            "deltas[0].share: set only by a cluster's ingest nodes in their parts; an agent leaves it unset"
        );
        let parts = BatchLimits {
            parts: true,
            ..BatchLimits::default()
        };
        let b = Batch::from_wire(batch(vec![d.clone()]), &parts).unwrap();
        assert_eq!(b.deltas[0].share, Share::Rest);
        d.share = 7;
        assert_eq!(
            Batch::from_wire(batch(vec![d]), &parts)
                .unwrap_err()
                .to_string(),
            "deltas[0].share: 7 is not an outflow.v1.DeltaShare"
        );
    }

    #[test]
    fn client_fields() {
        let b = Batch::try_from(batch(vec![good_delta()])).unwrap();
        let d = &b.deltas[0];
        assert_eq!(d.client, d.remote, "no client_addr: the peer is the client");
        assert_eq!(
            (&d.client_id, &d.client_source),
            (&None, &ClientSource::Peer)
        );

        let mut d = good_delta();
        d.client_addr = Ipv4Addr::new(198, 51, 100, 4)
            .to_ipv6_mapped()
            .octets()
            .to_vec();
        d.client_id = "h:0123456789abcdef01234567".into();
        d.client_source = "header:X-Client-Id".into();
        let b = Batch::try_from(batch(vec![d])).unwrap();
        let d = &b.deltas[0];
        assert_eq!(d.client, IpAddr::from([198, 51, 100, 4]));
        assert_eq!(d.remote, IpAddr::from([203, 0, 113, 7]));
        assert_eq!(d.client_id.as_deref(), Some("h:0123456789abcdef01234567"));
        assert_eq!(d.client_source, ClientSource::Header("x-client-id".into()));
        // An IPv6 client behind an IPv4 gateway is fine.
        let mut d = good_delta();
        d.client_addr = vec![0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        d.client_source = "proxy-v2".into();
        assert!(Batch::try_from(batch(vec![d])).is_ok());

        let e = |f: fn(&mut v1::ConnDelta)| {
            let mut d = good_delta();
            f(&mut d);
            err(batch(vec![good_delta(), good_delta(), good_delta(), d]))
        };
        assert_eq!(
            e(|d| d.client_addr = vec![1, 2, 3, 4, 5]),
            "deltas[3].client_addr: 5 bytes, want 0, 4 or 16"
        );
        assert_eq!(
            e(|d| d.client_id = "é".repeat(257)),
            "deltas[3].client_id: more than 256 characters"
        );
        assert_eq!(
            e(|d| d.client_source = "x".repeat(129)),
            "deltas[3].client_source: more than 128 characters"
        );
        assert_eq!(
            e(|d| d.client_source = "a b".into()),
            "deltas[3].client_source: \"a b\": want peer, proxy-v1, proxy-v2, annotation, header:<header name> or another source name (a token)"
        );
        for bad in ["header:", "header:x y", "header:a:b", "x\ny"] {
            let mut d = good_delta();
            d.client_source = bad.into();
            assert!(Batch::try_from(batch(vec![d])).is_err(), "{bad}");
        }
        for good in [
            "",
            "peer",
            "proxy-v1",
            "annotation",
            "header:x-api-key",
            "cookie",
        ] {
            let mut d = good_delta();
            d.client_source = good.into();
            d.client_id = "é".repeat(256);
            assert!(Batch::try_from(batch(vec![d])).is_ok(), "{good}");
        }
    }

    #[test]
    fn split_connections_close_once() {
        // One connection split at request boundaries (three clients), closing; another one
        // that a faulty agent marks closed twice; a third that stays open.
        let d = |conn_id: u64, id: &str, closed: bool| v1::ConnDelta {
            conn_id,
            client_id: id.into(),
            closed,
            ..good_delta()
        };
        let b = Batch::try_from(batch(vec![
            d(1, "a", false),
            d(2, "x", true),
            d(1, "b", false),
            d(3, "", false),
            d(2, "y", true),
            d(1, "a", true),
        ]))
        .unwrap();
        let closed: Vec<bool> = b.deltas.iter().map(|d| d.closed).collect();
        assert_eq!(closed, [false, false, false, false, true, true]);
    }

    #[test]
    fn mapped_addresses_and_unknown_roles() {
        let mut d = good_delta();
        d.remote_addr = Ipv4Addr::new(203, 0, 113, 9)
            .to_ipv6_mapped()
            .octets()
            .to_vec();
        d.role = 77;
        let b = Batch::try_from(batch(vec![d])).unwrap();
        assert_eq!(b.deltas[0].remote, IpAddr::from([203, 0, 113, 9]));
        assert_eq!(b.deltas[0].role, Role::Unknown);
        assert_eq!(b.deltas[0].counters, Counters::default());
    }
}
