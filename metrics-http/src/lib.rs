//! The HTTP endpoint that outflow's agent and collector both serve on their metrics address:
//!
//! - `GET /metrics`: the metrics in OpenMetrics text when the scraper asks for it (Prometheus
//!   does, in its `Accept` header), else in Prometheus' classic text format (version 0.0.4),
//!   which is what `curl`, `promtool check metrics` and older scrapers read.
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 once the process does its job, else 503 with the reason (readiness).
//!
//! The metrics are encoded by `prometheus-client`, which writes OpenMetrics only; the classic
//! form is derived from it by [`to_prometheus_text`].
use std::{fmt::Write as _, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};

/// What the endpoint serves.
pub trait Exposition: Send + Sync + 'static {
    /// Every metric, in OpenMetrics text (ending in `# EOF`).
    fn openmetrics(&self) -> String;
    /// `Ok` when ready, else why not (one line).
    fn readiness(&self) -> Result<(), String>;
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (Prometheus sends it first, weighted).
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim_start().starts_with("application/openmetrics-text"))
}

/// Rewrites OpenMetrics text as Prometheus' classic text format: a counter family's HELP and
/// TYPE name its samples (`x_total`, not `x`), `unknown` is `untyped`, and the `# UNIT` and
/// `# EOF` lines go. Samples stay as they are.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let lines: Vec<&str> = openmetrics.lines().collect();
    let mut out = String::with_capacity(openmetrics.len());
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // The family's TYPE line follows its HELP line.
            let kind = lines
                .get(i)
                .and_then(|t| t.strip_prefix("# TYPE "))
                .and_then(|t| t.split_once(' '))
                .filter(|(n, _)| *n == name)
                .map(|(_, k)| k);
            let sample_name = if kind == Some("counter") && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            let _ = writeln!(out, "# HELP {sample_name} {help}");
            if let Some(kind) = kind {
                let kind = if kind == "unknown" { "untyped" } else { kind };
                let _ = writeln!(out, "# TYPE {sample_name} {kind}");
                i += 1;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

async fn metrics<E: Exposition>(State(e): State<Arc<E>>, headers: HeaderMap) -> impl IntoResponse {
    let text = e.openmetrics();
    if wants_openmetrics(&headers) {
        ([(header::CONTENT_TYPE, OPENMETRICS)], text)
    } else {
        (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            to_prometheus_text(&text),
        )
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz<E: Exposition>(State(e): State<Arc<E>>) -> (StatusCode, String) {
    match e.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The routes `/metrics`, `/healthz` and `/readyz`.
pub fn router<E: Exposition>(e: Arc<E>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<E>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<E>))
        .with_state(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP app_requests Requests.\n# TYPE app_requests counter\napp_requests_total{code=\"200\"} 3\n# HELP app_size_bytes Size.\n# TYPE app_size_bytes gauge\n# UNIT app_size_bytes bytes\napp_size_bytes 7\n# HELP app_x X.\n# TYPE app_x unknown\napp_x 1\n# EOF\n";

    #[test]
    fn counters_are_named_by_their_samples_and_openmetrics_only_lines_go() {
        assert_eq!(
            to_prometheus_text(OM),
            "# HELP app_requests_total Requests.\n# TYPE app_requests_total counter\napp_requests_total{code=\"200\"} 3\n# HELP app_size_bytes Size.\n# TYPE app_size_bytes gauge\napp_size_bytes 7\n# HELP app_x X.\n# TYPE app_x untyped\napp_x 1\n"
        );
    }

    #[test]
    fn prometheus_gets_openmetrics_and_curl_the_classic_format() {
        let mut h = HeaderMap::new();
        assert!(!wants_openmetrics(&h));
        h.insert(header::ACCEPT, "*/*".parse().expect("header"));
        assert!(!wants_openmetrics(&h));
        h.insert(
            header::ACCEPT,
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
                .parse()
                .expect("header"),
        );
        assert!(wants_openmetrics(&h));
    }
}
