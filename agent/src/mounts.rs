//! Where the file systems the agent needs are mounted: cgroup v2 (what the programs attach to)
//! and bpffs (where the kernel state is pinned). Read only: mounting is the loader's.
use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted by convention, and where the agent mounts it when it is not.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// The cgroup2 mount point, from /proc/mounts (the shortest, if there are several); `None`
/// when no cgroup2 file system is mounted.
pub fn cgroup2_mount() -> io::Result<Option<PathBuf>> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(path)))
        })
        .min_by_key(|p| p.as_os_str().len()))
}

/// /proc/mounts escapes spaces and the like as octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The magic number of the file system `path` is on (`statfs(2)`'s `f_type`).
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statfs` is plain data, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type)
}

/// Where a pin directory stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinFs {
    /// On bpffs already.
    Bpffs,
    /// Under [`DEFAULT_BPFFS`], where nothing is mounted: the agent mounts bpffs there.
    MountDefault,
    /// Elsewhere, not on bpffs: the agent refuses it.
    NotBpffs,
}

/// Where `pin_dir` (which may not exist yet) stands: the file system of its closest existing
/// ancestor decides.
pub fn pin_fs(pin_dir: &Path) -> io::Result<PinFs> {
    let mut closest = pin_dir.to_path_buf();
    while !closest.exists() {
        if !closest.pop() {
            break;
        }
    }
    if fs_type(&closest)? == BPF_FS_MAGIC {
        return Ok(PinFs::Bpffs);
    }
    let default = Path::new(DEFAULT_BPFFS);
    if pin_dir.starts_with(default) && fs_type(default).ok() != Some(BPF_FS_MAGIC) {
        Ok(PinFs::MountDefault)
    } else {
        Ok(PinFs::NotBpffs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount(r"/sys/fs/cgroup\040x"), "/sys/fs/cgroup x");
        assert_eq!(unescape_mount(r"/plain"), "/plain");
        assert_eq!(unescape_mount(r"/trailing\04"), r"/trailing\04");
    }
}
