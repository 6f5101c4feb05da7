//! What the kernel does not record but a person wants to see: the cgroup's path, and the
//! process that owns the listening socket a server connection was accepted from. Best effort,
//! cached, and refreshed only on a miss.
use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader},
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
/// on `port` whose inode is one of the process's open files? Each namespace's tables are read
/// once, however many of the cgroup's processes share it.
fn find_listener(cgroup_dir: &Path, port: u16) -> Option<Process> {
    let procs = fs::read_to_string(cgroup_dir.join("cgroup.procs")).ok()?;
    let mut by_netns: HashMap<PathBuf, Vec<u64>> = HashMap::new();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        let Ok(netns) = fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        let inodes = by_netns.entry(netns).or_insert_with(|| {
            ["tcp", "tcp6"]
                .iter()
                .filter_map(|table| fs::File::open(format!("/proc/{pid}/net/{table}")).ok())
                .flat_map(|f| listening_inodes(BufReader::new(f), port))
                .collect()
        });
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

/// Inodes of the sockets in LISTEN state (0A) on `port`, from a /proc/net/tcp{,6} table, read
/// only as far as its listening sockets go. The kernel lists those first, then walks the
/// host's whole connection table for the namespace's connections: reading to the end costs
/// a line per connection, TIME_WAIT ones included (0.3 s for 23k of them here, and once
/// tens of seconds on a loaded machine, with the read loop waiting).
fn listening_inodes(table: impl BufRead, port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for line in table.lines().skip(1) {
        let Ok(line) = line else {
            break;
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(3).is_some_and(|st| *st != "0A") {
            break;
        }
        let port_of = |local: &str| u16::from_str_radix(local.rsplit(':').next()?, 16).ok();
        if f.get(1).and_then(|l| port_of(l)) == Some(port)
            && let Some(ino) = f.get(9).and_then(|i| i.parse().ok())
        {
            inodes.push(ino);
        }
    }
    inodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners_from_proc_net_tcp() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 010012C6:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 010012C6:1F40 020012C6:A0B2 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(listening_inodes(t.as_bytes(), 8000), vec![4242]);
        assert!(listening_inodes(t.as_bytes(), 8001).is_empty());
    }

    /// A reader that fails the test if it is read: what comes after the listening sockets.
    struct NotToBeRead;

    impl std::io::Read for NotToBeRead {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            panic!("read past the listening sockets");
        }
    }

    #[test]
    fn stops_reading_at_the_first_socket_not_listening() {
        use std::io::Read as _;
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 010012C6:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n   1: 010012C6:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0\n   2: 010012C6:1F40 020012C6:A0B2 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000\n";
        let table = BufReader::new(t.as_bytes().chain(NotToBeRead));
        assert_eq!(listening_inodes(table, 8000), vec![4242]);
    }
}
