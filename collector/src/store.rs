//! The embedded store: one redb file, `collector.redb`, in the data directory.
//!
//! Tables (keys and values big-endian where binary):
//!
//! | table        | key                                   | value                               |
//! |--------------|---------------------------------------|-------------------------------------|
//! | `meta`       | `"schema"`, `"end_ms"`, `"history_settled"` | u64                           |
//! | `watermarks` | (agent_id, epoch)                     | highest applied seq                 |
//! | `hosts`      | host id (u32)                         | host name                           |
//! | `rollups`    | key (see [`Key::encode`])             | buckets and hosts (see [`Rollup::encode`]) |
//! | `alerts`     | alert id (str)                        | `outflow.v1.Alert`, protobuf-encoded |
//! | `history`    | minute number (`time_ms / 60 000`)    | the fleet's bytes and top keys in it (see [`Minute::encode`]) |
//! | `journal`    | commit number (u64)                   | what a group commit added to each key (see [`journal`]) |
//!
//! Alerts are written in their own transaction, by the detection thread, after the commit whose
//! batches raised them; the writer and the detection thread share the store through
//! [`SharedStore`] (one write at a time, as redb runs them anyway).
//!
//! Every change of a group commit (watermarks, new hosts, what it added to the keys it touched,
//! as a journal entry) goes into one write transaction, so after a crash the store holds either
//! all of a batch or none of it, and its watermark with it. The rollups themselves are written
//! whole only at checkpoints ([`Store::checkpoint_with`]), which empty the journal in the same
//! transaction; opening the store applies what the journal holds to the rollups
//! ([`journal::replay`]) and checkpoints them.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use log::{debug, warn};
use redb::{Database, Durability, ReadableDatabase as _, ReadableTable as _, TableDefinition};

use crate::{
    aggregate::{Map, State},
    history::{Minute, first_kept},
    journal,
    keys::{HostId, Key},
    model::AgentKey,
    window::Rollup,
};

/// The database file's name in the data directory.
pub const DB_FILE: &str = "collector.redb";
/// 4: the `journal` table (a store of schema 3 is one of 4 with an empty journal: it is
/// upgraded in place). 3: client addresses are the attributed clients (`client_addr`), split
/// into direct, proxied and relayed keys; client-id keys; links in the `rollups` value. 2 keyed
/// clients by TCP peer. 1 kept the hosts of a key in a `key_hosts` table.
const SCHEMA: u64 = 4;
/// The oldest schema this collector reads (and upgrades).
const OLDEST_SCHEMA: u64 = 3;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const WATERMARKS: TableDefinition<(&str, u64), u64> = TableDefinition::new("watermarks");
const HOSTS: TableDefinition<u32, &str> = TableDefinition::new("hosts");
const ROLLUPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rollups");
const ALERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("alerts");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// One row of a table: key and value bytes.
pub type Row = (Vec<u8>, Vec<u8>);

/// What the detectors learnt, as `detect::persist` encodes it (opaque here).
const DETECT_STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("detect_state");

/// A store that cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {error}")]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot open database {path}: {error}")]
    Open {
        path: PathBuf,
        error: redb::DatabaseError,
    },
    #[error("database {path}: {error}")]
    Db { path: PathBuf, error: redb::Error },
    #[error("database {path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("database {path}: journal entry {entry} is {error}")]
    Journal {
        path: PathBuf,
        entry: u64,
        error: journal::BadEntry,
    },
    #[error(
        "database {path} has schema {found}; this collector reads schemas {OLDEST_SCHEMA} to {SCHEMA} only: {}",
        schema_advice(*found)
    )]
    Schema { path: PathBuf, found: u64 },
}

/// What to do with a file of another schema.
fn schema_advice(found: u64) -> &'static str {
    if found < OLDEST_SCHEMA {
        "it was written by an older collector (it counted clients by TCP peer); move it away to \
         start afresh (it holds at most the last 24 h of aggregates, and the alerts)"
    } else {
        "it was written by a newer collector; run that version, or move the file away"
    }
}

/// Everything one write transaction changes.
#[derive(Debug, Default)]
pub struct Changes {
    /// New host names, in id order.
    pub hosts: Vec<(HostId, Arc<str>)>,
    /// New watermarks.
    pub watermarks: Map<AgentKey, u64>,
    /// The new newest batch time, if it moved.
    pub end_ms: Option<u64>,
    /// Changed rollups (an empty one is removed).
    pub rollups: Map<Key, Rollup>,
    /// Changed minutes of the history, whole (an empty one is removed).
    pub minutes: BTreeMap<u64, Minute>,
    /// Minutes settled through this one now.
    pub settled_through: Option<u64>,
}

impl Changes {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.watermarks.is_empty()
            && self.end_ms.is_none()
            && self.rollups.is_empty()
            && self.minutes.is_empty()
            && self.settled_through.is_none()
    }

    /// Applies the changes to the in-memory state (after they were committed).
    pub fn install(self, state: &mut State) {
        for (id, name) in self.hosts {
            state.add_host(id, name);
        }
        for (agent, seq) in self.watermarks {
            state.set_watermark(agent, seq);
        }
        if let Some(e) = self.end_ms {
            state.set_end_ms(e);
        }
        for (key, rollup) in self.rollups {
            state.put(key, rollup);
        }
        let first = first_kept(state.end_ms());
        let h = state.history_mut();
        for (m, row) in self.minutes {
            h.put(m, row);
        }
        if let Some(m) = self.settled_through {
            h.set_settled_through(m);
        }
        h.prune_before(first);
    }
}

/// The open database.
pub struct Store {
    /// `None` only while it is reopened.
    db: Option<Database>,
    path: PathBuf,
    fsync: bool,
    cache_bytes: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The store shared by the threads that write it: the store writer's commits, the detection
/// thread's alerts and learnt state. One write at a time; after a failed write (a full disk, an
/// I/O error) redb refuses every transaction until the database is reopened, so the next write
/// reopens it first.
#[derive(Debug)]
pub struct SharedStore {
    /// The store, and whether a write failed since it was opened.
    inner: Mutex<(Store, bool)>,
}

impl SharedStore {
    pub fn new(store: Store) -> SharedStore {
        SharedStore {
            inner: Mutex::new((store, false)),
        }
    }

    /// Runs the write `f` on the store, reopened first if a write failed since it was opened;
    /// a failed `f` has the next write reopen it.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (store, failed) = &mut *g;
        if *failed {
            store.reopen()?;
            *failed = false;
            warn!("store reopened after a failed write: writing again");
        }
        let r = f(store);
        *failed = r.is_err();
        r
    }

    /// Runs the read `f` on the store.
    pub fn read<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&self.inner.lock().unwrap_or_else(PoisonError::into_inner).0)
    }
}

/// Writes rollups into an open write transaction; see [`Store::commit_with`].
pub struct RollupWriter<'t> {
    rollups: redb::Table<'t, &'static [u8], &'static [u8]>,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl RollupWriter<'_> {
    /// Writes `key`'s new `rollup`, or removes the key if the rollup is empty.
    pub fn put(&mut self, key: &Key, rollup: &Rollup) -> Result<(), redb::Error> {
        self.key.clear();
        key.encode(&mut self.key);
        if rollup.is_empty() {
            self.rollups.remove(&*self.key)?;
        } else {
            self.value.clear();
            rollup.encode(&mut self.value);
            self.rollups.insert(&*self.key, &*self.value)?;
        }
        Ok(())
    }
}

/// Opens (creating if needed) the database file at `path`.
fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|error| StoreError::Open {
            path: path.to_path_buf(),
            error,
        })
}

impl Store {
    /// Opens (creating if needed) `dir/collector.redb` and loads everything into a [`State`].
    /// `fsync`: make every commit durable before it returns; `cache_bytes`: the most memory
    /// redb caches pages in (its default, 1 GiB, would be most of the collector's memory).
    pub fn open(dir: &Path, fsync: bool, cache_bytes: usize) -> Result<(Store, State), StoreError> {
        std::fs::create_dir_all(dir).map_err(|error| StoreError::CreateDir {
            path: dir.to_path_buf(),
            error,
        })?;
        let path = dir.join(DB_FILE);
        let db = open_db(&path, cache_bytes)?;
        let store = Store {
            db: Some(db),
            path,
            fsync,
            cache_bytes,
        };
        store.init()?;
        let state = store.load()?;
        Ok((store, state))
    }

    /// The database (an error only if a reopen failed: it is closed then).
    fn db(&self) -> Result<&Database, redb::Error> {
        self.db.as_ref().ok_or(redb::Error::PreviousIo)
    }

    /// Closes the database and opens it again. After a failed write (a full disk, an I/O
    /// error) redb refuses every transaction until then; what it holds is what the last
    /// commit wrote.
    pub fn reopen(&mut self) -> Result<(), StoreError> {
        self.db = None;
        self.db = Some(open_db(&self.path, self.cache_bytes)?);
        Ok(())
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            error: e.into(),
        }
    }

    fn corrupt(&self, what: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    /// Creates the tables and checks the schema version.
    fn init(&self) -> Result<(), StoreError> {
        let tx = self
            .db()
            .and_then(|d| Ok(d.begin_write()?))
            .map_err(|e| self.err(e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            let found = meta
                .get("schema")
                .map_err(|e| self.err(e))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert("schema", SCHEMA).map_err(|e| self.err(e))?;
                }
                Some(SCHEMA) => {}
                // Schema 3 had no journal: its rollups are whole.
                Some(OLDEST_SCHEMA) => {
                    meta.insert("schema", SCHEMA).map_err(|e| self.err(e))?;
                }
                Some(found) => {
                    return Err(StoreError::Schema {
                        path: self.path.clone(),
                        found,
                    });
                }
            }
            tx.open_table(WATERMARKS).map_err(|e| self.err(e))?;
            tx.open_table(HOSTS).map_err(|e| self.err(e))?;
            tx.open_table(ROLLUPS).map_err(|e| self.err(e))?;
            tx.open_table(ALERTS).map_err(|e| self.err(e))?;
            tx.open_table(DETECT_STATE).map_err(|e| self.err(e))?;
            tx.open_table(HISTORY).map_err(|e| self.err(e))?;
            tx.open_table(JOURNAL).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn load(&self) -> Result<State, StoreError> {
        let e = |x: redb::Error| self.err(x);
        let tx = self.db().and_then(|d| Ok(d.begin_read()?)).map_err(e)?;
        let mut state = State::default();
        let meta = tx.open_table(META).map_err(|x| e(x.into()))?;
        if let Some(v) = meta.get("end_ms").map_err(|x| e(x.into()))? {
            state.set_end_ms(v.value());
        }
        if let Some(v) = meta.get("history_settled").map_err(|x| e(x.into()))? {
            state.history_mut().set_settled_through(v.value());
        }
        let first = first_kept(state.end_ms());
        for row in tx
            .open_table(HISTORY)
            .map_err(|x| e(x.into()))?
            .range(first..)
            .map_err(|x| e(x.into()))?
        {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let minute = Minute::decode(v.value())
                .ok_or_else(|| self.corrupt(format!("bad history row for minute {}", k.value())))?;
            state.history_mut().put(k.value(), minute);
        }
        for row in tx
            .open_table(HOSTS)
            .map_err(|x| e(x.into()))?
            .iter()
            .map_err(|x| e(x.into()))?
        {
            let (id, name) = row.map_err(|x| e(x.into()))?;
            let id = id.value();
            if usize::try_from(id).ok() != Some(state.host_count()) {
                return Err(self.corrupt(format!("host id {id} out of sequence")));
            }
            state.add_host(id, Arc::from(name.value()));
        }
        for row in tx
            .open_table(WATERMARKS)
            .map_err(|x| e(x.into()))?
            .iter()
            .map_err(|x| e(x.into()))?
        {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let (agent_id, epoch) = k.value();
            state.set_watermark(
                AgentKey {
                    agent_id: Arc::from(agent_id),
                    epoch,
                },
                v.value(),
            );
        }
        for row in tx
            .open_table(ROLLUPS)
            .map_err(|x| e(x.into()))?
            .iter()
            .map_err(|x| e(x.into()))?
        {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let key = Key::decode(k.value())
                .ok_or_else(|| self.corrupt(format!("bad rollup key {:02x?}", k.value())))?;
            let rollup = Rollup::decode(v.value())
                .ok_or_else(|| self.corrupt(format!("bad rollup value for {key:?}")))?;
            state.put(key, rollup);
        }
        let mut replayed = 0;
        for row in tx
            .open_table(JOURNAL)
            .map_err(|x| e(x.into()))?
            .iter()
            .map_err(|x| e(x.into()))?
        {
            let (n, v) = row.map_err(|x| e(x.into()))?;
            if let Err(error) = journal::replay(v.value(), &mut state) {
                return Err(StoreError::Journal {
                    path: self.path.clone(),
                    entry: n.value(),
                    error,
                });
            }
            replayed += 1;
        }
        drop(tx);
        if replayed > 0 {
            // The journal of a run that did not stop cleanly: every rollup written whole now,
            // so that the writer starts on an empty journal.
            debug!("store: {replayed} journal entries applied; checkpointing");
            let mut keys: Vec<(Key, &Rollup)> = state.iter().collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            self.checkpoint_with(|w| {
                for (key, rollup) in keys {
                    w.put(&key, rollup)?;
                }
                Ok(())
            })?;
        }
        Ok(state)
    }

    /// Every stored alert.
    pub fn load_alerts(&self) -> Result<Vec<outflow_proto::v1::Alert>, StoreError> {
        let e = |x: redb::Error| self.err(x);
        let tx = self.db().and_then(|d| Ok(d.begin_read()?)).map_err(e)?;
        let table = tx.open_table(ALERTS).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let a = <outflow_proto::v1::Alert as prost::Message>::decode(v.value())
                .map_err(|x| self.corrupt(format!("alert {}: {x}", k.value())))?;
            out.push(a);
        }
        Ok(out)
    }

    /// Every row of the detectors' state.
    pub fn load_detect_state(&self) -> Result<Vec<Row>, StoreError> {
        let e = |x: redb::Error| self.err(x);
        let tx = self.db().and_then(|d| Ok(d.begin_read()?)).map_err(e)?;
        let table = tx.open_table(DETECT_STATE).map_err(|x| e(x.into()))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Writes and deletes rows of the detectors' state in one transaction.
    pub fn put_detect_state(&self, puts: &[Row], deletes: &[Vec<u8>]) -> Result<(), StoreError> {
        self.transact(|tx| {
            let mut t = tx.open_table(DETECT_STATE)?;
            for k in deletes {
                t.remove(k.as_slice())?;
            }
            for (k, v) in puts {
                t.insert(k.as_slice(), v.as_slice())?;
            }
            Ok(())
        })
    }

    /// Runs `f` in one write transaction and commits it (durably if `fsync`).
    fn transact(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let run = || -> Result<(), redb::Error> {
            let tx = self.begin()?;
            f(&tx)?;
            tx.commit()?;
            Ok(())
        };
        run().map_err(|e| self.err(e))
    }

    /// Empties the store in one transaction (everything but its schema version) and loads the
    /// empty [`State`]: an aggregator giving partitions away keeps only what it rebuilds.
    pub fn clear(&self) -> Result<State, StoreError> {
        self.transact(|tx| {
            tx.delete_table(WATERMARKS)?;
            tx.delete_table(HOSTS)?;
            tx.delete_table(ROLLUPS)?;
            tx.delete_table(ALERTS)?;
            tx.delete_table(DETECT_STATE)?;
            tx.delete_table(HISTORY)?;
            tx.delete_table(JOURNAL)?;
            tx.delete_table(META)?;
            Ok(())
        })?;
        self.init()?;
        self.load()
    }

    /// Writes (by id) and deletes alerts in one transaction.
    pub fn put_alerts(
        &self,
        upserts: &[outflow_proto::v1::Alert],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        self.transact(|tx| {
            let mut t = tx.open_table(ALERTS)?;
            for id in deletes {
                t.remove(id.as_str())?;
            }
            for a in upserts {
                t.insert(a.id.as_str(), &*prost::Message::encode_to_vec(a))?;
            }
            Ok(())
        })
    }

    /// Writes `changes` with their rollups whole in one transaction and empties the journal
    /// (durably if `fsync`): the changes must hold every key the journal touched.
    pub fn commit(&self, changes: &Changes) -> Result<(), StoreError> {
        self.checkpoint_changes(changes, |w| {
            // In key order: neighbouring inserts touch the same B-tree pages.
            let mut sorted: Vec<(&Key, &Rollup)> = changes.rollups.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, rollup) in sorted {
                w.put(key, rollup)?;
            }
            Ok(())
        })
    }

    /// Writes `changes` (their rollups aside) and a group commit's journal `entry` (see
    /// [`journal`]; `None`: it touched no key) in one transaction and commits it (durably if
    /// `fsync`).
    pub fn append(&self, changes: &Changes, entry: Option<&[u8]>) -> Result<(), StoreError> {
        self.transact(|tx| {
            write_changes(tx, changes)?;
            if let Some(entry) = entry {
                let mut j = tx.open_table(JOURNAL)?;
                let next = j.last()?.map_or(0, |(n, _)| n.value() + 1);
                j.insert(next, entry)?;
            }
            outflow_crashpoint::crash_point!("store::before_commit");
            if outflow_crashpoint::error_point!("store::append_fails", self.path.to_string_lossy())
            {
                return Err(redb::Error::Io(std::io::Error::other(
                    "failed on purpose (store::append_fails, OUTFLOW_FAILPOINTS)",
                )));
            }
            Ok(())
        })
    }

    /// Writes whatever `rollups` writes, whole, and empties the journal in one transaction, and
    /// commits it (durably if `fsync`): `rollups` must write every key the journal touched, as
    /// memory holds it. Rollups are best written in key order.
    pub fn checkpoint_with(
        &self,
        rollups: impl FnOnce(&mut RollupWriter<'_>) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        self.checkpoint_changes(&Changes::default(), rollups)
    }

    fn checkpoint_changes(
        &self,
        changes: &Changes,
        rollups: impl FnOnce(&mut RollupWriter<'_>) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        self.transact(|tx| {
            write_changes(tx, changes)?;
            {
                let mut w = RollupWriter {
                    rollups: tx.open_table(ROLLUPS)?,
                    key: Vec::with_capacity(64),
                    value: Vec::with_capacity(512),
                };
                rollups(&mut w)?;
            }
            tx.delete_table(JOURNAL)?;
            tx.open_table(JOURNAL)?;
            outflow_crashpoint::crash_point!("store::before_checkpoint");
            Ok(())
        })
    }

    /// A write transaction, durable at its commit if `fsync`.
    fn begin(&self) -> Result<redb::WriteTransaction, redb::Error> {
        let mut tx = self.db()?.begin_write()?;
        if !self.fsync {
            tx.set_durability(Durability::None)?;
        }
        Ok(tx)
    }
}

/// Writes `changes` but their rollups into `tx`.
fn write_changes(tx: &redb::WriteTransaction, changes: &Changes) -> Result<(), redb::Error> {
    let mut hosts = tx.open_table(HOSTS)?;
    for (id, name) in &changes.hosts {
        hosts.insert(*id, &**name)?;
    }
    let mut wm = tx.open_table(WATERMARKS)?;
    for (agent, seq) in &changes.watermarks {
        wm.insert((&*agent.agent_id, agent.epoch), *seq)?;
    }
    if let Some(end) = changes.end_ms {
        tx.open_table(META)?.insert("end_ms", end)?;
    }
    if let Some(m) = changes.settled_through {
        tx.open_table(META)?.insert("history_settled", m)?;
    }
    if !changes.minutes.is_empty() || changes.end_ms.is_some() {
        let mut history = tx.open_table(HISTORY)?;
        let mut row = Vec::new();
        for (m, minute) in &changes.minutes {
            if *minute == Minute::default() {
                history.remove(*m)?;
            } else {
                row.clear();
                minute.encode(&mut row);
                history.insert(*m, &*row)?;
            }
        }
        if let Some(end) = changes.end_ms {
            // Minutes that left the week (one per minute of batch time, usually).
            history.retain_in(..first_kept(end), |_, _| false)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{Totals, Window};

    #[test]
    fn commit_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let agent = AgentKey {
            agent_id: "a".into(),
            epoch: 9,
        };
        let key = Key::Direct("203.0.113.7".parse().unwrap());
        {
            let (store, mut state) = Store::open(dir.path(), false, 1 << 20).unwrap();
            let mut r = Rollup::default();
            r.add(
                5000,
                0,
                &Totals {
                    response_bytes: 42,
                    ..Default::default()
                },
            );
            let mut ch = Changes::default();
            ch.hosts.push((0, "h0".into()));
            ch.watermarks.insert(agent.clone(), 3);
            ch.end_ms = Some(5000);
            ch.rollups.insert(key.clone(), r);
            store.commit(&ch).unwrap();
            ch.install(&mut state);
        }
        let (_store, state) = Store::open(dir.path(), true, 1 << 20).unwrap();
        assert_eq!(state.watermark(&agent), 3);
        assert_eq!(state.end_ms(), 5000);
        assert_eq!(state.host_name(0), "h0");
        let s = state
            .stats(&crate::aggregate::ClientQuery::Address(
                "203.0.113.7".parse().unwrap(),
            ))
            .unwrap();
        assert_eq!(s[Window::H24.index()].totals.response_bytes, 42);
        assert_eq!(s[Window::H24.index()].hosts, 1);
    }

    #[test]
    fn the_journal_is_replayed_and_checkpointed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::Direct("203.0.113.7".parse().unwrap());
        let totals = Totals {
            response_bytes: 42,
            ..Default::default()
        };
        let entry = |t: u64| {
            let mut e = Vec::new();
            journal::begin(&mut e, t);
            let change = journal::Change {
                granules: [&[(t, totals)], &[]],
                hosts: [&[(0, u32::try_from(t / 10_000).unwrap())], &[]],
                links: &[],
            };
            journal::push(&mut e, &key, &change);
            e
        };
        let journal_rows = |store: &Store| {
            let tx = store.db().unwrap().begin_read().unwrap();
            redb::ReadableTableMetadata::len(&tx.open_table(JOURNAL).unwrap()).unwrap()
        };
        {
            let (store, _) = Store::open(dir.path(), false, 1 << 20).unwrap();
            let mut ch = Changes::default();
            ch.hosts.push((0, "h0".into()));
            ch.end_ms = Some(5000);
            store.append(&ch, Some(&entry(5000))).unwrap();
            store
                .append(&Changes::default(), Some(&entry(15_000)))
                .unwrap();
            // Each entry a row of its own, after the last.
            assert_eq!(journal_rows(&store), 2);
            // Closed without a checkpoint, as after a crash.
        }
        let expect = |state: &State| {
            let s = state
                .stats(&crate::aggregate::ClientQuery::Address(
                    "203.0.113.7".parse().unwrap(),
                ))
                .unwrap();
            assert_eq!(s[Window::H24.index()].totals.response_bytes, 84);
            assert_eq!(s[Window::H24.index()].hosts, 1);
        };
        {
            let (store, state) = Store::open(dir.path(), false, 1 << 20).unwrap();
            expect(&state);
            assert_eq!(journal_rows(&store), 0, "checkpointed at open");
        }
        // What the checkpoint wrote reads back the same, once.
        let (store, state) = Store::open(dir.path(), false, 1 << 20).unwrap();
        expect(&state);
        assert_eq!(journal_rows(&store), 0);
        // An entry of a format a newer collector wrote: refused, saying what to do.
        let mut newer = entry(25_000);
        newer[0] = 9;
        store.append(&Changes::default(), Some(&newer)).unwrap();
        drop(store);
        let e = Store::open(dir.path(), false, 1 << 20).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Journal {
                    error: journal::BadEntry::Format(9),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("stop it with SIGTERM"), "{e}");
    }

    #[test]
    fn schema_3_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META).unwrap().insert("schema", 3).unwrap();
            tx.commit().unwrap();
        }
        let (store, _) = Store::open(dir.path(), false, 1 << 20).unwrap();
        let tx = store.db().unwrap().begin_read().unwrap();
        let found = tx
            .open_table(META)
            .unwrap()
            .get("schema")
            .unwrap()
            .map(|v| v.value());
        assert_eq!(found, Some(SCHEMA));
    }

    #[test]
    fn older_schema_is_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META).unwrap().insert("schema", 2).unwrap();
            tx.commit().unwrap();
        }
        let e = Store::open(dir.path(), false, 1 << 20).unwrap_err();
        assert!(matches!(e, StoreError::Schema { found: 2, .. }), "{e:?}");
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m}");
        assert!(
            m.contains("has schema 2; this collector reads schemas 3 to 4 only: it was written by an older collector"),
            "{m}"
        );
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), false, 1 << 20).unwrap();
        let e = Store::open(dir.path(), false, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("collector.redb"), "{e}");
    }
}
