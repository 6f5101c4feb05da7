//! The simulator's side of the wire: one `outflow.v1.Ingest` stream per synthetic host over a
//! shared channel, and the Alerts client.
use std::time::Duration;

use outflow_proto::v1::{
    self, AgentMessage, CollectorMessage, agent_message::Msg, alerts_client::AlertsClient,
    collector_message, ingest_client::IngestClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Status, Streaming,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
    transport::{Channel, Endpoint},
};

use crate::SimError;

/// How long one answer (Welcome or Ack) may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Adds `authorization: Bearer <token>` when a token is set.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, SimError> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| SimError::Token)
            })
            .transpose()
            .map(Bearer)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// Connects to `url` (http:// only).
pub async fn connect(url: &str) -> Result<Channel, SimError> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| SimError::Url(url.to_owned()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    endpoint
        .connect()
        .await
        .map_err(|source| SimError::Connect {
            url: url.to_owned(),
            source,
        })
}

fn status(what: impl Into<String>, status: Status) -> SimError {
    SimError::Status {
        what: what.into(),
        status: Box::new(status),
    }
}

/// One synthetic agent's stream.
#[derive(Debug)]
pub struct AgentStream {
    name: String,
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<CollectorMessage>,
}

impl AgentStream {
    /// Opens the stream and exchanges Hello/Welcome; fails if the collector already applied
    /// batches of this (agent_id, epoch).
    pub async fn open(
        channel: Channel,
        bearer: Bearer,
        agent_id: &str,
        epoch: u64,
        hostname: &str,
    ) -> Result<AgentStream, SimError> {
        let (tx, rx) = mpsc::channel(64);
        let resp = IngestClient::with_interceptor(channel, bearer)
            .max_encoding_message_size(usize::MAX)
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| status(format!("{hostname}: open Ingest stream"), s))?;
        let mut a = AgentStream {
            name: hostname.to_owned(),
            tx,
            rx: resp.into_inner(),
        };
        a.send(Msg::Hello(v1::Hello {
            agent_id: agent_id.to_owned(),
            epoch,
            hostname: hostname.to_owned(),
            boot_id: format!("{epoch:032x}"),
            version: concat!("outflow-sim/", env!("CARGO_PKG_VERSION")).to_owned(),
            labels: [("role".to_owned(), "inference".to_owned())].into(),
        }))
        .await?;
        match a.next().await?.msg {
            Some(collector_message::Msg::Welcome(w)) if w.applied_seq == 0 => Ok(a),
            Some(collector_message::Msg::Welcome(w)) => Err(SimError::Protocol(format!(
                "{hostname}: the collector already applied seq {} of this epoch",
                w.applied_seq
            ))),
            other => Err(SimError::Protocol(format!(
                "{hostname}: want a Welcome, got {other:?}"
            ))),
        }
    }

    async fn send(&mut self, msg: Msg) -> Result<(), SimError> {
        if self.tx.send(AgentMessage { msg: Some(msg) }).await.is_ok() {
            return Ok(());
        }
        // The server ended the stream: its status comes from the response side.
        self.next().await?;
        Err(SimError::Protocol(format!(
            "{}: the collector closed the stream",
            self.name
        )))
    }

    async fn next(&mut self) -> Result<CollectorMessage, SimError> {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(SimError::Protocol(format!(
                "{}: the collector ended the stream",
                self.name
            ))),
            Ok(Err(s)) => Err(status(format!("{}: Ingest stream", self.name), s)),
            Err(_) => Err(SimError::Protocol(format!(
                "{}: no answer in {ANSWER_TIMEOUT:?}",
                self.name
            ))),
        }
    }

    /// Sends a batch (does not wait for its Ack).
    pub async fn send_batch(&mut self, batch: v1::Batch) -> Result<(), SimError> {
        self.send(Msg::Batch(batch)).await
    }

    /// Waits for the Ack of `seq`.
    pub async fn ack(&mut self, seq: u64) -> Result<(), SimError> {
        loop {
            match self.next().await?.msg {
                Some(collector_message::Msg::Ack(a)) if a.seq >= seq => return Ok(()),
                Some(collector_message::Msg::Ack(_)) => {}
                other => {
                    return Err(SimError::Protocol(format!(
                        "{}: want an Ack, got {other:?}",
                        self.name
                    )));
                }
            }
        }
    }

    /// Half-closes the stream and waits for the server to end it.
    pub async fn close(self) {
        let AgentStream { tx, mut rx, .. } = self;
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = rx.message().await {}
        })
        .await;
    }
}

/// Every alert the collector lists (open and resolved), or `Err(status)` as the collector
/// answered.
pub async fn list_alerts(channel: Channel, bearer: Bearer) -> Result<Vec<v1::Alert>, Status> {
    let mut c =
        AlertsClient::with_interceptor(channel, bearer).max_decoding_message_size(64 * 1024 * 1024);
    let r = c
        .list(v1::ListAlertsRequest {
            open_only: false,
            limit: 1000,
            include_service: true,
        })
        .await?;
    Ok(r.into_inner().alerts)
}
