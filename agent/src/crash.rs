//! Crash points: named places in the agent's spool and commit window where the fault suite
//! kills it (SIGKILL, as the OOM killer or a power cut would), chosen by the environment
//! variable [`ENV`] in the `fail` crate's syntax: `NAME=ACTIONS[;NAME=ACTIONS...]`, where a
//! point whose action is `return` kills the process. `agent::before_kernel_commit=2*off->return`
//! kills it the third time an interval is durable but not yet committed to the kernel table.
//! Unset (as in production) a point costs a map lookup per interval or per batch.
//!
//! The points, in the order an interval passes them:
//! - `spool::files_written`: the interval's commit journal and batch files are written and
//!   fsync'd under temporary names, none renamed into place;
//! - `spool::journal_in_place`: the journal is renamed into place, the batches are not;
//! - `spool::before_dir_sync`: all are renamed, the directory not fsync'd;
//! - `agent::before_kernel_commit`: the interval is durable, the kernel table not committed;
//! - `agent::after_kernel_commit`: the kernel table is committed, the spool not told;
//! - `sender::after_send`: a batch is written to the stream, its Ack not received;
//! - `spool::acked_before_removal`: an Ack is recorded in the state file, the acknowledged
//!   batch files not yet removed.

pub use outflow_crashpoint::{ENV, arm_from_env};
