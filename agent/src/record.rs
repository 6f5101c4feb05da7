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
    pub role: &'static str,
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
    pub capacity: u32,
    pub live: u32,
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

pub const fn role_name(role: u8) -> &'static str {
    match role {
        ROLE_SERVER => "server",
        ROLE_CLIENT => "client",
        _ => "unknown",
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Tagged<'a> {
    Started {
        cgroup: &'a str,
        pin_dir: &'a str,
        adopted: bool,
        capacity: u32,
    },
    Conn(&'a ConnRecord),
    Overflow(&'a OverflowRecord),
    Stats {
        ts: u64,
        #[serde(flatten)]
        stats: &'a StatsRecord,
    },
}

/// Where records go.
pub trait Sink {
    fn started(
        &mut self,
        cgroup: &str,
        pin_dir: &str,
        adopted: bool,
        capacity: u32,
    ) -> std::io::Result<()>;
    fn conn(&mut self, r: &ConnRecord) -> std::io::Result<()>;
    fn overflow(&mut self, r: &OverflowRecord) -> std::io::Result<()>;
    fn stats(&mut self, ts: u64, r: &StatsRecord) -> std::io::Result<()>;
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
    fn started(
        &mut self,
        cgroup: &str,
        pin_dir: &str,
        adopted: bool,
        capacity: u32,
    ) -> std::io::Result<()> {
        self.line(&Tagged::Started {
            cgroup,
            pin_dir,
            adopted,
            capacity,
        })?;
        self.flush()
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
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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
    fn started(
        &mut self,
        cgroup: &str,
        pin_dir: &str,
        adopted: bool,
        capacity: u32,
    ) -> std::io::Result<()> {
        writeln!(
            self.0,
            "counting TCP connections in cgroup {cgroup} ({} state in {pin_dir}, table of {capacity})",
            if adopted { "adopted" } else { "new" }
        )?;
        self.0.flush()
    }
    fn conn(&mut self, r: &ConnRecord) -> std::io::Result<()> {
        writeln!(
            self.0,
            "{:<7} {} -> {} out {} B ({} wire, {} segs) in {} B ({} wire, {} segs){} cgroup={} {}",
            r.role,
            endpoint(r.local_addr, r.local_port),
            endpoint(r.remote_addr, r.remote_port),
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
        writeln!(
            self.0,
            "stats: {}/{} slots in use, {} connections overflowed ({} closed), {} untracked closes, {} unparsed packets, {} stale",
            r.live,
            r.capacity,
            r.conns_overflowed,
            r.overflow_closed,
            r.legacy_untracked,
            r.unparsed_packets,
            r.stale_slot
        )
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Discards records.
pub struct Discard;

impl Sink for Discard {
    fn started(&mut self, _: &str, _: &str, _: bool, _: u32) -> std::io::Result<()> {
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
