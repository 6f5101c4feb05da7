//! systemd's service notifications (`sd_notify(3)`, for `Type=notify` units): READY=1 once the
//! collector serves, WATCHDOG=1 while its store writer keeps up (`WatchdogSec=`), STOPPING=1
//! when it starts to stop. Each is a no-op when `NOTIFY_SOCKET` is unset (not started by
//! systemd).
use std::{sync::Arc, time::Duration};

use log::warn;
use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::collector::Collector;

fn notify(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(std::slice::from_ref(&state)) {
        warn!("cannot tell systemd {state}: {e}");
    }
}

/// Tells systemd the collector serves.
pub fn ready() {
    notify(NotifyState::Ready);
}

/// Tells systemd the collector is stopping.
pub fn stopping() {
    notify(NotifyState::Stopping);
}

/// The interval of WATCHDOG=1 pings systemd asked for (`WATCHDOG_USEC`, for this process):
/// half its watchdog timeout.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|t| !t.is_zero())
        .map(|t| t / 2)
}

/// If systemd asked for a watchdog: every half of its timeout, pings the store writer
/// ([`Collector::ping_writer`]: the writer thread took every request queued before and
/// finished their commit) and only then sends WATCHDOG=1. A writer that is stuck or gone, or
/// takes longer than the interval to get through its queue, misses the ping, and systemd
/// restarts the collector when it has missed a whole timeout. Ends when `stop` is cancelled.
pub fn spawn_watchdog(
    collector: &Arc<Collector>,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    let every = watchdog_interval()?;
    // Weak: the watchdog must not keep the collector (and its store) open.
    let collector = Arc::downgrade(collector);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let Some(c) = collector.upgrade() else { break };
            tokio::select! {
                () = stop.cancelled() => break,
                r = tokio::time::timeout(every, c.ping_writer()) => match r {
                    Ok(Ok(())) => notify(NotifyState::Watchdog),
                    Ok(Err(e)) => warn!("watchdog: the store writer does not answer ({e}): no WATCHDOG=1"),
                    Err(_) => warn!("watchdog: the store writer took more than {every:?} to answer: no WATCHDOG=1"),
                },
            }
        }
    }))
}
