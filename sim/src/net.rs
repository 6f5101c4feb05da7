//! The simulator's side of the wire: one fake agent ([`crate::ingest::IngestStream`]) per
//! synthetic host over a shared channel, and the Alerts client.
use std::time::Duration;

use outflow_proto::v1::{self, alerts_client::AlertsClient};
use tonic::{
    Status,
    transport::{Channel, Endpoint},
};

use crate::{
    SimError,
    ingest::{Bearer, IngestError, IngestStream, Options},
};

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

/// One synthetic agent's stream, its errors named by its host.
#[derive(Debug)]
pub struct AgentStream {
    host: String,
    stream: IngestStream,
    agent_id: String,
    epoch: u64,
    bearer: Bearer,
    /// Which of the collectors' channels the stream is on.
    at: usize,
}

/// Whether a failed stream is worth opening again (a node stopped, a connection cut, a
/// collector busy), not a refusal that would be the same again.
fn retryable(e: &IngestError) -> bool {
    use tonic::Code;
    match e.status() {
        Some(s) => !matches!(
            s.code(),
            Code::InvalidArgument
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::FailedPrecondition
                | Code::Unimplemented
                | Code::OutOfRange
        ),
        None => !matches!(e, IngestError::Token | IngestError::Unexpected { .. }),
    }
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
        let failed = |error| SimError::Ingest {
            host: hostname.to_owned(),
            error,
        };
        let (stream, welcome) = Self::hello(channel, bearer.clone(), agent_id, epoch, hostname)
            .await
            .map_err(failed)?;
        if welcome.applied_seq != 0 {
            return Err(SimError::Protocol(format!(
                "{hostname}: the collector already applied seq {} of this epoch",
                welcome.applied_seq
            )));
        }
        Ok(AgentStream {
            host: hostname.to_owned(),
            stream,
            agent_id: agent_id.to_owned(),
            epoch,
            bearer,
            at: 0,
        })
    }

    /// Opens the stream on the `at`-th of `channels` (the collectors an agent may use).
    pub async fn open_on(
        channels: &[Channel],
        at: usize,
        bearer: Bearer,
        agent_id: &str,
        epoch: u64,
        hostname: &str,
    ) -> Result<AgentStream, SimError> {
        let at = at % channels.len().max(1);
        let channel = channels
            .get(at)
            .cloned()
            .ok_or_else(|| SimError::Protocol("no collector to connect to".into()))?;
        let mut a = Self::open(channel, bearer, agent_id, epoch, hostname).await?;
        a.at = at;
        Ok(a)
    }

    async fn hello(
        channel: Channel,
        bearer: Bearer,
        agent_id: &str,
        epoch: u64,
        hostname: &str,
    ) -> Result<(IngestStream, v1::Welcome), IngestError> {
        let options = Options {
            bearer,
            ..Options::default()
        };
        let mut stream = IngestStream::open_with(channel, options).await?;
        let welcome = stream
            .hello(v1::Hello {
                agent_id: agent_id.to_owned(),
                epoch,
                hostname: hostname.to_owned(),
                boot_id: format!("{epoch:032x}"),
                version: concat!("outflow-sim/", env!("CARGO_PKG_VERSION")).to_owned(),
                labels: [("role".to_owned(), "inference".to_owned())].into(),
            })
            .await?;
        Ok((stream, welcome))
    }

    /// After `error` on the stream while `batch` was unacknowledged (every earlier batch
    /// was): opens the stream again, on the next of `channels` in turn, and sends `batch`
    /// again unless the collector says it applied it, until it is acknowledged; for at most
    /// `patience`. A refusal (credentials, a bad batch) is not retried.
    pub async fn recover(
        &mut self,
        channels: &[Channel],
        batch: &v1::Batch,
        error: SimError,
        patience: Duration,
    ) -> Result<(), SimError> {
        if let SimError::Ingest { error: e, .. } = &error
            && !retryable(e)
        {
            return Err(error);
        }
        let deadline = tokio::time::Instant::now() + patience;
        let mut last = error;
        while tokio::time::Instant::now() < deadline {
            self.at = (self.at + 1) % channels.len().max(1);
            let Some(channel) = channels.get(self.at).cloned() else {
                break;
            };
            let tried = async {
                let (mut stream, welcome) = Self::hello(
                    channel,
                    self.bearer.clone(),
                    &self.agent_id,
                    self.epoch,
                    &self.host,
                )
                .await?;
                if welcome.applied_seq < batch.seq {
                    stream.send_batch(batch.clone()).await?;
                    while stream.next_ack().await? < batch.seq {}
                }
                Ok::<_, IngestError>(stream)
            };
            match tokio::time::timeout(patience, tried).await {
                Ok(Ok(stream)) => {
                    self.stream = stream;
                    return Ok(());
                }
                Ok(Err(e)) if !retryable(&e) => return Err(self.failed(e)),
                Ok(Err(e)) => last = self.failed(e),
                Err(_) => last = self.failed(IngestError::Timeout(patience)),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(last)
    }

    fn failed(&self, error: IngestError) -> SimError {
        SimError::Ingest {
            host: self.host.clone(),
            error,
        }
    }

    /// Sends a batch (does not wait for its Ack).
    pub async fn send_batch(&mut self, batch: v1::Batch) -> Result<(), SimError> {
        let sent = self.stream.send_batch(batch).await;
        sent.map_err(|e| self.failed(e))
    }

    /// Waits for the Ack of `seq`.
    pub async fn ack(&mut self, seq: u64) -> Result<(), SimError> {
        loop {
            match self.stream.next_ack().await {
                Ok(acked) if acked >= seq => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(self.failed(e)),
            }
        }
    }

    /// Half-closes the stream and waits for the server to end it.
    pub async fn close(self) {
        self.stream.close().await;
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
