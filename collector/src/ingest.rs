//! `outflow.v1.Ingest`: the gRPC service agents stream to.
//!
//! The service is written out by hand rather than taken from the generated `IngestServer` so
//! that it decodes with [`AgentCodec`], which bounds repeated fields before allocating them.
//!
//! Each stream runs two tasks: a reader that takes messages in order through a
//! [`Session`](crate::collector::Session) (validate, rate-limit, fold, queue for the writer),
//! and an acker that waits for each queued batch's commit in the same order and sends its Ack.
//! Up to [`IN_FLIGHT`] batches of a stream are in flight at once. An error ends the stream after the Acks of everything
//! before it; on shutdown the stream stops reading, acks what it queued, and ends with
//! UNAVAILABLE.
use std::{
    convert::Infallible,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use log::{debug, info};
use outflow_proto::v1::{AgentMessage, CollectorMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    Status, Streaming,
    codegen::{Body, BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, StreamingService},
};

use crate::{
    aggregate::Map,
    auth::BoundAgent,
    codec::AgentCodec,
    collector::{Collector, Pending, Session},
    config::LimitsConfig,
    error::ApiError,
};

/// Batches of one stream queued or being committed at once.
pub const IN_FLIGHT: usize = 16;

/// The Ingest service (a tower service for tonic's router).
#[derive(Debug, Clone)]
pub struct IngestService {
    collector: Arc<Collector>,
    shutdown: CancellationToken,
    max_message_bytes: usize,
    max_deltas: usize,
    hello_timeout: Duration,
    peers: Arc<PeerStreams>,
}

/// Ingest streams open per peer address, and the most allowed.
#[derive(Debug)]
struct PeerStreams {
    open: Mutex<Map<IpAddr, usize>>,
    max: usize,
}

/// One open stream of a peer: counted while it lives.
struct PeerSlot {
    peers: Arc<PeerStreams>,
    addr: IpAddr,
}

impl PeerStreams {
    /// A slot for a new stream of `addr`, or `None` if it has `max` open already.
    fn take(self: &Arc<Self>, addr: IpAddr) -> Option<PeerSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(addr).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            addr,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self
            .peers
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

impl IngestService {
    /// The service over `collector` with the stream limits of `limits`; streams end when
    /// `shutdown` is cancelled.
    pub fn new(
        collector: Arc<Collector>,
        shutdown: CancellationToken,
        limits: &LimitsConfig,
    ) -> Self {
        Self {
            collector,
            shutdown,
            max_message_bytes: limits.max_message_bytes,
            max_deltas: limits.max_deltas_per_batch,
            hello_timeout: limits.hello_timeout,
            peers: Arc::new(PeerStreams {
                open: Mutex::new(Map::default()),
                max: limits.max_streams_per_peer,
            }),
        }
    }

    fn stream(
        &self,
        request: tonic::Request<Streaming<AgentMessage>>,
    ) -> Result<ReceiverStream<Result<CollectorMessage, Status>>, Status> {
        let remote = request.remote_addr();
        let peer = remote.map_or_else(|| "?".to_owned(), |a| a.to_string());
        let slot = match remote {
            Some(a) => match self.peers.take(a.ip().to_canonical()) {
                Some(slot) => Some(slot),
                None => {
                    let e = ApiError::TooManyStreams(format!(
                        "{} Ingest streams from {} are open already (limits.max_streams_per_peer)",
                        self.peers.max,
                        a.ip()
                    ));
                    info!("peer {peer}: refused: {e}");
                    if let Some(reason) = e.reject_reason() {
                        self.collector.metrics().reject(reason);
                    }
                    return Err(e.into());
                }
            },
            None => None,
        };
        // An agent token or a client certificate (auth) binds the stream to its agent id.
        let bound = request
            .extensions()
            .get::<Vec<BoundAgent>>()
            .cloned()
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let (ptx, prx) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(ack(prx, tx, self.collector.clone()));
        let session = self.collector.session_for(bound);
        let stream = Inbound {
            messages: request.into_inner(),
            hello_timeout: self.hello_timeout,
            _slot: slot,
        };
        tokio::spawn(read(session, self.shutdown.clone(), stream, ptx, peer));
        Ok(ReceiverStream::new(rx))
    }
}

/// A stream's messages, what the Hello must come within, and the stream's peer slot.
struct Inbound {
    messages: Streaming<AgentMessage>,
    hello_timeout: Duration,
    _slot: Option<PeerSlot>,
}

/// Takes the stream's messages in order until it ends, fails, or the collector shuts down.
async fn read(
    mut session: Session,
    shutdown: CancellationToken,
    mut inbound: Inbound,
    pending: mpsc::Sender<Result<Pending, ApiError>>,
    peer: String,
) {
    let hello_by = tokio::time::Instant::now() + inbound.hello_timeout;
    let end = loop {
        let msg = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Some(ApiError::ShuttingDown),
            () = pending.closed() => break None,
            () = tokio::time::sleep_until(hello_by), if session.agent().is_none() => {
                break Some(ApiError::OutOfOrder(
                    "no Hello within limits.hello_timeout: a stream must start with a Hello",
                ));
            }
            m = inbound.messages.message() => m,
        };
        let step = match msg {
            Ok(Some(m)) => session.begin(m).await,
            Ok(None) => break None,
            Err(status) => Err(ApiError::from_stream(status)),
        };
        match step {
            Ok(p) => {
                if pending.send(Ok(p)).await.is_err() {
                    break None;
                }
            }
            Err(e) => break Some(e),
        }
    };
    let who = session
        .agent()
        .map_or_else(|| format!("peer {peer}"), |a| format!("agent {a} ({peer})"));
    match end {
        None => debug!("{who}: stream ended"),
        Some(e) => {
            match &e {
                ApiError::Transport(_) | ApiError::ShuttingDown => debug!("{who}: {e}"),
                _ => info!("{who}: refused: {e}"),
            }
            let _ = pending.send(Err(e)).await;
        }
    }
}

/// Sends the answers in order; an error ends the stream.
async fn ack(
    mut pending: mpsc::Receiver<Result<Pending, ApiError>>,
    out: mpsc::Sender<Result<CollectorMessage, Status>>,
    collector: Arc<Collector>,
) {
    while let Some(item) = pending.recv().await {
        let answer = match item {
            Ok(p) => p.finish().await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(m) => {
                if out.send(Ok(m)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if let Some(reason) = e.reject_reason() {
                    collector.metrics().reject(reason);
                }
                let _ = out.send(Err(Status::from(e))).await;
                return;
            }
        }
    }
}

struct StreamSvc(IngestService);

impl StreamingService<AgentMessage> for StreamSvc {
    type Response = CollectorMessage;
    type ResponseStream = ReceiverStream<Result<CollectorMessage, Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<AgentMessage>>) -> Self::Future {
        let stream = self.0.stream(request);
        Box::pin(async move { Ok(tonic::Response::new(stream?)) })
    }
}

impl<B> Service<http::Request<B>> for IngestService
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/outflow.v1.Ingest/Stream" {
            return Box::pin(async {
                Ok(Status::unimplemented("no such method of outflow.v1.Ingest").into_http())
            });
        }
        let this = self.clone();
        Box::pin(async move {
            let codec = AgentCodec {
                max_deltas: this.max_deltas,
            };
            let mut grpc =
                Grpc::new(codec).apply_max_message_size_config(Some(this.max_message_bytes), None);
            Ok(grpc.streaming(StreamSvc(this), req).await)
        })
    }
}

impl NamedService for IngestService {
    const NAME: &'static str = "outflow.v1.Ingest";
}
