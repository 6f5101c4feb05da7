//! Export to a collector: the settings read and checked at start ([`prepare`]), the read loop's
//! durability step that turns each interval's records into batches in the disk spool
//! ([`Spooler`]), and the sender task's lifetime ([`Exporter`]).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use outflow_proto::v1;
use prost::Message as _;
use tokio::{task::JoinHandle, time::Instant};
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity as TlsIdentity},
};

use crate::{
    config::{ExportConfig, parse_collector_url},
    durability::{Durability, DurabilityError, Flushed, Interval},
    identity::{Identity, IdentityError},
    record::ExportRecord,
    sender::{self, Link, Shared, chain},
    spool::{Spool, SpoolError},
    table::CommitPlan,
};

/// Deltas per batch, at most (the protocol's limit).
pub const MAX_DELTAS_PER_BATCH: usize = 100_000;
/// Encoded size of a batch's deltas, at most: below gRPC's customary 4 MiB message limit.
pub const MAX_BATCH_BYTES: usize = 3 << 20;
/// How long a stopping agent waits for the collector to acknowledge what is spooled.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {message}")]
    BadFile {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("collector {url}: {message}")]
    Collector { url: String, message: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, ExportError> {
    std::fs::read(path).map_err(|source| ExportError::ReadFile {
        what,
        path: path.into(),
        source,
    })
}

/// Reads a secret (the token, the private key), refusing a file that group or others may read
/// or write.
fn read_secret(what: &'static str, path: &Path) -> Result<Vec<u8>, ExportError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|source| ExportError::ReadFile {
        what,
        path: path.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ExportError::BadFile {
            what,
            path: path.into(),
            message: format!(
                "readable or writable by group or others (mode {mode:04o}): run `chmod 600 {}`",
                path.display()
            ),
        });
    }
    read_file(what, path)
}

/// rustls skips what it cannot parse and then reports something vague: check the PEM block
/// is there, to name the file instead.
fn require_pem(
    what: &'static str,
    path: &Path,
    pem: &[u8],
    label_end: &str,
) -> Result<(), ExportError> {
    let text = String::from_utf8_lossy(pem);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(label_end));
    if found {
        Ok(())
    } else {
        Err(ExportError::BadFile {
            what,
            path: path.into(),
            message: format!("no PEM block ending in {label_end:?} in it"),
        })
    }
}

/// How to reach the collector, checked without connecting: the URL, the token file, the TLS
/// files. `None` without a collector.
pub struct Prepared {
    collector: String,
    endpoint: Endpoint,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
}

pub fn prepare(cfg: &ExportConfig) -> Result<Option<Prepared>, ExportError> {
    let Some(url) = &cfg.collector else {
        return Ok(None);
    };
    let bad_url = |message: String| ExportError::Collector {
        url: url.clone(),
        message,
    };
    let uri = parse_collector_url(url).map_err(bad_url)?;
    let https = uri.scheme_str() == Some("https");
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| bad_url(chain(&e)))?
        .user_agent(format!("outflow-agent/{}", env!("CARGO_PKG_VERSION")))
        .map_err(|e| bad_url(chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if https {
        let tls = &cfg.tls;
        let mut c = ClientTlsConfig::new().timeout(CONNECT_TIMEOUT);
        match &tls.ca {
            Some(path) => {
                let what = "CA certificate (export.tls.ca)";
                let pem = read_file(what, path)?;
                require_pem(what, path, &pem, "CERTIFICATE-----")?;
                c = c.ca_certificate(Certificate::from_pem(pem));
            }
            None => c = c.with_native_roots(),
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            let what = "client certificate (export.tls.cert)";
            let cert_pem = read_file(what, cert)?;
            require_pem(what, cert, &cert_pem, "CERTIFICATE-----")?;
            let what = "client key (export.tls.key)";
            let key_pem = read_secret(what, key)?;
            require_pem(what, key, &key_pem, "PRIVATE KEY-----")?;
            c = c.identity(TlsIdentity::from_pem(cert_pem, key_pem));
        }
        if let Some(d) = &tls.domain {
            c = c.domain_name(d.clone());
        }
        endpoint = endpoint.tls_config(c).map_err(|e| {
            bad_url(format!(
                "TLS setup (export.tls: ca, cert, key): {}",
                chain(&e)
            ))
        })?;
    }
    let authorization = match &cfg.token_file {
        None => None,
        Some(path) => {
            let what = "token file (export.token_file)";
            let bytes = read_secret(what, path)?;
            let bad = |message: &str| ExportError::BadFile {
                what,
                path: path.clone(),
                message: message.into(),
            };
            let token = std::str::from_utf8(&bytes)
                .map_err(|_| bad("not text"))?
                .trim();
            if token.is_empty() {
                return Err(bad("empty"));
            }
            let mut v = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| bad("the token has characters not allowed in a header"))?;
            v.set_sensitive(true);
            if !https {
                warn!("the bearer token is sent to {url} unencrypted: use an https:// collector");
            }
            Some(v)
        }
    };
    Ok(Some(Prepared {
        collector: url.clone(),
        endpoint,
        authorization,
    }))
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The running export: the spool and the sender task.
pub struct Exporter {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    collector: String,
    agent_id: String,
    start_ms: u64,
}

impl Exporter {
    /// Loads the identity, opens the spool (batches left by a previous run are sent first) and
    /// starts the sender. Must run inside a tokio runtime.
    pub fn start(p: Prepared, cfg: &ExportConfig) -> Result<Self, ExportError> {
        let (id, new_id) = Identity::load(&cfg.state_dir, cfg.labels.clone())?;
        let spool = Spool::open(&cfg.spool_dir, cfg.spool_max_bytes, &cfg.state_dir, new_id)?;
        let hello = v1::Hello {
            agent_id: id.agent_id.clone(),
            epoch: spool.epoch(),
            hostname: id.hostname,
            boot_id: id.boot_id,
            version: id.version,
            labels: id.labels.into_iter().collect(),
        };
        info!(
            "exporting to {} as agent {} (epoch {}, spool {}: {} batches waiting)",
            p.collector,
            id.agent_id,
            spool.epoch(),
            cfg.spool_dir.display(),
            spool.len()
        );
        let start_ms = match spool.last_end_ms() {
            0 => unix_ms_now(),
            t => t,
        };
        let shared = Arc::new(Shared::new(spool));
        let task = tokio::spawn(sender::run(
            Arc::clone(&shared),
            Link {
                collector: p.collector.clone(),
                endpoint: p.endpoint,
                authorization: p.authorization,
                hello,
            },
        ));
        Ok(Self {
            shared,
            task,
            collector: p.collector,
            agent_id: id.agent_id,
            start_ms,
        })
    }

    /// What the metrics endpoint reads of the export at each scrape.
    pub fn status_source(&self, spool_max_bytes: u64) -> ExportStatusSource {
        ExportStatusSource {
            shared: Arc::clone(&self.shared),
            spool_max_bytes,
        }
    }

    /// The read loop's durability step: spools every interval.
    pub fn spooler(&self) -> Spooler {
        Spooler {
            shared: Arc::clone(&self.shared),
            collector: self.collector.clone(),
            agent_id: self.agent_id.clone(),
            start_ms: self.start_ms,
            last: None,
            deferred_intervals: 0,
            deferring: None,
        }
    }

    /// Gives the sender up to `grace` to have everything spooled acknowledged (if it is
    /// connected), then stops it. What is not acknowledged stays in the spool for the next start.
    pub async fn shutdown(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            if self.shared.spool().is_empty() {
                info!("spool empty: the collector has everything");
                break;
            }
            let give_up = !self.shared.is_connected();
            if !give_up {
                tokio::select! {
                    () = self.shared.acked.notified() => continue,
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            let s = self.shared.spool();
            info!(
                "{} batches ({} bytes) not yet acknowledged stay in the spool for the next start",
                s.len(),
                s.bytes()
            );
            break;
        }
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Splits an interval's deltas into batches of at most [`MAX_DELTAS_PER_BATCH`] deltas and
/// [`MAX_BATCH_BYTES`] bytes; the overflow goes in the first. Seqs are set by the spool.
pub fn split_interval(
    deltas: Vec<v1::ConnDelta>,
    overflow: Option<v1::Counters>,
    start_ms: u64,
    end_ms: u64,
) -> Vec<v1::Batch> {
    let new = |overflow| v1::Batch {
        start_ms,
        end_ms,
        overflow,
        ..v1::Batch::default()
    };
    let mut out = vec![new(overflow)];
    let mut bytes = 0;
    for d in deltas {
        let len = d.encoded_len() + 4;
        let cur = out.last().map_or(0, |b| b.deltas.len());
        if cur > 0 && (cur >= MAX_DELTAS_PER_BATCH || bytes + len > MAX_BATCH_BYTES) {
            out.push(new(None));
            bytes = 0;
        }
        bytes += len;
        if let Some(b) = out.last_mut() {
            b.deltas.push(d);
        }
    }
    out
}

/// The export's state, read from the sender's shared state when asked (at each scrape of the
/// metrics endpoint), without waiting for the read loop.
#[derive(Clone)]
pub struct ExportStatusSource {
    shared: Arc<Shared>,
    spool_max_bytes: u64,
}

impl std::fmt::Debug for ExportStatusSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportStatusSource").finish_non_exhaustive()
    }
}

/// The export's state at one moment (counts since this agent started).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportStatus {
    pub connected: bool,
    pub batches_spooled: u64,
    pub batches_acked: u64,
    /// Batches dropped unsent (spool full, unreadable spool files).
    pub batches_lost: u64,
    pub spool_bytes: u64,
    pub spool_batches: u64,
    pub spool_max_bytes: u64,
    /// Since the collector last acknowledged something; `None` before it ever did.
    pub since_last_ack: Option<Duration>,
}

impl ExportStatusSource {
    pub fn read(&self) -> ExportStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let (spool_bytes, spool_batches, batches_lost) = {
            let spool = self.shared.spool();
            (
                spool.bytes(),
                spool.len() as u64,
                spool.lost_total().batches,
            )
        };
        ExportStatus {
            connected: self.shared.is_connected(),
            batches_spooled: self.shared.batches_spooled.load(Relaxed),
            batches_acked: self.shared.batches_acked.load(Relaxed),
            batches_lost,
            spool_bytes,
            spool_batches,
            spool_max_bytes: self.spool_max_bytes,
            since_last_ack: self.shared.since_last_ack(),
        }
    }
}

/// The durability step with a collector: spools each interval as batches (durably, before
/// [`Durability::make_durable`] returns) and hands them to the sender once the kernel has
/// recorded them as reported.
pub struct Spooler {
    shared: Arc<Shared>,
    collector: String,
    agent_id: String,
    /// Where the next batch starts: the end of the previous one.
    start_ms: u64,
    /// The export record reported last.
    last: Option<ExportRecord>,
    /// Intervals the spool could not take (see [`Flushed::Deferred`]), since start.
    deferred_intervals: u64,
    /// Since when the spool refuses writes, as of the last warning about it.
    deferring: Option<Instant>,
}

/// A step back of the wall clock up to this is absorbed (batches stay in order).
const CLOCK_STEP_BACK_TOLERANCE_MS: u64 = 1_000;

/// How often a spool that goes on refusing writes is warned about.
const DEFER_WARN_EVERY: Duration = Duration::from_secs(60);

impl Durability for Spooler {
    fn recover(&mut self) -> Result<Option<CommitPlan>, DurabilityError> {
        Ok(self.shared.spool().take_recovery())
    }

    /// Spools the interval with its commit plan (empty intervals are not sent: no batch means
    /// no bytes). A spool that cannot be written (its disk is full) defers the interval, to be
    /// read again. The batches are sent once `committed` says the kernel has recorded them.
    fn make_durable(&mut self, interval: &Interval<'_>) -> Result<Flushed, DurabilityError> {
        let ts = interval.ts;
        let mut spool = self.shared.spool();
        let has_data = !interval.conns.is_empty() || interval.overflow.is_some();
        if !has_data && spool.pending_loss().is_zero() {
            return Ok(Flushed::Kept);
        }
        // Batches tile time: [previous end, now). A wall clock stepped back by more than a
        // little starts the tiling over at the new time (batches are otherwise stuck at the
        // old, future one); a small step back gives a 1 ms batch.
        if self.start_ms > ts + CLOCK_STEP_BACK_TOLERANCE_MS {
            warn!(
                "the wall clock stepped back by {} ms: batch times follow it",
                self.start_ms - ts
            );
            self.start_ms = ts.saturating_sub(1);
        }
        let end_ms = ts.max(self.start_ms + 1);
        let batches = split_interval(
            interval.conns.iter().map(Into::into).collect(),
            interval.overflow.map(|r| (&r.counters).into()),
            self.start_ms,
            end_ms,
        );
        let n = batches.len() as u64;
        match spool.append(batches, interval.plan) {
            Ok(_) => {
                self.shared
                    .batches_spooled
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                self.start_ms = end_ms;
                if self.deferring.take().is_some() {
                    info!(
                        "spool {} writable again: the deferred intervals are spooled",
                        spool.dir().display()
                    );
                }
                Ok(Flushed::Kept)
            }
            // The spool's disk is full (or failing): the interval stays in the kernel table,
            // uncommitted, and is read again with the next one. Nothing is lost while the
            // table has room; a table that fills counts in its overflow.
            Err(source @ SpoolError::Write { .. }) => {
                self.deferred_intervals += 1;
                let now = Instant::now();
                if self
                    .deferring
                    .is_none_or(|last| now.duration_since(last) >= DEFER_WARN_EVERY)
                {
                    let e = DurabilityError::Spool {
                        dir: spool.dir().into(),
                        source,
                    };
                    warn!(
                        "{e}; the interval stays counted in the kernel table and is spooled once the write succeeds ({} intervals deferred so far)",
                        self.deferred_intervals
                    );
                    self.deferring = Some(now);
                }
                Ok(Flushed::Deferred)
            }
            Err(source) => Err(DurabilityError::Spool {
                dir: spool.dir().into(),
                source,
            }),
        }
    }

    fn committed(&mut self) -> Result<(), DurabilityError> {
        self.shared.spool().publish();
        self.shared.spooled.notify_one();
        Ok(())
    }

    fn report(&mut self) -> Option<ExportRecord> {
        let record = {
            let spool = self.shared.spool();
            let lost = spool.lost_total();
            ExportRecord {
                collector: self.collector.clone(),
                connected: self.shared.is_connected(),
                agent_id: self.agent_id.clone(),
                epoch: spool.epoch(),
                last_seq: spool.last_seq(),
                acked_seq: spool.acked_seq(),
                spooled_batches: spool.len() as u64,
                spooled_bytes: spool.bytes(),
                lost_batches: lost.batches,
                lost_bytes_out: lost.counters.bytes_out,
                deferred_intervals: self.deferred_intervals,
            }
        };
        if self.last.as_ref() == Some(&record) {
            return None;
        }
        self.last = Some(record.clone());
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsConfig;

    fn delta(cgroup_len: usize) -> v1::ConnDelta {
        v1::ConnDelta {
            conn_id: 1,
            cgroup: "c".repeat(cgroup_len),
            ..Default::default()
        }
    }

    #[test]
    fn intervals_split_by_count_and_size() {
        let b = split_interval(Vec::new(), None, 1, 2);
        assert_eq!(b.len(), 1);
        assert!(b[0].deltas.is_empty());

        let n = MAX_DELTAS_PER_BATCH * 2 + 5;
        let overflow = v1::Counters {
            bytes_out: 9,
            ..Default::default()
        };
        let b = split_interval(vec![delta(0); n], Some(overflow), 10, 20);
        assert_eq!(
            b.iter().map(|b| b.deltas.len()).collect::<Vec<_>>(),
            vec![MAX_DELTAS_PER_BATCH, MAX_DELTAS_PER_BATCH, 5]
        );
        assert_eq!(b[0].overflow, Some(overflow));
        assert!(b[1].overflow.is_none());
        assert!(b.iter().all(|b| (b.start_ms, b.end_ms) == (10, 20)));

        let b = split_interval(vec![delta(100_000); 80], None, 10, 20);
        assert!(b.len() >= 3, "{}", b.len());
        assert!(b.iter().all(|b| b.encoded_len() <= MAX_BATCH_BYTES + 64));
        assert_eq!(b.iter().map(|b| b.deltas.len()).sum::<usize>(), 80);
    }

    fn cfg(url: &str) -> ExportConfig {
        ExportConfig {
            collector: Some(url.into()),
            ..ExportConfig::default()
        }
    }

    fn err(c: &ExportConfig) -> String {
        match prepare(c) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unreadable_files_are_named() {
        assert!(prepare(&ExportConfig::default()).expect("ok").is_none());
        assert!(prepare(&cfg("http://127.0.0.1:1")).expect("ok").is_some());

        let mut c = cfg("http://127.0.0.1:1");
        c.token_file = Some("/nonexistent/token".into());
        let e = err(&c);
        assert!(
            e.contains("token file") && e.contains("/nonexistent/token"),
            "{e}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        c.token_file = Some(empty.clone());
        // Others may read it: refused before anything else.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
            let e = err(&c);
            assert!(
                e.contains("readable or writable by group or others (mode 0644)")
                    && e.contains("chmod 600"),
                "{e}"
            );
            std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        assert!(err(&c).contains("empty"));

        let mut c = cfg("https://collector.example:4317");
        c.tls = TlsConfig {
            ca: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        };
        let e = err(&c);
        assert!(
            e.contains("export.tls.ca") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        c.tls.ca = Some(junk.clone());
        let e = err(&c);
        assert!(e.contains("no PEM block") && e.contains("junk.pem"), "{e}");

        c.tls.ca = None;
        c.tls.cert = Some(junk.clone());
        c.tls.key = Some(junk.clone());
        let e = err(&c);
        assert!(
            e.contains("export.tls.cert") && e.contains("junk.pem"),
            "{e}"
        );
        let cert = dir.path().join("cert.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        c.tls.cert = Some(cert);
        c.tls.key = Some(dir.path().join("missing.key"));
        let e = err(&c);
        assert!(
            e.contains("export.tls.key") && e.contains("missing.key"),
            "{e}"
        );
    }
}
