//! The OTLP sink against a real OTLP/gRPC receiver: the OpenTelemetry project's generated
//! service (PyPI `opentelemetry-proto`) served by grpcio (`tests/otlp_receiver.py`, from the
//! tools venv `cargo xtask setup` makes). What it receives is what Query answers, to the byte.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use outflow_collector::{Config, Server};
use outflow_proto::v1;
use outflow_testbed::tools::venv_python;
use serde_json::Value;

use crate::common::*;

const MIN: u64 = 60_000;
const T0: u64 = 1_750_000_000_000 / (60 * MIN) * (60 * MIN);
const MIB: u64 = 1 << 20;
const CLIENT_ID: &str = "h:0123456789abcdef01234567";

/// The receiver process and the pushes it printed.
struct Receiver {
    child: Child,
    pushes: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    /// Serves on 127.0.0.1:`port`, answering every push with `reject` rejected points.
    fn start(port: u16, reject: u32) -> Self {
        let python = venv_python(&["grpc", "opentelemetry.proto.collector.metrics.v1"]);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otlp_receiver.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(port.to_string())
            .args(["--reject", &reject.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {script}: {e}"));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(
            first,
            format!("listening {port}"),
            "the OTLP receiver did not start"
        );
        let pushes = Arc::new(Mutex::new(Vec::new()));
        let sink = pushes.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("receiver printed {line:?}: {e}"));
                sink.lock().unwrap().push(v);
            }
        });
        Self { child, pushes }
    }

    fn pushes(&self) -> Vec<Value> {
        self.pushes.lock().unwrap().clone()
    }

    /// The first push that satisfies `ok`; panics after 30 s with the last one.
    async fn wait_for(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pushes = self.pushes();
            if let Some(p) = pushes.iter().find(|p| ok(p)) {
                return p.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no push with {what} in 30 s; the last: {:#}",
                pushes.last().unwrap_or(&Value::Null)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The points of metric `name` in `push`: attributes and value.
fn points(push: &Value, name: &str) -> Vec<(BTreeMap<String, String>, i64)> {
    let metric = metric_of(push, name);
    metric["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let attrs = p["attributes"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            (attrs, p["value"].as_i64().unwrap())
        })
        .collect()
}

fn metric_of<'a>(push: &'a Value, name: &str) -> &'a Value {
    push["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {push:#}"))
}

/// The value of `name` whose attributes include every `(key, value)` of `want`.
fn value(push: &Value, name: &str, want: &[(&str, &str)]) -> Option<i64> {
    points(push, name)
        .into_iter()
        .find(|(a, _)| {
            want.iter()
                .all(|(k, v)| a.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
}

/// The `(group, client, value)` of every point of a client metric.
fn clients(push: &Value, name: &str) -> Vec<(String, String, i64)> {
    points(push, name)
        .into_iter()
        .map(|(a, v)| {
            assert_eq!(a["outflow.window"], "1h", "{a:?}");
            (a["outflow.group"].clone(), a["outflow.client"].clone(), v)
        })
        .collect()
}

fn cfg(dir: &std::path::Path, port: u16, interval: Duration) -> Config {
    let mut c = replay_config(dir);
    c.otlp.endpoint = Some(format!("http://127.0.0.1:{port}"));
    c.otlp.interval = interval;
    c.otlp.top_clients = 3;
    c.otlp.window = Duration::from_secs(3600);
    c.otlp.groups = vec!["client-address".into(), "client-id".into()];
    c
}

/// Six batches 5 minutes apart: 256 MiB each to 203.0.113.7 (1.5 GiB in 30 minutes: a volume
/// alert), 100, 50 (with a client id) and 10 MiB once to .1, .2 and .3.
async fn traffic(server: &Server) {
    let mut s = server.collector().session();
    s.handle(hello_msg("otlp-a", 1, "gpu-0")).await.unwrap();
    for i in 1..=6u64 {
        let mut deltas = vec![delta([203, 0, 113, 7], 256 * MIB, MIB, true)];
        if i == 1 {
            let mut with_id = delta([203, 0, 113, 2], 50 * MIB, 1000, true);
            with_id.client_id = CLIENT_ID.into();
            deltas.extend([
                delta([203, 0, 113, 1], 100 * MIB, 1000, true),
                with_id,
                delta([203, 0, 113, 3], 10 * MIB, 1000, true),
            ]);
        }
        s.handle(batch_msg(batch(i, T0 + i * 5 * MIN, deltas)))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn pushes_reach_a_real_otlp_receiver_with_what_query_answers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start(cfg(dir.path(), port, Duration::from_millis(200))).await;

    // No receiver yet: pushes fail, are counted, and the collector serves on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(
        &metrics(&server).await,
        "outflow_collector_otlp_export_failures_total ",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "no failed push counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        http_get(server.metrics_addr(), "/readyz").await.0,
        200,
        "ready while the receiver is away"
    );

    let receiver = Receiver::start(port, 0);
    traffic(&server).await;
    let push = receiver
        .wait_for("the volume alert opened", |p| {
            value(
                p,
                "outflow.alerts.opened",
                &[("outflow.detector", "volume")],
            ) == Some(1)
        })
        .await;
    // The traffic was applied before the alert opened: this push has all of it.
    let big = i64::try_from(6 * 256 * MIB).unwrap();
    assert_eq!(
        clients(&push, "outflow.client.response_bytes"),
        [
            ("client-address".into(), "203.0.113.7".into(), big),
            (
                "client-address".into(),
                "203.0.113.1".into(),
                i64::try_from(100 * MIB).unwrap()
            ),
            (
                "client-address".into(),
                "203.0.113.2".into(),
                i64::try_from(50 * MIB).unwrap()
            ),
            (
                "client-id".into(),
                CLIENT_ID.into(),
                i64::try_from(50 * MIB).unwrap()
            ),
        ],
        "{push:#}"
    );
    // The same numbers Query gives (`outflow-collector top -g client-address -w 1h -n 3`).
    let u = url(&server);
    for (group, name) in [
        (v1::GroupBy::ClientAddress, "client-address"),
        (v1::GroupBy::ClientId, "client-id"),
    ] {
        let q = top(&u, group, v1::Window::Window1h, 3).await;
        let from_query: Vec<(String, i64, i64, i64)> = q
            .talkers
            .iter()
            .map(|t| {
                (
                    t.key.clone(),
                    i64::try_from(t.response_bytes).unwrap(),
                    i64::try_from(t.request_bytes).unwrap(),
                    i64::from(t.hosts),
                )
            })
            .collect();
        let from_otlp: Vec<(String, i64, i64, i64)> =
            clients(&push, "outflow.client.response_bytes")
                .into_iter()
                .filter(|(g, _, _)| g == name)
                .map(|(_, c, bytes)| {
                    let key = [("outflow.group", name), ("outflow.client", c.as_str())];
                    (
                        c.clone(),
                        bytes,
                        value(&push, "outflow.client.request_bytes", &key).unwrap(),
                        value(&push, "outflow.client.hosts", &key).unwrap(),
                    )
                })
                .collect();
        assert_eq!(from_otlp, from_query, "{name}");
    }
    assert_eq!(
        value(
            &push,
            "outflow.client.connections_closed",
            &[("outflow.client", "203.0.113.7")]
        ),
        Some(6)
    );
    assert_eq!(
        value(
            &push,
            "outflow.alerts.open",
            &[("outflow.detector", "volume")]
        ),
        Some(1)
    );
    assert_eq!(
        value(
            &push,
            "outflow.alerts.open",
            &[("outflow.detector", "cohort")]
        ),
        Some(0)
    );
    // Kinds, units and the resource, as OpenTelemetry's conventions have them.
    let bytes = metric_of(&push, "outflow.client.response_bytes");
    assert_eq!(
        (bytes["kind"].as_str(), bytes["unit"].as_str()),
        (Some("gauge"), Some("By"))
    );
    let opened = metric_of(&push, "outflow.alerts.opened");
    assert_eq!(opened["kind"], "sum");
    assert_eq!(opened["monotonic"], true);
    assert_eq!(opened["cumulative"], true);
    assert_eq!(push["resource"]["service.name"], "outflow-collector");
    assert_eq!(
        push["resource"]["service.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(push["scope"], "outflow-collector");

    let text = metrics(&server).await;
    assert!(
        metric(&text, "outflow_collector_otlp_exports_total ") >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "outflow_collector_otlp_rejected_points_total "),
        0.0
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_last_push_is_made_at_shutdown_and_rejected_points_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = Receiver::start(port, 2);
    // An hour between pushes: only the one at start and the one at the stop come.
    let server = start(cfg(dir.path(), port, Duration::from_secs(3600))).await;
    let first = receiver.wait_for("the push at start", |_| true).await;
    assert!(
        points(&first, "outflow.client.response_bytes").is_empty(),
        "{first:#}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(
        &metrics(&server).await,
        "outflow_collector_otlp_rejected_points_total ",
    ) < 2.0
    {
        assert!(Instant::now() < deadline, "rejected points not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    traffic(&server).await;
    server.shutdown().await.unwrap();
    // The receiver printed the push before it answered; its line may still be on its way.
    let big = i64::try_from(6 * 256 * MIB).unwrap();
    receiver
        .wait_for("the traffic, at the stop", |p| {
            value(
                p,
                "outflow.client.response_bytes",
                &[("outflow.client", "203.0.113.7")],
            ) == Some(big)
        })
        .await;
    let pushes = receiver.pushes();
    assert_eq!(pushes.len(), 2, "{pushes:#?}");
}
