//! The webhook sink: every alert change (open, significant update, resolve) is POSTed as JSON
//! to `webhook.url` (`http://` or `https://`; the receiver's certificate is verified against the
//! system's roots, or `webhook.tls_ca`), with the `Authorization` header read from
//! `webhook.auth_header_file` if set, up to `webhook.max_attempts` attempts and exponential
//! backoff from `webhook.initial_backoff` (doubling, at most 30 s). A change that still fails,
//! or that a slow receiver made the sink skip, is logged and counted
//! (`outflow_collector_webhook_dropped_total`); alerts stay available from List and Watch.
//!
//! A collector that judges the same alert changes again (a cluster aggregator replaying its
//! partitions from the stream) gives the sink a [`Delivered`] record: a change the receiver
//! accepted before is not sent again (`outflow_collector_webhook_already_delivered_total`).
//!
//! The HTTP client is reqwest (hyper underneath) with rustls on the ring provider, the one
//! tonic's TLS already uses here.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::future::BoxFuture;
use log::{debug, warn};
use outflow_proto::v1;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::{
    alerts::AlertHub,
    auth::{self, AuthError},
    config_error::{ConfigError, invalid},
    metrics::Metrics,
};

const MAX_BACKOFF: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(10);

/// `[webhook]`: where alert changes are POSTed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host:port/path` or `https://...`; none: no webhook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// File holding the `Authorization` header's value (`Bearer ...`, `Basic ...`), private to
    /// the collector's user (mode 600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_header_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify an https receiver with, instead of the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Service alerts too (workload volume changes); by default only client alerts are sent.
    pub include_service: bool,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: None,
            auth_header_file: None,
            tls_ca: None,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            include_service: false,
        }
    }
}

impl WebhookConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.url {
            parse_url(url).map_err(|m| invalid("webhook.url", m))?;
        }
        if self.max_attempts == 0 {
            return Err(invalid("webhook.max_attempts", "must be at least 1"));
        }
        Ok(())
    }
}

/// Checks a webhook URL: `http://` or `https://`, with a host.
pub fn parse_url(url: &str) -> Result<reqwest::Url, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "{url:?}: only http:// and https:// URLs are supported"
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?}: no host"));
    }
    Ok(u)
}

/// The webhook's files or TLS setup cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    File(#[from] AuthError),
    #[error("webhook.auth_header_file {path}: {message}")]
    Header { path: PathBuf, message: String },
    #[error("webhook.tls_ca {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("webhook.url: {0}")]
    Url(String),
    #[error("webhook HTTP client: {0}")]
    Client(String),
}

/// Where and how alert changes are sent.
#[derive(Clone, Debug)]
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    authorization: Option<HeaderValue>,
}

impl Webhook {
    /// Reads the header and CA files and builds the client; `None` without a URL.
    pub fn new(cfg: &WebhookConfig) -> Result<Option<Self>, WebhookError> {
        let Some(url) = &cfg.url else {
            return Ok(None);
        };
        let url = parse_url(url).map_err(WebhookError::Url)?;
        let authorization = cfg
            .auth_header_file
            .as_deref()
            .map(read_auth_header)
            .transpose()?;
        let tls = tls_config(cfg.tls_ca.as_deref())?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(TIMEOUT)
            .user_agent(concat!("outflow-collector/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        if authorization.is_some() && url.scheme() == "http" {
            warn!("webhook: the Authorization header is sent to {url} unencrypted: use https://");
        }
        Ok(Some(Self {
            client,
            url,
            authorization,
        }))
    }

    /// The URL, for logs.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    async fn post_once(&self, body: &str) -> Result<(), String> {
        let mut req = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_owned());
        if let Some(a) = &self.authorization {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let resp = req.send().await.map_err(|e| chain(&e))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP status {}", status.as_u16()))
        }
    }
}

/// An error and its sources, `: `-joined (reqwest's own message omits the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

fn read_auth_header(path: &Path) -> Result<HeaderValue, WebhookError> {
    let (text, _) = auth::read_secret_text("webhook.auth_header_file", path)?;
    let bad = |message: &str| WebhookError::Header {
        path: path.to_path_buf(),
        message: message.to_owned(),
    };
    let value = text.trim();
    if value.is_empty() {
        return Err(bad(
            "empty: want the Authorization header's value, e.g. `Bearer <token>`",
        ));
    }
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| bad("not a valid header value (one line of visible ASCII)"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// rustls on the ring provider, verifying with `ca` or the system's roots.
fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, WebhookError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let bad = |message: String| WebhookError::Ca {
                path: path.to_path_buf(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let mut n = 0;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
                n += 1;
            }
            if n == 0 {
                return Err(bad("no CERTIFICATE in it".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                warn!(
                    "webhook: no system root certificates found: https receivers cannot be verified (set webhook.tls_ca)"
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The JSON body of one alert.
pub fn body(a: &v1::Alert) -> String {
    let name = |r: Result<&'static str, ()>| r.unwrap_or("UNSPECIFIED");
    serde_json::json!({
        "id": a.id,
        "key": a.key,
        "detector": name(v1::Detector::try_from(a.detector).map(|d| d.as_str_name()).map_err(|_| ())),
        "severity": name(v1::Severity::try_from(a.severity).map(|d| d.as_str_name()).map_err(|_| ())),
        "state": name(v1::AlertState::try_from(a.state).map(|d| d.as_str_name()).map_err(|_| ())),
        "scope": name(v1::Scope::try_from(a.scope).map(|d| d.as_str_name()).map_err(|_| ())),
        "window_seconds": a.window_seconds,
        "observed_bytes": a.observed_bytes,
        "baseline_bytes": a.baseline_bytes,
        "threshold_bytes": a.threshold_bytes,
        "request_bytes": a.request_bytes,
        "peak_bytes": a.peak_bytes,
        "episode_bytes": a.episode_bytes,
        "hosts": a.hosts,
        "members": a.members,
        "client_id": a.client_id,
        "client_addrs": a.client_addrs,
        "client_addr_count": a.client_addr_count,
        "peers": a.peers,
        "peer_count": a.peer_count,
        "first_seen_ms": a.first_seen_ms,
        "last_seen_ms": a.last_seen_ms,
        "summary": a.summary,
    })
    .to_string()
}

/// What the webhook receiver accepted already, remembered beyond this process (for a collector
/// that can judge the same alert changes again: see [`crate::cluster::delivered`]).
pub trait Delivered: Send + Sync + 'static {
    /// Whether this change of `a` (or a later one) was delivered.
    fn was_delivered<'a>(&'a self, a: &'a v1::Alert) -> BoxFuture<'a, Result<bool, String>>;
    /// Records that this change of `a` was delivered.
    fn record<'a>(&'a self, a: &'a v1::Alert) -> BoxFuture<'a, Result<(), String>>;
}

/// Sends `a` unless `delivered` says it was; records it once accepted.
async fn deliver(
    hook: &Webhook,
    cfg: &WebhookConfig,
    metrics: &Metrics,
    delivered: Option<&dyn Delivered>,
    a: &v1::Alert,
) {
    let Some(log) = delivered else {
        post(hook, cfg, metrics, a).await;
        return;
    };
    match log.was_delivered(a).await {
        Ok(true) => {
            debug!("webhook: alert {} was delivered before", a.id);
            metrics.webhook_already_delivered.inc();
            return;
        }
        Ok(false) => {}
        Err(e) => {
            // Sent: a duplicate rather than a missed alert.
            metrics.webhook_delivery_log_failures.inc();
            warn!(
                "webhook: cannot tell whether alert {} was delivered before ({e}): sending it (outflow_collector_webhook_delivery_log_failures_total)",
                a.id
            );
        }
    }
    if post(hook, cfg, metrics, a).await
        && let Err(e) = log.record(a).await
    {
        metrics.webhook_delivery_log_failures.inc();
        warn!(
            "webhook: alert {} delivered but not recorded ({e}): a replay would send it again (outflow_collector_webhook_delivery_log_failures_total)",
            a.id
        );
    }
}

/// POSTs `a` with retries; true once the receiver accepted it.
async fn post(hook: &Webhook, cfg: &WebhookConfig, metrics: &Metrics, a: &v1::Alert) -> bool {
    let body = body(a);
    let mut backoff = cfg.initial_backoff;
    for attempt in 1..=cfg.max_attempts.max(1) {
        match hook.post_once(&body).await {
            Ok(()) => {
                debug!("webhook: alert {} sent", a.id);
                metrics.webhook_sent.inc();
                return true;
            }
            Err(e) => warn!("webhook: alert {} attempt {attempt}: {e}", a.id),
        }
        if attempt < cfg.max_attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    metrics.webhook_dropped.inc();
    warn!(
        "webhook: alert {} dropped after {} attempts (outflow_collector_webhook_dropped_total)",
        a.id, cfg.max_attempts
    );
    false
}

/// Sends every alert change of `hub` to the webhook until `shutdown`, but those `delivered`
/// says were sent before.
pub fn spawn(
    hub: &Arc<AlertHub>,
    hook: Webhook,
    cfg: WebhookConfig,
    metrics: Arc<Metrics>,
    delivered: Option<Arc<dyn Delivered>>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut rx = hub.subscribe();
    tokio::spawn(async move {
        shutdown
            .run_until_cancelled(async {
                loop {
                    match rx.recv().await {
                        Ok(a) if !AlertHub::wanted(&a, cfg.include_service) => {}
                        Ok(a) => deliver(&hook, &cfg, &metrics, delivered.as_deref(), &a).await,
                        Err(RecvError::Lagged(n)) => {
                            metrics.webhook_dropped.inc_by(n);
                            warn!(
                                "webhook: {n} alert changes skipped (sink too slow; outflow_collector_webhook_dropped_total)"
                            );
                        }
                        Err(RecvError::Closed) => return,
                    }
                }
            })
            .await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(parse_url("http://hooks.local:8080/outflow").is_ok());
        assert!(parse_url("https://hooks.local/outflow").is_ok());
        assert!(
            parse_url("ftp://h/")
                .unwrap_err()
                .contains("only http:// and https://")
        );
        assert!(parse_url("http://").is_err());
        assert!(parse_url("hooks.local/x").is_err());
    }

    #[test]
    fn a_loose_or_bad_header_file_is_refused_in_one_line() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("auth");
        std::fs::write(&p, "Bearer abc\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_auth_header(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_auth_header(&p).unwrap(), "Bearer abc");
        std::fs::write(&p, "Bearer a\nb\n").unwrap();
        let e = read_auth_header(&p).unwrap_err().to_string();
        assert!(e.contains("header value"), "{e}");
    }
}
