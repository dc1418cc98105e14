//! The node's database: one redb file, `node.redb`, under `--state`.
//!
//! [`State`] owns the writable handle. It opens the file in redb's
//! [`ConcurrencyMode::ExclusiveWriter`] mode: the running node holds the file alone, and
//! commits with one fsync (redb's modes that let other processes read beside a writer force
//! a two-phase commit, two fsyncs, on every write). Other processes (`d402 peers`,
//! `d402 ops-monitor`) ask a running node over its control socket
//! ([`crate::market::ops`]) and open the file read-only through [`StateReader`] only when
//! no node runs. Beside the file lives its write-ahead journal, `node.redb.journal`
//! ([`crate::journal`]): a durable commit is one sequential append and sync there instead
//! of a sync of pages scattered over the database file, and a node that stopped uncleanly
//! has the journal replayed when the database is next opened (by the node or a reader).
//!
//! Each subsystem keeps its tables in its own module (a `redb::TableDefinition` const named
//! after the subsystem, e.g. `"offers"`, `"tasks"`, `"payments"`, `"reputation"`) and
//! reads and writes them through [`State::write`] / [`State::read`] (or [`StateReader`]),
//! which commit with immediate durability before returning: a change is on disk before
//! the caller acknowledges it. Values are CBOR with a size cap
//! ([`encode`] / [`decode`]), so a damaged row is an error, never a panic. This module
//! holds the tables every node has: [`META`] (schema version) and [`PEERS`].

use crate::{
    group_commit::{CombinedError, CombinedWrite, Deferred, GroupCommit, GroupCommitError, Ticket},
    journal::{self, JournalError, Journaled},
};
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use redb::{
    ConcurrencyMode, Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

/// File name of the database inside the state directory.
pub const DB_FILE: &str = "node.redb";

/// Schema version written to [`META`]. Bump it with a migration when a table's encoding
/// changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Small key/value facts about the database itself (`schema` → version).
pub const META: TableDefinition<&str, u32> = TableDefinition::new("meta");

/// Known peers: PeerId bytes → CBOR of [`KnownPeer`].
pub const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");

/// Largest encoded [`KnownPeer`] accepted.
pub const MAX_PEER_ENTRY: usize = 16 * 1024;
/// Most addresses kept per peer.
pub const MAX_PEER_ADDRS: usize = 16;
/// Most protocols kept per peer.
pub const MAX_PEER_PROTOCOLS: usize = 64;
/// Longest address, protocol or agent string kept.
pub const MAX_PEER_STRING: usize = 256;

/// Errors of the state database.
#[derive(Debug, Error)]
pub enum StateError {
    /// The state directory cannot be created or used.
    #[error("state directory {path}: {reason}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
    /// Another process has the database open for writing.
    #[error(
        "the database {0} is in use by another d402 process (is a node with this --state running?)"
    )]
    Locked(PathBuf),
    /// The database's journal cannot be opened or replayed.
    #[error(transparent)]
    Journal(JournalError),
    /// redb failed.
    #[error("database error: {0}")]
    Db(#[from] redb::Error),
    /// A stored value does not decode.
    #[error("damaged {table} row: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The decoding error.
        reason: String,
    },
    /// A write combined with others has no outcome: the writer running their transaction
    /// failed unexpectedly (panicked outside the writes). Whether it was written is unknown.
    #[error("the outcome of the write is unknown: its combined transaction failed unexpectedly")]
    Lost,
    /// The database was written by a newer d402.
    #[error("database schema {found} is newer than this d402 understands ({SCHEMA_VERSION})")]
    Schema {
        /// The version found.
        found: u32,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StateError {
            fn from(e: $t) -> Self {
                StateError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// CBOR of a row value ([`d402_protocol::cbor::to_local`]: rows are this node's own, so
/// they skip canonicalisation, which dominated the coordinator's CPU time).
pub fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>, StateError> {
    d402_protocol::cbor::to_local(value).map_err(|e| StateError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// Decodes a row value, refusing more than `max` bytes (rows written canonically by earlier
/// versions read the same).
pub fn decode<T: DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, StateError> {
    d402_protocol::cbor::from_local(bytes, max, table).map_err(|e| StateError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

/// redb's page cache for a node's database. redb's default (1 GiB) lets a busy node's memory
/// grow by every page it writes until that size (a gateway under load grew ~40 KB per paid
/// task); the pages a node reads again (recent tasks, balances, reputation, peers) fit in far
/// less.
pub const DB_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The writable database of a running node. Cheap to clone; share it between subsystems.
#[derive(Clone)]
pub struct State {
    db: Arc<Database>,
    path: PathBuf,
    group: Arc<GroupCommit>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("path", &self.path).finish()
    }
}

/// A journal that another process holds is the database in use ([`StateError::Locked`]).
fn journal_error(path: &Path, e: JournalError) -> StateError {
    match e {
        JournalError::Locked(_) => StateError::Locked(path.to_path_buf()),
        other => StateError::Journal(other),
    }
}

/// The path of the database in a state directory.
pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join(DB_FILE)
}

impl State {
    /// Opens (creating when missing) the database in `state_dir`, creating the directory
    /// with mode 0700.
    pub fn open(state_dir: &Path) -> Result<State, StateError> {
        let dir_err = |reason: String| StateError::Dir {
            path: state_dir.to_path_buf(),
            reason,
        };
        if !state_dir.exists() {
            fs::create_dir_all(state_dir).map_err(|e| dir_err(e.to_string()))?;
            fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| dir_err(e.to_string()))?;
        } else if !state_dir.is_dir() {
            return Err(dir_err("not a directory".into()));
        }
        let path = db_path(state_dir);
        let backend = Journaled::open(&path, journal::DEFAULT_CAPACITY)
            .map_err(|e| journal_error(&path, e))?;
        let db = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::ExclusiveWriter)
            .set_cache_size(DB_CACHE_BYTES)
            .create_with_backend(backend)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StateError::Locked(path.clone()),
                other => other.into(),
            })?;
        let state = State {
            db: Arc::new(db),
            path,
            group: Arc::default(),
        };
        state.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema")?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => return Err(StateError::Schema { found: v }),
                Some(_) => {}
                None => {
                    meta.insert("schema", SCHEMA_VERSION)?;
                }
            }
            tx.open_table(PEERS)?;
            Ok(())
        })?;
        Ok(state)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared database handle, for subsystems that keep their tables in the same file
    /// through their own API (the local rail's ledger): their write transactions queue
    /// behind every other writer's, as redb has one writer at a time.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// Runs `f` in one write transaction and returns once it is committed durably (writes
    /// made together share one fsync: [`GroupCommit`]). If `f` fails nothing is written.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        self.write_with(f)?
    }

    /// [`State::write`] for a closure with its own error type: the outer error is the
    /// database's, the inner one `f`'s (nothing written).
    pub fn write_with<R, E>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<Result<R, E>, StateError> {
        self.group
            .write(&self.db, f)
            .map_err(|e| self.group_error(e))
    }

    /// [`State::write_with`], combined with concurrent writes into one transaction
    /// ([`GroupCommit::write_combined`]): `f` may run twice and must compute everything
    /// from the transaction it is given.
    pub fn write_combined<R, E, F>(&self, f: F) -> Result<Result<R, E>, StateError>
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        self.group
            .write_combined(&self.db, f)
            .map_err(|e| self.group_error(e))
    }

    /// [`State::write_deferred`], combined with concurrent writes into one transaction
    /// ([`GroupCommit::write_combined_deferred`]; `f` may run twice).
    pub fn write_combined_deferred<R, E, F>(&self, f: F) -> Result<Deferred<R, E>, StateError>
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        self.group
            .write_combined_deferred(&self.db, f)
            .map_err(|e| self.group_error(e))
    }

    /// [`State::write_combined`] for an async task: no thread waits for it
    /// ([`GroupCommit::write_combined_async`]). Resolves once what `f` wrote is durable.
    pub fn write_combined_async<R, E, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<Result<R, E>, StateError>> + Send + 'static
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        let written = self.group.write_combined_async(&self.db, f);
        let me = self.clone();
        async move { written.await.map_err(|e| me.group_error(e)) }
    }

    /// [`State::write_combined_deferred`] for an async task
    /// ([`GroupCommit::write_combined_deferred_async`]).
    pub fn write_combined_deferred_async<R, E, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<Deferred<R, E>, StateError>> + Send + 'static
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        let written = self.group.write_combined_deferred_async(&self.db, f);
        let me = self.clone();
        async move { written.await.map_err(|e| me.group_error(e)) }
    }

    /// Runs `f` in one write transaction committed without waiting for the disk: what it
    /// wrote is visible at once and durable with the next durable commit. Whatever depends
    /// on it is acknowledged only after [`State::sync`] of the returned [`Ticket`]
    /// ([`GroupCommit::write_deferred`]). If `f` fails nothing is written.
    pub fn write_deferred<R, E>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<Deferred<R, E>, StateError> {
        self.group
            .write_deferred(&self.db, f)
            .map_err(|e| self.group_error(e))
    }

    /// [`State::write_deferred`] only if no write transaction is alive on the database (any
    /// writer's, not only this `State`'s): `Ok(None)`, with `f` not run, otherwise. It never
    /// waits, so an async task can make its short deferred commit itself, without a hop to
    /// the blocking pool and back, and fall back to the pool on `None`.
    pub fn try_write_deferred<R, E>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<Option<Deferred<R, E>>, StateError> {
        self.group
            .try_write_deferred(&self.db, f)
            .map_err(|e| self.group_error(e))
    }

    /// Returns once every commit made before the call is on disk (a durable commit that
    /// begins after them, shared with concurrent writers).
    pub fn barrier(&self) -> Result<(), StateError> {
        self.write(|_| Ok(()))
    }

    /// Whether the deferred write of `ticket` is on disk already (no waiting).
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        self.group.is_durable(ticket)
    }

    /// Returns once the deferred write of `ticket` is on disk.
    pub fn sync(&self, ticket: Ticket) -> Result<(), StateError> {
        self.group
            .sync(&self.db, ticket)
            .map_err(|e| self.group_error(e))
    }

    fn group_error(&self, e: GroupCommitError) -> StateError {
        match e {
            GroupCommitError::Transaction(e) => e.into(),
            GroupCommitError::Commit(e) => e.into(),
            GroupCommitError::Durability(e) => StateError::Dir {
                path: self.path.clone(),
                reason: e.to_string(),
            },
            GroupCommitError::Lost => StateError::Lost,
            GroupCommitError::Thread(e) | GroupCommitError::Sync(e) => {
                StateError::Db(redb::Error::Io(e))
            }
        }
    }

    /// Runs `f` in one read transaction.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        f(&self.db.begin_read()?)
    }

    /// Inserts or replaces a known peer, committed before it returns.
    pub fn upsert_peer(&self, peer_id: &[u8], peer: &KnownPeer) -> Result<(), StateError> {
        let bytes = encode("peers", &peer.capped())?;
        self.write(|tx| {
            tx.open_table(PEERS)?.insert(peer_id, bytes.as_slice())?;
            Ok(())
        })
    }

    /// Forgets a peer.
    pub fn remove_peer(&self, peer_id: &[u8]) -> Result<bool, StateError> {
        self.write(|tx| Ok(tx.open_table(PEERS)?.remove(peer_id)?.is_some()))
    }

    /// Every known peer, most recently seen first.
    pub fn known_peers(&self) -> Result<Vec<(Vec<u8>, KnownPeer)>, StateError> {
        known_peers_in(&*self.db)
    }
}

/// A read-only view of a node's database when no node runs ([`StateError::Locked`] while
/// one does: ask it over its control socket instead).
pub struct StateReader {
    db: ReadOnlyDatabase,
}

impl StateReader {
    /// Opens the database in `state_dir` read-only. After an unclean stop of its node it
    /// first replays the journal and lets redb repair the file (what the node's next start
    /// would do), so that `d402 peers` and `d402 ops-monitor` read a crashed node's state.
    pub fn open(state_dir: &Path) -> Result<StateReader, StateError> {
        let path = db_path(state_dir);
        if !path.exists() {
            return Err(StateError::Dir {
                path: state_dir.to_path_buf(),
                reason: format!("no database {DB_FILE} here (has a node run with this --state?)"),
            });
        }
        // A node that stopped uncleanly left commits in the journal only.
        journal::recover(&path).map_err(|e| journal_error(&path, e))?;
        let open = || {
            redb::Builder::new()
                .set_concurrency_mode(ConcurrencyMode::ExclusiveWriter)
                .open_read_only(&path)
        };
        let db = match open() {
            // The node stopped uncleanly and redb repairs a file only when it opens it for
            // writing: do that (as the node's next start would), then read.
            Err(redb::DatabaseError::RepairAborted) => {
                drop(State::open(state_dir)?);
                open()
            }
            other => other,
        }
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StateError::Locked(path.clone()),
            other => other.into(),
        })?;
        Ok(StateReader { db })
    }

    /// Runs `f` in one read transaction.
    pub fn read<R>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        f(&self.db.begin_read()?)
    }

    /// Every known peer, most recently seen first.
    pub fn known_peers(&self) -> Result<Vec<(Vec<u8>, KnownPeer)>, StateError> {
        known_peers_in(&self.db)
    }
}

fn known_peers_in(db: &impl ReadableDatabase) -> Result<Vec<(Vec<u8>, KnownPeer)>, StateError> {
    let tx = db.begin_read()?;
    let table = match tx.open_table(PEERS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        let peer: KnownPeer = decode("peers", v.value(), MAX_PEER_ENTRY)?;
        out.push((k.value().to_vec(), peer));
    }
    out.sort_by_key(|a| std::cmp::Reverse(a.1.last_seen_ms));
    Ok(out)
}

/// What the node knows about a peer it has verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownPeer {
    /// Addresses from the peer's signed peer record (multiaddr strings).
    pub addrs: Vec<String>,
    /// Protocols the peer announced in identify.
    pub protocols: Vec<String>,
    /// The peer's agent string.
    pub agent: String,
    /// Whether it serves the Kademlia DHT (it is put in the routing table).
    pub kad_server: bool,
    /// Whether it is a rendezvous point.
    pub rendezvous_point: bool,
    /// When it was first verified (Unix milliseconds).
    pub first_seen_ms: u64,
    /// When it was last verified (Unix milliseconds).
    pub last_seen_ms: u64,
}

fn cap_strings(v: &[String], n: usize) -> Vec<String> {
    v.iter()
        .filter(|s| s.len() <= MAX_PEER_STRING)
        .take(n)
        .cloned()
        .collect()
}

impl KnownPeer {
    /// A copy within the size caps (extra addresses and protocols dropped).
    pub fn capped(&self) -> KnownPeer {
        KnownPeer {
            addrs: cap_strings(&self.addrs, MAX_PEER_ADDRS),
            protocols: cap_strings(&self.protocols, MAX_PEER_PROTOCOLS),
            agent: self.agent.chars().take(MAX_PEER_STRING / 4).collect(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(last: u64) -> KnownPeer {
        KnownPeer {
            addrs: vec!["/ip4/127.0.0.1/tcp/9000".into()],
            protocols: vec!["/d402/kad/1.0.0".into()],
            agent: "d402/test".into(),
            kad_server: true,
            rendezvous_point: false,
            first_seen_ms: 1,
            last_seen_ms: last,
        }
    }

    #[test]
    fn peers_persist_across_reopen_and_sort_by_last_seen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = State::open(dir.path()).unwrap();
            s.upsert_peer(b"a", &peer(10)).unwrap();
            s.upsert_peer(b"b", &peer(20)).unwrap();
            s.upsert_peer(b"a", &peer(30)).unwrap();
        }
        let s = State::open(dir.path()).unwrap();
        let peers = s.known_peers().unwrap();
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].0, b"a");
        assert_eq!(peers[0].1.last_seen_ms, 30);
        assert!(s.remove_peer(b"b").unwrap());
        assert_eq!(s.known_peers().unwrap().len(), 1);
    }

    #[test]
    fn reader_is_refused_while_the_writer_is_open_and_reads_after() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.upsert_peer(b"a", &peer(10)).unwrap();
        s.upsert_peer(b"b", &peer(11)).unwrap();
        assert!(matches!(
            StateReader::open(dir.path()),
            Err(StateError::Locked(_))
        ));
        drop(s);
        let r = StateReader::open(dir.path()).unwrap();
        assert_eq!(r.known_peers().unwrap().len(), 2);
        // A reader keeps writers out in turn.
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::Locked(_))
        ));
    }

    /// The child of [`a_reader_reads_what_a_node_that_died_had_committed`]: commits a peer,
    /// then dies without closing anything.
    fn die_after_commit(dir: &Path) -> ! {
        let s = State::open(dir).unwrap();
        s.upsert_peer(b"committed", &peer(42)).unwrap();
        std::process::abort();
    }

    #[test]
    fn a_reader_reads_what_a_node_that_died_had_committed() {
        if let Ok(dir) = std::env::var("D402_STATE_DIE_CHILD") {
            die_after_commit(Path::new(&dir));
        }
        let dir = tempfile::tempdir().unwrap();
        let child = crate::test_child::rerun(
            "state::tests::a_reader_reads_what_a_node_that_died_had_committed",
            "D402_STATE_DIE_CHILD",
            dir.path(),
        );
        assert!(!child.status.success(), "the child was to abort");
        // Journal replayed and the file repaired, then read (`d402 peers` after a crash).
        let r = StateReader::open(dir.path()).unwrap();
        let peers = r.known_peers().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].0, b"committed");
        assert_eq!(peers[0].1.last_seen_ms, 42);
        drop(r);
        // And the node starts again on it.
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.known_peers().unwrap().len(), 1);
    }

    #[test]
    fn second_writer_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _s = State::open(dir.path()).unwrap();
        // In-process a second open of the same file is refused by redb too.
        let err = State::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StateError::Locked(_) | StateError::Db(_)),
            "{err}"
        );
    }

    #[test]
    fn damaged_rows_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.write(|tx| {
            tx.open_table(PEERS)?
                .insert(&b"x"[..], &b"\xff\x00garbage"[..])?;
            Ok(())
        })
        .unwrap();
        assert!(matches!(
            s.known_peers(),
            Err(StateError::Corrupt { table: "peers", .. })
        ));
    }

    #[test]
    fn oversized_fields_are_capped() {
        let mut p = peer(1);
        p.addrs = (0..100).map(|i| format!("/ip4/1.2.3.4/tcp/{i}")).collect();
        p.protocols.push("x".repeat(10_000));
        let c = p.capped();
        assert_eq!(c.addrs.len(), MAX_PEER_ADDRS);
        assert!(c.protocols.iter().all(|s| s.len() <= MAX_PEER_STRING));
        assert!(encode("peers", &c).unwrap().len() < MAX_PEER_ENTRY);
    }
}
