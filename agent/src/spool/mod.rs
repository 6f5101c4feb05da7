//! The disk spool between the read loop and the collector: every batch is a file, fsync'd
//! before the read loop records its deltas as reported, and removed once the collector has
//! acknowledged it. So nothing counted is lost when the agent, the host or the collector stops,
//! except when the spool is full: then the oldest batches go, and the loss is reported (in the
//! next batch's `lost_batches`/`lost`, a warning, the export record).
//!
//! Layout of `spool_dir` (each file's format in its own module):
//! - `00000000000000000042.batch`: batch 42 (`batch_file`). Written as `<name>.tmp`, fsync'd,
//!   renamed; the directory is fsync'd once per interval, before [`Spool::append`] returns.
//! - `state`: the sequence state (`state_file`): the epoch, the highest acknowledged seq and
//!   the loss not yet reported in a batch. Replaced atomically (temp file, fsync, rename, dir
//!   fsync) on every acknowledgement, before acknowledged batch files are removed.
//! - `commit`: the kernel commit of the newest interval and its seqs (`commit_file`), written
//!   before its batch files are renamed into place. The read loop commits an interval to the
//!   kernel only once it is durable ([`crate::durability`]), and the sender sees its batches
//!   only after that commit ([`Spool::publish`]); an agent killed in between leaves batches
//!   whose deltas the kernel still holds as unreported, and the next agent redoes the commit
//!   from this file (only where the slots are as they were read) rather than reporting those
//!   deltas twice. If the interval's batch files are not all there, it was not durable: its
//!   files are removed and the kernel's deltas are read again.
//! - `lock`: `flock`ed while an agent uses the spool.
//!
//! The epoch lives in `state_dir/epoch` and is valid only together with the sequence state:
//! the next seq is `max(acked, newest batch file) + 1` (acks come in order and drops take the
//! oldest, so the newest batch ever numbered is either still spooled or acknowledged). If
//! `state` is missing or names another epoch, or the agent id is new, the numbering starts over
//! under a new random epoch; batch files of another epoch are then dropped as lost.
//!
//! What opening the spool repairs after a crash, phase by phase, is in `recovery`.
mod batch_file;
mod commit_file;
mod recovery;
mod state_file;
#[cfg(test)]
mod testing;

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use log::warn;
use outflow_proto::v1;
use prost::Message as _;

pub use self::{
    batch_file::{BatchFileError, read_batch_file},
    commit_file::COMMIT_FILE,
    state_file::{EPOCH_FILE, STATE_FILE},
};
use self::{
    batch_file::{HEADER_LEN, batch_name, encode_file},
    commit_file::Journal,
    state_file::{SeqState, write_state},
};
use crate::{
    durable_file::{create_private_dir, remove_if_exists, sync_dir, write_tmp},
    table::CommitPlan,
    wire::Loss,
};

const LOCK_FILE: &str = "lock";
/// Upper bound of the encoded `lost_batches` and `lost` fields, which are set after the size
/// of a new batch is reckoned.
const LOSS_FIELDS_MAX: u64 = 96;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot create spool directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error(
        "spool directory {path} is in use by another outflow-agent: give each agent its own --spool-dir"
    )]
    Locked { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// A spooled batch, as the spool remembers it without reading its file.
#[derive(Clone, Debug)]
struct Entry {
    bytes: u64,
    /// What dropping it loses: its counts and the losses it was to report.
    loss: Loss,
    /// Its own counts only (for the running total of losses, which has the rest already).
    own: Loss,
    end_ms: u64,
}

impl Entry {
    fn new(bytes: u64, b: &v1::Batch) -> Self {
        Self {
            bytes,
            loss: Loss::of_batch(b),
            own: Loss::own(b),
            end_ms: b.end_ms,
        }
    }
}

/// What [`Spool::append`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Older batches dropped to make room, and the lowest and highest of their seqs.
    pub dropped: Loss,
    pub dropped_seqs: Option<(u64, u64)>,
}

/// The spool. Not thread-safe by itself: the exporter shares it behind a mutex.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: SeqState,
    next_seq: u64,
    /// Highest seq the sender may send: batches above it await their kernel commit.
    published: u64,
    /// Highest seq written to a stream. Batches up to it may be applied without their Ack
    /// having come back (the Ack is delayed, the stream was cut after the collector received
    /// them, or a stream this agent gave up on still delivers what its socket held): making
    /// room never drops them, or their bytes would be both applied and reported lost. The
    /// spool may exceed its bound by them until they are acknowledged.
    sent_upto: u64,
    /// A commit the previous agent may not have done, for the read loop to redo.
    recovery: Option<CommitPlan>,
    /// `commit` was written by this spool and not yet removed.
    journal_written: bool,
    entries: BTreeMap<u64, Entry>,
    bytes: u64,
    /// Lost since this spool was opened (for the export record).
    lost_total: Loss,
    _lock: File,
}

fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| SpoolError::Write {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a valid, owned fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let source = io::Error::last_os_error();
        return Err(if source.kind() == io::ErrorKind::WouldBlock {
            SpoolError::Locked { path: dir.into() }
        } else {
            SpoolError::Write { path, source }
        });
    }
    Ok(f)
}

fn describe(l: &Loss) -> String {
    format!(
        "{} batches, {} payload bytes out, {} in",
        l.batches, l.counters.bytes_out, l.counters.bytes_in
    )
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, bounded to `max_bytes`, with the epoch kept in
    /// `state_dir`. `new_identity`: the agent id was just created, so numbering starts over.
    /// Batch files left by a previous run are kept, to be sent first; what a crash left
    /// half-done is repaired first (see `recovery`).
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        state_dir: &Path,
        new_identity: bool,
    ) -> Result<Self, SpoolError> {
        create_private_dir(dir).map_err(|source| SpoolError::CreateDir {
            path: dir.into(),
            source,
        })?;
        let lock = lock(dir)?;
        let r = recovery::recover(dir, state_dir, new_identity)?;
        Ok(Self {
            dir: dir.into(),
            max_bytes,
            state: r.state,
            next_seq: r.next_seq,
            published: r.published,
            sent_upto: 0,
            journal_written: r.recovery.is_some(),
            recovery: r.recovery,
            entries: r.entries,
            bytes: r.bytes,
            lost_total: r.lost,
            _lock: lock,
        })
    }

    fn write_state(&self) -> Result<(), SpoolError> {
        write_state(&self.dir, &self.state)
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(batch_name(seq))
    }

    pub const fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// Highest seq ever given to a batch in this epoch (0: none).
    pub const fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Highest seq the collector acknowledged.
    pub const fn acked_seq(&self) -> u64 {
        self.state.acked
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Batches spooled, not yet acknowledged.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Size of the spooled batch files.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Batches dropped since the spool was opened (or found orphaned when it was opened), each
    /// counted once with its own counts.
    pub const fn lost_total(&self) -> &Loss {
        &self.lost_total
    }

    /// Loss to report in the next batch.
    pub const fn pending_loss(&self) -> &Loss {
        &self.state.pending
    }

    /// End of the newest batch numbered in this epoch (0: unknown), where the next one starts.
    pub fn last_end_ms(&self) -> u64 {
        self.entries
            .last_key_value()
            .map_or(self.state.acked_end_ms, |(_, e)| e.end_ms)
    }

    /// The first spooled batch after `seq` that may be sent, and its file.
    pub fn next_after(&self, seq: u64) -> Option<(u64, PathBuf)> {
        if seq >= self.published {
            return None;
        }
        self.entries
            .range(seq + 1..=self.published)
            .next()
            .map(|(&s, _)| (s, self.path(s)))
    }

    /// The commit the previous agent may not have done (once).
    pub const fn take_recovery(&mut self) -> Option<CommitPlan> {
        self.recovery.take()
    }

    /// Everything appended is committed to the kernel: it may be sent.
    pub fn publish(&mut self) {
        self.published = self.last_seq();
        self.recovery = None;
        if self.journal_written {
            // Best effort: a stale commit file is redone only where nothing moved since.
            let _ = fs::remove_file(self.dir.join(COMMIT_FILE));
            self.journal_written = false;
        }
    }

    /// Appends one interval's batches (one, or more when it has more deltas than a batch may
    /// carry), numbering them, with the kernel commit they stand for. They are durable when
    /// this returns, and sent once [`Spool::publish`] says the commit is done. Makes room first
    /// by dropping the oldest spooled batches; what they held, and the loss still pending, is
    /// reported in the first new batch.
    pub fn append(
        &mut self,
        mut batches: Vec<v1::Batch>,
        plan: &CommitPlan,
    ) -> Result<Appended, SpoolError> {
        if batches.is_empty() {
            return Ok(Appended::default());
        }
        let first_seq = self.next_seq;
        let mut need = LOSS_FIELDS_MAX;
        for (seq, b) in (first_seq..).zip(batches.iter_mut()) {
            b.seq = seq;
            need += (HEADER_LEN + b.encoded_len()) as u64;
        }
        let last_seq = first_seq + batches.len() as u64 - 1;

        let mut dropped_entries = Vec::new();
        let mut dropped = Loss::default();
        let mut dropped_own = Loss::default();
        // The oldest batches not yet sent make room; batches in flight stay (so the spool may
        // exceed its bound by the sender's window of them).
        while self.bytes + need > self.max_bytes {
            let Some(seq) = self
                .entries
                .range(self.sent_upto.saturating_add(1)..)
                .next()
                .map(|(s, _)| *s)
            else {
                break;
            };
            let Some(e) = self.entries.remove(&seq) else {
                break;
            };
            self.bytes -= e.bytes;
            dropped.add(&e.loss);
            dropped_own.add(&e.own);
            dropped_entries.push((seq, e));
        }
        let mut report = self.state.pending.clone();
        report.add(&dropped);
        if !report.is_zero() {
            batches[0].lost_batches = report.batches;
            batches[0].lost = Some(report.counters);
        }

        // Every file is written and fsync'd under a temporary name; then the commit is renamed
        // into place before the batches, and one directory fsync makes all of them durable.
        let journal = Journal {
            epoch: self.state.epoch,
            first_seq,
            last_seq,
            plan: plan.clone(),
        };
        let mut staged = Vec::with_capacity(batches.len() + 1);
        let mut written = Vec::with_capacity(batches.len());
        let result = (|| {
            let path = self.dir.join(COMMIT_FILE);
            staged.push((
                write_tmp(&path, &journal.encode()).map_err(|source| SpoolError::Write {
                    path: path.clone(),
                    source,
                })?,
                path,
            ));
            for b in &batches {
                let path = self.path(b.seq);
                let data = encode_file(self.state.epoch, b);
                let tmp = write_tmp(&path, &data).map_err(|source| SpoolError::Write {
                    path: path.clone(),
                    source,
                })?;
                written.push((path.clone(), data.len() as u64));
                staged.push((tmp, path));
            }
            outflow_crashpoint::crash_point!("spool::files_written");
            for (i, (tmp, path)) in staged.iter().enumerate() {
                fs::rename(tmp, path).map_err(|source| SpoolError::Write {
                    path: path.clone(),
                    source,
                })?;
                if i == 0 {
                    outflow_crashpoint::crash_point!("spool::journal_in_place");
                }
            }
            self.journal_written = true;
            outflow_crashpoint::crash_point!("spool::before_dir_sync");
            sync_dir(&self.dir).map_err(|source| SpoolError::Write {
                path: self.dir.clone(),
                source,
            })
        })();
        if let Err(e) = result {
            // Not durable, so not committed: the next interval reads these deltas again.
            for (tmp, path) in &staged {
                let _ = fs::remove_file(tmp);
                let _ = fs::remove_file(path);
            }
            self.journal_written = false;
            for (seq, e) in dropped_entries {
                self.bytes += e.bytes;
                self.entries.insert(seq, e);
            }
            return Err(e);
        }

        for (b, (_, len)) in batches.iter().zip(&written) {
            self.bytes += len;
            self.entries.insert(b.seq, Entry::new(*len, b));
        }
        self.next_seq = last_seq + 1;
        // Their loss is on record in a durable batch now. The new batches are durable: what
        // follows must not fail the append (the interval would be read and spooled again).
        for (seq, _) in &dropped_entries {
            if let Err(e) = remove(&self.path(*seq)) {
                warn!(
                    "{e}: a dropped batch left behind (its loss is reported): a restart would send it too"
                );
            }
        }
        if !self.state.pending.is_zero() {
            self.state.pending = Loss::default();
            if let Err(e) = self.write_state() {
                warn!(
                    "{e}: the loss reported in batch {first_seq} may be reported again if the agent restarts before the state is written"
                );
            }
        }
        self.lost_total.add(&dropped_own);
        let dropped_seqs = dropped_entries
            .first()
            .zip(dropped_entries.last())
            .map(|((a, _), (b, _))| (*a, *b));
        if let Some((a, b)) = dropped_seqs {
            warn!(
                "spool {} full ({} bytes max): dropped the oldest unacknowledged batches, seq {a} to {b} ({}); reported as lost in batch {first_seq}",
                self.dir.display(),
                self.max_bytes,
                describe(&dropped)
            );
        }
        Ok(Appended {
            first_seq,
            last_seq,
            dropped,
            dropped_seqs,
        })
    }

    /// The collector acknowledged every batch up to `seq`: forgets them. Returns how many.
    pub fn ack(&mut self, seq: u64) -> Result<usize, SpoolError> {
        let seq = seq.min(self.published);
        if seq <= self.state.acked {
            return Ok(0);
        }
        let keep = self.entries.split_off(&(seq + 1));
        let gone = std::mem::replace(&mut self.entries, keep);
        self.state.acked = seq;
        if let Some((_, e)) = gone.last_key_value() {
            self.state.acked_end_ms = e.end_ms;
        }
        self.write_state()?;
        outflow_crashpoint::crash_point!("spool::acked_before_removal");
        for (s, e) in &gone {
            self.bytes -= e.bytes;
            remove(&self.path(*s))?;
        }
        Ok(gone.len())
    }

    /// The sender wrote batch `seq` to a stream: it may be applied from now on.
    pub fn sent(&mut self, seq: u64) {
        self.sent_upto = self.sent_upto.max(seq);
    }

    /// The collector's Welcome: it has applied everything up to `applied` in this epoch.
    pub fn welcome(&mut self, applied: u64) -> Result<(), SpoolError> {
        if applied <= self.last_seq() {
            // Batches not yet published are sent again once they are (and acknowledged as
            // duplicates if the collector has them).
            return self.ack(applied).map(drop);
        }
        // The collector is ahead of this numbering: this state directory was copied from
        // another host, or restored from a backup. New batches must not be taken for
        // duplicates, so numbering continues after `applied`; what is spooled was never
        // applied under these numbers.
        let (mut lost, mut own) = (Loss::default(), Loss::default());
        for e in self.entries.values() {
            lost.add(&e.loss);
            own.add(&e.own);
        }
        warn!(
            "the collector has applied batches up to seq {applied} of epoch {} but this agent numbered only up to {}: \
             was its state directory copied from another host? Continuing after {applied}; {} spooled reported as lost",
            self.state.epoch,
            self.last_seq(),
            describe(&lost)
        );
        let gone = std::mem::take(&mut self.entries);
        self.state.acked = applied;
        self.state.pending.add(&lost);
        self.lost_total.add(&own);
        self.next_seq = applied + 1;
        self.published = applied;
        self.write_state()?;
        for s in gone.keys() {
            remove(&self.path(*s))?;
        }
        self.bytes = 0;
        Ok(())
    }

    /// A spooled batch cannot be read back: drops it and reports it as lost.
    pub fn discard(&mut self, seq: u64, why: &str) -> Result<(), SpoolError> {
        let Some(e) = self.entries.remove(&seq) else {
            return Ok(());
        };
        self.bytes -= e.bytes;
        warn!(
            "spool file {} unreadable ({why}): dropped, reported as lost ({})",
            self.path(seq).display(),
            describe(&e.loss)
        );
        self.state.pending.add(&e.loss);
        self.lost_total.add(&e.own);
        self.write_state()?;
        remove(&self.path(seq))
    }
}

fn remove(path: &Path) -> Result<(), SpoolError> {
    remove_if_exists(path).map_err(|source| SpoolError::Remove {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::{
        batch_file::{BATCH_SUFFIX, HEADER_LEN, read_batch_file},
        commit_file::COMMIT_FILE,
        testing::{add, batch, dirs, open, plan, spooled},
        *,
    };

    #[test]
    fn batches_are_numbered_in_order_and_forgotten_when_acked() {
        let d = dirs();
        let mut s = open(&d, 1 << 20);
        assert_ne!(s.epoch(), 0);
        assert_eq!(s.last_seq(), 0);
        for i in 1..=5 {
            let a = add(&mut s, vec![batch(i, 1000 * i + 1000)]).expect("append");
            assert_eq!((a.first_seq, a.last_seq), (i, i));
            assert!(a.dropped.is_zero());
        }
        assert_eq!(spooled(&s), vec![1, 2, 3, 4, 5]);
        assert_eq!(s.ack(3).expect("ack"), 3);
        assert_eq!(spooled(&s), vec![4, 5]);
        assert_eq!(s.acked_seq(), 3);
        assert_eq!(s.ack(2).expect("old ack"), 0);
        // An ack beyond what was numbered acknowledges no more than that.
        assert_eq!(s.ack(99).expect("ack"), 2);
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.acked_seq(), 5);
        assert_eq!(s.last_end_ms(), 6000);
        let names: Vec<String> = fs::read_dir(&d.spool)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(BATCH_SUFFIX))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn an_interval_split_in_chunks_gets_consecutive_seqs() {
        let d = dirs();
        let mut s = open(&d, 1 << 20);
        let a = add(&mut s, vec![batch(1, 2000), batch(2, 2000), batch(3, 2000)]).expect("append");
        assert_eq!((a.first_seq, a.last_seq), (1, 3));
        assert_eq!(spooled(&s), vec![1, 2, 3]);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_reports_them_in_the_next_batch() {
        let d = dirs();
        let one = (HEADER_LEN + batch(1, 2000).encoded_len()) as u64 + 8;
        // Room for about four batches.
        let max = one * 4 + LOSS_FIELDS_MAX;
        let mut s = open(&d, max);
        for i in 1..=4 {
            let a = add(&mut s, vec![batch(i, 1000 + i)]).expect("append");
            assert!(a.dropped.is_zero(), "batch {i} fits");
        }
        let a = add(&mut s, vec![batch(5, 1005)]).expect("append");
        assert_eq!(a.dropped_seqs, Some((1, 1)));
        assert_eq!(a.dropped.batches, 1);
        assert_eq!(a.dropped.counters.bytes_out, 1);
        assert!(s.bytes() <= max, "{} <= {max}", s.bytes());
        assert_eq!(spooled(&s), vec![2, 3, 4, 5]);
        let (_, b5) = read_batch_file(&s.next_after(4).expect("5").1).expect("read");
        assert_eq!(b5.lost_batches, 1);
        assert_eq!(b5.lost.expect("lost").bytes_out, 1);
        assert_eq!(s.lost_total().batches, 1);

        // Dropping batch 5 later loses its own counts and the loss it carried.
        add(&mut s, vec![batch(6, 1006)]).expect("6");
        add(&mut s, vec![batch(7, 1007)]).expect("7");
        add(&mut s, vec![batch(8, 1008)]).expect("8");
        let a = add(&mut s, vec![batch(9, 1009)]).expect("9");
        assert_eq!(a.dropped_seqs, Some((5, 5)));
        assert_eq!(a.dropped.batches, 2);
        assert_eq!(a.dropped.counters.bytes_out, 6);
        assert_eq!(s.lost_total().batches, 5, "each dropped batch counted once");
    }

    #[test]
    fn batches_sent_and_not_yet_acknowledged_are_not_dropped_to_make_room() {
        let d = dirs();
        let one = (HEADER_LEN + batch(1, 2000).encoded_len()) as u64 + 8;
        let max = one * 4 + LOSS_FIELDS_MAX;
        let mut s = open(&d, max);
        for i in 1..=4 {
            add(&mut s, vec![batch(i, 1000 + i)]).expect("append");
        }
        // 1 and 2 went out on a stream whose Acks have not come back (a partition): the
        // collector may have applied them.
        s.sent(2);
        let a = add(&mut s, vec![batch(5, 1005)]).expect("append");
        assert_eq!(a.dropped_seqs, Some((3, 3)), "the oldest unsent goes");
        assert_eq!(spooled(&s), vec![1, 2, 4, 5]);
        // A new stream's Welcome says 1 was applied and 2 not yet: 2 stays, for the old
        // stream's socket may still deliver it; it goes once acknowledged.
        s.welcome(1).expect("welcome");
        add(&mut s, vec![batch(6, 1006)]).expect("append");
        let a = add(&mut s, vec![batch(7, 1007)]).expect("append");
        assert_eq!(a.dropped_seqs, Some((4, 4)));
        assert_eq!(spooled(&s), vec![2, 5, 6, 7]);
        s.publish();
        s.ack(2).expect("ack");
        assert_eq!(spooled(&s), vec![5, 6, 7]);
    }

    #[test]
    fn a_batch_bigger_than_the_spool_is_kept_alone() {
        let d = dirs();
        let mut s = open(&d, 1 << 20);
        add(&mut s, vec![batch(1, 1001)]).expect("1");
        let mut big = batch(2, 1002);
        big.deltas[0].cgroup = "y".repeat(2 << 20);
        let a = add(&mut s, vec![big]).expect("big");
        assert_eq!(a.dropped_seqs, Some((1, 1)));
        assert_eq!(spooled(&s), vec![2]);
    }

    #[test]
    fn a_second_agent_cannot_use_the_same_spool() {
        let d = dirs();
        let _s = open(&d, 1 << 20);
        let e = Spool::open(&d.spool, 1 << 20, &d.state, false)
            .err()
            .expect("locked");
        assert!(e.to_string().contains("in use"), "{e}");
    }

    #[test]
    fn a_collector_ahead_of_the_numbering_moves_it_on() {
        let d = dirs();
        let mut s = open(&d, 1 << 20);
        add(&mut s, vec![batch(1, 1001)]).expect("1");
        add(&mut s, vec![batch(2, 1002)]).expect("2");
        s.welcome(1).expect("welcome");
        assert_eq!(spooled(&s), vec![2]);
        s.welcome(10).expect("welcome ahead");
        assert!(s.is_empty());
        assert_eq!(s.pending_loss().batches, 1);
        assert_eq!(add(&mut s, vec![batch(3, 1003)]).expect("3").first_seq, 11);
        drop(s);
        let s = open(&d, 1 << 20);
        assert_eq!(s.last_seq(), 11);
    }

    #[test]
    fn an_interval_is_sent_only_once_committed() {
        let d = dirs();
        let mut s = open(&d, 1 << 20);
        s.append(vec![batch(1, 1001)], &plan(2)).expect("append");
        assert_eq!(s.next_after(0), None, "not committed yet");
        assert_eq!(s.ack(1).expect("ack"), 0, "cannot be acknowledged either");
        s.publish();
        assert_eq!(s.next_after(0).map(|(n, _)| n), Some(1));
        assert!(!d.spool.join(COMMIT_FILE).exists());
        drop(s);
        let mut s = open(&d, 1 << 20);
        assert_eq!(s.take_recovery(), None, "committed before the stop");
        assert_eq!(s.next_after(0).map(|(n, _)| n), Some(1));
    }
}
