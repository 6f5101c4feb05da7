//! `outflow-collector top --watch`: a live terminal view of a running collector for the
//! operator on an SSH session. The top talkers and the open alerts, asked again every
//! interval; keys change the grouping (`g`/`G`) and the window (`w`/`W`), `r` asks at once,
//! `q` (or Esc, Ctrl-C) quits. A collector that does not answer is said on the screen, and
//! asked again at the next interval.
//!
//! The terminal is driven with crossterm (raw mode, the alternate screen, key events): the
//! screen is the same text tables `top` and `alerts` print, redrawn whole, so it needs no
//! widget library.
use std::{io::Write as _, time::Duration};

use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    execute, queue,
    terminal::{self, ClearType},
};
use outflow_proto::v1;
use tokio::sync::mpsc;

use crate::client::{self, ClientError, ClientOptions};

/// The groupings, in the order `g` goes through them.
pub const GROUPS: [(v1::GroupBy, &str); 6] = [
    (v1::GroupBy::ClientAddress, "client-address"),
    (v1::GroupBy::ClientPrefix, "client-prefix"),
    (v1::GroupBy::ClientId, "client-id"),
    (v1::GroupBy::Peer, "peer"),
    (v1::GroupBy::Host, "host"),
    (v1::GroupBy::Workload, "workload"),
];

/// The windows, in the order `w` goes through them.
pub const WINDOWS: [(v1::Window, &str); 4] = [
    (v1::Window::Window1m, "1m"),
    (v1::Window::Window10m, "10m"),
    (v1::Window::Window1h, "1h"),
    (v1::Window::Window24h, "24h"),
];

/// Open alerts shown at most.
const ALERTS_SHOWN: usize = 10;

/// What the view shows.
#[derive(Debug, Clone)]
pub struct View {
    /// Index into [`GROUPS`].
    pub group: usize,
    /// Index into [`WINDOWS`].
    pub window: usize,
    pub limit: u32,
    pub interval: Duration,
    pub exact: bool,
}

/// The view cannot run.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("top --watch needs a terminal (without --watch, top prints the table once)")]
    NotATerminal,
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// What one refresh got: the tables, or why not.
pub struct Frame {
    pub top: Result<v1::TopTalkersResponse, String>,
    pub alerts: Result<v1::ListAlertsResponse, String>,
}

/// The screen's lines for `frame`, at most `height` of at most `width` characters.
pub fn render(server: &str, view: &View, frame: &Frame, width: u16, height: u16) -> Vec<String> {
    let (_, group) = GROUPS[view.group];
    let (_, window) = WINDOWS[view.window];
    let mut lines = vec![
        format!(
            "outflow-collector top --watch  {server}  every {}",
            humantime::format_duration(view.interval)
        ),
        format!("[g] group {group}  [w] window {window}  [r] refresh  [q] quit"),
        String::new(),
    ];
    match &frame.top {
        Ok(r) => lines.extend(
            client::top_table(group, window, r, view.exact)
                .lines()
                .map(str::to_owned),
        ),
        Err(e) => lines.push(format!("top talkers: {e} (asking again)")),
    }
    let mut tail = vec![String::new()];
    match &frame.alerts {
        Ok(r) => {
            tail.push(format!("open alerts: {}", r.alerts.len()));
            let shown = v1::ListAlertsResponse {
                alerts: r.alerts.iter().take(ALERTS_SHOWN).cloned().collect(),
            };
            tail.extend(
                client::alerts_table(&shown, view.exact)
                    .lines()
                    .map(str::to_owned),
            );
        }
        Err(e) => tail.push(format!("alerts: {e} (asking again)")),
    }
    // The alerts stay on screen: the table gives up its last rows first.
    let height = usize::from(height.max(1));
    let room = height.saturating_sub(tail.len().min(height / 2));
    lines.truncate(room);
    lines.extend(tail);
    lines.truncate(height);
    lines
        .into_iter()
        .map(|l| l.chars().take(usize::from(width)).collect())
        .collect()
}

/// What a key does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Quit,
    Refresh,
    None,
}

/// Applies `key` to `view`.
pub fn on_key(view: &mut View, key: KeyEvent) -> Action {
    if key.kind == KeyEventKind::Release {
        return Action::None;
    }
    let next = |i: usize, n: usize, back: bool| if back { (i + n - 1) % n } else { (i + 1) % n };
    match key.code {
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
        KeyCode::Char('r') => Action::Refresh,
        KeyCode::Char(c @ ('g' | 'G')) => {
            view.group = next(view.group, GROUPS.len(), c == 'G');
            Action::Refresh
        }
        KeyCode::Char(c @ ('w' | 'W')) => {
            view.window = next(view.window, WINDOWS.len(), c == 'W');
            Action::Refresh
        }
        _ => Action::None,
    }
}

/// Puts the terminal back however the view ends.
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Self> {
        terminal::enable_raw_mode()?;
        let screen = Screen;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(screen)
    }

    fn draw(lines: &[String]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        queue!(out, cursor::MoveTo(0, 0), terminal::Clear(ClearType::All))?;
        out.write_all(lines.join("\r\n").as_bytes())?;
        out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// Runs the view until the operator quits or SIGTERM comes.
pub async fn run(opts: &ClientOptions, mut view: View) -> Result<(), WatchError> {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(WatchError::NotATerminal);
    }
    let mut query = client::query_client(opts).await?;
    let mut alerts = client::alerts_client(opts).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let _screen = Screen::enter()?;
    let (tx, mut keys) = mpsc::unbounded_channel();
    // crossterm's reads block: a thread of their own, ended with the process.
    std::thread::spawn(move || {
        while let Ok(e) = event::read() {
            if tx.send(e).is_err() {
                return;
            }
        }
    });
    let mut tick = tokio::time::interval(view.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut frame = Frame {
        top: Err("asking".to_owned()),
        alerts: Err("asking".to_owned()),
    };
    let mut fetch = true;
    loop {
        if fetch {
            frame = Frame {
                top: query
                    .top_talkers(v1::TopTalkersRequest {
                        group_by: GROUPS[view.group].0 as i32,
                        window: WINDOWS[view.window].0 as i32,
                        limit: view.limit,
                    })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| status(&s)),
                alerts: alerts
                    .list(v1::ListAlertsRequest {
                        open_only: true,
                        limit: 0,
                        include_service: false,
                    })
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|s| status(&s)),
            };
        }
        let (w, h) = terminal::size().unwrap_or((80, 24));
        Screen::draw(&render(&opts.server, &view, &frame, w, h))?;
        fetch = tokio::select! {
            _ = tick.tick() => true,
            _ = term.recv() => return Ok(()),
            e = keys.recv() => match e {
                Some(Event::Key(k)) => match on_key(&mut view, k) {
                    Action::Quit => return Ok(()),
                    Action::Refresh => {
                        tick.reset();
                        true
                    }
                    Action::None => false,
                },
                Some(_) => false,
                None => return Ok(()),
            },
        };
    }
}

fn status(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        View {
            group: 0,
            window: 2,
            limit: 20,
            interval: Duration::from_secs(2),
            exact: true,
        }
    }

    fn frame(talkers: usize, alerts: usize) -> Frame {
        Frame {
            top: Ok(v1::TopTalkersResponse {
                talkers: (0..talkers)
                    .map(|i| v1::Talker {
                        key: format!("203.0.113.{i}"),
                        response_bytes: 1000 - i as u64,
                        ..Default::default()
                    })
                    .collect(),
                window_end_ms: 1,
            }),
            alerts: Ok(v1::ListAlertsResponse {
                alerts: (0..alerts)
                    .map(|i| v1::Alert {
                        key: format!("198.51.100.{i}"),
                        state: v1::AlertState::Open as i32,
                        summary: "pulled a lot".into(),
                        ..Default::default()
                    })
                    .collect(),
            }),
        }
    }

    #[test]
    fn the_screen_shows_the_table_and_keeps_the_alerts_when_short() {
        let lines = render("http://c:7411", &view(), &frame(3, 1), 200, 50);
        let text = lines.join("\n");
        assert!(lines[1].contains("group client-address"), "{text}");
        assert!(lines[1].contains("window 1h"), "{text}");
        assert!(text.contains("203.0.113.0"), "{text}");
        assert!(text.contains("open alerts: 1"), "{text}");
        assert!(text.contains("198.51.100.0"), "{text}");
        // 100 talkers on 20 lines: the alerts are still there, and nothing is wider than 30.
        let lines = render("http://c:7411", &view(), &frame(100, 2), 30, 20);
        assert_eq!(lines.len(), 20);
        assert!(lines.iter().all(|l| l.chars().count() <= 30));
        assert!(
            lines.iter().any(|l| l.starts_with("open alerts: 2")),
            "{lines:#?}"
        );
        // An error is said on the screen.
        let f = Frame {
            top: Err("Unavailable: connection refused".into()),
            alerts: Err("Unavailable".into()),
        };
        let text = render("http://c:7411", &view(), &f, 200, 50).join("\n");
        assert!(text.contains("connection refused (asking again)"), "{text}");
    }

    #[test]
    fn keys_cycle_groups_and_windows_and_quit() {
        let key = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE);
        let mut v = view();
        assert_eq!(on_key(&mut v, key('g')), Action::Refresh);
        assert_eq!(GROUPS[v.group].1, "client-prefix");
        on_key(&mut v, key('G'));
        on_key(&mut v, key('G'));
        assert_eq!(GROUPS[v.group].1, "workload");
        on_key(&mut v, key('w'));
        on_key(&mut v, key('w'));
        assert_eq!(WINDOWS[v.window].1, "1m");
        assert_eq!(on_key(&mut v, key('x')), Action::None);
        assert_eq!(on_key(&mut v, key('q')), Action::Quit);
        assert_eq!(
            on_key(
                &mut v,
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)
            ),
            Action::Quit
        );
    }
}
