//! The read loop's durability step: what keeps an interval, with the kernel commit it stands
//! for, across a crash before the kernel table records it as reported. With a collector
//! configured it is the export's spool ([`crate::export::Spooler`]); without one there is no
//! such step, and an interval is committed once its records are written out.
//!
//! Each interval, in this order (see [`crate::agent::Agent::poll`]):
//! 1. [`Durability::make_durable`]: the interval's records and its [`CommitPlan`] are durable
//!    when it returns [`Flushed::Kept`]; on [`Flushed::Deferred`] the interval stays
//!    uncommitted in the kernel table, and is read again with the next one;
//! 2. the read loop commits the interval to the kernel table;
//! 3. [`Durability::committed`]: what was made durable may go on (the sender streams it).
//!
//! At start, [`Durability::recover`] hands over the commit of an interval a previous agent made
//! durable and may have died before committing: the read loop redoes what of it is undone, then
//! calls `committed`.
use std::{io, path::PathBuf};

use crate::{
    record::{ConnRecord, ExportRecord, OverflowRecord},
    spool::SpoolError,
    table::CommitPlan,
};

/// One interval, as the read loop hands it to the durability step.
pub struct Interval<'a> {
    /// Unix milliseconds at which the table was read.
    pub ts: u64,
    pub conns: &'a [ConnRecord],
    pub overflow: Option<&'a OverflowRecord>,
    /// What committing the interval will write to the kernel table.
    pub plan: &'a CommitPlan,
}

/// What [`Durability::make_durable`] made of an interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flushed {
    /// Durable: commit the interval.
    Kept,
    /// Not kept (the export spool could not be written: its disk is full): leave the interval
    /// uncommitted, so that the kernel table holds its bytes and the next interval reads them
    /// again (the read loop outputs an interval's records only once it is kept).
    Deferred,
}

/// The durability protocol, between reading an interval and committing it to the kernel.
pub trait Durability {
    /// At start, once the kernel state is open: the commit of an interval that a previous
    /// agent made durable but may have died before committing. The read loop redoes what of it
    /// is undone, then calls [`Durability::committed`].
    fn recover(&mut self) -> Result<Option<CommitPlan>, DurabilityError>;
    /// Makes the interval durable with its commit plan, before the read loop commits it to the
    /// kernel table; the answer says whether it may.
    fn make_durable(&mut self, interval: &Interval<'_>) -> Result<Flushed, DurabilityError>;
    /// The interval made durable last is committed to the kernel table.
    fn committed(&mut self) -> Result<(), DurabilityError>;
    /// The export's state, for the `export` record, when it changed since the last call.
    fn report(&mut self) -> Option<ExportRecord>;
}

#[derive(Debug, thiserror::Error)]
pub enum DurabilityError {
    #[error("spool {}: {source}{}", .dir.display(), advice(.source))]
    Spool { dir: PathBuf, source: SpoolError },
}

/// What to do about a spool that fails, where its cause tells: `": ..."`, or nothing.
fn advice(e: &SpoolError) -> &'static str {
    let kind = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .map(io::Error::kind);
    match kind {
        Some(io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) => {
            ": free space on its disk, or lower export.spool_max_bytes (--spool-max-bytes) to what the disk has room for"
        }
        Some(io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem) => {
            ": make it writable for the agent, or give the agent another export.spool_dir (--spool-dir)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_error(errno: i32) -> DurabilityError {
        DurabilityError::Spool {
            dir: "/var/lib/outflow/spool".into(),
            source: SpoolError::Write {
                path: "/var/lib/outflow/spool/00000000000000000042.batch".into(),
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    #[test]
    fn a_failing_spool_is_named_with_what_to_do() {
        let e = write_error(libc::ENOSPC).to_string();
        assert!(
            e.starts_with("spool /var/lib/outflow/spool: cannot write /var/lib/outflow/spool/00000000000000000042.batch: "),
            "{e}"
        );
        assert!(
            e.contains("free space on its disk") && e.contains("export.spool_max_bytes"),
            "{e}"
        );
        let e = write_error(libc::EROFS).to_string();
        assert!(e.contains("make it writable"), "{e}");
        let e = write_error(libc::EIO).to_string();
        assert!(e.ends_with("(os error 5)"), "no advice without one: {e}");
        // The cause stays typed.
        let e = write_error(libc::ENOSPC);
        assert!(
            std::error::Error::source(&e).is_some_and(|s| s.is::<SpoolError>()),
            "{e:?}"
        );
    }
}
