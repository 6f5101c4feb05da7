//! A webhook receiver on loopback for tests and the demos: answers each request (one per
//! connection) `200 OK`, or `500` to the first with [`Receiver::failing_first`], and keeps the
//! body of every request it accepted, in order.
use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// Largest body taken (an alert's JSON is a few KiB).
const MAX_BODY: usize = 1 << 20;

/// The receiver's thread and the bodies it accepted.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// A receiver that accepts every request; panics if it cannot listen.
    pub fn start() -> Receiver {
        Self::try_start(false).unwrap_or_else(|e| panic!("webhook receiver: {e}"))
    }

    /// A receiver that answers the first request 500 (its body is not kept), then accepts.
    pub fn failing_first() -> Receiver {
        Self::try_start(true).unwrap_or_else(|e| panic!("webhook receiver: {e}"))
    }

    /// Listens on a loopback port (the first request refused with `fail_first`).
    pub fn try_start(fail_first: bool) -> io::Result<Receiver> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (bodies, stop) = (bodies.clone(), stop.clone());
            move || {
                let mut fail = fail_first;
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let accept = !std::mem::take(&mut fail);
                    if let Some(body) = answer(conn, accept) {
                        bodies
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(body);
                    }
                }
            }
        });
        Ok(Receiver {
            addr,
            bodies,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>/alerts`.
    pub fn url(&self) -> String {
        format!("http://{}/alerts", self.addr)
    }

    /// The bodies accepted so far, in order.
    pub fn bodies(&self) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request and answers it, 200 if `accept` (then returns its body) or 500, and
/// closes.
fn answer(conn: TcpStream, accept: bool) -> Option<String> {
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        // hyper writes header names in lower case.
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            len = value.trim().parse().ok()?;
        }
    }
    if len > MAX_BODY {
        return None;
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    let status = if accept { "200 OK" } else { "500 Refused" };
    let mut conn = conn;
    conn.write_all(
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    accept.then(|| String::from_utf8_lossy(&body).into_owned())
}
