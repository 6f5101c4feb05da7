//! A client of the collector for people and scripts: connecting (token, TLS, mTLS) and
//! printing Query answers as tables (`outflow-collector top`, `outflow-collector client`).
use std::{fmt::Write as _, path::PathBuf, time::Duration};

use outflow_proto::v1::{
    self, alerts_client::AlertsClient as GenAlertsClient,
    query_client::QueryClient as GenQueryClient,
};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::auth::{self, AuthError};

/// How to reach a collector.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `http://host:port` or `https://host:port` (no scheme: http).
    pub server: String,
    /// File with the bearer token.
    pub token_file: Option<PathBuf>,
    /// PEM CA that signed the collector's certificate (needed for https).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for a collector that wants client certificates.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to verify the collector's certificate against (default: the URL's host).
    pub domain: Option<String>,
}

/// The collector cannot be reached or the options are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--server {url:?}: {message}")]
    Url { url: String, message: String },
    #[error(transparent)]
    Credential(#[from] AuthError),
    #[error("{0}")]
    Options(&'static str),
    #[error("cannot connect to {url}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A token (it must be visible ASCII, as [`auth::load_token`] checks).
    pub fn new(token: &str) -> Option<Self> {
        format!("Bearer {token}")
            .parse()
            .ok()
            .map(|v| Self(Some(v)))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A Query client that sends the token.
pub type QueryClient = GenQueryClient<InterceptedService<Channel, BearerToken>>;
/// An Alerts client that sends the bearer token, if any.
pub type AlertsClient = GenAlertsClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the collector.
pub async fn connect(opts: &ClientOptions) -> Result<(Channel, BearerToken), ClientError> {
    let url = if opts.server.contains("://") {
        opts.server.clone()
    } else {
        format!("http://{}", opts.server)
    };
    let bad = |message: String| ClientError::Url {
        url: opts.server.clone(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let Some(ca) = &opts.ca else {
            return Err(ClientError::Options(
                "an https server needs --ca (the PEM CA of the collector's certificate)",
            ));
        };
        let read = |field, p: &PathBuf| {
            std::fs::read(p).map_err(|error| AuthError::Read {
                field,
                path: p.clone(),
                error,
            })
        };
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--ca", ca)?));
        match (&opts.cert, &opts.key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(Identity::from_pem(read("--cert", c)?, read("--key", k)?));
            }
            (None, None) => {}
            _ => return Err(ClientError::Options("--cert and --key go together")),
        }
        if let Some(d) = &opts.domain {
            tls = tls.domain_name(d.clone());
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    } else if !url.starts_with("http://") {
        return Err(bad("the scheme must be http or https".into()));
    } else if opts.cert.is_some() || opts.ca.is_some() {
        return Err(ClientError::Options(
            "--ca, --cert and --key need an https:// server",
        ));
    }
    let token = match &opts.token_file {
        Some(p) => {
            let t = auth::load_token("--token-file", p)?;
            BearerToken::new(&t).unwrap_or_default()
        }
        None => BearerToken::default(),
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ClientError::Connect { url, source })?;
    Ok((channel, token))
}

/// Connects a Query client.
pub async fn query_client(opts: &ClientOptions) -> Result<QueryClient, ClientError> {
    let (channel, token) = connect(opts).await?;
    Ok(GenQueryClient::with_interceptor(channel, token))
}

/// Connects an Alerts client.
pub async fn alerts_client(opts: &ClientOptions) -> Result<AlertsClient, ClientError> {
    let (channel, token) = connect(opts).await?;
    Ok(GenAlertsClient::with_interceptor(channel, token))
}

/// One line per alert: state, severity, detector, key, observed bytes, then its summary (a
/// service alert's detector reads `service/DETECTOR`).
pub fn alerts_table(r: &v1::ListAlertsResponse, exact: bool) -> String {
    let mut out = String::new();
    for a in &r.alerts {
        let state = if a.state == v1::AlertState::Open as i32 {
            "OPEN"
        } else {
            "resolved"
        };
        let service = a.scope == v1::Scope::Service as i32;
        let severity = v1::Severity::try_from(a.severity)
            .map_or("?", |s| s.as_str_name().trim_start_matches("SEVERITY_"));
        let detector = v1::Detector::try_from(a.detector)
            .map_or("?", |d| d.as_str_name().trim_start_matches("DETECTOR_"));
        let detector = if service {
            format!("service/{detector}")
        } else {
            detector.to_owned()
        };
        let _ = writeln!(
            out,
            "{state:<8} {severity:<8} {detector:<19} {:<22} {:>12}  {}",
            a.key,
            bytes(a.observed_bytes, exact),
            a.summary
        );
    }
    out
}

/// `1.50 GiB`, or the exact number with `exact`.
pub fn bytes(n: u64, exact: bool) -> String {
    if exact || n < 1024 {
        return format!("{n} B");
    }
    let units = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64 / 1024.0;
    let mut unit = units[0];
    for u in &units[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.2} {unit}")
}

fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(l, "{c:<w$}");
            } else {
                let _ = write!(l, "  {c:>w$}");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// A TopTalkers answer as a table.
pub fn top_table(group: &str, window: &str, r: &v1::TopTalkersResponse, exact: bool) -> String {
    let mut out = format!(
        "top {} by response bytes, window {window} ending {} (batch time)\n",
        group,
        time(r.window_end_ms)
    );
    if r.talkers.is_empty() {
        out.push_str("(no traffic in this window)\n");
        return out;
    }
    let rows: Vec<Vec<String>> = r
        .talkers
        .iter()
        .map(|t| {
            vec![
                t.key.clone(),
                bytes(t.response_bytes, exact),
                bytes(t.request_bytes, exact),
                t.connections_closed.to_string(),
                t.hosts.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["KEY", "RESPONSE", "REQUEST", "CLOSED", "HOSTS"],
        &rows,
    ));
    out
}

/// A ClientStats answer as a table.
pub fn client_table(r: &v1::ClientStatsResponse, exact: bool) -> String {
    let mut out = format!("client {}\n", r.client);
    let rows: Vec<Vec<String>> = r
        .windows
        .iter()
        .map(|w| {
            let name = match v1::Window::try_from(w.window) {
                Ok(v1::Window::Window1m) => "1m",
                Ok(v1::Window::Window10m) => "10m",
                Ok(v1::Window::Window1h) => "1h",
                Ok(v1::Window::Window24h) => "24h",
                _ => "?",
            };
            vec![
                name.to_owned(),
                bytes(w.response_bytes, exact),
                bytes(w.request_bytes, exact),
                w.connections_closed.to_string(),
                w.hosts.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["WINDOW", "RESPONSE", "REQUEST", "CLOSED", "HOSTS"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(1023, false), "1023 B");
        assert_eq!(bytes(1536, false), "1.50 KiB");
        assert_eq!(bytes(3 << 30, false), "3.00 GiB");
        assert_eq!(bytes(3 << 30, true), "3221225472 B");
        let r = v1::TopTalkersResponse {
            window_end_ms: 1_750_000_000_000,
            talkers: vec![v1::Talker {
                key: "203.0.113.0/24".into(),
                response_bytes: 5 << 20,
                request_bytes: 10,
                connections_closed: 2,
                hosts: 1,
            }],
        };
        let t = top_table("client-prefix", "1h", &r, false);
        assert!(t.contains("2025-06-15T15:06:40Z"), "{t}");
        assert!(
            t.contains("203.0.113.0/24  5.00 MiB     10 B       2      1"),
            "{t}"
        );
    }
}
