//! A webhook receiver for the cluster demo: answers every request `200 OK` and records the
//! alert change its JSON body carries (the alert's id, state and last batch time), counting
//! how many times each came.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};

/// An alert change: (id, state as the webhook names it, `last_seen_ms`).
pub type Change = (String, String, u64);

/// Largest request taken (the collector's alert bodies are a few KiB).
const MAX_BODY: usize = 1 << 20;

/// The receiver's thread and what it recorded.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    changes: Arc<Mutex<BTreeMap<Change, u32>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on a loopback port, one request per connection.
    pub fn start() -> Result<Receiver> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("webhook receiver")?;
        let addr = listener.local_addr()?;
        let changes = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (changes, stop) = (changes.clone(), stop.clone());
            move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    if let Some(change) = answer(conn) {
                        *changes
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .entry(change)
                            .or_insert(0) += 1;
                    }
                }
            }
        });
        Ok(Receiver {
            addr,
            changes,
            stop,
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/alerts", self.addr)
    }

    /// Every change received, and how many times.
    pub fn changes(&self) -> BTreeMap<Change, u32> {
        self.changes
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

/// Reads one request, answers 200 and closes; the change its body carries, if it is one.
fn answer(conn: TcpStream) -> Option<Change> {
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
    let mut conn = conn;
    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some((
        v["id"].as_str()?.to_owned(),
        v["state"].as_str()?.to_owned(),
        v["last_seen_ms"].as_u64()?,
    ))
}
