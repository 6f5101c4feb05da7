//! Client attribution: who each byte of an accepted connection belongs to.
//!
//! The kernel emits an event at the start of each *turn* of an accepted connection (on HTTP/1.x
//! keep-alive: each request), with the connection's counters just before the turn's first byte
//! and the turn's first bytes (`agent_common::TurnEvent`); and one when the serving application
//! annotates its socket. Here the bytes are handed to `outflow_attribution`, which decides the
//! client, and a connection's counts become *segments*: counters from one boundary to the next,
//! each owned by one client. An interval's delta is split over the segments it spans, so that
//! per-client sums are exact and the parts of a delta add up to the delta.
//!
//! Nothing is misattributed: bytes whose client cannot be known (a lost event, a turn whose
//! capture is still coming when the connection closes) go to the TCP peer with source `peer`,
//! and [`AttributionStats`] counts each such case by cause. Bytes of a turn whose client is not
//! decided yet are held back (not reported, not committed) for at most [`MAX_HOLDS`] intervals.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use agent_common::{Counters, EVENT_ANNOTATION, EVENT_MORE, EVENT_TURN, ROLE_SERVER, TurnEvent};
use outflow_attribution::{Client, ConnState, Progress, Resolver, Source};
use serde::Serialize;

use crate::table::{ConnTable, Identity, SlotDelta};

/// Intervals a connection's bytes may be held back waiting for its turn's client.
pub const MAX_HOLDS: u8 = 2;

/// Most connections with attribution state (beyond, new connections are reported at peer level).
const MAX_CONNS: usize = 1 << 20;

/// Cumulative counts of what attribution saw, reported in the agent's stats record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AttributionStats {
    /// Turns (requests) whose start was captured.
    pub turns: u64,
    /// Annotations applied.
    pub annotations: u64,
    /// PROXY headers and forwarding/id headers from untrusted senders, ignored.
    pub ignored_claims: u64,
    /// Turns or connections whose bytes went to the TCP peer because the client could not be
    /// known, by cause: `tls`, `http2`, `not_http`, `pipelined`, `headers_truncated`,
    /// `malformed_proxy`, `event_lost`, `untracked`.
    pub unattributed: BTreeMap<&'static str, u64>,
}

impl AttributionStats {
    fn unattributed(&mut self, cause: &'static str) {
        *self.unattributed.entry(cause).or_default() += 1;
    }
}

/// One part of a delta and the client it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub counters: Counters,
    pub client: Client,
}

/// An interval's delta of one connection, split by client.
#[derive(Clone, Debug)]
pub struct Split {
    /// In order; their sum is `upto - reported`.
    pub parts: Vec<Part>,
    /// Where the watermark moves: the snapshot, or less when bytes are held back.
    pub upto: Counters,
}

/// Who owns a segment.
#[derive(Clone, Debug)]
enum Owner {
    Client(Client),
    /// The turn's bytes are still being captured.
    Pending {
        capture: Vec<u8>,
        first: bool,
    },
    /// Cannot be known: reported as the peer's.
    Unknown,
}

#[derive(Clone, Debug)]
struct Segment {
    /// Counters at the segment's first byte.
    start: Counters,
    turn: u32,
    owner: Owner,
}

struct Conn {
    state: ConnState,
    peer: IpAddr,
    /// In order of `start` (field-wise non-decreasing); the first starts at or before the
    /// watermark.
    segments: Vec<Segment>,
    /// Highest turn whose start event arrived.
    turn_seen: u32,
    /// Highest `lost_turn` already acted on.
    lost_seen: u32,
    /// Consecutive intervals with bytes held back.
    holds: u8,
}

/// The client of a connection nothing is known of: its TCP peer.
pub fn peer_client(peer: IpAddr) -> Client {
    Client {
        addr: outflow_attribution::trust::normalize(peer),
        id: None,
        source: Source::Peer,
    }
}

pub struct Attributor {
    resolver: Resolver,
    conns: HashMap<(u32, u32), Conn>,
    /// What the splits of the interval under way reported, per connection: up to where, and
    /// whether it closed. Segments before that point are forgotten only once the interval is
    /// committed ([`Attributor::committed`]): an interval that is not ([`Attributor::deferred`])
    /// is split again from the same watermark.
    splits: Vec<((u32, u32), Counters, bool)>,
    pub stats: AttributionStats,
}

impl Attributor {
    pub fn new(resolver: Resolver) -> Self {
        Self {
            resolver,
            conns: HashMap::new(),
            splits: Vec::new(),
            stats: AttributionStats::default(),
        }
    }

    /// Connections with attribution state.
    pub fn tracked(&self) -> usize {
        self.conns.len()
    }

    /// One ring buffer record (a [`TurnEvent`], possibly cut short by the kernel's size).
    pub fn on_record(&mut self, bytes: &[u8], table: &ConnTable) {
        const HEADER: usize = size_of::<TurnEvent>() - agent_common::CAPTURE_MAX;
        if bytes.len() < HEADER {
            return;
        }
        // SAFETY: at least HEADER bytes; TurnEvent is plain data; the data array is read only
        // up to the record's length below.
        let mut e: TurnEvent = unsafe { std::mem::zeroed() };
        let n = bytes.len().min(size_of::<TurnEvent>());
        // SAFETY: copying n <= size_of::<TurnEvent>() bytes into it.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut e).cast::<u8>(), n);
        }
        let len = usize::from(e.len).min(n - HEADER);
        let data = &e.data[..len];
        self.on_event(&e, data, |slot, generation| {
            table.identity(slot, generation)
        });
    }

    fn on_event(
        &mut self,
        e: &TurnEvent,
        data: &[u8],
        identity: impl FnOnce(u32, u32) -> Option<Identity>,
    ) {
        let key = (e.slot, e.generation);
        if !self.conns.contains_key(&key) {
            if e.kind == EVENT_MORE {
                return;
            }
            let Some(id) = identity(e.slot, e.generation) else {
                return;
            };
            if id.role != ROLE_SERVER {
                return;
            }
            if self.conns.len() >= MAX_CONNS {
                self.stats.unattributed("untracked");
                return;
            }
            let peer = id.remote_addr;
            self.conns.insert(
                key,
                Conn {
                    state: self.resolver.connection(peer),
                    peer,
                    segments: vec![Segment {
                        start: Counters::default(),
                        turn: 0,
                        owner: Owner::Client(peer_client(peer)),
                    }],
                    turn_seen: 0,
                    lost_seen: 0,
                    holds: 0,
                },
            );
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match e.kind {
            EVENT_TURN if e.turn > conn.turn_seen => {
                self.stats.turns += 1;
                // The previous turn's capture is over: decide it now.
                conn.resolve_last(&self.resolver, true, &mut self.stats);
                if e.turn > conn.turn_seen + 1 && conn.turn_seen > 0 {
                    // A turn between was lost: where it started is unknown.
                    conn.last_unknown(&mut self.stats);
                }
                conn.turn_seen = e.turn;
                conn.push(Segment {
                    start: e.at,
                    turn: e.turn,
                    owner: Owner::Pending {
                        capture: data.to_vec(),
                        first: e.turn == 1,
                    },
                });
                conn.resolve_last(&self.resolver, false, &mut self.stats);
            }
            EVENT_MORE => {
                if let Some(Segment {
                    turn,
                    owner: Owner::Pending { capture, .. },
                    ..
                }) = conn.segments.last_mut()
                    && *turn == e.turn
                {
                    capture.extend_from_slice(data);
                    conn.resolve_last(&self.resolver, false, &mut self.stats);
                }
            }
            EVENT_ANNOTATION => {
                let Some(client) = conn.state.annotate(&self.resolver, data) else {
                    return;
                };
                self.stats.annotations += 1;
                match conn.segments.last_mut() {
                    // Undecided: the resolver applies the annotation when it decides.
                    Some(Segment {
                        owner: Owner::Pending { .. },
                        ..
                    }) => {}
                    // Nothing sent since the turn started: the whole turn is the annotated
                    // client's, its request included.
                    Some(last) if last.turn == e.turn && last.start.bytes_out == e.at.bytes_out => {
                        last.owner = Owner::Client(client);
                    }
                    _ => conn.push(Segment {
                        start: e.at,
                        turn: e.turn,
                        owner: Owner::Client(client),
                    }),
                }
            }
            _ => {}
        }
    }

    /// Splits a slot's delta by client. Splitting the same slot again before
    /// [`Attributor::committed`] gives the same parts (and more, for bytes counted since).
    pub fn split(&mut self, d: &SlotDelta) -> Split {
        let key = (d.index, d.generation);
        let Some(conn) = self.conns.get_mut(&key) else {
            return Split {
                parts: vec![Part {
                    counters: d.delta,
                    client: peer_client(d.identity.remote_addr),
                }],
                upto: d.snapshot,
            };
        };
        let split = conn.split(d, &self.resolver, &mut self.stats);
        self.splits.push((key, split.upto, d.closed));
        split
    }

    /// The interval's splits are committed: segments wholly reported are done with, and
    /// closed connections forgotten.
    pub fn committed(&mut self) {
        for (key, upto, closed) in self.splits.drain(..) {
            if closed {
                self.conns.remove(&key);
            } else if let Some(conn) = self.conns.get_mut(&key) {
                conn.settle(&upto);
            }
        }
    }

    /// The interval's splits were not committed: the next interval splits from the same
    /// watermarks.
    pub fn deferred(&mut self) {
        self.splits.clear();
    }
}

impl Conn {
    fn push(&mut self, mut s: Segment) {
        if let Some(prev) = self.segments.last() {
            s.start = max(&s.start, &prev.start);
        }
        self.segments.push(s);
    }

    /// Decides the last segment if it is pending and can be decided.
    fn resolve_last(&mut self, r: &Resolver, complete: bool, stats: &mut AttributionStats) {
        let Some(last) = self.segments.last_mut() else {
            return;
        };
        let Owner::Pending { capture, first } = &last.owner else {
            return;
        };
        if let Progress::Done(turn) = self.state.turn(r, *first, capture, complete) {
            stats.ignored_claims += u64::from(turn.ignored_claims);
            if let Some(cause) = turn.unattributed {
                stats.unattributed(cause.as_str());
            }
            last.owner = Owner::Client(turn.client);
        }
    }

    /// The last segment's client cannot be known any more.
    fn last_unknown(&mut self, stats: &mut AttributionStats) {
        if let Some(last) = self.segments.last_mut() {
            last.owner = Owner::Unknown;
        }
        stats.unattributed("event_lost");
    }

    fn split(&mut self, d: &SlotDelta, r: &Resolver, stats: &mut AttributionStats) -> Split {
        let lo = d.reported();
        let mut upto = d.snapshot;
        let mut hold = false;
        if d.lost_turn > self.lost_seen && d.lost_turn >= self.turn_seen {
            // The kernel could not deliver an event of the latest turn (or a later one).
            self.lost_seen = d.lost_turn;
            self.turn_seen = self.turn_seen.max(d.lost_turn);
            self.last_unknown(stats);
        } else if d.turn > self.turn_seen {
            // A turn started whose event is not read yet (another CPU may still be writing the
            // ring buffer ahead of it): wait once, then give up on it.
            if d.closed || self.holds >= MAX_HOLDS {
                self.turn_seen = d.turn;
                self.last_unknown(stats);
            } else {
                hold = true;
            }
        }
        if !hold {
            let answered = self
                .segments
                .last()
                .is_some_and(|s| d.snapshot.bytes_out > s.start.bytes_out);
            let complete = d.closed || answered || self.holds >= MAX_HOLDS;
            self.resolve_last(r, complete, stats);
            hold = matches!(
                self.segments.last(),
                Some(Segment {
                    owner: Owner::Pending { .. },
                    ..
                })
            );
        }
        if hold {
            // Report up to where the undecided part starts; the rest next interval.
            self.holds += 1;
            if let Some(last) = self.segments.last() {
                upto = clamp(&last.start, &lo, &d.snapshot);
            }
        } else {
            self.holds = 0;
        }

        let mut parts = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let from = clamp(&seg.start, &lo, &upto);
            let to = self
                .segments
                .get(i + 1)
                .map_or(upto, |next| clamp(&next.start, &lo, &upto));
            let counters = to.delta_since(&from);
            if counters.is_zero() {
                continue;
            }
            let client = match &seg.owner {
                Owner::Client(c) => c.clone(),
                Owner::Pending { .. } | Owner::Unknown => peer_client(self.peer),
            };
            match parts.last_mut() {
                Some(Part {
                    counters: c,
                    client: prev,
                }) if *prev == client => {
                    *c = c.plus(&counters);
                }
                _ => parts.push(Part { counters, client }),
            }
        }
        Split { parts, upto }
    }

    /// Forgets the segments wholly before `upto`, once reported up to there.
    fn settle(&mut self, upto: &Counters) {
        let done = self
            .segments
            .iter()
            .skip(1)
            .take_while(|s| le(&s.start, upto))
            .count();
        self.segments.drain(..done);
    }
}

fn zip(a: &Counters, b: &Counters, f: impl Fn(u64, u64) -> u64) -> Counters {
    Counters {
        bytes_out: f(a.bytes_out, b.bytes_out),
        bytes_in: f(a.bytes_in, b.bytes_in),
        wire_bytes_out: f(a.wire_bytes_out, b.wire_bytes_out),
        wire_bytes_in: f(a.wire_bytes_in, b.wire_bytes_in),
        segments_out: f(a.segments_out, b.segments_out),
        segments_in: f(a.segments_in, b.segments_in),
    }
}

fn max(a: &Counters, b: &Counters) -> Counters {
    zip(a, b, u64::max)
}

/// `c` held within `[lo, hi]`, field by field.
fn clamp(c: &Counters, lo: &Counters, hi: &Counters) -> Counters {
    zip(&max(c, lo), hi, u64::min)
}

/// Every field of `a` is at most `b`'s.
fn le(a: &Counters, b: &Counters) -> bool {
    max(a, b) == *b
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use agent_common::CAPTURE_MAX;
    use outflow_attribution::{HeaderKind, HeaderRule, Settings};

    use super::*;

    const GATEWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9));

    fn attributor() -> Attributor {
        let settings = Settings {
            trusted_peers: vec!["10.0.0.0/8".parse().expect("net")],
            hash_ids: false,
            headers: vec![
                HeaderRule {
                    name: "x-forwarded-for".into(),
                    kind: HeaderKind::Address,
                },
                HeaderRule {
                    name: "x-client-id".into(),
                    kind: HeaderKind::Id,
                },
            ],
            annotations: true,
            ..Settings::default()
        };
        Attributor::new(Resolver::new(&settings, None).expect("resolver"))
    }

    fn identity() -> Identity {
        Identity {
            cookie: 7,
            first_seen_ns: 0,
            cgroup_id: 1,
            local_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            remote_addr: GATEWAY,
            local_port: 8000,
            remote_port: 40000,
            role: ROLE_SERVER,
        }
    }

    fn at(out: u64, inb: u64) -> Counters {
        Counters {
            bytes_out: out,
            bytes_in: inb,
            ..Counters::default()
        }
    }

    fn event(kind: u16, turn: u32, at: Counters, data: &[u8]) -> (TurnEvent, Vec<u8>) {
        // SAFETY: plain data.
        let mut e: TurnEvent = unsafe { std::mem::zeroed() };
        e.slot = 3;
        e.generation = 1;
        e.turn = turn;
        e.kind = kind;
        e.len = data.len().min(CAPTURE_MAX) as u16;
        e.at = at;
        (e, data.to_vec())
    }

    fn feed(a: &mut Attributor, kind: u16, turn: u32, c: Counters, data: &[u8]) {
        let (e, d) = event(kind, turn, c, data);
        a.on_event(&e, &d, |_, _| Some(identity()));
    }

    fn delta(reported: Counters, snapshot: Counters, turn: u32, closed: bool) -> SlotDelta {
        SlotDelta {
            index: 3,
            generation: 1,
            snapshot,
            delta: snapshot.delta_since(&reported),
            closed,
            identity: identity(),
            turn,
            lost_turn: 0,
        }
    }

    fn request(xff: &str, id: &str) -> Vec<u8> {
        format!(
            "POST /v1/chat HTTP/1.1\r\nhost: x\r\nx-forwarded-for: {xff}\r\nx-client-id: {id}\r\ncontent-length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    fn summary(s: &Split) -> Vec<(u64, u64, String, Option<String>)> {
        s.parts
            .iter()
            .map(|p| {
                (
                    p.counters.bytes_out,
                    p.counters.bytes_in,
                    p.client.addr.to_string(),
                    p.client.id.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn a_pooled_connection_splits_at_each_request_to_the_byte() {
        let mut a = attributor();
        let r1 = request("198.51.100.1", "alice");
        let r2 = request("198.51.100.2", "bob");
        feed(&mut a, EVENT_TURN, 1, at(0, 0), &r1);
        // Alice's response is 1000 bytes; then Bob's request, and 500 bytes of his response.
        let in1 = r1.len() as u64;
        feed(&mut a, EVENT_TURN, 2, at(1000, in1), &r2);
        let in2 = in1 + r2.len() as u64;
        let s = a.split(&delta(at(0, 0), at(1500, in2), 2, false));
        assert_eq!(
            summary(&s),
            vec![
                (1000, in1, "198.51.100.1".into(), Some("alice".into())),
                (500, in2 - in1, "198.51.100.2".into(), Some("bob".into())),
            ]
        );
        assert_eq!(s.upto, at(1500, in2));
        a.committed();
        // The next interval continues Bob's response.
        let s = a.split(&delta(at(1500, in2), at(1800, in2), 2, true));
        assert_eq!(
            summary(&s),
            vec![(300, 0, "198.51.100.2".into(), Some("bob".into()))]
        );
        a.committed();
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn an_interval_not_committed_is_split_again_whole() {
        let mut a = attributor();
        let r1 = request("198.51.100.1", "alice");
        let r2 = request("198.51.100.2", "bob");
        feed(&mut a, EVENT_TURN, 1, at(0, 0), &r1);
        let in1 = r1.len() as u64;
        feed(&mut a, EVENT_TURN, 2, at(1000, in1), &r2);
        let in2 = in1 + r2.len() as u64;
        let first = summary(&a.split(&delta(at(0, 0), at(1500, in2), 2, false)));
        // The spool could not take the interval: the kernel's watermark stays where it was.
        a.deferred();
        // The connection closes meanwhile; the whole of it is split again, Alice's part too.
        let s = a.split(&delta(at(0, 0), at(1800, in2), 2, true));
        assert_eq!(
            summary(&s),
            vec![
                (1000, in1, "198.51.100.1".into(), Some("alice".into())),
                (800, in2 - in1, "198.51.100.2".into(), Some("bob".into())),
            ]
        );
        assert_eq!(first[0], summary(&s)[0]);
        assert_eq!(a.tracked(), 1, "forgotten only once committed");
        a.committed();
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn an_undecided_turn_is_held_back_then_given_to_the_peer() {
        let mut a = attributor();
        let r1 = request("198.51.100.1", "alice");
        // Only the first bytes of the head have come.
        feed(&mut a, EVENT_TURN, 1, at(0, 0), &r1[..20]);
        let s = a.split(&delta(at(0, 0), at(0, 20), 1, false));
        assert!(s.parts.is_empty());
        assert_eq!(s.upto, at(0, 0));
        a.committed();
        // The rest arrives: decided.
        feed(&mut a, EVENT_MORE, 1, at(0, 0), &r1[20..]);
        let n = r1.len() as u64;
        let s = a.split(&delta(at(0, 0), at(700, n), 1, false));
        assert_eq!(
            summary(&s),
            vec![(700, n, "198.51.100.1".into(), Some("alice".into()))]
        );
    }

    #[test]
    fn a_lost_turn_gives_the_rest_to_the_peer_and_is_counted() {
        let mut a = attributor();
        let r1 = request("198.51.100.1", "alice");
        feed(&mut a, EVENT_TURN, 1, at(0, 0), &r1);
        let n = r1.len() as u64;
        let mut d = delta(at(0, 0), at(900, n + 50), 2, false);
        d.lost_turn = 2;
        let s = a.split(&d);
        assert_eq!(
            summary(&s),
            vec![(900, n + 50, GATEWAY.to_string(), None)],
            "where turn 2 began is unknown: nothing goes to alice past the watermark"
        );
        assert_eq!(a.stats.unattributed.get("event_lost"), Some(&1));
    }

    #[test]
    fn a_turn_not_yet_read_waits_then_counts_as_lost() {
        let mut a = attributor();
        let r1 = request("198.51.100.1", "alice");
        feed(&mut a, EVENT_TURN, 1, at(0, 0), &r1);
        let n = r1.len() as u64;
        // The slot says turn 2 started, its event is not here: hold back from turn 1's start.
        let s = a.split(&delta(at(0, 0), at(100, n + 10), 2, false));
        assert!(s.parts.is_empty());
        a.committed();
        let s = a.split(&delta(at(0, 0), at(100, n + 10), 2, false));
        assert!(s.parts.is_empty());
        a.committed();
        let s = a.split(&delta(at(0, 0), at(100, n + 10), 2, false));
        assert_eq!(summary(&s), vec![(100, n + 10, GATEWAY.to_string(), None)]);
    }

    #[test]
    fn an_annotation_takes_the_turn_when_nothing_was_sent_yet() {
        let mut a = attributor();
        let get = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let n = get.len() as u64;
        feed(&mut a, EVENT_TURN, 1, at(0, 0), get);
        feed(&mut a, EVENT_ANNOTATION, 1, at(0, n), b"tenant-a");
        feed(&mut a, EVENT_TURN, 2, at(400, n), get);
        feed(&mut a, EVENT_ANNOTATION, 2, at(400, 2 * n), b"tenant-b");
        let s = a.split(&delta(at(0, 0), at(1000, 2 * n), 2, true));
        let ids: Vec<_> = s
            .parts
            .iter()
            .map(|p| (p.counters.bytes_out, p.client.id.clone()))
            .collect();
        assert_eq!(
            ids,
            vec![
                (400, Some("tenant-a".into())),
                (600, Some("tenant-b".into()))
            ]
        );
    }

    #[test]
    fn parts_always_add_up_to_the_delta() {
        let mut a = attributor();
        let mut reported = at(0, 0);
        let mut out = 0;
        let mut inb = 0;
        for turn in 1..=50u32 {
            let r = request(&format!("198.51.100.{turn}"), &format!("c{}", turn % 7));
            feed(&mut a, EVENT_TURN, turn, at(out, inb), &r);
            inb += r.len() as u64;
            out += u64::from(turn) * 97 % 1000;
            if turn % 3 == 0 {
                let snap = at(out, inb);
                let s = a.split(&delta(reported, snap, turn, false));
                let sum = s
                    .parts
                    .iter()
                    .fold(Counters::default(), |t, p| t.plus(&p.counters));
                assert_eq!(sum, s.upto.delta_since(&reported));
                reported = s.upto;
                a.committed();
            }
        }
    }
}
