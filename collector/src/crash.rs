//! Crash points: named places on the commit path where the fault suite kills the collector
//! (SIGKILL, as the OOM killer or a power cut would), chosen by the environment variable
//! [`ENV`] in the `fail` crate's syntax: `NAME=ACTIONS[;NAME=ACTIONS...]`, where a point
//! whose action is `return` kills the process. `writer::after_commit=2*off->return` kills it
//! the third time a group commit has been made durable. Unset (as in production) a point costs
//! a map lookup per group commit.
//!
//! The points:
//! - `store::before_commit`: the group's rollups and watermarks are written into the
//!   transaction, which is not committed;
//! - `writer::after_commit`: the transaction is durable, memory not updated, no Ack sent;
//! - `writer::after_acks`: the group's Acks are handed to their streams.

/// The environment variable that arms crash points.
pub const ENV: &str = "OUTFLOW_FAILPOINTS";

/// Arms the crash points [`ENV`] names; an error names the part that is not understood.
pub fn arm_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, actions) = part
            .split_once('=')
            .ok_or_else(|| format!("{ENV}: `{part}`: want NAME=ACTIONS"))?;
        fail::cfg(name.trim(), actions.trim()).map_err(|e| format!("{ENV}: `{part}`: {e}"))?;
    }
    Ok(())
}

/// Ends the process at once with SIGKILL: nothing is flushed, no destructor runs.
pub fn kill_self() -> ! {
    // SAFETY: signals this process; no memory is touched.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    loop {
        std::thread::park();
    }
}

/// A crash point named `$name` (see the module's list).
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| $crate::crash::kill_self())
    };
}
