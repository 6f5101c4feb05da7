//! `cargo xtask image`: the OCI image built offline from this repository runs.
//!
//! Builds the image from the binaries of this test run (`--bin-dir`, debug ones under
//! `cargo test`: the same assembly as the release image, faster), checks its config
//! (entrypoint, user, labels) and its oci-archive, then runs it with podman, without a
//! network: `outflow-collector --version`, the collector serving as its unprivileged user with
//! its store in the image's data directory (and exiting 0 on SIGTERM), `outflow-agent
//! --version` and `outflow-agent check` (with the three capabilities, the host's bpffs and
//! cgroup2 mounted in) work from inside.
//!
//! Needs root, buildah and podman (Debian's), and the `xtask` binary beside the agent's (what
//! `cargo xtask test` and `cargo build --bins` build); a missing one is a failure, never a skip.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Instant,
};

use outflow_tests::{agent::agent_bin, collector::TempDir};

/// `name` on PATH, or a failure that says what to install.
fn tool(name: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed: apt-get install {name}"))
}

/// The xtask binary: `$OUTFLOW_XTASK_BIN`, else beside the agent binary.
fn xtask_bin() -> PathBuf {
    let path = std::env::var_os("OUTFLOW_XTASK_BIN")
        .map_or_else(|| agent_bin().with_file_name("xtask"), PathBuf::from);
    assert!(
        path.is_file(),
        "{} not found: build it with `cargo build -p xtask` (same profile as the tests) or set \
         OUTFLOW_XTASK_BIN",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{:?} {:?} failed ({}):\n{}{}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Removes the test's image from the local storage when dropped.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["rmi", &self.0]).output();
    }
}

/// Removes a container when dropped.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "--force", &self.0])
            .output();
    }
}

/// The cgroup2 mount point of this host, from /proc/mounts.
fn cgroup2_mount() -> String {
    std::fs::read_to_string("/proc/mounts")
        .expect("read /proc/mounts")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_owned())
        })
        .min_by_key(String::len)
        .expect("a cgroup2 mount")
}

#[test]
fn the_image_builds_offline_and_runs() {
    let buildah = tool("buildah");
    let podman_bin = tool("podman");
    let dir = TempDir::new("image");
    let archive = dir.path().join("outflow.oci.tar");
    let image = Image(format!("localhost/outflow:test-{}", std::process::id()));
    let agent = agent_bin();
    let bin_dir = agent.parent().expect("the binaries' directory");

    let started = Instant::now();
    run(Command::new(xtask_bin())
        .arg("image")
        .arg("--bin-dir")
        .arg(bin_dir)
        .args(["--tag", &image.0])
        .arg("--archive")
        .arg(&archive));
    println!("image built in {:.1?}", started.elapsed());

    // Its config.
    let out = run(Command::new(&buildah).args(["inspect", "--type", "image", &image.0]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    let config = &info["OCIv1"]["config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/bin/outflow-collector"]),
        "{config:#}"
    );
    assert_eq!(config["User"], "65532:65532", "not root: {config:#}");
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION"),
        "{config:#}"
    );
    assert_eq!(labels["org.opencontainers.image.title"], "outflow");
    let size = std::fs::metadata(&archive)
        .unwrap_or_else(|e| panic!("the oci-archive {}: {e}", archive.display()))
        .len();
    println!("oci-archive: {size} bytes");
    assert!(size > 1 << 20, "the archive holds the binaries");

    // It runs: the default entrypoint, as its unprivileged user, without a network.
    let podman = |args: &[&str]| {
        let mut c = Command::new(&podman_bin);
        // crun (podman's default runtime) refuses hosts with a hybrid cgroup layout (v1
        // controllers beside a cgroup2 mount, as here); runc runs on them.
        if !pure_cgroup2() {
            c.args(["--runtime", tool("runc").to_str().expect("utf-8")]);
        }
        c.args(args);
        c
    };
    // Limits no higher than the test's own: podman's defaults are higher, and a root without
    // CAP_SYS_RESOURCE (as on the CI machines) cannot raise them.
    let run_args = [
        "run",
        "--network=none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ];
    let podman_run = |args: &[&str]| {
        let mut c = podman(&run_args);
        c.arg("--rm").args(args);
        c
    };
    let out = run(&mut podman_run(&[&image.0, "--version"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("outflow-collector "), "{text}");

    // The default entrypoint serves, as user 65532, its store in the image's data directory,
    // and stops with 0 on SIGTERM.
    let out = run(podman(&run_args).args(["--detach", &image.0]));
    let container = Container(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let out = run(&mut podman(&["logs", &container.0]));
        let logs = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if logs.contains("listening on") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the collector in the image does not serve:\n{logs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    run(&mut podman(&["stop", "--time", "20", &container.0]));
    let out = run(&mut podman(&[
        "inspect",
        "--format",
        "{{.State.ExitCode}}",
        &container.0,
    ]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "the collector exits 0 on SIGTERM"
    );

    let out = run(&mut podman_run(&[
        "--entrypoint",
        "/usr/bin/outflow-agent",
        &image.0,
        "--version",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("outflow-agent "), "{text}");

    // The agent's probe from inside: its three capabilities, the host's bpffs and cgroup2.
    // The default seccomp profile of this podman lets bpf(2) through only with CAP_SYS_ADMIN.
    let cgroup2 = cgroup2_mount();
    let out = run(&mut podman_run(&[
        "--user",
        "0:0",
        "--cap-drop=all",
        "--cap-add=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
        "--security-opt",
        "seccomp=unconfined",
        "-v",
        "/sys/fs/bpf:/sys/fs/bpf",
        "-v",
        &format!("{cgroup2}:{cgroup2}:ro"),
        "--entrypoint",
        "/usr/bin/outflow-agent",
        &image.0,
        "check",
        "--output",
        "json",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).expect("check's JSON");
    assert_eq!(report["verdict"]["status"], "ready", "{text}");
    // Probed, not assumed: every row the agent needs was found present (a process that
    // cannot call bpf(2) at all is "ready" too, every row "not probed").
    for row in report["rows"].as_array().expect("rows") {
        if row["need"] != "info" {
            assert!(
                row["result"] == "ok" || row["result"] == "absent (not needed)",
                "{row}"
            );
        }
    }
}

/// Whether /sys/fs/cgroup itself is the cgroup2 mount (no v1 hierarchies beside it).
fn pure_cgroup2() -> bool {
    cgroup2_mount() == "/sys/fs/cgroup"
}
