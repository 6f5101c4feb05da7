//! `outflow.v1.Alerts`: List, and Watch (every open alert first, then each change).
//!
//! Watch subscribes to the hub's broadcast BEFORE it takes the snapshot of open alerts, so no
//! change is missed (one may arrive twice: alerts are idempotent by id). A stream that falls
//! more than [`crate::alerts::WATCH_BUFFER`] changes behind is resynchronized: it gets every
//! open alert again, then the changes from there on. Streams end when the collector stops.
use std::{pin::Pin, sync::Arc};

use log::warn;
use outflow_proto::v1::{self, alerts_server::Alerts};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{alerts::AlertHub, error::ApiError};

/// Alerts per List answer when the request says 0.
pub const DEFAULT_LIMIT: u32 = 1000;

/// The Alerts service.
#[derive(Debug, Clone)]
pub struct AlertsService {
    hub: Arc<AlertHub>,
    shutdown: CancellationToken,
}

impl AlertsService {
    /// Watch streams end (OK) when `shutdown` is cancelled.
    pub fn new(hub: Arc<AlertHub>, shutdown: CancellationToken) -> Self {
        Self { hub, shutdown }
    }

    /// List without the transport.
    pub(crate) fn do_list(
        &self,
        r: v1::ListAlertsRequest,
    ) -> Result<v1::ListAlertsResponse, ApiError> {
        let limit = if r.limit == 0 { DEFAULT_LIMIT } else { r.limit };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(v1::ListAlertsResponse {
            alerts: self.hub.list(r.open_only, limit, r.include_service),
        })
    }
}

pub(crate) type AlertStream =
    Pin<Box<dyn Stream<Item = Result<v1::Alert, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Alerts for AlertsService {
    async fn list(
        &self,
        request: Request<v1::ListAlertsRequest>,
    ) -> Result<Response<v1::ListAlertsResponse>, Status> {
        Ok(Response::new(self.do_list(request.into_inner())?))
    }

    type WatchStream = AlertStream;

    async fn watch(
        &self,
        request: Request<v1::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(
            self.stream(request.into_inner().include_service),
        ))
    }
}

impl AlertsService {
    /// Watch without the transport: every open alert, then each change.
    pub(crate) fn stream(&self, include_service: bool) -> AlertStream {
        let hub = self.hub.clone();
        let mut changes = hub.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(shutdown.run_until_cancelled_owned(async move {
            let replay = |hub: &AlertHub| hub.list(true, usize::MAX, include_service);
            for a in replay(&hub) {
                if tx.send(Ok(a)).await.is_err() {
                    return;
                }
            }
            loop {
                match changes.recv().await {
                    Ok(a) if !AlertHub::wanted(&a, include_service) => {}
                    Ok(a) => {
                        if tx.send(Ok(a)).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        warn!("alerts watch: {n} changes behind, resending open alerts");
                        for a in replay(&hub) {
                            if tx.send(Ok(a)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        }));
        Box::pin(ReceiverStream::new(rx))
    }
}
