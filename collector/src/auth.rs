//! Who may call: bearer tokens and/or TLS client certificates (mTLS).
//!
//! Three kinds of token, each from a file of its own that only its owner may read:
//!
//! * agent tokens (`auth.agent_tokens_file`, a line `AGENT_ID TOKEN` each): Ingest only, and
//!   only under that agent id (a Hello with another id gets PERMISSION_DENIED);
//! * the read token (`auth.read_token_file`): Query and Alerts only;
//! * the shared token (`auth.token_file`): everything, under any agent id.
//!
//! With any token configured, every Ingest, Query and Alerts call must carry
//! `authorization: Bearer <token>`: an unknown token gets UNAUTHENTICATED, a known one on the
//! wrong service PERMISSION_DENIED. Tokens are compared in constant time (`subtle`). With
//! `tls.client_ca`, the TLS handshake asks for a client certificate and verifies any that is
//! offered against the CA (a certificate of another CA fails the handshake); a call over a
//! connection without one is refused with UNAUTHENTICATED. Health checking and reflection
//! stay open (load balancers and `grpcurl` use them).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use subtle::ConstantTimeEq as _;
use tonic::{
    Request, Status,
    service::Interceptor,
    transport::{Certificate, Identity, ServerTlsConfig},
};

use crate::{
    config::{AuthConfig, TlsConfig},
    error::ApiError,
    metrics::Metrics,
    model::MAX_AGENT_ID_CHARS,
};

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
        message: String,
    },
    #[error(
        "{field} {path}: readable or writable by group or others (mode {mode:04o}): run `chmod 600 {path}` (and make its owner the collector's user)"
    )]
    Loose {
        field: &'static str,
        path: PathBuf,
        mode: u32,
    },
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|error| AuthError::Read {
        field,
        path: path.to_path_buf(),
        error,
    })
}

/// Reads a secret file (a token or a private key), refusing one that group or others may
/// read or write.
fn read_secret(field: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|error| AuthError::Read {
        field,
        path: path.to_path_buf(),
        error,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Loose {
            field,
            path: path.to_path_buf(),
            mode,
        });
    }
    read(field, path)
}

/// A secret text file, and how to report what is wrong inside it.
pub(crate) fn read_secret_text(
    field: &'static str,
    path: &Path,
) -> Result<(String, impl Fn(String) -> AuthError), AuthError> {
    let invalid = move |message: String| AuthError::Invalid {
        field,
        path: path.to_path_buf(),
        message,
    };
    let text = String::from_utf8(read_secret(field, path)?)
        .map_err(|_| invalid("not UTF-8 text".into()))?;
    Ok((text, invalid))
}

/// Whether a token is usable: one word of visible ASCII.
fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("empty".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be one word of visible ASCII (no spaces or line breaks inside)".into());
    }
    Ok(())
}

/// Reads a token file: its content without surrounding whitespace, which must be a non-empty
/// single line of visible ASCII.
/// Group and others must not be able to read or write it.
pub fn load_token(field: &'static str, path: &Path) -> Result<String, AuthError> {
    let (text, invalid) = read_secret_text(field, path)?;
    let token = text.trim();
    check_token(token).map_err(invalid)?;
    Ok(token.to_owned())
}

/// Reads an agent tokens file: a line `AGENT_ID TOKEN` per agent (blank lines and lines
/// starting with `#` aside); every token used once. Group and others must not be able to
/// read or write it.
pub fn load_agent_tokens(
    field: &'static str,
    path: &Path,
) -> Result<Vec<(String, String)>, AuthError> {
    let (text, invalid) = read_secret_text(field, path)?;
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |m: String| invalid(format!("line {}: {m}", i + 1));
        let mut words = line.split_ascii_whitespace();
        let (Some(agent), Some(token), None) = (words.next(), words.next(), words.next()) else {
            return Err(at("want `AGENT_ID TOKEN`".into()));
        };
        if agent.chars().count() > MAX_AGENT_ID_CHARS {
            return Err(at(format!(
                "agent id longer than {MAX_AGENT_ID_CHARS} characters"
            )));
        }
        check_token(token).map_err(at)?;
        if out.iter().any(|(_, t)| t == token) {
            return Err(at(
                "the same token as an earlier line: give every agent its own".into(),
            ));
        }
        out.push((agent.to_owned(), token.to_owned()));
    }
    if out.is_empty() {
        return Err(invalid("no `AGENT_ID TOKEN` line".into()));
    }
    Ok(out)
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
                message: "not a PEM file".into(),
            })
        }
    };
    let cert_pem = read("tls.cert", cert)?;
    check_pem("tls.cert", cert, &cert_pem)?;
    let key_pem = read_secret("tls.key", key)?;
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

/// Whether two byte strings are equal, in time independent of where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    bool::from(a.ct_eq(b))
}

/// What a service takes: Ingest, or reading (Query, Alerts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Read,
}

/// An agent id a credential binds an Ingest stream to, put in the request's extensions (one
/// per credential: a stream with an agent token over a certificate has two, and its Hello
/// must satisfy both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAgent {
    /// An agent token: the agent id it was issued to.
    Token(Arc<str>),
    /// A client certificate: the names it carries (subject common names, DNS subjectAltNames).
    Certificate(Arc<[String]>),
}

impl BoundAgent {
    /// Whether a Hello may name `agent_id`.
    pub fn allows(&self, agent_id: &str) -> bool {
        match self {
            BoundAgent::Token(id) => **id == *agent_id,
            BoundAgent::Certificate(names) => names.iter().any(|n| n == agent_id),
        }
    }

    /// Why a Hello naming `agent_id` is refused.
    pub fn refusal(&self, agent_id: &str) -> String {
        match self {
            BoundAgent::Token(id) => {
                format!("this token is agent {id:?}'s: it may not send as agent {agent_id:?}")
            }
            BoundAgent::Certificate(names) => format!(
                "the client certificate names {names:?}: it may not send as agent {agent_id:?} (put the agent id in the certificate's CN or a DNS subjectAltName, or set tls.agent_id_from_cert = false)"
            ),
        }
    }
}

/// The names of a DER client certificate an agent id may take: its subject's common names
/// and the DNS names of its subjectAltName.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    names.retain(|n| !n.is_empty() && n.chars().count() <= MAX_AGENT_ID_CHARS);
    names.dedup();
    Ok(names)
}

/// What the collector asks of client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// Nothing (no `tls.client_ca`).
    Off,
    /// A certificate of the client CA on every call.
    Required,
    /// Required, and an Ingest stream may only send as an agent id its certificate names.
    BindAgentId,
}

impl ClientCerts {
    /// What `cfg` asks for.
    pub fn of(cfg: &TlsConfig) -> Self {
        match (cfg.client_ca.is_some(), cfg.agent_id_from_cert) {
            (false, _) => ClientCerts::Off,
            (true, false) => ClientCerts::Required,
            (true, true) => ClientCerts::BindAgentId,
        }
    }
}

/// Every token, loaded once and shared by the interceptors.
#[derive(Debug, Default)]
pub struct Tokens {
    /// `Bearer <token>` values.
    shared: Option<Vec<u8>>,
    read: Option<Vec<u8>>,
    agents: Vec<(Arc<str>, Vec<u8>)>,
}

impl Tokens {
    /// Loads the token files of `cfg` (each refused if group or others may read it).
    pub fn load(cfg: &AuthConfig) -> Result<Tokens, AuthError> {
        let bearer = |t: String| format!("Bearer {t}").into_bytes();
        let one = |field, p: &Option<PathBuf>| {
            p.as_deref()
                .map(|p| load_token(field, p).map(bearer))
                .transpose()
        };
        let agents = match &cfg.agent_tokens_file {
            None => Vec::new(),
            Some(p) => load_agent_tokens("auth.agent_tokens_file", p)?
                .into_iter()
                .map(|(a, t)| (Arc::from(a), bearer(t)))
                .collect(),
        };
        let tokens = Tokens {
            shared: one("auth.token_file", &cfg.token_file)?,
            read: one("auth.read_token_file", &cfg.read_token_file)?,
            agents,
        };
        Ok(tokens)
    }

    /// Tokens given directly (tests, examples): the shared one.
    pub fn shared(token: &str) -> Tokens {
        Tokens {
            shared: Some(format!("Bearer {token}").into_bytes()),
            ..Tokens::default()
        }
    }

    /// No token is configured: calls need none.
    pub fn is_empty(&self) -> bool {
        self.shared.is_none() && self.read.is_none() && self.agents.is_empty()
    }

    /// Whether an `Authorization` value may read (the dashboard's API): always when no token
    /// is configured, else only the shared or the read token.
    pub fn may_read(&self, authorization: Option<&[u8]>) -> bool {
        self.is_empty()
            || matches!(
                authorization.and_then(|a| self.find(a)),
                Some(Found::Shared | Found::Read)
            )
    }

    /// Which token `given` is: every token is compared, each in constant time.
    fn find(&self, given: &[u8]) -> Option<Found> {
        let mut found = None;
        if self.shared.as_deref().is_some_and(|t| same(given, t)) {
            found = Some(Found::Shared);
        }
        if self.read.as_deref().is_some_and(|t| same(given, t)) {
            found = found.or(Some(Found::Read));
        }
        for (agent, t) in &self.agents {
            if same(given, t) {
                found = found.or_else(|| Some(Found::Agent(agent.clone())));
            }
        }
        found
    }
}

enum Found {
    Shared,
    Read,
    Agent(Arc<str>),
}

/// The interceptor of one service: Ingest, or the reading ones.
#[derive(Debug, Clone)]
pub struct Auth {
    tokens: Arc<Tokens>,
    role: Role,
    certs: ClientCerts,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// Requires one of `tokens` that may take `role` if any is configured, and a verified
    /// client certificate as `certs` says.
    pub fn new(tokens: Arc<Tokens>, role: Role, certs: ClientCerts, metrics: Arc<Metrics>) -> Self {
        Self {
            tokens,
            role,
            certs,
            metrics,
        }
    }

    /// Whether any check is configured.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty() && self.certs == ClientCerts::Off
    }

    /// Checks one call; for Ingest, the agent ids its credentials bind it to (none: any).
    pub fn check<T>(&self, request: &Request<T>) -> Result<Vec<BoundAgent>, ApiError> {
        let mut bound = Vec::new();
        if self.certs != ClientCerts::Off {
            let certs = request.peer_certs();
            let Some(leaf) = certs.as_deref().and_then(|c| c.first()) else {
                return Err(ApiError::Unauthenticated(
                    "a client certificate signed by the collector's client CA is required",
                ));
            };
            if self.certs == ClientCerts::BindAgentId && self.role == Role::Ingest {
                let names = certificate_names(leaf).map_err(|e| {
                    ApiError::PermissionDenied(format!("the client certificate: {e}"))
                })?;
                bound.push(BoundAgent::Certificate(names.into()));
            }
        }
        if let Some(token) = self.check_token(request)? {
            bound.push(token);
        }
        Ok(bound)
    }

    /// The token check of one call; for Ingest with an agent token, its agent id.
    fn check_token<T>(&self, request: &Request<T>) -> Result<Option<BoundAgent>, ApiError> {
        if self.tokens.is_empty() {
            return Ok(None);
        }
        let Some(given) = request.metadata().get("authorization") else {
            return Err(ApiError::Unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            ));
        };
        match (self.tokens.find(given.as_bytes()), self.role) {
            (None, _) => Err(ApiError::Unauthenticated("invalid bearer token")),
            (Some(Found::Shared), _) | (Some(Found::Read), Role::Read) => Ok(None),
            (Some(Found::Agent(a)), Role::Ingest) => Ok(Some(BoundAgent::Token(a))),
            (Some(Found::Agent(_)), Role::Read) => Err(ApiError::PermissionDenied(
                "an agent's token may only ingest: read with the token of auth.read_token_file"
                    .into(),
            )),
            (Some(Found::Read), Role::Ingest) => Err(ApiError::PermissionDenied(
                "the read token may not ingest: agents use their own token (auth.agent_tokens_file)"
                    .into(),
            )),
        }
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.check(&request) {
            Ok(bound) => {
                if !bound.is_empty() {
                    request.extensions_mut().insert(bound);
                }
                Ok(request)
            }
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

    use std::os::unix::fs::PermissionsExt as _;

    fn with(token: &str) -> Request<()> {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    }

    #[test]
    fn token_checks() {
        let m = Arc::new(Metrics::new());
        let auth = Auth::new(
            Arc::new(Tokens::shared("s3cret")),
            Role::Ingest,
            ClientCerts::Off,
            m.clone(),
        );
        assert!(auth.check(&Request::new(())).is_err());
        assert!(auth.check(&with("s3cre")).is_err());
        assert_eq!(auth.check(&with("s3cret")).unwrap(), []);
        let none = Arc::new(Tokens::default());
        assert!(Auth::new(none.clone(), Role::Read, ClientCerts::Off, m.clone()).is_open());
        assert!(
            Auth::new(none, Role::Read, ClientCerts::Required, m)
                .check(&Request::new(()))
                .is_err()
        );
    }

    #[test]
    fn each_token_has_its_role_and_an_agent_token_its_agent() {
        let m = Arc::new(Metrics::new());
        let tokens = Arc::new(Tokens {
            shared: None,
            read: Some(b"Bearer r".to_vec()),
            agents: vec![
                (Arc::from("gpu-1"), b"Bearer a1".to_vec()),
                (Arc::from("gpu-2"), b"Bearer a2".to_vec()),
            ],
        });
        let ingest = Auth::new(tokens.clone(), Role::Ingest, ClientCerts::Off, m.clone());
        let read = Auth::new(tokens, Role::Read, ClientCerts::Off, m);
        assert_eq!(
            ingest.check(&with("a2")).unwrap(),
            [BoundAgent::Token(Arc::from("gpu-2"))]
        );
        let denied = |r: Result<_, ApiError>| matches!(r, Err(ApiError::PermissionDenied(_)));
        assert!(denied(ingest.check(&with("r"))));
        assert!(denied(read.check(&with("a1"))));
        assert_eq!(read.check(&with("r")).unwrap(), []);
        assert!(matches!(
            read.check(&with("x")),
            Err(ApiError::Unauthenticated(_))
        ));
    }

    #[test]
    fn a_certificate_names_its_common_names_and_dns_alt_names() {
        use rcgen::{CertificateParams, DnType, KeyPair, SanType};
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["gpu-7".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "host-a");
        p.subject_alt_names
            .push(SanType::IpAddress("192.0.2.7".parse().unwrap()));
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(certificate_names(&der).unwrap(), ["host-a", "gpu-7"]);
        let bound = BoundAgent::Certificate(certificate_names(&der).unwrap().into());
        assert!(bound.allows("gpu-7") && bound.allows("host-a") && !bound.allows("gpu-8"));
        assert!(certificate_names(b"not a certificate").is_err());
    }

    fn private(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn secret_files_only_their_owner_may_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        private(&p, "abc\n");
        assert_eq!(load_token("auth.token_file", &p).unwrap(), "abc");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_token("auth.token_file", &p).unwrap_err().to_string();
        assert!(
            e.contains("readable or writable by group or others (mode 0640)")
                && e.contains("chmod 600"),
            "{e}"
        );
    }

    #[test]
    fn agent_tokens_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agents");
        let f = "auth.agent_tokens_file";
        private(&p, "# fleet\ngpu-1 tok1\n\n  gpu-2\ttok2  \n");
        assert_eq!(
            load_agent_tokens(f, &p).unwrap(),
            [
                ("gpu-1".into(), "tok1".into()),
                ("gpu-2".into(), "tok2".into())
            ]
        );
        for (text, want) in [
            ("gpu-1 tok1\ngpu-2 tok1\n", "line 2: the same token"),
            ("gpu-1\n", "line 1: want `AGENT_ID TOKEN`"),
            ("gpu-1 a b\n", "line 1: want"),
            ("# nothing\n", "no `AGENT_ID TOKEN` line"),
        ] {
            private(&p, text);
            let e = load_agent_tokens(f, &p).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        private(&p, " abc\n");
        assert_eq!(load_token("auth.token_file", &p).unwrap(), "abc");
        private(&p, "\n");
        let e = load_token("auth.token_file", &p).unwrap_err().to_string();
        assert!(
            e.starts_with("auth.token_file ") && e.ends_with(": empty"),
            "{e}"
        );
        private(&p, "a b");
        assert!(load_token("auth.token_file", &p).is_err());
        let e = load_token("auth.token_file", &dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
