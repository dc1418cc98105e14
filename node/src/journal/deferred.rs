//! Durable commits whose journal sync is left to another thread.
//!
//! A thread that commits inside [`deferring`] has the journal entries of its durable
//! commits appended to the journal but not synced: redb's commit returns without waiting
//! for the disk, and [`deferring`] returns the [`PendingSync`] that makes those entries
//! durable. The commit thread of group commit hands it, with the batch's answers, to a
//! thread that waits for it and then answers, while the next batch runs.
//!
//! redb takes such a commit to be durable: the next transaction may reuse the pages that
//! commit freed, which the last commit really on disk may still refer to. That is safe
//! because nothing reaches the database file before a checkpoint, and a checkpoint syncs
//! the journal (every entry appended before its snapshot of the overlay) before it writes
//! the snapshot to the file. A crash before the pending sync returns loses the commit and
//! everything after it, as a crash before its `fsync` would, and nobody was answered.

use std::{
    cell::{Cell, RefCell},
    io,
    sync::Arc,
};

/// Syncs a journal through an entry.
pub(super) trait LogSync: Send + Sync {
    /// Returns once the entry numbered `seq`, and every one before it, is durable.
    fn sync_through(&self, seq: u64) -> io::Result<()>;
}

/// The journal syncs the commits made in [`deferring`] still need: per journal, the last
/// entry appended.
pub struct PendingSync {
    logs: Vec<(Arc<dyn LogSync>, u64)>,
}

impl std::fmt::Debug for PendingSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seqs: Vec<u64> = self.logs.iter().map(|(_, s)| *s).collect();
        f.debug_struct("PendingSync").field("seqs", &seqs).finish()
    }
}

impl PendingSync {
    /// Returns once the commits are durable (an error: they may not be, and that journal
    /// refuses every later commit).
    pub fn wait(self) -> io::Result<()> {
        for (log, seq) in self.logs {
            log.sync_through(seq)?;
        }
        Ok(())
    }
}

thread_local! {
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    static PENDING: RefCell<Option<PendingSync>> = const { RefCell::new(None) };
}

/// Clears this thread's deferral when dropped (also when `f` panics).
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        DEFERRING.set(false);
        PENDING.take();
    }
}

/// Runs `f` with the journal syncs of this thread's durable commits deferred; returns
/// what it returned and, when one of them left its entry unsynced, the sync to wait for
/// before anything it wrote is acknowledged. A database without a journal syncs as usual.
pub fn deferring<T>(f: impl FnOnce() -> T) -> (T, Option<PendingSync>) {
    let _reset = Reset;
    DEFERRING.set(true);
    let out = f();
    DEFERRING.set(false);
    (out, PENDING.take())
}

/// Whether a commit on this thread, inside [`deferring`], has left its sync pending.
pub fn sync_deferred() -> bool {
    PENDING.with_borrow(Option::is_some)
}

/// Whether this thread is inside [`deferring`].
pub fn is_deferring() -> bool {
    DEFERRING.get()
}

/// Notes that entry `seq` of `log` was appended unsynced (the latest entry counts: its sync
/// covers the ones before).
pub(super) fn leave(log: Arc<dyn LogSync>, seq: u64) {
    PENDING.with_borrow_mut(|p| {
        let logs = &mut p
            .get_or_insert_with(|| PendingSync { logs: Vec::new() })
            .logs;
        match logs
            .iter_mut()
            .find(|(l, _)| std::ptr::addr_eq(Arc::as_ptr(l), Arc::as_ptr(&log)))
        {
            Some((_, s)) => *s = (*s).max(seq),
            None => logs.push((log, seq)),
        }
    });
}
