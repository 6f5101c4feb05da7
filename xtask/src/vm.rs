//! `cargo xtask vm-test [--kernel SERIES]...`: the kernel test suites on the kernels users run,
//! each booted in a VM.
//!
//! The matrix is [`MATRIX`]: Debian's own kernels, from the Debian archive (the one package
//! registry these machines reach that has kernels). [`install`] (part of `cargo xtask setup`)
//! puts virtme-ng (PyPI) in a venv and downloads and unpacks each kernel package into
//! [`cache_dir`], never into the host's /boot. A kernel is booted with virtme-ng on the host's
//! own root file system (read-only 9p with tmpfs overlays), under QEMU's software emulation
//! (this machine's /dev/kvm is a nested module that cannot run stock kernels), and runs the
//! already-built test binaries of [`SUITES`] inside, as root, against that kernel. As many VMs
//! run at once as the host has cores (a VM runs its tests one at a time). Results go to
//! `target/vm-test/<series>/`, one log per suite; each kernel's result is one line.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup, test::cargo_command};

/// One kernel of the matrix.
pub struct KernelSpec {
    /// `5.10`: the package is the newest `linux-image-<series>.<...>-amd64-unsigned`.
    pub series: &'static str,
    /// The Debian suite that carries it.
    pub suite: &'static str,
    /// Who ships it, for the result line.
    pub distro: &'static str,
}

/// The kernels every `cargo xtask test` runs the suites on. 5.10 is the oldest kernel the
/// Debian archive still serves (buster's 4.19 is only on archive.debian.org).
pub const MATRIX: &[KernelSpec] = &[
    KernelSpec {
        series: "5.10",
        suite: "bullseye",
        distro: "Debian 11",
    },
    KernelSpec {
        series: "6.1",
        suite: "bookworm",
        distro: "Debian 12",
    },
    KernelSpec {
        series: "6.12",
        suite: "bookworm-backports",
        distro: "Debian 12 backports",
    },
];

/// The test binaries (integration tests of `outflow-tests`) run in each VM.
pub const SUITES: &[&str] = &["counting", "operating", "export"];

/// virtme-ng release installed into the venv.
const VIRTME_NG_VERSION: &str = "1.42";

/// A VM that runs longer than this is stopped and its kernel fails.
const VM_TIMEOUT: Duration = Duration::from_secs(40 * 60);

/// Lines of the VM's output shown when it stopped before the guest ran the script.
const CONSOLE_TAIL_LINES: usize = 30;

#[derive(clap::Args)]
pub struct Args {
    /// Kernel series to boot (`5.10`, `6.1`, `6.12`); repeat for several. Default: all.
    #[arg(long = "kernel", value_name = "SERIES")]
    kernels: Vec<String>,
    /// VMs to run at once [default: one per core of the host, at most one per kernel].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
}

/// `~/.cache/outflow/vm`: the virtme-ng venv, the unpacked kernels, the private apt state.
pub fn cache_dir() -> Result<PathBuf> {
    Ok(cmd::home()?.join(".cache/outflow/vm"))
}

/// A kernel unpacked in the cache.
struct Kernel {
    spec: &'static KernelSpec,
    /// The unpacked package: `boot/vmlinuz-<release>`, `lib/modules/<release>/`.
    dir: PathBuf,
    /// `5.10.0-32-amd64`
    release: String,
    /// `linux-image-5.10.0-32-amd64-unsigned 5.10.223-1`
    package: String,
}

impl Kernel {
    fn open(spec: &'static KernelSpec, dir: PathBuf) -> Option<Self> {
        let package = fs::read_to_string(dir.join("package")).ok()?;
        let release = fs::read_dir(dir.join("boot"))
            .ok()?
            .filter_map(|e| e.ok())
            .find_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("vmlinuz-")
                    .map(str::to_owned)
            })?;
        Some(Self {
            spec,
            dir,
            release,
            package: package.trim().to_owned(),
        })
    }

    fn vmlinuz(&self) -> PathBuf {
        self.dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
}

/// Setup's part: virtme-ng and every kernel of the matrix, each `ok ...` when present.
pub fn install() -> Result<()> {
    let cache = cache_dir()?;
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    virtme_ng(&cache)?;
    let mut apt = None;
    for spec in MATRIX {
        let dir = cache.join("kernels").join(spec.series);
        if Kernel::open(spec, dir.clone()).is_none() {
            let apt = match &mut apt {
                Some(a) => a,
                None => apt.insert(PrivateApt::update(&cache)?),
            };
            download_kernel(apt, spec, &dir)?;
        }
        let k = Kernel::open(spec, dir.clone())
            .with_context(|| format!("no kernel in {} after unpacking", dir.display()))?;
        println!("ok kernel {} ({})", spec.series, k.package);
    }
    Ok(())
}

fn venv_bin(cache: &Path) -> PathBuf {
    cache.join("venv/bin")
}

fn virtme_ng(cache: &Path) -> Result<()> {
    let bin = venv_bin(cache);
    let marker = cache.join("venv/virtme-ng.version");
    if bin.join("vng").is_file()
        && fs::read_to_string(&marker).is_ok_and(|v| v.trim() == VIRTME_NG_VERSION)
    {
        println!("ok virtme-ng ({VIRTME_NG_VERSION})");
        return Ok(());
    }
    println!("installing virtme-ng {VIRTME_NG_VERSION} (PyPI) into a venv...");
    let venv = cache.join("venv");
    let _ = fs::remove_dir_all(&venv);
    cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context(
        "creating a Python venv for virtme-ng (Debian package python3-venv; `cargo xtask setup` installs it)",
    )?;
    cmd::run(
        Command::new(bin.join("pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )
    .context("installing virtme-ng from PyPI")?;
    fs::write(&marker, VIRTME_NG_VERSION)
        .with_context(|| format!("writing {}", marker.display()))?;
    println!("ok virtme-ng ({VIRTME_NG_VERSION})");
    Ok(())
}

/// apt with its own sources, lists and cache under the cache dir: the host's sources and
/// package state are left alone.
struct PrivateApt {
    options: Vec<String>,
    dir: PathBuf,
}

impl PrivateApt {
    fn update(cache: &Path) -> Result<Self> {
        let dir = cache.join("apt");
        for sub in ["parts", "lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let mirror = host_mirror();
        let mut sources = String::new();
        let mut suites: Vec<&str> = MATRIX.iter().map(|k| k.suite).collect();
        suites.dedup();
        for suite in suites {
            sources.push_str(&format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"
            ));
        }
        fs::write(dir.join("sources.list"), sources).context("writing the private sources.list")?;
        let d = dir.display();
        let options = vec![
            format!("Dir::Etc::sourcelist={d}/sources.list"),
            format!("Dir::Etc::sourceparts={d}/parts"),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            // The files are root's, in root's home: no need to drop to the _apt user.
            "APT::Sandbox::User=root".to_owned(),
        ];
        let apt = Self { options, dir };
        println!("updating the package lists of {mirror} for the VM kernels...");
        cmd::output(&mut apt.command("apt-get", &["update", "-q"]))
            .with_context(|| format!("apt-get update of the kernel suites from {mirror}"))?;
        Ok(apt)
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        for o in &self.options {
            c.arg("-o").arg(o);
        }
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    }
}

/// The Debian mirror the host uses (`URIs:` of /etc/apt/sources.list.d/debian.sources, or a
/// `deb` line of /etc/apt/sources.list), else deb.debian.org.
fn host_mirror() -> String {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let classic = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    deb822
        .lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .chain(classic.lines().filter_map(|l| {
            let mut f = l.split_whitespace().filter(|w| !w.starts_with('['));
            (f.next() == Some("deb")).then(|| f.next()).flatten()
        }))
        .find(|u| u.ends_with("/debian") || u.ends_with("/debian/"))
        .map_or_else(
            || "http://deb.debian.org/debian".to_owned(),
            |u| u.trim_end_matches('/').to_owned(),
        )
}

/// The newest `linux-image-<series>.*-amd64-unsigned` (the generic flavour: not cloud, not rt,
/// not the debug symbols) among `names`.
fn newest_image<'a>(series: &str, names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    names
        .filter(|n| {
            let Some(rest) = n
                .strip_prefix("linux-image-")
                .and_then(|r| r.strip_suffix("-amd64-unsigned"))
            else {
                return false;
            };
            let Some(after) = rest.strip_prefix(series) else {
                return false;
            };
            // `5.10` must not take `5.100...`; only digits, dots, dashes and `+debNN` follow.
            let plain = |t: &str| {
                t.chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
            };
            after.starts_with(['.', '-'])
                && match after.split_once("+deb") {
                    None => plain(after),
                    Some((a, b)) => {
                        plain(a) && !b.is_empty() && b.chars().all(|c| c.is_ascii_digit())
                    }
                }
        })
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
}

/// The numbers in a package name, in order, for comparing versions.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn download_kernel(apt: &PrivateApt, spec: &KernelSpec, dir: &Path) -> Result<()> {
    let names = cmd::output(&mut apt.command("apt-cache", &["pkgnames", "linux-image-"]))?;
    let Some(package) = newest_image(spec.series, names.lines()) else {
        bail!(
            "no linux-image-{}.*-amd64-unsigned in Debian {} ({}): see apt-cache pkgnames there",
            spec.series,
            spec.suite,
            apt.dir.display()
        );
    };
    println!("downloading {package} (Debian {})...", spec.suite);
    let debs = apt.dir.join("debs");
    let _ = fs::remove_dir_all(&debs);
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    cmd::output(
        apt.command("apt-get", &["download", "-q", package])
            .current_dir(&debs),
    )
    .with_context(|| format!("downloading {package}"))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", debs.display()))?;
    let version = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('_').nth(1))
        .unwrap_or("?")
        .to_owned();
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    fs::write(partial.join("package"), format!("{package} {version}\n"))?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&partial, dir).with_context(|| format!("moving the kernel to {}", dir.display()))?;
    fs::remove_dir_all(&debs)?;
    Ok(())
}

/// `cargo xtask vm-test`: setup, build, then the matrix.
pub fn run(args: &Args) -> Result<std::process::ExitCode> {
    if !cmd::is_root()? {
        bail!(
            "the VMs run the kernel tests as root and QEMU reads the kernels in root's cache: run as root"
        );
    }
    let report = setup::run()?;
    let mut build = cargo_command(&report, "build");
    build.arg("--bins");
    println!("xtask: {}", cmd::display(&build));
    cmd::run(&mut build).context("building the binaries the tests start")?;
    let ok = matrix(&report, &args.kernels, args.jobs)?;
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Builds the suites' test binaries and runs them on each kernel of `series` (all when
/// empty). True when every suite passed on every kernel.
pub fn matrix(report: &setup::Report, series: &[String], jobs: Option<usize>) -> Result<bool> {
    let specs: Vec<&'static KernelSpec> = if series.is_empty() {
        MATRIX.iter().collect()
    } else {
        series
            .iter()
            .map(|s| {
                MATRIX.iter().find(|k| k.series == s).with_context(|| {
                    let known: Vec<&str> = MATRIX.iter().map(|k| k.series).collect();
                    format!(
                        "no kernel {s} in the matrix; choose from {}",
                        known.join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    let binaries = test_binaries(report)?;
    let cache = cache_dir()?;
    let kernels = specs
        .into_iter()
        .map(|spec| {
            let dir = cache.join("kernels").join(spec.series);
            Kernel::open(spec, dir.clone()).with_context(|| {
                format!(
                    "kernel {} is not in {}: run `cargo xtask setup`",
                    spec.series,
                    dir.display()
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let cores = host_cores();
    let jobs = jobs.unwrap_or(cores).min(kernels.len()).max(1);
    // Never more emulated CPUs than the host has cores (measured on 2 cores, 5.10 beside 6.1:
    // with two CPUs each, 5.10's `export` took 146 s and `operating` 156 s; with one CPU each,
    // 104 s and 69 s). Alone, a VM gets two.
    let cpus = (cores / jobs).clamp(1, 2);
    println!(
        "vm-test: {} kernel(s), {jobs} VM(s) at a time, {cpus} CPU(s) each",
        kernels.len()
    );
    let started = Instant::now();
    // Each VM's tests run one at a time and keep about one emulated CPU busy, so as many VMs
    // run at once as the host has cores. The kernels are taken in the matrix's order, the
    // oldest (the slowest to run the suites) first.
    let next = std::sync::Mutex::new(kernels.iter());
    let all_ok = std::sync::atomic::AtomicBool::new(true);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let Some(kernel) = next.lock().unwrap_or_else(|e| e.into_inner()).next()
                        else {
                            return Ok(());
                        };
                        let ok = run_kernel(kernel, &binaries, cpus)?;
                        if !ok {
                            all_ok.store(false, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a VM's thread panicked")))?;
        }
        Ok(())
    })?;
    println!(
        "vm-test: matrix done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(all_ok.into_inner())
}

/// The host's cores: as many VMs run at once (at most one per kernel).
fn host_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Boots `kernel` (twice if the first VM never ran the script), prints its result line, and
/// says whether every suite passed.
fn run_kernel(kernel: &Kernel, binaries: &[(&'static str, PathBuf)], cpus: usize) -> Result<bool> {
    let mut result = boot(kernel, binaries, cpus)?;
    // A VM that stopped before the guest ran a line of the script gave no verdict on the
    // kernel (QEMU or virtme-ng failed to start it): it is booted once more, and what it
    // printed is shown, so that a second such failure says why.
    if result.never_ran {
        println!(
            "vm-test: linux {} stopped before the guest ran the script ({}); its last output:\n{}\nvm-test: booting it once more",
            kernel.release,
            result.failure.as_deref().unwrap_or("no exit status"),
            result.console_tail(CONSOLE_TAIL_LINES),
        );
        result = boot(kernel, binaries, cpus)?;
        if result.never_ran {
            println!("{}", result.console_tail(CONSOLE_TAIL_LINES));
        }
    }
    println!("{}", result.line());
    Ok(result.ok())
}

/// The suites' test executables, built now.
fn test_binaries(report: &setup::Report) -> Result<Vec<(&'static str, PathBuf)>> {
    let mut build = cargo_command(report, "test");
    build.args([
        "-p",
        "outflow-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for s in SUITES {
        build.args(["--test", s]);
    }
    println!("xtask: {}", cmd::display(&build));
    let out = cmd::output(&mut build).context("building the kernel test suites")?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            v["target"]["name"].as_str(),
            v["executable"]
                .as_str()
                .filter(|_| v["profile"]["test"] == true),
        ) else {
            continue;
        };
        if let Some(s) = SUITES.iter().find(|s| **s == name) {
            found.push((*s, PathBuf::from(exe)));
        }
    }
    for s in SUITES {
        if !found.iter().any(|(n, _)| n == s) {
            bail!("cargo built no test binary for the suite {s}");
        }
    }
    Ok(found)
}

/// One kernel's outcome.
struct VmResult {
    kernel: String,
    /// `outflow-agent check` in the guest: its verdict line, and the features it found absent.
    check: Check,
    suites: Vec<SuiteResult>,
    /// Why the VM did not give results, if it did not.
    failure: Option<String>,
    /// The VM stopped before the guest's script wrote its first file.
    never_ran: bool,
    seconds: f64,
    out_dir: PathBuf,
}

#[derive(Default)]
struct Check {
    status: Option<i32>,
    verdict: Option<String>,
    absent: Vec<String>,
}

impl Check {
    fn read(dir: &Path) -> Self {
        let status = fs::read_to_string(dir.join("check.status"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let json: Option<serde_json::Value> = fs::read_to_string(dir.join("check.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok());
        let Some(json) = json else {
            return Self {
                status,
                ..Self::default()
            };
        };
        let absent = json["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["result"] != "ok")
            .map(|r| {
                format!(
                    "{} ({})",
                    r["feature"].as_str().unwrap_or("?"),
                    r["result"].as_str().unwrap_or("?")
                )
            })
            .collect();
        Self {
            status,
            verdict: json["verdict"]["line"].as_str().map(str::to_owned),
            absent,
        }
    }

    fn ok(&self) -> bool {
        self.status == Some(0) && self.verdict.is_some()
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "check: {}",
            self.verdict
                .as_deref()
                .unwrap_or("no verdict (see check.err)")
        );
        if !self.absent.is_empty() {
            s.push_str(&format!("; not on this kernel: {}", self.absent.join(", ")));
        }
        s
    }
}

struct SuiteResult {
    name: &'static str,
    passed: u32,
    failed: Vec<String>,
    status: Option<i32>,
    seconds: u64,
}

impl VmResult {
    /// The last `n` lines of what the VM printed (QEMU, virtme-ng and the guest's console).
    fn console_tail(&self, n: usize) -> String {
        let console = fs::read_to_string(self.out_dir.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn ok(&self) -> bool {
        self.failure.is_none()
            && self.check.ok()
            && self
                .suites
                .iter()
                .all(|s| s.status == Some(0) && s.failed.is_empty() && s.passed > 0)
    }

    fn line(&self) -> String {
        let mut parts = vec![self.check.describe()];
        for s in &self.suites {
            let mut p = format!("{} {} passed", s.name, s.passed);
            if !s.failed.is_empty() {
                p.push_str(&format!(", FAILED {}", s.failed.join(" ")));
            } else if s.status != Some(0) {
                p.push_str(&format!(
                    ", FAILED (exit {})",
                    s.status.map_or("none".to_owned(), |c| c.to_string())
                ));
            }
            p.push_str(&format!(" ({} s)", s.seconds));
            parts.push(p);
        }
        let verdict = if self.ok() { "ok" } else { "FAILED" };
        let mut line = format!(
            "vm-test {verdict}: linux {}: {}",
            self.kernel,
            parts.join(", ")
        );
        if let Some(f) = &self.failure {
            line.push_str(&format!("; {f}"));
        }
        line.push_str(&format!("; {:.0} s", self.seconds));
        if !self.ok() {
            line.push_str(&format!("; logs in {}", self.out_dir.display()));
        }
        line
    }
}

/// The script the guest runs: mounts what virtme-ng leaves out, loads veth, runs each suite
/// with its output, exit status and time in the shared directory.
fn guest_script(out: &Path, binaries: &[(&'static str, PathBuf)]) -> String {
    let out = out.display();
    let tests_dir = cmd::workspace_root().join("tests");
    let mut s = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask vm-test`; runs inside the VM as root.\n\
         out={out}\n\
         uname -r > $out/uname\n\
         modprobe veth 2> $out/setup.err || exit 90\n\
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>> $out/setup.err || exit 91\n\
         cd {} || exit 92\n\
         export RUST_BACKTRACE=1\n\
         {agent} check > $out/check.txt 2>&1\n\
         {agent} check --output json > $out/check.json 2> $out/check.err\n\
         echo $? > $out/check.status\n",
        tests_dir.display(),
        agent = cmd::target_dir().join("debug/outflow-agent").display(),
    );
    for (name, exe) in binaries {
        s.push_str(&format!(
            "start=$(date +%s)\n\
             {} --test-threads=1 > $out/{name}.log 2>&1\n\
             echo $? > $out/{name}.status\n\
             echo $(( $(date +%s) - start )) > $out/{name}.seconds\n",
            exe.display()
        ));
    }
    s
}

fn boot(kernel: &Kernel, binaries: &[(&'static str, PathBuf)], cpus: usize) -> Result<VmResult> {
    let out = cmd::target_dir().join("vm-test").join(kernel.spec.series);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let script = out.join("guest.sh");
    fs::write(&script, guest_script(&out, binaries))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
    }
    let cache = cache_dir()?;
    let bin = venv_bin(&cache);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path =
        std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(&path)))?;
    let mut vng = Command::new(bin.join("vng"));
    vng.arg("--run")
        .arg(kernel.vmlinuz())
        .args(["--user", "root", "--memory", "2G"])
        .arg("--cpus")
        .arg(cpus.to_string())
        // 9p, not virtiofs (no virtiofsd here); software emulation (see the module doc).
        .args(["--force-9p", "--disable-kvm"])
        .arg("--rwdir")
        .arg(&out)
        .arg("--exec")
        .arg(&script)
        .env("PATH", path)
        .stdin(Stdio::null())
        // Piped, not a file: with its stdout on a file virtme-ng loses the guest's console.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!(
        "vm-test: booting linux {} ({} {}) under QEMU (software emulation)...",
        kernel.release, kernel.spec.distro, kernel.spec.suite
    );
    let started = Instant::now();
    let mut child = vng
        .spawn()
        .with_context(|| format!("starting {}", bin.join("vng").display()))?;
    let console = collect(child.stdout.take());
    let errors = collect(child.stderr.take());
    let mut failure = None;
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                failure = Some(format!("the VM exited with {st}"));
            }
            break;
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            failure = Some(format!(
                "the VM ran longer than {} min and was stopped",
                VM_TIMEOUT.as_secs() / 60
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = console.join().unwrap_or_default() + &errors.join().unwrap_or_default();
    fs::write(out.join("console.log"), &console)?;
    let seconds = started.elapsed().as_secs_f64();

    let read = |name: &str| fs::read_to_string(out.join(name)).ok();
    let release = read("uname").map_or_else(|| kernel.release.clone(), |s| s.trim().to_owned());
    let never_ran = failure.is_some() && read("uname").is_none();
    if never_ran {
        failure = Some(format!(
            "{}; the guest never ran the script (see console.log)",
            failure.unwrap_or_default()
        ));
    }
    let suites = binaries
        .iter()
        .map(|(name, _)| {
            let log = read(&format!("{name}.log")).unwrap_or_default();
            let (passed, failed) = parse_log(&log);
            SuiteResult {
                name,
                passed,
                failed,
                status: read(&format!("{name}.status")).and_then(|s| s.trim().parse().ok()),
                seconds: read(&format!("{name}.seconds"))
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0),
            }
        })
        .collect();
    Ok(VmResult {
        kernel: format!("{release} ({} {})", kernel.spec.distro, kernel.spec.suite),
        check: Check::read(&out),
        suites,
        failure,
        never_ran,
        seconds,
        out_dir: out,
    })
}

fn collect<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Passed count and failed test names from a libtest log.
fn parse_log(log: &str) -> (u32, Vec<String>) {
    let passed = log
        .lines()
        .filter_map(|l| l.strip_prefix("test result: "))
        .filter_map(|l| l.split(". ").nth(1))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
        .sum();
    let failed = log
        .lines()
        .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
        .map(str::to_owned)
        .collect();
    (passed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_generic_image_of_a_series_is_chosen() {
        let names = [
            "linux-image-5.10.0-30-amd64-unsigned",
            "linux-image-5.10.0-32-amd64-unsigned",
            "linux-image-5.10.0-32-cloud-amd64-unsigned",
            "linux-image-5.10.0-32-rt-amd64-unsigned",
            "linux-image-5.10.0-32-amd64-dbg",
            "linux-image-6.1.0-47-amd64-unsigned",
            "linux-image-6.1.0-50-amd64-unsigned",
            "linux-image-6.12.95+deb12-amd64-unsigned",
            "linux-image-6.12.95+deb12-cloud-amd64-unsigned",
            "linux-image-amd64",
        ];
        let pick = |s| newest_image(s, names.iter().copied());
        assert_eq!(pick("5.10"), Some("linux-image-5.10.0-32-amd64-unsigned"));
        assert_eq!(pick("6.1"), Some("linux-image-6.1.0-50-amd64-unsigned"));
        assert_eq!(
            pick("6.12"),
            Some("linux-image-6.12.95+deb12-amd64-unsigned")
        );
        assert_eq!(pick("4.19"), None);
    }

    #[test]
    fn a_libtest_log_gives_passes_and_failures() {
        let log = "running 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... ok\n\n\
                   test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\n";
        assert_eq!(parse_log(log), (2, vec!["b".to_owned()]));
        assert_eq!(parse_log(""), (0, vec![]));
    }
}
