//! `cargo xtask image`: an OCI image of the agent and the collector, built offline.
//!
//! No base image can be pulled, and none is needed: the root file system is assembled here
//! from the two binaries, exactly the shared libraries `ldd` lists for them (and the dynamic
//! loader), the system's CA bundle (the agent's and the collector's TLS trust the system's
//! roots by default), and `/etc/passwd`, `/etc/group` and `/etc/hosts`. Debian's `buildah`
//! turns it into an image `from scratch`, tagged `localhost/outflow:<version>` in the local
//! container storage, and writes it as an oci-archive under `target/`.
//!
//! The image runs the collector by default, as the unprivileged user 65532 (its data in
//! `/var/lib/outflow-collector`, owned by that user). The agent is the same image with
//! `--entrypoint /usr/bin/outflow-agent`, as root or with CAP_BPF, CAP_PERFMON and
//! CAP_NET_ADMIN, and the host's bpffs and cgroup2 mounted in.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// The image's default user (and group): the collector's, not root.
pub const IMAGE_UID: u32 = 65532;
const BINARIES: [&str; 2] = ["outflow-agent", "outflow-collector"];
/// The CA bundle of Debian's `ca-certificates`, at the path rustls-native-certs looks first.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(clap::Args)]
pub struct Args {
    /// Use the debug binaries (faster to build; for tests) instead of release ones.
    #[arg(long)]
    debug: bool,
    /// Take the binaries from this directory instead of building them (e.g. target/debug).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Image name and tag (default: localhost/outflow:<version>).
    #[arg(long)]
    tag: Option<String>,
    /// Where to write the oci-archive (default: target/outflow-<version>.oci.tar).
    #[arg(long, value_name = "FILE")]
    archive: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let version = env!("CARGO_PKG_VERSION");
    let tag = args
        .tag
        .clone()
        .unwrap_or_else(|| format!("localhost/outflow:{version}"));
    let archive = args
        .archive
        .clone()
        .unwrap_or_else(|| cmd::target_dir().join(format!("outflow-{version}.oci.tar")));
    for tool in ["buildah", "ldd"] {
        if cmd::find_on_path(tool).is_none() {
            bail!("`{tool}` is not installed: apt-get install buildah (ldd is in libc-bin)");
        }
    }

    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => build_binaries(args.debug)?,
    };
    // One directory per tag, so that a test's image and a release one can be built at once.
    let work = cmd::target_dir()
        .join("image")
        .join(tag.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "-"));
    let rootfs = work.join("rootfs");
    assemble_rootfs(&bin_dir, &rootfs)?;
    // The collector's data directory, apart: buildah gives a directory it creates the owner
    // of `--chown`, but leaves one that exists (from the root-owned copy) as it is.
    let data = work.join("data");
    let data_dir = data.join("outflow-collector");
    if data.exists() {
        fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
    }
    fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", data_dir.display()))?;
    let size = dir_size(&rootfs)?;
    println!(
        "xtask: root file system {} ({:.1} MiB)",
        rootfs.display(),
        size as f64 / (1 << 20) as f64
    );

    build_image(&rootfs, &data, &tag, version)?;
    if let Some(parent) = archive.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let _ = fs::remove_file(&archive);
    cmd::run(Command::new("buildah").args([
        "push",
        "--quiet",
        &tag,
        &format!("oci-archive:{}:{tag}", archive.display()),
    ]))?;
    let archive_size = fs::metadata(&archive)
        .with_context(|| format!("reading {}", archive.display()))?
        .len();
    println!(
        "xtask: image {tag}, oci-archive {} ({:.1} MiB), in {:.0?}",
        archive.display(),
        archive_size as f64 / (1 << 20) as f64,
        started.elapsed()
    );
    Ok(())
}

/// `cargo build [--release] -p outflow-agent -p outflow-collector`; returns the directory of
/// the binaries.
fn build_binaries(debug: bool) -> Result<PathBuf> {
    let mut build = Command::new(cmd::cargo());
    build.arg("build").current_dir(cmd::workspace_root());
    for bin in BINARIES {
        build.args(["-p", bin]);
    }
    if !debug {
        build.arg("--release");
    }
    println!("xtask: {}", cmd::display(&build));
    cmd::run(&mut build).context("building the binaries of the image")?;
    Ok(cmd::target_dir().join(if debug { "debug" } else { "release" }))
}

/// Makes `rootfs` afresh: the binaries in /usr/bin, their libraries where `ldd` found them, the
/// CA bundle, users and the directories the programs write to.
fn assemble_rootfs(bin_dir: &Path, rootfs: &Path) -> Result<()> {
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    let mut libraries = BTreeSet::new();
    for bin in BINARIES {
        let src = bin_dir.join(bin);
        if !src.is_file() {
            bail!("{} not found: build it first", src.display());
        }
        copy_into(rootfs, &src, Path::new("/usr/bin").join(bin).as_path())?;
        libraries.extend(shared_libraries(&src)?);
    }
    for lib in &libraries {
        copy_into(rootfs, lib, lib)?;
    }
    copy_into(rootfs, Path::new(CA_BUNDLE), Path::new(CA_BUNDLE))
        .context("the CA bundle is missing: apt-get install ca-certificates")?;
    let etc = rootfs.join("etc");
    write(
        &etc.join("passwd"),
        &format!(
            "root:x:0:0:root:/root:/sbin/nologin\n\
             outflow:x:{IMAGE_UID}:{IMAGE_UID}:outflow:/var/lib/outflow-collector:/sbin/nologin\n"
        ),
    )?;
    write(
        &etc.join("group"),
        &format!("root:x:0:\noutflow:x:{IMAGE_UID}:\n"),
    )?;
    write(&etc.join("hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
    for dir in ["tmp", "var/lib/outflow", "etc/outflow"] {
        fs::create_dir_all(rootfs.join(dir))
            .with_context(|| format!("creating {}", rootfs.join(dir).display()))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))
        .context("chmod /tmp")?;
    Ok(())
}

/// The files `ldd` lists for `bin`: `name => /path (addr)` and the loader's `/path (addr)`
/// (the vDSO has no file).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd::output(Command::new("ldd").arg(bin))?;
    parse_ldd(&out).with_context(|| format!("ldd {}", bin.display()))
}

fn parse_ldd(out: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not a dynamic executable") || line.starts_with("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("a library is missing: {}", name.trim());
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if !line.starts_with("linux-vdso") {
            bail!("cannot read ldd's line {line:?}");
        }
    }
    Ok(libs)
}

/// Copies the file `src` (symlinks followed) to `dest` inside `rootfs`.
fn copy_into(rootfs: &Path, src: &Path, dest: &Path) -> Result<()> {
    let target = rootfs.join(dest.strip_prefix("/").unwrap_or(dest));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::copy(src, &target)
        .with_context(|| format!("copying {} to {}", src.display(), target.display()))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// `buildah from scratch`, the root file system copied in root-owned, then the collector's
/// data directory (the only directory in `data`) owned by its user, the config, `buildah
/// commit` as `tag`.
fn build_image(rootfs: &Path, data: &Path, tag: &str, version: &str) -> Result<()> {
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.args(args);
        c
    };
    let container = cmd::output(&mut buildah(&["from", "--quiet", "scratch"]))?
        .trim()
        .to_owned();
    let result = (|| {
        let root = format!("{}/", rootfs.display());
        cmd::run(&mut buildah(&[
            "copy", "--quiet", "--chown", "0:0", &container, &root, "/",
        ]))?;
        cmd::run(&mut buildah(&[
            "copy",
            "--quiet",
            "--chown",
            &format!("{IMAGE_UID}:{IMAGE_UID}"),
            &container,
            &format!("{}/", data.display()),
            "/var/lib/",
        ]))?;
        let user = format!("{IMAGE_UID}:{IMAGE_UID}");
        let version_label = format!("org.opencontainers.image.version={version}");
        cmd::run(&mut buildah(&[
            "config",
            "--entrypoint",
            r#"["/usr/bin/outflow-collector"]"#,
            "--user",
            &user,
            "--workingdir",
            "/",
            "--env",
            &format!("SSL_CERT_FILE={CA_BUNDLE}"),
            "--port",
            "7411/tcp",
            "--label",
            "org.opencontainers.image.title=outflow",
            "--label",
            "org.opencontainers.image.description=outflow-collector (entrypoint) and outflow-agent (--entrypoint /usr/bin/outflow-agent, needs CAP_BPF CAP_PERFMON CAP_NET_ADMIN)",
            "--label",
            &version_label,
            "--label",
            "org.opencontainers.image.licenses=MIT OR Apache-2.0",
            &container,
        ]))?;
        cmd::output(&mut buildah(&[
            "commit", "--quiet", "--rm", &container, tag,
        ]))
        .map(drop)
    })();
    if result.is_err() {
        // The working container is left only when commit did not remove it.
        let _ = buildah(&["rm", &container]).output();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_library_files() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }
}
