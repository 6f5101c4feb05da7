//! `outflow.v1.Query`: top talkers and per-client stats, as `query.proto` documents them.
use std::sync::Arc;

use outflow_proto::v1::{self, query_server::Query};
use tonic::{Request, Response, Status};

use crate::{
    aggregate::ClientQuery,
    collector::Collector,
    error::ApiError,
    keys::Group,
    model::ValidationError,
    window::{Window, WindowStats},
};

/// Keys per TopTalkers answer when the request says 0.
pub const DEFAULT_LIMIT: u32 = 20;
/// Most keys per TopTalkers answer.
pub const MAX_LIMIT: u32 = 1000;

impl TryFrom<v1::GroupBy> for Group {
    type Error = ValidationError;

    fn try_from(g: v1::GroupBy) -> Result<Self, Self::Error> {
        match g {
            v1::GroupBy::ClientAddress => Ok(Group::ClientAddress),
            v1::GroupBy::ClientPrefix => Ok(Group::ClientPrefix),
            v1::GroupBy::Host => Ok(Group::Host),
            v1::GroupBy::Workload => Ok(Group::Workload),
            v1::GroupBy::ClientId => Ok(Group::ClientId),
            v1::GroupBy::Peer => Ok(Group::Peer),
            v1::GroupBy::Unspecified => Err(ValidationError::new("group_by", "unspecified")),
        }
    }
}

impl From<Group> for v1::GroupBy {
    fn from(g: Group) -> Self {
        match g {
            Group::ClientAddress => v1::GroupBy::ClientAddress,
            Group::ClientPrefix => v1::GroupBy::ClientPrefix,
            Group::Host => v1::GroupBy::Host,
            Group::Workload => v1::GroupBy::Workload,
            Group::ClientId => v1::GroupBy::ClientId,
            Group::Peer => v1::GroupBy::Peer,
        }
    }
}

impl TryFrom<v1::Window> for Window {
    type Error = ValidationError;

    fn try_from(w: v1::Window) -> Result<Self, Self::Error> {
        match w {
            v1::Window::Window1m => Ok(Window::M1),
            v1::Window::Window10m => Ok(Window::M10),
            v1::Window::Window1h => Ok(Window::H1),
            v1::Window::Window24h => Ok(Window::H24),
            v1::Window::Unspecified => Err(ValidationError::new("window", "unspecified")),
        }
    }
}

impl From<Window> for v1::Window {
    fn from(w: Window) -> Self {
        match w {
            Window::M1 => v1::Window::Window1m,
            Window::M10 => v1::Window::Window10m,
            Window::H1 => v1::Window::Window1h,
            Window::H24 => v1::Window::Window24h,
        }
    }
}

/// A validated TopTalkers request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopRequest {
    pub group: Group,
    pub window: Window,
    pub limit: usize,
}

impl TryFrom<v1::TopTalkersRequest> for TopRequest {
    type Error = ValidationError;

    fn try_from(r: v1::TopTalkersRequest) -> Result<Self, Self::Error> {
        let group = v1::GroupBy::try_from(r.group_by)
            .map_err(|_| ValidationError::new("group_by", format!("unknown value {}", r.group_by)))?
            .try_into()?;
        let window = v1::Window::try_from(r.window)
            .map_err(|_| ValidationError::new("window", format!("unknown value {}", r.window)))?
            .try_into()?;
        let limit = match r.limit {
            0 => DEFAULT_LIMIT,
            n if n <= MAX_LIMIT => n,
            n => {
                return Err(ValidationError::new(
                    "limit",
                    format!("{n}, at most {MAX_LIMIT}"),
                ));
            }
        };
        Ok(Self {
            group,
            window,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        })
    }
}

/// The Query service.
#[derive(Debug, Clone)]
pub struct QueryService {
    collector: Arc<Collector>,
}

impl QueryService {
    /// The service over `collector`.
    pub fn new(collector: Arc<Collector>) -> Self {
        Self { collector }
    }

    /// TopTalkers without the transport.
    pub fn do_top_talkers(
        &self,
        r: v1::TopTalkersRequest,
    ) -> Result<v1::TopTalkersResponse, ApiError> {
        let r = TopRequest::try_from(r)?;
        let top = self.collector.top_talkers(r.group, r.window, r.limit);
        Ok(v1::TopTalkersResponse {
            window_end_ms: top.window_end_ms,
            talkers: top
                .talkers
                .into_iter()
                .map(|t| v1::Talker {
                    key: t.key,
                    response_bytes: t.stats.totals.response_bytes,
                    request_bytes: t.stats.totals.request_bytes,
                    connections_closed: t.stats.totals.connections_closed,
                    hosts: t.stats.hosts,
                })
                .collect(),
        })
    }

    /// ClientStats without the transport.
    pub fn do_client_stats(
        &self,
        r: v1::ClientStatsRequest,
    ) -> Result<v1::ClientStatsResponse, ApiError> {
        let client = ClientQuery::parse(&r.client)?;
        let stats = self.collector.client_stats(&client).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no traffic of {} in the last 24 h",
                client.describe()
            ))
        })?;
        let window = |(w, s): (Window, WindowStats)| v1::WindowStats {
            window: v1::Window::from(w) as i32,
            response_bytes: s.totals.response_bytes,
            request_bytes: s.totals.request_bytes,
            connections_closed: s.totals.connections_closed,
            hosts: s.hosts,
        };
        Ok(v1::ClientStatsResponse {
            client: client.to_string(),
            windows: Window::ALL.into_iter().zip(stats).map(window).collect(),
        })
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn top_talkers(
        &self,
        request: Request<v1::TopTalkersRequest>,
    ) -> Result<Response<v1::TopTalkersResponse>, Status> {
        self.do_top_talkers(request.into_inner())
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn client_stats(
        &self,
        request: Request<v1::ClientStatsRequest>,
    ) -> Result<Response<v1::ClientStatsResponse>, Status> {
        self.do_client_stats(request.into_inner())
            .map(Response::new)
            .map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_request_rules() {
        let r = |g: i32, w: i32, limit| {
            TopRequest::try_from(v1::TopTalkersRequest {
                group_by: g,
                window: w,
                limit,
            })
        };
        assert_eq!(r(2, 3, 0).unwrap().limit, 20);
        assert_eq!(r(2, 3, 1000).unwrap().limit, 1000);
        assert_eq!(r(2, 3, 1001).unwrap_err().field, "limit");
        assert_eq!(r(0, 3, 1).unwrap_err().to_string(), "group_by: unspecified");
        assert_eq!(
            r(9, 3, 1).unwrap_err().to_string(),
            "group_by: unknown value 9"
        );
        assert_eq!(r(5, 3, 1).unwrap().group, Group::ClientId);
        assert_eq!(r(6, 3, 1).unwrap().group, Group::Peer);
        assert_eq!(r(1, 0, 1).unwrap_err().field, "window");
        let ok = r(4, 4, 5).unwrap();
        assert_eq!((ok.group, ok.window), (Group::Workload, Window::H24));
    }
}
