//! Test cgroups: unique children of the cgroup2 mount, emptied and removed when dropped.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::wait::poll_until;

/// Prefix of the directories this module creates: `outflow-test-<pid>-<serial>-<name>`.
const PREFIX: &str = "outflow-test-";

/// How long dropping a cgroup waits for its processes to die.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where cgroup2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid hosts),
/// read from `/proc/mounts`. Panics if there is no cgroup2 mount.
pub fn cgroup2_mount() -> PathBuf {
    try_cgroup2_mount().unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`cgroup2_mount`], but an error if there is no cgroup2 mount.
pub fn try_cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")
        .map_err(|e| io::Error::new(e.kind(), format!("reading /proc/mounts: {e}")))?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
        })
        .ok_or_else(|| io::Error::other("no cgroup2 file system in /proc/mounts"))
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal `\ooo`.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Moves the process `pid` into the cgroup directory `dir` by writing `dir/cgroup.procs`
/// (which must exist: `dir` is a cgroup, not any directory).
pub fn move_pid(dir: &Path, pid: u32) -> io::Result<()> {
    let procs = dir.join("cgroup.procs");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", procs.display())))?;
    file.write_all(pid.to_string().as_bytes()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {pid} to {}: {e}", procs.display()),
        )
    })
}

/// A child cgroup of the cgroup2 mount, unique to this process and test.
///
/// Dropping it kills every process in it, waits until it is empty and removes it.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    relative: String,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/outflow-test-<pid>-<serial>-<name>`; panics if that fails.
    pub fn new(name: &str) -> Self {
        Self::try_new(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`TestCgroup::new`], but an error if the cgroup cannot be made.
    pub fn try_new(name: &str) -> io::Result<Self> {
        let mount = try_cgroup2_mount()?;
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| sweep_stale(&mount));

        let dir = format!(
            "{PREFIX}{}-{}-{}",
            std::process::id(),
            crate::next_serial(),
            crate::sanitize_tag(name, 40)
        );
        let path = mount.join(&dir);
        fs::create_dir(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("creating cgroup {}: {e}", path.display()))
        })?;
        Ok(Self {
            path,
            relative: format!("/{dir}"),
        })
    }

    /// Absolute path of the cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The absolute path as a string, for the agent's `--cgroup`.
    pub fn as_arg(&self) -> &str {
        self.path
            .to_str()
            .expect("cgroup paths made by TestCgroup are UTF-8")
    }

    /// Path relative to the cgroup2 mount with a leading `/` (e.g. `/outflow-test-12-0-x`):
    /// what the agent reports as `"cgroup"`.
    pub fn relative_path(&self) -> &str {
        &self.relative
    }

    /// The cgroup id (the inode number of its directory): what the agent reports as `"cgroup_id"`.
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// Pids of the processes in the cgroup (`cgroup.procs`).
    pub fn pids(&self) -> Vec<u32> {
        read_pids(&self.path)
            .unwrap_or_else(|e| panic!("reading {}/cgroup.procs: {e}", self.path.display()))
    }

    /// Moves the process `pid` into the cgroup.
    pub fn add_pid(&self, pid: u32) {
        move_pid(&self.path, pid)
            .unwrap_or_else(|e| panic!("moving {pid} into a test cgroup: {e}"));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // No panics here: this may run while a test is already unwinding.
        if let Err(e) = remove(&self.path) {
            eprintln!("cleaning up cgroup {}: {e}", self.path.display());
        }
    }
}

fn read_pids(dir: &Path) -> io::Result<Vec<u32>> {
    Ok(fs::read_to_string(dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect())
}

/// Kills everything in the cgroup at `dir`, waits for it to be empty and removes it.
fn remove(dir: &Path) -> io::Result<()> {
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        fs::write(&kill_file, "1")?;
    }
    let mut last_error = None;
    let emptied = poll_until(EMPTY_TIMEOUT, || {
        // Without cgroup.kill (before Linux 5.14), and for processes that raced into the
        // cgroup after the write, kill them one by one.
        match read_pids(dir) {
            Ok(pids) if pids.is_empty() => return true,
            Ok(pids) => {
                for pid in pids {
                    if let Ok(pid) = i32::try_from(pid) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
            Err(e) => last_error = Some(e),
        }
        false
    });
    if !emptied {
        return Err(last_error.unwrap_or_else(|| {
            io::Error::other(format!(
                "processes still in the cgroup after {EMPTY_TIMEOUT:?}"
            ))
        }));
    }
    // The last exiting task can keep the cgroup busy for a moment after it leaves cgroup.procs.
    let mut last_error = None;
    if poll_until(EMPTY_TIMEOUT, || match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            last_error = Some(e);
            false
        }
    }) {
        Ok(())
    } else {
        Err(last_error.unwrap_or_else(|| io::Error::other("rmdir did not succeed")))
    }
}

/// Removes test cgroups left behind by test processes that no longer exist (killed runs).
fn sweep_stale(mount: &Path) {
    let Ok(entries) = fs::read_dir(mount) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::process_exists(pid)
            && entry.path().is_dir()
            && let Err(e) = remove(&entry.path())
        {
            eprintln!("removing stale test cgroup {}: {e}", entry.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mount_path;

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(unescape_mount_path("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mount_path(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path(r"/mnt/a\\b"), r"/mnt/a\\b");
    }
}

/// `enum bpf_attach_type` values of the programs outflow attaches to a cgroup.
pub mod attach {
    /// `BPF_CGROUP_INET_INGRESS`: cgroup_skb on received packets.
    pub const INET_INGRESS: u32 = 0;
    /// `BPF_CGROUP_INET_EGRESS`: cgroup_skb on sent packets.
    pub const INET_EGRESS: u32 = 1;
    /// `BPF_CGROUP_SOCK_OPS`.
    pub const SOCK_OPS: u32 = 3;
}

/// Ids of the programs attached to the cgroup at `dir` for `attach_type` (one of [`attach`]),
/// from `BPF_PROG_QUERY` (aya has no public query for cgroup programs).
pub fn attached_programs(dir: &Path, attach_type: u32) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    // The BPF_PROG_QUERY part of `union bpf_attr`.
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        // Explicit, so it is zero: an implicit padding's bytes are undefined, and Linux before
        // 6.0 refuses any non-zero byte after prog_cnt (EINVAL).
        _pad: u32,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    let cgroup = fs::File::open(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", dir.display())))?;
    let mut ids = [0u32; 64];
    let mut attr = [0u64; 16];
    let query = Query {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: Query is plain data that fits in the zeroed, 8-aligned attr buffer.
    unsafe { std::ptr::write(attr.as_mut_ptr().cast::<Query>(), query) };
    // SAFETY: bpf(2) reads attr and writes at most prog_cnt ids into `ids`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("BPF_PROG_QUERY on {}: {e}", dir.display()),
        ));
    }
    // SAFETY: as above.
    let count = unsafe { std::ptr::read(attr.as_ptr().cast::<Query>()) }.prog_cnt as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}
