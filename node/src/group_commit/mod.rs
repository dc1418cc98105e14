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
//!
//! Writes may also be *combined* ([`GroupCommit::write_combined`]): under load many
//! writers queue for redb's one write lock, and each transaction pays for its own commit
//! (copying the B-tree paths it touched, checksums, the journal's pages) even when it
//! touches the same rows as the next one (balances, reputation). A combined write joins a
//! queue; whoever finds no combined transaction running takes the whole queue and runs
//! every write in it, in order, in one transaction, then hands each writer its result and
//! the transaction's ticket, and each waits for durability as above. When one write of the
//! batch fails, the transaction is dropped and each write runs again in its own, so that a
//! write's failure never costs another write anything (hence `FnMut`: a write may run
//! twice, and must compute everything from the transaction it is given). A write that
//! refuses before writing anything says so ([`CombinedError::untouched`]): the others
//! commit as if it had not joined, and a batch of such refusals commits nothing.
//!
//! An async task makes its combined writes through the commit thread instead (`front.rs`;
//! [`GroupCommit::write_combined_async`]): they queue for one thread per database,
//! and no thread waits for them.

mod front;

use std::{
    any::Any,
    collections::HashMap,
    sync::{Arc, Condvar, Mutex, MutexGuard},
};

use front::Front;

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
    /// A combined write has no result: the writer running its transaction panicked
    /// outside the writes (a write's own panic is resumed on its writer's thread).
    #[error(
        "the combined transaction holding this write failed unexpectedly; its outcome is unknown"
    )]
    Lost,
    /// The commit thread of asynchronous writes cannot be started.
    #[error("cannot start the commit thread: {0}")]
    Thread(std::io::Error),
    /// The journal's sync of a commit left to the sync thread failed: the commit may not
    /// be on disk (and the database refuses every later commit).
    #[error("the journal's sync failed: {0}")]
    Sync(std::io::Error),
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
    /// The commit thread's durable commit whose journal sync it left pending
    /// ([`crate::journal::deferring`]): what `durable` becomes once that sync returns.
    pending_covers: Option<u64>,
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

/// A write that can join a combined transaction ([`GroupCommit::write_combined`]): it may
/// run more than once, each time computing its result from the transaction it is given.
pub trait CombinedWrite<R, E>: FnMut(&WriteTransaction) -> Result<R, E> + Send + 'static {}

impl<T, R, E> CombinedWrite<R, E> for T where
    T: FnMut(&WriteTransaction) -> Result<R, E> + Send + 'static
{
}

/// The error of a combined write ([`GroupCommit::write_combined`]).
pub trait CombinedError {
    /// Whether the write returned this error before writing anything to its transaction:
    /// then the writes combined with it commit as if it had not joined. The default,
    /// `false`, drops the transaction and runs each write again alone.
    fn untouched(&self) -> bool {
        false
    }
}

/// What a combined write did to its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    /// It succeeded; what it wrote is to commit.
    Wrote,
    /// It refused before writing anything.
    Untouched,
    /// It failed (or panicked) and may have written part: the transaction must not commit.
    Failed,
}

/// One write of a combined transaction, its function and (once run) its result.
trait Job: Send {
    /// Runs the write in `txn`.
    fn run(&mut self, txn: &WriteTransaction) -> Ran;
    /// The job, to be downcast by the writer that queued it.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
    /// Whether its writer waits for durability (a deferred write does not).
    fn durable(&self) -> bool;
    /// Whether it ran and refused before writing anything ([`CombinedError::untouched`]).
    fn untouched(&self) -> bool;
    /// Whether it ran and succeeded.
    fn succeeded(&self) -> bool;
}

struct Typed<F, R, E> {
    f: F,
    out: Option<Result<R, E>>,
    /// The write panicked (on whichever thread ran it): the panic is resumed on the
    /// writer's own thread, and the write is not run again.
    panic: Option<Box<dyn Any + Send>>,
    durable: bool,
}

impl<F, R, E> Job for Typed<F, R, E>
where
    F: CombinedWrite<R, E>,
    R: Send + 'static,
    E: CombinedError + Send + 'static,
{
    fn run(&mut self, txn: &WriteTransaction) -> Ran {
        if self.panic.is_some() {
            return Ran::Failed;
        }
        let f = &mut self.f;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(txn))) {
            Ok(out) => {
                let ran = match &out {
                    Ok(_) => Ran::Wrote,
                    Err(e) if e.untouched() => Ran::Untouched,
                    Err(_) => Ran::Failed,
                };
                self.out = Some(out);
                ran
            }
            Err(panic) => {
                self.panic = Some(panic);
                self.out = None;
                Ran::Failed
            }
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }

    fn durable(&self) -> bool {
        self.durable
    }

    fn untouched(&self) -> bool {
        matches!(&self.out, Some(Err(e)) if e.untouched())
    }

    fn succeeded(&self) -> bool {
        matches!(&self.out, Some(Ok(_)))
    }
}

/// What became of a queued combined write.
enum Finished {
    /// It ran; when it succeeded, the ticket of the commit that holds it (`None`: that
    /// commit was durable, or the write failed and wrote nothing).
    Ran(Box<dyn Job>, Option<u64>),
    /// The database failed (nothing of it written).
    Failed(GroupCommitError),
}

/// The queue of combined writes.
#[derive(Default)]
struct Combining {
    /// A writer is running a combined transaction.
    running: bool,
    next_id: u64,
    queue: Vec<(u64, Box<dyn Job>)>,
    /// Results not yet taken by their writers.
    done: HashMap<u64, Finished>,
    /// The thread of each writer waiting for its result, to wake it alone when the
    /// result is there (or, first in the queue, when it is to run the next batch).
    waiting: HashMap<u64, std::thread::Thread>,
}

impl std::fmt::Debug for Combining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combining")
            .field("running", &self.running)
            .field("queued", &self.queue.len())
            .field("done", &self.done.len())
            .finish()
    }
}

/// A combined write's result and the ticket of the commit that holds it, from what became
/// of it; a panic of the write is resumed on the caller's thread.
fn unpack<F, R, E>(finished: Finished) -> Result<(Result<R, E>, Option<u64>), GroupCommitError>
where
    F: CombinedWrite<R, E>,
    R: Send + 'static,
    E: CombinedError + Send + 'static,
{
    let (job, ticket) = match finished {
        Finished::Ran(job, ticket) => (job, ticket),
        Finished::Failed(e) => return Err(e),
    };
    let Ok(job) = job.into_any().downcast::<Typed<F, R, E>>() else {
        unreachable!("a combined write's result is of the type it was queued with");
    };
    if let Some(panic) = job.panic {
        std::panic::resume_unwind(panic);
    }
    let Some(out) = job.out else {
        unreachable!("a combined write that ran has a result");
    };
    Ok((out, ticket))
}

/// Makes grouped writes durable for one database. Share one per database.
#[derive(Debug, Default)]
pub struct GroupCommit {
    progress: Mutex<Progress>,
    synced: Condvar,
    combining: Mutex<Combining>,
    /// The commit thread of asynchronous writes, once started ([`front`]).
    front: Mutex<Option<Arc<Front>>>,
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        let front = self.front.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(front) = front.take() {
            front.stop();
        }
    }
}

/// The writer running a combined transaction until dropped: then the batch's writes that
/// have no result (it panicked outside the writes, e.g. in redb's commit) are marked lost,
/// their writers are woken, and so is the first writer queued meanwhile, to run the next
/// batch.
struct Running<'a> {
    group: &'a GroupCommit,
    ids: Vec<u64>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut c = self.group.combining();
        for id in &self.ids {
            if !c.done.contains_key(id) {
                c.done.insert(*id, Finished::Failed(GroupCommitError::Lost));
            }
        }
        c.running = false;
        let mut wake: Vec<std::thread::Thread> = self
            .ids
            .iter()
            .filter_map(|id| c.waiting.get(id).cloned())
            .collect();
        if let Some(next) = c.queue.first().and_then(|(id, _)| c.waiting.get(id)) {
            wake.push(next.clone());
        }
        drop(c);
        for t in wake {
            t.unpark();
        }
    }
}

impl GroupCommit {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn combining(&self) -> MutexGuard<'_, Combining> {
        self.combining.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`GroupCommit::write`], combined with the writes queued meanwhile into one
    /// transaction (see the module doc). `f` may run more than once (once in a combined
    /// transaction that another write's failure dropped, once more alone); each run must
    /// compute its result from the transaction it is given. Returns once what it wrote is
    /// durable; when `f` fails, nothing of it is written and its error is the inner result
    /// (a refusal untouched by `f`, [`CombinedError::untouched`], returns once the commits
    /// it may have read are durable).
    pub fn write_combined<R, E, F>(
        &self,
        db: &Database,
        f: F,
    ) -> Result<Result<R, E>, GroupCommitError>
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        self.progress().writers += 1;
        let _counted = Counted(self);
        let (out, ticket) = self.combine(db, f, true)?;
        match (&out, ticket) {
            (Ok(_), Some(ticket)) => self.wait_durable(db, ticket)?,
            // A refusal read what was committed before it (a claim found recorded): that
            // is on disk before the refusal is answered.
            (Err(e), _) if e.untouched() => {
                let seen = self.progress().committed;
                self.wait_durable(db, seen)?;
            }
            _ => {}
        }
        Ok(out)
    }

    /// [`GroupCommit::write_deferred`], combined with the writes queued meanwhile into one
    /// transaction as [`GroupCommit::write_combined`] (`f` may run twice). Returns once it
    /// is committed, without waiting for the disk, with its [`Ticket`].
    pub fn write_combined_deferred<R, E, F>(
        &self,
        db: &Database,
        f: F,
    ) -> Result<Deferred<R, E>, GroupCommitError>
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        self.progress().writers += 1;
        let _counted = Counted(self);
        let (out, ticket) = self.combine(db, f, false)?;
        Ok(out.map(|out| {
            // Only a write that waits for the disk commits durably alone.
            let ticket = ticket.unwrap_or_else(|| self.progress().durable);
            (out, Ticket(ticket))
        }))
    }

    /// Queues `f`, runs the queue if nobody is, and returns `f`'s result with the ticket
    /// of the commit that holds it (`None`: durable already, or nothing written).
    fn combine<R, E, F>(
        &self,
        db: &Database,
        f: F,
        durable: bool,
    ) -> Result<(Result<R, E>, Option<u64>), GroupCommitError>
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        let mut c = self.combining();
        let id = c.next_id;
        c.next_id += 1;
        c.queue.push((
            id,
            Box::new(Typed {
                f,
                out: None,
                panic: None,
                durable,
            }),
        ));
        c.waiting.insert(id, std::thread::current());
        let finished = loop {
            if let Some(done) = c.done.remove(&id) {
                c.waiting.remove(&id);
                break done;
            }
            if c.running {
                // Woken (`unpark`) when its result is there or it is to run the queue; a
                // wake-up for anything else only loops.
                drop(c);
                std::thread::park();
                c = self.combining();
                continue;
            }
            c.running = true;
            let batch = std::mem::take(&mut c.queue);
            drop(c);
            let running = Running {
                group: self,
                ids: batch.iter().map(|(id, _)| *id).collect(),
            };
            self.run_batch(db, batch);
            drop(running);
            c = self.combining();
        };
        drop(c);
        unpack::<F, R, E>(finished)
    }

    /// Runs a batch of combined writes, in one transaction or, when one of them fails or
    /// the database does, each in its own; each result goes to [`Combining::done`] as soon
    /// as it is known.
    fn run_batch(&self, db: &Database, batch: Vec<(u64, Box<dyn Job>)>) {
        // One write waiting for the disk with nothing else in progress: a plain durable
        // commit, as `write`.
        let alone = batch.len() == 1 && batch[0].1.durable() && {
            let p = self.progress();
            p.writers == 1 && !p.syncing
        };
        // Each write's result as soon as it is known, its writer woken.
        self.run_jobs(db, batch, alone, |id, done| {
            let mut c = self.combining();
            c.done.insert(id, done);
            if let Some(t) = c.waiting.get(&id) {
                t.unpark();
            }
        });
    }

    /// Runs `batch` in one transaction (committed durably when `durable`) or, when one of
    /// its writes fails or the database does, each write in its own (without durability);
    /// hands each write's outcome to `finish` as soon as it is known.
    fn run_jobs(
        &self,
        db: &Database,
        mut batch: Vec<(u64, Box<dyn Job>)>,
        durable: bool,
        mut finish: impl FnMut(u64, Finished),
    ) {
        match self.commit_together(db, &mut batch, durable) {
            Ok(Some(ticket)) => {
                for (id, job) in batch {
                    finish(id, Finished::Ran(job, ticket));
                }
                return;
            }
            // Alone, the outcome is final: failed, nothing written, and the error (the
            // write's or the database's) is the result.
            other if batch.len() == 1 => {
                if let Some((id, job)) = batch.pop() {
                    finish(
                        id,
                        match other {
                            Err(e) => Finished::Failed(e),
                            Ok(_) => Finished::Ran(job, None),
                        },
                    );
                }
                return;
            }
            _ => {}
        }
        for (id, mut job) in batch {
            let done = match self.commit_each(db, &mut job) {
                Ok(ticket) => Finished::Ran(job, ticket),
                Err(e) => Finished::Failed(e),
            };
            finish(id, done);
        }
    }

    /// Runs every job of `batch` in one transaction and commits it (durably when `alone`):
    /// `Some(ticket)` (`Some(None)`: durable already, or every job refused untouched and
    /// nothing was committed), or `None` when a job failed (nothing written).
    fn commit_together(
        &self,
        db: &Database,
        batch: &mut [(u64, Box<dyn Job>)],
        alone: bool,
    ) -> Result<Option<Option<u64>>, GroupCommitError> {
        let mut txn = db.begin_write()?;
        let covers = self.progress().committed;
        if !alone {
            txn.set_durability(Durability::None)?;
        }
        let mut wrote = false;
        for (_, job) in batch.iter_mut() {
            match job.run(&txn) {
                Ran::Wrote => wrote = true,
                Ran::Untouched => {}
                Ran::Failed => return Ok(None),
            }
        }
        if !wrote {
            // Every write refused untouched: nothing to commit, nothing to wait for.
            return Ok(Some(None));
        }
        // The commit thread's durable commit may leave its journal sync pending: counted
        // while this transaction holds the write lock, so that every commit counted up to
        // it is in it, and a deferred write of it has a ticket that is not durable before.
        let counted = (alone && crate::journal::is_deferring()).then(|| self.count_commit().0);
        txn.commit()?;
        if alone {
            let covers = counted.unwrap_or(covers);
            if crate::journal::sync_deferred() {
                // Durable, with all it covers, once that sync returns.
                self.progress().pending_covers = Some(covers);
                return Ok(Some(Some(covers)));
            }
            let mut p = self.progress();
            if covers > p.durable {
                p.durable = covers;
                self.synced.notify_all();
            }
            return Ok(Some(None));
        }
        Ok(Some(Some(self.count_commit().0)))
    }

    /// Runs one job in its own transaction, committed without durability: its ticket, or
    /// `None` when it failed (nothing written).
    fn commit_each(
        &self,
        db: &Database,
        job: &mut Box<dyn Job>,
    ) -> Result<Option<u64>, GroupCommitError> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::None)?;
        if job.run(&txn) != Ran::Wrote {
            return Ok(None);
        }
        txn.commit()?;
        Ok(Some(self.count_commit().0))
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

    use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

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

    /// A write run on its own thread by [`queue_behind`].
    type Writer<T> = Box<dyn FnOnce(&Database, &GroupCommit) -> T + Send>;

    /// Holds redb's write lock while the first of `writes` becomes the combined writer
    /// (blocked in its transaction's start) and the others queue behind it; then lets them
    /// go. Returns each writer's thread, in order.
    fn queue_behind<T: Send + 'static>(
        db: &Arc<Database>,
        group: &Arc<GroupCommit>,
        writes: Vec<Writer<T>>,
    ) -> Vec<std::thread::JoinHandle<T>> {
        let held = db.begin_write().unwrap();
        let mut threads = Vec::new();
        for (i, write) in writes.into_iter().enumerate() {
            let (db2, group2) = (db.clone(), group.clone());
            threads.push(std::thread::spawn(move || write(&db2, &group2)));
            // The first runs the queue (and waits for the lock); the others queue.
            while {
                let c = group.combining();
                !(c.running && c.queue.len() == i)
            } {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        drop(held);
        threads
    }

    #[test]
    fn combined_writes_queued_meanwhile_commit_in_one_transaction_and_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let db = Arc::new(Database::create(&path).unwrap());
            let group = Arc::new(GroupCommit::default());
            let writes: Vec<Writer<u64>> = (0..6u64)
                .map(|k| {
                    Box::new(move |db: &Database, group: &GroupCommit| {
                        group
                            .write_combined(db, move |txn| {
                                txn.open_table(T)?.insert(k, k * 10)?;
                                Ok::<_, redb::Error>(k)
                            })
                            .unwrap()
                            .unwrap()
                    }) as Writer<u64>
                })
                .collect();
            let threads = queue_behind(&db, &group, writes);
            let got: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(got, (0..6).collect::<Vec<_>>());
            // The first ran alone (a durable commit of its own, as `write`, unless the
            // second writer was already counted when it looked: then a counted one); the
            // five queued behind it: one transaction, one counted commit. Uncombined, they
            // would have counted five.
            let p = group.progress();
            assert!((1..=2).contains(&p.committed), "{}", p.committed);
            assert_eq!(p.durable, p.committed);
            assert_eq!(p.writers, 0);
        }
        assert_eq!(reopened(&path, 5), (6, true));
    }

    /// A database at `path` with its group commit and a counter of the writes' runs.
    fn combined_fixture(
        path: &std::path::Path,
    ) -> (
        Arc<Database>,
        Arc<GroupCommit>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        (
            Arc::new(Database::create(path).unwrap()),
            Arc::new(GroupCommit::default()),
            Arc::new(std::sync::atomic::AtomicU64::new(0)),
        )
    }

    /// Which of `keys` are in `T` in the database at `path`, reopened.
    fn keys_present(path: &std::path::Path, keys: std::ops::RangeInclusive<u64>) -> Vec<u64> {
        let db = Database::create(path).unwrap();
        let read = db.begin_read().unwrap();
        let t = read.open_table(T).unwrap();
        keys.filter(|k| t.get(k).unwrap().is_some()).collect()
    }

    #[test]
    fn a_combined_write_that_fails_or_panics_costs_the_others_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let (db, group, runs) = combined_fixture(&path);
            let write = |k: u64,
                         how: &'static str,
                         runs: Arc<std::sync::atomic::AtomicU64>|
             -> Writer<Result<(), redb::Error>> {
                Box::new(move |db: &Database, group: &GroupCommit| {
                    group
                        .write_combined(db, move |txn| {
                            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            txn.open_table(T)?.insert(k, k)?;
                            match how {
                                "fail" => Err(redb::Error::Corrupted("refused".into())),
                                "panic" => panic!("boom"),
                                _ => Ok(()),
                            }
                        })
                        .unwrap()
                })
            };
            let writes = vec![
                write(1, "ok", runs.clone()),
                write(2, "ok", runs.clone()),
                write(3, "fail", runs.clone()),
                write(4, "panic", runs.clone()),
                write(5, "ok", runs.clone()),
            ];
            let threads = queue_behind(&db, &group, writes);
            let got: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
            assert!(matches!(got[0], Ok(Ok(()))));
            assert!(matches!(got[1], Ok(Ok(()))));
            // The failed write gets its own error, the panicking one panics on its own
            // thread; the others committed.
            assert!(matches!(got[2], Ok(Err(_))));
            assert!(got[3].is_err());
            assert!(matches!(got[4], Ok(Ok(()))));
            // Runs: the first alone (1), the four queued behind it together up to the
            // failing one (2), then each of the four alone (4).
            assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 7);
            assert_eq!(group.progress().writers, 0);
            assert!(!group.combining().running);
        }
        assert_eq!(keys_present(&path, 1..=5), vec![1, 2, 5]);
    }

    /// A refusal made before writing anything.
    #[derive(Debug)]
    struct Refused;

    impl CombinedError for Refused {
        fn untouched(&self) -> bool {
            true
        }
    }

    impl CombinedError for redb::Error {}

    #[test]
    fn a_combined_write_refused_untouched_leaves_the_batch_to_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let (db, group, runs) = combined_fixture(&path);
            let write = |k: u64, refuse: bool, runs: Arc<std::sync::atomic::AtomicU64>| {
                Box::new(move |db: &Database, group: &GroupCommit| {
                    group
                        .write_combined(db, move |txn| {
                            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if refuse {
                                return Err(Refused);
                            }
                            txn.open_table(T).unwrap().insert(k, k).unwrap();
                            Ok(())
                        })
                        .unwrap()
                }) as Writer<Result<(), Refused>>
            };
            let writes = vec![
                write(1, false, runs.clone()),
                write(2, true, runs.clone()),
                write(3, false, runs.clone()),
                write(4, true, runs.clone()),
            ];
            let threads = queue_behind(&db, &group, writes);
            let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            assert!(got[0].is_ok() && got[2].is_ok());
            assert!(got[1].is_err() && got[3].is_err());
            // The first alone, then the three queued behind it together, each once: the
            // refusals did not drop the batch's transaction (that would run each again).
            assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 4);
            // A batch of refusals only commits nothing.
            let committed = group.progress().committed;
            let writes = vec![
                write(5, true, runs.clone()),
                write(6, true, runs.clone()),
                write(7, true, runs.clone()),
            ];
            let threads = queue_behind(&db, &group, writes);
            assert!(threads.into_iter().all(|t| t.join().unwrap().is_err()));
            assert_eq!(group.progress().committed, committed);
            assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 7);
            assert_eq!(group.progress().writers, 0);
            assert!(!group.combining().running);
        }
        assert_eq!(keys_present(&path, 1..=7), vec![1, 3]);
    }

    #[test]
    fn a_refusal_returns_once_what_it_read_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db.redb")).unwrap();
        let group = GroupCommit::default();
        let (_, _ticket) = group
            .write_deferred(&db, |txn| {
                txn.open_table(T)?.insert(1, 1)?;
                Ok::<_, redb::Error>(())
            })
            .unwrap()
            .unwrap();
        {
            let p = group.progress();
            assert!(p.durable < p.committed, "{} >= {}", p.durable, p.committed);
        }
        // Refused after reading the row the deferred write committed (not yet on disk).
        let refused = group
            .write_combined(&db, |txn| {
                match txn.open_table(T).unwrap().get(1).unwrap() {
                    Some(_) => Err(Refused),
                    None => Ok(()),
                }
            })
            .unwrap();
        assert!(refused.is_err());
        let p = group.progress();
        assert!(p.durable >= p.committed, "{} < {}", p.durable, p.committed);
    }

    #[test]
    fn a_combined_deferred_write_returns_before_the_disk_and_a_sync_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("db.redb")).unwrap();
        let group = GroupCommit::default();
        let ((), ticket) = group
            .write_combined_deferred(&db, |txn| {
                txn.open_table(T)?.insert(1, 1)?;
                Ok::<_, redb::Error>(())
            })
            .unwrap()
            .unwrap();
        assert!(!group.is_durable(ticket));
        group.sync(&db, ticket).unwrap();
        assert!(group.is_durable(ticket));
        let failed = group
            .write_combined_deferred(&db, |txn| {
                txn.open_table(T)?.insert(2, 2)?;
                Err::<(), _>(redb::Error::Corrupted("refused".into()))
            })
            .unwrap();
        assert!(failed.is_err());
        let read = db.begin_read().unwrap();
        assert!(read.open_table(T).unwrap().get(2).unwrap().is_none());
    }

    /// The child of [`acknowledged_writes_survive_the_process_dying`]: grouped writes from
    /// eight threads (half of them deferred, then synced) and four async tasks (the same,
    /// through the commit thread), each acknowledged on stdout once
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
        // And four async tasks through the commit thread, two of them deferred.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        for i in 8..12u64 {
            let (db, group, out) = (db.clone(), group.clone(), out.clone());
            runtime.spawn(async move {
                for j in 0..1_000u64 {
                    let key = i * 10_000 + j;
                    let insert = move |txn: &WriteTransaction| {
                        txn.open_table(T)?.insert(key, j)?;
                        Ok::<_, redb::Error>(())
                    };
                    if i % 2 == 0 {
                        group
                            .write_combined_async(&db, insert)
                            .await
                            .unwrap()
                            .unwrap();
                    } else {
                        let ((), ticket) = group
                            .write_combined_deferred_async(&db, insert)
                            .await
                            .unwrap()
                            .unwrap();
                        group.sync(&db, ticket).unwrap();
                    }
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ack {key}").unwrap();
                    o.flush().unwrap();
                }
            });
        }
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
        assert!(
            acked.iter().any(|k| *k >= 80_000),
            "no async write acknowledged"
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
