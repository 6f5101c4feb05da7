//! Crash points: named places on a commit path where the fault suite kills the process
//! (SIGKILL, as the OOM killer or a power cut would), armed by the environment variable
//! [`ENV`] in the `fail` crate's syntax: `NAME=ACTIONS[;NAME=ACTIONS...]`, where a point whose
//! action is `return` kills the process: `writer::after_commit=2*off->return` kills it the
//! third time it passes there. Unset (as in production), a point costs a map lookup.
//!
//! The agent and the collector each list their points in their own `crash` module.

#[doc(hidden)]
pub use fail;

/// The environment variable that arms crash points.
pub const ENV: &str = "OUTFLOW_FAILPOINTS";

/// Arms the crash points [`ENV`] names; an error names the part that is not understood.
pub fn arm_from_env() -> Result<(), String> {
    match std::env::var(ENV) {
        Ok(spec) => arm(&spec),
        Err(_) => Ok(()),
    }
}

/// Arms the crash points of `spec` (the syntax of [`ENV`]).
pub fn arm(spec: &str) -> Result<(), String> {
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

/// A crash point named `$name`: the process is killed here when [`ENV`] arms it.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        $crate::fail::fail_point!($name, |_| $crate::kill_self())
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_that_is_not_understood_is_named() {
        assert!(arm("").is_ok());
        let e = arm("a::b").unwrap_err();
        assert!(e.contains("`a::b`: want NAME=ACTIONS"), "{e}");
        let e = arm("a::b=2*nonsense").unwrap_err();
        assert!(
            e.starts_with("OUTFLOW_FAILPOINTS: `a::b=2*nonsense`: "),
            "{e}"
        );
        assert!(arm("a::b=2*off->return").is_ok());
        fail::remove("a::b");
    }
}
