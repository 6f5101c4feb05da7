//! Real gateways between many clients and the server: nginx as an L7 proxy with a pool of
//! keep-alive upstream connections, HAProxy in TCP mode sending a PROXY header, and HAProxy in
//! HTTP mode reusing server connections across clients. Debian's own packages, run in the
//! foreground in the client namespace of a [`NetnsPair`], with a configuration the test writes
//! into a directory of its own (pid file, logs and temporary files included: nothing in /var).
//!
//! The gateway's upstream connections leave from the client end of the veth, 198.18.0.2 (or
//! 2001:db8::2): the address a test declares a trusted peer. The clients are the hosts of
//! [`NetnsPair::add_client_hosts`], in the same namespace.

use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use crate::http::ProxyVersion;
use crate::netns::{self, CLIENT_V4, CLIENT_V6, NetnsPair};
use crate::process::{CapturedText, ChildProcess};
use crate::wait::poll_until;

/// Port the gateways listen on, at 198.18.0.2 and \[2001:db8::2\] by default.
pub const GATEWAY_PORT: u16 = 8080;
/// How long a gateway may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Prefix of the work directories under the temporary directory:
/// `outflow-gw-<pid>-<serial>-<tag>`.
const DIR_PREFIX: &str = "outflow-gw-";

/// The default listen addresses: the client end of the veth, IPv4 and IPv6, at [`GATEWAY_PORT`].
fn default_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::new(CLIENT_V4.into(), GATEWAY_PORT),
        SocketAddr::new(CLIENT_V6.into(), GATEWAY_PORT),
    ]
}

/// How nginx sets `X-Forwarded-For` on the requests it passes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardedFor {
    /// `$proxy_add_x_forwarded_for`: the client's own header, if any, then its address.
    Append,
    /// `$remote_addr`: the client's address only.
    Replace,
}

/// nginx as an L7 gateway: one upstream with a keep-alive pool, so that requests of many
/// clients share upstream connections one after another; responses streamed unbuffered;
/// `X-Forwarded-For` set; every other client header (`x-client-id`) passed through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxConfig {
    /// Where it listens.
    pub listen: Vec<SocketAddr>,
    /// The server.
    pub upstream: SocketAddr,
    /// Idle upstream connections kept (`keepalive N`).
    pub keepalive: u32,
    /// How it sets `X-Forwarded-For`.
    pub forwarded_for: ForwardedFor,
}

impl NginxConfig {
    /// Listening on 198.18.0.2 and \[2001:db8::2\] at [`GATEWAY_PORT`], `keepalive 4`,
    /// appending to `X-Forwarded-For`.
    pub fn l7(upstream: SocketAddr) -> Self {
        Self {
            listen: default_listen(),
            upstream,
            keepalive: 4,
            forwarded_for: ForwardedFor::Append,
        }
    }

    /// The configuration file, with every path inside `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let dir = dir.display();
        let listen: String = self
            .listen
            .iter()
            .map(|addr| format!("        listen {addr};\n"))
            .collect();
        let xff = match self.forwarded_for {
            ForwardedFor::Append => "$proxy_add_x_forwarded_for",
            ForwardedFor::Replace => "$remote_addr",
        };
        format!(
            r#"# written by outflow-tests: nginx as an L7 gateway with a keep-alive upstream pool
daemon off;
# One process: one upstream pool, and nothing left behind if it is killed.
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{
    worker_connections 4096;
}}
http {{
    log_format gateway '$remote_addr:$remote_port "$request" $status $body_bytes_sent '
                       'upstream=$upstream_addr upstream_status=$upstream_status';
    access_log {dir}/access.log gateway;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    upstream inference {{
        server {upstream};
        keepalive {keepalive};
        keepalive_requests 100000;
        keepalive_timeout 75s;
    }}
    server {{
{listen}        location / {{
            proxy_pass http://inference;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For {xff};
            proxy_buffering off;
        }}
    }}
}}
"#,
            upstream = self.upstream,
            keepalive = self.keepalive,
        )
    }
}

/// What HAProxy does with the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaproxyMode {
    /// `mode tcp`: one server connection per client connection, starting with a PROXY header
    /// (`send-proxy` or `send-proxy-v2`).
    Tcp(ProxyVersion),
    /// `mode http` with `http-reuse always` (idle server connections serve any client's next
    /// request) and `option forwardfor`; other client headers (`x-client-id`) pass through.
    HttpReuse,
}

/// An HAProxy gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyConfig {
    /// Where it listens.
    pub listen: Vec<SocketAddr>,
    /// The server.
    pub upstream: SocketAddr,
    /// TCP with PROXY headers, or HTTP with connection reuse.
    pub mode: HaproxyMode,
}

impl HaproxyConfig {
    /// TCP mode with a PROXY header of `version` on each server connection.
    pub fn tcp(upstream: SocketAddr, version: ProxyVersion) -> Self {
        Self {
            listen: default_listen(),
            upstream,
            mode: HaproxyMode::Tcp(version),
        }
    }

    /// HTTP mode with `http-reuse always` and `option forwardfor`.
    pub fn http_reuse(upstream: SocketAddr) -> Self {
        Self {
            listen: default_listen(),
            upstream,
            mode: HaproxyMode::HttpReuse,
        }
    }

    /// The configuration file, with every path inside `dir`.
    pub fn render(&self, dir: &Path) -> String {
        let dir = dir.display();
        let bind: String = self
            .listen
            .iter()
            .map(|addr| format!("    bind {addr}\n"))
            .collect();
        let (mode, frontend, backend, server) = match self.mode {
            HaproxyMode::Tcp(ProxyVersion::V1) => ("tcp", "    option tcplog\n", "", " send-proxy"),
            HaproxyMode::Tcp(ProxyVersion::V2) => {
                ("tcp", "    option tcplog\n", "", " send-proxy-v2")
            }
            HaproxyMode::HttpReuse => (
                "http",
                "    option httplog\n    option forwardfor\n",
                "    http-reuse always\n",
                "",
            ),
        };
        format!(
            "# written by outflow-tests: HAProxy as a gateway in {mode} mode
global
    # One thread: one pool of idle server connections.
    nbthread 1
    # Within the default limit of open files (2 per connection, plus some).
    maxconn 4000
    pidfile {dir}/haproxy.pid
    log stderr format raw local0 info
defaults
    log global
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
frontend gateway
    mode {mode}
{frontend}{bind}    default_backend inference
backend inference
    mode {mode}
{backend}    server inference {upstream}{server}
",
            upstream = self.upstream,
        )
    }
}

/// nginx running with an [`NginxConfig`]; killed when dropped.
pub struct Nginx {
    gateway: Gateway,
}

impl Nginx {
    /// Starts nginx in the client namespace of `pair` and waits until it listens. `tag` (e.g.
    /// the test name) goes into the name of its work directory.
    pub fn start(pair: &NetnsPair, tag: &str, config: &NginxConfig) -> Self {
        let dir = WorkDir::new(&format!("nginx-{tag}"));
        let conf = dir.path().join("nginx.conf");
        write_file(&conf, &config.render(dir.path()));
        let error_log = dir.path().join("error.log");
        let mut command = Command::new(program("nginx"));
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            // Errors before the configuration is read go here too, not to /var/log/nginx.
            .arg("-e")
            .arg(&error_log);
        let gateway = Gateway::start("nginx", pair, command, dir, Some(error_log), &config.listen);
        Self { gateway }
    }

    /// Where it listens.
    pub fn listen(&self) -> &[SocketAddr] {
        &self.gateway.listen
    }

    /// Its IPv4 listen address.
    pub fn addr_v4(&self) -> SocketAddr {
        self.gateway.addr(true)
    }

    /// Its IPv6 listen address.
    pub fn addr_v6(&self) -> SocketAddr {
        self.gateway.addr(false)
    }

    /// The last `lines` lines of its error log and stderr, for messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.gateway.log_tail(lines)
    }

    /// Its access log so far (`client "request" status bytes upstream=...`).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.gateway.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Panics, with its log, if it is no longer running.
    pub fn assert_running(&self) {
        self.gateway.assert_running();
    }
}

/// HAProxy running with an [`HaproxyConfig`]; killed when dropped.
pub struct Haproxy {
    gateway: Gateway,
}

impl Haproxy {
    /// Starts HAProxy in the client namespace of `pair` and waits until it listens. `tag`
    /// (e.g. the test name) goes into the name of its work directory.
    pub fn start(pair: &NetnsPair, tag: &str, config: &HaproxyConfig) -> Self {
        let dir = WorkDir::new(&format!("haproxy-{tag}"));
        let cfg = dir.path().join("haproxy.cfg");
        write_file(&cfg, &config.render(dir.path()));
        let mut command = Command::new(program("haproxy"));
        // -db: foreground, not a daemon, logs (`log stderr`) on stderr.
        command.arg("-db").arg("-f").arg(&cfg);
        let gateway = Gateway::start("haproxy", pair, command, dir, None, &config.listen);
        Self { gateway }
    }

    /// Where it listens.
    pub fn listen(&self) -> &[SocketAddr] {
        &self.gateway.listen
    }

    /// Its IPv4 listen address.
    pub fn addr_v4(&self) -> SocketAddr {
        self.gateway.addr(true)
    }

    /// Its IPv6 listen address.
    pub fn addr_v6(&self) -> SocketAddr {
        self.gateway.addr(false)
    }

    /// The last `lines` lines of its log (stderr), for messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.gateway.log_tail(lines)
    }

    /// Panics, with its log, if it is no longer running.
    pub fn assert_running(&self) {
        self.gateway.assert_running();
    }
}

/// A gateway process in a namespace, with its work directory.
struct Gateway {
    name: &'static str,
    // Dropped first: the process dies before its directory goes.
    process: ChildProcess,
    stderr: CapturedText,
    error_log: Option<PathBuf>,
    listen: Vec<SocketAddr>,
    dir: WorkDir,
}

impl Gateway {
    fn start(
        name: &'static str,
        pair: &NetnsPair,
        mut command: Command,
        dir: WorkDir,
        error_log: Option<PathBuf>,
        listen: &[SocketAddr],
    ) -> Self {
        command
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        netns::command_in(&mut command, pair.client_ns(), true)
            .unwrap_or_else(|e| panic!("placing {name} in {}: {e}", pair.client_ns()));
        let process = ChildProcess::spawn(name, &mut command);
        let stderr = CapturedText::capture(
            name,
            process
                .take_stderr()
                .expect("stderr of the gateway is piped"),
        );
        let mut gateway = Self {
            name,
            process,
            stderr,
            error_log,
            listen: listen.to_vec(),
            dir,
        };
        let mut exited = None;
        let listening = poll_until(READY_TIMEOUT, || {
            if let Some(status) = gateway.process.try_status() {
                exited = Some(status);
                return true;
            }
            listening_on(gateway.process.pid(), &gateway.listen)
        });
        let failure = match exited {
            Some(status) => {
                gateway.stderr.wait_closed(Duration::from_secs(5));
                format!("exited ({status}) before it listened")
            }
            None if !listening => format!("did not listen within {READY_TIMEOUT:?}"),
            None => return gateway,
        };
        let log = gateway.log_tail(40);
        // The message has the log: dropping the gateway need not print it again.
        gateway.error_log = None;
        panic!("{name} {failure} on {:?}; its log:\n{log}", gateway.listen);
    }

    fn addr(&self, v4: bool) -> SocketAddr {
        *self
            .listen
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .unwrap_or_else(|| {
                panic!(
                    "{} listens on no IPv{} address: {:?}",
                    self.name,
                    if v4 { 4 } else { 6 },
                    self.listen
                )
            })
    }

    fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Some(path) = &self.error_log {
            let log = fs::read_to_string(path)
                .unwrap_or_else(|e| format!("<reading {}: {e}>", path.display()));
            let all: Vec<&str> = log.lines().collect();
            text.push_str(&format!("--- {}:\n", path.display()));
            text.push_str(&all[all.len().saturating_sub(lines)..].join("\n"));
            text.push('\n');
        }
        text.push_str("--- stderr:\n");
        text.push_str(&self.stderr.tail(lines));
        text
    }

    fn assert_running(&self) {
        if let Some(status) = self.process.try_status() {
            panic!(
                "{} has exited ({status}); its log:\n{}",
                self.name,
                self.log_tail(40)
            );
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A test failing while the gateway runs shows its error log (stderr is already echoed
        // as it comes); the test harness prints this only for failing tests.
        if std::thread::panicking()
            && let Some(path) = &self.error_log
        {
            let log = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "[{}] error log at the failure ({}):\n{}",
                self.name,
                path.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// Whether the process `pid` has a listening TCP socket at each of `addrs`, per the socket
/// tables of its network namespace (`/proc/<pid>/net/tcp{,6}`). No connection is made: a
/// gateway in TCP mode would open a server connection for it.
fn listening_on(pid: u32, addrs: &[SocketAddr]) -> bool {
    let mut listening = Vec::new();
    for (file, v4) in [("tcp", true), ("tcp6", false)] {
        let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            return false;
        };
        listening.extend(table.lines().skip(1).filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            // State 0A is TCP_LISTEN.
            (fields.nth(1)? == "0A").then(|| parse_proc_addr(local, v4))?
        }));
    }
    addrs.iter().all(|addr| listening.contains(addr))
}

/// `0200120C:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6): the address as the kernel stores it,
/// printed one native-endian 32-bit word at a time, and the port in host order.
fn parse_proc_addr(field: &str, v4: bool) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in 0..addr.len() / 8 {
        let word = u32::from_str_radix(addr.get(word * 8..word * 8 + 8)?, 16).ok()?;
        bytes.extend(word.to_ne_bytes());
    }
    let ip = if v4 {
        IpAddr::from(<[u8; 4]>::try_from(bytes.as_slice()).ok()?)
    } else {
        IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?)
    };
    Some(SocketAddr::new(ip, port))
}

/// The path of `name` (`nginx`, `haproxy`): on PATH, else in /usr/sbin, where Debian puts it.
fn program(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name));
    on_path
        .chain(["/usr/sbin", "/usr/local/sbin"].map(|d| Path::new(d).join(name)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: `cargo xtask setup` installs it (Debian package {name})"
            )
        })
}

fn write_file(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A directory of its own for one gateway, unique to this process and test; removed when
/// dropped. Ones left by killed runs are removed by the next.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn new(tag: &str) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_stale_dirs);
        let path = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}-{}",
            std::process::id(),
            crate::next_serial(),
            crate::sanitize_tag(tag, 40)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // No panics here: this may run while a test is already unwinding.
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("removing {}: {e}", self.path.display());
        }
    }
}

/// Removes work directories of test processes that no longer exist (killed runs).
fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::process_exists(pid)
            && let Err(e) = fs::remove_dir_all(entry.path())
        {
            eprintln!("removing stale {}: {e}", entry.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_tcp_addresses() {
        // 198.18.0.2:8080 as x86 prints it; the test is about byte order, so build the field
        // from the native representation.
        let v4 = u32::from_ne_bytes([198, 18, 0, 2]);
        let field = format!("{v4:08X}:1F90");
        assert_eq!(
            parse_proc_addr(&field, true),
            Some("198.18.0.2:8080".parse().expect("addr"))
        );
        let ip: std::net::Ipv6Addr = "2001:db8::2".parse().expect("ip");
        let words: String = ip
            .octets()
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes(w.try_into().expect("4 bytes"))))
            .collect();
        assert_eq!(
            parse_proc_addr(&format!("{words}:1F90"), false),
            Some("[2001:db8::2]:8080".parse().expect("addr"))
        );
    }

    #[test]
    fn configurations_keep_every_path_in_their_directory() {
        let dir = Path::new("/tmp/outflow-gw-x");
        let upstream: SocketAddr = "198.18.0.1:8000".parse().expect("addr");
        let nginx = NginxConfig::l7(upstream).render(dir);
        assert!(nginx.contains("keepalive 4;"), "{nginx}");
        assert!(nginx.contains("listen [2001:db8::2]:8080;"), "{nginx}");
        for line in nginx
            .lines()
            .filter(|l| l.contains('/') && l.contains("path"))
        {
            assert!(line.contains("/tmp/outflow-gw-x/"), "{line}");
        }
        let tcp = HaproxyConfig::tcp(upstream, ProxyVersion::V2).render(dir);
        assert!(
            tcp.contains("server inference 198.18.0.1:8000 send-proxy-v2"),
            "{tcp}"
        );
        let http = HaproxyConfig::http_reuse(upstream).render(dir);
        assert!(http.contains("http-reuse always") && http.contains("option forwardfor"));
    }
}
