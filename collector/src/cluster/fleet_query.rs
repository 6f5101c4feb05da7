//! Query and Alerts for the whole cluster, answered by any node (ingest or aggregator): the
//! call is fanned out to the live aggregators (`outflow.v1.AggregatorQuery`, listed with their
//! addresses in the `<stream>-aggregators` bucket) and their answers merged exactly.
//!
//! - Windows end at the newest batch time of all the aggregators, and every aggregator sums
//!   its keys over that same window.
//! - The answer covers every partition once: each aggregator says which partitions its store
//!   holds and which of them it is still replaying; a partition held by none (an aggregator
//!   lost, not yet replaced), by two (a move under way) or still being replayed (a rebuild, a
//!   move, a restart: its store lacks parts of it) makes the call fail with UNAVAILABLE and
//!   says which, rather than answer short or twice.
//! - A key's bytes may be spread over aggregators (an address seen with and without client
//!   ids, a host, a workload), so TopTalkers is the three-round exact top-k of Cao and Wang's
//!   TPUT ([`merge`]): each aggregator's top k gives a lower bound of the k-th total, every key
//!   that could reach it is fetched, and its exact totals and hosts (a union of names) decide.
//! - Alerts are each aggregator's (it detects on its partitions): List merges them, Watch
//!   merges their streams, following aggregators as they come and go.
//!
//! The caller's `authorization` header goes with every fanned-out call: the aggregators check
//! it as they check their own callers.
use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use async_nats::jetstream;
use log::warn;
use outflow_proto::v1::{
    self, aggregator_query_client::AggregatorQueryClient, alerts_server::Alerts,
    query_server::Query,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Response, Status,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{config::ClusterConfig, membership::Directory};
use crate::{
    aggregate::ClientQuery,
    alerts_service::{AlertStream, DEFAULT_LIMIT as DEFAULT_ALERTS},
    config::TlsConfig,
    keys::Group,
    query::TopRequest,
    window::Window,
};

pub mod merge;

/// The largest answer taken from one aggregator (a round of TopTalkers may list many keys).
const MAX_ANSWER_BYTES: usize = 256 << 20;
/// How often a Watch looks for aggregators that joined or came back.
const WATCH_REFRESH: Duration = Duration::from_secs(2);

/// Fan-out could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Connect(#[from] super::nats::NatsConnectError),
    #[error("cannot read {path}: {error}")]
    Read {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// A live aggregator.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    name: String,
    addr: String,
}

/// The caller's credentials, passed on.
type Auth = Option<AsciiMetadataValue>;

fn auth_of(m: &MetadataMap) -> Auth {
    m.get("authorization").cloned()
}

/// What the cluster's aggregators answer together.
#[derive(Debug)]
pub struct Fleet {
    js: jetstream::Context,
    stream: String,
    partitions: u32,
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
    directory: tokio::sync::Mutex<Option<Directory>>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Fleet {
    /// Connects to the NATS servers of `cfg` (in the background: calls fail with UNAVAILABLE
    /// until it is connected). With `tls.cert` set, aggregators are called over TLS.
    pub async fn connect(cfg: &ClusterConfig, tls: &TlsConfig) -> Result<Fleet, FleetError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|error| FleetError::Read {
                path: path.to_owned(),
                error,
            })
        };
        let tls = match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                let mut t =
                    ClientTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
                t = match &cfg.peer_ca {
                    Some(ca) => t.ca_certificate(Certificate::from_pem(read(ca)?)),
                    None => t.with_native_roots(),
                };
                Some(t)
            }
            _ => None,
        };
        let client = cfg.nats().connect().await?;
        Ok(Fleet {
            js: jetstream::new(client),
            stream: cfg.stream.clone(),
            partitions: cfg.partitions,
            tls,
            timeout: cfg.query_timeout,
            directory: tokio::sync::Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
        })
    }

    /// The live aggregators that said where they are reached.
    async fn peers(&self) -> Result<Vec<Peer>, Status> {
        let dir = {
            let mut d = self.directory.lock().await;
            match &*d {
                Some(dir) => dir.clone(),
                None => {
                    let dir = Directory::open(&self.js, &self.stream).await.map_err(|e| {
                        Status::unavailable(format!(
                            "no aggregator has joined the cluster yet ({e}): start one (see docs/cluster-runbook.md)"
                        ))
                    })?;
                    *d = Some(dir.clone());
                    dir
                }
            }
        };
        let live = dir.live().await.map_err(|e| {
            Status::unavailable(format!("cannot read the live aggregators from NATS: {e}"))
        })?;
        let mut peers = Vec::new();
        for (name, entry) in live {
            match entry.address {
                Some(addr) => peers.push(Peer { name, addr }),
                None => warn!(
                    "aggregator {name} did not say where it is reached (an older version?): left out of queries"
                ),
            }
        }
        if peers.is_empty() {
            return Err(Status::unavailable(
                "no aggregator is live: nothing holds the fleet's totals; start one (see docs/cluster-runbook.md)",
            ));
        }
        // Connections to aggregators that are gone are dropped.
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|addr, _| peers.iter().any(|p| &p.addr == addr));
        Ok(peers)
    }

    fn client(&self, peer: &Peer) -> Result<AggregatorQueryClient<Channel>, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let channel = match channels.get(&peer.addr) {
            Some(c) => c.clone(),
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let bad = |e: tonic::transport::Error| {
                    Status::unavailable(format!(
                        "aggregator {} advertises {:?}: {e}",
                        peer.name, peer.addr
                    ))
                };
                let mut ep = Endpoint::from_shared(format!("{scheme}://{}", peer.addr))
                    .map_err(bad)?
                    .connect_timeout(self.timeout)
                    .tcp_nodelay(true);
                if let Some(tls) = &self.tls {
                    ep = ep.tls_config(tls.clone()).map_err(bad)?;
                }
                let c = ep.connect_lazy();
                channels.insert(peer.addr.clone(), c.clone());
                c
            }
        };
        Ok(AggregatorQueryClient::new(channel).max_decoding_message_size(MAX_ANSWER_BYTES))
    }

    fn request<T>(&self, msg: T, auth: &Auth, unary: bool) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.clone());
        }
        if unary {
            r.set_timeout(self.timeout);
        }
        r
    }

    /// `call` on every peer at once; the first failure fails it all.
    async fn each<R, F, Fut>(&self, peers: &[Peer], call: F) -> Result<Vec<R>, Status>
    where
        F: Fn(AggregatorQueryClient<Channel>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let calls = peers.iter().map(|p| {
            let client = self.client(p);
            let call = &call;
            async move {
                call(client?)
                    .await
                    .map(Response::into_inner)
                    .map_err(|s| peer_error(p, &s))
            }
        });
        futures_util::future::try_join_all(calls).await
    }

    /// The live aggregators, checked to hold every partition once, and the end of the
    /// cluster's windows.
    async fn view(&self, auth: &Auth) -> Result<(Vec<Peer>, u64), Status> {
        let peers = self.peers().await?;
        let ends = self
            .each(&peers, |mut c| {
                let r = self.request(v1::EndRequest {}, auth, true);
                async move { c.end(r).await }
            })
            .await?;
        let held: Vec<merge::Held<'_>> = peers
            .iter()
            .zip(&ends)
            .map(|(p, e)| {
                (
                    p.name.as_str(),
                    e.partitions.as_slice(),
                    e.replaying.as_slice(),
                )
            })
            .collect();
        merge::coverage(self.partitions, &held).map_err(Status::unavailable)?;
        Ok((peers, ends.iter().map(|e| e.end_ms).max().unwrap_or(0)))
    }

    /// Every aggregator's totals of `keys`, merged.
    async fn keys(
        &self,
        peers: &[Peer],
        group: Group,
        end_ms: u64,
        keys: Vec<String>,
        auth: &Auth,
    ) -> Result<BTreeMap<String, merge::KeyTotals>, Status> {
        let ask = v1::PartialKeysRequest {
            group_by: v1::GroupBy::from(group) as i32,
            end_ms,
            keys,
        };
        let answers = self
            .each(peers, |mut c| {
                let r = self.request(ask.clone(), auth, true);
                async move { c.keys(r).await }
            })
            .await?;
        Ok(merge::key_totals(answers))
    }

    /// TopTalkers over the cluster (see the module's doc).
    pub async fn top_talkers(
        &self,
        r: TopRequest,
        auth: &Auth,
    ) -> Result<v1::TopTalkersResponse, Status> {
        let (peers, end_ms) = self.view(auth).await?;
        let ask = |limit: u32, min_response_bytes: u64| v1::PartialTopRequest {
            group_by: v1::GroupBy::from(r.group) as i32,
            window: v1::Window::from(r.window) as i32,
            end_ms,
            limit,
            min_response_bytes,
        };
        let top = |limit: u32, min: u64| {
            self.each(&peers, move |mut c| {
                let q = self.request(ask(limit, min), auth, true);
                async move { c.top(q).await }
            })
        };
        let limit = u32::try_from(r.limit).unwrap_or(u32::MAX);
        let first = top(limit, 0).await?;
        let tau = merge::threshold(&first, r.limit);
        let aggregators = u64::try_from(peers.len()).unwrap_or(u64::MAX);
        let min = tau.div_ceil(aggregators);
        let second = top(0, min).await?;
        let candidates = merge::candidates(&second, aggregators, min, r.limit);
        let totals = if candidates.is_empty() {
            BTreeMap::new()
        } else {
            self.keys(&peers, r.group, end_ms, candidates, auth).await?
        };
        Ok(v1::TopTalkersResponse {
            talkers: merge::rank(&totals, r.window, end_ms, r.limit),
            window_end_ms: end_ms,
        })
    }

    /// ClientStats over the cluster.
    pub async fn client_stats(
        &self,
        client: &ClientQuery,
        auth: &Auth,
    ) -> Result<v1::ClientStatsResponse, Status> {
        let (group, key) = match client {
            ClientQuery::Address(a) => (Group::ClientAddress, a.to_string()),
            ClientQuery::Prefix(p) => (Group::ClientPrefix, p.to_string()),
            ClientQuery::Id(id) => (Group::ClientId, id.clone()),
        };
        let (peers, end_ms) = self.view(auth).await?;
        let totals = self.keys(&peers, group, end_ms, vec![key], auth).await?;
        let stats = totals
            .values()
            .next()
            .map(|t| Window::ALL.map(|w| t.stats(w, end_ms)))
            .filter(|s| s[Window::H24.index()].hosts > 0)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no traffic of {} in the last 24 h",
                    client.describe()
                ))
            })?;
        Ok(v1::ClientStatsResponse {
            client: client.to_string(),
            windows: Window::ALL
                .into_iter()
                .zip(stats)
                .map(|(w, s)| v1::WindowStats {
                    window: v1::Window::from(w) as i32,
                    response_bytes: s.totals.response_bytes,
                    request_bytes: s.totals.request_bytes,
                    connections_closed: s.totals.connections_closed,
                    hosts: s.hosts,
                })
                .collect(),
        })
    }

    /// Alerts.List over the cluster.
    pub async fn list_alerts(
        &self,
        r: v1::ListAlertsRequest,
        auth: &Auth,
    ) -> Result<v1::ListAlertsResponse, Status> {
        let peers = self.peers().await?;
        let answers = self
            .each(&peers, |mut c| {
                let q = self.request(r, auth, true);
                async move { c.list_alerts(q).await }
            })
            .await?;
        let limit = if r.limit == 0 {
            DEFAULT_ALERTS
        } else {
            r.limit
        };
        Ok(v1::ListAlertsResponse {
            alerts: merge::alerts(
                answers.into_iter().flat_map(|a| a.alerts),
                usize::try_from(limit).unwrap_or(usize::MAX),
            ),
        })
    }

    /// Alerts.Watch over the cluster: every aggregator's stream, merged; an aggregator that
    /// joins (or comes back) is followed from its open alerts on.
    pub fn watch_alerts(
        self: &Arc<Self>,
        include_service: bool,
        auth: Auth,
        shutdown: CancellationToken,
    ) -> AlertStream {
        let (tx, rx) = mpsc::channel(64);
        let fleet = self.clone();
        tokio::spawn(async move {
            let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
            loop {
                match fleet.peers().await {
                    Ok(peers) => {
                        running.retain(|addr, task| {
                            let keep = peers.iter().any(|p| &p.addr == addr) && !task.is_finished();
                            if !keep {
                                task.abort();
                            }
                            keep
                        });
                        for p in peers {
                            if running.contains_key(&p.addr) {
                                continue;
                            }
                            let task = tokio::spawn(follow(
                                fleet.clone(),
                                p.clone(),
                                include_service,
                                auth.clone(),
                                tx.clone(),
                            ));
                            running.insert(p.addr, task);
                        }
                    }
                    Err(e) => log::debug!("alerts watch: {}", e.message()),
                }
                tokio::select! {
                    () = tx.closed() => break,
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(WATCH_REFRESH) => {}
                }
            }
            for t in running.into_values() {
                t.abort();
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// Passes one aggregator's alerts on until its stream ends (the watch starts it again while
/// the aggregator is live). A refused call (credentials) ends the caller's stream.
async fn follow(
    fleet: Arc<Fleet>,
    peer: Peer,
    include_service: bool,
    auth: Auth,
    tx: mpsc::Sender<Result<v1::Alert, Status>>,
) {
    let Ok(mut client) = fleet.client(&peer) else {
        return;
    };
    let r = fleet.request(v1::WatchAlertsRequest { include_service }, &auth, false);
    let mut stream = match client.watch_alerts(r).await {
        Ok(s) => s.into_inner(),
        Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
            let _ = tx.send(Err(peer_error(&peer, &s))).await;
            return;
        }
        Err(s) => {
            log::debug!("alerts watch: {}", peer_error(&peer, &s).message());
            return;
        }
    };
    while let Ok(Some(a)) = stream.message().await {
        if tx.send(Ok(a)).await.is_err() {
            return;
        }
    }
}

/// A peer's failure as the caller sees it: refusals keep their code, the rest is UNAVAILABLE
/// (the cluster's answer cannot be given now); the message names the aggregator.
fn peer_error(peer: &Peer, s: &Status) -> Status {
    let msg = format!("aggregator {} at {}: {}", peer.name, peer.addr, s.message());
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument => {
            Status::new(s.code(), msg)
        }
        _ => Status::unavailable(msg),
    }
}

/// `outflow.v1.Query` for the whole cluster.
#[derive(Debug, Clone)]
pub struct FleetQueryService {
    fleet: Arc<Fleet>,
}

impl FleetQueryService {
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet }
    }
}

#[tonic::async_trait]
impl Query for FleetQueryService {
    async fn top_talkers(
        &self,
        request: Request<v1::TopTalkersRequest>,
    ) -> Result<Response<v1::TopTalkersResponse>, Status> {
        let auth = auth_of(request.metadata());
        let r = TopRequest::try_from(request.into_inner()).map_err(crate::error::ApiError::from)?;
        self.fleet.top_talkers(r, &auth).await.map(Response::new)
    }

    async fn client_stats(
        &self,
        request: Request<v1::ClientStatsRequest>,
    ) -> Result<Response<v1::ClientStatsResponse>, Status> {
        let auth = auth_of(request.metadata());
        let client = ClientQuery::parse(&request.into_inner().client)
            .map_err(crate::error::ApiError::from)?;
        self.fleet
            .client_stats(&client, &auth)
            .await
            .map(Response::new)
    }
}

/// `outflow.v1.Alerts` for the whole cluster.
#[derive(Debug, Clone)]
pub struct FleetAlertsService {
    fleet: Arc<Fleet>,
    shutdown: CancellationToken,
}

impl FleetAlertsService {
    /// Watch streams end (OK) when `shutdown` is cancelled.
    pub fn new(fleet: Arc<Fleet>, shutdown: CancellationToken) -> Self {
        Self { fleet, shutdown }
    }
}

#[tonic::async_trait]
impl Alerts for FleetAlertsService {
    async fn list(
        &self,
        request: Request<v1::ListAlertsRequest>,
    ) -> Result<Response<v1::ListAlertsResponse>, Status> {
        let auth = auth_of(request.metadata());
        self.fleet
            .list_alerts(request.into_inner(), &auth)
            .await
            .map(Response::new)
    }

    type WatchStream = AlertStream;

    async fn watch(
        &self,
        request: Request<v1::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let auth = auth_of(request.metadata());
        let include_service = request.into_inner().include_service;
        Ok(Response::new(self.fleet.watch_alerts(
            include_service,
            auth,
            self.shutdown.clone(),
        )))
    }
}
