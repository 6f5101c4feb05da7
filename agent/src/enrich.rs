//! What the kernel does not record but a person wants to see: the cgroup's path, and the
//! process that owns the listening socket a server connection was accepted from. Best effort,
//! cached, and refreshed only on a miss.
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How long a failed lookup is remembered before it is tried again.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// Maps cgroup ids (directory inode numbers) to paths relative to the cgroup2 mount.
pub struct CgroupNames {
    mount: PathBuf,
    attach: PathBuf,
    by_id: HashMap<u64, String>,
    last_walk: Option<Instant>,
}

impl CgroupNames {
    /// `attach` is the directory the programs are attached to: every counted socket's cgroup is
    /// it or below it.
    pub fn new(mount: PathBuf, attach: PathBuf) -> Self {
        Self {
            mount,
            attach,
            by_id: HashMap::new(),
            last_walk: None,
        }
    }

    /// The path of cgroup `id`, like `/system.slice/inference.service`; `None` if it is gone.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.by_id.get(&id) {
            return Some(p.clone());
        }
        if self
            .last_walk
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.walk();
        self.by_id.get(&id).cloned()
    }

    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        let mut stack = vec![self.attach.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&self.mount).map_or_else(
                |_| dir.display().to_string(),
                |r| format!("/{}", r.display()),
            );
            self.by_id.insert(meta.ino(), rel);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }

    /// The directory of cgroup `id` on disk.
    pub fn dir(&mut self, id: u64) -> Option<PathBuf> {
        let rel = self.path(id)?;
        Some(self.mount.join(rel.trim_start_matches('/')))
    }
}

/// A process: pid and command name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
}

/// Finds the owner of the listening socket on a port, among the processes of a cgroup.
#[derive(Default)]
pub struct Listeners {
    cache: HashMap<(u64, u16), (Option<Process>, Instant)>,
}

impl Listeners {
    pub fn owner(
        &mut self,
        cgroup_id: u64,
        cgroup_dir: Option<&Path>,
        port: u16,
    ) -> Option<Process> {
        if let Some((p, at)) = self.cache.get(&(cgroup_id, port)) {
            if let Some(p) = p
                && Path::new(&format!("/proc/{}", p.pid)).exists()
            {
                return Some(p.clone());
            }
            if p.is_none() && at.elapsed() < NEGATIVE_TTL {
                return None;
            }
        }
        let found = cgroup_dir.and_then(|d| find_listener(d, port));
        self.cache
            .insert((cgroup_id, port), (found.clone(), Instant::now()));
        found
    }
}

/// Looks at each process of the cgroup: does its network namespace have a listening TCP socket
/// on `port` whose inode is one of the process's open files?
fn find_listener(cgroup_dir: &Path, port: u16) -> Option<Process> {
    let procs = fs::read_to_string(cgroup_dir.join("cgroup.procs")).ok()?;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let mut inodes = Vec::new();
        for table in ["tcp", "tcp6"] {
            if let Ok(t) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
                inodes.extend(listening_inodes(&t, port));
            }
        }
        if inodes.is_empty() {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'))
                && ino.parse::<u64>().is_ok_and(|i| inodes.contains(&i))
            {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                return Some(Process {
                    pid,
                    comm: comm.trim_end().to_string(),
                });
            }
        }
    }
    None
}

/// Inodes of the sockets in LISTEN state (0A) on `port`, from a /proc/net/tcp{,6} table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let p = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (p == port && *f.get(3)? == "0A")
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners_from_proc_net_tcp() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 010012C6:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 010012C6:1F40 020012C6:A0B2 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(listening_inodes(t, 8000), vec![4242]);
        assert!(listening_inodes(t, 8001).is_empty());
    }
}
