//! Faults of the collector's own machine: its data directory full. Batches it cannot commit are
//! refused with UNAVAILABLE and not applied; when space returns it commits again (without a
//! restart), the refused batch sent again is applied once, and the totals are exact.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use outflow_proto::v1;
use tonic::Code;

use crate::common::*;

/// A tmpfs of `size` mounted on a new directory, unmounted on drop. Needs root, as the whole
/// suite does (`cargo xtask test` runs it as root): without it the test fails, it never skips.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("running mount: {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed (the fault tests run as root: cargo xtask test): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `path` with a file there; returns it.
fn fill(dir: &Path) -> PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", p.display()),
        }
    }
    // What is left in the last, partial block.
    while f.write_all(&[0]).is_ok() {}
    p
}

/// A batch of `n` server deltas from distinct clients (numbered from `first`), `bytes` each.
fn wide(seq: u64, t: u64, first: u32, n: u32, bytes: u64) -> v1::Batch {
    let deltas = (first..first + n)
        .map(|i| delta((0x0b00_0000 + i * 7).to_be_bytes(), bytes, 1, false))
        .collect();
    batch(seq, t, deltas)
}

async fn host_total(u: &str) -> u64 {
    let top = top(u, v1::GroupBy::Host, v1::Window::Window24h, 10).await;
    top.talkers.iter().map(|t| t.response_bytes).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_refuses_batches_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("data"), "6m");
    let mut cfg = config(&fs.0);
    cfg.detect.enabled = false;
    cfg.store.cache_bytes = 1 << 20;
    let server = start(cfg.clone()).await;
    let u = url(&server);
    let t = now_ms() - 60_000;

    let mut a = agent_stream(&u).await;
    a.hello(hello("agent-f", 1, "gpu-f")).await.unwrap();
    a.batch(wide(1, t, 0, 100, 10)).await.unwrap();
    let mut acked = 100 * 10;
    let filler = fill(&fs.0);

    // New keys need new pages: with the disk full, a commit fails.
    let mut refused = None;
    for seq in 2..=400u64 {
        let b = wide(seq, t + seq, (seq as u32) * 1000, 1000, 3);
        match a.batch(b.clone()).await {
            Ok(s) => {
                assert_eq!(s, seq);
                acked += 1000 * 3;
            }
            Err(e) => {
                let e = status(e);
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(e.message().contains("store"), "{e:?}");
                eprintln!("batch {seq} refused: {e:?}");
                refused = Some(b);
                break;
            }
        }
    }
    let refused = refused.expect("the full disk never refused a batch");
    // Nothing of it was applied; the collector goes on answering.
    assert_eq!(host_total(&u).await, acked);
    let text = metrics(&server).await;
    assert!(
        metric(&text, "outflow_collector_store_failures_total ") >= 1.0,
        "{text}"
    );

    // Space returns: the same batch, sent again, is applied once.
    std::fs::remove_file(&filler).unwrap();
    let mut a = agent_stream(&u).await;
    let applied = a
        .hello(hello("agent-f", 1, "gpu-f"))
        .await
        .unwrap()
        .applied_seq;
    assert_eq!(applied, refused.seq - 1);
    let seq = refused.seq;
    assert_eq!(a.batch(refused.clone()).await.unwrap(), seq);
    acked += 1000 * 3;
    assert_eq!(
        a.batch(refused).await.unwrap(),
        seq,
        "a duplicate is acknowledged"
    );
    assert_eq!(host_total(&u).await, acked);

    // And all of it is on disk.
    server.shutdown().await.unwrap();
    let server = start(cfg).await;
    assert_eq!(host_total(&url(&server)).await, acked);
    server.shutdown().await.unwrap();
}

/// The `applied_seq` of a Welcome.
fn welcome(m: &v1::CollectorMessage) -> u64 {
    match &m.msg {
        Some(v1::collector_message::Msg::Welcome(w)) => w.applied_seq,
        other => panic!("want a Welcome, got {other:?}"),
    }
}

/// A batch whose commit failed is not overtaken by the batches its stream sent after it: they
/// are refused too, even once the store commits again, until the agent says Hello again and
/// sends from the watermark it is given. Applied, they would have raised the watermark above
/// the failed batch, which would then have been taken for a duplicate when sent again: lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_after_one_whose_commit_failed_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.detect.enabled = false;
    let server = start(cfg).await;
    let u = url(&server);
    let t = now_ms() - 60_000;
    let c = server.collector();
    let mut a = c.session();
    let mut b = c.session();
    a.handle(hello_msg("agent-a", 1, "gpu-a")).await.unwrap();
    b.handle(hello_msg("agent-b", 1, "gpu-b")).await.unwrap();
    a.handle(batch_msg(wide(1, t, 0, 10, 5))).await.unwrap();
    b.handle(batch_msg(wide(1, t, 500, 10, 13))).await.unwrap();

    // The next commit of this collector's store fails (only of its store: the argument names
    // its directory, and the other tests of this process go on).
    let armed = Armed::new("store::append_fails", dir.path()).await;
    let e = a.handle(batch_msg(wide(2, t + 1, 100, 10, 7))).await;
    drop(armed);
    let e = e.expect_err("the commit was to fail");
    assert!(e.to_string().contains("failed on purpose"), "{e}");

    // The store commits again: agent-b, whose batch was not in the failed commit, goes on;
    // agent-a's stream is refused with the failure it had.
    b.handle(batch_msg(wide(2, t + 1, 600, 10, 17)))
        .await
        .unwrap();
    let e = a
        .handle(batch_msg(wide(3, t + 2, 200, 10, 11)))
        .await
        .expect_err("a batch after the failed one was applied before it");
    assert!(e.to_string().contains("failed on purpose"), "{e}");
    assert_eq!(host_total(&u).await, 10 * (5 + 13 + 17));

    // agent-a's next stream is asked for batch 2 again, and applies 2 and 3 once each.
    let mut a = c.session();
    let w = a.handle(hello_msg("agent-a", 1, "gpu-a")).await.unwrap();
    assert_eq!(welcome(&w), 1);
    a.handle(batch_msg(wide(2, t + 1, 100, 10, 7)))
        .await
        .unwrap();
    a.handle(batch_msg(wide(3, t + 2, 200, 10, 11)))
        .await
        .unwrap();
    assert_eq!(host_total(&u).await, 10 * (5 + 7 + 11 + 13 + 17));
    server.shutdown().await.unwrap();
}
