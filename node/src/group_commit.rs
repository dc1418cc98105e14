//! Group commit for the node's redb database.
//!
//! A durable redb commit ends in an fsync, and redb has one writer at a time: with every
//! write durable on its own, a busy gateway's writes queue behind each other's fsyncs and
//! its throughput is one write per fsync. Here each write commits without durability
//! ([`redb::Durability::None`]: visible at once, on disk only with the next durable commit)
//! and its caller then waits until a durable commit covers it. Whoever waits first makes
//! that durable commit (an empty write transaction, which persists every non-durable commit
//! before it); callers that committed meanwhile wait for it, or for the next one, and share
//! its fsync. Nobody returns, so nothing is acknowledged, before its write is on disk. A
//! write that starts while no other is in progress commits durably at once (grouping
//! would only add the empty commit's cost).
//!
//! What another thread reads may be a write not yet on disk (for the few hundred
//! microseconds of an fsync); everything that acknowledges goes through a write and waits.
//!
//! A write may also be *deferred* ([`GroupCommit::write_deferred`]): it commits without
//! durability and returns a [`Ticket`] at once; it becomes durable with the next durable
//! commit (any write's), and [`GroupCommit::sync`] waits for that before anything that
//! depends on it is acknowledged. The coordinator uses it for a task's creation: nobody is
//! answered before the task's decision commits durably, and that commit persists the
//! creation too, so the creation's own fsync would only add latency (DECISIONS, "Deferred
//! durability for a task's creation").

use std::sync::{Condvar, Mutex, MutexGuard};

use redb::{Database, Durability, WriteTransaction};

/// Errors of a grouped write.
#[derive(Debug, thiserror::Error)]
pub enum GroupCommitError {
    /// redb refused to start or commit a transaction.
    #[error(transparent)]
    Transaction(#[from] redb::TransactionError),
    /// redb could not commit.
    #[error(transparent)]
    Commit(#[from] redb::CommitError),
    /// The database refuses non-durable commits (it is shared between processes).
    #[error(transparent)]
    Durability(#[from] redb::SetDurabilityError),
}

#[derive(Debug, Default)]
struct Progress {
    /// Non-durable commits made (a sequence number per commit).
    committed: u64,
    /// Every commit up to this number is durable.
    durable: u64,
    /// A durable commit is in progress.
    syncing: bool,
    /// Writes in progress (from their start until they return).
    writers: usize,
}

/// A writer counted in [`Progress::writers`] until dropped, so that a write that fails or
/// panics half way is not counted forever (no later write would commit alone).
struct Counted<'a>(&'a GroupCommit);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.progress().writers -= 1;
    }
}

/// A deferred write's place in the order of commits ([`GroupCommit::write_deferred`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a deferred write is acknowledged only after `sync` of its ticket"]
pub struct Ticket(u64);

/// What a deferred write's function returned, with the commit's [`Ticket`] when it
/// succeeded (nothing is written when it failed).
pub type Deferred<R, E> = Result<(R, Ticket), E>;

/// Makes grouped writes durable for one database. Share one per database.
#[derive(Debug, Default)]
pub struct GroupCommit {
    progress: Mutex<Progress>,
    synced: Condvar,
}

impl GroupCommit {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in a write transaction of `db` and returns once what it wrote is durable.
    /// When `f` fails, its transaction is dropped (nothing written) and its error returned
    /// as the inner result.
    pub fn write<R, E>(
        &self,
        db: &Database,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<Result<R, E>, GroupCommitError> {
        let alone = {
            let mut p = self.progress();
            p.writers += 1;
            p.writers == 1 && !p.syncing
        };
        let _counted = Counted(self);
        self.write_as(db, f, alone)
    }

    /// Runs `f` in a write transaction of `db` committed without durability, and returns
    /// at once with the commit's [`Ticket`]: what `f` wrote is visible, and on disk once a
    /// later durable commit (any writer's, or [`GroupCommit::sync`]) covers it. Nothing
    /// that depends on it may be acknowledged before `sync` of the ticket returns. When `f`
    /// fails, nothing is written.
    pub fn write_deferred<R, E>(
        &self,
        db: &Database,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<Deferred<R, E>, GroupCommitError> {
        self.progress().writers += 1;
        let _counted = Counted(self);
        let txn = db.begin_write()?;
        self.commit_deferred(txn, f)
    }

    /// [`GroupCommit::write_deferred`] only if redb's write lock is free at once: `Ok(None)`,
    /// with `f` not run and nothing written, while any write transaction on `db` is alive
    /// (this group's or another's, such as a durable commit in its fsync). It never waits,
    /// so an async task can call it and fall back to the blocking pool on `None`.
    pub fn try_write_deferred<R, E>(
        &self,
        db: &Database,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<Option<Deferred<R, E>>, GroupCommitError> {
        self.progress().writers += 1;
        let _counted = Counted(self);
        let txn = match db.try_begin_write() {
            Ok(txn) => txn,
            Err(redb::TransactionError::WouldBlock) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        self.commit_deferred(txn, f).map(Some)
    }

    /// Runs `f` in `txn` and commits it without durability (the writer already counted).
    fn commit_deferred<R, E>(
        &self,
        mut txn: WriteTransaction,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<Deferred<R, E>, GroupCommitError> {
        txn.set_durability(Durability::None)?;
        let out = match f(&txn) {
            Ok(out) => out,
            Err(e) => return Ok(Err(e)),
        };
        txn.commit()?;
        Ok(Ok((out, self.count_commit())))
    }

    /// Returns once the deferred write of `ticket` is durable, making a durable commit
    /// when no other has covered it yet (shared with concurrent writers).
    pub fn sync(&self, db: &Database, ticket: Ticket) -> Result<(), GroupCommitError> {
        self.wait_durable(db, ticket.0)
    }

    /// Whether the deferred write of `ticket` is durable already (no waiting).
    pub fn is_durable(&self, ticket: Ticket) -> bool {
        self.progress().durable >= ticket.0
    }

    /// Counts a non-durable commit that has returned; its ticket number.
    fn count_commit(&self) -> Ticket {
        let mut p = self.progress();
        p.committed += 1;
        Ticket(p.committed)
    }

    /// [`GroupCommit::write`] once the writer is counted: `alone`, a plain durable commit.
    fn write_as<R, E>(
        &self,
        db: &Database,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
        alone: bool,
    ) -> Result<Result<R, E>, GroupCommitError> {
        let mut txn = db.begin_write()?;
        // Non-durable commits counted while this transaction is open all returned before
        // it began (redb has one writer at a time): a durable commit of it persists them.
        let covers = self.progress().committed;
        if !alone {
            txn.set_durability(Durability::None)?;
        }
        let out = match f(&txn) {
            Ok(out) => out,
            Err(e) => return Ok(Err(e)),
        };
        txn.commit()?;
        if alone {
            let mut p = self.progress();
            if covers > p.durable {
                p.durable = covers;
                self.synced.notify_all();
            }
            return Ok(Ok(out));
        }
        let ticket = self.count_commit();
        self.wait_durable(db, ticket.0)?;
        Ok(Ok(out))
    }

    /// Waits until commit `ticket` is durable, making the durable commit if nobody is.
    fn wait_durable(&self, db: &Database, ticket: u64) -> Result<(), GroupCommitError> {
        let mut p = self.progress();
        loop {
            if p.durable >= ticket {
                return Ok(());
            }
            if p.syncing {
                p = self.synced.wait(p).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            p.syncing = true;
            drop(p);
            let syncing = Syncing(self);
            let synced = self.sync_once(db, ticket);
            drop(syncing);
            synced?;
            p = self.progress();
        }
    }

    /// The durable commit of [`GroupCommit::wait_durable`]: an empty write transaction,
    /// skipped when a durable commit covered `ticket` while it waited for redb's write lock.
    fn sync_once(&self, db: &Database, ticket: u64) -> Result<(), GroupCommitError> {
        let txn = db.begin_write()?;
        // Every commit counted by now has returned from `commit` (redb has one writer at a
        // time, and this transaction holds it): committing this one persists them all.
        let upto = {
            let p = self.progress();
            if p.durable >= ticket {
                // Dropped uncommitted: nothing to write.
                return Ok(());
            }
            p.committed
        };
        txn.commit()?;
        let mut p = self.progress();
        p.durable = p.durable.max(upto);
        Ok(())
    }
}

/// The writer making a durable commit for the others ([`Progress::syncing`]) until dropped:
/// then the flag is cleared and the waiters woken, also when that commit failed or panicked
/// (they would otherwise wait for it forever).
struct Syncing<'a>(&'a GroupCommit);

impl Drop for Syncing<'_> {
    fn drop(&mut self) {
        self.0.progress().syncing = false;
        self.0.synced.notify_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    #[test]
    fn grouped_writes_are_durable_across_a_reopen_and_failures_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let db = Arc::new(Database::create(&path).unwrap());
            let group = Arc::new(GroupCommit::default());
            let threads: Vec<_> = (0..8u64)
                .map(|i| {
                    let (db, group) = (db.clone(), group.clone());
                    std::thread::spawn(move || {
                        for j in 0..25u64 {
                            group
                                .write(&db, |txn| {
                                    txn.open_table(T)?.insert(i * 100 + j, j)?;
                                    Ok::<_, redb::Error>(())
                                })
                                .unwrap()
                                .unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let failed = group
                .write(&db, |txn| {
                    txn.open_table(T)?.insert(9_999, 1)?;
                    Err::<(), _>(redb::Error::Corrupted("refused".into()))
                })
                .unwrap();
            assert!(failed.is_err());
            // Writes alone commit durably; the others are counted, and all made durable.
            let p = group.progress();
            assert!(p.committed <= 200);
            assert_eq!(p.durable, p.committed);
            assert_eq!(p.writers, 0);
        }
        // Reopened: every acknowledged write is there, the failed one is not.
        assert_eq!(reopened(&path, 9_999), (200, false));
    }

    /// The rows in a reopened database at `path`, and whether `key` is among them.
    fn reopened(path: &std::path::Path, key: u64) -> (u64, bool) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(T).unwrap();
        (t.len().unwrap(), t.get(key).unwrap().is_some())
    }

    #[test]
    fn a_tried_deferred_write_runs_only_when_the_write_lock_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db.redb")).unwrap();
        let group = GroupCommit::default();
        let insert = |k: u64| {
            move |txn: &WriteTransaction| {
                txn.open_table(T)?.insert(k, k)?;
                Ok::<_, redb::Error>(())
            }
        };
        // Free: it commits (without durability) and gives a ticket.
        let ((), ticket) = group
            .try_write_deferred(&db, insert(1))
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!group.is_durable(ticket));
        // Another write transaction alive on the database (not this group's, as the local
        // rail's own writes): nothing is run or written, and it is not left counted.
        let other = db.begin_write().unwrap();
        let ran = std::cell::Cell::new(false);
        let tried = group
            .try_write_deferred(&db, |txn: &WriteTransaction| {
                ran.set(true);
                insert(2)(txn)
            })
            .unwrap();
        assert!(tried.is_none() && !ran.get());
        drop(other);
        group.sync(&db, ticket).unwrap();
        let read = db.begin_read().unwrap();
        let t = read.open_table(T).unwrap();
        assert!(t.get(1).unwrap().is_some() && t.get(2).unwrap().is_none());
    }

    #[test]
    fn a_deferred_write_is_durable_once_a_later_durable_commit_or_sync_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let db = Database::create(&path).unwrap();
        let group = GroupCommit::default();
        let insert = |k: u64| {
            move |txn: &WriteTransaction| {
                txn.open_table(T)?.insert(k, k)?;
                Ok::<_, redb::Error>(())
            }
        };
        let ((), first) = group.write_deferred(&db, insert(1)).unwrap().unwrap();
        assert!(!group.is_durable(first));
        // Visible at once.
        let read = db.begin_read().unwrap();
        assert!(read.open_table(T).unwrap().get(1).unwrap().is_some());
        drop(read);
        // A durable write alone covers every deferred one before it.
        group.write(&db, insert(2)).unwrap().unwrap();
        assert!(group.is_durable(first));
        let ((), second) = group.write_deferred(&db, insert(3)).unwrap().unwrap();
        assert!(second > first && !group.is_durable(second));
        group.sync(&db, second).unwrap();
        assert!(group.is_durable(second));
        // A failed deferred write writes nothing and takes no ticket.
        let failed = group
            .write_deferred(&db, |txn: &WriteTransaction| {
                txn.open_table(T)?.insert(4, 4)?;
                Err::<(), _>(redb::Error::Corrupted("refused".into()))
            })
            .unwrap();
        assert!(failed.is_err());
        assert_eq!(group.progress().writers, 0);
        drop(db);
        assert_eq!(reopened(&path, 4), (3, false));
    }

    #[test]
    fn a_write_that_panics_is_not_counted_as_a_writer_any_more() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db.redb")).unwrap();
        let group = GroupCommit::default();
        for deferred in [false, true] {
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let boom = |_: &WriteTransaction| -> Result<(), redb::Error> { panic!("boom") };
                if deferred {
                    let _ = group.write_deferred(&db, boom);
                } else {
                    let _ = group.write(&db, boom);
                }
            }));
            assert!(panicked.is_err());
            assert_eq!(group.progress().writers, 0);
        }
    }

    /// The child of [`acknowledged_writes_survive_the_process_dying`]: grouped writes from
    /// eight threads (half of them deferred, then synced), each acknowledged on stdout once
    /// `write` returns, then an abort (no destructor runs, nothing is flushed on the way
    /// out). Through the node's journal
    /// ([`crate::journal`]), with a small ring so that it wraps and is checkpointed while
    /// the threads write.
    fn crash_child(path: &std::path::Path) -> ! {
        use std::io::Write;
        let journaled = crate::journal::Journaled::open(path, 256 << 10).unwrap();
        let db = Arc::new(Database::builder().create_with_backend(journaled).unwrap());
        let group = Arc::new(GroupCommit::default());
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let (db, group, out) = (db.clone(), group.clone(), out.clone());
                std::thread::spawn(move || {
                    for j in 0..1_000u64 {
                        let key = i * 10_000 + j;
                        let insert = |txn: &WriteTransaction| {
                            txn.open_table(T)?.insert(key, j)?;
                            Ok::<_, redb::Error>(())
                        };
                        if i % 2 == 0 {
                            group.write(&db, insert).unwrap().unwrap();
                        } else {
                            // Deferred, then acknowledged only once synced.
                            let ((), ticket) = group.write_deferred(&db, insert).unwrap().unwrap();
                            group.sync(&db, ticket).unwrap();
                        }
                        let mut o = out.lock().unwrap();
                        writeln!(o, "ack {key}").unwrap();
                        o.flush().unwrap();
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(150));
        let _ = out.lock().map(|mut o| o.flush());
        drop(threads);
        std::process::abort();
    }

    #[test]
    fn acknowledged_writes_survive_the_process_dying() {
        if let Ok(path) = std::env::var("D402_GROUP_COMMIT_CHILD") {
            crash_child(std::path::Path::new(&path));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let child = crate::test_child::rerun(
            "group_commit::tests::acknowledged_writes_survive_the_process_dying",
            "D402_GROUP_COMMIT_CHILD",
            &path,
        );
        assert!(!child.status.success(), "the child was to abort");
        let acked: Vec<u64> = String::from_utf8_lossy(&child.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("ack ")?.parse().ok())
            .collect();
        assert!(
            acked.len() > 8,
            "too few writes acknowledged: {}",
            acked.len()
        );
        // The journal is replayed on open (the child left it unclean).
        let journaled =
            crate::journal::Journaled::open(&path, crate::journal::DEFAULT_CAPACITY).unwrap();
        let mut db = Database::builder().create_with_backend(journaled).unwrap();
        assert!(db.check_integrity().unwrap());
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(T).unwrap();
        for key in &acked {
            assert!(
                t.get(*key).unwrap().is_some(),
                "write {key} was acknowledged and is lost"
            );
        }
    }
}
