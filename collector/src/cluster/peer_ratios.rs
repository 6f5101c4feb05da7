//! The sustained detector's peers' ratios, shared among a cluster's aggregators.
//!
//! Each aggregator learns the peers' response/request ratio of every subject kind from the
//! subjects of the partitions it holds: alone, an aggregator whose partitions hold a large
//! group pulling at a high ratio would learn a higher ratio than one collector over the whole
//! fleet. So at each round it puts what its detection thread learnt in the key-value bucket
//! `<stream>-peer-ratios` under its name (the detectors' own row format,
//! `detect::persist::peers_value`), reads the other live aggregators' entries, and its
//! sustained detector judges against all of them together (`detect::Peers::combine`). Entries
//! expire a lease after they were written, as the membership's do: a stopped aggregator's
//! ratios leave the others' judgements with it.
use std::{collections::BTreeSet, time::Duration};

use async_nats::jetstream::{self, kv};
use log::warn;

use super::membership::{MembershipError, bucket_config, err, keys_of, open_bucket};
use crate::detect::{Peers, persist};

/// The bucket, as one aggregator sees it.
#[derive(Debug, Clone)]
pub struct PeerRatios {
    bucket: kv::Store,
    me: String,
}

impl PeerRatios {
    /// Opens (creating if missing) `<stream>-peer-ratios`, with `replicas` copies and entries
    /// expiring after `lease`, as aggregator `me`.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
        lease: Duration,
        me: &str,
    ) -> Result<PeerRatios, MembershipError> {
        let bucket = open_bucket(
            js,
            bucket_config(format!("{stream}-peer-ratios"), replicas, lease),
        )
        .await?;
        Ok(PeerRatios {
            bucket,
            me: me.to_owned(),
        })
    }

    /// Puts this aggregator's ratios.
    pub async fn share(&self, own: &[Peers; 5]) -> Result<(), MembershipError> {
        self.bucket
            .put(&self.me, persist::peers_value(own).into())
            .await
            .map_err(|e| err("sharing the peers' ratios", e))?;
        Ok(())
    }

    /// The ratios of the aggregators in `live` other than this one that shared some, in the
    /// order of their names (so that every aggregator combines them alike). Entries that are
    /// not ratios (another version's, or damaged) are left out, with a warning.
    pub async fn others(
        &self,
        live: &BTreeSet<String>,
    ) -> Result<Vec<[Peers; 5]>, MembershipError> {
        let mut names = keys_of(&self.bucket, "the peers' ratios").await?;
        names.sort_unstable();
        let mut out = Vec::new();
        for name in names {
            if name == self.me || !live.contains(&name) {
                continue;
            }
            let entry = self
                .bucket
                .entry(name.as_str())
                .await
                .map_err(|e| err(format!("reading the peers' ratios of {name}"), e))?;
            let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                continue;
            };
            let mut peers = [Peers::default(); 5];
            if persist::peers_of_value(&e.value, &mut peers) {
                out.push(peers);
            } else {
                warn!(
                    "the peers' ratios of aggregator {name}: {} bytes that are not ratios (another version's?): judged without them",
                    e.value.len()
                );
            }
        }
        Ok(out)
    }
}
