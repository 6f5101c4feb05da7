//! `outflow.v1.Feed`: Follow, the applied batches from a position on (see `feed.proto`).
//!
//! Each follower has a task that reads the feed after its cursor and sends what it finds,
//! waiting on the feed's newest position when it has everything. A follower slower than the
//! buffer falls out of it and is told so with a FeedGap naming the positions it missed; a
//! stream never ends on its own but when the collector stops (OK) or the follower goes.
use std::{collections::BTreeMap, net::IpAddr, pin::Pin, sync::Arc};

use outflow_proto::v1::{self, feed_event::Event, feed_server};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    error::ApiError,
    feed::{Feed, FeedBatch, Read},
    keys::{Group, Key},
    metrics::Metrics,
    model::ValidationError,
    window::Totals,
};

/// Batches a follower's task takes from the feed at a time.
const READ_MAX: usize = 64;
/// Events queued for one follower's connection at most (then its task waits).
const QUEUE: usize = 16;
/// Most `hosts` in a FollowRequest.
pub const MAX_HOSTS: usize = 1024;

/// What a follower asked to see of each batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The groups whose totals are sent.
    pub groups: Vec<Group>,
    pub deltas: bool,
    /// Only batches of these hosts (empty: all).
    pub hosts: Vec<String>,
    pub min_response_bytes: u64,
}

impl Filter {
    /// The follower's filter, checked.
    pub fn of(r: &v1::FollowRequest) -> Result<Self, ValidationError> {
        let mut groups = Vec::new();
        for g in &r.groups {
            let g = v1::GroupBy::try_from(*g)
                .map_err(|_| ValidationError::new("groups", format!("unknown group {g}")))
                .and_then(Group::try_from)?;
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        if groups.is_empty() {
            groups = vec![Group::ClientAddress, Group::ClientPrefix, Group::ClientId];
        }
        if r.hosts.len() > MAX_HOSTS {
            return Err(ValidationError::new(
                "hosts",
                format!("at most {MAX_HOSTS} (got {})", r.hosts.len()),
            ));
        }
        Ok(Self {
            groups,
            deltas: r.include_deltas,
            hosts: r.hosts.clone(),
            min_response_bytes: r.min_response_bytes,
        })
    }

    fn wants_host(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }

    /// What the follower sees of a batch, or `None` if not of its hosts.
    pub fn apply(&self, run_id: u64, position: u64, b: &FeedBatch) -> Option<v1::AppliedBatch> {
        if !self.wants_host(&b.host) {
            return None;
        }
        let wants = |g| self.groups.contains(&g);
        // An address can be a direct and a proxied client, or a direct client and a relay,
        // in one batch: its group totals are the sums.
        let mut addresses: BTreeMap<(i32, IpAddr), Totals> = BTreeMap::new();
        let mut totals = Vec::new();
        let mut push = |group: Group, key: String, t: &Totals| {
            totals.push(v1::KeyTotals {
                group: v1::GroupBy::from(group).into(),
                key,
                response_bytes: t.response_bytes,
                request_bytes: t.request_bytes,
                connections_closed: t.connections_closed,
            });
        };
        for (key, t) in &b.totals {
            let mut address = |group: Group, a: IpAddr| {
                if wants(group) {
                    let g = i32::from(v1::GroupBy::from(group));
                    addresses.entry((g, a)).or_default().add(t);
                }
            };
            match key {
                Key::Direct(a) => {
                    address(Group::ClientAddress, *a);
                    address(Group::Peer, *a);
                }
                Key::Proxied(a) => address(Group::ClientAddress, *a),
                Key::Relayed(a) => address(Group::Peer, *a),
                Key::Prefix(p) if wants(Group::ClientPrefix) => {
                    push(Group::ClientPrefix, p.to_string(), t);
                }
                Key::Host(_) if wants(Group::Host) => push(Group::Host, b.host.to_string(), t),
                Key::Workload(w) if wants(Group::Workload) => {
                    push(
                        Group::Workload,
                        format!("{}/{}/{}", b.host, w.cgroup, w.comm),
                        t,
                    );
                }
                Key::ClientId(id) if wants(Group::ClientId) => {
                    push(Group::ClientId, id.to_string(), t);
                }
                _ => {}
            }
        }
        for ((g, a), t) in &addresses {
            totals.push(v1::KeyTotals {
                group: *g,
                key: a.to_string(),
                response_bytes: t.response_bytes,
                request_bytes: t.request_bytes,
                connections_closed: t.connections_closed,
            });
        }
        totals.retain(|t| t.response_bytes >= self.min_response_bytes);
        totals.sort_by(|a, b| (a.group, &a.key).cmp(&(b.group, &b.key)));
        Some(v1::AppliedBatch {
            run_id,
            position,
            agent_id: b.agent.agent_id.to_string(),
            epoch: b.agent.epoch,
            seq: b.seq,
            host: b.host.to_string(),
            start_ms: b.start_ms,
            end_ms: b.end_ms,
            totals,
            deltas: if self.deltas {
                b.deltas.clone()
            } else {
                Vec::new()
            },
        })
    }
}

/// The Feed service.
#[derive(Debug, Clone)]
pub struct FeedService {
    feed: Arc<Feed>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl FeedService {
    /// Follow streams end (OK) when `shutdown` is cancelled.
    pub fn new(feed: Arc<Feed>, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        Self {
            feed,
            metrics,
            shutdown,
        }
    }

    /// Where the follower starts: the position it has everything up to, and the event to
    /// send first (a gap of a previous run).
    fn start(&self, r: &v1::FollowRequest) -> Result<(u64, Option<v1::FeedGap>), Status> {
        let run = self.feed.run_id();
        if r.run_id == run {
            return Ok((r.after, None));
        }
        if r.run_id != 0 {
            // Every position of this run, from 1: what was dropped of them is a gap too.
            let gap = v1::FeedGap {
                run_id: r.run_id,
                from_position: 0,
                to_position: 0,
                reason: format!(
                    "the collector restarted: run {:x} is gone, so are the batches it applied after position {}; following run {run:x} from its first position",
                    r.run_id, r.after
                ),
            };
            return Ok((0, Some(gap)));
        }
        let start = v1::FollowStart::try_from(r.start).map_err(|_| {
            Status::from(ApiError::from(ValidationError::new(
                "start",
                format!("unknown FollowStart {}", r.start),
            )))
        })?;
        Ok(match start {
            v1::FollowStart::Oldest => (self.feed.oldest() - 1, None),
            v1::FollowStart::Newest | v1::FollowStart::Unspecified => (self.feed.newest(), None),
        })
    }
}

/// Counts a follower in `feed_followers` while it lives.
struct Following(Arc<Metrics>);

impl Following {
    fn new(m: &Arc<Metrics>) -> Self {
        m.feed_followers.inc();
        Self(m.clone())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.0.feed_followers.dec();
    }
}

type FeedStream = Pin<Box<dyn Stream<Item = Result<v1::FeedEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl feed_server::Feed for FeedService {
    type FollowStream = FeedStream;

    async fn follow(
        &self,
        request: Request<v1::FollowRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let r = request.into_inner();
        if !self.feed.enabled() {
            return Err(Status::failed_precondition(
                "this collector holds no feed (feed.buffer_entries = 0): set it above 0",
            ));
        }
        if r.include_deltas && !self.feed.keeps_deltas() {
            return Err(Status::failed_precondition(
                "include_deltas: this collector does not keep deltas; set feed.deltas = true in its config",
            ));
        }
        let filter = Filter::of(&r).map_err(|e| Status::from(ApiError::from(e)))?;
        let (mut cursor, first) = self.start(&r)?;
        if let Read::Beyond { newest } = self.feed.read(cursor, 0) {
            return Err(Status::from(ApiError::from(ValidationError::new(
                "after",
                format!("position {cursor} is beyond the newest of this run ({newest})"),
            ))));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let feed = self.feed.clone();
        let metrics = self.metrics.clone();
        let run_id = feed.run_id();
        let following = Following::new(&metrics);
        tokio::spawn(self.shutdown.clone().run_until_cancelled_owned(async move {
            let _following = following;
            let event = |e| Ok(v1::FeedEvent { event: Some(e) });
            if let Some(gap) = first
                && tx.send(event(Event::Gap(gap))).await.is_err()
            {
                return;
            }
            let mut newest = feed.subscribe();
            loop {
                newest.borrow_and_update();
                match feed.read(cursor, READ_MAX) {
                    Read::Gap { from, to } => {
                        let (held, entries) = feed.held();
                        let gap = v1::FeedGap {
                            run_id,
                            from_position: from,
                            to_position: to,
                            reason: format!(
                                "not held any more: the buffer holds the newest {held} batches ({entries} entries, feed.buffer_entries)"
                            ),
                        };
                        if tx.send(event(Event::Gap(gap))).await.is_err() {
                            return;
                        }
                        metrics.feed_gap_positions.inc_by(to - from + 1);
                        cursor = to;
                    }
                    Read::Batches(held) if held.is_empty() => {
                        tokio::select! {
                            r = newest.changed() => if r.is_err() { return },
                            // The follower went while nothing was new.
                            () = tx.closed() => return,
                        }
                    }
                    Read::Batches(held) => {
                        for h in held {
                            cursor = h.position;
                            if let Some(b) = filter.apply(run_id, h.position, &h.batch) {
                                if tx.send(event(Event::Batch(b))).await.is_err() {
                                    return;
                                }
                                metrics.feed_sent_batches.inc();
                            }
                        }
                    }
                    // Positions only grow: the cursor was checked against the newest.
                    Read::Beyond { .. } => return,
                }
            }
        }));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{keys::Prefix, model::AgentKey};

    fn t(response_bytes: u64) -> Totals {
        Totals {
            response_bytes,
            request_bytes: 1,
            connections_closed: 0,
        }
    }

    #[test]
    fn a_batch_as_each_filter_sees_it() {
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let g: IpAddr = "10.0.0.1".parse().unwrap();
        let b = FeedBatch {
            agent: AgentKey {
                agent_id: "agent-1".into(),
                epoch: 9,
            },
            seq: 3,
            host: "gpu-1".into(),
            start_ms: 1000,
            end_ms: 2000,
            totals: vec![
                (Key::Direct(a), t(100)),
                (Key::Proxied(a), t(50)),
                (Key::Relayed(g), t(50)),
                (Key::Prefix(Prefix::of(a)), t(150)),
                (Key::ClientId("h:1".into()), t(5)),
            ],
            deltas: Vec::new(),
        };
        let all = Filter::of(&v1::FollowRequest::default()).unwrap();
        let out = all.apply(7, 42, &b).unwrap();
        assert_eq!(
            (out.run_id, out.position, out.seq, out.epoch),
            (7, 42, 3, 9)
        );
        let keys: Vec<_> = out
            .totals
            .iter()
            .map(|k| (k.group, k.key.as_str(), k.response_bytes))
            .collect();
        assert_eq!(
            keys,
            [
                (1, "203.0.113.7", 150),
                (2, "203.0.113.0/24", 150),
                (5, "h:1", 5)
            ]
        );
        let peers = Filter::of(&v1::FollowRequest {
            groups: vec![v1::GroupBy::Peer.into()],
            min_response_bytes: 60,
            ..Default::default()
        })
        .unwrap();
        let out = peers.apply(7, 42, &b).unwrap();
        assert_eq!(out.totals.len(), 1);
        assert_eq!(
            (out.totals[0].key.as_str(), out.totals[0].response_bytes),
            ("203.0.113.7", 100)
        );
        let other_host = Filter::of(&v1::FollowRequest {
            hosts: vec!["gpu-2".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(other_host.apply(7, 42, &b).is_none());
        assert!(
            Filter::of(&v1::FollowRequest {
                groups: vec![99],
                ..Default::default()
            })
            .is_err()
        );
    }
}
