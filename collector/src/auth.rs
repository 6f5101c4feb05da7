//! Who may call: a shared bearer token and/or TLS client certificates (mTLS).
//!
//! With a token configured, every Ingest and Query call must carry
//! `authorization: Bearer <token>`. With `tls.client_ca`, the TLS handshake asks for a client
//! certificate and verifies any that is offered against the CA (a certificate of another CA
//! fails the handshake); a call over a connection without one is refused with UNAUTHENTICATED.
//! Health checking and reflection stay open (load balancers and `grpcurl` use them).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use tonic::{
    Request, Status,
    service::Interceptor,
    transport::{Certificate, Identity, ServerTlsConfig},
};

use crate::{config::TlsConfig, error::ApiError, metrics::Metrics};

/// A credential file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{field} {path}: {error}")]
    Read {
        field: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{field} {path}: {message}")]
    Invalid {
        field: &'static str,
        path: PathBuf,
        message: &'static str,
    },
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|error| AuthError::Read {
        field,
        path: path.to_path_buf(),
        error,
    })
}

/// Reads a token file: its content without surrounding whitespace, which must be a non-empty
/// single line of visible ASCII.
pub fn load_token(field: &'static str, path: &Path) -> Result<String, AuthError> {
    let invalid = |message| AuthError::Invalid {
        field,
        path: path.to_path_buf(),
        message,
    };
    let text = String::from_utf8(read(field, path)?).map_err(|_| invalid("not UTF-8 text"))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(invalid("empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "must be one word of visible ASCII (no spaces or line breaks inside)",
        ));
    }
    Ok(token.to_owned())
}

/// The tonic TLS settings for `cfg`, or `None` if TLS is off.
pub fn server_tls(cfg: &TlsConfig) -> Result<Option<ServerTlsConfig>, AuthError> {
    let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
        return Ok(None);
    };
    let check_pem = |field, path: &Path, bytes: &[u8]| {
        if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            Ok(())
        } else {
            Err(AuthError::Invalid {
                field,
                path: path.to_path_buf(),
                message: "not a PEM file",
            })
        }
    };
    let cert_pem = read("tls.cert", cert)?;
    check_pem("tls.cert", cert, &cert_pem)?;
    let key_pem = read("tls.key", key)?;
    check_pem("tls.key", key, &key_pem)?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    if let Some(ca) = &cfg.client_ca {
        let ca_pem = read("tls.client_ca", ca)?;
        check_pem("tls.client_ca", ca, &ca_pem)?;
        // Optional at the TLS layer so that a missing certificate gets UNAUTHENTICATED from
        // the interceptor rather than a bare handshake failure.
        tls = tls
            .client_ca_root(Certificate::from_pem(ca_pem))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The interceptor on Ingest and Query.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The expected `authorization` value, `Bearer <token>`.
    expected: Option<Arc<[u8]>>,
    require_client_cert: bool,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// Requires `token` if given, and a verified client certificate if `require_client_cert`.
    pub fn new(token: Option<&str>, require_client_cert: bool, metrics: Arc<Metrics>) -> Self {
        Self {
            expected: token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
            require_client_cert,
            metrics,
        }
    }

    /// Whether any check is configured.
    pub fn is_open(&self) -> bool {
        self.expected.is_none() && !self.require_client_cert
    }

    /// Checks one call.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), ApiError> {
        if self.require_client_cert && request.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(ApiError::Unauthenticated(
                "a client certificate signed by the collector's client CA is required",
            ));
        }
        if let Some(expected) = &self.expected {
            let Some(given) = request.metadata().get("authorization") else {
                return Err(ApiError::Unauthenticated(
                    "missing `authorization: Bearer <token>` metadata",
                ));
            };
            if !same(given.as_bytes(), expected) {
                return Err(ApiError::Unauthenticated("invalid bearer token"));
            }
        }
        Ok(())
    }
}

impl Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self.check(&request) {
            Ok(()) => Ok(request),
            Err(e) => {
                if let Some(reason) = e.reject_reason() {
                    self.metrics.reject(reason);
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks() {
        let m = Arc::new(Metrics::new());
        let auth = Auth::new(Some("s3cret"), false, m.clone());
        let mut req = Request::new(());
        assert!(auth.check(&req).is_err());
        req.metadata_mut()
            .insert("authorization", "Bearer s3cre".parse().unwrap());
        assert!(auth.check(&req).is_err());
        req.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.check(&req).is_ok());
        assert!(Auth::new(None, false, m.clone()).is_open());
        assert!(Auth::new(None, true, m).check(&Request::new(())).is_err());
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, " abc\n").unwrap();
        assert_eq!(load_token("auth.token_file", &p).unwrap(), "abc");
        std::fs::write(&p, "\n").unwrap();
        let e = load_token("auth.token_file", &p).unwrap_err().to_string();
        assert!(
            e.starts_with("auth.token_file ") && e.ends_with(": empty"),
            "{e}"
        );
        std::fs::write(&p, "a b").unwrap();
        assert!(load_token("auth.token_file", &p).is_err());
        let e = load_token("auth.token_file", &dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
