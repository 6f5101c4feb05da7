//! The systemd units in `deploy/systemd/` and the readiness protocol they rely on.
//!
//! - Both units pass `systemd-analyze verify` and stay under an exposure score in
//!   `systemd-analyze security --offline=true`.
//! - The agent unit grants exactly the capabilities `outflow-agent check` asks for, and those
//!   alone are enough: `check` as an unprivileged user holding only them finds the kernel ready.
//! - The agent and the collector speak the `sd_notify` protocol their `Type=notify` units and
//!   `WatchdogSec=` expect: READY=1, then WATCHDOG=1 within the watchdog period, then after
//!   SIGTERM STOPPING=1 and exit 0, each from the main process (`NotifyAccess=main`).
//!
//! Needs root, systemd-analyze (Debian's `systemd`) and setpriv (util-linux); a missing tool is
//! a failure, never a skip.

use std::{
    collections::BTreeSet,
    fs,
    io::IoSliceMut,
    os::{fd::AsRawFd as _, unix::net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, setsockopt, sockopt::PassCred,
};
use outflow_tests::{
    agent::{Agent, PinDir, agent_bin, ensure_bpffs, run_to_completion},
    cgroup::TestCgroup,
    collector::{Collector, TempDir, collector_bin, free_port},
};

/// Exposure scores (`systemd-analyze security`, 0 = locked down, 10 = exposed) the units must
/// stay at or under. Measured: agent 1.9 (it needs bpf(2), three capabilities and the host's
/// network), collector 1.1.
const AGENT_MAX_EXPOSURE: f64 = 2.0;
const COLLECTOR_MAX_EXPOSURE: f64 = 1.5;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// `name` on PATH, or a failure that says what to install.
fn tool(name: &str, package: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: apt-get install {package}"))
}

fn systemd_analyze(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(tool("systemd-analyze", "systemd"))
        .args(args)
        .output()
        .expect("run systemd-analyze");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Copies the units into `dir` with `ExecStart=` pointing at the binaries cargo built, since
/// `systemd-analyze verify` checks that the command exists and the units name
/// /usr/bin/outflow-*, where nothing is installed on a build machine. Nothing else changes.
fn units_with_built_binaries(dir: &Path) -> [PathBuf; 2] {
    [
        ("outflow-agent.service", agent_bin()),
        ("outflow-collector.service", collector_bin()),
    ]
    .map(|(unit, bin)| {
        let text = fs::read_to_string(deploy_dir().join(unit))
            .unwrap_or_else(|e| panic!("read deploy/systemd/{unit}: {e}"));
        let installed = format!("/usr/bin/{}", unit.trim_end_matches(".service"));
        let exec_lines = text.lines().filter(|l| l.starts_with("ExecStart=")).count();
        assert_eq!(exec_lines, 1, "{unit} has one ExecStart=");
        let rewritten = text.replace(
            &format!("ExecStart={installed}"),
            &format!("ExecStart={}", bin.display()),
        );
        assert_ne!(rewritten, text, "{unit}'s ExecStart= runs {installed}");
        let path = dir.join(unit);
        fs::write(&path, rewritten).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    })
}

#[test]
fn both_units_verify() {
    let dir = TempDir::new("systemd-verify");
    for unit in units_with_built_binaries(dir.path()) {
        let (ok, out, err) = systemd_analyze(&["verify", unit.to_str().expect("utf-8")]);
        assert!(ok, "systemd-analyze verify {}: {out}{err}", unit.display());
        // Unknown keys and bad values are warnings with exit 0: none may appear.
        assert!(
            err.trim().is_empty() && out.trim().is_empty(),
            "systemd-analyze verify {} is not silent:\n{out}{err}",
            unit.display()
        );
    }
}

/// The overall exposure level `systemd-analyze security` prints for `unit`.
fn exposure(unit: &Path) -> (f64, String) {
    let (_, out, err) = systemd_analyze(&[
        "security",
        "--offline=true",
        "--no-pager",
        unit.to_str().expect("utf-8"),
    ]);
    let score = out
        .lines()
        .chain(err.lines())
        .find_map(|l| l.split_once("Overall exposure level for ").map(|(_, r)| r))
        .and_then(|r| r.split_once(": ").map(|(_, s)| s))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level for {}:\n{out}{err}", unit.display()));
    (score, out)
}

#[test]
fn both_units_are_locked_down() {
    let dir = TempDir::new("systemd-security");
    let [agent, collector] = units_with_built_binaries(dir.path());
    for (unit, max) in [
        (agent, AGENT_MAX_EXPOSURE),
        (collector, COLLECTOR_MAX_EXPOSURE),
    ] {
        let (score, report) = exposure(&unit);
        println!("{}: exposure {score}", unit.display());
        assert!(
            score <= max,
            "{} scores {score}, more than {max}:\n{report}",
            unit.display()
        );
    }
}

/// The values of every `key=` line of a unit, split on whitespace.
fn unit_values(unit: &str, key: &str) -> BTreeSet<String> {
    let text = fs::read_to_string(deploy_dir().join(unit)).expect("read unit");
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect()
}

/// The capabilities `outflow-agent check` asks a running agent for, read from its report: one
/// per capability row, the first one named (`CAP_BPF (or CAP_SYS_ADMIN)` -> CAP_BPF), leaving
/// out the one it needs only to mount bpffs, which systemd mounts at boot on every host.
fn capabilities_the_agent_checks() -> BTreeSet<String> {
    let (status, out, err) = run_to_completion(&["check", "--output", "json"]);
    assert!(status.success(), "outflow-agent check: {err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("check prints JSON");
    let rows = report["rows"].as_array().expect("rows");
    let caps: BTreeSet<String> = rows
        .iter()
        .filter_map(|row| {
            let feature = row["feature"].as_str()?.strip_prefix("capability ")?;
            let needed_for = row["needed_for"].as_str().unwrap_or_default();
            (!needed_for.contains("mounting bpffs")).then(|| {
                feature
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
        .collect();
    assert!(!caps.is_empty(), "no capability rows in the report: {out}");
    caps
}

#[test]
fn the_agent_unit_grants_exactly_what_the_agent_checks_for() {
    let wanted = capabilities_the_agent_checks();
    assert_eq!(
        wanted,
        ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
            .map(str::to_owned)
            .into(),
        "the capabilities of `outflow-agent check`"
    );
    let unit = "outflow-agent.service";
    assert_eq!(unit_values(unit, "CapabilityBoundingSet"), wanted);
    assert_eq!(unit_values(unit, "AmbientCapabilities"), wanted);
    // Not root: the capabilities are all it has.
    assert_eq!(unit_values(unit, "User"), ["outflow".to_owned()].into());

    // And they are enough: an unprivileged user holding only them (as the unit's process does)
    // finds this kernel ready. bpffs must be mounted, as systemd does at boot.
    ensure_bpffs();
    let caps = wanted
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let only = format!("-all,{caps}");
    let out = Command::new(tool("setpriv", "util-linux"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args([
            format!("--inh-caps={only}"),
            format!("--ambient-caps={only}"),
            format!("--bounding-set={only}"),
        ])
        .arg("--")
        .arg(agent_bin())
        .args(["check", "--output", "json"])
        .output()
        .expect("run setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check as nobody with {caps}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["verdict"]["status"], "ready", "{stdout}");
    // Probed, not assumed (without the capabilities every kernel row says "not probed").
    for row in report["rows"].as_array().expect("rows") {
        if row["need"] != "info" {
            assert!(
                row["result"] == "ok" || row["result"] == "absent (not needed)",
                "{row}"
            );
        }
    }
}

/// A socket in the role of systemd's notify socket: what `NOTIFY_SOCKET` names.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: TempDir,
}

/// One datagram: its `KEY=value` lines and the pid the kernel says sent it.
struct Notification {
    lines: Vec<String>,
    pid: i32,
}

impl NotifySocket {
    fn bind(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        // As systemd does: the kernel attaches the sender's credentials (for NotifyAccess=main).
        setsockopt(&socket, PassCred, &true).expect("SO_PASSCRED");
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    fn env_value(&self) -> &str {
        self.path.to_str().expect("utf-8 temp dir")
    }

    /// The next datagram, or `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Notification> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .expect("set a read timeout");
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let msg = match recvmsg::<UnixAddr>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(cmsg.as_mut_slice()),
            MsgFlags::empty(),
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("recvmsg on the notify socket: {e}"),
        };
        let pid = msg
            .cmsgs()
            .expect("control messages")
            .find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                _ => None,
            })
            .expect("the kernel attaches credentials (SO_PASSCRED)");
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        Some(Notification {
            lines: text.lines().map(str::to_owned).collect(),
            pid,
        })
    }

    /// Waits up to `timeout` for a datagram with the line `line`; returns when it came and
    /// every line seen on the way. Panics on timeout, naming what came, and if a datagram
    /// comes from another process than `main_pid`.
    fn expect(&self, line: &str, main_pid: u32, timeout: Duration, what: &str) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(n) = (!left.is_zero()).then(|| self.recv(left)).flatten() else {
                panic!("no {line} within {timeout:?} from {what}; it sent: {seen:?}");
            };
            assert_eq!(
                n.pid,
                i32::try_from(main_pid).expect("pid"),
                "{what} sent {:?} from another process than its main one (NotifyAccess=main)",
                n.lines
            );
            let found = n.lines.iter().any(|l| l == line);
            seen.extend(n.lines);
            if found {
                return seen;
            }
        }
    }
}

/// WATCHDOG_USEC for the runs below: 4 s.
const WATCHDOG: Duration = Duration::from_secs(4);

#[test]
fn the_collector_speaks_sd_notify() {
    let notify = NotifySocket::bind("notify-collector");
    let data = TempDir::new("notify-collector-data");
    let metrics = format!("127.0.0.1:{}", free_port());
    let watchdog_usec = WATCHDOG.as_micros().to_string();
    let collector = Collector::start_env(
        free_port(),
        &[
            "--data-dir",
            data.path().to_str().expect("utf-8"),
            "--metrics-listen",
            &metrics,
        ],
        &[
            ("NOTIFY_SOCKET", notify.env_value()),
            ("WATCHDOG_USEC", &watchdog_usec),
        ],
    );
    let pid = collector.pid();
    notify.expect("READY=1", pid, Duration::from_secs(60), "the collector");
    // Pings at half the period: two within one period.
    notify.expect("WATCHDOG=1", pid, WATCHDOG, "the collector");
    notify.expect("WATCHDOG=1", pid, WATCHDOG, "the collector");
    let status = collector.stop();
    notify.expect("STOPPING=1", pid, Duration::from_secs(5), "the collector");
    assert_eq!(
        status.code(),
        Some(0),
        "the collector exits 0 on SIGTERM:\n{}",
        collector.stderr()
    );
}

#[test]
fn the_agent_speaks_sd_notify() {
    let notify = NotifySocket::bind("notify-agent");
    let cgroup = TestCgroup::new("notify");
    let pin = PinDir::new("notify");
    let watchdog_usec = WATCHDOG.as_micros().to_string();
    let agent = Agent::start_env(
        &[
            "--cgroup",
            cgroup.as_arg(),
            "--pin-dir",
            pin.as_arg(),
            "--interval",
            "500ms",
        ],
        &[
            ("NOTIFY_SOCKET", notify.env_value()),
            ("WATCHDOG_USEC", &watchdog_usec),
        ],
    );
    let pid = agent.pid();
    notify.expect("READY=1", pid, Duration::from_secs(60), "the agent");
    // READY=1 means attached: the programs are on the cgroup once it has come (a check made
    // after reading it, so it cannot catch a READY=1 sent a moment too early).
    use outflow_tests::cgroup::attach;
    for (kind, t) in [
        ("ingress", attach::INET_INGRESS),
        ("egress", attach::INET_EGRESS),
        ("sock_ops", attach::SOCK_OPS),
    ] {
        let n = outflow_tests::cgroup::attached_programs(cgroup.path(), t)
            .unwrap_or_else(|e| panic!("{e}"))
            .len();
        assert_eq!(n, 1, "{kind} attached when READY=1 came");
    }
    // A ping every interval (500 ms): several within one watchdog period.
    for _ in 0..3 {
        notify.expect("WATCHDOG=1", pid, WATCHDOG, "the agent");
    }
    let status = agent.stop();
    notify.expect("STOPPING=1", pid, Duration::from_secs(5), "the agent");
    assert_eq!(
        status.code(),
        Some(0),
        "the agent exits 0 on SIGTERM:\n{}",
        agent.stderr()
    );
}

/// The agent as its unit runs it: the user `nobody` instead of `outflow`, holding exactly the
/// unit's capabilities (setpriv does what AmbientCapabilities= and CapabilityBoundingSet= do),
/// in a mount namespace laid out as TemporaryFileSystem=/sys/fs/bpf:ro and
/// BindPaths=/sys/fs/bpf/<pin dir> lay it out (a tmpfs over bpffs holding only the pin
/// directory, bound from the real bpffs and owned by the agent's user, as the tmpfiles entry
/// makes it). It attaches, stops with 0, and a second run adopts the pinned state.
#[test]
fn the_agent_runs_unprivileged_as_its_unit_runs_it() {
    let caps = unit_values("outflow-agent.service", "CapabilityBoundingSet")
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    ensure_bpffs();
    let cgroup = TestCgroup::new("unit-run");
    let pin = PinDir::new("unit-run");
    fs::create_dir(pin.path()).expect("create the pin dir");
    let chown = Command::new("chown")
        .arg("65534:65534")
        .arg(pin.path())
        .status()
        .expect("run chown");
    assert!(chown.success());
    fs::set_permissions(
        pin.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod the pin dir");
    let pin_dir = pin.as_arg();
    let hold = TempDir::new("unit-run-hold");
    let script = format!(
        "set -e
         mount --bind {pin_dir} {hold}
         mount -t tmpfs -o mode=0755 tmpfs /sys/fs/bpf
         mkdir {pin_dir}
         mount --move {hold} {pin_dir}
         mount -o remount,ro,bind /sys/fs/bpf
         exec {setpriv} --reuid=65534 --regid=65534 --clear-groups \
           --inh-caps=-all,{caps} --ambient-caps=-all,{caps} --bounding-set=-all,{caps} \
           -- {agent} \"$@\"",
        hold = hold.path().display(),
        setpriv = tool("setpriv", "util-linux").display(),
        agent = agent_bin().display(),
    );
    let unshare = tool("unshare", "util-linux");
    let args = [
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        &script,
        "sh",
        "--cgroup",
        cgroup.as_arg(),
        "--pin-dir",
        pin_dir,
        "--interval",
        "500ms",
    ];
    for adopted in [false, true] {
        let agent = Agent::start_bin(&unshare, &args);
        let started = agent.wait_started(Duration::from_secs(60));
        assert_eq!(started["adopted"], adopted, "{started}");
        assert_eq!(started["pin_dir"], pin_dir, "{started}");
        assert_eq!(
            agent.stop().code(),
            Some(0),
            "exit 0 on SIGTERM:\n{}",
            agent.stderr()
        );
    }
    // What it pinned belongs to its user, in the host's bpffs.
    let maps = fs::read_dir(pin.path().join("maps"))
        .expect("maps pinned in the host's bpffs")
        .count();
    assert!(maps > 0, "maps pinned");
}

/// The example configs in deploy/config/ are valid, and name the paths the units open up: the
/// agent's pin_dir is what BindPaths= binds, its state under StateDirectory=, the collector's
/// data_dir its StateDirectory=.
#[test]
fn the_example_configs_are_valid_and_match_the_units() {
    let config = |name: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/config")
            .join(name)
            .to_str()
            .expect("utf-8")
            .to_owned()
    };
    let print = |bin: &Path, file: &str| {
        let out = Command::new(bin)
            .args(["print-config", "--config", file])
            .output()
            .expect("run print-config");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let agent = print(&agent_bin(), &config("agent.toml"));
    let bind = unit_values("outflow-agent.service", "BindPaths");
    let pin = bind.iter().next().expect("BindPaths=");
    assert!(agent.contains(&format!("pin_dir = \"{pin}\"")), "{agent}");
    let state = unit_values("outflow-agent.service", "StateDirectory");
    let state = format!("/var/lib/{}", state.iter().next().expect("StateDirectory="));
    assert!(
        agent.contains(&format!("state_dir = \"{state}\"")),
        "{agent}"
    );
    assert!(
        agent.contains(&format!("spool_dir = \"{state}/spool\"")),
        "{agent}"
    );

    let collector = print(&collector_bin(), &config("collector.toml"));
    let state = unit_values("outflow-collector.service", "StateDirectory");
    let state = format!("/var/lib/{}", state.iter().next().expect("StateDirectory="));
    assert!(
        collector.contains(&format!("data_dir = \"{state}\"")),
        "{collector}"
    );
}
