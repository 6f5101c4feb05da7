//! The agent's JSON records, typed, and sums of their per-connection deltas.
//!
//! A `conn` record's counts are deltas since the previous record of the same `conn_id`, so
//! a connection's total is the sum of its records; exactly one of them (the last) has
//! `"closed": true`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

/// Address family of a connection, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4, including v4-mapped IPv6.
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// Which side of the connection the local socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The local socket accepted the connection.
    Server,
    /// The local socket connected.
    Client,
    /// The agent saw the connection only after it was set up.
    Unknown,
}

/// One `{"type":"conn", ...}` record (fields the agent may add later are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConnRecord {
    /// Unix time of the record, in milliseconds.
    pub ts: u64,
    /// Identifies the connection across records.
    pub conn_id: u64,
    /// Address family.
    pub family: Family,
    /// Local address.
    pub local_addr: IpAddr,
    /// Local port.
    pub local_port: u16,
    /// Remote address.
    pub remote_addr: IpAddr,
    /// Remote port.
    pub remote_port: u16,
    /// Side of the local socket.
    pub role: Role,
    /// Payload bytes sent since the previous record.
    pub bytes_out: u64,
    /// Payload bytes received since the previous record.
    pub bytes_in: u64,
    /// Bytes on the wire (headers included) sent since the previous record.
    pub wire_bytes_out: u64,
    /// Bytes on the wire received since the previous record.
    pub wire_bytes_in: u64,
    /// Segments sent since the previous record.
    pub segments_out: u64,
    /// Segments received since the previous record.
    pub segments_in: u64,
    /// Whether this is the connection's last record.
    pub closed: bool,
    /// The socket's cgroup, relative to the cgroup2 mount.
    pub cgroup: String,
    /// The socket's cgroup id.
    pub cgroup_id: u64,
    /// Pid of the process that owned the socket, if known.
    pub pid: Option<u32>,
    /// Command name of that process, if known.
    pub comm: Option<String>,
    /// Unix time the connection was first seen, in milliseconds.
    pub first_seen: u64,
    /// Unix time the connection was last active, in milliseconds.
    pub last_seen: u64,
    /// The client these bytes are attributed to: the peer's address when nothing better is
    /// known. One interval of one connection gives a record per client.
    #[serde(default)]
    pub client_addr: Option<IpAddr>,
    /// The client's id, if one is known (hashed unless the agent runs with `--raw-ids`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Where the client came from: `peer`, `proxy-v1`, `proxy-v2`, `header:<name>` or
    /// `annotation`.
    #[serde(default)]
    pub client_source: Option<String>,
}

/// `"attribution"` of a `stats` record: cumulative counts of the agent's attribution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct AttributionStats {
    /// Turns read (for HTTP/1.x on keep-alive connections, requests).
    pub turns: u64,
    /// Claims (PROXY headers, forwarding or id headers) from peers that are not trusted.
    pub ignored_claims: u64,
    /// Turns whose client could not be read, by reason.
    pub unattributed: Unattributed,
}

/// Turns attributed to the connection's client for want of anything better, by reason. The
/// agent lists only the reasons that occurred: a missing one is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Unattributed {
    /// TLS.
    pub tls: u64,
    /// HTTP/2 with prior knowledge.
    pub http2: u64,
    /// Not HTTP.
    pub not_http: u64,
    /// Two requests in one turn.
    pub pipelined: u64,
    /// A request head longer than the capture.
    pub headers_truncated: u64,
    /// A bad PROXY header.
    pub malformed_proxy: u64,
    /// The kernel's event for the turn was lost.
    pub event_lost: u64,
}

/// The `attribution` counts of the last `stats` record, if there is one. Panics (naming the
/// record) if they do not fit the contract.
pub fn attribution_stats(records: &[Value]) -> Option<AttributionStats> {
    let stats = of_type(records, "stats").last()?;
    let attribution = stats
        .get("attribution")
        .unwrap_or_else(|| panic!("stats record without \"attribution\": {stats}"));
    Some(
        AttributionStats::deserialize(attribution).unwrap_or_else(|e| {
            panic!("stats attribution does not fit the contract: {e}: {stats}")
        }),
    )
}

/// The records whose `"type"` is `kind` (`"started"`, `"conn"`, `"overflow"`, `"stats"`).
pub fn of_type<'a>(records: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    records
        .iter()
        .filter(move |r| r.get("type").and_then(Value::as_str) == Some(kind))
}

/// Every `conn` record, typed. Panics (naming the record) if one does not fit the contract.
pub fn conn_records(records: &[Value]) -> Vec<ConnRecord> {
    of_type(records, "conn")
        .map(|r| {
            ConnRecord::deserialize(r)
                .unwrap_or_else(|e| {
                    // The other records of the same connection, to tell what happened to it.
                    let same: Vec<&Value> = of_type(records, "conn")
                        .filter(|o| o["remote_port"] == r["remote_port"] && o != &r)
                        .collect();
                    panic!(
                        "conn record does not fit the contract: {e}: {r}; the connection's other records: {same:?}"
                    )
                })
        })
        .collect()
}

/// Sums of a connection's records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnTotals {
    /// Number of records summed.
    pub records: usize,
    /// Number of those with `"closed": true` (1 once a connection has ended).
    pub closed: usize,
    /// Sum of `bytes_out`.
    pub bytes_out: u64,
    /// Sum of `bytes_in`.
    pub bytes_in: u64,
    /// Sum of `wire_bytes_out`.
    pub wire_bytes_out: u64,
    /// Sum of `wire_bytes_in`.
    pub wire_bytes_in: u64,
    /// Sum of `segments_out`.
    pub segments_out: u64,
    /// Sum of `segments_in`.
    pub segments_in: u64,
}

impl ConnTotals {
    /// Adds one record.
    pub fn add(&mut self, record: &ConnRecord) {
        self.records += 1;
        self.closed += usize::from(record.closed);
        self.bytes_out += record.bytes_out;
        self.bytes_in += record.bytes_in;
        self.wire_bytes_out += record.wire_bytes_out;
        self.wire_bytes_in += record.wire_bytes_in;
        self.segments_out += record.segments_out;
        self.segments_in += record.segments_in;
    }
}

/// Totals grouped by `key`. Filter first to keep one side or one cgroup, e.g.
/// `totals_by(conns.iter().filter(|c| c.role == Role::Server), |c| c.remote_port)`.
pub fn totals_by<'a, K: Ord>(
    records: impl IntoIterator<Item = &'a ConnRecord>,
    mut key: impl FnMut(&ConnRecord) -> K,
) -> BTreeMap<K, ConnTotals> {
    let mut totals = BTreeMap::<K, ConnTotals>::new();
    for record in records {
        totals.entry(key(record)).or_default().add(record);
    }
    totals
}

/// Totals per `conn_id`.
pub fn totals_by_conn_id<'a>(
    records: impl IntoIterator<Item = &'a ConnRecord>,
) -> BTreeMap<u64, ConnTotals> {
    totals_by(records, |r| r.conn_id)
}

/// Totals per `remote_port`: on the server side, per client connection (match with
/// [`crate::peer::Outcome::local_port`]).
pub fn totals_by_remote_port<'a>(
    records: impl IntoIterator<Item = &'a ConnRecord>,
) -> BTreeMap<u16, ConnTotals> {
    totals_by(records, |r| r.remote_port)
}

/// Number of `"closed": true` records per `conn_id` (every connection seen is listed).
pub fn closed_counts<'a>(
    records: impl IntoIterator<Item = &'a ConnRecord>,
) -> BTreeMap<u64, usize> {
    totals_by_conn_id(records)
        .into_iter()
        .map(|(id, t)| (id, t.closed))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conn(conn_id: u64, remote_port: u16, bytes_out: u64, closed: bool) -> Value {
        json!({
            "type": "conn", "ts": 1, "conn_id": conn_id, "family": "ipv4",
            "local_addr": "198.18.0.1", "local_port": 8000, "remote_addr": "198.18.0.2",
            "remote_port": remote_port, "role": "server", "bytes_out": bytes_out, "bytes_in": 3,
            "wire_bytes_out": bytes_out + 52, "wire_bytes_in": 55, "segments_out": 1,
            "segments_in": 1, "closed": closed, "cgroup": "/outflow-test-x", "cgroup_id": 7,
            "pid": null, "comm": null, "first_seen": 1, "last_seen": 1
        })
    }

    #[test]
    fn sums_deltas_per_connection() {
        let records = vec![
            json!({"type": "started", "cgroup": "/", "pin_dir": "/sys/fs/bpf/x", "adopted": false, "capacity": 4}),
            conn(1, 40000, 10, false),
            conn(2, 40001, 5, false),
            conn(1, 40000, 20, true),
            json!({"type": "stats", "ts": 1}),
        ];
        let conns = conn_records(&records);
        assert_eq!(conns.len(), 3);
        let by_id = totals_by_conn_id(&conns);
        assert_eq!(by_id[&1].bytes_out, 30);
        assert_eq!(by_id[&1].records, 2);
        assert_eq!(by_id[&1].closed, 1);
        assert_eq!(by_id[&2].closed, 0);
        assert_eq!(totals_by_remote_port(&conns)[&40001].wire_bytes_out, 57);
        assert_eq!(closed_counts(&conns), BTreeMap::from([(1, 1), (2, 0)]));
        assert_eq!(of_type(&records, "stats").count(), 1);
    }

    #[test]
    fn reads_clients_and_attribution_stats() {
        let mut one = conn(1, 40000, 10, false);
        one["client_addr"] = json!("198.51.100.7");
        one["client_id"] = json!("tenant-1");
        one["client_source"] = json!("header:x-client-id");
        let mut two = conn(1, 40000, 5, false);
        two["client_addr"] = json!("2001:db8:100::7");
        two["client_id"] = Value::Null;
        two["client_source"] = json!("peer");
        let stats = json!({"type": "stats", "ts": 1, "attribution": {
            "turns": 3, "ignored_claims": 1, "unattributed": {"pipelined": 2}}});
        let records = vec![one, two, stats];
        let conns = conn_records(&records);
        let by_addr = totals_by(&conns, |c| c.client_addr);
        assert_eq!(
            by_addr[&Some("198.51.100.7".parse().expect("ip"))].bytes_out,
            10
        );
        assert_eq!(conns[1].client_id, None);
        assert_eq!(conns[1].client_source.as_deref(), Some("peer"));
        let stats = attribution_stats(&records).expect("a stats record");
        assert_eq!((stats.turns, stats.unattributed.pipelined), (3, 2));
        // Records of an agent without attribution still parse.
        assert_eq!(conn_records(&[conn(2, 1, 1, true)])[0].client_addr, None);
    }

    #[test]
    #[should_panic(expected = "does not fit the contract")]
    fn rejects_malformed_conn_records() {
        conn_records(&[json!({"type": "conn", "conn_id": 1})]);
    }
}
