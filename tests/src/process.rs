//! Child processes the tests start: signalled through a pidfd (never a recycled pid), waited
//! for with a deadline, killed when dropped; and capture of their stderr.

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;

/// A running child process, killed (SIGKILL) and reaped when dropped.
pub struct ChildProcess {
    name: String,
    pid: u32,
    pidfd: OwnedFd,
    child: Mutex<Child>,
}

impl ChildProcess {
    /// Spawns `command`; `name` is used in messages. Panics if it cannot be started.
    pub fn spawn(name: &str, command: &mut Command) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let pid = child.id();
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                let mut child = child;
                // Best effort: the pid is still ours because the child is not reaped yet.
                let _ = child.kill();
                let _ = child.wait();
                panic!("pidfd_open({pid}) for {name}: {e}");
            }
        };
        Self {
            name: name.to_owned(),
            pid,
            pidfd,
            child: Mutex::new(child),
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes the child's stdout pipe (if it was piped and not taken yet).
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.lock().stdout.take()
    }

    /// Takes the child's stderr pipe (if it was piped and not taken yet).
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.lock().stderr.take()
    }

    /// Sends `signal`; does nothing if the process has already exited.
    pub fn signal(&self, signal: Signal) {
        if let Err(e) = pidfd_send_signal(&self.pidfd, signal)
            && e.raw_os_error() != Some(libc::ESRCH)
        {
            panic!("sending {signal} to {} (pid {}): {e}", self.name, self.pid);
        }
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.lock()
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {} (pid {}): {e}", self.name, self.pid))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            // The pidfd becomes readable when the process exits.
            let left = PollTimeout::try_from(left.min(Duration::from_secs(3600)))
                .expect("an hour fits in a poll timeout");
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, left) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => panic!("poll on the pidfd of {} (pid {}): {e}", self.name, self.pid),
            }
        }
    }

    /// Where each of its threads is, as the kernel sees it (`/proc/PID/task/*`: name, state,
    /// wait channel and kernel stack): for the message of a test that found it stuck.
    pub fn threads(&self) -> String {
        let task_dir = format!("/proc/{}/task", self.pid);
        let Ok(tasks) = std::fs::read_dir(&task_dir) else {
            return format!("(cannot read {task_dir})");
        };
        let mut out = String::new();
        for task in tasks.flatten() {
            let dir = task.path();
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let state = read("status")
                .lines()
                .find(|l| l.starts_with("State:"))
                .map(|l| l.trim_start_matches("State:").trim().to_owned())
                .unwrap_or_default();
            out.push_str(&format!(
                "thread {} {:?}: {state}, waiting in {}\n{}",
                task.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan"),
                read("stack")
            ));
        }
        // Where they are in the program too, when gdb is installed (a diagnosis, not a need).
        let gdb = Command::new("timeout")
            .args(["20", "gdb", "-batch", "-nx", "-p", &self.pid.to_string()])
            .args(["-ex", "thread apply all bt 30"])
            .stdin(std::process::Stdio::null())
            .output();
        if let Ok(o) = gdb
            && o.status.success()
        {
            out.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        out
    }

    /// Kills the process (SIGKILL) if it is running and returns its exit status.
    pub fn kill(&self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.lock()
            .wait()
            .unwrap_or_else(|e| panic!("waiting for {} (pid {}): {e}", self.name, self.pid))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // No panics here: this may run while a test is already unwinding.
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Ok(None) = child.try_wait() {
            let _ = pidfd_send_signal(&self.pidfd, Signal::SIGKILL);
            if let Err(e) = child.wait() {
                eprintln!(
                    "waiting for {} (pid {}) after SIGKILL: {e}",
                    self.name, self.pid
                );
            }
        }
    }
}

/// Text a child process writes to a pipe, collected by a thread as it arrives.
#[derive(Clone, Default)]
pub struct CapturedText(Arc<(Mutex<Captured>, Condvar)>);

#[derive(Default)]
struct Captured {
    text: String,
    /// The pipe reached end of file (or failed): nothing more will arrive.
    closed: bool,
}

impl CapturedText {
    /// Starts a thread that appends everything read from `pipe` and also echoes each line,
    /// prefixed with `[label]`, to this process's stderr (the test harness shows it for
    /// failing tests only).
    pub fn capture(label: &str, pipe: impl Read + Send + 'static) -> Self {
        let text = Self::default();
        let sink = text.clone();
        let label = label.to_owned();
        thread::Builder::new()
            .name(format!("{label}-stderr"))
            .spawn(move || {
                let mut reader = BufReader::new(pipe);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) => break,
                        Ok(_) => {
                            eprint!("[{label}] {line}");
                            if !line.ends_with('\n') {
                                eprintln!();
                            }
                            sink.lock().text.push_str(&line);
                        }
                        Err(e) => {
                            eprintln!("[{label}] reading its output: {e}");
                            break;
                        }
                    }
                }
                sink.lock().closed = true;
                sink.0.1.notify_all();
            })
            .expect("spawning an output capture thread");
        text
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        self.0.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        self.lock().text.clone()
    }

    /// Waits up to `timeout` for the pipe's end of file (after the process has exited, so
    /// that [`CapturedText::text`] is complete); returns whether it came.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .0
                .1
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// The last `max_lines` lines captured so far, for panic messages.
    pub fn tail(&self, max_lines: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(max_lines)..].join("\n")
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).expect("a file descriptor fits in i32");
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_send_signal(pidfd: &OwnedFd, signal: Signal) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd, a valid signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
