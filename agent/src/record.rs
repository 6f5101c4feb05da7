//! The records the agent emits, and their JSON-lines and text forms.
use std::{io::Write, net::IpAddr};

use agent_common::{Counters, ROLE_CLIENT, ROLE_SERVER};
use serde::Serialize;

/// One connection's counts since its previous record (deltas: a consumer's sum is the total).
#[derive(Clone, Debug, Serialize)]
pub struct ConnRecord {
    /// Unix milliseconds at which the table was read.
    pub ts: u64,
    /// The kernel's socket cookie: unique per connection for the host's boot.
    pub conn_id: u64,
    pub family: &'static str,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    /// The client these bytes belong to: the real client behind a balancer or gateway when it
    /// could be attributed, else the remote address. One interval of one connection gives one
    /// record per client (same `conn_id`); their sum is the connection's delta.
    pub client_addr: IpAddr,
    /// The client's id (hashed unless configured raw), if one was found.
    pub client_id: Option<String>,
    /// Where the client was learnt: `peer`, `proxy-v1`, `proxy-v2`, `header:<name>`,
    /// `annotation`.
    pub client_source: String,
    pub role: Role,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub wire_bytes_out: u64,
    pub wire_bytes_in: u64,
    pub segments_out: u64,
    pub segments_in: u64,
    /// The connection closed: these are its last counts.
    pub closed: bool,
    pub cgroup: Option<String>,
    pub cgroup_id: u64,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Unix milliseconds.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// Bytes of connections that found the table full, since the previous overflow record.
#[derive(Clone, Debug, Serialize)]
pub struct OverflowRecord {
    pub ts: u64,
    #[serde(flatten)]
    pub counters: CountersOut,
}

/// Cumulative event counters of the kernel programs and the table's occupancy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatsRecord {
    pub conns_overflowed: u64,
    pub overflow_closed: u64,
    pub legacy_untracked: u64,
    pub unparsed_packets: u64,
    pub stale_slot: u64,
    /// Connections whose slot is away from their home group (it was full): their packets take
    /// the slower way, through the socket's storage. Many of them: raise `max_connections`.
    pub placed_away: u64,
    /// Slots left with the owner of a socket whose close was not seen, cleared when another
    /// socket at the same address took a slot.
    pub stale_owners: u64,
    pub capacity: u32,
    pub live: u32,
    pub attribution: AttributionStatsRecord,
}

/// Client attribution's counters (cumulative), in the stats record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttributionStatsRecord {
    #[serde(flatten)]
    pub agent: crate::attribution::AttributionStats,
    /// Turn events the kernel's ring buffer had no room for (their bytes: `event_lost`).
    pub turn_events_lost: u64,
    /// Annotations the ring buffer had no room for.
    pub annotations_lost: u64,
    /// Annotations on sockets the agent does not track (not TCP, not counted, overflowed).
    pub annotations_untracked: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CountersOut {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub wire_bytes_out: u64,
    pub wire_bytes_in: u64,
    pub segments_out: u64,
    pub segments_in: u64,
}

impl From<Counters> for CountersOut {
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

/// Which side of the connection the local socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepted.
    Server,
    /// Connected.
    Client,
    /// Open before the agent first attached.
    Unknown,
}

impl Role {
    /// The role the kernel recorded (`agent_common::ROLE_*`).
    pub const fn from_kernel(role: u8) -> Self {
        match role {
            ROLE_SERVER => Self::Server,
            ROLE_CLIENT => Self::Client,
            _ => Self::Unknown,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Client => "client",
            Self::Unknown => "unknown",
        }
    }
}

/// The state of the export to a collector (`{"type":"export",...}`, printed on change).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExportRecord {
    pub collector: String,
    /// A stream to the collector is open (Welcome received).
    pub connected: bool,
    pub agent_id: String,
    pub epoch: u64,
    /// Highest sequence number given to a batch (0: none yet in this epoch).
    pub last_seq: u64,
    /// Highest sequence number the collector acknowledged.
    pub acked_seq: u64,
    /// Batches in the spool, not yet acknowledged, and their size on disk.
    pub spooled_batches: u64,
    pub spooled_bytes: u64,
    /// Batches dropped unsent since this agent started (spool full, unreadable spool files),
    /// and their payload bytes out; each is also reported to the collector in the next batch.
    pub lost_batches: u64,
    pub lost_bytes_out: u64,
    /// Intervals the spool could not be written (disk full) since this agent started: they
    /// stayed counted in the kernel table and went out with a later interval.
    pub deferred_intervals: u64,
}

/// The agent attached: where, with what state, and where its metrics are served.
#[derive(Clone, Debug, Serialize)]
pub struct StartedRecord {
    pub cgroup: String,
    pub pin_dir: String,
    /// True when the agent adopted state an earlier agent pinned.
    pub adopted: bool,
    pub capacity: u32,
    /// Address of the metrics and health endpoint (the bound port when 0 was asked for).
    pub metrics: std::net::SocketAddr,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Tagged<'a> {
    Started(&'a StartedRecord),
    Conn(&'a ConnRecord),
    Overflow(&'a OverflowRecord),
    Stats {
        ts: u64,
        #[serde(flatten)]
        stats: &'a StatsRecord,
    },
    Export {
        ts: u64,
        #[serde(flatten)]
        export: &'a ExportRecord,
    },
}

/// Where records go. Each interval: `begin`, the records, `flush`. (Whether an interval is
/// kept across a crash before it is committed is the durability step's:
/// [`crate::durability`].)
pub trait Sink {
    /// An interval's records follow, read from the table at Unix milliseconds `ts`.
    fn begin(&mut self, ts: u64) -> std::io::Result<()> {
        let _ = ts;
        Ok(())
    }
    fn started(&mut self, r: &StartedRecord) -> std::io::Result<()>;
    fn conn(&mut self, r: &ConnRecord) -> std::io::Result<()>;
    fn overflow(&mut self, r: &OverflowRecord) -> std::io::Result<()>;
    fn stats(&mut self, ts: u64, r: &StatsRecord) -> std::io::Result<()>;
    /// The export's state changed (only with a collector configured).
    fn export(&mut self, ts: u64, r: &ExportRecord) -> std::io::Result<()> {
        let _ = (ts, r);
        Ok(())
    }
    /// Called at the end of each interval: everything written is out once this returns.
    fn flush(&mut self) -> std::io::Result<()>;
}

/// One JSON object per line.
pub struct JsonLines<W: Write>(pub W);

impl<W: Write> JsonLines<W> {
    fn line(&mut self, t: &Tagged<'_>) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.0, t)?;
        self.0.write_all(b"\n")
    }
}

impl<W: Write> Sink for JsonLines<W> {
    fn started(&mut self, r: &StartedRecord) -> std::io::Result<()> {
        self.line(&Tagged::Started(r))?;
        self.0.flush()
    }
    fn conn(&mut self, r: &ConnRecord) -> std::io::Result<()> {
        self.line(&Tagged::Conn(r))
    }
    fn overflow(&mut self, r: &OverflowRecord) -> std::io::Result<()> {
        self.line(&Tagged::Overflow(r))
    }
    fn stats(&mut self, ts: u64, r: &StatsRecord) -> std::io::Result<()> {
        self.line(&Tagged::Stats { ts, stats: r })
    }
    fn export(&mut self, ts: u64, r: &ExportRecord) -> std::io::Result<()> {
        self.line(&Tagged::Export { ts, export: r })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// ` client 198.51.100.7 id h:.. (header:x-client-id)` when the client is not the peer.
fn client_text(r: &ConnRecord) -> String {
    if r.client_source == "peer" {
        return String::new();
    }
    let id = r
        .client_id
        .as_deref()
        .map(|i| format!(" id {i}"))
        .unwrap_or_default();
    format!(" client {}{id} ({})", r.client_addr, r.client_source)
}

/// One line per record, for a person at a terminal.
pub struct Text<W: Write>(pub W);

fn endpoint(a: IpAddr, p: u16) -> String {
    match a {
        IpAddr::V4(v4) => format!("{v4}:{p}"),
        IpAddr::V6(v6) => format!("[{v6}]:{p}"),
    }
}

impl<W: Write> Sink for Text<W> {
    fn started(&mut self, r: &StartedRecord) -> std::io::Result<()> {
        writeln!(
            self.0,
            "counting TCP connections in cgroup {} ({} state in {}, table of {}); metrics at http://{}/metrics",
            r.cgroup,
            if r.adopted { "adopted" } else { "new" },
            r.pin_dir,
            r.capacity,
            r.metrics
        )?;
        self.0.flush()
    }
    fn conn(&mut self, r: &ConnRecord) -> std::io::Result<()> {
        writeln!(
            self.0,
            "{:<7} {} -> {}{} out {} B ({} wire, {} segs) in {} B ({} wire, {} segs){} cgroup={} {}",
            r.role.as_str(),
            endpoint(r.local_addr, r.local_port),
            endpoint(r.remote_addr, r.remote_port),
            client_text(r),
            r.bytes_out,
            r.wire_bytes_out,
            r.segments_out,
            r.bytes_in,
            r.wire_bytes_in,
            r.segments_in,
            if r.closed { " closed" } else { "" },
            r.cgroup.as_deref().unwrap_or("?"),
            r.comm
                .as_ref()
                .map(|c| format!("{c}[{}]", r.pid.unwrap_or(0)))
                .unwrap_or_default(),
        )
    }
    fn overflow(&mut self, r: &OverflowRecord) -> std::io::Result<()> {
        let c = &r.counters;
        writeln!(
            self.0,
            "OVERFLOW (table full) out {} B ({} wire, {} segs) in {} B ({} wire, {} segs)",
            c.bytes_out,
            c.wire_bytes_out,
            c.segments_out,
            c.bytes_in,
            c.wire_bytes_in,
            c.segments_in
        )
    }
    fn stats(&mut self, _ts: u64, r: &StatsRecord) -> std::io::Result<()> {
        let a = &r.attribution;
        let unattributed: Vec<String> = a
            .agent
            .unattributed
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            self.0,
            "stats: {}/{} slots in use ({} placed away), {} connections overflowed ({} closed), {} untracked closes, {} unparsed packets, {} stale, {} stale owners; attribution: {} turns, {} annotations, {} ignored claims, unattributed [{}], {} events lost",
            r.live,
            r.capacity,
            r.placed_away,
            r.conns_overflowed,
            r.overflow_closed,
            r.legacy_untracked,
            r.unparsed_packets,
            r.stale_slot,
            r.stale_owners,
            a.agent.turns,
            a.agent.annotations,
            a.agent.ignored_claims,
            unattributed.join(", "),
            a.turn_events_lost + a.annotations_lost,
        )
    }
    fn export(&mut self, _ts: u64, r: &ExportRecord) -> std::io::Result<()> {
        writeln!(
            self.0,
            "export: {} {}, agent {} epoch {}, seq {} acked {}, {} batches ({} B) spooled, {} batches ({} B out) lost, {} intervals deferred (spool not writable)",
            if r.connected {
                "connected to"
            } else {
                "not connected to"
            },
            r.collector,
            r.agent_id,
            r.epoch,
            r.last_seq,
            r.acked_seq,
            r.spooled_batches,
            r.spooled_bytes,
            r.lost_batches,
            r.lost_bytes_out,
            r.deferred_intervals
        )
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Discards records.
pub struct Discard;

impl Sink for Discard {
    fn started(&mut self, _: &StartedRecord) -> std::io::Result<()> {
        Ok(())
    }
    fn conn(&mut self, _: &ConnRecord) -> std::io::Result<()> {
        Ok(())
    }
    fn overflow(&mut self, _: &OverflowRecord) -> std::io::Result<()> {
        Ok(())
    }
    fn stats(&mut self, _: u64, _: &StatsRecord) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
