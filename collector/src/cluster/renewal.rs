//! An aggregator's membership, renewed on a task of its own every quarter of the lease,
//! whatever its rounds are doing.
//!
//! A round opens consumers (a few JetStream API calls each) and rebuilds the store; on a
//! loaded machine it can outlast the lease. Renewed from the round, the aggregator would then
//! look gone to the others: they would claim its partitions, and it would rebuild its store
//! when it came back. Renewed here, it is gone only when it is: killed, or cut off from NATS.
//!
//! The rounds read when it was last renewed ([`Renewal::current`]): an aggregator not renewed
//! for half a lease claims nothing and stops applying, since its claims may be taken a lease
//! after its last renewal.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use log::warn;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::membership::{self, Membership};
use crate::metrics::Metrics;

/// What the renewing task last managed, as the rounds read it.
#[derive(Debug)]
pub struct Renewal {
    /// When the last renewal that succeeded was sent.
    last: watch::Receiver<Option<Instant>>,
    lease: Duration,
}

impl Renewal {
    /// Starts renewing `members` (this aggregator's entry: `instance` and `advertise`, see
    /// [`Membership::renew`]) every quarter of `lease` until `stop`; a renewal that fails is
    /// counted in `outflow_collector_cluster_membership_failures_total` and logged.
    pub fn spawn(
        mut members: Membership,
        instance: String,
        advertise: String,
        lease: Duration,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Renewal, JoinHandle<()>) {
        let (tx, last) = watch::channel(None);
        let every = membership::quarter_lease(lease);
        let task = tokio::spawn(async move {
            loop {
                // Counted from when it is sent: the entry's lease runs from a moment between
                // this and the answer.
                let sent = Instant::now();
                tokio::select! {
                    () = stop.cancelled() => break,
                    r = members.renew(&instance, &advertise) => match r {
                        Ok(()) => {
                            tx.send_replace(Some(sent));
                        }
                        Err(e) => {
                            metrics.cluster_membership_failures.inc();
                            warn!("aggregator {}: {e}", members.me());
                        }
                    },
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep_until((sent + every).into()) => {}
                }
            }
        });
        (Renewal { last, lease }, task)
    }

    /// Returns once the membership was renewed at least once.
    pub async fn renewed_once(&mut self) {
        // An error only if the renewing task ended (stopped): nothing to wait for then.
        let _ = self.last.wait_for(Option::is_some).await;
    }

    /// True if the membership was renewed within half a lease: this aggregator may claim and
    /// apply (its claims cannot be taken before a lease after its last renewal).
    pub fn current(&self) -> bool {
        self.last
            .borrow()
            .is_some_and(|t| t.elapsed() <= self.lease / 2)
    }
}
