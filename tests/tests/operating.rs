//! What an operator sees: bad input gives one line and a non-zero exit, never a panic; the
//! effective configuration can be printed; `check` says whether the kernel and the process
//! have what the agent needs, and the agent refuses in one line when they do not; `detach`
//! removes everything the agent pinned. The cluster demo's binary explains what it lacks the
//! same way.
//!
//! Needs root (CI runs it as root).

use std::{fs, path::Path, process::ExitStatus, time::Duration};

use outflow_tests::{
    agent::{Agent, PinDir, agent_bin, run_to_completion},
    cgroup::TestCgroup,
    collector::TempDir,
};

/// Asserts a failed run that explains itself in one line, on stderr, mentioning `needle`.
fn assert_one_line_error(status: ExitStatus, stdout: &str, stderr: &str, needle: &str) {
    assert!(!status.success(), "must fail: {status:?} {stderr}");
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    assert!(!stderr.contains("stack backtrace"), "no trace: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "mentions {needle:?}: {stderr}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
}

#[test]
fn a_cgroup_that_does_not_exist_is_named() {
    let (status, out, err) =
        run_to_completion(&["--cgroup", "/sys/fs/cgroup/outflow-no-such-cgroup"]);
    assert_one_line_error(status, &out, &err, "outflow-no-such-cgroup does not exist");
}

#[test]
fn a_metrics_address_in_use_is_named_before_anything_is_attached() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("address").to_string();
    let cgroup = TestCgroup::new("port-taken");
    let pin = PinDir::new("port-taken");
    let (status, out, err) = run_to_completion(&[
        "--cgroup",
        cgroup.as_arg(),
        "--pin-dir",
        pin.as_arg(),
        "--metrics-listen",
        &addr,
    ]);
    assert_one_line_error(
        status,
        &out,
        &err,
        "set metrics_listen (or --metrics-listen)",
    );
    assert!(err.contains(&addr), "{err}");
    assert!(!pin.path().exists(), "nothing pinned in {}", pin.as_arg());
}

#[test]
fn a_directory_outside_cgroup2_is_refused() {
    let dir = std::env::temp_dir();
    let (status, out, err) = run_to_completion(&["--cgroup", dir.to_str().expect("utf-8 tmp")]);
    assert_one_line_error(status, &out, &err, "is not a cgroup v2 directory");
}

#[test]
fn a_relative_cgroup_path_is_refused_naming_the_field() {
    let (status, out, err) = run_to_completion(&["--cgroup", "system.slice"]);
    assert_one_line_error(status, &out, &err, "`cgroup`");
}

#[test]
fn bad_config_fields_are_named() {
    let dir = std::env::temp_dir().join(format!("outflow-config-test-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let cases = [
        ("max_connections = \"lots\"\n", "max_connections"),
        ("interval = \"10ms\"\n", "`interval`"),
        ("intreval = \"1s\"\n", "intreval"),
        (
            "[filter]\nremote_cidrs = [\"10.0.0.0/40\"]\n",
            "`filter.remote_cidrs`",
        ),
        ("max_connections = 3\n", "`max_connections`"),
        ("pin_dir = \"relative\"\n", "`pin_dir`"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("{i}.toml"));
        fs::write(&path, text).expect("write config");
        let (status, out, err) = run_to_completion(&["--config", path.to_str().expect("utf-8")]);
        assert_one_line_error(status, &out, &err, needle);
    }
    let (status, out, err) = run_to_completion(&["--config", "/nonexistent/outflow.toml"]);
    assert_one_line_error(status, &out, &err, "/nonexistent/outflow.toml");
    fs::remove_dir_all(&dir).ok();
}

#[test]
fn not_root_is_explained() {
    let bin = agent_bin();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run setpriv (util-linux; cargo xtask setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_one_line_error(out.status, &stdout, &stderr, "run as root or grant them");
}

#[test]
fn check_finds_this_kernel_ready() {
    let (status, out, err) = run_to_completion(&["check", "--output", "json"]);
    assert!(status.success(), "exit 0 when ready: {status:?} {err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    let rows = report["rows"].as_array().expect("rows");
    assert!(rows.len() > 30, "every requirement is a row: {out}");
    for row in rows {
        if row["need"] != "info" {
            assert_eq!(row["result"], "ok", "{row}");
        }
    }
    assert_eq!(report["verdict"]["status"], "ready", "{out}");
    assert!(!report["kernel"].as_str().expect("release").is_empty());

    let (status, out, err) = run_to_completion(&["check"]);
    assert!(status.success(), "{err}");
    let last = out.lines().last().expect("a verdict line");
    assert!(
        last.starts_with("kernel ") && last.ends_with(": ready"),
        "{out}"
    );
}

#[test]
fn missing_capabilities_are_named_at_start() {
    let pin = PinDir::new("capabilities");
    // Root, with the capability that lets programs store pointers in maps dropped (and
    // CAP_SYS_ADMIN, which stands in for it) from every set.
    let out = std::process::Command::new("setpriv")
        .args([
            "--inh-caps=-perfmon,-sys_admin",
            "--bounding-set=-perfmon,-sys_admin",
            "--",
        ])
        .arg(agent_bin())
        .args(["--pin-dir", pin.as_arg(), "--metrics-listen", "127.0.0.1:0"])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run setpriv (util-linux; cargo xtask setup installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_one_line_error(out.status, &stdout, &stderr, "CAP_PERFMON");
    assert!(
        !pin.path().exists(),
        "nothing pinned in {}",
        pin.path().display()
    );
}

#[test]
fn print_config_shows_the_effective_configuration() {
    let (status, out, err) = run_to_completion(&[
        "print-config",
        "--interval",
        "250ms",
        "--local-port",
        "8000",
        "--max-connections",
        "1024",
    ]);
    assert!(status.success(), "{err}");
    assert!(out.contains("interval = \"250ms\""), "{out}");
    assert!(out.contains("max_connections = 1024"), "{out}");
    assert!(out.contains("local_ports = [8000]"), "{out}");
}

#[test]
fn detach_removes_everything_the_agent_pinned() {
    let cgroup = TestCgroup::new("detach");
    let pin = PinDir::new("detach");
    let agent = Agent::start(&["--cgroup", cgroup.as_arg(), "--pin-dir", pin.as_arg()]);
    agent.wait_started(Duration::from_secs(60));
    assert_eq!(
        attached_programs(cgroup.path()),
        [1, 1, 1],
        "ingress, egress, sock_ops"
    );
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
    assert_eq!(
        attached_programs(cgroup.path()),
        [1, 1, 1],
        "still attached after the agent stops"
    );
    // Stopping keeps the kernel state: links and maps stay pinned.
    for sub in ["links", "maps"] {
        let n = fs::read_dir(pin.path().join(sub))
            .map(Iterator::count)
            .unwrap_or(0);
        assert!(n > 0, "{sub} pinned after stop");
    }
    let (status, _, err) = run_to_completion(&["detach", "--pin-dir", pin.as_arg()]);
    assert!(status.success(), "{err}");
    assert!(!Path::new(pin.path()).exists(), "pin dir removed: {err}");
    // Nothing stays attached to the cgroup.
    assert_eq!(
        attached_programs(cgroup.path()),
        [0, 0, 0],
        "ingress, egress, sock_ops"
    );
}

/// How many programs are attached to `cgroup` for cgroup_skb ingress, egress and sock_ops.
fn attached_programs(cgroup: &Path) -> [usize; 3] {
    use outflow_tests::cgroup::attach;
    [attach::INET_INGRESS, attach::INET_EGRESS, attach::SOCK_OPS].map(|t| {
        outflow_tests::cgroup::attached_programs(cgroup, t)
            .unwrap_or_else(|e| panic!("{e}"))
            .len()
    })
}

/// `outflow-cluster-demo` (what `cargo xtask cluster-demo` runs) explains what it lacks in one
/// line: root, then the binaries it runs, which it looks for beside itself.
#[test]
fn the_cluster_demo_names_what_it_lacks() {
    let demo = Path::new(env!("CARGO_BIN_EXE_outflow-cluster-demo"));
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(demo)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run setpriv (util-linux; cargo xtask setup installs it)");
    assert_one_line_error(
        out.status,
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
        "run it as root",
    );

    // Alone in a directory: no agent beside it.
    let dir = TempDir::new("cluster-demo-alone");
    let alone = dir.path().join("outflow-cluster-demo");
    fs::copy(demo, &alone).expect("copy the demo");
    let out = std::process::Command::new(&alone)
        .args(["--dir", dir.as_arg()])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run the demo");
    assert_one_line_error(
        out.status,
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
        "no outflow-agent beside this program",
    );
}
