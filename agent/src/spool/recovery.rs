//! What [`Spool::open`](super::Spool::open) does before the spool is used: it takes the spool
//! directory as the previous agent left it, wherever a crash stopped it, and repairs it, one
//! phase after the other:
//!
//! 1. [`sequence_state`]: which numbering goes on, or a new epoch where it cannot.
//! 2. [`batch_files`]: the batch files left, without the writes a crash cut short.
//! 3. [`load_batches`]: which of them are still to be sent, and which are dropped as lost.
//! 4. [`last_interval`]: the newest interval's kernel commit, to be redone or rolled back.
//!
//! and then [`save_new_state`] makes durable what the phases changed in the sequence state.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use log::{info, warn};

use super::{
    Entry, SpoolError,
    batch_file::{BatchFileError, batch_name, parse_batch_name, read_batch_file},
    commit_file::{COMMIT_FILE, Journal},
    describe, remove,
    state_file::{EPOCH_FILE, STATE_FILE, SeqState, parse_epoch, render_epoch, write_state},
};
use crate::{
    durable_file::{TMP_SUFFIX, write_durably},
    random::random_nonzero_u64,
    table::CommitPlan,
    wire::Loss,
};

/// The spool as recovery leaves it, for [`Spool::open`](super::Spool::open).
pub(super) struct Recovered {
    pub(super) state: SeqState,
    pub(super) entries: BTreeMap<u64, Entry>,
    /// Size of the batch files in `entries`.
    pub(super) bytes: u64,
    pub(super) next_seq: u64,
    /// Highest seq the sender may send: batches above it await their kernel commit.
    pub(super) published: u64,
    /// A commit the previous agent may not have done, for the read loop to redo.
    pub(super) recovery: Option<CommitPlan>,
    /// Batches dropped as lost while recovering.
    pub(super) lost: Loss,
}

/// Runs the recovery phases on the (locked) spool directory `dir`, with the epoch kept in
/// `state_dir`. `new_identity`: the agent id was just created, so numbering starts over.
pub(super) fn recover(
    dir: &Path,
    state_dir: &Path,
    new_identity: bool,
) -> Result<Recovered, SpoolError> {
    let epoch_path = state_dir.join(EPOCH_FILE);
    let (mut state, fresh) = sequence_state(dir, &epoch_path, new_identity)?;
    let files = batch_files(dir)?;
    let Loaded {
        mut entries,
        mut bytes,
        orphans,
    } = load_batches(files, state.acked, state.epoch)?;
    if !orphans.is_zero() {
        warn!(
            "dropped {} left in spool {} by a lost sequence state; reported as lost",
            describe(&orphans),
            dir.display()
        );
        state.pending.add(&orphans);
    }
    let unfinished = last_interval(dir, &state, &mut entries, &mut bytes)?;
    let next_seq = entries
        .last_key_value()
        .map_or(state.acked, |(&s, _)| s.max(state.acked))
        + 1;
    let published = unfinished
        .as_ref()
        .map_or(next_seq - 1, |(first_seq, _)| first_seq - 1);
    save_new_state(dir, &epoch_path, &state, fresh, !orphans.is_zero())?;
    Ok(Recovered {
        state,
        entries,
        bytes,
        next_seq,
        published,
        recovery: unfinished.map(|(_, plan)| plan),
        lost: orphans,
    })
}

/// Reads a file that may be missing.
fn read_optional(path: &Path) -> Result<Option<String>, SpoolError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SpoolError::Read {
            path: path.into(),
            source,
        }),
    }
}

/// Phase 1: the sequence state to go on with, and why numbering starts over if it does.
///
/// Repairs an epoch file and a sequence state that do not belong together: one of them lost
/// (a crash between writing the two at the first start, a spool or state directory wiped or
/// replaced), or of another epoch. Numbering then starts over under a new random epoch, so that
/// no new batch is taken by the collector for a duplicate of an old one; so it does for a new
/// agent id.
fn sequence_state(
    dir: &Path,
    epoch_path: &Path,
    new_identity: bool,
) -> Result<(SeqState, Option<&'static str>), SpoolError> {
    let epoch = read_optional(epoch_path)?.and_then(|t| parse_epoch(&t));
    let saved = read_optional(&dir.join(STATE_FILE))?.and_then(|t| SeqState::parse(&t));
    Ok(match (epoch, saved) {
        (Some(e), Some(s)) if s.epoch == e && !new_identity => (s, None),
        (e, s) => {
            let reason = if new_identity {
                "new agent id"
            } else if e.is_none() {
                "no epoch in the state directory"
            } else if s.is_none() {
                "no sequence state in the spool directory"
            } else {
                "the spool's sequence state belongs to another epoch"
            };
            (
                SeqState {
                    epoch: random_nonzero_u64(),
                    ..SeqState::default()
                },
                Some(reason),
            )
        }
    })
}

/// Phase 2: the batch files in `dir`, in sequence order.
///
/// Repairs a crash in the middle of a write: the temporary files it leaves are removed (their
/// interval was not durable, so it was not committed to the kernel either, which still holds
/// its deltas).
fn batch_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(|source| SpoolError::Read {
        path: dir.into(),
        source,
    })? {
        let entry = entry.map_err(|source| SpoolError::Read {
            path: dir.into(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(TMP_SUFFIX) {
            // A write that never completed: its interval was not committed either.
            remove(&entry.path())?;
        } else if let Some(seq) = parse_batch_name(&name) {
            files.push((seq, entry.path()));
        }
    }
    files.sort_unstable();
    Ok(files)
}

/// What [`load_batches`] kept, and what it dropped as lost.
struct Loaded {
    entries: BTreeMap<u64, Entry>,
    bytes: u64,
    orphans: Loss,
}

/// Phase 3: reads every batch file; those of this epoch not yet acknowledged are to be sent.
///
/// Repairs a crash between an acknowledgement's state write and the removal of the batch files
/// it acknowledged (they are removed now), and drops as lost, to be reported, the batch files
/// that cannot be sent under this numbering: those of another epoch (left by a lost sequence
/// state) and corrupt ones.
fn load_batches(files: Vec<(u64, PathBuf)>, acked: u64, epoch: u64) -> Result<Loaded, SpoolError> {
    let mut orphans = Loss::default();
    let mut entries = BTreeMap::new();
    let mut bytes = 0;
    for (seq, path) in files {
        match read_batch_file(&path) {
            Ok((e, b)) if e == epoch && b.seq == seq => {
                if seq <= acked {
                    remove(&path)?;
                    continue;
                }
                let len = fs::metadata(&path).map_or(0, |m| m.len());
                bytes += len;
                entries.insert(seq, Entry::new(len, &b));
            }
            Ok((_, b)) => {
                orphans.add(&Loss::of_batch(&b));
                remove(&path)?;
            }
            Err(BatchFileError::Corrupt(why)) => {
                warn!("spool file {} is corrupt ({why}): dropped", path.display());
                orphans.batches += 1;
                remove(&path)?;
            }
            Err(BatchFileError::Gone) => {}
            Err(BatchFileError::Io(source)) => return Err(SpoolError::Read { path, source }),
        }
    }
    Ok(Loaded {
        entries,
        bytes,
        orphans,
    })
}

/// Phase 4: the newest interval's kernel commit (the `commit` file). Returns its first seq and
/// its commit plan when the read loop is to redo that commit: its batches are held back from the
/// sender until it is done.
///
/// Repairs two crashes. Killed after the interval's batches were durable but before its kernel
/// commit was done and the commit file removed: the batches are kept, and the commit is handed
/// to the read loop, which redoes it where the slots are as they were read, rather than report
/// those deltas twice. Killed while the interval was being spooled (not all of its batch files
/// are there): it never was durable, its files are removed, and the kernel, which still holds
/// its deltas, has them read again. A commit file with nothing to redo is removed.
fn last_interval(
    dir: &Path,
    state: &SeqState,
    entries: &mut BTreeMap<u64, Entry>,
    bytes: &mut u64,
) -> Result<Option<(u64, CommitPlan)>, SpoolError> {
    let journal_path = dir.join(COMMIT_FILE);
    let journal = match fs::read(&journal_path) {
        Ok(b) => Journal::decode(&b).or_else(|| {
            warn!("{} is unreadable: ignored", journal_path.display());
            None
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(SpoolError::Read {
                path: journal_path,
                source,
            });
        }
    };
    let mut unfinished = None;
    if let Some(j) = journal.filter(|j| j.epoch == state.epoch && j.first_seq <= j.last_seq) {
        let durable =
            (j.first_seq..=j.last_seq).all(|s| s <= state.acked || entries.contains_key(&s));
        if !durable {
            for seq in j.first_seq..=j.last_seq {
                if let Some(e) = entries.remove(&seq) {
                    *bytes -= e.bytes;
                    remove(&dir.join(batch_name(seq)))?;
                }
            }
            warn!(
                "the previous agent stopped while spooling seq {} to {}: removed what it wrote (the kernel still holds those counts)",
                j.first_seq, j.last_seq
            );
        } else if j.last_seq > state.acked {
            unfinished = Some((j.first_seq, j.plan));
        }
    }
    if unfinished.is_none() {
        remove(&journal_path)?;
    }
    Ok(unfinished)
}

/// Writes the sequence state if recovery changed it: a new epoch (and then the epoch file), or
/// losses to report.
fn save_new_state(
    dir: &Path,
    epoch_path: &Path,
    state: &SeqState,
    fresh: Option<&str>,
    lost: bool,
) -> Result<(), SpoolError> {
    if let Some(reason) = fresh {
        // The sequence state first: an epoch file without it is not trusted.
        write_state(dir, state)?;
        write_durably(epoch_path, render_epoch(state.epoch).as_bytes()).map_err(|source| {
            SpoolError::Write {
                path: epoch_path.into(),
                source,
            }
        })?;
        info!(
            "sequence numbering starts over with epoch {} ({reason})",
            state.epoch
        );
    } else if lost {
        write_state(dir, state)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::{
        Spool,
        batch_file::{batch_name, read_batch_file},
        commit_file::COMMIT_FILE,
        state_file::{EPOCH_FILE, STATE_FILE},
        testing::{add, batch, dirs, open, plan, spooled},
    };

    #[test]
    fn a_restart_keeps_the_spool_and_continues_the_numbering() {
        let d = dirs();
        let epoch = {
            let mut s = open(&d, 1 << 20);
            for i in 1..=4 {
                add(&mut s, vec![batch(i, 1000 + i)]).expect("append");
            }
            s.ack(2).expect("ack");
            s.epoch()
        };
        // A crash mid-write leaves a temporary file: it is not a batch.
        fs::write(d.spool.join("00000000000000000005.batch.tmp"), b"torn").expect("tmp");
        let mut s = open(&d, 1 << 20);
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.acked_seq(), 2);
        assert_eq!(spooled(&s), vec![3, 4]);
        assert_eq!(s.last_end_ms(), 1004);
        assert!(!d.spool.join("00000000000000000005.batch.tmp").exists());
        let a = add(&mut s, vec![batch(5, 1005)]).expect("append");
        assert_eq!(a.first_seq, 5);

        // Everything acknowledged: the numbering still continues.
        s.ack(5).expect("ack");
        drop(s);
        let mut s = open(&d, 1 << 20);
        assert_eq!((s.epoch(), s.last_seq(), s.last_end_ms()), (epoch, 5, 1005));
        assert_eq!(add(&mut s, vec![batch(6, 1006)]).expect("6").first_seq, 6);
    }

    #[test]
    fn a_lost_sequence_state_starts_a_new_epoch_and_reports_orphans() {
        let d = dirs();
        let old = {
            let mut s = open(&d, 1 << 20);
            add(&mut s, vec![batch(7, 1001)]).expect("1");
            add(&mut s, vec![batch(8, 1002)]).expect("2");
            s.epoch()
        };
        fs::remove_file(d.spool.join(STATE_FILE)).expect("rm state");
        let s = open(&d, 1 << 20);
        assert_ne!(s.epoch(), old);
        assert_eq!(
            fs::read_to_string(d.state.join(EPOCH_FILE))
                .expect("epoch")
                .trim(),
            s.epoch().to_string()
        );
        assert!(s.is_empty());
        assert_eq!(s.last_seq(), 0);
        assert_eq!(s.pending_loss().batches, 2);
        // The loss is durable until reported...
        drop(s);
        let mut s = open(&d, 1 << 20);
        assert_eq!(s.pending_loss().batches, 2);
        assert_eq!(s.pending_loss().counters.bytes_out, 15);
        // ...and reported once.
        add(&mut s, vec![batch(1, 2001)]).expect("1");
        let (_, b) = read_batch_file(&s.next_after(0).expect("1").1).expect("read");
        assert_eq!((b.seq, b.lost_batches), (1, 2));
        assert!(s.pending_loss().is_zero());
        add(&mut s, vec![batch(2, 2002)]).expect("2");
        let (_, b) = read_batch_file(&s.next_after(1).expect("2").1).expect("read");
        assert_eq!(b.lost_batches, 0);

        // A new agent id starts a new epoch too.
        let e = s.epoch();
        drop(s);
        let s = Spool::open(&d.spool, 1 << 20, &d.state, true).expect("open");
        assert_ne!(s.epoch(), e);
    }

    #[test]
    fn corrupt_files_are_dropped_and_counted() {
        let d = dirs();
        {
            let mut s = open(&d, 1 << 20);
            add(&mut s, vec![batch(1, 1001)]).expect("1");
            add(&mut s, vec![batch(2, 1002)]).expect("2");
        }
        fs::write(d.spool.join(batch_name(1)), b"OFLWBAT1garbage").expect("corrupt");
        let s = open(&d, 1 << 20);
        assert_eq!(spooled(&s), vec![2]);
        assert_eq!(s.pending_loss().batches, 1);
        assert_eq!(s.last_seq(), 2);
    }

    #[test]
    fn a_commit_cut_short_is_handed_to_the_next_agent() {
        let d = dirs();
        {
            let mut s = open(&d, 1 << 20);
            add(&mut s, vec![batch(1, 1001)]).expect("1");
            s.append(vec![batch(2, 1002), batch(3, 1002)], &plan(3))
                .expect("append");
            // Killed before the kernel commit: never published.
        }
        let mut s = open(&d, 1 << 20);
        assert_eq!(spooled(&s), vec![1], "held until the commit is redone");
        assert_eq!(s.take_recovery(), Some(plan(3)));
        assert_eq!(s.take_recovery(), None);
        s.publish();
        assert_eq!(spooled(&s), vec![1, 2, 3]);
        assert_eq!(add(&mut s, vec![batch(4, 1003)]).expect("4").first_seq, 4);
    }

    #[test]
    fn an_interval_cut_short_while_spooling_is_removed() {
        let d = dirs();
        {
            let mut s = open(&d, 1 << 20);
            add(&mut s, vec![batch(1, 1001)]).expect("1");
            s.append(vec![batch(2, 1002), batch(3, 1002)], &plan(3))
                .expect("append");
        }
        // As if the agent died between the two chunks' renames.
        fs::remove_file(d.spool.join(batch_name(3))).expect("rm");
        let mut s = open(&d, 1 << 20);
        assert_eq!(s.take_recovery(), None, "not durable: nothing to redo");
        assert!(!d.spool.join(batch_name(2)).exists());
        assert!(!d.spool.join(COMMIT_FILE).exists());
        assert_eq!(spooled(&s), vec![1]);
        assert!(
            s.pending_loss().is_zero(),
            "not lost: the kernel still has it"
        );
        assert_eq!(add(&mut s, vec![batch(2, 1002)]).expect("2").first_seq, 2);
    }
}
