//! Which alert changes the webhook receiver already accepted, remembered for the whole cluster
//! in a JetStream key-value bucket (`<stream>-delivered`, as many replicas as the stream), so
//! that an aggregator applying partitions again from the stream's start (a rebuild, a partition
//! taken over, a restart after a crash) does not POST again the alerts its replay raises.
//!
//! A replay is judged as the live stream was (the consumers move in step by judgement period,
//! see [`super::align`]): its alert changes have the live ones' ids and batch times. So a
//! change is placed by its alert's id and its place in the alert's life, (`last_seen_ms`,
//! resolved): one at or before the place recorded for its id was delivered, one after it is
//! new. The place is recorded once the receiver accepted the change: an aggregator killed
//! between the two sends that change once more (at least once, never lost). An exchange with
//! the bucket that fails is tried again for as long as the client takes to move to another
//! NATS server (three ping intervals, and ten seconds); past that the change is sent (a
//! duplicate rather than a missed alert), and counted.
//! Records expire with the stream's parts (`cluster.max_age`): nothing older is replayed.
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures_util::future::BoxFuture;
use outflow_proto::v1;

use super::{
    config::ClusterConfig,
    membership::{MembershipError, err, open_bucket},
};
use crate::sinks::webhook::Delivered;

/// The delivery records of a cluster's stream.
#[derive(Debug)]
pub struct DeliveryLog {
    bucket: kv::Store,
    /// How long a failing exchange is tried again.
    patience: Duration,
}

/// An alert change's place in its alert's life: later changes are greater.
fn place(a: &v1::Alert) -> (u64, bool) {
    (a.last_seen_ms, a.state == v1::AlertState::Resolved as i32)
}

fn encode(p: (u64, bool)) -> String {
    format!("{} {}", p.0, u8::from(p.1))
}

/// The place a record holds; `None` for a value this version did not write.
fn decode(v: &[u8]) -> Option<(u64, bool)> {
    let s = std::str::from_utf8(v).ok()?;
    let (ms, resolved) = s.split_once(' ')?;
    let resolved = match resolved {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    Some((ms.parse().ok()?, resolved))
}

impl DeliveryLog {
    /// Connects to `cfg`'s NATS servers and opens the bucket (creating it if missing).
    pub async fn open(cfg: &ClusterConfig) -> Result<DeliveryLog, MembershipError> {
        let client = cfg
            .nats()
            .connect()
            .await
            .map_err(|e| err("connecting to NATS", e))?;
        let js = jetstream::new(client);
        let bucket = open_bucket(
            &js,
            kv::Config {
                bucket: format!("{}-delivered", cfg.stream),
                history: 1,
                max_age: cfg.max_age,
                num_replicas: cfg.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        Ok(DeliveryLog {
            bucket,
            patience: cfg.nats_ping_interval * 3 + Duration::from_secs(10),
        })
    }

    /// Runs `exchange` until it succeeds or `patience` has passed (each try at most
    /// [`TRY_TIMEOUT`]); the last error.
    async fn patiently<T, E, F>(&self, exchange: impl Fn() -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let give_up = tokio::time::Instant::now() + self.patience;
        loop {
            let e = match tokio::time::timeout(TRY_TIMEOUT, exchange()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer in {TRY_TIMEOUT:?}"),
            };
            if tokio::time::Instant::now() + RETRY_PAUSE >= give_up {
                return Err(format!("{e} (tried for {:?})", self.patience));
            }
            log::debug!("delivery records: {e}; trying again");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// How long one exchange with the bucket may take.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before a failed exchange is tried again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

impl Delivered for DeliveryLog {
    fn was_delivered<'a>(&'a self, a: &'a v1::Alert) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            let recorded = self.patiently(|| self.bucket.get(&a.id)).await?;
            Ok(recorded
                .as_deref()
                .and_then(decode)
                .is_some_and(|r| r >= place(a)))
        })
    }

    fn record<'a>(&'a self, a: &'a v1::Alert) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let value = bytes::Bytes::from(encode(place(a)));
            self.patiently(|| self.bucket.put(&a.id, value.clone()))
                .await
                .map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_order_an_alerts_changes_and_read_back() {
        let a = |last_seen_ms, state: v1::AlertState| v1::Alert {
            last_seen_ms,
            state: state as i32,
            ..Default::default()
        };
        let open = place(&a(60_000, v1::AlertState::Open));
        let resolved = place(&a(60_000, v1::AlertState::Resolved));
        let later = place(&a(120_000, v1::AlertState::Open));
        assert!(open < resolved && resolved < later);
        for p in [open, resolved, later] {
            assert_eq!(decode(encode(p).as_bytes()), Some(p));
        }
        for bad in ["", "12", "12 2", "x 0", "12 0 1"] {
            assert_eq!(decode(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
