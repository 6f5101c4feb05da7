//! `outflow-collector top --watch` in a real terminal: the built binary under tmux (Debian's,
//! installed by `cargo xtask setup`), against an in-process collector fed over the agent
//! protocol. What is on the screen is read with `tmux capture-pane`.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use outflow_collector::Server;
use outflow_testbed::tools::program;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_outflow-collector");
const MIN: u64 = 60_000;
const T0: u64 = 1_750_000_000_000 / (60 * MIN) * (60 * MIN);
const MIB: u64 = 1 << 20;

/// A tmux server of its own (its own socket) running one command in a 160x45 window.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Self {
        let socket = format!("outflow-watch-{}", std::process::id());
        let t = Tmux { socket };
        let out = t
            .cmd()
            .args([
                "new-session",
                "-d",
                "-s",
                "w",
                "-x",
                "160",
                "-y",
                "45",
                command,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(program("tmux", "tmux"));
        c.args(["-L", &self.socket]);
        c
    }

    /// The screen, or `None` once the command (and with it the session) has ended.
    fn screen(&self) -> Option<String> {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "w"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn keys(&self, keys: &str) {
        let out = self
            .cmd()
            .args(["send-keys", "-t", "w", keys])
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux send-keys {keys}");
    }

    /// The first screen that satisfies `ok`; panics after 30 s showing the last one.
    async fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        loop {
            if let Some(s) = self.screen() {
                if ok(&s) {
                    return s;
                }
                last = s;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}; the last one:\n{last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

/// The key of the table's first row (the line after the `KEY ...` header).
fn first_row(screen: &str) -> Option<String> {
    let mut lines = screen.lines().skip_while(|l| !l.starts_with("KEY"));
    lines.next()?;
    lines.next()?.split_whitespace().next().map(str::to_owned)
}

/// Batches `(seq, deltas)` of one agent, 5 minutes of batch time apart, in a session of their
/// own (its Hello continues the agent's sequence).
async fn send(server: &Server, batches: Vec<(u64, Vec<outflow_proto::v1::ConnDelta>)>) {
    let mut s = server.collector().session();
    s.handle(hello_msg("watch-a", 1, "gpu-0")).await.unwrap();
    for (seq, deltas) in batches {
        s.handle(batch_msg(batch(seq, T0 + seq * 5 * MIN, deltas)))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_live_view_follows_the_traffic_and_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(replay_config(dir.path())).await;
    send(
        &server,
        vec![(
            1,
            vec![
                delta([203, 0, 113, 7], 100 * MIB, 1000, true),
                delta([203, 0, 113, 1], 50 * MIB, 1000, true),
            ],
        )],
    )
    .await;

    let tmux = Tmux::start(&format!(
        "{BIN} top --watch --server {} -g client-address -w 1h --interval 200ms --exact",
        url(&server)
    ));
    let screen = tmux
        .wait_for("203.0.113.7 on top", |s| {
            first_row(s).as_deref() == Some("203.0.113.7")
        })
        .await;
    assert!(screen.contains("group client-address"), "{screen}");
    assert!(screen.contains(&(100 * MIB).to_string()), "{screen}");
    assert!(screen.contains("open alerts: 0"), "{screen}");

    // 203.0.113.9 pulls 1.5 GiB in 30 minutes: it goes on top, and its volume alert shows,
    // without a key pressed.
    send(
        &server,
        (2..=7)
            .map(|seq| (seq, vec![delta([203, 0, 113, 9], 256 * MIB, 1000, true)]))
            .collect(),
    )
    .await;
    let screen = tmux
        .wait_for("203.0.113.9 on top with its alert", |s| {
            first_row(s).as_deref() == Some("203.0.113.9") && s.contains("open alerts: 1")
        })
        .await;
    assert!(
        screen
            .lines()
            .any(|l| l.contains("OPEN") && l.contains("203.0.113.9")),
        "{screen}"
    );

    // `g`: the next grouping, the /24 of them all.
    tmux.keys("g");
    tmux.wait_for("the client-prefix grouping", |s| {
        s.contains("group client-prefix") && first_row(s).as_deref() == Some("203.0.113.0/24")
    })
    .await;
    // `w`: the next window (24h), the same traffic.
    tmux.keys("w");
    tmux.wait_for("the 24h window", |s| s.contains("window 24h"))
        .await;

    // `q`: the view ends, and the terminal with it.
    tmux.keys("q");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tmux.screen().is_some() {
        assert!(Instant::now() < deadline, "top --watch did not quit on q");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

#[test]
fn watch_without_a_terminal_says_so() {
    let out = Command::new(BIN)
        .args(["top", "--watch", "--server", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("top --watch needs a terminal"), "{err}");
}
