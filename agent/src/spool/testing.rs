//! What the spool's tests share: batches, plans, a spool in a temporary directory.
use std::{fs, path::PathBuf};

use agent_common::Counters;
use outflow_proto::v1;

use super::{Appended, Spool, SpoolError, batch_file::read_batch_file};
use crate::table::{CommitPlan, OverflowCommit, SlotCommit};

pub(super) fn batch(bytes_out: u64, end_ms: u64) -> v1::Batch {
    v1::Batch {
        start_ms: end_ms - 1000,
        end_ms,
        deltas: vec![v1::ConnDelta {
            conn_id: bytes_out,
            counters: Some(v1::Counters {
                bytes_out,
                ..Default::default()
            }),
            // Padding so that batch sizes are in the kilobytes.
            cgroup: "x".repeat(1000),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub(super) struct Dirs {
    _tmp: tempfile::TempDir,
    pub(super) spool: PathBuf,
    pub(super) state: PathBuf,
}

pub(super) fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    Dirs {
        spool: tmp.path().join("spool"),
        state: tmp.path().join("state"),
        _tmp: tmp,
    }
}

pub(super) fn open(d: &Dirs, max: u64) -> Spool {
    fs::create_dir_all(&d.state).expect("state dir");
    Spool::open(&d.spool, max, &d.state, false).expect("open")
}

/// Appends an interval and publishes it (as the read loop does once it has committed).
pub(super) fn add(s: &mut Spool, batches: Vec<v1::Batch>) -> Result<Appended, SpoolError> {
    let a = s.append(batches, &CommitPlan::default())?;
    s.publish();
    Ok(a)
}

pub(super) fn spooled(s: &Spool) -> Vec<u64> {
    let mut seq = 0;
    let mut out = Vec::new();
    while let Some((n, path)) = s.next_after(seq) {
        let (epoch, b) = read_batch_file(&path).expect("readable");
        assert_eq!((epoch, b.seq), (s.epoch(), n));
        out.push(n);
        seq = n;
    }
    out
}

pub(super) fn plan(n: u32) -> CommitPlan {
    let c = |v| Counters {
        bytes_out: v,
        segments_out: v / 10,
        ..Counters::default()
    };
    CommitPlan {
        slots: (0..n)
            .map(|i| SlotCommit {
                index: i,
                generation: 7 + i,
                before: c(100 * u64::from(i)),
                snapshot: c(100 * u64::from(i) + 50),
                closed: i % 2 == 1,
            })
            .collect(),
        overflow: Some(OverflowCommit {
            before: c(5),
            after: c(9),
        }),
    }
}
