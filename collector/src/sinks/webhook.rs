//! The webhook sink: every alert change (open, significant update, resolve) is POSTed as JSON
//! to `webhook.url` (plain `http://` only; put a TLS proxy in front for https), with up
//! to `webhook.max_attempts` attempts and exponential backoff from
//! `webhook.initial_backoff` (doubling, at most 30 s). A change that still fails is
//! logged and dropped; alerts stay available from List and Watch.
use std::{sync::Arc, time::Duration};

use log::{debug, warn};
use outflow_proto::v1;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::broadcast::error::RecvError,
};
use tokio_util::sync::CancellationToken;

use crate::{
    alerts::AlertHub,
    config_error::{ConfigError, invalid},
};

const MAX_BACKOFF: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(10);

/// `[webhook]`: where alert changes are POSTed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://host:port/path`; none: no webhook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
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
            Target::parse(url).map_err(|m| invalid("webhook.url", m))?;
        }
        if self.max_attempts == 0 {
            return Err(invalid("webhook.max_attempts", "must be at least 1"));
        }
        Ok(())
    }
}

/// A parsed `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub authority: String,
    pub path: String,
}

impl Target {
    /// Parses `http://host[:port][/path]`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Target {
            authority,
            path: path.to_owned(),
        })
    }
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

async fn post_once(t: &Target, body: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(&t.authority)
        .await
        .map_err(|e| format!("connect {}: {e}", t.authority))?;
    let req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        t.path,
        t.authority,
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let m = s
            .read(&mut head[n..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if m == 0 {
            break;
        }
        n += m;
    }
    let status = std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(c) if (200..300).contains(&c) => Ok(()),
        Some(c) => Err(format!("HTTP status {c}")),
        None => Err("no HTTP status line".into()),
    }
}

async fn post(t: &Target, cfg: &WebhookConfig, a: &v1::Alert) {
    let body = body(a);
    let mut backoff = cfg.initial_backoff;
    for attempt in 1..=cfg.max_attempts.max(1) {
        match tokio::time::timeout(TIMEOUT, post_once(t, &body)).await {
            Ok(Ok(())) => {
                debug!("webhook: alert {} sent", a.id);
                return;
            }
            Ok(Err(e)) => warn!("webhook: alert {} attempt {attempt}: {e}", a.id),
            Err(_) => warn!("webhook: alert {} attempt {attempt}: timed out", a.id),
        }
        if attempt < cfg.max_attempts {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    warn!(
        "webhook: alert {} dropped after {} attempts",
        a.id, cfg.max_attempts
    );
}

/// Sends every alert change of `hub` to the webhook until `shutdown`.
pub fn spawn(
    hub: &Arc<AlertHub>,
    target: Target,
    cfg: WebhookConfig,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut rx = hub.subscribe();
    tokio::spawn(async move {
        shutdown
            .run_until_cancelled(async {
                loop {
                    match rx.recv().await {
                        Ok(a) if !AlertHub::wanted(&a, cfg.include_service) => {}
                        Ok(a) => post(&target, &cfg, &a).await,
                        Err(RecvError::Lagged(n)) => {
                            warn!("webhook: {n} alert changes skipped (sink too slow)");
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
        let t = Target::parse("http://hooks.local:8080/outflow").unwrap();
        assert_eq!(t.authority, "hooks.local:8080");
        assert_eq!(t.path, "/outflow");
        assert_eq!(Target::parse("http://h").unwrap().authority, "h:80");
        assert!(Target::parse("https://h/").is_err());
        assert!(Target::parse("http:///x").is_err());
    }
}
