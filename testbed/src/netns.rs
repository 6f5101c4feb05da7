//! Network namespaces for tests: a server and a client namespace joined by a veth pair.
//!
//! Tests only ever send traffic to the addresses below, inside namespaces they created.

use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Once;
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

use crate::wait::poll_until;

/// IPv4 address of the server end of the veth pair (prefix /24).
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// IPv4 address of the client end of the veth pair (prefix /24).
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// IPv6 address of the server end of the veth pair (prefix /64).
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// IPv6 address of the client end of the veth pair (prefix /64).
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// The client hosts' IPv4 network, 198.51.100.0/24 (TEST-NET-2): [`NetnsPair::add_client_hosts`]
/// puts host `i` at 198.51.100.`i`.
pub const CLIENT_HOSTS_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);
/// The client hosts' IPv6 network, 2001:db8:100::/64: host `i` is 2001:db8:100::`i`.
pub const CLIENT_HOSTS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0);

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Prefix of the namespaces this module creates: `outflow-t<pid>-<serial>-<tag>-{s,c}`.
const PREFIX: &str = "outflow-t";
/// How long a new pair may take to become usable.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Moves the calling thread into the named network namespace (`/run/netns/<name>`).
///
/// Only this thread changes namespace; threads it spawns afterwards start in the new one.
pub fn enter(name: &str) -> io::Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let file = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| io::Error::other(format!("setns({}, CLONE_NEWNET): {e}", path.display())))
}

/// Runs `f` on a new thread inside the named network namespace and returns its result.
/// Panics if the namespace cannot be entered or `f` panics.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    try_run_in(name, f).unwrap_or_else(|e| panic!("entering network namespace {name}: {e}"))
}

/// Like [`run_in`], but an error if the namespace cannot be entered.
pub fn try_run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(name)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Makes `command` enter the named network namespace between fork and exec, so that the
/// process (a gateway, say) and everything it starts live there, without the mount namespace
/// that `ip netns exec` adds. With `die_with_parent`, the process also gets SIGKILL when the
/// thread that spawns it exits (`PR_SET_PDEATHSIG`): a test killed halfway leaves no daemon.
pub fn command_in(command: &mut Command, name: &str, die_with_parent: bool) -> io::Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let netns = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    let fd = netns.as_raw_fd();
    // SAFETY: the hook makes only an async-signal-safe system call (setns) on a file
    // descriptor that stays open until the command is spawned: `netns` moves into the closure,
    // which the command keeps.
    unsafe {
        command.pre_exec(move || {
            let _keep = &netns;
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if die_with_parent {
        crate::die_with_parent(command);
    }
    Ok(())
}

/// Address of client host `i` (1..=254) in [`CLIENT_HOSTS_V4`].
pub fn client_host_v4(i: u8) -> Ipv4Addr {
    assert!((1..=254).contains(&i), "client host {i} is not in 1..=254");
    let [a, b, c, _] = CLIENT_HOSTS_V4.octets();
    Ipv4Addr::new(a, b, c, i)
}

/// Address of client host `i` (1..=65535) in [`CLIENT_HOSTS_V6`].
pub fn client_host_v6(i: u16) -> Ipv6Addr {
    assert!(i >= 1, "client host 0 is the network's own address");
    let mut segments = CLIENT_HOSTS_V6.segments();
    segments[7] = i;
    Ipv6Addr::from(segments)
}

/// Two network namespaces, server and client, joined by a veth pair:
/// the server end has 198.18.0.1/24 and 2001:db8::1/64, the client end 198.18.0.2/24 and
/// 2001:db8::2/64; `lo` is up in both. Dropping it deletes both namespaces (and so the veth).
#[derive(Debug)]
pub struct NetnsPair {
    server_ns: String,
    client_ns: String,
    server_if: String,
    client_if: String,
}

impl NetnsPair {
    /// Creates the pair and waits until both ends are up and every address is usable; panics
    /// if that fails.
    ///
    /// `tag` (e.g. the test name) goes into the namespace names to tell them apart.
    pub fn new(tag: &str) -> Self {
        Self::try_new(tag).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`NetnsPair::new`], but an error if the pair cannot be made (what was made of it
    /// is deleted).
    pub fn try_new(tag: &str) -> io::Result<Self> {
        let n = Names::next(tag);
        let pair = Self {
            server_ns: n.ns("s"),
            client_ns: n.ns("c"),
            server_if: n.interface("s"),
            client_if: n.interface("c"),
        };
        // From here on an early return drops `pair`, which deletes whatever was created.
        for ns in [&pair.server_ns, &pair.client_ns] {
            ip(&["netns", "add", ns])?;
            // Interfaces created afterwards skip duplicate address detection, so their
            // addresses (link-local included) are never tentative.
            let knob = "/proc/sys/net/ipv6/conf/default/accept_dad";
            try_run_in(ns, || fs::write(knob, "0"))
                .and_then(|written| written)
                .map_err(|e| io::Error::other(format!("writing 0 to {knob} in {ns}: {e}")))?;
        }
        // Each end is created directly in its namespace, so the names never meet in ours.
        ip(&[
            "link",
            "add",
            &pair.server_if,
            "netns",
            &pair.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            &pair.client_if,
            "netns",
            &pair.client_ns,
        ])?;
        for (ns, dev, v4, v6) in [
            (&pair.server_ns, &pair.server_if, SERVER_V4, SERVER_V6),
            (&pair.client_ns, &pair.client_if, CLIENT_V4, CLIENT_V6),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        pair.wait_ready()?;
        Ok(pair)
    }

    /// Name of the server namespace (under `/run/netns`).
    pub fn server_ns(&self) -> &str {
        &self.server_ns
    }

    /// Name of the client namespace (under `/run/netns`).
    pub fn client_ns(&self) -> &str {
        &self.client_ns
    }

    /// Name of the veth end in the server namespace.
    pub fn server_if(&self) -> &str {
        &self.server_if
    }

    /// Name of the veth end in the client namespace.
    pub fn client_if(&self) -> &str {
        &self.client_if
    }

    /// The server's IPv4 address with `port`.
    pub fn server_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(SERVER_V4), port)
    }

    /// The server's IPv6 address with `port`.
    pub fn server_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(SERVER_V6), port)
    }

    /// Adds `v4` IPv4 client hosts (198.51.100.1, .2, ...) and `v6` IPv6 ones (2001:db8:100::1,
    /// ...) to `lo` of the client namespace, and a route to them through the veth in the server
    /// namespace. Returns the addresses, IPv4 first.
    ///
    /// They stand for the many clients behind a gateway: a socket bound to one of them reaches
    /// a gateway listening on the client end (198.18.0.2, same namespace) and the server
    /// directly, across the veth, as a client on its own would. Calling it again adds the
    /// missing ones; the routes are replaced, not duplicated.
    pub fn add_client_hosts(&self, v4: u8, v6: u16) -> Vec<IpAddr> {
        assert!(v4 <= 254, "at most 254 IPv4 client hosts");
        let hosts: Vec<IpAddr> = (1..=v4)
            .map(|i| IpAddr::V4(client_host_v4(i)))
            .chain((1..=v6).map(|i| IpAddr::V6(client_host_v6(i))))
            .collect();
        // One `ip -batch` per namespace: a few hundred addresses in one process.
        let mut batch = String::new();
        for host in &hosts {
            let (prefix, extra) = if host.is_ipv4() {
                (32, "")
            } else {
                (128, " nodad")
            };
            batch.push_str(&format!("addr replace {host}/{prefix} dev lo{extra}\n"));
        }
        ip_batch(&self.client_ns, &batch);
        let mut routes = String::new();
        if v4 > 0 {
            routes.push_str(&format!(
                "route replace {CLIENT_HOSTS_V4}/24 via {CLIENT_V4}\n"
            ));
        }
        if v6 > 0 {
            routes.push_str(&format!(
                "route replace {CLIENT_HOSTS_V6}/64 via {CLIENT_V6}\n"
            ));
        }
        if !routes.is_empty() {
            ip_batch(&self.server_ns, &routes);
        }
        hosts
    }

    /// Waits until both veth ends have carrier and no address is tentative.
    fn wait_ready(&self) -> io::Result<()> {
        for (ns, dev, v4, v6) in [
            (&self.server_ns, &self.server_if, SERVER_V4, SERVER_V6),
            (&self.client_ns, &self.client_if, CLIENT_V4, CLIENT_V6),
        ] {
            let ready = || -> io::Result<bool> {
                let link = ip(&["-n", ns, "-o", "link", "show", "dev", dev])?;
                let addrs = ip(&["-n", ns, "-o", "addr", "show", "dev", dev])?;
                let tentative = ip(&["-n", ns, "-o", "addr", "show", "dev", dev, "tentative"])?;
                Ok(link.contains("LOWER_UP")
                    && addrs.contains(&format!("inet {v4}/24"))
                    && addrs.contains(&format!("inet6 {v6}/64"))
                    && tentative.trim().is_empty())
            };
            poll_ready(ready, || {
                format!("{dev} in {ns} to be up with usable addresses")
            })?;
        }
        Ok(())
    }
}

/// Polls `ready` until it says yes (Ok), fails (its error), or [`READY_TIMEOUT`] passes (an
/// error saying what was waited for: `what`).
fn poll_ready(
    mut ready: impl FnMut() -> io::Result<bool>,
    what: impl FnOnce() -> String,
) -> io::Result<()> {
    let mut failed = None;
    let held = poll_until(READY_TIMEOUT, || {
        ready().unwrap_or_else(|e| {
            failed = Some(e);
            true
        })
    });
    match failed {
        Some(e) => Err(e),
        None if held => Ok(()),
        None => Err(io::Error::other(format!(
            "timed out after {READY_TIMEOUT:?} waiting for {}",
            what()
        ))),
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // No panics here: this may run while a test is already unwinding.
        for ns in [&self.server_ns, &self.client_ns] {
            if Path::new(NETNS_DIR).join(ns).exists()
                && let Err(e) = ip(&["netns", "del", ns])
            {
                eprintln!("deleting network namespace {ns}: {e}");
            }
        }
    }
}

/// A network namespace joined to the caller's by a veth pair, for a process to be cut off from
/// the others by [`NetnsIsland::cut`] (a network partition: every packet in or out of the
/// namespace dropped, no reset, no close) and joined again by [`NetnsIsland::mend`].
///
/// The caller's end has `198.19.<a>.<b+1>/30`, the namespace's `198.19.<a>.<b+2>/30`, with `a`
/// and `b` from the pid and a serial, so that runs side by side pick different addresses (the
/// caller's end is an address of the caller's namespace, the root one in tests). `lo` is up in
/// the namespace. Dropping it deletes the namespace and so the veth pair.
#[derive(Debug)]
pub struct NetnsIsland {
    ns: String,
    outer_if: String,
    inner_if: String,
    outer: Ipv4Addr,
    inner: Ipv4Addr,
}

/// The nftables table [`NetnsIsland::cut`] adds inside the namespace.
const CUT_TABLE: &str = "outflow_cut";

impl NetnsIsland {
    /// Creates the namespace and its link and waits until both ends are up; panics if that
    /// fails.
    pub fn new(tag: &str) -> Self {
        Self::try_new(tag).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`NetnsIsland::new`], but an error if it cannot be made (what was made of it is
    /// deleted).
    pub fn try_new(tag: &str) -> io::Result<Self> {
        let n = Names::next(tag);
        // 64 blocks of 4 addresses in each of 256 /24s: 16384 places, by pid and serial.
        let slot = (n.pid.wrapping_mul(64) ^ n.serial) & 0x3fff;
        let (a, b) = ((slot >> 6) as u8, ((slot & 63) * 4) as u8);
        let island = Self {
            ns: n.ns("i"),
            outer_if: n.interface("o"),
            inner_if: n.interface("i"),
            outer: Ipv4Addr::new(198, 19, a, b + 1),
            inner: Ipv4Addr::new(198, 19, a, b + 2),
        };
        // From here on an early return drops `island`, which deletes the namespace.
        ip(&["netns", "add", &island.ns])?;
        ip(&[
            "link",
            "add",
            &island.outer_if,
            "type",
            "veth",
            "peer",
            "name",
            &island.inner_if,
            "netns",
            &island.ns,
        ])?;
        island.configure()?;
        Ok(island)
    }

    fn configure(&self) -> io::Result<()> {
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.outer),
            "dev",
            &self.outer_if,
        ])?;
        ip(&["link", "set", &self.outer_if, "up"])?;
        ip(&["-n", &self.ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("{}/30", self.inner),
            "dev",
            &self.inner_if,
        ])?;
        ip(&["-n", &self.ns, "link", "set", &self.inner_if, "up"])?;
        let up = |ns: Option<&str>, dev: &str| -> io::Result<bool> {
            let mut args = Vec::new();
            if let Some(ns) = ns {
                args.extend(["-n", ns]);
            }
            args.extend(["-o", "link", "show", "dev", dev]);
            Ok(ip(&args)?.contains("LOWER_UP"))
        };
        poll_ready(
            || Ok(up(None, &self.outer_if)? && up(Some(&self.ns), &self.inner_if)?),
            || {
                format!(
                    "{} and {} in {} to be up",
                    self.outer_if, self.inner_if, self.ns
                )
            },
        )
    }

    /// Name of the namespace (under `/run/netns`).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The caller's end's address: what a process in the namespace reaches the caller's
    /// namespace at (and what processes of the caller's namespace bind to be reached).
    pub fn outer(&self) -> Ipv4Addr {
        self.outer
    }

    /// The namespace's end's address.
    pub fn inner(&self) -> Ipv4Addr {
        self.inner
    }

    /// Cuts the namespace off: every packet in or out of it but on `lo` is dropped
    /// (nftables inside it). Panics if `nft` fails.
    pub fn cut(&self) {
        let rules = format!(
            "table inet {CUT_TABLE} {{\n\
             chain input {{ type filter hook input priority 0; policy drop; iif \"lo\" accept; }}\n\
             chain output {{ type filter hook output priority 0; policy drop; oif \"lo\" accept; }}\n\
             }}\n"
        );
        self.nft(&["-f", "-"], Some(&rules));
    }

    /// Joins it again: the rules [`NetnsIsland::cut`] added are deleted.
    pub fn mend(&self) {
        self.nft(&["delete", "table", "inet", CUT_TABLE], None);
    }

    fn nft(&self, args: &[&str], input: Option<&str>) {
        use std::io::Write as _;
        let mut command = Command::new("nft");
        command
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command_in(&mut command, &self.ns, false)
            .unwrap_or_else(|e| panic!("entering {} for nft: {e}", self.ns));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("running nft (Debian nftables; cargo xtask setup): {e}"));
        let mut stdin = child.stdin.take().expect("stdin of nft is piped");
        let written = stdin.write_all(input.unwrap_or("").as_bytes());
        drop(stdin);
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for nft: {e}"));
        if let Err(e) = written {
            panic!("writing to nft in {}: {e}", self.ns);
        }
        assert!(
            output.status.success(),
            "`nft {}` in {} failed ({}): {}",
            args.join(" "),
            self.ns,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
}

impl Drop for NetnsIsland {
    fn drop(&mut self) {
        // No panics here: this may run while a test is already unwinding.
        if Path::new(NETNS_DIR).join(&self.ns).exists()
            && let Err(e) = ip(&["netns", "del", &self.ns])
        {
            eprintln!("deleting network namespace {}: {e}", self.ns);
        }
        // The pair goes with the namespace; if its outer end is still here, delete it.
        let _ = ip(&["link", "del", &self.outer_if]);
    }
}

/// The names of one pair's or island's namespaces and interfaces: this process's pid and a
/// serial, so that runs side by side and stale ones swept at the first call never meet.
struct Names {
    pid: u32,
    serial: u32,
    tag: String,
}

impl Names {
    fn next(tag: &str) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale);
        Self {
            pid: std::process::id(),
            serial: crate::next_serial(),
            tag: crate::sanitize_tag(tag, 40),
        }
    }

    /// A namespace's name, ending in `-{end}`.
    fn ns(&self, end: &str) -> String {
        format!("{PREFIX}{}-{}-{}-{end}", self.pid, self.serial, self.tag)
    }

    /// An interface's name, ending in `end`. Interface names are at most 15 bytes: "of" + pid
    /// (<= 6 hex digits) + "-" + serial (4 hex digits) + one letter is at most 14.
    fn interface(&self, end: &str) -> String {
        format!("of{:x}-{:04x}{end}", self.pid, self.serial & 0xffff)
    }
}

/// Runs `ip ARGS`, returning its stdout or an error with its stderr.
fn ip(args: &[&str]) -> io::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running ip: {e}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Runs the `ip` commands in `batch` (one a line) inside namespace `ns`; panics if one fails.
fn ip_batch(ns: &str, batch: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running ip -batch: {e}"));
    let write = child
        .stdin
        .take()
        .expect("stdin of ip is piped")
        .write_all(batch.as_bytes());
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for ip -batch: {e}"));
    if let Err(e) = write {
        panic!("writing to ip -batch in {ns}: {e}");
    }
    if !output.status.success() {
        panic!(
            "`ip -n {ns} -batch -` failed ({}): {}\ncommands:\n{batch}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
}

/// Deletes namespaces left behind by test processes that no longer exist (killed runs).
fn sweep_stale() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::process_exists(pid)
            && let Err(e) = ip(&["netns", "del", name])
        {
            eprintln!("deleting stale network namespace {name}: {e}");
        }
    }
}
