//! The asynchronous front of group commit: combined writes submitted from async tasks
//! ([`GroupCommit::write_combined_async`], [`GroupCommit::write_combined_deferred_async`]).
//!
//! A combined write made from an async task used to take a thread of Tokio's blocking pool
//! for as long as it queued, ran and waited for the disk, and each such thread parked and
//! was woken once or twice per write: under load, those hand-offs were most of a gateway's
//! context switches (BENCHMARKS, "Session 16"). Here the write joins a queue and its task
//! awaits a channel. One thread per database, the *commit thread*, takes everything queued
//! at once and runs it in one transaction, committed durably when any of its writes waits
//! for the disk (one commit where a non-durable commit and an empty durable one were made
//! before). That commit leaves its journal sync pending ([`crate::journal::deferring`]):
//! the thread answers the writes that do not wait for the disk at once and hands the others,
//! with the pending sync, to a second thread, the *sync thread*, which makes the sync and
//! then answers them, batch after batch in order. Meanwhile the commit thread runs the
//! next batch instead of waiting for the disk. (A database without a journal syncs in the
//! commit, and the commit thread answers everything itself.)
//!
//! The rules are those of the blocking combined writes: a write may run twice (when another
//! write of its batch fails, each runs again alone), its failure costs the others nothing,
//! its panic is resumed in the task that awaits it, and nobody is answered before what they
//! depend on is durable. A panic outside the writes (in redb) loses the batch's outcomes
//! ([`GroupCommitError::Lost`]); the thread goes on with the next batch. The thread holds
//! neither the database nor the group between batches, and ends when its [`GroupCommit`] is
//! dropped.

use std::{
    future::Future,
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
};

use redb::Database;
use tokio::sync::oneshot;

use crate::journal::PendingSync;

use super::{
    CombinedError, CombinedWrite, Deferred, Finished, GroupCommit, GroupCommitError, Job, Ticket,
    Typed, unpack,
};

/// The queue of one database's commit thread.
#[derive(Default)]
pub(super) struct Front {
    queue: Mutex<Queue>,
    /// Wakes the commit thread (jobs queued, or stop).
    ready: Condvar,
    /// Batches taken by the thread.
    #[cfg(test)]
    batches: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = self.queue();
        f.debug_struct("Front")
            .field("queued", &q.jobs.len())
            .field("stop", &q.stop)
            .finish()
    }
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Queued>,
    /// The group was dropped: the thread ends once the queue is empty.
    stop: bool,
}

/// A write waiting for the commit thread.
struct Queued {
    job: Box<dyn Job>,
    reply: oneshot::Sender<Finished>,
    writer: Writer,
    db: Arc<Database>,
}

/// A submitted write, counted in the group's writers until dropped (answered, or lost
/// with its batch), so that `write` does not take itself to be alone meanwhile.
struct Writer(Arc<GroupCommit>);

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.progress().writers -= 1;
    }
}

impl Front {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new front, its commit thread and its sync thread.
    fn start() -> Result<Arc<Front>, GroupCommitError> {
        let front = Arc::new(Front::default());
        let served = front.clone();
        let (held, to_sync) = mpsc::channel();
        std::thread::Builder::new()
            .name("d402-sync".into())
            .spawn(move || answer_when_synced(to_sync))
            .map_err(GroupCommitError::Thread)?;
        std::thread::Builder::new()
            .name("d402-commit".into())
            .spawn(move || served.serve(held))
            .map_err(GroupCommitError::Thread)?;
        Ok(front)
    }

    /// Ends the commit thread once it has answered what is queued.
    pub(super) fn stop(&self) {
        self.queue().stop = true;
        self.ready.notify_one();
    }

    /// The commit thread: runs everything queued, batch after batch; hands the answers that
    /// wait for a pending journal sync to the sync thread (which ends after them when this
    /// thread ends and drops `held`).
    fn serve(&self, held: mpsc::Sender<Held>) {
        loop {
            let batch = {
                let mut q = self.queue();
                while q.jobs.is_empty() && !q.stop {
                    q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                if q.jobs.is_empty() {
                    return;
                }
                std::mem::take(&mut q.jobs)
            };
            #[cfg(test)]
            self.batches
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (answers, waiting) = {
                let Some(first) = batch.first() else {
                    continue;
                };
                let (group, db) = (first.writer.0.clone(), first.db.clone());
                // A panic outside the writes (a write's own is kept for its caller) drops
                // the batch's reply channels: their callers get `Lost`.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    group.run_front(&db, batch)
                })) {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        tracing::error!(
                            "a combined transaction failed unexpectedly; its writes' outcomes are unknown"
                        );
                        continue;
                    }
                }
            };
            // This thread's handles of the database and the group are dropped: the sync
            // thread may answer at once.
            if let Some(w) = waiting
                && let Err(mpsc::SendError(w)) = held.send(w)
            {
                // No sync thread (it cannot have ended before this one): the sync is
                // made here.
                answer_held(w);
            }
            send(answers);
        }
    }
}

/// Answers, once each is dropped its hold of the group: a caller may close the database
/// (and open it again) as soon as it is answered.
fn send(answers: Vec<Answer>) {
    for (reply, writer, done) in answers {
        drop(writer);
        let _ = reply.send(done);
    }
}

/// Answers that wait for a durable commit whose journal sync is pending, with that sync
/// and what the group's durable mark becomes once it returns.
pub(super) struct Held {
    answers: Vec<Answer>,
    sync: PendingSync,
    covers: u64,
}

/// The sync thread: makes each batch's pending journal sync, in order, then answers the
/// batch. Meanwhile the commit thread runs the next batches.
fn answer_when_synced(held: mpsc::Receiver<Held>) {
    while let Ok(h) = held.recv() {
        answer_held(h);
    }
}

/// Waits for `h`'s sync and answers its writes: with their outcome once the commit is
/// durable (the group's durable mark moved first), or with the sync's error.
fn answer_held(h: Held) {
    let Held {
        mut answers,
        sync,
        covers,
    } = h;
    match sync.wait() {
        Ok(()) => {
            if let Some((_, Writer(group), _)) = answers.first() {
                let mut p = group.progress();
                if covers > p.durable {
                    p.durable = covers;
                    group.synced.notify_all();
                }
            }
        }
        Err(e) => {
            let kind = e.kind();
            let why = e.to_string();
            for (_, _, done) in &mut answers {
                *done = Finished::Failed(GroupCommitError::Sync(std::io::Error::new(
                    kind,
                    why.clone(),
                )));
            }
        }
    }
    send(answers);
}

impl GroupCommit {
    /// [`GroupCommit::write_combined`] for an async task: `f` joins the commit thread's
    /// queue (see the module doc) and the returned future resolves once what it wrote is
    /// durable (a refusal untouched by `f`, once the commits it may have read are).
    pub fn write_combined_async<R, E, F>(
        self: &Arc<Self>,
        db: &Arc<Database>,
        f: F,
    ) -> impl Future<Output = Result<Result<R, E>, GroupCommitError>> + Send + 'static
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        let written = self.submitted(db, f, true);
        async move { Ok(written.await?.0) }
    }

    /// [`GroupCommit::write_combined_deferred`] for an async task: resolves once `f`'s
    /// commit is made, with its [`Ticket`], without waiting for the disk.
    pub fn write_combined_deferred_async<R, E, F>(
        self: &Arc<Self>,
        db: &Arc<Database>,
        f: F,
    ) -> impl Future<Output = Result<Deferred<R, E>, GroupCommitError>> + Send + 'static
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        let written = self.submitted(db, f, false);
        async move {
            let (out, ticket) = written.await?;
            // No ticket: the commit was durable, so any ticket covers it.
            Ok(out.map(|out| (out, Ticket(ticket.unwrap_or(0)))))
        }
    }

    /// Submits `f` ([`GroupCommit::submit`]) and resolves to its result and the ticket of
    /// the commit that holds it, as [`unpack`] gives them.
    fn submitted<R, E, F>(
        self: &Arc<Self>,
        db: &Arc<Database>,
        f: F,
        durable: bool,
    ) -> impl Future<Output = Result<(Result<R, E>, Option<u64>), GroupCommitError>> + Send + 'static
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        let reply = self.submit(db, f, durable);
        async move {
            let finished = reply?.await.map_err(|_| GroupCommitError::Lost)?;
            unpack::<F, R, E>(finished)
        }
    }

    /// Queues `f` for the commit thread (started on first use); the channel its outcome
    /// comes on.
    fn submit<R, E, F>(
        self: &Arc<Self>,
        db: &Arc<Database>,
        f: F,
        durable: bool,
    ) -> Result<oneshot::Receiver<Finished>, GroupCommitError>
    where
        F: CombinedWrite<R, E>,
        R: Send + 'static,
        E: CombinedError + Send + 'static,
    {
        let front = {
            let mut front = self.front.lock().unwrap_or_else(|p| p.into_inner());
            match &*front {
                Some(f) => f.clone(),
                None => front.insert(Front::start()?).clone(),
            }
        };
        self.progress().writers += 1;
        let writer = Writer(self.clone());
        let (reply, answer) = oneshot::channel();
        let mut q = front.queue();
        q.jobs.push(Queued {
            job: Box::new(Typed {
                f,
                out: None,
                panic: None,
                durable,
            }),
            reply,
            writer,
            db: db.clone(),
        });
        // Otherwise the thread was woken already, or is running a batch and looks again.
        let wake = q.jobs.len() == 1;
        drop(q);
        if wake {
            front.ready.notify_one();
        }
        Ok(answer)
    }

    /// Runs one batch of the commit thread: the answers to send now (each once the commits
    /// it depends on are durable), and those to send once the batch's durable commit,
    /// whose journal sync was left pending, is on disk.
    fn run_front(&self, db: &Database, batch: Vec<Queued>) -> (Vec<Answer>, Option<Held>) {
        let durable = batch.iter().any(|q| q.job.durable());
        let mut replies = Vec::with_capacity(batch.len());
        let mut jobs = Vec::with_capacity(batch.len());
        for (id, q) in (0u64..).zip(batch) {
            jobs.push((id, q.job));
            replies.push(Some((q.reply, q.writer)));
        }
        let mut answers = Vec::with_capacity(replies.len());
        // The durable commit the answers wait for (0: none).
        let mut upto = 0;
        let ((), pending) = crate::journal::deferring(|| {
            self.run_jobs(db, jobs, durable, |id, done| {
                let Some((reply, writer)) = usize::try_from(id)
                    .ok()
                    .and_then(|i| replies.get_mut(i))
                    .and_then(Option::take)
                else {
                    return;
                };
                if let Finished::Ran(job, ticket) = &done
                    && job.durable()
                {
                    if job.untouched() {
                        // It read what was committed before it: on disk before it is answered.
                        upto = upto.max(self.progress().committed);
                    } else if job.succeeded() {
                        upto = upto.max(ticket.unwrap_or(0));
                    }
                }
                answers.push((reply, writer, done));
            })
        });
        let covers = self.progress().pending_covers.take();
        match (pending, covers) {
            (Some(sync), Some(covers)) => {
                // The batch committed durably, its journal sync pending: the writes that
                // wait for the disk (an untouched refusal read nothing newer than this
                // commit) are answered once it returns, the others now.
                let (waiting, now): (Vec<Answer>, Vec<Answer>) =
                    answers.into_iter().partition(|(_, _, done)| waits(done));
                let held = (!waiting.is_empty()).then_some(Held {
                    answers: waiting,
                    sync,
                    covers,
                });
                return (now, held);
            }
            // A sync left pending otherwise (not expected): made here, before any answer.
            (Some(sync), None) => {
                if let Err(e) = sync.wait() {
                    for (_, _, done) in &mut answers {
                        if waits(done) {
                            *done = Finished::Failed(GroupCommitError::Sync(std::io::Error::new(
                                e.kind(),
                                e.to_string(),
                            )));
                        }
                    }
                    return (answers, None);
                }
            }
            _ => {}
        }
        if upto > 0
            && let Err(e) = self.wait_durable(db, upto)
        {
            // Nothing that waits for the disk is acknowledged: those writes get the error
            // (the backend refuses every sync after one failed).
            let mut e = Some(e);
            for (_, _, done) in &mut answers {
                if waits(done) {
                    *done = Finished::Failed(e.take().unwrap_or(GroupCommitError::Lost));
                }
            }
        }
        (answers, None)
    }
}

/// Whether a write's answer waits for the disk: one that waits for durability and
/// succeeded, or refused untouched after reading what others committed.
fn waits(done: &Finished) -> bool {
    matches!(done, Finished::Ran(job, _) if job.durable() && (job.untouched() || job.succeeded()))
}

/// A write's reply channel, its count among the writers, and its outcome.
type Answer = (oneshot::Sender<Finished>, Writer, Finished);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU64, Ordering};

    use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    /// A refusal made before writing anything.
    #[derive(Debug)]
    struct Refused;

    impl CombinedError for Refused {
        fn untouched(&self) -> bool {
            true
        }
    }

    /// How a test write ends.
    #[derive(Debug, Clone, Copy)]
    enum How {
        Ok,
        Fail,
        Panic,
        Refuse,
    }

    #[derive(Debug)]
    enum Err {
        Failed,
        Refused,
    }

    impl CombinedError for Err {
        fn untouched(&self) -> bool {
            matches!(self, Err::Refused)
        }
    }

    /// A write of `k` that ends as `how`, counting its runs.
    fn write(
        k: u64,
        how: How,
        runs: Arc<AtomicU64>,
    ) -> impl FnMut(&WriteTransaction) -> Result<u64, Err> + Send + 'static {
        move |txn| {
            runs.fetch_add(1, Ordering::SeqCst);
            if let How::Refuse = how {
                return Err(Err::Refused);
            }
            txn.open_table(T).unwrap().insert(k, k).unwrap();
            match how {
                How::Fail => Err(Err::Failed),
                How::Panic => panic!("boom"),
                _ => Ok(k),
            }
        }
    }

    fn front_of(group: &GroupCommit) -> Arc<Front> {
        group.front.lock().unwrap().clone().unwrap()
    }

    /// Waits until the commit thread has taken everything queued.
    async fn taken(group: &GroupCommit) {
        let front = front_of(group);
        while !front.queue().jobs.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Waits until `n` writes are queued for the commit thread.
    async fn queued(group: &GroupCommit, n: usize) {
        let front = front_of(group);
        while front.queue().jobs.len() < n {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// The task awaiting one test write.
    type Awaited = tokio::task::JoinHandle<Result<Result<u64, Err>, GroupCommitError>>;

    /// Holds redb's write lock while the commit thread takes `first` alone and `rest` queue
    /// behind it, then lets them go: `rest` is the thread's next batch.
    async fn batch_behind<W: CombinedWrite<u64, Err>>(
        db: &Arc<Database>,
        group: &Arc<GroupCommit>,
        first: W,
        rest: Vec<W>,
    ) -> (Awaited, Vec<Awaited>) {
        let held = db.begin_write().unwrap();
        let first = tokio::spawn(group.write_combined_async(db, first));
        taken(group).await;
        let n = rest.len();
        let rest = rest
            .into_iter()
            .map(|w| tokio::spawn(group.write_combined_async(db, w)))
            .collect();
        queued(group, n).await;
        drop(held);
        (first, rest)
    }

    /// The database at `path` opened as the node opens its own: through the journal, so
    /// that the commit thread's durable commits leave their journal sync to the sync
    /// thread.
    fn open(path: &std::path::Path) -> Database {
        let journaled = crate::journal::Journaled::open(path, 1 << 20).unwrap();
        Database::builder().create_with_backend(journaled).unwrap()
    }

    fn keys_present(path: &std::path::Path, keys: std::ops::RangeInclusive<u64>) -> Vec<u64> {
        let db = open(path);
        let read = db.begin_read().unwrap();
        let t = read.open_table(T).unwrap();
        keys.filter(|k| t.get(k).unwrap().is_some()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_queued_together_commit_in_one_durable_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let runs = Arc::new(AtomicU64::new(0));
        {
            let db = Arc::new(open(&path));
            let group = Arc::new(GroupCommit::default());
            // The first write's batch waits for redb's write lock while five more queue.
            let (first, rest) = batch_behind(
                &db,
                &group,
                write(0, How::Ok, runs.clone()),
                (1..6).map(|k| write(k, How::Ok, runs.clone())).collect(),
            )
            .await;
            assert_eq!(first.await.unwrap().unwrap().unwrap(), 0);
            for (k, r) in (1..).zip(rest) {
                assert_eq!(r.await.unwrap().unwrap().unwrap(), k);
            }
            assert_eq!(front_of(&group).batches.load(Ordering::SeqCst), 2);
            assert_eq!(runs.load(Ordering::SeqCst), 6);
            // Each batch committed durably itself (its journal sync made by the sync
            // thread, which then marked it durable): no commit was left for a later sync.
            let p = group.progress();
            assert_eq!(p.committed, 2);
            assert_eq!(p.durable, 2);
            assert_eq!(p.writers, 0);
        }
        assert_eq!(keys_present(&path, 0..=5), (0..=5).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_fails_or_panics_costs_the_others_of_its_batch_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let runs = Arc::new(AtomicU64::new(0));
        {
            let db = Arc::new(open(&path));
            let group = Arc::new(GroupCommit::default());
            let hows = [How::Ok, How::Fail, How::Panic, How::Refuse, How::Ok];
            let (first, rest) = batch_behind(
                &db,
                &group,
                write(1, How::Ok, runs.clone()),
                (2..)
                    .zip(hows)
                    .map(|(k, how)| write(k, how, runs.clone()))
                    .collect(),
            )
            .await;
            assert!(first.await.unwrap().unwrap().is_ok());
            let mut got = Vec::new();
            for r in rest {
                got.push(r.await);
            }
            assert!(matches!(got[0], Ok(Ok(Ok(2)))));
            assert!(matches!(got[1], Ok(Ok(Err(Err::Failed)))));
            // The panic is resumed in the task that awaited the write.
            assert!(got[2].as_ref().unwrap_err().is_panic());
            assert!(matches!(got[3], Ok(Ok(Err(Err::Refused)))));
            assert!(matches!(got[4], Ok(Ok(Ok(6)))));
            // The first alone (1), the five together up to the failing one (2), then each
            // of the five alone (5).
            assert_eq!(runs.load(Ordering::SeqCst), 8);
            // Everything acknowledged is on disk, nobody is left counted.
            {
                let p = group.progress();
                assert_eq!(p.durable, p.committed);
                assert_eq!(p.writers, 0);
            }
            // And the thread serves the next write.
            let after = group.write_combined_async(&db, write(9, How::Ok, runs.clone()));
            assert_eq!(after.await.unwrap().unwrap(), 9);
        }
        assert_eq!(keys_present(&path, 1..=9), vec![1, 2, 6, 9]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deferred_write_is_answered_before_the_disk_and_a_sync_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let runs = Arc::new(AtomicU64::new(0));
        let db = Arc::new(open(&path));
        let group = Arc::new(GroupCommit::default());
        let (k, ticket) = group
            .write_combined_deferred_async(&db, write(1, How::Ok, runs.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(k, 1);
        assert!(!group.is_durable(ticket));
        // A refusal that read it returns once it is durable.
        let refusal = group
            .write_combined_async(&db, |txn: &WriteTransaction| {
                match txn.open_table(T).unwrap().get(1).unwrap() {
                    Some(_) => Err(Refused),
                    None => Ok(()),
                }
            })
            .await
            .unwrap();
        assert!(refusal.is_err());
        assert!(group.is_durable(ticket));
        // A deferred write batched with a durable one: answered at once, and durable once
        // the durable one is answered (its journal sync made on the sync thread).
        let held = db.begin_write().unwrap();
        let first = tokio::spawn(group.write_combined_async(&db, write(2, How::Ok, runs.clone())));
        taken(&group).await;
        let deferred =
            tokio::spawn(group.write_combined_deferred_async(&db, write(3, How::Ok, runs.clone())));
        let durable =
            tokio::spawn(group.write_combined_async(&db, write(4, How::Ok, runs.clone())));
        queued(&group, 2).await;
        drop(held);
        first.await.unwrap().unwrap().unwrap();
        let (_, ticket) = deferred.await.unwrap().unwrap().unwrap();
        durable.await.unwrap().unwrap().unwrap();
        assert!(group.is_durable(ticket));
        // A deferred write that fails writes nothing.
        let failed = group
            .write_combined_deferred_async(&db, write(5, How::Fail, runs.clone()))
            .await
            .unwrap();
        assert!(failed.is_err());
        let read = db.begin_read().unwrap();
        assert!(read.open_table(T).unwrap().get(5).unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_thread_ends_with_its_group_and_holds_no_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let db = Arc::new(open(&path));
        let group = Arc::new(GroupCommit::default());
        let runs = Arc::new(AtomicU64::new(0));
        group
            .write_combined_async(&db, write(1, How::Ok, runs))
            .await
            .unwrap()
            .unwrap();
        let front = Arc::downgrade(&front_of(&group));
        // Idle, the thread does not keep the database open.
        drop(db);
        assert_eq!(keys_present(&path, 1..=1), vec![1]);
        drop(group);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while front.upgrade().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the commit thread did not end"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}
