//! Alerts: one per (subject, detector) episode, opened when a detector's condition starts to
//! hold, updated (not repeated) while it holds, resolved once it has been false for
//! `detect.resolve_after` of batch time.
//!
//! The [`AlertHub`] holds every alert in memory (loaded from the store's `alerts` table at
//! start), and fans changes out to `Watch` streams over a tokio broadcast channel. The store
//! writer drives it: [`AlertHub::apply`] turns verdicts into changes; the writer persists them,
//! then calls [`AlertHub::publish`] (log line, metrics, broadcast).
use std::sync::{PoisonError, RwLock};

use log::{info, warn};
use outflow_proto::v1;
use tokio::sync::broadcast;

use crate::{
    aggregate::{Map, State},
    detect::{DetectorKind, Finding, HourBytes, Severity, Subject, Verdict, human},
    metrics::Metrics,
};

/// Resolved alerts kept (in memory and in the store); the oldest go first.
pub const RESOLVED_KEPT: usize = 10_000;
/// Changes buffered per Watch stream before it lags (and is resynchronized).
pub const WATCH_BUFFER: usize = 1024;
/// An open alert is republished when its observed bytes moved by this fraction.
const REPUBLISH_CHANGE: f64 = 0.25;
/// An alert on a window longer than an hour (a day, a week, 30 days) resolves once its
/// condition has been false for a tenth of its window, if that is longer than `resolve_after`:
/// a judgement on a day's bytes that sits near its threshold (a ratio that moves with each new
/// request) would otherwise resolve and open again every hour, one episode told as many.
const HOLD_SHARE_OF_WINDOW: u64 = 10;

/// How long the condition of `a` must be false before it resolves.
fn hold_ms(a: &v1::Alert, resolve_after_ms: u64) -> u64 {
    if a.window_seconds <= 3600 {
        return resolve_after_ms;
    }
    resolve_after_ms.max(a.window_seconds.saturating_mul(1000) / HOLD_SHARE_OF_WINDOW)
}

impl From<DetectorKind> for v1::Detector {
    fn from(d: DetectorKind) -> Self {
        match d {
            DetectorKind::Volume => v1::Detector::Volume,
            DetectorKind::Deviation => v1::Detector::Deviation,
            DetectorKind::Coordinated => v1::Detector::Coordinated,
            DetectorKind::Sustained => v1::Detector::Sustained,
            DetectorKind::Cohort => v1::Detector::Cohort,
        }
    }
}

impl From<Severity> for v1::Severity {
    fn from(s: Severity) -> Self {
        match s {
            Severity::Low => v1::Severity::Low,
            Severity::Medium => v1::Severity::Medium,
            Severity::High => v1::Severity::High,
            Severity::Critical => v1::Severity::Critical,
        }
    }
}

fn detector_name(d: i32) -> &'static str {
    match v1::Detector::try_from(d) {
        Ok(v1::Detector::Volume) => "volume",
        Ok(v1::Detector::Deviation) => "deviation",
        Ok(v1::Detector::Coordinated) => "coordinated",
        Ok(v1::Detector::Sustained) => "sustained",
        Ok(v1::Detector::Cohort) => "cohort",
        _ => "unspecified",
    }
}

/// A stable id of an episode: FNV-1a of detector, subject and first batch time.
fn alert_id(detector: DetectorKind, subject: &Subject, st: &State, first_seen_ms: u64) -> String {
    let key = match subject {
        // A client id may look like an address: its episodes must not share their ids.
        Subject::ClientId(id) => format!("client-id:{id}"),
        s => s.display(st),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in detector
        .name()
        .bytes()
        .chain([0])
        .chain(key.bytes())
        .chain(first_seen_ms.to_be_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}-{h:016x}", detector.name())
}

#[derive(Debug, Clone)]
struct OpenAlert {
    alert: v1::Alert,
    subject: Subject,
    /// Last batch time the condition held.
    last_true_ms: u64,
    published_observed: u64,
    episode: Episode,
}

/// Where the episode's byte total stands: the hour of the last judgement and the subject's
/// bytes in that hour then (`None` after a restart: the next judgement only resynchronizes).
#[derive(Debug, Clone, Copy)]
struct Episode {
    hour: u64,
    seen: Option<u64>,
}

impl Episode {
    /// Adds to `total` what the subject pulled since the last judgement, by `now`.
    fn advance(&mut self, now: HourBytes, total: &mut u64) {
        let added = match self.seen {
            Some(seen) if now.hour == self.hour => now.bytes.saturating_sub(seen),
            Some(seen) if now.hour == self.hour + 1 => {
                now.prev.saturating_sub(seen).saturating_add(now.bytes)
            }
            // Judged again after more than an hour: the hour before is all that is held.
            Some(_) if now.hour > self.hour => now.prev.saturating_add(now.bytes),
            _ => 0,
        };
        *total = total.saturating_add(added);
        *self = Episode {
            hour: now.hour,
            seen: Some(now.bytes),
        };
    }
}

/// Client or service alert, from its subject.
fn scope_of(subject: &Subject) -> v1::Scope {
    if subject.is_service() {
        v1::Scope::Service
    } else {
        v1::Scope::Client
    }
}

#[derive(Debug, Default)]
struct Book {
    open: Map<(Subject, DetectorKind), OpenAlert>,
    /// Oldest first.
    resolved: Vec<v1::Alert>,
}

/// What one round of verdicts changed: alerts to write (and publish), ids to delete.
#[derive(Debug, Default)]
pub struct AlertChanges {
    pub upserts: Vec<v1::Alert>,
    pub deletes: Vec<String>,
}

impl AlertChanges {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// Every alert, and the broadcast of their changes.
#[derive(Debug)]
pub struct AlertHub {
    book: RwLock<Book>,
    tx: broadcast::Sender<v1::Alert>,
}

impl Default for AlertHub {
    fn default() -> Self {
        Self::new()
    }
}

impl AlertHub {
    pub fn new() -> Self {
        Self {
            book: RwLock::new(Book::default()),
            tx: broadcast::channel(WATCH_BUFFER).0,
        }
    }

    /// Installs alerts loaded from the store (`st` resolves workload keys).
    pub fn load(&self, alerts: Vec<v1::Alert>, st: &State, metrics: &Metrics) {
        let mut book = self.book.write().unwrap_or_else(PoisonError::into_inner);
        for a in alerts {
            let open = a.state == v1::AlertState::Open as i32;
            let detector = match v1::Detector::try_from(a.detector) {
                Ok(v1::Detector::Volume) => DetectorKind::Volume,
                Ok(v1::Detector::Deviation) => DetectorKind::Deviation,
                Ok(v1::Detector::Coordinated) => DetectorKind::Coordinated,
                Ok(v1::Detector::Sustained) => DetectorKind::Sustained,
                Ok(v1::Detector::Cohort) => DetectorKind::Cohort,
                _ => continue,
            };
            let mut a = a;
            let subject = Subject::of_alert(&a.key, &a.client_id, st);
            if a.scope == v1::Scope::Unspecified as i32 {
                // Stored before scopes: a key that is no address, prefix or id is a workload.
                a.scope = match &subject {
                    Some(s) => scope_of(s),
                    None if a.client_id.is_empty()
                        && a.key.parse::<ipnet::IpNet>().is_err()
                        && a.key.parse::<std::net::IpAddr>().is_err() =>
                    {
                        v1::Scope::Service
                    }
                    None => v1::Scope::Client,
                } as i32;
            }
            match (open, subject) {
                (true, Some(subject)) => {
                    metrics.alert_open_gauge(detector.name(), 1);
                    book.open.insert(
                        (subject.clone(), detector),
                        OpenAlert {
                            subject,
                            last_true_ms: a.last_seen_ms,
                            published_observed: a.observed_bytes,
                            episode: Episode {
                                hour: a.last_seen_ms / 3_600_000,
                                seen: None,
                            },
                            alert: a,
                        },
                    );
                }
                (true, None) => warn!("alert {}: key {:?} not understood, dropped", a.id, a.key),
                (false, _) => book.resolved.push(a),
            }
        }
        book.resolved.sort_by_key(|a| a.last_seen_ms);
    }

    /// Forgets every alert (the store they came from was emptied); the open ones leave the
    /// open-alert gauges.
    pub fn clear(&self, metrics: &Metrics) {
        let mut book = self.book.write().unwrap_or_else(PoisonError::into_inner);
        for (_, d) in book.open.keys() {
            metrics.alert_open_gauge(d.name(), -1);
        }
        *book = Book::default();
    }

    /// Subjects of the open alerts (for the sweep).
    pub fn open_subjects(&self) -> Vec<Subject> {
        let book = self.book.read().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<Subject> = book.open.values().map(|o| o.subject.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Applies verdicts judged at batch time `end_ms`: opens, updates, resolves.
    pub fn apply(
        &self,
        verdicts: Vec<Verdict>,
        end_ms: u64,
        resolve_after_ms: u64,
        st: &State,
    ) -> AlertChanges {
        let mut ch = AlertChanges::default();
        let mut book = self.book.write().unwrap_or_else(PoisonError::into_inner);
        for v in verdicts {
            let k = (v.subject, v.detector);
            let hours = v.hours;
            match (v.finding, book.open.get_mut(&k)) {
                (Some(f), Some(o)) => {
                    o.last_true_ms = end_ms;
                    let sev_before = o.alert.severity;
                    fill(&mut o.alert, &f, st);
                    o.alert.peak_bytes = o.alert.peak_bytes.max(f.observed_bytes);
                    o.episode.advance(hours, &mut o.alert.episode_bytes);
                    o.alert.last_seen_ms = end_ms;
                    let moved = (f.observed_bytes as f64 - o.published_observed as f64).abs()
                        >= REPUBLISH_CHANGE * o.published_observed.max(1) as f64;
                    if moved || sev_before != o.alert.severity {
                        o.published_observed = f.observed_bytes;
                        ch.upserts.push(o.alert.clone());
                    }
                }
                (Some(f), None) => {
                    let key = k.0.display(st);
                    let client_id = match &k.0 {
                        Subject::ClientId(id) => id.to_string(),
                        _ => String::new(),
                    };
                    let mut alert = v1::Alert {
                        id: alert_id(k.1, &k.0, st, end_ms),
                        key,
                        client_id,
                        detector: v1::Detector::from(k.1) as i32,
                        state: v1::AlertState::Open as i32,
                        first_seen_ms: end_ms,
                        last_seen_ms: end_ms,
                        scope: scope_of(&k.0) as i32,
                        peak_bytes: f.observed_bytes,
                        episode_bytes: f.observed_bytes,
                        ..Default::default()
                    };
                    fill(&mut alert, &f, st);
                    ch.upserts.push(alert.clone());
                    book.open.insert(
                        k.clone(),
                        OpenAlert {
                            alert,
                            subject: k.0,
                            last_true_ms: end_ms,
                            published_observed: f.observed_bytes,
                            episode: Episode {
                                hour: hours.hour,
                                seen: Some(hours.bytes),
                            },
                        },
                    );
                }
                (None, Some(o)) => {
                    // Still the episode until it resolves: its bytes count.
                    o.episode.advance(hours, &mut o.alert.episode_bytes);
                    if end_ms
                        >= o.last_true_ms
                            .saturating_add(hold_ms(&o.alert, resolve_after_ms))
                        && let Some(mut o) = book.open.remove(&k)
                    {
                        o.alert.state = v1::AlertState::Resolved as i32;
                        ch.upserts.push(o.alert.clone());
                        book.resolved.push(o.alert);
                    }
                }
                (None, None) => {}
            }
        }
        if book.resolved.len() > RESOLVED_KEPT {
            let n = book.resolved.len() - RESOLVED_KEPT;
            ch.deletes.extend(book.resolved.drain(..n).map(|a| a.id));
        }
        ch
    }

    /// After the changes were stored: a log line per open/resolve, metrics, Watch streams.
    pub fn publish(&self, ch: &AlertChanges, metrics: &Metrics) {
        for a in &ch.upserts {
            let det = detector_name(a.detector);
            if a.state == v1::AlertState::Resolved as i32 {
                metrics.alerts_resolved(det);
                metrics.alert_open_gauge(det, -1);
                info!(
                    "alert resolved: id={} detector={det} key={} last_seen_ms={} observed={}",
                    a.id,
                    a.key,
                    a.last_seen_ms,
                    human(a.observed_bytes)
                );
            } else if a.first_seen_ms == a.last_seen_ms {
                metrics.alerts_opened(det);
                metrics.alert_open_gauge(det, 1);
                info!(
                    "alert open: id={} detector={det} severity={} key={} observed={} threshold={} summary={:?}",
                    a.id,
                    v1::Severity::try_from(a.severity).map_or("?", |s| s.as_str_name()),
                    a.key,
                    human(a.observed_bytes),
                    human(a.threshold_bytes),
                    a.summary
                );
            }
            // No receivers is fine.
            let _ = self.tx.send(a.clone());
        }
    }

    /// Whether `a` is listed and streamed for a caller that asked `include_service`.
    pub fn wanted(a: &v1::Alert, include_service: bool) -> bool {
        include_service || a.scope != v1::Scope::Service as i32
    }

    /// A receiver of changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<v1::Alert> {
        self.tx.subscribe()
    }

    /// How many client alerts are open (what [`AlertHub::list`] lists as open without
    /// service alerts).
    pub fn open_count(&self) -> usize {
        let book = self.book.read().unwrap_or_else(PoisonError::into_inner);
        book.open
            .values()
            .filter(|o| Self::wanted(&o.alert, false))
            .count()
    }

    /// Open alerts (newest first, then largest observed first), then resolved (newest
    /// first), at most `limit`; service alerts only with `include_service`.
    pub fn list(&self, open_only: bool, limit: usize, include_service: bool) -> Vec<v1::Alert> {
        let book = self.book.read().unwrap_or_else(PoisonError::into_inner);
        let mut open: Vec<v1::Alert> = book
            .open
            .values()
            .filter(|o| Self::wanted(&o.alert, include_service))
            .map(|o| o.alert.clone())
            .collect();
        open.sort_by(|a, b| {
            b.last_seen_ms
                .cmp(&a.last_seen_ms)
                .then(b.observed_bytes.cmp(&a.observed_bytes))
                .then(a.id.cmp(&b.id))
        });
        open.truncate(limit);
        if !open_only {
            let room = limit - open.len();
            open.extend(
                book.resolved
                    .iter()
                    .rev()
                    .filter(|a| Self::wanted(a, include_service))
                    .take(room)
                    .cloned(),
            );
        }
        open
    }
}

fn fill(a: &mut v1::Alert, f: &Finding, st: &State) {
    a.severity = v1::Severity::from(f.severity) as i32;
    a.window_seconds = f.window_seconds;
    a.observed_bytes = f.observed_bytes;
    a.baseline_bytes = f.baseline_bytes;
    a.threshold_bytes = f.threshold_bytes;
    a.request_bytes = f.request_bytes;
    a.hosts = f
        .hosts
        .iter()
        .map(|h| st.host_name(*h).to_owned())
        .collect();
    a.members = f.members;
    a.summary.clone_from(&f.summary);
    let strings = |v: &[std::net::IpAddr]| v.iter().map(ToString::to_string).collect();
    a.client_addrs = strings(&f.via.addrs);
    a.client_addr_count = f.via.addr_count;
    a.peers = strings(&f.via.peers);
    a.peer_count = f.via.peer_count;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Via;

    fn finding(obs: u64) -> Finding {
        Finding {
            severity: Severity::Medium,
            window_seconds: 3600,
            observed_bytes: obs,
            baseline_bytes: 0,
            threshold_bytes: 10,
            request_bytes: 1,
            hosts: vec![],
            members: 0,
            via: Via::default(),
            summary: "s".into(),
        }
    }

    #[test]
    fn client_id_alerts_carry_their_addresses_and_survive_a_reload() {
        let hub = AlertHub::new();
        let st = State::default();
        let id = "h:0123456789abcdef01234567";
        let mut f = finding(100);
        f.via = Via {
            addrs: vec!["198.51.100.4".parse().unwrap()],
            addr_count: 3,
            peers: vec!["10.1.0.1".parse().unwrap()],
            peer_count: 1,
        };
        let ch = hub.apply(
            vec![Verdict {
                subject: Subject::ClientId(id.into()),
                detector: DetectorKind::Volume,
                finding: Some(f),
                hours: HourBytes::default(),
            }],
            1000,
            500,
            &st,
        );
        let a = &ch.upserts[0];
        assert_eq!((a.key.as_str(), a.client_id.as_str()), (id, id));
        assert_eq!(a.client_addrs, ["198.51.100.4"]);
        assert_eq!((a.client_addr_count, a.peer_count), (3, 1));
        assert_eq!(a.peers, ["10.1.0.1"]);
        // An id that looks like an address is still an id after a restart.
        let mut looks_like_an_address = a.clone();
        looks_like_an_address.key = "10.0.0.1".into();
        looks_like_an_address.client_id = "10.0.0.1".into();
        let hub = AlertHub::new();
        hub.load(vec![a.clone(), looks_like_an_address], &st, &Metrics::new());
        assert_eq!(
            hub.open_subjects(),
            [
                Subject::ClientId("10.0.0.1".into()),
                Subject::ClientId(id.into())
            ]
        );
    }

    #[test]
    fn open_update_resolve() {
        let hub = AlertHub::new();
        let st = State::default();
        let s = Subject::Client("203.0.113.7".parse().unwrap());
        let v = |f: Option<Finding>| {
            vec![Verdict {
                subject: s.clone(),
                detector: DetectorKind::Volume,
                finding: f,
                hours: HourBytes::default(),
            }]
        };
        let ch = hub.apply(v(Some(finding(100))), 1000, 500, &st);
        assert_eq!(ch.upserts.len(), 1);
        let id = ch.upserts[0].id.clone();
        // A small change is not republished, a large one is, under the same id.
        assert!(hub.apply(v(Some(finding(110))), 1100, 500, &st).is_empty());
        let ch = hub.apply(v(Some(finding(200))), 1200, 500, &st);
        assert_eq!(ch.upserts[0].id, id);
        assert_eq!(ch.upserts[0].first_seen_ms, 1000);
        // Hysteresis: false for less than resolve_after keeps it open.
        assert!(hub.apply(v(None), 1600, 500, &st).is_empty());
        let ch = hub.apply(v(None), 1700, 500, &st);
        assert_eq!(ch.upserts[0].state, v1::AlertState::Resolved as i32);
        assert_eq!(hub.list(true, 10, false).len(), 0);
        assert_eq!(hub.list(false, 10, false).len(), 1);
        // A day's judgement holds a tenth of its day (2.4 h) before it resolves.
        let day = |f: Option<Finding>| {
            vec![Verdict {
                subject: s.clone(),
                detector: DetectorKind::Sustained,
                finding: f.map(|f| Finding {
                    window_seconds: 86_400,
                    ..f
                }),
                hours: HourBytes::default(),
            }]
        };
        let t = 10_000_000;
        assert_eq!(
            hub.apply(day(Some(finding(100))), t, 500, &st)
                .upserts
                .len(),
            1
        );
        assert!(hub.apply(day(None), t + 8_639_999, 500, &st).is_empty());
        let ch = hub.apply(day(None), t + 8_640_000, 500, &st);
        assert_eq!(ch.upserts[0].state, v1::AlertState::Resolved as i32);
    }

    #[test]
    fn an_alert_carries_its_episodes_peak_and_total() {
        let hub = AlertHub::new();
        let st = State::default();
        let s = Subject::Client("203.0.113.8".parse().unwrap());
        let h = 480_000;
        let v = |obs: Option<u64>, hour: u64, bytes: u64, prev: u64| {
            vec![Verdict {
                subject: s.clone(),
                detector: DetectorKind::Volume,
                finding: obs.map(finding),
                hours: HourBytes { hour, bytes, prev },
            }]
        };
        // Opened at 100 in the window (60 of them this hour), then 30 more this hour, 50 in
        // the rest of it and 20 in the next, the last 10 of them while no longer over.
        hub.apply(v(Some(100), h, 60, 40), 1000, 10_000, &st);
        hub.apply(v(Some(130), h, 90, 40), 2000, 10_000, &st);
        hub.apply(v(Some(120), h + 1, 10, 140), 3000, 10_000, &st);
        hub.apply(v(None, h + 1, 20, 140), 4000, 10_000, &st);
        let a = &hub.list(true, 10, false)[0];
        assert_eq!(
            (a.peak_bytes, a.episode_bytes),
            (130, 100 + 30 + 50 + 10 + 10)
        );
        assert_eq!(a.scope, v1::Scope::Client as i32);
    }

    #[test]
    fn service_alerts_are_listed_only_when_asked_for() {
        let mut st = State::default();
        st.add_host(0, "gpu-0".into());
        let hub = AlertHub::new();
        let workload = Subject::Workload(crate::keys::Workload {
            host: 0,
            cgroup: "/system.slice/vllm.service".into(),
            comm: "vllm".into(),
        });
        let client = Subject::Client("203.0.113.9".parse().unwrap());
        let verdicts = [workload, client]
            .into_iter()
            .map(|subject| Verdict {
                subject,
                detector: DetectorKind::Deviation,
                finding: Some(finding(100)),
                hours: HourBytes::default(),
            })
            .collect();
        hub.apply(verdicts, 1000, 500, &st);
        let listed = hub.list(false, 10, false);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, "203.0.113.9");
        let all = hub.list(false, 10, true);
        assert_eq!(all.len(), 2);
        let service = all.iter().find(|a| a.key != "203.0.113.9").unwrap();
        assert_eq!(service.scope, v1::Scope::Service as i32);
        // An alert stored before scopes is read as a service alert by its key.
        let mut old = service.clone();
        old.scope = v1::Scope::Unspecified as i32;
        let hub = AlertHub::new();
        hub.load(vec![old], &st, &Metrics::new());
        assert!(hub.list(false, 10, false).is_empty());
        assert_eq!(
            hub.list(false, 10, true)[0].scope,
            v1::Scope::Service as i32
        );
    }
}
