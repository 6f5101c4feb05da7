//! The JSON lines a child process prints on stdout, parsed by a thread as they arrive and
//! waited for with a deadline.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

/// Lines of one pipe: an optional `ready` line first, then one JSON value of type `T` a line.
pub(crate) struct JsonLines<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

struct State<T> {
    ready: bool,
    items: Vec<T>,
    bad_lines: Vec<String>,
    /// End of file (or a read error): nothing more will arrive.
    closed: bool,
}

/// Why a wait on [`JsonLines`] failed; the caller adds what the process wrote on stderr.
pub(crate) enum WaitError {
    /// The process printed a line that is neither `ready` nor a `T`.
    BadLines(Vec<String>),
    /// The pipe closed (the process exited) before the condition held.
    Closed { items: usize },
    /// The deadline passed.
    TimedOut { items: usize },
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadLines(lines) => write!(f, "it printed lines that are not records: {lines:?}"),
            Self::Closed { items } => write!(f, "it exited (closed stdout) after {items} records"),
            Self::TimedOut { items } => write!(f, "timed out with {items} records"),
        }
    }
}

impl<T: DeserializeOwned + Clone + Send + 'static> JsonLines<T> {
    /// Starts a thread named `name` that reads `pipe` to its end. With `ready_line`, a line
    /// equal to it (the first time) marks the process ready instead of being parsed.
    pub(crate) fn spawn(
        name: &str,
        pipe: impl Read + Send + 'static,
        ready_line: Option<&'static str>,
    ) -> Arc<Self> {
        let lines = Arc::new(Self {
            state: Mutex::new(State {
                ready: ready_line.is_none(),
                items: Vec::new(),
                bad_lines: Vec::new(),
                closed: false,
            }),
            changed: Condvar::new(),
        });
        let sink = Arc::clone(&lines);
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || sink.read(pipe, ready_line))
            .unwrap_or_else(|e| panic!("spawning the stdout reader {name}: {e}"));
        lines
    }

    fn read(&self, pipe: impl Read, ready_line: Option<&str>) {
        let mut lines = BufReader::new(pipe).lines();
        loop {
            let line = lines.next();
            let mut state = self.lock();
            match line {
                Some(Ok(line)) if !state.ready && Some(line.as_str()) == ready_line => {
                    state.ready = true;
                }
                Some(Ok(line)) => match serde_json::from_str::<T>(&line) {
                    Ok(item) => state.items.push(item),
                    Err(e) => state.bad_lines.push(format!("{line} ({e})")),
                },
                Some(Err(e)) => {
                    state.bad_lines.push(format!("<read error: {e}>"));
                    state.closed = true;
                }
                None => state.closed = true,
            }
            let closed = state.closed;
            drop(state);
            self.changed.notify_all();
            if closed {
                return;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every record so far, in order.
    pub(crate) fn items(&self) -> Vec<T> {
        self.lock().items.clone()
    }

    /// Waits for the ready line. `Err(true)` if the pipe closed first, `Err(false)` on timeout.
    pub(crate) fn wait_ready(&self, timeout: Duration) -> Result<(), bool> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.ready {
                return Ok(());
            }
            if state.closed {
                return Err(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(false);
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until `condition` holds for the records so far and returns them.
    pub(crate) fn wait_until(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&[T]) -> bool,
    ) -> Result<Vec<T>, WaitError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if !state.bad_lines.is_empty() {
                return Err(WaitError::BadLines(state.bad_lines.clone()));
            }
            if condition(&state.items) {
                return Ok(state.items.clone());
            }
            let items = state.items.len();
            if state.closed {
                return Err(WaitError::Closed { items });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WaitError::TimedOut { items });
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until the pipe has closed (after the process exited) and returns every record.
    pub(crate) fn wait_closed(&self, timeout: Duration) -> Result<Vec<T>, WaitError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.closed {
                return if state.bad_lines.is_empty() {
                    Ok(state.items.clone())
                } else {
                    Err(WaitError::BadLines(state.bad_lines.clone()))
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WaitError::TimedOut {
                    items: state.items.len(),
                });
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
