//! Driving the `outflow-agent` binary under test and collecting its JSON records.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, Once, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::process::{CapturedText, ChildProcess};

/// Environment variable that overrides where the agent binary is.
pub const AGENT_BIN_ENV: &str = "OUTFLOW_AGENT_BIN";
/// How long [`Agent::stop`] waits for the agent to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`run_to_completion`] lets the agent run.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Where bpffs is mounted.
const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of the pin directories [`PinDir`] names: `outflow-test-<pid>-<serial>-<tag>`.
const PIN_PREFIX: &str = "outflow-test-";

/// Path of the agent binary: `$OUTFLOW_AGENT_BIN` if set, else `outflow-agent` in the cargo
/// target profile directory of the running test or binary of this package.
/// Panics if it does not exist.
pub fn agent_bin() -> PathBuf {
    find_bin("outflow-agent", AGENT_BIN_ENV, "outflow-agent").unwrap_or_else(|e| panic!("{e}"))
}

/// Path of a workspace binary `file`: `$env` if set, else `file` in the cargo target profile
/// directory of the running executable: beside it (a binary of this package,
/// `target/<profile>/<bin>`) or one directory up (a test, `target/<profile>/deps/<test>`, as
/// assert_cmd does).
pub(crate) fn find_bin(file: &str, env: &str, package: &str) -> Result<PathBuf, String> {
    let path = match std::env::var_os(env) {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("locating the running executable: {e}"))?;
            let dir = exe
                .parent()
                .ok_or_else(|| format!("executable {} has no parent directory", exe.display()))?;
            let beside = dir.join(file);
            match dir.parent() {
                Some(up) if !beside.is_file() => up.join(file),
                _ => beside,
            }
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "binary {} not found: build it with `cargo build -p {package}` (same profile as the \
             tests) or set {env}",
            path.display()
        ))
    }
}

/// A running agent (`outflow-agent ... --output json`) whose stdout records are collected.
/// Killed (SIGKILL) when dropped if still running.
pub struct Agent {
    process: ChildProcess,
    output: Arc<SharedRecords>,
    stderr: CapturedText,
}

#[derive(Default)]
struct SharedRecords {
    state: Mutex<AgentOutput>,
    changed: Condvar,
}

#[derive(Default)]
struct AgentOutput {
    records: Vec<Value>,
    bad_lines: Vec<String>,
    closed: bool,
}

/// The flags of an agent that exports: it counts in cgroup `cgroup` (its maps pinned in `pin`),
/// sends a batch every 200 ms to `collector`, keeps its state in `state` and spools to `spool`.
pub fn export_args<'a>(
    cgroup: &'a str,
    pin: &'a str,
    collector: &'a str,
    state: &'a str,
    spool: &'a str,
) -> Vec<&'a str> {
    vec![
        "--cgroup",
        cgroup,
        "--pin-dir",
        pin,
        "--interval",
        "200ms",
        "--collector",
        collector,
        "--state-dir",
        state,
        "--spool-dir",
        spool,
    ]
}

impl Agent {
    /// Starts [`agent_bin()`] with `args` (e.g. `["run", "--cgroup", cg.relative_path()]`),
    /// adding `--output json` unless `args` already choose an output.
    pub fn start(args: &[&str]) -> Self {
        Self::start_bin(&agent_bin(), args)
    }

    /// Like [`Agent::start`] with another binary (a stand-in that speaks the same protocol).
    pub fn start_bin(bin: &Path, args: &[&str]) -> Self {
        Self::start_bin_env(bin, args, &[])
    }

    /// Like [`Agent::start`] with environment variables added (e.g. an `LD_PRELOAD`).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_bin_env(&agent_bin(), args, env)
    }

    fn start_bin_env(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(bin);
        command.args(args).envs(env.iter().copied());
        if !args
            .iter()
            .any(|a| *a == "--output" || a.starts_with("--output="))
        {
            command.args(["--output", "json"]);
        }
        // Agents run side by side in the tests: each serves its metrics on a port of its own
        // (the `started` record says which).
        if !args
            .iter()
            .any(|a| *a == "--metrics-listen" || a.starts_with("--metrics-listen="))
        {
            command.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let process = ChildProcess::spawn("outflow-agent", &mut command);
        let stderr = CapturedText::capture(
            "outflow-agent",
            process.take_stderr().expect("stderr of the agent is piped"),
        );
        let stdout = process.take_stdout().expect("stdout of the agent is piped");
        let output = Arc::new(SharedRecords::default());
        let sink = Arc::clone(&output);
        thread::Builder::new()
            .name("agent-stdout".into())
            .spawn(move || read_records(stdout, &sink))
            .expect("spawning the agent stdout reader");
        Self {
            process,
            output,
            stderr,
        }
    }

    /// Pid of the agent process.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// What the agent wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// Every record so far, in order.
    pub fn records(&self) -> Vec<Value> {
        self.lock().records.clone()
    }

    /// Waits for the `{"type":"started"}` record and returns it.
    pub fn wait_started(&self, timeout: Duration) -> Value {
        let is_started = |r: &Value| r.get("type").and_then(Value::as_str) == Some("started");
        let records = self.wait_until(timeout, |records| records.iter().any(is_started));
        records
            .into_iter()
            .find(is_started)
            .expect("wait_until saw a started record")
    }

    /// The address of its metrics and health endpoint (from the `started` record).
    pub fn metrics_addr(&self, timeout: Duration) -> std::net::SocketAddr {
        let started = self.wait_started(timeout);
        started["metrics"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in {started}"))
    }

    /// Waits until `condition` holds for the records so far and returns them.
    ///
    /// Panics, with the agent's stderr, on timeout, if the agent exits (closes stdout) first,
    /// or if it prints a line that is not JSON.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let failure = if !state.bad_lines.is_empty() {
                Some(format!(
                    "the agent printed lines that are not JSON: {:?}",
                    state.bad_lines
                ))
            } else if condition(&state.records) {
                return state.records.clone();
            } else if state.closed {
                Some("the agent closed stdout (exited?) before the condition held".to_owned())
            } else if Instant::now() >= deadline {
                Some(format!("the condition did not hold within {timeout:?}"))
            } else {
                None
            };
            if let Some(failure) = failure {
                let records = state.records.len();
                let last: Vec<String> = state
                    .records
                    .iter()
                    .rev()
                    .take(5)
                    .rev()
                    .map(Value::to_string)
                    .collect();
                drop(state);
                let status = self
                    .process
                    .try_status()
                    .map_or_else(|| "running".to_owned(), |s| s.to_string());
                panic!(
                    "{failure}; agent {status}, {records} records, the last: {last:#?}\nagent stderr:\n{}",
                    self.stderr.tail(50)
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            state = self
                .output
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Sends SIGTERM, waits for the agent to exit and for its last records, and returns its
    /// exit status. Panics if it does not exit within 30 s (it is then killed).
    pub fn stop(&self) -> ExitStatus {
        self.process.signal(Signal::SIGTERM);
        let Some(status) = self.process.wait_timeout(STOP_TIMEOUT) else {
            let threads = self.process.threads();
            self.process.kill();
            panic!(
                "the agent did not exit within {STOP_TIMEOUT:?} of SIGTERM; its threads:\n{threads}stderr:\n{}",
                self.stderr.tail(50)
            );
        };
        self.wait_output_closed();
        status
    }

    /// Waits until the agent exits by itself (e.g. at a crash point) and its output is read;
    /// panics after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let status = self.process.wait_timeout(timeout).unwrap_or_else(|| {
            panic!(
                "the agent did not exit within {timeout:?}:\n{}",
                self.stderr.tail(30)
            )
        });
        self.wait_output_closed();
        status
    }

    /// Kills the agent (SIGKILL), as a crash would, and returns its exit status.
    pub fn kill(&self) -> ExitStatus {
        let status = self.process.kill();
        self.wait_output_closed();
        status
    }

    /// After exit: waits until both readers have reached end of file, so that
    /// [`Agent::records`] and [`Agent::stderr`] are complete.
    fn wait_output_closed(&self) {
        self.wait_stdout_closed();
        self.stderr.wait_closed(Duration::from_secs(10));
    }

    /// After exit, waits for the reader to reach EOF so that [`Agent::records`] is complete.
    fn wait_stdout_closed(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut state = self.lock();
        while !state.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(state);
                panic!("the agent exited but its stdout stayed open (a child process holds it?)");
            }
            state = self
                .output
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentOutput> {
        self.output
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn read_records(stdout: impl Read, output: &SharedRecords) {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines.next();
        let mut state = output.state.lock().unwrap_or_else(PoisonError::into_inner);
        match line {
            Some(Ok(line)) => match serde_json::from_str::<Value>(&line) {
                Ok(record) => state.records.push(record),
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
        output.changed.notify_all();
        if closed {
            return;
        }
    }
}

/// Runs [`agent_bin()`] with `args` until it exits (at most 60 s) and returns its exit status,
/// stdout and stderr: for commands that end by themselves and for bad input. Like
/// [`Agent::start`], it adds `--metrics-listen 127.0.0.1:0` unless `args` choose an address
/// (an agent refused for another reason must not first find another test's port taken).
pub fn run_to_completion(args: &[&str]) -> (ExitStatus, String, String) {
    let mut args = args.to_vec();
    if !args
        .iter()
        .any(|a| *a == "--metrics-listen" || a.starts_with("--metrics-listen="))
    {
        args.extend(["--metrics-listen", "127.0.0.1:0"]);
    }
    run_bin_to_completion(&agent_bin(), &args)
}

/// Like [`run_to_completion`] with another binary.
pub fn run_bin_to_completion(bin: &Path, args: &[&str]) -> (ExitStatus, String, String) {
    let mut command = Command::new(bin);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let process = ChildProcess::spawn("outflow-agent", &mut command);
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read_all(Box::new(process.take_stdout().expect("stdout is piped")));
    let stderr = read_all(Box::new(process.take_stderr().expect("stderr is piped")));
    let Some(status) = process.wait_timeout(RUN_TIMEOUT) else {
        process.kill();
        panic!(
            "`{} {}` did not exit within {RUN_TIMEOUT:?}",
            bin.display(),
            args.join(" ")
        );
    };
    let stdout = stdout.join().expect("the stdout reader does not panic");
    let stderr = stderr.join().expect("the stderr reader does not panic");
    (status, stdout, stderr)
}

/// A pin directory for one test's agent, unique to this process and test
/// (`/sys/fs/bpf/outflow-test-<pid>-<serial>-<tag>`). Not created here: the agent creates it.
///
/// Dropping it runs `outflow-agent detach --pin-dir DIR` (so nothing stays attached) and
/// removes whatever is left of the directory.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Names a new pin directory; `tag` (e.g. the test name) tells them apart.
    pub fn new(tag: &str) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            ensure_bpffs();
            sweep_stale_pin_dirs();
        });
        let name = format!(
            "{PIN_PREFIX}{}-{}-{}",
            std::process::id(),
            crate::next_serial(),
            crate::sanitize_tag(tag, 40)
        );
        Self {
            path: Path::new(BPFFS).join(name),
        }
    }

    /// The directory, for `--pin-dir`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory as a string, for `--pin-dir`.
    pub fn as_arg(&self) -> &str {
        self.path.to_str().expect("pin dir paths are ASCII")
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // No panics here: this may run while a test is already unwinding.
        detach_and_remove(&self.path);
    }
}

fn detach_and_remove(path: &Path) {
    if !path.exists() {
        return;
    }
    match find_bin("outflow-agent", AGENT_BIN_ENV, "outflow-agent") {
        Ok(bin) => match Command::new(&bin)
            .arg("detach")
            .arg("--pin-dir")
            .arg(path)
            .stdin(Stdio::null())
            .output()
        {
            Ok(output) if !output.status.success() => eprintln!(
                "`outflow-agent detach --pin-dir {}` failed ({}): {}",
                path.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Ok(_) => {}
            Err(e) => eprintln!("running {}: {e}", bin.display()),
        },
        Err(e) => eprintln!("cannot detach {}: {e}", path.display()),
    }
    // Unpin whatever is left: a pinned link goes away with its last reference.
    if path.exists()
        && let Err(e) = std::fs::remove_dir_all(path)
    {
        eprintln!("removing pin dir {}: {e}", path.display());
    }
}

/// Mounts bpffs at [`BPFFS`] unless it is there, as systemd does at boot on the hosts the agent
/// runs on (and the DaemonSet mounts the host's): a test that runs the agent with fewer
/// capabilities than root's (which cannot mount it) must not depend on an earlier test's agent
/// having mounted it on a freshly booted machine.
pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    if mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(BPFFS) && l.split(' ').nth(2) == Some("bpf"))
    {
        return;
    }
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "mount -t bpf bpf {BPFFS}: {status} (the tests run as root)"
    );
}

/// Detaches pin directories left behind by test processes that no longer exist (killed runs).
fn sweep_stale_pin_dirs() {
    let Ok(entries) = std::fs::read_dir(BPFFS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PIN_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::process_exists(pid) {
            detach_and_remove(&entry.path());
        }
    }
}
