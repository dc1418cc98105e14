//! A write-ahead journal under the node's redb file (`node.redb.journal`).
//!
//! redb makes a commit durable by writing the commit's pages where they live in the file
//! and syncing the file: each durable commit of a paid task writes 8–17 pages scattered over
//! the file, and on a virtual disk the sync's cost grows with the number of scattered
//! writes (measured on this project's VM: 0.53 ms for 8 scattered 4 KiB writes and their
//! `fdatasync`, 1.0 ms for 17, against 0.21 ms and 0.28 ms for the same bytes appended in
//! one write). [`Journaled`] is a [`StorageBackend`] that wraps redb's own
//! [`FileBackend`] and changes only what a sync costs:
//!
//! - every write is kept in memory, in an overlay of the file (`overlay.rs`) that reads
//!   look at first, and recorded for the journal; a length change goes to the database
//!   file at once;
//! - `sync_data` (redb's durable commit) appends those records to the journal as **one
//!   entry** (a sequence number, the records, a CRC-32 over them) in one write, and syncs the
//!   journal instead of the database file. Once it returns the commit is durable: after a
//!   crash the journal's entries are replayed onto the database file before redb opens it;
//! - a background thread *checkpoints*: it writes what the overlay holds to the database
//!   file (a page rewritten by many commits once, adjacent pages in one write), syncs the
//!   file (everything written to it before the sync started is then durable there), and
//!   moves the journal's start past the entries that sync covered, so the journal is a ring
//!   of bounded size ([`DEFAULT_CAPACITY`]). When the ring is full the commit checkpoints
//!   itself first; a commit too large for the ring is made durable by a checkpoint alone.
//!   The checkpointer also runs when the overlay holds more than [`OVERLAY_LIMIT`] bytes.
//!
//! A commit made inside [`deferring`] (group commit's commit thread) has its entry appended
//! but not synced; the caller waits for the [`PendingSync`] before it acknowledges anything.
//! A checkpoint syncs the journal before it writes to the database file, and a cut of the
//! file waits for that sync too (`deferred.rs` says why).
//!
//! Keeping the writes off the file until a checkpoint changes nothing of what a crash can
//! leave: the file then holds an older image of pages that were written, as it could when
//! the kernel had not yet written them back, and the journal restores every page of the
//! last durable commit.
//!
//! The journal starts with two header slots (512 bytes apart, the one with the higher
//! generation and a valid CRC counts): the sequence number and offset of its first live
//! entry. Replay reads entries from there while each has the next sequence number and a
//! valid CRC (an entry that does not fit before the ring's end is written at its start, and
//! replay looks there too); a torn last entry, whose sync never returned, ends the replay.
//! Sequence numbers are never reused, so an old entry left in the ring is never mistaken
//! for a live one.
//!
//! Why replay is correct: each record restores a page to a value it had at a durable
//! commit, in order, so after replay every page redb's last durable commit refers to holds
//! that commit's contents (redb never overwrites the pages of its last durable commit). Pages
//! written after it, which the kernel may or may not have written back, are either left as
//! they are or set back to an older value: both are states a crash could leave without the
//! journal, and redb's own recovery handles them.
//!
//! The journal is locked (`flock`) by whoever opens it, so two processes never replay or
//! append at once; [`recover`] lets a read-only reader replay a crashed node's journal
//! first. A sync that fails (journal or database file) poisons the backend: every later
//! sync fails, since after a failed `fsync` the kernel may have dropped the pages it could
//! not write. A clean close checkpoints, so a database closed cleanly needs no journal.

use std::{
    fs::{File, OpenOptions},
    io,
    ops::Bound,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use redb::{BackendError, StorageBackend, backends::FileBackend};
use thiserror::Error;

mod deferred;
mod overlay;

pub use deferred::{PendingSync, deferring, is_deferring, sync_deferred};
use overlay::Overlay;

/// Appended to the database file's name to name its journal.
pub const JOURNAL_SUFFIX: &str = ".journal";

/// Size of a new journal's ring (its file grows to this as it is first used).
pub const DEFAULT_CAPACITY: u64 = 16 << 20;

/// Smallest ring accepted (a header block and a few entries).
const MIN_CAPACITY: u64 = 64 << 10;
/// Largest ring accepted when reading a journal's header.
const MAX_CAPACITY: u64 = 1 << 40;
/// Where the two header slots are.
const SLOTS: [u64; 2] = [0, 512];
/// Where entries start; entries are aligned to this too.
const DATA_START: u64 = 4096;
const ALIGN: u64 = 4096;
/// How much the journal file is extended at a time while it grows to its capacity.
const GROW_STEP: u64 = 1 << 20;

/// Bytes the overlay may hold before the checkpointer writes them out (it does at the
/// latest when the journal's ring is a quarter full).
pub const OVERLAY_LIMIT: u64 = 32 << 20;
/// Largest write a checkpoint makes of adjacent overlay ranges.
const MAX_RUN: usize = 1 << 20;

const HEADER_MAGIC: &[u8; 8] = b"d402jnl1";
/// magic 8, generation 8, first sequence number 8, first offset 8, capacity 8, CRC 4.
const HEADER_LEN: usize = 44;

const ENTRY_MAGIC: &[u8; 4] = b"d4je";
/// magic 4, sequence number 8, payload length 4, CRC 4 (over the sequence number, the
/// length and the payload).
const ENTRY_HEAD: usize = 20;

/// A record of a write: kind, offset 8, length 4, then the bytes.
const REC_WRITE: u8 = 0;
/// A record of a length change: kind, length 8.
const REC_SET_LEN: u8 = 1;

/// Errors of opening a journal or replaying it.
#[derive(Debug, Error)]
pub enum JournalError {
    /// Reading or writing the journal or the database file failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The journal.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process has the journal (and so the database) open.
    #[error("journal {0} is locked by another process")]
    Locked(PathBuf),
    /// The journal's header or an entry that passed its checksum does not make sense.
    #[error("journal {path} is damaged: {reason}")]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The journal of a database file.
pub fn journal_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(JOURNAL_SUFFIX);
    PathBuf::from(name)
}

/// Replays the journal of `db_path`, if it has one, onto the database file and empties it,
/// so that the file can be opened without the journal (read-only). Fails with
/// [`JournalError::Locked`] while a node has the database open.
pub fn recover(db_path: &Path) -> Result<(), JournalError> {
    if !journal_path(db_path).exists() {
        return Ok(());
    }
    let j = Journaled::open(db_path, DEFAULT_CAPACITY)?;
    j.close().map_err(|source| JournalError::Io {
        path: journal_path(db_path),
        source,
    })
}

/// redb's [`FileBackend`] (or another backend, in tests) with its syncs made through the
/// journal. See the module documentation.
#[derive(Debug)]
pub struct Journaled<B: StorageBackend = FileBackend> {
    shared: Arc<Shared<B>>,
    checkpointer: Mutex<Option<thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared<B> {
    inner: B,
    log: File,
    path: PathBuf,
    capacity: u64,
    /// Records since the last sync, behind room for the entry's head. Held for the whole
    /// of a sync, so appends are made one at a time.
    pending: Mutex<Pending>,
    ring: Mutex<Ring>,
    /// Every entry up to this sequence number is durable (synced, or checkpointed).
    synced: AtomicU64,
    /// Held while the journal is synced for entries appended unsynced ([`deferred`]).
    log_sync: Mutex<()>,
    /// Wakes the checkpointer.
    wake: Condvar,
    /// Writes not yet in the database file.
    overlay: Mutex<Overlay>,
    /// Held for the whole of a checkpoint, and while the file's length changes (so that a
    /// checkpoint never writes past a new end).
    checkpointing: Mutex<()>,
    /// Held while the file is extended.
    growing: Mutex<()>,
    /// Tests pause the background checkpoints (the ring then fills and wraps).
    #[cfg(test)]
    paused: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Pending {
    buf: Vec<u8>,
    /// More was written since the last sync than an entry may hold: the records were
    /// dropped and the next sync checkpoints instead.
    overflow: bool,
}

#[derive(Debug)]
struct Ring {
    /// Where the next entry goes (unless it must wrap).
    head: u64,
    /// The sequence number of the next entry.
    next_seq: u64,
    /// Where the first live entry is (the header's offset).
    tail: u64,
    /// The header's generation.
    generation: u64,
    /// The journal file's length (it grows to `capacity`).
    allocated: u64,
    /// A commit found the file's end near: the checkpointer extends it (off the commit's
    /// path).
    grow_wanted: bool,
    /// The overlay holds more than [`OVERLAY_LIMIT`]: the checkpointer writes it out.
    flush_wanted: bool,
    /// Why the backend is poisoned.
    failed: Option<String>,
    stop: bool,
}

impl Ring {
    /// The ring a header describes, its next entry at `head`.
    fn new(h: &Header, head: u64, allocated: u64) -> Ring {
        Ring {
            head,
            next_seq: h.base_seq,
            tail: h.base_offset,
            generation: h.generation,
            allocated,
            grow_wanted: false,
            flush_wanted: false,
            failed: None,
            stop: false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

struct Header {
    generation: u64,
    base_seq: u64,
    base_offset: u64,
    capacity: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(HEADER_MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.base_seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.capacity.to_le_bytes());
        let crc = crc32fast::hash(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Option<Header> {
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap_or([0; 8]));
        let crc = u32::from_le_bytes(b[40..44].try_into().ok()?);
        (&b[..8] == HEADER_MAGIC && crc32fast::hash(&b[..40]) == crc).then(|| Header {
            generation: u(8..16),
            base_seq: u(16..24),
            base_offset: u(24..32),
            capacity: u(32..40),
        })
    }
}

impl Journaled<FileBackend> {
    /// Opens the database file `db_path` (created when missing, as redb's
    /// `Builder::create` does) with its journal (created when missing, with a ring of
    /// `capacity` bytes; an existing journal keeps its own), replaying the journal first.
    /// Hand the result to `redb::Builder::create_with_backend`.
    pub fn open(db_path: &Path, capacity: u64) -> Result<Self, JournalError> {
        let io_err = |source| JournalError::Io {
            path: journal_path(db_path),
            source,
        };
        let file = open_rw(db_path).map_err(io_err)?;
        let inner = FileBackend::new(file).map_err(|e| io_err(io::Error::other(e)))?;
        Journaled::with_backend(inner, &journal_path(db_path), capacity)
    }
}

impl<B: StorageBackend> Journaled<B> {
    /// Puts the journal at `journal` under `inner` (see [`Journaled::open`]).
    pub fn with_backend(inner: B, journal: &Path, capacity: u64) -> Result<Self, JournalError> {
        let io_err = |source| JournalError::Io {
            path: journal.to_path_buf(),
            source,
        };
        let log = open_rw(journal).map_err(io_err)?;
        match log.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::Locked(journal.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(e)),
        }
        let len = log.metadata().map_err(io_err)?.len();
        let (ring, capacity) = if len == 0 {
            let capacity = round_up(capacity.clamp(MIN_CAPACITY, MAX_CAPACITY));
            let header = Header {
                generation: 1,
                base_seq: 1,
                base_offset: DATA_START,
                capacity,
            };
            log.set_len(DATA_START).map_err(io_err)?;
            write_header(&log, &header).map_err(io_err)?;
            log.sync_all().map_err(io_err)?;
            if let Some(dir) = journal.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
            }
            (Ring::new(&header, DATA_START, DATA_START), capacity)
        } else {
            let mut header = read_header(&log, journal)?;
            let (end, next_seq, replayed) = replay(&inner, &log, journal, &header, len)?;
            let mut ring = Ring::new(&header, end, len);
            ring.next_seq = next_seq;
            if replayed > 0 {
                // Everything replayed on disk in the database file; the ring starts over
                // past every sequence number used (a torn entry's too).
                inner.sync_data().map_err(io_err)?;
                header = Header {
                    generation: header.generation + 1,
                    base_seq: next_seq + 1,
                    base_offset: DATA_START,
                    capacity: header.capacity,
                };
                write_header(&log, &header).map_err(io_err)?;
                ring = Ring::new(&header, DATA_START, len);
                tracing::warn!(journal = %journal.display(), entries = replayed, "replayed the database journal after an unclean stop");
            }
            (ring, header.capacity)
        };
        let shared = Arc::new(Shared {
            inner,
            log,
            path: journal.to_path_buf(),
            capacity,
            pending: Mutex::new(Pending {
                buf: vec![0; ENTRY_HEAD],
                overflow: false,
            }),
            synced: AtomicU64::new(ring.next_seq.saturating_sub(1)),
            ring: Mutex::new(ring),
            log_sync: Mutex::new(()),
            overlay: Mutex::default(),
            wake: Condvar::new(),
            checkpointing: Mutex::new(()),
            growing: Mutex::new(()),
            #[cfg(test)]
            paused: Default::default(),
        });
        let worker = shared.clone();
        let handle = thread::Builder::new()
            .name("d402-journal".into())
            .spawn(move || worker.checkpoint_loop())
            .map_err(io_err)?;
        Ok(Journaled {
            shared,
            checkpointer: Mutex::new(Some(handle)),
        })
    }

    /// Stops the checkpointer thread (once).
    fn stop_checkpointer(&self) {
        lock(&self.shared.ring).stop = true;
        self.shared.wake.notify_all();
        if let Some(h) = lock(&self.checkpointer).take() {
            let _ = h.join();
        }
    }

    /// Checkpoints, so the journal is empty, and closes (also what redb's `close` does).
    pub fn close(&self) -> io::Result<()> {
        self.stop_checkpointer();
        let done = self.shared.checkpoint();
        let closed = self.shared.inner.close().map_err(io::Error::other);
        done.and(closed)
    }
}

impl<B> Drop for Journaled<B>
where
    B: StorageBackend,
{
    fn drop(&mut self) {
        // redb calls `close` first; this only stops the thread if it did not.
        self.stop_checkpointer();
    }
}

/// Opens `path` for reading and writing, created owner-only when missing (as redb's
/// `Builder::create` opens its file, but never readable by others).
fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

fn read_header(log: &File, path: &Path) -> Result<Header, JournalError> {
    let mut best: Option<Header> = None;
    for slot in SLOTS {
        let mut b = [0u8; HEADER_LEN];
        if log.read_exact_at(&mut b, slot).is_err() {
            continue;
        }
        if let Some(h) = Header::decode(&b)
            && best.as_ref().is_none_or(|b| h.generation > b.generation)
        {
            best = Some(h);
        }
    }
    let corrupt = |reason: String| JournalError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let h = best.ok_or_else(|| corrupt("no valid header".into()))?;
    if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&h.capacity)
        || h.capacity % ALIGN != 0
        || h.base_offset < DATA_START
        // At the ring's very end (the last entry filled it): the next entry is at its start.
        || h.base_offset > h.capacity
        || h.base_offset % ALIGN != 0
    {
        return Err(corrupt(format!(
            "header out of range (capacity {}, offset {})",
            h.capacity, h.base_offset
        )));
    }
    Ok(h)
}

fn write_header(log: &File, h: &Header) -> io::Result<()> {
    log.write_all_at(&h.encode(), SLOTS[(h.generation % 2) as usize])?;
    log.sync_data()
}

/// The payload of the entry at `pos` if it is the entry numbered `seq` and intact (no
/// entry is larger than `max`, a quarter of the ring: a larger length is damage, and is
/// not read into memory).
fn read_entry(log: &File, len: u64, max: u64, pos: u64, seq: u64) -> Option<Vec<u8>> {
    if pos + ENTRY_HEAD as u64 > len {
        return None;
    }
    let mut head = [0u8; ENTRY_HEAD];
    log.read_exact_at(&mut head, pos).ok()?;
    if &head[..4] != ENTRY_MAGIC || head[4..12] != seq.to_le_bytes() {
        return None;
    }
    let payload_len = u32::from_le_bytes(head[12..16].try_into().ok()?) as u64;
    if pos + ENTRY_HEAD as u64 + payload_len > len || ENTRY_HEAD as u64 + payload_len > max {
        return None;
    }
    let mut payload = vec![0u8; payload_len as usize];
    log.read_exact_at(&mut payload, pos + ENTRY_HEAD as u64)
        .ok()?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[4..16]);
    crc.update(&payload);
    (crc.finalize().to_le_bytes() == head[16..20]).then_some(payload)
}

/// Replays the live entries onto `inner`: returns where the next entry goes, its sequence
/// number and how many entries were replayed.
fn replay<B: StorageBackend>(
    inner: &B,
    log: &File,
    path: &Path,
    header: &Header,
    len: u64,
) -> Result<(u64, u64, u64), JournalError> {
    let max = header.capacity / 4;
    let mut pos = header.base_offset;
    let mut seq = header.base_seq;
    let mut replayed = 0;
    loop {
        let (at, payload) = match read_entry(log, len, max, pos, seq) {
            Some(p) => (pos, p),
            // Not here: it may have wrapped to the ring's start.
            None if pos != DATA_START => match read_entry(log, len, max, DATA_START, seq) {
                Some(p) => (DATA_START, p),
                None => break,
            },
            None => break,
        };
        apply(inner, &payload).map_err(|reason| JournalError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("entry {seq}: {reason}"),
        })?;
        pos = at + round_up(ENTRY_HEAD as u64 + payload.len() as u64);
        seq += 1;
        replayed += 1;
    }
    Ok((pos, seq, replayed))
}

fn apply<B: StorageBackend>(inner: &B, mut p: &[u8]) -> Result<(), String> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if p.len() < n {
            return Err("truncated record".into());
        }
        let (a, b) = p.split_at(n);
        *p = b;
        Ok(a)
    }
    fn u64_of(b: &[u8]) -> u64 {
        u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
    }
    while !p.is_empty() {
        match take(&mut p, 1)?[0] {
            REC_WRITE => {
                let offset = u64_of(take(&mut p, 8)?);
                let n = u32::from_le_bytes(take(&mut p, 4)?.try_into().unwrap_or([0; 4]));
                let data = take(&mut p, n as usize)?;
                inner.write(offset, data).map_err(|e| e.to_string())?;
            }
            REC_SET_LEN => {
                let len = u64_of(take(&mut p, 8)?);
                inner.set_len(len).map_err(|e| e.to_string())?;
            }
            k => return Err(format!("unknown record kind {k}")),
        }
    }
    Ok(())
}

impl<B: StorageBackend> Shared<B> {
    fn max_entry(&self) -> u64 {
        self.capacity / 4
    }

    fn used(&self, r: &Ring) -> u64 {
        if r.head >= r.tail {
            r.head - r.tail
        } else {
            (self.capacity - r.tail) + (r.head - DATA_START)
        }
    }

    /// Where an entry of `size` bytes fits without reaching the live entries.
    fn place(&self, r: &Ring, size: u64) -> Option<u64> {
        if r.head >= r.tail {
            if r.head + size <= self.capacity {
                Some(r.head)
            } else if DATA_START + size < r.tail {
                Some(DATA_START)
            } else {
                None
            }
        } else if r.head + size < r.tail {
            Some(r.head)
        } else {
            None
        }
    }

    fn poison(&self, e: io::Error) -> io::Error {
        let why = format!("journal {}: {e}", self.path.display());
        tracing::error!(error = %why, "a sync failed; the database refuses further commits");
        lock(&self.ring).failed.get_or_insert(why);
        e
    }

    fn check(&self) -> io::Result<()> {
        match &lock(&self.ring).failed {
            Some(why) => Err(io::Error::other(why.clone())),
            None => Ok(()),
        }
    }

    fn record(&self, kind: u8, offset: u64, data: &[u8]) {
        let mut p = lock(&self.pending);
        if p.overflow {
            return;
        }
        let need = 1 + 8 + if kind == REC_WRITE { 4 + data.len() } else { 0 };
        if (p.buf.len() + need) as u64 + ALIGN > self.max_entry() {
            p.overflow = true;
            p.buf = vec![0; ENTRY_HEAD];
            return;
        }
        p.buf.push(kind);
        p.buf.extend_from_slice(&offset.to_le_bytes());
        if kind == REC_WRITE {
            p.buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            p.buf.extend_from_slice(data);
        }
    }

    /// Makes everything written so far durable: one journal entry, or a checkpoint. Inside
    /// [`deferring`] the entry is appended but not synced, and left for the caller to
    /// wait for ([`deferred`]).
    fn sync(self: &Arc<Self>) -> io::Result<()> {
        let mut p = lock(&self.pending);
        self.check()?;
        if p.overflow {
            self.checkpoint()?;
            p.overflow = false;
            p.buf.truncate(ENTRY_HEAD);
            return Ok(());
        }
        if p.buf.len() == ENTRY_HEAD {
            return Ok(());
        }
        let payload_len = p.buf.len() - ENTRY_HEAD;
        let size = round_up(p.buf.len() as u64);
        let (seq, pos) = {
            let r = lock(&self.ring);
            (r.next_seq, self.place(&r, size))
        };
        let Some(pos) = pos else {
            // The ring is full. The checkpoint syncs the database file after this
            // commit's writes reached it, so the commit needs no entry.
            self.checkpoint()?;
            p.buf.truncate(ENTRY_HEAD);
            return Ok(());
        };
        self.grow(pos + size)?;
        let buf = &mut p.buf;
        buf[..4].copy_from_slice(ENTRY_MAGIC);
        buf[4..12].copy_from_slice(&seq.to_le_bytes());
        buf[12..16].copy_from_slice(&(payload_len as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[4..16]);
        crc.update(&buf[ENTRY_HEAD..]);
        let crc = crc.finalize();
        buf[16..20].copy_from_slice(&crc.to_le_bytes());
        buf.resize(size as usize, 0);
        let defer = deferred::is_deferring();
        let written = self
            .log
            .write_all_at(buf, pos)
            .and_then(|()| if defer { Ok(()) } else { self.log.sync_data() });
        buf.truncate(ENTRY_HEAD);
        written.map_err(|e| self.poison(e))?;
        let wake = {
            let mut r = lock(&self.ring);
            r.head = pos + size;
            r.next_seq = seq + 1;
            if r.allocated < self.capacity && r.head + GROW_STEP / 2 > r.allocated {
                r.grow_wanted = true;
            }
            r.grow_wanted || self.used(&r) > self.capacity / 4
        };
        if wake {
            self.wake.notify_one();
        }
        if defer {
            deferred::leave(self.clone(), seq);
        } else {
            // The log's sync covers every entry appended before this one too.
            self.synced.fetch_max(seq, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Syncs the journal, unless every entry up to `seq` is durable already.
    fn sync_log_through(&self, seq: u64) -> io::Result<()> {
        if self.synced.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        let _one = lock(&self.log_sync);
        if self.synced.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        self.check()?;
        // Appended before the sync starts: it covers them.
        let appended = lock(&self.ring).next_seq.saturating_sub(1);
        self.log.sync_data().map_err(|e| self.poison(e))?;
        self.synced.fetch_max(appended, Ordering::AcqRel);
        Ok(())
    }

    /// Extends the journal file with zeros to at least `end` (while it grows to its
    /// capacity), synced, so that an entry's sync never has a length to persist. The
    /// checkpointer does it ahead of the entries; a commit only when it got there first.
    fn grow(&self, end: u64) -> io::Result<()> {
        let _one = lock(&self.growing);
        let allocated = lock(&self.ring).allocated;
        if end <= allocated {
            return Ok(());
        }
        let to = (end.max(allocated + GROW_STEP)).min(self.capacity);
        let zeros = vec![0u8; (to - allocated) as usize];
        self.log
            .write_all_at(&zeros, allocated)
            .and_then(|()| self.log.sync_all())
            .map_err(|e| self.poison(e))?;
        lock(&self.ring).allocated = to;
        Ok(())
    }

    /// Writes the overlay to the database file, syncs the file and moves the journal's
    /// start past every entry appended before.
    fn checkpoint(&self) -> io::Result<()> {
        let _one = lock(&self.checkpointing);
        self.check()?;
        let (mark, mark_seq, generation) = {
            let r = lock(&self.ring);
            (r.head, r.next_seq, r.generation + 1)
        };
        // Taken after the mark: it holds every write of the entries before it (or a later
        // write of the same bytes).
        let snapshot = lock(&self.overlay).snapshot();
        // Every commit made before the snapshot has its entry appended, synced or not
        // (`deferring`). Synced before the snapshot reaches the file: the snapshot may
        // overwrite pages that only those commits freed.
        let appended = lock(&self.ring).next_seq.saturating_sub(1);
        self.sync_log_through(appended)?;
        self.write_out(&snapshot).map_err(|e| self.poison(e))?;
        self.inner.sync_data().map_err(|e| self.poison(e))?;
        lock(&self.overlay).forget(&snapshot);
        let header = Header {
            generation,
            base_seq: mark_seq,
            base_offset: mark,
            capacity: self.capacity,
        };
        write_header(&self.log, &header).map_err(|e| self.poison(e))?;
        let mut r = lock(&self.ring);
        r.tail = mark;
        r.generation = generation;
        Ok(())
    }

    /// Writes a snapshot of the overlay to the database file, adjacent ranges at once.
    fn write_out(&self, snapshot: &overlay::Snapshot) -> io::Result<()> {
        let mut joined = Vec::new();
        for run in overlay::runs(snapshot, MAX_RUN) {
            match run {
                [] => {}
                [(offset, data)] => self.inner.write(*offset, data)?,
                [(offset, _), ..] => {
                    joined.clear();
                    for (_, data) in run {
                        joined.extend_from_slice(data);
                    }
                    self.inner.write(*offset, &joined)?;
                }
            }
        }
        Ok(())
    }

    fn checkpoint_loop(&self) {
        loop {
            let (grow, full) = {
                let mut r = lock(&self.ring);
                while !r.stop
                    && (r.failed.is_some()
                        || (!r.grow_wanted
                            && !r.flush_wanted
                            && self.used(&r) <= self.capacity / 4))
                {
                    r = self.wake.wait(r).unwrap_or_else(|p| p.into_inner());
                }
                if r.stop {
                    return;
                }
                let grow = std::mem::take(&mut r.grow_wanted).then_some(r.allocated + GROW_STEP);
                let flush = std::mem::take(&mut r.flush_wanted);
                (grow, flush || self.used(&r) > self.capacity / 4)
            };
            if let Some(end) = grow
                && let Err(e) = self.grow(end)
            {
                tracing::error!(journal = %self.path.display(), error = %e, "cannot extend the journal");
            }
            if !full {
                continue;
            }
            #[cfg(test)]
            if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
                thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            if let Err(e) = self.checkpoint() {
                tracing::error!(journal = %self.path.display(), error = %e, "checkpoint failed");
            }
        }
    }
}

impl<B: StorageBackend> Shared<B> {
    /// Sets the database file's length (at once, unlike writes) and records it.
    fn set_len(&self, len: u64) -> io::Result<()> {
        {
            let _no_checkpoint = lock(&self.checkpointing);
            // A cut goes to the file at once: the pages it drops may be ones that only a
            // commit whose journal sync is pending freed (`deferring`), so that sync first.
            if len < self.inner.len()? {
                let appended = lock(&self.ring).next_seq.saturating_sub(1);
                self.sync_log_through(appended)?;
            }
            self.inner.set_len(len)?;
            lock(&self.overlay).set_len(len);
        }
        self.record(REC_SET_LEN, len, &[]);
        Ok(())
    }
}

impl<B: StorageBackend> deferred::LogSync for Shared<B> {
    fn sync_through(&self, seq: u64) -> io::Result<()> {
        self.sync_log_through(seq)
    }
}

impl<B: StorageBackend> StorageBackend for Journaled<B> {
    fn len(&self) -> Result<u64, io::Error> {
        let end = lock(&self.shared.overlay).end();
        Ok(self.shared.inner.len()?.max(end))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        // Held over the file's reads too: a checkpoint then cannot forget a range read here
        // as a gap in between.
        let overlay = lock(&self.shared.overlay);
        for (at, n) in overlay.read(offset, out) {
            let from = (at - offset) as usize;
            self.shared.inner.read(at, &mut out[from..from + n])?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.shared.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.shared.sync()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let full = {
            let mut overlay = lock(&self.shared.overlay);
            overlay.write(offset, data.into());
            overlay.bytes() > OVERLAY_LIMIT
        };
        self.shared.record(REC_WRITE, offset, data);
        if full {
            lock(&self.shared.ring).flush_wanted = true;
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        Journaled::close(self)
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.shared.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, TableDefinition};

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    /// A disk that loses what was not synced: the database's live image is in memory,
    /// and the file behind it receives the writes only when synced. `crash` keeps the
    /// file as it is, plus whichever unsynced writes `keep` picks (written back by the
    /// kernel before the power went).
    #[derive(Debug)]
    struct Volatile {
        disk: File,
        live: Mutex<Vec<u8>>,
        unsynced: Mutex<Vec<(u64, Option<Vec<u8>>)>>,
        crashed: Arc<std::sync::atomic::AtomicBool>,
        fail_sync: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Volatile {
        fn new(path: &Path) -> Volatile {
            let disk = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .unwrap();
            let live = std::fs::read(path).unwrap();
            Volatile {
                disk,
                live: Mutex::new(live),
                unsynced: Mutex::default(),
                crashed: Arc::default(),
                fail_sync: Arc::default(),
            }
        }

        fn apply(&self, op: &(u64, Option<Vec<u8>>)) {
            match op {
                (offset, Some(data)) => self.disk.write_all_at(data, *offset).unwrap(),
                (len, None) => self.disk.set_len(*len).unwrap(),
            }
        }
    }

    impl StorageBackend for Volatile {
        fn len(&self) -> io::Result<u64> {
            Ok(lock(&self.live).len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            let live = lock(&self.live);
            let end = offset as usize + out.len();
            if end > live.len() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            out.copy_from_slice(&live[offset as usize..end]);
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            lock(&self.live).resize(len as usize, 0);
            lock(&self.unsynced).push((len, None));
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.crashed.load(SeqCst) || self.fail_sync.swap(false, SeqCst) {
                return Err(io::Error::other("the disk is gone"));
            }
            for op in lock(&self.unsynced).drain(..) {
                self.apply(&op);
            }
            self.disk.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            let mut live = lock(&self.live);
            let end = offset as usize + data.len();
            if end > live.len() {
                live.resize(end, 0);
            }
            live[offset as usize..end].copy_from_slice(data);
            lock(&self.unsynced).push((offset, Some(data.to_vec())));
            Ok(())
        }
    }

    /// A small deterministic generator (xorshift64*), for the journal's tests and the
    /// overlay's.
    pub(super) struct Rng(pub(super) u64);
    impl Rng {
        pub(super) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub(super) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    struct Crashable {
        db: Database,
        crashed: Arc<std::sync::atomic::AtomicBool>,
        fail_sync: Arc<std::sync::atomic::AtomicBool>,
        /// The journal's shared part, to look at the ring.
        shared: Arc<Shared<Volatile>>,
    }

    fn open_volatile(dir: &Path, capacity: u64) -> Crashable {
        let v = Volatile::new(&dir.join("db.redb"));
        let (crashed, fail_sync) = (v.crashed.clone(), v.fail_sync.clone());
        let j = Journaled::with_backend(v, &dir.join("db.redb.journal"), capacity).unwrap();
        let shared = j.shared.clone();
        let db = Database::builder().create_with_backend(j).unwrap();
        Crashable {
            db,
            crashed,
            fail_sync,
            shared,
        }
    }

    /// Loses power: the database file keeps what was synced and, of the rest, what `keep`
    /// picks; the journal keeps what it has (its writes are synced before they count).
    fn crash(c: Crashable, rng: &mut Rng, keep_percent: u64) {
        // From now on nothing more reaches the database file (a checkpoint fails).
        c.crashed.store(true, std::sync::atomic::Ordering::SeqCst);
        let unsynced: Vec<_> = lock(&c.shared.inner.unsynced).drain(..).collect();
        for op in &unsynced {
            if rng.next() % 100 < keep_percent {
                c.shared.inner.apply(op);
            }
        }
        drop(c.shared);
        drop(c.db);
    }

    fn value(k: u64, big: bool) -> Vec<u8> {
        let n = if big {
            300_000
        } else {
            40 + (k as usize % 700)
        };
        (0..n).map(|i| (k as usize * 31 + i) as u8).collect()
    }

    fn insert(db: &Database, k: u64, big: bool) {
        let tx = db.begin_write().unwrap();
        tx.open_table(T)
            .unwrap()
            .insert(k, value(k, big).as_slice())
            .unwrap();
        tx.commit().unwrap();
    }

    fn check(path: &Path, acked: &[(u64, bool)]) {
        let mut db = Database::builder()
            .create_with_backend(Journaled::open(path, DEFAULT_CAPACITY).unwrap())
            .unwrap();
        assert!(
            db.check_integrity().unwrap(),
            "database damaged after replay"
        );
        let rx = db.begin_read().unwrap();
        let t = rx.open_table(T).unwrap();
        for (k, big) in acked {
            let v = t
                .get(k)
                .unwrap()
                .unwrap_or_else(|| panic!("commit {k} lost"));
            assert_eq!(v.value(), value(*k, *big).as_slice(), "commit {k} damaged");
        }
    }

    #[test]
    fn acknowledged_commits_survive_power_loss() {
        for seed in 1..=6u64 {
            let dir = tempfile::tempdir().unwrap();
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // A small ring: it wraps and is checkpointed many times (in the background
            // and, when full, by the commit itself).
            let c = open_volatile(dir.path(), MIN_CAPACITY * 2);
            // Without background checkpoints the ring fills, is checkpointed by a commit,
            // and its live entries run across its end.
            c.shared
                .paused
                .store(seed % 2 == 0, std::sync::atomic::Ordering::SeqCst);
            let mut acked = Vec::new();
            let n = 150 + rng.next() % 150;
            for k in 0..n {
                let big = k % 97 == 50; // larger than the ring allows: a checkpoint alone
                insert(&c.db, k, big);
                acked.push((k, big));
            }
            // Go on until the live entries run across the ring's end (replay must find the
            // next entry at the ring's start).
            let mut k = n;
            while seed % 2 == 0 && {
                let r = lock(&c.shared.ring);
                r.head >= r.tail
            } {
                insert(&c.db, k, false);
                acked.push((k, false));
                k += 1;
                assert!(k < n + 10_000, "the live entries never wrapped");
            }
            let generation = lock(&c.shared.ring).generation;
            assert!(generation > 3, "the ring was never checkpointed");
            crash(c, &mut rng, (seed - 1) * 20);
            check(&dir.path().join("db.redb"), &acked);
        }
    }

    #[test]
    fn a_checkpoint_at_the_rings_very_end_leaves_a_journal_that_opens() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let v = Volatile::new(&path);
        let crashed = v.crashed.clone();
        let j = Journaled::with_backend(v, &journal_path(&path), MIN_CAPACITY).unwrap();
        j.shared.paused.store(true, SeqCst);
        // Entries of one block each (the entry's head and one write record): fifteen fill
        // the ring to its end.
        let len = ALIGN as usize - ENTRY_HEAD - 13;
        let block = |i: u8| vec![i; len];
        for i in 0..15u8 {
            j.write(u64::from(i) * ALIGN, &block(i)).unwrap();
            j.sync_data().unwrap();
        }
        assert_eq!(lock(&j.shared.ring).head, MIN_CAPACITY);
        j.shared.checkpoint().unwrap();
        // The next entry wraps to the ring's start; then the power goes.
        j.write(0, &block(99)).unwrap();
        j.sync_data().unwrap();
        crashed.store(true, SeqCst);
        drop(j);
        // The header names the ring's end; replay finds the entry at its start.
        let reopened = Journaled::open(&path, MIN_CAPACITY).unwrap();
        let mut got = vec![0; len];
        reopened.read(0, &mut got).unwrap();
        assert_eq!(got, block(99));
    }

    #[test]
    fn a_torn_last_entry_is_not_replayed_and_the_commit_before_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let c = open_volatile(dir.path(), DEFAULT_CAPACITY);
        for k in 0..5 {
            insert(&c.db, k, false);
        }
        let last = {
            let r = lock(&c.shared.ring);
            assert_eq!(r.tail, DATA_START, "no checkpoint expected yet");
            r.head
        };
        insert(&c.db, 5, false);
        crash(c, &mut Rng(7), 0);
        // The last entry's write reached the disk only in part.
        let log = OpenOptions::new()
            .write(true)
            .open(dir.path().join("db.redb.journal"))
            .unwrap();
        log.write_all_at(&[0xff; 16], last + 100).unwrap();
        drop(log);
        let path = dir.path().join("db.redb");
        check(
            &path,
            &[(0, false), (1, false), (2, false), (3, false), (4, false)],
        );
        let db = Database::builder()
            .create_with_backend(Journaled::open(&path, DEFAULT_CAPACITY).unwrap())
            .unwrap();
        let rx = db.begin_read().unwrap();
        assert!(rx.open_table(T).unwrap().get(5).unwrap().is_none());
    }

    /// A durable commit inside `deferring` returns before the journal's sync and leaves
    /// it pending; waiting for it, or a checkpoint (before it writes the overlay to the
    /// database file), makes the entry durable. Outside `deferring` a commit is durable
    /// when it returns.
    #[test]
    fn a_deferred_commit_is_synced_by_its_wait_or_before_a_checkpoint_writes_the_file() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let c = open_volatile(dir.path(), DEFAULT_CAPACITY);
        c.shared.paused.store(true, SeqCst);
        let synced = |c: &Crashable| c.shared.synced.load(SeqCst);
        let appended = |c: &Crashable| lock(&c.shared.ring).next_seq - 1;

        insert(&c.db, 1, false);
        assert_eq!(synced(&c), appended(&c), "a plain commit is synced");

        let ((), pending) = deferring(|| insert(&c.db, 2, false));
        let pending = pending.expect("the commit's sync was left pending");
        assert!(synced(&c) < appended(&c), "the entry is appended unsynced");
        assert!(
            !sync_deferred(),
            "nothing is left pending outside `deferring`"
        );
        pending.wait().unwrap();
        assert_eq!(synced(&c), appended(&c));

        let ((), pending) = deferring(|| insert(&c.db, 3, false));
        assert!(pending.is_some() && synced(&c) < appended(&c));
        // The checkpoint syncs the journal before the overlay reaches the database file.
        c.shared.checkpoint().unwrap();
        assert_eq!(synced(&c), appended(&c));
        assert!(
            lock(&c.shared.inner.unsynced).is_empty(),
            "the file was synced"
        );
        assert!(
            lock(&c.shared.overlay).bytes() == 0,
            "the overlay was written out"
        );
        drop(pending);

        // A cut of the file syncs the journal first.
        let ((), pending) = deferring(|| insert(&c.db, 6, false));
        assert!(pending.is_some() && synced(&c) < appended(&c));
        let end = c.shared.inner.len().unwrap();
        c.shared.set_len(end + 4096).unwrap();
        assert!(synced(&c) < appended(&c), "growing the file needs no sync");
        c.shared.set_len(end).unwrap();
        assert_eq!(synced(&c), appended(&c));
        drop(pending);

        // A panic inside `deferring` leaves nothing deferred behind.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            deferring(|| {
                insert(&c.db, 4, false);
                panic!("after the commit");
            })
        }));
        assert!(caught.is_err());
        assert!(!sync_deferred() && !deferred::is_deferring());
        insert(&c.db, 5, false);
        assert_eq!(synced(&c), appended(&c));
        drop(c);
        check(
            &dir.path().join("db.redb"),
            &[(1, false), (2, false), (3, false), (5, false), (6, false)],
        );
    }

    /// Readers on other threads, with almost no redb cache (so their reads come to the
    /// backend), see every committed value while the writer commits (durably, deferred and
    /// not durably) and the checkpointer writes the overlay out under them.
    #[test]
    fn readers_see_every_commit_while_checkpoints_write_the_overlay_out() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let journaled = Journaled::open(&path, MIN_CAPACITY * 4).unwrap();
        let shared = journaled.shared.clone();
        let db = Arc::new(
            Database::builder()
                .set_cache_size(64 << 10)
                .create_with_backend(journaled)
                .unwrap(),
        );
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2u64)
            .map(|r| {
                let (db, done, stop) = (db.clone(), done.clone(), stop.clone());
                thread::spawn(move || {
                    let mut rng = Rng(r + 7);
                    let mut reads = 0u64;
                    while !stop.load(SeqCst) {
                        let n = done.load(SeqCst);
                        if n == 0 {
                            thread::yield_now();
                            continue;
                        }
                        let rx = db.begin_read().unwrap();
                        let t = rx.open_table(T).unwrap();
                        for _ in 0..20 {
                            let k = rng.next() % n;
                            let v = t.get(k).unwrap().unwrap_or_else(|| panic!("{k} missing"));
                            assert_eq!(v.value(), value(k, k.is_multiple_of(50)).as_slice(), "{k}");
                            reads += 1;
                        }
                    }
                    reads
                })
            })
            .collect();
        let generation = lock(&shared.ring).generation;
        for k in 0..600u64 {
            let mut tx = db.begin_write().unwrap();
            if k % 3 == 2 {
                tx.set_durability(redb::Durability::None).unwrap();
            }
            tx.open_table(T)
                .unwrap()
                .insert(k, value(k, k.is_multiple_of(50)).as_slice())
                .unwrap();
            if k % 3 == 1 {
                let (committed, pending) = deferring(|| tx.commit());
                committed.unwrap();
                if let Some(p) = pending {
                    p.wait().unwrap();
                }
            } else {
                tx.commit().unwrap();
            }
            done.store(k + 1, SeqCst);
        }
        // The last non-durable commits persisted.
        db.begin_write().unwrap().commit().unwrap();
        stop.store(true, SeqCst);
        for r in readers {
            assert!(r.join().unwrap() > 0, "a reader read nothing");
        }
        assert!(
            lock(&shared.ring).generation > generation + 3,
            "the overlay was hardly ever written out"
        );
        drop(shared);
        let db = Arc::into_inner(db).unwrap();
        drop(db);
        let acked: Vec<(u64, bool)> = (0..600u64).map(|k| (k, k.is_multiple_of(50))).collect();
        check(&path, &acked);
    }

    #[test]
    fn a_clean_close_leaves_a_database_that_needs_no_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let db = Database::builder()
            .create_with_backend(Journaled::open(&path, DEFAULT_CAPACITY).unwrap())
            .unwrap();
        for k in 0..20 {
            insert(&db, k, false);
        }
        drop(db);
        let db = Database::open(&path).unwrap();
        let rx = db.begin_read().unwrap();
        assert_eq!(
            rx.open_table(T).unwrap().get(19).unwrap().unwrap().value(),
            value(19, false)
        );
        drop(rx);
        drop(db);
        // And the journal has nothing to replay.
        let log = File::open(journal_path(&path)).unwrap();
        let h = read_header(&log, &path).unwrap();
        let len = log.metadata().unwrap().len();
        let mut probe = Volatile::new(&dir.path().join("probe"));
        probe.crashed = Arc::default();
        assert_eq!(replay(&probe, &log, &path, &h, len).unwrap().2, 0);
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let first = Journaled::open(&path, DEFAULT_CAPACITY).unwrap();
        assert!(matches!(
            Journaled::open(&path, DEFAULT_CAPACITY),
            Err(JournalError::Locked(_))
        ));
        assert!(matches!(recover(&path), Err(JournalError::Locked(_))));
        first.close().unwrap();
        drop(first);
        Journaled::open(&path, DEFAULT_CAPACITY).unwrap();
    }

    #[test]
    fn a_failed_sync_refuses_every_later_commit() {
        let dir = tempfile::tempdir().unwrap();
        let c = open_volatile(dir.path(), MIN_CAPACITY);
        insert(&c.db, 0, false);
        c.fail_sync.store(true, std::sync::atomic::Ordering::SeqCst);
        // The commit too large for the ring checkpoints, whose sync fails.
        let tx = c.db.begin_write().unwrap();
        tx.open_table(T)
            .unwrap()
            .insert(1, value(1, true).as_slice())
            .unwrap();
        assert!(tx.commit().is_err());
        assert!(lock(&c.shared.ring).failed.is_some());
        assert!(c.shared.sync().is_err());
    }

    #[test]
    fn a_damaged_header_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        Journaled::open(&path, DEFAULT_CAPACITY)
            .unwrap()
            .close()
            .unwrap();
        let log = OpenOptions::new()
            .write(true)
            .open(journal_path(&path))
            .unwrap();
        log.write_all_at(&[0u8; 1024], 0).unwrap();
        drop(log);
        assert!(matches!(
            Journaled::open(&path, DEFAULT_CAPACITY),
            Err(JournalError::Corrupt { .. })
        ));
    }
}
