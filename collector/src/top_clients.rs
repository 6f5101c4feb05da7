//! `outflow_collector_top_client_response_bytes{rank, client}`: the client addresses with the
//! most response bytes in a recent window, for dashboards.
//!
//! The series are computed at each scrape by the query `outflow-collector top -g
//! client-address` makes ([`Collector::top_talkers`]: one pass over the client addresses held,
//! under the state's read lock, off the ingest path). Only the ranks held are written, so
//! there are exactly `min(top_clients, clients in the window)` series at any time, and a client
//! that drops out of the top takes its series with it: never one series per client.
use std::sync::{Arc, OnceLock, Weak};

use prometheus_client::{
    collector::Collector as PromCollector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::MetricType,
};

use crate::{collector::Collector, keys::Group, window::Window};

/// Name of the metric (after the registry's `outflow_collector_` prefix).
const NAME: &str = "top_client_response_bytes";

/// Labels of one series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopLabels {
    /// 1 for the client with the most response bytes.
    rank: String,
    /// The client address, as `top` prints it.
    client: String,
}

/// The top-N clients, as a metric computed at each scrape. Registered before the store opens;
/// writes nothing until [`TopClients::attach`] gives it the collector.
#[derive(Debug)]
pub struct TopClients {
    n: usize,
    window: Window,
    /// Weak: the collector holds the metrics that hold this.
    source: OnceLock<Weak<Collector>>,
}

impl TopClients {
    /// The `n` biggest clients in `window`.
    pub fn new(n: usize, window: Window) -> Arc<Self> {
        Arc::new(Self {
            n,
            window,
            source: OnceLock::new(),
        })
    }

    /// Answers from `collector` from now on.
    pub fn attach(&self, collector: &Arc<Collector>) {
        let _ = self.source.set(Arc::downgrade(collector));
    }
}

impl PromCollector for TopClients {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let top = match self.source.get().and_then(Weak::upgrade) {
            Some(c) if self.n > 0 => c.top_talkers(Group::ClientAddress, self.window, self.n),
            _ => return Ok(()),
        };
        let help = format!(
            "Response bytes of the {} client addresses with the most in the last {} of batch time, by rank (1: the most)",
            self.n,
            self.window.name()
        );
        let mut family = encoder.encode_descriptor(NAME, &help, None, MetricType::Gauge)?;
        for (i, t) in top.talkers.iter().enumerate() {
            let labels = TopLabels {
                rank: (i + 1).to_string(),
                client: t.key.clone(),
            };
            family
                .encode_family(&labels)?
                .encode_gauge(&t.stats.totals.response_bytes)?;
        }
        Ok(())
    }
}
