//! The web dashboard, served at `/` of the metrics address beside `/metrics`: one page of
//! hand-written HTML, JavaScript and CSS compiled into the binary (no CDN, nothing fetched
//! from elsewhere), and the JSON it polls:
//!
//! | path | answer |
//! |------|--------|
//! | `/api/overview?range=1h&group=client-address&top=5` | the fleet's response bytes per minute of `range` (`10m`, `1h`, `24h`, `7d`) and the `top` keys of `group` over it, stacked, each with its bytes in the minutes it was among that minute's top 10 (see `history`) |
//! | `/api/top?group=client-id&window=10m&limit=20` | the top talkers, as `outflow.v1.Query/TopTalkers` |
//! | `/api/alerts?limit=50` | open, then resolved alerts, newest first, with their evidence and the flagged key's bytes over the last hour |
//! | `/api/client?group=client-address&key=203.0.113.7` | a key's totals in every window, its hosts, its history in each range, its alerts |
//!
//! Authorization is Query's: with token files configured, the API wants
//! `Authorization: Bearer <the read or the shared token>` (the page asks for it once and keeps
//! it for the browser tab). A collector that authenticates readers by client certificate only
//! refuses the API: its plain-HTTP address cannot check one.
use std::{
    borrow::Cow,
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, OnceLock},
};

use axum::{
    Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use outflow_proto::v1;
use serde_json::{Value, json};

use crate::{
    aggregate::State as Aggregates,
    auth::{ClientCerts, Tokens},
    collector::Collector,
    history::{self, Range, Share},
    keys::Group,
    window::{Rollup, Series, Window},
};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Top keys stacked in the overview's chart at most.
const MAX_STACK: usize = 10;
/// Alerts per answer at most.
const MAX_ALERTS: usize = 500;

/// What the dashboard's routes share: the collector once its store is open, and who may read.
#[derive(Debug)]
pub struct Dashboard {
    collector: OnceLock<Arc<Collector>>,
    tokens: Arc<Tokens>,
    certs: ClientCerts,
}

impl Dashboard {
    pub fn new(tokens: Arc<Tokens>, certs: ClientCerts) -> Arc<Self> {
        Arc::new(Self {
            collector: OnceLock::new(),
            tokens,
            certs,
        })
    }

    /// The collector's store is open: the API answers from now on (503 before).
    pub fn attach(&self, collector: &Arc<Collector>) {
        let _ = self.collector.set(collector.clone());
    }

    /// The routes `/`, `/app.js`, `/app.css` and `/api/...`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/",
                get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
            )
            .route(
                "/app.js",
                get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
            )
            .route(
                "/app.css",
                get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
            )
            .route("/api/overview", get(overview))
            .route("/api/top", get(top))
            .route("/api/alerts", get(alerts))
            .route("/api/client", get(client))
            .with_state(self.clone())
    }

    /// The collector, if the caller may read and the store is open.
    fn reader(&self, headers: &HeaderMap) -> Result<&Arc<Collector>, ApiFailure> {
        if self.certs != ClientCerts::Off && self.tokens.is_empty() {
            return Err(ApiFailure(
                StatusCode::FORBIDDEN,
                "this collector authenticates readers by client certificate, which its plain-HTTP dashboard cannot check: set auth.read_token_file to use the dashboard".into(),
            ));
        }
        let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if !self.tokens.may_read(given) {
            return Err(ApiFailure(
                StatusCode::UNAUTHORIZED,
                "the read token is needed (auth.read_token_file or auth.token_file): Authorization: Bearer <token>".into(),
            ));
        }
        self.collector.get().ok_or_else(|| {
            ApiFailure(
                StatusCode::SERVICE_UNAVAILABLE,
                "the collector is opening its store: try again in a moment".into(),
            )
        })
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// An API error: its status and one sentence (JSON `{"error": ...}`).
#[derive(Debug)]
struct ApiFailure(StatusCode, String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        json_response(self.0, &json!({ "error": self.1 }))
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        v.to_string(),
    )
        .into_response()
}

fn bad(m: String) -> ApiFailure {
    ApiFailure(StatusCode::BAD_REQUEST, m)
}

type Params = Query<HashMap<String, String>>;

fn param<'a>(p: &'a Params, name: &str, default: &'a str) -> &'a str {
    p.get(name).map_or(default, String::as_str)
}

/// `client-address`, ... as the CLI names groups.
fn group_param(p: &Params, default: &str) -> Result<Group, ApiFailure> {
    let name = param(p, "group", default);
    Group::ALL
        .into_iter()
        .find(|g| g.name() == name)
        .ok_or_else(|| {
            bad(format!(
                "group {name:?}: want client-address, client-prefix, client-id, peer, host or workload"
            ))
        })
}

/// The chart's range: `10m`, `1h`, `24h`, `7d`.
fn range_param(p: &Params) -> Result<Range, ApiFailure> {
    let v = param(p, "range", "1h");
    Range::parse(v).ok_or_else(|| bad(format!("range {v:?}: want 10m, 1h, 24h or 7d")))
}

/// `10m`, `1h`, `24h` (and `1m` for windows).
fn window_param(p: &Params, name: &str, default: &str) -> Result<Window, ApiFailure> {
    let v = param(p, name, default);
    Window::ALL
        .into_iter()
        .find(|w| w.name() == v)
        .ok_or_else(|| bad(format!("{name} {v:?}: want 1m, 10m, 1h or 24h")))
}

fn count_param(p: &Params, name: &str, default: usize, max: usize) -> Result<usize, ApiFailure> {
    match p.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| bad(format!("{name} {v:?}: want 1 to {max}"))),
    }
}

fn series_json(s: &Series) -> Value {
    json!({ "start_ms": s.start_ms, "bucket_ms": s.bucket_ms, "bytes": s.bytes })
}

async fn overview(State(d): State<Arc<Dashboard>>, headers: HeaderMap, p: Params) -> Response {
    let result = (|| {
        let c = d.reader(&headers)?;
        let range = range_param(&p)?;
        let group = group_param(&p, "client-address")?;
        let n = count_param(&p, "top", 5, MAX_STACK)?;
        let alerts_open = c.alerts().open_count();
        let st = c.read_state();
        let (end, h) = (st.end_ms(), st.history());
        let fleet = h.fleet(range, end);
        // The settled minutes' top keys from the history; the newest minutes' (at most the
        // ten the rollups hold per minute) taken now.
        let (first, last) = range.span(end);
        let newest = (h.settled_through() + 1)
            .max(first)
            .max(last.saturating_sub(9));
        let live: Vec<(u64, Vec<Share>)> = (newest..=last)
            .map(|m| (m, st.minute_top(group, m)))
            .collect();
        let minutes = h
            .shares(group, range, end)
            .chain(live.iter().map(|(m, s)| (*m, &s[..])));
        let stack: Vec<Value> = history::stack(minutes, first, last, n)
            .into_iter()
            .map(|(key, bytes)| {
                json!({
                    "key": key,
                    "response_bytes": bytes.iter().sum::<u64>(),
                    "series": series_json(&Series {
                        start_ms: fleet.start_ms,
                        bucket_ms: fleet.bucket_ms,
                        bytes,
                    }),
                })
            })
            .collect();
        let keys: serde_json::Map<String, Value> = Group::ALL
            .into_iter()
            .map(|g| (g.name().to_owned(), json!(st.key_count(g))))
            .collect();
        Ok::<_, ApiFailure>(json!({
            "end_ms": end,
            "range": range.name(),
            "group": group.name(),
            "fleet": series_json(&fleet),
            "fleet_bytes": fleet.bytes.iter().sum::<u64>(),
            "hosts": st.host_count(),
            "keys": keys,
            "stack": stack,
            "alerts_open": alerts_open,
        }))
    })();
    respond(result)
}

async fn top(State(d): State<Arc<Dashboard>>, headers: HeaderMap, p: Params) -> Response {
    let result = (|| {
        let c = d.reader(&headers)?;
        let group = group_param(&p, "client-address")?;
        let window = window_param(&p, "window", "10m")?;
        let limit = count_param(&p, "limit", 20, 1000)?;
        let top = c.top_talkers(group, window, limit);
        let talkers: Vec<Value> = top
            .talkers
            .iter()
            .map(|t| {
                let s = &t.stats;
                json!({
                    "key": t.key,
                    "response_bytes": s.totals.response_bytes,
                    "request_bytes": s.totals.request_bytes,
                    "connections_closed": s.totals.connections_closed,
                    "hosts": s.hosts,
                })
            })
            .collect();
        Ok::<_, ApiFailure>(json!({
            "group": group.name(),
            "window": window.name(),
            "window_end_ms": top.window_end_ms,
            "talkers": talkers,
        }))
    })();
    respond(result)
}

async fn alerts(State(d): State<Arc<Dashboard>>, headers: HeaderMap, p: Params) -> Response {
    let result = (|| {
        let c = d.reader(&headers)?;
        let limit = count_param(&p, "limit", 50, MAX_ALERTS)?;
        let list = c.alerts().list(false, limit, false);
        let st = c.read_state();
        let alerts: Vec<Value> = list.iter().map(|a| alert_json(a, &st)).collect();
        Ok::<_, ApiFailure>(json!({ "end_ms": st.end_ms(), "alerts": alerts }))
    })();
    respond(result)
}

async fn client(State(d): State<Arc<Dashboard>>, headers: HeaderMap, p: Params) -> Response {
    let result = (|| {
        let c = d.reader(&headers)?;
        let group = group_param(&p, "client-address")?;
        let key = p
            .get("key")
            .filter(|k| !k.is_empty())
            .ok_or_else(|| bad("key: missing (an address, a prefix, a client id, ...)".into()))?;
        let st = c.read_state();
        let Some(r) = st.rollup_of(group, key) else {
            return Err(ApiFailure(
                StatusCode::NOT_FOUND,
                format!("no {} {key:?} in the last 24 h of batch time", group.name()),
            ));
        };
        let windows: Vec<Value> = Window::ALL
            .into_iter()
            .map(|w| {
                let s = r.window(w, st.end_ms());
                json!({
                    "window": w.name(),
                    "response_bytes": s.totals.response_bytes,
                    "request_bytes": s.totals.request_bytes,
                    "connections_closed": s.totals.connections_closed,
                    "hosts": s.hosts,
                })
            })
            .collect();
        let series: serde_json::Map<String, Value> = [Window::M10, Window::H1, Window::H24]
            .into_iter()
            .map(|w| (w.name().to_owned(), series_json(&st.series(&r, w))))
            .collect();
        let alerts: Vec<Value> = c
            .alerts()
            .list(false, MAX_ALERTS, true)
            .iter()
            .filter(|a| a.key == *key)
            .map(|a| alert_json(a, &st))
            .collect();
        Ok(json!({
            "group": group.name(),
            "key": key,
            "end_ms": st.end_ms(),
            "windows": windows,
            "hosts": st.hosts_of(&r, Window::H24),
            "series": series,
            "alerts": alerts,
        }))
    })();
    respond(result)
}

fn respond(r: Result<Value, ApiFailure>) -> Response {
    match r {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

/// The group an alert's key is held in, if it is one the dashboard can show.
fn group_of_alert(a: &v1::Alert) -> Option<Group> {
    if !a.client_id.is_empty() {
        return Some(Group::ClientId);
    }
    if a.key.parse::<IpAddr>().is_ok() {
        return Some(Group::ClientAddress);
    }
    if a.key.parse::<ipnet::IpNet>().is_ok() {
        return Some(Group::ClientPrefix);
    }
    (a.key.matches('/').count() >= 2).then_some(Group::Workload)
}

fn alert_json(a: &v1::Alert, st: &Aggregates) -> Value {
    let group = group_of_alert(a);
    let rollup: Option<Cow<'_, Rollup>> = group.and_then(|g| st.rollup_of(g, &a.key));
    let detector = v1::Detector::try_from(a.detector)
        .map_or("unknown", |d| d.as_str_name())
        .trim_start_matches("DETECTOR_")
        .to_ascii_lowercase();
    let severity = v1::Severity::try_from(a.severity)
        .map_or("unknown", |s| s.as_str_name())
        .trim_start_matches("SEVERITY_")
        .to_ascii_lowercase();
    json!({
        "id": a.id,
        "key": a.key,
        "group": group.map(Group::name),
        "detector": detector,
        "severity": severity,
        "open": a.state == v1::AlertState::Open as i32,
        "window_seconds": a.window_seconds,
        "observed_bytes": a.observed_bytes,
        "baseline_bytes": a.baseline_bytes,
        "threshold_bytes": a.threshold_bytes,
        "request_bytes": a.request_bytes,
        "peak_bytes": a.peak_bytes,
        "episode_bytes": a.episode_bytes,
        "members": a.members,
        "hosts": a.hosts,
        "client_addrs": a.client_addrs,
        "peers": a.peers,
        "first_seen_ms": a.first_seen_ms,
        "last_seen_ms": a.last_seen_ms,
        "summary": a.summary,
        "series": rollup.map(|r| series_json(&st.series(&r, Window::H24))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_keys_find_their_group() {
        let alert = |key: &str, client_id: &str| v1::Alert {
            key: key.into(),
            client_id: client_id.into(),
            ..Default::default()
        };
        assert_eq!(
            group_of_alert(&alert("203.0.113.7", "")),
            Some(Group::ClientAddress)
        );
        assert_eq!(
            group_of_alert(&alert("203.0.113.0/24", "")),
            Some(Group::ClientPrefix)
        );
        assert_eq!(
            group_of_alert(&alert("h:0123", "h:0123")),
            Some(Group::ClientId)
        );
        assert_eq!(
            group_of_alert(&alert("gpu-1//system.slice/vllm.service/vllm", "")),
            Some(Group::Workload)
        );
        assert_eq!(group_of_alert(&alert("cohort:abc", "")), None);
    }
}
