//! The two text formats `/metrics` answers in: OpenMetrics 1.0 to a client that asks for it
//! (`Accept: application/openmetrics-text`, as Prometheus does by default), the Prometheus text
//! format 0.0.4 to everyone else (curl, `promtool check metrics`, older scrapers).
//!
//! `prometheus_client` writes OpenMetrics only. The two differ, for the metric types the
//! collector uses (counters, gauges, histograms), in three things, which
//! [`prometheus_text`] changes:
//! - a counter's family is named without `_total` in OpenMetrics (`# TYPE x counter`, sample
//!   `x_total`); the Prometheus format names the family as its sample (`# TYPE x_total counter`),
//!   and its parsers take `x_total` for a second family, without help or type;
//! - `# UNIT` lines exist only in OpenMetrics (the unit stays in the name: `_seconds`);
//! - OpenMetrics ends with `# EOF`.

/// Content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header value accepts OpenMetrics text (a media range
/// `application/openmetrics-text` whose `q` is not 0).
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let q_zero = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f64>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
    })
}

/// OpenMetrics text (as `prometheus_client` writes it) in the Prometheus text format 0.0.4:
/// counter families renamed to their `_total` samples, `# UNIT` and `# EOF` left out; every
/// sample line unchanged.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers() {
        // What Prometheus 2.x sends.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("Application/OpenMetrics-Text"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }

    #[test]
    fn counters_units_and_eof() {
        let om = "\
# HELP x_batches Batches applied.
# TYPE x_batches counter
x_batches_total 3
# HELP x_lag_seconds Lag.
# TYPE x_lag_seconds histogram
# UNIT x_lag_seconds seconds
x_lag_seconds_sum 1.5
x_lag_seconds_count 1
x_lag_seconds_bucket{le=\"+Inf\"} 1
# HELP x_rejects Refused.
# TYPE x_rejects counter
x_rejects_total{reason=\"a b\"} 1
# HELP x_up Up.
# TYPE x_up gauge
x_up 1
# EOF
";
        assert_eq!(
            prometheus_text(om),
            "\
# HELP x_batches_total Batches applied.
# TYPE x_batches_total counter
x_batches_total 3
# HELP x_lag_seconds Lag.
# TYPE x_lag_seconds histogram
x_lag_seconds_sum 1.5
x_lag_seconds_count 1
x_lag_seconds_bucket{le=\"+Inf\"} 1
# HELP x_rejects_total Refused.
# TYPE x_rejects_total counter
x_rejects_total{reason=\"a b\"} 1
# HELP x_up Up.
# TYPE x_up gauge
x_up 1
"
        );
    }
}
