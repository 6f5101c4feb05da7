//! Crash points: named places on a commit path where the fault suite kills the process
//! (SIGKILL, as the OOM killer or a power cut would), error points, where it makes an
//! operation fail as a failing disk would ([`error_point!`]), and delay points, where async
//! code waits as it would on a slow network ([`delay_point!`]); armed by the environment
//! variable [`ENV`] in the `fail` crate's syntax: `NAME=ACTIONS[;NAME=ACTIONS...]`, where a
//! point whose action is `return` kills the process: `writer::after_commit=2*off->return`
//! kills it the third time it passes there. Unset (as in production), a point costs a map
//! lookup.
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

/// An error point named `$name`: true where the code should fail as if its I/O had failed,
/// when [`ENV`] (or a test, through [`fail::cfg`]) arms it with `return`. Armed with an
/// argument, `return(TEXT)`, it is true only where `$scope` (a `&str`) contains `TEXT`: a
/// test running several collectors in one process fails one of them. Unset, it costs a map
/// lookup.
#[macro_export]
macro_rules! error_point {
    ($name:literal, $scope:expr) => {
        $crate::fail::eval($name, |arg: Option<String>| {
            arg.is_none_or(|a| $scope.contains(a.as_str()))
        })
        .unwrap_or(false)
    };
}

/// A delay point named `$name`: how long async code should wait here (and so stall, as a
/// slow network or disk would stall it), when [`ENV`] (or a test, through [`fail::cfg`]) arms
/// it with `return(MILLISECONDS)`; `None` otherwise. Unlike the `fail` crate's `sleep`, which
/// blocks the thread, the caller awaits the delay, so the other tasks of its runtime go on.
/// Unset, it costs a map lookup.
#[macro_export]
macro_rules! delay_point {
    ($name:literal) => {
        $crate::fail::eval($name, |arg: Option<String>| {
            ::std::time::Duration::from_millis(
                arg.and_then(|a| a.trim().parse::<u64>().ok()).unwrap_or(0),
            )
        })
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

    #[test]
    fn an_error_point_with_an_argument_fails_only_where_it_names() {
        let here = |scope: &str| error_point!("c::d", scope);
        assert!(!here("/data/a"));
        arm("c::d=return(/data/a)").unwrap();
        assert!(here("/data/a/store.redb"));
        assert!(!here("/data/b/store.redb"));
        arm("c::d=return").unwrap();
        assert!(here("/data/b/store.redb"));
        fail::remove("c::d");
        assert!(!here("/data/a"));
    }

    #[test]
    fn a_delay_point_gives_its_milliseconds_when_armed() {
        let here = || delay_point!("e::f");
        assert_eq!(here(), None);
        arm("e::f=1*return(1500)").unwrap();
        assert_eq!(here(), Some(std::time::Duration::from_millis(1500)));
        assert_eq!(here(), None, "armed for once");
        fail::remove("e::f");
    }
}
