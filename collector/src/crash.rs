//! Crash points: named places on the commit path where the fault suite kills the collector
//! (SIGKILL, as the OOM killer or a power cut would), chosen by the environment variable
//! [`ENV`] in the `fail` crate's syntax: `NAME=ACTIONS[;NAME=ACTIONS...]`, where a point
//! whose action is `return` kills the process. `writer::after_commit=2*off->return` kills it
//! the third time a group commit has been made durable. Unset (as in production) a point costs
//! a map lookup per group commit.
//!
//! The points:
//! - `store::before_commit`: the group's journal entry and watermarks are written into the
//!   transaction, which is not committed;
//! - `writer::after_commit`: the transaction is durable, memory not updated, no Ack sent;
//! - `writer::after_acks`: the group's Acks are handed to their streams;
//! - `store::before_checkpoint`: the rollups the journal touched are written whole and the
//!   journal emptied in the transaction, which is not committed (at a full journal, each
//!   `store.gc_interval`, a clean stop, and at the start after a crash);
//! - `store::append_fails` (an error point, not a crash): the group commit's transaction
//!   fails as a failing disk would make it, and is not committed; `return(TEXT)` fails only
//!   a store whose path contains `TEXT`;
//! - `aggregator::before_consumers` (a delay point: `return(MILLISECONDS)`): a cluster
//!   aggregator's round has made its claims and waits before it starts their consumers, as a
//!   round slowed by a loaded JetStream would;
//! - `detection::after_reading`: a judgement has read memory and made its alert changes, not
//!   yet stored or published (tests hold the detection thread here with `pause`).

pub use outflow_crashpoint::{ENV, arm_from_env};
