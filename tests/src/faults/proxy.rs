//! A TCP proxy on 127.0.0.1 that delays or stalls what it forwards: the network faults
//! nftables cannot make (this kernel has no `sch_netem`).
//!
//! Each direction of each connection is a delay line: a reader thread stamps every chunk with
//! the time it arrived, a writer thread sends it on once the delay in force has passed since.
//! A stall stops both (TCP's flow control then stops the sender): a half-open connection as
//! a dead middlebox leaves it.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// What the proxy does to the bytes it forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyFault {
    /// Forwards at once.
    Pass,
    /// Forwards each chunk this long after it arrived, in each direction.
    Delay(Duration),
    /// Forwards nothing and reads nothing; connections stay open.
    Stall,
}

/// A proxy from a free port on 127.0.0.1 to `upstream`. Stops, closing its connections,
/// when dropped.
pub struct FaultProxy {
    listen: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    fault: Mutex<ProxyFault>,
    changed: Condvar,
    stop: AtomicBool,
    /// Both sockets of every connection, to close them when the proxy stops.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn fault(&self) -> ProxyFault {
        *self.fault.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits while stalled; false once the proxy stops.
    fn wait_unstalled(&self) -> bool {
        let mut f = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        while *f == ProxyFault::Stall && !self.stop.load(Ordering::Relaxed) {
            f = self
                .changed
                .wait_timeout(f, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

impl FaultProxy {
    /// Starts forwarding connections to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, crate::collector::free_port()))
            .unwrap_or_else(|e| panic!("bind the fault proxy: {e}"));
        let listen = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            fault: Mutex::new(ProxyFault::Pass),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(&listener, upstream, &s))
            .expect("spawn the fault proxy");
        Self { listen, shared }
    }

    /// Where to connect: `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The port it listens on (for [`super::nft::Nft`]).
    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    /// Replaces the fault in force (for connections open now and later).
    pub fn set(&self, fault: ProxyFault) {
        *self
            .shared
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = fault;
        self.shared.changed.notify_all();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        for s in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.listen);
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = client else { continue };
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
            // The upstream is down: the client sees its connection close, as it would.
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut sockets = shared
                .sockets
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Forget closed ones now and then (their clones fail to shut down quietly).
            if sockets.len() > 1_000 {
                sockets.clear();
            }
            for s in [&client, &server] {
                if let Ok(c) = s.try_clone() {
                    sockets.push(c);
                }
            }
        }
        for (from, to) in [(&client, &server), (&server, &client)] {
            if let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) {
                delay_line(from, to, Arc::clone(shared));
            }
        }
    }
}

/// Forwards `from` to `to` through the fault in force, with two threads.
fn delay_line(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader_shared = Arc::clone(&shared);
    let reader_to = to.try_clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if !reader_shared.wait_unstalled() {
                break;
            }
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        drop(tx);
        drop(reader_to);
    });
    thread::spawn(move || {
        for (at, chunk) in rx {
            if let ProxyFault::Delay(d) = shared.fault() {
                let due = at + d;
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
            }
            if !shared.wait_unstalled() || to.write_all(&chunk).is_err() {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        // The other side closed its sending half: pass the close on.
        let _ = to.shutdown(Shutdown::Write);
    });
}
