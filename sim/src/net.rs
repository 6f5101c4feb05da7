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
        let options = Options {
            bearer,
            ..Options::default()
        };
        let mut stream = IngestStream::open_with(channel, options)
            .await
            .map_err(failed)?;
        let welcome = stream
            .hello(v1::Hello {
                agent_id: agent_id.to_owned(),
                epoch,
                hostname: hostname.to_owned(),
                boot_id: format!("{epoch:032x}"),
                version: concat!("outflow-sim/", env!("CARGO_PKG_VERSION")).to_owned(),
                labels: [("role".to_owned(), "inference".to_owned())].into(),
            })
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
        })
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
