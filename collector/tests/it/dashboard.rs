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
