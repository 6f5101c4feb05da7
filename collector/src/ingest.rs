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
    sync::Arc,
    task::{Context, Poll},
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
    codec::AgentCodec,
    collector::{Collector, Pending},
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
}

impl IngestService {
    /// The service over `collector`; streams end when `shutdown` is cancelled.
    pub fn new(
        collector: Arc<Collector>,
        shutdown: CancellationToken,
        max_message_bytes: usize,
        max_deltas: usize,
    ) -> Self {
        Self {
            collector,
            shutdown,
            max_message_bytes,
            max_deltas,
        }
    }

    fn stream(
        &self,
        request: tonic::Request<Streaming<AgentMessage>>,
    ) -> ReceiverStream<Result<CollectorMessage, Status>> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "?".to_owned(), |a| a.to_string());
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let (ptx, prx) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(ack(prx, tx, self.collector.clone()));
        tokio::spawn(read(
            self.collector.clone(),
            self.shutdown.clone(),
            request.into_inner(),
            ptx,
            peer,
        ));
        ReceiverStream::new(rx)
    }
}

/// Takes the stream's messages in order until it ends, fails, or the collector shuts down.
async fn read(
    collector: Arc<Collector>,
    shutdown: CancellationToken,
    mut inbound: Streaming<AgentMessage>,
    pending: mpsc::Sender<Result<Pending, ApiError>>,
    peer: String,
) {
    let mut session = collector.session();
    let end = loop {
        let msg = tokio::select! {
            biased;
            () = shutdown.cancelled() => break Some(ApiError::ShuttingDown),
            () = pending.closed() => break None,
            m = inbound.message() => m,
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
        Box::pin(async move { Ok(tonic::Response::new(stream)) })
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
