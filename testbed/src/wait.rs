//! Waiting for a condition with a deadline, for state that can only be polled.

use std::thread;
use std::time::{Duration, Instant};

/// Checks `condition` until it holds or `timeout` passes; returns whether it held.
///
/// The pause between checks starts at 1 ms and doubles up to 50 ms, so a condition that
/// becomes true quickly is seen quickly.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Like [`poll_until`], but panics with `what` if the condition does not hold in time.
pub fn wait_for(timeout: Duration, what: &str, condition: impl FnMut() -> bool) {
    if !poll_until(timeout, condition) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}
