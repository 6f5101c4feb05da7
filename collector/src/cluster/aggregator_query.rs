//! `outflow.v1.AggregatorQuery`: what one aggregator holds, for the node that answers a Query
//! or Alerts call for the whole cluster ([`super::fleet_query`]).
use std::sync::Arc;

use outflow_proto::v1::{self, aggregator_query_server::AggregatorQuery};
use tonic::{Request, Response, Status};

use super::holdings::Holdings;
use crate::{
    alerts_service::{AlertStream, AlertsService},
    collector::Collector,
    error::ApiError,
    keys::Group,
    model::ValidationError,
    query::MAX_LIMIT,
    window::Window,
};

/// Most keys one Keys call may name.
pub const MAX_KEYS: usize = 100_000;

/// The service over one aggregator's store and alerts.
#[derive(Debug, Clone)]
pub struct AggregatorQueryService {
    collector: Arc<Collector>,
    alerts: AlertsService,
    held: Holdings,
}

fn group(g: i32) -> Result<Group, ValidationError> {
    v1::GroupBy::try_from(g)
        .map_err(|_| ValidationError::new("group_by", format!("unknown value {g}")))?
        .try_into()
}

impl AggregatorQueryService {
    pub fn new(collector: Arc<Collector>, alerts: AlertsService, held: Holdings) -> Self {
        Self {
            collector,
            alerts,
            held,
        }
    }

    /// Top without the transport.
    pub fn do_top(&self, r: v1::PartialTopRequest) -> Result<v1::PartialTopResponse, ApiError> {
        let g = group(r.group_by)?;
        let w: Window = v1::Window::try_from(r.window)
            .map_err(|_| ValidationError::new("window", format!("unknown value {}", r.window)))?
            .try_into()?;
        if r.limit > MAX_LIMIT {
            return Err(
                ValidationError::new("limit", format!("{}, at most {MAX_LIMIT}", r.limit)).into(),
            );
        }
        let st = self.collector.read_state();
        let keys: Vec<(String, u64)> = if r.limit > 0 {
            let limit = usize::try_from(r.limit).unwrap_or(usize::MAX);
            st.top_at(g, w, r.end_ms, limit)
                .talkers
                .into_iter()
                .map(|t| (t.key, t.stats.totals.response_bytes))
                .collect()
        } else {
            st.at_least(g, w, r.end_ms, r.min_response_bytes)
        };
        Ok(v1::PartialTopResponse {
            keys: keys
                .into_iter()
                .map(|(key, response_bytes)| v1::KeyBytes {
                    key,
                    response_bytes,
                })
                .collect(),
        })
    }

    /// Keys without the transport.
    pub fn do_keys(&self, r: v1::PartialKeysRequest) -> Result<v1::PartialKeysResponse, ApiError> {
        let g = group(r.group_by)?;
        if r.keys.len() > MAX_KEYS {
            return Err(ValidationError::new(
                "keys",
                format!("{}, at most {MAX_KEYS}", r.keys.len()),
            )
            .into());
        }
        let mut keys = r.keys;
        // Each key once, whatever the caller sent.
        keys.sort_unstable();
        keys.dedup();
        let st = self.collector.read_state();
        let end = r.end_ms;
        let mut out = Vec::new();
        for key in keys {
            let Some(rollup) = st.rollup_of(g, &key) else {
                continue;
            };
            let windows = Window::ALL
                .into_iter()
                .map(|w| {
                    let t = rollup.window(w, end).totals;
                    v1::WindowStats {
                        window: v1::Window::from(w) as i32,
                        response_bytes: t.response_bytes,
                        request_bytes: t.request_bytes,
                        connections_closed: t.connections_closed,
                        hosts: 0,
                    }
                })
                .collect();
            let start = Window::H24.start_ms(end);
            let hosts = rollup
                .hosts_since(start)
                .filter_map(|h| {
                    Some(v1::HostSeen {
                        name: st.host_name(h).to_owned(),
                        last_seen_ms: rollup.host_last_seen(h)?,
                    })
                })
                .collect();
            out.push(v1::KeyWindows {
                key,
                windows,
                hosts,
            });
        }
        Ok(v1::PartialKeysResponse { keys: out })
    }
}

#[tonic::async_trait]
impl AggregatorQuery for AggregatorQueryService {
    async fn end(&self, _: Request<v1::EndRequest>) -> Result<Response<v1::EndResponse>, Status> {
        Ok(Response::new(v1::EndResponse {
            end_ms: self.collector.end_ms(),
            partitions: self.held.held().into_iter().collect(),
            replaying: self.held.replaying().into_iter().collect(),
        }))
    }

    async fn top(
        &self,
        request: Request<v1::PartialTopRequest>,
    ) -> Result<Response<v1::PartialTopResponse>, Status> {
        Ok(Response::new(self.do_top(request.into_inner())?))
    }

    async fn keys(
        &self,
        request: Request<v1::PartialKeysRequest>,
    ) -> Result<Response<v1::PartialKeysResponse>, Status> {
        Ok(Response::new(self.do_keys(request.into_inner())?))
    }

    async fn list_alerts(
        &self,
        request: Request<v1::ListAlertsRequest>,
    ) -> Result<Response<v1::ListAlertsResponse>, Status> {
        Ok(Response::new(self.alerts.do_list(request.into_inner())?))
    }

    type WatchAlertsStream = AlertStream;

    async fn watch_alerts(
        &self,
        request: Request<v1::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        Ok(Response::new(
            self.alerts.stream(request.into_inner().include_service),
        ))
    }
}
