//! The web dashboard in a real headless Chromium (Debian's, driven over the DevTools protocol
//! by `tests/browser.py`), against a collector fed by outflow-sim: the page draws the fleet's
//! bytes, its top talkers are Query's, the simulator's extraction alert appears without a
//! reload, the alerted client's page opens with its history. A screenshot is kept in
//! `target/tmp/dashboard.png`. And the API wants the read token when tokens are configured.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use outflow_proto::v1;
use outflow_sim::{Scenario, SimConfig, run_scenario};
use outflow_testbed::tools::{program, venv_python};
use serde_json::Value;

use crate::common::*;

/// The browser driver: one command, one JSON answer.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Browser {
    fn start() -> Self {
        let chromium = program("chromium", "chromium");
        let python = venv_python(&["websocket"]);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser.py");
        let mut child = Command::new(python)
            .arg(script)
            .arg(chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {script}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut b = Self {
            child,
            stdin,
            stdout,
        };
        let ready = b.answer();
        assert_eq!(ready["ok"], true, "the browser did not start: {ready}");
        b
    }

    fn answer(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("browser.py said {line:?}: {e}"))
    }

    fn command(&mut self, cmd: &str) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let a = self.answer();
        assert!(a.get("error").is_none(), "{cmd}: {a}");
        a
    }

    fn open(&mut self, url: &str) {
        self.command(&format!("open {url}"));
    }

    fn eval(&mut self, js: &str) -> Value {
        self.command(&format!("eval {js}"))["value"].clone()
    }

    /// Waits up to `secs` for `js` to be truthy; its value.
    fn wait(&mut self, secs: u32, what: &str, js: &str) -> Value {
        writeln!(self.stdin, "wait {secs} {js}").unwrap();
        self.stdin.flush().unwrap();
        let a = self.answer();
        assert!(
            a.get("error").is_none(),
            "the page did not show {what} in {secs} s ({a}); its text:\n{}",
            self.eval("document.body.innerText")
        );
        a["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_shows_the_fleet_and_the_simulated_extraction_as_it_happens() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(replay_config(dir.path())).await;
    let page = format!("http://{}/", server.metrics_addr());
    let mut b = tokio::task::block_in_place(Browser::start);
    tokio::task::block_in_place(|| {
        b.open(&page);
        b.wait(
            30,
            "a first refresh",
            "window.outflow && window.outflow.refreshes > 0",
        );
        // Marks this load: a reload would lose it.
        b.eval("window.sameLoad = 42");
        assert_eq!(
            b.eval("document.querySelectorAll('#alerts .alert').length"),
            0
        );
    });

    // A day of 4 hosts and 500 clients, one of them extracting in bulk.
    let cfg = SimConfig {
        collector: url(&server),
        hosts: 4,
        clients: 500,
        days: 1,
        batch_secs: 300,
        seed: 3,
        start_ms: Some(1_750_032_000_000 / 86_400_000 * 86_400_000),
        ..SimConfig::default()
    };
    let report = run_scenario(&cfg, Scenario::Bulk).await.unwrap();
    assert!(report.batches > 0);

    let alerts = server.collector().alerts().list(false, 100, false);
    let volume: Vec<&v1::Alert> = alerts
        .iter()
        .filter(|a| a.detector == v1::Detector::Volume as i32)
        .collect();
    assert!(
        !volume.is_empty(),
        "the simulator's bulk extraction raised no volume alert"
    );
    let top = top(
        &url(&server),
        v1::GroupBy::ClientAddress,
        v1::Window::Window10m,
        20,
    )
    .await;
    let want: Vec<String> = top.talkers.iter().map(|t| t.key.clone()).collect();
    assert!(!want.is_empty());

    tokio::task::block_in_place(|| {
        // The alert shows up on the page loaded before it opened.
        let key = b.wait(
            30,
            "the volume alert, without a reload",
            "window.sameLoad === 42 && [...document.querySelectorAll('#alerts .alert')].map(a => a.dataset.detector + ' ' + a.dataset.key).find(t => t.startsWith('volume '))",
        );
        let key = key
            .as_str()
            .unwrap()
            .trim_start_matches("volume ")
            .to_owned();
        assert!(
            volume.iter().any(|a| a.key == key),
            "{key} is not one of the volume alerts {:?}",
            volume.iter().map(|a| &a.key).collect::<Vec<_>>()
        );
        // The chart has data, the table is Query's top talkers.
        b.wait(
            10,
            "the chart with data",
            "+(document.querySelector('#chart svg') || {dataset: {}}).dataset.nonzero > 0",
        );
        let js_want = serde_json::to_string(&want).unwrap();
        b.wait(
            10,
            "Query's top talkers in the table",
            &format!(
                "JSON.stringify([...document.querySelectorAll('#top tbody tr')].map(r => r.dataset.key)) === {}",
                serde_json::to_string(&js_want).unwrap()
            ),
        );
        let shot = concat!(env!("CARGO_TARGET_TMPDIR"), "/dashboard.png");
        let png = b.command(&format!("shot {shot}"));
        assert!(png["bytes"].as_u64().unwrap() > 20_000, "{png}");

        // The week, per minute: the simulated day in it, the extractor stacked.
        b.eval("[...document.querySelectorAll('#range button')].find(b => b.dataset.v === '7d').click()");
        b.wait(
            10,
            "the week per minute with the extractor stacked",
            &format!(
                "(() => {{ const s = document.querySelector('#chart svg'); return !!s && +s.dataset.buckets === 10080 && +s.dataset.nonzero > 60 && [...s.querySelectorAll('path')].some(p => p.dataset.key === {key:?}); }})()"
            ),
        );
        let shot = concat!(env!("CARGO_TARGET_TMPDIR"), "/dashboard-week.png");
        b.command(&format!("shot {shot}"));

        // The alerted client's page: its windows, its history, its alert.
        b.eval(
            "[...document.querySelectorAll('#alerts .alert')].find(a => a.dataset.detector === 'volume').querySelector('.key a').click()",
        );
        b.wait(
            10,
            "the client's page",
            &format!(
                "document.querySelector('#client-title').textContent.endsWith({key:?}) && +(document.querySelector('#client-chart svg') || {{dataset: {{}}}}).dataset.nonzero > 0 && [...document.querySelectorAll('#client-alerts .alert')].some(a => a.dataset.detector === 'volume')"
            ),
        );
        assert_eq!(b.eval("window.sameLoad"), 42, "the page was reloaded");
        let shot = concat!(env!("CARGO_TARGET_TMPDIR"), "/dashboard-client.png");
        b.command(&format!("shot {shot}"));
    });
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_api_wants_the_read_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("read-token");
    std::fs::write(&token, "s3cret-read\n").unwrap();
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&token, private).unwrap();
    let mut cfg = replay_config(dir.path());
    cfg.auth.read_token_file = Some(token);
    let server = start(cfg).await;
    let addr = server.metrics_addr();
    // The page itself is public (it holds no data), the API is not.
    let (code, body) = http_get(addr, "/").await;
    assert_eq!(code, 200);
    assert!(body.contains("<title>outflow</title>") && body.contains("/app.js"));
    assert_eq!(http_get(addr, "/app.js").await.0, 200);
    let (code, body) = http_get(addr, "/api/top").await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("auth.read_token_file"), "{body}");
    let (code, _) = http_get_with(addr, "/api/top", "Authorization: Bearer wrong\r\n").await;
    assert_eq!(code, 401);
    let (code, body) =
        http_get_with(addr, "/api/top", "Authorization: Bearer s3cret-read\r\n").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["talkers"], serde_json::json!([]));
    // Bad parameters are one sentence each.
    let (code, body) = http_get_with(
        addr,
        "/api/top?group=nope",
        "Authorization: Bearer s3cret-read\r\n",
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("want client-address"), "{body}");
    server.shutdown().await.unwrap();
}

const MIN: u64 = 60_000;

async fn overview(addr: std::net::SocketAddr, query: &str) -> Value {
    let (code, body) = http_get(addr, &format!("/api/overview?{query}")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The stacked keys of an overview: key -> bytes per minute.
fn stacked(v: &Value) -> std::collections::BTreeMap<String, Vec<u64>> {
    v["stack"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let bytes = s["series"]["bytes"].as_array().unwrap();
            let bytes = bytes.iter().map(|b| b.as_u64().unwrap()).collect();
            (s["key"].as_str().unwrap().to_owned(), bytes)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_is_per_minute_over_a_week_exact_to_the_byte_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms() / MIN * MIN;
    // Episodes 6 days, 2 days and 3 hours before `end`, each minute d: 203.0.113.1 pulls
    // most, .2 less; .3 a little at d+2 and d+3 (batch time moves on, so minute d settles);
    // and at the end, in the newest minute (not settled yet), .4 pulls the most.
    let end = now - 2 * 3_600_000 + 30_000;
    let mut sent: Vec<(u64, [u8; 4], u64)> = Vec::new();
    for (i, age) in [6 * 24 * 60, 2 * 24 * 60, 3 * 60].into_iter().enumerate() {
        let d = end / MIN * MIN - age * MIN;
        let i = i as u64;
        sent.push((d + 1_000, [203, 0, 113, 1], 9_000 + i));
        sent.push((d + 2_000, [203, 0, 113, 2], 5_000 + i));
        sent.push((d + 2 * MIN + 5_000, [203, 0, 113, 3], 100));
        sent.push((d + 3 * MIN + 5_000, [203, 0, 113, 3], 100));
    }
    sent.push((end, [203, 0, 113, 4], 20_000));
    // A late batch (an agent that spooled): in the fleet's line, and in no key's share, of a
    // minute already settled.
    let late = end / MIN * MIN - 3 * 60 * MIN + 30_000;
    sent.push((late, [203, 0, 113, 9], 777));

    let server = start(replay_config(dir.path())).await;
    let mut a = agent_stream(&url(&server)).await;
    a.hello(hello("agent-h", 1, "gpu-h")).await.unwrap();
    for (seq, (t, client, bytes)) in sent.iter().enumerate() {
        let b = batch(seq as u64 + 1, *t, vec![delta(*client, *bytes, 1, true)]);
        assert_eq!(a.batch(b).await.unwrap(), seq as u64 + 1);
    }
    a.close().await;

    let last = end / MIN;
    let first = last - 7 * 24 * 60 + 1;
    let mut truth = vec![0u64; 7 * 24 * 60];
    for (t, _, b) in &sent {
        truth[(t / MIN - first) as usize] += b;
    }
    let check = |v: &Value| {
        assert_eq!(v["range"], "7d");
        assert_eq!(v["fleet"]["start_ms"].as_u64(), Some(first * MIN));
        assert_eq!(v["fleet"]["bucket_ms"].as_u64(), Some(MIN));
        let fleet: Vec<u64> = v["fleet"]["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(fleet, truth, "the fleet's bytes per minute");
        assert_eq!(
            v["fleet_bytes"].as_u64(),
            Some(sent.iter().map(|s| s.2).sum::<u64>())
        );
        let stack = stacked(v);
        let keys: Vec<&str> = v["stack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["key"].as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            ["203.0.113.1", "203.0.113.4", "203.0.113.2", "203.0.113.3"],
            "the keys with the most bytes over the week, most first"
        );
        // Each key's minutes are what it sent in them (the late batch is nobody's).
        for (key, bytes) in &stack {
            let mut want = vec![0u64; truth.len()];
            for (t, c, b) in &sent {
                let name = format!("{}.{}.{}.{}", c[0], c[1], c[2], c[3]);
                if name == *key && *t != late {
                    want[(t / MIN - first) as usize] += b;
                }
            }
            assert_eq!(bytes, &want, "{key}'s bytes per minute");
        }
    };
    let addr = server.metrics_addr();
    check(&overview(addr, "range=7d&top=5").await);
    // The other ranges are the week's newest minutes.
    let hour = overview(addr, "range=1h").await;
    assert_eq!(hour["fleet"]["bytes"].as_array().unwrap().len(), 60);
    assert_eq!(hour["fleet_bytes"].as_u64(), Some(20_000));
    assert_eq!(stacked(&hour).keys().collect::<Vec<_>>(), ["203.0.113.4"]);
    let day = overview(addr, "range=24h&group=host").await;
    assert_eq!(day["fleet"]["bytes"].as_array().unwrap().len(), 24 * 60);
    assert_eq!(stacked(&day).keys().collect::<Vec<_>>(), ["gpu-h"]);
    let (code, body) = http_get(addr, "/api/overview?range=30d").await;
    assert_eq!(code, 400);
    assert!(body.contains("want 10m, 1h, 24h or 7d"), "{body}");
    server.shutdown().await.unwrap();

    // The week is in the store.
    let server = start(replay_config(dir.path())).await;
    check(&overview(server.metrics_addr(), "range=7d&top=5").await);
    server.shutdown().await.unwrap();
}
