//! The binary: config errors in one line, print-config, serving, `top` and `client` tables,
//! and a clean exit on SIGTERM.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_outflow-collector");

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("OUTFLOW_COLLECTOR_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn one_error_line(stderr: &str, contains: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(contains), "{stderr}");
}

#[test]
fn config_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(&["--config", "/nonexistent/collector.toml"]);
    assert!(!ok);
    one_error_line(&err, "/nonexistent/collector.toml");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_deltas_per_batch = 0\n").unwrap();
    let (ok, _, err) = run(&["print-config", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    one_error_line(&err, "config field `limits.max_deltas_per_batch`");

    std::fs::write(&bad, "listen = 5\n").unwrap();
    let (ok, _, err) = run(&["--config", bad.to_str().unwrap()]);
    assert!(!ok);
    one_error_line(&err, "bad.toml");

    let (ok, _, err) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        "/proc/outflow-collector-test",
    ]);
    assert!(!ok);
    one_error_line(&err, "/proc/outflow-collector-test");

    let (ok, _, err) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        "/nonexistent/token",
    ]);
    assert!(!ok);
    one_error_line(&err, "auth.token_file /nonexistent/token");
}

#[test]
fn print_config_shows_defaults_and_flags() {
    let (ok, out, err) = run(&["print-config", "--listen", "127.0.0.1:7000"]);
    assert!(ok, "{err}");
    assert!(out.contains("listen = \"127.0.0.1:7000\""), "{out}");
    assert!(out.contains("metrics_listen = \"127.0.0.1:9411\""), "{out}");
    assert!(
        out.contains("data_dir = \"/var/lib/outflow-collector\""),
        "{out}"
    );
    assert!(out.contains("max_message_bytes = 16777216"), "{out}");
}

/// `nats-permissions` prints a role's subjects for the config's stream and prefix, as a
/// block for the servers' authorization and as `nsc` flags; a standalone collector has none.
#[test]
fn nats_permissions_follow_the_role_and_the_stream() {
    let (ok, out, err) = run(&["nats-permissions", "--role", "ingest"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("permissions {") && out.contains("\"outflow.parts.*\""),
        "{out}"
    );
    assert!(
        out.contains("nsc edit user") && !out.contains("CONSUMER"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("collector.toml");
    std::fs::write(
        &file,
        "[cluster]\nrole = \"aggregator\"\nstream = \"FLEET\"\nsubject_prefix = \"fleet.parts\"\n",
    )
    .unwrap();
    let (ok, out, err) = run(&["nats-permissions", "--config", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    for s in [
        "\"$KV.FLEET-claims.>\"",
        "\"fleet.parts.cohorts.*\"",
        "\"$JS.ACK.FLEET.>\"",
    ] {
        assert!(out.contains(s), "{s}: {out}");
    }
    assert!(!out.contains("OUTFLOW_PARTS"), "{out}");

    let (ok, _, err) = run(&["nats-permissions"]);
    assert!(!ok);
    one_error_line(&err, "standalone collector does not use NATS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_answers_the_cli_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log line names the bound port.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while addr.is_none() && Instant::now() < deadline {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_owned);
    }
    let addr = addr.unwrap_or_else(|| panic!("no listening line in:\n{log}"));
    assert!(
        log.contains("open to anyone"),
        "no warning about open ingest:\n{log}"
    );
    let u = format!("http://{addr}");
    let t = now_ms() - 5000;
    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-cli", 1, "gpu-cli")).await.unwrap();
    a.batch(batch(
        1,
        t,
        vec![
            delta([203, 0, 113, 7], 3 << 20, 100, true),
            delta([203, 0, 113, 8], 1 << 20, 50, false),
        ],
    ))
    .await
    .unwrap();
    a.close().await;

    let bin = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&a)
        })
        .await
        .unwrap()
    };
    let (ok, out, err) = bin(vec![
        "top".into(),
        "--server".into(),
        u.clone(),
        "--group-by".into(),
        "client-prefix".into(),
        "--window".into(),
        "1h".into(),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("window 1h"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("203.0.113.0/24"))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["203.0.113.0/24", "4.00", "MiB", "150", "B", "1", "1"]
    );

    let (ok, out, err) = bin(vec![
        "top".into(),
        "-s".into(),
        u.clone(),
        "-g".into(),
        "client-address".into(),
        "-w".into(),
        "1m".into(),
        "--limit".into(),
        "1".into(),
        "--exact".into(),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("203.0.113.7  3145728 B"), "{out}");
    assert!(!out.contains("203.0.113.8"), "{out}");

    let (ok, out, err) = bin(vec![
        "client".into(),
        "--server".into(),
        u.clone(),
        "203.0.113.0/24".into(),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.starts_with("client 203.0.113.0/24\n"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains("4.00 MiB")).count(),
        4,
        "{out}"
    );

    let (ok, _, err) = bin(vec![
        "client".into(),
        "--server".into(),
        u.clone(),
        "192.0.2.1".into(),
    ])
    .await;
    assert!(!ok);
    one_error_line(&err, "NotFound");

    let (ok, _, err) = bin(vec![
        "top".into(),
        "--server".into(),
        "http://127.0.0.1:1".into(),
    ])
    .await;
    assert!(!ok);
    one_error_line(&err, "cannot connect to http://127.0.0.1:1");

    // SIGTERM: a clean exit 0.
    // SAFETY: kill(2) on the pid of the child we spawned.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = tokio::task::spawn_blocking(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        (child.wait().unwrap(), rest)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit {:?}:\n{}", status.0, status.1);
    assert!(status.1.contains("stopped"), "{}", status.1);
}
