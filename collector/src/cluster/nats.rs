//! How a node connects to the NATS servers: their addresses, its credentials and TLS.
//!
//! Every connection of a node (the parts' stream, the buckets, the fan-out's directory) is made
//! here, from `[cluster]`: a user and password, a token, an NKey seed or a credentials file (a
//! user's JWT and seed, for servers in operator mode), read from files at start (never in the
//! config file or a log), and TLS with the servers verified against `nats_ca` (else the
//! system's roots, for `tls://` URLs) and this node's certificate presented to servers that
//! verify clients. A node whose credentials or TLS the servers refuse fails at start with a
//! line that says which setting to check; a server that does not answer yet is waited for. A
//! subject the servers refuse the node's user later is logged with the command that prints
//! what the user needs (`super::permissions`).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use async_nats::{ConnectErrorKind, ConnectOptions};

use crate::auth::{self, AuthError};

/// What a node connects to NATS with (from `[cluster]`, see [`super::config::ClusterConfig`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsConnect {
    /// This node's role (`ingest`, `aggregator`) and name: the connection is named
    /// `outflow-collector <role> <node>` in the servers' monitoring and logs, so that an
    /// operator tells the nodes' connections apart.
    pub role: &'static str,
    pub node: String,
    /// NATS servers (`nats://host:port`, `tls://host:port`), any of the cluster's.
    pub urls: Vec<String>,
    /// How often the server is pinged: with two pings unanswered the client connects to
    /// another server, so a node leaves a server cut off from the network within about three
    /// intervals.
    pub ping_interval: Duration,
    /// The user this node authenticates as, with the password in `password_file`.
    pub user: String,
    pub password_file: Option<PathBuf>,
    /// A file holding the token this node authenticates with.
    pub token_file: Option<PathBuf>,
    /// A file holding the NKey user seed this node signs the servers' challenge with.
    pub nkey_file: Option<PathBuf>,
    /// A credentials file (a user's JWT and its NKey seed) for servers in operator mode.
    pub creds_file: Option<PathBuf>,
    /// PEM CA certificates the servers' certificates are verified against; set, TLS is
    /// required.
    pub ca: Option<PathBuf>,
    /// This node's certificate chain and key (PEM), for servers that verify their clients; set,
    /// TLS is required.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Why a node could not connect.
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    #[error(transparent)]
    Secret(#[from] AuthError),
    #[error(
        "NATS at {urls} refused this node's credentials ({source}): check cluster.nats_user and \
         cluster.nats_password_file, cluster.nats_token_file, cluster.nats_nkey_file or \
         cluster.nats_creds_file against the servers' authorization (in operator mode: that the \
         user's account is one the servers' resolver knows, and that neither JWT has expired)"
    )]
    Refused {
        urls: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "TLS with NATS at {urls} failed ({source}): check cluster.nats_ca (the CA that signed the \
         servers' certificates) and cluster.nats_cert and cluster.nats_key (this node's, for \
         servers that verify clients)"
    )]
    Tls {
        urls: String,
        source: async_nats::ConnectError,
    },
    #[error("connecting to NATS at {urls}: {source}")]
    Other {
        urls: String,
        source: async_nats::ConnectError,
    },
}

impl NatsConnect {
    /// The client's options: credentials read from their files now.
    fn options(&self) -> Result<ConnectOptions, NatsConnectError> {
        let mut o = ConnectOptions::new().ping_interval(self.ping_interval);
        let role = self.role;
        o = o
            .name(format!("outflow-collector {role} {}", self.node))
            .event_callback(move |event| async move {
                if let async_nats::Event::ServerError(e) = event {
                    server_error(role, &e);
                }
            });
        if let Some(path) = &self.password_file {
            let password = secret("cluster.nats_password_file", path)?;
            o = o.user_and_password(self.user.clone(), password);
        }
        if let Some(path) = &self.token_file {
            o = o.token(auth::load_token("cluster.nats_token_file", path)?);
        }
        if let Some(path) = &self.nkey_file {
            o = o.nkey(user_seed(path)?);
        }
        if let Some(path) = &self.creds_file {
            let (text, invalid) = auth::read_secret_text("cluster.nats_creds_file", path)?;
            o = o.credentials(&text).map_err(|e| {
                invalid(format!(
                    "not a NATS credentials file ({e}): want the file `nsc generate creds` \
                     writes, a user's JWT (-----BEGIN NATS USER JWT-----) and its seed \
                     (-----BEGIN USER NKEY SEED-----)"
                ))
            })?;
        }
        if let Some(ca) = &self.ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            // Read by the client; only its owner may read it, as the collector's own TLS key.
            let _ = auth::read_secret_text("cluster.nats_key", key)?;
            o = o
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(o)
    }

    /// Connects to one of the servers. Credentials or TLS they refuse fail at once (with the
    /// settings to check); a server that does not answer (none up yet, the network) is tried
    /// again, with the others, until one answers.
    pub async fn connect(&self) -> Result<async_nats::Client, NatsConnectError> {
        let urls = self.urls.join(",");
        let first = self.options()?.connect(self.urls.clone()).await;
        let e = match first {
            Ok(client) => return Ok(client),
            Err(e) => e,
        };
        match e.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                Err(NatsConnectError::Refused { urls, source: e })
            }
            ConnectErrorKind::Tls => Err(NatsConnectError::Tls { urls, source: e }),
            // A certificate refused in the handshake comes as an I/O error.
            ConnectErrorKind::Io if from_tls(&e) => Err(NatsConnectError::Tls { urls, source: e }),
            _ => self
                .options()?
                .retry_on_initial_connect()
                .connect(self.urls.clone())
                .await
                .map_err(|source| NatsConnectError::Other { urls, source }),
        }
    }
}

/// Logs an error the server sent a node of `role`: a subject its user may not use is named
/// with what to give it (the server drops the message or the subscription, and the request it
/// was part of waits until it times out).
fn server_error(role: &str, e: &async_nats::ServerError) {
    match e {
        async_nats::ServerError::Other(message)
            if message
                .to_ascii_lowercase()
                .contains("permissions violation") =>
        {
            log::error!(
                "NATS refused this node a subject ({message}): give the node's user the \
                 permissions `outflow-collector nats-permissions --role {role}` prints"
            );
        }
        e => log::warn!("NATS server error: {e}"),
    }
}

/// Whether TLS (rustls) failed somewhere in `e`'s causes.
fn from_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let tls = c.downcast_ref::<rustls::Error>().is_some()
            || c.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
        if tls {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The password or token in the file at `path` (surrounding whitespace ignored), which only its
/// owner may read, as every secret file of the collector.
fn secret(field: &'static str, path: &Path) -> Result<String, NatsConnectError> {
    let (text, invalid) = auth::read_secret_text(field, path)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(invalid("empty".into()).into());
    }
    Ok(secret.to_owned())
}

/// The NKey user seed in the file at `path` (surrounding whitespace ignored), which only its owner
/// may read; checked here so that a wrong file is named at start, not taken for a refusal.
fn user_seed(path: &Path) -> Result<String, NatsConnectError> {
    let (text, invalid) = auth::read_secret_text("cluster.nats_nkey_file", path)?;
    let seed = text.trim();
    match nkeys::KeyPair::from_seed(seed) {
        Ok(pair) if pair.key_pair_type() == nkeys::KeyPairType::User => Ok(seed.to_owned()),
        Ok(pair) => Err(invalid(format!(
            "the seed of an NKey of type {:?}, not of a user (SU...): give the seed of the user \
             whose public key (U...) the servers list",
            pair.key_pair_type()
        ))
        .into()),
        Err(_) => Err(invalid(
            "not an NKey seed: want the one line SU... that `nk -gen user` writes (the public key \
             U... goes in the servers' authorization)"
                .into(),
        )
        .into()),
    }
}
